"""Resource limits: sizes read from a file are checked before anything is allocated.

A shape in an ``.hbir``, ``.hbm``, ``.onnx``, ``.npy`` or ``.npz`` file (or one that shape
inference derives from it) may ask for more memory than the machine has; numpy would then fail
half-way with a ``MemoryError``, or the kernel would kill the process. Every reader instead calls
:func:`check_nbytes` with the size the tensor would need, and a size over the limit raises
:class:`~hbc.errors.ResourceLimitError` (exit 2) giving the size, the limit and what it belongs
to.

The limit is per tensor: ``HBC_MAX_TENSOR_BYTES`` when set (bytes, or a number with a ``K``,
``M``, ``G`` or ``T`` suffix, powers of 1024), else half the machine's physical memory (an op
holds its inputs and its output at once). Read on every call, so tests and users may change it
at run time. numpy-free and stdlib-only: the runtime uses it too.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Iterable

from hbc.errors import InputError, ResourceLimitError

ENV = "HBC_MAX_TENSOR_BYTES"
#: used when the physical memory cannot be read
FALLBACK_BYTES = 8 << 30
_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


@functools.lru_cache(maxsize=1)
def physical_memory() -> int:
    """Bytes of physical memory (FALLBACK_BYTES * 2 where the OS does not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):  # pragma: no cover - not POSIX
        return 2 * FALLBACK_BYTES


def parse_size(text: str) -> int:
    """``"1073741824"``, ``"512M"``, ``"4G"``, ``"1.5T"`` -> bytes; InputError otherwise."""
    s = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = s[-1:] if s[-1:] in _SUFFIXES else ""
    try:
        value = float(s[: len(s) - len(unit)])
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise InputError(f"{ENV}={text!r}: expected a positive size like 1073741824, 512M, 4G")
    return int(value * _SUFFIXES[unit])


def max_tensor_bytes() -> int:
    """The largest tensor (in bytes) a file may ask for: ``HBC_MAX_TENSOR_BYTES`` or half the
    physical memory."""
    text = os.environ.get(ENV)
    if text:
        return parse_size(text)
    return max(physical_memory() // 2, 1 << 20)


def fmt_bytes(n: int) -> str:
    """``n`` bytes for messages: ``4,294,967,296 bytes (4.0 GiB)``."""
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n:,} bytes ({n / size:.1f} {unit})"
    return f"{n:,} bytes"


def nbytes_of(shape: Iterable[int], itemsize: int) -> int:
    """Exact size of a tensor (Python ints: a crafted shape cannot overflow the product)."""
    return math.prod(int(d) for d in shape) * int(itemsize)


def check_nbytes(nbytes: int, what: str) -> int:
    """Raise ResourceLimitError when ``nbytes`` exceeds the limit; ``what`` names the tensor
    (and its file or node). Returns ``nbytes``."""
    limit = max_tensor_bytes()
    if nbytes > limit:
        raise ResourceLimitError(
            f"{what} needs {fmt_bytes(nbytes)}, more than the limit of {fmt_bytes(limit)}",
            hint=f"a damaged or hostile file? (the limit is half the physical memory; set {ENV} "
                 "to change it)")
    return nbytes


def check_shape(shape: Iterable[int], itemsize: int, what: str) -> int:
    """:func:`check_nbytes` of a tensor of ``shape`` and ``itemsize``; returns its bytes."""
    return check_nbytes(nbytes_of(shape, itemsize), what)


__all__ = ["ENV", "check_nbytes", "check_shape", "fmt_bytes", "max_tensor_bytes", "nbytes_of",
           "parse_size", "physical_memory"]
