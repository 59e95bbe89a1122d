"""Tensor types of the IR: dtypes, static shapes, layout tags and quantization parameters."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from hbc.errors import InputError

# IR dtype name -> numpy dtype. The core set is f32, f16, i8, i16, i32, i64, u8, bool; the
# wider integer and f64 types exist so imported graphs that use them (index math, ONNX test
# models) can still be represented and interpreted.
DTYPES: dict[str, np.dtype] = {
    "f32": np.dtype(np.float32),
    "f16": np.dtype(np.float16),
    "f64": np.dtype(np.float64),
    "i8": np.dtype(np.int8),
    "i16": np.dtype(np.int16),
    "i32": np.dtype(np.int32),
    "i64": np.dtype(np.int64),
    "u8": np.dtype(np.uint8),
    "u16": np.dtype(np.uint16),
    "u32": np.dtype(np.uint32),
    "u64": np.dtype(np.uint64),
    "bool": np.dtype(np.bool_),
}
# Narrow float and integer interchange formats (bf16, float8, int4, ...) that ONNX models may
# carry; ml_dtypes gives numpy dtypes for them. hbir can hold and cast them, nothing computes in
# them.
_INTERCHANGE = {
    "bf16": "bfloat16",
    "f8e4m3fn": "float8_e4m3fn",
    "f8e4m3fnuz": "float8_e4m3fnuz",
    "f8e5m2": "float8_e5m2",
    "f8e5m2fnuz": "float8_e5m2fnuz",
    "f8e8m0": "float8_e8m0fnu",
    "f4e2m1": "float4_e2m1fn",
    "i4": "int4",
    "u4": "uint4",
    "i2": "int2",
    "u2": "uint2",
}
try:
    import ml_dtypes as _ml

    for _name, _attr in _INTERCHANGE.items():
        DTYPES[_name] = np.dtype(getattr(_ml, _attr))
except ImportError:  # pragma: no cover - ml_dtypes comes with onnx
    pass
INTERCHANGE_DTYPES = frozenset(n for n in _INTERCHANGE if n in DTYPES)
_BY_NUMPY = {v: k for k, v in DTYPES.items()}

FLOAT_DTYPES = frozenset({"f32", "f16", "f64"})
LAYOUTS = ("NCHW", "NHWC")


def numpy_dtype(dtype: str) -> np.dtype:
    """The numpy dtype of an IR dtype name."""
    return DTYPES[dtype]


def dtype_of(array_or_dtype) -> str:
    """The IR dtype name of a numpy array or dtype; InputError if hbir has no such dtype."""
    dt = np.dtype(getattr(array_or_dtype, "dtype", array_or_dtype))
    try:
        return _BY_NUMPY[dt]
    except KeyError:
        raise InputError(
            f"dtype {dt} is not an hbir dtype (supported: {', '.join(DTYPES)})"
        ) from None


@dataclass(frozen=True)
class QuantParams:
    """Symmetric linear quantization: real = scale * (q - zero_point).

    ``axis is None`` means per tensor (one scale); otherwise one scale per index along ``axis``.
    Zero points other than 0 are only kept so imported asymmetric QDQ models can be represented;
    the integer pipeline requires 0.
    """

    scale: tuple[float, ...]
    axis: int | None = None
    zero_point: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", tuple(float(s) for s in self.scale))
        if self.zero_point is not None:
            zp = tuple(int(z) for z in self.zero_point)
            object.__setattr__(self, "zero_point", None if not any(zp) else zp)
        if self.axis is None and len(self.scale) != 1:
            raise InputError(f"per-tensor quantization needs one scale, got {len(self.scale)}")

    @property
    def per_channel(self) -> bool:
        return self.axis is not None


@dataclass(frozen=True)
class TensorType:
    """dtype, static shape, optional layout tag ("NCHW"/"NHWC") and optional quantization."""

    dtype: str
    shape: tuple[int, ...]
    layout: str | None = None
    quant: QuantParams | None = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise InputError(f"unknown dtype '{self.dtype}' (expected one of {', '.join(DTYPES)})")
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        if self.layout is not None and self.layout not in LAYOUTS:
            raise InputError(f"unknown layout '{self.layout}' (expected NCHW or NHWC)")

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def numel(self) -> int:
        # Python ints: a crafted shape must not overflow into a small or negative count
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPES[self.dtype].itemsize

    @property
    def np_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]

    def with_(self, **changes) -> TensorType:
        """A copy with some fields replaced."""
        fields = {"dtype": self.dtype, "shape": self.shape, "layout": self.layout,
                  "quant": self.quant}
        fields.update(changes)
        return TensorType(**fields)

    def describe(self) -> str:
        """Short human form for messages: ``f32[1, 3] NHWC q(scale=[0.5], axis=None)``."""
        s = f"{self.dtype}{list(self.shape)}"
        if self.layout:
            s += f" {self.layout}"
        if self.quant:
            s += f" q(scale={list(self.quant.scale)}, axis={self.quant.axis})"
        return s

    def same_shape_dtype(self, other: TensorType) -> bool:
        return self.dtype == other.dtype and self.shape == other.shape


def type_of_array(array: np.ndarray) -> TensorType:
    """The TensorType of a numpy array (no layout, no quantization)."""
    return TensorType(dtype_of(array), tuple(array.shape))
