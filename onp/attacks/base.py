"""The :class:`Attack` interface, its registry and :func:`build_attack`.

An attack is a *deterministic* function of a batch of images (float tensors in ``[0, 1]`` with
shape ``(B, C, H, W)``) plus the bookkeeping needed to poison a training set and to measure the
attack success rate (ASR) and robust accuracy (RA):

* which samples may be poisoned (:meth:`Attack.poison_candidates`, :meth:`Attack.poison_indices`),
* which labels they get (:meth:`Attack.poisoned_labels`, :meth:`Attack.target_of`),
* the evaluation set for ASR/RA (:meth:`Attack.poisoned_eval_set`),
* an optional "noise mode" (WaNet) that adds non-trigger augmented samples with their true labels.

Every trigger parameter has a default in the subclass's ``defaults`` mapping and can be overridden
by keyword; :meth:`Attack.params` returns everything needed to rebuild the attack with
:func:`build_attack`.
"""

from __future__ import annotations

import abc
import math
import numbers
import warnings
from typing import Any, ClassVar, Dict, Mapping, Sequence, SupportsInt, Tuple, Type, cast

import torch
from torch import Tensor

from ..registry import Registry

MODES: Tuple[str, ...] = ("all2one", "all2all")
"""Target mappings: ``all2one`` sends every input to ``target``; ``all2all`` sends ``y`` to ``y + 1``."""

BASE_PARAMS: Tuple[str, ...] = ("target", "mode", "seed")


class AttackParamError(TypeError, ValueError):
    """An unknown or invalid attack parameter (both a ``TypeError`` and a ``ValueError``)."""


ATTACKS: Registry = Registry("attack")


def register_attack(cls: Type["Attack"]) -> Type["Attack"]:
    """Class decorator registering an :class:`Attack` subclass under its ``name``."""
    ATTACKS.register(cls.name, cls)
    return cls


def build_attack(name: str, image_shape: Sequence[int], num_classes: int, **kwargs: Any) -> "Attack":
    """Build the attack registered as ``name`` (one of ``ATTACKS.names()``).

    >>> atk = build_attack("badnets", (1, 28, 28), 10, target=0)
    >>> build_attack(atk.params()["name"], (1, 28, 28), 10,
    ...              **{k: v for k, v in atk.params().items() if k != "name"}).params() == atk.params()
    True
    """
    return ATTACKS.get(name)(image_shape, num_classes, **kwargs)


def _check_image_shape(image_shape: Sequence[int]) -> Tuple[int, int, int]:
    try:
        shape = tuple(int(s) for s in image_shape)
    except (TypeError, ValueError):
        raise ValueError(f"image_shape must be (C, H, W) integers, got {image_shape!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"image_shape must be (C, H, W) with positive sizes, got {image_shape!r}")
    return shape


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, numbers.Real) and float(value).is_integer():
            return int(cast(SupportsInt, value))  # numbers.Real has no __int__ in typeshed
        raise AttackParamError(f"{name} must be an integer, got {value!r}")
    return int(value)


