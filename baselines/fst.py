"""FST: Feature Shift Tuning.

Min, Qin, Shen & Cheng, "Towards Stable Backdoor Purification through Feature Shift Tuning",
NeurIPS 2023 (arXiv 2310.01875). Reimplemented from the paper's objective and the authors' code
``AISafety-HKUST/stable_backdoor_purification`` (``fine_tune/ft.py``, ``--ft_mode fst``, read at
commit ``37d2ef5``); no code was copied (its licence, CC BY-NC 4.0, does not allow it here).

FST fine-tunes the whole network on clean data while pushing the classifier's weights *away* from
the backdoored ones, so that the features must shift to fit the new head:

1. The head is the final ``nn.Linear`` (the last one in module order, as FP and NGF find it).
   Keep ``W_ori`` (its weight) and ``C = ||W_ori||_F``; re-initialise its weight and bias
   ~ U(-1/sqrt(d), 1/sqrt(d)) (d = its input features; PyTorch's default Linear bound).
2. Train **all** parameters in train mode (BN statistics are updated) on defense-train with
   ``CE(f(x), y) + alpha * <W, W_ori>_F`` (the Frobenius inner product: its gradient is the constant
   ``alpha * W_ori``, which drives W towards ``-W_ori``), SGD (lr 0.01, momentum 0.9, no weight
   decay), crop augmentation, batch 128, cosine lr over the epochs (stepped once per epoch).
3. After every step project W back onto the sphere ``||W||_F = C`` (the paper's constraint); the
   bias is neither regularised nor rescaled.
4. Return the model after the last epoch (``checkpoint="last"``, as the reference).

The shift term is added as a gradient hook on W (exactly ``alpha * W_ori``, the gradient of the
term), so the shared loop :func:`baselines.train_loops.run_epoch` does the training.

**Defaults** (paper, CIFAR-10 setting, and the code's argument defaults): alpha 0.2 (the code's
default and the paper's CIFAR-10 value; the README's example command uses 0.1, the paper 0.1 for
GTSRB and 0.001 for CIFAR-100 / Tiny-ImageNet), lr 0.01, momentum 0.9, weight decay 0, 10 epochs,
batch 128.

**Epoch size** (``reference_samples``, default 1000). The reference tunes on 2% of CIFAR-10's
training set, 1,000 images: 8 batches per epoch, 80 updates in 10 epochs. The shift accumulates
with the number of updates (each moves W by about ``lr * alpha * W_ori``), so with our 250
defense-train images an epoch draws ``max(N, reference_samples)`` images (as many whole shuffled
passes over defense-train as needed, the last one partial) and runs the reference's 80 updates;
``reference_samples=None`` makes an epoch one pass over defense-train (20 updates for N = 250).

Deviations from the reference code:

* FST fits on defense-train only (the defender's 500 images are split into defense-train and
  defense-val, as for every training defense here); defense-val is only evaluated, for the history,
  or used to pick the epoch with ``checkpoint="best_val"`` (FT's rule; ties: the later epoch). Under
  ``protocol=paper`` it is given the whole pool with no defense-val images: the history's
  ``val_acc`` is None and ``checkpoint="best_val"`` is refused;
* the epoch size above; when an epoch reuses images an image can occur twice in one batch;
* augmentation is the caller's (``Augment.for_spec`` in the CLI: pad-and-crop, flips where the
  dataset allows them) instead of the code's CIFAR-10 transforms; normalisation is inside our models;
* the head is the last ``nn.Linear`` rather than the parameters whose name contains ``linear``;
  its output size must equal the number of classes;
* the logged training loss is the cross-entropy only (the shift term is logged separately as the
  cosine between W and ``W_ori``). As in the reference, the first update starts from the
  re-initialised head at its initial norm (the projection follows each step), and the momentum
  buffer is not rescaled. The code's label-smoothing option (off by default) is not implemented.

No neuron is scored or pruned (``scores`` and ``pruned`` are None).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .base import (
    Defense,
    DefenseError,
    DefenseParams,
    DefenseResult,
    default_augment,
    eval_accuracy,
    register_defense,
    require_data,
    require_images,
)
from .ngf import last_linear
from .train_loops import run_epoch

if TYPE_CHECKING:
    from onp.data.augment import Augment
    from onp.data.defense import DefenseData
    from onp.graph import NeuronLayout

    from .base import PassCounter, ReportFn

#: ``last``: the model after the final epoch (reference); ``best_val``: best defense-val epoch (as FT)
CHECKPOINTS = ("last", "best_val")


@dataclass
class FSTParams(DefenseParams):
    alpha: float = 0.2  # weight of the feature-shift term alpha * <W, W_ori>_F (>= 0; 0 = FT-init)
    lr: float = 0.01  # initial SGD learning rate (cosine-annealed to 0 over the epochs)
    momentum: float = 0.9
    weight_decay: float = 0.0
    epochs: int = 10
    batch_size: int = 128
    reference_samples: Optional[int] = 1000  # images per epoch at least (reference: 2% of CIFAR-10)
    checkpoint: str = "last"  # last | best_val
    augment: bool = True


# -------------------------------------------------------------------------------------------------- the method


def feature_shift(weight: Tensor, original: Tensor) -> Tensor:
    """The paper's shift term ``<W, W_ori>_F = sum(W * W_ori)`` (minimised: W is pushed to ``-W_ori``)."""
    return (weight * original).sum()


