"""Supervised training of (possibly backdoored) classifiers, resumable after an interruption."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .data.augment import Augment
from .io import atomic_torch_save, load_checkpoint

if TYPE_CHECKING:
    from .attacks import Attack


@dataclass
class PoisonPlan:
    """Which training images get the trigger (and their new labels), and which get WaNet-style noise."""

    poisoned: torch.Tensor  # bool (N,)
    noise: torch.Tensor  # bool (N,)
    labels: torch.Tensor  # int64 (N,), poisoned labels already substituted

    @classmethod
    def clean(cls, labels: torch.Tensor) -> "PoisonPlan":
        z = torch.zeros(len(labels), dtype=torch.bool)
        return cls(z, z.clone(), labels.clone())

    @classmethod
    def for_attack(cls, attack: Attack, labels: torch.Tensor, rate: float, seed: int) -> "PoisonPlan":
        gen = torch.Generator().manual_seed(seed)
        poison_idx = attack.poison_indices(labels, rate, gen)
        noise_idx = attack.noise_indices(labels, poison_idx, gen)
        poisoned = torch.zeros(len(labels), dtype=torch.bool)
        poisoned[poison_idx] = True
        noise = torch.zeros(len(labels), dtype=torch.bool)
        noise[noise_idx] = True
        new_labels = labels.clone()
        new_labels[poison_idx] = attack.poisoned_labels(labels[poison_idx])
        return cls(poisoned, noise, new_labels)


@dataclass
class TrainRecipe:
    epochs: int = 5
    batch_size: int = 128
    lr: float = 0.1  # peak of the one-cycle schedule
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0


def _batch_images(
    images_u8: torch.Tensor,
    idx: torch.Tensor,
    plan: PoisonPlan,
    attack: Optional[Attack],
    augment: Augment,
    gen: torch.Generator,
) -> torch.Tensor:
    x = images_u8[idx].float().div_(255.0)
    if attack is not None:
        p = plan.poisoned[idx]
        if p.any():
            x[p] = attack.apply(x[p])
        n = plan.noise[idx]
        if n.any():
            x[n] = attack.apply_noise(x[n], gen)
    return augment(x, gen)


def train_classifier(
    model: nn.Module,
    images_u8: torch.Tensor,
    plan: PoisonPlan,
    *,
    attack: Optional[Attack] = None,
    augment: Augment,
    recipe: TrainRecipe,
    state_path: Optional[Path] = None,
    device: str = "cpu",
    progress: bool = True,
    on_epoch_end: Optional[Callable[[int, nn.Module], None]] = None,
) -> float:
    """Train ``model`` in place with SGD + one-cycle LR; returns wall seconds spent in this call.

    ``state_path`` is written after every epoch and on ``KeyboardInterrupt`` (model, optimizer,
    scheduler, epoch); a later call with the same path resumes from the last completed epoch.
    Each epoch's shuffle and augmentation use a generator seeded by ``(seed, epoch)``, so a resumed
    run repeats the same batches as an uninterrupted one.
    """
    model.to(device).to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # not in the stubs
    n = len(plan.labels)
    steps = (n + recipe.batch_size - 1) // recipe.batch_size
    opt, sched = _sgd_one_cycle(model, recipe, total=recipe.epochs * steps)
    run = _Checkpointed(model, opt, sched, state_path)
    start_epoch = run.resume(progress)
    data = _TrainingImages(images_u8, plan, attack, augment)
    t0 = time.time()
    try:
        for epoch in range(start_epoch, recipe.epochs):
            _train_epoch(run, data, recipe, epoch, steps=steps, device=device, progress=progress)
            run.save(epoch + 1)
            if on_epoch_end is not None:
                on_epoch_end(epoch, model)
    finally:
        model.eval()
    return time.time() - t0


def _sgd_one_cycle(
    model: nn.Module, recipe: TrainRecipe, *, total: int
) -> Tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """Nesterov SGD with the one-cycle schedule over ``total`` steps (a constant rate below 8 steps)."""
    opt = torch.optim.SGD(
        model.parameters(), lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay, nesterov=True
    )
    sched: torch.optim.lr_scheduler.LRScheduler
    if total >= 8:
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=total, pct_start=0.25)
    else:  # OneCycleLR needs a few steps per phase; tiny runs use a constant rate
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    return opt, sched


@dataclass
class _Checkpointed:
    """The model with its optimizer and LR schedule, saved to ``state_path`` (None: never saved)."""

    model: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    state_path: Optional[Path]

    def resume(self, progress: bool) -> int:
        """Load the saved state, if any; returns the epoch to continue from (0: a fresh start)."""
        if self.state_path is None or not Path(self.state_path).exists():
            return 0
        state = load_checkpoint(self.state_path)
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        start_epoch = int(state["epoch"])
        if progress:
            print(f"[onp] resuming training from epoch {start_epoch} ({self.state_path})")
        return start_epoch

    def save(self, epoch: int) -> None:
        """Write the state reached after ``epoch`` completed epochs."""
        if self.state_path is not None:
            atomic_torch_save(
                self.state_path,
                {
                    "model": self.model.state_dict(),
                    "optimizer": self.opt.state_dict(),
                    "scheduler": self.sched.state_dict(),
                    "epoch": epoch,
                },
            )


@dataclass
class _TrainingImages:
    """The training images (uint8) with their poisoning plan, the attack and the augmentation."""

    images_u8: torch.Tensor
    plan: PoisonPlan
    attack: Optional[Attack]
    augment: Augment


def _train_epoch(
    run: _Checkpointed,
    data: _TrainingImages,
    recipe: TrainRecipe,
    epoch: int,
    *,
    steps: int,
    device: str,
    progress: bool,
) -> None:
    """One epoch of ``steps`` batches, shuffled and augmented by a generator seeded by ``(seed, epoch)``.
    On ``KeyboardInterrupt`` the model, optimizer and schedule roll back to the start of the epoch
    and are saved, so that a resume repeats it exactly."""
    model, opt, sched = run.model, run.opt, run.sched
    model.train()
    gen = torch.Generator().manual_seed(recipe.seed * 100_003 + epoch)
    perm = torch.randperm(len(data.plan.labels), generator=gen)
    bar = tqdm(
        range(steps),
        desc=f"epoch {epoch + 1}/{recipe.epochs}",
        disable=not progress,
        leave=False,
        mininterval=2.0,
    )
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    opt_snapshot = opt.state_dict()
    sched_snapshot = sched.state_dict()
    try:
        for s in bar:
            idx = perm[s * recipe.batch_size : (s + 1) * recipe.batch_size]
            x = _batch_images(data.images_u8, idx, data.plan, data.attack, data.augment, gen)
            x = x.to(device).contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(model(x), data.plan.labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if s % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
    except KeyboardInterrupt:
        # roll back to the start of the epoch so that a resume repeats it exactly
        model.load_state_dict(snapshot)
        opt.load_state_dict(opt_snapshot)
        sched.load_state_dict(sched_snapshot)
        run.save(epoch)
        raise
