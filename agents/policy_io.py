"""Store and load the GNN policy and the PPO training checkpoint **without pickle**.

Policies are meant to be shared ("apply my policy to your model"), so a policy file is untrusted
input. SB3's ``model.save`` zip holds a pickled ``data`` entry, and SB3's loader unpickles it: a
crafted zip runs code on load. onp therefore stores

* the best policy as ``policy.pt`` (the policy's ``state_dict``: tensors only, read back with
  ``torch.load(weights_only=True)``) plus ``policy.json`` (format, architecture, observation and
  action sizes, and the SHA-256 of ``policy.pt``);
* the resumable training checkpoint as ``checkpoint.pt`` (policy and optimiser ``state_dict``\\ s,
  tensors and plain numbers only) plus ``checkpoint.json`` (step counters, the SHA-256).

Loading rebuilds :class:`~agents.gnn_policy.GNNMaskablePolicy` from the JSON through a fixed table
(no class or module named in a file is ever imported) and loads the tensors into it. A JSON file
that does not match its tensor file (torn write, tampering) is an error that names the file.
SB3's zip format remains available as an explicit export (:func:`export_sb3_zip`) for users who
want to open a policy in plain SB3; onp itself never reads it.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Tuple, Union, cast

import torch
from gymnasium import spaces

from onp.io import CheckpointError, atomic_write_bytes, atomic_write_json, load_checkpoint, read_json

from .gnn_policy import EDGE_WEIGHTS, GNNMaskablePolicy, policy_kwargs_for

if TYPE_CHECKING:
    import gymnasium as gym
    from sb3_contrib import MaskablePPO

    from envs import NeuronPruningEnv

PathLike = Union[str, Path]

POLICY_FORMAT = "onp-gnn-policy/1"
CHECKPOINT_FORMAT = "onp-ppo-checkpoint/1"
POLICY_FILES = ("policy.pt", "policy.json")
CHECKPOINT_FILES = ("checkpoint.pt", "checkpoint.json")
#: the GNN architecture keys stored in ``policy.json`` (everything but the graph itself)
ARCH_KEYS = ("conv", "hidden", "layers", "heads", "symmetric", "clip")
#: state_dict entries that hold the neuron graph: they come from the env the policy acts in
_GRAPH_BUFFERS = ("edge_index", "edge_weight")


def _tensor_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_pair(folder: Path, stem: str, tensors: Any, meta: Dict[str, Any]) -> None:
    """``<stem>.pt`` first, then ``<stem>.json`` naming its digest (both atomic)."""
    data = _tensor_bytes(tensors)
    atomic_write_bytes(folder / f"{stem}.pt", data)
    atomic_write_json(folder / f"{stem}.json", {**meta, "sha256": _sha256(data)})


def _read_pair(folder: Path, stem: str, fmt: str) -> Tuple[Dict[str, Any], Any]:
    """Read and cross-check ``<stem>.json`` and ``<stem>.pt`` (weights-only)."""
    meta_path, pt_path = folder / f"{stem}.json", folder / f"{stem}.pt"
    for path in (meta_path, pt_path):
        if not path.is_file():
            raise CheckpointError(f"{path}: not found" + _legacy_hint(folder, stem))
    meta = read_json(meta_path)
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{meta_path}: not an onp file of format {fmt!r} (found {got!r})")
    digest = _sha256(pt_path.read_bytes())
    if meta.get("sha256") != digest:
        raise CheckpointError(
            f"{pt_path}: does not match {meta_path.name} (SHA-256 differs): the pair was torn "
            f"or modified; re-run the training that wrote it"
        )
    return meta, load_checkpoint(pt_path)


def _legacy_hint(folder: Path, stem: str) -> str:
    zip_path = folder / f"{stem}.zip"
    if zip_path.exists():
        return (
            f" ({zip_path.name} is there: SB3's pickle format, which onp no longer loads because loading it can "
            f"execute code; re-run onp.train to write {stem}.pt + {stem}.json)"
        )
    return ""


def _state_dict(policy: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in policy.state_dict().items()}


def policy_metadata(policy: GNNMaskablePolicy) -> Dict[str, Any]:
    """What ``policy.json`` records: architecture and sizes (the graph itself is in the tensors)."""
    enc = policy.encoder
    arch = {k: policy.gnn_kwargs[k] for k in ARCH_KEYS}
    return {
        "format": POLICY_FORMAT,
        "policy": "GNNMaskablePolicy",
        "arch": {**arch, "head_hidden": policy.head_hidden, "edge_weights": policy.edge_weights},
        "num_nodes": int(enc.num_nodes),
        "num_features": int(enc.in_features),
        "num_actions": int(cast(spaces.Discrete, policy.action_space).n),
    }


def save_policy(policy: GNNMaskablePolicy, folder: PathLike, *, stem: str = "policy") -> None:
    """Write ``<stem>.pt`` + ``<stem>.json`` for ``policy`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _write_pair(folder, stem, _state_dict(policy), policy_metadata(policy))


def _check_sizes(meta: Dict[str, Any], env: gym.Env, where: Path) -> None:
    base = cast("NeuronPruningEnv", getattr(env, "unwrapped", env))
    n, f = cast(spaces.Box, base.observation_space["x"]).shape
    want = {"num_nodes": int(n), "num_features": int(f), "num_actions": int(base.action_space.n)}
    diff = {k: (meta.get(k), v) for k, v in want.items() if meta.get(k) != v}
    if diff:
        parts = ", ".join(f"{k} {a} (policy) vs {b} (env)" for k, (a, b) in diff.items())
        raise CheckpointError(
            f"{where}: the policy does not fit this env: {parts}. A policy applies only to models "
            f"of the same architecture and the same env feature settings"
        )


def _arch_kwargs(meta: Dict[str, Any], where: Path) -> Dict[str, Any]:
    arch = meta.get("arch")
    allowed = set(ARCH_KEYS) | {"head_hidden", "edge_weights"}
    if not isinstance(arch, dict) or set(arch) - allowed:
        raise CheckpointError(f"{where}: malformed 'arch' (expected keys among {sorted(allowed)})")
    for key, val in arch.items():
        ok = isinstance(val, str) if key in ("conv", "edge_weights") else isinstance(val, (bool, int, float))
        if not ok:
            raise CheckpointError(f"{where}: arch.{key} has a value of the wrong type ({val!r})")
    if arch.get("edge_weights", "model") not in EDGE_WEIGHTS:
        raise CheckpointError(
            f"{where}: arch.edge_weights must be one of {', '.join(EDGE_WEIGHTS)}; got {arch['edge_weights']!r}"
        )
    return dict(arch)


def build_policy(env: gym.Env, arch: Mapping[str, Any]) -> GNNMaskablePolicy:
    """A fresh :class:`GNNMaskablePolicy` for ``env``'s spaces and neuron graph."""
    base = cast("NeuronPruningEnv", getattr(env, "unwrapped", env))
    return GNNMaskablePolicy(
        base.observation_space, base.action_space, lambda _: 0.0, **policy_kwargs_for(base, **dict(arch))
    )


def _load_weights(policy: torch.nn.Module, state: Any, where: Path) -> None:
    """Load ``state`` into ``policy``; the graph buffers stay those of the env the policy was built for."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{where}: expected a state_dict of tensors")
    weights = {k: v for k, v in state.items() if k.rsplit(".", 1)[-1] not in _GRAPH_BUFFERS}
    own = {k for k in policy.state_dict() if k.rsplit(".", 1)[-1] not in _GRAPH_BUFFERS}
    missing, unexpected = sorted(own - set(weights)), sorted(set(weights) - own)
    shape = [k for k in own & set(weights) if tuple(weights[k].shape) != tuple(policy.state_dict()[k].shape)]
    if missing or unexpected or shape:
        raise CheckpointError(
            f"{where}: tensors do not match the policy architecture (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, shape mismatches {shape[:5]})"
        )
    policy.load_state_dict(weights, strict=False)


def load_policy(folder: PathLike, env: gym.Env, *, device: str = "cpu", stem: str = "policy") -> GNNMaskablePolicy:
    """The policy stored in ``folder`` (``policy.pt`` + ``policy.json``), built for ``env``.

    The policy acts on ``env``'s neuron graph (another model of the same architecture is fine); the
    node count and feature count must match. Nothing is unpickled; errors name the file.
    """
    folder = Path(folder)
    meta, state = _read_pair(folder, stem, POLICY_FORMAT)
    where = folder / f"{stem}.json"
    _check_sizes(meta, env, where)
    policy = build_policy(env, _arch_kwargs(meta, where))
    _load_weights(policy, state, folder / f"{stem}.pt")
    return policy.to(device).eval()


# --------------------------------------------------------------------------------------------------
# the resumable PPO checkpoint


def save_checkpoint(model: MaskablePPO, folder: PathLike) -> None:
    """Write ``checkpoint.pt`` (policy + optimiser state) and ``checkpoint.json`` (step counters)."""
    folder = Path(folder)
    policy = cast(GNNMaskablePolicy, model.policy)
    tensors = {"policy": _state_dict(policy), "optimizer": policy.optimizer.state_dict()}
    meta = {
        **policy_metadata(policy),
        "format": CHECKPOINT_FORMAT,
        "num_timesteps": int(model.num_timesteps),
        "n_updates": int(getattr(model, "_n_updates", 0)),
        "episode_num": int(getattr(model, "_episode_num", 0)),
    }
    _write_pair(folder, "checkpoint", tensors, meta)


def load_checkpoint_into(model: MaskablePPO, folder: PathLike) -> int:
    """Restore the policy, optimiser and step counters of ``folder``'s checkpoint into ``model`` (a
    ``MaskablePPO`` freshly built with the same configuration); return its ``num_timesteps``."""
    folder = Path(folder)
    meta, tensors = _read_pair(folder, "checkpoint", CHECKPOINT_FORMAT)
    where = folder / "checkpoint.pt"
    if not isinstance(tensors, dict) or set(tensors) != {"policy", "optimizer"}:
        raise CheckpointError(f"{where}: expected the entries 'policy' and 'optimizer'")
    _load_weights(model.policy, tensors["policy"], where)
    try:
        model.policy.optimizer.load_state_dict(tensors["optimizer"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{where}: optimiser state does not match the policy ({exc})") from exc
    for key in ("num_timesteps", "n_updates", "episode_num"):
        if not isinstance(meta.get(key), int) or meta[key] < 0:
            raise CheckpointError(f"{folder / 'checkpoint.json'}: {key} must be a non-negative integer")
    model.num_timesteps = meta["num_timesteps"]
    model._n_updates = meta["n_updates"]
    model._episode_num = meta["episode_num"]
    return int(meta["num_timesteps"])


WEIGHTS_FORMAT = "onp-weights/1"


def save_weights(module: torch.nn.Module, folder: PathLike, stem: str, meta: Optional[Dict[str, Any]] = None) -> None:
    """Store ``module``'s weights as ``<stem>.pt`` (tensors only) + ``<stem>.json`` (``meta``, JSON
    values, plus the tensor file's SHA-256): the safe format for a plug-in learned agent's ``save``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _write_pair(folder, stem, _state_dict(module), {**(meta or {}), "format": WEIGHTS_FORMAT})


def load_weights(module: torch.nn.Module, folder: PathLike, stem: str) -> Dict[str, Any]:
    """Load what :func:`save_weights` stored into ``module`` (weights only, nothing unpickled); return
    the ``meta`` dict. Errors name the file."""
    folder = Path(folder)
    meta, state = _read_pair(folder, stem, WEIGHTS_FORMAT)
    where = folder / f"{stem}.pt"
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{where}: expected a state_dict of tensors")
    own = module.state_dict()
    bad = sorted(set(own) ^ set(state)) + [k for k in own if k in state and own[k].shape != state[k].shape]
    if bad:
        raise CheckpointError(f"{where}: tensors do not match the module (e.g. {bad[:5]})")
    module.load_state_dict(state)
    return meta


def has_checkpoint(folder: PathLike) -> bool:
    """Whether ``folder`` holds a (possibly torn) onp checkpoint pair."""
    return all((Path(folder) / name).exists() for name in CHECKPOINT_FILES)


# --------------------------------------------------------------------------------------------------
# optional export


def export_sb3_zip(
    policy_folder: PathLike, env: gym.Env, path: PathLike, *, ppo: Optional[Dict[str, Any]] = None
) -> Path:
    """Export a stored policy as SB3's ``.zip`` (``MaskablePPO.load`` opens it) for use outside onp.

    SB3's format unpickles on load: only open such files from sources you trust. onp never reads them.
    """
    from stable_baselines3.common.vec_env import DummyVecEnv

    from .ppo_gnn import make_ppo

    meta, _ = _read_pair(Path(policy_folder), "policy", POLICY_FORMAT)
    policy = load_policy(policy_folder, env)
    vec = DummyVecEnv([lambda: env])
    model = make_ppo(vec, policy_kwargs_for(env, **_arch_kwargs(meta, Path(policy_folder))), ppo)
    model.policy.load_state_dict(policy.state_dict())
    model.save(
        path, exclude=["_last_obs", "_last_original_obs", "_last_episode_starts", "ep_info_buffer", "ep_success_buffer"]
    )
    return Path(path)
