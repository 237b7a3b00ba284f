"""The typed configuration of one ``onp.train`` run: the single source of its defaults.

:class:`TrainConfig` nests one model per section (:class:`EnvConfig`, :class:`PolicyConfig`,
:class:`PPOConfig`, :class:`EvalConfig`, :class:`WarmStartConfig`, :class:`RolloutConfig`; the
backdoored model is :class:`onp.zoo.BackdoorConfig`). Values are checked by type and range when
the config is built, before anything runs: a string or a float where an integer belongs, NaN,
infinity, a negative count or an unknown key is a :class:`ConfigError` that names the key, the
value and what is expected. ``configs/train/default.yaml`` spells out the same defaults (a test
keeps the two equal); YAML files and ``--set`` only override them.

>>> cfg = TrainConfig.from_dict({"env": {"budget": 30}, "ppo": {"total_timesteps": 512}})
>>> cfg.env.delta, cfg.ppo.learning_rate
(0.1, 0.001)

Names (agent, ASR estimator, warm-start baseline, feature providers) are looked up in their
registries by the run function, which sits above the core, before any model is loaded.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Dict, List, Literal, Mapping, Optional, Tuple

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from typing_extensions import Self

from .backdoor_verdict import DEFAULT_ANOMALY_THRESHOLD, check_detector_threshold
from .config import ConfigError, check_finite, validation_message
from .evidence import EvidenceRule

__all__ = [
    "ConfigError",
    "EnvConfig",
    "PolicyConfig",
    "PPOConfig",
    "EvalConfig",
    "WarmStartConfig",
    "FinetuneConfig",
    "RolloutConfig",
    "TrainConfig",
    "NO_WARM_START",
    "check_device",
]

#: backdoor keys every model of ``multi_model`` shares with ``backdoor`` (one architecture, one dataset)
MULTI_MODEL_SHARED_KEYS = ("model", "width", "dataset")
#: values of ``warm_start.baseline`` (and ``--warm-start``) that mean a cold start
NO_WARM_START = ("none", "null", "")


class TypedConfig(BaseModel):
    """A typed config (or one of its sections): unknown keys, wrong types, NaN and infinity are
    refused. Sizes have sanity caps (e.g. ``policy.hidden <= 4096``) so a typo cannot exhaust memory."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, validate_assignment=True)
    #: how error messages name this config ("training config key env.delta: ...")
    config_name: ClassVar[str] = "config"

    @classmethod
    def from_dict(cls, data: Optional[Mapping[str, Any]] = None) -> Self:
        """Build from a (partial, nested) mapping; errors are one :class:`ConfigError` naming each key."""
        if data is not None and not isinstance(data, Mapping):
            raise ConfigError(f"the {cls.config_name} must be a mapping of keys to values; got {type(data).__name__}")
        try:
            return cls.model_validate(dict(data or {}))
        except ValidationError as exc:
            raise ConfigError(validation_message(exc, cls.config_name)) from None

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON-ready nested dict (what ``config.json`` holds)."""
        return self.model_dump(mode="json")


class EnvConfig(TypedConfig):
    """Arguments of :class:`envs.NeuronPruningEnv` (see its docstring)."""

    budget: float = Field(0.05, gt=0, description="most neurons pruned: a fraction of N in (0, 1) or a count >= 1")
    lam: float = Field(1.0, ge=0, description="reward = dACC - lam * dASR on the reward batch")
    delta: float = Field(0.1, gt=0, le=1, description="most clean-ACC drop on the reward batch")
    reward_batch: Optional[int] = Field(None, ge=1, description="defense-validation images per reward (None: all)")
    asr_estimator: str = Field("trigger", min_length=1)
    estimator_params: Dict[str, Any] = Field(default_factory=dict)
    feature_providers: List[str] = Field(
        default_factory=lambda: ["structure", "bn", "weight_norms", "activation"], min_length=1
    )
    top_k: Optional[int] = Field(16, ge=1, le=10**6)
    mask_mode: Literal["gamma", "channel"] = "gamma"
    group_pruning: bool = False
    invalid_action_penalty: float = Field(0.01, ge=0)
    reject_violations: bool = True

    @field_validator("budget")
    @classmethod
    def _count_is_whole(cls, v: float) -> float:
        if v >= 1 and v != int(v):
            raise ValueError("a budget >= 1 is a neuron count and must be a whole number (or use a fraction < 1)")
        return v

    @field_validator("estimator_params")
    @classmethod
    def _finite_params(cls, v: Dict[str, Any]) -> Dict[str, Any]:
        return check_finite(v)


class PolicyConfig(TypedConfig):
    """:class:`agents.gnn_policy.GNNMaskablePolicy` architecture."""

    conv: Literal["gcn", "sage", "gat"] = "gcn"
    hidden: int = Field(32, ge=1, le=4096)
    layers: int = Field(2, ge=0, le=32)
    heads: int = Field(4, ge=1, le=64)
    symmetric: bool = True
    head_hidden: int = Field(64, ge=1, le=4096)
    edge_weights: Literal["model", "uniform"] = Field(
        "model",
        description="model: the neuron graph's edges weighted by the model's kernel norms; uniform: every edge "
        "weight 1, the architecture's topology alone (a multi-model policy's: one graph for every model, each "
        "model's weights reach the policy through the node features)",
    )


class PPOConfig(TypedConfig):
    """``sb3_contrib.MaskablePPO`` arguments plus the vectorisation of the envs."""

    total_timesteps: int = Field(2560, ge=0, le=10**9)
    n_steps: int = Field(256, ge=1, le=10**6)
    batch_size: int = Field(64, ge=1, le=10**6)
    n_epochs: int = Field(4, ge=1, le=10**4)
    learning_rate: float = Field(0.001, gt=0, le=10)
    gamma: float = Field(1.0, ge=0, le=1)
    gae_lambda: float = Field(0.95, ge=0, le=1)
    clip_range: float = Field(0.2, gt=0)
    ent_coef: float = Field(0.0, ge=0)
    vf_coef: float = Field(0.5, ge=0)
    max_grad_norm: float = Field(0.5, gt=0)
    target_kl: Optional[float] = Field(None, gt=0)
    normalize_advantage: bool = True
    n_envs: int = Field(1, ge=1, le=1024)
    vec_env: Literal["dummy", "subproc"] = "dummy"
    env_threads: Optional[int] = Field(None, ge=1, le=1024)

    #: keys that are not MaskablePPO constructor arguments
    NOT_PPO_ARGS: ClassVar[Tuple[str, ...]] = ("total_timesteps", "n_envs", "vec_env", "env_threads")

    def ppo_kwargs(self) -> Dict[str, Any]:
        """The ``MaskablePPO(...)`` keyword arguments."""
        return {k: v for k, v in self.model_dump().items() if k not in self.NOT_PPO_ARGS}


class EvalConfig(TypedConfig):
    """Deterministic defense-validation episodes during training."""

    freq: int = Field(256, ge=1, le=10**9, description="env steps between evaluations")
    episodes: int = Field(1, ge=1, le=1000)


class WarmStartConfig(TypedConfig):
    """Behaviour cloning of a baseline's pruning order before PPO (``baseline: None`` = cold start)."""

    baseline: Optional[str] = "clp"
    params: Dict[str, Any] = Field(default_factory=dict)
    epochs: int = Field(100, ge=0, le=10**5)
    lr: float = Field(0.003, gt=0, le=10)
    batch_size: int = Field(32, ge=1, le=10**6)
    value_coef: float = Field(0.5, ge=0)
    skip_harmful: bool = True
    max_previews: Optional[int] = Field(None, ge=0)

    @field_validator("baseline")
    @classmethod
    def _cold_start_words(cls, v: Optional[str]) -> Optional[str]:
        return None if v is not None and v.strip().lower() in NO_WARM_START else v

    @field_validator("params")
    @classmethod
    def _finite_params(cls, v: Dict[str, Any]) -> Dict[str, Any]:
        return check_finite(v)


