"""The typed configuration of one ``onp.baseline`` run (:class:`BaselineRunConfig`).

Types and ranges are checked when it is built; the defense's name and its hyperparameters are checked
against the baseline's own declared ``Params`` by :func:`onp.baseline.run_baseline` before any
model is loaded.

>>> cfg = BaselineRunConfig(defense="anp", backdoor={"attack": "blend"}, params={"iterations": 500})
>>> cfg.backdoor["attack"], cfg.oracle_max_fraction, cfg.protocol
('blend', 0.5, 'delta')

``protocol`` (:data:`onp.data.defense.PROTOCOLS`) is which defender images the defense fits on and
which rule sets its operating point: ``delta`` (default: fit on defense-train, the largest pruning
within ``delta`` on defense-validation) or ``paper`` (the paper's fixed rule, fitted on the whole
pool; :mod:`baselines.protocols`).
"""

from __future__ import annotations

from typing import Any, ClassVar, Dict, Mapping, Optional

from pydantic import AliasChoices, Field, field_validator, model_validator

from .config import check_finite
from .data.defense import PROTOCOLS, check_protocol
from .train_config import TypedConfig, check_device, resolved_backdoor

__all__ = ["BaselineRunConfig"]


class BaselineRunConfig(TypedConfig):
    """One baseline defense on one backdoored model.

    The model is ``checkpoint`` (an existing model folder) or ``backdoor`` (a
    :class:`onp.zoo.BackdoorConfig` mapping: fetched from the zoo, trained on first use).
    """

    config_name: ClassVar[str] = "baseline config"

    defense: str = Field(
        min_length=1,
        validation_alias=AliasChoices("defense", "method"),
        description="the baseline defense's registered name ('method' in configs written before it was renamed)",
    )
    protocol: str = Field(
        PROTOCOLS[0],
        description="delta (fit on defense-train, choose on defense-val) or paper (the paper's fixed rule, "
        "fitted on the whole pool)",
    )
    params: Dict[str, Any] = Field(default_factory=dict, description="the defense's hyperparameters")
    backdoor: Optional[Dict[str, Any]] = None
    checkpoint: Optional[str] = Field(None, min_length=1)
    defense_seed: Optional[int] = Field(None, ge=0, description="default: the backdoored model's seed")
    deterministic: bool = False
    device: str = Field(
        "cpu", description="where the defense computes (cpu, cuda, cuda:N, mps); results are written from the CPU"
    )
    oracle: bool = Field(True, description="write oracle_sweep.json (test-set analysis, never used to choose)")
    oracle_max_fraction: float = Field(0.5, gt=0, le=1)
    oracle_step: float = Field(0.01, gt=0, le=1)
    cache_dir: Optional[str] = Field(None, min_length=1)
    data_dir: Optional[str] = Field(None, min_length=1)

    @field_validator("backdoor")
    @classmethod
    def _backdoor(cls, v: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
        return None if v is None else resolved_backdoor(v)

    @field_validator("protocol")
    @classmethod
    def _protocol(cls, v: str) -> str:
        return check_protocol(v)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        return check_device(v)

    @field_validator("params")
    @classmethod
    def _finite(cls, v: Dict[str, Any]) -> Dict[str, Any]:
        return check_finite(v, "params")

    @model_validator(mode="before")
    @classmethod
    def _one_model(cls, data: Any) -> Any:
        """The model is a zoo config or a model folder, not both (neither: the default zoo config)."""
        if not isinstance(data, Mapping):
            return data
        if data.get("backdoor") is not None and data.get("checkpoint") is not None:
            raise ValueError("give the model as backdoor (a zoo config) or checkpoint (a model folder), not both")
        if data.get("backdoor") is None and data.get("checkpoint") is None:
            return {**data, "backdoor": {}}
        return data
