"""The typed configuration of one ``onp.evaluate`` run (:class:`EvaluateConfig`): a learned policy or
a fixed pruned set (``source``) applied to a target model without re-fitting.

>>> cfg = EvaluateConfig(policy="runs/train/x", target={"attack": "blend"})
>>> cfg.kind, cfg.target
('policy', {'attack': 'blend'})
"""

from __future__ import annotations

from typing import Any, ClassVar, Dict, Literal, Optional

from pydantic import Field, field_validator, model_validator

from .config import check_finite
from .train_config import TypedConfig, check_device

__all__ = ["EvaluateConfig"]


class EvaluateConfig(TypedConfig):
    """What to apply (``policy`` or ``pruned``, a run folder) and to which model.

    The target is ``checkpoint`` (a model folder), or the source run's backdoored-model config with
    the keys of ``target`` changed (``{"attack": "blend"}``, ``{"seed": 1}``, ``{"clean": True}``, any
    :class:`onp.zoo.BackdoorConfig` key; a new ``model`` without ``width`` takes that model's default).
    """

    config_name: ClassVar[str] = "evaluate config"

    policy: Optional[str] = Field(None, min_length=1, description="an onp.train run folder")
    pruned: Optional[str] = Field(None, min_length=1, description="any run folder with pruned.json")
    checkpoint: Optional[str] = Field(None, min_length=1, description="the target model folder")
    target: Dict[str, Any] = Field(default_factory=dict, description="BackdoorConfig keys changed in the target")
    agent: Optional[str] = Field(None, min_length=1, description="repeat a file/module agent spec to allow it")
    env_seed: Optional[int] = Field(None, ge=0, description="default: the policy's seed")
    prune_mode: Optional[Literal["gamma", "channel"]] = None
    force: Optional[bool] = Field(
        None,
        description="policy: keep the pruning even when the backdoor verdict finds no backdoor "
        "(default: the source run's rollout.force)",
    )
    finetune_method: Optional[Literal["ft", "fst"]] = Field(
        None, description="policy: the finisher after pruning (default: the source run's rollout.finetune.method)"
    )
    device: Optional[str] = None
    deterministic: bool = False
    cache_dir: Optional[str] = Field(None, min_length=1)
    data_dir: Optional[str] = Field(None, min_length=1)

    @field_validator("target")
    @classmethod
    def _finite(cls, v: Dict[str, Any]) -> Dict[str, Any]:
        return check_finite(v, "target")

    @field_validator("device")
    @classmethod
    def _device(cls, v: Optional[str]) -> Optional[str]:
        return None if v is None else check_device(v)

    @model_validator(mode="after")
    def _one_source(self) -> "EvaluateConfig":
        if (self.policy is None) == (self.pruned is None):
            raise ValueError("give exactly one source: policy (an onp.train run) or pruned (a run with pruned.json)")
        if self.prune_mode is not None and self.policy is not None:
            raise ValueError("prune_mode applies to pruned only (a policy prunes in its env's mask_mode)")
        if self.force is not None and self.pruned is not None:
            raise ValueError("force applies to policy only (a pruned set is applied as it is)")
        if self.finetune_method is not None and self.pruned is not None:
            raise ValueError("finetune_method applies to policy only (a pruned set is applied as it is)")
        return self

    @property
    def kind(self) -> str:
        """``"policy"`` or ``"pruned"``."""
        return "policy" if self.policy is not None else "pruned"

    @property
    def source(self) -> str:
        return self.policy if self.policy is not None else str(self.pruned)
