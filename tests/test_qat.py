"""QAT on the PyTorch side (hbc.quant.qat, hbc.quant.fake_quant): fake quantization equals the
integer scheme of docs/quantization.md, STE/LSQ gradients, prepare_qat on the demo model
(placement, training), two-step BN folding, calibration from a DataLoader with workers,
export of the learned scales to the IR, convert to int_infer, and training under DDP (2 gloo
processes) equal to one process on the same global batch."""

from __future__ import annotations

import math
import os
import socket
import tempfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hbc.errors import InputError
from hbc.models.common import seeded_init
from hbc.models.demo_cnn import DemoNet, build
from hbc.quant.fake_quant import ActFakeQuant, FusedConvBN, WeightFakeQuant, fake_quantize
from hbc.quant.qat import (
    calibrate,
    convert,
    export_graph,
    fold_bn,
    prepare_qat,
    quantized_values,
)

DEMO_VALUES = {"x", "stem.2", "layer1.relu", "layer1.relu_1", "layer2.downsample.0",
               "layer2.relu", "layer2.relu_1", "pool", "output"}


def _acts(q: nn.Module) -> dict[str, ActFakeQuant]:
    return {m.value_name: m for m in q.modules() if isinstance(m, ActFakeQuant)}


def _batch(n: int, size: int = 16, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.fixture(scope="module")
def demo():
    model, (x,) = build()
    return model, x


# -- fake quantization ------------------------------------------------------------------------
def test_fake_quantize_is_the_integer_scheme():
    s = np.float32(0.05)
    ties = np.array([0.025, -0.025, 0.075, -0.075, 0.125, 6.35, 6.4, -6.4, -6.45, -100, 100])
    x = np.concatenate([ties, np.random.default_rng(0).normal(0, 3, 1000)]).astype(np.float32)
    y = fake_quantize(torch.from_numpy(x), torch.tensor(s)).numpy()
    q = np.clip(np.rint(x / s), -128, 127)  # ONNX QuantizeLinear: half to even, saturate
    np.testing.assert_array_equal(y, q.astype(np.float32) * s)
    assert y.max() == np.float32(127) * s and y.min() == np.float32(-128) * s


def test_weight_fake_quant_per_output_channel():
    w = torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    w[2] = 0.0  # a zero channel gets scale 1
    y = WeightFakeQuant(axis=0)(w).numpy()
    wn = w.numpy()
    amax = np.abs(wn).reshape(4, -1).max(1).astype(np.float64)
    s = np.where(amax > 0, amax, 1.0) / 127
    s = s.astype(np.float32).reshape(4, 1, 1, 1)
    np.testing.assert_array_equal(y, np.clip(np.rint(wn / s), -128, 127) * s)
    assert np.abs(np.rint(wn / s)).max() == 127


def test_ste_gradient_inside_range_only():
    x = torch.tensor([-10.0, -6.41, -6.39, -1.0, 0.0, 0.26, 6.34, 6.36, 10.0], requires_grad=True)
    fake_quantize(x, torch.tensor(0.05)).sum().backward()
    # x / s inside [-128, 127] passes the gradient, outside it is zero
    assert x.grad.tolist() == [0, 0, 1, 1, 1, 1, 1, 0, 0]


def test_lsq_scale_gets_the_lsq_gradient():
    fq = ActFakeQuant("v", "n", method="lsq").train()
    fq.set_range(2.0)
    x = torch.tensor([[-3.0, -0.3, 0.01, 0.7, 1.9, 2.5]])
    fq(x).sum().backward()
    s = float(fq.scale.detach())
    xs = x / s
    expect = torch.where(xs > 127, 127.0, torch.where(xs < -128, -128.0, xs.round() - xs)).sum()
    g = 1 / math.sqrt(x.numel() * 127)
    assert fq.scale.grad is not None and fq.scale.grad.abs() > 0
    assert float(fq.scale.grad) == pytest.approx(float(expect) * g, rel=1e-5)


def test_ema_observer_updates_only_in_training():
    fq = ActFakeQuant("v", "n", method="ema", momentum=0.5).train()
    fq(torch.tensor([4.0, -1.0]))
    assert float(fq.amax) == 4.0 and float(fq.scale) == np.float32(4.0 / 127)
    fq(torch.tensor([-2.0]))
    assert float(fq.amax) == 3.0
    fq.eval()(torch.tensor([100.0]))
    assert float(fq.amax) == 3.0


# -- prepare, train, fold ---------------------------------------------------------------------
def test_prepare_places_fake_quant_where_the_integer_model_quantizes(demo):
    model, x = demo
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = prepare_qat(model, (x,))
    assert set(_acts(q)) == DEMO_VALUES  # after conv+BN+add+ReLU, not between
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert {k for k in q.state_dict() if not k.startswith("qat_act.")} == set(before)
    nw = sum(isinstance(m, WeightFakeQuant) for m in q.modules())
    assert nw == 7  # six convs and the linear


def test_prepared_demo_trains_and_loss_decreases(demo):
    model, x = demo
    q = prepare_qat(model, (x,)).train()
    xb, yb = _batch(8)
    opt = torch.optim.SGD(q.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(5):
        loss = F.cross_entropy(q(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
    assert all(bool(fq.initialized) for fq in _acts(q).values())


def test_two_step_bn_folding_keeps_outputs(demo):
    model, x = demo
    q = prepare_qat(model, (x,)).train()
    xb, yb = _batch(8)
    params = set(map(id, q.parameters()))
    opt = torch.optim.SGD(q.parameters(), lr=0.01)
    F.cross_entropy(q(xb), yb).backward()  # BN statistics move, scales initialise
    opt.step()
    q.eval()
    with torch.no_grad():
        y0 = q(xb)
        fold_bn(q, ["stem.*", "layer1.*"])  # the backbone first...
        fused = [n for n, m in q.named_modules() if isinstance(m, FusedConvBN)]
        assert fused == ["stem.0", "layer1.conv1", "layer1.conv2"]
        y1 = q(xb)
        fold_bn(q, "layer2.*")  # ...then the rest
        y2 = q(xb)
    assert sum(isinstance(m, FusedConvBN) for m in q.modules()) == 6
    assert not any(isinstance(m, nn.BatchNorm2d) and n.count(".bn") == 0
                   for n, m in q.named_modules())
    assert set(map(id, q.parameters())) == params  # an optimizer keeps working
    s_out = float(_acts(q)["output"].scale)
    for y in (y1, y2):  # equal up to float rounding (at most a rare one-step flip)
        assert (y - y0).abs().max() <= s_out * 1.01
        assert (y - y0).abs().gt(1e-5).float().mean() < 0.05
    q.train()
    F.cross_entropy(q(xb), yb).backward()  # still trains (frozen BN statistics)
    g = export_graph(q, (x,))
    assert {v.name for v in g.values() if v.type.quant is not None and not v.is_const} == \
        DEMO_VALUES


def test_fold_bn_at_prepare_time_updating_statistics(demo):
    model, x = demo
    q = prepare_qat(model, (x,), fold_bn="all", freeze_bn=False).train()
    bn = q.get_submodule("stem.0").bn
    mean = bn.running_mean.clone()
    q(_batch(4)[0])
    assert not torch.equal(bn.running_mean, mean)  # batch statistics in training


def test_prepared_module_survives_deepcopy_and_torch_save(demo):
    import copy
    import io

    model, x = demo
    q = prepare_qat(model, (x,))
    calibrate(q, [x])
    fold_bn(q, "stem.*")
    buf = io.BytesIO()
    torch.save(q, buf)
    buf.seek(0)
    for other in (copy.deepcopy(q), torch.load(buf, weights_only=False)):
        with torch.no_grad():
            assert torch.equal(other.eval()(x), q.eval()(x))
        fold_bn(other, "layer1.*")
        assert export_graph(other, (x,)).meta["calibration"]["method"] == "qat"


# -- calibrate, export, convert ---------------------------------------------------------------
def test_calibrate_from_a_dataloader_with_workers(demo):
    from hbc.passes.calibrate import calibrate as ptq_calibrate

    model, x = demo
    q = prepare_qat(model, (x,)).train()
    xs, ys = _batch(8, size=32, seed=3)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xs, ys), batch_size=2,
                                         num_workers=2)
    calibrate(q, loader)
    assert q.training
    g = export_graph(q, (x,))
    assert g.meta["calibration"]["samples"] == 8
    # the same scales as hbc's float calibration with the max observer on the same data
    ref = ptq_calibrate(export_graph(q, (x,)), [{"x": xs[i:i + 1].numpy()} for i in range(8)],
                        "max")
    for name in DEMO_VALUES:
        a, b = g.value(name).type.quant.scale[0], ref.value(name).type.quant.scale[0]
        assert a == pytest.approx(b, rel=1e-5), name
    calibrate(q, loader, num_batches=1)
    assert g.meta["calibration"]["samples"] == 8  # a graph is a snapshot


@pytest.mark.parametrize("activation", ["ema", "lsq"])
def test_export_graph_records_the_learned_scales(demo, activation):
    model, x = demo
    q = prepare_qat(model, (x,), qconfig={"activation": activation}, fold_bn="all").train()
    xb, yb = _batch(8)
    opt = torch.optim.SGD(q.parameters(), lr=0.05)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(q(xb), yb).backward()
        opt.step()
    g = export_graph(q, (x,))
    assert g.meta["calibration"] == {"method": "qat", "samples": 0, "activation": activation}
    assert set(quantized_values(g)) == DEMO_VALUES
    for name, fq in _acts(q).items():
        assert g.value(name).type.quant.scale == (float(fq.scale.detach()),)
        assert g.value(name).dtype == "f32"
    assert not any(n.op == "batch_norm" for n in g.nodes)


def test_hbc_load_of_a_qat_module_keeps_the_learned_scales(demo):
    """hbc.load((qat_module, inputs)) is the calibrated graph: compilation reuses the scales."""
    import hbc

    model, x = demo
    q = prepare_qat(model, (x,), fold_bn="all")
    calibrate(q, [_batch(4, size=32, seed=s)[0] for s in range(2)])
    g = hbc.load((q, (x,)))
    assert g.meta["calibration"]["method"] == "qat"
    for name, fq in _acts(q).items():
        assert g.value(name).type.quant.scale == (float(fq.scale.detach()),)


def test_convert_gives_the_int_infer_model_of_the_qat_model(demo):
    model, x = demo
    q = prepare_qat(model, (x,), fold_bn="all")
    calibrate(q, [_batch(4, size=32, seed=s)[0] for s in range(2)])
    int_model = convert(q, (x,))
    q.eval()
    xb = _batch(6, size=32, seed=5)[0]
    s = float(_acts(q)["output"].scale)
    with torch.no_grad():
        yq = q(xb)
        yi = torch.cat([int_model(xb[i:i + 1])["output"] for i in range(len(xb))])
    lsb = ((yq - yi) / s).round().abs()
    assert lsb.max() <= 3 and lsb.mean() < 0.5  # fixed-point rescales vs float fake quant


class _SiluCat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.SiLU()
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.conv3 = nn.Conv2d(3, 8, 1, bias=False)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = torch.cat([self.conv2(self.act(self.conv1(x))), self.conv3(x)], 1)
        return self.fc(F.adaptive_avg_pool2d(torch.sigmoid(c), 1).flatten(1))


def test_silu_concat_and_lookup_tables_are_fake_quantized():
    model, x = seeded_init(_SiluCat(), 0).eval(), torch.randn(1, 3, 8, 8)
    q = prepare_qat(model, (x,), qconfig={"int16": ["sigmoid"]})
    assert set(_acts(q)) == {"x", "conv1", "act/sigmoid", "act", "conv2", "conv3", "cat",
                             "sigmoid", "adaptive_avg_pool2d", "output"}
    assert _acts(q)["sigmoid"].qmax == 32767
    calibrate(q, [torch.randn(2, 3, 8, 8)])
    g = export_graph(q, (x,))
    assert g.meta["int16_values"] == ["sigmoid"]
    fq = _acts(q)["sigmoid"]
    assert g.value("sigmoid").type.quant.scale[0] == pytest.approx(
        float(fq.scale) * 32767 / 127, rel=1e-6)


def test_errors_name_the_problem(demo):
    model, x = demo
    with pytest.raises(InputError, match="unknown qconfig"):
        prepare_qat(model, (x,), qconfig={"activations": "ema"})
    with pytest.raises(InputError, match="int8 activations only"):
        prepare_qat(model, (x,), march="bernoulli2", qconfig={"int16": ["pool"]})
    with pytest.raises(InputError, match="not a module prepared"):
        export_graph(model, (x,))


# -- scale-out: DistributedDataParallel ----------------------------------------------------------
_DDP_STEPS, _DDP_BATCH = 3, 8


def _ddp_model(activation: str) -> nn.Module:
    torch.manual_seed(0)
    model = seeded_init(DemoNet(num_classes=4, width=8), 0).eval()
    return prepare_qat(model, (torch.zeros(1, 3, 16, 16),), qconfig={"activation": activation},
                       fold_bn="all").train()


def _ddp_train(model: nn.Module, rank: int, world: int) -> None:
    xb, yb = _batch(_DDP_BATCH, size=16, seed=7)
    xb, yb = xb.chunk(world)[rank], yb.chunk(world)[rank]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(_DDP_STEPS):
        opt.zero_grad()
        F.cross_entropy(model(xb), yb % 4).backward()
        opt.step()


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        states = {}
        for activation in ("ema", "lsq"):
            q = _ddp_model(activation)
            _ddp_train(DistributedDataParallel(q), rank, world)
            states[activation] = q.state_dict()
        if rank == 0:
            torch.save(states, out)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_match_one_process():
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "ddp.pt")
        mp.spawn(_ddp_worker, args=(2, _free_port(), out), nprocs=2, join=True)
        ddp = torch.load(out)
    for activation in ("ema", "lsq"):
        q = _ddp_model(activation)
        _ddp_train(q, 0, 1)
        ref = q.state_dict()
        assert set(ddp[activation]) == set(ref)
        for k, v in ref.items():
            torch.testing.assert_close(ddp[activation][k], v, rtol=1e-4, atol=1e-5,
                                       msg=f"{activation}: {k}")
        scales = [k for k in ref if k.endswith(".scale")]
        assert len(scales) == 9 and all(float(ref[k]) != 1 / 127 for k in scales)
