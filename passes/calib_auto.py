"""The ``auto`` calibration method: per scale group, the candidate range (max, percentile, kl,
mse) with the least expected error at the outputs of the group's consumers, read from one
weighted histogram of the group (no extra pass over the data).

The criterion (docs/quantization.md, "Calibration"). A consumer ``y = f(W x)`` of a quantized
tensor ``x = x_float + e`` sees the error ``W e``; when the errors of different elements are
uncorrelated (rounding noise is; clipping errors are sparse), its expected energy is
``sum_i e_i^2 * ||W[:, i]||^2``: each element's squared error weighted by the squared weights
that read it. For a convolution, that weight is the same for every element of an input channel
``c``: ``G[c]``, the sum of ``w[o, c, taps]^2`` over the output channels ``o`` of ``c``'s group
and the kernel taps; for ``linear``, the sum of ``w[o, c]^2`` over outputs ``o``. Each use's
gains are divided by their mean over the channels (which also cancels a stride's spatial
factor, the same for every channel), so every use counts as much on average as an element-wise
consumer (add, concat, a fused residual, pooling, ...), whose gain is 1; a
graph output counts its own error with gain 1. An element's weight is the sum of the gains of
every use of its value outside the group.

During the one calibration pass the group's histogram accumulates, per bin, the summed weights
of its non-zero values (:class:`~hbc.passes.observers.Histogram` with ``weighted=True``), and
each candidate range ``a`` is scored by the expected squared error of that weighted mass
(:func:`~hbc.passes.observers.expected_error`: rounding noise, values rounded to zero, clipping).
Ties go to the first candidate in OBSERVERS order. With equal gains everywhere the weighted
mass is the histogram itself, so ``auto`` then picks the candidate of least expected MSE (the
mse observer's range, unless another candidate's range between two bin edges does better);
channel gains make it favour ranges that spare the channels its consumers amplify.

What the weights leave out: correlated errors (a clipped patch of one sign passes through a
smooth kernel or a pooling window coherently) and the consumer's activation (a ReLU hides the
error of outputs that stay negative). The scorer it replaces ran the consumers on fake-quantized
inputs in a second pass and saw both, at about one more forward pass per candidate and sample
(docs/benchmarks.md compares the two).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from hbc.ir.graph import Graph, Node, Value

from .observers import OBSERVERS, Histogram, expected_error

#: a per-element weight: a scalar, or an array broadcasting to the value's shape
Gain = float | np.ndarray
#: gains are rounded to multiples of this power of two, so the weighted histogram's float64
#: sums are exact, hence independent of the order of the samples (observers.Histogram)
GAIN_QUANTUM = 2.0**-12
#: consumers whose gain is read from their constant weight (input 1)
WEIGHTED = frozenset({"conv", "conv_fused", "conv_transpose", "linear"})


def exit_gains(g: Graph, root: Mapping[str, str], exits: Mapping[str, str]) -> dict[str, Gain]:
    """Per exit of a scale group (value name -> its root; see
    :func:`~hbc.passes.calibrate.group_exits`), the weight of each element's squared
    quantization error: the sum of the gains of its uses outside its group, plus 1 for a graph
    output (or for an exit with no such use and no output: the root of an unused group)."""
    outputs = {v.name for v in g.outputs}
    gains: dict[str, Gain] = {}
    for name, r in exits.items():
        v = g.value(name)
        total: Gain = 1.0 if name in outputs else 0.0
        for node, slot in v.uses:
            if slot == 0 and any(root.get(o.name) == r for o in node.outputs):
                continue  # a member of the same group
            gain = consumer_gain(g, node, slot, v)
            total = total + (1.0 if gain is None else gain)
        total = np.round(np.asarray(total) / GAIN_QUANTUM) * GAIN_QUANTUM
        gains[name] = (float(total) if total.ndim == 0 else total) if np.any(total) else 1.0
    return gains


def consumer_gain(g: Graph, node: Node, slot: int, v: Value) -> np.ndarray | None:
    """The gain with which ``node`` passes the error of its input ``v`` (at ``slot``) to its
    output, per input channel, normalised to mean 1 and shaped to broadcast over ``v``; None
    for a gain of 1 everywhere (element-wise consumers, non-constant weights, and any shape
    this does not recognise)."""
    if node.op not in WEIGHTED or slot != 0 or len(node.inputs) < 2:
        return None
    w = node.inputs[1]
    if w is None or not w.is_const or v.type.rank < 1:
        return None
    weight = np.asarray(g.constants[w.name], dtype=np.float64)
    if weight.ndim < 2:
        return None
    squares = weight * weight
    if node.op == "linear":
        per_channel, axis = squares.sum(axis=0), v.type.rank - 1
    elif node.op == "conv_transpose":
        per_channel = squares.sum(axis=tuple(range(1, weight.ndim)))
        axis = _channel_axis(node, v)
    else:  # conv: [Cout, Cin / groups, *kernel]; input channel c feeds its group's outputs
        groups = int(node.attrs.get("groups", 1))
        taps = squares.sum(axis=tuple(range(2, weight.ndim)))  # [Cout, Cin / groups]
        if taps.shape[0] % groups:
            return None
        per_channel = taps.reshape(groups, -1, taps.shape[1]).sum(axis=1).reshape(-1)
        axis = _channel_axis(node, v)
    if v.shape[axis] != per_channel.size:
        return None
    mean = float(per_channel.mean())
    if not mean > 0.0 or not np.isfinite(mean):
        return None
    shape = [1] * v.type.rank
    shape[axis] = per_channel.size
    return (per_channel / mean).reshape(shape)


def _channel_axis(node: Node, v: Value) -> int:
    return v.type.rank - 1 if node.attrs.get("layout", "NCHW") == "NHWC" else 1


def choose(hists: Mapping[str, Histogram], ranges: Mapping[str, Mapping[str, float]],
           qmax: Mapping[str, int]) -> dict[str, str]:
    """Per scale group root, the observer whose range has the least expected error on the
    group's weighted histogram (``max`` for a group that is zero everywhere)."""
    chosen = {}
    for r, h in hists.items():
        cands: list[tuple[str, float]] = []
        for m in OBSERVERS:
            a = ranges[r][m]
            if a > 0.0 and all(a != b for _, b in cands):
                cands.append((m, a))
        if len(cands) < 2:
            chosen[r] = cands[0][0] if cands else "max"
            continue
        assert h.mass is not None, "auto needs weighted histograms"
        n = h.used()
        err = expected_error(h.mass[:n], h.width, np.array([a for _, a in cands]), qmax[r])
        chosen[r] = cands[int(np.argmin(err))][0]  # argmin: the first of equal errors
    return chosen
