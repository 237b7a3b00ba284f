"""Shared command-line plumbing: friendly errors instead of tracebacks for bad input."""

from __future__ import annotations

import sys
from typing import Callable, List, Optional

from .data.registry import DatasetNotFoundError
from .io import CheckpointError, RunExistsError
from .registry import UnknownNameError

USER_ERRORS = (UnknownNameError, DatasetNotFoundError, CheckpointError, RunExistsError, ValueError,
               FileNotFoundError)


def run_cli(main: Callable[[Optional[List[str]]], int], argv: Optional[List[str]] = None) -> int:
    """Run ``main``; print user errors as one ``error:`` line (exit 2) and Ctrl-C as exit 130."""
    try:
        return main(argv) or 0
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to continue (add --resume where the command has it, e.g. onp.train)", file=sys.stderr)
        return 130
