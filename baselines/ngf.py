"""NGF: Natural Gradient Fine-tuning.

Karim, Arafat, Khalid, Guo, Rahnavard, "Efficient Backdoor Removal Through Natural Gradient
Fine-tuning", 2023 (arXiv 2306.17441). Reimplemented to match the regime of the authors' released
code, ``kr-anonymous/ngf-animus`` (``Purification_NGF.py``, ``natural_gradient_optimizer.py``,
``utils/ngf_utils.py``); no code was copied. Issue #13 lists the points below; docs/baselines.md
lists the deviations.

**Scope** (``scope``):

* ``"all"`` (default, the reference code): the optimiser holds every parameter and the loop runs in
  **train** mode. The final ``nn.Linear`` gets the natural-gradient step below; every other
  parameter gets plain SGD-momentum with the same lr, momentum and weight decay; BN running
  statistics are re-estimated on the clean batches.
* ``"last"`` (the paper's "one layer"): only the final ``nn.Linear`` is trained; every other
  parameter has ``requires_grad=False`` and the model stays in **eval** mode, so BN statistics and
  all other tensors are bit-identical after the defense.

**Preconditioner of the last layer** ``[W | b]`` (K-FAC with the EKFAC re-scaling):

* ``A = E[a a^T]`` over the layer inputs (with a bias column of ones) and ``G = E[g g^T]`` over the
  per-example output gradients **start at the identity** and move by a running average
  ``X <- stat_decay * X + (1 - stat_decay) * X_batch`` (decay 0.95) at every ``t_cov`` (10)-th step,
  step 0 included: at step 0 the factors are ``0.95 I + 0.05 X_batch``;
* every ``t_inv`` (100) steps: ``A = Q_a diag(l_a) Q_a^T``, ``G = Q_g diag(l_g) Q_g^T`` (eigenvalues
  <= 1e-10 set to 0), and the eigenbasis scale is reset to ``S = l_g l_a^T``;
* with ``ekfac=True`` (default), at every ``t_scal`` (10)-th step **after step 0**, ``S`` moves by
  the same running average towards the batch mean of the squared per-example gradients expressed
  in the eigenbasis, ``((Q_g^T g_i)(Q_a^T a_i)^T)^2``; at step 0 it is the K-FAC product;
* ``V = Q_g [(Q_g^T grad Q_a) / (S + damping)] Q_a^T`` with damping 1e-3;
* KL clipping over the preconditioned layer: ``nu = min(1, sqrt(kl_clip / (lr^2 <V, grad>)))``
  (kl_clip 1e-2); the layer's gradient is replaced by ``nu V``.

Then one SGD step (momentum 0.9, no dampening) on every trained parameter; weight decay 1e-4 is
switched on from step ``wd_start`` (200 = 20 t_cov, as the reference).

**Learning rate as the reference runs it.** The reference calls ``MultiStepLR.step()`` at the *start*
of each round of ``round_iters`` (100) iterations, with milestones ``[int(0.35 R), int(0.75 R)]`` for
``R`` rounds (``[1, 3]`` for 500 iterations), gamma 0.1, base lr 0.01. So the lr in use is 1e-3 for
iterations 0-199 and 1e-4 for 200-499 (never 1e-2). ``lr_step_at_round_start=False`` gives the
schedule the milestones suggest (1e-2 / 1e-3 / 1e-4 from iterations 0 / 100 / 300). See
:func:`scheduled_lr`.

**EWC regulariser** (not in the reference code; off by default): ``fisher_coef > 0`` adds
``(fisher_coef / 2) * sum_j F_j (theta_j - theta0_j)^2`` over the last layer, with ``F`` its diagonal
empirical Fisher at ``theta0`` on defense-train (the form of the authors' successor FIP, CCS 2024;
FIP uses 5). Its gradient is preconditioned with the rest.

Defaults: 500 iterations, batch 128 drawn with replacement from defense-train, crop/flip
augmentation. No pruning; ``scores`` is None.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from onp.models import find_last_linear

from .base import (
    Defense,
    DefenseError,
    DefenseParams,
    DefenseResult,
    default_augment,
    eval_accuracy,
    freeze,
    register_defense,
    require_data,
    require_images,
    sample_batch,
)

if TYPE_CHECKING:
    from onp.data.augment import Augment
    from onp.data.defense import DefenseData
    from onp.graph import NeuronLayout

    from .base import PassCounter, ReportFn

SCOPES = ("all", "last")


@dataclass
class NGFParams(DefenseParams):
    iterations: int = 500
    batch_size: int = 128
    scope: str = "all"  # all (reference code: every parameter, train mode) | last (paper: last layer, eval mode)
    lr: float = 0.01  # the scheduler's base lr (the lr in use starts at lr * lr_gamma, see scheduled_lr)
    round_iters: int = 100  # the reference's repeat_epochs: the scheduler steps once per round
    lr_milestones: Tuple[float, ...] = (0.35, 0.75)  # fractions of the number of rounds: [1, 3] for 5 rounds
    lr_gamma: float = 0.1
    lr_step_at_round_start: bool = True  # the reference steps its scheduler at the start of each round
    momentum: float = 0.9
    weight_decay: float = 1e-4
    wd_start: int = 200
    stat_decay: float = 0.95
    damping: float = 1e-3
    kl_clip: float = 1e-2
    t_cov: int = 10
    t_inv: int = 100
    t_scal: int = 10
    ekfac: bool = True
    fisher_coef: float = 0.0  # EWC regulariser on the last layer; not in the reference code (0 = off)
    augment: bool = True


# -------------------------------------------------------------------------------------------------- schedule


def lr_milestone_rounds(p: NGFParams) -> List[int]:
    """The reference's MultiStepLR milestones, in rounds: ``int(R * f)`` for each fraction ``f``."""
    n_rounds = math.ceil(p.iterations / p.round_iters)
    return sorted(int(n_rounds * f) for f in p.lr_milestones)


