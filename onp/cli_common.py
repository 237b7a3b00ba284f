"""Shared command-line plumbing of the ``python -m onp.<tool>`` commands.

* :func:`run_cli`: friendly errors instead of tracebacks for bad input (one ``error:`` line, exit 2).
* validated ``argparse`` types (:func:`int_at_least`, :func:`fraction`, :func:`path_arg`, ...): a bad
  value is refused at parsing, before anything runs.
* the flags every tool spells the same way:

  - the **backdoored-model group** (:func:`add_backdoor_flags`): ``--model --dataset --attack --width
    --epochs --seed --data-source --data-dir --defense-size --max-train --backdoor-set KEY=VALUE
    --checkpoint --cache-dir``, turned into ``backdoor.*`` overrides by :func:`backdoor_overrides`;
  - ``--set KEY=VALUE`` (:func:`add_set_flag`, :func:`set_overrides`): overrides a key of the tool's own
    run config (dotted for nested keys, repeatable);
  - ``--list`` (:func:`add_list_flag`): lists what the tool can run, and exits.

``--seed`` is the seed of the backdoored model and of the agent or defense the tool fits (each tool
adds ``--agent-seed`` / ``--defense-seed`` for theirs only).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Collection, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from .config import deep_update, parse_overrides
from .data.registry import DatasetNotFoundError
from .io import CheckpointError, RunExistsError, UnwritableFolderError
from .registry import UnknownNameError

USER_ERRORS = (
    UnknownNameError,
    DatasetNotFoundError,
    CheckpointError,
    RunExistsError,
    UnwritableFolderError,
    ValueError,
    FileNotFoundError,
)


def run_cli(main: Callable[[Optional[List[str]]], int], argv: Optional[List[str]] = None) -> int:
    """Run ``main``; print user errors as one ``error:`` line (exit 2) and Ctrl-C as exit 130."""
    try:
        return main(argv) or 0
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "interrupted; run the same command again to continue "
            "(add --resume where the command has it, e.g. onp.train)",
            file=sys.stderr,
        )
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


# --------------------------------------------------------------------------------------------------
# help


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with each flag's default, where it has one: a flag whose default is ``None``,
    ``False`` or ``[]`` means "not given" (the run config's value stays) and shows none."""

    def _get_help_string(self, action: argparse.Action) -> Optional[str]:
        if action.default is None or action.default is False or action.default == []:
            return action.help
        return super()._get_help_string(action)


# --------------------------------------------------------------------------------------------------
# the backdoored-model flags, one group shared by onp.train, onp.baseline, onp.evaluate, onp.compare
# and onp.backdoor


@dataclass(frozen=True)
class Flag:
    """One shared flag: its option strings and its ``add_argument`` keywords (``dest`` is the key of
    :data:`backdoor_flags`)."""

    names: Tuple[str, ...]
    kwargs: Mapping[str, Any] = field(default_factory=dict)


#: flags whose value is a :class:`onp.zoo.BackdoorConfig` key of the same name (``backdoor.<dest>``)
BACKDOOR_KEYS = ("model", "dataset", "attack", "width", "epochs", "seed", "data_source", "defense_size", "max_train")
#: flags naming where the model comes from or where its files are: run-config keys of the same name
MODEL_SOURCE_KEYS = ("checkpoint", "cache_dir", "data_dir")


@lru_cache(maxsize=None)
def backdoor_flags() -> Dict[str, Flag]:
    """The shared backdoored-model flags by ``dest``, built once (every tool gets the very same
    types and help texts). Unset flags are ``None``: the tool's run config keeps its value."""
    return {**_model_flags(), **_data_and_source_flags()}


def _model_flags() -> Dict[str, Flag]:
    """The backdoored model's recipe: architecture, dataset, attack, width, epochs, seed."""
    from .attacks import ATTACKS
    from .data import DATASETS
    from .models import MODELS

    return {
        "model": Flag(("--model",), {"metavar": "NAME", "help": f"architecture: {', '.join(MODELS.names())}"}),
        "dataset": Flag(("--dataset",), {"metavar": "NAME", "help": f"dataset: {', '.join(DATASETS.names())}"}),
        "attack": Flag(("--attack",), {"metavar": "NAME", "help": f"attack: {', '.join(ATTACKS.names())}"}),
        "width": Flag(
            ("--width",),
            {
                "type": int,
                "help": "first-stage width, 1 .. 4096 (64 = the standard ResNet-18; "
                "default: the architecture's, 16 for resnet18)",
            },
        ),
        "epochs": Flag(("--epochs",), {"type": int_at_least(1), "help": "epochs of training the backdoored model"}),
        "seed": Flag(
            ("--seed",),
            {
                "type": int_at_least(0),
                "help": "seed of the backdoored model, and of the agent or defense that the tool "
                "trains or fits (--agent-seed / --defense-seed: theirs only)",
            },
        ),
    }


