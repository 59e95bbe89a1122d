"""The simulator runtime: runs one model of an ``.hbm`` file on numpy arrays, bit-exactly.

``Runtime(source, model=None, *, march=None)`` reads and validates the file
(:func:`hbc.runtime.hbm.read_hbm`: memory-mapped, constants used in place, never copied),
selects a model by name (the only one when ``model`` is None), decodes its program once, and
exposes the model's input and output descriptors (:class:`InputDesc`, :class:`OutputDesc`).
``run(inputs)`` executes the program with the op registry's numpy kernels
(:func:`hbc.ir.interpret.interpret`); the torch ``int_infer`` model of :mod:`hbc.quant` is the
independent second implementation that ``hbc verify`` compares it with.

Inputs, per descriptor:

- float arrays (f16/f32/f64; cast to the input's float dtype, f64 rounding to nearest) go
  through the program's own ``quantize`` node: ``saturate(round_half_even(x / scale))`` with the
  division in float32, numpy's ``rint`` (ties to even) and saturation to the integer type;
- integer arrays of the input's quantized dtype (``InputDesc.quant_dtype``, e.g. int8) are
  the quantized values themselves: they are fed to the quantize node's result and the quantize
  is skipped (a program variant built once and cached);
- a wrong name, dtype or shape is an InputError naming the input and its descriptor; missing
  and unknown names are listed together.

Batches: the program is compiled at a fixed batch ``N`` (axis 0 of each descriptor's shape).
An input of ``k * N`` rows runs as ``k`` successive runs of ``N`` (every input is split the same
way along axis 0) and every returned array is the runs' results concatenated along axis 0. So
any batch gives exactly the results of running its samples one by one.

Outputs: the integers the final ``dequantize`` reads (their scale on the descriptor), or with
``dequantize=True`` the program's float outputs (an int32 "high-precision" output, which has
no dequantize in the program, is dequantized here with ``ONNX DequantizeLinear`` rounding).
Outputs without a quantized boundary (a CPU op's float result) are returned as they are.

``dump=True`` returns every value of the program (graph inputs as fed, then every node result
in execution order) by value name, besides the outputs under their own names in the form
``run`` returns them; ``dump=DIR`` writes the same arrays to ``DIR/<name>.npy`` (names made
file-safe) with an ``index.json`` and returns only the outputs.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hbc.errors import InputError
from hbc.ir.graph import Graph, Node
from hbc.ir.interpret import interpret
from hbc.ir.io import write_atomic
from hbc.ir.ops.quant import dequantize_array
from hbc.ir.program import io_descriptors
from hbc.ir.types import DTYPES, FLOAT_DTYPES, QuantParams

from .hbm import HbmError, HbmModel, read_hbm

#: descriptor fields the .hbm meta records and the program must agree with
_CHECKED = ("name", "shape", "dtype", "layout", "quant")


# -- descriptors -------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorDesc:
    """A model input or output: its name, shape, dtype and layout at the model boundary, and
    the quantized integers behind it (``quant_dtype``, ``scale``: a float, or a tuple along
    ``axis``; ``value``: the integer value's name inside the program), None without one."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    layout: str | None
    quant_dtype: str | None
    scale: float | tuple[float, ...] | None
    axis: int | None
    value: str | None

    @property
    def np_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]

    @property
    def quant(self) -> QuantParams | None:
        """The scale(s) as QuantParams (None without a quantized boundary)."""
        if self.scale is None:
            return None
        scale = self.scale if isinstance(self.scale, tuple) else (self.scale,)
        return QuantParams(scale, self.axis)

    def describe(self) -> str:
        """``'x': f32[1, 3, 32, 32] NCHW, int8 i8 at scale 0.0312`` for messages."""
        s = f"'{self.name}': {self.dtype}{list(self.shape)}"
        if self.layout:
            s += f" {self.layout}"
        if self.quant_dtype is not None:
            at = f"scale {self.scale:.6g}" if isinstance(self.scale, float) else \
                f"{len(self.scale or ())} scales along axis {self.axis}"
            s += f", quantized {self.quant_dtype} at {at}"
        return s