def scheduled_lr(p: NGFParams, iteration: int) -> float:
    """The learning rate in use at ``iteration`` (0-based).

    Round ``r = iteration // round_iters``. A MultiStepLR stepped at the start of every round (the
    reference) has counted ``r + 1`` steps during round ``r``; stepped at its end, ``r``. The lr is
    ``lr * lr_gamma ** (number of milestones <= that count)``.
    """
    r = iteration // p.round_iters
    count = r + 1 if p.lr_step_at_round_start else r
    return p.lr * p.lr_gamma ** sum(1 for m in lr_milestone_rounds(p) if m <= count)


def lr_schedule(p: NGFParams) -> List[Dict[str, Any]]:
    """The schedule as segments ``{"start", "end", "lr"}`` (``end`` exclusive), for the run's info."""
    segments: List[Dict[str, Any]] = []
    for it in range(0, p.iterations, p.round_iters):
        lr = float(f"{scheduled_lr(p, it):.10g}")
        end = min(it + p.round_iters, p.iterations)
        if segments and segments[-1]["lr"] == lr:
            segments[-1]["end"] = end
        else:
            segments.append({"start": it, "end": end, "lr": lr})
    return segments


# -------------------------------------------------------------------------------------------------- helpers


def last_linear(model: nn.Module) -> Tuple[str, nn.Linear]:
    """The last ``nn.Linear`` in module order (the classifier)."""
    found = find_last_linear(model)
    if found is None:
        raise DefenseError(f"ngf fine-tunes the final nn.Linear classifier; {type(model).__name__} has none")
    return found


def _with_ones(a: Tensor) -> Tensor:
    return torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype, device=a.device)], 1)


def _grad_of(t: Tensor) -> Tensor:
    """``t.grad``, which the backward pass just run has set."""
    if t.grad is None:
        raise RuntimeError("ngf: no gradient; call backward() first")
    return t.grad


def _layer_matrix(layer: nn.Linear, grad: bool = False) -> Tensor:
    """``[W | b]`` (or ``W`` without bias) of ``layer``, or of its gradient."""
    w = _grad_of(layer.weight) if grad else layer.weight
    if layer.bias is None:
        return w
    b = _grad_of(layer.bias) if grad else layer.bias
    return torch.cat([w, b.view(-1, 1)], 1)


