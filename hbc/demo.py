"""``make demo``: the main job on a bundled model.

Exports the bundled DemoNet (models/demo_cnn.py) to ONNX, prints its .hbir text and calops
table through the CLI, checks the float interpreter against onnxruntime, optimizes it (-O3:
BN folded, convs fused), calibrates and lowers it to int8, and checks the two independent
integer implementations (numpy kernels, torch int_infer) against each other bit for bit.
Then the deployment flow through the CLI: ``hbc compile`` to ``.hbm`` with its performance
report (calibrated on saved samples), ``hbc run`` on the simulator, ``hbc verify`` (simulator vs
int_infer bit for bit, float-vs-int error), and ``model_checker`` on a zoo model.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from hbc.ir.atomic import write_atomic


def _cli(*args: str) -> None:
    from .cli import main

    print(f"\n$ hbc {' '.join(args)}")
    try:
        main(list(args), standalone_mode=False)
    except SystemExit as e:
        if e.code:
            raise


def run(out_dir: str = "out/demo") -> int:
    """Run the demo; returns a process exit code."""
    import onnxruntime as ort

    import hbc
    from hbc.models import demo_cnn

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    onnx_path = out / "demo_cnn.onnx"
    demo_cnn.export(str(onnx_path))
    print(f"exported {onnx_path}")

    _cli("inspect", str(onnx_path))
    _cli("calops", str(onnx_path))
    _cli("inspect", str(onnx_path), "-o", str(out / "demo_cnn.hbir"))

    graph = hbc.load(out / "demo_cnn.hbir")
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    ours = hbc.interpret(graph, {"input": x})["logits"]
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    theirs = sess.run(["logits"], {"input": x})[0]
    err = float(np.max(np.abs(ours - theirs)))
    rel = err / float(np.ptp(theirs))
    print("\ninterpreter (.hbir reloaded) vs onnxruntime on a seeded input:")
    print(f"  max abs error {err:.3g} ({rel:.2e} of the output range); top-1 "
          f"{int(ours.argmax())} vs {int(theirs.argmax())}")
    ok = rel <= 1e-4
    _cli("opt", str(onnx_path), "--opt", "3", "-o", str(out / "demo_cnn.O3.hbir"))
    ok = _quantize(hbc.load(out / "demo_cnn.O3.hbir"), x, ours) and ok
    ok = _deploy(out, onnx_path) and ok
    print("demo: OK" if ok else "demo: MISMATCH")
    return 0 if ok else 1


def _quantize(graph, x: np.ndarray, float_out: np.ndarray) -> bool:
    """Calibrate on seeded samples, lower to int8, compare numpy and torch integer models."""
    import hbc
    from hbc.passes.calibrate import calibrate
    from hbc.quant import build_int_infer

    rng = np.random.default_rng(1)
    samples = [{"input": rng.standard_normal((1, 3, 32, 32)).astype(np.float32)}
               for _ in range(16)]
    calibrated = calibrate(graph, samples, method="mse")
    lowered = hbc.passes.run(calibrated, passes=["lower-int"], march="bayes")
    ints = sum(n.op.startswith("q") for n in lowered.nodes)
    print(f"\nquantized: {ints} integer ops, "
          f"{len(lowered.meta.get('cpu_nodes', []))} CPU fallbacks (calibration: mse, 16 samples)")
    numpy_out = hbc.interpret(lowered, {"input": x})["logits"]
    torch_out = build_int_infer(lowered).run({"input": x})["logits"]
    exact = np.array_equal(numpy_out, torch_out)
    err = float(np.sum((numpy_out - float_out) ** 2))
    sqnr = 10 * np.log10(float(np.sum(float_out ** 2)) / max(err, 1e-30))
    print(f"  int8 vs float logits: SQNR {sqnr:.1f} dB; numpy kernels vs torch int_infer: "
          f"{'bit-exact' if exact else 'MISMATCH'}")
    return exact


def _deploy(out: Path, onnx_path: Path) -> bool:
    """compile -> run -> verify through the CLI, then model_checker on a zoo model."""
    rng = np.random.default_rng(2)
    calib = out / "calib.npz"
    samples = rng.standard_normal((16, 3, 32, 32)).astype(np.float32)
    x = rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
    write_atomic(calib, lambda f: np.savez(f, input=samples))
    write_atomic(out / "x.npy", lambda f: np.save(f, x, allow_pickle=False))
    hbm = out / "demo_cnn.hbm"
    _cli("compile", str(onnx_path), "--march", "bayes", "--opt", "3", "--calib-data",
         str(calib), "-o", str(hbm))
    _cli("inspect", str(hbm))
    _cli("run", str(hbm), "--input", f"input={out / 'x.npy'}", "-o", str(out / "run"),
         "--dequantize")
    try:
        _cli("verify", str(hbm), "--reference", str(onnx_path), "--data", str(calib))
    except SystemExit:
        return False
    try:
        _cli("check", "zoo:mobilenet_v2", "--march", "bernoulli2")
    except SystemExit as e:  # exit 1: the report lists what falls back to the CPU
        if e.code != 1:
            raise
    return True


if __name__ == "__main__":
    sys.exit(run())
