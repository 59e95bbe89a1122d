"""MaxPool, AveragePool, GlobalAveragePool, GlobalMaxPool.

``auto_pad`` is resolved into explicit pads (SAME_* ignores ceil_mode, as onnxruntime does);
absent strides and dilations become 1.
"""

from __future__ import annotations

from . import converter
from .nn import auto_pad, resolve_pads, window_defaults


def _window_attrs(ctx, node) -> dict:
    a = ctx.attrs(node)
    shape = ctx.type(node, 0).shape
    kernel = a.get("kernel_shape")
    if kernel is None:
        ctx.unsupported(node, "the kernel_shape attribute is required")
    kernel = list(kernel)
    spatial = shape[2:]
    strides, dilations = window_defaults(a, len(kernel))
    mode = auto_pad(ctx, node, a)
    ceil_mode = a.get("ceil_mode", 0)
    if len(spatial) == len(kernel) == len(strides) == len(dilations):
        pads = resolve_pads(ctx, node, a, spatial, kernel, strides, dilations)
    else:  # the op's inference reports the mismatch
        pads = list(a.get("pads") or [0] * 2 * len(kernel))
    if mode in ("SAME_UPPER", "SAME_LOWER"):
        ceil_mode = 0
    return {"kernel": kernel, "strides": strides, "pads": pads, "dilations": dilations,
            "ceil_mode": ceil_mode}


@converter("MaxPool")
def max_pool(ctx, node):
    attrs = _window_attrs(ctx, node)
    attrs["storage_order"] = ctx.attrs(node).get("storage_order", 0)
    ctx.emit("max_pool", [ctx.input(node, 0)], attrs, node=node)


@converter("AveragePool")
def avg_pool(ctx, node):
    attrs = _window_attrs(ctx, node)
    attrs["count_include_pad"] = ctx.attrs(node).get("count_include_pad", 0)
    ctx.emit("avg_pool", [ctx.input(node, 0)], attrs, node=node)


@converter("GlobalAveragePool")
def global_avg_pool(ctx, node):
    ctx.emit("global_avg_pool", [ctx.input(node, 0)], node=node)


@converter("GlobalMaxPool")
def global_max_pool(ctx, node):
    ctx.emit("global_max_pool", [ctx.input(node, 0)], node=node)
