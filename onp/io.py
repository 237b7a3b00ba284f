"""Safe file handling: atomic writes, run folders that are never overwritten silently,
and checkpoint loading that never unpickles arbitrary objects.

Run folders follow one rule (:func:`run_folder`): onp deletes or replaces only folders that onp
itself created (they hold the marker file :data:`MARKER`), a replacement happens only after the new
run succeeded, and a run that fails removes what it created unless that holds a resumable checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle  # for pickle.UnpicklingError only: nothing here unpickles
import shutil
import tempfile
import time
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import torch

PathLike = Union[str, os.PathLike]

#: the marker file that onp writes into every folder it creates (run folders, grids, zoo artifacts)
MARKER = ".onp-run.json"


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, corrupt or does not match the model; the message names it."""


class RunExistsError(FileExistsError):
    """Raised when an output directory exists and ``--overwrite`` was not given."""


class NotAnOnpFolderError(RunExistsError):
    """The output folder is not empty and onp did not create it: onp never writes there."""


class UnwritableFolderError(ValueError):
    """A folder onp must write (``--out``, the cache) cannot be created or written: a file is in its
    way, or it is read-only. The message names the folder and the option to change."""


def _atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> Path:
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
    """Write ``obj`` as strict JSON: NaN and infinity (which JSON cannot hold) are written as ``null``."""
    return atomic_write_text(path, json.dumps(_strict_json(obj), indent=2, sort_keys=True, allow_nan=False) + "\n")


def atomic_torch_save(path: PathLike, obj: Any) -> Path:
    return _atomic_write(Path(path), lambda fh: torch.save(obj, fh))


def _strict_json(o: Any) -> Any:
    """``o`` with paths as strings, arrays and tensors as lists, and non-finite floats as ``None``."""
    if isinstance(o, Mapping):
        return {k: _strict_json(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_strict_json(v) for v in o]
    if isinstance(o, float):
        return float(o) if math.isfinite(o) else None
    if o is None or isinstance(o, (str, int)):
        return o
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):
        return _strict_json(o.tolist())
    if hasattr(o, "item"):
        return _strict_json(o.item())
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def to_jsonable(obj: Any, max_len: int = 4096) -> Any:
    """A loose info dict (a defense's ``info``, an operating point) as JSON-ready values, never failing:
    ``_private`` keys dropped, tensors of at most ``max_len`` values as lists (bigger ones summarised
    as their shape and mean), paths as strings, anything else as its ``repr``. (:func:`atomic_write_json`
    is the strict writer: it refuses what it cannot represent.)"""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v, max_len) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v, max_len) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist() if obj.numel() <= max_len else {"shape": list(obj.shape), "mean": obj.float().mean().item()}
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, Path):
        return str(obj)
    return repr(obj)


def recorded_seconds(path: PathLike) -> Optional[float]:
    """The ``seconds`` a cached computation recorded in its JSON side file ``path`` (``None`` when the
    file is missing, unreadable or holds no finite number: a cost is reported, never trusted blindly)."""
    try:
        seconds = read_json(path).get("seconds")
    except (OSError, ValueError, AttributeError):
        return None
    return float(seconds) if isinstance(seconds, (int, float)) and math.isfinite(seconds) else None


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
    except pickle.UnpicklingError as exc:  # objects other than tensors and plain containers
        lines = [ln.strip() for ln in str(exc).splitlines() if "Unsupported" in ln] or [type(exc).__name__]
        first = lines[0].split(" was not an allowed global")[0].split("error: ")[-1][:200]
        raise CheckpointError(
            f"{path}: holds objects other than tensors and plain values, which onp refuses to "
            f"load because loading them could execute code ({first})"
        ) from exc
    except Exception as exc:  # truncated zip archives, not a torch file, ...
        raise CheckpointError(f"{path}: cannot be read as a weights-only torch checkpoint ({exc})") from exc


