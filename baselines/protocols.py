"""Run-level protocols: which defender images a defense fits on, and which rule sets its operating point.

Two legitimate protocols (:data:`onp.data.defense.PROTOCOLS`); neither reads the test set:

* ``delta`` (default): the defense as configured, fitted on **defense-train**; the pruning methods
  choose the largest pruning whose clean-ACC drop on **defense-validation** is <= ``delta``
  (:mod:`baselines.operating_point`).
* ``paper``: the paper's fixed rule (:data:`PAPER_RULES`), fitted on the **whole defender pool**
  (defense-train and defense-validation together, :meth:`~onp.data.defense.DefenseData.whole_pool`),
  as the reference codes do: they hold nothing out. Nothing is chosen on held-out images, so there
  are none.

The paper rules: ANP and RNP prune every neuron whose mask is <= 0.2; CLP prunes UCLC > mean + 3 std
(data-free); FP prunes classifier units one at a time, most dormant first, and stops before the first
count whose clean-accuracy drop on the defender's images exceeds 4% (``operating_point="first_drop"``);
FT, AWM and NGF have no operating point and keep their (paper) defaults, as does any defense without
a pruning operating point that is not listed. ``magnitude`` and ``random`` are reference points, not
published defenses: they have no paper rule and are refused under ``paper``; so is a pruning defense
that is not listed.

On a leaderboard (``onp.compare --defenses``) a protocol is chosen per row as ``NAME[PROTOCOL]``
(:func:`parse_label`): ``anp[paper]`` and ``anp[delta]`` are two rows; a plain ``anp`` is the
``delta`` protocol.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, Mapping, Optional, Tuple

from onp.data.defense import PROTOCOLS, DefenseData, check_protocol

from .base import DEFENSES, DefenseError, PruningParams

__all__ = [
    "PROTOCOLS",
    "PaperRule",
    "PAPER_RULES",
    "paper_rule",
    "protocol_params",
    "fixed_params",
    "protocol_data",
    "protocol_info",
    "parse_label",
]


@dataclass(frozen=True)
class PaperRule:
    """A defense's rule under ``protocol=paper``: the hyperparameters it fixes and where they come from."""

    params: Mapping[str, Any] = field(default_factory=dict)
    source: str = ""


_THRESHOLD_02 = {"operating_point": "threshold", "threshold": 0.2}

#: defense -> its paper rule; None: the method has no paper (refused under protocol=paper)
PAPER_RULES: Dict[str, Optional[PaperRule]] = {
    "anp": PaperRule(_THRESHOLD_02, "prune every neuron whose ANP mask is <= 0.2 (Wu & Wang 2021)"),
    "rnp": PaperRule(_THRESHOLD_02, "prune every neuron whose recovered mask is <= 0.2 (Li et al. 2023)"),
    "clp": PaperRule(
        {"u": 3.0}, "prune channels with UCLC > mean + 3 std of their layer, data-free (Zheng et al. 2022)"
    ),
    "fp": PaperRule(
        {"operating_point": "first_drop", "delta": 0.04, "max_fraction": 1.0},
        "prune classifier units one at a time, most dormant first, and stop before the first count whose "
        "clean-accuracy drop on the defender's images exceeds 4%; then fine-tune (Liu et al. 2018)",
    ),
    "ft": PaperRule({}, "fine-tune with the default hyperparameters; the last epoch (nothing held out)"),
    "awm": PaperRule({}, "the default (reference) hyperparameters; no operating point (Chai & Chen 2022)"),
    "ngf": PaperRule({}, "the default (reference) hyperparameters; no operating point (Karim et al. 2023)"),
    "sau": PaperRule({}, "the default (reference) hyperparameters; no operating point (Wei et al. 2023)"),
    "fst": PaperRule(
        {}, "the default (reference) hyperparameters, the last epoch; no operating point (Min et al. 2023)"
    ),
    "magnitude": None,
    "random": None,
}

#: protocol -> the defense data a defense fitted under it sees (None stays None: data-free methods)
_PROTOCOL_DATA: Dict[str, Callable[[DefenseData], DefenseData]] = {
    "delta": lambda data: data,
    "paper": DefenseData.whole_pool,
}

