"""Pass ``fuse`` (-O3): fuse conv and matrix products with their bias, residual add and
activation into the first-class ops conv_fused and linear.

    conv(x, w, b) -> [add residual] -> [relu | relu6 | clip]   =>  conv_fused(x, w, b, residual)
    gemm(x, B, c) | matmul(x, W) + bias -> [relu | clip]       =>  linear(x, w, b)

The fusions are declarative rules (``fusion_rules.py``: match, check, rewrite) run by one
driver: it visits the nodes in topological order, offers each node to the rules rooted at its
op, rewrites the first candidate whose check passes, and sweeps again until no rule applies.
The fused op computes exactly what the chain computed (its reference calls the same op
declarations), so outputs are unchanged up to the folds of gemm's alpha and beta.

A candidate that cannot fuse is left alone, and ``--explain`` prints why: the intermediate has
another user or is a graph output, the add broadcasts, the activation is not fusible, or the
march forbids it. Explanations are those of the final sweep, so each appears once.

March limits come from the march file's ``[lowering.fusion]`` table (``backend/marches/``), e.g.
``residual_strides``; the rule checks read only the limits handed to them.
"""

from __future__ import annotations

import logging
from collections import Counter

from hbc.backend.march import load_march
from hbc.ir.graph import Graph, Node

from .base import Pass, register_pass
from .fusion_rules import RULES, FuseContext, Match, Rule

log = logging.getLogger(__name__)

@register_pass
class Fuse(Pass):
    """Fuse conv/gemm/matmul with bias, residual add and relu/relu6/clip (see module doc)."""

    name = "fuse"
    opt_level = 3
    rules: tuple[Rule, ...] = RULES

    def run(self, graph: Graph) -> bool:
        march = self.ctx.march
        fctx = FuseContext(march, load_march(march).fusion_limits if march else {})
        by_root: dict[str, list[Rule]] = {}
        for rule in self.rules:
            for op in rule.roots:
                by_root.setdefault(op, []).append(rule)
        counts: Counter[str] = Counter()
        while True:
            rejected: list[tuple[Node, str]] = []
            fused_before = sum(counts.values())
            for node in self.walk(graph):
                rules = by_root.get(node.op)
                if rules:
                    reason = self._try(node, graph, rules, fctx, counts)
                    if reason:
                        rejected.append((node, reason))
            if sum(counts.values()) == fused_before:
                break
        for node, reason in rejected:
            self.explain(node, reason)
        self.ctx.results[self.name] = dict(counts)
        return bool(counts)

    def _try(self, node: Node, graph: Graph, rules: list[Rule], fctx: FuseContext,
             counts: Counter[str]) -> str | None:
        """Apply the first rule whose check passes; None if one did (or none matched), else
        the reasons every matched candidate gave."""
        reasons: list[str] = []
        for rule in rules:
            found = rule.match(node, graph)
            if found is None:
                continue
            for m in [found] if isinstance(found, Match) else found:
                verdict = rule.check(m, fctx)
                if verdict is True:
                    new = rule.rewrite(m, graph)
                    counts[rule.name] += 1
                    log.debug("fuse %s: %s -> %s %s", rule.name,
                              " + ".join(f"{n.op} {n.name}" for n in m.nodes), new.op, new.name)
                    return None
                reasons.append(f"{rule.name}: {verdict}")
        return "; ".join(dict.fromkeys(reasons)) or None  # each distinct reason once
