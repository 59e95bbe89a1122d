"""Frontend benchmark: import, print (.hbir) and parse of a ResNet-50-sized ONNX graph.

Prints wall times (median of a few runs) and the ratio to onnxruntime session creation on the
same model, measured in the same run. Target: each step under 2 s on a 2-core machine.

    .venv/bin/python bench/bench_frontend.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).parent))  # bench/timing.py

from timing import median_time  # noqa: E402

import hbc  # noqa: E402
from hbc.ir import from_text, to_text  # noqa: E402
from hbc.models.common import export_onnx, seeded_init  # noqa: E402
from hbc.models.resnet import resnet50  # noqa: E402


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "resnet50.onnx"
        export_onnx(seeded_init(resnet50()), [torch.zeros(1, 3, 224, 224)], str(path))
        graph = hbc.load(path)
        text = to_text(graph)
        t_import = median_time(lambda: hbc.load(path))
        t_print = median_time(lambda: to_text(graph))
        t_parse = median_time(lambda: from_text(text, constants=graph.constants))
        t_ort = median_time(lambda: ort.InferenceSession(
            str(path), providers=["CPUExecutionProvider"]))
    print(f"ResNet-50 ONNX: {len(graph.nodes)} nodes, {len(graph.constants)} constants")
    print(f"  import (hbc.load)      {t_import:7.3f} s   ({t_import / t_ort:.2f}x ORT session)")
    print(f"  print  (to_text)       {t_print:7.3f} s   ({len(text) / 1e3:.0f} kB of text)")
    print(f"  parse  (from_text)     {t_parse:7.3f} s")
    print(f"  onnxruntime session    {t_ort:7.3f} s")
    worst = max(t_import, t_print, t_parse)
    print(f"target: each under 2 s -> {'met' if worst < 2.0 else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
