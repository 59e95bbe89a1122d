"""ONNX backend node conformance cases for the op set hbc imports.

The installed onnx package generates the cases in memory; a case is selected when every node of
its model has an op type in ``OP_SET``. ``run_case`` imports the model, round-trips it through
the text form and interprets it, returning None on success or the failure reason.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import onnx
import onnx.numpy_helper

OP_SET = frozenset(
    "Conv ConvTranspose BatchNormalization Relu LeakyRelu PRelu Clip Sigmoid Tanh HardSigmoid "
    "HardSwish Softmax Add Sub Mul Div Concat Split Slice Pad MaxPool AveragePool "
    "GlobalAveragePool GlobalMaxPool Gemm MatMul Reshape Flatten Transpose Squeeze Unsqueeze "
    "Resize Upsample ReduceMean ReduceMax ReduceSum ArgMax GridSample DepthToSpace SpaceToDepth "
    "Gather Identity Dropout Constant Cast Shape QuantizeLinear DequantizeLinear".split()
)


@functools.cache
def cases() -> list:
    """Every onnx backend node case whose ops are all in OP_SET, sorted by name."""
    from onnx.backend.test.loader import load_model_tests

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        all_cases = load_model_tests(kind="node")
    out = []
    for c in all_cases:
        types = {n.op_type for n in c.model.graph.node}
        if types and types <= OP_SET:
            out.append(c)
    return sorted(out, key=lambda c: c.name)


def _array(x) -> np.ndarray:
    """Case data arrives as numpy arrays or TensorProtos (for dtypes numpy lacks)."""
    if isinstance(x, onnx.TensorProto):
        return onnx.numpy_helper.to_array(x)
    return np.asarray(x)


def _tolerance(case) -> tuple[float, float]:
    return float(getattr(case, "rtol", 1e-3) or 1e-3), float(getattr(case, "atol", 1e-7) or 1e-7)


def run_case(case, roundtrip: bool = True) -> str | None:
    """Run one case; None if every data set matches, else a one-line reason."""
    import hbc
    from hbc.frontend.onnx_import import static_input_names
    from hbc.ir.interpret import interpret

    model = case.model
    rtol, atol = _tolerance(case)
    for inputs, expected in case.data_sets or [([], [])]:
        inputs = [_array(a) for a in inputs]
        expected = [_array(b) for b in expected]
        names = [vi.name for vi in model.graph.input if vi.name not in
                 {t.name for t in model.graph.initializer}]
        feed = dict(zip(names, inputs, strict=False))
        static = {n: feed[n] for n in static_input_names(model) if n in feed}
        try:
            g = hbc.load(model, constant_inputs=static)
            if roundtrip:
                from hbc.ir import from_text, to_text

                text = to_text(g)
                g = from_text(text, constants=g.constants)
                if to_text(g) != text:
                    return "text round trip is not exact"
            outs = interpret(g, {k: v for k, v in feed.items() if k not in static})
        except Exception as e:  # report, do not crash the sweep
            return f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        got = list(outs.values())
        if len(got) < len(expected):
            return f"expected {len(expected)} outputs, got {len(got)}"
        for i, (a, b) in enumerate(zip(got, expected, strict=False)):
            b = np.asarray(b)
            if a.shape != b.shape:
                return f"output {i}: shape {a.shape} != expected {b.shape}"
            if a.dtype != b.dtype:
                return f"output {i}: dtype {a.dtype} != expected {b.dtype}"
            if b.dtype.kind in "fc":
                ok = np.allclose(a, b, rtol=rtol, atol=atol, equal_nan=True)
            elif b.dtype.kind == "V" and "float" in b.dtype.name:  # ml_dtypes bf16/f8/f4
                ok = np.array_equal(a.astype(np.float32), b.astype(np.float32), equal_nan=True)
            else:
                ok = np.array_equal(a, b)
            if not ok:
                err = np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))
                return f"output {i}: values differ (max abs err {err:.3g})"
    return None


if __name__ == "__main__":  # python -m tests.conformance [substring ...] [--no-roundtrip]
    import sys

    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    rt = "--no-roundtrip" not in sys.argv
    sel = [c for c in cases() if not args or any(a in c.name for a in args)]
    fails = 0
    for c in sel:
        r = run_case(c, roundtrip=rt)
        if r:
            fails += 1
            print(f"FAIL {c.name}: {r}")
    print(f"{len(sel) - fails}/{len(sel)} passed")
