"""Models for the runtime and verify tests: small torch models calibrated and lowered the way
``compile`` does (``opt=3`` float passes, ``calibrate``, ``lower-int``), packed into ``.hbm``
bytes with the writer.

- ``small_net``: two inputs, two outputs; residual add, concat, max and average pools, a
  strided conv, bilinear and nearest resizes, a sigmoid (lookup table) and a linear head.
- ``digits_net``: a small CNN on the 8x8 sklearn digits images (real inputs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

import hbc
from hbc.backend.hbm_writer import HbmModelSpec, hbm_bytes
from hbc.ir.graph import Graph
from hbc.passes import run
from hbc.passes.calibrate import calibrate


class SmallNet(nn.Module):
    """Two inputs (an image and a one-channel map), two outputs (a map and logits)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.side = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())
        self.down = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.head = nn.Conv2d(16, 4, 1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.stem(x)
        a = torch.relu(self.block(a) + a)
        c = torch.cat([a, self.side(y)], 1)
        f = F.max_pool2d(c, 2) + torch.relu(self.down(c))
        seg = torch.sigmoid(F.interpolate(self.head(f), scale_factor=2, mode="bilinear",
                                          align_corners=False))
        g = F.interpolate(F.avg_pool2d(f, 2), scale_factor=2, mode="nearest") + f
        return seg, self.fc(F.adaptive_avg_pool2d(g, 1).flatten(1))


class DigitsNet(nn.Module):
    """conv-relu, strided conv-relu, global pool, linear: 1x1x8x8 digits to 10 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _seeded(make: type[nn.Module], seed: int) -> nn.Module:
    """``make()`` built under ``seed``, with non-trivial BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    module = make()
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return module.eval()


def small_net() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(0)
    net = _seeded(SmallNet, 0)
    return net, (torch.randn(1, 3, 16, 16, generator=g), torch.randn(1, 1, 16, 16, generator=g))


def digits() -> np.ndarray:
    """The sklearn digits as float32 (N, 1, 8, 8) in [0, 1]."""
    from sklearn.datasets import load_digits

    return (load_digits().images[:, None] / 16.0).astype(np.float32)


def digits_labels() -> np.ndarray:
    from sklearn.datasets import load_digits

    return load_digits().target


def digits_net(steps: int = 120) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """DigitsNet trained ``steps`` full-batch Adam steps on the first 1200 digits (seeded)."""
    torch.manual_seed(1)
    net = DigitsNet()
    x, y = torch.from_numpy(digits()[:1200]), torch.from_numpy(digits_labels()[:1200])
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    return net.eval(), (torch.zeros(1, 1, 8, 8),)


def random_inputs(graph: Graph, seed: int, std: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {v.name: (std * rng.standard_normal(v.shape)).astype(v.type.np_dtype)
            for v in graph.inputs}


@dataclass
class Compiled:
    """A model through the flow: float graph (-O3), lowered graph, and its .hbm bytes."""

    name: str
    floats: Graph
    lowered: Graph
    hbm: bytes


def compile_model(name: str, model: tuple[nn.Module, tuple], *, calib: list | None = None,
                  march: str = "bayes", cpu_ops: tuple[str, ...] = (),
                  **options: Any) -> Compiled:
    """Calibrate (on ``calib``, else two seeded normal samples) and lower ``model``; nodes of
    the ops ``cpu_ops`` (the first of each) are forced onto the CPU."""
    floats = run(hbc.load(model), opt=3)
    samples = calib or [random_inputs(floats, s) for s in (0, 1)]
    cal = calibrate(floats, samples, method="max")
    cpu = [next(n.name for n in floats.nodes if n.op == op) for op in cpu_ops]
    lowered = run(cal, passes=[("lower-int", {"march": march, "cpu_nodes": cpu, **options})])
    opts = {"march": march, "opt": 3, "calib_method": "max", "calib_samples": len(samples),
            "input_type": "featuremap",
            "high_precision_output": bool(options.get("high_precision_output"))}
    data = hbm_bytes([HbmModelSpec(name, lowered, opts, {})], march)
    return Compiled(name, floats, lowered, data)
