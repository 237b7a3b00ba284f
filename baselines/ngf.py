"""NGF: Natural Gradient Fine-tuning of one layer.

Karim, Arafat, Khalid, Guo, Rahnavard, "Efficient Backdoor Removal Through Natural Gradient
Fine-tuning", 2023 (arXiv 2306.17441). Reimplemented from the paper's description; the regulariser
form follows the authors' successor FIP (CCS 2024) as summarised in the project's methods reference.

Only the final ``nn.Linear`` classifier is trained; every other parameter has ``requires_grad=False``
and the model stays in **eval** mode, so BN running statistics (and everything else outside the last
layer) are bit-identical after the defense. The gradient of the last layer ``[W | b]`` is
preconditioned by a K-FAC / EKFAC natural-gradient step:

* ``A = E[a a^T]`` over the layer inputs with a bias column of ones, ``G = E[g g^T]`` over the output
  gradients (scaled by the batch size), running averages with decay 0.95, refreshed every ``t_cov``
  steps;
* eigendecompositions ``A = Q_a diag(l_a) Q_a^T``, ``G = Q_g diag(l_g) Q_g^T`` every ``t_inv`` steps
  (eigenvalues < 1e-10 set to 0); scale ``S = l_g l_a^T`` or, with ``ekfac=True`` (default), the
  running mean of squared per-example gradients in the eigenbasis, refreshed every ``t_scal`` steps;
* ``V = Q_g [(Q_g^T grad Q_a) / (S + damping)] Q_a^T`` with damping 1e-3;
* KL clipping: ``nu = min(1, sqrt(kl_clip / (lr^2 * <V, grad>)))`` with kl_clip 1e-2; the gradient
  is replaced by ``nu * V`` and an SGD step (lr 0.01, momentum 0.9) follows. Weight decay 1e-4 is
  switched on after ``wd_start`` = 200 steps; the lr is multiplied by 0.1 at 20% and 60% of the
  iterations (the code's MultiStepLR over its 5 rounds of 100 iterations: milestones [1, 3]).

The loss adds an EWC-style Fisher regulariser toward the original last-layer weights:
``L = CE + (fisher_coef / 2) * sum_j F_j (theta_j - theta0_j)^2`` with ``F`` the diagonal empirical
Fisher of the last layer at ``theta0`` on defense-train (per-example squared gradients, clean images,
eval mode). **The exact coefficient is not given in the available sources**; ``fisher_coef=1.0`` is
our default (FIP's CDA regulariser uses 5).

Defaults: 500 iterations, batch 128 drawn with replacement from defense-train, crop/flip
augmentation. No pruning; ``scores`` is None. G statistics come from the CE gradient only (as with
the hooks of a K-FAC optimizer), the regulariser gradient is preconditioned with the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import (Defense, DefenseError, DefenseParams, DefenseResult, default_augment, eval_accuracy, freeze,
                   register_defense, require_images, sample_batch)


@dataclass
class NGFParams(DefenseParams):
    iterations: int = 500
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    wd_start: int = 200
    lr_milestones: Tuple[float, ...] = (0.2, 0.6)  # fractions of the iterations
    lr_gamma: float = 0.1
    stat_decay: float = 0.95
    damping: float = 1e-3
    kl_clip: float = 1e-2
    t_cov: int = 10
    t_inv: int = 100
    t_scal: int = 10
    ekfac: bool = True
    fisher_coef: float = 1.0
    augment: bool = True


def last_linear(model: nn.Module) -> Tuple[str, nn.Linear]:
    """The last ``nn.Linear`` in module order (the classifier)."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise DefenseError(f"ngf fine-tunes the final nn.Linear classifier; {type(model).__name__} has none")
    return found[-1]


def _with_ones(a: Tensor) -> Tensor:
    return torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], 1)


@torch.no_grad()
def diagonal_fisher(model, layer: nn.Linear, x: Tensor, y: Tensor, counter, batch_size: int = 256) -> Tensor:
    """Diagonal empirical Fisher of ``[W | b]``: mean over examples of the squared per-example gradient
    of the CE loss (for a linear layer the per-example gradient is ``g_i a_i^T``)."""
    feats = {}
    h = layer.register_forward_hook(lambda m, i, o: feats.__setitem__("a", i[0].detach()))
    fisher = torch.zeros(layer.out_features, layer.in_features + 1)
    try:
        for i in range(0, len(x), batch_size):
            logits = counter(model, x[i:i + batch_size])
            a = _with_ones(feats["a"].flatten(1))
            g = F.softmax(logits, 1) - F.one_hot(y[i:i + batch_size], logits.shape[1]).float()  # dCE/dlogits
            fisher += torch.einsum("bo,bi->oi", g.pow(2), a.pow(2))
    finally:
        h.remove()
    return fisher / max(len(x), 1)


