"""Simulator benchmark: latency of a compiled model on hbc's runtime (integer kernels) against
onnxruntime float32 on the same ONNX model, and the simulator's peak memory.

Per model (zoo ResNet-18, ResNet-50 and MobileNetV2 at 1x3x224x224, seeded weights):
export to ONNX, ``hbc.compile(onnx, march="bayes", opt=3)`` (scales from seeded random
samples: latency does not depend on them), then on one seeded random input:

- ``Runtime.run`` (float input, quantized by the program, integer outputs) in a fresh process
  that imports only ``hbc.runtime`` (numpy; as deployed: no torch loaded next to it), and
  ``InferenceSession.run`` of the float ONNX model (CPU provider, sequential, graph
  optimizations on) in this process, after one warm-up each, in ``--rounds`` interleaved
  rounds of ``--repeat`` runs of each (this machine's speed drifts by tens of percent within a
  minute; interleaving makes both engines meet the same drift): median wall time and median
  CPU time (``time.process_time``) over all runs, ratio = simulator / onnxruntime (issue 6
  target: at most 2.0x) by wall time and by CPU time, and the ratio of the fastest runs.
- peak memory of the simulator process (``VmHWM`` minus the resident size after the imports,
  Linux only), against the ``.hbm`` size plus the two largest activations of the program.
- ``--numpy``: the simulator once more with ``HBC_NATIVE=0`` (numpy kernels only, no compiled
  ``qconv`` kernels; docs/runtime.md), for the comparison.

Threads: ``BENCH_THREADS`` (default 1) sets OMP/OpenBLAS/MKL threads before numpy loads and
the intra-op threads of the ORT session, so both engines get the same cores. numpy's matrix
products run on the BLAS kernels OpenBLAS picks (``OPENBLAS_CORETYPE`` overrides them; the
header names them); onnxruntime picks its own.

    .venv/bin/python bench/bench_runtime.py [--models resnet18,resnet50,mobilenet_v2]
                                            [--repeat N] [--rounds R] [--numpy] [--json]
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

MODELS = ("resnet18", "resnet50", "mobilenet_v2")

#: the simulator in a fresh process, driven over stdin: a number N runs the model N times and
#: prints their wall and CPU times; 0 prints the resident KiB after the imports and the peak
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
rt.run(feeds)
print("ready", flush=True)
for line in sys.stdin:
    n = int(line)
    if n == 0:
        break
    times, cpu = [], []
    for _ in range(n):
        t0, c0 = time.perf_counter(), time.process_time()
        rt.run(feeds)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    print(json.dumps({"times": times, "cpu": cpu}), flush=True)
print(json.dumps({"base": base, "peak": kib("VmHWM:")}), flush=True)
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


class Probe:
    """The simulator probe process (``_PROBE``), with the numpy kernels only if asked."""

    def __init__(self, hbm: Path, numpy_only: bool = False) -> None:
        env = dict(os.environ, **({"HBC_NATIVE": "0"} if numpy_only else {}))
        self.proc = subprocess.Popen([sys.executable, "-c", _PROBE, str(hbm)], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the simulator probe failed on {hbm}")

    def run(self, n: int) -> dict:
        """``n`` runs (0: finish and return the memory figures)."""
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> dict:
        memory = self.run(0)
        self.proc.wait()
        return memory


def bench(name: str, folder: Path, repeat: int, rounds: int, numpy_only: bool = False) -> dict:
    """One model's figures: ``rounds`` rounds of ``repeat`` simulator runs then ``repeat``
    onnxruntime runs, interleaved so that both meet the same machine (a shared machine's speed
    drifts by tens of percent within a minute); medians and minimums over all runs."""
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
    probe = Probe(hbm)
    sim: dict[str, list[float]] = {"times": [], "cpu": []}
    ref: dict[str, list[float]] = {"times": [], "cpu": []}
    for _ in range(rounds):
        for key, values in probe.run(repeat).items():
            sim[key] += values
        for _ in range(repeat):
            t0, c0 = time.perf_counter(), time.process_time()
            session.run(None, feeds)
            ref["times"].append(time.perf_counter() - t0)
            ref["cpu"].append(time.process_time() - c0)
    memory = probe.close()
    s_wall, r_wall = statistics.median(sim["times"]), statistics.median(ref["times"])
    s_cpu, r_cpu = statistics.median(sim["cpu"]), statistics.median(ref["cpu"])
    return {"model": name, "simulator_ms": 1000 * s_wall, "onnxruntime_ms": 1000 * r_wall,
            "ratio": s_wall / r_wall, "simulator_cpu_ms": 1000 * s_cpu,
            "onnxruntime_cpu_ms": 1000 * r_cpu, "cpu_ratio": s_cpu / r_cpu,
            "fastest_ratio": min(sim["times"]) / min(ref["times"]),
            "hbm_bytes": hbm.stat().st_size,
            "two_largest_activations_bytes": two_largest_activations(rt.graph),
            "peak_kib": None if memory["peak"] is None else memory["peak"] - memory["base"],
            "rss_after_imports_kib": memory["base"],
            **(numpy_figures(hbm, repeat * rounds, r_cpu) if numpy_only else {})}


def numpy_figures(hbm: Path, runs: int, ref_cpu: float) -> dict:
    """The simulator's CPU time with the numpy kernels only, and its ratio to onnxruntime's."""
    probe = Probe(hbm, numpy_only=True)
    cpu = statistics.median(probe.run(runs)["cpu"])
    probe.close()
    return {"numpy_cpu_ms": 1000 * cpu, "numpy_cpu_ratio": cpu / ref_cpu}


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
    parser.add_argument("--repeat", type=int, default=3, help="runs per engine and round")
    parser.add_argument("--rounds", type=int, default=5,
                        help="rounds of runs of each engine, interleaved")
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
            r = bench(name.strip(), Path(tmp), args.repeat, args.rounds, args.numpy)
            rows.append(r)
            mib = 1 << 20
            need = (r["hbm_bytes"] + r["two_largest_activations_bytes"]) / mib
            mem = "n/a" if r["peak_kib"] is None else f"{r['peak_kib'] / 1024:.1f} MiB"
            print(f"{r['model']:<13} simulator {r['simulator_ms']:8.1f} ms   onnxruntime "
                  f"{r['onnxruntime_ms']:7.1f} ms   ratio {r['ratio']:5.2f}x   (CPU "
                  f"{r['simulator_cpu_ms']:.1f} / {r['onnxruntime_cpu_ms']:.1f} ms = "
                  f"{r['cpu_ratio']:.2f}x; fastest runs {r['fastest_ratio']:.2f}x)   peak memory "
                  f"{mem} (above the imports) vs .hbm + two largest activations {need:.1f} MiB")
            if args.numpy:
                print(f"{'':<13} numpy kernels only: CPU {r['numpy_cpu_ms']:.1f} ms = "
                      f"{r['numpy_cpu_ratio']:.2f}x onnxruntime")
    if args.json:
        print(json.dumps(rows, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
