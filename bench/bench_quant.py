"""Quantization benchmark: hbc's calibration + integer lowering against onnxruntime's
``quantize_static``, on ResNet-18 and MobileNetV2 at 1x3x224x224 (docs/benchmarks.md).

Models: the zoo's ResNet-18 and MobileNetV2 with seeded weights, whose BN statistics are then
re-estimated on natural-image inputs (``recalibrate_bn``; seeded weights alone make deep
activations explode to 1e3-1e6, which no trained network does), exported to ONNX.
Inputs: 224x224 crops (random size and position, random flip, ImageNet normalisation) of
scikit-learn's two sample photographs (Pillow decodes them; without it, 1/f "natural spectrum"
random fields stand in, and the header says so). Separate random crops (different seeds) for
the BN re-estimation (64), the calibration (N = 32, the same samples in the same order for both
tools) and the evaluation (32 held-out crops).

- onnxruntime: ``quant_pre_process`` (its recommended shape inference + Conv/BN fusion), then
  ``quantize_static`` in QDQ format, int8 symmetric activations, int8 per-channel symmetric
  weights, for MinMax, Entropy and Percentile (their defaults; ``--entropy-2048`` adds Entropy
  with 2048 histogram bins, which quantize_static cannot pass through); the QDQ model runs in an
  ORT session (integer kernels after ORT's QDQ fusion). Timed: ``quantize_static``.
- hbc: ``hbc.load`` -> ``passes.run(opt=3)`` -> ``calibrate(method)`` (max, percentile, kl, mse,
  auto; ``--engine`` picks the float forward pass of the calibration: ``auto``, the default,
  runs it in onnxruntime through the IR -> ONNX exporter; ``interpreter`` in hbc's numpy
  interpreter) -> ``lower-int`` -> ``hbc.interpret`` of the integer graph. Timed:
  ``calibrate`` alone, and the whole ``load + O3 + calibrate + lower``. Percentile runs at
  each tool's default level, 99.999 for both, so percentile/Percentile is like for like.

Fidelity: SQNR (dB) of the dequantized int8 output against the float ORT model's output over
all held-out samples, ``10 log10(sum ref^2 / sum (q - ref)^2)``, and top-1 agreement with float.
Also printed: the SQNR with only the input quantized (how much the float model amplifies a
small perturbation: no calibration can do much better) and each float engine's time per sample.
Targets (issue 4): our best SQNR >= ORT's best; our calibration time <= half of ORT's.

Times are CPU seconds of this process (``time.process_time``, all threads), which a busy shared
machine disturbs far less than wall time (also printed). Threads: ``BENCH_THREADS`` (default 1)
sets OMP_NUM_THREADS, OPENBLAS_NUM_THREADS and MKL_NUM_THREADS before numpy loads,
``torch.set_num_threads``, the intra-op threads of every ORT session, including the calibration
session quantize_static opens itself (patched: it takes ORT's default, all cores) and hbc's
(``calibrate(threads=BENCH_THREADS)``). The header
prints OPENBLAS_CORETYPE, which decides numpy's GEMM kernels (see docs/benchmarks.md).

    .venv/bin/python bench/bench_quant.py [--quick] [--entropy-2048] [--profile METHOD]
                                          [--engine auto|onnxruntime|interpreter]

``--profile METHOD`` also prints a cProfile (CPU clock) of ``calibrate(METHOD)`` per model
(docs/benchmarks.md profiles ``auto``).
"""

from __future__ import annotations

import os

THREADS = int(os.environ.get("BENCH_THREADS", "1"))
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = str(THREADS)