@torch.no_grad()
def diagonal_fisher(
    model: nn.Module, layer: nn.Linear, x: Tensor, y: Tensor, counter: PassCounter, batch_size: int = 256
) -> Tensor:
    """Diagonal empirical Fisher of ``[W | b]``: mean over examples of the squared per-example gradient
    of the CE loss (for a linear layer the per-example gradient is ``g_i a_i^T``)."""
    feats: Dict[str, Tensor] = {}
    h = layer.register_forward_hook(lambda m, i, o: feats.__setitem__("a", i[0].detach()))
    fisher = torch.zeros(layer.out_features, layer.in_features + 1, device=layer.weight.device)
    try:
        for i in range(0, len(x), batch_size):
            logits = counter(model, x[i : i + batch_size])
            a = _with_ones(feats["a"].flatten(1))
            g = F.softmax(logits, 1) - F.one_hot(y[i : i + batch_size], logits.shape[1]).float()  # dCE/dlogits
            fisher += torch.einsum("bo,bi->oi", g.pow(2), a.pow(2))
    finally:
        h.remove()
    fisher = fisher / max(len(x), 1)
    return fisher if layer.bias is not None else fisher[:, :-1]


class KFACLinear:
    """K-FAC / EKFAC statistics and preconditioning for one ``nn.Linear`` (bias as an extra column).

    ``A`` and ``G`` are the identity until the first :meth:`update_stats`; ``n_cov_updates`` and
    ``n_scale_updates`` count the running-average updates of the factors and of the EKFAC scale.
    """

    def __init__(self, layer: nn.Linear, p: NGFParams):
        self.layer, self.p = layer, p
        self.has_bias = layer.bias is not None
        d_in = layer.in_features + (1 if self.has_bias else 0)
        self.A = torch.eye(d_in, device=layer.weight.device)
        self.G = torch.eye(layer.out_features, device=layer.weight.device)
        self.Qa: Optional[Tensor] = None
        self.Qg: Optional[Tensor] = None
        self.S: Optional[Tensor] = None
        self._a: Optional[Tensor] = None
        self._g: Optional[Tensor] = None
        self.step = 0
        self.n_cov_updates = 0
        self.n_scale_updates = 0

    def capture(self, a: Tensor, g: Tensor) -> None:
        """Layer input ``a`` (B, in) and output gradient of the *mean* loss ``g`` (B, out)."""
        a = a.detach()
        self._a = _with_ones(a) if self.has_bias else a
        self._g = g.detach() * len(g)  # per-example gradients

    def _basis(self) -> Tuple[Tensor, Tensor, Tensor]:
        """``(Qa, Qg, S)``: the eigenbases and the scale that :meth:`update_stats` set."""
        if self.Qa is None or self.Qg is None or self.S is None:
            raise RuntimeError("KFACLinear: no eigenbasis yet; call update_stats() first")
        return self.Qa, self.Qg, self.S

    def _running(self, old: Tensor, new: Tensor) -> Tensor:
        return old * self.p.stat_decay + new * (1 - self.p.stat_decay)

    def update_stats(self) -> None:
        """The statistics of one optimisation step (call after the backward pass, before
        :meth:`precondition`), in the reference's order: factors, eigenbasis, EKFAC scale."""
        p, a, g = self.p, self._a, self._g
        if a is None or g is None:
            raise RuntimeError("KFACLinear: update_stats() needs capture() first")
        if self.step % p.t_cov == 0:
            self.A = self._running(self.A, a.t() @ a / len(a))
            self.G = self._running(self.G, g.t() @ g / len(g))
            self.n_cov_updates += 1
        if self.step % p.t_inv == 0 or self.Qa is None:
            la, qa = torch.linalg.eigh(self.A.double())
            lg, qg = torch.linalg.eigh(self.G.double())
            la, lg = la * (la > 1e-10), lg * (lg > 1e-10)
            self.Qa, self.Qg = qa.float(), qg.float()
            self.S = (lg[:, None] * la[None, :]).float()
        if p.ekfac and self.step > 0 and self.step % p.t_scal == 0:
            # per-example gradients g_i a_i^T in the eigenbasis: (Qg^T g_i)(Qa^T a_i)^T, squared, batch mean
            qa, qg, s = self._basis()
            pe = torch.einsum("bo,bi->boi", g @ qg, a @ qa).pow(2).mean(0)
            self.S = self._running(s, pe)
            self.n_scale_updates += 1
        self.step += 1

    def precondition(self, grad: Tensor) -> Tensor:
        """``grad`` of ``[W | b]`` (out, in[+1]) -> natural-gradient direction."""
        qa, qg, s = self._basis()
        v = qg.t() @ grad @ qa
        v = v / (s + self.p.damping)
        return qg @ v @ qa.t()


