"""PyTorch converters: the per-target table that maps input-dependent fx nodes to IR nodes.

A converter is registered with :func:`converts` for torch.nn module classes (called as
``fn(ctx, module, *args, **kwargs)``), Python/torch callables, Tensor method names and aten op
names from ``torch.export`` (all called as ``fn(ctx, *args, **kwargs)`` with the node's own
arguments). Arguments arrive with fx nodes replaced by what they stand for: an IR ``Value`` for
input-dependent tensors, a ``torch.Tensor`` for constant ones (parameters, buffers, folded
values) and plain Python values for everything else (``x.size()`` arithmetic included). The
shape and dtype torch computed for the node is ``ctx.out``: reshape-like converters use it
instead of re-deriving it, and the importer checks every converter's result against it.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from .context import Unsupported

# -- the table --------------------------------------------------------------------------------
_MODULES: dict[type, Callable] = {}
_FUNCS: dict[Any, Callable] = {}
_METHODS: dict[str, Callable] = {}
_ATEN: dict[str, Callable] = {}


def converts(*targets: Any, methods: Sequence[str] = (), aten: Sequence[str] = ()) -> Callable:
    """Register a converter for module classes / callables, Tensor methods and aten ops
    (``"conv2d"`` for every overload or ``"mean.dim"`` for one). ``None`` targets (functions
    this torch version lacks) are skipped."""

    def wrap(fn: Callable) -> Callable:
        for t in targets:
            if t is None:
                continue
            if isinstance(t, type) and issubclass(t, nn.Module):
                _MODULES[t] = fn
            else:
                _FUNCS[t] = fn
        for m in methods:
            _METHODS[m] = fn
        for a in aten:
            _ATEN[a] = fn
        return fn

    return wrap


def _aten_name(t: Any) -> tuple[str, str] | None:
    if isinstance(t, torch._ops.OpOverload):
        return t._schema.name.split("::")[-1], t._schema.overload_name or "default"
    return None


def load_all() -> None:
    """Import every converter module (they register on import)."""
    from . import activation, elementwise, layers, pool, reduce, resample, tensor  # noqa: F401


def find_converter(gm: fx.GraphModule, n: fx.Node) -> tuple[Callable | None, nn.Module | None]:
    """(converter, module for call_module nodes) of node ``n``."""
    if not _MODULES:
        load_all()
    if n.op == "call_module":
        mod = gm.get_submodule(str(n.target))
        for cls in type(mod).__mro__:
            if cls in _MODULES:
                return _MODULES[cls], mod
        return None, mod
    if n.op == "call_method":
        name = str(n.target)
        fn = _METHODS.get(name)
        if fn is None and name.endswith("_") and not name.startswith("__"):
            fn = _METHODS.get(name[:-1])
        return fn, None
    aten = _aten_name(n.target)
    if aten is not None:
        name, overload = aten
        fn = _ATEN.get(f"{name}.{overload}") or _ATEN.get(name)
        if fn is None and name.endswith("_") and not name.startswith("_"):
            fn = _ATEN.get(f"{name[:-1]}.{overload}") or _ATEN.get(name[:-1])
        return fn, None
    try:
        return _FUNCS.get(n.target), None
    except TypeError:  # unhashable target
        return None, None


def is_inplace(gm: fx.GraphModule, n: fx.Node) -> bool:
    """Does ``n`` write its first argument (``x.add_(y)``, ``F.relu(x, inplace=True)``)?"""
    if n.kwargs.get("inplace") is True:
        return True
    if n.op == "call_function" and len(n.args) > 1 and callable(n.target):
        try:  # F.relu(x, True): inplace passed positionally
            bound = inspect.signature(n.target).bind(*n.args, **n.kwargs).arguments
            if bound.get("inplace") is True:
                return True
        except (TypeError, ValueError):
            pass
    if n.op == "call_module":
        return getattr(gm.get_submodule(str(n.target)), "inplace", False) is True
    if n.op == "call_method":
        name = str(n.target)
        return name.endswith("_") and not name.startswith("__")
    aten = _aten_name(n.target)
    if aten is not None:
        args = n.target._schema.arguments
        return bool(args) and args[0].alias_info is not None and args[0].alias_info.is_write
    return n.target in (operator.iadd, operator.isub, operator.imul, operator.itruediv,
                        getattr(torch, "relu_", None))


_VIEW_METHODS = {"view", "view_as", "reshape", "reshape_as", "transpose", "permute", "squeeze",
                 "unsqueeze", "narrow", "select", "expand", "expand_as", "flatten", "unflatten",
                 "t", "split", "chunk", "unbind", "diagonal", "as_strided", "swapaxes",
                 "swapdims", "movedim", "contiguous", "detach"}
_VIEW_ATEN = {"view", "reshape", "slice", "select", "narrow", "transpose", "permute", "squeeze",
              "unsqueeze", "expand", "t", "alias", "split", "split_with_sizes", "chunk",
              "unbind", "as_strided", "diagonal", "unflatten", "flatten", "detach", "numpy_T",
              "mT", "contiguous"}
_VIEW_FUNCS = {operator.getitem, torch.flatten, torch.reshape, torch.transpose, torch.permute,
               torch.squeeze, torch.unsqueeze, torch.narrow, torch.select, torch.split,
               torch.chunk, torch.unbind, torch.t, torch.detach}


def is_view(gm: fx.GraphModule, n: fx.Node) -> bool:
    """May ``n``'s result share memory with its first argument (so in-place writes to one
    change the other)?"""
    if n.op == "call_method":
        return str(n.target) in _VIEW_METHODS
    if n.op == "call_module":
        return isinstance(gm.get_submodule(str(n.target)), (nn.Flatten, nn.Identity, nn.Dropout))
    if n.op != "call_function":
        return False
    aten = _aten_name(n.target)
    if aten is not None:
        return aten[0] in _VIEW_ATEN
    if n.target is getattr:
        return len(n.args) > 1 and n.args[1] in ("T", "mT", "data")
    try:
        return n.target in _VIEW_FUNCS
    except TypeError:
        return False


_SHAPE_METHODS = {"size", "dim", "numel", "ndimension", "nelement", "get_device",
                  "is_contiguous", "is_floating_point", "new_zeros", "new_ones", "new_full",
                  "new_empty", "new_tensor"}
_SHAPE_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "layout", "requires_grad",
                "is_quantized"}
_SHAPE_FUNCS_ATEN = {"sym_size", "sym_numel", "sym_stride", "sym_storage_offset", "zeros_like",
                     "ones_like", "full_like", "empty_like", "new_zeros", "new_ones",
                     "new_full", "new_empty", "_assert_tensor_metadata"}


def is_shape_query(n: fx.Node) -> bool:
    """Does ``n`` depend only on its inputs' shapes/dtypes (so its result is static)?"""
    if n.op == "call_method":
        return str(n.target) in _SHAPE_METHODS
    if n.op != "call_function":
        return False
    t = n.target
    if t is getattr:
        return len(n.args) > 1 and n.args[1] in _SHAPE_ATTRS
    if t in (len, torch.numel, torch.zeros_like, torch.ones_like, torch.full_like,
             torch.empty_like):
        return True
    aten = _aten_name(t)
    return aten is not None and aten[0] in _SHAPE_FUNCS_ATEN


