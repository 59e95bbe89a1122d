"""Where a torch tracing or conversion problem comes from: the module path and the user's
source line, found in tracebacks and formatted stacks, for errors that point at user code."""

from __future__ import annotations

import os
import re
import traceback

import torch

from hbc.errors import HbcError, InputError, UnsupportedError

_TORCH_DIR = os.path.dirname(torch.__file__)
_HERE = os.path.dirname(os.path.abspath(__file__))
_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')
CONTROL_FLOW_HINT = (
    "hbc compiles static graphs: control flow may depend on shapes, constants and Python "
    "flags, not on tensor values; compute both branches and combine them arithmetically"
)


def check_runs(module: torch.nn.Module, args: tuple, kwargs: dict, label: str) -> None:
    """InputError if the model itself fails on the example inputs (not a tracing problem)."""
    try:
        module(*args, **kwargs)
    except Exception as e:
        path, src = locate_exception(module, e)
        where = " in " + (path or label) + (f" at {src}" if src else "")
        raise InputError(f"{label}: running the model on the example inputs failed{where}: "
                         f"{type(e).__name__}: {first_line(e)}",
                         hint="check the example inputs' shapes and dtypes") from None


def trace_failure(module: torch.nn.Module, label: str, fx_error: BaseException,
                   export_error: BaseException) -> HbcError:
    if isinstance(fx_error, HbcError):
        return fx_error
    path, src = locate_exception(module, fx_error)
    if src is None:
        src = source_line(str(export_error))
    reason = first_line(fx_error)
    data_dependent = "control flow" in reason or "data-dependent" in str(export_error) or (
        "GuardOnDataDependent" in type(export_error).__name__)
    where = (f"{path}: " if path else "") + (f"at {src}: " if src else "")
    if data_dependent:
        return UnsupportedError(
            f"{label}: {where}the computation depends on tensor values (torch.fx: {reason}; "
            "torch.export: data-dependent expression)", hint=CONTROL_FLOW_HINT)
    return UnsupportedError(
        f"{label}: {where}cannot trace the model: torch.fx: {reason}; torch.export: "
        f"{first_line(export_error)}",
        hint="make forward() traceable (no Python-side use of tensor values), or wrap the "
             "untraceable part outside the model")


def locate_exception(root: torch.nn.Module, e: BaseException) -> tuple[str | None, str | None]:
    """(module path of the innermost user forward(), 'file:line' of the user's frame)."""
    paths = {id(m): name for name, m in root.named_modules()}
    path = src = None
    tb = e.__traceback__
    while tb is not None:
        frame, fname = tb.tb_frame, tb.tb_frame.f_code.co_filename
        if is_user_file(fname):
            src = f"{fname}:{tb.tb_lineno}"
            owner = frame.f_locals.get("self")
            if isinstance(owner, torch.nn.Module) and id(owner) in paths:
                path = paths[id(owner)]
        tb = tb.tb_next
    return path, src


def source_line(stack: str | None) -> str | None:
    """The innermost user frame ('file:line') of a formatted stack or an error message."""
    if not stack:
        return None
    found = None
    for m in _FRAME.finditer(stack):
        if is_user_file(m.group(1)):
            found = f"{m.group(1)}:{m.group(2)}"
    return found


def is_user_file(fname: str) -> bool:
    return not (fname.startswith(_TORCH_DIR) or fname.startswith(_HERE) or fname.startswith("<")
                or "/contextlib.py" in fname or "/importlib/" in fname)


def user_frame_hint(e: BaseException) -> str | None:
    frames = [f for f in traceback.extract_tb(e.__traceback__) if is_user_file(f.filename)]
    return f"raised at {frames[-1].filename}:{frames[-1].lineno}" if frames else None


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
