"""Imports every pass module so each registers itself (one pass per file)."""

from __future__ import annotations

from . import (  # noqa: F401
    absorb_qdq,
    const_fold,
    cse,
    dce,
    dedup_constants,
    fold_bn,
    fuse,
    layout,
    layout_check,
    lower,
    remove_noops,
)
