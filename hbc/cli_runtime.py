"""Subcommands of the hbc CLI: run and verify (the simulator and align-bpu validation)."""

from __future__ import annotations

from .cli import main  # noqa: F401  (subcommands register on this group)
