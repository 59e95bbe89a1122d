"""The pass contract: a pass is a named object with an opt level and typed options.

Passes register with :func:`register_pass`; the manager (``manager.py``) builds them from a
spec such as ``fold-bn{scope=backbone.*}``, runs them, verifies the graph after each, and turns
any exception into a :class:`PassError` naming the pass and the node being rewritten.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from hbc.errors import HbcError, InputError
from hbc.ir.graph import Graph, Node


class PassError(HbcError):
    """A pass failed; the message names the pass, the node and its source location."""

    exit_code = 2


@dataclass
class Explanation:
    """Why a pass left a candidate alone (printed by ``--explain``)."""

    pass_name: str
    node: str
    loc: str
    reason: str

    def __str__(self) -> str:
        where = f"{self.node} ({self.loc})" if self.loc and self.loc != self.node else self.node
        return f"[{self.pass_name}] {where}: {self.reason}"


@dataclass
class PassContext:
    """State shared by the passes of one run."""

    march: str | None = None
    explanations: list[Explanation] = field(default_factory=list)
    #: the node a pass is working on, for error messages (set by :meth:`Pass.walk`)
    node: Node | None = None
    #: free-form results of passes (e.g. what merging saved), by pass name
    results: dict[str, Any] = field(default_factory=dict)


class Pass:
    """Base class. Subclasses set ``name``, ``opt_level`` and ``options`` and implement
    :meth:`run`; a docstring states what the pass does (and the math, for folds)."""

    name: ClassVar[str]
    #: the lowest -O level whose pipeline includes this pass (documentation and `hbc opt -h`)
    opt_level: ClassVar[int] = 1
    #: option name -> (kind, default); kinds: "str", "int", "float", "bool", "globs"
    options: ClassVar[dict[str, tuple[str, Any]]] = {}
    #: what must hold before the pass runs, checked by :meth:`check_requires`
    requires: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise InputError(
                f"pass '{self.name}' has no option(s) {', '.join(unknown)} (options: "
                f"{', '.join(sorted(self.options)) or 'none'})"
            )
        self.opts: dict[str, Any] = {}
        for key, (kind, default) in self.options.items():
            self.opts[key] = _coerce(self.name, key, kind, options.get(key, default))
        self.ctx = PassContext()

    def __repr__(self) -> str:
        set_opts = {k: v for k, v in self.opts.items() if v != self.options[k][1]}
        if not set_opts:
            return self.name
        body = " ".join(f"{k}={_fmt_opt(v)}" for k, v in set_opts.items())
        return f"{self.name}{{{body}}}"

    # -- for subclasses -----------------------------------------------------------------------
    def run(self, graph: Graph) -> bool:
        """Rewrite ``graph`` in place; return whether anything changed."""
        raise NotImplementedError

    def check_requires(self, graph: Graph) -> None:
        """Raise PassError naming a node when a precondition in ``requires`` does not hold."""

    def walk(self, graph: Graph) -> Iterator[Node]:
        """Iterate over a snapshot of the nodes (skipping those removed meanwhile), recording
        the current one for error messages."""
        for node in list(graph.nodes):
            if graph.contains(node):
                self.ctx.node = node
                yield node
        self.ctx.node = None

    def explain(self, node: Node, reason: str) -> None:
        """Record why ``node`` was left alone (shown by ``--explain``)."""
        self.ctx.explanations.append(Explanation(self.name, node.name, node.loc, reason))


def in_scope(node: Node, patterns: list[str]) -> bool:
    """Does the node's name or location match one of the glob ``patterns`` (all if empty)?"""
    if not patterns:
        return True
    return any(fnmatch.fnmatchcase(node.name, p) or (node.loc and fnmatch.fnmatchcase(node.loc, p))
               for p in patterns)


PASSES: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available by name."""
    if cls.name in PASSES:
        raise RuntimeError(f"pass '{cls.name}' registered twice")
    PASSES[cls.name] = cls
    return cls


def _coerce(pass_name: str, key: str, kind: str, value: Any) -> Any:
    try:
        if kind == "globs":
            if isinstance(value, str):
                return [p for p in value.replace(",", "|").split("|") if p]
            return [str(p) for p in value]
        if kind == "bool":
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                return value.lower() in ("true", "1")
            return bool(value)
        return {"str": str, "int": int, "float": float}[kind](value)
    except (ValueError, TypeError):
        raise InputError(f"pass '{pass_name}': option '{key}' expects {kind}, got {value!r}") \
            from None


def _fmt_opt(v: Any) -> str:
    if isinstance(v, list):
        return "|".join(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)
