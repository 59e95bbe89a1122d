"""Atomic file output: a file hbc writes is either absent, its old version, or complete.

:func:`write_atomic` (re-exported by ``hbc.ir.io``; every file the library and the CLI write
goes through it) writes into a file in the target's folder that has no name yet and gives it
the target's name only once everything is written and synced:

- On Linux, the file is opened with ``O_TMPFILE`` (an unnamed inode) and, when complete, linked
  to the target with ``linkat(AT_EMPTY_PATH)`` (straight to the name if it is free, else to a
  temporary name that ``os.replace`` moves over the old file). A process killed mid-write, even
  by SIGKILL, leaves nothing behind: the kernel frees the unnamed inode.
- Elsewhere (or when the folder's filesystem or the kernel refuses), a temporary
  ``.NAME.XXXX.tmp`` in the same folder is written and ``os.replace``-d into place; it is
  removed when the write fails or the process is interrupted (KeyboardInterrupt, SIGTERM: the
  CLI turns SIGTERM into ``SystemExit``), though a SIGKILL can leave it.

A failing write (no such folder, permission denied, disk full) raises InputError naming the
path. stdlib only.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO

from hbc.errors import InputError

_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000
#: permissions of written files (the temporary files start as 0600)
MODE = 0o644


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], object]) -> None:
    """Write ``path`` through ``write(file)`` so that no reader (and no crash) ever sees it
    half-written; InputError naming ``path`` when it cannot be written."""
    path = Path(path)
    try:
        fd = _unnamed_file(path.parent)
        if fd is None:
            _write_named(path, write)
            return
        with os.fdopen(fd, "w+b") as f:
            write(f)
            _sync(f)
            os.fchmod(f.fileno(), MODE)
            if _link(f.fileno(), path):
                return
            f.seek(0)  # linkat refused: publish a copy through a named temporary file
            _write_named(path, lambda out: shutil.copyfileobj(f, out))
    except OSError as e:
        raise InputError(f"cannot write {path}: {e.strerror or e}") from None


def _sync(f: IO[bytes]) -> None:
    f.flush()
    os.fsync(f.fileno())  # the data is on disk before the name points at it


def _write_named(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            _sync(f)
        os.chmod(tmp, MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@functools.lru_cache(maxsize=1)
def _linkat() -> Callable[..., int] | None:
    if not hasattr(os, "O_TMPFILE"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).linkat
    except (OSError, AttributeError):  # pragma: no cover - no libc symbol
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def _unnamed_file(folder: Path) -> int | None:
    """A writable file without a name in ``folder``, or None where that is not possible."""
    if _linkat() is None:
        return None
    try:
        return os.open(folder, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, MODE)
    except OSError:  # no such folder (reported by the fallback), EOPNOTSUPP, EISDIR...
        return None


def _link(fd: int, path: Path) -> bool:
    """Give the unnamed file ``fd`` the name ``path`` (replacing a file there); False when the
    kernel refuses linkat on it (then nothing was changed)."""
    linkat = _linkat()
    assert linkat is not None
    if linkat(fd, b"", _AT_FDCWD, os.fsencode(path), _AT_EMPTY_PATH) == 0:
        return True
    if ctypes.get_errno() != errno.EEXIST:
        return False  # EPERM (older kernels without CAP_DAC_READ_SEARCH), EXDEV, ...
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    if linkat(fd, b"", _AT_FDCWD, os.fsencode(tmp), _AT_EMPTY_PATH) != 0:
        return False
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return True


__all__ = ["write_atomic"]
