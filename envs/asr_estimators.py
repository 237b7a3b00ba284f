"""ASR estimators: how the env (and reports) measure attack success on defense-validation images.

* ``trigger`` (**trigger-aware**): stamps the attack's real trigger on the defense-validation
  images. This is the research protocol; anything reported with it is labelled trigger-aware.
* ``synthesized`` (trigger-agnostic): a trigger reverse-engineered from the defender's clean
  images alone, Neural-Cleanse style (Wang et al., "Neural Cleanse", IEEE S&P 2019): for every
  class ``t`` a mask ``m`` and pattern ``p`` are optimised so that ``(1-m)*x + m*p`` is classified
  as ``t``, with an L1 penalty on ``m``; the class whose trigger needs the smallest mask is taken
  as the target. It is computed once per model and cached on disk.

Add an estimator with ``@register_asr_estimator("name")`` on a function
``(model, attack, defense_data, *, seed, cache_dir, **params) -> ASRProbe``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from onp.data.defense import DefenseData
from onp.io import CheckpointError, atomic_torch_save, cache_root, load_checkpoint
from onp.models import model_digest
from onp.registry import Registry

if TYPE_CHECKING:
    from onp.attacks import Attack

ASR_ESTIMATORS: Registry = Registry("ASR estimator")


@dataclass
class ASRProbe:
    """Triggered defense-validation images and the labels that count as attack success."""

    name: str
    images: torch.Tensor
    target_labels: torch.Tensor
    true_labels: torch.Tensor
    trigger_aware: bool
    info: Dict[str, Any] = field(default_factory=dict)

    def limit(self, n: Optional[int]) -> "ASRProbe":
        if n is None or n >= len(self.images):
            return self
        return ASRProbe(
            self.name, self.images[:n], self.target_labels[:n], self.true_labels[:n], self.trigger_aware, self.info
        )


#: ``(model, attack, defense_data, *, seed, cache_dir, **params) -> ASRProbe``
ProbeBuilder = Callable[..., ASRProbe]


def register_asr_estimator(name: str) -> Callable[[ProbeBuilder], ProbeBuilder]:
    return ASR_ESTIMATORS.register(name)


def build_probe(
    name: str,
    model: nn.Module,
    attack: Optional[Attack],
    defense_data: DefenseData,
    *,
    seed: int = 0,
    cache_dir: Optional[Path] = None,
    **params: Any,
) -> ASRProbe:
    """Build the probe of estimator ``name`` (see the module docstring)."""
    return ASR_ESTIMATORS.get(name)(model, attack, defense_data, seed=seed, cache_dir=cache_dir, **params)


@register_asr_estimator("trigger")
def trigger_probe(
    model: nn.Module,
    attack: Optional[Attack],
    defense_data: DefenseData,
    *,
    seed: int = 0,
    cache_dir: Optional[Path] = None,
) -> ASRProbe:
    """The real trigger on defense-validation images (target-class images excluded, all-to-one)."""
    if attack is None:
        raise ValueError("the 'trigger' ASR estimator needs the attack; use asr_estimator='synthesized'")
    x, y_target, y_true = attack.poisoned_eval_set(defense_data.val_x, defense_data.val_y)
    return ASRProbe(
        "trigger",
        x,
        y_target,
        y_true,
        trigger_aware=True,
        info={"note": "trigger-aware: uses the attack's real trigger", "attack": attack.params()},
    )


def reverse_engineer_triggers(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    *,
    steps: int = 150,
    batch_size: int = 128,
    lr: float = 0.1,
    l1_weight: float = 1e-3,
    seed: int = 0,
) -> Dict[str, torch.Tensor]:
    """Neural-Cleanse-style optimisation of one (mask, pattern) per class on clean images.

    Returns ``mask`` (K, 1, H, W), ``pattern`` (K, C, H, W), ``mask_l1`` (K,) and ``success`` (K,)
    (the fraction of non-class images flipped at the end). :func:`anomaly_indices` turns the sizes
    into Neural Cleanse's MAD anomaly index.
    """
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    c, h, w = x.shape[1:]
    masks, patterns, norms, success = [], [], [], []
    for t in range(num_classes):
        xs = x[y != t]
        if len(xs) == 0:
            xs = x
        m_logit = torch.full((1, 1, h, w), -3.0, requires_grad=True)
        p_logit = torch.zeros((1, c, h, w), requires_grad=True)
        opt = torch.optim.Adam([m_logit, p_logit], lr=lr, betas=(0.5, 0.9))
        target = torch.full((batch_size,), t, dtype=torch.long)
        for _ in range(steps):
            idx = torch.randint(0, len(xs), (min(batch_size, len(xs)),), generator=gen)
            m, p = torch.sigmoid(m_logit), torch.sigmoid(p_logit)
            xb = (1 - m) * xs[idx] + m * p
            loss = F.cross_entropy(model(xb), target[: len(idx)]) + l1_weight * m.abs().sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            m, p = torch.sigmoid(m_logit), torch.sigmoid(p_logit)
            pred = model((1 - m) * xs + m * p).argmax(1)
            success.append((pred == t).float().mean())
            masks.append(m[0])
            patterns.append(p[0])
            norms.append(m.abs().sum())
    return {
        "mask": torch.stack(masks),
        "pattern": torch.stack(patterns),
        "mask_l1": torch.stack(norms),
        "success": torch.stack(success),
    }


def anomaly_indices(mask_l1: torch.Tensor) -> torch.Tensor:
    """Neural Cleanse's MAD anomaly index of each class's trigger size, ``(size - median) / (1.4826 *
    MAD)`` over all classes (large negative = a suspiciously small trigger).

    Every class counts, also one whose inversion failed (its trigger flips fewer than ``min_success``
    of the images). Such a class ended the fixed number of steps with a mask that does *not* flip the
    model, so its trigger is at least about that large: its size is a lower bound. Lower bounds can only pull the
    median down, which makes the target's index less negative (the MAD can move either way): the
    statistic leans conservative (fewer backdoors suspected), and it does not rest on a median of the
    few classes that succeeded. A failed class is the estimated target only when no
    inversion succeeded (``onp.defend`` then calls the verdict inconclusive).
    """
    med = mask_l1.median()
    mad = (mask_l1 - med).abs().median() * 1.4826 + 1e-12
    return (mask_l1 - med) / mad


def _checked_reversal(rev: Any, path: Path, data: DefenseData) -> Dict[str, torch.Tensor]:
    """A cached :func:`reverse_engineer_triggers` result, checked against the model's data shapes."""
    k, (c, h, w) = data.num_classes, tuple(data.val_x.shape[1:])
    want = {"mask": (k, 1, h, w), "pattern": (k, c, h, w), "mask_l1": (k,), "success": (k,)}
    ok = (
        isinstance(rev, dict)
        and set(want) <= set(rev) <= set(want) | {"anomaly"}  # older caches also hold "anomaly" (ignored)
        and all(
            isinstance(rev[key], torch.Tensor)
            and tuple(rev[key].shape) == shape
            and bool(torch.isfinite(rev[key]).all())
            for key, shape in want.items()
        )
    )
    if not ok:
        raise CheckpointError(
            f"{path}: not a synthesized-trigger cache for this model (expected the tensors "
            f"{want}); delete the file to recompute it"
        )
    return rev


