"""March legality: where every node of a graph runs on a march, and why.

:func:`check_graph` views each node as the float op its table describes (a lowered ``qconv`` is
a ``conv``, ``lut`` the lookup-table activations, ``qadd`` with a negative ``mb`` a ``sub``,
and SiLU's ``mul(x, sigmoid(x))`` a ``lut``, as lower-int makes it),
evaluates the march's constraint table for it (``backend/constraints.py``) and returns a
:class:`Verdict`: ``bpu``, ``cpu`` (the march runs the op on its CPU, or a constraint is broken
and the op falls back to the CPU in float, with quantize/dequantize around it) or
``unsupported`` (nothing can run it). Every :class:`Problem` names the constraint, the actual and
the allowed value, and a hint: a rewrite, and the other marches that accept the node.

Besides the march's tables, hbc itself must have an integer kernel for a BPU op (the registry's
``integer`` slot); an op without one runs in float on the CPU (constraint ``integer-kernel``).
:func:`check_inputs` checks the graph inputs a BPU node reads against the ``input`` table, and
:func:`partition` splits the verdicts into connected BPU and CPU subgraphs and counts the
quantize/dequantize boundaries between them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from hbc.ir.graph import Graph, Node, Value
from hbc.ir.ops.common import channels_first_type
from hbc.ir.types import FLOAT_DTYPES, TensorType

from .constraints import (
    BOUNDARY_OPS,
    Failure,
    MarchConstraints,
    OpTable,
    OpView,
    canonical,
    evaluate,
    hint_text,
    load_constraints,
    march_names,
    table_key,
)

UNIT_NAMES = {"bpu": "BPU", "cpu": "CPU", "unsupported": "unsupported"}
#: lowered integer ops -> the float op whose constraints they carry
LOWERED_AS = {
    "qconv": "conv", "qlinear": "linear", "qadd": "add", "qmul": "mul",
    "qavg_pool": "avg_pool", "qglobal_avg_pool": "global_avg_pool", "qresize": "resize",
    "qgrid_sample": "grid_sample", "qsoftmax": "softmax", "lut": "lut",
    "requantize": "requantize",
}
#: attributes the lowered forms dropped, as the float op had them
_LOWERED_ATTRS = {"qresize": {"mode": "linear"}, "qgrid_sample": {"mode": "bilinear"}}
_ACT_DTYPES = ("i8", "i16")


@dataclass(frozen=True)
class Problem:
    """One reason a node does not run on the BPU: the constraint (a quantity of the march's
    table, or ``unit`` / ``integer-kernel`` / ``table`` / ``lowering``), the actual and the
    allowed value as text, a hint, and ``message``: the whole sentence without the hint."""

    constraint: str
    actual: str
    allowed: str
    hint: str
    message: str = ""

    def to_json(self) -> dict:
        return {"constraint": self.constraint, "actual": self.actual, "allowed": self.allowed,
                "hint": self.hint, "message": self.message}


@dataclass(frozen=True)
class Verdict:
    """Where one node runs on the march (``bpu``, ``cpu`` or ``unsupported``) and why.
    Boundary ops (quantize, dequantize) get ``cpu`` and no problems."""

    node: str
    op: str
    loc: str
    unit: str
    problems: tuple[Problem, ...] = ()

    @property
    def boundary(self) -> bool:
        return self.op in BOUNDARY_OPS

    def where(self) -> str:
        return f"{self.node} ({self.loc})" if self.loc and self.loc != self.node else self.node

    def to_json(self) -> dict:
        return {"node": self.node, "op": self.op, "loc": self.loc, "unit": self.unit,
                "boundary": self.boundary, "problems": [p.to_json() for p in self.problems]}


# -- the node as the tables see it ----------------------------------------------------------------
def is_lowered(graph: Graph) -> bool:
    """Is ``graph`` the output of lower-int (integer ops, quantize/dequantize boundaries)?"""
    return "lowered" in graph.meta or any(n.op in LOWERED_AS for n in graph.nodes)


def float_op(node: Node) -> str:
    """The float op whose constraints apply to ``node``."""
    if node.op == "qadd" and node.attrs.get("mb", 0) < 0:
        return "sub"
    if node.op == "mul" and _is_silu(node):
        return "lut"  # lower-int turns mul(x, sigmoid(x)) into one lookup table
    return LOWERED_AS.get(node.op, node.op)


def _is_silu(node: Node) -> bool:
    for i in (0, 1):
        p = node.inputs[i].producer
        if p is not None and p.op == "sigmoid" and p.inputs[0] is node.inputs[1 - i]:
            return True
    return False


def view_of(node: Node, int16: frozenset[str] | set[str] = frozenset()) -> OpView:
    """The :class:`OpView` of ``node``: channels-first types, its float op's attributes, the
    activation dtype (``int16``: names of float values asked to be int16)."""
    layout = node.attrs.get("layout") or "NCHW"

    def cf(t: TensorType) -> TensorType:
        return channels_first_type(t, layout) if t.rank >= 3 else t

    present = [v for v in node.inputs if v is not None]
    data = [v for v in present if not v.is_const]
    x = data[0] if data else (present[0] if present else None)
    w = node.inputs[1] if node.op in ("conv", "conv_fused", "qconv", "conv_transpose") else None
    residual = (node.op == "conv_fused" and _input(node, 3) is not None) or \
               (node.op == "qconv" and _input(node, 5) is not None)
    return OpView(
        op=float_op(node),
        attrs={**node.attrs, **_LOWERED_ATTRS.get(node.op, {})},
        x=None if x is None else cf(x.type),
        w=None if w is None else w.type,
        data=tuple(cf(v.type) for v in data),
        inputs=tuple(cf(v.type) for v in present),
        outputs=tuple(cf(v.type) for v in node.outputs),
        const_inputs=len(present) - len(data),
        residual=residual,
        act_dtype=_act_dtype(node, x, int16),
    )


def _input(node: Node, i: int) -> Value | None:
    return node.inputs[i] if len(node.inputs) > i else None


def _act_dtype(node: Node, x: Value | None, int16: frozenset[str] | set[str]) -> str | None:
    if x is None:
        return None
    if x.dtype in FLOAT_DTYPES:
        values = [v for v in (*node.inputs, *node.outputs) if v is not None]
        return "i16" if any(v.name in int16 for v in values) else "i8"
    return x.dtype if x.dtype in _ACT_DTYPES else None


# -- verdicts -------------------------------------------------------------------------------------
class _Checker:
    """The tables of the target march and of the others (for the 'or target X' hints)."""

    def __init__(self, march) -> None:
        self.mc = load_constraints(march)
        self.march = self.mc.march
        self.others = [load_constraints(m) for m in march_names() if m != self.march]

    def bpu_rules(self, mc: MarchConstraints, table: OpTable) -> tuple:
        every = mc.table("all_bpu")
        return every.rules if every is not None and table.unit == "bpu" else ()

    def failures(self, mc: MarchConstraints, key: str, view: OpView) -> list[Failure] | None:
        """The broken rules of ``view`` on ``mc`` (None: the march does not run it on the BPU)."""
        table = mc.table(key)
        if table is None or table.unit != "bpu":
            return None
        return evaluate(table, view, self.bpu_rules(mc, table))

    def accepting(self, key: str, view: OpView, quantity: str | None = None) -> list[str]:
        """Other marches whose BPU runs the node (``quantity``: that meet this one rule)."""
        out = []
        for mc in self.others:
            fails = self.failures(mc, key, view)
            if fails is None:
                continue
            if quantity is None and not fails or \
                    quantity is not None and all(f.rule.quantity != quantity for f in fails):
                out.append(mc.march)
        return out

    def verdict(self, node: Node, int16: frozenset[str], lowered: bool) -> Verdict:
        if node.op in BOUNDARY_OPS:
            return Verdict(node.name, node.op, node.loc, "cpu")
        view = view_of(node, int16)
        key = table_key(view.op)
        table = self.mc.table(key)
        op = view.op
        if table is None:
            return Verdict(node.name, node.op, node.loc, "cpu", (Problem(
                "table", "none", f"an [ops.{key}] table",
                f"add [ops.{key}] to backend/marches/{self.march}.toml; until then it runs "
                "in float on the CPU",
                f"{self.march} has no constraint table for {op}"),))
        problems: list[Problem] = []
        if table.unit != "bpu":
            names = self.accepting(key, view)
            hint = hint_text(table.hint, None, self.march, op) or f"run {op} on another march"
            if names:
                hint += f"; {_and(names)} run{'s' if len(names) == 1 else ''} it on the BPU"
            problems.append(Problem("unit", table.unit, "bpu", hint,
                                    f"{self.march} runs {op} on the "
                                    f"{UNIT_NAMES[table.unit]}{_assumed(table.source)}"))
        for f in evaluate(table, view, self.bpu_rules(self.mc, table)):
            hint = hint_text(f.rule.hint, f, self.march, op) or \
                f"change the model so that {f.rule.quantity} is {f.allowed_text}"
            names = self.accepting(key, view, f.rule.quantity)
            if names:
                hint += f"; or target {_and(names)}"
            problems.append(Problem(f.rule.quantity, f.actual_text, f.allowed_text, hint,
                                    f"{f.rule.quantity} {f.actual_text}, {self.march} allows "
                                    f"{f.allowed_text}{_assumed(f.rule.source)}"))
        if lowered and view.x is not None and view.x.dtype in FLOAT_DTYPES:
            problems.append(Problem(
                "lowering", "float", "integer",
                "lower-int placed it on the CPU; check the float model for the reason",
                f"{op} is a float CPU fallback of the lowered graph"))
        elif not lowered and table.unit == "bpu" and node.opdef.integer is None:
            problems.append(Problem(
                "integer-kernel", "none", "an integer kernel",
                f"hbc has no integer kernel for {op} yet: it runs in float on the CPU between "
                "dequantize and quantize",
                f"hbc cannot lower {op} to integers"))
        unit = table.unit if table.unit != "bpu" else ("cpu" if problems else "bpu")
        return Verdict(node.name, node.op, node.loc, unit, tuple(problems))


def _assumed(source: str) -> str:
    return " (an assumed limit)" if source == "assumed" else ""


def _and(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def check_graph(graph: Graph, march) -> list[Verdict]:
    """A :class:`Verdict` for every node of ``graph`` (a float graph after the canonical passes,
    or a lowered one), in node order. ``march``: a ``March`` or a march name."""
    checker = _Checker(march)
    int16 = frozenset(graph.meta.get("int16_values", ()))
    lowered = is_lowered(graph)
    return [checker.verdict(node, int16, lowered) for node in graph.nodes]


def check_inputs(graph: Graph, march, verdicts: Sequence[Verdict]) -> list[Verdict]:
    """A verdict (op ``input``) for every graph input that a BPU node reads: ``unsupported``
    when it breaks the march's ``input`` table (the BPU cannot be fed that tensor)."""
    checker = _Checker(march)
    table = checker.mc.table("input")
    unit_of = {v.node: v.unit for v in verdicts}
    out = []
    for value in graph.inputs:
        readers = [n for n, _ in value.uses]
        if lowered_reader := [n for n in readers if n.op == "quantize"]:
            readers = [u for q in lowered_reader for u, _ in q.outputs[0].uses]
        if not any(unit_of.get(n.name) == "bpu" for n in readers):
            continue
        t = value.type
        view = OpView("input", {}, t, data=(t,), inputs=(t,))
        fails = evaluate(table, view) if table is not None else []
        problems = []
        for f in fails:
            hint = hint_text(f.rule.hint, f, checker.march, "input")
            names = checker.accepting("input", view, f.rule.quantity)
            if names:
                hint += f"; or target {_and(names)}"
            problems.append(Problem(f.rule.quantity, f.actual_text, f.allowed_text, hint,
                                    f"input {f.rule.quantity} {f.actual_text}, "
                                    f"{checker.march} allows {f.allowed_text}"))
        out.append(Verdict(value.name, "input", "", "unsupported" if problems else "bpu",
                           tuple(problems)))
    return out


