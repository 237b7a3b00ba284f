"""The backdoor verdict: does a model look backdoored, before anything is pruned?

A trigger-inverting ASR estimator (``synthesized``, ``synthesized-multi``; :mod:`envs.asr_estimators`)
reverse-engineers one trigger per class from the defender's clean images and reports, per class, the
trigger's size, its MAD anomaly index and the fraction of images it flips (its probe's ``info``).
:func:`backdoor_verdict` turns those statistics into a :class:`Verdict`. The estimator's ``detector``
(:data:`DETECTORS`; default ``confirmed-or-margin``, :data:`DEFAULT_DETECTOR`) says which statistic decides:

* ``trigger-size``: *suspected* when the estimated target's trigger works and its anomaly index is at
  most ``-threshold`` (Neural Cleanse, Wang et al., IEEE S&P 2019);
* ``max-margin``: when the largest per-class maximum margin has a p-value below the estimator's alpha
  (MM-BD, Wang et al., IEEE S&P 2024; :mod:`envs.max_margin`);
* ``either``: when one of the two says so (the max-margin class is the target when it does);
* ``confirmed``: the trigger size, confirmed by a second statistic of the same class's trigger: when a
  class's trigger-size anomaly index is at most ``-CONFIRM_THRESHOLD`` and either its latent-gap index
  (:mod:`envs.latent_gap`: how far the images its trigger flips sit from the class's real images in the
  model's penultimate features) or its patch mask's compactness index (:mod:`envs.compactness`) is at
  least ``CONFIRM_THRESHOLD``; or when its latent-gap index alone is at least ``LATENT_GAP_ALONE``
  (:func:`confirmed_target`). A small trigger whose images look like the class's real ones and whose
  mask is spread out (a clean model's natural universal patch) is not enough. Each rule was written
  before the held-out models that tested it were trained (docs/results.md §22);
* ``confirmed-or-margin``: when ``confirmed`` says so, or when MM-BD's max-margin p-value is below
  :data:`CONFIRMED_MARGIN_ALPHA` (then the max-margin class is the target). A Trojan trigger raises
  its target's margin without a small, confirmed trigger (docs/results.md §22h, §23);
* ``combined``: when the trigger size says so, or when the max-margin class's evidence from both
  statistics together is significant (:func:`combined_pvalue`, Stouffer's method: its MM-BD p-value
  and its own trigger-size anomaly index read as a z-score, the most negative over the estimator's
  ``combined_families``, which add the ``spectral`` family). The max-margin class is then the
  target, unless the trigger size's own class is another one with stronger evidence
  (:func:`stronger_target`). Opt-in: chosen after looking at zoo models (docs/results.md §15e, §17a)
  and measured on models no choice had seen (§16c, §17a, §21).

An estimator that inverts nothing (``trigger``, which knows the real trigger) gives no verdict (``None``).

``onp.defend`` prunes nothing when no backdoor is suspected (``force`` defends anyway);
``onp.train`` and ``onp.evaluate`` apply the same gate to the pruning they keep
(:func:`no_backdoor_reason`; ``rollout.force`` / ``--force`` defends anyway). This module is core: it imports no upper
layer.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any, Dict, List, Mapping, Optional, Sequence

__all__ = [
    "DETECTORS",
    "Verdict",
    "combined_pvalue",
    "stronger_target",
    "confirmed_target",
    "check_detector_threshold",
    "DEFAULT_DETECTOR",
    "CONFIRM_THRESHOLD",
    "LATENT_GAP_ALONE",
    "CONFIRMED_MARGIN_ALPHA",
    "CONFIRMING_DETECTORS",
    "backdoor_verdict",
    "no_backdoor_reason",
    "INVERSION_KEYS",
    "DEFAULT_ANOMALY_THRESHOLD",
    "FORCE_HINT",
]

#: suspected when the estimated target's anomaly index is at most minus this (Neural Cleanse's 2)
DEFAULT_ANOMALY_THRESHOLD = 2.0

#: how ``onp.train`` / ``onp.evaluate`` name the switch that keeps a pruning when no backdoor is suspected
FORCE_HINT = "--force (rollout.force=true)"

#: which statistic decides the verdict (a trigger-inverting estimator's ``detector``; see the module docstring)
DETECTORS = ("trigger-size", "max-margin", "either", "combined", "confirmed", "confirmed-or-margin")

#: the detectors that compute the latent gaps and the compactness (:func:`confirmed_target`)
CONFIRMING_DETECTORS = ("confirmed", "confirmed-or-margin")

#: the ``synthesized-multi`` estimator's detector when its ``detector`` is not given
DEFAULT_DETECTOR = "confirmed-or-margin"

#: ``confirmed``: a class whose trigger-size index is <= -this and whose latent-gap or compactness index is
#: >= this is suspected (Neural Cleanse's threshold, for every statistic)
CONFIRM_THRESHOLD = 2.0

#: ``confirmed``: a class whose latent-gap index alone is at least this is suspected (above the largest
#: latent-gap index of the ten clean zoo models measured before it was fixed, 5.10: docs/results.md §22)
LATENT_GAP_ALONE = 6.0

#: ``confirmed-or-margin``: MM-BD's level, fixed (about the geometric middle of the largest p-value of a
#: backdoor only the margin caught, 2.5e-4, and the smallest clean model's, 0.055: docs/results.md §23)
CONFIRMED_MARGIN_ALPHA = 0.005

#: what a trigger-inverting estimator's probe ``info`` reports per class (a verdict needs all of them)
INVERSION_KEYS = ("estimated_target", "anomaly_index", "trigger_size", "success")


@dataclass(frozen=True)
class Verdict:
    """Whether the model looks backdoored, decided before any pruning from trigger inversion on
    defense-train images (per class: the L1 size of the smallest mask that flips images to it).

    Attributes:
        suspected: the deciding statistic (``detector``) suspects a backdoor: for ``trigger-size`` the
            estimated target's trigger flips the model (``inverted``) and ``anomaly_index <= -threshold``.
        estimated_target: the class with the smallest working trigger.
        anomaly_index: the MAD anomaly index of that class's trigger size (negative: smaller than usual).
        threshold: the configured ``anomaly_threshold``.
        estimator: the ASR estimator that inverted the triggers.
        mask_l1, anomaly_indices, success: per class: trigger size (for the ``patch`` family the
            mask's L1 norm, hence the name), its anomaly index (over all classes; see the estimator:
            :func:`envs.asr_estimators.anomaly_indices` of the sizes for ``synthesized``, of their
            logarithms within each family for ``synthesized-multi``), and the fraction of non-class
            defense-train images its trigger flips.
        trigger_families: per class, the trigger family (``patch``, ``blend``, ``warp``) the figures
            above come from.
        inversion_seconds: what the trigger inversion cost when it was computed (all families; it is
            cached, so a later run on the same model and images reads it), ``None`` if not recorded.
        inverted: the estimated target's trigger flips at least ``min_success`` of the images (the
            estimator's; if no class's does, the verdict is inconclusive and nothing is suspected).
        detector: which statistic decided (:data:`DETECTORS`).
        max_margin, max_margin_pvalue, max_margin_alpha, max_margin_seconds: with the ``max-margin``,
            ``either`` and ``combined`` detectors: per class, the largest classification margin reached
            from random images; the largest one's p-value and the level it is compared with; the
            computation's cost.
        combined_indices: with the ``combined`` detector, per class, the trigger-size evidence it pools
            with the max-margin p-value: the most negative anomaly index over the estimator's
            ``combined_families`` (which may add families to the ones behind ``anomaly_indices``);
            empty for other detectors, and ``anomaly_indices`` stands in.
        latent_gaps, latent_gap_indices: with the ``confirmed`` detector, per class, the latent gap
            (:func:`envs.latent_gap.latent_gaps`) and its MAD anomaly index over the classes (positive:
            larger than usual; NaN where it could not be measured); empty for other detectors.
        compactness, compactness_indices: with the ``confirmed`` detector, per class, the compactness of
            its inverted patch mask (:func:`envs.compactness.mask_compactness`) and its MAD anomaly index
            (positive: more compact than usual); empty when the estimator inverted no patch.

    Derived (properties, also written by :meth:`to_dict`): ``combined_pvalue``; and the decision of
    every detector on the same statistics, :meth:`flagged_by`.
    """

    suspected: bool
    estimated_target: int
    anomaly_index: float
    threshold: float
    estimator: str
    mask_l1: List[float]
    anomaly_indices: List[float]
    success: List[float]
    inverted: bool = True
    trigger_families: List[str] = field(default_factory=list)
    inversion_seconds: Optional[float] = None
    detector: str = "trigger-size"
    max_margin: List[float] = field(default_factory=list)
    max_margin_pvalue: Optional[float] = None
    max_margin_alpha: Optional[float] = None
    max_margin_seconds: Optional[float] = None
    min_success: float = 0.5
    combined_indices: List[float] = field(default_factory=list)
    latent_gaps: List[float] = field(default_factory=list)
    latent_gap_indices: List[float] = field(default_factory=list)
    compactness: List[float] = field(default_factory=list)
    compactness_indices: List[float] = field(default_factory=list)

    @property
    def size_inconclusive(self) -> bool:
        """No reverse-engineered trigger flipped the model (not even the estimated target's)."""
        return not self.inverted or not math.isfinite(self.anomaly_index)

    @property
    def size_flagged(self) -> bool:
        """The trigger-size statistic suspects a backdoor (Neural Cleanse's rule)."""
        return not self.size_inconclusive and self.anomaly_index <= -self.threshold

    @property
    def margin_flagged(self) -> bool:
        """The max-margin statistic suspects a backdoor (MM-BD's rule; False without it)."""
        p, alpha = self.max_margin_pvalue, self.max_margin_alpha
        return p is not None and alpha is not None and math.isfinite(p) and p < alpha

    @property
    def margin_class(self) -> Optional[int]:
        """The class with the largest maximum margin (``None`` without the max-margin statistics)."""
        return max(range(len(self.max_margin)), key=self.max_margin.__getitem__) if self.max_margin else None

    def _pooled_index(self, c: int) -> float:
        """Class ``c``'s trigger-size evidence in the combined p-value (``combined_indices``, else
        ``anomaly_indices``)."""
        return (self.combined_indices or self.anomaly_indices)[c]

    @property
    def combined_pvalue(self) -> Optional[float]:
        """:func:`combined_pvalue` of the class with the largest maximum margin (``None`` without a finite
        max-margin p-value)."""
        p, t = self.max_margin_pvalue, self.margin_class
        if t is None or p is None or not math.isfinite(p):
            return None
        return combined_pvalue(p, self._pooled_index(t))

    @property
    def combined_flagged(self) -> bool:
        """The combined statistic of the max-margin class is significant (False without it)."""
        p, alpha = self.combined_pvalue, self.max_margin_alpha
        return p is not None and alpha is not None and math.isfinite(p) and p < alpha

    @property
    def inconclusive(self) -> bool:
        """The deciding statistic could not be computed (no trigger flipped the model; no p-value)."""
        margin_missing = self.max_margin_pvalue is None or not math.isfinite(self.max_margin_pvalue)
        if self.detector == "max-margin":
            return margin_missing
        if self.detector in ("either", "combined"):
            return margin_missing and self.size_inconclusive
        confirm_missing = self.size_inconclusive or not any(math.isfinite(g) for g in self.latent_gap_indices)
        if self.detector == "confirmed":
            return confirm_missing
        if self.detector == "confirmed-or-margin":
            return confirm_missing and margin_missing
        return self.size_inconclusive

    def _size_evidence(self) -> str:
        if self.size_inconclusive:
            return (
                f"inconclusive: no reverse-engineered class trigger flipped the model (best: class "
                f"{self.estimated_target}, {max(self.success):.0%} of the images)"
            )
        cmp = "<=" if self.size_flagged else ">"
        return (
            f"estimated target class {self.estimated_target}: its reverse-engineered trigger's size has anomaly "
            f"index {self.anomaly_index:.2f} {cmp} -{self.threshold:g}"
        )

    def _margin_evidence(self) -> str:
        p = self.max_margin_pvalue
        if not self.max_margin or p is None or not math.isfinite(p):
            return "inconclusive: no p-value for the maximum margins"
        t = int(self.margin_class or 0)  # max_margin is not empty here
        median = statistics.median(m for c, m in enumerate(self.max_margin) if c != t)
        cmp = "<" if self.margin_flagged else ">="
        return (
            f"class {t}'s maximum margin {self.max_margin[t]:.1f} (the others' median {median:.1f}) has "
            f"p = {p:.2g} {cmp} {self.max_margin_alpha:g}"
        )

    def _combined_evidence(self) -> str:
        p = self.combined_pvalue
        if p is None or not math.isfinite(p):
            return "inconclusive: no p-value for the maximum margins"
        t = int(self.margin_class or 0)  # a combined p-value implies the margins
        cmp = "<" if self.combined_flagged else ">="
        return (
            f"class {t}: maximum-margin p = {self.max_margin_pvalue:.2g} and trigger-size anomaly index "
            f"{self._pooled_index(t):.2f}, combined p = {p:.2g} {cmp} {self.max_margin_alpha:g}"
        )

    @property
    def rival_target(self) -> Optional[int]:
        """The class the other statistic names, when the two suspect different classes (``either``,
        ``combined``; else ``None``): the trigger size's own class when the max-margin evidence made another
        class the target, or the max-margin class when the trigger size's stronger evidence won
        (:func:`stronger_target`).

        A defender should know (``onp.defend``'s report says so): on WaNet s1 the trigger size's class
        was the real target, on SIG s6 the margin's (docs/results.md §18a). With ``confirmed-or-margin``: the
        max-margin class when the margin is significant for another class than the confirmed one."""
        if self.detector == "confirmed-or-margin":
            confirmed = self.confirmed_class
            moved = confirmed is not None and self.margin_flagged and self.margin_class != confirmed
            return self.margin_class if moved else None
        if self.detector not in ("either", "combined") or not self.flagged_by(self.detector):
            return None
        target = self.target_by(self.detector)
        margin_moved = self.margin_flagged if self.detector == "either" else self.combined_flagged
        if target == self.margin_class and self._size_rule() and self.size_target != target:
            return self.size_target
        if target != self.margin_class and margin_moved:
            return self.margin_class
        return None

    def evidence(self) -> str:
        """The figure behind the verdict, in words (both statistics' with ``either`` and ``combined``, and
        the trigger size's own class when it names another target: :attr:`rival_target`)."""
        if self.detector == "max-margin":
            return self._margin_evidence()
        if self.detector == "confirmed":
            return self._confirmed_evidence()
        if self.detector == "confirmed-or-margin":
            return self._confirmed_or_margin_evidence()
        if self.detector in ("either", "combined"):
            first = self._margin_evidence() if self.detector == "either" else self._combined_evidence()
            moved = self.margin_flagged if self.detector == "either" else self.combined_flagged
            if not moved:
                return f"{first}; {self._size_evidence()}"
            rival = self.rival_target
            if rival is None:
                return first
            if rival == self.margin_class:
                t = self.size_target
                index = self.anomaly_indices[t]
                return f"{first}; but the trigger size's evidence for class {t} is stronger (anomaly index {index:.2f})"
            index = self.anomaly_indices[rival]
            return f"{first}; but the trigger size alone names class {rival} (anomaly index {index:.2f})"
        return self._size_evidence()

    def summary(self) -> str:
        """One line: the verdict first, then the figure behind it."""
        what = "backdoor suspected" if self.suspected else "no backdoor found"
        return f"verdict: {what} ({self.evidence()})"

    @property
    def confirmed_class(self) -> Optional[int]:
        """The class the ``confirmed`` rule suspects (:func:`confirmed_target`), ``None`` when it suspects
        none or the latent gaps were not computed."""
        if not self.latent_gap_indices:
            return None
        working = [ok >= self.min_success for ok in self.success]
        return confirmed_target(self.anomaly_indices, self.latent_gap_indices, self.compactness_indices, working)

    def _confirmed_evidence(self) -> str:
        if not self.latent_gap_indices:
            return "inconclusive: no latent gaps were computed"
        t = self.confirmed_class
        c = self.size_target if t is None else t
        s, g = self.anomaly_indices[c], self.latent_gap_indices[c]
        k = f", compactness index {self.compactness_indices[c]:.2f}" if self.compactness_indices else ""
        what = f"class {c}: trigger-size anomaly index {s:.2f}, latent-gap index {g:.2f}{k}"
        if t is not None:
            return what
        x = CONFIRM_THRESHOLD
        return (
            f"{what}; no class has a trigger-size index <= -{x:g} confirmed by a latent-gap or compactness index "
            f">= {x:g}, or a latent-gap index >= {LATENT_GAP_ALONE:g}"
        )

    def _confirmed_or_margin_evidence(self) -> str:
        confirmed, margin = self._confirmed_evidence(), self._margin_evidence()
        if self.confirmed_class is None:
            return f"{margin}; {confirmed}" if self.margin_flagged else f"{confirmed}; {margin}"
        rival = self.rival_target
        return confirmed if rival is None else f"{confirmed}; but the maximum margin names class {rival} ({margin})"

    @property
    def size_target(self) -> int:
        """The trigger-size statistic's own target: the most negative anomaly index among the classes whose
        trigger works (all classes when none does); ``estimated_target`` unless a max-margin detector moved it."""
        working = [c for c, ok in enumerate(self.success) if ok >= self.min_success] or range(len(self.success))
        return min(working, key=self.anomaly_indices.__getitem__)

    def _size_rule(self) -> bool:
        """Neural Cleanse's rule on the trigger size's own target (:attr:`size_target`), whichever class a
        max-margin detector made the estimated target."""
        t = self.size_target
        index = self.anomaly_indices[t]
        return self.success[t] >= self.min_success and math.isfinite(index) and index <= -self.threshold

    def flagged_by(self, detector: str) -> bool:
        """Whether ``detector`` (:data:`DETECTORS`) suspects a backdoor on these statistics: what a run with
        that detector decides (the max-margin statistics are there only when this verdict's detector
        computed them; without them a max-margin rule flags nothing)."""
        size, margin, combined = self._size_rule(), self.margin_flagged, self.combined_flagged
        rules = {
            "trigger-size": size, "max-margin": margin, "either": size or margin, "combined": size or combined,
            "confirmed": self.confirmed_class is not None,
            "confirmed-or-margin": self.confirmed_class is not None or margin,
        }  # fmt: skip
        if detector not in rules:
            raise ValueError(f"detector must be one of {', '.join(DETECTORS)}; got {detector!r}")
        return rules[detector]

    def target_by(self, detector: str) -> int:
        """The class ``detector`` (:data:`DETECTORS`) names as the target on these statistics: the max-margin
        class where that detector lets the margin decide (``max-margin`` always; ``either`` when its
        p-value is significant; ``combined`` when its pooled p-value is, unless :func:`stronger_target`
        prefers the trigger size's own class), else :attr:`size_target`; for ``confirmed`` its
        :attr:`confirmed_class` when there is one, else :attr:`size_target`; for ``confirmed-or-margin`` its
        :attr:`confirmed_class`, else the max-margin class when its p-value is significant, else
        :attr:`size_target`."""
        self.flagged_by(detector)  # refuses an unknown detector
        confirmed = self.confirmed_class if detector in CONFIRMING_DETECTORS else None
        if confirmed is not None:
            return confirmed
        if detector == "confirmed":
            return self.size_target
        t = self.margin_class
        by_margin = {
            "max-margin": True, "either": self.margin_flagged, "combined": self.combined_flagged,
            "confirmed-or-margin": self.margin_flagged,
        }  # fmt: skip
        if t is None or not by_margin.get(detector, False):
            return self.size_target
        s, pooled = self.size_target, self.combined_pvalue
        if detector == "combined" and pooled is not None and self.success[s] >= self.min_success:
            return stronger_target(t, pooled, s, self.anomaly_indices[s])
        return t

    def to_dict(self) -> Dict[str, Any]:
        """The verdict as JSON-ready values (``onp.defend``'s ``report.json`` ``verdict``; ``onp.train`` /
        ``onp.evaluate``'s ``metrics.json`` ``backdoor_verdict``), with ``combined_pvalue``."""
        return {**dataclasses.asdict(self), "combined_pvalue": self.combined_pvalue}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Verdict":
        """A verdict read back from :meth:`to_dict`'s JSON (derived values are recomputed, unknown keys refused)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields - {"combined_pvalue"}
        if unknown:
            raise ValueError(f"not a verdict: unknown keys {sorted(unknown)}")
        return cls(**{k: v for k, v in data.items() if k in fields})


def _total_seconds(costs: Any) -> Optional[float]:
    """The trigger inversion's recorded cost: one number, or the sum over families (None if any is
    unknown)."""
    values = list(costs.values()) if isinstance(costs, dict) else [costs]
    if not values or any(not isinstance(v, (int, float)) or not math.isfinite(v) for v in values):
        return None
    return float(sum(values))


def combined_pvalue(margin_pvalue: float, anomaly_index: float) -> float:
    """Stouffer's combination of one class's two pieces of evidence: its MM-BD p-value and its trigger-size
    anomaly index read as a z-score (negative: a smaller trigger than the other classes'),
    ``p = 1 - Phi((Phi^-1(1 - p_margin) - index) / sqrt(2))``. An index that is not finite (no trigger
    worked) counts as no evidence (0); a p-value below 1e-300 counts as 1e-300; NaN stays NaN."""
    if not math.isfinite(margin_pvalue):
        return math.nan
    normal = NormalDist()
    z_margin = -normal.inv_cdf(min(max(float(margin_pvalue), 1e-300), 1.0 - 1e-16))
    z_size = -float(anomaly_index) if math.isfinite(anomaly_index) else 0.0
    return normal.cdf(-(z_margin + z_size) / math.sqrt(2.0))


def stronger_target(margin_class: int, pooled_pvalue: float, size_class: int, size_index: float) -> int:
    """The ``combined`` detector's target once its pooled part has flagged ``margin_class``: ``size_class``
    (the trigger size's own class, whose trigger works) when its evidence is the stronger one,
    ``-size_index > Phi^-1(1 - pooled_pvalue)``, else ``margin_class``.

    Both are one-sided z-scores: the size index of the class with the most anomalously small working
    trigger, and Stouffer's pooled evidence (:func:`combined_pvalue`) of the class with the largest
    maximum margin. Written before the models that tested it were trained (docs/results.md §21: on
    the 33 models recorded before, it moves WaNet s1's target to its real class and keeps SIG s6's)."""
    if size_class == margin_class or not math.isfinite(size_index) or not math.isfinite(pooled_pvalue):
        return margin_class
    z_pooled = -NormalDist().inv_cdf(min(max(float(pooled_pvalue), 1e-300), 1.0 - 1e-16))
    return size_class if -float(size_index) > z_pooled else margin_class


def confirmed_target(
    size_indices: Sequence[float],
    gap_indices: Sequence[float],
    compactness_indices: Sequence[float],
    working: Sequence[bool],
) -> Optional[int]:
    """The ``confirmed`` detector's rule: the class it suspects, or ``None``.

    A class is a candidate when its trigger works (``working``) and either its trigger-size anomaly index is
    at most ``-CONFIRM_THRESHOLD`` and its latent-gap or its compactness index is at least
    :data:`CONFIRM_THRESHOLD`, or its latent-gap index alone is at least :data:`LATENT_GAP_ALONE`. The
    target is the candidate with the largest ``gap index - size index`` (both read as one-sided
    evidence). A NaN index, or a missing compactness index (empty: no patch inverted), counts as no
    evidence. The estimator (which trigger it stamps) and :meth:`Verdict.target_by` use this one rule."""
    x = CONFIRM_THRESHOLD
    best: Optional[int] = None
    best_score = -math.inf
    for c, (s, g, ok) in enumerate(zip(size_indices, gap_indices, working)):
        k = compactness_indices[c] if c < len(compactness_indices) else math.nan
        s = float(s) if math.isfinite(s) else 0.0
        if not ok or not math.isfinite(g):
            continue
        confirmed = g >= x or (math.isfinite(k) and k >= x)
        if (s <= -x and confirmed) or g >= LATENT_GAP_ALONE:
            if g - s > best_score:
                best, best_score = c, g - s
    return best


def check_detector_threshold(estimator: str, estimator_params: Mapping[str, Any], threshold: float) -> None:
    """Refuse, before anything runs, an ``anomaly_threshold`` other than the default with the ``confirmed``
    and ``confirmed-or-margin`` detectors of ``synthesized-multi``, and a ``margin_alpha`` with the latter:
    their thresholds are fixed (:data:`CONFIRM_THRESHOLD`, :data:`LATENT_GAP_ALONE`,
    :data:`CONFIRMED_MARGIN_ALPHA`), so another value would be silently ignored."""
    detector = estimator_params.get("detector", DEFAULT_DETECTOR)
    if estimator != "synthesized-multi" or detector not in CONFIRMING_DETECTORS:
        return
    if threshold != DEFAULT_ANOMALY_THRESHOLD:
        raise ValueError(
            f"the {detector} detector's thresholds are fixed ({CONFIRM_THRESHOLD:g} and {LATENT_GAP_ALONE:g}); an "
            f"anomaly threshold of {threshold:g} applies to the trigger-size rule only: set "
            "estimator_params.detector to 'trigger-size' (or leave the threshold at "
            f"{DEFAULT_ANOMALY_THRESHOLD:g})"
        )
    if detector == "confirmed-or-margin" and "margin_alpha" in estimator_params:
        raise ValueError(
            f"the confirmed-or-margin detector's max-margin level is fixed ({CONFIRMED_MARGIN_ALPHA:g}); "
            "margin_alpha applies to the max-margin, either and combined detectors: drop it or set "
            "estimator_params.detector to one of those"
        )


def backdoor_verdict(info: Mapping[str, Any], *, estimator: str, threshold: float) -> Optional[Verdict]:
    """The verdict from the trigger inversion an ASR estimator did (its probe's ``info``).

    Args:
        info: the probe's ``info`` (:data:`INVERSION_KEYS` per class; older caches call the trigger
            size ``mask_l1``).
        estimator: the estimator's registry name (recorded in the verdict).
        threshold: suspected when the estimated target's anomaly index is at most ``-threshold``.

    Returns:
        The :class:`Verdict`, or ``None`` when the estimator inverted no triggers (``trigger``).
    """
    info = dict(info)
    if "trigger_size" not in info and "mask_l1" in info:  # an estimator written before the trigger families
        info["trigger_size"] = info["mask_l1"]
    if any(k not in info for k in INVERSION_KEYS):
        return None
    target = int(info["estimated_target"])
    index = float(info["anomaly_index"][target])
    min_success = float(info.get("min_success", 0.5))
    inverted = float(info["success"][target]) >= min_success
    k = len(info["success"])
    detector = str(info.get("detector", "trigger-size"))
    if detector not in DETECTORS:
        raise ValueError(f"detector must be one of {', '.join(DETECTORS)}; got {detector!r}")
    margin = {key: info.get(key) for key in ("max_margin_pvalue", "max_margin_alpha", "max_margin_seconds")}
    verdict = Verdict(
        suspected=False,
        inverted=inverted,
        min_success=min_success,
        estimated_target=target,
        anomaly_index=index,
        threshold=float(threshold),
        estimator=estimator,
        mask_l1=[float(v) for v in info["trigger_size"]],
        anomaly_indices=[float(v) for v in info["anomaly_index"]],
        success=[float(v) for v in info["success"]],
        trigger_families=[str(f) for f in info.get("family_of_class", [info.get("family", "patch")] * k)],
        inversion_seconds=_total_seconds(info.get("inversion_seconds")),
        detector=detector,
        max_margin=[float(v) for v in info.get("max_margin", [])],
        combined_indices=[float(v) for v in info.get("combined_index", [])],
        latent_gaps=[float(v) for v in info.get("latent_gap", [])],
        latent_gap_indices=[float(v) for v in info.get("latent_gap_index", [])],
        compactness=[float(v) for v in info.get("compactness", [])],
        compactness_indices=[float(v) for v in info.get("compactness_index", [])],
        **{key: None if value is None else float(value) for key, value in margin.items()},
    )
    suspected = verdict.flagged_by(detector)
    return dataclasses.replace(verdict, suspected=suspected)


def no_backdoor_reason(verdict: Optional[Verdict], *, force: bool, how_to_force: str) -> Optional[str]:
    """Why nothing may be pruned: the verdict found no backdoor and ``force`` is off (else ``None``).

    ``how_to_force`` names the switch that defends anyway (``"--force"``, :data:`FORCE_HINT`).
    """
    if verdict is None or verdict.suspected or force:
        return None
    return f"no backdoor found ({verdict.evidence()}); {how_to_force} prunes anyway"
