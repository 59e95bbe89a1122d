"""Deduplication of constants: identical initializers within one graph are stored once."""

from __future__ import annotations

import hashlib

import numpy as np

from hbc.ir.graph import Graph, Value
from hbc.ir.types import TensorType

from .base import Pass, register_pass


def content_key(graph: Graph, v: Value) -> tuple[TensorType, bytes]:
    """The full type (dtype, shape, layout, quantization) and a digest of the raw bytes."""
    arr = np.ascontiguousarray(graph.constants[v.name]).reshape(-1)
    return v.type, hashlib.blake2b(arr.view(np.uint8).data, digest_size=16).digest()


def same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-for-bit equality (so 0.0 != -0.0 and a NaN equals the same NaN)."""
    return a.dtype == b.dtype and a.shape == b.shape and \
        np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()


@register_pass
class DedupConstants(Pass):
    """Merge constants with the same type (dtype, shape, layout and quantization) and the same
    bytes into the first of them in value order, which keeps its name; users of the others
    are rewired to it. Data is compared by a BLAKE2 digest, confirmed byte for byte.

    A constant that is a graph output is never merged away (its name is part of the
    interface). ``ctx.results["dedup-constants"]`` accumulates ``{"merged": n,
    "bytes_saved": b}`` over runs.
    """

    name = "dedup-constants"
    opt_level = 2

    def run(self, graph: Graph) -> bool:
        outputs = {id(v) for v in graph.outputs}
        by_type: dict[TensorType, list[Value]] = {}
        for v in graph.constant_values():
            by_type.setdefault(v.type, []).append(v)
        merged = saved = 0
        # Only constants that share a type can be equal: hash just those.
        for candidates in (g for g in by_type.values() if len(g) > 1):
            kept: dict[bytes, list[Value]] = {}
            for v in candidates:
                group = kept.setdefault(content_key(graph, v)[1], [])
                keep = next((k for k in group
                             if same_bytes(graph.constants[k.name], graph.constants[v.name])),
                            None)
                if keep is None or id(v) in outputs:
                    group.append(v)
                    continue
                graph.replace_all_uses(v, keep)
                saved += v.type.nbytes
                graph.remove_value(v)
                merged += 1
        totals = self.ctx.results.setdefault("dedup-constants", {"merged": 0, "bytes_saved": 0})
        totals["merged"] += merged
        totals["bytes_saved"] += saved
        return merged > 0
