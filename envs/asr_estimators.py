"""ASR estimators: how the env (and reports) measure attack success on defense-validation images.

* ``trigger`` (**trigger-aware**): stamps the attack's real trigger on the defense-validation
  images. This is the research protocol; anything reported with it is labelled trigger-aware.
* ``synthesized`` (trigger-agnostic): a trigger reverse-engineered from the defender's clean
  images alone, Neural-Cleanse style (Wang et al., "Neural Cleanse", IEEE S&P 2019): for every
  class ``t`` a mask ``m`` and pattern ``p`` are optimised so that ``(1-m)*x + m*p`` is classified
  as ``t``, with an L1 penalty on ``m``; the class whose trigger needs the smallest mask is taken
  as the target. It is computed once per model and cached on disk.
* ``synthesized-blend``, ``synthesized-warp``: the same with another trigger family
  (:mod:`envs.trigger_families`): a whole-image blend, or a smooth warp.
* ``synthesized-multi`` (trigger-agnostic, ``onp.defend``'s default): several families at once (patch
  and blend by default), the target chosen on the log-size anomaly index within each family
  (:func:`synthesized_multi_probe`). Its defaults, and why:

  - the probe stamps only the trigger of the family in which the target is the most anomalous: a
    family in which the target is not anomalous finds an ordinary "make it class t" perturbation,
    which keeps working after the backdoor is pruned (on the full-data BadNets model, CLP's first 4
    neurons took the real test ASR to 0.05 and the patch trigger's ASR to 0.25, but the blend
    trigger's stayed at 0.98: docs/results.md §10b);
  - a family's trigger for a class counts only if it flips at least ``min_success`` = 0.9 of the
    images: Neural Cleanse's reverse engineering aims at 99%, and a trigger that flips half of the
    images says little about the class (a warp capped at ``max_shift`` pixels often stops there);
  - 100 steps of 32 images per class and family, a sixth of the single-family estimators' 150 steps
    of 128 images, so the two default families together cost a third of ``synthesized``;
  - ``detector="confirmed-or-margin"`` (the default since docs/results.md §23: right on 10 of 10
    held-out models, where ``confirmed``, the default before, was right on 8; no clean model of 9
    flagged): described last below, after ``confirmed``, its first part.
    ``"trigger-size"``: the target and the backdoor verdict come from the trigger sizes alone.
    ``"max-margin"`` takes the class with the largest maximum classification margin instead
    (:mod:`envs.max_margin`, MM-BD: ``margin_steps`` = 300 steps from ``margin_images`` = 30 random
    images per class) and decides the verdict by its p-value against ``margin_alpha`` (0.05);
    ``"either"`` does so when that p-value is below ``margin_alpha`` and keeps the trigger-size target
    otherwise. On the 18 zoo models ``either`` is right on 16, trigger size alone on 11
    (docs/results.md §13a); it stays opt-in until the repair it unlocks is (§13b). ``"combined"``
    does so when Stouffer's combination of that p-value with the class's trigger-size index is below
    ``margin_alpha`` (:func:`onp.backdoor_verdict.combined_pvalue`); that index is the most negative
    over ``combined_families`` (patch, blend and ``spectral``, which singles out SIG's sinusoid but
    alone raised false alarms on clean models: docs/results.md §17a); the trigger-size target stays
    the target when its own evidence is the stronger (:func:`onp.backdoor_verdict.stronger_target`).
    Opt-in: the rule written to make it the default failed on the cost of the clean models' false
    positives, which the trigger-size part gives both detectors (docs/results.md §21c).
    ``"confirmed"`` asks a second statistic of the same inverted trigger to confirm a small one: how far
    the images it flips sit from the class's real images in the model's penultimate features
    (:mod:`envs.latent_gap`), or how compact its patch mask is (:mod:`envs.compactness`); a large latent
    gap alone also suffices (the rule: :func:`onp.backdoor_verdict.confirmed_target`). A clean model's
    natural universal patch is small, spread out, and its images look like the class's real ones; a
    planted trigger is compact, or reaches the target through features of its own (docs/results.md §22).
    ``"confirmed-or-margin"`` adds MM-BD: when ``confirmed`` names no class, the max-margin class is the
    target if its p-value is below the fixed :data:`onp.backdoor_verdict.CONFIRMED_MARGIN_ALPHA` (a
    Trojan trigger raises its target's margin without leaving a small, confirmed trigger: §22h, §23).
  - ``refine_steps=0``: the target's trigger is not re-inverted alone (:func:`cached_target_inversion`,
    Neural Cleanse's adaptive schedule; about 300 steps are needed, docs/results.md §13b) until that
    is measured on the 15 zoo models.

Add an estimator with ``@register_asr_estimator("name")`` on a function
``(model, attack, defense_data, *, seed, cache_dir, **params) -> ASRProbe``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from onp.backdoor_verdict import (
    CONFIRMED_MARGIN_ALPHA,
    CONFIRMING_DETECTORS,
    DEFAULT_DETECTOR,
    DETECTORS,
    combined_pvalue,
    confirmed_target,
    stronger_target,
)
from onp.data.defense import DefenseData
from onp.io import CheckpointError, atomic_torch_save, atomic_write_json, cache_root, load_checkpoint, recorded_seconds
from onp.models import model_digest
from onp.registry import Registry

from .compactness import mask_compactness
from .latent_gap import latent_gaps
from .max_margin import DEFAULT_ALPHA, cached_max_margins, margin_pvalue
from .trigger_families import TRIGGER_FAMILIES, TriggerFamily, trigger_family

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
    #: stamps the estimator's trigger (the real one for ``trigger``, the reverse-engineered one of the
    #: estimated target otherwise) on a batch of clean images in [0, 1]; ``None`` if the estimator has none
    stamp: Optional[Callable[[torch.Tensor], torch.Tensor]] = None

    def limit(self, n: Optional[int]) -> "ASRProbe":
        if n is None or n >= len(self.images):
            return self
        return dataclasses.replace(
            self, images=self.images[:n], target_labels=self.target_labels[:n], true_labels=self.true_labels[:n]
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
        stamp=attack.apply,
    )


#: how :func:`invert_triggers` weighs a trigger's size against its success (see :class:`SizeWeight`)
SIZE_SCHEDULES = ("fixed", "adaptive")


@dataclass
class SizeWeight:
    """The weight of the trigger-size penalty during one class's inversion.

    * ``fixed`` (onp's default so far): ``l1_weight`` at every step, and the trigger of the last step
      is kept. The size then says how far a fixed number of steps got, not how small a working
      trigger can be.
    * ``adaptive``: Neural Cleanse's cost schedule (Wang et al., S&P 2019; the constants are the
      defaults of its public code, reimplemented, not copied): the weight starts at 0; once the
      trigger has worked (it flips at least ``success_target`` of a window of ``patience`` batches)
      it is set to ``l1_weight``, then raised x1.5 after every window in which the trigger works and
      lowered /1.5^1.5 after every window in which it does not. The smallest trigger that flipped
      ``success_target`` of its batch is kept. Deviation: NC counts windows in epochs of its data
      set; here a window is ``patience`` batches.
    """

    schedule: str = "fixed"
    initial: float = 1e-3
    success_target: float = 0.99
    patience: int = 10
    up: float = 1.5
    down: float = 1.5**1.5
    weight: float = field(init=False)
    _window: List[float] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        if self.schedule not in SIZE_SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SIZE_SCHEDULES)}; got {self.schedule!r}")
        self.weight = self.initial if self.schedule == "fixed" else 0.0

    @property
    def keeps_best(self) -> bool:
        """Whether the smallest working trigger is kept (else the last step's)."""
        return self.schedule == "adaptive"

    def update(self, batch_success: float) -> None:
        """Record the fraction of a batch the trigger flipped; move the weight after each full window."""
        if self.schedule == "fixed":
            return
        self._window.append(batch_success)
        if len(self._window) < self.patience:
            return
        works = sum(self._window) / len(self._window) >= self.success_target
        self._window.clear()
        if self.weight == 0.0:
            self.weight = self.initial if works else 0.0
        else:
            self.weight = self.weight * self.up if works else self.weight / self.down


def _invert_one(
    model: nn.Module, fam: TriggerFamily, xs: torch.Tensor, t: int, weight: SizeWeight, *, steps: int,
    batch_size: int, lr: float, gen: torch.Generator,
) -> Dict[str, torch.Tensor]:  # fmt: skip
    """One class's trigger of ``fam``: Adam on ``steps`` batches of ``xs`` (see :func:`invert_triggers`)."""
    free = fam.init()
    opt = torch.optim.Adam([v for v in free if v.requires_grad], lr=lr, betas=(0.5, 0.9))
    target = torch.full((batch_size,), t, dtype=torch.long)
    best: Optional[Dict[str, torch.Tensor]] = None
    best_size = float("inf")
    for _ in range(steps):
        idx = torch.randint(0, len(xs), (min(batch_size, len(xs)),), generator=gen)
        trig = fam.decode(free)
        logits = model(fam.stamp(trig, xs[idx]))
        size = fam.size(trig)
        loss = F.cross_entropy(logits, target[: len(idx)]) + weight.weight * size
        opt.zero_grad()
        loss.backward()
        opt.step()
        if weight.keeps_best:
            flipped = float((logits.detach().argmax(1) == t).float().mean())
            weight.update(flipped)
            if flipped >= weight.success_target and float(size.detach()) < best_size:
                best_size, best = float(size.detach()), {k: v.detach().clone() for k, v in trig.items()}
    with torch.no_grad():
        return best if best is not None else fam.decode(free)


def invert_triggers(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    family: Union[str, TriggerFamily] = "patch",
    *,
    steps: int = 150,
    batch_size: int = 128,
    lr: float = 0.1,
    l1_weight: float = 1e-3,
    schedule: str = "fixed",
    seed: int = 0,
) -> Dict[str, torch.Tensor]:
    """Neural-Cleanse-style inversion of one trigger of ``family`` per class on clean images.

    For every class ``t`` the family's trigger is optimised (Adam, ``steps`` batches of the images of
    the other classes) so that the stamped images are classified as ``t``, with a weight times its
    size as a penalty: ``l1_weight`` throughout (``schedule="fixed"``) or Neural Cleanse's adaptive
    weight (``"adaptive"``, :class:`SizeWeight`). Returns the family's decoded tensors stacked over
    classes (for ``patch``: ``mask`` (K, 1, H, W) and ``pattern`` (K, C, H, W)), ``size`` (K,) and
    ``success`` (K,): the fraction of the other classes' images the kept trigger flips.
    :func:`anomaly_indices` turns the sizes into Neural Cleanse's MAD anomaly index.
    """
    fam = family if isinstance(family, TriggerFamily) else trigger_family(family, x.shape[1:])
    SizeWeight(schedule)  # refuses an unknown schedule before any work
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    decoded: Dict[str, List[torch.Tensor]] = {}
    sizes, success = [], []
    for t in range(num_classes):
        xs = x[y != t]
        if len(xs) == 0:
            xs = x
        weight = SizeWeight(schedule, initial=l1_weight)
        trig = _invert_one(model, fam, xs, t, weight, steps=steps, batch_size=batch_size, lr=lr, gen=gen)
        with torch.no_grad():
            pred = model(fam.stamp(trig, xs)).argmax(1)
            success.append((pred == t).float().mean())
            sizes.append(fam.size(trig))
            for key, value in trig.items():
                decoded.setdefault(key, []).append(value)
    out = {key: torch.stack(values) for key, values in decoded.items()}
    out.update(size=torch.stack(sizes), success=torch.stack(success))
    return out


def anomaly_indices(sizes: torch.Tensor) -> torch.Tensor:
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
    med = sizes.median()
    mad = (sizes - med).abs().median() * 1.4826 + 1e-12
    return (sizes - med) / mad


def log_anomaly_indices(sizes: torch.Tensor) -> torch.Tensor:
    """:func:`anomaly_indices` of the logarithm of the trigger sizes: the same MAD statistic on a scale
    where a class whose trigger is 10x smaller than usual is as far out as one 10x larger (trigger
    sizes are positive and skewed, so the raw MAD is dominated by the few largest classes)."""
    return anomaly_indices(sizes.clamp_min(1e-12).log())


def _legacy(family: str) -> bool:
    """The ``patch`` family's cache files keep their first format (size stored as ``mask_l1``)."""
    return family == "patch"


def _checked_inversion(rev: Any, path: Path, data: DefenseData, family: str) -> Dict[str, torch.Tensor]:
    """A cached :func:`invert_triggers` result, checked against the family and the data's shapes."""
    k, shape = data.num_classes, tuple(int(v) for v in data.val_x.shape[1:])
    fam = trigger_family(family, shape)
    with torch.no_grad():
        want = {key: (k, *v.shape) for key, v in fam.decode(fam.init()).items()}
    want.update({("mask_l1" if _legacy(family) else "size"): (k,), "success": (k,)})
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
            f"{path}: not a synthesized-trigger cache of the {family!r} family for this model (expected the "
            f"tensors {want}); delete the file to recompute it"
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


def _inversion_path(
    model: nn.Module, data: DefenseData, family: str, *, seed: int, cache_dir: Optional[Path], steps: int,
    batch_size: int, l1_weight: float, schedule: str = "fixed",
) -> Path:  # fmt: skip
    """Where :func:`cached_inversion` keeps one family's triggers (its cost goes next to it as ``.json``)."""
    batches = "" if batch_size == 128 else f"-b{batch_size}"  # the first cache files had no batch size
    weighting = "" if schedule == "fixed" else f"-{schedule}"  # nor a size schedule
    key = f"{model_digest(model)}-s{seed}-n{steps}{batches}-l{l1_weight}{weighting}-{_images_digest(data)}"
    return cache_root(cache_dir) / "synthesized" / (f"{key}.pt" if _legacy(family) else f"{key}-{family}.pt")


def _target_inversion_path(model: nn.Module, data: DefenseData, family: str, target: int, **settings: Any) -> Path:
    """Where :func:`cached_target_inversion` keeps one class's re-inverted trigger (cost beside it)."""
    path = _inversion_path(model, data, family, schedule="adaptive", **settings)
    stem = f"{path.stem}-{family}" if _legacy(family) else path.stem
    return path.with_name(f"{stem}-target{target}.pt")


def cached_inversion(
    model: nn.Module,
    data: DefenseData,
    family: str,
    *,
    seed: int = 0,
    cache_dir: Optional[Path] = None,
    steps: int = 150,
    batch_size: int = 128,
    l1_weight: float = 1e-3,
    schedule: str = "fixed",
) -> Dict[str, torch.Tensor]:
    """:func:`invert_triggers` of ``family`` on the defense-train images, computed once per model, images
    and settings and cached (weights-only) under ``<cache>/synthesized``. The result always has ``size``.
    The seconds the computation took are kept beside it (:func:`inversion_cost`)."""
    path = _inversion_path(
        model, data, family, seed=seed, cache_dir=cache_dir, steps=steps, batch_size=batch_size,
        l1_weight=l1_weight, schedule=schedule,
    )  # fmt: skip
    if path.exists():
        rev = dict(_checked_inversion(load_checkpoint(path), path, data, family))
    else:
        t0 = time.perf_counter()
        with torch.enable_grad():
            rev = invert_triggers(
                model, data.train_x, data.train_y, data.num_classes, family,
                steps=steps, batch_size=batch_size, l1_weight=l1_weight, schedule=schedule, seed=seed,
            )  # fmt: skip
        if _legacy(family):
            rev["mask_l1"] = rev.pop("size")
        atomic_torch_save(path, rev)
        atomic_write_json(path.with_suffix(".json"), {"family": family, "seconds": time.perf_counter() - t0})
    rev.pop("anomaly", None)
    if _legacy(family):
        rev["size"] = rev.pop("mask_l1")
    return rev


def inversion_cost(model: nn.Module, data: DefenseData, family: str, **settings: Any) -> Optional[float]:
    """The seconds :func:`cached_inversion` of ``family`` took when it was computed (``None`` if it is not
    cached, or was cached before costs were recorded). ``settings``: its ``seed``, ``cache_dir``,
    ``steps``, ``batch_size``, ``l1_weight`` and ``schedule``."""
    defaults = {"seed": 0, "cache_dir": None, "steps": 150, "batch_size": 128, "l1_weight": 1e-3, "schedule": "fixed"}
    return recorded_seconds(_inversion_path(model, data, family, **{**defaults, **settings}).with_suffix(".json"))


def cached_target_inversion(
    model: nn.Module, data: DefenseData, family: str, target: int, *, seed: int = 0,
    cache_dir: Optional[Path] = None, steps: int = 300, batch_size: int = 32, l1_weight: float = 1e-3,
) -> Dict[str, torch.Tensor]:  # fmt: skip
    """The trigger of ``family`` for class ``target`` alone, re-inverted on the defense-train images of the
    other classes with Neural Cleanse's adaptive size schedule (:class:`SizeWeight`) for ``steps``
    batches, keeping the smallest trigger that works. Computed once and cached (weights-only), with its
    cost beside it. Returns the family's decoded tensors (one trigger, no class dimension), ``size`` and
    ``success`` (0-d: the fraction of those images it flips)."""
    settings = dict(seed=seed, cache_dir=cache_dir, steps=steps, batch_size=batch_size, l1_weight=l1_weight)
    path = _target_inversion_path(model, data, family, target, **settings)
    fam = trigger_family(family, tuple(int(v) for v in data.val_x.shape[1:]))
    if path.exists():
        return _checked_target_inversion(load_checkpoint(path), path, fam)
    t0 = time.perf_counter()
    xs = data.train_x[data.train_y != target]
    xs = xs if len(xs) else data.train_x
    model.eval()
    with torch.enable_grad():
        trig = _invert_one(
            model, fam, xs, target, SizeWeight("adaptive", initial=l1_weight), steps=steps,
            batch_size=batch_size, lr=0.1, gen=torch.Generator().manual_seed(seed),
        )  # fmt: skip
    with torch.no_grad():
        success = (model(fam.stamp(trig, xs)).argmax(1) == target).float().mean()
        rev = {**trig, "size": fam.size(trig).reshape(()), "success": success}
    atomic_torch_save(path, rev)
    atomic_write_json(path.with_suffix(".json"), {"family": family, "seconds": time.perf_counter() - t0})
    return rev


def _checked_target_inversion(rev: Any, path: Path, fam: TriggerFamily) -> Dict[str, torch.Tensor]:
    """A cached :func:`cached_target_inversion` result, checked against the family and the image shape."""
    with torch.no_grad():
        want = {key: tuple(v.shape) for key, v in fam.decode(fam.init()).items()}
    want.update(size=(), success=())
    ok = (
        isinstance(rev, dict)
        and set(rev) == set(want)
        and all(
            isinstance(rev[k], torch.Tensor) and tuple(rev[k].shape) == v and bool(torch.isfinite(rev[k]).all())
            for k, v in want.items()
        )
    )
    if not ok:
        raise CheckpointError(
            f"{path}: not a target-trigger cache of the {fam.name!r} family for this model (expected the tensors "
            f"{want}); delete the file to recompute it"
        )
    return dict(rev)


def _refined_target(
    model: nn.Module, data: DefenseData, revs: Dict[str, Dict[str, torch.Tensor]], family: str, target: int,
    min_success: float, settings: Dict[str, Any],
) -> Tuple[Dict[str, Dict[str, torch.Tensor]], Dict[str, Any]]:  # fmt: skip
    """``synthesized-multi``'s ``refine_steps``: the target's trigger of the stamped ``family`` re-inverted
    alone (:func:`cached_target_inversion`); ``revs`` with it in the target's place when it works
    (``min_success``), and what happened, for the probe's info. ``settings["steps"]``: the re-inversion's."""
    steps = settings["steps"]
    kw = {k: settings[k] for k in ("seed", "cache_dir", "batch_size", "l1_weight")}
    rev = cached_target_inversion(model, data, family, target, steps=steps, **kw)
    used = float(rev["success"]) >= min_success
    cost = recorded_seconds(_target_inversion_path(model, data, family, target, steps=steps, **kw).with_suffix(".json"))
    info = {
        "family": family, "steps": steps, "size_before": float(revs[family]["size"][target]),
        "size": float(rev["size"]), "success": float(rev["success"]), "used": used, "seconds": cost,
    }  # fmt: skip
    if not used:
        return revs, info
    replaced = {k: v.clone() for k, v in revs[family].items()}
    for key, value in rev.items():
        replaced[key][target] = value
    return {**revs, family: replaced}, info


def _stamper(
    family: str, rev: Dict[str, torch.Tensor], target: int, shape: Tuple[int, ...]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Stamps the inverted trigger of ``family`` for class ``target`` on images of ``shape`` (C, H, W)."""
    fam = trigger_family(family, tuple(int(v) for v in shape))
    trig = {key: value[target] for key, value in rev.items() if key not in ("size", "success")}

    def stamp(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return fam.stamp(trig, x).clamp(0, 1)

    return stamp


def _stamped_val(
    data: DefenseData, family: str, rev: Dict[str, torch.Tensor], target: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The defense-validation images of the classes other than ``target`` with that class's inverted
    trigger of ``family`` stamped on, and their true labels."""
    keep = data.val_y != target
    xv, yv = data.val_x[keep], data.val_y[keep]
    return _stamper(family, rev, target, xv.shape[1:])(xv), yv


def _smallest_working(sizes: torch.Tensor, success: torch.Tensor, min_success: float) -> int:
    """The class with the smallest trigger among those whose trigger flips ``min_success`` of the images
    (the smallest overall when none does)."""
    ok = success >= min_success
    if not ok.any():
        return int(sizes.argmin())
    return int(torch.where(ok, sizes, torch.full_like(sizes, float("inf"))).argmin())


def _family_estimator(family: str, name: str, summary: str) -> ProbeBuilder:
    """The ASR estimator of one trigger family, registered as ``name``."""

    def probe(
        model: nn.Module,
        attack: Optional[Attack],
        defense_data: DefenseData,
        *,
        seed: int = 0,
        cache_dir: Optional[Path] = None,
        steps: int = 150,
        batch_size: int = 128,
        l1_weight: float = 1e-3,
        min_success: float = 0.5,
        schedule: str = "fixed",
    ) -> ASRProbe:
        settings: Dict[str, Any] = dict(
            seed=seed, cache_dir=cache_dir, steps=steps, batch_size=batch_size, l1_weight=l1_weight,
            schedule=schedule,
        )  # fmt: skip
        rev = cached_inversion(model, defense_data, family, **settings)
        t = _smallest_working(rev["size"], rev["success"], min_success)
        x_trig, yv = _stamped_val(defense_data, family, rev, t)
        info: Dict[str, Any] = {"estimated_target": t, "family": family}
        if _legacy(family):
            info["mask_l1"] = rev["size"].tolist()
        info.update(
            trigger_size=rev["size"].tolist(),
            anomaly_index=anomaly_indices(rev["size"]).tolist(),
            min_success=min_success,
            schedule=schedule,
            success=rev["success"].tolist(),
            inversion_seconds=inversion_cost(model, defense_data, family, **settings),
            note="trigger-agnostic: reverse-engineered from defense-train images only",
        )
        stamp = _stamper(family, rev, t, defense_data.val_x.shape[1:])
        return ASRProbe(name, x_trig, torch.full_like(yv, t), yv, trigger_aware=False, info=info, stamp=stamp)

    probe.__name__ = probe.__qualname__ = f"{name.replace('-', '_')}_probe"
    probe.__doc__ = (
        f"{summary} from defense-train images only (no knowledge of the attack; ``attack`` is ignored).\n\n"
        f"The trigger of the ``{family}`` family is inverted for every class (:func:`cached_inversion`); the "
        "estimated target is the class with the smallest trigger among those whose trigger flips at least "
        "``min_success`` of the images (its :func:`anomaly_indices` entry is the backdoor verdict's "
        "statistic). The probe stamps that trigger on the defense-validation images of the other classes."
    )
    return register_asr_estimator(name)(probe)


_family_estimator("patch", "synthesized", "A reverse-engineered patch trigger (Neural Cleanse)")
_family_estimator("blend", "synthesized-blend", "A reverse-engineered whole-image blended trigger")
_family_estimator("warp", "synthesized-warp", "A reverse-engineered smooth warping trigger")


#: which inverted triggers the ``synthesized-multi`` probe stamps (see its docstring)
STAMP_RULES = ("most-anomalous", "all-working")

#: the families ``synthesized-multi`` searches by default. ``warp`` is left out: on the full-data zoo
#: models (docs/results.md §10a) its inversion worked for few classes, the patch family already found
#: WaNet's target, and on a clean model a warp flipping 89% of the images to one class had a log-size
#: index of -4.98 (a false alarm had it counted).
MULTI_FAMILIES = ("patch", "blend")

#: the families whose per-class index the ``combined`` detector pools with MM-BD's p-value: the default
#: families and ``spectral``, whose trigger singles out SIG's target class (docs/results.md §17a). It is
#: not among ``MULTI_FAMILIES``: with the trigger-size rule alone it flagged 2 of 6 clean models.
COMBINED_FAMILIES = ("patch", "blend", "spectral")


def _most_anomalous(
    revs: Dict[str, Dict[str, torch.Tensor]], min_success: float
) -> Tuple[torch.Tensor, List[str], int]:
    """Per class, the most negative log-size anomaly index over the families whose inversion for that
    class worked (over all families where none did) and the family that gave it; and the estimated
    target: the class with the most negative index among those with a working trigger (among all
    classes when no class has one)."""
    families = list(revs)
    index = torch.stack([log_anomaly_indices(revs[f]["size"]) for f in families])  # (F, K)
    worked = torch.stack([revs[f]["success"] >= min_success for f in families])
    usable = torch.where(worked | ~worked.any(0, keepdim=True), index, torch.full_like(index, float("inf")))
    best = usable.argmin(0)
    per_class = usable.gather(0, best[None])[0]
    some = worked.any(0)
    candidates = torch.where(some, per_class, torch.full_like(per_class, float("inf"))) if some.any() else per_class
    return per_class, [families[int(i)] for i in best], int(candidates.argmin())


@register_asr_estimator("synthesized-multi")
def synthesized_multi_probe(
    model: nn.Module,
    attack: Optional[Attack],
    defense_data: DefenseData,
    *,
    seed: int = 0,
    cache_dir: Optional[Path] = None,
    steps: int = 100,
    batch_size: int = 32,
    l1_weight: float = 1e-3,
    min_success: float = 0.9,
    families: Sequence[str] = MULTI_FAMILIES,
    stamp: str = "most-anomalous",
    schedule: str = "fixed",
    detector: str = DEFAULT_DETECTOR,
    margin_alpha: float = DEFAULT_ALPHA,
    margin_steps: int = 300,
    margin_images: int = 30,
    refine_steps: int = 0,
    combined_families: Sequence[str] = COMBINED_FAMILIES,
) -> ASRProbe:
    """Several trigger families at once (``patch`` and ``blend`` by default): the trigger's shape is unknown.

    Each family is inverted for every class (:func:`cached_inversion`). A class's anomaly index is the
    most negative log-size index (:func:`log_anomaly_indices`, within its family) over the families whose
    trigger for that class worked; the estimated target is the class with the most negative index among
    the classes with a working trigger. The probe stamps that class's trigger of the family in which it
    is the most anomalous on the defense-validation images of the other classes (``stamp="all-working"``:
    every family's working trigger, the most anomalous first, so the estimated ASR is their mean;
    ``info["family_slices"]``: the rows of each). ``schedule``: how the inversions weigh the trigger
    size (:class:`SizeWeight`; ``"adaptive"`` is Neural Cleanse's schedule and wants more ``steps``).
    ``detector``, ``margin_*`` and ``combined_families``: which statistic picks the target and decides
    the backdoor verdict (the module docstring; :func:`_combined_info`). ``refine_steps`` > 0 re-inverts
    the target's trigger alone before it is stamped (:func:`cached_target_inversion`). ``attack`` is ignored.
    """
    _check_multi_settings(stamp, families, refine_steps, combined_families)
    settings: Dict[str, Any] = dict(
        seed=seed, cache_dir=cache_dir, steps=steps, batch_size=batch_size, l1_weight=l1_weight, schedule=schedule
    )
    revs = _inverted(model, defense_data, families, settings)
    index, family_of_class, t = _most_anomalous(revs, min_success)
    margin = _margin_info(model, defense_data, detector, margin_alpha, seed, cache_dir, margin_steps, margin_images)
    pooled = _combined_info(model, defense_data, revs, detector, combined_families, min_success, settings)
    confirm = _confirmation_info(model, defense_data, revs, index, family_of_class, min_success, detector)
    t = _detector_target(detector, t, index, revs, min_success, (margin, pooled, confirm))
    working = _families_to_stamp(revs, t, family_of_class[t], min_success, stamp)
    info = {**_per_class_info(revs, index, family_of_class, t), **pooled, **confirm}
    if refine_steps:
        refine = {**settings, "steps": refine_steps}
        revs, info["target_trigger"] = _refined_target(model, defense_data, revs, working[0], t, min_success, refine)
    images, y_true, slices = _stamp_families(defense_data, revs, working, t)
    info = {
        **info, "min_success": min_success, "schedule": schedule, "family_slices": slices,
        "inversion_seconds": {f: inversion_cost(model, defense_data, f, **settings) for f in revs},
        "note": "trigger-agnostic: reverse-engineered from defense-train images only", "detector": detector,
        **margin,
    }  # fmt: skip
    stamp_most_anomalous = _stamper(working[0], revs[working[0]], t, defense_data.val_x.shape[1:])
    return ASRProbe("synthesized-multi", images, torch.full_like(y_true, t), y_true, False, info, stamp_most_anomalous)


def _detector_target(
    detector: str, t: int, index: torch.Tensor, revs: Dict[str, Dict[str, torch.Tensor]], min_success: float,
    stats: Tuple[Dict[str, Any], Dict[str, Any], Dict[str, Any]],
) -> int:  # fmt: skip
    """The estimated target once the detector's statistics (``stats``: the max-margin, combined and
    confirmation infos) exist: the ``confirmed`` rule's class when it names one, the max-margin rule's
    (:func:`_margin_target`) when the margins were computed, else the trigger size's ``t``."""
    margin, pooled, confirm = stats
    if confirm.get("confirmed_target") is not None:
        return int(confirm["confirmed_target"])
    if not margin:
        return t
    size = float(index[t]) if any(float(rev["success"][t]) >= min_success for rev in revs.values()) else None
    alpha = float(margin["max_margin_alpha"])  # the detector's level (confirmed-or-margin's is fixed)
    return _margin_target(detector, margin, pooled.get("combined_index", index.tolist()), alpha, t, size)


def _confirmation_info(
    model: nn.Module, data: DefenseData, revs: Dict[str, Dict[str, torch.Tensor]], index: torch.Tensor,
    family_of_class: List[str], min_success: float, detector: str,
) -> Dict[str, Any]:  # fmt: skip
    """With the ``confirmed`` and ``confirmed-or-margin`` detectors (else empty), their statistics: per class
    the latent gap of its trigger (of the family it is most anomalous in, as the target's) on the
    defense-validation images (:func:`envs.latent_gap.latent_gaps`) and the compactness of its ``patch``
    mask (:func:`envs.compactness.mask_compactness`; none without the ``patch`` family), each with its MAD
    anomaly index (:func:`anomaly_indices`); the class the ``confirmed`` rule suspects
    (:func:`onp.backdoor_verdict.confirmed_target`, ``None`` if none) and the seconds it took."""
    if detector not in CONFIRMING_DETECTORS:
        return {}
    t0 = time.perf_counter()
    shape = tuple(int(v) for v in data.val_x.shape[1:])

    def stamp(c: int, x: torch.Tensor) -> torch.Tensor:
        return _stamper(family_of_class[c], revs[family_of_class[c]], c, shape)(x)

    gaps = latent_gaps(model, data.val_x, data.val_y, data.num_classes, stamp)
    compact = mask_compactness(revs["patch"]["mask"]) if "patch" in revs else torch.empty(0)
    gap_index, compact_index = _finite_indices(gaps), _finite_indices(compact)
    working = [float(revs[f]["success"][c]) >= min_success for c, f in enumerate(family_of_class)]
    return {
        "latent_gap": gaps.tolist(),
        "latent_gap_index": gap_index.tolist(),
        "compactness": compact.tolist(),
        "compactness_index": compact_index.tolist(),
        "confirmed_target": confirmed_target(index.tolist(), gap_index.tolist(), compact_index.tolist(), working),
        "confirmation_seconds": time.perf_counter() - t0,
    }


def _finite_indices(values: torch.Tensor) -> torch.Tensor:
    """:func:`anomaly_indices` over the finite entries of ``values``; NaN elsewhere."""
    finite = torch.isfinite(values)
    out = torch.full_like(values, float("nan"))
    if bool(finite.any()):
        out[finite] = anomaly_indices(values[finite])
    return out


def _inverted(
    model: nn.Module, data: DefenseData, families: Sequence[str], settings: Dict[str, Any],
    done: Optional[Dict[str, Dict[str, torch.Tensor]]] = None,
) -> Dict[str, Dict[str, torch.Tensor]]:  # fmt: skip
    """:func:`cached_inversion` of each of ``families`` (once each, in order), reusing those in ``done``."""
    done = done or {}
    return {
        f: done[f] if f in done else cached_inversion(model, data, f, **settings)
        for f in dict.fromkeys(TRIGGER_FAMILIES.check(f) for f in families)
    }


def _combined_info(
    model: nn.Module, data: DefenseData, revs: Dict[str, Dict[str, torch.Tensor]], detector: str,
    families: Sequence[str], min_success: float, settings: Dict[str, Any],
) -> Dict[str, Any]:  # fmt: skip
    """With the ``combined`` detector (else empty): ``combined_index``, per class the most negative log-size
    anomaly index over ``families`` whose trigger worked (as for the target; those already inverted in
    ``revs`` are reused, the others inverted and cached), the trigger-size evidence it pools with MM-BD's
    p-value; and ``combined_families``. They may add to the probe's ``families``, which alone decide the
    trigger-size statistic, its target and the trigger stamped."""
    if detector != "combined":
        return {}
    pooled = _inverted(model, data, families, settings, done=revs)
    return {"combined_index": _most_anomalous(pooled, min_success)[0].tolist(), "combined_families": list(pooled)}


def _margin_target(
    detector: str, margin: Dict[str, Any], index: Sequence[float], alpha: float, size_target: int,
    size_index: Optional[float],
) -> int:  # fmt: skip
    """The estimated target once the max-margin statistics exist: the max-margin class always for
    ``max-margin``; for ``either`` and ``confirmed-or-margin`` (whose confirmed class, if any, came first)
    when its p-value is below ``alpha``; for ``combined`` when its
    :func:`onp.backdoor_verdict.combined_pvalue` (with that class's pooled anomaly ``index``) is, unless
    the trigger-size target (``size_target``, with anomaly index ``size_index``; ``None`` when its
    trigger does not work) has the stronger evidence (:func:`onp.backdoor_verdict.stronger_target`).
    Else ``size_target``. The same rule as :meth:`onp.backdoor_verdict.Verdict.target_by`."""
    p, t = float(margin["max_margin_pvalue"]), int(margin["max_margin_target"])
    if detector == "combined":
        p = combined_pvalue(p, float(index[t]))
        if p < alpha and size_index is not None:
            return stronger_target(t, p, size_target, size_index)
    return t if detector == "max-margin" or p < alpha else size_target


def _families_to_stamp(
    revs: Dict[str, Dict[str, torch.Tensor]], target: int, fallback: str, min_success: float, stamp: str
) -> List[str]:
    """The families whose trigger for ``target`` the probe stamps, the most anomalous first: every one that
    works (``stamp="all-working"``) or the first (``"most-anomalous"``); ``fallback`` if none works."""
    order = sorted(revs, key=lambda f: float(log_anomaly_indices(revs[f]["size"])[target]))
    working = [f for f in order if float(revs[f]["success"][target]) >= min_success] or [fallback]
    return working[:1] if stamp == "most-anomalous" else working


def _check_multi_settings(
    stamp: str, families: Sequence[str], refine_steps: int, combined_families: Sequence[str]
) -> None:
    """Refuse an unknown stamp rule, a families or combined_families value that is not a non-empty list
    of registered families, and a refine_steps that is not a whole number >= 0."""
    if stamp not in STAMP_RULES:
        raise ValueError(f"stamp must be one of {', '.join(STAMP_RULES)}; got {stamp!r}")
    for name, value in (("families", families), ("combined_families", combined_families)):
        if isinstance(value, str) or not value:
            raise ValueError(f"{name} must be a non-empty list of trigger families ({TRIGGER_FAMILIES.names()})")
        for f in value:
            TRIGGER_FAMILIES.check(f)
    if isinstance(refine_steps, bool) or not isinstance(refine_steps, int) or refine_steps < 0:
        raise ValueError(f"refine_steps must be a whole number >= 0 (0: off, e.g. 300); got {refine_steps!r}")


def _per_class_info(
    revs: Dict[str, Dict[str, torch.Tensor]], index: torch.Tensor, family_of_class: List[str], target: int
) -> Dict[str, Any]:
    """``synthesized-multi``'s per-class figures: each class's from the family it is most anomalous in."""
    chosen = list(zip(family_of_class, range(len(family_of_class))))
    return {
        "estimated_target": target,
        "family": family_of_class[target],
        "anomaly_index": index.tolist(),
        "trigger_size": [float(revs[f]["size"][c]) for f, c in chosen],
        "success": [float(revs[f]["success"][c]) for f, c in chosen],
        "family_of_class": family_of_class,
        "families": {f: _family_summary(rev) for f, rev in revs.items()},
    }


def _margin_info(
    model: nn.Module, data: DefenseData, detector: str, alpha: float, seed: int, cache_dir: Optional[Path],
    steps: int, n_init: int,
) -> Dict[str, Any]:  # fmt: skip
    """The max-margin statistics of ``synthesized-multi``'s info (empty for the ``trigger-size`` and
    ``confirmed`` detectors); ``confirmed-or-margin`` compares the p-value with its fixed
    :data:`onp.backdoor_verdict.CONFIRMED_MARGIN_ALPHA`, the others with ``alpha``."""
    if detector not in DETECTORS:
        raise ValueError(f"detector must be one of {', '.join(DETECTORS)}; got {detector!r}")
    if not (isinstance(alpha, (int, float)) and 0.0 < alpha < 1.0):
        raise ValueError(f"margin_alpha must be a number in (0, 1) (MM-BD's is 0.05); got {alpha!r}")
    if detector in ("trigger-size", "confirmed"):
        return {}
    alpha = CONFIRMED_MARGIN_ALPHA if detector == "confirmed-or-margin" else alpha
    found = cached_max_margins(
        model, data.num_classes, data.val_x.shape[1:], seed=seed, cache_dir=cache_dir, steps=steps, n_init=n_init
    )
    target, pvalue = margin_pvalue(found["margin"])
    return {
        "max_margin": found["margin"].tolist(),
        "max_margin_target": target,
        "max_margin_pvalue": pvalue,
        "max_margin_alpha": float(alpha),
        "max_margin_seconds": found["seconds"],
    }


def _stamp_families(
    data: DefenseData, revs: Dict[str, Dict[str, torch.Tensor]], families: Sequence[str], target: int
) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, List[int]]]:
    """The defense-validation images stamped with each family's trigger for ``target``, one block per
    family in the given order: the images, their true labels, and each family's ``[start, end)`` rows."""
    images: List[torch.Tensor] = []
    labels: List[torch.Tensor] = []
    slices: Dict[str, List[int]] = {}
    for f in families:
        x_trig, yv = _stamped_val(data, f, revs[f], target)
        start = int(sum(len(v) for v in images))
        slices[f] = [start, start + len(x_trig)]
        images.append(x_trig)
        labels.append(yv)
    return torch.cat(images), torch.cat(labels), slices


def _family_summary(rev: Dict[str, torch.Tensor]) -> Dict[str, List[float]]:
    """Per class: a family's trigger size, success and both anomaly indices (for reports and studies)."""
    return {
        "size": rev["size"].tolist(),
        "success": rev["success"].tolist(),
        "anomaly_index": anomaly_indices(rev["size"]).tolist(),
        "log_anomaly_index": log_anomaly_indices(rev["size"]).tolist(),
    }
