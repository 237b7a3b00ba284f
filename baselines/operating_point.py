"""Choosing how many neurons to prune, from the defender's data only; and the oracle sweep.

Rules (``operating_point`` hyperparameter of the pruning defenses):

* ``"delta"`` (default): walk a grid of counts k (0, 1, 2, 4, 8, ... plus steps of ``grid_step``
  of all neurons, up to ``max_fraction``), prune the k most suspicious neurons (the method's order)
  and measure clean accuracy on **defense-validation**; choose the largest k whose accuracy drop
  from k = 0 is at most ``delta`` (absolute). Cost: one defense-val pass per grid point.
* ``"threshold"``: the paper's fixed rule on the method's mask (ANP 0.2, RNP 0.2): prune every
  neuron whose mask value is <= ``threshold``.
* ``"number"``: prune exactly ``n_prune`` neurons (the most suspicious first).

:func:`oracle_sweep` measures test ACC / ASR / RA against the number pruned. It uses the test set
and the real trigger, so it is **for analysis only** and never chooses anything.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from onp.data.defense import DefenseData
from onp.graph import NeuronLayout
from onp.masks import NeuronMasks, apply_pruning

from .base import OPERATING_POINT_RULES as RULES
from .base import DefenseError, PassCounter, PruningParams, eval_accuracy

if TYPE_CHECKING:
    from onp.attacks import Attack

ORACLE_LABEL = "oracle sweep, for analysis only (uses the test set and the real trigger)"


def prune_model(model: nn.Module, layout: NeuronLayout, indices: Sequence[int], mode: str = "gamma") -> nn.Module:
    """:func:`onp.masks.apply_pruning` in ``layout``'s numbering (a pruned deep copy, no hooks)."""
    return apply_pruning(model, layout.bn_names, indices, mode)


def pruning_grid(num_neurons: int, max_fraction: float = 0.5, grid_step: float = 0.01) -> List[int]:
    """Counts to try: 0, powers of two and multiples of ``grid_step * num_neurons``, up to ``max_fraction``."""
    top = int(max_fraction * num_neurons)
    counts = {0}
    p = 1
    while p <= top:
        counts.add(p)
        p *= 2
    step = max(1, int(round(grid_step * num_neurons)))
    counts.update(range(step, top + 1, step))
    return sorted(c for c in counts if c <= top)


def order_from_scores(scores: Tensor) -> Tensor:
    """Neuron ids, most suspicious (highest score) first; ties keep the lower id first."""
    return torch.sort(-scores.detach().double().cpu(), stable=True).indices


@dataclass
class OperatingPoint:
    rule: str
    pruned: List[int]
    info: Dict[str, Any]


@torch.no_grad()
def delta_rule(
    model: nn.Module,
    layout: NeuronLayout,
    order: Tensor,
    data: DefenseData,
    *,
    delta: float = 0.05,
    max_fraction: float = 0.5,
    grid_step: float = 0.01,
    mode: str = "gamma",
    counter: Optional[PassCounter] = None,
    grid: Optional[Sequence[int]] = None,
) -> OperatingPoint:
    """The largest pruning (in ``order``) whose defense-val clean-ACC drop is <= ``delta``.

    Reads ``data.val_x`` / ``data.val_y`` only.
    """
    if len(data.val_y) == 0:
        raise DefenseError(
            "the 'delta' operating-point rule needs defense-validation images (DefenseData.val_x); "
            "got none. Use operating_point=threshold or number, or a nonzero validation fraction"
        )
    n = len(order)
    counts = list(grid) if grid is not None else pruning_grid(n, max_fraction, grid_step)
    work = copy.deepcopy(model)
    masks = NeuronMasks(work, layout.bn_names, mode=mode)
    sweep: List[Dict[str, Any]] = []
    try:
        for k in counts:
            m = torch.ones(layout.num_neurons)
            m[order[:k]] = 0.0
            masks.set_mask(m)
            sweep.append({"n_pruned": int(k), "val_acc": eval_accuracy(work, data.val_x, data.val_y, counter)})
    finally:
        masks.remove()
    base = (
        sweep[0]["val_acc"]
        if sweep and sweep[0]["n_pruned"] == 0
        else eval_accuracy(model, data.val_x, data.val_y, counter)
    )
    ok = [s for s in sweep if base - s["val_acc"] <= delta + 1e-12]
    best: Dict[str, Any] = max(ok, key=lambda s: s["n_pruned"]) if ok else {"n_pruned": 0, "val_acc": base}
    k = best["n_pruned"]
    return OperatingPoint(
        "delta",
        [int(i) for i in order[:k]],
        {
            "rule": "delta",
            "delta": delta,
            "n_pruned": k,
            "val_acc_before": base,
            "val_acc_after": best["val_acc"],
            "max_fraction": max_fraction,
            "val_sweep": sweep,
            "note": "largest pruning whose clean-ACC drop on defense-validation is <= delta",
        },
    )