class FinetuneConfig(TypedConfig):
    """Fine-tuning after pruning (:func:`agents.finetune_pruned`): the kept pruning's model is trained on
    defense-train with the pruned neurons held at zero and the BatchNorm statistics frozen; the epoch
    (0 = no fine-tuning) with the best defense-validation return is kept, and the evidence rule judges
    the result. ``epochs: 0`` turns it off. Chosen in docs/results.md §11 on defense data."""

    method: Literal["ft", "fst"] = Field(
        "ft",
        description="ft: plain fine-tuning, the epoch with the best defense-val return kept (the keys below); "
        "fst: Feature Shift Tuning (baselines.fst, its reference settings and last epoch, the augmentation the "
        "FST baseline gets beside it) on the pruned model, the pruned neurons held pruned (docs/results.md §19c, "
        "§25a); when no pruning is kept but a backdoor is "
        "suspected, on the unpruned model (§24a)",
    )
    epochs: int = Field(10, ge=0, le=1000, description="fine-tuning epochs over defense-train (0: off)")
    lr: float = Field(0.001, gt=0, le=10, description="SGD learning rate")
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0, le=1)
    batch_size: int = Field(128, ge=1, le=10**6)
    augment: bool = Field(True, description="random crop and flip of the defense-train images")
    unlearn: List[Annotated[float, Field(ge=0, le=1)]] = Field(
        default_factory=lambda: [0.0, 0.2],
        min_length=1,
        max_length=8,
        description="one fine-tuning per value: that fraction of each batch stamped with the ASR estimator's "
        "trigger, true labels kept (Neural Cleanse's unlearning; 0: plain); the best defense-val return wins",
    )
    unlearn_estimated: bool = Field(
        False,
        description="unlearn a trigger-agnostic estimator's reverse-engineered trigger too (off: its estimate "
        "would then judge the trigger the model was trained against; only the real trigger is unlearned)",
    )
    bn_stats: Literal["frozen", "update"] = Field(
        "frozen",
        description="frozen: BatchNorm keeps the model's statistics; update: re-estimated on the "
        "defense-train batches (restores the backdoor, docs/results.md §11)",
    )


