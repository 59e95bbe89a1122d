"""Per-march op constraints as data: the ``[ops.*]`` tables of ``backend/marches/<march>.toml``.

A table per op says where the op runs on the march (``unit = "bpu"`` or ``"cpu"``) and lists
rules over named quantities of a node::

    [ops.conv]
    unit = "bpu"
    kernel = { max = 7, hint = "split the {actual} kernel into two {split} convs" }
    dilation = { power_of_2 = true, hint = "..." }

A rule holds one or more checks, ``max``, ``min``, ``one_of`` (a list), ``subset_of`` (a list:
every element of the quantity must be in it) and ``power_of_2``, plus a ``hint`` (placeholders
``{actual}``, ``{allowed}``, ``{march}``, ``{op}``, ``{split}``) and an optional ``source``
(``"public"``, the default, or ``"assumed"``). A quantity that is a tuple (a kernel's HxW) passes
when every element passes. A quantity that does not apply to a node (the residual stride of a
conv without a fused residual) is ``None`` and skips its rules. ``[ops] base = "bayes"`` makes a
march start from another march's tables; its own ``[ops.X]`` replaces X whole.

Quantities are small functions of an :class:`OpView` (a node seen as its float op, channels
first), registered per table in ``backend/quantities.py``, so adding a constraint is an edit of
the data, and adding a quantity one function there. Two pseudo
tables exist: ``input`` (every graph input, viewed as a one-input op) and ``all_bpu`` (rules for
every node that runs on the BPU). ``python -m hbc.backend.constraints --markdown`` prints
docs/marches.md from the tables.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from hbc.errors import InputError

from .quantities import COMMON, QUANTITIES, OpView, Quantity, quantities_of  # noqa: F401

UNITS = ("bpu", "cpu", "unsupported")
CHECKS = ("max", "min", "one_of", "subset_of", "power_of_2")
RULE_META = ("hint", "source")
TABLE_META = ("unit", "hint", "source", "note")
SOURCES = ("public", "assumed")
PSEUDO_TABLES = {"input": "every graph input (a model input as the runtime feeds it)",
                 "all_bpu": "every node that runs on the BPU, in addition to its own table"}

#: IR ops that share another op's table (the table key is the float op the march documents);
#: lowered q-ops are viewed as their float op by the checker (hbc.backend.legality).
TABLE_OF = {
    "conv_fused": "conv", "qconv": "conv", "gemm": "linear", "qlinear": "linear",
    "sigmoid": "lut", "tanh": "lut", "hard_sigmoid": "lut", "hard_swish": "lut",
    "leaky_relu": "lut", "qadd": "add", "qmul": "mul", "qavg_pool": "avg_pool",
    "qglobal_avg_pool": "global_avg_pool", "qresize": "resize", "qgrid_sample": "grid_sample",
    "qsoftmax": "softmax",
}
#: ops that are no table's business: quantize/dequantize are the BPU/CPU boundaries
BOUNDARY_OPS = ("quantize", "dequantize")


# -- tables ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    """One constraint on a quantity; ``checks`` maps a check kind to its limit."""

    quantity: str
    checks: Mapping[str, Any]
    hint: str = ""
    source: str = "public"

    def passes(self, actual: Any) -> bool:
        """Does the quantity's value meet every check (tuples: every element)?"""
        items = actual if isinstance(actual, tuple) else (actual,)
        c = self.checks
        if "subset_of" in c and not set(items) <= set(c["subset_of"]):
            return False
        for e in items if set(c) - {"subset_of"} else ():
            if "max" in c and e > c["max"] or "min" in c and e < c["min"]:
                return False
            if "one_of" in c and e not in c["one_of"]:
                return False
            if c.get("power_of_2") and not _pow2(e):
                return False
        return True

    def allowed(self, fmt: str = "scalar", n: int = 1) -> str:
        """The checks in words: 'at most 7x7', 'a power of 2', '1 or 2', 'only H, W'."""
        c, parts = self.checks, []

        def lim(x: Any) -> str:
            return "x".join([fmt_value(x)] * n) if fmt == "dims" else fmt_value(x)

        if "one_of" in c:
            parts.append(_or([fmt_value(x) for x in c["one_of"]]))
        if "subset_of" in c:
            parts.append("only " + ", ".join(map(str, c["subset_of"])) if c["subset_of"]
                         else "none")
        if c.get("power_of_2"):
            parts.append("a power of 2")
        if "min" in c and "max" in c:
            parts.append(f"{lim(c['min'])} to {lim(c['max'])}")
        elif "max" in c:
            parts.append(f"at most {lim(c['max'])}")
        elif "min" in c:
            parts.append(f"at least {lim(c['min'])}")
        return ", ".join(parts)


