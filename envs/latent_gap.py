"""The latent gap: does a class's reverse-engineered trigger reach that class the way its real images do?

Trigger inversion (:func:`envs.asr_estimators.invert_triggers`) finds, for every class, a small trigger
that sends other classes' images to it. On a clean model such a trigger for an easy class (on
Fashion-MNIST, class 8, "bag") is a *natural* universal patch: the stamped images come to look like that
class's real images to the model. A planted backdoor is a shortcut: the trigger reaches the target
through features that the target's real images do not have. The latent gap measures that difference
in the model's own penultimate features (the input of its last ``nn.Linear``):

    gap_c = 1 - cos(mean feature of the stamped images the model sends to c,
                    mean feature of the genuine class-c images)

on the defense-validation images. Its MAD anomaly index over the classes (positive: a larger gap than the
other classes') confirms a small trigger in the ``confirmed`` verdict detector, or finds a target alone
when it is large (:func:`onp.backdoor_verdict.confirmed_target`).

It is the idea of activation clustering (Chen et al., "Detecting Backdoor Attacks on Deep Neural Networks
by Activation Clustering", SafeAI 2019: poisoned training images form their own cluster in the last
hidden layer) applied to reverse-engineered triggers on clean images instead of the poisoned training
set, which a defender does not have. Measured on the zoo models in docs/results.md §22.
"""

from __future__ import annotations

from typing import Callable, Tuple

import torch
from torch import Tensor, nn

from onp.models import find_last_linear

__all__ = ["classifier_layer", "penultimate_features", "latent_gaps"]


def classifier_layer(model: nn.Module) -> nn.Linear:
    """The model's last ``nn.Linear`` in module order (its classifier); :class:`ValueError` if it has none."""
    found = find_last_linear(model)
    if found is None:
        raise ValueError(
            f"the latent gap reads the input of the model's last nn.Linear, and {type(model).__name__} has none; "
            "use another verdict detector (estimator_params.detector, e.g. 'trigger-size')"
        )
    return found[1]


@torch.no_grad()
def penultimate_features(model: nn.Module, x: Tensor, batch_size: int = 256) -> Tuple[Tensor, Tensor]:
    """The input of the model's classifier (:func:`classifier_layer`, flattened) and the logits, for ``x``
    in batches, the model in eval mode."""
    head = classifier_layer(model)
    caught: list = []
    handle = head.register_forward_hook(lambda _m, inputs, _out: caught.append(inputs[0].flatten(1)))
    model.eval()
    try:
        logits = torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
    finally:
        handle.remove()
    return torch.cat(caught), logits


def latent_gaps(
    model: nn.Module, x: Tensor, y: Tensor, num_classes: int, stamp: Callable[[int, Tensor], Tensor]
) -> Tensor:
    """Per class ``c``, ``1 - cos`` between the mean penultimate feature of the images of the other classes
    that ``stamp(c, images)`` sends to ``c`` (all of them when it sends none) and that of the genuine class-c
    images in ``x``; NaN for a class with no image in ``x`` or no other class's image."""
    gaps = torch.full((num_classes,), float("nan"))
    for c in range(num_classes):
        genuine, others = x[y == c], x[y != c]
        if len(genuine) == 0 or len(others) == 0:
            continue
        f_stamped, logits = penultimate_features(model, stamp(c, others))
        flipped = logits.argmax(1) == c
        f_stamped = f_stamped[flipped] if bool(flipped.any()) else f_stamped
        f_genuine, _ = penultimate_features(model, genuine)
        cos = torch.nn.functional.cosine_similarity(f_stamped.mean(0), f_genuine.mean(0), dim=0)
        gaps[c] = 1.0 - cos
    return gaps