class RolloutConfig(TypedConfig):
    """Which pruning of the final deterministic episode is kept, and how it is fine-tuned.

    A pruning is kept only if (1) with a trigger-inverting ASR estimator, the backdoor verdict
    (:mod:`onp.backdoor_verdict`) suspects a backdoor, or ``force``; (2) its defense-val return is at
    least ``min_return``; (3) "no evidence, no pruning" (``evidence_alpha``, the env's ``delta``).
    Otherwise nothing is pruned and the reason is recorded.
    """

    select: Literal["final", "best_prefix"] = "final"
    min_return: Optional[float] = 0.0
    evidence_alpha: Optional[float] = Field(
        0.05,
        gt=0,
        lt=1,
        description="no evidence, no pruning: keep a pruning only if its estimated-ASR drop is "
        "significant at this level (one-sided Fisher exact test; null: off)",
    )
    removed_asr: float = Field(
        0.1, ge=0, le=1, description="a kept pruning with estimated val ASR at most this is reported as 'removed'"
    )
    anomaly_threshold: float = Field(
        DEFAULT_ANOMALY_THRESHOLD,
        gt=0,
        le=100,
        description="with a trigger-inverting ASR estimator (synthesized, synthesized-multi): a backdoor is "
        "suspected when the estimated target's anomaly index is at most -this; if none is, nothing is pruned",
    )
    force: bool = Field(False, description="keep the pruning even when the backdoor verdict finds no backdoor")
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)

    def evidence_rule(self, max_acc_drop: float) -> EvidenceRule:
        """The :class:`onp.evidence.EvidenceRule` of this config (``max_acc_drop``: the env's ``delta``)."""
        return EvidenceRule(alpha=self.evidence_alpha, max_acc_drop=max_acc_drop, removed_asr=self.removed_asr)


def resolved_backdoor(data: Mapping[str, Any]) -> Dict[str, Any]:
    """A backdoored-model config (:class:`onp.zoo.BackdoorConfig` keys) filled in and checked, as a
    dict; a bad key is named ``backdoor.<key>`` (for the ``backdoor`` field of the run configs)."""
    from .zoo import BackdoorConfig

    try:
        return BackdoorConfig.from_dict(dict(data)).resolved().to_dict()
    except ConfigError as exc:
        raise ValueError(str(exc).replace("backdoor config key ", "backdoor.")) from None


