"""Quantities: the named numbers of a node that the constraint tables limit.

A quantity is a small function of an :class:`OpView` (a node seen as the float op whose table
applies, shapes channels first) registered with :func:`quantity` for the tables that use it;
:data:`COMMON` ones apply to every table. A quantity returns a number, a tuple (checked per
element: a kernel's HxW), a name or a tuple of names, or None when it does not apply to the
node (the residual stride of a conv without a fused residual), which skips its rules. The
constraint tables (backend/constraints.py) name quantities; docs/marches.md lists them with
their ``doc``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from hbc.ir.types import TensorType


@dataclass(frozen=True)
class OpView:
    """The facts of one node that quantities read, in float-op terms and channels first."""

    op: str
    attrs: Mapping[str, Any]
    x: TensorType | None  # the first data input
    w: TensorType | None = None  # a conv's or linear's weight
    data: tuple[TensorType, ...] = ()  # every non-constant input
    inputs: tuple[TensorType, ...] = ()  # every present input, constants included
    outputs: tuple[TensorType, ...] = ()
    const_inputs: int = 0
    residual: bool = False  # a fused residual add (conv_fused / qconv)
    act_dtype: str | None = None  # activation dtype on the BPU: i8 or i16


@dataclass(frozen=True)
class Quantity:
    """A named number (or tuple, or name) of a node that rules constrain."""

    name: str
    doc: str
    fn: Callable[[OpView], Any]
    fmt: str = "scalar"  # scalar | dims (7x7) | list ([1, 1, 0, 0]) | names (H, W)


COMMON: dict[str, Quantity] = {}
QUANTITIES: dict[str, dict[str, Quantity]] = {}


def quantity(tables: tuple[str, ...] | None, doc: str, fmt: str = "scalar"):
    """Register a quantity function for ``tables`` (None: every table)."""

    def deco(fn: Callable[[OpView], Any]) -> Callable[[OpView], Any]:
        q = Quantity(fn.__name__.lstrip("_"), doc, fn, fmt)
        for t in tables or (None,):
            (COMMON if t is None else QUANTITIES.setdefault(t, {}))[q.name] = q
        return fn

    return deco


def _axis_names(t: TensorType) -> list[str]:
    if t.rank == 4:
        return list("NHWC" if t.layout == "NHWC" else "NCHW")
    return [f"axis {i}" for i in range(t.rank)]


def _c(t: TensorType) -> int | None:
    if t.rank < 2:
        return None
    return t.shape[-1] if t.layout == "NHWC" else t.shape[1]


@quantity(None, "rank of the first data input")
def _rank(v: OpView):
    return None if v.x is None else v.x.rank


@quantity(None, "batch (first dimension) of the first data input")
def _batch(v: OpView):
    return None if v.x is None or not v.x.rank else v.x.shape[0]


@quantity(None, "channels: the largest C (axis 1, channels first) of the data inputs and outputs")
def _channels(v: OpView):
    cs = [c for t in (*v.data, *v.outputs) if (c := _c(t)) is not None]
    return max(cs) if cs else None


@quantity(None, "activation dtype on the BPU (i8; i16 where the model asks for it)")
def _activation_dtype(v: OpView):
    return v.act_dtype


@quantity(None, "number of constant inputs")
def _const_inputs(v: OpView):
    return v.const_inputs


_WINDOW = ("conv", "conv_transpose", "max_pool", "avg_pool")


@quantity(_WINDOW, "kernel size per spatial axis (HxW)", "dims")
def _kernel(v: OpView):
    return tuple(v.attrs["kernel"]) if "kernel" in v.attrs else tuple(v.w.shape[2:])


@quantity(_WINDOW, "stride per spatial axis", "dims")
def _stride(v: OpView):
    return tuple(v.attrs["strides"])


@quantity(_WINDOW, "dilation per spatial axis", "dims")
def _dilation(v: OpView):
    return tuple(v.attrs["dilations"])


@quantity(_WINDOW, "padding, begin and end of each spatial axis", "list")
def _pad(v: OpView):
    return tuple(v.attrs["pads"])


@quantity(("conv", "conv_transpose"), "groups")
def _groups(v: OpView):
    return v.attrs.get("groups", 1)


@quantity(("conv", "conv_transpose"), "channels per group, max(Cin, Cout) / groups (grouped "
          "convs only)")
def _channels_per_group(v: OpView):
    g = v.attrs.get("groups", 1)
    return max(_c(v.x), _c(v.outputs[0])) // g if g > 1 else None


@quantity(("conv",), "channels of a plain conv (groups = 1), max(Cin, Cout)")
def _plain_channels(v: OpView):
    return max(_c(v.x), _c(v.outputs[0])) if v.attrs.get("groups", 1) == 1 else None


@quantity(("conv",), "kernel H*W*C: kernel taps times input channels per group")
def _kernel_volume(v: OpView):
    return math.prod(v.w.shape[1:])


@quantity(("conv",), "stride of a conv with a fused residual add (None without one)", "dims")
def _residual_stride(v: OpView):
    return tuple(v.attrs["strides"]) if v.residual else None


@quantity(("global_avg_pool", "global_max_pool", "grid_sample"),
          "input spatial size H*W (product of the spatial dimensions)")
def _input_size(v: OpView):
    return math.prod(v.x.shape[2:])


@quantity(("resize", "grid_sample"), "interpolation mode (linear = bilinear)")
def _mode(v: OpView):
    return v.attrs.get("mode")


@quantity(("resize",), "axes whose size the resize changes", "names")
def _resized_axes(v: OpView):
    names = _axis_names(v.x)
    return tuple(n for n, a, b in zip(names, v.x.shape, v.outputs[0].shape, strict=True)
                 if a != b)


def _hw_factors(v: OpView) -> tuple[float, float] | None:
    if v.x.rank != 4 or v.attrs.get("mode") != "nearest":
        return None
    hw = (1, 2) if v.x.layout == "NHWC" else (2, 3)
    return tuple(_num(v.outputs[0].shape[a] / v.x.shape[a]) for a in hw)


@quantity(("resize",), "nearest resize: output/input factor of H and W", "dims")
def _nearest_factor(v: OpView):
    return _hw_factors(v)


@quantity(("resize",), "nearest resize: H factor divided by W factor")
def _nearest_factor_ratio(v: OpView):
    f = _hw_factors(v)
    return None if f is None else _num(f[0] / f[1])


@quantity(("argmax", "softmax"), "the reduced axis (channels first: 1 is C)")
def _axis(v: OpView):
    axis = v.attrs.get("axis", 0)
    return axis % v.x.rank if v.x.rank else 0


@quantity(("argmax",), "size of the reduced axis")
def _axis_size(v: OpView):
    return v.x.shape[_axis(v)] if v.x.rank else 1


@quantity(("add", "sub", "mul"), "axes an input is broadcast over", "names")
def _broadcast_axes(v: OpView):
    out = v.outputs[0]
    names = _axis_names(out)
    axes = set()
    for t in v.inputs:
        shape = (1,) * (out.rank - t.rank) + tuple(t.shape)
        axes |= {i for i, (a, b) in enumerate(zip(shape, out.shape, strict=True)) if a != b}
    return tuple(names[i] for i in sorted(axes))


def _num(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)


def quantities_of(key: str) -> dict[str, Quantity]:
    """The quantities rules of table ``key`` may use."""
    return {**COMMON, **QUANTITIES.get(key, {})}