class Attack(abc.ABC):
    """A backdoor attack whose trigger is a deterministic function of a batch.

    Args:
        image_shape: ``(C, H, W)`` of the images the trigger is made for.
        num_classes: number of classes of the task.
        target: the target class of an ``all2one`` attack (ignored by ``all2all``'s mapping).
        mode: ``"all2one"`` or ``"all2all"`` (``y -> (y + 1) % num_classes``).
        seed: seed of any random trigger component (e.g. WaNet's warping field); recorded for all.
        **params: trigger parameters; the valid ones and their defaults are in ``defaults``.

    Subclasses set ``name`` and ``defaults``, implement :meth:`_build` (validate ``self.hparams``
    and create the trigger tensors) and :meth:`_apply`, and register with :func:`register_attack`.
    """

    name: ClassVar[str]
    clean_label: ClassVar[bool] = False
    defaults: ClassVar[Mapping[str, Any]] = {}

    def __init__(
        self,
        image_shape: Sequence[int],
        num_classes: int,
        *,
        target: int = 0,
        mode: str = "all2one",
        seed: int = 0,
        **params: Any,
    ):
        self.image_shape: Tuple[int, int, int] = _check_image_shape(image_shape)
        self.num_classes = _as_int("num_classes", num_classes)
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes!r}")
        if mode not in MODES:
            raise ValueError(f"unknown attack mode {mode!r}; valid choices: {', '.join(MODES)}")
        if self.clean_label and mode != "all2one":
            raise ValueError(f"{self.name} is a clean-label attack and supports only mode='all2one', got {mode!r}")
        self.mode: str = mode
        self.target = _as_int("target", target)
        if not 0 <= self.target < self.num_classes:
            raise ValueError(
                f"target must be in [0, {self.num_classes - 1}] (num_classes={self.num_classes}), got {target!r}"
            )
        self.seed = _as_int("seed", seed)
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            valid = ", ".join(list(BASE_PARAMS) + list(self.defaults))
            raise AttackParamError(
                f"unknown parameter(s) {', '.join(map(repr, unknown))} for attack "
                f"{self.name!r}; valid parameters: {valid}"
            )
        self.hparams: Dict[str, Any] = {**self.defaults, **params}
        self._warned_cap = False
        self._build()

    # ----------------------------------------------------------------------------- subclass hooks
    @abc.abstractmethod
    def _build(self) -> None:
        """Validate/normalise ``self.hparams`` (resolve ``None`` defaults) and build the trigger."""

    @abc.abstractmethod
    def _apply(self, x: Tensor) -> Tensor:
        """Stamp the trigger on a validated ``(B, C, H, W)`` float batch without modifying it."""

    @abc.abstractmethod
    def trigger_pattern(self) -> Dict[str, Tensor]:
        """The tensors defining the trigger (patch, mask, pattern, grid, ...), for saving/plotting."""

    # -------------------------------------------------------------------- parameter validation
    def _int_param(self, key: str, low: int | None = None, high: int | None = None) -> int:
        value = _as_int(key, self.hparams[key])
        if (low is not None and value < low) or (high is not None and value > high):
            raise AttackParamError(
                f"{self.name}: {key} must be in [{low}, {high if high is not None else 'inf'}], got {value}"
            )
        self.hparams[key] = value
        return value

    def _float_param(
        self, key: str, low: float | None = None, high: float | None = None, low_open: bool = False
    ) -> float:
        raw = self.hparams[key]
        if isinstance(raw, bool) or not isinstance(raw, numbers.Real) or not math.isfinite(raw):
            raise AttackParamError(f"{self.name}: {key} must be a finite number, got {raw!r}")
        value = float(raw)
        too_low = low is not None and (value <= low if low_open else value < low)
        if too_low or (high is not None and value > high):
            lo = "(" if low_open else "["
            raise AttackParamError(
                f"{self.name}: {key} must be in {lo}{low if low is not None else '-inf'}, "
                f"{high if high is not None else 'inf'}], got {value}"
            )
        self.hparams[key] = value
        return value

    # --------------------------------------------------------------------------- the trigger
    def apply(self, x: Tensor) -> Tensor:
        """Return a triggered copy of ``x`` (``(B, C, H, W)`` or one ``(C, H, W)`` image) in ``[0, 1]``.

        Deterministic, never modifies ``x``; shape, dtype and device are preserved.
        """
        x = self._check_batch(x)
        single = x.ndim == 3
        out = self._apply(x.unsqueeze(0) if single else x).clamp(0.0, 1.0)
        return out.squeeze(0) if single else out

    def _check_batch(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"images must be a float tensor in [0, 1], got dtype {x.dtype}")
        if x.ndim not in (3, 4) or tuple(x.shape[-3:]) != self.image_shape:
            raise ValueError(
                f"{self.name}: expected images of shape (B, {', '.join(map(str, self.image_shape))}), "
                f"got {tuple(x.shape)}"
            )
        return x

    # ------------------------------------------------------------------------------ labels
    def target_of(self, y: Tensor) -> Tensor:
        """The label the backdoor should produce for inputs of true label ``y``."""
        if self.mode == "all2one":
            return torch.full_like(y, self.target)
        return (y + 1) % self.num_classes

    def poisoned_labels(self, y: Tensor) -> Tensor:
        """Labels given to poisoned training samples (unchanged for clean-label attacks)."""
        return y.clone() if self.clean_label else self.target_of(y)

    # -------------------------------------------------------------------------- poisoning
    def poison_candidates(self, labels: Tensor) -> Tensor:
        """Indices (int64, ascending, CPU) of the samples that may be poisoned.

        Dirty-label ``all2one``: ``labels != target``; ``all2all``: all; clean-label: the target class.
        """
        labels = self._check_labels(labels)
        if self.clean_label:
            mask = labels == self.target_of(labels)
        elif self.mode == "all2one":
            mask = labels != self.target
        else:
            mask = torch.ones_like(labels, dtype=torch.bool)
        return torch.nonzero(mask).flatten()

    def poison_indices(self, labels: Tensor, rate: float, generator: torch.Generator) -> Tensor:
        """Sorted int64 indices of the samples to poison, drawn with ``generator``.

        The count is ``round(rate * len(labels))``, capped (with a warning, once per attack) at the
        number of :meth:`poison_candidates`.
        """
        if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0.0 < float(rate) < 1.0:
            raise ValueError(f"poisoning rate must be a number in the open interval (0, 1), got {rate!r}")
        candidates = self.poison_candidates(labels)
        count = int(round(float(rate) * len(labels)))
        if count > len(candidates):
            if not self._warned_cap:
                warnings.warn(
                    f"{self.name}: poisoning rate {rate} asks for {count} samples but only "
                    f"{len(candidates)} are eligible; poisoning {len(candidates)}",
                    stacklevel=2,
                )
                self._warned_cap = True
            count = len(candidates)
        return self._draw(candidates, count, generator)

    def noise_indices(self, labels: Tensor, poison_idx: Tensor, generator: torch.Generator) -> Tensor:
        """Indices of samples to transform with :meth:`apply_noise` (keeping labels); none by default."""
        return torch.empty(0, dtype=torch.long)

    def apply_noise(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """The noise-mode transformation (identity by default; WaNet warps with a noisy grid)."""
        return self._check_batch(x).clone()

    @staticmethod
    def _draw(candidates: Tensor, count: int, generator: torch.Generator) -> Tensor:
        """``count`` of ``candidates`` chosen uniformly with ``generator``, sorted."""
        perm = torch.randperm(len(candidates), generator=generator, device=generator.device).cpu()
        return torch.sort(candidates[perm[:count]]).values

    @staticmethod
    def _check_labels(labels: Tensor) -> Tensor:
        labels = torch.as_tensor(labels)
        if labels.ndim != 1:
            raise ValueError(f"labels must be a 1-D tensor, got shape {tuple(labels.shape)}")
        return labels.detach().cpu().long()

    # -------------------------------------------------------------------------- evaluation
    def poisoned_eval_set(self, x: Tensor, y: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """``(apply(x_kept), target_of(y_kept), y_kept)`` for ASR (vs targets) and RA (vs true labels).

        ``all2one`` drops the images whose true label is already the target; ``all2all`` keeps all.
        """
        if len(x) != len(y):
            raise ValueError(f"{len(x)} images but {len(y)} labels")
        if self.mode == "all2one":
            keep = y != self.target
            x, y = x[keep], y[keep]
        return self.apply(x), self.target_of(y), y.clone()

    # --------------------------------------------------------------------------- metadata
    def params(self) -> Dict[str, Any]:
        """JSON-serialisable description: ``name``, ``target``, ``mode``, ``seed`` and all trigger params."""
        return {"name": self.name, "target": self.target, "mode": self.mode, "seed": self.seed, **dict(self.hparams)}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items() if k != "name")
        return f"{type(self).__name__}(image_shape={self.image_shape}, num_classes={self.num_classes}, {args})"
