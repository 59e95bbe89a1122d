"""Quantization-aware training on the PyTorch side: prepare, calibrate, fold BN, export, convert.

:func:`prepare_qat` traces the model with ``torch.fx`` and fake-quantizes it the way the compiled
integer model quantizes it. Where the integer model quantizes is read from the compiler itself:
the model is imported (``hbc.load``) and optimised (``-O3``: BN folded, conv/linear fused with
their bias, residual add and activation); a fake quantization follows every value lowering
gives a scale of its own (the graph inputs, the outputs of conv_fused / linear / add / pools /
lookup-table ops..., and of concats), so a conv followed by BN, a residual add and a ReLU is
quantized once, after the ReLU, as ``qconv`` computes it. Weights of convs and linears are
fake-quantized per output channel. Module paths are kept, so every activation fake
quantization knows its IR value (``ActFakeQuant.value_name``) and its fx node.

Stages (the float -> calibration -> qat -> int_infer flow of the source documents):

    qat = prepare_qat(model, example_inputs)            # fake quantization, BN unfolded
    calibrate(qat, loader)                              # initial scales (max observer)
    ... train ...; fold_bn(qat, ["backbone.*"])         # fold in steps, output unchanged
    ... train ...; fold_bn(qat, ["heads.*"]) ...
    graph = export_graph(qat, example_inputs)           # calibrated IR graph (learned scales)
    int_model = convert(qat, example_inputs)            # int_infer torch module

:func:`export_graph` rebuilds the float model with the trained parameters (the original
module structure, so the IR names are those of ``hbc.load(model)``), imports and optimises it,
and records each fake quantization's scale on its IR value: a calibrated graph that lowering
(``lower-int``) takes without calibration.
"""

from __future__ import annotations

import copy
import fnmatch
import inspect
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import torch
from torch import fx, nn

from hbc.errors import HbcError, InputError
from hbc.ir.graph import Graph, Value, legal_name
from hbc.ir.types import FLOAT_DTYPES, QuantParams

from .fake_quant import (
    QRANGE,
    ActFakeQuant,
    FusedConvBN,
    WeightFakeQuant,
    decompose,
    foldable_bn,
    insert_after,
    quantize_weights,
    set_module,
)

log = logging.getLogger(__name__)

DEFAULT_QCONFIG: dict[str, Any] = {"activation": "ema", "weight": "minmax", "momentum": 0.01,
                                   "int16": []}


@dataclass
class QATInfo:
    """What a prepared module remembers (its attribute ``hbc_qat``)."""

    march: str
    qconfig: dict[str, Any]
    #: the original module structure on the meta device (export rebuilds the float model)
    template: nn.Module
    input_names: list[str]
    #: number of example inputs (a data batch's first entries are the model inputs)
    num_inputs: int
    #: fx node name of the original trace (``node:part`` for an intermediate) -> path of the
    #: ActFakeQuant that follows it
    fq_by_node: dict[str, str] = field(default_factory=dict)
    #: original parameter/buffer name -> name in the QAT module, where they differ (folded BN)
    param_map: dict[str, str] = field(default_factory=dict)
    #: conv paths folded with their BN
    folded: list[str] = field(default_factory=list)
    calib_samples: int = 0


