"""Atomic outputs: every file hbc writes appears whole or not at all (hbc/ir/atomic.py).

- A scan of the library's source: no file is written except through ``write_atomic``.
- Every CLI command that writes files (compile with --report, perf --json/--html, pack,
  inspect -o, opt -o, merge -o, check --html, run -o --dump-dir) writes each of them through
  ``write_atomic`` (recorded while the command runs) and leaves no temporary file.
- A compile killed while it writes the .hbm (a wrapper pauses the real ``write_atomic`` after
  the whole file went into the temporary file, then the test sends SIGKILL, SIGTERM or SIGINT)
  leaves no .hbm, or the previous one untouched, and no temporary file; with the fallback for
  systems without ``O_TMPFILE``, SIGTERM still cleans up.
- A write that fails (no such folder) is an InputError naming the path.
"""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import hbc.ir.atomic as atomic
from hbc.cli import main
from hbc.errors import InputError
from hbc.ir.atomic import write_atomic

from .test_fuzz_calib import GRAPH
from .test_no_code_execution import PACKAGES, ROOT, _dotted

#: files that may write without write_atomic, and why
WRITERS_ALLOWED = {"ir/atomic.py": "the implementation"}
#: calls that write a file by path
WRITING_CALLS = {"np.save", "np.savez", "np.savez_compressed", "numpy.save", "numpy.savez",
                 "onnx.save", "onnx.save_model", "torch.save", "torch.onnx.export",
                 "shutil.copy", "shutil.copyfile", "shutil.copy2", "shutil.move", "os.rename",
                 "os.replace", "json.dump"}


def writes_in(source: str, relpath: str) -> list[str]:
    """File writes outside write_atomic's callbacks: ``open(..., 'w')``, ``Path.write_*``,
    ``.tofile``, and WRITING_CALLS whose target is not the callback's file object ``f``."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        where = f"{relpath}:{node.lineno}"
        last = name.rpartition(".")[2]
        if last in ("write_text", "write_bytes", "tofile"):
            out.append(f"{where}: {name}")
        elif name in ("open", "io.open", "os.fdopen") or last == "open" and name.endswith(
                "Path.open"):
            mode = node.args[1] if len(node.args) > 1 else next(
                (k.value for k in node.keywords if k.arg == "mode"), None)
            if isinstance(mode, ast.Constant) and any(c in str(mode.value) for c in "wax+"):
                out.append(f"{where}: {name}(..., {mode.value!r})")
        elif name in WRITING_CALLS:
            target = node.args[0] if node.args else None
            if name == "torch.onnx.export":
                target = node.args[2] if len(node.args) > 2 else None
            if not (isinstance(target, ast.Name) and target.id in ("f", "buf")):
                out.append(f"{where}: {name} to a path")
    return out


def test_the_library_writes_only_through_write_atomic():
    problems = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            if rel not in WRITERS_ALLOWED:
                problems += writes_in(path.read_text(encoding="utf-8"), rel)
    assert not problems, "files written without write_atomic:\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("snippet", [
    "open(p, 'w').write(x)", "open(p, mode='wb')", "p.write_text(t)", "p.write_bytes(b)",
    "np.save(path, a)", "np.savez(out / 'c.npz', x=a)", "onnx.save(m, p)", "a.tofile(p)",
    "torch.onnx.export(m, args, 'm.onnx')", "os.replace(a, b)",
])
def test_the_write_scan_flags_direct_writes(snippet):
    assert writes_in(snippet, "x.py"), snippet


def test_the_write_scan_accepts_atomic_callbacks():
    assert not writes_in("write_atomic(p, lambda f: np.save(f, a, allow_pickle=False))\n"
                         "open(p, 'rb').read()\ntorch.onnx.export(m, args, buf)", "x.py")


# -- every CLI command that writes ---------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("atomic_cli")
    (folder / "m.hbir").write_text(GRAPH)
    rng = np.random.default_rng(0)
    np.savez(folder / "calib.npz", x=rng.standard_normal((4, 3, 4, 4)).astype(np.float32),
             y=rng.standard_normal((4, 8)).astype(np.float32))
    np.save(folder / "x.npy", rng.standard_normal((2, 3, 4, 4)).astype(np.float32))
    np.save(folder / "y.npy", rng.standard_normal((2, 8)).astype(np.float32))
    return folder


def _record(monkeypatch) -> list[Path]:
    written: list[Path] = []
    real = atomic._write_named, atomic._link

    def named(path, write):
        written.append(Path(path))
        return real[0](path, write)

    def link(fd, path):
        written.append(Path(path))
        return real[1](fd, path)

    monkeypatch.setattr(atomic, "_write_named", named)
    monkeypatch.setattr(atomic, "_link", link)
    return written


def _files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


COMMANDS = {
    "compile": ["compile", "{m}/m.hbir", "--calib-data", "{m}/calib.npz", "-o", "{o}/m.hbm",
                "--report", "{o}/report"],
    "perf": ["perf", "{o}/../compile/m.hbm", "--json", "{o}/p.json", "--html", "{o}/p.html"],
    "pack": ["pack", "{o}/../compile/m.hbm", "-o", "{o}/packed.hbm", "--names", "only"],
    "inspect": ["inspect", "{m}/m.hbir", "-o", "{o}/copy.hbir"],
    "opt": ["opt", "{m}/m.hbir", "--opt", "3", "-o", "{o}/m.O3.hbir"],
    "merge": ["merge", "{m}/m.hbir", "{o}/../inspect/copy.hbir", "-o", "{o}/multi.hbir"],
    "check": ["check", "{m}/m.hbir", "--html", "{o}/check.html"],
    "run": ["run", "{o}/../compile/m.hbm", "--input", "x={m}/x.npy", "--input", "y={m}/y.npy",
            "-o", "{o}/out", "--dump-dir", "{o}/dump"],
}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    return tmp_path_factory.mktemp("atomic_out")


@pytest.mark.parametrize("command", list(COMMANDS))  # in order: later ones read compile's .hbm
def test_cli_writes_every_file_atomically(command, models, outputs, monkeypatch):
    out = outputs / command
    out.mkdir()
    args = [a.format(m=models, o=out) for a in COMMANDS[command]]
    written = _record(monkeypatch)
    result = CliRunner().invoke(main, args)
    assert result.exit_code in (0, 1), (result.output, result.exception)  # check: 1 = fallback
    files = _files(out)
    assert files, f"hbc {command} wrote nothing"
    assert {p.resolve() for p in files} <= {p.resolve() for p in written}, \
        f"written without write_atomic: {sorted(files - set(written))}"
    assert not [p for p in files if p.name.endswith(".tmp")]


def test_a_failed_write_names_the_path(tmp_path):
    with pytest.raises(InputError, match=r"cannot write .*nowhere/x.bin: No such file"):
        write_atomic(tmp_path / "nowhere" / "x.bin", lambda f: f.write(b"x"))
    result = CliRunner().invoke(main, ["inspect", "-o", str(tmp_path / "nowhere" / "m.hbir"),
                                       str(tmp_path / ".." / tmp_path.name / "m.hbir")])
    assert result.exit_code == 2


def test_an_interrupted_write_leaves_nothing(tmp_path):
    (tmp_path / "keep.bin").write_bytes(b"old")

    def boom(f):
        f.write(b"partial")
        raise KeyboardInterrupt

    for target in ("new.bin", "keep.bin"):
        with pytest.raises(KeyboardInterrupt):
            write_atomic(tmp_path / target, boom)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.bin"]
    assert (tmp_path / "keep.bin").read_bytes() == b"old"


# -- a compile killed while it writes -----------------------------------------------------------
WRAPPER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    import hbc.ir.atomic as atomic
    import hbc.ir.io
    if os.environ.get("HBC_TEST_NO_TMPFILE"):
        atomic._linkat = lambda: None  # the portable fallback: a named temporary file
    real = atomic.write_atomic
    marker = Path(os.environ["HBC_TEST_MARKER"])

    def paused(path, write):
        def slow(f):
            write(f)  # the whole file is in the temporary file, not yet in place
            f.flush()
            if Path(path).suffix == ".hbm":
                marker.write_text(str(path))
                time.sleep(300)
        return real(path, slow)

    atomic.write_atomic = hbc.ir.io.write_atomic = paused
    from hbc.cli import main
    main(sys.argv[1:], prog_name="hbc")
""")


