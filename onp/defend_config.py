"""The typed configuration of one ``onp.defend`` run (:class:`DefendConfig`): defend a model you received.

Types and ranges are checked when the config is built, before anything runs (a wrong type, NaN,
infinity, an out-of-range number or an unknown key is one :class:`~onp.config.ConfigError` naming
the key). Names that live above the core (the defense: ``ppo-gnn``, ``auto`` or a baseline; the ASR
estimator) are looked up in their registries by :func:`onp.defend.run_defend` before any model is
loaded.

>>> cfg = DefendConfig.from_dict({"arch": "resnet18", "weights": "suspect.pt", "clean_data": "imgs/"})
>>> cfg.defense, cfg.asr_estimator, cfg.anomaly_threshold
('ppo-gnn', 'synthesized-multi', 2.0)

The backdoor verdict (docs/defend.md): before pruning, the ``synthesized-multi`` estimator
reverse-engineers one trigger per class and trigger family (a patch and a whole-image blend) from the
defense-train images (Neural Cleanse, Wang et al., IEEE S&P 2019) and takes the class whose trigger is
the most anomalously small as the estimated target. With the default detector (``confirmed-or-margin``)
the model is **suspected** when a class's anomaly index (the MAD index of the log trigger sizes, within
the family) is at most -2 and a second statistic of its trigger confirms it (the latent gap of
:mod:`envs.latent_gap` or the mask compactness of :mod:`envs.compactness`), or when its latent gap
alone is large (:func:`onp.backdoor_verdict.confirmed_target`); or else when the largest per-class
maximum margin (MM-BD, :mod:`envs.max_margin`) has a p-value below 0.005, its class then the target.
With ``estimator_params.detector="trigger-size"`` it is suspected when the estimated target's index is
at most ``-anomaly_threshold`` (default 2: Neural Cleanse's threshold, on the small side); the
``confirmed`` and ``confirmed-or-margin`` rules' thresholds are fixed, so another ``anomaly_threshold``
with them is refused. Otherwise nothing is pruned unless ``force``.
``asr_estimator="synthesized"`` gives the patch-only verdict of earlier versions.
"""

from __future__ import annotations

from typing import Any, ClassVar, Dict, List, Literal, Mapping, Optional, Tuple, Union

from pydantic import AliasChoices, Field, field_validator, model_validator

from .backdoor_verdict import DEFAULT_ANOMALY_THRESHOLD, check_detector_threshold
from .config import check_finite, deep_update
from .train_config import TrainConfig, TypedConfig, check_device

__all__ = ["DefendConfig", "DEFAULT_PORTFOLIO", "LEARNED_REPAIR_DEFAULTS", "TRAIN_KEYS_FROM_DEFEND", "is_user_arch"]

#: the defenses ``defense="auto"`` tries by default: the learned policy and two fast baselines
DEFAULT_PORTFOLIO = ("ppo-gnn", "clp", "fp")
#: where the learned repair of ``onp.defend`` differs from ``onp.train``'s defaults (``train`` overrides
#: them): Feature Shift Tuning finishes the kept pruning. Chosen by a rule written before seven held-out
#: zoo models were trained: mean test DER 0.901 against plain fine-tuning's 0.784 (docs/results.md §21c)
LEARNED_REPAIR_DEFAULTS: Dict[str, Any] = {"rollout": {"finetune": {"method": "fst"}}}
#: training-config keys that ``train`` may not set: :class:`DefendConfig` sets them (one place each)
TRAIN_KEYS_FROM_DEFEND = (
    "backdoor",
    "checkpoint",
    "data_dir",
    "seed",
    "device",
    "torch_threads",
    "cache_dir",
    "deterministic",
    "agent",
    "agent_params",
)
#: ``train.env`` keys that :class:`DefendConfig` sets
ENV_KEYS_FROM_DEFEND = ("asr_estimator", "estimator_params")


def is_user_arch(arch: str) -> bool:
    """Whether ``arch`` names the user's own code (``path/file.py:Class`` or ``package.module:factory``)
    rather than a registered architecture."""
    return ":" in arch


