"""The public Python API. Heavy libraries (onnx, torch) are imported inside the functions, so
``import hbc`` stays light and the runtime can be used with numpy alone."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import InputError

if TYPE_CHECKING:
    import numpy as np

    from hbc.ir.graph import Graph


def load(
    src: Any,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    *,
    constant_inputs: Mapping[str, np.ndarray] | None = None,
) -> Graph:
    """Load a model as an IR Graph.

    ``src``: a path to an ``.onnx`` or ``.hbir`` file, an ``onnx.ModelProto``, a
    ``(torch.nn.Module, example_inputs)`` pair, ``zoo:NAME`` for a model of the zoo
    (:mod:`hbc.models`, imported with the torch frontend), or a string ``module:function``
    naming a Python function that returns such a pair. ``input_shapes`` fixes dynamic ONNX
    input dimensions; ``constant_inputs`` freezes ONNX graph inputs to values.
    """
    if isinstance(src, tuple) and len(src) == 2:
        module = getattr(src[0], "module", src[0])  # a DistributedDataParallel wrapper
        if getattr(module, "hbc_qat", None) is not None:
            # a QAT module: the float graph with its learned scales, ready for lowering
            from hbc.quant.qat import export_graph

            return export_graph(module, src[1])
        from hbc.frontend.torch_import import import_torch

        return import_torch(src[0], src[1])
    if type(src).__name__ == "ModelProto" or isinstance(src, bytes):
        from hbc.frontend.onnx_import import import_onnx

        return import_onnx(src, input_shapes, constant_inputs)
    if isinstance(src, str) and src.startswith("zoo:"):
        return _load_zoo(src)
    if isinstance(src, (str, os.PathLike)):
        text = str(src)
        path = Path(text)
        suffix = path.suffix.lower()
        if suffix == ".hbir":
            from hbc.ir.io import load_hbir

            return load_hbir(path)
        if suffix == ".onnx" or (path.exists() and suffix not in (".py",)):
            from hbc.frontend.onnx_import import import_onnx

            return import_onnx(path, input_shapes, constant_inputs)
        if ":" in text and not path.exists():
            from hbc.frontend.torch_import import import_callable

            return import_callable(text)
        raise InputError(f"{text}: no such file")
    raise InputError(
        f"cannot load a model from {type(src).__name__}: expected a path (.onnx/.hbir), an "
        "onnx.ModelProto, a (torch.nn.Module, example_inputs) pair or 'module:function'"
    )


def _load_zoo(spec: str) -> Graph:
    """``zoo:NAME``: build the zoo model (seeded weights, standard input) and import it."""
    from hbc import models

    name = spec.removeprefix("zoo:")
    if name not in models.names():
        raise InputError(f"'{spec}': no zoo model named '{name}'",
                         hint="zoo models: " + ", ".join(models.names()))
    from hbc.frontend.torch_import import import_torch

    module, inputs = models.build(name)
    graph = import_torch(module, inputs)
    graph.name = name
    graph.meta["source"] = spec
    return graph


def interpret(graph: Graph, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run ``graph`` with the float reference interpreter; outputs keyed by output name."""
    from hbc.ir.interpret import interpret as _interpret

    return _interpret(graph, inputs)
