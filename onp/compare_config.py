"""The typed configuration of one ``onp.compare`` grid (:class:`CompareConfig`): the single source of
its defaults.

A grid is models x attacks x defenses x seeds; every (model, attack, seed) is one backdoored model
from the zoo, shared by the defenses. The sections group the rest: ``backdoor`` (the zoo settings
of those models), ``defense`` (the defenses' hyperparameters and the baselines' oracle sweep),
``train`` (the ``onp.train`` settings of the learned-policy cells), ``execution`` and ``output``.
Types and ranges are checked when the config is built, before anything runs: a wrong type, NaN,
infinity, an out-of-range value or an unknown key is a :class:`~onp.config.ConfigError` naming the
key. ``configs/compare/default.yaml`` spells out the same defaults (a test keeps the two equal);
YAML files (``--config``), the flags and ``--set`` only override them.

>>> cfg = CompareConfig.from_dict({"attacks": ["badnets", "blend"], "seed_list": [2, 0, 2],
...                                "defense": {"params": {"anp": {"iterations": 500}}}})
>>> cfg.seed_values(), cfg.defenses, cfg.execution.executor
([2, 0], ['clp', 'magnitude'], 'local')

The names (models, attacks, defenses, agents) are looked up in their registries by
:func:`onp.compare.run_compare`, which sits above the core, before any model is trained.
"""

from __future__ import annotations

from typing import Any, ClassVar, Dict, List, Literal, Optional, Tuple

import torch
from pydantic import Field, field_validator, model_validator
from typing_extensions import Annotated, Self

from .config import check_finite, deep_update
from .train_config import TypedConfig, resolved_backdoor

__all__ = [
    "CompareConfig",
    "GridBackdoorConfig",
    "GridDefenseConfig",
    "GridTrainConfig",
    "ExecutionConfig",
    "OutputConfig",
    "GRID_AXES",
]

#: BackdoorConfig keys that the grid's axes set per cell (``models``, ``attacks``, seeds)
GRID_AXES = ("model", "attack", "seed")

Name = Annotated[str, Field(min_length=1)]
Seed = Annotated[int, Field(ge=0)]


class GridBackdoorConfig(TypedConfig):
    """The grid's backdoored models: :class:`onp.zoo.BackdoorConfig` keys besides the grid's axes
    (model, attack, seed). ``None`` keeps the zoo's default (e.g. the architecture's own width)."""

    dataset: str = Field("fashion-mnist", min_length=1)
    width: Optional[int] = None
    epochs: Optional[int] = None
    data_source: Optional[Literal["auto", "full", "sample"]] = None
    defense_size: Optional[int] = None
    max_train: Optional[int] = None
    overrides: Dict[str, Any] = Field(
        default_factory=dict, description="any other BackdoorConfig key (--backdoor-set), e.g. poison_rate"
    )
    data_dir: Optional[str] = Field(None, min_length=1, description="folder holding the dataset (an error if not)")
    cache_dir: Optional[str] = Field(None, min_length=1, description="artifact cache (default $ONP_CACHE)")

    #: the BackdoorConfig keys that are fields of this section
    NAMED: ClassVar[Tuple[str, ...]] = ("width", "epochs", "data_source", "defense_size", "max_train")

    def for_cell(self, model: str, attack: str, seed: int) -> Dict[str, Any]:
        """The (unresolved) BackdoorConfig mapping of the grid's model (``model``, ``attack``, ``seed``):
        the named keys, then ``overrides``."""
        data: Dict[str, Any] = {"model": model, "dataset": self.dataset, "attack": attack, "seed": seed}
        data.update({key: getattr(self, key) for key in self.NAMED if getattr(self, key) is not None})
        return deep_update(data, self.overrides)

    @model_validator(mode="after")
    def _a_valid_backdoor_config(self) -> Self:
        """Types and ranges are the zoo's (:class:`onp.zoo.BackdoorConfig`, the one source of them);
        the grid's axes are not overridden here."""
        axes = sorted(set(self.overrides) & set(GRID_AXES))
        if axes:
            raise ValueError(f"overrides may not set {', '.join(axes)}: the grid's models, attacks and seeds do")
        stand_in = self.for_cell("resnet18", "badnets", 0)  # the zoo's defaults stand in for the grid's axes
        resolved_backdoor({key: val for key, val in stand_in.items() if key not in GRID_AXES})
        return self


