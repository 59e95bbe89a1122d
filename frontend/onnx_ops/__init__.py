"""ONNX op converters: one module per op family, each registering with :func:`converter`.

A converter maps one ONNX node to IR nodes through the :class:`~hbc.frontend.onnx_import.
ImportContext`. Inputs that must be known at compile time (shapes, axes, pads, scales) are
declared ``static`` so the importer can name them in errors and tools can freeze them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Converter:
    op_type: str
    fn: Callable
    #: indices of inputs whose values must be constant at import time
    static: tuple[int, ...] = ()


CONVERTERS: dict[str, Converter] = {}


def converter(*op_types: str, static: tuple[int, ...] = ()) -> Callable:
    """Decorator: register ``fn(ctx, node)`` as the converter of the given ONNX op types."""

    def wrap(fn: Callable) -> Callable:
        for t in op_types:
            if t in CONVERTERS:
                raise RuntimeError(f"ONNX converter for {t} registered twice")
            CONVERTERS[t] = Converter(t, fn, tuple(static))
        return fn

    return wrap


def load_all() -> dict[str, Converter]:
    """Import every converter module (they register on import) and return the table."""
    from . import activation, elementwise, nn, pool, quant, reduce, resample, tensor  # noqa: F401

    return CONVERTERS
