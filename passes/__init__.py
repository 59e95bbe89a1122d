"""Graph passes: the pass manager with opt levels, canonicalization, BN folding, fusion,
shared-parameter merging of multi-task graphs, layout conversion and checks."""

from __future__ import annotations

from .base import PASSES, Pass, PassContext, PassError, register_pass
from .manager import PIPELINES, parse_pipeline, run
from .merge import merge_tasks  # noqa: F401  (hbc.passes.merge_tasks)

__all__ = ["PASSES", "PIPELINES", "Pass", "PassContext", "PassError", "parse_pipeline",
           "register_pass", "run"]
