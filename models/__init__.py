"""The reference model zoo: plain PyTorch models behind one registry.

``names()`` lists the models; ``build(name, **config)`` returns ``(module, example_inputs)``
with seeded weights and BatchNorm statistics (:func:`hbc.models.common.seeded_init`), in eval
mode, with example inputs at the model's standard size. Every command that takes a MODEL
accepts ``zoo:NAME`` for these.

========================  ====================  ============================================
name                      example input          source
========================  ====================  ============================================
resnet18, resnet50        1x3x224x224            He et al. 2015 (``resnet.py``)
mobilenet_v1, _v2         1x3x224x224            Howard 2017, Sandler 2018 (``mobilenet.py``)
efficientnet_b0, _b2      1x3x224x224            Tan and Le 2019 (``efficientnet.py``)
vargnet_v2                1x3x224x224            VarGNet, document 001 (``vargnet.py``)
mixvargenet               1x3x224x224            document 002 (``mixvargenet.py``)
multitask_resize          1x3x512x960            document 001 (``multitask.py``)
stereonet                 2x3x544x960            document 003 (``stereonet.py``)
bev_ipm                   6x3x256x480            document 004 (``bev_ipm.py``)
========================  ====================  ============================================

Model modules are imported inside :func:`build`, so ``import hbc.models`` loads only this file
(and torch only when a model is built).
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ZooEntry:
    """Where a zoo model lives and how its example inputs are made.

    ``function`` in ``hbc.models.<module>`` either builds a classifier from its keyword
    config (``input_size`` then sets the 1x3xSxS example input, default ``input_size``) or,
    with ``custom=True``, returns ``(module, example_inputs)`` itself and takes ``seed``.
    """

    module: str
    function: str
    summary: str
    input_size: int = 224
    custom: bool = False


_ZOO: dict[str, ZooEntry] = {
    "resnet18": ZooEntry("resnet", "resnet18", "ResNet-18, ImageNet"),
    "resnet50": ZooEntry("resnet", "resnet50", "ResNet-50 (v1.5), ImageNet"),
    "mobilenet_v1": ZooEntry("mobilenet", "mobilenet_v1", "MobileNetV1 1.0x, ImageNet"),
    "mobilenet_v2": ZooEntry("mobilenet", "mobilenet_v2", "MobileNetV2 1.0x, ImageNet"),
    "efficientnet_b0": ZooEntry("efficientnet", "efficientnet_b0", "EfficientNet-B0, ImageNet"),
    "efficientnet_b2": ZooEntry("efficientnet", "efficientnet_b2",
                                "EfficientNet-B2, ImageNet (at 224x224; native 260)"),
    "vargnet_v2": ZooEntry("vargnet", "vargnet_v2",
                           "VarGNetV2 ImageNet classifier (variant: 1.0x, g8g8_0.5x, g8g4_0.5x)"),
    "mixvargenet": ZooEntry("mixvargenet", "mixvargenet",
                            "MixVarGENet ImageNet classifier (config: imagenet, imagenet_fusion)"),
    "multitask_resize": ZooEntry("multitask", "build",
                                 "VarGNetV2 g8g8 0.5x, 4 detection + 2 segmentation heads "
                                 "(mode: model, export, deploy)", custom=True),
    "stereonet": ZooEntry("stereonet", "build", "StereoNet stereo depth, maxdisp 192",
                          custom=True),
    "bev_ipm": ZooEntry("bev_ipm", "build",
                        "BEV IPM multi-task: EfficientNet-B0, FastSCNN, IPM grid_sample, "
                        "BiFPN, seg + CenterPoint heads", custom=True),
}


def names() -> list[str]:
    """The zoo's model names, in the registry's order."""
    return list(_ZOO)


def describe(name: str) -> str:
    """A one-line description of a zoo model."""
    return _ZOO[_entry_name(name)].summary


def build(name: str, *, seed: int = 0, **config: Any) -> tuple[torch.nn.Module, tuple]:
    """Build zoo model ``name``: ``(module, example_inputs)``, seeded weights, eval mode.

    ``config`` goes to the model's constructor (e.g. ``variant="g8g4_0.5x"`` for vargnet_v2,
    ``mode="deploy"`` for multitask_resize, ``input_size=260`` for a classifier). Raises
    ``ValueError`` for an unknown name (the message lists the known ones) or a config key the
    model does not take.
    """
    from .blocks import example_image
    from .common import seeded_init

    entry = _ZOO[_entry_name(name)]
    fn = getattr(importlib.import_module(f"{__name__}.{entry.module}"), entry.function)
    if entry.custom:
        _check_config(name, fn, config)
        model, inputs = fn(seed=seed, **config)
    else:
        size = int(config.pop("input_size", entry.input_size))
        _check_config(name, fn, config, extra=("input_size",))
        model = fn(**config)
        inputs = (example_image((1, 3, size, size), seed),)
    return seeded_init(model, seed), inputs


def _entry_name(name: str) -> str:
    if name not in _ZOO:
        raise ValueError(f"unknown zoo model '{name}'; known: {', '.join(_ZOO)}")
    return name


def _check_config(name: str, fn: Any, config: dict[str, Any], extra: tuple[str, ...] = ()
                  ) -> None:
    accepted = [p for p in inspect.signature(fn).parameters if p != "seed"]
    unknown = sorted(set(config) - set(accepted))
    if unknown:
        raise ValueError(f"zoo model '{name}' takes no option {', '.join(unknown)}; options: "
                         + ", ".join([*accepted, *extra]))
