"""Fine-tuning after pruning: the last step of the learned defense (``onp.train``, ``onp.evaluate``,
``onp.defend``).

Pruning the few neurons that carry a backdoor also costs clean accuracy, most of it in the first
prunes (docs/results.md §10d). :func:`finetune_pruned` trains the kept pruning's model on
defense-train for a few epochs (the loop of the FT baseline, :func:`baselines.ft.finetune`) with

* the pruned neurons held pruned after every step (:func:`onp.masks.pruning_keeper`);
* the BatchNorm statistics **frozen**: re-estimating them on 250 clean images brought a removed
  backdoor back (test ASR 3.4% -> 95% on the sample seed-1 model, docs/results.md §11);
* the epoch chosen by the env's defense-validation return ``ACC - lam * ASR`` (the ASR is the env's
  estimate, so a fine-tuning that revives the backdoor *as the estimator sees it* loses), epoch 0 (no
  fine-tuning) included; a tie goes to the later epoch, as in the FT baseline;
* one fine-tuning per value of ``rollout.finetune.unlearn`` (default ``[0.0, 0.2]``): that fraction of
  each batch stamped with the ASR estimator's trigger (:attr:`envs.asr_estimators.ASRProbe.stamp`)
  with the true labels kept, Neural Cleanse's "unlearning" (Wang et al., IEEE S&P 2019, 20% stamped);
  the run and epoch with the best defense-val return are kept (a tie: the first listed, i.e. plain
  fine-tuning). Only the ``trigger`` estimator's real trigger is unlearned by default: a
  trigger-agnostic estimate would then judge the very trigger the model was trained to ignore, and
  say "removed" where the real backdoor stayed (docs/results.md §12c); ``unlearn_estimated`` opts in;
* the result judged again by the evidence rule (:class:`onp.evidence.EvidenceRule`). If the
  fine-tuned model fails it, the pruned model without fine-tuning is kept.

``rollout.finetune.method: fst`` replaces the loop above by Feature Shift Tuning (Min et al., NeurIPS
2023; :mod:`baselines.fst`, with the baseline's reference settings: head re-initialised, whole model
trained with BatchNorm statistics updated, ``epochs`` epochs) on the pruned model, its pruned neurons
held pruned after every step, with the augmentation the FST baseline gets beside it: in ``onp.train``
and ``onp.evaluate`` the dataset's (``Augment.for_spec``, as in ``onp.baseline`` and ``onp.compare``), in
``onp.defend`` pad-and-crop (as its baselines; docs/results.md §25a). As the FST baseline does, its last
epoch is handed out (no epoch is chosen on the estimate, which misjudges FST's repairs both ways,
docs/results.md §18d); the evidence rule still judges it, with the same fallback. No unlearning run is
made. When no pruning is kept (the rule rejected the policy's, or it pruned nothing) but a backdoor is
suspected (``finish_unpruned``), FST runs on the unpruned model, as the FST baseline would, and is
judged the same way: a pruning that fails "no evidence, no pruning" no longer stops the repair
(docs/results.md §24a).

Fine-Pruning (Liu et al., RAID 2018) also fine-tunes after pruning; freezing the BN statistics,
choosing the epoch by the estimated return and trying unlearning as a second candidate are onp's
choices, measured in docs/results.md §11 and §12.
"""

from __future__ import annotations

import copy
import functools
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from onp.masks import pruning_keeper
from onp.train_config import FinetuneConfig, RolloutConfig

if TYPE_CHECKING:
    from envs import NeuronPruningEnv
    from onp.data.augment import Augment
    from onp.data.defense import DefenseData
    from onp.evidence import Judgement

__all__ = ["FinetuneOutcome", "TriggerUnlearning", "finetune_pruned"]


@dataclass
class FinetuneOutcome:
    """What :func:`finetune_pruned` returns: the model to hand out, its judgement, and the record."""

    model: nn.Module
    judgement: "Judgement"
    info: Dict[str, Any]  # metrics.json: "finetune"

    @property
    def val(self) -> Optional[Dict[str, float]]:
        """Defense-validation ACC and estimated ASR of the fine-tuned :attr:`model`; ``None`` when the
        model was not fine-tuned (off, nothing pruned, or epoch 0 kept): then the pruning's own figures hold."""
        if not self.info.get("best_epoch"):
            return None
        return {"acc": self.judgement.acc_after, "asr": self.judgement.asr_after}


