"""FP: Fine-Pruning.

Liu, Dolan-Gavitt, Garg, "Fine-Pruning: Defending Against Backdooring Attacks on Deep Neural
Networks", RAID 2018 (arXiv 1805.12185). Reimplemented from the paper; the unit definition follows
the paper's "last convolutional layer as the classifier sees it" (issue #13). BackdoorBench's
``defense/fp.py`` (``SCLBD/BackdoorBench``) uses the same units: it ranks the inputs of the model's
final child module (the classifier) by mean activation on clean data and masks the classifier's
weight columns. No code was copied (its licence does not allow it).

1. **Units** (``units="classifier"``, default): the feature channels that the final ``nn.Linear``
   receives, i.e. the last convolutional stage's post-activation output after global pooling. In a
   ResNet that is the channel of the *post-add, post-ReLU* map: a BN channel inside the last block
   is not a unit, because the identity skip still carries it past a zeroed gamma.
2. Rank the units by their mean activation on clean defense-train images (eval mode); dormant units
   (lowest mean) are pruned first: backdoor behaviour hides in units that clean inputs do not use.
3. Choose how many with the operating-point rule, on the units: ``delta`` (default) takes the
   largest count k on the grid (0, powers of two, every ``grid_step`` of the units, up to
   ``max_fraction`` = 90%) whose clean-ACC drop on defense-val is <= ``delta`` (ours defaults to
   5%); ``first_drop`` is the paper's own rule: mask the units one at a time and stop before the
   first count whose clean-ACC drop on *all* the defender's images (defense-train and defense-val:
   the paper has one clean set for ranking, stopping and fine-tuning) exceeds ``delta`` (the paper:
   4%; the ``paper`` protocol of :mod:`baselines.protocols`); ``number`` prunes ``n_prune`` units.
4. A unit is removed by masking it for the classifier: its input column of the final Linear is set
   to zero, so the logits no longer depend on it (with every unit removed the logits are the bias).
5. Fine-tune all weights on defense-train (SGD lr 0.01, momentum 0.9, wd 5e-4, 5 epochs, crop/flip),
   re-zeroing the removed columns after every step; the epoch with the best defense-val accuracy is
   returned.

The result's ``pruned`` is None, because the units are not neurons of the graph (BN channels); they
are listed in ``info["pruned_units"]`` and counted by ``n_pruned``. ``scores`` (for the graph's
warm-start features and the oracle sweep, which work on BN neurons) is the negated mean post-ReLU
output of every BN channel on defense-train, as before; FP's own unit ranking is
``info["unit_scores"]``.

``units="bn"`` keeps the pre-issue-#13 behaviour for ablations: rank and prune (gamma mode) the BN
channels of ``layer`` (``last`` BN, ``all`` BNs, or a BN module name). In a residual network this
is **not** Fine-Pruning (see 1.).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from onp.graph import NeuronLayout

from .base import (
    OPERATING_POINT_RULES,
    Defense,
    DefenseError,
    DefenseResult,
    PassCounter,
    PruningParams,
    model_device,
    register_defense,
    require_data,
    require_layout,
)
from .ft import FTParams, finetune
from .ngf import last_linear
from .operating_point import finalize_pruning, order_from_scores, pruning_grid

if TYPE_CHECKING:
    from onp.data.augment import Augment
    from onp.data.defense import DefenseData

    from .base import ReportFn

UNIT_KINDS = ("classifier", "bn")
#: FP's own operating-point rule besides the shared ones (units=classifier only)
FIRST_DROP = "first_drop"


@dataclass
class FPParams(PruningParams):
    max_fraction: float = 0.9  # of the candidate units
    units: str = "classifier"  # classifier (Fine-Pruning) | bn (pre-issue-#13 BN-channel pruning, ablation)
    layer: str = "last"  # units=bn only: last | all | a BN module name
    ft_epochs: int = 5
    ft_lr: float = 0.01
    ft_momentum: float = 0.9
    ft_weight_decay: float = 5e-4
    batch_size: int = 128
    augment: bool = True


@dataclass
class FPResult(DefenseResult):
    """A :class:`DefenseResult` whose pruned units are classifier inputs, not graph neurons."""

    pruned_units: List[int] = field(default_factory=list)

    @property
    def n_pruned(self) -> int:
        if self.pruned is not None:
            return len(self.pruned)
        return len(self.pruned_units)


# -------------------------------------------------------------------------------------------------- activations


@torch.no_grad()
def mean_activations(
    model: nn.Module, layout: NeuronLayout, x: Tensor, counter: PassCounter, batch_size: int = 512
) -> Tensor:
    """Mean post-ReLU BN output per neuron over ``x`` (eval mode)."""
    bn_means, _ = _activation_means(model, layout, None, x, counter, batch_size)
    return cast(Tensor, bn_means)  # computed: a layout is given


@torch.no_grad()
def classifier_inputs(
    model: nn.Module, linear: nn.Linear, x: Tensor, counter: PassCounter, batch_size: int = 512
) -> Tensor:
    """The inputs of ``linear`` (the classifier) for every image of ``x``, shape ``(N, in_features)``,
    in eval mode: the units as the classifier sees them."""
    feats: List[Tensor] = []
    handle = linear.register_forward_pre_hook(lambda m, inp: feats.append(inp[0].detach().flatten(1)))
    try:
        _eval_passes(model, x, counter, batch_size)
    finally:
        handle.remove()
    if not feats:
        raise DefenseError("fp: the final nn.Linear was never called in the forward pass")
    return torch.cat(feats)


@torch.no_grad()
def _activation_means(
    model: nn.Module,
    layout: Optional[NeuronLayout],
    linear: Optional[nn.Linear],
    x: Tensor,
    counter: PassCounter,
    batch_size: int = 512,
) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """One eval pass over ``x``: mean post-ReLU output per BN neuron (if ``layout``) and mean input per
    classifier unit (if ``linear``)."""
    handles: List[RemovableHandle] = []
    bn_sums: Optional[Tensor] = None
    unit_sums: Dict[str, Tensor] = {}
    if layout is not None:
        sums = bn_sums = torch.zeros(layout.num_neurons, device=model_device(model))
        mods = dict(model.named_modules())
        for layer in layout.layers:

            def hook(module: nn.Module, inp: Any, out: Tensor, sl: slice = layer.slice) -> None:
                sums[sl] += out.clamp_min(0).mean(dim=(2, 3)).sum(0)

            handles.append(mods[layer.bn_name].register_forward_hook(hook))
    if linear is not None:

        def unit_hook(module: nn.Module, inp: Tuple[Tensor, ...]) -> None:
            s = inp[0].detach().flatten(1).sum(0)
            unit_sums["sum"] = unit_sums["sum"] + s if "sum" in unit_sums else s

        handles.append(linear.register_forward_pre_hook(unit_hook))
    try:
        _eval_passes(model, x, counter, batch_size)
    finally:
        for h in handles:
            h.remove()
    n = max(len(x), 1)
    bn_means = bn_sums / n if bn_sums is not None else None
    unit_means = unit_sums["sum"] / n if "sum" in unit_sums else None
    return bn_means, unit_means


def _eval_passes(model: nn.Module, x: Tensor, counter: PassCounter, batch_size: int) -> None:
    was = model.training
    model.eval()
    try:
        for i in range(0, len(x), batch_size):
            counter(model, x[i : i + batch_size])
    finally:
        model.train(was)


# -------------------------------------------------------------------------------------------------- unit removal


@torch.no_grad()
def remove_units(linear: nn.Linear, units: List[int]) -> None:
    """Mask ``units`` for the classifier: zero their input columns of ``linear`` (in place)."""
    if units:
        linear.weight[:, torch.as_tensor(units, dtype=torch.long)] = 0.0


def _masked_accuracy(feats: Tensor, y: Tensor, linear: nn.Linear, order: Tensor, k: int) -> float:
    """Accuracy of the classifier on ``feats`` with the ``k`` first units of ``order`` masked."""
    keep = torch.ones(feats.shape[1], device=feats.device)
    keep[order[:k]] = 0.0
    return (F.linear(feats * keep, linear.weight, linear.bias).argmax(1) == y).float().mean().item()


@torch.no_grad()
def unit_delta_rule(
    feats: Tensor, y: Tensor, linear: nn.Linear, order: Tensor, *, delta: float, max_fraction: float, grid_step: float
) -> Dict[str, Any]:
    """The largest count k (grid over the units) whose defense-val ACC drop is <= ``delta`` when the k
    first units of ``order`` are masked for the classifier. ``feats`` are the classifier inputs of the
    defense-val images (masking a unit changes nothing before the classifier, so they are computed
    once)."""
    if len(y) == 0:
        raise DefenseError(
            "the 'delta' operating-point rule needs defense-validation images (DefenseData.val_x); "
            "got none. Use operating_point=number, or a nonzero validation fraction"
        )
    sweep = []
    for k in pruning_grid(len(order), max_fraction, grid_step):
        sweep.append({"n_pruned": int(k), "val_acc": _masked_accuracy(feats, y, linear, order, k)})
    base = sweep[0]["val_acc"]
    ok = [s for s in sweep if base - s["val_acc"] <= delta + 1e-12]
    best = max(ok, key=lambda s: s["n_pruned"])
    return {
        "rule": "delta",
        "delta": delta,
        "n_pruned": best["n_pruned"],
        "val_acc_before": base,
        "val_acc_after": best["val_acc"],
        "max_fraction": max_fraction,
        "val_sweep": sweep,
        "note": "largest number of classifier units masked whose clean-ACC drop on defense-validation is <= delta",
    }


@torch.no_grad()
def unit_first_drop_rule(
    feats: Tensor, y: Tensor, linear: nn.Linear, order: Tensor, *, delta: float, max_fraction: float
) -> Dict[str, Any]:
    """Fine-Pruning's own stopping rule: mask the units of ``order`` one at a time (up to
    ``max_fraction`` of them) and stop before the first count whose clean-ACC drop on ``(feats, y)``
    exceeds ``delta``. ``feats`` are the classifier inputs of all the defender's images."""
    if len(y) == 0:
        raise DefenseError("the 'first_drop' operating-point rule needs the defender's clean images; got none")
    base = _masked_accuracy(feats, y, linear, order, 0)
    sweep = [{"n_pruned": 0, "acc": base}]
    k = 0
    for count in range(1, int(max_fraction * len(order)) + 1):
        sweep.append({"n_pruned": count, "acc": _masked_accuracy(feats, y, linear, order, count)})
        if base - sweep[-1]["acc"] > delta + 1e-12:
            break
        k = count
    return {
        "rule": FIRST_DROP,
        "delta": delta,
        "n_pruned": k,
        "acc_before": base,
        "acc_after": sweep[k]["acc"],
        "images": len(y),
        "max_fraction": max_fraction,
        "sweep": sweep,
        "note": "units masked one at a time; stopped before the first count whose clean-ACC drop on the "
        "defender's images (defense-train and defense-val) exceeds delta (Fine-Pruning's rule)",
    }


