"""The runtime: the ``.hbm`` reader and the bit-exact integer simulator.

numpy only: importing ``hbc.runtime`` loads neither torch, onnx, onnxruntime, lark, jinja2,
networkx, click nor rich (a test checks ``sys.modules``). ``Runtime(path)`` loads a model and
``Runtime.run(inputs)`` runs it; ``read_hbm`` validates a file and lists its sections and
models. docs/runtime.md describes both.
"""

from __future__ import annotations

from .hbm import HbmError, HbmFile, HbmModel, read_hbm
from .runtime import InputDesc, OutputDesc, Runtime

__all__ = ["HbmError", "HbmFile", "HbmModel", "InputDesc", "OutputDesc", "Runtime", "read_hbm"]
