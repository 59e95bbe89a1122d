"""The op registry: every op of the IR is declared here once.

An op declaration (a subclass of :class:`OpDef`, registered with :func:`register`) states its
inputs, outputs, typed attributes with defaults, shape/type inference and a numpy float reference.
The printer, parser, verifier, interpreter, calops (and later the checker, estimator and
lowering) all read these declarations; adding an op touches one place.

Signature conventions: an input or output name ending in ``?`` is optional (``None`` when
absent), one ending in ``*`` is variadic and must be last.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from hbc.errors import InputError

from .types import TensorType

INT, FLOAT, STR, INTS, FLOATS = "int", "float", "str", "ints", "floats"
ATTR_KINDS = (INT, FLOAT, STR, INTS, FLOATS)


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


class InferError(InputError):
    """Shape or type inference failed; the caller adds the node name to the message."""


@dataclass(frozen=True)
class Attr:
    """A typed attribute of an op, with a default (``REQUIRED`` if it has none)."""

    name: str
    kind: str
    default: Any = REQUIRED
    choices: tuple | None = None

    def coerce(self, value: Any) -> Any:
        """Check ``value`` against the kind and return its canonical Python form."""
        k = self.kind
        try:
            if k == INT:
                if isinstance(value, (bool, np.bool_)):
                    return int(value)
                if isinstance(value, (int, np.integer)) or (
                        isinstance(value, (float, np.floating)) and float(value).is_integer()):
                    if not _INT64_MIN <= int(value) <= _INT64_MAX:  # numpy could not hold it
                        raise InferError(f"attribute '{self.name}' = {int(value)} is outside "
                                         "the 64-bit integer range")
                    return int(value)
                raise TypeError
            if k == FLOAT:
                if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
                    value, bool
                ):
                    return float(value)
                raise TypeError
            if k == STR:
                if isinstance(value, bytes):
                    value = value.decode()
                if not isinstance(value, str):
                    raise TypeError
                if self.choices is not None and value not in self.choices:
                    raise InferError(
                        f"attribute '{self.name}' = '{value}' is not one of "
                        f"{', '.join(map(str, self.choices))}"
                    )
                return value
            if k == INTS:
                return [Attr(self.name, INT).coerce(v) for v in _as_list(value)]
            if k == FLOATS:
                return [Attr(self.name, FLOAT).coerce(v) for v in _as_list(value)]
        except TypeError:
            pass
        raise InferError(f"attribute '{self.name}' expects {k}, got {value!r}")


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _as_list(value: Any) -> list:
    if isinstance(value, (list, tuple, np.ndarray)):
        return list(np.asarray(value).ravel()) if isinstance(value, np.ndarray) else list(value)
    raise TypeError


def _spec(names: tuple[str, ...]) -> tuple[int, int, bool]:
    """(required count, max count or -1 for variadic, variadic?) of an input/output signature."""
    required = sum(1 for n in names if not n.endswith(("?", "*")))
    variadic = bool(names) and names[-1].endswith("*")
    return required, (-1 if variadic else len(names)), variadic


class OpDef:
    """Declaration of one IR op. Subclass, set the class attributes, register."""

    name: ClassVar[str]
    inputs: ClassVar[tuple[str, ...]] = ("x",)
    outputs: ClassVar[tuple[str, ...]] = ("y",)
    attrs: ClassVar[tuple[Attr, ...]] = ()
    #: Short category used by docs and calops ("nn", "elementwise", "tensor", ...).
    category: ClassVar[str] = "misc"
    #: May the importer and constant folding evaluate it at compile time?
    foldable: ClassVar[bool] = True
    #: Does ``reference`` need the input types (``input_types=`` keyword), e.g. for the
    #: quantization parameters that live on a value's type?
    needs_input_types: ClassVar[bool] = False
    #: Integer semantics (the quantization issue fills this slot).
    integer: ClassVar[Any] = None
    #: Per-march constraints are data in the march tables; this names the table entry.
    constraint_key: ClassVar[str | None] = None

    # -- signature -------------------------------------------------------------------------
    def input_arity(self) -> tuple[int, int]:
        req, mx, _ = _spec(self.inputs)
        return req, mx

    def output_arity(self) -> tuple[int, int]:
        req, mx, _ = _spec(self.outputs)
        return req, mx

    def attr(self, name: str) -> Attr:
        for a in self.attrs:
            if a.name == name:
                return a
        raise KeyError(name)

    def normalize_attrs(self, attrs: dict[str, Any]) -> dict[str, Any]:
        """Fill defaults, coerce kinds, reject unknown or missing attributes.

        Returns a dict in declaration order (the text form prints attributes in that order).
        """
        known = {a.name for a in self.attrs}
        unknown = sorted(set(attrs) - known)
        if unknown:
            raise InferError(
                f"op '{self.name}' has no attribute(s) {', '.join(unknown)} "
                f"(known: {', '.join(sorted(known)) or 'none'})"
            )
        out: dict[str, Any] = {}
        for a in self.attrs:
            if a.name in attrs and not (attrs[a.name] is None and a.default is None):
                out[a.name] = a.coerce(attrs[a.name])
            elif a.default is REQUIRED:
                raise InferError(f"op '{self.name}' requires attribute '{a.name}'")
            else:
                out[a.name] = a.coerce(a.default) if a.default is not None else None
        return out

    def is_default(self, name: str, value: Any) -> bool:
        """True when ``value`` equals the declared default (the printer omits those)."""
        default = self.attr(name).default
        if default is REQUIRED:
            return False
        if isinstance(default, float) and isinstance(value, float):
            return _same_float(default, value)
        if isinstance(default, (list, tuple)):
            return isinstance(value, list) and len(value) == len(default) and all(
                _same_float(float(x), float(y)) for x, y in zip(value, default, strict=True)
            )
        return value == default

    # -- semantics (override) ---------------------------------------------------------------
    def infer(self, inputs: list[TensorType | None], attrs: dict[str, Any]) -> list[TensorType]:
        """Output types from input types and attributes; raise InferError when invalid."""
        raise NotImplementedError(f"op '{self.name}' has no shape inference")

    def reference(self, inputs: list[np.ndarray | None], attrs: dict[str, Any]) -> list[np.ndarray]:
        """Float reference semantics in numpy: one array per declared output."""
        raise NotImplementedError(f"op '{self.name}' has no reference implementation")

    def macs(self, inputs: list[TensorType | None], outputs: list[TensorType],
             attrs: dict[str, Any]) -> int:
        """Multiply-accumulates of one execution (0 for ops without MACs)."""
        return 0


def _same_float(a: float, b: float) -> bool:
    return a == b and math.copysign(1, a) == math.copysign(1, b) or (a != a and b != b)


OPS: dict[str, OpDef] = {}


def register(cls: type[OpDef]) -> type[OpDef]:
    """Class decorator: declare an op. A name may be registered only once."""
    if cls.name in OPS:
        raise RuntimeError(f"op '{cls.name}' registered twice")
    for sig in (cls.inputs, cls.outputs):
        if any(n.endswith("*") for n in sig[:-1]):
            raise RuntimeError(f"op '{cls.name}': only the last input/output may be variadic")
    OPS[cls.name] = cls()
    return cls


def get_op(name: str) -> OpDef:
    """The declaration of op ``name``; InputError naming the op if there is none."""
    _load_ops()
    try:
        return OPS[name]
    except KeyError:
        raise InputError(f"unknown op '{name}'") from None


def all_ops() -> dict[str, OpDef]:
    """Every registered op, by name."""
    _load_ops()
    return dict(OPS)


def _load_ops() -> None:
    # The op modules register themselves on import; import lazily to avoid a cycle.
    from . import ops  # noqa: F401
