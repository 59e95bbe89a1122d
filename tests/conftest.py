"""Shared fixtures and the conformance summary line."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def pytest_terminal_summary(terminalreporter):
    digits = sys.modules.get("tests.test_e2e_digits")
    if digits is not None and digits.TABLE:
        terminalreporter.write_line("digits stage accuracy (float/calibration/qat/int_infer):")
        for line in digits.format_table().splitlines():
            terminalreporter.write_line("  " + line)
    fuzz = sys.modules.get("tests.fuzz")
    if fuzz is not None and fuzz.TALLY:
        budget = (f"HBC_FUZZ_EXAMPLES={fuzz.EXAMPLES} per test" if fuzz.EXAMPLES
                  else "default budget; HBC_FUZZ_EXAMPLES=N for a longer run")
        terminalreporter.write_line(f"fuzz cases per reader ({budget}):")
        for line in fuzz.summary_lines():
            terminalreporter.write_line("  " + line)
    mod = sys.modules.get("tests.test_conformance")
    if mod is None:
        return
    r = mod.RESULTS
    total = sum(r.values())
    if total:
        terminalreporter.write_line(
            f"ONNX conformance: {r['passed']}/{total} cases passed "
            f"({100.0 * r['passed'] / total:.1f}%), {r['xfailed']} known failures listed with "
            f"reasons, {r['failed']} unexpected failures"
        )


@pytest.fixture
def hbc_cli():
    """Run the installed ``hbc`` console script; returns a CompletedProcess."""
    import subprocess

    def run(*args: str, cwd: str | os.PathLike | None = None):
        return subprocess.run([str(BIN / "hbc"), *map(str, args)], capture_output=True,
                              text=True, cwd=cwd, timeout=600)

    return run
