"""The lowering rules of ``lower-int``: one small function per integer form, dispatched through
:data:`RULES` by the ``integer`` slot of the float op's declaration.

A rule emits the integer op that replaces a float node (through the :class:`LowerContext`) and
returns None, or returns a reason and emits nothing, which makes the node a CPU fallback. The
arithmetic of each rule is docs/quantization.md: multipliers ``m`` become ``choose(m)``, clamp
bounds come from :func:`activation_bounds`, a conv's residual is brought to the accumulator's
scale by :func:`residual_rescale`. The rules of the table-driven ops (lut, qsoftmax,
qresize, qgrid_sample) live with their table builders in ``lower_tables.py``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from hbc.backend.march import load_march
from hbc.errors import InputError
from hbc.ir.fixed_point import FixedPointError, choose, choose_shared, rounding_term
from hbc.ir.graph import Node, Value
from hbc.ir.registry import get_op
from hbc.ir.types import QuantParams

from .lower_context import (
    INT16_RESCALE,
    RANGES,
    LowerContext,
    out_attrs,
    qscale,
    quantize_weight,
    rescaled_attrs,
)
from .lower_tables import (
    emit_lut,
    lower_bilinear_resize,
    lower_grid_sample,
    lower_lut,
    lower_softmax,
)

log = logging.getLogger(__name__)

Rule = Callable[[LowerContext, Node], "str | None"]
#: ops whose output may be an int32 graph output (option high_precision_output)
HIGH_PRECISION_OPS = ("conv", "conv_fused", "linear")


def _i32(values) -> np.ndarray:
    return np.asarray(values, dtype=np.int32)


def _rhe(x: float) -> int:
    return int(np.rint(x))


def activation_bounds(attrs: dict[str, Any], s_y: float, dtype: str) -> tuple[int, int]:
    """(lo, hi) of a fused activation on outputs of scale ``s_y`` (docs: "Activations")."""
    lo, hi = RANGES[dtype]
    act = attrs.get("activation", "none")
    if act == "relu":
        lo = 0
    elif act == "relu6":
        lo, hi = 0, min(hi, _rhe(6 / s_y))
    elif act == "clip":
        a, b = attrs["clip_min"], attrs["clip_max"]
        if a != -math.inf:
            lo = min(max(lo, _rhe(a / s_y)), hi)
        if b != math.inf:
            hi = max(min(hi, _rhe(b / s_y)), RANGES[dtype][0])
    return lo, hi


def passes_scale(node: Node) -> bool:
    """Does the node run on integers as they are (its output scale is its input's)?"""
    form = node.opdef.integer
    return form == "native" or (node.op == "resize" and node.attrs["mode"] == "nearest")


def _requantize(lc: LowerContext, v: Value, s_y: float, dtype: str, base: str) -> Value:
    """``v`` rescaled to scale ``s_y`` and ``dtype`` (v itself when it already is)."""
    if qscale(v) == s_y and v.dtype == dtype:
        return v
    m, s = choose(qscale(v) / s_y, f"{base}: requantize of %{v.name}")
    node = lc.dst.add_node("requantize", [v], {"m": m, "s": s, **out_attrs(dtype)},
                           name=lc.aux_node_name(f"{base}.requantize"),
                           output_names=[lc.aux_name(f"{v.name}.rq")], loc=base)
    lc.dst.set_quant(node.outputs[0], QuantParams((s_y,)))
    return node.outputs[0]


def _widened(lc: LowerContext, v: Value, base: str) -> Value:
    """An int8 addend requantized to int16 over the same range (its multiplier in a shared
    shift shrinks ~258 times).

    Terms that share one output share one shift, picked for the largest multiplier. An int8
    term's multiplier is ~258 times an int16 term's, so sharing with an int16 term would leave
    the int16 term a multiplier of a few bits (a gain error of up to 1/(2M)), or none."""
    return _requantize(lc, v, qscale(v) * INT16_RESCALE, "i16", base) if v.dtype == "i8" else v


# -- conv and linear ----------------------------------------------------------------------------
def _weighted(lc: LowerContext, node: Node, w: np.ndarray, b: np.ndarray | None,
              wname: str, bname: str) -> tuple[Value, Value, Value | None, np.ndarray]:
    """(x as integers, int8 weight constant, int32 bias constant or None, s_x * s_w)."""
    x = lc.as_int(node.inputs[0])
    wv_in = node.inputs[1]  # scales recorded on the weight itself (absorb-qdq), not on a gemm's
    for what, arr, name in (("weight", w, wv_in.name), ("bias", b, bname)):
        if arr is not None and not np.isfinite(arr).all():  # else a silently broken scale
            at = tuple(int(i) for i in np.argwhere(~np.isfinite(arr))[0])
            raise InputError(f"the {what} %{name} holds {arr[at]} at index {list(at)}: NaN "
                             "and Inf have no integer form",
                             hint="fix the model's weights (a diverged training run?)")
    wq, sw = quantize_weight(w, wv_in.type.quant if w is lc.const_array(wv_in) else None)
    sxw = qscale(x) * sw
    wv = lc.add_const(wname, wq, QuantParams(tuple(sw), axis=0), own=True)
    bv = None
    if b is not None:
        bq = np.rint(b.astype(np.float64) / sxw)
        if np.abs(bq).max(initial=0) > RANGES["i32"][1]:
            log.warning("%s: the bias saturates int32 at scale s_x * s_w (s_x = %g): the "
                        "input's scale is tiny for its weights", node.where(), qscale(x))
        bq = np.clip(bq, *RANGES["i32"])
        bv = lc.add_const(bname, bq.astype(np.int32), QuantParams(tuple(sxw), axis=0), own=True)
    return x, wv, bv, sxw


def _rescale(lc: LowerContext, node: Node, sxw: np.ndarray, channel_axis: int,
             s_y: float | None = None, dtype: str | None = None, act: bool = True
             ) -> dict[str, Any]:
    """m, s constants, bounds, out dtype and output quant of a conv/linear node: the
    accumulator (scale ``s_x * s_w[c]``) to the output's scale (``s_y``, ``dtype``: the
    node's output unless given; ``act``: its activation's bounds)."""
    y = node.outputs[0]
    c = len(sxw)
    if y.name in lc.high_precision:
        quant = QuantParams(tuple(sxw), axis=channel_axis)
        return {"m": _i32(np.ones(c)), "s": _i32(np.zeros(c)), **out_attrs("i32"),
                "quant": quant}
    s_y = lc.act_scale(y) if s_y is None else s_y
    dtype = lc.out_dtype(y) if dtype is None else dtype
    pairs = [choose(float(v) / s_y, f"{node.name} channel {i}") for i, v in enumerate(sxw)]
    lo, hi = activation_bounds(node.attrs, s_y, dtype) if act else RANGES[dtype]
    return {"m": _i32([p[0] for p in pairs]), "s": _i32([p[1] for p in pairs]),
            **out_attrs(dtype, lo, hi), "quant": QuantParams((s_y,))}


def residual_rescale(node: Node, x_dtype: str, wq: np.ndarray, bq: np.ndarray | None,
                     sxw: np.ndarray, r_dtype: str, s_r: float
                     ) -> tuple[np.ndarray, np.ndarray] | str:
    """``(mr, sr)`` per channel that bring a residual of scale ``s_r`` to the accumulator's
    scale ``s_x * s_w[c]`` (``choose(s_r / (s_x * s_w[c]))``), or the reason the residual
    cannot be fused: a ratio that needs ``M > 32767`` even at shift 0, or a sum that could
    leave the accumulator (docs/quantization.md: ``|x| * ||w[c]||_1 + |b[c]|`` plus the
    residual term's bound, below 2^31 for int8 inputs; int16 inputs accumulate in int64)."""
    mr, sr = [], []
    for c, v in enumerate(sxw):
        ratio = s_r / float(v)
        try:
            m, s = choose(ratio, f"{node.name} residual channel {c}")
        except FixedPointError:
            return (f"the residual's scale is {ratio:.6g} times the accumulator's (channel "
                    f"{c}), beyond the 16-bit multiplier at shift 0")
        mr.append(m)
        sr.append(s)
    mr_a, sr_a = np.asarray(mr, np.int64), np.asarray(sr, np.int64)
    if x_dtype == "i8":
        x_max, r_max = -RANGES["i8"][0], -RANGES[r_dtype][0]
        l1 = np.abs(wq.astype(np.int64)).reshape(len(sxw), -1).sum(axis=1)
        acc = x_max * l1 + (0 if bq is None else np.abs(bq.astype(np.int64)))
        term = ((r_max * np.abs(mr_a) + rounding_term(sr_a)) >> sr_a) + 1
        top = int((acc + term).max())
        if top > RANGES["i32"][1]:
            return (f"conv plus residual could reach {top} in the accumulator, beyond int32 "
                    f"({RANGES['i32'][1]})")
    return _i32(mr_a), _i32(sr_a)


def lower_conv(lc: LowerContext, node: Node) -> str | None:
    """conv / conv_fused -> qconv(x, w, m, s, b?, r?, mr?, sr?); a residual that cannot be
    fused (:func:`residual_rescale`) -> qconv then qadd."""
    w, b = lc.const_array(node.inputs[1]), lc.const_array(_opt(node, 2))
    if w is None or (_opt(node, 2) is not None and b is None):
        return "weights or bias are not constants"
    rf = _opt(node, 3)
    x, wv, bv, sxw = _weighted(lc, node, w, b, node.inputs[1].name,
                               _opt(node, 2).name if b is not None else "")
    channel_axis = node.outputs[0].type.rank - 1 if node.attrs["layout"] == "NHWC" else 1
    qdef = get_op("qconv")
    attrs = {a.name: node.attrs[a.name] for a in qdef.attrs if a.name in node.attrs}
    r = mr = sr = None
    if rf is not None:
        r = lc.as_int(rf)
        fused = residual_rescale(node, x.dtype, lc.dst.constants[wv.name],
                                 None if bv is None else lc.dst.constants[bv.name], sxw,
                                 r.dtype, qscale(r))
        if isinstance(fused, str):
            lc.explain(node, f"{fused}: the residual add is not fused (qconv, then qadd)")
            _unfused_residual(lc, node, (x, wv, bv), attrs, sxw, channel_axis, r)
            return None
        mr, sr = (lc.add_const(f"{node.name}.{k}", a) for k, a in (("mr", fused[0]),
                                                                     ("sr", fused[1])))
    rs = _rescale(lc, node, sxw, channel_axis)
    attrs.update({k: rs[k] for k in ("lo", "hi", "out_dtype")})
    m, s = (lc.add_const(f"{node.name}.{k}", rs[k]) for k in ("m", "s"))
    lc.emit(node, "qconv", _trim([x, wv, m, s, bv, r, mr, sr]), attrs, [rs["quant"]])
    return None


def _unfused_residual(lc: LowerContext, node: Node, xwb: tuple[Value, Value, Value | None],
                      attrs: dict[str, Any], sxw: np.ndarray, channel_axis: int, r: Value
                      ) -> None:
    """``y = act(conv + r)`` as a qconv to an intermediate ``z`` (node ``name.conv``) and a
    qadd(z, r) with the activation's bounds (the node's name, as it computes the output).
    ``z`` covers the range ``A_y + A_r`` (y's and r's ranges): where z saturates, ``z + r`` is
    beyond y's range anyway, so y saturates (or is clamped by the activation) just as without
    the intermediate. ``z`` is int16 where the march allows (the residual is then widened to
    int16 too, for the qadd's shared shift), else int8."""
    y = node.outputs[0]
    s_y, y_dtype = lc.act_scale(y), lc.out_dtype(y)
    z_dtype = "i16" if load_march(lc.march).int16 else "i8"
    # magnitudes of the most negative values: then z + r is past y's range at either end
    reach = -s_y * RANGES[y_dtype][0] - qscale(r) * RANGES[r.dtype][0]
    s_z = reach / RANGES[z_dtype][1]
    rs = _rescale(lc, node, sxw, channel_axis, s_z, z_dtype, act=False)
    m, s = (lc.add_const(f"{node.name}.{k}", rs[k]) for k in ("m", "s"))
    x, wv, bv = xwb
    # the node's name goes to the qadd, which computes its output
    conv = lc.dst.add_node("qconv", _trim([x, wv, m, s, bv]),
                           attrs | {k: rs[k] for k in ("lo", "hi", "out_dtype")},
                           name=lc.aux_node_name(f"{node.name}.conv"), loc=node.loc,
                           output_names=[lc.aux_name(f"{y.name}.conv")])
    z = conv.outputs[0]
    lc.dst.set_quant(z, rs["quant"])
    if z_dtype == "i16":
        r = _widened(lc, r, node.name)
    _emit_qadd(lc, node, z, r, s_y, y_dtype, activation_bounds(node.attrs, s_y, y_dtype))


def lower_linear(lc: LowerContext, node: Node) -> str | None:
    """linear -> qlinear(x, w, m, s, b?); gemm(x, B, c) as x @ (alpha*B')^T + beta*c."""
    w, b = lc.const_array(node.inputs[1]), lc.const_array(_opt(node, 2))
    if w is None or (_opt(node, 2) is not None and b is None):
        return "weights or bias are not constants"
    if node.op == "gemm":
        if node.attrs["trans_a"]:
            return "gemm with trans_a has no qlinear form"
        w = node.attrs["alpha"] * (w.astype(np.float64) if node.attrs["trans_b"]
                                   else w.astype(np.float64).T)
        if b is not None:
            if b.size not in (1, w.shape[0]) or b.ndim > 1 and b.shape[0] != 1:
                return f"gemm bias {list(b.shape)} is not one value per output feature"
            b = node.attrs["beta"] * np.broadcast_to(b.reshape(-1), (w.shape[0],))
    x, wv, bv, sxw = _weighted(lc, node, w, b, node.inputs[1].name,
                               _opt(node, 2).name if b is not None else "")
    rs = _rescale(lc, node, sxw, node.outputs[0].type.rank - 1)
    m, s = (lc.add_const(f"{node.name}.{k}", rs[k]) for k in ("m", "s"))
    attrs = {"lo": rs["lo"], "hi": rs["hi"], "out_dtype": rs["out_dtype"]}
    lc.emit(node, "qlinear", _trim([x, wv, m, s, bv]), attrs, [rs["quant"]])
    return None


def _opt(node: Node, i: int) -> Value | None:
    return node.inputs[i] if i < len(node.inputs) else None


def _trim(inputs: list) -> list:
    while inputs and inputs[-1] is None:
        inputs.pop()
    return inputs


# -- elementwise --------------------------------------------------------------------------------
def lower_add(lc: LowerContext, node: Node) -> str | None:
    """add / sub -> qadd with (ma, mb), s = choose_shared(s_a/s_y, s_b/s_y); sub negates mb."""
    y = node.outputs[0]
    s_y, dtype = lc.act_scale(y), lc.out_dtype(y)
    a, b = (lc.as_int(v) for v in node.inputs)
    if dtype == "i16":
        a, b = _widened(lc, a, node.name), _widened(lc, b, node.name)
    _emit_qadd(lc, node, a, b, s_y, dtype, negate_b=node.op == "sub")
    return None


def _emit_qadd(lc: LowerContext, node: Node, a: Value, b: Value, s_y: float, dtype: str,
               bounds: tuple[int | None, int | None] = (None, None), negate_b: bool = False
               ) -> None:
    """``node``'s output as qadd(a, b): (ma, mb), s = choose_shared(s_a/s_y, s_b/s_y), mb
    negated for a subtraction, clamped to ``bounds`` (None: the range of ``dtype``)."""
    (ma, mb), s = choose_shared([qscale(a) / s_y, qscale(b) / s_y], node.name)
    attrs = {"ma": ma, "mb": -mb if negate_b else mb, "s": s, **out_attrs(dtype, *bounds)}
    lc.emit(node, "qadd", [a, b], attrs, [QuantParams((s_y,))])


def _silu_input(node: Node) -> Value | None:
    """x when ``node`` is mul(x, sigmoid(x)) (either order), else None."""
    for i in (0, 1):
        sig, other = node.inputs[i], node.inputs[1 - i]
        p = sig.producer
        if p is not None and p.op == "sigmoid" and p.inputs[0] is other:
            return other
    return None


def lower_mul(lc: LowerContext, node: Node) -> str | None:
    """mul -> qmul with choose(s_a*s_b/s_y); mul(x, sigmoid(x)) (SiLU) -> one lut."""
    x = _silu_input(node)
    if x is not None:
        def silu(a: np.ndarray) -> np.ndarray:
            sig = get_op("sigmoid").reference([a], {})[0]
            return get_op("mul").reference([a, sig], {})[0]
        return emit_lut(lc, node, x, silu)
    a, b = (lc.as_int(v) for v in node.inputs)
    y = node.outputs[0]
    s_y, dtype = lc.act_scale(y), lc.out_dtype(y)
    m, s = choose(qscale(a) * qscale(b) / s_y, node.name)
    lc.emit(node, "qmul", [a, b], {"m": m, "s": s, **out_attrs(dtype)},
            [QuantParams((s_y,))])
    return None


# -- pools and resampling -----------------------------------------------------------------------
def lower_avg_pool(lc: LowerContext, node: Node) -> str | None:
    """avg_pool -> qavg_pool: window sum times choose(s_x / (s_y * kernel size))."""
    a = node.attrs
    n = len(a["kernel"])
    if not a["count_include_pad"] and any(a["pads"]):
        return "avg_pool with count_include_pad=0 and padding divides by a varying count"
    shape = node.inputs[0].shape
    spatial = shape[1:-1] if a["layout"] == "NHWC" else shape[2:]
    out = node.outputs[0].shape[1:-1] if a["layout"] == "NHWC" else node.outputs[0].shape[2:]
    for d in range(n):
        reach = (out[d] - 1) * a["strides"][d] + (a["kernel"][d] - 1) * a["dilations"][d] + 1
        if reach > spatial[d] + a["pads"][d] + a["pads"][n + d]:
            return "avg_pool with ceil_mode has partial windows that divide by a smaller count"
    x = lc.as_int(node.inputs[0])
    attrs = {k: a[k] for k in ("kernel", "strides", "pads", "dilations", "ceil_mode", "layout")}
    attrs.update(rescaled_attrs(lc, node, x, math.prod(a["kernel"])))
    lc.emit(node, "qavg_pool", [x], attrs, [QuantParams((lc.act_scale(node.outputs[0]),))])
    return None


def lower_global_avg_pool(lc: LowerContext, node: Node) -> str | None:
    """global_avg_pool -> qglobal_avg_pool with choose(s_x / (s_y * H*W)); reduce_mean over
    exactly the spatial axes likewise (followed by a reshape when keepdims=0)."""
    xf = node.inputs[0]
    layout = node.attrs.get("layout") or ("NHWC" if xf.type.layout == "NHWC" else "NCHW")
    spatial = list(range(1, xf.type.rank - 1) if layout == "NHWC" else range(2, xf.type.rank))
    if node.op == "reduce_mean":
        axes = sorted(a % xf.type.rank for a in node.attrs["axes"] or range(xf.type.rank))
        if xf.type.rank < 3 or axes != spatial:
            return f"reduce_mean over axes {node.attrs['axes']} is not a global average pool"
    x = lc.as_int(xf)
    count = math.prod(xf.shape[a] for a in spatial)
    attrs = {"layout": layout, **rescaled_attrs(lc, node, x, count)}
    y = node.outputs[0]
    quant = QuantParams((lc.act_scale(y),))
    if node.op == "reduce_mean" and not node.attrs["keepdims"]:
        pool = lc.dst.add_node("qglobal_avg_pool", [x], attrs, name=lc.aux_node_name(
            f"{node.name}.pool"), loc=node.loc, output_names=[lc.aux_name(f"{y.name}.pool")])
        lc.dst.set_quant(pool.outputs[0], quant)
        lc.emit(node, "reshape", [pool.outputs[0]], {"shape": list(y.shape)}, [quant])
    else:
        lc.emit(node, "qglobal_avg_pool", [x], attrs, [quant])
    return None


def lower_resize(lc: LowerContext, node: Node) -> str | None:
    """resize: nearest runs on the integers; bilinear over H, W -> qresize with tables."""
    if node.attrs["mode"] == "nearest":
        return lower_native(lc, node)
    return lower_bilinear_resize(lc, node)


# -- ops that run on the integers as they are ---------------------------------------------------
def lower_native(lc: LowerContext, node: Node) -> str | None:
    """The same op on the integers; the output keeps the input's scale. Concat requantizes
    inputs of other scales; clip, pad and resize get their float constants in integer units."""
    inputs = [None if v is None else lc.as_int(v) for v in node.inputs]
    data = [v for v in inputs if v is not None and v.type.quant is not None]
    if not data:
        return lower_plain(lc, node)
    attrs = dict(node.attrs)
    if node.op == "concat":
        inputs = _concat_inputs(lc, node, inputs, data)
    x = inputs[0]
    s_x = qscale(x)
    if node.op == "clip":
        attrs["min"] = attrs["min"] if math.isinf(attrs["min"]) else _rhe(attrs["min"] / s_x)
        attrs["max"] = attrs["max"] if math.isinf(attrs["max"]) else _rhe(attrs["max"] / s_x)
    elif node.op == "pad":
        attrs["value"] = _integer_constant(attrs["value"], x)
    elif node.op == "resize":
        attrs["extrapolation_value"] = _integer_constant(attrs["extrapolation_value"], x)
    try:
        types = get_op(node.op).infer([None if v is None else v.type for v in inputs],
                                      get_op(node.op).normalize_attrs(attrs))
    except InputError as e:
        return f"{node.op} does not run on {x.dtype} integers ({e})"
    scales = [QuantParams((s_x,)) if t.dtype == x.dtype else None for t in types]
    lc.emit(node, node.op, inputs, attrs, scales)
    return None


def _concat_inputs(lc: LowerContext, node: Node, inputs: list[Value | None],
                   data: list[Value]) -> list[Value | None]:
    """The inputs of a concat at its output's scale and dtype: the scale recorded on the output
    (calibrated, or learned by QAT) when there is one, else the largest input scale; inputs
    already there pass through (no requantize when every input has the output's scale)."""
    y = node.outputs[0]
    scales = {(qscale(v), v.dtype) for v in data}
    if y.type.quant is not None:
        target = (lc.act_scale(y), lc.out_dtype(y))
    elif len(scales) > 1:
        target = (max(s for s, _ in scales), lc.out_dtype(y))
    else:
        return inputs
    if scales == {target}:
        return inputs
    return [_requantize(lc, v, *target, node.name) if v is not None and v.type.quant is not None
            else v for v in inputs]


def _integer_constant(value: float, x: Value) -> int:
    """A real constant (a pad value) in the integer units of ``x``, saturated to its dtype."""
    lo, hi = RANGES[x.dtype]
    return min(max(_rhe(value / qscale(x)), lo), hi)


def lower_plain(lc: LowerContext, node: Node) -> str | None:
    """A node without float activations (indices, masks): copied as it is."""
    inputs = [None if v is None else lc.as_int(v) for v in node.inputs]
    lc.emit(node, node.op, inputs, node.attrs)
    return None


#: integer form (the ``integer`` slot of an op declaration) -> its lowering rule
RULES: dict[str, Rule] = {
    "native": lower_native,
    "qconv": lower_conv,
    "qlinear": lower_linear,
    "qadd": lower_add,
    "qmul": lower_mul,
    "qavg_pool": lower_avg_pool,
    "qglobal_avg_pool": lower_global_avg_pool,
    "qresize": lower_resize,
    "lut": lower_lut,
    "qsoftmax": lower_softmax,
    "qgrid_sample": lower_grid_sample,
}
