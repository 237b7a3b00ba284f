"""The agent interface, the agent registry and episode rollouts.

An agent is anything with ``predict(obs, action_mask) -> action`` (an ``int`` in
``[0, N]``, ``N`` = STOP). Optionally it has ``learn(env, total_timesteps)``, ``save(path)`` and a
classmethod ``load(path, env=None)``. Agents are built as ``factory(env, **params)``: the factory is
usually the agent class itself and ``env`` is the (unwrapped) :class:`envs.NeuronPruningEnv` it will
act in, so it can read the graph, the features or the model.

Where agents come from (:func:`resolve_agent_factory`):

* the registry :data:`AGENTS` (``@register_agent("name")``), built-ins: ``ppo-gnn``, ``random``,
  ``greedy-gamma``, ``greedy-activation``, ``ranked:<baseline>``;
* ``name:argument`` for parametric registry entries (``ranked:rnp`` calls the ``ranked`` factory with
  ``argument="rnp"``);
* the entry-point group ``onp.agents`` of installed packages (name -> ``module:Class``);
* ``path/to/file.py:ClassName`` (a Python file) and ``package.module:ClassName`` (an importable module).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import inspect
import json
import re
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Protocol, Tuple, runtime_checkable

import numpy as np

from onp.registry import Registry, UnknownNameError

ENTRY_POINT_GROUP = "onp.agents"

#: name -> factory ``(env, **params) -> Agent``.
AGENTS: Registry = Registry("agent")
#: registry entries that take an argument after a colon (``ranked:rnp``).
PARAMETRIC: Dict[str, str] = {}


@runtime_checkable
class Agent(Protocol):
    """What ``onp.train`` needs from an agent (``learn``/``save``/``load`` are optional)."""

    def predict(self, obs: Dict[str, np.ndarray], action_mask: np.ndarray) -> int:
        ...


class BaseAgent:
    """Convenience base class: stores ``env`` and ``params``; no-op ``learn``; JSON ``save``/``load``.

    Subclasses implement :meth:`predict`. ``save`` writes the constructor parameters (``params``) as
    JSON; ``load(path, env)`` rebuilds the agent from them, which is all a heuristic agent needs.
    """

    name: str = "agent"
    learns: bool = False  # whether learn() does anything (onp.train skips it otherwise)

    def __init__(self, env=None, **params: Any):
        self.env = getattr(env, "unwrapped", env)
        self.params = params

    def predict(self, obs: Dict[str, np.ndarray], action_mask: np.ndarray) -> int:
        raise NotImplementedError

    def learn(self, env, total_timesteps: int) -> "BaseAgent":
        return self

    def save(self, path) -> None:
        Path(path).write_text(json.dumps({"agent": self.name, "params": self.params}, indent=2, default=str))

    @classmethod
    def load(cls, path, env=None) -> "BaseAgent":
        data = json.loads(Path(path).read_text())
        return cls(env, **data.get("params", {}))


def register_agent(name: str, *, parametric: Optional[str] = None, overwrite: bool = False) -> Callable:
    """Decorator registering an agent class or factory ``(env, **params) -> Agent`` as ``name``.

    ``parametric="argument"`` makes ``name:value`` call the factory with ``argument=value``.
    """

    def deco(obj):
        if inspect.isclass(obj) and getattr(obj, "name", None) in (None, "agent", BaseAgent.name):
            obj.name = name
        AGENTS.register(name, obj, overwrite=overwrite)
        if parametric:
            PARAMETRIC[name] = parametric
        return obj

    return deco


# --------------------------------------------------------------------------------------------------
# resolution


def _entry_points() -> Dict[str, Any]:
    try:
        eps = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    except TypeError:  # Python < 3.10 style
        eps = importlib.metadata.entry_points().get(ENTRY_POINT_GROUP, [])
    return {ep.name: ep for ep in eps}


def available_agents() -> List[str]:
    """Registered names (parametric ones as ``name:<argument>``) plus installed entry points."""
    names = [f"{n}:<{PARAMETRIC[n]}>" if n in PARAMETRIC else n for n in AGENTS.names()]
    return sorted(set(names) | set(_entry_points()))


def _load_file_class(path: str, attr: str) -> Any:
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"agent file not found: {file} (from --agent {path}:{attr})")
    mod_name = "onp_agent_" + re.sub(r"\W", "_", str(file.resolve()))
    spec = importlib.util.spec_from_file_location(mod_name, file)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot import {file} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(mod_name, None)
        raise ValueError(f"importing agent file {file} failed: {type(exc).__name__}: {exc}") from exc
    return _get_attr(module, attr, str(file))


def _get_attr(module, attr: str, where: str) -> Any:
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            defined = sorted(n for n, v in vars(module).items() if inspect.isclass(v) and v.__module__ == module.__name__)
            raise ValueError(f"{where} has no attribute {attr!r}; classes defined there: {', '.join(defined) or '(none)'}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{where}:{attr} is not a class or factory")
    return obj


def resolve_agent_factory(spec: str) -> Tuple[Callable, Dict[str, Any], str]:
    """``spec`` -> ``(factory, extra_params, canonical_name)``; clear errors for bad specs."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"agent must be a non-empty string; got {spec!r}")
    spec = spec.strip()
    if ":" in spec:
        left, right = spec.rsplit(":", 1)
        if left.endswith(".py") or "/" in left or "\\" in left:
            if not right or not all(p.isidentifier() for p in right.split(".")):
                raise ValueError(f"malformed agent spec {spec!r}; expected path/to/file.py:ClassName")
            return _load_file_class(left, right), {}, f"{Path(left).stem}.{right}"
        if left in PARAMETRIC and left in AGENTS:
            if not right:
                raise ValueError(f"agent {left!r} needs an argument: {left}:<{PARAMETRIC[left]}>")
            return AGENTS.get(left), {PARAMETRIC[left]: right}, spec
        if "." in left and right.isidentifier():  # package.module:Class
            try:
                module = importlib.import_module(left)
            except ImportError as exc:
                raise ValueError(f"cannot import module {left!r} for agent {spec!r}: {exc}") from exc
            return _get_attr(module, right, left), {}, spec
        if left in AGENTS:
            raise ValueError(f"agent {left!r} takes no ':' argument; valid choices: {', '.join(available_agents())}")
        raise UnknownNameError("agent", spec, available_agents())
    if spec.endswith(".py"):
        raise ValueError(f"malformed agent spec {spec!r}; expected path/to/file.py:ClassName")
    if spec in PARAMETRIC:
        raise ValueError(f"agent {spec!r} needs an argument: {spec}:<{PARAMETRIC[spec]}> "
                         f"(e.g. {spec}:rnp)")
    if spec in AGENTS:
        return AGENTS.get(spec), {}, spec
    eps = _entry_points()
    if spec in eps:
        try:
            obj = eps[spec].load()
        except Exception as exc:
            raise ValueError(f"loading agent {spec!r} from entry point {eps[spec].value!r} failed: {exc}") from exc
        return obj, {}, spec
    raise UnknownNameError("agent", spec, available_agents())


