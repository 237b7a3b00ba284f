"""Safe file handling: atomic writes, run directories that are never overwritten silently,
and checkpoint loading that never unpickles arbitrary objects."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch

PathLike = Union[str, os.PathLike]


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, corrupt or does not match the model; the message names it."""


class RunExistsError(FileExistsError):
    """Raised when an output directory exists and ``--overwrite`` was not given."""


def _atomic_write(path: Path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file and an atomic rename."""
    return _atomic_write(Path(path), lambda fh: fh.write(data))


def atomic_write_text(path: PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def atomic_torch_save(path: PathLike, obj: Any) -> Path:
    return _atomic_write(Path(path), lambda fh: torch.save(obj, fh))


def _json_default(o: Any):
    if isinstance(o, (Path,)):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt JSON ({exc})") from exc


def load_checkpoint(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> Any:
    """Load a torch file with ``weights_only=True``; any failure names the file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # pickle errors, truncated zip archives, ...
        raise CheckpointError(f"{path}: cannot be read as a weights-only torch checkpoint ({exc})") from exc


def load_state_dict_into(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: PathLike) -> None:
    """Load ``state`` into ``model``, naming the file and every mismatched tensor on failure."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected tensors {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        if shape:
            parts.append(f"shape mismatches {shape[:8]}{' ...' if len(shape) > 8 else ''}")
        raise CheckpointError(f"{source}: checkpoint does not match the model architecture: " + "; ".join(parts))
    model.load_state_dict(state)


def prepare_run_dir(path: PathLike, overwrite: bool = False, resume: bool = False) -> Path:
    """Create an output directory; refuse to reuse a non-empty one unless asked.

    ``resume=True`` keeps the directory's contents; ``overwrite=True`` deletes them first.
    """
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        if resume:
            return path
        if not overwrite:
            raise RunExistsError(f"{path} already exists and is not empty; pass --overwrite to replace it "
                                 f"or --resume to continue it")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_root(override: Optional[PathLike] = None) -> Path:
    """Where cached artifacts live: ``override``, else ``$ONP_CACHE``, else ``~/.cache/onp``."""
    if override is not None:
        return Path(override)
    return Path(os.environ.get("ONP_CACHE", Path.home() / ".cache" / "onp"))
