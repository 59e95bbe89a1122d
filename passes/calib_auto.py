"""The ``auto`` calibration method: per scale group, the candidate range (max, percentile, kl,
mse) whose fake-quantized tensor gives the least error at the outputs of its consumers.

The criterion (docs/quantization.md, "Calibration"): for each candidate ``a`` of a group and
each use of a member of the group by a node outside it, the consumer runs once on its float
inputs (the reference) and once with that input fake-quantized to ``a``; the squared difference
of its float outputs, summed over the calibration set, is divided by the reference outputs'
energy (a relative error, so consumers of different magnitudes add up fairly), and the relative
errors of a candidate add up over its uses. A member that is a graph output also counts its own
error, and so does the root of a group without consumers. Candidates with the same range are
scored once; a group with one distinct candidate needs no scoring. Sums are ``math.fsum`` of
per-sample float64 sums, so the choice does not depend on the order of the samples.

Two scorers compute the same sums, on the engine of the forward pass
(:mod:`~hbc.passes.calib_forward`):

- onnxruntime: one *trial graph* holds the float graph plus, after each consumer, a copy of it
  per candidate reading ``dequantize(quantize(x))`` (the fake quantization, bit for bit the
  numpy ``fake_quant``), and the float64 sums of squares of the differences and of the
  references; one session run per sample returns only those scalars. The candidates of a value
  share one fake-quantized tensor across its consumers.
- interpreter: the float graph runs in the interpreter, and each consumer's numpy reference is
  called again per candidate from the live values.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable

import numpy as np

from hbc.ir.graph import Graph, Node, Value
from hbc.ir.interpret import interpret
from hbc.ir.types import FLOAT_DTYPES

from .calib_forward import Unavailable, open_session
from .observers import OBSERVERS, fake_quant

log = logging.getLogger(__name__)

Candidates = dict[str, list[tuple[str, float]]]
#: conv_fused's input slot of the residual (ir/ops/fused.py)
RESIDUAL = 3


def choose(g: Graph, runs: Iterable[dict[str, np.ndarray]], root: dict[str, str],
           ranges: dict[str, dict[str, float]], qmax: dict[str, int], engine: str,
           threads: int | None, tick: Callable[[int], None]) -> dict[str, str]:
    """Per scale group root, the observer whose range gives the least consumer-output error;
    ``tick(samples done)`` after each run of the scoring pass."""
    cands: Candidates = {}
    chosen: dict[str, str] = {}
    for name, by_method in ranges.items():
        distinct: list[tuple[str, float]] = []
        for m in OBSERVERS:
            a = by_method[m]
            if a > 0.0 and all(a != b for _, b in distinct):
                distinct.append((m, a))
        if len(distinct) > 1:
            cands[name] = distinct
        else:
            chosen[name] = distinct[0][0] if distinct else "max"
    if cands:
        scorer: _Scores | None = None
        if engine == "onnxruntime":
            try:
                scorer = _OrtScores(g, root, cands, qmax, threads)
            except Unavailable as e:
                log.info("auto calibration of '%s' scores in the interpreter: %s", g.name, e)
        if scorer is None:
            scorer = _InterpreterScores(g, root, cands, qmax)
        done = 0
        for run in runs:
            scorer.run(run)
            done += len(next(iter(run.values())))
            tick(done)
        chosen.update(scorer.best())
    return {r: chosen[r] for r in ranges}


class _Scores:
    """Which uses each candidate is scored at, and the sums; subclasses compute them.

    A group's consumers are the uses of its members outside the group (``uses``: member ->
    ``(node, slot)``); ``selfs`` are the members scored on their own error.
    """

    def __init__(self, g: Graph, root: dict[str, str], cands: Candidates,
                 qmax: dict[str, int]) -> None:
        self.g, self.cands, self.qmax = g, cands, qmax
        self.root = {name: r for name, r in root.items() if r in cands}
        self.uses: dict[str, list[tuple[Node, int]]] = {}
        for name, r in self.root.items():
            self.uses[name] = [(n, i) for n, i in g.value(name).uses if _float_outputs(n) and not (
                i == 0 and any(root.get(o.name) == r for o in n.outputs))]
        self.selfs = {v.name for v in g.outputs if v.name in self.root}
        with_uses = {self.root[name] for name, uses in self.uses.items() if uses}
        self.selfs.update(r for r in cands if r not in with_uses)
        self.consumers = {id(n): n for uses in self.uses.values() for n, _ in uses}
        self.num: dict[tuple[str, str, str], list[float]] = {}
        self.den: dict[tuple[str, str], list[float]] = {}

    def run(self, inputs: dict[str, np.ndarray]) -> None:
        raise NotImplementedError

    def slots(self, node: Node) -> list[int]:
        """The input slots of consumer ``node`` that are scored uses."""
        return [i for i, v in enumerate(node.inputs)
                if v is not None and (node, i) in self.uses.get(v.name, ())]

    def add_num(self, name: str, consumer: str, method: str, err: float) -> None:
        self.num.setdefault((name, consumer, method), []).append(err)

    def add_den(self, name: str, consumer: str, energy: float) -> None:
        self.den.setdefault((name, consumer), []).append(energy)

    def best(self) -> dict[str, str]:
        score: dict[tuple[str, str], float] = {}
        for (name, consumer, m), errs in sorted(self.num.items()):
            den = math.fsum(self.den[(name, consumer)])
            rel = math.fsum(errs) / den if den > 0.0 else math.fsum(errs)
            score[(name, m)] = score.get((name, m), 0.0) + rel
        out = {}
        for name, cands in self.cands.items():
            out[name] = min((m for m, _ in cands), key=lambda m: score.get((name, m), 0.0))
        return out


class _InterpreterScores(_Scores):
    """The sums from the interpreter: each consumer's numpy reference re-run per candidate."""

    def __init__(self, g: Graph, root: dict[str, str], cands: Candidates,
                 qmax: dict[str, int]) -> None:
        super().__init__(g, root, cands, qmax)
        # the values the consumers need kept alive, and the node after which each is freed
        last_use: dict[str, Node] = {}
        for node in g.nodes:
            if id(node) in self.consumers:
                for v in node.inputs:
                    if v is not None and not v.is_const:
                        last_use[v.name] = node
        self.keep = set(last_use)
        self.free: dict[int, list[str]] = {}
        for name, node in last_use.items():
            self.free.setdefault(id(node), []).append(name)

    def run(self, inputs: dict[str, np.ndarray]) -> None:
        live: dict[str, np.ndarray] = {}
        for v in self.g.inputs:
            self._produced(v.name, inputs[v.name], live)

        def hook(node: Node, results: list[np.ndarray]) -> None:
            for v, r in zip(node.outputs, results, strict=False):
                self._produced(v.name, r, live)
            if id(node) in self.consumers:
                self._consume(node, results, live)
                for name in self.free.get(id(node), ()):
                    live.pop(name, None)

        interpret(self.g, inputs, observe=hook)

    def _produced(self, name: str, array: np.ndarray, live: dict[str, np.ndarray]) -> None:
        if name in self.keep:
            live[name] = array
        if name in self.selfs:
            r = self.root[name]
            ref = array.astype(np.float64)
            self.add_den(r, name, float(np.sum(ref * ref)))
            for m, a in self.cands[r]:
                err = fake_quant(array, a, self.qmax[r]).astype(np.float64) - ref
                self.add_num(r, name, m, float(np.sum(err * err)))

    def _consume(self, node: Node, results: list[np.ndarray], live: dict) -> None:
        args = [None if v is None else (self.g.constants[v.name] if v.is_const else live[v.name])
                for v in node.inputs]
        opdef = node.opdef
        types = [None if v is None else v.type for v in node.inputs]
        refs = [r.astype(np.float64) for r, v in zip(results, node.outputs, strict=False)
                if v.dtype in FLOAT_DTYPES]
        energy = math.fsum(float(np.sum(r * r)) for r in refs)
        for slot in self.slots(node):
            v = node.inputs[slot]
            r, key = self.root[v.name], f"{node.name}#{slot}"
            self.add_den(r, key, energy)
            for m, a in self.cands[r]:
                trial = list(args)
                trial[slot] = fake_quant(args[slot], a, self.qmax[r])
                outs = (opdef.reference(trial, node.attrs, input_types=types)
                        if opdef.needs_input_types else opdef.reference(trial, node.attrs))
                outs = [np.asarray(o, dtype=np.float64) for o, w in
                        zip(outs, node.outputs, strict=False) if w.dtype in FLOAT_DTYPES]
                err = math.fsum(float(np.sum((o - r) ** 2)) for o, r in
                                zip(outs, refs, strict=True))
                self.add_num(r, key, m, err)


