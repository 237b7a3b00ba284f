"""ANP: Adversarial Neuron Pruning.

Wu & Wang, "Adversarial Neuron Pruning Purifies Backdoored Deep Models", NeurIPS 2021
(arXiv 2110.14430). Reimplemented from the paper and the authors' code ``csdongxian/ANP_backdoor``
(``optimize_mask_cifar.py``: ``mask_train``, ``reset``, ``sign_grad``; ``models/anp_batchnorm.py``);
no code was copied (the repository has no licence).

Neurons are BN channels. Each has a mask ``m`` in [0, 1] (:class:`onp.masks.NeuronMasks`, gamma
mode) and multiplicative perturbations ``delta`` (on the scale) and ``xi`` (on the bias), started
uniformly in [-eps, eps] (eps 0.4). The perturbed BN output is

    (m + delta) * gamma * x_hat + (1 + xi) * beta

realised by :class:`NeuronPerturbation`: a capture hook placed *before* the mask hook records
``gamma * x_hat`` (= BN output - beta) and a hook placed *after* it adds
``delta * gamma * x_hat + xi * beta`` to the masked output. Each iteration (2000 by default, batch
128 drawn with replacement from defense-train, crop/flip augmentation):

1. random start ``delta, xi ~ U(-eps, eps)``; ``pgd_steps`` (1) signed ascent steps of size
   ``eps / pgd_steps`` on CE. ``perturbation="reference"`` (default) does **not** project back, as
   the reference code (an SGD step of lr ``eps / steps`` on the sign of the gradient of -CE, no
   clipping): ``|delta|, |xi|`` can exceed eps and reach at most 2 eps (mean about eps).
   ``perturbation="projected"`` clips back to [-eps, eps] after every step (the paper's constraint
   ``||delta||_inf <= eps``; a weaker adversary, mean ``|delta|`` about 0.75 eps);
2. mask step: ``alpha * CE(clean) + (1 - alpha) * CE(perturbed)`` (alpha 0.2) with the perturbation
   fixed, SGD on the masks only (lr 0.2, momentum 0.9), masks clamped to [0, 1].

The model is in **train mode** during optimisation (``train_mode=True``, as the paper's code: BN
uses batch statistics) on a private copy; pruning is applied to the untouched original model
(gamma_c = 0, beta kept), in ascending mask order, with the operating-point rule (default
``delta``; ``operating_point="threshold"`` prunes masks <= 0.2, the commonly used fixed point;
``"number"`` prunes ``n_prune``). Scores: ``1 - mask`` (higher = more suspicious).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from onp.graph import NeuronLayer, NeuronLayout

from .base import (
    Defense,
    DefenseError,
    DefenseResult,
    PruningParams,
    default_augment,
    freeze,
    model_device,
    register_defense,
    require_data,
    require_images,
    require_layout,
    sample_batch,
)
from .operating_point import finalize_pruning

if TYPE_CHECKING:
    from onp.data.augment import Augment
    from onp.data.defense import DefenseData

    from .base import PassCounter, ReportFn

PERTURBATIONS = ("reference", "projected")


@dataclass
class ANPParams(PruningParams):
    eps: float = 0.4
    pgd_steps: int = 1
    alpha: float = 0.2
    lr: float = 0.2
    momentum: float = 0.9
    iterations: int = 2000
    batch_size: int = 128
    rand_init: bool = True
    perturbation: str = "reference"  # reference (no projection, |delta| <= 2 eps) | projected (clip to eps)
    train_mode: bool = True
    augment: bool = True
    threshold: float = 0.2  # for operating_point=threshold


class NeuronPerturbation:
    """ANP's neuron (scale) and bias perturbations on BN outputs, composed with a gamma-mode
    :class:`onp.masks.NeuronMasks` that must already be attached to ``model``.

    ``delta`` and ``xi`` are ``(N,)`` tensors in graph numbering; ``enabled`` switches them on/off.
    """

    def __init__(self, model: nn.Module, layout: NeuronLayout, eps: float):
        self.eps = eps
        self.device = model_device(model)
        self.delta = torch.zeros(layout.num_neurons, device=self.device)
        self.xi = torch.zeros(layout.num_neurons, device=self.device)
        self.enabled = False
        self._raw: Dict[str, Tensor] = {}
        self._handles: List = []
        for layer in layout.layers:
            bn = model.get_submodule(layer.bn_name)
            self._handles.append(bn.register_forward_hook(self._capture(layer), prepend=True))
            self._handles.append(bn.register_forward_hook(self._perturb(layer)))

    def _capture(self, layer: NeuronLayer) -> Callable[[nn.Module, Any, Tensor], None]:
        def hook(module: nn.Module, inputs: Any, out: Tensor) -> None:
            if self.enabled:
                bias = cast(nn.BatchNorm2d, module).bias
                beta = bias.view(1, -1, 1, 1) if bias is not None else 0.0
                self._raw[layer.bn_name] = out - beta  # gamma * x_hat, before the mask

        return hook

    def _perturb(self, layer: NeuronLayer) -> Callable[[nn.Module, Any, Tensor], Optional[Tensor]]:
        def hook(module: nn.Module, inputs: Any, out: Tensor) -> Optional[Tensor]:
            if not self.enabled:
                return None
            raw = self._raw.pop(layer.bn_name)
            d = self.delta[layer.slice].view(1, -1, 1, 1)
            out = out + d * raw
            bias = cast(nn.BatchNorm2d, module).bias
            if bias is not None:
                out = out + self.xi[layer.slice].view(1, -1, 1, 1) * bias.view(1, -1, 1, 1)
            return out

        return hook

    def reset(self, rand_init: bool, gen: torch.Generator) -> None:
        n = len(self.delta)
        if rand_init:  # drawn on the CPU generator: the same start on every device
            self.delta = ((torch.rand(n, generator=gen) * 2 - 1) * self.eps).to(self.device)
            self.xi = ((torch.rand(n, generator=gen) * 2 - 1) * self.eps).to(self.device)
        else:
            self.delta, self.xi = torch.zeros(n, device=self.device), torch.zeros(n, device=self.device)

    def project(self) -> None:
        """Clip back into the L-inf ball of radius eps."""
        self.delta = self.delta.clamp(-self.eps, self.eps).detach()
        self.xi = self.xi.clamp(-self.eps, self.eps).detach()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def _adversarial_perturbation(
    pert: NeuronPerturbation,
    model: nn.Module,
    xb: Tensor,
    yb: Tensor,
    p: ANPParams,
    gen: torch.Generator,
    counter: PassCounter,
) -> None:
    """Step 1 of an ANP iteration: the adversarial neuron perturbation (random start, ``pgd_steps``
    signed ascent steps, projected onto the eps-ball with ``perturbation="projected"``); leaves
    ``pert`` enabled."""
    pert.reset(p.rand_init, gen)
    pert.enabled = True
    for _ in range(p.pgd_steps):
        pert.delta.requires_grad_(True)
        pert.xi.requires_grad_(True)
        loss_adv = F.cross_entropy(counter(model, xb), yb)
        g_d, g_x = counter.grad(loss_adv, [pert.delta, pert.xi])
        with torch.no_grad():
            pert.delta = pert.delta + (p.eps / p.pgd_steps) * g_d.sign()
            pert.xi = pert.xi + (p.eps / p.pgd_steps) * g_x.sign()
        if p.perturbation == "projected":
            pert.project()


def _mask_loss(
    pert: NeuronPerturbation, model: nn.Module, xb: Tensor, yb: Tensor, p: ANPParams, counter: PassCounter
) -> Tuple[Tensor, Tensor]:
    """Step 2's loss with the perturbation fixed: ``alpha * CE(clean) + (1 - alpha) * CE(perturbed)``
    (``CE(clean)`` alone for eps = 0); returns ``(loss, CE(clean))`` and leaves ``pert`` disabled."""
    pert.enabled = False
    loss_nat = F.cross_entropy(counter(model, xb), yb)
    if p.eps <= 0:
        return loss_nat, loss_nat
    pert.enabled = True
    loss_rob = F.cross_entropy(counter(model, xb), yb)
    pert.enabled = False
    return p.alpha * loss_nat + (1 - p.alpha) * loss_rob, loss_nat


def _train_masks(
    work: nn.Module,
    layout: NeuronLayout,
    data: DefenseData,
    p: ANPParams,
    *,
    gen: torch.Generator,
    aug: Optional[Augment],
    counter: PassCounter,
) -> Tuple[Tensor, Dict[str, Any]]:
    """ANP's ``p.iterations`` iterations on ``work`` (a frozen private copy, hooks removed afterwards):
    returns the masks and the diagnostics (``history``, ``max_abs_delta`` / ``max_abs_xi``, the last
    perturbation)."""
    from onp.masks import NeuronMasks

    mask = nn.Parameter(torch.ones(layout.num_neurons, device=model_device(work)))
    masks = NeuronMasks(work, layout.bn_names, mode="gamma")
    masks.set_mask(mask)
    pert = NeuronPerturbation(work, layout, p.eps)
    opt = torch.optim.SGD([mask], lr=p.lr, momentum=p.momentum)
    max_delta = max_xi = 0.0
    history: List[Dict[str, Any]] = []
    try:
        for it in range(p.iterations):
            idx = sample_batch(len(data.train_y), p.batch_size, gen)
            xb, yb = data.train_x[idx], data.train_y[idx]
            if aug is not None:
                xb = aug(xb, gen)
            if p.eps > 0:
                _adversarial_perturbation(pert, work, xb, yb, p, gen, counter)
                max_delta = max(max_delta, pert.delta.abs().max().item())
                max_xi = max(max_xi, pert.xi.abs().max().item())
            loss, loss_nat = _mask_loss(pert, work, xb, yb, p, counter)
            opt.zero_grad(set_to_none=True)
            counter.backward(loss)
            opt.step()
            with torch.no_grad():
                mask.clamp_(0.0, 1.0)
            if (it + 1) % max(1, p.iterations // 10) == 0 or it + 1 == p.iterations:
                history.append(
                    {
                        "iteration": it + 1,
                        "loss": loss.item(),
                        "loss_nat": loss_nat.item(),
                        "mask_mean": mask.mean().item(),
                    }
                )
    finally:
        pert.remove()
        masks.remove()
    run = {
        "history": history,
        "max_abs_delta": max_delta,
        "max_abs_xi": max_xi,
        "_last_delta": pert.delta.clone(),
        "_last_xi": pert.xi.clone(),
    }
    return mask.detach().clone(), run


@register_defense("anp")
class ANP(Defense):
    needs_bn = True
    needs_data = True
    prunes = True
    Params = ANPParams
    params: ANPParams

    def validate(self) -> None:
        p = self.params
        if p.eps < 0 or p.pgd_steps < 1 or p.iterations < 1:
            raise DefenseError("anp: eps must be >= 0, pgd_steps and iterations >= 1")
        if not 0.0 <= p.alpha <= 1.0:
            raise DefenseError(f"anp: alpha must be in [0, 1], got {p.alpha}")
        if p.perturbation not in PERTURBATIONS:
            raise DefenseError(f"anp: unknown perturbation {p.perturbation!r}; valid: {', '.join(PERTURBATIONS)}")

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
        data, layout = require_data(self.name, data), require_layout(self.name, layout)
        require_images(self.name, len(data.train_y), p.batch_size)
        gen = torch.Generator().manual_seed(seed)
        aug = (augment or default_augment(data.train_x)) if p.augment else None
        original = model
        work = freeze(copy.deepcopy(original))
        work.train(p.train_mode)
        m, run = _train_masks(work, layout, data, p, gen=gen, aug=aug, counter=counter)
        scores = 1.0 - m
        pruned_model, pruned, op = finalize_pruning(
            original, layout, scores, data, p, counter, threshold_values=m, threshold=p.threshold
        )
        return DefenseResult(
            pruned_model,
            scores=scores,
            pruned=pruned,
            info={
                "operating_point": op,
                "history": run["history"],
                "max_abs_delta": run["max_abs_delta"],
                "max_abs_xi": run["max_abs_xi"],
                "eps": p.eps,
                "perturbation": p.perturbation,
                "mask_min": float(m.min()),
                "mask_mean": float(m.mean()),
                "n_mask_le_threshold": int((m <= p.threshold).sum()),
                "train_mode": p.train_mode,
                "score": "1 - ANP mask",
                "_mask": m,
                "_last_delta": run["_last_delta"],
                "_last_xi": run["_last_xi"],
            },
        )
