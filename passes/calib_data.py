"""Reading calibration data: ``.npz`` files, folders of them, iterables, torch DataLoaders.

Every source becomes a stream of per-run input dicts ``{input_name: array}`` whose arrays have
exactly the graph inputs' shapes and dtypes (so :func:`hbc.ir.interpret.interpret` accepts them).

- ``.npz`` (read by :mod:`hbc.ir.npy`: no pickle, declared sizes checked first): keys are
  input names, each array holds N samples stacked along the batch axis (``(N, C, H, W)`` for a
  ``1xCxHxW`` input); N must be a multiple of the graph's batch size B and the same for every
  key. Split into N / B runs.
- a folder: its ``*.npz`` files, sorted by name.
- a mapping ``{name: array}``: like one in-memory ``.npz``.
- an iterable of such mappings (torch tensors allowed), or of bare arrays for single-input
  graphs.
- a ``torch.utils.data.DataLoader`` yielding dicts, tensors (single-input graphs) or tuples whose
  first element is the input (``(x, label)`` datasets). A batch shaped ``(b, *input_shape)``
  (datasets of full input tensors) counts as ``b * B`` samples. torch is only touched here when
  the source is a DataLoader, which means the caller already imported it.

float64 is cast to float32 where the input is f32; any other dtype mismatch, a wrong key or
shape, and NaN/Inf are InputErrors naming the file (or item) and the key, with the sample index.
"""

from __future__ import annotations

import os
import sys
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from hbc.errors import InputError
from hbc.ir.graph import Graph
from hbc.ir.npy import read_npz


class CalibData:
    """A re-iterable stream of per-run input dicts for ``graph`` (see the module docstring).

    ``num_samples`` is the number of samples (batch entries) when known up front, else None.
    ``reiterable`` is False for one-shot sources (generators, iterators).
    """

    def __init__(self, source: Any, graph: Graph) -> None:
        self.graph = graph
        self.inputs = {v.name: v for v in graph.inputs}
        if not self.inputs:
            raise InputError(f"graph '{graph.name}' has no inputs to calibrate")
        self.batch = _batch_size(graph)
        self.files: list[Path] | None = None
        self.source = source
        self.kind = "iterable"
        if isinstance(source, (str, os.PathLike)):
            self.files = _npz_files(Path(source))
            self.kind = "files"
        elif isinstance(source, Mapping):
            self.kind = "mapping"
        elif _is_dataloader(source):
            self.kind = "dataloader"
        elif not isinstance(source, Iterable):
            raise InputError(f"calibration data: cannot read a {type(source).__name__}; give an "
                             ".npz file, a folder of them, an iterable of dicts or a DataLoader")
        self.reiterable = self.kind != "iterable" or iter(source) is not source
        self.num_samples = self._count()

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        start = 0
        for where, item in self._batches():
            for run in self._split(item, where, start):
                start += self.batch
                yield run

    # -- sources ---------------------------------------------------------------------------
    def _batches(self) -> Iterator[tuple[str, Mapping[str, Any]]]:
        if self.kind == "files":
            for path in self.files or ():
                yield str(path), _load_npz(path)
        elif self.kind == "mapping":
            yield "calibration data", self.source
        else:
            what = "DataLoader batch" if self.kind == "dataloader" else "calibration data item"
            for i, item in enumerate(self.source):
                yield f"{what} {i}", self._as_mapping(item, f"{what} {i}")

    def _as_mapping(self, item: Any, where: str) -> Mapping[str, Any]:
        if isinstance(item, Mapping):
            return item
        if self.kind == "dataloader" and isinstance(item, (tuple, list)) and item:
            item = item[0]
        if len(self.inputs) == 1 and hasattr(item, "shape"):
            return {next(iter(self.inputs)): item}
        names = ", ".join(self.inputs)
        raise InputError(f"{where}: got a {type(item).__name__}, expected a dict keyed by input "
                         f"name ({names})")

    def _count(self) -> int | None:
        if self.kind == "files":
            return sum(_npz_samples(p) for p in self.files or ())
        if self.kind == "mapping":
            return _first_dim(self.source, self.inputs)
        if self.kind == "dataloader":
            dataset = getattr(self.source, "dataset", None)
            try:
                n = len(dataset)  # type: ignore[arg-type]
            except TypeError:
                return None
            return n
        if isinstance(self.source, (list, tuple)):
            dims = [_first_dim(x if isinstance(x, Mapping) else {"": x}, self.inputs)
                    for x in self.source]
            return None if any(d is None for d in dims) else sum(dims)  # type: ignore[misc]
        return None

    # -- checks ------------------------------------------------------------------------------
    def _split(self, item: Mapping[str, Any], where: str, start: int
               ) -> Iterator[dict[str, np.ndarray]]:
        """Check one batch of samples and split it into runs of the graph's batch size."""
        keys = [str(k) for k in item]
        missing = [n for n in self.inputs if n not in keys]
        unknown = [k for k in keys if k not in self.inputs]
        if missing or unknown:
            parts = ([f"missing key(s) {', '.join(map(repr, missing))}"] if missing else []) + (
                [f"unknown key(s) {', '.join(map(repr, unknown))}"] if unknown else [])
            raise InputError(f"{where}: {'; '.join(parts)}", hint="keys must be the graph's input "
                             f"names: {', '.join(self.inputs)}")
        arrays = {name: self._check(name, _to_numpy(item[name]), where, start)
                  for name in self.inputs}
        counts = {name: a.shape[0] for name, a in arrays.items()}
        if len(set(counts.values())) > 1:
            raise InputError(f"{where}: inputs hold different numbers of samples ("
                             + ", ".join(f"'{k}': {n}" for k, n in counts.items()) + ")")
        n = next(iter(counts.values()))
        for lo in range(0, n, self.batch):
            yield {name: a[lo:lo + self.batch] for name, a in arrays.items()}

    def _check(self, name: str, arr: np.ndarray, where: str, start: int) -> np.ndarray:
        v = self.inputs[name]
        shape, want = v.shape, v.type.np_dtype
        if arr.ndim == len(shape) + 1 and tuple(arr.shape[1:]) == shape:
            arr = arr.reshape(-1, *shape[1:])  # a batch of full input tensors
        per_sample = tuple(shape[1:])
        if (arr.ndim != len(shape) or tuple(arr.shape[1:]) != per_sample or not arr.shape[0]
                or arr.shape[0] % self.batch):
            raise InputError(
                f"{where}: '{name}' has shape {list(arr.shape)}, expected (N, "
                f"{', '.join(map(str, per_sample))}) with N a multiple of the batch size "
                f"{self.batch} (input %{name}: {v.dtype}{list(shape)})")
        if arr.dtype != want:
            if not (arr.dtype == np.float64 and want == np.float32):
                raise InputError(f"{where}: '{name}' has dtype {arr.dtype}, input %{name} is "
                                 f"{v.dtype}", hint="only float64 is cast (to float32); convert "
                                 "other dtypes before calibrating")
            _check_finite(arr, name, where, start, "contains NaN or Inf")
            with np.errstate(over="ignore"):
                arr = arr.astype(np.float32)
            _check_finite(arr, name, where, start, "holds float64 values beyond the float32 "
                          "range (|x| > 3.4e38)")
        if arr.dtype.kind == "f":
            _check_finite(arr, name, where, start, "contains NaN or Inf")
        return np.ascontiguousarray(arr)


