"""Calibration: observers on synthetic distributions, streaming histograms, calibrate() on the
demo model, calibration data loading (npz, folder, DataLoader with workers) and its errors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hbc.errors import InputError
from hbc.ir import from_text, to_text
from hbc.ir.graph import Graph
from hbc.ir.types import TensorType
from hbc.passes.calib_data import load_calib_data
from hbc.passes.calibrate import (
    _targets,
    calibrate,
    calibration_progress,
    group_exits,
    scale_groups,
)
from hbc.passes.observers import (
    OBSERVERS,
    Histogram,
    compute_range,
    expected_error,
    fake_quant,
    kl_range,
    max_range,
    percentile_range,
)

N = 16


def _hist(data: np.ndarray, batches: int = 1, bins: int = 4096) -> Histogram:
    h = Histogram(bins)
    for part in np.array_split(np.asarray(data, np.float32), batches):
        h.update(part)
    return h


RNG = np.random.default_rng(0)
UNIFORM = RNG.uniform(-1, 1, 200_000)
LAPLACE = RNG.laplace(size=200_000)
STUDENT = RNG.standard_t(3, size=200_000)


# -- observers ---------------------------------------------------------------------------------
def test_max_is_the_max():
    data = RNG.normal(size=10_000).astype(np.float32)
    assert max_range(_hist(data, 7)) == float(np.abs(data).max())


def test_percentile_below_max_with_outliers():
    data = np.concatenate([RNG.normal(size=100_000), [40.0, -55.0, 70.0]]).astype(np.float32)
    h = _hist(data)
    a = percentile_range(h, 99.99)
    assert a < 10 < h.max == 70.0
    assert abs(a - np.percentile(np.abs(data), 99.99)) <= 2 * h.width
    assert percentile_range(h, 100.0) == h.max
    assert percentile_range(h, 50.0) < a


@pytest.mark.parametrize("heavy", [LAPLACE, STUDENT], ids=["laplace", "student-t3"])
def test_kl_and_mse_clip_heavy_tails_but_not_uniform(heavy):
    h = _hist(heavy)
    for method in ("kl", "mse"):
        assert compute_range(h, method) < 0.95 * h.max, method
    u = _hist(UNIFORM)
    for method in ("kl", "mse"):
        assert compute_range(u, method) > 0.98 * u.max, method


def test_mse_lowers_the_real_quantization_error():
    data = LAPLACE.astype(np.float32)
    h = _hist(data)
    err = {m: np.mean((fake_quant(data, compute_range(h, m)) - data) ** 2) for m in OBSERVERS}
    assert err["mse"] <= min(err.values()) * 1.01
    assert err["mse"] < 0.9 * err["max"]


@pytest.mark.parametrize("name, data", [
    ("laplace", LAPLACE),
    ("relu-normal", np.maximum(RNG.normal(size=200_000), 0)),
    ("near zero", RNG.exponential(size=200_000) ** 4),  # most values round to zero
])
def test_expected_error_predicts_the_real_error(name, data):
    """The histogram's error model against the real error of fake quantization, over ranges
    from heavy clipping to none. The uniform rounding noise the model assumes from s / 2 up
    holds to a few percent; below s / 2 a value loses x^2 (the noise model alone would predict
    many times the real error of the 'near zero' data)."""
    x = data.astype(np.float32)
    h = _hist(x)
    a = h.max * np.array([0.02, 0.1, 0.3, 0.6, 1.0])
    model = expected_error(h.counts[:h.used()], h.width, a)
    real = np.array([np.sum((fake_quant(x, r).astype(np.float64) - x) ** 2) for r in a])
    np.testing.assert_allclose(model, real, rtol=0.2 if name == "near zero" else 0.05)


def _kl_naive(h: Histogram) -> float:
    """TensorRT-style KL search written as plain loops (zeros as one exact extra bin)."""
    n = h.used()
    hist = h.counts[:n].astype(float)
    best, best_kl = n, math.inf
    for i in range(128, n + 1):
        p = hist[:i].copy()
        p[-1] += hist[i:].sum()
        q = np.zeros(i)
        for j in range(128):
            lo, hi = j * i // 128, (j + 1) * i // 128
            nonzero = p[lo:hi] > 0
            if nonzero.any():
                q[lo:hi][nonzero] = hist[lo:hi].sum() / nonzero.sum()
        p, q = np.append(p, h.zeros), np.append(q, h.zeros)
        p, q = p / p.sum(), q / q.sum()
        m = p > 0
        kl = math.inf if (q[m] == 0).any() else float(np.sum(p[m] * np.log(p[m] / q[m])))
        if kl < best_kl:
            best, best_kl = i, kl
    return min(best * h.width, h.max)


def test_kl_matches_a_naive_implementation():
    data = np.concatenate([np.maximum(RNG.normal(size=40_000), 0), 3 * RNG.laplace(size=4000)])
    h = _hist(data, bins=512)
    assert kl_range(h) == _kl_naive(h)


def test_int16_ranges():
    h = _hist(LAPLACE)
    assert compute_range(h, "kl", qmax=32767) == h.max
    assert compute_range(h, "mse", qmax=32767) > compute_range(h, "mse", qmax=127)


def test_sparse_and_zero_histograms():
    h = _hist(np.zeros(100))
    assert h.max == 0 and all(compute_range(h, m) == 0.0 for m in OBSERVERS)
    few = _hist(RNG.normal(size=50))  # too few values for KL: keeps the max
    assert kl_range(few) == few.max
    relu = np.maximum(RNG.normal(size=100_000), 0)  # half exact zeros must not drag kl down
    assert kl_range(_hist(relu)) > 0.5 * relu.max()


def test_streaming_equals_one_shot_exactly_in_any_order():
    data = (RNG.normal(size=60_000) * np.repeat(2.0 ** np.arange(6), 10_000)).astype(np.float32)
    one = _hist(data)
    parts = np.array_split(data, 12)  # growing magnitudes: the range doubles several times
    for order in (range(12), reversed(range(12)), RNG.permutation(12)):
        h = Histogram()
        for i in order:
            h.update(parts[i])
        np.testing.assert_array_equal(h.counts, one.counts)
        assert (h.range, h.max, h.zeros, h.total) == (one.range, one.max, one.zeros, one.total)
    assert one.range > one.max >= one.range / 2


def test_histogram_is_bounded():
    h = _hist(RNG.normal(size=1_000_000), batches=10)
    assert h.counts.size == 4096 and h.total == 1_000_000 and h.counts.sum() == h.total - h.zeros


# -- calibrate() on the demo model -------------------------------------------------------------
@pytest.fixture(scope="module")
def demo():
    import hbc
    import hbc.passes
    from hbc.models.demo_cnn import build

    model, x = build()
    g = hbc.passes.run(hbc.load((model, x)), opt=3)
    data = {g.inputs[0].name: np.random.default_rng(1).normal(size=(N, 3, 32, 32))
            .astype(np.float32)}
    return g, data


def _scales(g: Graph) -> dict[str, float]:
    return {v.name: v.type.quant.scale[0] for v in g.values() if v.type.quant is not None}


@pytest.mark.parametrize("method", ["max", "percentile", "kl", "mse", "auto"])
def test_calibrate_demo(demo, method):
    g, data = demo
    c = calibrate(g, data, method)
    assert all(v.type.quant is None for v in g.values())  # the input graph is untouched
    feeds = [v for n in c.nodes if n.op in ("conv_fused", "conv", "linear", "add")
             for v in n.inputs[:1] + n.inputs[3:4] if v is not None and not v.is_const]
    assert feeds and c.inputs[0] in feeds
    for v in feeds + [o for n in c.nodes for o in n.outputs]:
        assert v.type.quant is not None and v.type.quant.scale[0] > 0, v.name
        assert v.type.quant.scale[0] == float(np.float32(v.type.quant.scale[0]))
    assert all(c.value(n).type.quant is None for n in c.constants)  # weights: lowering's job
    meta = c.meta["calibration"]
    assert meta["method"] == method and meta["samples"] == N
    if method == "auto":
        assert set(meta["per_value_method"]) == set(_scales(c))
        assert set(meta["per_value_method"].values()) <= set(OBSERVERS)
    text = to_text(c)
    assert "q(scale=" in text
    assert to_text(from_text(text, constants=c.constants)) == text
    assert c.value("flatten").type.quant == c.value("pool").type.quant  # reshape keeps it
    if method == "max":  # max: scale = max|x| / 127 of the input
        assert _scales(c)["x"] == float(np.float32(np.abs(data["x"]).max() / 127))


@pytest.mark.parametrize("method", ["kl", "auto"])
def test_calibrate_is_deterministic_and_order_independent(demo, method):
    g, data = demo
    x = data["x"][:8]
    first = _scales(calibrate(g, {"x": x}, method))
    assert _scales(calibrate(g, {"x": x}, method)) == first
    shuffled = [{"x": x[i:i + 1]} for i in np.random.default_rng(5).permutation(8)]
    assert _scales(calibrate(g, iter(shuffled), method)) == first  # one-shot iterator too


def _two_input_graph(batch: int = 1) -> Graph:
    g = Graph("two")
    a = g.add_input("a", TensorType("f32", (batch, 8)))
    b = g.add_input("b", TensorType("f32", (batch, 8)))
    s = g.add_node("add", [a, b], name="sum").outputs[0]
    y = g.add_node("div", [s, b], name="ratio").outputs[0]
    g.set_outputs([g.add_node("relu", [y], name="out").outputs[0]])
    return g


def test_input_dict_order_and_int16_set_order_do_not_matter():
    g = _two_input_graph()
    rng = np.random.default_rng(2)
    samples = [{"a": rng.normal(size=(1, 8)).astype(np.float32),
                "b": rng.uniform(1, 2, size=(1, 8)).astype(np.float32)} for _ in range(8)]
    flipped = [{"b": s["b"], "a": s["a"]} for s in samples]
    c1 = calibrate(g, samples, "auto", int16_values={"sum", "a", "out"})
    c2 = calibrate(g, flipped, "auto", int16_values=["out", "sum", "a"])
    assert _scales(c1) == _scales(c2)
    assert c1.meta == c2.meta and c1.meta["int16_values"] == ["a", "sum", "ratio", "out"]
    c8 = calibrate(g, samples, "max")
    assert _scales(c1)["a"] == pytest.approx(_scales(c8)["a"] * 127 / 32767, rel=1e-6)


def test_scale_groups():
    g = Graph("groups")
    x = g.add_input("x", TensorType("f32", (1, 2, 4, 4)))
    pads = {"pads": [0, 0, 1, 1, 0, 0, 1, 1]}
    y = g.add_node("add", [x, x], name="y").outputs[0]
    r = g.add_node("relu", [y], name="r").outputs[0]
    p0 = g.add_node("pad", [r], pads, name="p0").outputs[0]  # zero padding: same integers
    p1 = g.add_node("pad", [r], {**pads, "value": 1.0}, name="p1").outputs[0]
    up = {"size": [1, 2, 12, 12], "scales": [1.0, 1.0, 2.0, 2.0]}
    near = g.add_node("resize", [p0], up, name="near").outputs[0]
    lin = g.add_node("resize", [p0], {**up, "mode": "linear"}, name="lin").outputs[0]
    g.set_outputs([p1, near, lin])
    root = scale_groups(g, _targets(g))
    assert root == {"x": "x", "y": "y", "r": "y", "p0": "y", "p1": "p1", "near": "y",
                    "lin": "lin"}
    data = {"x": np.random.default_rng(3).normal(size=(4, 2, 4, 4)).astype(np.float32)}
    data["x"][2, 1, 0, 3] = -10.0  # the largest |y|, which the relu drops
    c = calibrate(g, data, "auto", int16_values=["near"])
    assert len({c.value(n).type.quant for n in ("y", "r", "p0", "near")}) == 1
    assert c.meta["int16_values"] == ["y", "r", "p0", "near"]  # int16 covers the whole group
    # observed where the group is read from outside (r by p1, p0 by lin, near as an output):
    # after the relu, so the range covers 2 * max(x), not 2 * max|x|
    assert group_exits(g, root) == {"x": "x", "r": "y", "p0": "y", "p1": "p1", "near": "y",
                                    "lin": "lin"}
    assert c.value("r").type.quant.scale[0] == pytest.approx(
        2 * data["x"].max() / 32767, rel=1e-3)


def test_nan_errors_name_input_node_and_sample(demo):
    g, data = demo
    x = data["x"].copy()
    x[5, 1, 2, 3] = np.nan
    with pytest.raises(InputError, match=r"'x' sample 5 .*NaN"):
        calibrate(g, {"x": x})
    two = _two_input_graph()
    ones = np.ones((4, 8), np.float32)
    zeros_b = ones.copy()
    zeros_b[2] = 0.0  # division by zero inside the graph on sample 2
    with pytest.raises(InputError, match=r"div node 'ratio'.*Inf on calibration sample 2"):
        calibrate(two, {"a": ones, "b": zeros_b})


def test_bad_arguments(demo):
    g, data = demo
    with pytest.raises(InputError, match="unknown calibration method 'minmax'"):
        calibrate(g, data, "minmax")
    with pytest.raises(InputError, match="percentile 0"):
        calibrate(g, data, "percentile", percentile=0)
    with pytest.raises(InputError, match="%nope is not a float value"):
        calibrate(g, data, int16_values=["nope"])
    with pytest.raises(InputError, match="no samples"):
        calibrate(g, [])


def test_progress_callback_counts(demo):
    g, data = demo
    calls: list[tuple[int, int | None]] = []
    calibrate(g, data, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(i, N) for i in range(1, N + 1)]
    calls.clear()
    calibrate(g, {"x": data["x"][:4]}, "auto",
              progress=lambda done, total: calls.append((done, total)))
    assert calls == [(i, 4) for i in range(1, 5)]  # auto too: one pass over the data
    calls.clear()
    calibrate(g, ({"x": data["x"][i:i + 1]} for i in range(3)),
              progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, None), (2, None), (3, None)]
    with calibration_progress(disable=True) as update:
        calibrate(g, data, progress=update)


# -- calibration data ----------------------------------------------------------------------------
def test_npz_file_and_folder(demo, tmp_path):
    g, data = demo
    x = data["x"]
    np.savez(tmp_path / "all.npz", x=x)
    runs = list(load_calib_data(tmp_path / "all.npz", g))
    assert len(runs) == N and all(r["x"].shape == (1, 3, 32, 32) for r in runs)
    np.testing.assert_array_equal(np.concatenate([r["x"] for r in runs]), x)
    folder = tmp_path / "folder"
    folder.mkdir()
    np.savez(folder / "b.npz", x=x[10:])
    np.savez(folder / "a.npz", x=x[:10].astype(np.float64))  # float64 is cast to float32
    (folder / "notes.txt").write_text("ignored")
    source = load_calib_data(folder, g)
    assert source.num_samples == N and source.reiterable
    np.testing.assert_array_equal(np.concatenate([r["x"] for r in source]), x)
    assert _scales(calibrate(g, str(folder), "mse")) == _scales(calibrate(g, data, "mse"))


def test_batch_split(tmp_path):
    g = _two_input_graph(batch=2)
    a = np.arange(48, dtype=np.float32).reshape(6, 8)
    runs = list(load_calib_data({"a": a, "b": a + 1}, g))
    assert [r["a"].shape for r in runs] == [(2, 8)] * 3
    assert calibrate(g, {"a": a, "b": a + 1}).meta["calibration"]["samples"] == 6
    with pytest.raises(InputError, match=r"'a' has shape \[5, 8\].*multiple of the batch size 2"):
        list(load_calib_data({"a": a[:5], "b": a[:5]}, g))


@pytest.mark.parametrize("content, message", [
    ({"y": "x"}, r"bad.npz: missing key\(s\) 'x'; unknown key\(s\) 'y'"),
    ({"x": "short"}, r"bad.npz: 'x' has shape \[4, 3, 16, 16\]"),
    ({"x": "int"}, r"bad.npz: 'x' has dtype int32, input %x is f32"),
    ({"x": "inf"}, r"bad.npz: 'x' sample 3 \(calibration sample 3\) contains NaN or Inf"),
    ({"x": "object"}, r"bad.npz: array 'x': holds Python objects"),
])
def test_bad_npz_files(demo, tmp_path, content, message):
    g, _ = demo
    good = np.zeros((4, 3, 32, 32), np.float32)
    arrays = {"x": good, "short": np.zeros((4, 3, 16, 16), np.float32),
              "int": good.astype(np.int32), "inf": good.copy(),
              "object": np.array([{"a": 1}] * 4, dtype=object)}
    arrays["inf"][3, 0, 0, 0] = np.inf
    np.savez(tmp_path / "bad.npz", **{k: arrays[v] for k, v in content.items()})
    with pytest.raises(InputError, match=message):
        list(load_calib_data(tmp_path / "bad.npz", g))


def test_bad_paths(demo, tmp_path):
    g, _ = demo
    with pytest.raises(InputError, match="no such file"):
        load_calib_data(tmp_path / "missing.npz", g)
    with pytest.raises(InputError, match="holds no .npz files"):
        load_calib_data(tmp_path, g)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="junk.npz: not a readable .npz"):
        list(load_calib_data(tmp_path / "junk.npz", g))
    with pytest.raises(InputError, match="cannot read a int"):
        load_calib_data(3, g)


class DictDataset:
    """Per-sample dicts (collated by the DataLoader into batches)."""

    def __init__(self, x: np.ndarray) -> None:
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        import torch

        return {"x": torch.from_numpy(self.x[i])}


class PairDataset(DictDataset):
    """(input tensor of the full input shape, label) pairs."""

    def __getitem__(self, i: int):
        import torch

        return torch.from_numpy(self.x[i:i + 1]), i % 10


def test_dataloader_with_workers(demo):
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    g, data = demo
    x = data["x"]
    want = _scales(calibrate(g, data, "percentile"))
    loader = DataLoader(DictDataset(x), batch_size=4, num_workers=2, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    calls: list = []
    c = calibrate(g, loader, "percentile", progress=lambda d, t: calls.append((d, t)))
    assert _scales(c) == want and c.meta["calibration"]["samples"] == N
    assert calls[-1] == (N, N)
    pairs = DataLoader(PairDataset(x), batch_size=5, num_workers=2)
    assert _scales(calibrate(g, pairs, "percentile")) == want
    plain = DataLoader(torch.from_numpy(x), batch_size=8)  # bare tensors
    assert _scales(calibrate(g, plain, "percentile")) == want
