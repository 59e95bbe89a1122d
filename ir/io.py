"""Reading and writing .hbir files: the text plus a sidecar .npz of out-of-line constants.

``save(graph, "m.hbir")`` writes ``m.hbir`` (the text of ``to_text``) and, when the graph has
constants too big to print inline, ``m.npz`` holding them by name (one ``NAME.npy`` member per
constant, uncompressed, fixed timestamps: the same graph gives the same bytes). Each file is written
atomically (:func:`hbc.ir.atomic.write_atomic`, re-exported here), the sidecar first, so a reader
never sees a half-written file. ``load_hbir`` reads both (the sidecar through
:mod:`hbc.ir.npy`: loading never runs code, declared sizes are checked first); the sidecar is
only opened when the text refers to out-of-line data.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO

import numpy as np

from hbc.errors import InputError

from .atomic import write_atomic
from .graph import Graph
from .npy import NpzFile
from .parser import from_text
from .text import is_inline, to_text

_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def sidecar_path(path: str | os.PathLike) -> Path:
    """Where the out-of-line constants of an .hbir live: ``m.hbir`` -> ``m.npz``."""
    p = Path(path)
    return p.with_suffix(".npz") if p.suffix == ".hbir" else p.with_name(p.name + ".npz")


def save(graph: Graph, path: str | os.PathLike) -> None:
    """Write ``graph`` to ``path`` (.hbir text) plus its sidecar .npz when it needs one."""
    path = Path(path)
    text = to_text(graph)
    big = {}
    for v in graph.constant_values():
        data = graph.constants.get(v.name)
        if data is not None and not is_inline(data):
            big[v.name] = data
    if big:
        write_atomic(sidecar_path(path), lambda f: _write_npz(f, big))
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def load_hbir(path: str | os.PathLike) -> Graph:
    """Read an .hbir file and the data of its out-of-line constants from the sidecar .npz."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read {path}: {e}") from None
    with _Sidecar(sidecar_path(path)) as constants:
        return from_text(text, constants=constants, filename=str(path))


def _write_npz(f: IO[bytes], arrays: dict[str, np.ndarray]) -> None:
    # Written by hand rather than np.savez: constant names may be any string (savez takes them
    # as keyword arguments), and fixed timestamps make the file reproducible.
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(name + ".npy", date_time=_ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_STORED
            with zf.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asarray(array), allow_pickle=False)


class _Sidecar(Mapping):
    """The arrays of a sidecar .npz by name, opened on first lookup."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._npz = None
        #: named in from_text's "no data" error
        self.source = f"sidecar {path}" + ("" if path.exists() else " (no such file)")

    def _open(self) -> Mapping[str, np.ndarray]:
        if self._npz is None:
            # hbc.ir.npy: never unpickles, checks each declared size before allocating
            self._npz = NpzFile(self.path) if self.path.exists() else {}
        return self._npz

    def __getitem__(self, name: str) -> np.ndarray:
        return self._open()[name]  # KeyError when absent (the parser names the constant)

    def __iter__(self) -> Iterator[str]:
        return iter(self._open())

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __enter__(self) -> _Sidecar:
        return self

    def __exit__(self, *exc) -> None:
        if hasattr(self._npz, "close"):
            self._npz.close()
