"""March descriptions: the facts of each target chip, as data (``backend/marches/<name>.toml``).

One TOML file per march, read with the standard library's ``tomllib``. Sections:

``[march]``     name, the public product that carries the BPU, a one-line summary
``[hardware]``  BPU cores, clock, MACs per cycle by activation dtype, on-chip memory, DDR
                bandwidth, compute-array alignment, sustained efficiency, vector unit, per-layer
                and per-frame overheads (the static estimator's machine model, backend/perf.py)
``[cpu]``       the application CPU: cores and the cost of fallback float ops and of
                quantize/dequantize per element
``[lowering]``  ``int16`` (may activations be int16), ``no_integer`` (integer forms the march
                lacks: those ops run on the CPU), ``[lowering.fusion]`` limits of the fuse pass
``[sources]``   for each number: ``public: ...``, ``assumed: ...`` or ``calibrated: against ...``
``[ops.*]``     per-op constraint tables of the checker (backend/constraints.py)

``load_march("nash")`` resolves the alias ``nash`` -> ``nash-e``. Every problem in a file raises
:class:`~hbc.errors.InputError` naming the file, section and field. The hardware model and where
each number comes from are explained in docs/marches-hardware.md.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from hbc.errors import InputError

MARCH_DIR = Path(__file__).resolve().parent / "marches"

#: alternative names accepted by :func:`load_march`
ALIASES: dict[str, str] = {"nash": "nash-e"}

#: activation dtypes a march may list in ``macs_per_cycle``
MAC_DTYPES = ("i8", "i16")

_HARDWARE_INT = ("cores", "onchip_bytes", "vector_bytes_per_cycle", "gather_elements_per_cycle",
                 "layer_overhead_cycles")
_HARDWARE_FLOAT = ("clock_hz", "ddr_bytes_per_s", "array_efficiency", "frame_overhead_us")
_CPU_NUMBERS = ("cores", "clock_hz", "quantize_ns_per_element", "dequantize_ns_per_element",
                "float_ns_per_element", "float_macs_per_s", "op_overhead_us")
_ALIGN_KEYS = ("cin", "cout", "width", "height")


@dataclass(frozen=True)
class March:
    """One march: the typed fields the passes and the estimator use, plus the raw tables.

    ``macs_per_cycle`` is per core, by activation dtype (``"i16"`` only on int16 marches);
    ``align`` is the compute-array granularity: input channels per group, output channels,
    output width and height are padded up to these multiples.
    """

    name: str
    cores: int
    clock_hz: float
    macs_per_cycle: dict[str, int] = field(hash=False)
    int16: bool
    onchip_bytes: int
    ddr_bytes_per_s: float
    align: dict[str, int] = field(hash=False)
    hardware: dict = field(hash=False, repr=False)
    cpu: dict = field(hash=False, repr=False)
    lowering: dict = field(hash=False, repr=False)
    ops: dict = field(hash=False, repr=False)
    sources: dict = field(hash=False, repr=False)
    path: str = field(default="", compare=False, repr=False)

    @property
    def peak_tops(self) -> float:
        """Nominal int8 TOPS of all cores (2 ops per MAC)."""
        return self.cores * self.clock_hz * self.macs_per_cycle["i8"] * 2 / 1e12

    @property
    def no_integer(self) -> frozenset[str]:
        """Integer op forms the march lacks (their float ops run on the CPU)."""
        return frozenset(self.lowering.get("no_integer", ()))

    @property
    def fusion_limits(self) -> dict[str, Any]:
        """Limits of the fuse pass (lists as tuples), e.g. ``{"residual_strides": (1, 2)}``."""
        return {k: tuple(v) if isinstance(v, list) else v
                for k, v in self.lowering.get("fusion", {}).items()}


def march_names() -> list[str]:
    """The known marches (file names of backend/marches/*.toml), sorted."""
    return sorted(p.stem for p in MARCH_DIR.glob("*.toml"))


def load_march(name: str) -> March:
    """Read march ``name`` (or an alias such as ``nash``); InputError listing the known marches
    when there is no such march, or naming the file/section/field of a malformed entry."""
    if isinstance(name, March):
        return name
    key = ALIASES.get(str(name).lower(), str(name).lower())
    path = MARCH_DIR / f"{key}.toml"
    if not path.is_file():
        known = march_names()
        aliases = ", ".join(f"{a} -> {t}" for a, t in sorted(ALIASES.items()))
        raise InputError(f"unknown march '{name}' (known: {', '.join(known)}; aliases: "
                         f"{aliases})", hint="pick one of the listed marches")
    return _parse(path, _read(path))


def _read(path: Path) -> dict:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"{path}: not valid TOML: {e}") from None


def _parse(path: Path, data: dict) -> March:
    where = str(path)
    sections = {s: _table(data, s, where) for s in ("march", "hardware", "cpu", "lowering",
                                                    "sources")}
    hw, cpu, low = sections["hardware"], sections["cpu"], sections["lowering"]
    name = sections["march"].get("name")
    if name != path.stem:
        raise InputError(f"{where} [march] name: expected '{path.stem}' (the file name), got "
                         f"{name!r}")
    for key in _HARDWARE_INT:
        _number(hw, key, f"{where} [hardware]", integer=True)
    for key in _HARDWARE_FLOAT:
        _number(hw, key, f"{where} [hardware]")
    for key in _CPU_NUMBERS:
        _number(cpu, key, f"{where} [cpu]")
    if not 0 < hw["array_efficiency"] <= 1:
        raise InputError(f"{where} [hardware] array_efficiency: must be in (0, 1], got "
                         f"{hw['array_efficiency']}")
    macs = _int_table(hw, "macs_per_cycle", f"{where} [hardware]", MAC_DTYPES)
    if "i8" not in macs:
        raise InputError(f"{where} [hardware] macs_per_cycle: needs an 'i8' entry")
    align = _int_table(hw, "align", f"{where} [hardware]", _ALIGN_KEYS)
    int16 = low.get("int16")
    if not isinstance(int16, bool):
        raise InputError(f"{where} [lowering] int16: expected true or false, got {int16!r}")
    if int16 != ("i16" in macs):
        raise InputError(f"{where} [hardware] macs_per_cycle: an 'i16' entry is required "
                         "exactly when [lowering] int16 = true")
    no_int = low.get("no_integer", [])
    if not isinstance(no_int, list) or not all(isinstance(s, str) for s in no_int):
        raise InputError(f"{where} [lowering] no_integer: expected a list of op names")
    if not isinstance(low.get("fusion", {}), dict):
        raise InputError(f"{where} [lowering] fusion: expected a table")
    ops = {k: v for k, v in data.get("ops", {}).items()} if isinstance(data.get("ops"), dict) \
        else {}
    return March(
        name=name, cores=hw["cores"], clock_hz=float(hw["clock_hz"]),
        macs_per_cycle=macs, int16=int16, onchip_bytes=hw["onchip_bytes"],
        ddr_bytes_per_s=float(hw["ddr_bytes_per_s"]), align={**dict.fromkeys(_ALIGN_KEYS, 1),
                                                             **align},
        hardware=copy.deepcopy(hw), cpu=copy.deepcopy(cpu), lowering=copy.deepcopy(low),
        ops=copy.deepcopy(ops), sources=copy.deepcopy(sections["sources"]), path=where)


def _table(data: dict, section: str, where: str) -> dict:
    value = data.get(section)
    if not isinstance(value, dict):
        raise InputError(f"{where}: missing section [{section}]")
    return value


def _number(table: dict, key: str, where: str, *, integer: bool = False) -> None:
    value = table.get(key)
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool) or value < 0:
        kind = "a non-negative integer" if integer else "a non-negative number"
        raise InputError(f"{where} {key}: expected {kind}, got {value!r}")


def _int_table(table: dict, key: str, where: str, allowed: tuple[str, ...]) -> dict[str, int]:
    value = table.get(key)
    if not isinstance(value, dict) or not value:
        raise InputError(f"{where} {key}: expected a table such as {{ {allowed[0]} = 8 }}")
    for k, v in value.items():
        if k not in allowed:
            raise InputError(f"{where} {key}.{k}: unknown key (allowed: {', '.join(allowed)})")
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise InputError(f"{where} {key}.{k}: expected a positive integer, got {v!r}")
    return dict(value)
