"""The threat model's data splits.

* attacker-train: the training set minus the defender's pool; the attacker poisons and trains on it.
* defender pool: ``defense_size`` clean training images (default 500), held out from the attacker,
  drawn with a seed and saved as an index file. It is split into defense-train and
  defense-validation. Every choice a defense makes uses these images only.
* test: the official test set, for final reporting only.
"""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Union

import numpy as np
import torch

from ..io import CheckpointError, atomic_write_bytes


@dataclass(frozen=True)
class Splits:
    """Index arrays into the dataset's training set (the test set is used whole)."""

    attacker_train: np.ndarray
    defense_train: np.ndarray
    defense_val: np.ndarray

    @property
    def defense_pool(self) -> np.ndarray:
        return np.sort(np.concatenate([self.defense_train, self.defense_val]))

    def digest(self) -> str:
        """SHA-256 of the three index arrays (identifies the split in metadata)."""
        h = hashlib.sha256()
        for a in (self.attacker_train, self.defense_train, self.defense_val):
            h.update(np.ascontiguousarray(a, dtype=np.int64).tobytes())
            h.update(b"|")
        return h.hexdigest()

    def save(self, path: Union[str, Path]) -> None:
        """Write the index file atomically (``.npz``)."""
        import io

        buf = io.BytesIO()
        np.savez_compressed(
            buf, attacker_train=self.attacker_train, defense_train=self.defense_train, defense_val=self.defense_val
        )
        atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Splits":
        """Read an index file written by :meth:`save` (never unpickles; errors name the file)."""
        try:
            with np.load(path, allow_pickle=False) as z:
                return cls(z["attacker_train"], z["defense_train"], z["defense_val"])
        except FileNotFoundError:
            raise
        except (ValueError, KeyError, OSError, zipfile.BadZipFile) as exc:
            raise CheckpointError(f"{path}: not a valid split index file ({exc})") from exc

    def sizes(self) -> Dict[str, int]:
        return {
            "attacker_train": len(self.attacker_train),
            "defense_train": len(self.defense_train),
            "defense_val": len(self.defense_val),
        }


def make_splits(num_train: int, defense_size: int = 500, val_fraction: float = 0.5, seed: int = 0) -> Splits:
    """Draw the defender pool from ``num_train`` training images and split it.

    Raises ``ValueError`` for a pool larger than the data (leaving the attacker nothing) or a
    validation fraction outside (0, 1).
    """
    if not 0 < defense_size < num_train:
        raise ValueError(
            f"defense_size must be in (0, {num_train}) for a training set of {num_train} images; got {defense_size}"
        )
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1); got {val_fraction}")
    n_val = int(round(defense_size * val_fraction))
    if n_val < 1 or n_val >= defense_size:
        raise ValueError(
            f"val_fraction={val_fraction} leaves an empty defense-train or defense-validation "
            f"split of a {defense_size}-image pool"
        )
    rng = np.random.default_rng(seed)
    perm = rng.permutation(num_train)
    pool, rest = perm[:defense_size], perm[defense_size:]
    return Splits(np.sort(rest), np.sort(pool[n_val:]), np.sort(pool[:n_val]))


def as_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 in [0, 1]."""
    return images.float().div_(255.0)
