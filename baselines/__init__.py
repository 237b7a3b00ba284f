"""Baseline backdoor defenses behind one interface.

>>> from baselines import build_defense, DEFENSES
>>> result = build_defense("anp", iterations=200).fit(model, bundle.defense_data, seed=0)   # doctest: +SKIP
>>> result.model, result.scores, result.pruned, result.info["operating_point"]               # doctest: +SKIP

Methods (one module each): ``rnp`` (Li et al., ICML 2023), ``anp`` (Wu & Wang, NeurIPS 2021),
``awm`` (Chai & Chen, NeurIPS 2022), ``ngf`` (Karim et al., 2023), ``fp`` (Liu et al., RAID 2018),
``clp`` (Zheng et al., ECCV 2022), ``sau`` (Wei et al., NeurIPS 2023), ``fst`` (Min et al.,
NeurIPS 2023), ``ft`` (fine-tuning), ``magnitude`` and ``random``. All are reimplemented from the
papers; see ``docs/baselines.md``. Neurons are numbered as in :mod:`onp.graph.layout`.

Every module of this package is imported here, so a new method is one module with a
``@register_defense("name")`` class (plus its test) and no line in this file.
"""

from onp.registry import import_submodules

from .base import (
    DEFENSES,
    Defense,
    DefenseError,
    DefenseParams,
    DefenseResult,
    PassCounter,
    PruningParams,
    build_defense,
    register_defense,
)
from .features import NON_SCORING, baseline_scores, register_score_providers
from .operating_point import ORACLE_LABEL, choose_pruning, delta_rule, oracle_sweep, prune_model, pruning_grid

__all__ = [
    "DEFENSES",
    "Defense",
    "DefenseError",
    "DefenseParams",
    "DefenseResult",
    "PassCounter",
    "PruningParams",
    "build_defense",
    "register_defense",
    "ORACLE_LABEL",
    "choose_pruning",
    "delta_rule",
    "oracle_sweep",
    "prune_model",
    "pruning_grid",
    "NON_SCORING",
    "baseline_scores",
    "register_score_providers",
]

import_submodules(__name__, __path__)  # each method module registers itself
