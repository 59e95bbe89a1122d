"""Quantization on the PyTorch side: the int_infer model (and, later, QAT and calibration).

Importing ``hbc.quant`` loads no torch: every public name is resolved on first use from the
submodule that defines it (see ``_LAZY``), so adding a name is one line there.

- :func:`build_int_infer` (``hbc.quant.int_infer``): a lowered integer IR graph as a
  ``torch.nn.Module`` computing the integer semantics of docs/quantization.md with torch ops,
  the second, independent implementation next to the numpy kernels of the op registry.
"""

from __future__ import annotations

import importlib
from typing import Any

#: public name -> submodule of hbc.quant that defines it
_LAZY: dict[str, str] = {
    "IntInferModule": "int_infer",
    "build_int_infer": "int_infer",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'hbc.quant' has no attribute '{name}'")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
