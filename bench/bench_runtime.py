"""Simulator benchmark: latency of a compiled model on hbc's runtime (integer kernels) against
onnxruntime float32 on the same ONNX model, and the simulator's peak memory.

Per model (zoo ResNet-18, ResNet-50 and MobileNetV2 at 1x3x224x224, seeded weights):
export to ONNX, ``hbc.compile(onnx, march="bayes", opt=3)`` (scales from seeded random
samples: latency does not depend on them), then on one seeded random input:

- ``Runtime.run`` (float input, quantized by the program, integer outputs) in a fresh process
  that imports only ``hbc.runtime`` (numpy; as deployed: no torch loaded next to it), and
  ``InferenceSession.run`` of the float ONNX model (CPU provider, sequential, graph
  optimizations on) in this process: median wall time and median CPU time
  (``time.process_time``, which a busy shared machine disturbs far less) of ``--repeat`` runs
  after one warm-up each; ratio = simulator / onnxruntime (issue 6 target: at most 2.0x), by
  wall time and by CPU time.
- peak memory of the simulator process (``VmHWM`` minus the resident size after the imports,
  Linux only), against the ``.hbm`` size plus the two largest activations of the program.
- ``--numpy``: the simulator once more with ``HBC_NATIVE=0`` (numpy kernels only, no compiled
  ``qconv`` kernels; docs/runtime.md), for the comparison.

Threads: ``BENCH_THREADS`` (default 1) sets OMP/OpenBLAS/MKL threads before numpy loads and
the intra-op threads of the ORT session, so both engines get the same cores. numpy's matrix
products run on the BLAS kernels OpenBLAS picks (``OPENBLAS_CORETYPE`` overrides them; the
header names them); onnxruntime picks its own.

    .venv/bin/python bench/bench_runtime.py [--models resnet18,resnet50,mobilenet_v2]
                                            [--repeat N] [--numpy] [--json]
"""

from __future__ import annotations

import os

THREADS = int(os.environ.get("BENCH_THREADS", "1"))
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = str(THREADS)

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import median_time  # noqa: E402

MODELS = ("resnet18", "resnet50", "mobilenet_v2")

#: the simulator in a fresh process: resident KiB after the imports, peak KiB, run times
_PROBE = """
import json, os, sys, time, numpy as np
def kib(key):
    if not os.path.exists("/proc/self/status"):
        return None
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1])
from hbc.runtime import Runtime
base = kib("VmRSS:")
rt = Runtime(sys.argv[1])
rng = np.random.default_rng(0)
feeds = {d.name: rng.standard_normal(d.shape).astype(np.float32) for d in rt.inputs}
times, cpu = [], []
for _ in range(int(sys.argv[2]) + 1):
    t0, c0 = time.perf_counter(), time.process_time()
    rt.run(feeds)
    times.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
print(json.dumps({"base": base, "peak": kib("VmHWM:"), "times": times[1:], "cpu": cpu[1:]}))
"""


def compile_model(name: str, folder: Path) -> tuple[Path, Path]:
    """The zoo model as ONNX and compiled to .hbm in ``folder``."""
    import torch

    import hbc
    from hbc import models
    from hbc.models.common import export_onnx

    torch.set_num_threads(THREADS)
    module, example = models.build(name)
    onnx_path = folder / f"{name}.onnx"
    export_onnx(module, example, str(onnx_path))
    hbm = folder / f"{name}.hbm"
    hbc.compile(str(onnx_path), march="bayes", opt=3, output=hbm, report_dir=folder / "rep")
    return onnx_path, hbm


def two_largest_activations(graph) -> int:
    sizes = sorted((v.type.nbytes for n in graph.nodes for v in n.outputs), reverse=True)
    return sum(sizes[:2])


def simulate(hbm: Path, repeat: int, numpy_only: bool = False) -> dict:
    """The simulator probe's figures (see ``_PROBE``), with the numpy kernels only if asked."""
    env = dict(os.environ, **({"HBC_NATIVE": "0"} if numpy_only else {}))
    out = subprocess.run([sys.executable, "-c", _PROBE, str(hbm), str(repeat)], check=True,
                         capture_output=True, text=True, env=env)
    return json.loads(out.stdout)


