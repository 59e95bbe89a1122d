"""Fake quantization modules for QAT, mimicking the integer scheme of docs/quantization.md.

``fake_quantize(x, s) = clamp(round_half_even(x / s), qmin, qmax) * s`` in float32: exactly the
float value of the integer model's ``dequantize(quantize(x))`` (ONNX QuantizeLinear rounding,
symmetric, zero point 0). Gradients use the straight-through estimator: ``dy/dx = 1`` where
``qmin <= x/s <= qmax`` and 0 outside; for a learnable scale (LSQ, Esser et al. 2020)
``dy/ds = round(x/s) - x/s`` inside and ``qmin``/``qmax`` outside, times the gradient scale
``g = 1/sqrt(features * qmax)`` (features: elements per sample).

- :class:`ActFakeQuant`: per-tensor activation scale from a running max (EMA, synchronised
  across DDP ranks with an all_reduce of the max) or learned (LSQ); a max observer while
  :func:`hbc.quant.calibrate` runs.
- :class:`WeightFakeQuant`: per-output-channel weight scale ``max|W[c]| / 127`` recomputed from
  the current weights at every call (a zero channel gets scale 1).
- :class:`QConv`, :class:`QLinear`: conv / linear with fake-quantized weights, keeping the
  module's parameters (same names, same Parameter objects).
- :class:`FusedConvBN`: conv + BatchNorm with simulated folding: the folded weight
  ``w * gamma / sqrt(var + eps)`` is fake-quantized; BN statistics frozen (the deployed
  computation, ``b' = (b - mean) * s + beta``) or updating from batch statistics in training.

The last section rewrites a traced ``fx.GraphModule`` with them (:func:`insert_after`,
:func:`quantize_weights`, :func:`foldable_bn`, :func:`decompose` for SiLU); where to insert is
decided by :mod:`hbc.quant.qat`.
"""

from __future__ import annotations

import math
import operator
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

#: Integer ranges of the activation and weight types.
QRANGE: dict[str, tuple[int, int]] = {"i8": (-128, 127), "i16": (-32768, 32767)}


class _FakeQuantFn(torch.autograd.Function):
    """Forward: the integer scheme's quantize-dequantize; backward: STE and the LSQ gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int,
                grad_factor: float) -> torch.Tensor:
        xs = x / scale
        q = torch.clamp(torch.round(xs), qmin, qmax)
        ctx.save_for_backward(xs, q, scale)
        ctx.qrange, ctx.grad_factor = (qmin, qmax), grad_factor
        return q * scale

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        xs, q, scale = ctx.saved_tensors
        qmin, qmax = ctx.qrange
        inside = (xs >= qmin) & (xs <= qmax)
        gx = grad * inside if ctx.needs_input_grad[0] else None
        gs = None
        if ctx.needs_input_grad[1]:
            ds = torch.where(inside, q - xs, q)  # outside: q is qmin or qmax
            gs = (grad * ds).sum_to_size(scale.shape) * ctx.grad_factor
        return gx, gs, None, None, None


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, qmin: int = -128, qmax: int = 127,
                  grad_factor: float = 1.0) -> torch.Tensor:
    """``clamp(round_half_even(x / scale), qmin, qmax) * scale`` with STE / LSQ gradients.

    ``scale`` is a scalar tensor (per tensor) or broadcasts against ``x`` (per channel)."""
    return _FakeQuantFn.apply(x, scale.to(x.dtype), qmin, qmax, grad_factor)


def _scale_of(amax: torch.Tensor, qmax: int) -> torch.Tensor:
    """float32(amax / qmax) computed in float64 (as calibration does); 1/qmax for amax 0."""
    a = amax.detach().double()
    a = torch.where(a > 0, a, torch.ones_like(a))
    return (a / qmax).float()


def _dist_max(t: torch.Tensor) -> torch.Tensor:
    """The max of ``t`` over the ranks of the default process group (``t`` when not
    distributed)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


