"""The PyTorch frontend against torch itself: CNNs, op coverage (fx and torch.export paths),
naming, input/output conventions, errors and ``module:function`` specs."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

import hbc  # noqa: E402
from hbc.errors import InputError, UnsupportedError  # noqa: E402
from hbc.frontend import torch_import  # noqa: E402
from hbc.ir.parser import from_text  # noqa: E402
from hbc.ir.text import to_text  # noqa: E402
from hbc.ir.verify import verify  # noqa: E402


# -- helpers ----------------------------------------------------------------------------------
def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and BN statistics (so folding mistakes show), eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                    m.bias.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
    return model.eval()


def flat_outputs(out) -> list:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in flat_outputs(v)]
    return [t for v in out for t in flat_outputs(v)]


def check(model: nn.Module, inputs, *, export: bool = False, monkeypatch=None, tol=1e-4):
    """Import ``model``, interpret it and compare every output with torch's."""
    if export:
        monkeypatch.setattr(torch_import, "_trace_fx", _no_fx)
    g = hbc.load((model, inputs))
    verify(g)
    text = to_text(g)
    assert to_text(from_text(text, constants=g.constants)) == text
    args = inputs if isinstance(inputs, (tuple, dict)) else (inputs,)
    if isinstance(args, dict):
        feed = {v.name: args[v.name].numpy() for v in g.inputs}
    else:
        tensors = flat_outputs([v for v in args if isinstance(v, (torch.Tensor, list, tuple))])
        feed = {v.name: t.numpy() for v, t in zip(g.inputs, tensors, strict=True)}
    got = hbc.interpret(g, feed)
    with torch.no_grad():
        ref = model(**args) if isinstance(args, dict) else model(*args)
    refs = flat_outputs(ref)
    assert len(got) == len(refs), (list(got), len(refs))
    for (name, arr), r in zip(got.items(), refs, strict=True):
        r = r.numpy()
        assert arr.shape == r.shape, (name, arr.shape, r.shape)
        assert arr.dtype == r.dtype, (name, arr.dtype, r.dtype)
        if r.dtype.kind in "iub":
            np.testing.assert_array_equal(arr, r, err_msg=name)
        else:
            scale = max(float(np.abs(r).max()), 1.0) if r.size else 1.0
            err = float(np.abs(arr.astype(np.float64) - r).max()) if r.size else 0.0
            assert err <= tol * scale, f"{name}: max abs error {err} (scale {scale})"
    return g


def _no_fx(*args, **kwargs):
    raise RuntimeError("fx disabled by the test")


# -- models -----------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class TinyResNet(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 8))
        self.layer2 = nn.Sequential(BasicBlock(8, 16, 2), BasicBlock(16, 16))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // 4, 1)
        self.fc2 = nn.Conv2d(channels // 4, channels, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * F.hardsigmoid(self.fc2(F.relu(self.fc1(s))))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int, act=nn.ReLU6) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), act(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden), act(inplace=True),
            SqueezeExcite(hidden) if act is nn.Hardswish else nn.Identity(),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class TinyMobileNetV2(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8),
                          nn.ReLU6(inplace=True)),
            InvertedResidual(8, 8, 1, 1),
            InvertedResidual(8, 12, 2, 4),
            InvertedResidual(12, 12, 1, 4),
            InvertedResidual(12, 16, 2, 4, act=nn.Hardswish),
            InvertedResidual(16, 16, 1, 4, act=nn.Hardswish),
        )
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(16, classes))

    def forward(self, x):
        x = F.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


