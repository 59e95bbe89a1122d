"""Reading and writing .hbir files: the text plus a sidecar .npz of out-of-line constants.

``save(graph, "m.hbir")`` writes ``m.hbir`` (the text of ``to_text``) and, when the graph has
constants too big to print inline, ``m.npz`` holding them by name (one ``NAME.npy`` member per
constant, uncompressed, fixed timestamps: the same graph gives the same bytes). Each file is written
to a temporary name in the same folder and moved into place with ``os.replace``, the sidecar first,
so a reader never sees a half-written file. ``load_hbir`` reads both (``allow_pickle=False``:
loading never runs code); the sidecar is only opened when the text refers to out-of-line data.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO

import numpy as np

from hbc.errors import InputError

from .graph import Graph
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


def write_atomic(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write ``path`` through ``write(file)`` into a temporary file in the same folder, then
    ``os.replace`` it into place: a reader never sees a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class _Sidecar(Mapping):
    """The arrays of a sidecar .npz by name, opened on first lookup."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._npz = None
        #: named in from_text's "no data" error
        self.source = f"sidecar {path}" + ("" if path.exists() else " (no such file)")

    def _open(self):
        if self._npz is None:
            if not self.path.exists():
                self._npz = {}
            else:
                try:
                    self._npz = np.load(self.path, allow_pickle=False)
                except (OSError, ValueError, zipfile.BadZipFile) as e:
                    raise InputError(f"{self.path}: not a readable .npz sidecar ({e})") from None
        return self._npz

    def __getitem__(self, name: str) -> np.ndarray:
        npz = self._open()
        if name not in npz:
            raise KeyError(name)
        try:
            return npz[name]
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise InputError(f"{self.path}: cannot read array '{name}' ({e})") from None

    def __iter__(self) -> Iterator[str]:
        npz = self._open()
        return iter(npz.files if hasattr(npz, "files") else npz)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __enter__(self) -> _Sidecar:
        return self

    def __exit__(self, *exc) -> None:
        if hasattr(self._npz, "close"):
            self._npz.close()