class DefendConfig(TypedConfig):
    """Everything one ``onp.defend`` run depends on (see the module doc and docs/defend.md).

    The model is ``arch`` (a registered architecture built with ``width``, ``num_classes``,
    ``in_channels`` and ``mean``/``std``, or ``path/file.py:Class`` / ``package.module:factory`` for
    your own ``nn.Module``) with ``weights``; the Python API :func:`onp.defend.defend` takes the model
    object instead and leaves both ``None``. ``arch`` may stay ``None`` with a BackdoorBench ``weights``
    file, which names its architecture (:func:`onp.user_model.resolve_arch` fills in what was not given).
    """

    config_name: ClassVar[str] = "defend config"

    # the model
    arch: Optional[str] = Field(None, min_length=1, description="registered architecture or file.py:Class")
    weights: Optional[str] = Field(None, min_length=1, description="state_dict .pt/.pth, .safetensors, BackdoorBench")
    width: Optional[int] = Field(None, ge=1, le=4096, description="first-stage width (default: the architecture's)")
    num_classes: int = Field(10, ge=2, le=100_000)
    in_channels: Literal[1, 3] = 3
    input_size: Union[int, List[int]] = Field(32, description="image height (= width), or [height, width]")
    mean: Optional[List[float]] = Field(None, description="per-channel normalisation put in front of the model")
    std: Optional[List[float]] = None

    # the defender's data
    clean_data: Optional[str] = Field(None, min_length=1, description="ImageFolder folder, .npz, or a dataset name")
    indices: Optional[str] = Field(None, min_length=1, description="with a dataset name: its train-split indices")
    test_data: Optional[str] = Field(None, min_length=1, description="optional held-out set (same formats)")
    test_indices: Optional[str] = Field(None, min_length=1)
    data_dir: Optional[str] = Field(None, min_length=1)
    data_source: Literal["auto", "full", "sample"] = "auto"
    val_fraction: float = Field(0.5, gt=0, lt=1, description="share of the clean images for defense-validation")
    hflip: bool = Field(
        False,
        description="horizontal flips keep your labels (clothes, most photos; not digits, text or traffic signs): "
        "the defenses' training then flips images too, as onp.baseline and onp.compare do on such a dataset",
    )

    # the defense
    defense: str = Field(
        "ppo-gnn",
        min_length=1,
        validation_alias=AliasChoices("defense", "method"),
        description="ppo-gnn, auto, or a baseline ('method' in configs written before it was renamed)",
    )
    params: Dict[str, Any] = Field(default_factory=dict, description="the baseline's hyperparameters")
    portfolio: List[str] = Field(
        default_factory=lambda: list(DEFAULT_PORTFOLIO), min_length=1, description="the defenses defense='auto' tries"
    )
    asr_estimator: str = Field("synthesized-multi", min_length=1)
    estimator_params: Dict[str, Any] = Field(default_factory=dict, description="e.g. steps, l1_weight")
    anomaly_threshold: float = Field(
        DEFAULT_ANOMALY_THRESHOLD,
        gt=0,
        le=100,
        description="detector trigger-size: suspected when the target's index <= -this (confirmed rules: fixed at 2)",
    )
    force: bool = Field(False, description="defend even when no backdoor is suspected")
    train: Dict[str, Any] = Field(default_factory=dict, description="onp.train config overrides (ppo-gnn)")
    policy: Optional[str] = Field(
        None,
        min_length=1,
        description="ppo-gnn: a trained policy (an onp.train run folder: policy.pt + policy.json) applied without "
        "training, e.g. a multi-model policy (weights only; its env feature settings must be train.env's)",
    )

    # trigger-aware test metrics (optional; never used to choose anything)
    attack: Optional[str] = Field(None, min_length=1, description="a registered attack: test ASR (trigger-aware)")
    attack_params: Dict[str, Any] = Field(default_factory=dict)
    trigger_image: Optional[str] = Field(None, min_length=1, description="a known trigger's pattern (PNG/JPEG)")
    trigger_mask: Optional[str] = Field(None, min_length=1, description="its mask (greyscale, white = trigger)")
    target: Optional[int] = Field(None, ge=0, description="the known trigger's target class (or the attack's)")

    # running
    seed: int = Field(0, ge=0)
    deterministic: bool = False
    device: str = "cpu"
    torch_threads: Optional[int] = Field(None, ge=1, le=1024)
    cache_dir: Optional[str] = Field(None, min_length=1)

    @field_validator("arch")
    @classmethod
    def _arch(cls, v: Optional[str]) -> Optional[str]:
        if v is None or is_user_arch(v):
            return v
        from .models import MODELS

        MODELS.check(v)
        return v

    @field_validator("input_size")
    @classmethod
    def _size(cls, v: Union[int, List[int]]) -> Union[int, List[int]]:
        sizes = [v] if isinstance(v, int) else v
        if len(sizes) not in (1, 2) or any(s < 1 or s > 65_536 for s in sizes):
            raise ValueError(f"input_size must be a size >= 1 or [height, width]; got {v!r}")
        return v

    @field_validator("mean", "std")
    @classmethod
    def _stats(cls, v: Optional[List[float]]) -> Optional[List[float]]:
        if v is not None and not 1 <= len(v) <= 3:
            raise ValueError(f"needs 1 value or one per channel; got {len(v)}")
        return v

    @field_validator("asr_estimator")
    @classmethod
    def _estimator(cls, v: str) -> str:
        if v == "trigger":
            raise ValueError(
                "'trigger' needs the attack's real trigger, which a defender of a received model does "
                "not have; use 'synthesized-multi' (reverse-engineered from the clean images)"
            )
        return v

    @field_validator("params", "estimator_params", "attack_params")
    @classmethod
    def _finite(cls, v: Dict[str, Any]) -> Dict[str, Any]:
        return check_finite(v)

    @field_validator("train")
    @classmethod
    def _train(cls, v: Dict[str, Any]) -> Dict[str, Any]:
        taken = sorted(k for k in v if k in TRAIN_KEYS_FROM_DEFEND)
        env = v.get("env")
        if isinstance(env, Mapping):
            taken += [f"env.{k}" for k in env if k in ENV_KEYS_FROM_DEFEND]
        if taken:
            raise ValueError(f"{', '.join(taken)} cannot be set here: they are keys of the defend config itself")
        if v.get("multi_model"):
            raise ValueError(
                "multi_model cannot be set here: onp.defend trains on the one model you give it (a policy "
                "for many zoo models is trained with onp.train --config configs/train/multi_model.yaml)"
            )
        TrainConfig.from_dict(v)  # types, ranges, unknown keys (a ConfigError names the key)
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        return check_device(v)

    @model_validator(mode="after")
    def _consistent(self) -> DefendConfig:
        if (self.mean is None) != (self.std is None):
            raise ValueError("mean and std go together: give both or neither")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if values is not None and len(values) not in (1, self.in_channels):
                raise ValueError(f"{name} needs 1 value or {self.in_channels} (one per channel); got {len(values)}")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ValueError(f"std must be > 0; got {self.std}")
        if self.test_indices is not None and self.test_data is None:
            raise ValueError("test_indices needs test_data (a dataset name)")
        if self.attack is None and self.attack_params:
            raise ValueError("attack_params needs attack")
        uses_ppo_gnn = self.defense == "ppo-gnn" or (self.defense == "auto" and "ppo-gnn" in self.portfolio)
        if self.policy is not None and not uses_ppo_gnn:
            raise ValueError(
                "policy is a ppo-gnn policy: it needs defense ppo-gnn (or auto with ppo-gnn in its portfolio)"
            )
        self._check_known_trigger()
        check_detector_threshold(self.asr_estimator, self.estimator_params, self.anomaly_threshold)
        return self

    def _check_known_trigger(self) -> None:
        """``trigger_image`` and ``trigger_mask`` come together, with ``target``, and not with ``attack``."""
        image, mask = self.trigger_image is not None, self.trigger_mask is not None
        if image != mask:
            raise ValueError("trigger_image and trigger_mask go together: give both (--trigger-image, --trigger-mask)")
        if image and self.attack is not None:
            raise ValueError("give a known trigger either as attack or as trigger_image/trigger_mask, not both")
        if image and self.target is None:
            raise ValueError("trigger_image needs target: the class the trigger sends images to (--target)")
        if self.target is not None and not (image or self.attack is not None):
            raise ValueError("target is the known trigger's target class: it needs attack or trigger_image")

    @property
    def trigger_aware(self) -> bool:
        """Whether the report measures test ASR with a trigger the user knows."""
        return self.attack is not None or self.trigger_image is not None

    @property
    def image_size(self) -> Tuple[int, int]:
        """``(height, width)`` of the model's input."""
        sizes = [self.input_size] if isinstance(self.input_size, int) else list(self.input_size)
        return (sizes[0], sizes[-1])

    def learned_config(self) -> Dict[str, Any]:
        """The resolved ``onp.train`` config of the learned defense: the defaults,
        :data:`LEARNED_REPAIR_DEFAULTS`, ``train``, and this config's estimator, seed, device, threads and
        cache (a plain dict, as ``onp.train`` uses it)."""
        env = {
            **dict(self.train.get("env") or {}),
            "asr_estimator": self.asr_estimator,
            "estimator_params": dict(self.estimator_params),
        }
        return TrainConfig.from_dict(
            {
                **deep_update(LEARNED_REPAIR_DEFAULTS, self.train),
                "env": env,
                "seed": self.seed,
                "device": self.device,
                "torch_threads": self.torch_threads,
                "cache_dir": self.cache_dir,
                "deterministic": self.deterministic,
            }
        ).to_dict()