def _check_finite(arr: np.ndarray, name: str, where: str, start: int, what: str) -> None:
    """InputError naming the first sample of ``arr`` with a NaN or Inf (never a scale made
    from one)."""
    bad = ~np.isfinite(arr.reshape(arr.shape[0], -1)).all(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InputError(f"{where}: '{name}' sample {i} (calibration sample {start + i}) {what}")


def load_calib_data(source: Any, graph: Graph) -> CalibData:
    """Calibration data for ``graph`` from a path (``.npz`` or folder), a mapping, an iterable
    of dicts or a torch DataLoader: an iterable of ``{input_name: array}`` runs, re-iterable
    unless ``source`` is a one-shot iterator (see :class:`CalibData`)."""
    return source if isinstance(source, CalibData) else CalibData(source, graph)


# -- helpers -----------------------------------------------------------------------------------
def _batch_size(graph: Graph) -> int:
    sizes = {v.shape[0] for v in graph.inputs if v.shape}
    if len(sizes) > 1 or any(not v.shape for v in graph.inputs):
        raise InputError(f"graph '{graph.name}': calibration needs inputs with one common batch "
                         "axis (axis 0); got " + ", ".join(
                             f"%{v.name}: {list(v.shape)}" for v in graph.inputs))
    return max(next(iter(sizes)), 1)


def _is_dataloader(obj: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.utils.data.DataLoader)


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _npz_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".npz" and p.is_file())
        if not files:
            raise InputError(f"{path}: folder holds no .npz files")
        return files
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.suffix.lower() != ".npz":
        raise InputError(f"{path}: calibration data must be an .npz file or a folder of them")
    return [path]


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    # hbc.ir.npy: headers checked (no object arrays, sizes within the limit, not truncated)
    # before anything is allocated; never unpickles
    return read_npz(path)


def _npz_samples(path: Path) -> int:
    """Samples in an .npz from its first array's header (no data read); 0 if unreadable (the
    error is raised when the file is read)."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = sorted(n for n in zf.namelist() if n.endswith(".npy"))
            if not names:
                return 0
            with zf.open(names[0]) as f:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                shape = read(f)[0]
            return int(shape[0]) if shape else 0
    except Exception:  # noqa: BLE001 - only a progress total; reading reports the real error
        return 0


def _first_dim(item: Mapping[str, Any], inputs: Mapping[str, Any]) -> int | None:
    """Samples in one in-memory batch, or None when its shape says nothing clear."""
    for key, value in item.items():
        shape = getattr(value, "shape", None)
        v = inputs.get(key) or next(iter(inputs.values()))
        rank = len(v.shape)
        if shape is None or len(shape) not in (rank, rank + 1) or not len(shape):
            return None
        return int(shape[0]) if len(shape) == rank else int(shape[0]) * int(shape[1])
    return None
