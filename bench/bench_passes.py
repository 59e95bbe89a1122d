"""Pass benchmark: the O3 pipeline on a ResNet-50-sized graph and on a merged six-task graph.

The six-task graph follows the source documents: four detection-like and two segmentation-like
heads on one shared backbone (here the ResNet-50 trunk, so the graph has ResNet-50 scale), each
task exported to ONNX on its own and merged with ``hbc.passes.merge_tasks``. Prints wall times
(median of a few runs), with and without verification after each pass, against the targets:
O3 under 1 s on ResNet-50 and under 3 s on the merged six-task graph. Passes of the O3 pipeline
that are not registered yet are skipped and listed.

    .venv/bin/python bench/bench_passes.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # for tests.test_merge (the six-task builder)
sys.path.insert(0, str(Path(__file__).parent))  # bench/timing.py

from timing import median_time  # noqa: E402

import hbc  # noqa: E402
from hbc.models.common import export_onnx, seeded_init  # noqa: E402
from hbc.models.resnet import resnet50  # noqa: E402
from hbc.passes import PASSES, PIPELINES, merge_tasks, run  # noqa: E402
from hbc.passes import registry as _registry  # noqa: E402,F401  (registers the passes)
from tests.test_merge import export_six_tasks  # noqa: E402


def _o3_passes() -> tuple[list[str], list[str]]:
    """The O3 pipeline's passes that are registered, and those that are not."""
    o3 = PIPELINES[3]
    return [p for p in o3 if p in PASSES], [p for p in o3 if p not in PASSES]


def _trunk(model: nn.Module) -> nn.Module:
    """ResNet-50 without its classifier: stem and the four stages."""
    return nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool,
                         model.layer1, model.layer2, model.layer3, model.layer4)


def _report(label: str, graph, passes: list[str], target: float) -> bool:
    t_verify = median_time(lambda: run(graph, passes=passes))
    t_plain = median_time(lambda: run(graph, passes=passes, verify=False))
    out = run(graph, passes=passes, verify=False)
    print(f"{label}: {len(graph.nodes)} nodes -> {len(out.nodes)} after O3")
    print(f"  O3 (no verify)          {t_plain:7.3f} s")
    print(f"  O3 (verify each pass)   {t_verify:7.3f} s")
    ok = t_plain < target
    print(f"  target under {target:g} s -> {'met' if ok else 'MISSED'}")
    return ok


def main() -> int:
    passes, missing = _o3_passes()
    print("O3 passes run: " + ", ".join(passes))
    if missing:
        print("O3 passes not registered yet (skipped): " + ", ".join(missing))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = folder / "resnet50.onnx"
        export_onnx(seeded_init(resnet50()), [torch.zeros(1, 3, 224, 224)], str(path))
        resnet = hbc.load(path)
        trunk = seeded_init(_trunk(resnet50()), seed=0)
        paths, _ = export_six_tasks(folder, hw=224, backbone=trunk, channels=2048)
        tasks = [hbc.load(p) for p in paths]
    t_merge = median_time(lambda: merge_tasks(tasks))
    result = merge_tasks(tasks)
    ok = _report("ResNet-50 (1x3x224x224)", resnet, passes, 1.0)
    print(f"six tasks on a ResNet-50 trunk: {sum(len(t.nodes) for t in tasks)} nodes in total")
    print(f"  merge_tasks (incl. cse, dce) {t_merge:7.3f} s")
    for line in result.report.to_text().splitlines():
        print("  " + line)
    ok &= _report("merged six-task graph", result.graph, passes, 3.0)
    print(f"all targets {'met' if ok else 'NOT met'}")
    return 0  # a missed target is reported, not an error


if __name__ == "__main__":
    sys.exit(main())
