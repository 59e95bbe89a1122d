"""``make demo``: the main job on a bundled model.

Exports the bundled DemoNet (models/demo_cnn.py) to ONNX, prints its .hbir text and calops
table through the CLI, and checks the float interpreter against onnxruntime.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


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
    print("demo: OK" if ok else "demo: MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(run())
