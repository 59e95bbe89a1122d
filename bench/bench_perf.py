"""Static perf estimator against published chip figures, and estimates for the zoo.

Prints (1) the four calibration points of the march files (FPS with all cores busy, latency of
one frame on one core, batch 1, 224x224) as estimate vs published with the error, (2) further
published points of the same tables that were not used to fit anything, and (3) the O3 estimate
of every standard zoo classifier on every march (``--all`` adds the multi-task, stereo and BEV
models at their full input sizes, which take minutes to calibrate), and (4) the opt-level
ladder of ResNet-18 and MobileNetV2.

Published figures: the vendor's board measurements (hrt_model_exec, NV12 input) in the RDK model
zoo tables (RDK X3 = bernoulli2, RDK X5 = bayes-e, RDK S100 = nash-e) and the MixVarGENet
figure of the source documents (bayes). docs/marches-hardware.md lists them with their sources.

    .venv/bin/python bench/bench_perf.py [--all]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # for tests.test_perf (the lowering helper and the figures)

import torch  # noqa: E402

from hbc.backend.march import load_march, march_names  # noqa: E402
from hbc.backend.perf import estimate  # noqa: E402
from tests.test_perf import PUBLISHED, TOLERANCE, lowered  # noqa: E402

#: published points not used for calibration: (march, zoo model, FPS, latency ms, note)
CHECKS = (
    ("bernoulli2", "mobilenet_v1", 647.83, 3.44, "RDK X3 model zoo"),
    ("bernoulli2", "mobilenet_v2", 890.99, 2.41, "RDK X3 model zoo"),
    ("bayes-e", "mobilenet_v2", 1152.07, 1.42, "RDK X5 model zoo"),
    ("bayes-e", "efficientnet_b2", 376.77, 3.31, "RDK X5 model zoo (timm B2 at 224)"),
    ("nash-e", "mobilenet_v2", 5026.52, 0.405, "RDK S100 model zoo (3 / 1 threads)"),
)
CLASSIFIERS = ("resnet18", "resnet50", "mobilenet_v1", "mobilenet_v2", "efficientnet_b0",
               "efficientnet_b2", "vargnet_v2", "mixvargenet")
OTHERS = ("multitask_resize", "stereonet", "bev_ipm")


def _err(est: float, pub: float | None) -> str:
    return "" if pub is None else f"{100 * (est / pub - 1):+6.1f}%"


def _points(title: str, rows) -> bool:
    print(title)
    print(f"  {'march':10s} {'model':16s} {'FPS est':>9s} {'FPS pub':>9s} {'err':>7s}   "
          f"{'lat est':>8s} {'lat pub':>8s} {'err':>7s}")
    ok = True
    for march, model, fps, lat, *_ in rows:
        s = estimate(lowered(model, march, 3), march, 3, name=model)["summary"]
        pub_lat = f"{lat:8.3f}" if lat is not None else f"{'-':>8s}"
        print(f"  {march:10s} {model:16s} {s['fps']:9.2f} {fps:9.2f} {_err(s['fps'], fps)}   "
              f"{s['latency_ms']:8.3f} {pub_lat} {_err(s['latency_ms'], lat):>7s}")
        ok &= abs(s["fps"] / fps - 1) <= TOLERANCE and (
            lat is None or abs(s["latency_ms"] / lat - 1) <= TOLERANCE)
    return ok


def _zoo(models: tuple[str, ...]) -> None:
    print("\nO3 estimates (FPS all cores, latency ms one core, MAC utilization of one core's "
          "peak, DDR MiB per frame)")
    marches = march_names()
    print(f"  {'model':18s} {'GMACs':>6s} " + " ".join(f"{m:>27s}" for m in marches))
    for model in models:
        cells, macs = [], 0
        for march in marches:
            s = estimate(lowered(model, march, 3), march, 3, name=model)["summary"]
            macs = s["macs"]
            cells.append(f"{s['fps']:8.1f} {s['latency_ms']:6.2f} {s['mac_utilization']:5.1%} "
                         f"{s['ddr_bytes_per_frame'] / 2**20:5.1f}")
        print(f"  {model:18s} {macs / 1e9:6.2f} " + " ".join(f"{c:>27s}" for c in cells))


def _ladder() -> None:
    print("\nopt levels: latency ms (DDR MiB per frame)")
    for march in march_names():
        for model in ("resnet18", "mobilenet_v2"):
            cells = []
            for opt in range(4):
                s = estimate(lowered(model, march, opt), march, opt)["summary"]
                mib = s["ddr_bytes_per_frame"] / 2**20
                cells.append(f"O{opt} {s['latency_ms']:7.3f} ({mib:5.1f})")
            print(f"  {march:10s} {model:14s} " + "  ".join(cells))
    rep = estimate(lowered("resnet18", "bayes-e", 3), "bayes-e", 3)
    for line in rep["opt_effects"]:
        print(f"    {line}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="also the multi-task, stereo and "
                        "BEV models at full size (minutes)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    for name in march_names():
        m = load_march(name)
        print(f"{name:10s} {m.cores} core(s) x {m.macs_per_cycle['i8']} MACs/cycle @ "
              f"{m.clock_hz / 1e9:g} GHz = {m.peak_tops:.1f} TOPS; array efficiency "
              f"{m.hardware['array_efficiency']}, align {m.align}")
    print()
    ok = _points(f"calibration points (target: within {TOLERANCE:.0%})", PUBLISHED)
    print("calibration: " + ("all within tolerance" if ok else "OUT OF TOLERANCE"))
    _points("\nfurther published points (not fitted)", CHECKS)
    _zoo(CLASSIFIERS + (OTHERS if args.all else ()))
    _ladder()
    print(f"\n({time.perf_counter() - t0:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
