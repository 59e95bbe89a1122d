"""The IR of hbc: Graph, Node, Value, tensor types, the op registry and the .hbir text form.

Kept import-light (numpy; lark only when parsing): nothing here imports torch or onnx.
"""

from __future__ import annotations

from .io import load_hbir, save
from .parser import from_text
from .text import to_text

__all__ = ["from_text", "load_hbir", "save", "to_text"]
