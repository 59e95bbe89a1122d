"""The integer reference of ``hbc verify`` for a float REF: the program REF gives with the
quantization parameters recorded in the ``.hbm``.

The float REF, optimized as compile did, gets the scale the ``.hbm`` records for each of its
values (the integer value of the same name, or ``NAME.q`` for a value quantized at a boundary),
then is lowered with the compile's options (march, high-precision output, the nodes placed on
the CPU). The result must be the program in the file, node for node and constant for constant:
then the int_infer of that program is the int_infer of REF, and the simulator is checked
against it. A difference means the file does not hold what REF compiles to (another model, other
options, a damaged or edited program) and is reported at its first node: exit 1.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hbc.errors import CheckFailed
from hbc.ir.graph import Graph
from hbc.ir.types import FLOAT_DTYPES, QuantParams

#: the scale of float values the program keeps no integer version of
PLACEHOLDER = QuantParams((1.0,))


def derive_program(floats: Graph, program: Graph, options: dict[str, Any]) -> Graph:
    """Lower ``floats`` (a float graph, optimized) with the scales recorded in ``program``."""
    from hbc.passes import run

    g = floats.copy()
    for v in list(g.values()):
        if v.kind == "const" or v.dtype not in FLOAT_DTYPES:
            continue
        # a value the program does not keep (e.g. the sigmoid inside a SiLU table) gets a
        # placeholder: if lowering used it after all, the programs differ and it is reported
        g.set_quant(v, _recorded(program, v.name) or PLACEHOLDER)
    lowered = program.meta.get("lowered", {})
    g.meta["int16_values"] = list(lowered.get("int16_values", []))
    g.meta.setdefault("calibration", {"method": "recorded in the .hbm"})
    return run(g, passes=[("lower-int", {
        "march": lowered.get("march", options.get("march", "bayes")),
        "high_precision_output": bool(lowered.get("high_precision_output", False)),
        "cpu_nodes": list(program.meta.get("cpu_nodes", [])),
    })])


def _recorded(program: Graph, name: str) -> Any:
    """The scale the program records for float value ``name``, or None."""
    for candidate in (name, f"{name}.q"):
        if program.has_value(candidate):
            v = program.value(candidate)
            if v.type.quant is not None and v.dtype not in FLOAT_DTYPES:
                return v.type.quant
    return None


def first_difference(derived: Graph, program: Graph) -> str | None:
    """Where ``derived`` and ``program`` first differ (a node, or a constant), or None."""
    from hbc.ir.text import to_text

    ours, theirs = to_text(derived).splitlines(), to_text(program).splitlines()
    for i, (a, b) in enumerate(zip(ours, theirs, strict=False)):
        if a != b:
            return f"line {i + 1} of the program:\n    from REF: {a.strip()}\n    in .hbm:  " \
                   f"{b.strip()}"
    if len(ours) != len(theirs):
        return f"the program from REF has {len(ours)} lines, the .hbm's {len(theirs)}"
    for name, want in program.constants.items():
        got = derived.constants.get(name)
        if got is None or got.shape != want.shape or not np.array_equal(got, want):
            return f"constant %{name} differs"
    return None


def check_derivation(floats: Graph, program: Graph, options: dict[str, Any], where: str,
                     ref_text: str) -> None:
    """Raise CheckFailed when REF with the recorded scales does not give the file's program."""
    diff = first_difference(derive_program(floats, program, options), program)
    if diff is not None:
        raise CheckFailed(
            f"{where}: the program in the file is not what {ref_text} compiles to with the "
            f"scales the file records; first difference at {diff}",
            hint="verify against the model the .hbm was compiled from, with the same "
                 "--input-shape (or pass the lowered .hbir from 'hbc compile --report')")