class _OrtScores(_Scores):
    """The sums from one onnxruntime session of the trial graph (see the module docstring)."""

    def __init__(self, g: Graph, root: dict[str, str], cands: Candidates,
                 qmax: dict[str, int], threads: int | None) -> None:
        super().__init__(g, root, cands, qmax)
        bad = [n for n in self.root if g.value(n).dtype != "f32"]
        if bad:
            raise Unavailable(f"fake quantization of %{bad[0]} ({g.value(bad[0]).dtype}) is "
                              "exported for f32 only")
        #: sum-of-squares output -> (a, b): sum((a - b)^2), or sum(a^2) when b is None
        self.sums: dict[str, tuple[str, str | None]] = {}
        self.terms: dict[str, list[tuple]] = {}  # sum output -> ("num"|"den", ...) terms
        t = self.trials = _TrialGraph(g)
        for anchor in [None, *g.nodes]:
            made = [v for v in (g.inputs if anchor is None else anchor.outputs)
                    if v.name in self.selfs]
            for v in made:  # a member scored on its own error
                r = self.root[v.name]
                self._term((v.name, None), ("den", r, v.name))
                for m, a in self.cands[r]:
                    trial = t.fake_quant(v.name, a, qmax[r], anchor)
                    self._term((trial.name, v.name), ("num", r, v.name, m))
            if anchor is not None and id(anchor) in self.consumers:
                self._consumer(anchor)
        t.finish()
        self.names = list(self.sums)
        self.session = open_session(t.g, (), threads,
                                    extend=lambda model: add_sums_of_squares(model, self.sums))

    def _consumer(self, node: Node) -> None:
        t = self.trials
        tn = t.nodes[node.name]
        refs = [(i, o.name) for i, o in enumerate(tn.outputs) if o.dtype in FLOAT_DTYPES]
        for slot in self.slots(node):
            v = node.inputs[slot]
            r, key = self.root[v.name], f"{node.name}#{slot}"
            for _, ref in refs:
                self._term((ref, None), ("den", r, key))
            for m, a in self.cands[r]:
                fq = t.fake_quant(v.name, a, self.qmax[r], node)
                if node.op == "conv_fused" and slot == RESIDUAL:
                    outs = [t.residual_trial(tn, fq)]
                else:
                    args = list(tn.inputs)
                    args[slot] = fq
                    outs = t.add(node.op, args, node.attrs, node, f"{node.name}/auto.{m}").outputs
                for i, ref in refs:
                    self._term((outs[i].name, ref), ("num", r, key, m))

    def _term(self, pair: tuple[str, str | None], term: tuple) -> None:
        name = f"{pair[0]}/auto.sum_sq" if pair[1] is None else f"{pair[0]}/auto.err_sq"
        self.sums[name] = pair
        self.terms.setdefault(name, []).append(term)

    def run(self, inputs: dict[str, np.ndarray]) -> None:
        sums = self.session.run(self.names, {k: np.ascontiguousarray(a)
                                             for k, a in inputs.items()})
        for name, s in zip(self.names, sums, strict=True):
            for kind, r, key, *m in self.terms[name]:
                if kind == "den":
                    self.add_den(r, key, float(s))
                else:
                    self.add_num(r, key, m[0], float(s))