class _HookedLastLayer:
    """The last Linear layer with its K-FAC statistics; hooks keep the layer's input (``a``) and the
    gradient of its output (``g``) of the last pass for :meth:`natural_gradient`."""

    def __init__(self, layer: nn.Linear, p: NGFParams):
        self.layer = layer
        self.kfac = KFACLinear(layer, p)
        self.store: Dict[str, Tensor] = {}
        self.handle = layer.register_forward_hook(self._forward_hook)

    def _forward_hook(self, mod: nn.Module, inp: Tuple[Tensor, ...], out: Tensor) -> None:
        store = self.store
        store["a"] = inp[0].detach().flatten(1)
        if out.requires_grad:
            out.register_hook(lambda g: store.__setitem__("g", g))

    def natural_gradient(self, lr: float) -> float:
        """After the backward pass: update the K-FAC statistics and replace the layer's gradient by
        its natural-gradient direction, scaled by ``nu`` so that the step's KL stays within
        ``kl_clip``; returns ``nu``."""
        layer, kfac = self.layer, self.kfac
        kfac.capture(self.store["a"], self.store["g"])
        kfac.update_stats()
        grad = _layer_matrix(layer, grad=True)
        direction = kfac.precondition(grad)
        vg = (direction * grad).sum().item() * lr**2
        nu = min(1.0, (kfac.p.kl_clip / vg) ** 0.5) if vg > 0 else 1.0
        with torch.no_grad():
            _grad_of(layer.weight).copy_(nu * direction[:, : layer.in_features])
            if layer.bias is not None:
                _grad_of(layer.bias).copy_(nu * direction[:, -1])
        return nu

    def remove(self) -> None:
        self.handle.remove()


@dataclass
class _NGFLoop:
    """What each NGF iteration uses: the params, the model and its hooked last layer, the
    optimiser, the data with its batch generator and augmentation, and the EWC anchor
    ``(theta0, fisher)`` when ``fisher_coef > 0``."""

    p: NGFParams
    model: nn.Module
    last: _HookedLastLayer
    opt: torch.optim.Optimizer
    data: DefenseData
    gen: torch.Generator
    aug: Optional[Augment]
    counter: PassCounter
    ewc: Optional[Tuple[Tensor, Tensor]]

    def step(self, it: int) -> Tuple[float, float, float]:
        """Iteration ``it``: the scheduled lr (weight decay from ``wd_start``), a sampled (augmented)
        batch, CE (+ the EWC penalty), the natural-gradient step; returns ``(lr, nu, ce)``."""
        p = self.p
        lr = scheduled_lr(p, it)
        for grp in self.opt.param_groups:
            grp["lr"] = lr
            grp["weight_decay"] = p.weight_decay if it >= p.wd_start else 0.0
        idx = sample_batch(len(self.data.train_y), p.batch_size, self.gen)
        xb, yb = self.data.train_x[idx], self.data.train_y[idx]
        if self.aug is not None:
            xb = self.aug(xb, self.gen)
        ce = F.cross_entropy(self.counter(self.model, xb), yb)
        loss = ce
        if self.ewc is not None:  # set when fisher_coef > 0
            theta0, fisher = self.ewc
            loss = ce + 0.5 * p.fisher_coef * (fisher * (_layer_matrix(self.last.layer) - theta0).pow(2)).sum()
        self.opt.zero_grad(set_to_none=True)
        self.counter.backward(loss)
        nu = self.last.natural_gradient(lr)
        self.opt.step()
        return lr, nu, ce.item()


@dataclass
class _Trace:
    """Per iteration: the learning rate, the KL-clip factor ``nu`` and the CE loss."""

    lrs: List[float] = field(default_factory=list)
    nus: List[float] = field(default_factory=list)
    losses: List[float] = field(default_factory=list)

    def add(self, lr: float, nu: float, ce: float) -> None:
        self.nus.append(nu)
        self.lrs.append(lr)
        self.losses.append(ce)