# -- CNNs -------------------------------------------------------------------------------------
@pytest.mark.parametrize("export", [False, True], ids=["fx", "export"])
def test_resnet(export, monkeypatch):
    torch.manual_seed(0)
    model = randomize(TinyResNet())
    g = check(model, torch.randn(2, 3, 32, 32), export=export, monkeypatch=monkeypatch)
    assert [v.name for v in g.inputs] == ["x"] and [v.name for v in g.outputs] == ["output"]
    conv = g.node("layer1.0.conv1")
    assert conv.op == "conv" and conv.loc == "layer1.0.conv1"
    assert conv.inputs[1].name == "layer1.0.conv1.weight"
    assert g.node("layer2.0.downsample.0").op == "conv"
    assert g.node("layer1.0.bn1").inputs[3].name == "layer1.0.bn1.running_mean"
    assert g.node("fc").op == "gemm"
    add = [n for n in g.nodes if n.op == "add"]
    assert len(add) == 4 and all(n.loc.startswith(("layer1.", "layer2.")) for n in add)


@pytest.mark.parametrize("export", [False, True], ids=["fx", "export"])
def test_mobilenet_v2(export, monkeypatch):
    torch.manual_seed(1)
    model = randomize(TinyMobileNetV2())
    g = check(model, torch.randn(1, 3, 32, 32), export=export, monkeypatch=monkeypatch)
    dw = g.node("features.2.conv.3")
    assert dw.op == "conv" and dw.attrs["groups"] == 32
    assert g.node("features.1.conv.2").op == "clip"
    assert g.node("features.4.conv.2").op == "hard_swish"
    assert g.node("features.4.conv.6.fc2").op == "conv"
    assert not [n for n in g.nodes if n.op == "identity"]  # dropout vanished


def test_train_mode_is_restored():
    model = TinyResNet().train()
    hbc.load((model, torch.randn(1, 3, 32, 32)))
    assert all(m.training for m in model.modules())


# -- op coverage ------------------------------------------------------------------------------
class Fn(nn.Module):
    """A module whose forward is ``fn(self, *inputs)``, with optional submodules."""

    def __init__(self, fn, **mods) -> None:
        super().__init__()
        self.fn = fn
        for k, m in mods.items():
            setattr(self, k, m)

    def forward(self, x):
        return self.fn(self, x)


def _img(*shape):
    return lambda: torch.randn(*shape)