class ActFakeQuant(nn.Module):
    """Per-tensor activation fake quantization of one IR value.

    ``method``: "ema" (scale = running max / qmax, the max averaged with ``momentum`` per
    training step) or "lsq" (``scale`` is a learnable Parameter). ``value_name`` is the IR value
    whose scale this learns (recorded by :func:`hbc.quant.export_graph`), ``node`` the fx node
    it follows. ``sync`` all-reduces the observed max over DDP ranks (ema, and LSQ's
    initialisation), so every rank sees the scale of the global batch.
    """

    def __init__(self, value_name: str, node: str, method: str = "ema", dtype: str = "i8",
                 momentum: float = 0.01, sync: bool = True) -> None:
        super().__init__()
        if method not in ("ema", "lsq"):
            raise ValueError(f"activation fake quantization '{method}': expected ema or lsq")
        self.value_name, self.node, self.method, self.dtype = value_name, node, method, dtype
        self.qmin, self.qmax = QRANGE[dtype]
        self.momentum, self.sync = momentum, sync
        self.enabled = True  # fake quantize (False: pass through, e.g. while calibrating)
        #: while calibrating: observe the max of every batch (into ``cal_amax``), pass through
        self.calibrating = False
        self.cal_amax: torch.Tensor | None = None
        one = torch.tensor(1.0 / self.qmax)
        if method == "lsq":
            self.scale = nn.Parameter(one)
        else:
            self.register_buffer("scale", one)
        self.register_buffer("amax", torch.tensor(0.0))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    def extra_repr(self) -> str:
        return f"%{self.value_name}, {self.method}, {self.dtype}, scale={float(self.scale):.6g}"

    def set_range(self, amax: float | torch.Tensor) -> None:
        """Initialise from a clipping range (calibration): amax and scale = amax / qmax."""
        amax = torch.as_tensor(amax, dtype=torch.float32)
        with torch.no_grad():
            self.amax.copy_(amax)
            self.scale.copy_(_scale_of(amax, self.qmax))
            self.initialized.fill_(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:  # max observer: the range over every calibration batch
            with torch.no_grad():
                m = x.detach().abs().max().float()
                m = _dist_max(m) if self.sync else m
                self.cal_amax = m if self.cal_amax is None else torch.maximum(self.cal_amax, m)
            return x
        if self.training:
            self._observe(x)
        if not self.enabled:
            return x
        if self.method == "lsq":
            per_sample = x.numel() // max(int(x.shape[0]), 1) if x.dim() > 0 else 1
            g = 1.0 / math.sqrt(max(per_sample, 1) * self.qmax)
            return fake_quantize(x, self.scale.abs().clamp_min(1e-12), self.qmin, self.qmax, g)
        return fake_quantize(x, self.scale, self.qmin, self.qmax)

    def _observe(self, x: torch.Tensor) -> None:
        """Training step: update the EMA of the max (ema) or initialise the scale (lsq)."""
        if self.method == "lsq" and bool(self.initialized):
            return
        with torch.no_grad():
            m = x.detach().abs().max().float()
            if self.sync:
                m = _dist_max(m)
            if bool(self.initialized) and self.method == "ema":
                m = self.amax * (1.0 - self.momentum) + m * self.momentum
            self.set_range(m)


class WeightFakeQuant(nn.Module):
    """Per-output-channel symmetric int8 fake quantization: ``s[c] = max|W[c]| / 127``,
    recomputed from the weights at every call (no state). ``axis``: the output-channel axis."""

    def __init__(self, axis: int = 0) -> None:
        super().__init__()
        self.axis = axis
        self.enabled = True

    def scales(self, w: torch.Tensor) -> torch.Tensor:
        """The per-channel scales, shaped to broadcast against ``w``."""
        dims = [d for d in range(w.dim()) if d != self.axis]
        amax = w.detach().abs().amax(dim=dims, keepdim=True) if dims else w.detach().abs()
        return _scale_of(amax, 127)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        return fake_quantize(w, self.scales(w), -128, 127)


# -- layers with fake-quantized weights -------------------------------------------------------
_CONV_ATTRS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
               "groups", "padding_mode", "_reversed_padding_repeated_twice")


