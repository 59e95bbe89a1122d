"""PyTorch importer: a ``torch.nn.Module`` plus example inputs to an IR :class:`Graph`.

The module is traced with ``torch.fx.symbolic_trace`` (module-level graph: ``call_module`` nodes
keep the torch module path); where fx cannot trace it (control flow on shapes, ``len()``, ...)
``torch.export.export`` is tried and its aten-level graph is converted the same way. The traced
graph is then run once on the example inputs, which records every value's static shape and dtype
and the concrete value of everything that does not depend on the inputs: parameters, buffers,
``x.size()`` arithmetic, tensors built from constants. Those become graph constants or plain
Python values, so only input-dependent nodes reach the converters in :mod:`.torch_ops`.

Names: graph inputs are the ``forward()`` parameter names, outputs ``output`` / ``output0``... /
the keys of a returned dict; parameters and buffers keep their qualified names
(``layer1.0.conv1.weight``); a node converted from a torch module is named (and located) by the
module path (``layer1.0.conv1``), one from a function by the enclosing module path plus the fx
node name (``layer1.0/add``). Every unsupported node is reported in one ``UnsupportedError``
naming the module path, the torch target and the user's source line.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import io
import logging
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import fx

from hbc.errors import HbcError, InputError, UnsupportedError
from hbc.ir.graph import Graph, Value, legal_name
from hbc.ir.registry import InferError

from .torch_errors import (
    check_runs,
    source_line,
    trace_failure,
    user_frame_hint,
)
from .torch_ops import (
    describe_target,
    find_converter,
    hint_for,
    is_inplace,
    is_shape_query,
    is_view,
)
from .torch_ops.context import POISON, Meta, TorchContext, Unsupported

log = logging.getLogger(__name__)



# -- entry points -----------------------------------------------------------------------------
def import_torch(module: torch.nn.Module, example_inputs: Any) -> Graph:
    """Trace ``module`` on ``example_inputs`` (a tensor, a tuple of tensors or a dict of
    name -> tensor) and convert it to an IR graph with static shapes."""
    if not isinstance(module, torch.nn.Module):
        raise InputError(f"expected a torch.nn.Module, got {type(module).__name__}")
    label = type(module).__name__
    args, kwargs = _split_inputs(example_inputs)
    kwargs = _order_kwargs(module, kwargs, label)
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        with torch.no_grad():
            return _import(module, args, kwargs, label)
    finally:
        for m, mode in modes.items():
            m.training = mode


def import_callable(spec: str) -> Graph:
    """Import ``package.module:function`` or ``path/to/file.py:function``; the function returns
    ``(module, example_inputs)``, which is imported with :func:`import_torch`."""
    target, sep, func_name = spec.rpartition(":")
    if not sep or not target or not func_name.isidentifier():
        raise InputError(f"'{spec}': expected 'package.module:function' or 'file.py:function'")
    mod = _load_python_module(spec, target)
    if not hasattr(mod, func_name):
        names = sorted(n for n in vars(mod) if callable(getattr(mod, n)) and not n.startswith("_"))
        raise InputError(f"'{spec}': module '{target}' has no attribute '{func_name}'",
                         hint="functions there: " + (", ".join(names[:12]) or "none"))
    fn = getattr(mod, func_name)
    if not callable(fn):
        raise InputError(f"'{spec}': '{func_name}' is a {type(fn).__name__}, not a function")
    try:
        result = fn()
    except HbcError:
        raise
    except Exception as e:
        raise InputError(f"'{spec}': calling {func_name}() failed: {type(e).__name__}: {e}",
                         hint=user_frame_hint(e)) from None
    if not (isinstance(result, (tuple, list)) and len(result) == 2
            and isinstance(result[0], torch.nn.Module)):
        raise InputError(
            f"'{spec}': {func_name}() returned {_describe(result)}; expected a pair "
            "(torch.nn.Module, example_inputs)"
        )
    if not _is_inputs(result[1]):
        raise InputError(f"'{spec}': the example inputs are {_describe(result[1])}; expected a "
                         "tensor, a tuple of tensors or a dict of name -> tensor")
    return import_torch(result[0], result[1])


# -- tracing ----------------------------------------------------------------------------------
@dataclass
class _Traced:
    """A traced graph and how to feed it."""

    gm: fx.GraphModule
    #: the placeholders' values, in order
    feeds: list[Any]
    #: placeholders fed by model inputs -> graph input name (the prefix, for lists/dicts)
    inputs: dict[fx.Node, str]
    #: id(parameter/buffer) -> qualified name
    names: dict[int, str]
    kind: str
    #: pytree spec of the outputs (torch.export flattens them)
    out_spec: Any = None


def _import(module: torch.nn.Module, args: tuple, kwargs: dict, label: str) -> Graph:
    fx_error: BaseException | None = None
    traced = None
    try:
        traced = _trace_fx(module, args, kwargs)
        records = _record(traced)
    except Exception as e:  # any failure of tracing user code: fall back to torch.export
        fx_error = e
        log.debug("fx tracing of %s failed (%s); trying torch.export", label, e)
    if fx_error is not None:
        try:
            traced = _trace_export(module, args, kwargs)
            records = _record(traced)
        except Exception as e:
            check_runs(module, args, kwargs, label)
            raise trace_failure(module, label, fx_error, e) from None
    return _convert(module, traced, records, label)


def _trace_fx(module: torch.nn.Module, args: tuple, kwargs: dict) -> _Traced:
    tracer = fx.Tracer()
    tracer.record_stack_traces = True
    graph = tracer.trace(module)
    gm = fx.GraphModule(tracer.root, graph, type(module).__name__)
    params = list(inspect.signature(module.forward).parameters)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    feeds, inputs = [], {}
    for i, ph in enumerate(placeholders):
        name = str(ph.target).lstrip("*")
        if i < len(args):
            val = args[i]
        elif name in kwargs:
            val = kwargs[name]
        elif ph.args:
            val = ph.args[0]
        else:
            raise InputError(f"no example input for forward() parameter '{name}'")
        feeds.append(val)
        if _named_leaves(name, val):  # tensors, or lists/dicts holding tensors
            inputs[ph] = params[i] if i < len(params) else name
    names = _param_names(module)
    for n in graph.nodes:
        if n.op == "get_attr":
            obj = _fetch_attr(gm, str(n.target))
            if isinstance(obj, torch.Tensor):
                names.setdefault(id(obj), str(n.target))
    return _Traced(gm, feeds, inputs, names, "fx")


def _trace_export(module: torch.nn.Module, args: tuple, kwargs: dict) -> _Traced:
    from torch.export.graph_signature import InputKind, TensorArgument

    with _quiet_torch_logs():
        ep = torch.export.export(module, args, kwargs=kwargs or None, strict=False)
    params = [p.name for p in inspect.signature(module.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    # export makes one placeholder per tensor of (args, kwargs), in this order
    tensors = [leaf for i, a in enumerate(args)
               for leaf in _named_leaves(params[i] if i < len(params) else f"input{i}", a)]
    tensors += [leaf for k, v in kwargs.items() for leaf in _named_leaves(k, v)]
    consts = {**ep.state_dict, **ep.constants}
    feeds, inputs, names = [], {}, {}
    phs = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    k = 0
    for spec in ep.graph_signature.input_specs:
        ph = phs[spec.arg.name]
        if spec.kind != InputKind.USER_INPUT:
            val = consts[spec.target]
            names[id(val)] = spec.target
        elif isinstance(spec.arg, TensorArgument):
            name, val = tensors[k]
            inputs[ph] = name
            k += 1
        else:  # a Python constant (or None) specialized by export
            val = getattr(spec.arg, "value", None)
        feeds.append(val)
    return _Traced(ep.graph_module, feeds, inputs, names, "export", ep.call_spec.out_spec)


def _record(traced: _Traced) -> dict[fx.Node, Any]:
    """Run the traced graph on the example inputs, recording each node's result: the value
    itself for input-independent nodes, a :class:`Meta` (shape, dtype) tree otherwise."""
    dynamic = set(traced.inputs)
    for n in traced.gm.graph.nodes:
        if n.op in ("call_function", "call_method", "call_module") and not is_shape_query(n):
            if any(a in dynamic for a in n.all_input_nodes):
                dynamic.add(n)
        elif n.op == "output":
            dynamic.add(n)
    records: dict[fx.Node, tuple[bool, Any]] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            result = super().run_node(n)
            if n in dynamic:
                records[n] = (True, _meta_tree(result))
            elif n.op in ("get_attr", "placeholder"):
                records[n] = (False, result)
            else:  # an in-place op on an input could change the value later: keep a copy
                records[n] = (False, _clone_tree(result))
            return result

    Recorder(traced.gm).run(*traced.feeds)
    return records


# -- conversion -------------------------------------------------------------------------------
def _convert(module: torch.nn.Module, traced: _Traced, records: dict[fx.Node, Any],
             label: str) -> Graph:
    graph = Graph(legal_name(label))
    graph.meta.update(source=label, frontend=f"torch.{traced.kind}")
    ctx = TorchContext(graph, traced.gm, traced.names)
    problems: list[tuple[str, str | None]] = []
    output_tree: Any = None
    for n in traced.gm.graph.nodes:
        is_dynamic, rec = records.get(n, (False, None))
        if n.op == "placeholder":
            if n in traced.inputs:
                ctx.env[n] = _graph_inputs(ctx, traced.inputs[n], rec)
            else:
                ctx.env[n] = rec
            continue
        if n.op == "output":
            output_tree = fx.node.map_arg(n.args[0], lambda a: ctx.env.get(a, POISON))
            continue
        if not is_dynamic:
            ctx.env[n] = rec
            continue
        if any(ctx.env.get(a) is POISON for a in n.all_input_nodes):
            ctx.env[n] = POISON  # still report ops that have no converter at all
            if find_converter(ctx.gm, n)[0] is None:
                ctx.begin(n, rec, None)
                problems.append(_problem(ctx, n, _no_converter(ctx, n)))
            continue
        try:
            _convert_node(ctx, n, rec)
        except (Unsupported, InferError, UnsupportedError) as e:
            problems.append(_problem(ctx, n, e))
            ctx.env[n] = POISON
        except Exception as e:  # a converter bug or an argument form it does not handle
            log.debug("converting %s failed", n.format_node(), exc_info=True)
            problems.append(_problem(ctx, n, Unsupported(
                f"cannot convert this call ({type(e).__name__}: {e})")))
            ctx.env[n] = POISON
    if problems:
        raise _problems_error(label, problems)
    if traced.out_spec is not None:
        from torch.utils import _pytree

        output_tree = _pytree.tree_unflatten(list(output_tree), traced.out_spec)
    _set_outputs(ctx, output_tree, label)
    _dce(graph)
    return graph


def _graph_inputs(ctx: TorchContext, name: str, rec: Any) -> Any:
    """Graph inputs for a placeholder: one tensor, or the tensors in a list/tuple/dict
    (named ``feats_0``, ``feats_1``, ``cfg_key``... as torch.export names them)."""
    if isinstance(rec, Meta):
        return ctx.graph.add_input(legal_name(name), ctx.tensor_type(rec.shape, rec.dtype))
    if isinstance(rec, (list, tuple)):
        return type(rec)(_graph_inputs(ctx, f"{name}_{i}", r) for i, r in enumerate(rec))
    if isinstance(rec, dict):
        return {k: _graph_inputs(ctx, f"{name}_{k}", r) for k, r in rec.items()}
    return rec


def _convert_node(ctx: TorchContext, n: fx.Node, rec: Any) -> None:
    conv, module = find_converter(ctx.gm, n)
    ctx.begin(n, rec, module)
    if conv is None:
        raise _no_converter(ctx, n)
    args = fx.node.map_arg(n.args, lambda a: ctx.env[a])
    kwargs = fx.node.map_arg(n.kwargs, lambda a: ctx.env[a])
    result = conv(ctx, module, *args, **kwargs) if module is not None else conv(ctx, *args,
                                                                                  **kwargs)
    ctx.env[n] = ctx.finish(result, rec)
    if is_inplace(ctx.gm, n) and n.args and isinstance(n.args[0], fx.Node):
        if _aliased_later(ctx.gm, n, n.args[0]):
            raise Unsupported(
                "an in-place op writes a tensor that shares memory with another tensor used "
                "later (a view or slice); hbc graphs have value semantics",
                hint="use the out-of-place form (x = x.relu() instead of x.relu_())")
        ctx.env[n.args[0]] = ctx.env[n]


def _aliased_later(gm: fx.GraphModule, n: fx.Node, target: fx.Node) -> bool:
    """Does a view of ``target``, or a tensor it is a view of, have a use after ``n``?"""
    pos = _positions(gm)
    root = target
    while is_view(gm, root) and root.args and isinstance(root.args[0], fx.Node):
        root = root.args[0]
    group, todo = set(), [root]
    while todo:  # root and every view of it that exists when n runs
        cur = todo.pop()
        if cur in group:
            continue
        group.add(cur)
        todo.extend(u for u in cur.users if is_view(gm, u) and u.args and u.args[0] is cur
                    and pos[u] < pos[n])
    group.discard(target)
    return any(pos[u] > pos[n] for a in group for u in a.users if u is not n)


_POSITIONS: dict[int, tuple[fx.Graph, dict[fx.Node, int]]] = {}


def _positions(gm: fx.GraphModule) -> dict[fx.Node, int]:
    """Node -> index in the graph (cached for the graph being converted)."""
    hit = _POSITIONS.get(id(gm.graph))
    if hit is None or hit[0] is not gm.graph:
        _POSITIONS.clear()
        hit = (gm.graph, {node: i for i, node in enumerate(gm.graph.nodes)})
        _POSITIONS[id(gm.graph)] = hit
    return hit[1]


def _no_converter(ctx: TorchContext, n: fx.Node) -> Unsupported:
    return Unsupported(f"{describe_target(ctx.gm, n)} is not supported", hint=hint_for(ctx.gm, n))


def _problem(ctx: TorchContext, n: fx.Node, e: Exception) -> tuple[str, str | None]:
    where = ctx.node_name(n)
    src = source_line(n.meta.get("stack_trace") or getattr(n, "stack_trace", None))
    what = describe_target(ctx.gm, n)
    msg = str(e.args[0]) if e.args else str(e)
    if what not in msg:
        msg = f"{what}: {msg}"
    return f"{where}: {msg}" + (f" (at {src})" if src else ""), getattr(e, "hint", None)


def _problems_error(label: str, problems: list[tuple[str, str | None]]) -> UnsupportedError:
    if len(problems) == 1:
        msg, hint = problems[0]
        return UnsupportedError(f"{label}: {msg}", hint=hint)
    lines = [m + (f"  hint: {h}" if h else "") for m, h in problems]
    return UnsupportedError(f"{label}: {len(problems)} nodes cannot be imported:\n  "
                            + "\n  ".join(lines))


def _set_outputs(ctx: TorchContext, tree: Any, label: str) -> None:
    flat: list[tuple[str, Any]] = []

    def walk(obj: Any, name: str, top: bool) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, str(k) if top else f"{name}_{k}", False)
        elif isinstance(obj, (tuple, list)):
            for i, v in enumerate(obj):
                walk(v, f"{name}{i}" if top else f"{name}_{i}", False)
        elif obj is not None:
            flat.append((name, obj))

    walk(tree, "output", True)
    if len(flat) == 1 and not isinstance(tree, (dict, tuple, list)):
        flat = [("output", flat[0][1])]
    outputs: list[Value] = []
    for name, obj in flat:
        if obj is POISON:
            raise UnsupportedError(f"{label}: output '{name}' was not converted")
        if not isinstance(obj, (Value, torch.Tensor)):
            log.info("%s: output '%s' is a Python %s, not a tensor; dropped", label, name,
                     type(obj).__name__)
            continue
        outputs.append(ctx.graph.named_output(ctx.value(obj), name, outputs))
    ctx.graph.set_outputs(outputs)


def _dce(graph: Graph) -> None:
    """Drop nodes and constants nothing uses (e.g. the indices of ``max(dim)`` when unused)."""
    outputs = set(map(id, graph.outputs))
    for node in reversed(list(graph.nodes)):
        if all(not v.uses and id(v) not in outputs for v in node.outputs):
            graph.remove_node(node)
    for v in graph.constant_values():
        if not v.uses and id(v) not in outputs:
            graph.remove_value(v)


# -- helpers ----------------------------------------------------------------------------------
def _split_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise InputError(f"example inputs must be a tensor, a tuple of tensors or a dict of "
                     f"name -> tensor, got {type(example_inputs).__name__}")


def _order_kwargs(module: torch.nn.Module, kwargs: dict, label: str) -> dict:
    """Named example inputs in forward()'s parameter order; unknown names are an error."""
    if not kwargs:
        return kwargs
    params = inspect.signature(module.forward).parameters
    if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        unknown = [k for k in kwargs if k not in params]
        if unknown:
            raise InputError(f"{label}: example input(s) {', '.join(map(repr, unknown))} are not "
                             f"parameters of forward({', '.join(params)})")
    order = list(params)
    return dict(sorted(kwargs.items(),
                       key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))