def _ewc_anchor(model: nn.Module, layer: nn.Linear, data: DefenseData, counter: PassCounter) -> Tuple[Tensor, Tensor]:
    """``(theta0, fisher)``: the last layer's ``[W | b]`` before fine-tuning and its diagonal Fisher."""
    theta0 = _layer_matrix(layer).detach().clone()
    fisher = diagonal_fisher(model, layer, data.train_x, data.train_y, counter)
    return theta0, fisher


def _ngf_info(p: NGFParams, name: str, kfac: KFACLinear, val_acc: Tuple[float, float], trace: _Trace) -> Dict[str, Any]:
    """The ``info`` of NGF's result (``val_acc``: defense-validation accuracy before and after)."""
    note = (
        "reference regime: every parameter trained in train mode (last layer preconditioned, the rest "
        "SGD-momentum, BN statistics re-estimated)"
        if p.scope == "all"
        else "only the last Linear layer is trained; eval mode throughout"
    )
    return {
        "layer": name,
        "scope": p.scope,
        "val_acc_before": val_acc[0],
        "val_acc_after": val_acc[1],
        "final_ce": trace.losses[-1],
        "mean_kl_nu": sum(trace.nus) / len(trace.nus),
        "fisher_coef": p.fisher_coef,
        "lr_schedule": lr_schedule(p),
        "kfac_cov_updates": kfac.n_cov_updates,
        "ekfac_scale_updates": kfac.n_scale_updates,
        "note": note,
        "_lr_per_iteration": torch.tensor(trace.lrs, dtype=torch.float64),
    }


# -------------------------------------------------------------------------------------------------- defense


@register_defense("ngf")
class NGF(Defense):
    needs_bn = False
    needs_data = True
    Params = NGFParams
    params: NGFParams

    def validate(self) -> None:
        p = self.params
        if p.iterations < 1 or p.round_iters < 1:
            raise DefenseError("ngf: iterations and round_iters must be >= 1")
        if p.scope not in SCOPES:
            raise DefenseError(f"ngf: unknown scope {p.scope!r}; valid: {', '.join(SCOPES)}")
        if any(not 0.0 <= f <= 1.0 for f in p.lr_milestones):
            raise DefenseError(
                f"ngf: lr_milestones are fractions of the rounds, each in [0, 1]; got {list(p.lr_milestones)}"
            )
        if min(p.t_cov, p.t_inv, p.t_scal) < 1 or not 0.0 <= p.stat_decay < 1.0:
            raise DefenseError("ngf: t_cov, t_inv, t_scal must be >= 1 and stat_decay in [0, 1)")
        if p.fisher_coef < 0 or p.damping < 0 or p.kl_clip <= 0:
            raise DefenseError("ngf: need fisher_coef >= 0, damping >= 0 and kl_clip > 0")

    def _prepare(self, model: nn.Module, layer: nn.Linear) -> List[nn.Parameter]:
        """Set trainable parameters and mode for the scope; returns the optimiser's parameters."""
        freeze(model)
        if self.params.scope == "all":
            for q in model.parameters():
                q.requires_grad_(True)
            model.train()
        else:
            for q in layer.parameters():
                q.requires_grad_(True)
            model.eval()  # BN statistics stay exactly as they were
        return [q for q in model.parameters() if q.requires_grad]

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
        require_images(self.name, len(data.train_y), p.batch_size)
        name, layer = last_linear(model)
        model.eval()
        val_before = eval_accuracy(model, data.val_x, data.val_y, counter)
        ewc = _ewc_anchor(model, layer, data, counter) if p.fisher_coef > 0 else None
        params = self._prepare(model, layer)
        opt = torch.optim.SGD(params, lr=scheduled_lr(p, 0), momentum=p.momentum, weight_decay=0.0)
        last = _HookedLastLayer(layer, p)
        gen = torch.Generator().manual_seed(seed)
        aug = (augment or default_augment(data.train_x)) if p.augment else None
        loop = _NGFLoop(p, model, last, opt, data, gen, aug, counter, ewc)
        trace = _Trace()
        try:
            for it in range(p.iterations):
                trace.add(*loop.step(it))
        finally:
            last.remove()
        freeze(model).eval()
        val_after = eval_accuracy(model, data.val_x, data.val_y, counter)
        return DefenseResult(model, info=_ngf_info(p, name, last.kfac, (val_before, val_after), trace))
