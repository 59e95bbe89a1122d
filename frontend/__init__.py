"""Frontends: ONNX and PyTorch models into the IR. Heavy imports happen inside the functions."""

from __future__ import annotations