def cosine_to(weight: Tensor, original: Tensor) -> float:
    """Cosine between two weight matrices (1 = the original head's direction, -1 = its opposite)."""
    return float(feature_shift(weight, original) / (weight.norm() * original.norm()).clamp_min(1e-12))


@torch.no_grad()
def reinit_head(linear: nn.Linear, gen: torch.Generator) -> None:
    """Re-initialise ``linear``'s weight and bias ~ U(-1/sqrt(d), 1/sqrt(d)), d = ``in_features``
    (drawn on the CPU generator ``gen``, then copied to the layer's device)."""
    bound = 1.0 / math.sqrt(linear.in_features)
    for param in (linear.weight, linear.bias):
        if param is not None:
            param.copy_(torch.empty(param.shape).uniform_(-bound, bound, generator=gen))


@torch.no_grad()
def project_norm(linear: nn.Linear, norm: float) -> None:
    """Rescale ``linear.weight`` (in place) to Frobenius norm ``norm``; the bias is left alone."""
    linear.weight.mul_(norm / linear.weight.norm().clamp_min(1e-12))


def add_shift_gradient(weight: Tensor, original: Tensor, alpha: float) -> RemovableHandle:
    """Add ``alpha * original`` (the gradient of ``alpha * <weight, original>_F``) to every gradient
    computed for ``weight``, so that a loop minimising CE minimises ``CE + alpha * <W, W_ori>_F``."""
    shift = (alpha * original).detach()
    return weight.register_hook(lambda grad: grad + shift)


