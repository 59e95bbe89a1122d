"""The static performance estimator: latency, FPS, DDR traffic and compute of a lowered graph.

``estimate(graph, march, opt)`` walks the lowered graph in topological order. Each node is a
layer on the BPU or the CPU (``placement``; default: the lowering's ``cpu_nodes`` and the
quantize/dequantize boundaries on the CPU, the rest on the BPU) whose compute comes from
``perf_cost.node_cost`` and whose DDR traffic depends on the opt level:

* O0: every layer reads its inputs from DDR and writes its outputs back; DMA and compute do
  not overlap: ``latency = compute + ddr + overhead``.
* O1: the same traffic, but DMA overlaps compute: ``latency = max(compute, ddr) + overhead``.
* O2, O3: an intermediate tensor stays in on-chip memory when it fits there, next to the
  tensors already kept and the working set (weights) of every layer it lives across
  (``perf_memory.plan_traffic``); the rest spills to DDR. O3's graph is also fused (fewer
  layers), because its pass pipeline differs.

Weights and other constants are read from DDR once per frame. A frame on one core takes
``frame_overhead_us`` + the sum of its layers (BPU and CPU in sequence): ``latency_ms``.
Throughput keeps every core busy with frames in flight, which hides the per-frame overhead and
overlaps CPU with BPU work: ``fps = min(cores / bpu time, cpu cores / cpu time, DDR bandwidth /
DDR bytes per frame)``. The report is plain JSON (schema ``hbc.perf/1``, docs/marches-hardware.md).
"""

from __future__ import annotations

from collections.abc import Mapping

from hbc.errors import InputError
from hbc.ir.graph import Graph, Node

from .march import March, load_march
from .perf_cost import NodeCost, node_cost, value_bytes
from .perf_memory import Traffic, plan_traffic

SCHEMA = "hbc.perf/1"
#: ops that run on the CPU unless the placement says otherwise
CPU_BOUNDARY_OPS = ("quantize", "dequantize")
UNITS = ("bpu", "cpu")
#: qconv's input index of the fused residual
RESIDUAL_INPUT = 5


def estimate(graph: Graph, march: March | str, opt: int, *,
             placement: Mapping[str, str] | None = None, name: str = "model") -> dict:
    """The perf report (a JSON-able dict, schema ``hbc.perf/1``) of the lowered ``graph``
    compiled for ``march`` at ``opt`` (0..3). ``placement`` maps node names to "bpu"/"cpu"."""
    march = load_march(march) if isinstance(march, str) else march
    if opt not in (0, 1, 2, 3):
        raise InputError(f"perf estimate: opt level {opt!r} is not one of 0, 1, 2, 3")
    units = placement_of(graph, placement)
    costs = {n.name: node_cost(n, units[n.name], march) for n in graph.nodes}
    traffic = plan_traffic(graph, units, costs, march, resident=opt >= 2)
    layers = [_layer(n, units[n.name], costs[n.name], traffic, march, opt) for n in graph.nodes]
    summary = _summary(graph, layers, costs, march, opt)
    return {"schema": SCHEMA, "model": name, "summary": summary,
            "opt_effects": _opt_effects(graph, units, costs, traffic, march, opt),
            "assumptions": _assumptions(march),
            "layers": layers}


def placement_of(graph: Graph, placement: Mapping[str, str] | None) -> dict[str, str]:
    """node name -> "bpu" | "cpu": the given placement, else the default rule. Names that are
    not nodes of ``graph`` are ignored (a checker's placement of the float graph may name
    nodes that lowering folded away)."""
    cpu_nodes = set(graph.meta.get("cpu_nodes", ()))
    given = dict(placement or {})
    units = {}
    for n in graph.nodes:
        unit = given.get(n.name)
        if unit is None:
            unit = "cpu" if n.name in cpu_nodes or n.op in CPU_BOUNDARY_OPS else "bpu"
        if unit not in UNITS:
            raise InputError(f"perf placement of node '{n.where()}': '{unit}' is not one of "
                             f"{', '.join(UNITS)}")
        units[n.name] = unit
    return units


def _layer(node: Node, unit: str, cost: NodeCost, traffic: Traffic, march: March,
           opt: int) -> dict:
    read, write = traffic.read[node.name], traffic.write[node.name]
    if unit == "cpu":
        latency_s, bound = cost.cpu_s, "cpu"
    elif cost.view:
        latency_s, bound = 0.0, "overhead"
    else:
        compute = cost.compute_cycles / march.clock_hz
        ddr = (read + write) / march.ddr_bytes_per_s
        overhead = march.hardware["layer_overhead_cycles"] / march.clock_hz
        latency_s = (compute + ddr if opt == 0 else max(compute, ddr)) + overhead
        bound = max((compute, "compute"), (ddr, "ddr"), (overhead, "overhead"),
                    key=lambda t: t[0])[1]
    producers = []
    for v in node.inputs:
        if v is not None and v.producer is not None and v.producer.name not in producers:
            producers.append(v.producer.name)
    return {"name": node.name, "op": node.op, "unit": unit, "macs": cost.macs,
            "aligned_macs": cost.aligned_macs, "compute_cycles": cost.compute_cycles,
            "ddr_read_bytes": read, "ddr_write_bytes": write,
            "latency_us": round(latency_s * 1e6, 3), "bound": bound, "inputs": producers,
            "loc": node.loc}