# -- prepare ----------------------------------------------------------------------------------
def prepare_qat(module: nn.Module, example_inputs: Any, march: str = "bayes",
                qconfig: dict[str, Any] | None = None, *,
                fold_bn: str | Sequence[str] = "none", freeze_bn: bool = True) -> fx.GraphModule:
    """A trainable copy of ``module`` with fake quantization mimicking the integer model.

    ``qconfig``: ``activation`` "ema" (running max, ``momentum``) or "lsq" (learned scales),
    ``weight`` "minmax" (per channel), ``int16`` globs of IR value names kept as int16 (bayes).
    ``fold_bn``: "all", "none" or globs of conv/BN module paths folded now (see :func:`fold_bn`).
    The user's module is not modified.
    """
    cfg = _check_qconfig(qconfig, march)
    float_model = copy.deepcopy(module)
    template = copy.deepcopy(module).to("meta")
    gm = _trace(float_model)
    g0, g3 = _ir_graphs(float_model, example_inputs, march)
    values = quantized_values(g3)
    where = _locate(gm, g0, g3, values)
    params = [p.name for p in inspect.signature(module.forward).parameters.values()]
    args, kwargs = _split(example_inputs)
    info = QATInfo(march, cfg, template, params, len(args) + len(kwargs))
    _insert_fake_quants(gm, where, cfg, info)
    quantize_weights(gm)
    for n in gm.graph.nodes:  # string annotations (``from __future__ import annotations``)
        if isinstance(n.type, str):  # would break pickling the GraphModule (torch.save)
            n.type = None
    gm.hbc_qat = info  # kept by pickling (torch.save) and, via meta, by deepcopy
    gm.meta.setdefault("_user_preserved_attributes", {})["hbc_qat"] = info
    gm.recompile()
    gm.train(module.training)
    if fold_bn != "none":
        _fold(gm, None if fold_bn == "all" else fold_bn, freeze_bn)
    log.info("prepare_qat: %d activation and %d weight fake quantizations (%s, %s)",
             len(where), sum(isinstance(m, WeightFakeQuant) for m in gm.modules()), march,
             cfg["activation"])
    return gm


def _insert_fake_quants(gm: fx.GraphModule, where: dict[str, tuple[str, str]],
                        cfg: dict[str, Any], info: QATInfo) -> None:
    """An ActFakeQuant after each located fx node (decomposing a node first when the value is
    an intermediate of it); records them in ``info.fq_by_node``."""
    int16 = {v for v in where if any(fnmatch.fnmatchcase(v, p) for p in cfg["int16"])}
    nodes = {n.name: n for n in gm.graph.nodes}
    inner: dict[str, fx.Node] = {}  # "node:part" -> the fx node of an intermediate
    for value_name, (node_name, part) in where.items():
        if part and _fq_key(node_name, part) not in inner:
            pair = decompose(gm, nodes[node_name], part)
            if pair is None:
                raise HbcError(f"prepare_qat: %{value_name} is a {part} inside fx node "
                               f"{node_name}, which cannot be fake-quantized there")
            inner[_fq_key(node_name, part)], nodes[node_name] = pair
    for value_name, (node_name, part) in where.items():
        key = _fq_key(node_name, part)
        fq = ActFakeQuant(value_name, key, cfg["activation"],
                          "i16" if value_name in int16 else "i8", cfg["momentum"])
        target = inner[key] if part else nodes[node_name]
        info.fq_by_node[key] = insert_after(gm, target, fq, "qat_act", value_name)


def fold_bn(qat_module: nn.Module, scope: str | Sequence[str] | None = None, *,
            freeze_bn: bool = True) -> nn.Module:
    """Fold conv + BN pairs of a prepared module into :class:`FusedConvBN` (in place).

    ``scope``: globs matched against the conv or BN module path (None: every pair), e.g. the
    backbone first and the heads in a second step. The parameters stay the same objects (an
    optimizer keeps working); in eval mode the output is unchanged up to float rounding, since
    per-channel symmetric quantization commutes with the per-channel BN factor.
    ``freeze_bn``: train on the running statistics (the deployed computation) instead of
    batch statistics. Returns the module; wrap it in DDP again afterwards.
    """
    _fold(_unwrap(qat_module), scope, freeze_bn)
    return qat_module


def _fold(gm: fx.GraphModule, scope: str | Sequence[str] | None, freeze_bn: bool) -> None:
    info = _info(gm)
    globs = [scope] if isinstance(scope, str) else list(scope or ["*"])
    calls: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[str(n.target)] = calls.get(str(n.target), 0) + 1
    count = 0
    for bn_node in list(gm.graph.nodes):
        pair = foldable_bn(gm, bn_node, calls)
        if pair is None:
            continue
        conv_node, conv, bn = pair
        cpath, bpath = str(conv_node.target), str(bn_node.target)
        if not any(fnmatch.fnmatchcase(p, g) for g in globs for p in (cpath, bpath)):
            continue
        fused = FusedConvBN(conv, bn, freeze_bn=freeze_bn).train(gm.training)
        set_module(gm, cpath, fused)
        bn_node.replace_all_uses_with(conv_node)
        gm.graph.erase_node(bn_node)
        gm.delete_submodule(bpath)
        for name, _ in chain(bn.named_parameters(), bn.named_buffers()):
            info.param_map[f"{bpath}.{name}"] = f"{cpath}.bn.{name}"
        info.folded.append(cpath)
        count += 1
    gm.recompile()
    log.info("fold_bn: folded %d conv+BN pairs (scope %s)", count, ", ".join(globs))