def describe_target(gm: fx.GraphModule, n: fx.Node) -> str:
    """A readable name of what ``n`` calls: nn.GELU, torch.nn.functional.gelu, Tensor.view..."""
    if n.op == "call_module":
        cls = type(gm.get_submodule(str(n.target)))
        if cls.__module__.startswith("torch.nn.modules"):
            return f"nn.{cls.__name__}"
        return f"{cls.__module__}.{cls.__name__}"
    if n.op == "call_method":
        return f"Tensor.{n.target}"
    t = n.target
    if _aten_name(t) is not None:
        return f"aten.{t.__name__}" if not str(t).startswith("aten.") else str(t)
    name = getattr(t, "__name__", str(t))
    mod = getattr(t, "__module__", None) or "torch"
    if mod == "_operator":
        mod = "operator"
    return f"{mod}.{name}"


_HINTS = (
    ("gelu", "GELU is not in hbc's op set: use nn.ReLU, nn.ReLU6 or nn.Hardswish instead"),
    ("layer_norm", "only BatchNorm is supported: use nn.BatchNorm2d"),
    ("LayerNorm", "only BatchNorm is supported: use nn.BatchNorm2d"),
    ("group_norm", "only BatchNorm is supported: use nn.BatchNorm2d"),
    ("GroupNorm", "only BatchNorm is supported: use nn.BatchNorm2d"),
    ("InstanceNorm", "only BatchNorm is supported: use nn.BatchNorm2d"),
    ("fft", "FFT ops are not in hbc's op set: compute them outside the model"),
    ("setitem", "assigning into a tensor slice is not supported: build the result with "
                "torch.cat"),
    ("item", "reading a tensor value in Python makes the graph data-dependent: keep the "
             "computation in tensors"),
    ("where", "torch.where and comparisons are not in hbc's op set yet"),
)


