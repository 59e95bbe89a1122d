"""Conv, ConvTranspose, BatchNormalization, Gemm, MatMul.

Window attributes are made explicit here: ``auto_pad`` (SAME_UPPER/SAME_LOWER/VALID) and
ConvTranspose's ``output_shape`` become ``pads``/``output_padding``; absent strides and
dilations become 1.
"""

from __future__ import annotations

from collections.abc import Sequence

from . import converter

_AUTO_PADS = ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID")


def window_defaults(attrs: dict, spatial: int) -> tuple[list[int], list[int]]:
    """(strides, dilations) of a window op, 1 where absent."""
    strides = list(attrs.get("strides") or [1] * spatial)
    dilations = list(attrs.get("dilations") or [1] * spatial)
    return strides, dilations


def auto_pad(ctx, node, attrs: dict) -> str:
    mode = attrs.get("auto_pad", "NOTSET") or "NOTSET"
    if mode not in _AUTO_PADS:
        ctx.unsupported(node, f"auto_pad '{mode}' is not one of {', '.join(_AUTO_PADS)}")
    return mode


def split_total(total: int, more_at_end: bool) -> tuple[int, int]:
    """(begin, end) of a total padding; the odd element goes to the end or the beginning."""
    small, big = total // 2, total - total // 2
    return (small, big) if more_at_end else (big, small)