# -- calibrate --------------------------------------------------------------------------------
def calibrate(module: nn.Module, data: Iterable[Any], num_batches: int | None = None) -> nn.Module:
    """Initialise the activation scales of a prepared module from data (max observer).

    ``data``: an iterable of batches (a tensor, a tuple/list whose first entries are the model
    inputs, e.g. ``(images, labels)``, or a dict of forward() arguments), a
    ``torch.utils.data.DataLoader`` included. Runs in eval mode without gradients and without
    fake quantization (as float calibration does), then sets every scale to max / qmax and
    restores the module's mode; training continues from these scales.
    """
    gm = _unwrap(module)
    info = _info(gm)
    acts = [m for m in gm.modules() if isinstance(m, ActFakeQuant)]
    weights = [m for m in gm.modules() if isinstance(m, WeightFakeQuant)]
    was_training = gm.training
    gm.eval()
    for fq in acts:
        fq.calibrating, fq.cal_amax = True, None
    for wq in weights:
        wq.enabled = False
    samples = 0
    try:
        with torch.no_grad():
            for i, batch in enumerate(data):
                if num_batches is not None and i >= num_batches:
                    break
                args, kwargs = _batch_args(batch, info)
                gm(*args, **kwargs)
                first = next(chain(args, kwargs.values()), None)
                samples += int(first.shape[0]) if isinstance(first, torch.Tensor) and \
                    first.dim() > 0 else 1
    finally:
        for fq in acts:
            fq.calibrating = False
        for wq in weights:
            wq.enabled = True
        gm.train(was_training)
    for fq in acts:
        if fq.cal_amax is None:
            log.warning("calibrate: %%%s was never computed", fq.value_name)
        else:
            fq.set_range(fq.cal_amax)
            fq.cal_amax = None
    info.calib_samples += samples
    return module


# -- export and convert -----------------------------------------------------------------------
def export_graph(qat_module: nn.Module, example_inputs: Any) -> Graph:
    """The calibrated IR graph of a QAT model: float (BN folded as trained, fused, -O3) with
    each learned activation scale recorded on its IR value, and
    ``graph.meta["calibration"] = {"method": "qat", ...}``."""
    gm = _unwrap(qat_module)
    info = _info(gm)
    float_model = _float_model(gm, info)
    g0, g3 = _ir_graphs(float_model, example_inputs, info.march)
    values = quantized_values(g3)
    where = _locate(_trace(float_model), g0, g3, values)
    modules = dict(gm.named_modules())
    int16: list[str] = []
    for name in values:
        path = info.fq_by_node.get(_fq_key(*where[name]))
        fq = modules.get(path) if path else None
        if not isinstance(fq, ActFakeQuant):
            raise HbcError(f"export_graph: %{name} (fx node {where[name][0]}) has no fake "
                           "quantization in the QAT module",
                           hint="prepare the module again with hbc.quant.prepare_qat")
        if not bool(fq.initialized):
            raise HbcError(f"export_graph: the scale of %{name} was never set",
                           hint="run hbc.quant.calibrate(module, data) or train first")
        scale = float(fq.scale.detach().abs().double())
        if fq.dtype == "i16":  # lowering records int16 values at the int8 scale a / 127
            scale = scale * QRANGE["i16"][1] / 127
            int16.append(name)
        g3.set_quant(g3.value(name), QuantParams((float(torch.tensor(scale).float()),)))
    g3.meta["calibration"] = {"method": "qat", "samples": info.calib_samples,
                              "activation": info.qconfig["activation"]}
    if int16:
        g3.meta["int16_values"] = int16
    return g3