def add_sums_of_squares(model, sums: dict[str, tuple[str, str | None]]) -> None:
    """Make the outputs of ONNX ``model`` the float64 scalars ``name = sum((a - b)^2)`` (or
    ``sum(a^2)`` when b is None) of ``sums``, each computed right after its inputs exist: the
    difference in float32, then squared and summed in float64 (ReduceSumSquare)."""
    from onnx import TensorProto, helper

    nodes = list(model.graph.node)
    where = {t: i for i, n in enumerate(nodes) for t in n.output}  # tensor -> its producer
    taken = set(where) | {t.name for t in model.graph.initializer} | set(sums)
    taken.update(t.name for t in model.graph.input)

    def fresh(base: str) -> str:
        name, i = base, 1
        while name in taken:
            name, i = f"{base}_{i}", i + 1
        taken.add(name)
        return name

    pending: dict[int, list] = {}  # producer index (-1: a graph input) -> nodes to add after it
    for name, (a, b) in sums.items():
        x = a
        new = []
        if b is not None:
            x = fresh(f"{name}/diff")
            new.append(helper.make_node("Sub", [a, b], [x], name=x))
        x64 = fresh(f"{name}/f64")
        new.append(helper.make_node("Cast", [x], [x64], name=x64, to=TensorProto.DOUBLE))
        new.append(helper.make_node("ReduceSumSquare", [x64], [name], name=name, keepdims=0))
        at = max(where.get(t, -1) for t in (a, b) if t is not None)
        pending.setdefault(at, []).extend(new)
    order = list(pending.get(-1, ()))
    for i, n in enumerate(nodes):
        order.append(n)
        order.extend(pending.get(i, ()))
    del model.graph.node[:]
    model.graph.node.extend(order)
    del model.graph.output[:]
    model.graph.output.extend(helper.make_tensor_value_info(name, TensorProto.DOUBLE, [])
                              for name in sums)


