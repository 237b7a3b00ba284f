"""Maximum-margin backdoor statistics: MM-BD (Wang, Xiang, Miller & Kesidis, "MM-BD: Post-Training
Detection of Backdoor Attacks with Arbitrary Backdoor Pattern Types Using a Maximum Margin
Statistic", IEEE S&P 2024), reimplemented from the paper and read against its public code (not copied).

A backdoor makes the model put its target class ahead of every other class by a margin that natural
images do not reach. For every class ``t``, ``n_init`` uniform random images are moved by plain
gradient steps (``lr``) up the margin ``logit_t - max_{k != t} logit_k`` (the images are clamped to
[0, 1] where the model reads them), for at most ``steps`` steps, stopping early when the summed margin
changes by less than 1e-5 relatively; the class's statistic is the largest margin any of its images
reached. The class with the largest statistic is tested against a gamma distribution fitted (maximum
likelihood) to the other classes' statistics: ``p = 1 - F(max) ** K`` (the largest of ``K`` draws), and
a backdoor is suspected when ``p < alpha`` (0.05).

It needs neither clean images nor a trigger shape (patch, blend, warp and sinusoid alike), which is why
it complements the trigger-size statistic of :mod:`envs.asr_estimators`. Deviations from the public
code: the random images are drawn from a seeded generator (reproducible); its SGD optimiser is created
anew at every step, so its momentum (0.2) never acts and plain gradient steps are what it runs; here
they are written as such.

The statistics are computed once per model and settings and cached (weights-only) under
``<cache>/max_margin``, with their cost beside them (``.json``).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from onp.io import CheckpointError, atomic_torch_save, atomic_write_json, cache_root, load_checkpoint, recorded_seconds
from onp.models import model_digest

__all__ = ["DEFAULT_ALPHA", "class_max_margins", "margin_pvalue", "cached_max_margins"]

#: a backdoor is suspected when the largest margin's p-value is below this (MM-BD's 0.05)
DEFAULT_ALPHA = 0.05


def _one_class(
    model: nn.Module, t: int, num_classes: int, shape: Sequence[int], *, n_init: int, steps: int, lr: float,
    gen: torch.Generator,
) -> Tuple[float, int]:  # fmt: skip
    """The largest margin of class ``t`` reached from ``n_init`` random images, and the steps taken."""
    x = torch.rand(n_init, *shape, generator=gen).requires_grad_(True)
    others = torch.ones(num_classes, dtype=torch.bool)
    others[t] = False
    last: Optional[float] = None
    margin = torch.zeros(n_init)
    taken = 0
    while taken < steps:
        taken += 1
        logits = model(x.clamp(0.0, 1.0))
        margin = logits[:, t] - logits[:, others].amax(1)
        total = margin.sum()
        (grad,) = torch.autograd.grad(total, x)
        with torch.no_grad():
            x += lr * grad
        value = float(total.detach())
        if last is not None and last != 0.0 and abs(last - value) / abs(last) < 1e-5:
            break
        last = value
    return float(margin.detach().max()), taken


def class_max_margins(
    model: nn.Module,
    num_classes: int,
    shape: Sequence[int],
    *,
    n_init: int = 30,
    steps: int = 300,
    lr: float = 1e-2,
    seed: int = 0,
) -> Dict[str, torch.Tensor]:
    """Per class, the largest classification margin reached from random images (see the module
    docstring): ``{"margin": (K,), "steps": (K,)}``. ``shape`` is one image's (C, H, W); the model reads
    images in [0, 1]. Its parameters get no gradients."""
    if n_init < 1 or steps < 1 or not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"need n_init >= 1, steps >= 1 and a finite lr > 0; got {n_init}, {steps}, {lr}")
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    grads = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            found = [
                _one_class(model, t, num_classes, shape, n_init=n_init, steps=steps, lr=lr, gen=gen)
                for t in range(num_classes)
            ]
    finally:
        for p, g in zip(model.parameters(), grads):
            p.requires_grad_(g)
    return {
        "margin": torch.tensor([m for m, _ in found], dtype=torch.float32),
        "steps": torch.tensor([s for _, s in found], dtype=torch.long),
    }


def margin_pvalue(margins: torch.Tensor) -> Tuple[int, float]:
    """The class with the largest margin and its p-value under a gamma distribution fitted (maximum
    likelihood, with location) to the other classes' margins: ``1 - F(max) ** K``. NaN when the fit is
    impossible (fewer than 3 other classes, or all of them equal)."""
    from scipy.stats import gamma

    values = [float(v) for v in margins]
    t = max(range(len(values)), key=values.__getitem__)
    null = values[:t] + values[t + 1 :]
    if len(null) < 3 or max(null) == min(null):
        return t, float("nan")
    a, loc, scale = gamma.fit(null)
    p = 1.0 - float(gamma.cdf(values[t], a, loc=loc, scale=scale)) ** len(values)
    return t, min(1.0, max(0.0, p))


def _cache_path(model: nn.Module, seed: int, cache_dir: Optional[Path], n_init: int, steps: int, lr: float) -> Path:
    return cache_root(cache_dir) / "max_margin" / f"{model_digest(model)}-s{seed}-i{n_init}-n{steps}-lr{lr}.pt"


def cached_max_margins(
    model: nn.Module,
    num_classes: int,
    shape: Sequence[int],
    *,
    seed: int = 0,
    cache_dir: Optional[Path] = None,
    n_init: int = 30,
    steps: int = 300,
    lr: float = 1e-2,
) -> Dict[str, Any]:
    """:func:`class_max_margins`, computed once per model and settings and cached (weights-only); returns
    ``margin`` and ``steps`` (tensors) and ``seconds`` (what the computation cost, ``None`` if unknown)."""
    path = _cache_path(model, seed, cache_dir, n_init, steps, lr)
    if path.exists():
        found = load_checkpoint(path)
        ok = isinstance(found, dict) and set(found) == {"margin", "steps"}
        ok = ok and all(isinstance(v, torch.Tensor) and tuple(v.shape) == (num_classes,) for v in found.values())
        if not ok or not bool(torch.isfinite(found["margin"]).all()):
            raise CheckpointError(
                f"{path}: not a max-margin cache for a {num_classes}-class model; delete the file to recompute it"
            )
        seconds = recorded_seconds(path.with_suffix(".json"))
    else:
        t0 = time.perf_counter()
        found = class_max_margins(model, num_classes, shape, n_init=n_init, steps=steps, lr=lr, seed=seed)
        seconds = time.perf_counter() - t0
        atomic_torch_save(path, found)
        atomic_write_json(path.with_suffix(".json"), {"seconds": seconds})
    return {"margin": found["margin"], "steps": found["steps"], "seconds": seconds}
