"""Per-layer costs of the static estimator: what one node costs where it runs.

The machine model (docs/marches-hardware.md) has three kinds of work:

* **MAC array** (qconv, qlinear and their float forms): the array computes a block of
  ``align.cin`` input channels (of one group) x ``align.cout`` output channels x
  ``align.height`` x ``align.width`` output pixels per step, so the MACs it spends are the
  *aligned* MACs: ``N * pad(Ho, height) * pad(Wo, width) * pad(Cout, cout) *
  pad(Cin/groups, cin) * kh * kw`` (a depthwise conv pads its single input channel per group to
  ``cin`` lanes: that is where depthwise and narrow group convs lose efficiency). Cycles =
  aligned MACs / (MACs per cycle of the input's dtype * ``array_efficiency``).
* **Vector unit** (elementwise, lookup tables, pools, resize, softmax, data movement): cycles =
  bytes it streams / ``vector_bytes_per_cycle``; data-dependent gathers (grid_sample, gather) at
  ``gather_elements_per_cycle``. Views (reshape, identity) are free: they only rename memory.
* **CPU** (fallback float ops, quantize/dequantize): ``op_overhead_us`` + the larger of
  elements * ns per element and MACs / float MACs per second, from the march's ``[cpu]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hbc.ir.graph import Node, Value

from .march import March

#: ops computed on the MAC array
ARRAY_OPS = frozenset({"qconv", "conv", "conv_fused", "qlinear", "linear", "gemm", "matmul"})
#: ops that only rename memory: no time, no traffic, no per-layer overhead
VIEW_OPS = frozenset({"reshape", "identity"})
#: ops that move data without arithmetic (read + write)
MOVE_OPS = frozenset({"concat", "slice", "split", "pad", "transpose", "depth_to_space",
                      "space_to_depth", "cast"})
#: pools: the vector unit reads every window tap
WINDOW_OPS = frozenset({"max_pool", "qavg_pool", "avg_pool"})
#: reductions over the whole input
REDUCE_OPS = frozenset({"qglobal_avg_pool", "global_avg_pool", "global_max_pool", "reduce_max",
                        "reduce_mean", "reduce_sum", "argmax"})
#: data-dependent gathers (the vector unit's gather port)
GATHER_OPS = frozenset({"qgrid_sample", "grid_sample", "gather"})
#: passes over the data a softmax makes (max, exp table + sum, scale)
SOFTMAX_PASSES = 3


@dataclass(frozen=True)
class NodeCost:
    """The static cost of one node on its unit (independent of the opt level)."""

    macs: int
    aligned_macs: int
    #: BPU cycles of the array or the vector unit (0 on the CPU and for views)
    compute_cycles: int
    #: CPU seconds (0 on the BPU)
    cpu_s: float
    #: bytes of constant inputs (weights, per-channel multipliers, tables), read once per frame
    const_bytes: int
    view: bool = False


def value_bytes(v: Value) -> int:
    """Bytes of a value in memory."""
    return v.type.numel * v.type.np_dtype.itemsize


def node_cost(node: Node, unit: str, march: March) -> NodeCost:
    """The cost of ``node`` on ``unit`` ("bpu" or "cpu")."""
    ins = [v for v in node.inputs if v is not None]
    macs = int(node.opdef.macs([None if v is None else v.type for v in node.inputs],
                               [v.type for v in node.outputs], node.attrs))
    const = sum(value_bytes(v) for v in _unique(ins) if v.is_const)
    if unit == "cpu":
        return NodeCost(macs, 0, 0, _cpu_seconds(node, macs, march), const)
    if node.op in VIEW_OPS:
        return NodeCost(macs, 0, 0, 0.0, const, view=True)
    if node.op in ARRAY_OPS:
        aligned = aligned_macs(node, march)
        dtype = _act_dtype(node)
        per_cycle = march.macs_per_cycle.get(dtype, march.macs_per_cycle["i8"])
        eff = float(march.hardware["array_efficiency"])
        return NodeCost(macs, aligned, math.ceil(aligned / (per_cycle * eff)), 0.0, const)
    return NodeCost(macs, 0, _vector_cycles(node, march), 0.0, const)


def aligned_macs(node: Node, march: March) -> int:
    """MACs the array spends on ``node``, padding lanes included (see the module docstring)."""
    a = march.align
    x, y = node.inputs[0].type, node.outputs[0].type
    if node.op in ("qconv", "conv", "conv_fused"):
        layout = node.attrs.get("layout", "NCHW")
        xs, ys = _channels_first(x.shape, layout), _channels_first(y.shape, layout)
        w = node.inputs[1].shape
        groups = node.attrs.get("groups", 1)
        spatial = ys[2:]
        height = math.prod(spatial[:-1]) if len(spatial) > 1 else 1
        width = spatial[-1] if spatial else 1
        cin, taps = xs[1] // groups, math.prod(w[2:])
        if groups == 1 and cin < a["cin"] and len(w) > 2:
            # few input channels (an image): kernel columns are packed into the input lanes
            kw = w[-1]
            lanes = _pad(cin * kw, a["cin"]) * (taps // kw)
        else:
            lanes = _pad(cin, a["cin"]) * taps
        return (ys[0] * _pad(height, a["height"]) * _pad(width, a["width"])
                * _pad(ys[1], a["cout"]) * lanes)
    # matrix products: rows of the output play the pixels, K the input channels
    k = x.shape[-1] if node.op != "gemm" or not node.attrs.get("trans_a") else x.shape[0]
    n = y.shape[-1]
    rows = y.numel // n if n else 0
    return _pad(rows, a["width"]) * _pad(n, a["cout"]) * _pad(k, a["cin"])


def _vector_cycles(node: Node, march: March) -> int:
    """Cycles of a non-MAC op on the vector unit."""
    bpc = int(march.hardware["vector_bytes_per_cycle"])
    acts = [v for v in node.inputs if v is not None and not v.is_const]
    in_bytes = sum(value_bytes(v) for v in acts)
    out_bytes = sum(value_bytes(v) for v in node.outputs)
    y = node.outputs[0]
    if node.op in GATHER_OPS:
        taps = node.inputs[1].shape[-1] if node.op == "qgrid_sample" else 1
        per = int(march.hardware["gather_elements_per_cycle"])
        return math.ceil(y.type.numel * taps / per) + math.ceil(out_bytes / bpc)
    if node.op in WINDOW_OPS:
        taps = math.prod(node.attrs.get("kernel", [1]))
        return math.ceil(out_bytes * taps / bpc)
    if node.op in REDUCE_OPS:
        return math.ceil((in_bytes + out_bytes) / bpc)
    if node.op == "qresize" or node.op == "resize":
        return math.ceil(out_bytes * 4 / bpc)  # bilinear: 4 taps per output
    if node.op in ("qsoftmax", "softmax"):
        return math.ceil(SOFTMAX_PASSES * (in_bytes + out_bytes) / bpc)
    # elementwise, lookup tables and data movement: stream inputs in, outputs out
    return math.ceil((in_bytes + out_bytes) / bpc)


def _cpu_seconds(node: Node, macs: int, march: March) -> float:
    """CPU time of one node: dispatch overhead + per-element or per-MAC work."""
    cpu = march.cpu
    elements = max([v.type.numel for v in node.outputs] +
                   [v.type.numel for v in node.inputs if v is not None and not v.is_const])
    per_element = {"quantize": cpu["quantize_ns_per_element"],
                   "dequantize": cpu["dequantize_ns_per_element"]}.get(
                       node.op, cpu["float_ns_per_element"])
    work = max(elements * per_element * 1e-9, macs / float(cpu["float_macs_per_s"]))
    return cpu["op_overhead_us"] * 1e-6 + work


def _act_dtype(node: Node) -> str:
    return node.inputs[0].dtype if node.inputs[0] is not None else "i8"


def _channels_first(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    if layout == "NHWC" and len(shape) >= 3:
        return (shape[0], shape[-1], *shape[1:-1])
    return tuple(shape)


def _pad(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _unique(values: list[Value]) -> list[Value]:
    seen: set[int] = set()
    out = []
    for v in values:
        if id(v) not in seen:
            seen.add(id(v))
            out.append(v)
    return out