def build_agent(spec: str, env=None, **params: Any):
    """Build agent ``spec`` (see :func:`resolve_agent_factory`) for ``env`` with ``params``."""
    factory, extra, _ = resolve_agent_factory(spec)
    agent = factory(env, **{**extra, **params})
    if not callable(getattr(agent, "predict", None)):
        raise TypeError(f"agent {spec!r} built a {type(agent).__name__} without a predict(obs, action_mask) method")
    return agent


def agent_label(spec: str) -> str:
    """A filesystem-friendly name for run directories."""
    name = spec
    if ":" in spec:
        left, right = spec.rsplit(":", 1)
        if left.endswith(".py") or "/" in left or "\\" in left:
            name = f"{Path(left).stem}.{right}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "agent"


# --------------------------------------------------------------------------------------------------
# rollouts


def rollout(agent, env, *, options: Optional[Dict[str, Any]] = None, seed: Optional[int] = None,
            max_steps: Optional[int] = None) -> Dict[str, Any]:
    """Run one episode of ``agent`` in ``env``; return ``{"return", "steps", "actions", "rewards",
    "info" (last), "infos"}``. ``agent`` is an :class:`Agent` or a function ``(obs, mask) -> action``."""
    act = agent if not hasattr(agent, "predict") else agent.predict
    base = getattr(env, "unwrapped", env)
    obs, info = env.reset(seed=seed, options=options)
    total, steps, actions, rewards, infos = 0.0, 0, [], [], [info]
    limit = max_steps or (base.num_nodes + 2) * 2
    done = False
    while not done and steps < limit:
        mask = base.action_masks()
        a = int(np.asarray(act(obs, mask)).reshape(-1)[0])
        obs, r, term, trunc, info = env.step(a)
        total += float(r)
        steps += 1
        actions.append(a)
        rewards.append(float(r))
        infos.append(info)
        done = term or trunc
    return {"return": total, "steps": steps, "actions": actions, "rewards": rewards, "info": info, "infos": infos}