@dataclass(frozen=True)
class OpTable:
    """Where one op runs on a march and the rules it must meet there."""

    key: str
    unit: str
    rules: tuple[Rule, ...] = ()
    hint: str = ""
    source: str = "public"
    note: str = ""


@dataclass(frozen=True)
class MarchConstraints:
    """The constraint tables of one march."""

    march: str
    tables: Mapping[str, OpTable] = field(default_factory=dict)
    base: str | None = None

    def table(self, key: str) -> OpTable | None:
        return self.tables.get(key)


def _pow2(x: Any) -> bool:
    if isinstance(x, int):
        return x > 0 and x & (x - 1) == 0
    return x > 0 and math.log2(x).is_integer()


def _or(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


def fmt_value(x: Any, fmt: str = "scalar") -> str:
    """A quantity's value as text: 9x9, [1, 1, 0, 0], H, W, 0.5."""
    if isinstance(x, tuple):
        if fmt == "names":
            return ", ".join(map(str, x)) or "none"
        if fmt == "list":
            return "[" + ", ".join(fmt_value(e) for e in x) + "]"
        return "x".join(fmt_value(e) for e in x)
    if isinstance(x, float):
        return f"{x:g}"
    return str(x)


def table_key(op: str) -> str:
    """The constraint table an IR op is checked against (the registry's ``constraint_key``,
    else :data:`TABLE_OF`, else the op's own name)."""
    from hbc.ir.registry import OPS, get_op

    opdef = OPS.get(op) or get_op(op)
    return opdef.constraint_key or TABLE_OF.get(op, op)


def table_keys() -> dict[str, list[str]]:
    """Every valid table key -> the IR ops checked against it (pseudo tables: [])."""
    from hbc.ir.registry import all_ops

    keys: dict[str, list[str]] = {k: [] for k in PSEUDO_TABLES}
    for name in sorted(all_ops()):
        if name not in BOUNDARY_OPS:
            keys.setdefault(table_key(name), []).append(name)
    return keys


# -- loading --------------------------------------------------------------------------------------
def march_names() -> list[str]:
    """The marches that have a description file, sorted."""
    from .march import march_names as names

    return names()


def canonical(name: str) -> str:
    """The march's file name for ``name`` (aliases resolved); InputError for an unknown one."""
    from .march import ALIASES

    key = ALIASES.get(str(name).lower(), str(name).lower())
    if key not in march_names():
        raise InputError(f"unknown march '{name}'", hint="known marches: " +
                         ", ".join(march_names() + sorted(ALIASES)))
    return key


def load_constraints(march: Any) -> MarchConstraints:
    """The constraint tables of ``march`` (a name, an alias or a ``March``, whose ``ops`` holds
    the raw tables); InputError naming the file, the table and the key for anything malformed."""
    if isinstance(march, str):
        return _load_named(canonical(march))
    return _build(march.name, march.ops)


@cache
def _load_named(name: str) -> MarchConstraints:
    from .march import load_march

    return _build(name, load_march(name).ops)


def _build(name: str, raw: Mapping[str, Any]) -> MarchConstraints:
    raw = dict(raw)
    where = f"backend/marches/{name}.toml"
    base = raw.pop("base", None)
    tables: dict[str, OpTable] = {}
    if base is not None:
        if not isinstance(base, str) or canonical(base) == name:
            raise InputError(f"{where}: [ops] base must name another march, got {base!r}")
        tables.update(_load_named(canonical(base)).tables)
    keys = table_keys()
    for key, body in raw.items():
        if key not in keys:
            raise InputError(f"{where}: [ops.{key}]: no IR op has this table",
                             hint="tables: " + ", ".join(sorted(keys)))
        tables[key] = _parse_table(key, body, f"{where}: [ops.{key}]")
    return MarchConstraints(name, tables, base)


def _parse_table(key: str, body: Any, where: str) -> OpTable:
    if not isinstance(body, dict):
        raise InputError(f"{where}: expected a table")
    unit = body.get("unit", "bpu")
    if unit not in UNITS:
        raise InputError(f"{where}: unit = {unit!r}, expected one of {', '.join(UNITS)}")
    known = quantities_of(key)
    rules = []
    for name, spec in body.items():
        if name in TABLE_META:
            continue
        if name not in known:
            raise InputError(f"{where}: '{name}' is not a quantity of this table",
                             hint="quantities: " + ", ".join(sorted(known)))
        rules.append(_parse_rule(name, spec, f"{where}.{name}"))
    for meta in ("hint", "note"):
        _check_text(body.get(meta, ""), f"{where}.{meta}")
    source = body.get("source", "public")
    if source not in SOURCES:
        raise InputError(f"{where}.source = {source!r}, expected one of {', '.join(SOURCES)}")
    return OpTable(key, unit, tuple(rules), body.get("hint", ""), source, body.get("note", ""))


def _parse_rule(name: str, spec: Any, where: str) -> Rule:
    if not isinstance(spec, dict):
        raise InputError(f"{where}: expected an inline table like {{ max = 7, hint = \"...\" }}")
    unknown = sorted(set(spec) - set(CHECKS) - set(RULE_META))
    if unknown:
        raise InputError(f"{where}: unknown key(s) {', '.join(unknown)}",
                         hint="checks: " + ", ".join(CHECKS) + "; also hint, source")
    checks = {k: spec[k] for k in CHECKS if k in spec}
    if not checks:
        raise InputError(f"{where}: no check given (one of {', '.join(CHECKS)})")
    for k in ("max", "min"):
        if k in checks and (isinstance(checks[k], bool) or
                            not isinstance(checks[k], (int, float))):
            raise InputError(f"{where}.{k}: expected a number, got {checks[k]!r}")
    for k in ("one_of", "subset_of"):
        if k in checks and not isinstance(checks[k], list):
            raise InputError(f"{where}.{k}: expected a list, got {checks[k]!r}")
    if "power_of_2" in checks and checks["power_of_2"] is not True:
        raise InputError(f"{where}.power_of_2: expected true")
    source = spec.get("source", "public")
    if source not in SOURCES:
        raise InputError(f"{where}.source = {source!r}, expected one of {', '.join(SOURCES)}")
    _check_text(spec.get("hint", ""), f"{where}.hint")
    return Rule(name, checks, spec.get("hint", ""), source)


HINT_FIELDS = ("actual", "allowed", "march", "op", "split")


def _check_text(text: Any, where: str) -> None:
    if not isinstance(text, str):
        raise InputError(f"{where}: expected a string")
    try:
        text.format(**{k: "" for k in HINT_FIELDS})
    except (KeyError, IndexError, ValueError) as e:
        raise InputError(f"{where}: bad placeholder {e} (placeholders: "
                         f"{', '.join('{' + k + '}' for k in HINT_FIELDS)})") from None


# -- evaluating -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Failure:
    """A rule a node breaks, with the quantity's value and the words for both."""

    rule: Rule
    actual: Any
    actual_text: str
    allowed_text: str


def evaluate(table: OpTable, view: OpView, extra: tuple[Rule, ...] = ()) -> list[Failure]:
    """The rules of ``table`` (and ``extra``, e.g. all_bpu's) that ``view`` breaks."""
    out = []
    for rule in (*table.rules, *extra):
        q = quantities_of(table.key).get(rule.quantity) or COMMON[rule.quantity]
        actual = q.fn(view)
        if actual is None or rule.passes(actual):
            continue
        n = len(actual) if isinstance(actual, tuple) else 1
        out.append(Failure(rule, actual, fmt_value(actual, q.fmt), rule.allowed(q.fmt, n)))
    return out


def hint_text(template: str, failure: Failure | None, march: str, op: str) -> str:
    """A hint template filled in for one failure."""
    values = {"march": march, "op": op, "actual": "", "allowed": "", "split": ""}
    if failure is not None:
        values.update(actual=failure.actual_text, allowed=failure.allowed_text)
        if isinstance(failure.actual, tuple) and all(isinstance(e, int) for e in failure.actual):
            values["split"] = "x".join(str(math.ceil((k + 1) / 2)) for k in failure.actual)
    return template.format(**values)


def main(argv: list[str] | None = None) -> int:
    """``python -m hbc.backend.constraints --markdown``: print docs/marches.md."""
    argv = sys.argv[1:] if argv is None else argv
    if argv != ["--markdown"]:
        print("usage: python -m hbc.backend.constraints --markdown", file=sys.stderr)
        return 2
    from .constraints_doc import markdown

    sys.stdout.write(markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
