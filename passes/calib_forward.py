"""The float forward pass of calibration: each run's observed values, from onnxruntime or from
the interpreter.

:func:`~hbc.passes.calibrate.calibrate` observes some float values of every run (graph inputs and
the roots of scale groups). Two engines compute them:

- ``onnxruntime``: the graph is exported to ONNX (``frontend/onnx_export.py``) with every
  observed value as an extra graph output, one session runs every sample, and its outputs are
  written into buffers allocated once (I/O binding). The observers may then use those buffers as
  scratch (``owned``): the next run overwrites them. At one thread this is 3x (ResNet-18) to 7x
  (MobileNetV2) faster than the interpreter.
- ``interpreter``: hbc's numpy reference (``ir/interpret.py``) with its observe hook; the arrays
  are the interpreter's own and are not modified.

``auto`` (the default) takes onnxruntime when the graph exports, every observed node output is
f32/f16/f64, one run's observed values fit in :data:`MAX_BUFFER_BYTES` and the session opens;
otherwise the interpreter (the reason is logged). The engines differ by float rounding only
(their kernels sum in other orders, e.g. 5e-6 relative on ResNet-18's activations), so scales
may differ in the last bits between them (``max``: up to 5e-6 relative, bench/bench_quant.py);
each engine gives the same result for the same data and order. ``threads``: onnxruntime's
intra-op threads (None: ``OMP_NUM_THREADS`` when set, else onnxruntime's default). Its CPU
kernels split work by output, not inside a sum: on ResNet-18 and MobileNetV2 every observed
value is bit-identical at 1, 2 and 4 threads.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from hbc.errors import InputError, UnsupportedError
from hbc.ir.graph import Graph, Node, Value
from hbc.ir.interpret import check_inputs, interpret

log = logging.getLogger(__name__)

ENGINES = ("auto", "onnxruntime", "interpreter")
#: the largest total size of one run's observed values the onnxruntime engine keeps in buffers
MAX_BUFFER_BYTES = 1 << 30
#: dtypes an observed node output may have for the onnxruntime engine (numpy buffers)
ORT_DTYPES = ("f32", "f16", "f64")

#: ``sink(producer or None for a graph input, value, array, owned)``; ``owned``: the sink may
#: overwrite the array
Sink = Callable[[Node | None, Value, np.ndarray, bool], None]


class Unavailable(Exception):
    """The onnxruntime engine cannot run this graph (the message says why)."""


class InterpreterForward:
    """Observed values from hbc's interpreter."""

    engine = "interpreter"

    def __init__(self, graph: Graph, observed: Sequence[str]) -> None:
        self.graph = graph
        self.names = set(observed)
        self.inputs = [v for v in graph.inputs if v.name in self.names]

    def run(self, inputs: Mapping[str, np.ndarray], sink: Sink) -> None:
        for v in self.inputs:
            sink(None, v, np.asarray(inputs[v.name]), False)

        def hook(node: Node, results: list[np.ndarray]) -> None:
            for v, r in zip(node.outputs, results, strict=False):
                if v.name in self.names:
                    sink(node, v, r, False)

        interpret(self.graph, inputs, observe=hook)


class OrtForward:
    """Observed values from an onnxruntime session of the exported graph (see the module
    docstring); Unavailable when the graph cannot run there."""

    engine = "onnxruntime"

    def __init__(self, graph: Graph, observed: Sequence[str], threads: int | None = None
                 ) -> None:
        self.graph = graph
        names = set(observed)
        self.values = [v for v in graph.inputs if v.name in names] + [
            v for n in graph.nodes for v in n.outputs if v.name in names]
        fetched = [v for v in self.values if v.kind == "node"]
        bad = [v for v in fetched if v.dtype not in ORT_DTYPES]
        if bad:
            raise Unavailable(f"%{bad[0].name} is {bad[0].dtype} (buffers hold "
                              f"{', '.join(ORT_DTYPES)})")
        size = sum(v.type.numel * v.type.np_dtype.itemsize for v in fetched)
        if size > MAX_BUFFER_BYTES:
            raise Unavailable(f"one run's observed values take {size / 2**20:.0f} MiB (limit "
                              f"{MAX_BUFFER_BYTES / 2**20:.0f} MiB)")
        self.session = open_session(graph, [v.name for v in fetched], threads)
        self.binding = self.session.io_binding()
        self.buffers: dict[str, np.ndarray] = {}
        for v in fetched:
            buf = np.empty(v.shape, v.type.np_dtype)
            self.binding.bind_output(v.name, "cpu", 0, buf.dtype, list(buf.shape),
                                     buf.ctypes.data)
            self.buffers[v.name] = buf

    def run(self, inputs: Mapping[str, np.ndarray], sink: Sink | None = None) -> None:
        """Run one sample; ``sink`` gets the observed values in graph order (inputs first).
        Every fetched value is then in :attr:`buffers` until the next run."""
        arrays = check_inputs(self.graph, inputs)
        feeds = {name: np.ascontiguousarray(a) for name, a in arrays.items()}  # alive for the run
        for name, a in feeds.items():
            self.binding.bind_cpu_input(name, a)
        self.session.run_with_iobinding(self.binding)
        if sink is None:
            return
        for v in self.values:
            if v.kind == "node":
                sink(v.producer, v, self.buffers[v.name], True)
            else:
                sink(None, v, arrays[v.name], False)


