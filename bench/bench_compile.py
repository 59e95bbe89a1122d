"""Compile benchmark: ``hbc.compile`` of a ResNet-50 ONNX model at ``--opt 3`` with 32 calibration
samples, against onnxruntime on the same model and samples (issue 5, docs/benchmarks.md).

- hbc: ``hbc.compile(model.onnx, "bayes", 3, calib_data=32 samples, calib_method="max")``: load,
  passes, march check, calibration, lowering, estimate, ``.hbm`` + reports written.
- onnxruntime: ``quant_pre_process`` + ``quantize_static`` (QDQ, int8 symmetric activations,
  int8 per-channel weights, MinMax) on the same samples; and creating an inference session of
  the float model (what a float deployment "compiles").

Figures: the time ratio (target at most 1.0) and the ``.hbm`` size against the model's int8
weight bytes (target at most 1.05x). Inputs: the same natural-image crops as bench_quant.py.
CPU seconds of this process (``time.process_time``) and wall seconds are both printed.

    .venv/bin/python bench/bench_compile.py [--quick]     (--quick: ResNet-18)
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import bench_quant as bq  # noqa: E402  (sets the thread count before numpy loads)
import torch  # noqa: E402
from onnxruntime.quantization import QuantFormat, QuantType, quant_pre_process, quantize_static  # noqa: E402,E501

import hbc  # noqa: E402
from hbc.models import build  # noqa: E402
from hbc.models.common import export_onnx, recalibrate_bn  # noqa: E402

SAMPLES = 32


def int8_weight_bytes(lowered) -> int:
    """Bytes of the int8 weights of the integer program (one byte per conv/linear weight)."""
    total = 0
    for node in lowered.nodes:
        if node.op in ("qconv", "qlinear") and node.inputs[1] is not None:
            total += node.inputs[1].type.numel
    return total


def main(argv: list[str]) -> int:
    torch.set_num_threads(bq.THREADS)
    name = "resnet18" if "--quick" in argv else "resnet50"
    photos, source = bq._photos()
    module, example = build(name)
    recalibrate_bn(module, torch.from_numpy(bq.crops(photos, 64, seed=10)).split(16))
    calib = bq.crops(photos, SAMPLES, seed=11)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        onnx_path = folder / f"{name}.onnx"
        export_onnx(module, example, str(onnx_path))
        with bq.Timer() as t_session:
            bq._session(onnx_path)
        bq.limit_ort_calibration_threads()
        with bq.Timer() as t_ort:
            pre = folder / "pre.onnx"
            quant_pre_process(str(onnx_path), str(pre))
            quantize_static(str(pre), str(folder / "qdq.onnx"), bq._Reader(calib),
                            quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            calibrate_method=bq.ORT_METHODS["MinMax"],
                            extra_options={"ActivationSymmetric": True,
                                           "WeightSymmetric": True})
        with bq.Timer() as t_ours:
            result = hbc.compile(str(onnx_path), "bayes", 3, output=folder / f"{name}.hbm",
                                 calib_data=bq.samples(calib), calib_method="max")
        size = result.output.stat().st_size
        weights = int8_weight_bytes(result.models[0].graph)
    print(f"{name} 1x3x224x224, {SAMPLES} calibration samples ({source}); threads {bq.THREADS}")
    print(f"{'':34}{'CPU s':>8}{'wall s':>8}")
    rows = [("hbc compile -O3 (bayes)", t_ours), ("ORT pre_process + quantize_static", t_ort),
            ("ORT float session creation", t_session)]
    for label, t in rows:
        print(f"{label:34}{t.cpu:8.2f}{t.wall:8.2f}")
    ratio = t_ours.cpu / t_ort.cpu
    print(f"compile / quantize_static: {ratio:.2f}x CPU time (target <= 1.0: "
          f"{'met' if ratio <= 1.0 else 'missed'})")
    print(f".hbm {size:,} bytes vs int8 weights {weights:,} bytes: {size / weights:.3f}x "
          f"(target <= 1.05: {'met' if size / weights <= 1.05 else 'missed'})")
    s = result.models[0].perf["summary"]
    print(f"estimate: {s['latency_ms']:.3f} ms, {s['fps']:.1f} FPS, "
          f"{s['ddr_bytes_per_frame'] / 2**20:.2f} MiB DDR/frame")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