def choose_pruning(
    model: nn.Module,
    layout: NeuronLayout,
    scores: Tensor,
    data: Optional[DefenseData],
    *,
    rule: str,
    delta: float = 0.05,
    max_fraction: float = 0.5,
    grid_step: float = 0.01,
    threshold_values: Optional[Tensor] = None,
    threshold: Optional[float] = None,
    n_prune: Optional[int] = None,
    mode: str = "gamma",
    counter: Optional[PassCounter] = None,
    candidates: Optional[Tensor] = None,
) -> OperatingPoint:
    """Dispatch on ``rule`` (see the module docstring). ``threshold_values`` are the method's masks
    (pruned where <= ``threshold``); ``candidates`` (bool ``(N,)``) restricts pruning to some neurons."""
    order = order_from_scores(scores)
    if candidates is not None:
        order = order[candidates[order]]
    if rule == "delta":
        if data is None:
            raise DefenseError("the 'delta' operating-point rule needs defense data; use operating_point=number")
        return delta_rule(
            model,
            layout,
            order,
            data,
            delta=delta,
            max_fraction=max_fraction,
            grid_step=grid_step,
            mode=mode,
            counter=counter,
        )
    if rule == "threshold":
        if threshold_values is None or threshold is None:
            raise DefenseError("operating_point='threshold' is only available for mask-based methods (rnp, anp)")
        values = threshold_values.detach().cpu()
        chosen = [int(i) for i in order if values[i] <= threshold]
        return OperatingPoint(
            "threshold",
            chosen,
            {
                "rule": "threshold",
                "threshold": threshold,
                "n_pruned": len(chosen),
                "note": "prune every neuron whose mask <= threshold",
            },
        )
    if rule == "number":
        if n_prune is None or n_prune < 0:
            raise DefenseError("operating_point='number' needs n_prune >= 0 (e.g. --set n_prune=20)")
        k = min(int(n_prune), len(order))
        return OperatingPoint("number", [int(i) for i in order[:k]], {"rule": "number", "n_prune": k})
    raise DefenseError(f"unknown operating_point {rule!r}; valid choices: {', '.join(RULES)}")


@torch.no_grad()
def oracle_sweep(
    model: nn.Module,
    layout: NeuronLayout,
    scores: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    attack: Attack,
    *,
    counts: Optional[Sequence[int]] = None,
    max_fraction: float = 0.5,
    grid_step: float = 0.01,
    mode: str = "gamma",
) -> Dict[str, Any]:
    """Test ACC / ASR / RA of ``model`` with the top-k neurons (by ``scores``) pruned, for k on a grid.

    FOR ANALYSIS ONLY: uses the test set and the attack's real trigger; never used to choose anything.
    """
    from onp.metrics import evaluate_backdoor

    order = order_from_scores(scores)
    counts = list(counts) if counts is not None else pruning_grid(len(order), max_fraction, grid_step)
    work = copy.deepcopy(model)
    masks = NeuronMasks(work, layout.bn_names, mode=mode)
    rows = []
    try:
        for k in counts:
            m = torch.ones(layout.num_neurons)
            m[order[:k]] = 0.0
            masks.set_mask(m)
            rows.append({"n_pruned": int(k), **evaluate_backdoor(work, test_x, test_y, attack)})
    finally:
        masks.remove()
    return {"label": ORACLE_LABEL, "prune_mode": mode, "num_neurons": layout.num_neurons, "sweep": rows}


def finalize_pruning(
    model: nn.Module,
    layout: NeuronLayout,
    scores: Tensor,
    data: Optional[DefenseData],
    params: PruningParams,
    counter: Optional[PassCounter] = None,
    *,
    threshold_values: Optional[Tensor] = None,
    threshold: Optional[float] = None,
    mode: str = "gamma",
    candidates: Optional[Tensor] = None,
) -> Tuple[nn.Module, List[int], Dict[str, Any]]:
    """Apply the operating-point rule of ``params`` (a :class:`~baselines.base.PruningParams`) and prune
    ``model`` (not modified). Returns ``(pruned_model, pruned_ids, info)``."""
    op = choose_pruning(
        model,
        layout,
        scores,
        data,
        rule=params.operating_point,
        delta=params.delta,
        max_fraction=params.max_fraction,
        grid_step=params.grid_step,
        threshold_values=threshold_values,
        threshold=threshold,
        n_prune=params.n_prune,
        mode=mode,
        counter=counter,
        candidates=candidates,
    )
    op.info["prune_mode"] = mode
    return prune_model(model, layout, op.pruned, mode), op.pruned, op.info
