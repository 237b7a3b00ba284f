"""The dataset registry and the search for dataset files on disk.

A dataset is found, in order, in: ``$ONP_DATA``, the onp cache (``$ONP_CACHE/data``), system
locations such as Debian's ``/usr/share/datasets``; then it is downloaded from the official source
when ``download`` is allowed and the machine is online. An explicit ``data_dir`` (``--data-dir``)
replaces that search: the dataset is read from there (or downloaded into it), and a ``data_dir``
that does not exist or does not hold the dataset is an error, never replaced by another location
or the bundled sample.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from ..io import cache_root
from ..registry import Registry
from .spec import Dataset, DatasetSpec


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files were not found; the message says how to get them."""


@dataclass(frozen=True)
class DataRequest:
    """What a loader is asked for."""

    data_dir: Optional[Path] = None
    source: str = "auto"  # "auto": full data if found else bundled sample; "full"; "sample"
    download: bool = True


@dataclass(frozen=True)
class DatasetEntry:
    spec: DatasetSpec
    load: Callable[[DataRequest], Dataset]
    how_to_get: str
    system_dirs: Sequence[str] = ()


DATASETS: Registry = Registry("dataset")

SOURCES = ("auto", "full", "sample")


Loader = Callable[[DataRequest], Dataset]


def register_dataset(spec: DatasetSpec, how_to_get: str, system_dirs: Sequence[str] = ()) -> Callable[[Loader], Loader]:
    """Decorator registering ``loader(request) -> Dataset`` for ``spec.name``."""

    def _wrap(loader: Loader) -> Loader:
        DATASETS.register(spec.name, DatasetEntry(spec, loader, how_to_get, tuple(system_dirs)))
        return loader

    return _wrap


def candidate_dirs(name: str, data_dir: Optional[Path], system_dirs: Sequence[str] = ()) -> List[Path]:
    """Directories searched for ``name``'s files, most specific first: only ``data_dir`` (and its
    ``<name>/`` folder) when it is given."""
    if data_dir is not None:
        return [Path(data_dir) / name, Path(data_dir)]
    out: List[Path] = []
    roots = []
    if os.environ.get("ONP_DATA"):
        roots.append(Path(os.environ["ONP_DATA"]))
    roots.append(cache_root() / "data")
    for r in roots:
        out += [r / name, r]
    out += [Path(d) for d in system_dirs]
    return out


def download_dir(name: str, data_dir: Optional[Path]) -> Path:
    """Where a download is written: ``data_dir/name`` if given, else the onp cache."""
    return (Path(data_dir) if data_dir is not None else cache_root() / "data") / name


def dataset_spec(name: str) -> DatasetSpec:
    return DATASETS.get(name).spec


def load_dataset(
    name: str = "fashion-mnist", *, data_dir: Optional[os.PathLike] = None, source: str = "auto", download: bool = True
) -> Dataset:
    """Load a registered dataset (see the module docstring for where it looks).

    Args:
        name: one of ``DATASETS.names()``.
        data_dir: a directory holding the dataset's original files (or a ``<name>/`` folder of them);
            only it is searched (a download goes into it), and a ``data_dir`` that does not exist or does
            not hold the dataset is a :class:`DatasetNotFoundError` naming it, never the bundled sample.
        source: ``"auto"`` uses the full dataset when found and otherwise the bundled sample (only
            Fashion-MNIST ships one); ``"full"`` fails if the full dataset is missing; ``"sample"``
            uses the bundled sample.
        download: try the official source when the files are not on disk.
    """
    entry = DATASETS.get(name)
    if source not in SOURCES:
        raise ValueError(f"unknown data source {source!r}; valid choices: {', '.join(SOURCES)}")
    if data_dir is not None and source != "sample" and not Path(data_dir).is_dir():
        why = "is a file, not a folder" if Path(data_dir).exists() else "does not exist"
        raise not_found(name, [Path(data_dir)], f"--data-dir {data_dir} {why}")
    return entry.load(DataRequest(Path(data_dir) if data_dir is not None else None, source, download))


def not_found(name: str, searched: Sequence[Path], why: str = "") -> DatasetNotFoundError:
    entry = DATASETS.get(name)
    where = ", ".join(str(p) for p in searched)
    return DatasetNotFoundError(
        f"dataset {name!r} not found{(' (' + why + ')') if why else ''}. Searched: {where}. "
        f"How to get it: {entry.how_to_get}"
    )
