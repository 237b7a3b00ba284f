"""SAU: Shared Adversarial Unlearning.

Wei, Zhang, Zha & Wu, "Shared Adversarial Unlearning: Backdoor Mitigation by Unlearning Shared
Adversarial Examples", NeurIPS 2023 (arXiv 2307.10562). Reimplemented from the paper and the authors'
code ``shawkui/Shared_Adversarial_Unlearning`` @ ``ddff2fc``: ``defense/sau.py`` (``Shared_PGD``, the
loop in ``sau.mitigation``), ``config/defense/sau/cifar10.yaml`` (the defaults) and
``utils/aggregate_block/train_settings_generate.py`` (the optimiser). No code was copied (the
repository is CC BY-NC 4.0).

A frozen copy ``f_ref`` of the backdoored model is kept; all parameters of the model ``f`` are trained.
Both stay in **eval** mode (BN running statistics are used and never updated; BN gamma/beta are
trained). For each of ``n_rounds`` (100) rounds, for each mini-batch ``(x, y)`` of clean images:

1. *Shared adversarial examples (PGD).* ``delta`` starts at ``+trigger_norm`` everywhere
   (``pgd_init="max"``) and takes ``adv_steps`` (5) signed-gradient *descent* steps of size ``adv_lr``
   (0.2) on ``beta_1 * L_adv + beta_2 * L_share`` (0.01, 1), each followed by a projection onto the
   ``trigger_norm`` (0.2) ball (L_inf by default). With ``c = argmax f(x)``, ``c_ref = argmax f_ref(x)``,
   ``s = argmax f(x+delta) != c``, ``s_ref`` likewise and ``shared = s & s_ref & (argmax f(x+delta) ==
   argmax f_ref(x+delta))``: ``L_adv = -[sum_{not s} CE(f(x+delta), y) + sum_{not s_ref} CE(f_ref(x+delta),
   y)] / 2B`` (untargeted: raises the CE of the examples that fool a model not yet) and ``L_share =
   sum_{not shared} JS(softmax f(x+delta), softmax f_ref(x+delta)) / B`` (pulls the two models to the
   same prediction). The loop stops early after a step that started with every example shared.
2. *Unlearning.* ``outer_steps`` (1) steps of Adam (lr 1e-4, betas (0.9, 0.999), weight decay 0,
   **amsgrad**) on ``lmd_1 * CE(f(x), y) + lmd_2 * CE(f(x+delta), y) + lmd_3 * L_sar`` (1, 0, 1), where,
   with ``y_adv = argmax f_ref(x+delta)`` and the selected examples ``M = (y_adv != y) & (y_adv !=
   c_ref)`` (the perturbation fools the *reference* model), ``L_sar = sum_{i in M} -log(1 - p_f(y_adv_i |
   x_i+delta_i)) / B``: the purified model unlearns the reference's adversarial label. As in the code,
   ``-log(1 - p)`` is the mean of two forms that are equal in exact arithmetic,
   ``-log(1e-6 + min(1 - p, 0.999))`` and ``-log(1 + 1e-6 - max(p, 0.001))``.

The model after the last round is returned (no checkpoint selection); nothing is pruned, no scores.

**Steps (the reference's regime).** The reference iterates over 5% of the clean training set (2,500
CIFAR-10 images) in shuffled batches of 256 (its ``DataLoader`` keeps the last, smaller batch): 10
batches per round, **1,000 Adam steps** in 100 rounds. As AWM does here, we keep that count fixed
whatever the size of the defense set: ``ceil(reference_samples / batch_size)`` batches per round with
``reference_samples = 2500``, drawn as consecutive chunks of shuffled passes over defense-train (each pass
reshuffled; a batch never crosses a pass). A ``batch_size`` larger than defense-train gives batches of
the whole set, as the reference's loader would. ``reference_samples=None`` makes a round one pass over
defense-train (``ceil(N / batch_size)`` batches: 1 for our 250 images, 100 steps in all).

Deviations from the reference code:

* data: defense-train only (250 of the defender's 500 images by default, against 2,500), as every
  training defense here; defense-val is used only to report ``val_acc_before`` / ``val_acc_after``
  (None when there is none, e.g. the whole pool under ``protocol=paper``); nothing is selected on it
  (the reference evaluates on the test set after each round and selects nothing either);
* images are in [0, 1] and the model normalises inside, so ``delta`` is added to the image directly; the
  reference adds it to the de-normalised image and normalises again (the same thing). Like the
  reference, ``x + delta`` is **not** clipped to [0, 1] by default; ``clip_images=true`` enables the
  clip that the reference has commented out (``delta`` clamped to ``[-x, 1 - x]`` after each projection
  and after the initialisation);
* PGD takes its gradients with respect to ``delta`` only (the reference back-propagates into both
  models' parameters too and clears them before the update), and ``argmax f(x)`` / ``argmax f_ref(x)``
  are computed once per batch instead of at every PGD step and again in the update (the models do not
  change in between, so the values are the same; only the pass counts are lower);
* ``pgd_init="random"`` (``torch.rand_like``, i.e. U[0, 1] before projection) and ``norm_type="Reg"``
  (no projection) are not implemented; ``l1`` / ``l2`` project like the reference (per-example rescale)
  and use ``trigger_norm`` as given (not scaled with the image size);
* the unused ``CosineAnnealingLR`` of the reference (built, never stepped) is not built: the lr is
  constant, as it runs there; ``amp`` (unused there) is absent;
* ``train_mode=true`` reproduces the reference's ``--train_mode`` (train mode only for the purified
  model's concatenated clean + adversarial forward pass of the update); ``augment=true`` (off, as in the
  reference, which uses its test transform) adds the caller's crop/flip augmentation to the clean batch.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import (
    Defense,
    DefenseError,
    DefenseParams,
    DefenseResult,
    default_augment,
    epoch_batches,
    eval_accuracy,
    freeze,
    register_defense,
    require_data,
)

if TYPE_CHECKING:
    from onp.data.augment import Augment
    from onp.data.defense import DefenseData

    from .base import NeuronLayout, PassCounter, ReportFn

NORM_TYPES = ("linf", "l2", "l1")
PGD_INITS = ("max", "min", "zero")


@dataclass
class SAUParams(DefenseParams):
    """SAU hyperparameters; defaults from ``config/defense/sau/cifar10.yaml`` of the reference code."""

    n_rounds: int = 100  # unlearning rounds (``n_rounds``)
    reference_samples: Optional[int] = 2500  # batches per round = ceil(reference_samples / batch_size);
    #                                          None: one pass over defense-train per round
    batch_size: int = 256
    lr: float = 1e-4  # Adam, constant
    weight_decay: float = 0.0
    amsgrad: bool = True
    outer_steps: int = 1  # unlearning steps per batch of shared adversarial examples
    lmd_1: float = 1.0  # clean CE
    lmd_2: float = 0.0  # CE on the adversarial examples (plain adversarial training; off)
    lmd_3: float = 1.0  # shared adversarial unlearning loss L_sar
    beta_1: float = 0.01  # PGD: adversarial term
    beta_2: float = 1.0  # PGD: shared (Jensen-Shannon) term
    norm_type: str = "linf"  # linf | l2 | l1
    trigger_norm: float = 0.2  # perturbation bound, pixel units of [0, 1] images
    adv_lr: float = 0.2  # PGD step size (signed gradient)
    adv_steps: int = 5
    pgd_init: str = "max"  # max (+bound everywhere) | min (-bound) | zero
    clip_images: bool = False  # keep x + delta in [0, 1] (the reference does not)
    train_mode: bool = False  # the reference's --train_mode
    augment: bool = False  # crop/flip the clean batch (the reference does not)


# --------------------------------------------------------------------------------------------------
# shared adversarial examples


def init_perturbation(x: Tensor, init: str, bound: float) -> Tensor:
    """The PGD start: ``+bound`` (``max``), ``-bound`` (``min``) or 0 (``zero``) everywhere."""
    fill = {"max": bound, "min": -bound, "zero": 0.0}[init]
    return torch.full_like(x, fill)


def project(delta: Tensor, norm_type: str, bound: float) -> Tensor:
    """Project each example's perturbation onto the ``norm_type`` ball of radius ``bound`` (L_inf: clamp;
    L1 / L2: rescale the examples whose norm exceeds ``bound``)."""
    if norm_type == "linf":
        return delta.clamp(-bound, bound)
    flat = delta.flatten(1)
    norm = flat.abs().sum(1) if norm_type == "l1" else flat.norm(dim=1)
    scale = torch.where(norm > bound, bound / norm.clamp_min(1e-12), torch.ones_like(norm))
    return delta * scale.view(-1, *([1] * (delta.dim() - 1)))


def _constrain(delta: Tensor, x: Tensor, p: SAUParams) -> Tensor:
    delta = project(delta, p.norm_type, p.trigger_norm)
    return torch.max(torch.min(delta, 1 - x), -x) if p.clip_images else delta


def js_divergence(logits_a: Tensor, logits_b: Tensor) -> Tensor:
    """Per-example Jensen-Shannon divergence of the two softmax distributions (probabilities clamped
    below at 1e-8, as in the reference)."""
    pa = F.softmax(logits_a, dim=1).clamp(min=1e-8)
    pb = F.softmax(logits_b, dim=1).clamp(min=1e-8)
    mix = 0.5 * (pa + pb)
    return (0.5 * (pa * (pa.log() - mix.log())) + 0.5 * (pb * (pb.log() - mix.log()))).sum(1)


def shared_pgd_loss(
    z: Tensor, z_ref: Tensor, y: Tensor, c: Tensor, c_ref: Tensor, beta_1: float, beta_2: float
) -> Tuple[Tensor, Tensor]:
    """The loss that PGD *descends* and the mask of shared adversarial examples.

    Args:
        z, z_ref: logits of the purified and the reference model on ``x + delta``.
        y: true labels; c, c_ref: the two models' predictions on the clean ``x``.

    An example that fools a model (its prediction differs from that model's clean prediction) leaves
    that model's CE term; a *shared* one (both fooled, same label) leaves the Jensen-Shannon term.
    """
    pred, pred_ref = z.argmax(1), z_ref.argmax(1)
    fooled, fooled_ref = pred != c, pred_ref != c_ref
    shared = fooled & fooled_ref & (pred == pred_ref)
    ce = F.cross_entropy(z, y, reduction="none") * (~fooled).to(z.dtype)
    ce_ref = F.cross_entropy(z_ref, y, reduction="none") * (~fooled_ref).to(z.dtype)
    batch = z.shape[0]
    loss_adv = -(ce.sum() + ce_ref.sum()) / (2 * batch)
    loss_share = (js_divergence(z, z_ref) * (~shared).to(z.dtype)).sum() / batch
    return beta_1 * loss_adv + beta_2 * loss_share, shared


def shared_adversarial_perturbation(
    model: nn.Module,
    model_ref: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    c: Tensor,
    c_ref: Tensor,
    p: SAUParams,
    counter: PassCounter,
) -> Tuple[Tensor, int]:
    """Shared adversarial perturbations of a batch (PGD on :func:`shared_pgd_loss`, gradients with
    respect to ``delta`` only); returns ``(delta, steps taken)``. ``c`` / ``c_ref`` are the models'
    predictions on the clean ``x``."""
    delta = _constrain(init_perturbation(x, p.pgd_init, p.trigger_norm), x, p)
    steps = 0
    for _ in range(p.adv_steps):
        delta.requires_grad_(True)
        x_adv = x + delta
        z, z_ref = counter(model, x_adv), counter(model_ref, x_adv)
        loss, shared = shared_pgd_loss(z, z_ref, y, c, c_ref, p.beta_1, p.beta_2)
        (grad,) = counter.grad(loss, [delta])
        with torch.no_grad():
            delta = _constrain(delta - p.adv_lr * grad.sign(), x, p)
        steps += 1
        if bool(shared.all()):  # every example was shared before this step: stop, as the reference does
            break
    return delta.detach(), steps


# --------------------------------------------------------------------------------------------------
# unlearning


def unlearning_targets(y: Tensor, c_ref: Tensor, y_adv_ref: Tensor) -> Tensor:
    """The examples ``L_sar`` unlearns: the reference model's adversarial label differs from the true
    label and from its own clean prediction."""
    return (y_adv_ref != y) & (y_adv_ref != c_ref)


def shared_unlearning_loss(logits_adv: Tensor, y_adv_ref: Tensor, selected: Tensor) -> Tensor:
    """``L_sar``: ``sum_{selected} -log(1 - p(y_adv_ref | x + delta)) / B`` under the purified model, in
    the reference's clamped two-form average (no gradient once ``p < 0.001``); 0 if none is selected."""
    if not bool(selected.any()):
        return logits_adv.new_zeros(())
    prob = F.softmax(logits_adv, dim=1)
    one_hot = F.one_hot(y_adv_ref, num_classes=logits_adv.shape[1]).to(prob.dtype)
    pos = (prob * one_hot).sum(1)[selected]
    neg = (prob * (1 - one_hot)).sum(1)[selected]
    loss = -(torch.log(1e-6 + neg.clamp(max=0.999)).sum() + torch.log(1 + 1e-6 - pos.clamp(min=0.001)).sum()) / 2
    return loss / logits_adv.shape[0]


def _unlearn_step(
    model: nn.Module,
    model_ref: nn.Module,
    opt: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    x_adv: Tensor,
    c_ref: Tensor,
    p: SAUParams,
    counter: PassCounter,
) -> Dict[str, float]:
    """One optimiser step on ``lmd_1 L_cl + lmd_2 L_at + lmd_3 L_sar``; returns its diagnostics."""
    if p.train_mode:
        model.train()
    logits_all = counter(model, torch.cat([x, x_adv]))
    model.eval()
    logits, logits_adv = logits_all[: len(y)], logits_all[len(y) :]
    with torch.no_grad():
        y_adv_ref = counter(model_ref, x_adv).argmax(1)
    selected = unlearning_targets(y, c_ref, y_adv_ref)
    loss_cl = F.cross_entropy(logits, y)
    loss_at = F.cross_entropy(logits_adv, y)
    loss_sar = shared_unlearning_loss(logits_adv, y_adv_ref, selected)
    loss = p.lmd_1 * loss_cl + p.lmd_2 * loss_at + p.lmd_3 * loss_sar
    opt.zero_grad(set_to_none=True)
    counter.backward(loss)
    opt.step()
    shared = selected & (logits_adv.detach().argmax(1) == y_adv_ref)
    return {
        "loss": loss.item(),
        "loss_cl": loss_cl.item(),
        "loss_sar": loss_sar.item(),
        "n": float(len(y)),
        "n_selected": float(selected.sum().item()),
        "n_shared": float(shared.sum().item()),
    }


# --------------------------------------------------------------------------------------------------
# the loop


def batches_per_round(p: SAUParams, n_images: int) -> int:
    """``ceil(reference_samples / batch_size)`` (the reference's count), or one pass over the
    ``n_images`` defense-train images when ``reference_samples`` is None."""
    if p.reference_samples is not None:
        return math.ceil(p.reference_samples / p.batch_size)
    return math.ceil(n_images / p.batch_size)


def _batch_stream(n: int, batch_size: int, gen: torch.Generator) -> Iterator[Tensor]:
    """Consecutive shuffled passes over ``range(n)``, each in chunks of ``batch_size`` (the last smaller)."""
    while True:
        yield from epoch_batches(n, batch_size, gen)


def _summarise(round_idx: int, steps: List[Dict[str, float]], pgd_steps: int) -> Dict[str, Any]:
    n = sum(s["n"] for s in steps)
    return {
        "round": round_idx,
        "loss": sum(s["loss"] for s in steps) / len(steps),
        "loss_cl": sum(s["loss_cl"] for s in steps) / len(steps),
        "loss_sar": sum(s["loss_sar"] for s in steps) / len(steps),
        "frac_selected": sum(s["n_selected"] for s in steps) / n,
        "frac_shared": sum(s["n_shared"] for s in steps) / n,
        "pgd_steps": pgd_steps,
    }


def _run_round(
    model: nn.Module,
    model_ref: nn.Module,
    opt: torch.optim.Optimizer,
    data: DefenseData,
    batches: Iterator[Tensor],
    n_batches: int,
    *,
    p: SAUParams,
    aug: Optional[Augment],
    gen: torch.Generator,
    counter: PassCounter,
) -> Tuple[List[Dict[str, float]], int]:
    """One round: ``n_batches`` batches, each a PGD search then ``outer_steps`` unlearning steps."""
    stats: List[Dict[str, float]] = []
    pgd_steps = 0
    for _ in range(n_batches):
        idx = next(batches)
        x, y = data.train_x[idx], data.train_y[idx]
        if aug is not None:
            x = aug(x, gen)
        with torch.no_grad():
            c, c_ref = counter(model, x).argmax(1), counter(model_ref, x).argmax(1)
        delta, k = shared_adversarial_perturbation(model, model_ref, x, y, c=c, c_ref=c_ref, p=p, counter=counter)
        pgd_steps += k
        for _ in range(p.outer_steps):
            stats.append(_unlearn_step(model, model_ref, opt, x, y, x + delta, c_ref, p, counter))
    return stats, pgd_steps


@register_defense("sau")
class SAU(Defense):
    """Shared Adversarial Unlearning (Wei et al., NeurIPS 2023); see the module docstring."""

    needs_bn = False
    needs_data = True
    Params = SAUParams
    params: SAUParams

    def validate(self) -> None:
        """Refuse hyperparameters outside their valid ranges, saying what to use instead."""
        p, defaults = self.params, SAUParams().to_dict()
        for key in ("n_rounds", "batch_size", "outer_steps", "adv_steps"):
            if getattr(p, key) < 1:
                raise DefenseError(f"sau: {key} must be >= 1, got {getattr(p, key)} (default {defaults[key]})")
        if p.reference_samples is not None and p.reference_samples < 1:
            raise DefenseError(
                f"sau: reference_samples must be >= 1 or null (one pass over defense-train per round), "
                f"got {p.reference_samples}"
            )
        if p.norm_type not in NORM_TYPES:
            raise DefenseError(f"sau: unknown norm_type {p.norm_type!r}; valid: {', '.join(NORM_TYPES)}")
        if p.pgd_init not in PGD_INITS:
            raise DefenseError(f"sau: unknown pgd_init {p.pgd_init!r}; valid: {', '.join(PGD_INITS)}")
        if not p.trigger_norm > 0 or (p.norm_type == "linf" and p.trigger_norm > 1):
            raise DefenseError(
                f"sau: trigger_norm must be > 0 (and <= 1 for norm_type='linf': images are in [0, 1]); "
                f"got {p.trigger_norm}; the reference uses 0.2 (e.g. --set trigger_norm=0.2)"
            )
        if not p.lr > 0 or not p.adv_lr > 0 or p.weight_decay < 0:
            raise DefenseError(
                f"sau: need lr > 0, adv_lr > 0 and weight_decay >= 0; got lr={p.lr}, adv_lr={p.adv_lr}, "
                f"weight_decay={p.weight_decay} (defaults 1e-4, 0.2, 0)"
            )
        weights = {k: getattr(p, k) for k in ("lmd_1", "lmd_2", "lmd_3", "beta_1", "beta_2")}
        if any(v < 0 for v in weights.values()) or p.lmd_1 + p.lmd_2 + p.lmd_3 == 0:
            raise DefenseError(
                f"sau: the loss weights must be >= 0 and lmd_1 + lmd_2 + lmd_3 > 0; got {weights} "
                f"(defaults lmd_1=1, lmd_2=0, lmd_3=1, beta_1=0.01, beta_2=1)"
            )

    def _fit(
        self,
        model: nn.Module,
        data: Optional[DefenseData],
        *,
        layout: Optional[NeuronLayout],
        seed: int,
        augment: Optional[Augment],
        report_fn: Optional[ReportFn],
        counter: PassCounter,
    ) -> DefenseResult:
        p = self.params
        data = require_data(self.name, data)
        n = len(data.train_y)
        if n == 0:
            raise DefenseError("sau needs at least one defense-train image; got none")
        gen = torch.Generator().manual_seed(seed)
        aug = (augment or default_augment(data.train_x)) if p.augment else None
        model_ref = freeze(copy.deepcopy(model)).eval()
        model.eval()
        opt = torch.optim.Adam(
            [q for q in model.parameters() if q.requires_grad], lr=p.lr, weight_decay=p.weight_decay, amsgrad=p.amsgrad
        )
        batch, n_batches = min(p.batch_size, n), batches_per_round(p, n)
        batches = _batch_stream(n, batch, gen)
        has_val = len(data.val_y) > 0  # none under protocol=paper (the whole pool is fitted on)
        val_before = eval_accuracy(model, data.val_x, data.val_y, counter) if has_val else None
        history: List[Dict[str, Any]] = []
        for r in range(p.n_rounds):
            stats, pgd_steps = _run_round(
                model, model_ref, opt, data, batches, n_batches, p=p, aug=aug, gen=gen, counter=counter
            )
            history.append(_summarise(r + 1, stats, pgd_steps))
        model.eval()
        return DefenseResult(
            model,
            info={
                "n_images": n,
                "batch_size": batch,
                "batches_per_round": n_batches,
                "n_updates": p.n_rounds * n_batches * p.outer_steps,
                "pgd_steps": sum(h["pgd_steps"] for h in history),
                "history": history,
                "val_acc_before": val_before,
                "val_acc_after": eval_accuracy(model, data.val_x, data.val_y, counter) if has_val else None,
            },
        )
