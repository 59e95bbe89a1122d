"""hbc: an open graph-IR compiler and quantization toolchain for BPU-style NPUs.

Public API: :func:`load` a model (ONNX, .hbir, torch) as an IR graph, :func:`compile` models to an
``.hbm``, :class:`Runtime` to simulate one, :func:`interpret` a graph with
the float reference interpreter. Importing ``hbc`` loads neither torch nor onnx.
"""

from __future__ import annotations

from .api import interpret, load
from .check import check  # noqa: F401  (eager: a lazy import of hbc.check would shadow it)
from .errors import CheckFailed, HbcError, InputError

__version__ = "0.1.0"

_SUBPACKAGES = frozenset({"ir", "frontend", "passes", "backend", "runtime", "models", "quant"})
#: public functions and classes loaded on first use: name -> module
_LAZY = {"compile": "compiler", "Runtime": "runtime"}


def __getattr__(name: str):
    # ``hbc.ir.to_text`` works after a bare ``import hbc``; subpackages load on first use, so
    # importing hbc stays light.
    if name in _SUBPACKAGES:
        import importlib

        return importlib.import_module(f"hbc.{name}")
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"hbc.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'hbc' has no attribute '{name}'")


__all__ = ["load", "interpret", "compile", "Runtime", "HbcError", "InputError", "CheckFailed",
           "__version__"]