def check_device(device: str) -> str:
    """``cpu``, ``cuda``, ``cuda:N`` or ``mps``, and available on this machine; else a clear error."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {device!r}; valid: cpu, cuda, cuda:N, mps") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {device!r} asked for, but this torch build or machine has no CUDA; pass "
            f"--device cpu, or install a CUDA build of torch"
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} asked for, but MPS is not available; pass --device cpu")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device {device!r}; valid: cpu, cuda, cuda:N, mps")
    return device


class TrainConfig(TypedConfig):
    """Everything one ``onp.train`` run depends on; ``TrainConfig()`` is the default profile.

    The default profile: narrow ResNet-18 (width 16) on Fashion-MNIST with BadNets, the trigger-aware
    ASR estimator, a budget of 5% of the neurons, a behaviour-cloning warm start from CLP's
    data-free order, skipping neurons whose reward on the reward batch would be negative, and
    fine-tuning after pruning (all chosen on defense-validation, docs/results.md §3 and §11).
    """

    backdoor: Dict[str, Any] = Field(
        default_factory=lambda: {
            "model": "resnet18",
            "width": 16,
            "dataset": "fashion-mnist",
            "data_source": "auto",
            "attack": "badnets",
            "seed": 0,
        },
        validate_default=True,
        description="onp.zoo.BackdoorConfig keys (filled in and checked)",
    )
    env: EnvConfig = Field(default_factory=EnvConfig)
    agent: str = Field("ppo-gnn", min_length=1)
    agent_params: Dict[str, Any] = Field(default_factory=dict)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    ppo: PPOConfig = Field(default_factory=PPOConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    warm_start: WarmStartConfig = Field(default_factory=WarmStartConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    multi_model: List[Dict[str, Any]] = Field(
        default_factory=list,
        max_length=256,
        description="more backdoored models to train one policy on together with `backdoor` (each entry: "
        "BackdoorConfig keys that differ from `backdoor`, e.g. {attack: blend, seed: 1}). The env samples one "
        "model per episode; the warm start clones every model's demonstration; the defense-val evaluation "
        "averages the return over all of them. The run's pruning and report are on `backdoor`",
    )
    seed: int = Field(0, ge=0, description="the agent's seed (--seed also sets backdoor.seed)")
    config_name: ClassVar[str] = "training config"

    deterministic: bool = False
    device: str = "cpu"
    torch_threads: Optional[int] = Field(None, ge=1, le=1024)
    cache_dir: Optional[str] = Field(None, min_length=1)
    checkpoint: Optional[str] = Field(None, min_length=1, description="an existing model folder (replaces backdoor)")
    data_dir: Optional[str] = Field(None, min_length=1, description="folder holding the dataset (an error if not)")

    @field_validator("backdoor")
    @classmethod
    def _backdoor(cls, v: Dict[str, Any]) -> Dict[str, Any]:
        return resolved_backdoor(v)

    @field_validator("multi_model")
    @classmethod
    def _multi_model(cls, v: List[Dict[str, Any]], info: ValidationInfo) -> List[Dict[str, Any]]:
        """Each entry merged onto ``backdoor`` and resolved; a repeated model is refused."""
        primary = info.data.get("backdoor")
        if primary is None:  # backdoor itself was refused; its error is reported
            return v
        seen = [primary]
        out = []
        for i, entry in enumerate(v):
            changed = sorted(k for k in MULTI_MODEL_SHARED_KEYS if k in entry and entry[k] != primary.get(k))
            if changed:
                raise ValueError(
                    f"multi_model[{i}] changes {', '.join(changed)}: the models are of one architecture and dataset"
                )
            params = {} if "attack" in entry and entry["attack"] != primary.get("attack") else primary["attack_params"]
            try:
                model = resolved_backdoor({**primary, "attack_params": params, **entry})
            except ValueError as exc:
                raise ValueError(f"multi_model[{i}]: {exc}") from None
            if model in seen:
                raise ValueError(
                    f"multi_model[{i}] is the same model as {'backdoor' if model == primary else 'an earlier entry'}"
                )
            seen.append(model)
            out.append(model)
        return out

    @model_validator(mode="after")
    def _multi_model_needs_one_graph(self) -> Self:
        if self.multi_model and self.policy.edge_weights != "uniform":
            raise ValueError(
                "a multi-model policy acts on several models through one graph: set policy.edge_weights=uniform "
                "(configs/train/multi_model.yaml does)"
            )
        if self.multi_model and self.checkpoint:
            raise ValueError("multi_model trains on zoo models: it cannot be combined with checkpoint")
        check_detector_threshold(self.env.asr_estimator, self.env.estimator_params, self.rollout.anomaly_threshold)
        return self

    @field_validator("agent_params")
    @classmethod
    def _finite_params(cls, v: Dict[str, Any]) -> Dict[str, Any]:
        return check_finite(v, "agent_params")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        return check_device(v)

    @model_validator(mode="before")
    @classmethod
    def _warm_start_for_ppo_only(cls, data: Any) -> Any:
        """The profile's default warm start belongs to ppo-gnn: other agents get a cold start, and
        asking for a warm start with them is an error."""
        if not isinstance(data, Mapping) or data.get("agent", "ppo-gnn") == "ppo-gnn":
            return data
        ws = data.get("warm_start")
        ws = dict(ws) if isinstance(ws, Mapping) else ws
        if isinstance(ws, dict):
            asked = ws.get("baseline")
            if isinstance(asked, str) and asked.strip().lower() not in NO_WARM_START:
                raise ValueError(
                    "--warm-start applies to the ppo-gnn agent only (use --warm-start none with other agents)"
                )
            ws["baseline"] = None
        elif ws is None:
            ws = {"baseline": None}
        return {**data, "warm_start": ws}