def best_prefix(result: Dict[str, Any]) -> Dict[str, Any]:
    """The prefix of a rollout with the highest cumulative reward (ties: the shortest); its last info."""
    cum = np.concatenate([[0.0], np.cumsum(result["rewards"])])
    k = int(np.argmax(cum))
    return {"steps": k, "return": float(cum[k]), "info": result["infos"][k]}


#: ``rollout.select`` values: the whole episode, or its best prefix on the reward batch
ROLLOUT_SELECT = ("final", "best_prefix")


def choose_pruning(result: Dict[str, Any], *, select: str = "final", min_return: Optional[float] = 0.0,
                   log: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """The pruning a rollout ends with, as ``onp.train`` and ``onp.evaluate`` keep it.

    ``select``: ``"final"`` (the whole episode) or ``"best_prefix"`` (:func:`best_prefix`). If the
    chosen pruning's return on the env's reward batch (defense-validation) is below ``min_return``
    (``None``: no floor), it is worse than the agreed floor (0: worse than pruning nothing), and
    nothing is pruned instead. The return of the final state leaves out the charge of a prune the env
    refused (it was never made). Returns ``{"info", "return", "fallback"}``; ``fallback`` is ``None`` or
    describes the rejected pruning.
    """
    if select not in ROLLOUT_SELECT:
        raise ValueError(f"rollout.select must be one of {', '.join(ROLLOUT_SELECT)}; got {select!r}")
    if select == "best_prefix":
        sel = best_prefix(result)
        chosen, ret = sel["info"], sel["return"]
    else:
        chosen, ret = result["info"], float(result["return"])
        if chosen.get("rejected") and result["rewards"]:  # the refused prune's charge is not the state's value
            ret -= float(result["rewards"][-1])
    fallback = None
    if min_return is not None and ret < float(min_return) and chosen["n_pruned"] > 0:
        fallback = {"reason": f"defense-val return {ret:+.4f} < rollout.min_return {float(min_return):+.4f}",
                    "rejected_n_pruned": int(chosen["n_pruned"]), "rejected_acc": float(chosen["acc"]),
                    "rejected_asr": float(chosen["asr"]), "rejected_return": float(ret)}
        if log is not None:
            log(f"[onp] the policy's pruning has defense-val return {ret:+.4f} (ACC {chosen['acc']:.3f}, "
                f"ASR {chosen['asr']:.3f}), below rollout.min_return={float(min_return):+.4f}: pruning nothing instead")
        chosen, ret = result["infos"][0], 0.0
    return {"info": chosen, "return": float(ret), "fallback": fallback}
