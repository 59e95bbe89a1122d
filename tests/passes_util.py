"""Shared helpers for pass tests: golden .hbir files and before/after numerics."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from hbc.ir.graph import Graph
from hbc.ir.interpret import interpret
from hbc.ir.text import to_text

GOLDEN = Path(__file__).parent / "golden" / "passes"


def assert_golden(name: str, graph: Graph) -> None:
    """Compare ``to_text(graph)`` with tests/golden/passes/NAME.hbir (UPDATE_GOLDEN=1 rewrites
    it; review the diff before committing)."""
    path = GOLDEN / f"{name}.hbir"
    text = to_text(graph)
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"{path} is missing: run with UPDATE_GOLDEN=1 and review it"
    assert text == path.read_text(), f"{path} differs (UPDATE_GOLDEN=1 rewrites it)"


def random_inputs(graph: Graph, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded inputs for every graph input (standard normal floats, small ints, bools)."""
    rng = np.random.default_rng(seed)
    out = {}
    for v in graph.inputs:
        dt = v.type.np_dtype
        if dt.kind == "f":
            out[v.name] = rng.standard_normal(v.shape).astype(dt)
        elif dt.kind == "b":
            out[v.name] = rng.integers(0, 2, v.shape).astype(dt)
        else:
            out[v.name] = rng.integers(-8, 8, v.shape).astype(dt)
    return out


def assert_same_numerics(before: Graph, after: Graph, seeds=(0, 1), rtol: float = 1e-5) -> None:
    """Interpreter outputs of ``before`` and ``after`` agree on seeded random inputs:
    max abs error at most ``rtol`` times each output's range (plus a tiny floor)."""
    for seed in seeds:
        feed = random_inputs(before, seed)
        a = interpret(before, feed)
        b = interpret(after, {k: feed[k] for k in (v.name for v in after.inputs)})
        assert list(a) == list(b), f"outputs differ: {list(a)} vs {list(b)}"
        for name in a:
            x, y = a[name].astype(np.float64), b[name].astype(np.float64)
            assert x.shape == y.shape, f"{name}: shape {x.shape} vs {y.shape}"
            scale = max(float(np.ptp(x)) if x.size else 0.0, float(np.max(np.abs(x), initial=0)))
            err = float(np.max(np.abs(x - y), initial=0))
            assert err <= rtol * scale + 1e-6, f"{name}: max abs error {err} (scale {scale})"
