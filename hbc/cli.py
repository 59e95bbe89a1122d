"""The command line: a thin layer over the library.

Every subcommand is one call into a library function. Errors print one line naming the file,
node or field and exit 2 (bad input or usage) or 1 (a check failed); ``--debug`` shows the
traceback. Heavy imports happen inside the subcommands so ``hbc --help`` stays fast.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from contextlib import ExitStack

import click

from .errors import HbcError, InputError


def parse_input_shapes(specs: tuple[str, ...]) -> dict[str, list[int]]:
    """``NAME=1x3x224x224`` (or ``NAME=1,3,224,224``) options to a dict."""
    out: dict[str, list[int]] = {}
    for spec in specs:
        name, sep, dims = spec.rpartition("=")
        try:
            if not sep or not name:
                raise ValueError
            shape = [int(d) for d in dims.replace(",", "x").split("x")]
            if any(d <= 0 for d in shape):
                raise ValueError
        except ValueError:
            raise InputError(
                f"--input-shape '{spec}': expected NAME=DxDxD... with positive integers, "
                "e.g. input=1x3x224x224"
            ) from None
        out[name] = shape
    return out


def _handle_errors(fn: Callable) -> Callable:
    """Turn HbcError into one line on stderr and its exit code; tracebacks only with --debug."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        ctx = click.get_current_context()
        debug = ctx.find_root().params.get("debug", False)
        try:
            return fn(*args, **kwargs)
        except HbcError as e:
            if debug:
                raise
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except (MemoryError, RecursionError) as e:  # a model too big for this machine
            if debug:
                raise
            click.echo(f"error: {type(e).__name__} while processing the model", err=True)
            sys.exit(2)
        except OSError as e:  # a backstop: the readers and writers report their own paths
            if debug:
                raise
            where = f"{e.filename}: " if e.filename else ""
            click.echo(f"error: {where}{e.strerror or e}", err=True)
            sys.exit(2)

    return wrapper


input_shape_option = click.option(
    "--input-shape", "input_shapes", multiple=True, metavar="NAME=DxDxD",
    help="Static shape for a model input with dynamic dimensions (repeatable).",
)


def lazy_progress(stack: ExitStack, description: str) -> Callable[[int, int | None], None]:
    """A ``progress(done, total)`` callback whose bar opens on the first call (so option
    errors raised before any work print one line, no bar) and closes with ``stack``."""
    bar: list = []

    def progress(done: int, total: int | None) -> None:
        if not bar:
            from hbc.passes.calibrate import calibration_progress

            bar.append(stack.enter_context(calibration_progress(description)))
        bar[0](done, total)

    return progress


def _load(model: str, input_shapes: tuple[str, ...]):
    from . import api

    return api.load(model, parse_input_shapes(input_shapes) or None)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show Python tracebacks for errors.")
@click.version_option(package_name="hbc")
def main(debug: bool) -> None:
    """hbc: compiler and quantization toolchain for BPU-style NPUs."""
    restore = _exit_on_sigterm()
    click.get_current_context().call_on_close(restore)  # in-process callers get theirs back


def _exit_on_sigterm() -> Callable[[], None]:
    """SIGTERM and SIGINT (Ctrl-C) raise SystemExit with the shell's code 128 + N (143, 130)
    instead of killing the interpreter outright (SIGTERM) or exiting 1 like a failed check
    (click's handling of KeyboardInterrupt), so ``finally`` blocks run and a half-written
    temporary file is removed (hbc.ir.atomic). Returns a function restoring the previous
    handlers."""
    import signal

    def terminate(signum: int, frame: object) -> None:
        signal.signal(signum, signal.SIG_DFL)  # a second signal kills at once
        name = signal.Signals(signum).name
        sys.stderr.write(f"error: {'interrupted' if name == 'SIGINT' else 'terminated'} "
                         f"({name}); no partial output file is left\n")
        raise SystemExit(128 + signum)

    previous = {}
    for sig, default in ((signal.SIGTERM, signal.SIG_DFL),
                         (signal.SIGINT, signal.default_int_handler)):
        try:
            if signal.getsignal(sig) is default:
                previous[sig] = signal.signal(sig, terminate)
        except ValueError:  # not the main thread (the CLI called from a thread): leave it
            pass

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore


@main.command()
@click.argument("file")
@input_shape_option
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Write the .hbir (and its .npz constants) here instead of printing.")
@click.option("--program", is_flag=True, help="For an .hbm: also print each model's program.")
@_handle_errors
def inspect(file: str, input_shapes: tuple[str, ...], output: str | None, program: bool) -> None:
    """Print a model (.onnx, .hbir, module:function) as .hbir text, or an .hbm's header,
    models and I/O."""
    from hbc.ir import save, to_text

    if file.endswith(".hbm"):
        from hbc.backend.hbm_inspect import describe_hbm

        click.echo(describe_hbm(file, program=program), nl=False)
        return
    graph = _load(file, input_shapes)
    if output:
        save(graph, output)
        click.echo(f"wrote {output}")
    else:
        click.echo(to_text(graph), nl=False)


