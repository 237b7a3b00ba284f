"""No evidence, no pruning: keep a pruning only if it lowers the estimated ASR significantly.

A defense that prunes neurons on defense-validation evidence must not hand the user a pruned model
whose only gain is noise (issue #18: a +0.008 return from a 0.8-point rise of clean accuracy on 250
images, estimated ASR 1.000 before and after). :class:`EvidenceRule` is the test every learned
pruning goes through (``onp.train``, ``onp.evaluate``, ``onp.defend``):

1. **Significance.** The estimated ASR is a proportion over the ``n`` triggered defense-validation
   images (the ASR estimator's probe). Before and after pruning it is measured on the *same* images,
   so the two counts ``k0 = round(asr_before * n)`` and ``k1 = round(asr_after * n)`` are compared
   with a one-sided Fisher exact test (H1: the pruned model's success rate is lower). Fisher treats
   the two counts as independent samples; for paired measurements on the same images that is
   conservative (their difference varies less than two independent samples'), so a kept pruning is
   at least as significant as stated. A pruning is kept when ``p <= alpha`` (default 0.05, fixed in
   advance, never chosen on test data).
2. **Cost.** The pruning costs at most ``max_acc_drop`` of clean defense-validation accuracy (the
   env's ``delta``).

A pruning that fails either test is replaced by pruning nothing, and the run says "no backdoor neurons
found within the budget" with the figures. The verdict of a run is one of :data:`VERDICTS`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, Mapping, Optional

#: what a defense run reports: the backdoor is gone (on the estimate), reduced but not gone, or untouched
VERDICTS = ("removed", "not removed", "nothing pruned")


def asr_drop_p_value(asr_before: float, asr_after: float, n: int) -> float:
    """One-sided Fisher exact p-value that the success rate fell from ``asr_before`` to ``asr_after``.

    Both are fractions of the same ``n`` triggered images. Returns ``P(X <= k1)`` for ``X`` hypergeometric
    (``2n`` images, ``k0 + k1`` successes, ``n`` drawn): small when the drop is larger than chance.
    ``n == 0`` (no triggered image) gives 1.0: no evidence.
    """
    for name, value in (("asr_before", asr_before), ("asr_after", asr_after)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and 0.0 <= value <= 1.0):
            raise ValueError(f"{name} must be a fraction in [0, 1]; got {value!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n (triggered images) must be an integer >= 0; got {n!r}")
    if n == 0:
        return 1.0
    k0, k1 = round(asr_before * n), round(asr_after * n)
    successes = k0 + k1
    total = math.comb(2 * n, n)
    low = max(0, successes - n)
    tail = sum(math.comb(successes, k) * math.comb(2 * n - successes, n - k) for k in range(low, k1 + 1))
    return min(1.0, tail / total)


@dataclass(frozen=True)
class Judgement:
    """What :meth:`EvidenceRule.judge` found for one candidate pruning (all on defense-validation)."""

    keep: bool
    verdict: str
    reason: str
    n_pruned: int
    acc_before: float
    acc_after: float
    asr_before: float
    asr_after: float
    n_triggered: int
    p_value: float
    alpha: float
    max_acc_drop: float

    def to_dict(self) -> Dict[str, Any]:
        """The judgement as JSON-ready values (``metrics.json``: ``evidence``)."""
        return asdict(self)

    def summary(self) -> str:
        """One line: the verdict first, then the defense-validation figures behind it."""
        figures = (
            f"estimated val ASR {self.asr_before:.3f} -> {self.asr_after:.3f} (n={self.n_triggered} triggered, "
            f"p={self.p_value:.2g}), val ACC {self.acc_before:.3f} -> {self.acc_after:.3f}"
        )
        if self.verdict == "nothing pruned":
            rejected = f"; the rejected pruning of {self.n_pruned} neurons: " if self.n_pruned else "; "
            return f"verdict: nothing pruned: {self.reason}{rejected}{figures}"
        return f"verdict: backdoor {self.verdict} (estimated, {self.n_pruned} neurons pruned); {figures}"


@dataclass(frozen=True)
class EvidenceRule:
    """Keep a pruning only with significant evidence that it lowers the estimated ASR (module doc).

    Args:
        alpha: one-sided significance level of the Fisher exact test (``None``: no significance test).
        max_acc_drop: the largest clean defense-validation accuracy drop a kept pruning may cost.
        removed_asr: a kept pruning whose estimated ASR is at most this is reported as "removed", above
            it as "not removed".
    """

    alpha: Optional[float] = 0.05
    max_acc_drop: float = 0.1
    removed_asr: float = 0.1

    def __post_init__(self) -> None:
        if self.alpha is not None and not (isinstance(self.alpha, (int, float)) and 0.0 < self.alpha < 1.0):
            raise ValueError(f"alpha must be in (0, 1) or None; got {self.alpha!r}")
        for name in ("max_acc_drop", "removed_asr"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and 0.0 <= value <= 1.0):
                raise ValueError(f"{name} must be a fraction in [0, 1]; got {value!r}")

    def judge(
        self, before: Mapping[str, Any], after: Mapping[str, Any], n_triggered: int, *, repaired: bool = False
    ) -> Judgement:
        """Judge the pruning ``after`` (an env info: ``acc``, ``asr``, ``n_pruned``) against ``before``
        (the unpruned state) on ``n_triggered`` triggered defense-validation images. ``repaired``: the
        weights were changed otherwise too (a finisher), so a model with no neuron pruned is judged as well
        (without it, pruning nothing is "nothing pruned" and kept as it is)."""
        acc0, acc1 = float(before["acc"]), float(after["acc"])
        asr0, asr1 = float(before["asr"]), float(after["asr"])
        n_pruned = int(after["n_pruned"])
        p = asr_drop_p_value(asr0, asr1, int(n_triggered))
        alpha = 1.0 if self.alpha is None else float(self.alpha)
        keep, verdict = True, "removed" if asr1 <= self.removed_asr else "not removed"
        reason = f"significant drop (p={p:.2g} <= alpha={alpha:g})"
        if n_pruned == 0 and not repaired:
            verdict, reason = "nothing pruned", "the policy pruned no neuron"
        elif self.alpha is not None and p > alpha:
            keep, verdict = False, "nothing pruned"
            reason = (
                f"no backdoor neurons found within the budget (the estimated ASR drop is not significant: "
                f"p={p:.2g} > alpha={alpha:g})"
            )
        elif acc0 - acc1 > self.max_acc_drop + 1e-12:
            keep, verdict = False, "nothing pruned"
            reason = (
                f"no backdoor neurons found within the budget (the {'repair' if repaired else 'pruning'} costs "
                f"{acc0 - acc1:.3f} of val ACC "
                f"> {self.max_acc_drop:g} allowed)"
            )
        return Judgement(
            keep=keep,
            verdict=verdict,
            reason=reason,
            n_pruned=n_pruned,
            acc_before=acc0,
            acc_after=acc1,
            asr_before=asr0,
            asr_after=asr1,
            n_triggered=int(n_triggered),
            p_value=p,
            alpha=alpha,
            max_acc_drop=float(self.max_acc_drop),
        )


__all__ = ["VERDICTS", "EvidenceRule", "Judgement", "asr_drop_p_value"]
