"""The float -> calibration -> qat -> int_infer stage flow end to end, on real data.

scikit-learn's digits (1797 8x8 grayscale images, 10 classes; shipped with the package, no
download), a fixed seeded split (1197 train, 600 test; one image = 0.17 points). A small CNN
(conv-BN-ReLU, a residual block, an SPP-like concat of the block and its 3x3 max pool, max pool,
conv-BN-ReLU, global average pool, linear) is trained float in the test (single-threaded,
seeded), then:

- **calibration** (PTQ, every method): ``hbc.load`` -> ``-O3`` -> ``calibrate`` on 100 training
  images -> ``lower-int``. The integer graph runs through the numpy interpreter and through
  int_infer (torch): the two agree bit for bit on every test image (the int8 logits and the
  dequantized ones). int8 accuracy within 1.0 point of float.
- **qat** (ema and LSQ activation scales): ``prepare_qat`` -> ``hbc.quant.calibrate`` -> three
  epochs of fake-quantized training -> ``convert`` (int_infer); its accuracy within 0.5 point of
  float, bit-exact with the numpy interpreter on the lowered graph, and close to the QAT model
  it came from (the concat's learned scale is honoured by lowering: its inputs share one scale,
  which is not the concat's).

The accuracy table (the source documents' Float / Calibration / QAT / Quantized table) is printed
(``pytest -s``) and kept in :data:`TABLE` (:func:`format_table`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import hbc
from hbc.ir.graph import Graph
from hbc.ir.interpret import interpret
from hbc.passes import run
from hbc.passes.calibrate import calibrate

#: rows (stage, how, accuracy in %, seconds), appended by the tests in order
TABLE: list[tuple[str, str, float, float]] = []
#: images per graph run (the IR graph has a fixed batch)
BATCH = 100
N_TEST = 600
CALIB_SAMPLES = 100
QAT_EPOCHS = 3
SEED = 0
#: int_infer vs its QAT model: mean |logit difference| in output LSBs (measured ~0.08-0.10;
#: ~0.33-0.40 when lowering ignored the concat's learned scale)
MAX_MEAN_LSB = 0.2


def format_table() -> str:
    """The accuracy table so far, one row a line."""
    lines = [f"{'stage':<12} {'accuracy':>9} {'time':>7}  how", "-" * 78]
    lines += [f"{stage:<12} {acc:>8.2f}% {secs:>6.1f}s  {how}"
              for stage, how, acc, secs in TABLE]
    return "\n".join(lines)


def _record(stage: str, how: str, acc: float, start: float) -> None:
    TABLE.append((stage, how, acc, time.perf_counter() - start))
    print("\n" + format_table())


class DigitsNet(nn.Module):
    """A small residual CNN for 1x8x8 images."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        self.conv1 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()
        self.spp = nn.MaxPool2d(3, 1, 1)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Sequential(nn.Conv2d(2 * width, 2 * width, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(2 * width), nn.ReLU())
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(y)) + x)
        x = torch.cat([x, self.spp(x)], 1)  # both inputs have x's scale, the concat its own
        x = self.head(self.pool(x))
        return self.fc(torch.flatten(self.gap(x), 1))


# -- data and training ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits() -> dict[str, np.ndarray]:
    """Images scaled to [-1, 1] as float32 (N, 1, 8, 8), int64 labels; a seeded split."""
    data = load_digits()
    x = (data.images.astype(np.float32) / 8.0 - 1.0)[:, None]
    y = data.target.astype(np.int64)
    perm = np.random.default_rng(SEED).permutation(len(y))
    test, train = perm[:N_TEST], perm[N_TEST:]
    return {"x_train": x[train], "y_train": y[train], "x_test": x[test], "y_test": y[test]}


