"""The pass manager: pipelines O0..O3, pass specs, verification and IR dumps.

A pass spec is ``name`` or ``name{key=value key2=a|b}`` (MLIR style: options separated by
spaces, list values by ``|``); a pipeline is a comma-separated list of specs, e.g.
``fold-bn{scope=backbone.*},fold-bn{scope=heads.*},fuse``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from typing import Any

from hbc.errors import HbcError, InputError
from hbc.ir.graph import Graph
from hbc.ir.verify import collect_problems

from .base import PASSES, Pass, PassContext, PassError

log = logging.getLogger(__name__)

#: The pipelines of the -O levels, defined here and nowhere else.
PIPELINES: dict[int, list[str]] = {
    0: [],
    1: ["absorb-qdq", "const-fold", "remove-noops", "dce"],
    2: ["absorb-qdq", "const-fold", "remove-noops", "fold-bn", "cse", "dedup-constants", "dce"],
    3: ["absorb-qdq", "const-fold", "remove-noops", "fold-bn", "cse", "dedup-constants", "fuse",
        "dce"],
}

_SPEC = re.compile(r"\s*([A-Za-z0-9_\-]+)\s*(?:\{([^}]*)\})?\s*")


def parse_pipeline(text: str) -> list[tuple[str, dict[str, str]]]:
    """``a,b{k=v},c`` -> [(name, options)]; InputError on a malformed spec."""
    out: list[tuple[str, dict[str, str]]] = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        m = _SPEC.match(text, pos)
        if not m or m.end() == pos:
            raise InputError(f"bad pass spec at '{text[pos:]}': expected name or name{{k=v}}")
        name, body = m.group(1), m.group(2) or ""
        opts: dict[str, str] = {}
        for item in body.split():
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise InputError(f"pass spec '{m.group(0).strip()}': option '{item}' is not "
                                 "key=value")
            if key in opts:
                raise InputError(f"pass spec '{m.group(0).strip()}': option '{key}' is given "
                                 "twice")
            opts[key] = value
        out.append((name, opts))
        pos = m.end()
        if pos < len(text):
            if text[pos] != ",":
                raise InputError(f"bad pass spec at '{text[pos:]}': expected ','")
            pos += 1
            if not text[pos:].strip():
                raise InputError(f"pass pipeline '{text}' ends with ','")
    return out


def build(spec: str | Pass | tuple[str, dict[str, Any]]) -> Pass:
    """A pass object from a spec string, a (name, options) pair, or a Pass."""
    _load_passes()
    if isinstance(spec, Pass):
        return spec
    if isinstance(spec, str):
        parsed = parse_pipeline(spec)
        if len(parsed) != 1:
            raise InputError(f"'{spec}' is not a single pass spec")
        spec = parsed[0]
    name, opts = spec
    cls = PASSES.get(name)
    if cls is None:
        raise InputError(f"unknown pass '{name}' (passes: {', '.join(sorted(PASSES))})")
    return cls(**opts)


def pipeline_for(opt: int) -> list[str]:
    if opt not in PIPELINES:
        raise InputError(f"--opt {opt}: expected one of {', '.join(map(str, PIPELINES))}")
    return list(PIPELINES[opt])


def run(
    graph: Graph,
    opt: int | None = None,
    passes: Sequence[str | Pass | tuple[str, dict]] | str | None = None,
    *,
    disable: Sequence[str] = (),
    verify: bool = True,
    dump_after: str | None = None,
    dump: Callable[[str, str], None] | None = None,
    march: str | None = None,
    context: PassContext | None = None,
    copy: bool = True,
) -> Graph:
    """Run passes over ``graph`` and return the result (a copy unless ``copy=False``).

    ``opt`` picks a pipeline (O0..O3); ``passes`` names them instead (a list of specs or one
    comma-separated string). ``disable`` drops passes by name. ``verify`` checks the graph after
    every pass. ``dump_after`` ("all" or a pass name) calls ``dump(pass_repr, hbir_text)`` after
    those passes (default: log at INFO). ``context`` collects explanations and results.
    """
    if (opt is None) == (passes is None):
        raise InputError("give either opt= or passes=")
    if passes is None:
        specs: list = pipeline_for(opt)
    elif isinstance(passes, str):
        specs = parse_pipeline(passes)
    else:
        specs = list(passes)
    pipeline = [build(s) for s in specs]
    unknown = sorted(set(disable) - set(PASSES))
    if unknown:
        raise InputError(f"--disable names unknown pass(es) {', '.join(unknown)}")
    pipeline = [p for p in pipeline if p.name not in set(disable)]
    ctx = context or PassContext()
    ctx.march = march or ctx.march
    g = graph.copy() if copy else graph
    if dump_after and dump_after != "all" and dump_after not in {p.name for p in pipeline}:
        raise InputError(f"--dump-after {dump_after}: no such pass in the pipeline "
                         f"({', '.join(p.name for p in pipeline) or 'empty'})")
    for p in pipeline:
        p.ctx = ctx
        _run_one(p, g)
        if verify:
            problems = collect_problems(g)
            if problems:
                raise PassError(f"pass '{p!r}' left an invalid graph: " + "; ".join(problems[:5])
                                + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))
        if dump_after in ("all", p.name):
            from hbc.ir.text import to_text

            text = to_text(g)
            if dump is None:
                log.info("IR after %r:\n%s", p, text)
            else:
                dump(repr(p), text)
    return g


def _run_one(p: Pass, g: Graph) -> None:
    try:
        p.check_requires(g)
        changed = p.run(g)
        log.debug("pass %r: %s", p, "changed" if changed else "no change")
    except PassError:
        raise
    except Exception as e:  # name the pass and the node for anything that escapes a pass
        node = p.ctx.node
        where = f" at {node.op} node '{node.where()}'" if node is not None else ""
        msg = str(e) if isinstance(e, HbcError) else f"{type(e).__name__}: {e}"
        raise PassError(f"pass '{p.name}' failed{where}: {msg}") from e
    finally:
        p.ctx.node = None


def _load_passes() -> None:
    from . import registry  # noqa: F401  (imports every pass module)