def _named_leaves(name: str, obj: Any, tensors_only: bool = True) -> list[tuple[str, Any]]:
    """The leaves of a (nested) list/tuple/dict input with names ``name_0``, ``name_key``...;
    with ``tensors_only`` just the tensors. None has no leaves (as in torch's pytree)."""
    if isinstance(obj, (list, tuple)):
        return [p for i, o in enumerate(obj) for p in _named_leaves(f"{name}_{i}", o,
                                                                   tensors_only)]
    if isinstance(obj, dict):
        return [p for k, o in obj.items() for p in _named_leaves(f"{name}_{k}", o, tensors_only)]
    if obj is None or (tensors_only and not isinstance(obj, torch.Tensor)):
        return []
    return [(name, obj)]


def _is_inputs(obj: Any) -> bool:
    return isinstance(obj, (torch.Tensor, tuple, list, dict))


def _describe(obj: Any) -> str:
    if isinstance(obj, (tuple, list)):
        return f"a {type(obj).__name__} of {len(obj)} ({', '.join(type(o).__name__ for o in obj)})"
    return f"a {type(obj).__name__}"


def _param_names(module: torch.nn.Module) -> dict[int, str]:
    names: dict[int, str] = {}
    for name, t in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(t), name)
    for name, t in module.named_buffers(remove_duplicate=False):
        names.setdefault(id(t), name)
    return names


