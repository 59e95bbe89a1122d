"""Subcommands of the hbc CLI: check and the model_checker entry point (march legality)."""

from __future__ import annotations

from .cli import main  # noqa: F401  (subcommands register on this group)
