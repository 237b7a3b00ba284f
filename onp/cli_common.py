"""Shared command-line plumbing: friendly errors instead of tracebacks for bad input."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Callable, List, Optional

from .data.registry import DatasetNotFoundError
from .io import CheckpointError, RunExistsError, UnwritableFolderError
from .registry import UnknownNameError

USER_ERRORS = (UnknownNameError, DatasetNotFoundError, CheckpointError, RunExistsError, UnwritableFolderError,
               ValueError, FileNotFoundError)


def run_cli(main: Callable[[Optional[List[str]]], int], argv: Optional[List[str]] = None) -> int:
    """Run ``main``; print user errors as one ``error:`` line (exit 2) and Ctrl-C as exit 130."""
    try:
        return main(argv) or 0
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to continue "
              "(add --resume where the command has it, e.g. onp.train)", file=sys.stderr)
        return 130


# --------------------------------------------------------------------------------------------------
# argument types: a bad value is refused at parsing (exit 2, "argument --x: ..."), before anything runs


def int_at_least(low: int) -> Callable[[str], int]:
    """An ``argparse`` type: an integer ``>= low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}; got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}; got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def fraction(text: str) -> float:
    """An ``argparse`` type: a number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1]; got {text!r}") from None
    if not (math.isfinite(value) and 0 < value <= 1):
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1]; got {text}")
    return value


def finite_float(text: str) -> float:
    """An ``argparse`` type: a finite number (no NaN, no infinity)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number; got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number; got {text}")
    return value


def path_str(path: Optional[Path]) -> Optional[str]:
    """A path flag's value as the ``str`` the typed configs hold (``None`` stays ``None``)."""
    return None if path is None else str(path)


def path_arg(text: str) -> Path:
    """An ``argparse`` type: a non-empty path (``""`` would silently mean the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path; got an empty string")
    return Path(text)


def device_name(text: str) -> str:
    """An ``argparse`` type: a device name torch understands (``cpu``, ``cuda``, ``cuda:N``, ``mps``),
    without asking whether this machine has it (``onp.compare --executor ray``: the workers run it)."""
    import torch
    try:
        kind = torch.device(text).type
    except (RuntimeError, TypeError):
        kind = None
    if kind not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; valid: cpu, cuda, cuda:N, mps")
    return text


def device_arg(text: str) -> str:
    """An ``argparse`` type: a device that exists on this machine (:func:`onp.train_config.check_device`);
    ``--device cuda`` without CUDA is refused, never run on the CPU instead."""
    from .train_config import check_device
    try:
        return check_device(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
