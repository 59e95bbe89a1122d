"""The project's error classes and their exit codes.

Every failure a user can trigger (a bad file, an unsupported op, a failed check) is an
``HbcError``; the CLI prints its one-line message and exits with its ``exit_code``. Anything
else escaping the library is a bug in hbc.
"""

from __future__ import annotations


class HbcError(Exception):
    """Base class: a user-facing error with a one-line message and an exit code."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.hint = hint
        super().__init__(message)

    def __str__(self) -> str:
        msg = super().__str__()
        return f"{msg}  hint: {self.hint}" if self.hint else msg


class InputError(HbcError):
    """Bad input: a missing, damaged or foreign file, a bad option, an unsupported model."""

    exit_code = 2


class ParseError(InputError):
    """A syntax error in a text file; the message carries ``file:line:col`` and a caret line."""


class UnsupportedError(InputError):
    """The model uses ops or attributes hbc cannot represent; lists every offender."""


class ResourceLimitError(InputError):
    """A file asks for more memory than the limit (``hbc.ir.limits``): rejected before
    allocating; the message gives the size and the limit."""


class VerifyError(HbcError):
    """The IR breaks an invariant; lists every problem, each naming its node."""

    exit_code = 2


class CheckFailed(HbcError):
    """A check ran and failed (unsupported on the march, a mismatch)."""

    exit_code = 1