class KFACLinear:
    """K-FAC / EKFAC statistics and preconditioning for one ``nn.Linear`` (bias as an extra column)."""

    def __init__(self, layer: nn.Linear, p: NGFParams):
        self.layer, self.p = layer, p
        self.A = self.G = None
        self.Qa = self.Qg = self.S = None
        self.scale_acc = None
        self._a = self._g = None
        self.step = 0

    def capture(self, a: Tensor, g: Tensor) -> None:
        """Layer input ``a`` (B, in) and output gradient of the *mean* loss ``g`` (B, out)."""
        self._a, self._g = _with_ones(a.detach()), g.detach() * len(g)

    def update_stats(self) -> None:
        p, a, g = self.p, self._a, self._g
        if self.step % p.t_cov == 0:
            A_new, G_new = a.t() @ a / len(a), g.t() @ g / len(g)
            if self.A is None:
                self.A, self.G = A_new, G_new
            else:
                self.A.mul_(p.stat_decay).add_(A_new, alpha=1 - p.stat_decay)
                self.G.mul_(p.stat_decay).add_(G_new, alpha=1 - p.stat_decay)
        if self.step % p.t_inv == 0 or self.Qa is None:
            la, self.Qa = torch.linalg.eigh(self.A.double())
            lg, self.Qg = torch.linalg.eigh(self.G.double())
            la, lg = la.clamp_min(0) * (la > 1e-10), lg.clamp_min(0) * (lg > 1e-10)
            self.Qa, self.Qg = self.Qa.float(), self.Qg.float()
            self.S = (lg[:, None] * la[None, :]).float()
            self.scale_acc = None
        if p.ekfac and self.step % p.t_scal == 0:
            # per-example gradients g_i a_i^T in the eigenbasis: (Qg^T g_i)(Qa^T a_i)^T
            pe = torch.einsum("bo,bi->boi", g @ self.Qg, a @ self.Qa).pow(2).mean(0)
            self.scale_acc = pe if self.scale_acc is None else \
                self.scale_acc.mul_(p.stat_decay).add_(pe, alpha=1 - p.stat_decay)
            self.S = self.scale_acc
        self.step += 1

    def precondition(self, grad: Tensor) -> Tensor:
        """``grad`` of ``[W | b]`` (out, in+1) -> natural-gradient direction."""
        v = self.Qg.t() @ grad @ self.Qa
        v = v / (self.S + self.p.damping)
        return self.Qg @ v @ self.Qa.t()


@register_defense("ngf")
class NGF(Defense):
    needs_bn = False
    needs_data = True
    Params = NGFParams

    def validate(self):
        if self.params.iterations < 1:
            raise DefenseError("ngf: iterations must be >= 1")

    def _fit(self, model, data, *, layout, seed, augment, report_fn, counter):
        p = self.params
        require_images(self.name, len(data.train_y), p.batch_size)
        name, layer = last_linear(model)
        freeze(model).eval()  # eval mode: BN statistics stay exactly as they were
        W0 = torch.cat([layer.weight.detach(), layer.bias.detach().view(-1, 1)], 1).clone() \
            if layer.bias is not None else layer.weight.detach().clone()
        fisher = diagonal_fisher(model, layer, data.train_x, data.train_y, counter)
        if layer.bias is None:
            fisher = fisher[:, :-1]
        layer.weight.requires_grad_(True)
        if layer.bias is not None:
            layer.bias.requires_grad_(True)
        params = [q for q in (layer.weight, layer.bias) if q is not None]
        opt = torch.optim.SGD(params, lr=p.lr, momentum=p.momentum, weight_decay=0.0)
        milestones = sorted({int(f * p.iterations) for f in p.lr_milestones})
        kfac = KFACLinear(layer, p)
        store = {}

        def fwd_hook(mod, inp, out):
            store["a"] = inp[0].detach().flatten(1)
            if out.requires_grad:
                out.register_hook(lambda g: store.__setitem__("g", g))

        handle = layer.register_forward_hook(fwd_hook)
        gen = torch.Generator().manual_seed(seed)
        aug = (augment or default_augment(data.train_x)) if p.augment else None
        val_before = eval_accuracy(model, data.val_x, data.val_y, counter)
        nus, losses = [], []
        try:
            for it in range(p.iterations):
                if it in milestones:
                    for grp in opt.param_groups:
                        grp["lr"] *= p.lr_gamma
                if it == p.wd_start:
                    for grp in opt.param_groups:
                        grp["weight_decay"] = p.weight_decay
                idx = sample_batch(len(data.train_y), p.batch_size, gen)
                xb, yb = data.train_x[idx], data.train_y[idx]
                if aug is not None:
                    xb = aug(xb, gen)
                logits = counter(model, xb)
                ce = F.cross_entropy(logits, yb)
                theta = torch.cat([layer.weight, layer.bias.view(-1, 1)], 1) if layer.bias is not None \
                    else layer.weight
                reg = 0.5 * p.fisher_coef * (fisher * (theta - W0).pow(2)).sum()
                loss = ce + reg
                opt.zero_grad(set_to_none=True)
                counter.backward(loss)
                kfac.capture(store["a"], store["g"])
                kfac.update_stats()
                grad = torch.cat([layer.weight.grad, layer.bias.grad.view(-1, 1)], 1) if layer.bias is not None \
                    else torch.cat([layer.weight.grad, torch.zeros(layer.out_features, 1)], 1)
                kfac_grad = kfac.precondition(grad)
                lr = opt.param_groups[0]["lr"]
                vg = (kfac_grad * grad).sum().item() * lr ** 2
                nu = min(1.0, (p.kl_clip / vg) ** 0.5) if vg > 0 else 1.0
                nus.append(nu)
                with torch.no_grad():
                    layer.weight.grad.copy_(nu * kfac_grad[:, :-1])
                    if layer.bias is not None:
                        layer.bias.grad.copy_(nu * kfac_grad[:, -1])
                opt.step()
                losses.append(ce.item())
        finally:
            handle.remove()
        freeze(model).eval()
        val_after = eval_accuracy(model, data.val_x, data.val_y, counter)
        return DefenseResult(model, info={"layer": name, "val_acc_before": val_before, "val_acc_after": val_after,
                                          "final_ce": losses[-1], "mean_kl_nu": sum(nus) / len(nus),
                                          "fisher_coef": p.fisher_coef,
                                          "note": "only the last Linear layer is trained; eval mode throughout"})