@dataclass(frozen=True)
class InputDesc(TensorDesc):
    """A model input; ``input_type`` is the compile-time input type (featuremap, rgb, ...)."""

    input_type: str = "featuremap"

    def check(self, x: Any) -> tuple[np.ndarray, bool]:
        """``x`` as a contiguous array the program takes, and whether it is the quantized
        integers (True) rather than the boundary dtype; InputError naming this input else."""
        arr = np.asarray(x)
        if self.dtype in FLOAT_DTYPES and arr.dtype.kind == "f":
            arr, is_int = arr.astype(self.np_dtype, copy=False), False
        elif self.quant_dtype is not None and arr.dtype == DTYPES[self.quant_dtype]:
            is_int = True
        elif arr.dtype == self.np_dtype:
            is_int = False
        else:
            accepted = f"{self.np_dtype}" + (f" or {DTYPES[self.quant_dtype]} (the quantized "
                                             "values)" if self.quant_dtype else "")
            raise InputError(f"input '{self.name}': got {arr.dtype} data, expected {accepted}; "
                             f"input {self.describe()}")
        rank, n = len(self.shape), (self.shape[0] if self.shape else 0)
        if arr.ndim != rank or (rank and (arr.shape[1:] != self.shape[1:] or (
                n == 0 and arr.shape[0]) or (n and (not arr.shape[0] or arr.shape[0] % n)))):
            batch = f" (or a multiple of {n} along axis 0)" if n else ""
            raise InputError(f"input '{self.name}': got shape {list(arr.shape)}, expected "
                             f"{list(self.shape)}{batch}; input {self.describe()}")
        return np.ascontiguousarray(arr), is_int

    def runs(self, arr: np.ndarray) -> int:
        """How many runs of the compiled batch ``arr`` (already checked) holds."""
        return arr.shape[0] // self.shape[0] if self.shape and self.shape[0] else 1


@dataclass(frozen=True)
class OutputDesc(TensorDesc):
    """A model output. ``value`` is None when the output is itself the integers (a
    high-precision int32 output) or has no quantized boundary (a float CPU result)."""


def descriptors(graph: Graph, inputs: list[dict], outputs: list[dict], where: str
                ) -> tuple[list[InputDesc], list[OutputDesc]]:
    """The descriptors of the .hbm meta, checked against the program's (``io_descriptors``):
    HbmError naming the field when they disagree."""
    want_in, want_out = io_descriptors(graph)
    for kind, got, want in (("inputs", inputs, want_in), ("outputs", outputs, want_out)):
        if [d.get("name") for d in got] != [d["name"] for d in want]:
            raise HbmError(f"{where}: meta {kind} {[d.get('name') for d in got]} are not the "
                           f"program's {[d['name'] for d in want]}")
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            for key in _CHECKED:
                if g.get(key) != w[key]:
                    raise HbmError(f"{where}: meta {kind}[{i}].{key} is {g.get(key)!r}, the "
                                   f"program says {w[key]!r}")
    ins = [InputDesc(**_fields(graph, w), input_type=str(g.get("input_type", "featuremap")))
           for g, w in zip(inputs, want_in, strict=True)]
    return ins, [OutputDesc(**_fields(graph, w)) for w in want_out]


def _fields(graph: Graph, d: dict) -> dict[str, Any]:
    q, value = d["quant"], None
    if q is not None:
        value = q["value"]
    else:  # a high-precision output: the integers are the output, their scales on its type
        t = graph.value(d["name"]).type
        if t.quant is not None and t.dtype not in FLOAT_DTYPES:
            q = {"dtype": t.dtype, "axis": t.quant.axis,
                 "scale": t.quant.scale[0] if t.quant.axis is None else t.quant.scale}
    scale = None if q is None else (float(q["scale"]) if q["axis"] is None
                                    else tuple(float(s) for s in q["scale"]))
    return {"name": d["name"], "shape": tuple(d["shape"]), "dtype": d["dtype"],
            "layout": d["layout"], "quant_dtype": None if q is None else q["dtype"],
            "scale": scale, "axis": None if q is None else q["axis"], "value": value}


