"""Quantization on the PyTorch side: QAT (prepare, calibrate, fold BN, export, convert) and
the int_infer model.

Importing ``hbc.quant`` loads no torch: every public name is resolved on first use from the
submodule that defines it (see ``_LAZY``), so adding a name is one line there.

- :func:`build_int_infer` (``hbc.quant.int_infer``): a lowered integer IR graph as a
  ``torch.nn.Module`` computing the integer semantics of docs/quantization.md with torch ops,
  the second, independent implementation next to the numpy kernels of the op registry.
- :func:`prepare_qat`, :func:`calibrate`, :func:`fold_bn`, :func:`export_graph`,
  :func:`convert` (``hbc.quant.qat``): fake-quantized training that mimics the integer scheme,
  and the way from a trained QAT module to a calibrated IR graph and to int_infer.
"""

from __future__ import annotations

import importlib
from typing import Any

#: public name -> submodule of hbc.quant that defines it
_LAZY: dict[str, str] = {
    "IntInferModule": "int_infer",
    "build_int_infer": "int_infer",
    "prepare_qat": "qat",
    "calibrate": "qat",
    "fold_bn": "qat",
    "export_graph": "qat",
    "convert": "qat",
    "quantized_values": "qat",
    "ActFakeQuant": "fake_quant",
    "FusedConvBN": "fake_quant",
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