class QConv(nn.Module):
    """``nn.Conv1d/2d/3d`` with a fake-quantized weight; same parameters (``weight``,
    ``bias``) as the conv it replaces, which keeps its module path."""

    def __init__(self, conv: nn.modules.conv._ConvNd) -> None:
        super().__init__()
        for name in _CONV_ATTRS:
            setattr(self, name, getattr(conv, name))
        self.ndim = len(conv.kernel_size)
        self.weight = conv.weight
        self.bias = conv.bias
        self.weight_fq = WeightFakeQuant(axis=0)

    def _conv(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        fn = (F.conv1d, F.conv2d, F.conv3d)[self.ndim - 1]
        padding = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        return fn(x, w, b, self.stride, padding, self.dilation, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv(x, self.weight_fq(self.weight), self.bias)


class QLinear(nn.Module):
    """``nn.Linear`` with a fake-quantized weight (per output feature)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.weight_fq = WeightFakeQuant(axis=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_fq(self.weight), self.bias)


class FusedConvBN(QConv):
    """Conv + BatchNorm trained with simulated BN folding.

    ``s = gamma / sqrt(running_var + eps)``, ``w' = w * s`` is fake-quantized per channel.
    With ``freeze_bn`` (or in eval mode) the output is ``conv(x, fq(w')) + (b - mean) * s +
    beta``: exactly what the folded conv of the compiled model computes. Otherwise (training,
    statistics updating) ``conv(x, fq(w')) / s + b`` goes through the BN in training mode, so
    the batch normalises with its own statistics and the running ones are updated (the
    standard simulated folding of QAT). The BN keeps its parameters as child ``bn``.
    """

    def __init__(self, conv: nn.modules.conv._ConvNd, bn: nn.modules.batchnorm._BatchNorm,
                 freeze_bn: bool = True) -> None:
        super().__init__(conv)
        self.bn = bn
        self.freeze_bn = freeze_bn

    def _bn_factor(self) -> torch.Tensor:
        bn = self.bn
        s = torch.rsqrt(bn.running_var + bn.eps)
        return s * bn.weight if bn.weight is not None else s

    def _shape(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return t.reshape([-1] + [1] * (x.dim() - 2))

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The folded (float) weight and bias, ``w * s`` and ``(b - mean) * s + beta``."""
        s = self._bn_factor()
        w = self.weight * s.reshape([-1] + [1] * (self.weight.dim() - 1))
        b = self.bias if self.bias is not None else torch.zeros_like(s)
        b = (b - self.bn.running_mean) * s
        return w, b + self.bn.bias if self.bn.bias is not None else b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self._bn_factor()
        w = self.weight * s.reshape([-1] + [1] * (self.weight.dim() - 1))
        y = self._conv(x, self.weight_fq(w), None)
        if self.training and not self.freeze_bn:
            y = y / self._shape(s, y)
            if self.bias is not None:
                y = y + self._shape(self.bias, y)
            return self.bn(y)
        _, b = self.folded()
        return y + self._shape(b, y)


# -- rewriting the fx graph ---------------------------------------------------------------
_FUNCTIONAL_WEIGHTED = {F.conv1d, F.conv2d, F.conv3d, F.linear, torch.conv1d, torch.conv2d,
                        torch.conv3d}


def _is_silu(gm: fx.GraphModule, n: fx.Node) -> bool:
    if n.op == "call_module":
        return isinstance(gm.get_submodule(str(n.target)), nn.SiLU)
    return n.op == "call_function" and n.target in (F.silu, torch.nn.functional.silu)


def decompose(gm: fx.GraphModule, n: fx.Node, part: str) -> tuple[fx.Node, fx.Node] | None:
    """Rewrite fx node ``n`` as the IR ops it imports as, so ``part`` (an intermediate the
    integer model quantizes) can be fake-quantized: SiLU -> x * sigmoid(x). Returns the
    (part node, result node), or None when ``n`` has no such decomposition."""
    if part != "sigmoid" or not _is_silu(gm, n):
        return None
    x = n.args[0] if n.args else n.kwargs["input"]
    with gm.graph.inserting_before(n):
        sig = gm.graph.call_function(torch.sigmoid, (x,))
        y = gm.graph.call_function(operator.mul, (x, sig))
    n.replace_all_uses_with(y)
    gm.graph.erase_node(n)
    return sig, y


def insert_after(gm: fx.GraphModule, node: fx.Node, module: nn.Module, group: str,
                 name: str) -> str:
    """Call ``module`` on ``node``'s result and make every user read that instead."""
    base = re.sub(r"\W", "_", name) or "v"
    key, i = base, 1
    while hasattr(gm, group) and hasattr(getattr(gm, group), key):
        key, i = f"{base}_{i}", i + 1
    path = f"{group}.{key}"
    gm.add_submodule(path, module)
    with gm.graph.inserting_after(node):
        q = gm.graph.call_module(path, (node,))
    node.replace_all_uses_with(q, delete_user_cb=lambda u: u is not q)
    return path


def quantize_weights(gm: fx.GraphModule) -> None:
    """Convs and linears get fake-quantized weights: modules are replaced by QConv/QLinear
    (same parameters, same path); functional conv/linear calls get a WeightFakeQuant on their
    weight argument."""
    done: set[str] = set()
    for n in list(gm.graph.nodes):
        if n.op == "call_module" and str(n.target) not in done:
            m = gm.get_submodule(str(n.target))
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                set_module(gm, str(n.target), QConv(m).train(m.training))
            elif isinstance(m, nn.Linear):
                set_module(gm, str(n.target), QLinear(m).train(m.training))
            done.add(str(n.target))
        elif n.op == "call_function" and n.target in _FUNCTIONAL_WEIGHTED:
            w = n.args[1] if len(n.args) > 1 else n.kwargs.get("weight")
            if isinstance(w, fx.Node):
                with gm.graph.inserting_before(n):
                    gm.add_submodule(f"qat_weight.{n.name}", WeightFakeQuant(0))
                    q = gm.graph.call_module(f"qat_weight.{n.name}", (w,))
                n.replace_input_with(w, q)


def foldable_bn(gm: fx.GraphModule, bn_node: fx.Node,
                calls: dict[str, int]) -> tuple[fx.Node, QConv, nn.Module] | None:
    """(conv node, QConv, BN) when ``bn_node`` is a BN that reads only a conv's output."""
    if bn_node.op != "call_module" or calls.get(str(bn_node.target)) != 1:
        return None
    bn = gm.get_submodule(str(bn_node.target))
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.running_var is None:
        return None
    conv_node = bn_node.args[0] if bn_node.args else None
    if not isinstance(conv_node, fx.Node) or conv_node.op != "call_module" or \
            len(conv_node.users) != 1 or calls.get(str(conv_node.target)) != 1:
        return None
    conv = gm.get_submodule(str(conv_node.target))
    if type(conv) is not QConv or conv.out_channels != bn.num_features:
        return None
    return conv_node, conv, bn


def set_module(gm: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, leaf, module)
