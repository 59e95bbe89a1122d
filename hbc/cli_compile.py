"""Subcommands of the hbc CLI: compile, perf, pack (the backend: .hbm and performance reports)."""

from __future__ import annotations

from .cli import main  # noqa: F401  (subcommands register on this group)