def _unnamed_files_work(folder: Path) -> bool:
    fd = atomic._unnamed_file(folder)
    if fd is None:
        return False
    os.close(fd)
    return True


def _killed_compile(tmp_path, model: str, sig: int, fallback: bool = False,
                    previous: bytes | None = None):
    """Run ``hbc compile MODEL -o out/model.hbm`` in the wrapper, send ``sig`` once the whole
    .hbm is in its temporary file; (exit code, stderr, out folder)."""
    marker = tmp_path / "writing.marker"
    env = dict(os.environ, HBC_TEST_MARKER=str(marker), OMP_NUM_THREADS="1")
    if fallback:
        env["HBC_TEST_NO_TMPFILE"] = "1"
    out = tmp_path / "out"
    out.mkdir()
    if previous is not None:
        (out / "model.hbm").write_bytes(previous)
    proc = subprocess.Popen([sys.executable, "-c", WRAPPER, "compile", model, "-o",
                             str(out / "model.hbm")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the compile never started writing"
            time.sleep(0.05)
        temps = [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
        if fallback:  # the named temporary file is there while the compile writes
            assert temps
        elif _unnamed_files_work(out):  # O_TMPFILE: the file being written has no name
            assert not temps, temps
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err, out


@pytest.mark.parametrize("model, sig", [("zoo:resnet18", signal.SIGKILL),
                                        ("zoo:resnet18", signal.SIGTERM),
                                        ("m.hbir", signal.SIGINT)],
                         ids=["resnet18-SIGKILL", "resnet18-SIGTERM", "small-SIGINT"])
def test_a_compile_killed_while_writing_leaves_no_file(tmp_path, models, model, sig):
    model = model if model.startswith("zoo:") else str(models / model)
    code, err, out = _killed_compile(tmp_path, model, sig)
    assert code == (-sig if sig == signal.SIGKILL else 128 + sig), (code, err)
    if sig != signal.SIGKILL:
        assert f"({signal.Signals(sig).name}); no partial output file is left" in err
    assert sorted(p.name for p in out.iterdir()) == []


@pytest.mark.parametrize("sig, fallback", [(signal.SIGKILL, False), (signal.SIGTERM, False),
                                           (signal.SIGTERM, True)])
def test_a_killed_compile_keeps_the_previous_file(tmp_path, models, sig, fallback):
    old = b"the previous model"
    code, err, out = _killed_compile(tmp_path, str(models / "m.hbir"), sig, fallback=fallback,
                                     previous=old)
    assert code == (-sig if sig == signal.SIGKILL else 128 + sig), (code, err)
    assert sorted(p.name for p in out.iterdir()) == ["model.hbm"]
    assert (out / "model.hbm").read_bytes() == old


def test_sigterm_cleans_up_the_fallback_temporary_file(tmp_path, models):
    code, err, out = _killed_compile(tmp_path, str(models / "m.hbir"), signal.SIGTERM,
                                     fallback=True)
    assert code == 128 + signal.SIGTERM, (code, err)
    assert sorted(p.name for p in out.iterdir()) == []