import io  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from contextlib import contextmanager, redirect_stdout  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from onnxruntime.quantization import (  # noqa: E402
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process  # noqa: E402

import hbc  # noqa: E402
from hbc.models.common import export_onnx, recalibrate_bn, seeded_init  # noqa: E402
from hbc.models.mobilenet import mobilenet_v2  # noqa: E402
from hbc.models.resnet import resnet18  # noqa: E402
from hbc.passes import registry as _registry  # noqa: E402,F401  (registers the passes)
from hbc.passes import run  # noqa: E402
from hbc.passes.calibrate import calibrate  # noqa: E402

N_CALIB, N_EVAL, N_BN = 32, 32, 64
OURS = ("max", "percentile", "kl", "mse", "auto")
ORT_METHODS = {"MinMax": CalibrationMethod.MinMax, "Entropy": CalibrationMethod.Entropy,
               "Percentile": CalibrationMethod.Percentile}
MODELS: dict[str, Callable[[], torch.nn.Module]] = {
    "ResNet-18": resnet18, "MobileNetV2": mobilenet_v2}
MEAN = np.array([0.485, 0.456, 0.406], np.float32).reshape(1, 3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], np.float32).reshape(1, 3, 1, 1)


# -- inputs --------------------------------------------------------------------------------------
def _photos() -> tuple[list[np.ndarray], str]:
    """scikit-learn's sample photographs as float HxWx3 in [0, 1], or 1/f random fields."""
    try:
        from sklearn.datasets import load_sample_images

        images = load_sample_images().images
        return [im.astype(np.float32) / 255.0 for im in images], \
            "scikit-learn sample images (china.jpg, flower.jpg)"
    except ImportError:
        rng = np.random.default_rng(1234)
        return [_pink_field(rng, 427, 640) for _ in range(4)], \
            "1/f random fields (Pillow missing: sample images not decodable)"


