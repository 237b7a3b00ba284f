"""AWM: Adversarial Weight Masking.

Chai & Chen, "One-shot Neural Backdoor Erasing via Adversarial Weight Masking", NeurIPS 2022
(arXiv 2207.04497). Reimplemented from the paper's Algorithm 1 and the authors' code
``jinghuichen/AWM`` (``main.py``: ``mask_train``, the loop sizes; ``models/maskedconv.py``); no
code was copied (the repository has no licence).

Every Conv2d weight ``W`` gets an element-wise soft mask ``m`` of the same shape (init 1), applied
with :func:`torch.nn.utils.parametrize.register_parametrization` (``W -> W * m``; no model copies per
step). BN layers and the classifier are not masked; every other parameter is frozen and the model
stays in **eval** mode (BN statistics frozen). For each of ``outer_epochs`` (20) epochs:

1. *Trigger recovery (inner max).* A universal additive trigger ``Delta`` (one image, init 0) is
   optimised by SGD (lr 10) to *maximise* CE against the model's **own** predictions on the clean
   batch, for ``inner_iters`` batches (no clamping inside); then it is scaled into the L1 ball:
   ``Delta *= min(1, trigger_norm / ||Delta||_1)``.
2. *Mask learning (outer min).* For as many batches:
   ``alpha * CE(f(x), y) + (1 - alpha) * CE(f(clamp(x + Delta, 0, 1)), y) + gamma * ||m||_1``
   with alpha 0.9, gamma 1e-8, Adam (lr 1e-2) on the masks, masks clamped to [0, 1] after each step.

**Steps per phase.** The reference (``jinghuichen/AWM``, ``main.py``) sets
``inner_iters = int(samples / batch_size) * inner`` from its default ``--samples 500`` and
``inner = 5`` and draws each batch of ``batch_size`` *with replacement*, so it runs
``int(500 / 128) * 5 = 15`` trigger steps and 15 mask steps per outer epoch (300 mask updates in
all). We keep that count **fixed**, whatever the size of the defense set:
``inner_iters = max(1, reference_samples // batch_size) * inner`` with ``reference_samples = 500``
(``reference_samples=None`` derives it from the defense-train size N instead, the pre-issue-#13
behaviour: 5 steps for N = 250). ``inner_iters`` overrides both. Batches are drawn with
replacement, as in the reference. Deviation: at least one step per phase (the reference's ``int``
gives 0 steps, i.e. no defense at all, when its data set is smaller than a batch, as in its own
one-shot mode at batch 128); the one-shot mode below uses the same fixed count.

``trigger_norm`` defaults to 1000 for a 3x32x32 image (the code's default) and is scaled by the
number of input elements for other shapes (``1000 * C*H*W / 3072``; 255.2 for 1x28x28). The code's
README uses 100 for one-shot data.

One-shot mode (``one_shot=True``): one defense-train image per class plus ``n_aug`` (9) augmented
copies each (random resized crop, plus a horizontal flip where the dataset allows it). If the batch
is larger than that set, it is reduced to the size of the set.

The result is the soft-masked network (masks written into the conv weights, no hard pruning;
``pruned`` is None). Neuron scores for the graph: ``1 - mean(m[c])`` over the mask of output channel
``c`` of the conv that feeds each BN neuron (higher = more of the filter masked away); BNs with no
directly preceding conv (pre-activation nets) get 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .base import (
    Defense,
    DefenseError,
    DefenseParams,
    DefenseResult,
    eval_accuracy,
    freeze,
    neuron_layout,
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

REFERENCE_TRIGGER_NORM = 1000.0  # for 3x32x32 inputs
REFERENCE_NUMEL = 3 * 32 * 32


@dataclass
class AWMParams(DefenseParams):
    outer_epochs: int = 20
    inner: int = 5
    reference_samples: Optional[int] = 500  # steps per phase = max(1, reference_samples // batch) * inner;
    #                                         None: from the defense-train size N (pre-issue-#13)
    inner_iters: Optional[int] = None  # overrides the steps per phase
    batch_size: int = 128
    trigger_lr: float = 10.0
    trigger_norm: Optional[float] = None  # None: 1000 scaled by image size
    mask_lr: float = 1e-2
    alpha: float = 0.9
    gamma: float = 1e-8
    one_shot: bool = False
    n_aug: int = 9
    hflip: Optional[bool] = None  # one-shot augmentation flips; None: from the caller's augment


class ElementMask(nn.Module):
    """Parametrization ``W -> W * mask`` (the mask is a learnable parameter of the same shape)."""

    def __init__(self, shape: Sequence[int], device: Optional[torch.device] = None) -> None:
        super().__init__()
        self.mask = nn.Parameter(torch.ones(shape, device=device))

    def forward(self, w: Tensor) -> Tensor:
        return w * self.mask


def random_resized_crop(
    x: Tensor,
    gen: torch.Generator,
    scale: Tuple[float, float] = (0.08, 1.0),
    ratio: Tuple[float, float] = (3 / 4, 4 / 3),
) -> Tensor:
    """torchvision-style RandomResizedCrop of each image back to its own size (bilinear)."""
    n, _, h, w = x.shape
    out = torch.empty_like(x)
    for i in range(n):
        for _ in range(10):
            area = h * w * (scale[0] + (scale[1] - scale[0]) * torch.rand(1, generator=gen).item())
            logr = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * torch.rand(1, generator=gen).item()
            cw, ch = int(round(math.sqrt(area * math.exp(logr)))), int(round(math.sqrt(area / math.exp(logr))))
            if 0 < cw <= w and 0 < ch <= h:
                break
        else:
            ch, cw = h, w
        top = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
        left = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
        crop = x[i : i + 1, :, top : top + ch, left : left + cw]
        out[i] = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)[0]
    return out.clamp_(0, 1)


def one_shot_set(
    x: Tensor, y: Tensor, num_classes: int, n_aug: int, hflip: bool, gen: torch.Generator
) -> Tuple[Tensor, Tensor]:
    """One image per class (seeded choice) plus ``n_aug`` augmented copies of each."""
    xs: List[Tensor] = []
    ys: List[Tensor] = []
    for c in range(num_classes):
        idx = torch.nonzero(y == c).flatten()
        if len(idx) == 0:
            continue
        pick = idx[torch.randint(0, len(idx), (1,), generator=gen)]
        img = x[pick]
        copies = random_resized_crop(img.repeat(n_aug, 1, 1, 1), gen) if n_aug > 0 else img[:0]
        if hflip and n_aug > 0:
            flip = (torch.rand(n_aug, generator=gen) < 0.5).to(copies.device)
            copies[flip] = copies[flip].flip(-1)
        xs += [img, copies]
        ys += [y[pick], y[pick].repeat(n_aug)]
    if not xs:
        raise DefenseError("awm one-shot mode found no defense-train image")
    return torch.cat(xs), torch.cat(ys)


def steps_per_phase(p: "AWMParams", n_images: int, batch_size: int) -> int:
    """Trigger steps (and mask steps) per outer epoch: ``inner_iters`` if set, else
    ``max(1, reference_samples // p.batch_size) * inner`` (the reference's fixed count), else
    ``max(1, n_images // batch_size) * inner`` with the batch size in use (``batch_size``)."""
    if p.inner_iters is not None:
        return int(p.inner_iters)
    if p.reference_samples is not None:
        return max(1, p.reference_samples // p.batch_size) * p.inner
    return max(1, n_images // batch_size) * p.inner


def _batches_with_replacement(n: int, batch_size: int, gen: torch.Generator) -> Iterator[Tensor]:
    while True:
        yield sample_batch(n, batch_size, gen)


def _trigger_phase(
    model: nn.Module,
    x: Tensor,
    batches: Iterator[Tensor],
    mask_params: List[nn.Parameter],
    *,
    steps: int,
    lr: float,
    tau: float,
    counter: PassCounter,
) -> Tensor:
    """Phase 1 of an outer epoch: a universal trigger against the model's own predictions (masks
    fixed), scaled back to L1 norm ``tau``; returns it detached."""
    for q in mask_params:
        q.requires_grad_(False)
    delta = torch.zeros(1, *x.shape[1:], device=x.device, requires_grad=True)
    t_opt = torch.optim.SGD([delta], lr=lr)
    for _ in range(steps):
        xb = x[next(batches)]
        with torch.no_grad():
            y_hat = counter(model, xb).argmax(1)
        loss = -F.cross_entropy(counter(model, xb + delta), y_hat)
        t_opt.zero_grad(set_to_none=True)
        counter.backward(loss)
        t_opt.step()
    with torch.no_grad():
        l1 = delta.abs().sum()
        delta.mul_(min(1.0, tau / l1.item()) if l1 > 0 else 1.0)
    return delta.detach()


def _mask_phase(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    batches: Iterator[Tensor],
    delta: Tensor,
    mask_params: List[nn.Parameter],
    opt: torch.optim.Optimizer,
    *,
    steps: int,
    alpha: float,
    gamma: float,
    counter: PassCounter,
) -> Tensor:
    """Phase 2 of an outer epoch: ``steps`` (>= 1) steps of the soft weight masks on clean and
    triggered images; returns the last step's loss."""
    for q in mask_params:
        q.requires_grad_(True)
    for _ in range(steps):
        idx = next(batches)
        xb, yb = x[idx], y[idx]
        x_adv = (xb + delta).clamp(0, 1)
        logits = counter(model, torch.cat([xb, x_adv]))  # eval mode: same as two passes
        loss = (
            alpha * F.cross_entropy(logits[: len(yb)], yb)
            + (1 - alpha) * F.cross_entropy(logits[len(yb) :], yb)
            + gamma * sum(q.abs().sum() for q in mask_params)
        )
        opt.zero_grad(set_to_none=True)
        counter.backward(loss)
        opt.step()
        with torch.no_grad():
            for q in mask_params:
                q.clamp_(0, 1)
    return loss


def _channel_scores(
    model: nn.Module, layout: Optional[NeuronLayout], final_masks: Dict[str, Tensor]
) -> Optional[Tensor]:
    """Per neuron: 1 - the mean element mask of its feeding conv's output channel (None for a model
    without BatchNorm2d)."""
    lay: Optional[NeuronLayout]
    try:
        lay = layout if layout is not None else neuron_layout(model)
    except DefenseError:
        lay = None
    if lay is None:
        return None
    scores = torch.zeros(lay.num_neurons)
    for layer in lay.layers:
        if layer.conv_name in final_masks:
            m = final_masks[layer.conv_name]
            scores[layer.slice] = (1.0 - m.flatten(1).mean(1)).cpu()
    return scores


@dataclass
class _MaskedConvs:
    """The model with a soft element mask parametrizing the weight of each of its convolutions, and
    the masks' optimiser."""

    convs: List[Tuple[str, nn.Conv2d]]
    masks: Dict[str, nn.Parameter]
    mask_params: List[nn.Parameter]
    opt: torch.optim.Optimizer

    @classmethod
    def attach(cls, model: nn.Module, lr: float) -> _MaskedConvs:
        """Freeze ``model`` (eval mode) and mask every ``nn.Conv2d`` weight (masks start at one)."""
        convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
        if not convs:
            raise DefenseError(f"awm masks convolution weights; {type(model).__name__} has no nn.Conv2d")
        freeze(model).eval()
        masks: Dict[str, nn.Parameter] = {}
        for name, conv in convs:
            element_mask = ElementMask(conv.weight.shape, conv.weight.device)
            parametrize.register_parametrization(conv, "weight", element_mask)
            masks[name] = element_mask.mask  # the same module as conv.parametrizations.weight[0]
        mask_params = list(masks.values())
        return cls(convs, masks, mask_params, torch.optim.Adam(mask_params, lr=lr))

    def remove(self) -> Dict[str, Tensor]:
        """Bake the masks into the conv weights and remove the parametrizations; returns the final masks."""
        final_masks = {n: m.detach().clone() for n, m in self.masks.items()}
        for _name, conv in self.convs:
            parametrize.remove_parametrizations(conv, "weight", leave_parametrized=True)
        return final_masks


@dataclass
class _AWMTrace:
    """The alternating optimisation's record: the last trigger, its L1 norm and the loss per outer epoch."""

    delta: Tensor
    trigger_l1: List[float] = field(default_factory=list)
    history: List[Dict[str, Any]] = field(default_factory=list)
    n_trigger_steps: int = 0
    n_mask_steps: int = 0


@register_defense("awm")
class AWM(Defense):
    needs_bn = False  # masks conv weights; BN only used for neuron scores if present
    needs_data = True
    Params = AWMParams
    params: AWMParams

    def validate(self) -> None:
        p = self.params
        if p.outer_epochs < 1 or p.inner < 1:
            raise DefenseError("awm: outer_epochs and inner must be >= 1")
        if p.reference_samples is not None and p.reference_samples < 1:
            raise DefenseError(f"awm: reference_samples must be >= 1 or None, got {p.reference_samples}")
        if p.inner_iters is not None and p.inner_iters < 1:
            raise DefenseError(f"awm: inner_iters must be >= 1 or None, got {p.inner_iters}")
        if not 0.0 <= p.alpha <= 1.0:
            raise DefenseError(f"awm: alpha must be in [0, 1], got {p.alpha}")

    def trigger_budget(self, image_shape: Sequence[int]) -> float:
        if self.params.trigger_norm is not None:
            return float(self.params.trigger_norm)
        return REFERENCE_TRIGGER_NORM * math.prod(image_shape) / REFERENCE_NUMEL

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
        gen = torch.Generator().manual_seed(seed)
        x, y, batch = self._reference_set(data, augment, gen)
        require_images(self.name, len(y), batch)
        masked = _MaskedConvs.attach(model, lr=p.mask_lr)
        tau = self.trigger_budget(x.shape[1:])
        n_iters = steps_per_phase(p, len(y), batch)
        batches = _batches_with_replacement(len(y), batch, gen)
        val_before = eval_accuracy(model, data.val_x, data.val_y, counter)
        trace = self._alternate(model, masked, x, y, batches, tau=tau, steps=n_iters, counter=counter)
        final_masks = masked.remove()
        freeze(model).eval()
        scores = _channel_scores(model, layout, final_masks)
        allm = torch.cat([m.flatten() for m in final_masks.values()])
        return DefenseResult(
            model,
            scores=scores,
            pruned=None,
            info={
                "trigger_norm": tau,
                "trigger_l1": trace.trigger_l1,
                "history": trace.history,
                "inner_iters": n_iters,
                "n_trigger_steps": trace.n_trigger_steps,
                "n_mask_steps": trace.n_mask_steps,
                "n_images": len(y),
                "one_shot": p.one_shot,
                "val_acc_before": val_before,
                "val_acc_after": eval_accuracy(model, data.val_x, data.val_y, counter),
                "mask_mean": allm.mean().item(),
                "mask_frac_below_half": (allm < 0.5).float().mean().item(),
                "score": "1 - mean element mask of the feeding conv's output channel",
                "_masks": final_masks,
                "_trigger": trace.delta,
            },
        )

    def _reference_set(
        self, data: DefenseData, augment: Optional[Augment], gen: torch.Generator
    ) -> Tuple[Tensor, Tensor, int]:
        """The images the masks are fitted on, and the batch size: the defense's training images, or
        (``one_shot``) one image per class with ``n_aug`` augmented copies."""
        p = self.params
        x, y = data.train_x, data.train_y
        batch = p.batch_size
        if p.one_shot:
            hflip = p.hflip if p.hflip is not None else bool(getattr(augment, "hflip", False))
            x, y = one_shot_set(x, y, data.num_classes, p.n_aug, hflip, gen)
            batch = min(batch, len(y))
        return x, y, batch

    def _alternate(
        self,
        model: nn.Module,
        masked: _MaskedConvs,
        x: Tensor,
        y: Tensor,
        batches: Iterator[Tensor],
        *,
        tau: float,
        steps: int,
        counter: PassCounter,
    ) -> _AWMTrace:
        """``outer_epochs`` times: ``steps`` steps of the adversarial trigger (L1 budget ``tau``),
        then ``steps`` steps of the masks against it."""
        p = self.params
        trace = _AWMTrace(torch.zeros(1, *x.shape[1:], device=x.device))
        for epoch in range(p.outer_epochs):
            trace.delta = _trigger_phase(
                model, x, batches, masked.mask_params, steps=steps, lr=p.trigger_lr, tau=tau, counter=counter
            )
            trace.n_trigger_steps += steps
            trace.trigger_l1.append(trace.delta.abs().sum().item())
            loss = _mask_phase(
                model,
                x,
                y,
                batches,
                trace.delta,
                masked.mask_params,
                masked.opt,
                steps=steps,
                alpha=p.alpha,
                gamma=p.gamma,
                counter=counter,
            )
            trace.n_mask_steps += steps
            trace.history.append({"epoch": epoch + 1, "loss": loss.item(), "trigger_l1": trace.trigger_l1[-1]})
        return trace