CASES = {
    "conv1d": (lambda s, x: s.c(x), dict(c=nn.Conv1d(3, 4, 3, 2, 1)), _img(1, 3, 9)),
    "conv3d": (lambda s, x: s.c(x), dict(c=nn.Conv3d(2, 3, 3, padding=1)), _img(1, 2, 4, 5, 5)),
    "conv_dilated_grouped": (lambda s, x: s.c(x), dict(c=nn.Conv2d(4, 6, 3, 1, 2, 2, groups=2)),
                             _img(1, 4, 9, 9)),
    "conv_same": (lambda s, x: s.c(x), dict(c=nn.Conv2d(3, 4, 4, padding="same")),
                  _img(1, 3, 7, 7)),
    "conv_reflect": (lambda s, x: s.c(x), dict(c=nn.Conv2d(3, 4, 3, padding=1,
                                                           padding_mode="reflect")),
                     _img(1, 3, 6, 6)),
    "conv_fn": (lambda s, x: F.conv2d(x, s.c.weight, None, 2, 1), dict(c=nn.Conv2d(3, 4, 3)),
                _img(1, 3, 8, 8)),
    "conv_transpose": (lambda s, x: s.c(x), dict(c=nn.ConvTranspose2d(4, 3, 3, 2, 1, 1)),
                       _img(1, 4, 5, 5)),
    "conv_transpose_grouped": (lambda s, x: s.c(x),
                               dict(c=nn.ConvTranspose2d(4, 6, 4, 2, 1, groups=2)),
                               _img(1, 4, 3, 3)),
    "bn1d_2d_input": (lambda s, x: s.b(x), dict(b=nn.BatchNorm1d(5)), _img(3, 5)),
    "bn1d_3d_input": (lambda s, x: s.b(x), dict(b=nn.BatchNorm1d(5, affine=False)),
                      _img(2, 5, 7)),
    "bn3d": (lambda s, x: s.b(x), dict(b=nn.BatchNorm3d(2)), _img(1, 2, 3, 4, 4)),
    "linear_3d": (lambda s, x: s.l(x), dict(l=nn.Linear(6, 4)), _img(2, 3, 6)),
    "linear_nobias": (lambda s, x: s.l(x), dict(l=nn.Linear(6, 4, bias=False)), _img(2, 6)),
    "activations": (lambda s, x: torch.cat([
        s.a(x), s.b(x), s.p(x), s.p1(x), torch.sigmoid(x), x.tanh(), F.hardsigmoid(x),
        s.h(x), F.silu(x), s.s(x), F.relu6(x), x.relu(), F.leaky_relu(x, 0.2)], 1),
        dict(a=nn.LeakyReLU(0.1), b=nn.ReLU6(), p=nn.PReLU(3), p1=nn.PReLU(), h=nn.Hardswish(),
             s=nn.SiLU()), _img(1, 3, 4, 4)),
    "softmax": (lambda s, x: s.s(x) + F.softmax(x, dim=-1) + x.softmax(2),
                dict(s=nn.Softmax(dim=1)), _img(2, 3, 4, 5)),
    "clamp": (lambda s, x: torch.clamp(x, -0.5, 0.5) + x.clamp(min=0) + x.clip(max=0.1),
              {}, _img(2, 8)),
    "maxpool_ceil": (lambda s, x: s.m(x), dict(m=nn.MaxPool2d(3, 2, 1, ceil_mode=True)),
                     _img(1, 2, 8, 8)),
    "maxpool_dilated": (lambda s, x: F.max_pool2d(x, 2, 1, 0, 2), {}, _img(1, 2, 7, 7)),
    "avgpool": (lambda s, x: s.a(x) + s.b(x) + s.c(x),
                dict(a=nn.AvgPool2d(3, 2, 1), b=nn.AvgPool2d(3, 2, 1, count_include_pad=False),
                     c=nn.AvgPool2d(3, 2, 1, ceil_mode=False)), _img(1, 2, 9, 9)),
    "avgpool_ceil": (lambda s, x: (s.a(x), s.b(x), s.c(x)),
                     dict(a=nn.AvgPool2d(3, 2, 1, ceil_mode=True),
                          b=nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False),
                          c=nn.AvgPool2d(2, 2, 0, ceil_mode=True)), _img(1, 2, 7, 7)),
    "adaptive": (lambda s, x: torch.cat([s.a(x).flatten(1), s.m(x).flatten(1),
                                         F.adaptive_max_pool2d(x, 1).flatten(1)], 1),
                 dict(a=nn.AdaptiveAvgPool2d((2, 3)), m=nn.AdaptiveMaxPool2d(1)),
                 _img(1, 2, 4, 6)),
    "reductions": (lambda s, x: (x.mean((2, 3), keepdim=True), torch.sum(x, 1), x.amax(-1),
                                 torch.max(x, 1), x.max(), torch.argmax(x, 2),
                                 x.argmax(), x.min(1, keepdim=True)[0], x.mean()),
                   {}, _img(2, 3, 4, 5)),
    "interpolate": (lambda s, x: (
        F.interpolate(x, scale_factor=2), s.u(x), F.interpolate(x, size=(5, 7)),
        F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False),
        F.interpolate(x, size=(7, 9), mode="bilinear", align_corners=True),
        F.interpolate(x, size=(3, 3), mode="bilinear"),
        F.interpolate(x, scale_factor=1.5, mode="nearest-exact")),
        dict(u=nn.Upsample(scale_factor=3, mode="nearest")), _img(1, 2, 4, 6)),
    "grid_sample": (lambda s, x: F.grid_sample(x, s.grid, align_corners=False)
                    + F.grid_sample(x, s.grid, mode="nearest", padding_mode="border",
                                    align_corners=True),
                    {}, _img(1, 2, 5, 5)),
    "pixel_shuffle": (lambda s, x: s.u(s.s(x)) + F.pixel_unshuffle(F.pixel_shuffle(x, 2), 2),
                      dict(s=nn.PixelShuffle(2), u=nn.PixelUnshuffle(2)), _img(1, 8, 3, 3)),
    "cat_stack_split": (lambda s, x: (torch.cat(x.split(2, 1)[::-1], 1),
                                      torch.stack(x.chunk(3, 1), 2),
                                      torch.cat(torch.split(x, [1, 3, 2], dim=1)[::-1], 1),
                                      x.unbind(1)[2]), {}, _img(2, 6, 3, 3)),
    "reshapes": (lambda s, x: (x.view(x.size(0), -1), x.reshape(2, 3, -1).permute(2, 0, 1),
                               x.transpose(1, 3).contiguous(), x.unsqueeze(0).squeeze(0),
                               x.flatten(2), x[:, None].squeeze(1), s.f(x), x.permute(0, 2, 3, 1),
                               x.view(2, 3, 2, 2, 4).transpose(1, 2).reshape(2, 6, 2, 4)),
                 dict(f=nn.Flatten()), _img(2, 6, 2, 4)),
    "getitem": (lambda s, x: (x[0], x[:, 1:3], x[..., ::2], x[:, -1, None], x[1, :, 2:, 1],
                              x[:, [2, 0]], x[:, :, 1:-1:2], x[-2:, ..., :3]),
                {}, _img(3, 4, 5, 6)),
    "arithmetic": (lambda s, x: (x + 1, 2.5 * x, x - x * 0.5, x / 4, 1 - x, -x,
                                 x / (x * x + 1), torch.add(x, x, alpha=2), torch.sub(x, 1.5),
                                 torch.mul(x, s.pw), x @ s.pm),
                   {}, _img(2, 4, 4)),
    "inplace": (lambda s, x: _inplace(x), {}, _img(2, 3)),
    "pad": (lambda s, x: (F.pad(x, (1, 2)), F.pad(x, (1, 1, 2, 0), value=1.5),
                          F.pad(x, (2, 2, 1, 1), mode="reflect"),
                          F.pad(x, (1, 0, 0, 1), mode="replicate"), s.z(x), s.r(x)),
            dict(z=nn.ZeroPad2d(1), r=nn.ReflectionPad2d((1, 0, 2, 1))), _img(1, 2, 4, 5)),
    "matmul": (lambda s, x: (torch.matmul(x, x.transpose(1, 2)), torch.bmm(x, x.mT),
                             x[0] @ x[1].t()), {}, _img(2, 3, 3)),
    "cast": (lambda s, x: (x.to(torch.float16), x.half().float() + 1, x.long(),
                           x.to(torch.int32) + 1, x.double()),
             {}, lambda: torch.randn(3, 4) * 10),
    "expand_repeat": (lambda s, x: (x.expand(2, 3, 4), x.repeat(1, 2, 1),
                                    x.expand_as(torch.zeros(3, 3, 4)), x[:, :1].expand(-1, 3, 4)),
                      {}, _img(1, 3, 4)),
    "shape_arith": (lambda s, x: F.interpolate(x, size=(x.shape[2] * 2, x.size(3) // 2)).view(
        x.shape[0], x.size(1), -1), {}, _img(2, 3, 4, 6)),
    "constants": (lambda s, x: x * s.scale + torch.ones(4) * 2 + s.scale.sum(),
                  {}, _img(2, 4)),
    "conv_padding_modes": (lambda s, x: s.a(x) + s.b(x),
                           dict(a=nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular"),
                                b=nn.Conv2d(2, 3, 3, padding=1, padding_mode="replicate")),
                           _img(1, 2, 5, 5)),
    "conv_transpose_output_size": (lambda s, x: s.c(x, output_size=(10, 10)),
                                   dict(c=nn.ConvTranspose2d(2, 3, 3, 2, 1)), _img(1, 2, 5, 5)),
    "unbatched": (lambda s, x: (s.c(x), F.max_pool2d(x, 2), s.a(x)),
                  dict(c=nn.Conv2d(2, 3, 3), a=nn.AdaptiveAvgPool2d(2)), _img(2, 6, 6)),
    "batch_norm_fn": (lambda s, x: F.batch_norm(x, s.b.running_mean, s.b.running_var,
                                                s.b.weight, s.b.bias, False, 0.1, 1e-3),
                      dict(b=nn.BatchNorm2d(2)), _img(1, 2, 3, 3)),
    "pool_1d_3d": (lambda s, x: (F.max_pool1d(x.flatten(2), 3, 2), F.avg_pool3d(x, 2),
                                 F.adaptive_avg_pool1d(x.flatten(2), 4),
                                 F.max_pool3d(x, 2, 1, 1)), {}, _img(1, 2, 4, 4, 4)),
    "min_forms": (lambda s, x: (torch.argmin(x, 1), x.amin((0, 2)), torch.min(x), x.min(-1)),
                  {}, _img(2, 3, 4)),
    "narrow_select": (lambda s, x: (torch.tensor_split(x, 3, 1), x.narrow(1, 1, 2),
                                    x.select(2, -1), x[:, :, s.mask], x.clamp(min=s.lo)),
                      {}, _img(2, 5, 4)),
    "int_math": (lambda s, x: ((x * 10).long() + 1, (x * 10).int() * 2, x.argmax(1) + 1,
                               (x * 3).int() / 2, -(x * 3).int()), {}, _img(2, 5)),
    "upsample_modules": (lambda s, x: (s.a(x), s.b(x)),
                         dict(a=nn.UpsamplingNearest2d(scale_factor=2),
                              b=nn.UpsamplingBilinear2d(size=(5, 7))), _img(1, 2, 3, 4)),
}