def _summary(graph: Graph, layers: list[dict], costs: dict[str, NodeCost], march: March,
             opt: int) -> dict:
    bpu_s = sum(lay["latency_us"] for lay in layers if lay["unit"] == "bpu") * 1e-6
    cpu_s = sum(lay["latency_us"] for lay in layers if lay["unit"] == "cpu") * 1e-6
    frame_s = march.hardware["frame_overhead_us"] * 1e-6
    latency_s = frame_s + bpu_s + cpu_s
    ddr = sum(lay["ddr_read_bytes"] + lay["ddr_write_bytes"] for lay in layers)
    rates = [march.cores / bpu_s if bpu_s else 0.0,
             march.cpu["cores"] / cpu_s if cpu_s else 0.0,
             march.ddr_bytes_per_s / ddr if ddr else 0.0]
    fps = min([r for r in rates if r > 0], default=0.0)
    bpu_macs = sum(lay["macs"] for lay in layers if lay["unit"] == "bpu")
    peak = march.clock_hz * march.macs_per_cycle["i8"]
    weight_bytes = sum(value_bytes(v) for v in graph.constant_values() if v.uses)
    return {
        "march": march.name, "opt": opt,
        "macs": sum(lay["macs"] for lay in layers),
        "latency_ms": round(latency_s * 1e3, 4),
        "fps": round(fps, 2),
        "ddr_bytes_per_frame": ddr,
        "bpu_ops": sum(lay["unit"] == "bpu" for lay in layers),
        "cpu_ops": sum(lay["unit"] == "cpu" for lay in layers),
        "mac_utilization": round(bpu_macs / (bpu_s * peak), 4) if bpu_s else 0.0,
        "bpu_ms": round(bpu_s * 1e3, 4),
        "cpu_ms": round(cpu_s * 1e3, 4),
        "cores": march.cores,
        "clock_mhz": round(march.clock_hz / 1e6, 3),
        "weight_bytes": weight_bytes,
        "peak_tops": round(march.peak_tops, 3),
    }


def _opt_effects(graph: Graph, units: dict[str, str], costs: dict[str, NodeCost],
                 traffic: Traffic, march: March, opt: int) -> list[str]:
    """What the opt level did, in words."""
    nodes = graph.nodes
    bpu = [n for n in nodes if units[n.name] == "bpu"]
    working = sum(1 for n in bpu if not costs[n.name].view)
    out = []
    written = (f"{_n(traffic.spilled, 'tensor')} written to DDR "
               f"({_mb(traffic.spilled_bytes)})")
    if opt == 0:
        out.append(f"O0: every layer's output round-trips DDR ({written}); DMA does not "
                   "overlap compute (layer latency = compute + DDR + overhead)")
    elif opt == 1:
        out.append(f"O1: DMA overlaps compute (layer latency = max(compute, DDR) + overhead); "
                   f"every layer's output still round-trips DDR ({written})")
    else:
        out.append(f"O{opt}: {_n(traffic.kept, 'intermediate tensor')} "
                   f"({_mb(traffic.kept_bytes)} in all) kept in the {_mb(march.onchip_bytes)} "
                   f"on-chip memory, never written to DDR; {written}: graph outputs, CPU "
                   "inputs and tensors too big to stay on chip; DMA overlaps compute")
    residual = sum(1 for n in bpu if n.op == "qconv" and len(n.inputs) > RESIDUAL_INPUT
                   and n.inputs[RESIDUAL_INPUT] is not None)
    acts = sum(1 for n in bpu if n.op == "qconv" and (n.attrs.get("lo") is not None
                                                     or n.attrs.get("hi") is not None))
    if opt == 3:
        out.append(f"O3: fused graph: {_n(working, 'BPU layer')}; {residual} residual adds and "
                   f"{acts} activations run inside their convolutions")
    else:
        out.append(f"O{opt}: graph not fused: {_n(working, 'BPU layer')} (activations and "
                   "residual adds are layers of their own unless fused in the input model)")
    cpu = [n for n in nodes if units[n.name] == "cpu"]
    if cpu:
        bounds = sum(n.op in CPU_BOUNDARY_OPS for n in cpu)
        out.append(f"CPU: {_n(len(cpu), 'layer')} ({bounds} quantize/dequantize at the boundaries, "
                   f"{len(cpu) - bounds} float fallbacks) estimated with {march.name}'s CPU "
                   f"costs ({march.cpu['cores']} cores)")
    return out


def _assumptions(march: March) -> dict:
    hw = march.hardware
    return {
        "march": march.name, "cores": march.cores, "clock_hz": march.clock_hz,
        "macs_per_cycle": dict(march.macs_per_cycle), "align": dict(march.align),
        "array_efficiency": hw["array_efficiency"], "onchip_bytes": march.onchip_bytes,
        "ddr_bytes_per_s": march.ddr_bytes_per_s,
        "vector_bytes_per_cycle": hw["vector_bytes_per_cycle"],
        "gather_elements_per_cycle": hw["gather_elements_per_cycle"],
        "layer_overhead_cycles": hw["layer_overhead_cycles"],
        "frame_overhead_us": hw["frame_overhead_us"],
        "cpu": {k: march.cpu[k] for k in sorted(march.cpu) if not isinstance(march.cpu[k], str)},
        "model": "docs/marches-hardware.md",
    }


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"