class Runtime:
    """One model of an ``.hbm`` file, ready to run (see the module docstring).

    Attributes: ``name`` (the model's), ``march``, ``inputs`` / ``outputs`` (descriptors),
    ``options`` and ``perf`` (as recorded at compile time), ``source`` (path or "<bytes>"),
    ``graph`` (the decoded program; do not modify it).
    """

    def __init__(self, source: str | os.PathLike | bytes, model: str | None = None, *,
                 march: str | None = None) -> None:
        self.file = read_hbm(source, march=march)
        self.model: HbmModel = self.file.model(model)
        self.source = self.file.source
        self.name = self.model.name
        self.march = self.file.march
        self.options = dict(self.model.options)
        self.perf = dict(self.model.perf)
        self.graph: Graph = self.model.graph()
        where = f"{self.source}: model '{self.name}'"
        self.inputs, self.outputs = descriptors(self.graph, self.model.inputs,
                                                self.model.outputs, where)
        self._variants: dict[frozenset[str], Graph] = {frozenset(): self.graph}

    def __repr__(self) -> str:
        return (f"Runtime({self.source!r}, model={self.name!r}, march={self.march!r}, "
                f"inputs={[d.name for d in self.inputs]}, "
                f"outputs={[d.name for d in self.outputs]})")

    # -- running -------------------------------------------------------------------------------
    def run(self, inputs: Mapping[str, Any], *, dequantize: bool = False,
            dump: bool | str | os.PathLike = False) -> dict[str, np.ndarray]:
        """Run the model on ``inputs`` (arrays keyed by input name); returns the outputs keyed
        by output name (see the module docstring for dtypes, batches and ``dump``)."""
        feeds, quantized, runs = self._prepare(inputs)
        graph = self._variant(quantized)
        keep_all = dump is not False
        pieces: list[dict[str, np.ndarray]] = []
        for j in range(runs):
            part = {name: _rows(a, j, runs) for name, a in feeds.items()}
            pieces.append(self._run_once(graph, part, dequantize, keep_all))
        result = pieces[0] if runs == 1 else {
            k: _concat([p[k] for p in pieces]) for k in pieces[0]}
        if dump is False or dump is True:
            return result
        write_dump(Path(dump), result, graph, self.outputs, self.name, runs)
        return {d.name: result[d.name] for d in self.outputs}

    def run_values(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every value of the program (graph inputs and node results, by value name) for one run
        of float ``inputs`` of exactly the descriptors' shapes: what ``hbc verify`` compares."""
        feeds, quantized, runs = self._prepare(inputs)
        if quantized or runs != 1:
            raise InputError(f"model '{self.name}': run_values takes float inputs of the "
                             "compiled batch size")
        values: dict[str, np.ndarray] = dict(feeds)

        def observe(node: Node, results: list[np.ndarray]) -> None:
            values.update(zip((v.name for v in node.outputs), results, strict=False))

        interpret(self.graph, feeds, observe=observe)
        return values

    def _run_once(self, graph: Graph, feeds: dict[str, np.ndarray], dequantize: bool,
                  keep_all: bool) -> dict[str, np.ndarray]:
        """One run at the compiled batch size: the outputs (and, with ``keep_all``, every
        value) by name."""
        want = {d.value for d in self.outputs if d.value is not None}
        values: dict[str, np.ndarray] = dict(feeds) if keep_all else {}

        def observe(node: Node, results: list[np.ndarray]) -> None:
            for v, r in zip(node.outputs, results, strict=False):
                if keep_all or v.name in want:
                    values[v.name] = r

        outs = interpret(graph, feeds, observe=observe)
        values.update((k, v) for k, v in feeds.items() if k in want)
        result = dict(values) if keep_all else {}
        for d in self.outputs:
            out = outs[d.name]
            if not dequantize and d.value is not None:
                out = values[d.value]
            elif dequantize and out.dtype.kind != "f" and d.quant is not None:
                out = dequantize_array(out, d.quant, "f32")  # a high-precision (int32) output
            result[d.name] = out
        return result

    # -- inputs ----------------------------------------------------------------------------------
    def _prepare(self, inputs: Mapping[str, Any]
                 ) -> tuple[dict[str, np.ndarray], frozenset[str], int]:
        """Checked feeds keyed by the program value they go to, the names of the inputs given
        as quantized integers, and the number of runs the batch splits into."""
        if not isinstance(inputs, Mapping):
            raise InputError(f"model '{self.name}': inputs must be a dict of arrays keyed by "
                             f"input name ({', '.join(d.name for d in self.inputs)}), got a "
                             f"{type(inputs).__name__}")
        expected = {d.name: d for d in self.inputs}
        missing = [n for n in expected if n not in inputs]
        unknown = sorted(str(n) for n in inputs if n not in expected)
        if missing or unknown:
            parts = ([f"missing {', '.join(map(repr, missing))}"] if missing else []) + (
                [f"unknown {', '.join(map(repr, unknown))}"] if unknown else [])
            raise InputError(f"model '{self.name}': inputs do not match ({'; '.join(parts)}); "
                             "expected " + "; ".join(d.describe() for d in self.inputs))
        feeds: dict[str, np.ndarray] = {}
        quantized: set[str] = set()
        batches: dict[str, int] = {}
        for d in self.inputs:
            arr, is_int = d.check(inputs[d.name])
            batches[d.name] = d.runs(arr)
            if is_int:
                quantized.add(d.name)
                feeds[d.value] = arr  # type: ignore[index]
            else:
                feeds[d.name] = arr
        if len(set(batches.values())) > 1:
            raise InputError(f"model '{self.name}': inputs split into different numbers of "
                             "runs of the compiled batch (" + ", ".join(
                                 f"'{n}': {k}" for n, k in batches.items()) + ")",
                             hint="give every input the same number of samples")
        return feeds, frozenset(quantized), next(iter(batches.values()), 1)

    def _variant(self, quantized: frozenset[str]) -> Graph:
        """The program with the quantize nodes of the inputs in ``quantized`` removed, their
        results turned into graph inputs (built once per combination)."""
        graph = self._variants.get(quantized)
        if graph is not None:
            return graph
        graph = self.graph.copy()
        for d in self.inputs:
            if d.name not in quantized:
                continue
            x = graph.value(d.name)
            if x in graph.outputs:
                raise InputError(f"input '{d.name}' is also a model output: feed it as "
                                 f"{d.np_dtype}, not as its quantized integers")
            (node, _), = x.uses  # the descriptor promises one user: the quantize
            q = node.outputs[0]
            fed = graph.add_input(graph.unique_name(f"{q.name}.fed"), q.type)
            graph.replace_all_uses(q, fed)
            graph.remove_node(node)
            graph.remove_value(x)
            graph.rename_value(fed, q.name)
        self._variants[quantized] = graph
        return graph

    def describe(self) -> str:
        """A few lines: the model, its march and its input and output descriptors."""
        lines = [f"model '{self.name}' (march {self.march}) from {self.source}"]
        lines += [f"  input  {d.describe()}" for d in self.inputs]
        lines += [f"  output {d.describe()}" for d in self.outputs]
        return "\n".join(lines)


# -- dumps -------------------------------------------------------------------------------------
_UNSAFE = re.compile(r"[^A-Za-z0-9_.+-]")


def file_name(name: str, taken: set[str]) -> str:
    """``name`` as a file stem of letters, digits and ``_.+-`` (no leading dot), unique (case
    insensitively) among ``taken``; the result is added to ``taken``."""
    base = _UNSAFE.sub("_", name).lstrip(".") or "value"
    stem, i = base, 1
    while stem.lower() in taken:
        stem, i = f"{base}_{i}", i + 1
    taken.add(stem.lower())
    return stem


def write_dump(folder: Path, arrays: Mapping[str, np.ndarray], graph: Graph,
               outputs: list[OutputDesc], model: str, runs: int) -> None:
    """Write ``arrays`` to ``folder/<file_name>.npy`` (each atomically) and ``index.json``:
    ``{"model", "runs", "values": [{"name", "file", "node", "op", "dtype", "shape", "scale",
    "axis"}]}`` in the arrays' order (node and op null for graph inputs; scale and axis null
    for floats)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"dump folder {folder}: {e.strerror or e}") from None
    producer = {v.name: n for n in graph.nodes for v in n.outputs}
    taken: set[str] = {"index"}
    out_quant = {d.name: d.quant for d in outputs}
    entries = []
    for name, arr in arrays.items():
        file = file_name(name, taken) + ".npy"
        write_atomic(folder / file, lambda f, a=arr: np.save(f, a, allow_pickle=False))
        node = producer.get(name)
        q = out_quant[name] if name in out_quant else \
            graph.value(name).type.quant if graph.has_value(name) else None
        q = None if arr.dtype.kind == "f" else q
        entries.append({"name": name, "file": file, "node": node.name if node else None,
                        "op": node.op if node else None, "dtype": str(arr.dtype),
                        "shape": list(arr.shape),
                        "scale": None if q is None else list(q.scale),
                        "axis": None if q is None else q.axis})
    text = json.dumps({"model": model, "runs": runs, "values": entries}, indent=1,
                      sort_keys=True) + "\n"
    write_atomic(folder / "index.json", lambda f: f.write(text.encode("utf-8")))


def _rows(a: np.ndarray, j: int, runs: int) -> np.ndarray:
    """Run ``j`` of ``runs`` equal row blocks of ``a`` (all of it for one run)."""
    if runs == 1:
        return a
    n = a.shape[0] // runs
    return a[j * n:(j + 1) * n]


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    if parts[0].ndim == 0:
        return np.stack(parts)
    return np.concatenate(parts, axis=0)


__all__ = ["InputDesc", "OutputDesc", "Runtime", "TensorDesc", "file_name"]
