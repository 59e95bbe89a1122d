"""Subcommands of the hbc CLI for the backend: compile, perf, pack."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .cli import _handle_errors, input_shape_option, main, parse_input_shapes

INPUT_TYPES = ("featuremap", "rgb", "bgr", "yuv444", "nv12", "gray")
CALIB_METHODS = ("max", "percentile", "kl", "mse", "auto")


class _Stages:
    """Progress display of compile: one line per stage on stderr, and a bar for calibration."""

    def __init__(self, quiet: bool) -> None:
        from rich.console import Console

        self.console = Console(stderr=True, quiet=quiet)
        self.bar = None

    def stage(self, stage: str, what: str) -> None:
        self.close_bar()
        self.console.print(f"[bold]{stage:>9}[/bold] {what}", highlight=False)

    def samples(self, done: int, total: int | None) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        if self.bar is None:
            self.bar = Progress(TextColumn("  samples"), BarColumn(), MofNCompleteColumn(),
                                console=self.console, transient=True)
            self.bar.start()
            self.task = self.bar.add_task("samples", total=total)
        self.bar.update(self.task, completed=done, total=total)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


@main.command()
@click.argument("models", nargs=-1, required=True)
@click.option("--march", default="bayes", show_default=True,
              help="Target march: bayes, bernoulli2, bayes-e, nash-e (nash).")
@click.option("--opt", "opt", type=click.IntRange(0, 3), default=3, show_default=True,
              help="Optimization level (O0: no fusion, every layer through DDR ... O3).")
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="The .hbm to write (default: MODEL.hbm in the current folder).")
@click.option("--calib-data", metavar="PATH",
              help="Calibration samples: an .npz (arrays keyed by input name) or a folder.")
@click.option("--calib-method", type=click.Choice(CALIB_METHODS),
              help="Calibration observer (default: max; with a QAT/QDQ model and no "
                   "--calib-data, the model's own scales are used).")
@click.option("--input-type", type=click.Choice(INPUT_TYPES),
              help="What the model inputs carry (checked against their shapes).")
@click.option("--names", help="Model names inside the .hbm, comma-separated.")
@click.option("--report", "report_dir", type=click.Path(file_okay=False),
              help="Folder for the reports and the lowered programs (.hbir).")
@click.option("--high-precision-output", is_flag=True,
              help="Let a final conv/linear output int32 (dequantized by the user).")
@input_shape_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable summary on stdout.")
@_handle_errors
def compile(models: tuple[str, ...], march: str, opt: int, output: str | None,  # noqa: A001
            calib_data: str | None, calib_method: str | None, input_type: str | None,
            names: str | None, report_dir: str | None, high_precision_output: bool,
            input_shapes: tuple[str, ...], as_json: bool) -> None:
    """Compile models to one .hbm with a performance report (.perf.json, .perf.html)."""
    from .compiler import compile as run

    display = _Stages(quiet=False)
    try:
        result = run(list(models), march, opt, output=output, calib_data=calib_data,
                     calib_method=calib_method,
                     input_shapes=parse_input_shapes(input_shapes) or None,
                     input_type=input_type, report_dir=report_dir,
                     names=[n.strip() for n in names.split(",")] if names else None,
                     high_precision_output=high_precision_output, progress=display.stage,
                     calib_progress=display.samples)
    finally:
        display.close_bar()
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2, sort_keys=True))
    else:
        click.echo(result.to_text())


@main.command()
@click.argument("hbm", type=click.Path(dir_okay=False))
@click.option("--model", "model", help="Which model of a packed file (default: all).")
@click.option("--html", "html", type=click.Path(dir_okay=False), help="Write the HTML report.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False),
              help="Write the JSON report ('-' for stdout).")
@_handle_errors
def perf(hbm: str, model: str | None, html: str | None, json_out: str | None) -> None:
    """Re-estimate performance from an .hbm and render its reports."""
    from .compiler import perf_reports

    reports = perf_reports(hbm, model)
    _emit(reports, html, json_out)


def _emit(reports: list[dict], html: str | None, json_out: str | None) -> None:
    from hbc.backend.report import perf_html, perf_json
    from hbc.ir.io import write_atomic

    def target(path: str, report: dict) -> Path:
        p = Path(path)
        return p if len(reports) == 1 else p.with_name(f"{p.stem}.{report['model']}{p.suffix}")

    for report in reports:

        if json_out == "-":
            click.echo(perf_json(report), nl=False)
        elif json_out:
            text = perf_json(report)
            write_atomic(target(json_out, report), lambda f, t=text: f.write(t.encode("utf-8")))
        if html:
            page = perf_html(report)
            write_atomic(target(html, report), lambda f, p=page: f.write(p.encode("utf-8")))
        if json_out != "-":
            s = report["summary"]
            click.echo(f"{report['model']}: {s['latency_ms']:.3f} ms, {s['fps']:.1f} FPS, "
                       f"{s['macs'] / 1e9:.3f} GMACs, {s['ddr_bytes_per_frame'] / 2**20:.2f} "
                       f"MiB DDR/frame (march {s['march']}, -O{s['opt']})")


@main.command()
@click.argument("hbms", nargs=-1, required=True)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="The packed .hbm.")
@click.option("--names", help="New model names, comma-separated, in order of the models.")
@_handle_errors
def pack(hbms: tuple[str, ...], output: str, names: str | None) -> None:
    """Pack the models of several .hbm files (same march) into one."""
    from hbc.backend.hbm_writer import pack as run
    from hbc.runtime.hbm import read_hbm

    run(list(hbms), output, names=[n.strip() for n in names.split(",")] if names else None)
    packed = read_hbm(output)
    click.echo(f"wrote {output}: {len(packed.models)} model(s) "
               f"({', '.join(m.name for m in packed.models)}) for {packed.march}")