@main.command()
@click.argument("model")
@input_shape_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_handle_errors
def calops(model: str, input_shapes: tuple[str, ...], as_json: bool) -> None:
    """MACs and parameters per layer and in total."""
    from .calops import calops as run

    report = run(_load(model, input_shapes))
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2, sort_keys=True))
    else:
        click.echo(report.to_text())


@main.command()
@click.argument("file")
@click.option("--opt", "opt", type=click.IntRange(0, 3), default=None,
              help="Run the pipeline of this optimization level (0-3).")
@click.option("--passes", "passes", metavar="A,B{k=v},...",
              help="Run these passes instead of a level, e.g. 'fold-bn{scope=backbone.*},fuse'.")
@click.option("--disable", multiple=True, metavar="PASS", help="Skip a pass (repeatable).")
@click.option("--dump-after", metavar="PASS|all",
              help="Print the .hbir after this pass (or after all) to stderr.")
@click.option("--explain", is_flag=True, help="Print why candidates were not rewritten.")
@click.option("--march", default=None, help="Target march (for march-dependent passes).")
@click.option("--no-verify", is_flag=True, help="Do not verify the IR after each pass.")
@input_shape_option
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Write the result (.hbir + .npz) here instead of printing it.")
@_handle_errors
def opt(file: str, opt: int | None, passes: str | None, disable: tuple[str, ...],
        dump_after: str | None, explain: bool, march: str | None, no_verify: bool,
        input_shapes: tuple[str, ...], output: str | None) -> None:
    """Run passes over a model and print the resulting .hbir (like mlir-opt)."""
    from hbc import passes as hp
    from hbc.ir import save, to_text

    if (opt is None) == (passes is None):
        raise InputError("give exactly one of --opt N or --passes LIST")
    graph = _load(file, input_shapes)
    ctx = hp.PassContext()

    def dump(name: str, text: str) -> None:
        click.echo(f"// ----- IR after {name} ----- //\n{text}", err=True, nl=False)

    result = hp.run(graph, opt=opt, passes=passes, disable=disable, verify=not no_verify,
                    dump_after=dump_after, dump=dump, march=march, context=ctx)
    if explain:
        for e in ctx.explanations:
            click.echo(f"explain: {e}", err=True)
    if output:
        save(result, output)
        click.echo(f"wrote {output}", err=True)
    else:
        click.echo(to_text(result), nl=False)


@main.command()
@click.argument("models", nargs=-1, required=True)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="The merged multi-task model (.hbir or .onnx).")
@click.option("--names", help="Task names, comma-separated (default: the file stems).")
@click.option("--on-conflict", type=click.Choice(["error", "keep"]), default="error",
              help="Same parameter name with different values: fail, or keep both apart.")
@click.option("--share-identical", is_flag=True,
              help="Also share parameters with identical values but different names.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report.")
@_handle_errors
def merge(models: tuple[str, ...], output: str, names: str | None, on_conflict: str,
          share_identical: bool, as_json: bool) -> None:
    """Merge single-task models that share parameters into one multi-task model."""
    from hbc.passes.merge import merge_files

    task_names = [n.strip() for n in names.split(",")] if names else None
    report = merge_files(models, task_names, output, on_conflict, share_identical)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2, sort_keys=True))
    else:
        click.echo(report.to_text())
        click.echo(f"wrote {output}")


@main.command()
@click.argument("model")
@click.option("--calib-data", required=True, metavar="PATH",
              help="Calibration samples: an .npz file (arrays keyed by input name) or a folder.")
@click.option("--calib-method", default="max", show_default=True,
              help="Calibration observer: max, percentile, kl, mse or auto.")
@click.option("--march", default="bayes", show_default=True, help="Target march.")
@click.option("--mode", type=click.Choice(["cumulative", "sensitivity", "both"]),
              default="cumulative", show_default=True,
              help="Per-layer analysis: all layers quantized, one at a time, or both.")
@click.option("--int16", "int16", metavar="auto|GLOBS",
              help="'auto' (promote sensitive layers until --target-sqnr) or comma-separated "
                   "globs of layers/values to make int16 (bayes).")
@click.option("--target-sqnr", type=float, default=30.0, show_default=True,
              help="Output SQNR (dB) that --int16 auto aims for.")
@click.option("--eval-data", metavar="PATH",
              help="Samples to measure on (default: the calibration samples).")
@input_shape_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_handle_errors
def debug(model: str, calib_data: str, calib_method: str, march: str, mode: str,
          int16: str | None, target_sqnr: float, eval_data: str | None,
          input_shapes: tuple[str, ...], as_json: bool) -> None:
    """Per-layer accuracy of the quantized model against float (cosine, SQNR)."""
    from hbc.debug import debug as run

    globs = None if int16 is None else (
        "auto" if int16.strip() == "auto" else [g.strip() for g in int16.split(",") if g.strip()])
    with ExitStack() as stack:
        progress = lazy_progress(stack, "debugging")
        report = run(_load(model, input_shapes), calib_data, method=calib_method, march=march,
                     mode=mode, eval_data=eval_data, int16=globs, target_sqnr=target_sqnr,
                     progress=progress)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2, sort_keys=True))
    else:
        click.echo(report.to_text())


# The subcommands of the backend, the checker and the runtime live in their own modules.
from . import cli_check, cli_compile, cli_runtime  # noqa: E402,F401

if __name__ == "__main__":
    main()