class GridDefenseConfig(TypedConfig):
    """The defenses' hyperparameters and the baselines' oracle sweep (analysis only)."""

    params: Dict[str, Any] = Field(
        default_factory=dict,
        description="{DEFENSE: {KEY: VALUE}} for one defense; {KEY: VALUE} for every "
        "selected baseline that has the key",
    )
    oracle: bool = Field(True, description="the baselines' oracle sweeps (oracle_sweep.json)")
    oracle_max_fraction: Optional[float] = Field(None, gt=0, le=1, description="None: the baseline run's default")

    @field_validator("params")
    @classmethod
    def _finite(cls, v: Dict[str, Any]) -> Dict[str, Any]:
        return check_finite(v, "params")


class GridTrainConfig(TypedConfig):
    """The ``onp.train`` settings of the learned-policy cells (agents such as ``ppo-gnn``)."""

    config: Optional[str] = Field(None, min_length=1, description="a YAML training config (onp.train --config)")
    overrides: Dict[str, Any] = Field(
        default_factory=dict,
        description="TrainConfig keys (onp.train --set); checked as a TrainConfig, per learned policy, before any work",
    )
    timesteps: Optional[int] = Field(None, ge=0, le=10**9, description="ppo.total_timesteps")
    asr_estimator: Optional[str] = Field(None, min_length=1, description="env.asr_estimator")
    device: Optional[str] = Field(
        None, description="of every cell (onp.train and the baselines) and of training the backdoored models"
    )

    @field_validator("device")
    @classmethod
    def _device_name(cls, v: Optional[str]) -> Optional[str]:
        """A device name torch understands; whether this machine has it is checked by the run (with
        ``executor: ray`` only the workers need it)."""
        if v is None:
            return v
        try:
            kind = torch.device(v).type
        except (RuntimeError, TypeError):
            kind = None
        if kind not in ("cpu", "cuda", "mps"):
            raise ValueError(f"unknown device {v!r}; valid: cpu, cuda, cuda:N, mps")
        return v


class ExecutionConfig(TypedConfig):
    """Where and how the cells run (:mod:`onp.executors`)."""

    executor: Literal["local", "processes", "ray"] = "local"
    jobs: int = Field(1, ge=1, le=4096, description="parallel local processes (> 1: the processes executor)")
    ray_address: Optional[str] = Field(None, min_length=1, description="None: start a local Ray")
    ray_num_cpus: Optional[int] = Field(None, ge=1, le=10**6, description="CPUs of a locally started Ray")
    deterministic: bool = Field(False, description="deterministic torch algorithms in every cell")


class OutputConfig(TypedConfig):
    """The grid folder and what is printed."""

    out: Optional[str] = Field(None, min_length=1, description="None: runs/compare/<models>")
    overwrite: bool = Field(False, description="start again; the old grid goes once the new one has finished")
    report_only: bool = Field(False, description="only rebuild the leaderboard and plots")
    plots: bool = True
    quiet: bool = False


class CompareConfig(TypedConfig):
    """Everything one ``onp.compare`` grid depends on; ``CompareConfig()`` is the default grid
    (CLP and magnitude pruning on a BadNets ResNet-18, Fashion-MNIST, one seed)."""

    config_name: ClassVar[str] = "compare config"

    models: List[Name] = Field(default_factory=lambda: ["resnet18"], min_length=1)
    attacks: List[Name] = Field(default_factory=lambda: ["badnets"], min_length=1)
    defenses: List[Name] = Field(
        default_factory=lambda: ["clp", "magnitude"],
        min_length=1,
        description="baselines (onp.baseline --list) and/or agents (onp.train --list)",
    )
    seeds: int = Field(1, ge=1, le=10_000, description="seeds 0 .. seeds-1 (unless seed_list)")
    seed_list: Optional[List[Seed]] = Field(None, min_length=1, description="explicit seeds (win over seeds)")
    backdoor: GridBackdoorConfig = Field(default_factory=GridBackdoorConfig)
    defense: GridDefenseConfig = Field(default_factory=GridDefenseConfig)
    train: GridTrainConfig = Field(default_factory=GridTrainConfig)
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    def seed_values(self) -> List[int]:
        """The grid's seeds: ``seed_list`` without repeats, else ``0 .. seeds-1``."""
        return list(dict.fromkeys(self.seed_list)) if self.seed_list else list(range(self.seeds))