def _inplace(x):
    y = x * 2
    y.add_(1)
    y.relu_()
    y *= 3
    z = y.clone()
    z.clamp_(max=4)
    return y, z


def _build(name: str) -> tuple[nn.Module, torch.Tensor]:
    fn, mods, make = CASES[name]
    torch.manual_seed(hash(name) % 1000)
    model = Fn(fn, **mods)
    model.register_buffer("grid", torch.rand(1, 4, 3, 2) * 2.4 - 1.2)
    model.register_buffer("scale", torch.randn(4))
    model.register_buffer("mask", torch.tensor([True, False, True, True]))
    model.register_buffer("lo", torch.tensor(-0.2))
    model.pw = nn.Parameter(torch.randn(4))
    model.pm = nn.Parameter(torch.randn(4, 5))
    return randomize(model), make()


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("export", [False, True], ids=["fx", "export"])
@pytest.mark.parametrize("name", list(CASES))
def test_op(name, export, monkeypatch):
    model, x = _build(name)
    check(model, x, export=export, monkeypatch=monkeypatch)


# -- inputs and outputs -----------------------------------------------------------------------
class TwoInTwoOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, image, bias):
        y = self.conv(image) + bias
        return y, y.mean((2, 3))


class DictOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        return {"cls": self.head(x).sigmoid(), "box": self.head(x).flatten(1), "same": x}