def resolve_pads(ctx, node, attrs: dict, spatial: Sequence[int], kernel: Sequence[int],
                 strides: Sequence[int], dilations: Sequence[int]) -> list[int]:
    """Explicit ONNX-order pads of a Conv/pool node, with auto_pad resolved.

    SAME_*: output = ceil(in / stride), total = max(0, (out-1)*stride + (k-1)*dilation + 1 - in),
    the odd element at the end (SAME_UPPER) or the beginning (SAME_LOWER).
    """
    n = len(spatial)
    mode = auto_pad(ctx, node, attrs)
    if mode == "NOTSET":
        return list(attrs.get("pads") or [0] * 2 * n)
    if mode == "VALID":
        return [0] * 2 * n
    begins, ends = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dilations, strict=True):
        out = -(-size // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
        b, e = split_total(total, mode == "SAME_UPPER")
        begins.append(b)
        ends.append(e)
    return begins + ends


def _kernel(ctx, node, attrs: dict) -> list[int]:
    """Kernel shape from the weight; a kernel_shape attribute must agree with it."""
    kernel = list(ctx.type(node, 1).shape[2:])
    given = attrs.get("kernel_shape")
    if given is not None and list(given) != kernel:
        ctx.unsupported(node, f"kernel_shape {list(given)} differs from the weight's spatial "
                              f"shape {kernel}")
    return kernel


def _spatial(ctx, node) -> tuple[int, ...]:
    shape = ctx.type(node, 0).shape
    if len(shape) < 3:
        ctx.unsupported(node, f"input must have rank >= 3 ([N, C, *spatial]), got shape "
                              f"{list(shape)}")
    return shape[2:]


@converter("Conv")
def conv(ctx, node):
    a = ctx.attrs(node)
    spatial = _spatial(ctx, node)
    kernel = _kernel(ctx, node, a)
    strides, dilations = window_defaults(a, len(spatial))
    if len(strides) == len(dilations) == len(kernel) == len(spatial):
        pads = resolve_pads(ctx, node, a, spatial, kernel, strides, dilations)
    else:  # the op's inference reports the length mismatch
        pads = list(a.get("pads") or [])
    attrs = {"strides": strides, "pads": pads, "dilations": dilations,
             "groups": a.get("group", 1)}
    ctx.emit("conv", [ctx.input(node, i) for i in range(3)], attrs, node=node)


@converter("ConvTranspose")
def conv_transpose(ctx, node):
    a = ctx.attrs(node)
    spatial = _spatial(ctx, node)
    n = len(spatial)
    kernel = _kernel(ctx, node, a)
    strides, dilations = window_defaults(a, n)
    out_pad = list(a.get("output_padding") or [0] * n)
    mode = auto_pad(ctx, node, a)
    target = a.get("output_shape")
    if target is not None and len(target) == n + 2:
        target = list(target)[2:]
    extend = target is not None
    if target is None and mode in ("SAME_UPPER", "SAME_LOWER"):
        target = [size * s for size, s in zip(spatial, strides, strict=False)]
    if not len(strides) == len(dilations) == len(kernel) == len(out_pad) == n:
        pads = list(a.get("pads") or [])  # the op's inference reports the mismatch
    elif target is not None:
        if len(target) != n:
            ctx.unsupported(node, f"output_shape {list(target)} must have {n} values")
        pads = _transpose_pads(spatial, kernel, strides, dilations, out_pad, target,
                               more_at_end=mode == "SAME_UPPER", extend=extend)
    elif mode == "VALID":
        pads = [0] * 2 * n
    else:
        pads = list(a.get("pads") or [0] * 2 * n)
    attrs = {"strides": strides, "pads": pads, "dilations": dilations,
             "output_padding": out_pad, "groups": a.get("group", 1)}
    ctx.emit("conv_transpose", [ctx.input(node, i) for i in range(3)], attrs, node=node)


def _transpose_pads(spatial, kernel, strides, dilations, out_pad: list[int], target,
                    more_at_end: bool, extend: bool) -> list[int]:
    """Pads reaching ``target`` (ONNX spec: total = natural size - target, the odd element at
    the end for SAME_UPPER and at the beginning otherwise).

    A target larger than the natural size: an explicit output_shape extends the end (adds to
    ``out_pad``, updated in place); SAME's implicit in*stride keeps the natural size, as
    onnxruntime does.
    """
    begins, ends = [], []
    for i, (size, k, s, d, t) in enumerate(zip(spatial, kernel, strides, dilations, target,
                                                strict=True)):
        total = s * (size - 1) + out_pad[i] + (k - 1) * d + 1 - t
        if total < 0:
            out_pad[i] -= total if extend else 0
            total = 0
        b, e = split_total(total, more_at_end)
        begins.append(b)
        ends.append(e)
    return begins + ends


@converter("BatchNormalization")
def batch_norm(ctx, node):
    a = ctx.attrs(node)
    if a.get("training_mode", 0):
        ctx.unsupported(node, "training_mode=1 (batch statistics) is not supported; export the "
                              "model in inference mode")
    if ctx.opset < 7 and not a.get("is_test", 0):
        ctx.unsupported(node, "is_test=0 (training mode, opset < 7) is not supported; export "
                              "the model in inference mode")
    if a.get("spatial", 1) != 1:
        ctx.unsupported(node, "spatial=0 (per-activation statistics) is not supported")
    extra = [o for o in node.output[1:] if o]
    if extra and ctx.opset >= 7:
        ctx.unsupported(node, f"outputs {', '.join(extra)} (running/saved statistics) exist "
                              "only in training mode")
    inputs = [ctx.input(node, i) for i in range(5)]
    values = ctx.emit("batch_norm", inputs, {"epsilon": a.get("epsilon", 1e-5)}, node=node,
                      outputs=node.output[:1])
    # opset < 7 inference models may list the (unchanged) running statistics as outputs
    for name, src in zip(node.output[1:3], inputs[3:5], strict=False):
        ctx.bind(name, src)
    return values


@converter("Gemm")
def gemm(ctx, node):
    a = ctx.attrs(node)
    attrs = {"alpha": a.get("alpha", 1.0), "beta": a.get("beta", 1.0),
             "trans_a": a.get("transA", 0), "trans_b": a.get("transB", 0)}
    ctx.emit("gemm", [ctx.input(node, i) for i in range(3)], attrs, node=node)


@converter("MatMul")
def matmul(ctx, node):
    ctx.emit("matmul", [ctx.input(node, 0), ctx.input(node, 1)], node=node)
