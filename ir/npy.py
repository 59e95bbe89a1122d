"""Reading ``.npy`` and ``.npz`` files without trusting them.

``np.load`` allocates what a file's header declares before it reads the data, so a crafted
header (``shape (10**12,)``) fails with a ``MemoryError`` or gets the process killed, and a file
holding Python objects needs pickle. Here the header is read first (``numpy.lib.format``,
which parses it with ``ast.literal_eval``, never ``eval``), then:

- object dtypes are refused (loading them would unpickle: run code);
- the declared size is checked against :func:`hbc.ir.limits.check_nbytes` and against the
  bytes the file (or zip member) actually holds, so a truncated file is named as such;
- only then is the array allocated and filled.

Every problem is an :class:`~hbc.errors.InputError` naming the file (and the member of an
``.npz``) and what is wrong. numpy and the stdlib only: the runtime may use it.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO

import numpy as np

from hbc.errors import InputError

from .limits import check_nbytes, fmt_bytes, nbytes_of

_MAX_HEADER = 10_000  # numpy's own default bound on a header's size


def read_npy(path: str | os.PathLike, what: str = "") -> np.ndarray:
    """The array of one ``.npy`` file; InputError naming ``path`` (and ``what`` it is for)."""
    label = f"{path} ({what})" if what else str(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if f.read(4) == b"PK\x03\x04":
                raise InputError(f"{label}: an .npz archive, expected one .npy array",
                                 hint="give each array its own .npy file")
            f.seek(0)
            return read_array(f, label, size)
    except FileNotFoundError:
        raise InputError(f"{label}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{label}: is a directory, expected an .npy file") from None
    except OSError as e:
        raise InputError(f"{label}: cannot read it ({e.strerror or e})") from None


def read_array(f: IO[bytes], label: str, size: int | None = None) -> np.ndarray:
    """Read one ``.npy`` stream from ``f`` (at its start); ``size`` is the stream's length in
    bytes when known (then a too-short stream is reported before allocating)."""
    try:
        version = np.lib.format.read_magic(f)
    except (ValueError, EOFError) as e:
        raise InputError(f"{label}: not an .npy array ({e})",
                         hint="write it with numpy.save") from None
    try:
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f, _MAX_HEADER)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f, _MAX_HEADER)
        else:
            raise InputError(f"{label}: .npy format version {version[0]}.{version[1]} is not "
                             "supported (1.0 and 2.0 are)", hint="write it with numpy.save")
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - numpy's header parser raises ValueError,
        # SyntaxError, tokenize.TokenError, TypeError...: all mean a damaged header
        raise InputError(f"{label}: damaged .npy header ({_first_line(e)})") from None
    if dtype.hasobject:
        raise InputError(f"{label}: holds Python objects ({dtype}), which are never loaded "
                         "(that would unpickle, i.e. run code from the file)",
                         hint="save a plain numeric array with numpy.save")
    if any(d < 0 for d in shape):
        raise InputError(f"{label}: negative dimension in shape {list(shape)}")
    nbytes = nbytes_of(shape, dtype.itemsize)
    check_nbytes(nbytes, f"{label}: array {dtype}{list(shape)}")
    if size is not None and size - f.tell() < nbytes:
        raise InputError(f"{label}: truncated: the header declares {dtype}{list(shape)} "
                         f"({fmt_bytes(nbytes)}), the file holds {fmt_bytes(size - f.tell())} "
                         "of data")
    buf = bytearray(nbytes)
    view = memoryview(buf)
    got = 0
    while got < nbytes:
        try:
            n = f.readinto(view[got:])  # type: ignore[attr-defined]
        except Exception as e:  # noqa: BLE001 - OSError, zipfile.BadZipFile (CRC), zlib...
            raise InputError(f"{label}: cannot read the array data ({_first_line(e)})") from None
        if not n:
            raise InputError(f"{label}: truncated: the header declares {dtype}{list(shape)} "
                             f"({fmt_bytes(nbytes)}), the data ends after {fmt_bytes(got)}")
        got += n
    return np.ndarray(tuple(shape), dtype, buffer=buf, order="F" if fortran else "C")


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` by name (``NAME.npy`` members), in the archive's order."""
    with NpzFile(path) as npz:
        return {name: npz[name] for name in npz}


class NpzFile(Mapping):
    """The arrays of an ``.npz`` by name, each read (and checked) when looked up."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            self._zip = zipfile.ZipFile(self.path)
        except FileNotFoundError:
            raise InputError(f"{self.path}: no such file") from None
        except IsADirectoryError:
            raise InputError(f"{self.path}: is a directory, expected an .npz file") from None
        except Exception as e:  # noqa: BLE001 - zipfile raises BadZipFile, OSError,
            # ValueError, NotImplementedError (unknown versions), struct.error...
            raise InputError(f"{self.path}: not a readable .npz file (not a zip archive: "
                             f"{_first_line(e)})", hint="write it with numpy.savez") from None
        self._members: dict[str, zipfile.ZipInfo] = {}
        for info in self._zip.infolist():
            if info.is_dir():
                continue
            if not info.filename.endswith(".npy"):
                self.close()
                raise InputError(f"{self.path}: member '{info.filename}' is not an .npy array",
                                 hint="write it with numpy.savez")
            name = info.filename[:-4]
            if name in self._members:
                self.close()
                raise InputError(f"{self.path}: array '{name}' appears twice in the archive")
            self._members[name] = info

    def __getitem__(self, name: str) -> np.ndarray:
        info = self._members[name]
        label = f"{self.path}: array '{name}'"
        try:
            with self._zip.open(info) as f:
                return read_array(f, label, info.file_size)
        except InputError:
            raise
        except Exception as e:  # noqa: BLE001 - a bad member header, encryption, an unknown
            # compression, a CRC mismatch: zipfile's many exception types
            raise InputError(f"{label}: cannot read it ({_first_line(e)})") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._members)

    def __len__(self) -> int:
        return len(self._members)

    def close(self) -> None:
        self._zip.close()

    def __enter__(self) -> NpzFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


__all__ = ["NpzFile", "read_array", "read_npy", "read_npz"]