def hint_for(gm: fx.GraphModule, n: fx.Node) -> str | None:
    what = describe_target(gm, n).lower()
    for key, hint in _HINTS:
        if key.lower() in what:
            return hint
    return "see docs/frontend.md for the supported torch ops"


def supported() -> dict[str, list[str]]:
    """Every torch target with a converter, by kind (for the docs and tooling)."""
    load_all()

    def fn_name(t: Any) -> str:
        mod = getattr(t, "__module__", None) or "torch"
        return f"{'operator' if mod == '_operator' else mod}.{getattr(t, '__name__', t)}"

    def public(c: type) -> set[str]:  # a class and its torch.nn subclasses (nn.ReLU6...)
        names = {f"nn.{c.__name__}"} if not c.__name__.startswith("_") else set()
        return names.union(*(public(sub) for sub in c.__subclasses__()
                             if sub.__module__.startswith("torch.nn.")))

    return {
        "modules": sorted({n for c in _MODULES for n in public(c)}),
        "functions": sorted({fn_name(t) for t in _FUNCS}),
        "methods": sorted(f"Tensor.{m}" for m in _METHODS),
        "aten": sorted(f"aten.{a}" for a in _ATEN),
    }


# -- helpers shared by the converter modules --------------------------------------------------
def ints(v: Any, n: int) -> list[int]:
    """An int or a sequence as ``n`` ints (a 1-element sequence is repeated)."""
    if isinstance(v, (int, np.integer)):
        return [int(v)] * n
    v = [int(x) for x in v]
    return v * n if len(v) == 1 and n > 1 else v


def floats(v: Any, n: int) -> list[float]:
    """A number or a sequence as ``n`` floats."""
    if isinstance(v, (int, float, np.number)):
        return [float(v)] * n
    v = [float(x) for x in v]
    return v * n if len(v) == 1 and n > 1 else v


def norm_dim(d: int, rank: int) -> int:
    """A torch dim in [0, rank)."""
    if not -max(rank, 1) <= d < max(rank, 1):
        raise Unsupported(f"dim {d} is out of range for rank {rank}")
    return d % max(rank, 1)


def opt(obj: Any, name: str) -> Any:
    """``obj.name``, or None where this torch version lacks it."""
    return getattr(obj, name, None)


def module_form(fn: Callable) -> Callable:
    """Adapt a functional converter ``fn(ctx, input)`` to a module converter."""
    return lambda ctx, m, input, *args, **kwargs: fn(ctx, input)
