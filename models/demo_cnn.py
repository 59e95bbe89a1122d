"""DemoNet: a small ResNet-style CNN (conv-BN-ReLU stem, two residual blocks, one strided,
global average pool, linear classifier) used by ``make demo`` and the tests.

Plain PyTorch code, seeded weights and non-trivial BatchNorm statistics, so outputs are
reproducible and BN folding has something to fold.
"""

from __future__ import annotations

import torch
from torch import nn

from .common import export_onnx, seeded_init


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv-BN, identity or 1x1 strided projection shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + identity)


class DemoNet(nn.Module):
    """Stem, two residual stages, global pool, classifier."""

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.layer1 = BasicBlock(width, width)
        self.layer2 = BasicBlock(width, 2 * width, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def build(seed: int = 0, input_size: int = 32) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """DemoNet in eval mode with seeded weights and BN statistics, and an example input."""
    model = seeded_init(DemoNet(), seed)
    x = torch.randn(1, 3, input_size, input_size, generator=torch.Generator().manual_seed(seed))
    return model, (x,)


def export(path: str, seed: int = 0) -> None:
    """Export DemoNet to ONNX with the input named 'input' and the output 'logits'."""
    model, args = build(seed)
    export_onnx(model, args, path, input_names=["input"], output_names=["logits"])
