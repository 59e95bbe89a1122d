"""ONNX Resize (opset 19) in torch, for the int_infer model: nearest resize of integer tensors
(an integer graph keeps it as it is) and linear/cubic resize of float CPU fallbacks.

Written from the declaration of the ``resize`` op (``hbc.ir.ops.resample``): each axis is
resampled on its own; an output index ``y`` maps to a source coordinate ``x`` by the
coordinate transformation mode, dividing by the axis's scale, or multiplying by
``n_in / n_out`` when that ratio is the scale (sizes were given) so integral positions stay
integral. Nearest picks ``floor(x)`` or ``floor(x) + 1`` by the nearest mode; linear and cubic
weight the taps around ``floor(x)`` with the triangle or the Keys kernel. Index tables are
computed in float64.
"""

from __future__ import annotations

import math

import torch


def _source(ctm: str, n_in: int, n_out: int, scale: float, roi: tuple[float, float]
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Source coordinate of every output index, and the mask of positions outside the input
    (tf_crop_and_resize only)."""
    y = torch.arange(n_out, dtype=torch.float64)
    out_f = scale * n_in
    exact = math.isclose(out_f, n_out, rel_tol=1e-12)
    if exact:
        out_f = float(n_out)

    def div(v: torch.Tensor) -> torch.Tensor:
        return v * n_in / n_out if exact else v / scale

    if ctm == "half_pixel":
        return div(y + 0.5) - 0.5, None
    if ctm == "half_pixel_symmetric":
        return n_in / 2 * (1 - n_out / out_f) + div(y + 0.5) - 0.5, None
    if ctm == "pytorch_half_pixel":
        return (div(y + 0.5) - 0.5) if n_out > 1 else torch.zeros_like(y), None
    if ctm == "align_corners":
        return (y * (n_in - 1) / (out_f - 1) if out_f != 1 else torch.zeros_like(y)), None
    if ctm == "asymmetric":
        return div(y), None
    if ctm == "tf_half_pixel_for_nn":
        return div(y + 0.5), None
    if ctm != "tf_crop_and_resize":
        raise ValueError(f"unknown coordinate_transformation_mode '{ctm}'")
    start, end = roi
    if out_f != 1:
        x = y * (end - start) * (n_in - 1) / (out_f - 1)
    else:
        x = torch.full_like(y, (end - start) * (n_in - 1) / 2)
    x = x + start * (n_in - 1)
    return x, (x < 0) | (x > n_in - 1)


def _weights(mode: str, d: torch.Tensor, a: float) -> torch.Tensor:
    d = d.abs()
    if mode == "linear":
        return (1.0 - d).clamp(min=0.0)
    near = (a + 2) * d**3 - (a + 3) * d**2 + 1
    far = a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a
    return torch.where(d <= 1, near, torch.where(d < 2, far, torch.zeros_like(d)))


def _taps(attrs: dict, n_in: int, n_out: int, scale: float, roi: tuple[float, float]):
    """(indices [out, taps], weights [out, taps] or None for nearest, outside mask)."""
    mode = attrs["mode"]
    x, outside = _source(attrs["coordinate_transformation_mode"], n_in, n_out, scale, roi)
    base = torch.floor(x)
    frac = x - base  # exact
    base = base.to(torch.int64)
    if mode == "nearest":
        nm = attrs["nearest_mode"]
        if nm == "round_prefer_floor":
            idx = base + (frac > 0.5)
        elif nm == "round_prefer_ceil":
            idx = base + (frac >= 0.5)
        elif nm == "floor":
            idx = base
        else:
            idx = torch.ceil(x).to(torch.int64)
        return idx.clamp(0, n_in - 1)[:, None], None, outside
    radius = 1 if mode == "linear" else 2
    s = min(scale, 1.0) if attrs["antialias"] else 1.0
    first = math.floor(-radius / s) + 1
    offsets = torch.arange(first, 1 - first + 1, dtype=torch.int64)
    w = _weights(mode, s * (offsets[None, :] - frac[:, None]), attrs["cubic_coeff_a"])
    if attrs["antialias"]:
        w = w / w.sum(dim=1, keepdim=True)
    idx = base[:, None] + offsets[None, :]
    if attrs["exclude_outside"]:
        w = torch.where((idx < 0) | (idx >= n_in), 0.0, w)
        total = w.sum(dim=1, keepdim=True)
        w = w / torch.where(total == 0, 1.0, total)
    return idx.clamp(0, n_in - 1), w, outside


def _resize_axis(data: torch.Tensor, axis: int, attrs: dict, n_out: int, scale: float,
                 roi: tuple[float, float], fill) -> torch.Tensor:
    idx, w, outside = _taps(attrs, data.shape[axis], n_out, scale, roi)
    idx = idx.to(data.device)
    shape = [1] * data.dim()
    shape[axis] = n_out
    if w is None:
        out = data.index_select(axis, idx[:, 0])
    else:
        out = None
        for t in range(idx.shape[1]):
            term = data.index_select(axis, idx[:, t]) * w[:, t].to(data).reshape(shape)
            out = term if out is None else out + term
    if outside is not None and bool(outside.any()):
        out = torch.where(outside.to(data.device).reshape(shape),
                          torch.tensor(fill, dtype=out.dtype, device=out.device), out)
    return out


def round_saturate(a: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Interpolated values back to ``dtype``: integers round half to even and saturate."""
    if dtype.is_floating_point:
        return a.to(dtype)
    info = torch.iinfo(dtype)
    return torch.round(a).clamp(info.min, info.max).to(dtype)


def resize_tensor(x: torch.Tensor, attrs: dict) -> torch.Tensor:
    """``x`` resized to ``attrs["size"]`` (ONNX Resize; see the module docstring)."""
    rank = x.dim()
    roi = attrs["roi"] or [0.0] * rank + [1.0] * rank
    crop = attrs["coordinate_transformation_mode"] == "tf_crop_and_resize"
    nearest = attrs["mode"] == "nearest"
    compute = torch.float32 if x.dtype in (torch.float16, torch.float32) else torch.float64
    data = x if nearest else x.to(compute)
    fill = attrs["extrapolation_value"]
    if nearest and not x.dtype.is_floating_point:
        fill = int(round_saturate(torch.tensor(fill, dtype=torch.float64), x.dtype))
    for axis in range(rank):
        n_out, scale = attrs["size"][axis], attrs["scales"][axis]
        box = (roi[axis], roi[axis + rank])
        trivial_box = not crop or (math.isclose(box[0], 0.0) and math.isclose(box[1], 1.0))
        if n_out == data.shape[axis] and math.isclose(scale, 1.0) and trivial_box:
            continue
        if n_out == 0 or data.numel() == 0:
            shape = list(data.shape)
            shape[axis] = n_out
            data = torch.zeros(shape, dtype=data.dtype, device=data.device)
            continue
        data = _resize_axis(data, axis, attrs, n_out, scale, box, fill)
    return data.contiguous() if nearest else round_saturate(data, x.dtype)
