"""Permutation algebra for convert-layout: which ops are layout-sensitive, the NCHW <-> NHWC
perms, and how reductions and reshapes act on a value held in a permuted order.

A value "held in perm P" is stored as ``transpose(v, P)``: axis i of the held data is axis P[i]
of the original value v.
"""

from __future__ import annotations

from collections.abc import Sequence

from hbc.ir.registry import get_op

Perm = tuple[int, ...]


def layout_sensitive(op: str) -> bool:
    """Does the registry declare a ``layout`` attribute for ``op``?"""
    return any(a.name == "layout" for a in get_op(op).attrs)


def layout_inputs(op: str) -> tuple[int, ...]:
    """Indices of the inputs of a layout-sensitive op that are read in its layout."""
    return tuple(i for i, n in enumerate(get_op(op).inputs) if n.rstrip("?*") in ("x", "residual"))


def identity(rank: int) -> Perm:
    """The perm that changes nothing."""
    return tuple(range(rank))


def to_last(rank: int) -> Perm:
    """NCHW -> NHWC: the channel axis (1) moves to the end."""
    return (0, *range(2, rank), 1)


def to_first(rank: int) -> Perm:
    """NHWC -> NCHW."""
    return (0, rank - 1, *range(1, rank - 1))


def inverse(perm: Sequence[int]) -> Perm:
    """q with q[perm[i]] = i: transposing by perm, then by q, changes nothing."""
    out = [0] * len(perm)
    for i, p in enumerate(perm):
        out[p] = i
    return tuple(out)


def change(src: str, dst: str, rank: int) -> Perm:
    """The perm that turns data in layout ``src`` into ``dst``."""
    if src == dst:
        return identity(rank)
    return to_last(rank) if dst == "NHWC" else to_first(rank)


def drop_axes(perm: Perm, removed: set[int]) -> Perm:
    """The perm of a result that lost the (original) axes ``removed`` of a value held in
    ``perm`` (reductions without keepdims, gather with a scalar index)."""
    kept = sorted(set(range(len(perm))) - removed)
    rank_of = {a: i for i, a in enumerate(kept)}
    return tuple(rank_of[a] for a in perm if a not in removed)


def reshape_plan(shape: Sequence[int], perm: Perm, target: Sequence[int]
                 ) -> tuple[list[int], Perm] | None:
    """How to reshape a value held in ``perm`` to ``target`` without a transpose first:
    (the shape to give the held data, the result's perm), or None when the reshape mixes axes
    the permutation reorders.

    Size-1 axes do not move data. The other axes are matched into groups of equal products
    (as a reshape splits and merges them); the held data can be reshaped group by group when
    ``perm`` visits each group's axes contiguously and in order. The result then holds the
    groups in the order ``perm`` visits them.
    """
    if perm == identity(len(perm)):
        return list(target), identity(len(target))
    if 0 in shape or 0 in target:
        return None
    big_in = [a for a in range(len(shape)) if shape[a] != 1]
    big_out = [a for a in range(len(target)) if target[a] != 1]
    groups_in: list[list[int]] = []
    groups_out: list[list[int]] = []
    i = j = 0
    while i < len(big_in):
        gi, gj = [big_in[i]], [big_out[j]]
        pi, pj = shape[big_in[i]], target[big_out[j]]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj:
                gi.append(big_in[i])
                pi *= shape[big_in[i]]
                i += 1
            else:
                gj.append(big_out[j])
                pj *= target[big_out[j]]
                j += 1
        groups_in.append(gi)
        groups_out.append(gj)
    group_of = {a: g for g, axes in enumerate(groups_in) for a in axes}
    visited = [a for a in perm if shape[a] != 1]
    order: list[int] = []
    for a in visited:
        g = group_of[a]
        if order and order[-1] == g:
            continue
        if g in order:
            return None
        order.append(g)
    pos = {a: k for k, a in enumerate(visited)}
    if any(pos[b] != pos[a] + 1 for gi in groups_in for a, b in zip(gi, gi[1:], strict=False)):
        return None
    out_perm = [a for g in order for a in groups_out[g]]
    for a in range(len(target)):
        if target[a] == 1:  # a size-1 axis goes right after its predecessor
            out_perm.insert(out_perm.index(a - 1) + 1 if a else 0, a)
    return [target[a] for a in out_perm], tuple(out_perm)