def _images_digest(data: DefenseData) -> str:
    """A short digest of the defense-train images and labels: the synthesized trigger is fitted on them,
    so another set of clean images (even of the same size) gets its own cache entry."""
    h = hashlib.sha256()
    for t in (data.train_x, data.train_y):
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return f"{len(data.train_y)}-{h.hexdigest()[:12]}"


@register_asr_estimator("synthesized")
def synthesized_probe(
    model: nn.Module,
    attack: Optional[Attack],
    defense_data: DefenseData,
    *,
    seed: int = 0,
    cache_dir: Optional[Path] = None,
    steps: int = 150,
    l1_weight: float = 1e-3,
    min_success: float = 0.5,
) -> ASRProbe:
    """A reverse-engineered trigger from defense-train images only (no knowledge of the attack).

    The estimated target is the class with the smallest trigger among those whose trigger flips at
    least ``min_success`` of the images (its :func:`anomaly_indices` entry is the backdoor verdict's
    statistic). The probe stamps that trigger on defense-validation images
    of the other classes. The ``attack`` argument is ignored.
    """
    key = f"{model_digest(model)}-s{seed}-n{steps}-l{l1_weight}-{_images_digest(defense_data)}"
    path = cache_root(cache_dir) / "synthesized" / f"{key}.pt"
    if path.exists():
        rev = _checked_reversal(load_checkpoint(path), path, defense_data)
    else:
        with torch.enable_grad():
            rev = reverse_engineer_triggers(
                model,
                defense_data.train_x,
                defense_data.train_y,
                defense_data.num_classes,
                steps=steps,
                l1_weight=l1_weight,
                seed=seed,
            )
        atomic_torch_save(path, rev)
    ok = rev["success"] >= min_success
    norms = torch.where(ok, rev["mask_l1"], torch.full_like(rev["mask_l1"], float("inf")))
    t = int(norms.argmin()) if ok.any() else int(rev["mask_l1"].argmin())
    keep = defense_data.val_y != t
    xv, yv = defense_data.val_x[keep], defense_data.val_y[keep]
    m, p = rev["mask"][t], rev["pattern"][t]
    with torch.no_grad():
        x_trig = ((1 - m) * xv + m * p).clamp(0, 1)
    return ASRProbe(
        "synthesized",
        x_trig,
        torch.full_like(yv, t),
        yv,
        trigger_aware=False,
        info={
            "estimated_target": t,
            "mask_l1": rev["mask_l1"].tolist(),
            "anomaly_index": anomaly_indices(rev["mask_l1"]).tolist(),
            "min_success": min_success,
            "success": rev["success"].tolist(),
            "note": "trigger-agnostic: reverse-engineered from defense-train images only",
        },
    )
