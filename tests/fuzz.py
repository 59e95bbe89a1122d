"""Shared machinery of the fuzz tests (tests/test_fuzz_*.py).

Every fuzz case feeds one damaged or random input to one reader through :func:`case`, which
accepts exactly two outcomes: the reader succeeds, or it raises an ``hbc.errors.HbcError`` whose
message names the file (and, where the test says so, the field). Any other exception fails the
test (hypothesis then shrinks the input and prints it), and so does a case running longer than
its deadline (``HBC_FUZZ_DEADLINE`` seconds, default 20: a SIGALRM interrupts it).

Budget: each test declares its default number of examples, chosen so the whole default run
takes about a minute on one core. ``HBC_FUZZ_EXAMPLES=N`` runs N examples per test instead,
with fresh random inputs each run (the default run is derandomized: the same cases every time,
so CI does not flake). The session summary (tests/conftest.py) prints how many cases each
reader ran, how many it rejected and how long it took.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, settings

from hbc.errors import HbcError

#: examples per test instead of each test's default (a longer run), 0 = the defaults
EXAMPLES = int(os.environ.get("HBC_FUZZ_EXAMPLES", "0") or 0)
DEADLINE = float(os.environ.get("HBC_FUZZ_DEADLINE", "20") or 20)


@dataclass
class Tally:
    """What one reader's fuzz cases did."""

    cases: int = 0
    rejected: int = 0
    seconds: float = 0.0


#: reader name -> its tally; printed at the end of the session by tests/conftest.py
TALLY: dict[str, Tally] = {}


def fuzz_settings(default: int, **kwargs: Any) -> settings:
    """hypothesis settings for a fuzz test of ``default`` examples (see the module docstring)."""
    return settings(
        max_examples=EXAMPLES or default, deadline=None, derandomize=not EXAMPLES,
        database=None, print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                               HealthCheck.filter_too_much,
                               HealthCheck.function_scoped_fixture],
        **kwargs)


class Hang(Exception):
    """A fuzz case ran past its deadline."""


@contextlib.contextmanager
def deadline(seconds: float = DEADLINE) -> Iterator[None]:
    """Raise :class:`Hang` in the main thread when the block runs longer than ``seconds``."""

    def alarm(signum: int, frame: Any) -> None:
        raise Hang(f"fuzz case still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def case(reader: str, fn: Callable[[], Any], *, names: tuple[str, ...] = (),
         some: tuple[str, ...] = ()) -> Any:
    """Run one fuzz case of ``reader``: ``fn()``'s result, or the HbcError it raised (whose
    message must contain every string of ``names`` (the file, the field) and at least one of
    ``some`` when given). Anything else propagates and fails the test."""
    tally = TALLY.setdefault(reader, Tally())
    tally.cases += 1
    start = time.perf_counter()
    try:
        with deadline():
            return fn()
    except HbcError as e:
        tally.rejected += 1
        text = str(e)
        assert text.strip(), f"{reader}: {type(e).__name__} with an empty message"
        for name in names:
            assert name in text, f"{reader}: error does not name {name!r}: {text}"
        assert not some or any(x in text for x in some), \
            f"{reader}: error names none of {some}: {text}"
        return e
    finally:
        tally.seconds += time.perf_counter() - start


class Fixture(dict):
    """A fixture's data with a short repr (hypothesis prints a failing case's arguments)."""

    def __repr__(self) -> str:
        return f"<fixture {', '.join(self)}>"


def summary_lines() -> list[str]:
    """The per-reader lines of the session summary."""
    lines = []
    for reader in sorted(TALLY):
        t = TALLY[reader]
        lines.append(f"{reader:<29} {t.cases:6d} cases  {t.rejected:6d} rejected with an "
                     f"HbcError  {t.cases - t.rejected:6d} accepted  {t.seconds:7.1f} s")
    return lines