def _pink_field(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """An HxWx3 image with a 1/f amplitude spectrum (natural-image statistics), in [0, 1]."""
    f = np.sqrt(np.fft.fftfreq(h)[:, None] ** 2 + np.fft.rfftfreq(w)[None, :] ** 2)
    f[0, 0] = 1.0
    spec = (rng.standard_normal((3, h, w // 2 + 1)) + 1j * rng.standard_normal((3, h, w // 2 + 1)))
    img = np.fft.irfft2(spec / f, s=(h, w)).transpose(1, 2, 0)
    img = (img - img.mean()) / (4 * img.std()) + 0.5
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def crops(photos: list[np.ndarray], n: int, seed: int) -> np.ndarray:
    """``n`` normalised 1x3x224x224 crops: random side in [224, min(H, W)], random position,
    random horizontal flip, bilinear (antialiased) resize to 224; shape (n, 3, 224, 224)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        im = photos[int(rng.integers(len(photos)))]
        side = int(rng.integers(224, min(im.shape[:2]) + 1))
        y = int(rng.integers(im.shape[0] - side + 1))
        x = int(rng.integers(im.shape[1] - side + 1))
        t = torch.from_numpy(np.ascontiguousarray(im[y:y + side, x:x + side]))
        t = torch.nn.functional.interpolate(t.permute(2, 0, 1)[None], size=(224, 224),
                                            mode="bilinear", antialias=True, align_corners=False)
        if rng.random() < 0.5:
            t = t.flip(-1)
        out.append((t.numpy() - MEAN) / STD)
    return np.concatenate(out).astype(np.float32)


def samples(x: np.ndarray) -> list[dict[str, np.ndarray]]:
    return [{"input": x[i:i + 1]} for i in range(len(x))]


# -- measures ------------------------------------------------------------------------------------
def sqnr_db(ref: np.ndarray, q: np.ndarray) -> float:
    ref, q = ref.astype(np.float64), q.astype(np.float64)
    noise = float(np.sum((q - ref) ** 2))
    return float("inf") if noise == 0.0 else 10.0 * np.log10(float(np.sum(ref * ref)) / noise)


def top1_agree(ref: np.ndarray, q: np.ndarray) -> float:
    return 100.0 * float(np.mean(ref.argmax(-1) == q.argmax(-1)))


@dataclass
class Row:
    """One quantized model: fidelity and times (CPU seconds of this process, and wall)."""

    tool: str
    method: str
    sqnr: float
    top1: float
    calib_cpu: float  # ORT: quantize_static; ours: calibrate()
    calib_wall: float
    total_cpu: float  # ORT: pre_process + quantize_static; ours: load + O3 + calibrate + lower


class Timer:
    """CPU time of this process (all threads) and wall time of a ``with`` block."""

    def __enter__(self) -> Timer:
        self.cpu, self.wall = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cpu = time.process_time() - self.cpu
        self.wall = time.perf_counter() - self.wall


def _session(path: str | Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def ort_outputs(path: str | Path, x: np.ndarray) -> np.ndarray:
    return ort_run(path, x)[0]


def ort_run(path: str | Path, x: np.ndarray) -> tuple[np.ndarray, float]:
    """Outputs of the model at ``path`` on each sample of ``x`` (batch 1), and the CPU
    milliseconds per sample (session creation and a warm-up run excluded)."""
    sess = _session(path)
    sess.run(None, samples(x[:1])[0])
    with Timer() as t:
        y = np.concatenate([sess.run(None, s)[0] for s in samples(x)])
    return y, 1e3 * t.cpu / len(x)


class _Reader(CalibrationDataReader):
    def __init__(self, x: np.ndarray) -> None:
        self.it = iter(samples(x))

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.it, None)


# -- the two tools -------------------------------------------------------------------------------
def limit_ort_calibration_threads() -> bool:
    """quantize_static's calibrator opens its own session with default options (all cores):
    give it ``THREADS`` intra-op threads like every other session here. False if the
    calibrator's API changed (then it runs with ORT's default threads)."""
    from onnxruntime.quantization import calibrate as ort_calibrate

    base = getattr(ort_calibrate, "CalibraterBase", None)
    if base is None or not hasattr(base, "create_inference_session"):
        return False

    def create_inference_session(self) -> None:  # ORT's own body plus the thread count
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.intra_op_num_threads = THREADS
        self.infer_session = ort.InferenceSession(self.augmented_model_path, sess_options=opts,
                                                  providers=self.execution_providers)

    base.create_inference_session = create_inference_session
    return True


@contextmanager
def entropy_bins(bins: int | None) -> Iterator[None]:
    """Within the block, quantize_static's Entropy calibrator uses ``bins`` histogram bins
    (quantize_static passes no ``num_bins`` through, so it always has 128, and its threshold
    search over 128 quantized bins has a single candidate: the max). None: unchanged."""
    import importlib

    module = importlib.import_module("onnxruntime.quantization.quantize")
    original = module.create_calibrator

    def create_calibrator(*args, **kwargs):
        kwargs["extra_options"] = {**(kwargs.get("extra_options") or {}), "num_bins": bins}
        return original(*args, **kwargs)

    if bins is not None:
        module.create_calibrator = create_calibrator
    try:
        yield
    finally:
        module.create_calibrator = original


def bench_ort(folder: Path, onnx_path: Path, calib: np.ndarray, held: np.ndarray,
              ref: np.ndarray, methods: list[str]) -> list[Row]:
    pre = folder / "pre.onnx"
    with Timer() as t_pre:
        quant_pre_process(str(onnx_path), str(pre))
    rows = []
    for name in methods:
        out = folder / f"qdq_{name}.onnx"
        extra = {"ActivationSymmetric": True, "WeightSymmetric": True}
        method, _, bins = name.partition("-")
        with (entropy_bins(int(bins) if bins else None), redirect_stdout(io.StringIO()),
              Timer() as t):
            quantize_static(str(pre), str(out), _Reader(calib), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QInt8,
                            weight_type=QuantType.QInt8, calibrate_method=ORT_METHODS[method],
                            extra_options=extra)
        y = ort_outputs(out, held)
        rows.append(Row("onnxruntime", name, sqnr_db(ref, y), top1_agree(ref, y), t.cpu, t.wall,
                        t_pre.cpu + t.cpu))
    return rows


def bench_ours(onnx_path: Path, calib: np.ndarray, held: np.ndarray, ref: np.ndarray,
               methods: list[str], engine: str = "auto") -> list[Row]:
    """Our rows; prints our float interpreter's time and its SQNR against ORT float."""
    with Timer() as t_load:
        g = run(hbc.load(onnx_path), opt=3)
    with Timer() as t_fwd:
        y_float = np.concatenate([hbc.interpret(g, s)["output"] for s in samples(held[:8])])
    float_sqnr = sqnr_db(ref[:8], y_float)
    print(f"  hbc float interpreter: {1e3 * t_fwd.cpu / 8:.1f} ms CPU per sample; "
          f"vs ORT float {float_sqnr:.1f} dB")
    data = samples(calib)
    rows = []
    for method in methods:
        with Timer() as t_cal:
            cg = calibrate(g, data, method, engine=engine, threads=THREADS)
        with Timer() as t_low:
            q = run(cg, passes=["lower-int"])
        if q.meta.get("cpu_nodes"):
            print(f"  note: {method}: CPU fallback nodes {q.meta['cpu_nodes']}")
        y = np.concatenate([hbc.interpret(q, s)["output"] for s in samples(held)])
        rows.append(Row("hbc", method, sqnr_db(ref, y), top1_agree(ref, y), t_cal.cpu,
                        t_cal.wall, t_load.cpu + t_cal.cpu + t_low.cpu))
    print(f"  hbc calibration forward pass: {cg.meta['calibration']['engine']}")
    return rows


def profile_calibration(onnx_path: Path, calib: np.ndarray, method: str, top: int = 12,
                        engine: str = "auto") -> str:
    """cProfile (CPU clock) of ``calibrate(method)``: the functions with the most own time."""
    import cProfile
    import pstats

    g = run(hbc.load(onnx_path), opt=3)
    prof = cProfile.Profile(time.process_time)
    prof.runcall(calibrate, g, samples(calib), method, engine=engine, threads=THREADS)
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    lines = out.getvalue().splitlines()
    total = next(line for line in lines if "function calls" in line).strip()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls"))
    root = str(Path(__file__).resolve().parent.parent) + "/"
    return "\n".join([f"  profile of calibrate({method!r}): {total}"] +
                     ["    " + line.replace(root, "") for line in lines[start:start + top + 1]])


def input_only_sqnr(onnx_path: Path, held: np.ndarray, ref: np.ndarray) -> float:
    """Output SQNR when only the input is int8 (scale max|x| / 127), the rest float: how much
    the float model amplifies a small perturbation (a bound on what any calibration reaches)."""
    s = np.float32(np.abs(held).max() / 127)
    return sqnr_db(ref, ort_outputs(onnx_path, (np.rint(held / s) * s).astype(np.float32)))


# -- report --------------------------------------------------------------------------------------
def print_table(rows: list[Row]) -> None:
    print(f"  {'tool':<12} {'method':<12} {'SQNR dB':>8} {'top-1 %':>8} {'calib CPU s':>12} "
          f"{'calib wall s':>13} {'total CPU s':>12}")
    for r in rows:
        print(f"  {r.tool:<12} {r.method:<12} {r.sqnr:8.2f} {r.top1:8.1f} {r.calib_cpu:12.2f} "
              f"{r.calib_wall:13.2f} {r.total_cpu:12.2f}")


def verdict(ours: list[Row], theirs: list[Row]) -> None:
    best_o = max(ours, key=lambda r: r.sqnr)
    best_t = max(theirs, key=lambda r: r.sqnr)
    print(f"  best SQNR: hbc {best_o.method} {best_o.sqnr:.2f} dB vs ORT {best_t.method} "
          f"{best_t.sqnr:.2f} dB -> {best_o.sqnr - best_t.sqnr:+.2f} dB "
          f"(target >= 0: {'met' if best_o.sqnr >= best_t.sqnr else 'MISSED'})")
    ratio = best_o.calib_cpu / best_t.calib_cpu
    print(f"  calibration CPU time, best vs best: hbc {best_o.method} {best_o.calib_cpu:.2f} s / "
          f"ORT {best_t.method} {best_t.calib_cpu:.2f} s = {ratio:.2f} "
          f"(target <= 0.5: {'met' if ratio <= 0.5 else 'MISSED'}; wall "
          f"{best_o.calib_wall / best_t.calib_wall:.2f})")
    fastest = min(theirs, key=lambda r: r.calib_cpu)
    within = [r.method for r in ours if r.calib_cpu <= 0.5 * fastest.calib_cpu]
    print(f"  fastest ORT ({fastest.method}, {fastest.calib_cpu:.2f} s): hbc methods within half "
          f"of it: {', '.join(within) or 'none'}")
    pairs = [("max", "MinMax"), ("kl", "Entropy"), ("percentile", "Percentile")]
    by_o = {r.method: r for r in ours}
    by_t = {r.method: r for r in theirs}
    for o, t in pairs:
        if o in by_o and t in by_t:
            print(f"  like for like {o}/{t}: SQNR {by_o[o].sqnr - by_t[t].sqnr:+.2f} dB, "
                  f"calibration CPU time ratio {by_o[o].calib_cpu / by_t[t].calib_cpu:.2f}, "
                  f"total CPU time ratio {by_o[o].total_cpu / by_t[t].total_cpu:.2f}")


def main(argv: list[str]) -> int:
    quick = "--quick" in argv
    profile = argv[argv.index("--profile") + 1] if "--profile" in argv[:-1] else None
    engine = argv[argv.index("--engine") + 1] if "--engine" in argv[:-1] else "auto"
    ort.set_default_logger_severity(3)
    torch.set_num_threads(THREADS)
    patched = limit_ort_calibration_threads()
    photos, source = _photos()
    n_eval = 8 if quick else N_EVAL
    print(f"machine: {platform.machine()}, {_cpu_name()}, {os.cpu_count()} CPUs; threads "
          f"{THREADS} (OMP/OPENBLAS/MKL, torch, ORT sessions"
          f"{', ORT calibration session' if patched else ''}); OPENBLAS_CORETYPE="
          f"{os.environ.get('OPENBLAS_CORETYPE', '(auto)')}; python "
          f"{platform.python_version()}, numpy {np.__version__}, onnxruntime {ort.__version__}, "
          f"torch {torch.__version__}")
    print(f"inputs: {source}; {N_CALIB} calibration samples, {n_eval} held-out, batch 1")
    bn_x = torch.from_numpy(crops(photos, N_BN, seed=0))
    calib = crops(photos, N_CALIB, seed=1)
    held = crops(photos, n_eval, seed=2)
    ort_methods = ["MinMax", "Entropy"] if quick else list(ORT_METHODS)
    if "--entropy-2048" in argv:
        ort_methods.append("Entropy-2048")
    t_start = time.perf_counter()
    for label, build in MODELS.items():
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            model = seeded_init(build())
            recalibrate_bn(model, bn_x.split(16))
            onnx_path = folder / "model.onnx"
            export_onnx(model, [torch.zeros(1, 3, 224, 224)], str(onnx_path))
            print(f"\n{label} (1x3x224x224)")
            ref, ms = ort_run(onnx_path, held)
            print(f"  ORT float session: {ms:.1f} ms CPU per sample; "
                  f"|output| max {np.abs(ref).max():.3g}; int8 input only, rest float: "
                  f"{input_only_sqnr(onnx_path, held, ref):.2f} dB")
            theirs = bench_ort(folder, onnx_path, calib, held, ref, ort_methods)
            ours = bench_ours(onnx_path, calib, held, ref, list(OURS), engine)
            prof = profile_calibration(onnx_path, calib, profile, engine=engine) \
                if profile else ""
        print_table(theirs + ours)
        verdict(ours, theirs)
        if prof:
            print(prof)
    print(f"\nbench wall time {time.perf_counter() - t_start:.1f} s")
    return 0  # figures, not a test: missed targets are printed, not failed


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