def test_multi_input_tuple_output():
    model = randomize(TwoInTwoOut())
    g = check(model, (torch.randn(1, 3, 4, 4), torch.randn(1, 4, 1, 1)))
    assert [v.name for v in g.inputs] == ["image", "bias"]
    assert [v.name for v in g.outputs] == ["output0", "output1"]


@pytest.mark.parametrize("export", [False, True], ids=["fx", "export"])
def test_dict_inputs_and_outputs(export, monkeypatch):
    model = randomize(DictOut())
    g = check(model, {"x": torch.randn(1, 3, 4, 4)}, export=export, monkeypatch=monkeypatch)
    assert [v.name for v in g.inputs] == ["x"]
    assert [v.name for v in g.outputs] == ["cls", "box", "same"]


class Keywords(nn.Module):
    def forward(self, a, b, c=None):
        return {"s": a - b * 2, "t": (c + 1, a)}


@pytest.mark.parametrize("export", [False, True], ids=["fx", "export"])
def test_named_inputs_follow_forward_order(export, monkeypatch):
    inputs = {"c": torch.randn(2), "b": torch.randn(2), "a": torch.randn(2)}
    g = check(Keywords(), inputs, export=export, monkeypatch=monkeypatch)
    assert [v.name for v in g.inputs] == ["a", "b", "c"]
    assert [v.name for v in g.outputs] == ["s", "t_0", "t_1"]
    with pytest.raises(InputError, match="'d' are not parameters of forward"):
        hbc.load((Keywords(), {"a": torch.randn(2), "d": torch.randn(2)}))