@pytest.fixture(scope="module")
def deterministic() -> Iterator[None]:
    """Single-threaded torch with a private RNG state for the module (both restored)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.random.fork_rng():
        yield
    torch.set_num_threads(threads)


def _train(model: nn.Module, data: dict[str, np.ndarray], epochs: int, lr: float,
           seed: int, batch: int = 32) -> None:
    """Adam with a cosine schedule over seeded shuffles of the training set."""
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.from_numpy(data["x_train"]), torch.from_numpy(data["y_train"])
    steps = epochs * -(-len(y) // batch)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), batch):
            idx = perm[i:i + batch]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            sched.step()
    model.eval()


@torch.no_grad()
def _logits(model: nn.Module, data: dict[str, np.ndarray]) -> np.ndarray:
    model.eval()
    return model(torch.from_numpy(data["x_test"])).numpy()


def _accuracy(logits: np.ndarray, data: dict[str, np.ndarray]) -> float:
    return 100.0 * float((logits.argmax(1) == data["y_test"]).mean())


@pytest.fixture(scope="module")
def float_model(digits, deterministic) -> nn.Module:
    start = time.perf_counter()
    torch.manual_seed(SEED)
    model = DigitsNet()
    _train(model, digits, epochs=12, lr=1e-2, seed=SEED)
    _record("float", "torch float model (12 epochs)", _accuracy(_logits(model, digits), digits),
            start)
    return model


# -- running integer graphs --------------------------------------------------------------------
def _int_logits(lowered: Graph, int_model: nn.Module, data: dict[str, np.ndarray]
                ) -> tuple[np.ndarray, np.ndarray]:
    """(int8 logits, dequantized logits) of the test images. The numpy interpreter and
    int_infer agree bit for bit on both, batch by batch."""
    (out,) = lowered.outputs
    assert out.producer.op == "dequantize" and out.producer.inputs[0].dtype == "i8"
    qname = out.producer.inputs[0].name
    (inp,) = (v.name for v in lowered.inputs)
    ints, floats = [], []
    for lo in range(0, N_TEST, BATCH):
        feed = {inp: data["x_test"][lo:lo + BATCH]}
        seen: dict[str, np.ndarray] = {}

        def observe(node, results, seen=seen) -> None:
            for v, r in zip(node.outputs, results, strict=True):
                if v.name == qname:
                    seen[qname] = r

        ref = interpret(lowered, feed, observe=observe)
        got = int_model.run(feed, trace=True)
        np.testing.assert_array_equal(got[qname], seen[qname])
        np.testing.assert_array_equal(got[out.name], ref[out.name])
        ints.append(seen[qname])
        floats.append(ref[out.name])
    return np.concatenate(ints), np.concatenate(floats)


# -- the stages ----------------------------------------------------------------------------------
def test_float_model_learns_digits(float_model):
    assert TABLE[0][0] == "float" and TABLE[0][2] > 95.0


@pytest.mark.parametrize("method", ["max", "percentile", "kl", "mse", "auto"])
def test_calibration_int8_within_one_point_of_float(float_model, digits, method):
    from hbc.quant import build_int_infer

    start = time.perf_counter()
    example = torch.from_numpy(digits["x_train"][:BATCH])
    graph = run(hbc.load((float_model, (example,))), opt=3)
    cal = calibrate(graph, {"x": digits["x_train"][:CALIB_SAMPLES]}, method=method)
    lowered = run(cal, passes=["lower-int"])
    assert lowered.meta["cpu_nodes"] == []
    assert {"qconv", "qlinear", "concat", "max_pool", "qglobal_avg_pool"} <= {
        n.op for n in lowered.nodes}
    ints, _ = _int_logits(lowered, build_int_infer(lowered), digits)
    acc = _accuracy(ints, digits)
    _record("calibration", f"PTQ int8, {method} on {CALIB_SAMPLES} images; numpy == int_infer",
            acc, start)
    assert acc >= TABLE[0][2] - 1.0


@pytest.mark.parametrize("act", ["ema", "lsq"])
def test_qat_int_infer_within_half_a_point_of_float(float_model, digits, act):
    from hbc.quant import calibrate as qat_calibrate
    from hbc.quant import convert, export_graph, prepare_qat

    start = time.perf_counter()
    example = (torch.from_numpy(digits["x_train"][:BATCH]),)
    qat = prepare_qat(float_model, example, qconfig={"activation": act})
    qat_calibrate(qat, [torch.from_numpy(digits["x_train"][:CALIB_SAMPLES])])
    _record("calibration", f"QAT module ({act}) after hbc.quant.calibrate, fake quant",
            _accuracy(_logits(qat, digits), digits), start)
    start = time.perf_counter()
    torch.manual_seed(SEED + 1)
    _train(qat, digits, epochs=QAT_EPOCHS, lr=1e-3, seed=SEED + 1)
    fake = _logits(qat, digits)
    _record("qat", f"{act}, {QAT_EPOCHS} epochs, fake quant (torch)", _accuracy(fake, digits),
            start)
    start = time.perf_counter()
    int_model = convert(qat, example)
    lowered = run(export_graph(qat, example), passes=["lower-int"])
    ints, floats = _int_logits(lowered, int_model, digits)
    acc = _accuracy(ints, digits)
    _record("int_infer", f"convert(qat {act}); numpy == int_infer", acc, start)
    assert acc >= TABLE[0][2] - 0.5
    # the integer model is the QAT model: same predictions, logits within a fraction of an LSB
    # on average (fixed-point multipliers, half-up rounding); the concat's learned scale counts
    (cat,) = (n for n in lowered.nodes if n.op == "concat")
    assert [v.producer.op for v in cat.inputs] == ["requantize", "requantize"]
    s_out = lowered.outputs[0].producer.inputs[0].type.quant.scale[0]
    assert (fake.argmax(1) == ints.argmax(1)).mean() >= 0.995
    assert np.abs(fake - floats).mean() / s_out < MAX_MEAN_LSB