def convert(qat_module: nn.Module, example_inputs: Any, **lower_options: Any) -> nn.Module:
    """The int_infer module of a QAT model: :func:`export_graph`, ``lower-int`` (options:
    ``high_precision_output``...) and :func:`hbc.quant.int_infer.build_int_infer`."""
    from hbc import passes
    from hbc.quant.int_infer import build_int_infer

    info = _info(_unwrap(qat_module))
    graph = export_graph(qat_module, example_inputs)
    lowered = passes.run(graph, passes=[("lower-int", {"march": info.march, **lower_options})],
                         march=info.march)
    return build_int_infer(lowered)


# -- where the integer model quantizes ----------------------------------------------------------
def quantized_values(graph: Graph) -> list[str]:
    """Names of the values of an optimised float graph that get a scale of their own: float
    graph inputs, float outputs of nodes that do not pass their input's scale through, and
    concats of several tensors (lowering requantizes their inputs to the output's scale)."""
    from hbc.passes.lower_rules import passes_scale

    names = [v.name for v in graph.inputs if v.dtype in FLOAT_DTYPES]
    for node in graph.nodes:
        live = [v for v in node.inputs if v is not None and not v.is_const]
        if not live:
            continue
        if not passes_scale(node) or (node.op == "concat" and len(live) > 1):
            names += [v.name for v in node.outputs if v.dtype in FLOAT_DTYPES]
    return list(dict.fromkeys(names))


def _ir_graphs(model: nn.Module, example_inputs: Any, march: str) -> tuple[Graph, Graph]:
    """The imported graph and its -O3 form (what lowering sees)."""
    import hbc
    from hbc import passes

    g0 = hbc.load((model, example_inputs))
    return g0, passes.run(g0, opt=3, march=march)


def _locate(gm: fx.GraphModule, g0: Graph, g3: Graph,
            names: list[str]) -> dict[str, tuple[str, str]]:
    """IR value name (of ``g3``) -> (fx node of ``gm``, part) after which it is quantized
    (part: "" for the node's result, else an intermediate of the node, see _fx_results).

    A value of the optimised graph keeps the name of the last value of what was fused into it
    (the activation after conv+BN+add+relu); a folded BN's output is the conv's output, so the
    quantization moves past the BN. IR nodes carry the torch module path as their location;
    a module called several times is matched call by call.
    """
    results = _fx_results(gm, g0)
    inputs = {legal_name(str(n.target).lstrip("*")): (n.name, "") for n in gm.graph.nodes
              if n.op == "placeholder"}
    out: dict[str, tuple[str, str]] = {}
    problems = []
    for name in names:
        if not g0.has_value(name):
            problems.append(f"%{name} (made by an optimisation pass)")
            continue
        v = _past_folded_bn(g0.value(name), g3)
        node = inputs.get(v.name) if v in g0.inputs else results.get(v.name)
        if node is None:
            where = v.producer.where() if v.producer is not None else "graph input"
            problems.append(f"%{name} ({where})")
        else:
            out[name] = node
    if problems:
        raise HbcError("prepare_qat: cannot place the fake quantization of "
                       + ", ".join(problems), hint="a module called several times in a row, "
                       "or an op whose result is split over IR nodes; call distinct modules")
    return out


def _past_folded_bn(v: Value, g3: Graph) -> Value:
    """``v``, or the output of the BN that reads it when fold-bn folded that BN away."""
    while len(v.uses) == 1:
        user, index = v.uses[0]
        if user.op != "batch_norm" or index != 0 or g3.has_value(user.outputs[0].name):
            break
        v = user.outputs[0]
    return v