class _TrialGraph:
    """A copy of the float graph that scoring nodes are added to; each added node is placed
    right after its ``anchor`` node (None: before every node), so onnxruntime frees the trial
    tensors early."""

    def __init__(self, g: Graph) -> None:
        self.g = g.copy()
        self.nodes = {n.name: n for n in self.g.nodes}  # the float graph's nodes, by name
        self.after: dict[str | None, list[Node]] = {}
        self._fq: dict[tuple[str, float, int], Value] = {}
        self._conv: dict[str, Value] = {}  # conv_fused node -> its convolution without residual

    def add(self, op: str, inputs: list, attrs: dict, anchor: Node | None,
            name: str) -> Node:
        node = self.g.add_node(op, inputs, attrs, name=name)
        self.after.setdefault(None if anchor is None else anchor.name, []).append(node)
        return node

    def fake_quant(self, name: str, a: float, qmax: int, anchor: Node | None) -> Value:
        """``dequantize(quantize(x))`` at scale ``float32(a / qmax)`` (one per value and range)."""
        key = (name, a, qmax)
        if key not in self._fq:
            s = float(np.float32(a / qmax))
            dtype = "i16" if qmax > 127 else "i8"
            q = self.add("quantize", [self.g.value(name)], {"dtype": dtype, "scale": [s]},
                         anchor, f"{name}/auto.q")
            self._fq[key] = self.add("dequantize", q.outputs, {}, anchor,
                                     f"{name}/auto.dq").outputs[0]
        return self._fq[key]

    def residual_trial(self, node: Node, residual: Value) -> Value:
        """conv_fused ``node`` with another residual: ``act(z + residual)``, where the
        convolution ``z = conv(x, w, b)`` is computed once for all its trials (the fused op's
        definition, ir/ops/fused.py, so the same arithmetic)."""
        if node.name not in self._conv:
            attrs = {**node.attrs, "activation": "none", "clip_min": -math.inf,
                     "clip_max": math.inf}
            self._conv[node.name] = self.add("conv_fused", node.inputs[:RESIDUAL], attrs, node,
                                             f"{node.name}/auto.conv").outputs[0]
        y = self.add("add", [self._conv[node.name], residual], {}, node,
                     f"{node.name}/auto.residual").outputs[0]
        act = node.attrs["activation"]
        if act == "none":
            return y
        if act == "relu":
            return self.add("relu", [y], {}, node, f"{node.name}/auto.act").outputs[0]
        lo, hi = (0.0, 6.0) if act == "relu6" else (node.attrs["clip_min"],
                                                     node.attrs["clip_max"])
        return self.add("clip", [y], {"min": lo, "max": hi}, node,
                        f"{node.name}/auto.act").outputs[0]

    def finish(self) -> None:
        """Order the nodes (every added node right after its anchor); the graph's outputs are
        set by :func:`add_sums_of_squares` on the exported model."""
        added = {id(n) for nodes in self.after.values() for n in nodes}
        order = list(self.after.get(None, ()))
        for n in self.g.nodes:
            if id(n) not in added:
                order.append(n)
                order.extend(self.after.get(n.name, ()))
        self.g.nodes = order


def _float_outputs(node: Node) -> bool:
    return any(v.dtype in FLOAT_DTYPES for v in node.outputs)