def load_state_dict_into(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: PathLike) -> None:
    """Load ``state`` into ``model``, naming the file and every mismatched tensor on failure."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
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


def _folder_kind(tool: str) -> str:
    """Run folders of onp.train / onp.baseline / onp.evaluate are interchangeable; grids and zoo
    artifacts are not."""
    return {"onp.compare": "grid", "onp.zoo": "model"}.get(tool, "run")


def write_marker(path: PathLike, tool: str) -> Path:
    """Write :data:`MARKER` into ``path``: the proof that onp created the folder."""
    from . import __version__

    return atomic_write_json(
        Path(path) / MARKER,
        {"tool": tool, "kind": _folder_kind(tool), "onp": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
    )


def _read_marker(path: Path) -> Optional[dict]:
    try:
        data = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _legacy_onp_folder(path: Path) -> bool:
    """A folder that onp wrote before the marker existed: a finished run, grid or zoo artifact has
    ``env.json`` with onp's keys; an interrupted ``onp.train`` run has ``config.json`` +
    ``train_state.json``; an interrupted zoo training has ``splits.npz`` + ``train_state.pt``."""
    try:
        env = json.loads((path / "env.json").read_text())
        if isinstance(env, dict) and {"onp", "git_commit", "torch"} <= set(env):
            return True
    except (OSError, ValueError):
        pass
    return ((path / "config.json").is_file() and (path / "train_state.json").is_file()) or (
        (path / "splits.npz").is_file() and (path / "train_state.pt").is_file()
    )


def is_onp_folder(path: PathLike, tool: Optional[str] = None) -> bool:
    """Whether ``path`` is a folder that onp created (its marker, or a pre-marker onp layout).

    With ``tool``, the marker must also be of the same kind (run folder, grid or zoo artifact)."""
    path = Path(path)
    if not path.is_dir():
        return False
    marker = _read_marker(path)
    if marker is None:
        return (path / MARKER).exists() or _legacy_onp_folder(path)
    return tool is None or marker.get("kind", "run") == _folder_kind(tool)


def _sibling(path: Path, what: str) -> Path:
    return path.parent / f".{path.name}.onp-{what}"


def _clear(path: Path, remove_dir: bool) -> None:
    """Delete a folder that this process created (or only its contents when it existed, empty)."""
    if remove_dir:
        shutil.rmtree(path, ignore_errors=True)
        return
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def _folder_mode(
    path: Path, *, tool: str, overwrite: bool, resume: bool, done_file: str, resumable: Sequence[str]
) -> str:
    """``fresh``, ``in_place`` or ``replace`` for ``path``; raises the refusals of :func:`run_folder`."""
    name = os.path.abspath(path)  # messages name the folder in full (also for --out .)
    if path.exists() and not path.is_dir():
        raise RunExistsError(f"{name} is a file, not a folder; choose another --out")
    previous = _sibling(Path(os.path.realpath(path)), "previous")
    if previous.exists():
        raise RunExistsError(
            f"{previous} holds the previous content of {name} from a replacement that was killed "
            f"before it finished; move it back to {name} (or delete it), then run again"
        )
    if not path.exists() or not any(path.iterdir()):
        return "fresh"
    if not is_onp_folder(path):
        raise NotAnOnpFolderError(
            f"{name} is not empty and was not created by onp (no {MARKER} marker); onp writes into, replaces or "
            f"deletes only folders it created{', also with --overwrite' if overwrite else ''}: choose another --out"
        )
    if not is_onp_folder(path, tool):
        marker = _read_marker(path) or {}
        raise NotAnOnpFolderError(
            f"{name} holds an onp {marker.get('kind')} folder (made by {marker.get('tool')}), "
            f"not a {_folder_kind(tool)} folder of {tool}; choose another --out"
        )
    if resume:
        return "in_place"
    if overwrite:
        return "replace"
    if (path / done_file).exists():
        raise RunExistsError(
            f"{name} already exists and holds a finished run; pass --overwrite to replace it "
            f"(the old run is kept until the new one succeeds)"
            + (" or --resume to continue it" if resumable else "")
            + ", or choose another --out"
        )
    if any((path / name).exists() for name in resumable):
        raise RunExistsError(
            f"{name} already exists and holds an interrupted run with a checkpoint; pass --resume "
            f"to continue it or --overwrite to start again"
        )
    return "replace"  # an unfinished run without a checkpoint: nothing in it is worth keeping


@contextlib.contextmanager
def run_folder(
    path: PathLike,
    *,
    tool: str,
    overwrite: bool = False,
    resume: bool = False,
    done_file: str = "metrics.json",
    resumable: Sequence[str] = (),
    stage: bool = True,
) -> Iterator[Path]:
    """Open the output folder ``path`` of ``tool`` and yield the folder to write the run into.

    The one rule for every folder onp writes (run folders, ``onp.compare`` grids, zoo artifacts):

    * ``path`` missing or empty: it is created with the marker :data:`MARKER` and written directly.
      If the run raises (Ctrl-C included), what it created is removed again, unless it holds one of
      the ``resumable`` files (a checkpoint: an interrupted training then resumes).
    * ``path`` not empty and not created by onp (no marker, no pre-marker onp layout, see
      :func:`is_onp_folder`), or of another kind (a grid for a run, ...): always refused
      (:class:`NotAnOnpFolderError`), ``overwrite`` or not.
    * ``resume=True`` and an onp folder: written in place, never deleted (the tool continues it).
    * ``overwrite=True``, or an unfinished onp folder (no ``done_file``) without any ``resumable``
      file: **replaced**. With ``stage=True`` the run is written into the hidden sibling
      ``.<name>.onp-new`` and swapped into place only when the ``with`` block ends without an
      exception; if it raises, the staging folder is deleted and the old folder is untouched. With
      ``stage=False`` (a grid, whose files record their own paths) the old folder waits in the hidden
      sibling ``.<name>.onp-previous`` while the run writes ``path``; it is deleted on success and
      moved back on failure.
    * a finished run (``done_file`` present) or an interrupted one with a ``resumable`` file, without
      ``overwrite``/``resume``: refused (:class:`RunExistsError`, naming the flag to pass).

    A leftover ``.<name>.onp-previous`` (the process was killed during a replacement) is never
    deleted: the call is refused with a message naming it.
    """
    path = Path(path)
    mode = _folder_mode(path, tool=tool, overwrite=overwrite, resume=resume, done_file=done_file, resumable=resumable)
    _check_writable(path, tool, replace=mode == "replace")
    if mode == "in_place":
        if not (path / MARKER).exists():
            write_marker(path, tool)  # adopt a pre-marker onp folder
        yield path
    elif mode == "fresh":
        with _fresh_folder(path, tool, resumable) as work:
            yield work
    elif stage:
        with _staged_replacement(path, tool) as work:
            yield work
    else:
        with _replacement_in_place(path, tool) as work:
            yield work


@contextlib.contextmanager
def _fresh_folder(path: Path, tool: str, resumable: Sequence[str]) -> Iterator[Path]:
    """Create ``path`` (missing or empty) with the marker and yield it. If the run raises, what it
    created is removed again, unless it holds one of the ``resumable`` files."""
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
        write_marker(path, tool)
    except OSError as exc:  # e.g. a read-only file system that os.access did not report
        if created:
            shutil.rmtree(path, ignore_errors=True)
        raise UnwritableFolderError(
            f"cannot create {os.path.abspath(path)} ({exc.strerror or exc}); choose another {_option(tool)}"
        ) from None
    try:
        yield path
    except BaseException:
        if not any((path / name).exists() for name in resumable):
            _clear(path, remove_dir=created)
        raise


def _option(tool: str) -> str:
    """The option that chooses where ``tool`` writes (for messages)."""
    return "--cache-dir (or ONP_CACHE)" if tool == "onp.zoo" else "--out"


def _check_writable(path: Path, tool: str, *, replace: bool) -> None:
    """Refuse, before anything runs, a ``path`` that cannot be created or written: a file in the way
    of one of its parents, or a read-only folder (``path`` itself, the parent it would be created in,
    or, for a replacement, the parent that holds the staging folder)."""
    probe = Path(os.path.abspath(path))
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UnwritableFolderError(
            f"cannot create {os.path.abspath(path)}: {probe} is a file, not a folder; choose another {_option(tool)}"
        )
    for folder in (probe, probe.parent) if replace else (probe,):
        if not os.access(folder, os.W_OK | os.X_OK):
            raise UnwritableFolderError(
                f"cannot write {os.path.abspath(path)}: {folder} is read-only (no write "
                f"permission); choose another {_option(tool)}"
            )


@contextlib.contextmanager
def _staged_replacement(path: Path, tool: str) -> Iterator[Path]:
    real = Path(os.path.realpath(path))
    new, previous = _sibling(real, "new"), _sibling(real, "previous")
    if new.exists():  # left by a killed run: onp's own staging folder
        if not is_onp_folder(new):
            raise NotAnOnpFolderError(f"{new} exists and was not created by onp; move it away, then run again")
        shutil.rmtree(new)
    new.mkdir()
    write_marker(new, tool)
    try:
        yield new
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    os.rename(real, previous)
    try:
        os.rename(new, real)
    except OSError:
        os.rename(previous, real)
        raise
    shutil.rmtree(previous)


@contextlib.contextmanager
def _replacement_in_place(path: Path, tool: str) -> Iterator[Path]:
    real = Path(os.path.realpath(path))
    previous = _sibling(real, "previous")
    os.rename(real, previous)
    try:
        real.mkdir()
        write_marker(real, tool)
    except BaseException:
        shutil.rmtree(real, ignore_errors=True)
        os.rename(previous, real)
        raise
    try:
        yield path
    except BaseException:
        shutil.rmtree(real, ignore_errors=True)
        os.rename(previous, real)
        raise
    shutil.rmtree(previous)


def cache_root(override: Optional[PathLike] = None) -> Path:
    """Where cached artifacts live: ``override``, else ``$ONP_CACHE``, else ``~/.cache/onp``.

    An empty value, or a path at (or under) a file, is :class:`UnwritableFolderError` naming
    ``--cache-dir`` or ``ONP_CACHE``: it never falls back to the current folder."""
    if override is not None:
        value, what = str(override), "--cache-dir"
    elif "ONP_CACHE" in os.environ:
        value, what = os.environ["ONP_CACHE"], "ONP_CACHE"
    else:
        return Path.home() / ".cache" / "onp"
    if not value.strip():
        raise UnwritableFolderError(
            f"{what} is set but empty; set it to a folder for onp's cache"
            + (" or unset it (default ~/.cache/onp)" if what == "ONP_CACHE" else "")
        )
    path = Path(value)
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise UnwritableFolderError(
            f"{what} {value}: {probe} is a file, not a folder; set {what} to a folder for onp's cache"
        )
    return path