# -------------------------------------------------------------------------------------------------- defense


@register_defense("fp")
class FinePruning(Defense):
    needs_bn = True
    needs_data = True
    prunes = True
    Params = FPParams
    params: FPParams

    def validate(self) -> None:
        p = self.params
        if p.units not in UNIT_KINDS:
            raise DefenseError(f"fp: unknown units {p.units!r}; valid: {', '.join(UNIT_KINDS)}")
        if p.units == "classifier" and p.layer != "last":
            raise DefenseError(
                "fp: 'layer' selects BN channels and applies to units=bn only; Fine-Pruning's "
                "units (units=classifier) are always the classifier's inputs"
            )
        if p.ft_epochs < 0:
            raise DefenseError(f"fp: ft_epochs must be >= 0, got {p.ft_epochs}")
        if p.operating_point == FIRST_DROP and p.units != "classifier":
            raise DefenseError("fp: operating_point='first_drop' applies to units=classifier only")

    def _validate_operating_point(self, p: PruningParams) -> None:
        """The shared rules plus ``first_drop`` (checked like ``delta``: ranges of delta and max_fraction)."""
        if p.operating_point == FIRST_DROP:
            p = dataclasses.replace(p, operating_point="delta")
        elif p.operating_point not in OPERATING_POINT_RULES:
            raise DefenseError(
                f"unknown operating_point {p.operating_point!r} for 'fp'; valid choices: delta, number, {FIRST_DROP}"
            )
        super()._validate_operating_point(p)

    def _finetune_params(self) -> FTParams:
        p = self.params
        return FTParams(
            lr=p.ft_lr,
            momentum=p.ft_momentum,
            weight_decay=p.ft_weight_decay,
            epochs=p.ft_epochs,
            batch_size=p.batch_size,
            augment=p.augment,
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
        data = require_data(self.name, data)
        if self.params.units == "bn":
            return self._fit_bn(
                model, data, layout=require_layout(self.name, layout), seed=seed, augment=augment, counter=counter
            )
        return self._fit_classifier(model, data, layout=layout, seed=seed, augment=augment, counter=counter)

    def _fit_classifier(
        self,
        model: nn.Module,
        data: DefenseData,
        *,
        layout: Optional[NeuronLayout],
        seed: int,
        augment: Optional[Augment],
        counter: PassCounter,
    ) -> FPResult:
        p = self.params
        name, linear = last_linear(model)
        bn_act, unit_act = _activation_means(model, layout, linear, data.train_x, counter)
        if unit_act is None:
            raise DefenseError(f"fp: the classifier {name!r} was never called in the forward pass")
        order = order_from_scores(-unit_act)  # most dormant first; ties: lower index first
        op = self._choose_units(model, linear, data, order, counter)
        units = [int(u) for u in order[: op["n_pruned"]]]
        op.update(unit_removal="classifier input column zeroed", classifier=name)
        remove_units(linear, units)
        ft_info: Dict[str, Any] = {}
        if p.ft_epochs > 0:
            model, ft_info = finetune(
                model,
                data,
                self._finetune_params(),
                seed=seed,
                augment=augment,
                counter=counter,
                name="fp",
                after_step=lambda: remove_units(linear, units),
            )
        remove_units(linear, units)
        return FPResult(
            model,
            scores=-bn_act if bn_act is not None else None,
            pruned=None,
            pruned_units=units,
            info={
                "operating_point": op,
                "finetune": ft_info,
                "units": "classifier",
                "classifier": name,
                "num_units": len(order),
                "pruned_units": units,
                "n_pruned_units": len(units),
                "unit_scores": (-unit_act).tolist(),
                "score": "-mean post-ReLU activation of every BN neuron (graph features / oracle "
                "sweep); FP prunes classifier units by info['unit_scores']",
                "_unit_activation": unit_act,
            },
        )

    def _choose_units(
        self, model: nn.Module, linear: nn.Linear, data: DefenseData, order: Tensor, counter: PassCounter
    ) -> Dict[str, Any]:
        """The operating point on the units (``info["operating_point"]``; ``n_pruned`` is the count)."""
        p = self.params
        if p.operating_point == "delta":  # no defense-val images: unit_delta_rule refuses them, saying why
            empty = data.val_x.new_zeros(0, linear.in_features)
            feats = classifier_inputs(model, linear, data.val_x, counter) if len(data.val_y) else empty
            return unit_delta_rule(
                feats, data.val_y, linear, order, delta=p.delta, max_fraction=p.max_fraction, grid_step=p.grid_step
            )
        if p.operating_point == FIRST_DROP:
            feats = classifier_inputs(model, linear, data.all_x, counter)
            return unit_first_drop_rule(feats, data.all_y, linear, order, delta=p.delta, max_fraction=p.max_fraction)
        # number (threshold is rejected by the base class: FP has no mask)
        if p.n_prune is None:
            raise DefenseError("operating_point='number' needs n_prune >= 0 (e.g. --set n_prune=20)")
        k = min(int(p.n_prune), len(order))
        return {"rule": "number", "n_prune": k, "n_pruned": k}

    def _fit_bn(
        self,
        model: nn.Module,
        data: DefenseData,
        *,
        layout: NeuronLayout,
        seed: int,
        augment: Optional[Augment],
        counter: PassCounter,
    ) -> DefenseResult:
        from onp.masks import NeuronMasks

        p = self.params
        act = mean_activations(model, layout, data.train_x, counter)
        scores = -act
        candidates = torch.zeros(layout.num_neurons, dtype=torch.bool)
        if p.layer == "last":
            candidates[layout.layers[-1].slice] = True
        elif p.layer == "all":
            candidates[:] = True
        else:
            names = layout.bn_names
            if p.layer not in names:
                raise DefenseError(
                    f"fp: layer {p.layer!r} is not a BatchNorm2d of the model; valid: last, all, {', '.join(names)}"
                )
            candidates[layout.layers[names.index(p.layer)].slice] = True
        pruned_model, pruned, op = finalize_pruning(model, layout, scores, data, p, counter, candidates=candidates)
        masks = NeuronMasks(pruned_model, layout.bn_names, mode="gamma")  # keep the pruned neurons pruned
        masks.prune(pruned)
        try:
            if p.ft_epochs > 0:
                pruned_model, ft_info = finetune(
                    pruned_model, data, self._finetune_params(), seed=seed, augment=augment, counter=counter, name="fp"
                )
            else:
                ft_info = {}
            state = masks.export_state_dict()
        finally:
            masks.remove()
        pruned_model.load_state_dict(state)
        return DefenseResult(
            pruned_model,
            scores=scores,
            pruned=pruned,
            info={
                "operating_point": op,
                "finetune": ft_info,
                "units": "bn",
                "candidate_layer": p.layer,
                "score": "-mean post-ReLU activation",
            },
        )
