"""Subcommands of the hbc CLI: check and the model_checker entry point (march legality).

``hbc check MODEL --march M [--json] [--html OUT] [--input-shape NAME=DxD...]`` and
``model_checker`` (the same options) print where every node runs, and exit 0 when the whole
model runs on the BPU, 1 when something falls back to the CPU or is unsupported, 2 for bad
input. Both are one call into :func:`hbc.check.check`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import click

from .cli import _handle_errors, input_shape_option, main, parse_input_shapes


def _check_options(fn: Callable) -> Callable:
    """The options ``hbc check`` and ``model_checker`` share."""
    fn = input_shape_option(fn)
    fn = click.option("--html", "html_out", type=click.Path(dir_okay=False),
                      metavar="OUT.html",
                      help="Also write the verdicts as a page with the graph coloured by unit.")(fn)
    fn = click.option("--json", "as_json", is_flag=True,
                      help="Print the verdicts as JSON (schema hbc.check/1, docs/checker.md).")(fn)
    fn = click.option("--march", default="bayes", show_default=True,
                      help="Target march: bayes, bernoulli2, bayes-e, nash-e (nash).")(fn)
    return click.argument("model")(fn)


def run_check(model: str, march: str, as_json: bool, html_out: str | None,
              input_shapes: tuple[str, ...]) -> int:
    """Check ``model``, print the report (text or JSON), write the HTML page; the exit code."""
    from hbc.ir.io import write_atomic

    from .check import check

    report = check(model, march, input_shapes=parse_input_shapes(input_shapes) or None)
    if html_out:
        page = report.to_html().encode()
        write_atomic(Path(html_out), lambda f: f.write(page))
        click.echo(f"wrote {html_out}", err=True)
    click.echo(report.to_json() if as_json else report.to_text(), nl=False)
    return report.exit_code


@main.command("check")
@_check_options
@_handle_errors
def check_command(model: str, march: str, as_json: bool, html_out: str | None,
                  input_shapes: tuple[str, ...]) -> None:
    """Where every layer runs on the march (BPU, CPU fallback, unsupported) and why."""
    sys.exit(run_check(model, march, as_json, html_out, input_shapes))


@click.command("model_checker", context_settings={"help_option_names": ["-h", "--help"]})
@_check_options
@click.option("--debug", is_flag=True, help="Show Python tracebacks for errors.")
@_handle_errors
def model_checker(model: str, march: str, as_json: bool, html_out: str | None,
                  input_shapes: tuple[str, ...], debug: bool) -> None:
    """Check a float or QAT model against a march before training: where every layer runs
    (BPU, CPU fallback, unsupported), the constraint it breaks and what to do. Exit 0 when the
    whole model runs on the BPU, 1 when something falls back or is unsupported, 2 for bad
    input. Same as `hbc check`."""
    sys.exit(run_check(model, march, as_json, html_out, input_shapes))


def model_checker_main() -> None:
    """The ``model_checker`` console script."""
    from .cli import _exit_on_sigterm

    _exit_on_sigterm()
    model_checker()