def _fetch_attr(gm: torch.nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _meta_tree(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return Meta(tuple(obj.shape), obj.dtype)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_meta_tree(o) for o in obj) if type(obj) in (tuple, list) else tuple(
            _meta_tree(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _meta_tree(v) for k, v in obj.items()}
    return obj


def _clone_tree(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if type(obj) in (tuple, list):
        return type(obj)(_clone_tree(o) for o in obj)
    if isinstance(obj, tuple):  # torch.return_types structseq
        return tuple(_clone_tree(o) for o in obj)
    return obj


@contextlib.contextmanager
def _quiet_torch_logs() -> Iterator[None]:
    """Silence torch.export's warnings and the partial graphs it prints to stderr on failure
    (the importer reports the failure itself)."""
    names = ("torch.fx.experimental.symbolic_shapes", "torch._export", "torch.export",
             "torch._dynamo", "torch._subclasses.fake_tensor")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for lg, lvl in zip(loggers, levels, strict=True):
            lg.setLevel(lvl)


def _load_python_module(spec: str, target: str) -> Any:
    is_path = target.endswith(".py") or "/" in target or os.sep in target
    try:
        if is_path:
            path = Path(target)
            if not path.is_file():
                raise InputError(f"'{spec}': no such file '{target}'")
            name = "_hbc_user_" + re.sub(r"\W", "_", str(path.resolve()))
            mspec = importlib.util.spec_from_file_location(name, path)
            if mspec is None or mspec.loader is None:
                raise InputError(f"'{spec}': cannot load '{target}' as a Python module")
            mod = importlib.util.module_from_spec(mspec)
            sys.path.insert(0, str(path.resolve().parent))
            try:
                sys.modules[name] = mod
                mspec.loader.exec_module(mod)
            finally:
                sys.path.remove(str(path.resolve().parent))
            return mod
        return importlib.import_module(target)
    except HbcError:
        raise
    except ModuleNotFoundError as e:
        raise InputError(f"'{spec}': cannot import module '{target}': {e}",
                         hint="check the name and that its folder is on PYTHONPATH") from None
    except Exception as e:
        raise InputError(f"'{spec}': importing '{target}' failed: {type(e).__name__}: {e}",
                         hint=user_frame_hint(e)) from None

