"""Subcommands of the hbc CLI: run and verify (the simulator and align-bpu validation).

``hbc run MODEL.hbm --input NAME=FILE.npy ...`` runs :class:`hbc.runtime.Runtime` and writes
one ``.npy`` per output; ``hbc verify MODEL.hbm --reference REF`` calls
:func:`hbc.verify.verify` and exits 1 on a mismatch. Both import the heavy parts inside the
command (``hbc run`` loads neither torch nor onnx).
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

import click

from .cli import _handle_errors, input_shape_option, lazy_progress, main, parse_input_shapes
from .errors import InputError

if TYPE_CHECKING:
    import numpy as np


def read_npy(path: str | Path, what: str) -> np.ndarray:
    """One array from an ``.npy`` file, read safely (header and size checked before anything
    is allocated, no pickle); InputError naming the file and ``what`` it is for."""
    from hbc.ir.npy import read_npy as read

    return read(path, what)


def _inputs(specs: tuple[str, ...], names: list[str]) -> dict[str, np.ndarray]:
    """``NAME=FILE.npy`` options (``FILE.npy`` alone for a one-input model) as arrays."""
    out: dict[str, np.ndarray] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            if len(names) != 1:
                raise InputError(f"--input '{spec}': expected NAME=FILE.npy (model inputs: "
                                 f"{', '.join(names)})")
            name, path = names[0], spec
        if not name or not path:
            raise InputError(f"--input '{spec}': expected NAME=FILE.npy")
        if name in out:
            raise InputError(f"--input '{name}' is given twice")
        out[name] = read_npy(path, f"input '{name}'")
    return out


def _summary(arr: np.ndarray) -> str:
    if not arr.size:
        return "empty"
    return f"min {int(arr.min())}, max {int(arr.max())}" if arr.dtype.kind in "iu" else \
        f"min {float(arr.min()):.6g}, max {float(arr.max()):.6g}"


@main.command("run")
@click.argument("hbm", metavar="MODEL.hbm")
@click.option("-i", "--input", "inputs", multiple=True, metavar="NAME=FILE.npy",
              help="An input array (repeatable; FILE.npy alone for a one-input model). Float "
                   "arrays are quantized by the model; integer arrays of the input's quantized "
                   "dtype are taken as they are.")
@click.option("-o", "--output-dir", default=".", show_default=True,
              type=click.Path(file_okay=False), help="Write OUTPUT_NAME.npy files here.")
@click.option("--dequantize", is_flag=True,
              help="Write float outputs (default: the integers, scales printed).")
@click.option("--model", help="The model to run when the file holds several.")
@click.option("--march", help="Refuse a file compiled for another march.")
@click.option("--dump-dir", type=click.Path(file_okay=False),
              help="Also write every layer's output here (one .npy per value + index.json).")
@_handle_errors
def run_cmd(hbm: str, inputs: tuple[str, ...], output_dir: str, dequantize: bool,
            model: str | None, march: str | None, dump_dir: str | None) -> None:
    """Run a compiled model on the simulator; one .npy per output."""
    import numpy as np

    from hbc.ir.io import write_atomic
    from hbc.runtime import Runtime
    from hbc.runtime.runtime import file_name

    rt = Runtime(hbm, model, march=march)
    arrays = _inputs(inputs, [d.name for d in rt.inputs])
    start = time.perf_counter()
    outputs = rt.run(arrays, dequantize=dequantize, dump=dump_dir or False)
    ms = 1000 * (time.perf_counter() - start)
    folder = Path(output_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"-o {folder}: {e.strerror or e}") from None
    runs = next(iter(d.runs(np.asarray(arrays[d.name])) for d in rt.inputs), 1)
    click.echo(f"model '{rt.name}' (march {rt.march}): {runs} run(s) in {ms:.1f} ms")
    taken: set[str] = set()
    for d in rt.outputs:
        arr = outputs[d.name]
        path = folder / (file_name(d.name, taken) + ".npy")
        write_atomic(path, lambda f, a=arr: np.save(f, a, allow_pickle=False))
        scale = "" if arr.dtype.kind == "f" or d.scale is None else (
            f", scale {d.scale:.6g}" if isinstance(d.scale, float)
            else f", {len(d.scale)} scales along axis {d.axis}")
        click.echo(f"  {d.name}: {arr.dtype}{list(arr.shape)}{scale}; {_summary(arr)}"
                   f" -> {path}")
    click.echo(f"wrote {len(rt.outputs)} output(s) to {folder}"
               + (f"; every layer's output to {dump_dir}" if dump_dir else ""))


@main.command("verify")
@click.argument("hbm", metavar="MODEL.hbm")
@click.option("-r", "--reference", required=True, metavar="REF",
              help="The float model (.onnx, .hbir, zoo:NAME, module:function) or an integer "
                   "(lowered) model.")
@click.option("--data", metavar="PATH",
              help="Validation samples: an .npz (arrays keyed by input name) or a folder of "
                   "them (default: seeded random inputs).")
@click.option("--samples", type=click.IntRange(min=1),
              help="Check at most this many samples of --data (random: how many; default 8).")
@click.option("--per-layer", is_flag=True,
              help="Compare every layer bit for bit and report its float-vs-int error.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report.")
@click.option("-j", "--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Worker processes for the samples (same report as one).")
@click.option("--model", help="The model to verify when the file holds several.")
@click.option("--march", help="Refuse a file compiled for another march.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of random inputs.")
@input_shape_option
@_handle_errors
def verify_cmd(hbm: str, reference: str, data: str | None, samples: int | None,
               per_layer: bool, as_json: bool, jobs: int, model: str | None,
               march: str | None, seed: int, input_shapes: tuple[str, ...]) -> None:
    """Align-bpu validation: simulator vs int_infer bit for bit; float-vs-int error."""
    from hbc.verify import verify

    shapes = parse_input_shapes(input_shapes) or None
    with ExitStack() as stack:
        progress = lazy_progress(stack, "verifying")
        report = verify(hbm, reference, data=data, samples=samples, input_shapes=shapes,
                        per_layer=per_layer, jobs=jobs, progress=progress, model=model,
                        march=march, seed=seed)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2, sort_keys=True))
    else:
        click.echo(report.to_text())
    if report.exit_code:
        sys.exit(report.exit_code)