def bench(name: str, folder: Path, repeat: int, numpy_only: bool = False) -> dict:
    import onnxruntime as ort

    from hbc.runtime import Runtime

    onnx_path, hbm = compile_model(name, folder)
    rt = Runtime(hbm)
    rng = np.random.default_rng(0)
    feeds = {d.name: rng.standard_normal(d.shape).astype(np.float32) for d in rt.inputs}
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    session.run(None, feeds)
    ref = median_time(lambda: session.run(None, feeds), repeat)
    ref_cpu = median_cpu_time(lambda: session.run(None, feeds), repeat)
    probe = simulate(hbm, repeat)
    sim, sim_cpu = statistics.median(probe["times"]), statistics.median(probe["cpu"])
    return {"model": name, "simulator_ms": 1000 * sim, "onnxruntime_ms": 1000 * ref,
            "ratio": sim / ref, "simulator_cpu_ms": 1000 * sim_cpu,
            "onnxruntime_cpu_ms": 1000 * ref_cpu, "cpu_ratio": sim_cpu / ref_cpu,
            "hbm_bytes": hbm.stat().st_size,
            "two_largest_activations_bytes": two_largest_activations(rt.graph),
            "peak_kib": None if probe["peak"] is None else probe["peak"] - probe["base"],
            "rss_after_imports_kib": probe["base"],
            **(numpy_figures(hbm, repeat, ref_cpu) if numpy_only else {})}


def numpy_figures(hbm: Path, repeat: int, ref_cpu: float) -> dict:
    """The simulator's CPU time with the numpy kernels only, and its ratio to onnxruntime."""
    probe = simulate(hbm, repeat, numpy_only=True)
    cpu = statistics.median(probe["cpu"])
    return {"numpy_cpu_ms": 1000 * cpu, "numpy_cpu_ratio": cpu / ref_cpu}


def median_cpu_time(fn, repeat: int) -> float:
    """Median CPU time (``time.process_time``) of ``repeat`` calls of ``fn``, in seconds."""
    times = []
    for _ in range(repeat):
        c0 = time.process_time()
        fn()
        times.append(time.process_time() - c0)
    return statistics.median(times)


def blas_kernels() -> str:
    """The BLAS numpy's matrix products run on and its kernels, e.g. "openblas Haswell"."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', 'unset')}"
    blas = [i for i in threadpool_info() if i.get("user_api") == "blas"]
    return ", ".join(f"{i.get('internal_api')} {i.get('architecture', '?')} kernels"
                     for i in blas) or "no BLAS found"


def compiled_kernels() -> str:
    """Which compiled qconv kernels the simulator uses here (docs/runtime.md)."""
    from hbc.ir import native

    if not native.available():
        return "compiled kernels: not built (numpy kernels only)"
    return f"compiled kernels: {' + '.join(native.features()) or 'portable C'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--numpy", action="store_true",
                        help="also time the simulator with its numpy kernels only")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    import onnxruntime as ort

    print(f"# simulator vs onnxruntime {ort.__version__} float32; {THREADS} thread(s); "
          f"{platform.machine()} {platform.processor() or ''}; numpy {np.__version__} "
          f"({blas_kernels()}); {compiled_kernels()}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            r = bench(name.strip(), Path(tmp), args.repeat, args.numpy)
            rows.append(r)
            mib = 1 << 20
            need = (r["hbm_bytes"] + r["two_largest_activations_bytes"]) / mib
            mem = "n/a" if r["peak_kib"] is None else f"{r['peak_kib'] / 1024:.1f} MiB"
            print(f"{r['model']:<13} simulator {r['simulator_ms']:8.1f} ms   onnxruntime "
                  f"{r['onnxruntime_ms']:7.1f} ms   ratio {r['ratio']:5.2f}x   (CPU "
                  f"{r['simulator_cpu_ms']:.1f} / {r['onnxruntime_cpu_ms']:.1f} ms = "
                  f"{r['cpu_ratio']:.2f}x)   peak memory {mem} (above the imports) vs .hbm + "
                  f"two largest activations {need:.1f} MiB")
            if args.numpy:
                print(f"{'':<13} numpy kernels only: CPU {r['numpy_cpu_ms']:.1f} ms = "
                      f"{r['numpy_cpu_ratio']:.2f}x onnxruntime")
    if args.json:
        print(json.dumps(rows, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