class FeatureListHead(nn.Module):
    """A head taking a list of feature maps (as detection heads on an FPN do)."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(4, 2, 1) for _ in range(2))

    def forward(self, feats, scale: float = 2.0):
        return [conv(f) * scale for conv, f in zip(self.convs, feats, strict=True)]


@pytest.mark.parametrize("export", [False, True], ids=["fx", "export"])
def test_list_inputs_and_outputs(export, monkeypatch):
    feats = [torch.randn(1, 4, 8, 8), torch.randn(1, 4, 4, 4)]
    g = check(randomize(FeatureListHead()), (feats, 3.0), export=export,
              monkeypatch=monkeypatch)
    assert [v.name for v in g.inputs] == ["feats_0", "feats_1"]
    assert [v.name for v in g.outputs] == ["output0", "output1"]
    assert g.node("convs.1").inputs[0].name == "feats_1"


class InplaceOnView(nn.Module):
    def forward(self, x):
        v = x[:, :2]
        v.relu_()
        return x * 2


class InplaceOnFresh(nn.Module):
    def forward(self, x):
        y = x * 2
        y.relu_()
        z = y.view(-1)
        z.add_(1)
        return z


class InplaceThroughView(nn.Module):
    def forward(self, x):
        y = x * 2
        z = y.view(-1)
        z.add_(1)  # also changes y
        return z, y


@pytest.mark.parametrize("export", [False, True], ids=["fx", "export"])
def test_inplace_ops(export, monkeypatch):
    check(InplaceOnFresh(), torch.randn(2, 3), export=export, monkeypatch=monkeypatch)
    for model in (InplaceOnView(), InplaceThroughView()):
        with pytest.raises(UnsupportedError, match="shares memory"):
            hbc.load((model, torch.randn(2, 3)))


# -- control flow -----------------------------------------------------------------------------
class ShapeBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        if x.shape[-1] > 4:  # fx cannot trace this; torch.export specializes on the shape
            x = self.conv(x)
        for _ in range(x.size(1) // 3):
            x = x + 1
        return x


class ValueBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > 0:  # VALUE-BRANCH
            return y * 2
        return y


def test_shape_control_flow_uses_export():
    g = check(randomize(ShapeBranch()), torch.randn(1, 3, 6, 6))
    assert g.meta["frontend"] == "torch.export"
    assert g.node("conv").loc == "conv"


def test_value_control_flow_is_a_clear_error():
    with pytest.raises(UnsupportedError) as e:
        hbc.load((ValueBranch(), torch.randn(1, 3, 4, 4)))
    msg = str(e.value)
    line = _line_of("VALUE-BRANCH")
    assert f"test_torch_frontend.py:{line}" in msg, msg
    assert "depends on tensor values" in msg and "control flow" in msg


def _line_of(marker: str) -> int:
    with open(__file__) as f:
        for i, text in enumerate(f, 1):
            if marker in text and "_line_of" not in text:
                return i
    raise AssertionError(marker)


# -- unsupported ops --------------------------------------------------------------------------
class WithGelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(nn.Conv2d(3, 3, 1), nn.GELU())
        self.head = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        x = self.blocks(x)
        x = torch.fft.fft2(x).real  # FFT-CALL
        return self.head(x)


@pytest.mark.parametrize("export", [False, True], ids=["fx", "export"])
def test_unsupported_ops_are_all_reported(export, monkeypatch):
    if export:
        monkeypatch.setattr(torch_import, "_trace_fx", _no_fx)
    with pytest.raises(UnsupportedError) as e:
        hbc.load((WithGelu(), torch.randn(1, 3, 4, 4)))
    msg = str(e.value)
    assert "nodes cannot be imported" in msg, msg
    assert "blocks.1" in msg and "GELU" in msg.upper()
    assert f"test_torch_frontend.py:{_line_of('FFT-CALL')}" in msg, msg
    assert "fft" in msg and "hint:" in msg


def test_unsupported_error_names_the_source_line():
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.act = nn.GELU()

        def forward(self, x):
            return self.act(x) + 1  # GELU-LINE

    with pytest.raises(UnsupportedError) as e:
        hbc.load((M(), torch.randn(2, 3)))
    msg = str(e.value)
    assert msg.startswith("M: act: nn.GELU")
    assert f"test_torch_frontend.py:{_line_of('GELU-LINE')}" in msg
    assert e.value.hint and "ReLU" in e.value.hint


def test_bad_inputs():
    with pytest.raises(InputError):
        hbc.load((nn.ReLU(), "not a tensor"))
    with pytest.raises(InputError):
        torch_import.import_torch("model", torch.randn(1))
    with pytest.raises(InputError, match="running the model on the example inputs failed"):
        hbc.load((ValueBranch(), torch.randn(1, 4, 4, 4)))  # 4 channels for a 3-channel conv


# -- module:function specs --------------------------------------------------------------------
MODEL_FILE = textwrap.dedent("""
    import torch
    from torch import nn

    def make():
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
        return model, torch.randn(1, 3, 8, 8)

    def not_a_pair():
        return 42

    def broken():
        raise ValueError("no weights here")

    VALUE = 3
