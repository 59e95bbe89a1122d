"""Helpers shared by the reference models: seeded initialisation, BN re-estimation, ONNX
export."""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from hbc.ir.atomic import write_atomic


def seeded_init(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give ``model`` reproducible He-scaled weights and non-trivial BN statistics; eval mode.

    Random BN statistics (not the 0/1 defaults) make BN folding and per-layer numerics
    meaningful in tests.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            elif isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
    return model.eval()


def export_onnx(model: nn.Module, args: Sequence[torch.Tensor], path: str, *,
                input_names: Sequence[str] = ("input",),
                output_names: Sequence[str] = ("output",), opset: int = 17) -> None:
    """Export with the TorchScript exporter (needs no onnxscript), warnings silenced.

    Constant folding is off so BatchNormalization stays in the graph: folding it is hbc's job.
    """
    buf = io.BytesIO()  # exported in memory, then written atomically (no half-written file)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), tuple(args), buf, dynamo=False, opset_version=opset,
                          do_constant_folding=False,
                          input_names=list(input_names), output_names=list(output_names))
    write_atomic(Path(path), lambda f: f.write(buf.getvalue()))


def recalibrate_bn(model: nn.Module, batches: Iterable[torch.Tensor]) -> nn.Module:
    """Re-estimate every BN layer's running mean and variance on ``batches``; eval mode.

    Seeded random weights let activations grow layer after layer (1e3-1e6 deep in a ResNet on
    real inputs); statistics measured on real-valued inputs keep each BN output normalised, so
    the activation ranges look like a trained network's. BN layers run in train mode with
    ``momentum=None`` (a cumulative average over all batches), affine parameters unchanged;
    the rest of the model (dropout, ...) stays in eval mode.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    model.eval()
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    with torch.no_grad():
        for batch in batches:
            model(batch)
    for m, momentum in zip(bns, saved, strict=True):
        m.momentum = momentum
    return model.eval()