def open_session(graph: Graph, outputs: Sequence[str], threads: int | None, *,
                 extend: Callable[[Any], None] | None = None) -> Any:
    """An onnxruntime CPU session of ``graph`` exported with ``outputs`` as extra graph outputs
    (then changed by ``extend(model)`` when given); Unavailable when the graph does not export
    or onnxruntime rejects it."""
    from hbc.frontend.onnx_export import export_onnx

    try:
        model = export_onnx(graph, extra_outputs=outputs, check=False)
    except UnsupportedError as e:
        raise Unavailable(str(e)) from None
    if extend is not None:
        extend(model)
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = session_threads(threads)
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    # idle pool threads sleep instead of spinning: calibration runs large ops back to back, and
    # spinning threads steal the cores of whatever else runs on the machine
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    shared = _share_constants(model, graph, opts)
    try:
        session = ort.InferenceSession(model.SerializeToString(), opts,
                                       providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's own error types (Fail, InvalidGraph, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise Unavailable(f"onnxruntime cannot run the exported graph: {first}") from None
    session.hbc_constants = shared  # the session reads their memory: keep them alive with it
    return session


def _share_constants(model: Any, graph: Graph, opts: Any) -> list:
    """Hand the graph's large constants to onnxruntime as external initializers (their numpy
    memory, no copy) instead of serializing them into the model: about 0.1 s less per session
    on ResNet-18 (45 MB of weights). Returns the OrtValues, which must outlive the session."""
    from onnx import TensorProto
    from onnxruntime import OrtValue

    names, values = [], []
    for init in model.graph.initializer:
        array = graph.constants.get(init.name)
        if array is None or array.nbytes < 4096 or array.dtype.type.__module__ != "numpy" or \
                array.dtype.kind not in "fiu":  # ml_dtypes (bf16, float8) stay in the model
            continue
        init.ClearField("raw_data")
        init.data_location = TensorProto.EXTERNAL
        entry = init.external_data.add()
        entry.key, entry.value = "location", "hbc-memory"
        names.append(init.name)
        values.append(OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array)))
    if names:
        opts.add_external_initializers(names, values)
    return values


def session_threads(threads: int | None) -> int:
    """Intra-op threads: ``threads``, else OMP_NUM_THREADS when set, else 0 (onnxruntime's
    default: one per physical core)."""
    if threads is not None:
        if threads < 0:
            raise InputError(f"calibration threads {threads}: expected 0 (all cores) or more")
        return threads
    env = os.environ.get("OMP_NUM_THREADS", "")
    return int(env) if env.isdigit() else 0


def open_forward(graph: Graph, observed: Sequence[str], engine: str = "auto",
                 threads: int | None = None) -> InterpreterForward | OrtForward:
    """The forward pass that computes ``observed`` (value names) with ``engine`` (ENGINES)."""
    if engine not in ENGINES:
        raise InputError(f"unknown calibration engine '{engine}' (engines: "
                         f"{', '.join(ENGINES)})")
    session_threads(threads)  # validate even when the interpreter runs
    if engine != "interpreter":
        try:
            return OrtForward(graph, observed, threads)
        except Unavailable as e:
            if engine == "onnxruntime":
                raise InputError(f"calibration engine onnxruntime: graph '{graph.name}': {e}",
                                 hint="use engine='interpreter' (or 'auto')") from None
            log.info("calibration of '%s' runs in the interpreter: %s", graph.name, e)
    return InterpreterForward(graph, observed)