""")


def test_import_callable(tmp_path, monkeypatch):
    (tmp_path / "hbc_test_models.py").write_text(MODEL_FILE)
    monkeypatch.syspath_prepend(str(tmp_path))
    g = hbc.load("hbc_test_models:make")
    assert [n.op for n in g.nodes] == ["conv", "relu"]
    assert g.node("0").inputs[1].name == "0.weight"
    g2 = torch_import.import_callable(f"{tmp_path / 'hbc_test_models.py'}:make")
    assert [n.op for n in g2.nodes] == ["conv", "relu"]


@pytest.mark.parametrize("spec, words", [
    ("hbc_no_such_module_xyz:make", "cannot import module"),
    ("hbc_test_models:missing", "has no attribute 'missing'"),
    ("hbc_test_models:not_a_pair", "expected a pair"),
    ("hbc_test_models:broken", "no weights here"),
    ("hbc_test_models:VALUE", "not a function"),
    ("hbc_test_models:", "expected 'package.module:function'"),
    ("/no/such/file.py:make", "no such file"),
])
def test_import_callable_errors(spec, words, tmp_path, monkeypatch):
    (tmp_path / "hbc_test_models.py").write_text(MODEL_FILE)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(InputError) as e:
        torch_import.import_callable(spec)
    assert words in str(e.value)


def test_torch_not_imported_by_hbc():
    import subprocess
    import sys

    code = "import sys, hbc, hbc.ir.interpret; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_supported_lists_the_converters():
    from hbc.frontend.torch_ops import supported

    table = supported()
    assert {"nn.Conv2d", "nn.BatchNorm2d", "nn.ReLU6", "nn.Upsample"} <= set(table["modules"])
    assert "nn.GELU" not in table["modules"]
    assert "Tensor.view" in table["methods"] and "aten.conv2d" in table["aten"]