def _data_and_source_flags() -> Dict[str, Flag]:
    """Where the data comes from and how much of it, any other config key, or an existing model
    folder, and the artifact cache."""
    return {
        "data_source": Flag(
            ("--data-source",),
            {
                "choices": ["auto", "full", "sample"],
                "help": "auto: the full dataset when found, else the bundled sample",
            },
        ),
        "data_dir": Flag(
            ("--data-dir",),
            {"type": path_arg, "help": "folder with the dataset's files (an error if they are not there)"},
        ),
        "defense_size": Flag(
            ("--defense-size",), {"type": int_at_least(2), "help": "clean images held out for the defender"}
        ),
        "max_train": Flag(
            ("--max-train",), {"type": int_at_least(1), "help": "cap the attacker's training set (quick runs)"}
        ),
        "backdoor_set": Flag(
            ("--backdoor-set",),
            {
                "action": "append",
                "default": [],
                "metavar": "KEY=VALUE",
                "help": "override any BackdoorConfig key, dotted for nested ones (e.g. poison_rate=0.05; repeatable)",
            },
        ),
        "checkpoint": Flag(
            ("--checkpoint",),
            {"type": path_arg, "help": "an existing model folder (a zoo artifact directory) instead of a zoo config"},
        ),
        "cache_dir": Flag(
            ("--cache-dir",), {"type": path_arg, "help": "artifact cache (default $ONP_CACHE or ~/.cache/onp)"}
        ),
    }


def add_backdoor_flags(
    parser: argparse.ArgumentParser,
    *,
    title: str = "backdoored model (onp.zoo)",
    description: Optional[str] = None,
    skip: Collection[str] = (),
) -> argparse._ArgumentGroup:
    """Add the shared backdoored-model flags (all but ``skip``, by ``dest``) as one argument group;
    returns the group (a tool adds its own model flags to it, e.g. ``onp.evaluate --clean``)."""
    unknown = set(skip) - set(backdoor_flags())
    if unknown:
        raise ValueError(f"add_backdoor_flags: unknown flag(s) {sorted(unknown)} in skip")
    group = parser.add_argument_group(title, description)
    for dest, flag in backdoor_flags().items():
        if dest not in skip:
            group.add_argument(*flag.names, dest=dest, **{"default": None, **flag.kwargs})
    return group


def backdoor_flag_values(args: argparse.Namespace) -> Dict[str, Any]:
    """The :class:`onp.zoo.BackdoorConfig` keys given by the named flags (``--model`` .. ``--max-train``);
    flags left unset, or that the tool does not have, are left out."""
    return {key: getattr(args, key) for key in BACKDOOR_KEYS if getattr(args, key, None) is not None}


def backdoor_overrides(args: argparse.Namespace, extra: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The ``backdoor.*`` overrides of the command line: the named flags, then ``extra`` (a tool's own
    model flags, e.g. ``{"clean": True}``), then the ``--backdoor-set`` items (the last word)."""
    values = {**backdoor_flag_values(args), **(extra or {})}
    return deep_update(values, parse_overrides(getattr(args, "backdoor_set", None) or []))


def model_source(args: argparse.Namespace) -> Dict[str, Optional[str]]:
    """``checkpoint``, ``cache_dir``, ``data_dir`` of the command line as the ``str`` the run configs hold
    (``None`` when unset; a flag the tool does not have is left out)."""
    return {key: path_str(getattr(args, key)) for key in MODEL_SOURCE_KEYS if hasattr(args, key)}


# --------------------------------------------------------------------------------------------------
# --set and --list: the same meaning in every tool


def add_set_flag(parser: argparse.ArgumentParser, help: str) -> None:
    """``--set KEY=VALUE`` (repeatable): override a key of the tool's run config, dotted for nested keys;
    values are YAML scalars (``3``, ``0.5``, ``true``, ``null``, ``[1, 2]``)."""
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=help)


def set_overrides(items: Iterable[str], fields: Collection[str], *, shorthand: Optional[str] = None) -> Dict[str, Any]:
    """``--set`` items as nested overrides of a run config whose top-level keys are ``fields``.

    With ``shorthand`` (``"params"`` in onp.baseline), an item whose first key is not one of ``fields``
    is short for ``<shorthand>.KEY=VALUE`` (``iterations=500`` for ``params.iterations=500``); without
    it such a key is left for the config to refuse (``unknown key``)."""
    expanded: List[str] = []
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        head = item.split("=", 1)[0].strip().split(".")[0]
        expanded.append(item if shorthand is None or head in fields else f"{shorthand}.{item.lstrip()}")
    return parse_overrides(expanded)


def nest_dotted(flat: Mapping[str, Any]) -> Dict[str, Any]:
    """``{"env.budget": 3, "seed": 1}`` -> ``{"env": {"budget": 3}, "seed": 1}``."""
    nested: Dict[str, Any] = {}
    for key, val in flat.items():
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = val
    return nested


def add_list_flag(parser: argparse.ArgumentParser, what: str, *aliases: str) -> None:
    """``--list`` (plus ``aliases``, e.g. onp.train's ``--list-agents``): print ``what`` the tool can run
    and exit 0."""
    parser.add_argument("--list", *aliases, dest="list", action="store_true", help=f"list {what} and exit")


def print_listing(lines: Sequence[str]) -> int:
    """Print a ``--list`` answer, one entry a line; returns the exit status 0."""
    print("\n".join(lines))
    return 0