# -- the partition --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Subgraph:
    """A connected set of nodes that run on the same unit."""

    unit: str
    nodes: tuple[str, ...]


@dataclass(frozen=True)
class Partition:
    """The BPU/CPU subgraphs and the quantize/dequantize boundaries between them: ``quantize``
    and ``dequantize`` count the values crossing CPU->BPU and BPU->CPU inside the model,
    ``input_quantize`` / ``output_dequantize`` those at the model's inputs and outputs."""

    subgraphs: tuple[Subgraph, ...]
    quantize: int
    dequantize: int
    input_quantize: int
    output_dequantize: int

    def count(self, unit: str) -> int:
        return sum(1 for s in self.subgraphs if s.unit == unit)


def partition(graph: Graph, verdicts: Sequence[Verdict]) -> Partition:
    """Connected components of same-unit nodes (boundary ops excluded) and the boundaries."""
    unit = {v.node: v.unit for v in verdicts if not v.boundary}
    parent = {n: n for n in unit}

    def find(n: str) -> str:
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for node in graph.nodes:
        if node.name not in unit:
            continue
        for v in node.inputs:
            p = v.producer if v is not None else None
            if p is not None and p.name in unit and unit[p.name] == unit[node.name]:
                parent[find(p.name)] = find(node.name)
    groups: dict[str, list[str]] = {}
    for node in graph.nodes:
        if node.name in unit:
            groups.setdefault(find(node.name), []).append(node.name)
    subgraphs = tuple(Subgraph(unit[names[0]], tuple(names)) for names in groups.values())
    counts = _boundaries(graph, unit)
    return Partition(subgraphs, *counts)


def _boundaries(graph: Graph, unit: dict[str, str]) -> tuple[int, int, int, int]:
    """(quantize, dequantize, input_quantize, output_dequantize)."""
    q = dq = iq = od = 0
    outputs = {id(v) for v in graph.outputs}
    for node in graph.nodes:
        if node.op == "quantize":
            iq, q = (iq + 1, q) if node.inputs[0].kind == "input" else (iq, q + 1)
        elif node.op == "dequantize":
            out = node.outputs[0]
            od, dq = (od + 1, dq) if id(out) in outputs else (od, dq + 1)
    values = [*graph.inputs, *(v for n in graph.nodes if n.name in unit for v in n.outputs)]
    for v in values:
        readers = {unit.get(n.name) for n, _ in v.uses}
        src = "input" if v.kind == "input" else unit[v.producer.name]
        if src == "bpu":
            dq += bool(readers - {"bpu", None})
            od += id(v) in outputs
        elif "bpu" in readers:
            if src == "input":
                iq += 1
            else:
                q += 1
    return q, dq, iq, od


def resolve_march(march) -> str:
    """The canonical name of ``march`` (a name, an alias or a ``March``)."""
    return canonical(march if isinstance(march, str) else march.name)