def finetune_pruned(
    model: nn.Module,
    pruned: Sequence[int],
    *,
    env: "NeuronPruningEnv",
    data: "DefenseData",
    rollout: RolloutConfig,
    judgement: "Judgement",
    seed: int,
    log: Optional[Callable[[str], None]] = None,
    finish_unpruned: bool = False,
    augment: Optional["Augment"] = None,
) -> FinetuneOutcome:
    """Fine-tune the pruned ``model`` (neurons ``pruned``, already written in by
    :func:`onp.masks.apply_pruning` in the env's mask mode) on ``data``'s defense-train images;
    ``model`` is not modified.

    ``env`` is the (unwrapped) env the pruning was chosen in: its current target's reward batch and
    ASR probe score each epoch, with its ``lam``. ``rollout`` is the run's rollout config: its
    ``finetune`` settings and its evidence rule (with the env's ``delta``). ``judgement`` is the kept
    pruning's. Nothing happens when fine-tuning is off (``rollout.finetune.epochs == 0``) or nothing
    is pruned, except with ``finish_unpruned`` (the caller's backdoor verdict suspects a backdoor, or the
    run is forced) and ``method: fst``: FST, a repair on its own, then runs on the unpruned ``model`` and
    the evidence rule judges it against the unpruned model (docs/results.md §24a). ``augment``: FST's, the
    one the FST baseline gets beside it (None: pad-and-crop); the FT loop keeps its own pad-and-crop.
    """
    config, rule = rollout.finetune, rollout.evidence_rule(env.delta)
    target = env.target
    initial = {"acc": target.initial.acc, "asr": target.initial.asr, "n_pruned": 0}
    alone = finish_unpruned and config.method == "fst" and not pruned
    if config.epochs == 0 or (not alone and (not judgement.keep or not pruned)):
        return FinetuneOutcome(model, judgement, {"epochs": 0, "note": _skip_note(config, judgement, pruned)})
    t0 = time.perf_counter()
    rejected = judgement  # what is handed back when the finisher's result is not kept
    if alone:  # FST starts from the unpruned model, whose figures are the starting point
        judgement = rule.judge(initial, initial, len(target.probe.images))
    finisher = _finisher_run(model, pruned, env, data, config, judgement, seed, augment)
    fraction, tuned, ft_info, records, candidates = finisher
    best = int(ft_info["best_epoch"])  # fst: its last epoch; ft: the one with the best defense-val return
    after = {**records[best], "n_pruned": len(pruned)}
    new = rule.judge(initial, after, len(target.probe.images), repaired=alone)
    info: Dict[str, Any] = {
        "method": config.method,
        "epochs": config.epochs,
        "best_epoch": best,
        "history": [{**h, **r} for h, r in zip(ft_info["history"], records)],
        "unlearn": fraction,
        "candidates": candidates,
        "val_before": {"acc": judgement.acc_after, "asr": judgement.asr_after},
        "val_after": {"acc": after["acc"], "asr": after["asr"]},
        "unpruned": alone,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if best == 0 or not new.keep:  # no better than the pruning alone, or it fails the rule the pruning passed
        info["note"] = "no epoch raised the defense-val return" if best == 0 else f"not kept: {new.reason}"
        info["best_epoch"] = 0
        return FinetuneOutcome(model, rejected, info)
    if log is not None:
        log(_kept_line(config, info, judgement))
    return FinetuneOutcome(tuned.eval(), new, info)


def _finisher_run(
    model: nn.Module,
    pruned: Sequence[int],
    env: "NeuronPruningEnv",
    data: "DefenseData",
    config: FinetuneConfig,
    judgement: "Judgement",
    seed: int,
    augment: Optional["Augment"],
) -> Tuple[float, nn.Module, Dict[str, Any], List[Dict[str, float]], List[Dict[str, Any]]]:
    """The finisher of ``config.method`` on ``model``: (unlearned fraction, the model to hand out, the
    loop's info, val ACC/ASR per epoch, every candidate run's summary). ``augment``: FST's only."""
    if config.method == "fst":
        tuned, info, records = _feature_shift_run(model, pruned, env, data, config, judgement, seed, augment)
        return (
            0.0,
            tuned,
            info,
            records,
            [{"method": "fst", "best_epoch": info["best_epoch"], "best_return": info["best_score"]}],
        )
    train = functools.partial(_train_pruned, model, pruned, env, data, config, seed)
    return _best_run(train, env.target.probe, config)


def _kept_line(config: FinetuneConfig, info: Dict[str, Any], judgement: "Judgement") -> str:
    """The log line of a kept fine-tuning (``info``: :func:`finetune_pruned`'s record)."""
    fraction, after = info["unlearn"], info["val_after"]
    return (
        f"[onp] {'feature-shift-tuned' if config.method == 'fst' else 'fine-tuned'} the "
        f"{'unpruned model (no pruning was kept)' if info['unpruned'] else 'pruned model'} for "
        f"{config.epochs} epochs on defense-train; kept epoch {info['best_epoch']}"
        f"{f' of the run with {fraction:.0%} of each batch unlearning the trigger' if fraction else ''}: "
        f"val ACC {judgement.acc_after:.3f} -> {after['acc']:.3f}, estimated val ASR "
        f"{judgement.asr_after:.3f} -> {after['asr']:.3f} ({info['seconds']:.0f}s)"
    )


def _best_run(
    train: Callable[[float], Tuple[nn.Module, Dict[str, Any], List[Dict[str, float]]]],
    probe: Any,
    config: FinetuneConfig,
) -> Tuple[float, nn.Module, Dict[str, Any], List[Dict[str, float]], List[Dict[str, Any]]]:
    """One fine-tuning (``train(fraction)``, :func:`_train_pruned`) per ``config.unlearn`` fraction;
    returns the one with the best defense-val return (a tie: the first listed) as (fraction, model, loop
    info, per-epoch val records) and every candidate's summary. Only plain fine-tuning runs when the
    ``probe``'s trigger may not be unlearned (:func:`_no_unlearning`)."""
    why_not = _no_unlearning(probe, config)
    fractions = list(config.unlearn) if why_not is None else [0.0]  # plain fine-tuning only
    best: Optional[Tuple[float, nn.Module, Dict[str, Any], List[Dict[str, float]]]] = None
    candidates: List[Dict[str, Any]] = []
    for fraction in fractions:
        tuned, info, records = train(fraction)
        candidates.append({"unlearn": fraction, "best_epoch": info["best_epoch"], "best_return": info["best_score"]})
        if best is None or info["best_score"] > best[2]["best_score"]:
            best = (fraction, tuned, info, records)
    if why_not is not None:
        candidates += [{"unlearn": f, "skipped": why_not} for f in config.unlearn if f > 0]
    assert best is not None  # config.unlearn has at least one value
    return (*best, candidates)


def _no_unlearning(probe: Any, config: FinetuneConfig) -> Optional[str]:
    """Why the unlearning fine-tunings do not run on this probe (``None``: they do)."""
    if probe.stamp is None:
        return "the ASR estimator has no trigger to stamp"
    if not probe.trigger_aware and not config.unlearn_estimated:
        return (
            "a trigger-agnostic estimate would judge the trigger it was trained against "
            "(rollout.finetune.unlearn_estimated=true runs it anyway)"
        )
    return None


def _train_pruned(
    model: nn.Module,
    pruned: Sequence[int],
    env: "NeuronPruningEnv",
    data: "DefenseData",
    config: FinetuneConfig,
    seed: int,
    unlearn: float,
) -> Tuple[nn.Module, Dict[str, Any], List[Dict[str, float]]]:
    """The FT loop on a copy of ``model`` with the pruned neurons held pruned (``unlearn`` of each batch
    stamped with the ASR estimator's trigger), each epoch scored by the env's defense-val return;
    returns (the best epoch's model, the loop's info, each epoch's val ACC/ASR)."""
    from baselines.base import PassCounter
    from baselines.ft import FTParams, finetune

    target, lam = env.target, float(env.lam)
    acc0, asr0 = target.initial.acc, target.initial.asr
    tuned = copy.deepcopy(model)
    keep_pruned = pruning_keeper(tuned, target.graph, pruned, target.masks.mode.name)
    records: List[Dict[str, float]] = []

    def val_return(m: nn.Module) -> float:
        ev = target.evaluate_model(m)
        records.append({"acc": ev.acc, "asr": ev.asr})
        return (ev.acc - acc0) - lam * (ev.asr - asr0)

    settings = config.to_dict()
    for key in ("method", "unlearn", "unlearn_estimated"):  # which fine-tunings run: not the loop's settings
        del settings[key]
    augment = None
    if unlearn > 0 and target.probe.stamp is not None:
        augment = _unlearning(target.probe.stamp, unlearn, data.train_x if config.augment else None)
        settings["augment"] = True  # the FT loop applies ``augment`` only when asked to
    params = FTParams(**settings)
    counter = PassCounter()
    tuned, info = finetune(
        tuned,
        data,
        params,
        seed=seed,
        augment=augment,
        counter=counter,
        name="finetune",
        after_step=keep_pruned,
        score=val_return,
    )
    return tuned, info, records


def _feature_shift_run(
    model: nn.Module,
    pruned: Sequence[int],
    env: "NeuronPruningEnv",
    data: "DefenseData",
    config: FinetuneConfig,
    judgement: "Judgement",
    seed: int,
    augment: Optional["Augment"],
) -> Tuple[nn.Module, Dict[str, Any], List[Dict[str, float]]]:
    """FST (:func:`baselines.fst.feature_shift_tune`, reference settings, ``config.epochs`` epochs, ``augment``
    or else pad-and-crop) on a copy of the pruned ``model``, the pruned neurons held pruned; returns (its
    last epoch's model, the loop's info with that epoch as ``best_epoch``, val ACC/ASR per epoch: the
    pruning's at 0, the last evaluated)."""
    from baselines.base import PassCounter
    from baselines.fst import FSTParams, classifier_head, feature_shift_tune

    target, lam = env.target, float(env.lam)
    tuned = copy.deepcopy(model)
    keep_pruned = pruning_keeper(tuned, target.graph, pruned, target.masks.mode.name)
    _, head = classifier_head(tuned, data.num_classes)
    params = FSTParams(epochs=config.epochs, augment=config.augment)
    info = feature_shift_tune(
        tuned, head, data, params, seed=seed, augment=augment, counter=PassCounter(), after_step=keep_pruned
    )
    tuned.eval()
    last = target.evaluate_model(tuned)
    records: List[Dict[str, float]] = [{"acc": judgement.acc_after, "asr": judgement.asr_after}]
    records += [{} for _ in range(config.epochs - 1)] + [{"acc": last.acc, "asr": last.asr}]
    score = (last.acc - target.initial.acc) - lam * (last.asr - target.initial.asr)
    return tuned, {**info, "best_epoch": config.epochs, "best_score": score}, records


class TriggerUnlearning:
    """A fine-tuning batch transform: crop/flip (``base``), then ``fraction`` of the images stamped with
    the ASR estimator's trigger; the labels stay the true ones, so the model learns to ignore the
    trigger (Neural Cleanse's unlearning, Wang et al., IEEE S&P 2019, which stamps 20%)."""

    def __init__(
        self, stamp: Callable[[Tensor], Tensor], fraction: float, base: Optional[Callable[..., Tensor]]
    ) -> None:
        self.stamp, self.fraction, self.base = stamp, float(fraction), base

    def __call__(self, x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        if self.base is not None:
            x = self.base(x, generator)
        chosen = torch.rand(len(x), generator=generator) < self.fraction
        if bool(chosen.any()):
            x = x.clone()
            x[chosen] = self.stamp(x[chosen]).to(x.dtype)
        return x


def _unlearning(stamp: Callable[[Tensor], Tensor], fraction: float, train_x: Optional[Tensor]) -> TriggerUnlearning:
    """The unlearning transform of ``rollout.finetune.unlearn`` (crop/flip too when ``train_x`` is given)."""
    from baselines.base import default_augment

    return TriggerUnlearning(stamp, fraction, default_augment(train_x) if train_x is not None else None)


def _skip_note(config: FinetuneConfig, judgement: "Judgement", pruned: Sequence[int]) -> str:
    if config.epochs == 0:
        return "fine-tuning after pruning is off (rollout.finetune.epochs: 0)"
    if not judgement.keep or not pruned:
        return "nothing is pruned, so nothing is fine-tuned"
    return ""