def _fx_results(gm: fx.GraphModule, g0: Graph) -> dict[str, tuple[str, str]]:
    """IR value name -> (fx node name, part) for the values computed by input-dependent fx
    nodes: part "" for the node's result, the IR op for a value inside its expansion (the
    sigmoid of a SiLU)."""
    from hbc.frontend.torch_ops.context import TorchContext

    dynamic: set[fx.Node] = set()
    by_key: dict[str, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op == "placeholder" or any(a in dynamic for a in n.all_input_nodes):
            dynamic.add(n)
            if n.op.startswith("call_"):
                by_key.setdefault(TorchContext.node_name(n), []).append(n)
    runs: dict[str, list[list]] = {}  # loc -> runs of consecutive IR nodes with that loc
    prev = None
    for node in g0.nodes:
        if prev is not None and prev.loc == node.loc:
            runs[node.loc][-1].append(node)
        else:
            runs.setdefault(node.loc, []).append([node])
        prev = node
    out: dict[str, tuple[str, str]] = {}
    for key, calls in by_key.items():
        found = runs.get(key, [])
        if len(found) != len(calls):  # consecutive calls of one module: one IR node per call?
            found = [[node] for run in found for node in run]
        if len(found) != len(calls):
            continue
        for n, run in zip(calls, found, strict=True):
            for node in run:
                if len(node.outputs) == 1:
                    out[node.outputs[0].name] = (n.name, "" if node is run[-1] else node.op)
    return out


def _fq_key(node: str, part: str) -> str:
    return f"{node}:{part}" if part else node


# -- building blocks --------------------------------------------------------------------------
def _trace(module: nn.Module) -> fx.GraphModule:
    """fx-trace ``module`` as the torch importer does (same node names)."""
    tracer = fx.Tracer()
    graph = tracer.trace(module)
    return fx.GraphModule(tracer.root, graph, type(module).__name__)


def _float_model(gm: fx.GraphModule, info: QATInfo) -> nn.Module:
    """The original module structure holding the QAT module's current parameters/buffers."""
    model = copy.deepcopy(info.template).to_empty(device="cpu")
    src = dict(chain(gm.named_parameters(remove_duplicate=False),
                     gm.named_buffers(remove_duplicate=False)))
    with torch.no_grad():
        for name, t in chain(model.named_parameters(), model.named_buffers()):
            s = src.get(info.param_map.get(name, name))
            if s is None:  # a module forward() never calls
                t.zero_()
            else:
                t.copy_(s.detach().to("cpu", t.dtype))
    return model.eval()


def _unwrap(module: nn.Module) -> fx.GraphModule:
    inner = getattr(module, "module", None)
    return inner if isinstance(inner, fx.GraphModule) else module  # DDP / DataParallel


def _info(gm: Any) -> QATInfo:
    info = getattr(gm, "hbc_qat", None) if isinstance(gm, fx.GraphModule) else None
    if info is None:
        raise InputError(f"{type(gm).__name__} is not a module prepared by "
                         "hbc.quant.prepare_qat", hint="call prepare_qat(module, inputs) first")
    return info


def _check_qconfig(qconfig: dict[str, Any] | None, march: str) -> dict[str, Any]:
    from hbc.backend.march import load_march

    try:
        arch = load_march(march)
    except InputError as e:
        raise InputError(f"prepare_qat: {e}") from None
    cfg = {**DEFAULT_QCONFIG, **(qconfig or {})}
    unknown = sorted(set(cfg) - set(DEFAULT_QCONFIG))
    if unknown:
        raise InputError(f"prepare_qat: unknown qconfig key(s) {', '.join(unknown)} "
                         f"(keys: {', '.join(DEFAULT_QCONFIG)})")
    if cfg["activation"] not in ("ema", "lsq"):
        raise InputError(f"prepare_qat: activation '{cfg['activation']}': expected ema or lsq")
    if cfg["weight"] != "minmax":
        raise InputError(f"prepare_qat: weight '{cfg['weight']}': expected minmax (per "
                         "channel max, as the compiler quantizes weights)")
    cfg["int16"] = [cfg["int16"]] if isinstance(cfg["int16"], str) else list(cfg["int16"])
    if cfg["int16"] and not arch.int16:
        raise InputError(f"prepare_qat: int16 values requested but march {march} has int8 "
                         "activations only", hint="target bayes or drop qconfig['int16']")
    return cfg


def _split(example_inputs: Any) -> tuple[tuple, dict]:
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


def _batch_args(batch: Any, info: QATInfo) -> tuple[tuple, dict]:
    """Model arguments of a data batch: a tensor, the first inputs of a tuple, or a dict."""
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, dict):
        return (), {k: v for k, v in batch.items() if k in info.input_names}
    if isinstance(batch, (tuple, list)):
        return tuple(batch[: info.num_inputs]), {}
    raise InputError(f"calibrate: a batch is a {type(batch).__name__}; expected a tensor, a "
                     "tuple/list of tensors or a dict")