#: protocol -> what its images are used for (recorded in every run)
_FIT_ON = {
    "delta": "fit on defense-train; operating point chosen on defense-validation",
    "paper": "fit on the whole pool (defense-train and defense-validation together); the paper's fixed rule",
}


def paper_rule(method: str) -> PaperRule:
    """The paper rule of ``method`` (:data:`PAPER_RULES`). A defense that is not listed keeps its
    defaults if it has no pruning operating point; one that has is refused, as are methods listed
    with None (no paper)."""
    if method in PAPER_RULES:
        rule = PAPER_RULES[method]
        if rule is None:
            raise DefenseError(
                f"{method!r} has no paper operating point (it is a reference baseline, not a published "
                f"defense); run it with protocol=delta"
            )
        return rule
    if issubclass(DEFENSES.get(method).Params, PruningParams):
        raise DefenseError(
            f"no paper rule is registered for the pruning defense {method!r} "
            f"(baselines.protocols.PAPER_RULES); run it with protocol=delta"
        )
    return PaperRule({}, "its default hyperparameters (no pruning operating point), fitted on the whole pool")


def fixed_params(method: str, protocol: str) -> FrozenSet[str]:
    """The hyperparameters of ``method`` that ``protocol`` fixes (none for delta)."""
    return frozenset(paper_rule(method).params) if check_protocol(protocol) == "paper" else frozenset()


def protocol_params(method: str, protocol: str, params: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The hyperparameters of ``method`` under ``protocol``: ``params`` as given for ``delta``; for
    ``paper`` the paper rule's keys are set on top. A key of ``params`` that the rule fixes to another
    value is an error (the rule is the protocol), naming the key and the rule."""
    params = dict(params or {})
    if check_protocol(protocol) == "delta":
        return params
    rule = paper_rule(method)
    clash = sorted(k for k, v in params.items() if k in rule.params and v != rule.params[k])
    if clash:
        fixed = ", ".join(f"{k}={rule.params[k]!r}" for k in rule.params)
        raise DefenseError(
            f"protocol=paper fixes {fixed} for {method!r} (the paper's rule); drop "
            f"{', '.join(f'{k}={params[k]!r}' for k in clash)} or use protocol=delta"
        )
    return {**params, **rule.params}


def protocol_data(protocol: str, data: Optional[DefenseData]) -> Optional[DefenseData]:
    """The defense data a defense sees under ``protocol``: ``data`` itself (``delta``) or its whole
    pool (``paper``: train = defense-train then defense-val, no validation images)."""
    fn = _PROTOCOL_DATA[check_protocol(protocol)]
    return None if data is None else fn(data)


def protocol_info(
    method: str, protocol: str, pool: Optional[DefenseData], seen: Optional[DefenseData]
) -> Dict[str, Any]:
    """What a run records about its protocol: the name, the images the defense was given to fit on
    (``fit_images``) and to choose on (``val_images``), the size of the defender's pool, and the rule."""
    info: Dict[str, Any] = {
        "name": protocol,
        "fit_images": len(seen.train_y) if seen is not None else 0,
        "val_images": len(seen.val_y) if seen is not None else 0,
        "pool_images": len(pool.train_y) + len(pool.val_y) if pool is not None else 0,
        "uses": _FIT_ON[protocol] if seen is not None else "no images (data-free)",
    }
    if protocol == "paper":
        rule = paper_rule(method)
        info.update(rule=rule.source, paper_params=dict(rule.params))
    return info


_LABEL = re.compile(r"(?P<name>.+?)\[(?P<protocol>[^\[\]]*)\]")


def parse_label(label: str) -> Tuple[str, Optional[str]]:
    """A leaderboard label ``NAME[PROTOCOL]`` -> ``(NAME, PROTOCOL)``: ``"anp[paper]"`` -> ``("anp",
    "paper")``; a label without a trailing ``[...]`` is a plain name: ``"anp"`` -> ``("anp", None)`` (the
    default protocol, delta). An unknown protocol is an error listing the valid ones."""
    m = _LABEL.fullmatch(label)
    if m is None:
        return label, None
    if m.group("protocol") not in PROTOCOLS:
        raise DefenseError(
            f"unknown protocol {m.group('protocol')!r} in {label!r}; valid choices: {', '.join(PROTOCOLS)} "
            f"(e.g. {m.group('name')}[paper])"
        )
    return m.group("name"), m.group("protocol")