def epoch_indices(n: int, epoch_images: int, gen: torch.Generator) -> Tensor:
    """``epoch_images`` indices into ``range(n)``: whole shuffled passes, the last one partial."""
    passes = -(-epoch_images // n)
    return torch.cat([torch.randperm(n, generator=gen) for _ in range(passes)])[:epoch_images]


def classifier_head(model: nn.Module, num_classes: int) -> Tuple[str, nn.Linear]:
    """The final ``nn.Linear`` of ``model``; :class:`DefenseError` if there is none or it does not
    output one logit per class."""
    try:
        name, linear = last_linear(model)
    except DefenseError:
        raise DefenseError(
            f"fst re-initialises the final nn.Linear classifier; {type(model).__name__} has none"
        ) from None
    if linear.out_features != num_classes:
        raise DefenseError(
            f"fst: the last nn.Linear {name!r} has {linear.out_features} outputs but the data has "
            f"{num_classes} classes; FST needs the classifier to be the model's last nn.Linear"
        )
    return name, linear


def images_per_epoch(n_train: int, p: FSTParams) -> int:
    """``max(n_train, reference_samples)``: the images one epoch draws from defense-train."""
    return max(n_train, p.reference_samples or 0)


def _train_epoch(
    model: nn.Module,
    linear: nn.Linear,
    data: DefenseData,
    p: FSTParams,
    opt: torch.optim.Optimizer,
    *,
    norm: float,
    gen: torch.Generator,
    augment: Optional[Augment],
    counter: PassCounter,
    after_step: Optional[Callable[[], None]] = None,
) -> Tuple[float, float]:
    """One FST epoch in train mode, projecting the head back to norm ``norm`` after every step (then
    ``after_step``, if given); returns (mean CE, running train accuracy). The shift term comes from the
    gradient hook."""
    idx = epoch_indices(len(data.train_y), images_per_epoch(len(data.train_y), p), gen)
    model.train()

    def after() -> None:
        project_norm(linear, norm)
        if after_step is not None:
            after_step()

    return run_epoch(
        model,
        data.train_x[idx],
        data.train_y[idx],
        opt,
        batch_size=p.batch_size,
        gen=gen,
        counter=counter,
        augment=augment,
        after_step=after,
    )


def _val_accuracy(model: nn.Module, data: DefenseData, counter: PassCounter) -> Optional[float]:
    """Defense-val accuracy, or None without defense-val images (the ``paper`` protocol's whole pool)."""
    return eval_accuracy(model, data.val_x, data.val_y, counter) if len(data.val_y) else None


def feature_shift_tune(
    model: nn.Module,
    linear: nn.Linear,
    data: DefenseData,
    p: FSTParams,
    *,
    seed: int,
    augment: Optional[Augment],
    counter: PassCounter,
    after_step: Optional[Callable[[], None]] = None,
) -> Dict[str, Any]:
    """Run FST on ``model`` in place (``linear`` is its head); returns the history and diagnostics.
    ``after_step`` runs after every step's head projection (the learned defense's FST finisher holds
    its pruned neurons pruned with it, :mod:`agents.finetune`)."""
    require_images("fst", len(data.train_y), p.batch_size)
    if p.checkpoint == "best_val" and not len(data.val_y):
        raise DefenseError(
            "fst: checkpoint=best_val chooses the epoch on defense-validation, but there are no "
            "defense-validation images (protocol=paper fits on the whole pool); use checkpoint=last"
        )
    gen = torch.Generator().manual_seed(seed)
    aug = (augment or default_augment(data.train_x)) if p.augment else None
    original = linear.weight.detach().clone()
    norm = float(original.norm())
    history: List[Dict[str, Any]] = [{"epoch": 0, "val_acc": _val_accuracy(model, data, counter)}]
    reinit_head(linear, gen)
    for q in model.parameters():
        q.requires_grad_(True)
    opt = torch.optim.SGD(model.parameters(), lr=p.lr, momentum=p.momentum, weight_decay=p.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=p.epochs)
    best: Optional[Tuple[int, float, Dict[str, Tensor]]] = None
    handle = add_shift_gradient(linear.weight, original, p.alpha)
    try:
        for epoch in range(1, p.epochs + 1):
            row: Dict[str, Any] = {"epoch": epoch, "lr": opt.param_groups[0]["lr"]}
            row["train_ce"], row["train_acc"] = _train_epoch(
                model, linear, data, p, opt, norm=norm, gen=gen, augment=aug, counter=counter, after_step=after_step
            )
            sched.step()
            row["val_acc"] = _val_accuracy(model, data, counter)
            row["cos_to_original"] = cosine_to(linear.weight.detach(), original)
            history.append(row)
            if p.checkpoint == "best_val" and (best is None or row["val_acc"] >= best[1]):  # FT's rule: ties -> later
                best = (epoch, row["val_acc"], copy.deepcopy(model.state_dict()))
    finally:
        handle.remove()
    if best is not None:
        model.load_state_dict(best[2])
    epoch_images = images_per_epoch(len(data.train_y), p)
    return {
        "history": history,
        "steps": p.epochs * -(-epoch_images // p.batch_size),
        "epoch_images": epoch_images,
        "head_norm": norm,
        "returned_epoch": best[0] if best is not None else p.epochs,
        "cos_to_original": cosine_to(linear.weight.detach(), original),
    }


@register_defense("fst")
class FeatureShiftTuning(Defense):
    """FST (Min et al., NeurIPS 2023): re-initialised head, feature-shift term, whole-model tuning."""

    needs_bn = False
    needs_data = True
    Params = FSTParams
    params: FSTParams

    def validate(self) -> None:
        """Refuse values outside the ranges the method is defined for."""
        p = self.params
        if p.alpha < 0:
            raise DefenseError(f"fst: alpha must be >= 0 (0.2 in the paper for CIFAR-10; 0 = FT-init), got {p.alpha}")
        if p.lr <= 0 or p.weight_decay < 0 or not 0.0 <= p.momentum < 1.0:
            raise DefenseError(
                f"fst: need lr > 0, weight_decay >= 0 and 0 <= momentum < 1 (defaults 0.01, 0, 0.9); "
                f"got lr={p.lr}, weight_decay={p.weight_decay}, momentum={p.momentum}"
            )
        if p.epochs < 1 or p.batch_size < 1:
            raise DefenseError(
                f"fst: epochs and batch_size must be >= 1 (defaults 10, 128); got {p.epochs}, {p.batch_size}"
            )
        if p.reference_samples is not None and p.reference_samples < 1:
            raise DefenseError(
                f"fst: reference_samples must be >= 1 or null (one pass per epoch), got {p.reference_samples}"
            )
        if p.checkpoint not in CHECKPOINTS:
            raise DefenseError(f"fst: unknown checkpoint {p.checkpoint!r}; valid: {', '.join(CHECKPOINTS)}")

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
        data = require_data(self.name, data)
        name, linear = classifier_head(model, data.num_classes)
        info = feature_shift_tune(model, linear, data, self.params, seed=seed, augment=augment, counter=counter)
        info.update(head=name, checkpoint=self.params.checkpoint)
        model.eval()
        return DefenseResult(model, info=info)
