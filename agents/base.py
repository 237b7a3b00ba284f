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
  These import code, so they are accepted only from the user directly (``--agent``, the Python
  API), never from a file onp reads (:func:`check_agent_source`).
"""

from __future__ import annotations

import importlib.metadata
import inspect
import re
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    List,
    Optional,
    Protocol,
    Sequence,
    Tuple,
    TypeVar,
    cast,
    runtime_checkable,
)

import numpy as np

from onp.evidence import EvidenceRule
from onp.io import CheckpointError, atomic_write_json, read_json
from onp.registry import Registry, UnknownNameError
from onp.user_code import import_object, is_code_spec

if TYPE_CHECKING:
    import gymnasium as gym

    from envs import NeuronPruningEnv

_D = TypeVar("_D")  # what @register_agent(name) decorates (returned unchanged)
#: an agent class or factory ``(env, **params) -> Agent``; a class may carry ``learns`` and a classmethod ``load``
AgentFactory = Any

ENTRY_POINT_GROUP = "onp.agents"
#: the file :meth:`BaseAgent.save` writes into a run folder
AGENT_FILE = "agent.json"

#: name -> factory ``(env, **params) -> Agent``.
AGENTS: Registry = Registry("agent")
#: registry entries that take an argument after a colon (``ranked:rnp``).
PARAMETRIC: Dict[str, str] = {}
#: per parametric entry, ``check(argument)``: raises (e.g. :class:`UnknownNameError`) for an argument
#: that the entry does not accept, when the spec is resolved (before any model is loaded)
PARAMETRIC_CHECKS: Dict[str, Callable[[str], Any]] = {}


class AgentError(ValueError):
    """A plug-in agent broke its contract (no ``predict``, or it returned something other than an action)."""


@runtime_checkable
class Agent(Protocol):
    """What ``onp.train`` and ``onp.evaluate`` need from an agent: ``predict``. A learning agent
    (``learns = True``) also has ``learn``, ``save`` and a classmethod ``load``, see :class:`BaseAgent`."""

    def predict(self, obs: Dict[str, np.ndarray], action_mask: np.ndarray) -> int: ...


@dataclass
class LearnResult:
    """What :meth:`BaseAgent.learn` reports to ``onp.train`` (it lands in ``metrics.json``).

    Attributes:
        timesteps: env steps of training (the agent's own interaction, evaluations excluded).
        eval_env_steps: env steps spent on evaluations during training.
        warm_start_env_steps: env steps spent on a warm start (e.g. a demonstration).
        seconds: wall time of learning.
        learning_curve: points ``{"timesteps", "mean_return", "acc", "asr", "n_pruned", "wall_time"}``.
        info: extra keys for ``metrics.json`` (e.g. ``best_timesteps``, ``resumed_from``, ``warm_start``).
    """

    timesteps: int = 0
    eval_env_steps: int = 0
    warm_start_env_steps: int = 0
    seconds: float = 0.0
    learning_curve: List[Dict[str, Any]] = field(default_factory=list)
    info: Dict[str, Any] = field(default_factory=dict)


class BaseAgent:
    """Base class of agents: stores ``env`` and ``params``; no-op ``learn``; JSON ``save``/``load``.

    The contract, the same for every agent (built-in or plug-in):

    * ``predict(obs, action_mask) -> int``: the action (a node id, or ``N`` = STOP);
    * ``learns``: whether ``learn`` does anything (``onp.train`` calls it only then);
    * ``learn(env, config, run_dir, *, resume, callbacks, progress, log) -> LearnResult``: train in
      ``env`` (the defense-validation env of the run) with the run's resolved config (a dict with the
      sections of :class:`onp.train_config.TrainConfig`), writing checkpoints into ``run_dir`` so that
      ``resume=True`` continues an interrupted run;
    * ``save(run_dir)`` and the classmethod ``load(run_dir, env)``: what ``onp.evaluate`` needs to
      apply the learned agent to another model. Files must be weights-only tensors or JSON (a run
      folder is untrusted input: nothing in it may be unpickled or imported).

    The default ``save`` writes the constructor parameters as ``agent.json``; ``load`` rebuilds the
    agent from them, which is all a heuristic agent needs.
    """

    name: str = "agent"
    learns: bool = False

    def __init__(self, env: Any = None, **params: Any) -> None:
        self.env = getattr(env, "unwrapped", env)
        self.params = params

    def predict(self, obs: Dict[str, np.ndarray], action_mask: np.ndarray) -> int:
        raise NotImplementedError

    def learn(
        self,
        env: gym.Env,
        config: Dict[str, Any],
        run_dir: Path,
        *,
        resume: bool = False,
        callbacks: Sequence[Any] = (),
        progress: bool = True,
        log: Callable[[str], None] = print,
    ) -> LearnResult:
        return LearnResult()

    def save(self, run_dir: Path) -> None:
        atomic_write_json(Path(run_dir) / AGENT_FILE, {"agent": self.name, "params": self.params})

    @classmethod
    def load(cls, run_dir: Path, env: Any = None) -> BaseAgent:
        path = Path(run_dir) / AGENT_FILE
        data = read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("params", {}), dict):
            raise CheckpointError(f'{path}: expected {{"agent": name, "params": {{...}}}}')
        return cls(env, **data.get("params", {}))


def accepts(fn: Callable[..., Any], name: str, *, via_kwargs: bool = True) -> bool:
    """Whether ``fn`` takes a keyword argument ``name`` (or, with ``via_kwargs``, any ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or (via_kwargs and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()))


def register_agent(
    name: str,
    *,
    parametric: Optional[str] = None,
    overwrite: bool = False,
    check: Optional[Callable[[str], Any]] = None,
) -> Callable[[_D], _D]:
    """Decorator registering an agent class or factory ``(env, **params) -> Agent`` as ``name``.

    ``parametric="argument"`` makes ``name:value`` call the factory with ``argument=value``;
    ``check(value)``, if given, validates ``value`` when the spec is resolved (raise to refuse it).
    """

    def deco(obj: _D) -> _D:
        if inspect.isclass(obj) and getattr(obj, "name", None) in (None, "agent", BaseAgent.name):
            cast(Any, obj).name = name
        AGENTS.register(name, obj, overwrite=overwrite)
        if parametric:
            PARAMETRIC[name] = parametric
            if check is not None:
                PARAMETRIC_CHECKS[name] = check
        return obj

    return deco


# --------------------------------------------------------------------------------------------------
# resolution


def _entry_points() -> Dict[str, Any]:
    eps = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    return {ep.name: ep for ep in eps}


def available_agents() -> List[str]:
    """Registered names (parametric ones as ``name:<argument>``) plus installed entry points."""
    names = [f"{n}:<{PARAMETRIC[n]}>" if n in PARAMETRIC else n for n in AGENTS.names()]
    return sorted(set(names) | set(_entry_points()))


def resolve_agent_factory(spec: str) -> Tuple[AgentFactory, Dict[str, Any], str]:
    """``spec`` -> ``(factory, extra_params, canonical_name)``; clear errors for bad specs."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"agent must be a non-empty string; got {spec!r}")
    spec = spec.strip()
    if ":" in spec:
        left, right = spec.rsplit(":", 1)
        if left.endswith(".py") or "/" in left or "\\" in left:  # path/to/file.py:Class
            return import_object(spec, "agent"), {}, f"{Path(left).stem}.{right}"
        if left in PARAMETRIC and left in AGENTS:
            if not right:
                raise ValueError(f"agent {left!r} needs an argument: {left}:<{PARAMETRIC[left]}>")
            if left in PARAMETRIC_CHECKS:
                PARAMETRIC_CHECKS[left](right)
            return AGENTS.get(left), {PARAMETRIC[left]: right}, spec
        if "." in left and right.isidentifier():  # package.module:Class
            return import_object(spec, "agent"), {}, spec
        if left in AGENTS:
            raise ValueError(f"agent {left!r} takes no ':' argument; valid choices: {', '.join(available_agents())}")
        raise UnknownNameError("agent", spec, available_agents())
    if spec.endswith(".py"):
        raise ValueError(f"malformed agent spec {spec!r}; expected path/to/file.py:ClassName")
    if spec in PARAMETRIC:
        raise ValueError(f"agent {spec!r} needs an argument: {spec}:<{PARAMETRIC[spec]}> (e.g. {spec}:rnp)")
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


def imports_code(spec: Any) -> bool:
    """Whether resolving agent ``spec`` would import code that is not installed or registered:
    ``path/to/file.py:Class`` or ``package.module:Class``. Registry names, ``name:argument`` of a
    parametric entry and entry points of installed packages import nothing new."""
    if not isinstance(spec, str) or ":" not in spec:
        return isinstance(spec, str) and spec.strip().endswith(".py")
    left = spec.strip().rsplit(":", 1)[0]
    return not (left in PARAMETRIC and left in AGENTS) and is_code_spec(spec)


def check_agent_source(spec: Any, explicit: Optional[str], *, where: Any) -> None:
    """Refuse an agent named inside a file (``where``) that would import code, unless the user
    passed the same spec explicitly (``explicit``, e.g. ``--agent``).

    Run folders and config files are untrusted input: nothing named in them is imported implicitly.
    """
    if explicit is not None and str(explicit).strip() != str(spec).strip():
        raise ValueError(f"--agent {explicit} does not match the agent {spec!r} that {where} was made with")
    if imports_code(spec) and explicit is None:
        raise ValueError(
            f"{where} names the agent {spec!r}, which would import code from a file or module; onp "
            f"never imports code named inside a file. If you trust that code, pass --agent {spec} "
            f"explicitly"
        )


def build_agent(spec: str, env: Any = None, **params: Any) -> Any:
    """Build agent ``spec`` (see :func:`resolve_agent_factory`) for ``env`` with ``params``."""
    factory, extra, _ = resolve_agent_factory(spec)
    agent = factory(env, **{**extra, **params})
    if not callable(getattr(agent, "predict", None)):
        raise AgentError(
            f"agent {spec!r} built a {type(agent).__name__} without a predict(obs, action_mask) "
            f"method; an agent must define predict(obs, action_mask) -> int"
        )
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


def rollout(
    agent: Any,
    env: gym.Env,
    *,
    options: Optional[Dict[str, Any]] = None,
    seed: Optional[int] = None,
    max_steps: Optional[int] = None,
) -> Dict[str, Any]:
    """Run one episode of ``agent`` in ``env``; return ``{"return", "steps", "actions", "rewards",
    "info" (last), "infos"}``. ``agent`` is an :class:`Agent` or a function ``(obs, mask) -> action``."""
    act = agent if not hasattr(agent, "predict") else agent.predict
    base = cast("NeuronPruningEnv", getattr(env, "unwrapped", env))
    obs, info = env.reset(seed=seed, options=options)
    total, steps, actions, rewards, infos = 0.0, 0, [], [], [info]
    limit = max_steps or (base.num_nodes + 2) * 2
    done = False
    invalid = 0
    while not done and steps < limit:
        mask = base.action_masks()
        a = _action_of(act(obs, mask), agent, base.num_nodes)
        invalid += int(not mask[a]) if 0 <= a < len(mask) else 1
        obs, r, term, trunc, info = env.step(a)
        total += float(r)
        steps += 1
        actions.append(a)
        rewards.append(float(r))
        infos.append(info)
        done = term or trunc
    if invalid:
        warnings.warn(
            f"{_agent_name(agent)} chose {invalid} masked (invalid) action(s) in {steps} steps: each was "
            f"a no-op with a penalty. An agent should pick among action_mask's valid actions",
            stacklevel=2,
        )
    return {
        "return": total,
        "steps": steps,
        "actions": actions,
        "rewards": rewards,
        "info": info,
        "infos": infos,
        "invalid_actions": invalid,
    }


def _agent_name(agent: Any) -> str:
    return f"agent {type(agent).__name__}" if hasattr(agent, "predict") else "the agent function"


def _action_of(out: Any, agent: Any, num_nodes: int) -> int:
    """The agent's output as an int action, or :class:`AgentError` naming what it returned."""
    arr = np.asarray(out) if out is not None else None
    if arr is None or arr.size < 1 or arr.dtype.kind not in "iu":
        raise AgentError(
            f"{_agent_name(agent)} returned {out!r}; predict(obs, action_mask) must return an integer "
            f"action in [0, {num_nodes}] ({num_nodes} = STOP)"
        )
    return int(arr.reshape(-1)[0])


def best_prefix(result: Dict[str, Any]) -> Dict[str, Any]:
    """The prefix of a rollout with the highest cumulative reward (ties: the shortest); its last info."""
    cum = np.concatenate([[0.0], np.cumsum(result["rewards"])])
    k = int(np.argmax(cum))
    return {"steps": k, "return": float(cum[k]), "info": result["infos"][k]}


#: ``rollout.select`` values: the whole episode, or its best prefix on the reward batch
ROLLOUT_SELECT = ("final", "best_prefix")


def _selected_state(result: Dict[str, Any], select: str) -> Tuple[Dict[str, Any], float]:
    """The info and return of the state that ``select`` picks from a rollout: its end (less the charge of a
    prune the env refused) or its best prefix."""
    if select not in ROLLOUT_SELECT:
        raise ValueError(f"rollout.select must be one of {', '.join(ROLLOUT_SELECT)}; got {select!r}")
    if select == "best_prefix":
        sel = best_prefix(result)
        return sel["info"], sel["return"]
    chosen, ret = result["info"], float(result["return"])
    if chosen.get("rejected") and result["rewards"]:  # the refused prune's charge is not the state's value
        ret -= float(result["rewards"][-1])
    return chosen, ret


def pruning_order(result: Dict[str, Any]) -> List[int]:
    """The neurons a :func:`rollout` pruned, in the order it pruned them (a step that pruned several, e.g.
    a coupling group, adds them in increasing id; a step that pruned none, e.g. STOP, adds nothing)."""
    order: List[int] = []
    seen: set = set()
    for info in result["infos"]:
        new = sorted(int(i) for i in info.get("pruned", ()) if int(i) not in seen)
        order += new
        seen.update(new)
    return order


def _rejected_record(chosen: Dict[str, Any], ret: float, p_value: float, reason: str) -> Dict[str, Any]:
    """``select_pruning``'s ``fallback``: why the chosen pruning was rejected, and its figures."""
    return {
        "reason": reason,
        "rejected_n_pruned": int(chosen["n_pruned"]),
        "rejected_acc": float(chosen["acc"]),
        "rejected_asr": float(chosen["asr"]),
        "rejected_return": float(ret),
        "rejected_p_value": p_value,
    }


def select_pruning(
    result: Dict[str, Any],
    *,
    select: str = "final",
    min_return: Optional[float] = 0.0,
    evidence: Optional[EvidenceRule] = None,
    n_triggered: int = 0,
    veto: Optional[str] = None,
    log: Optional[Callable[[str], None]] = None,
) -> Dict[str, Any]:
    """The pruning a rollout ends with, as ``onp.train`` and ``onp.evaluate`` keep it.

    ``select``: ``"final"`` (the whole episode) or ``"best_prefix"`` (:func:`best_prefix`). If the
    chosen pruning's return on the env's reward batch (defense-validation) is below ``min_return``
    (``None``: no floor), it is worse than the agreed floor (0: worse than pruning nothing), and
    nothing is pruned instead. With an ``evidence`` rule (:class:`onp.evidence.EvidenceRule`) the
    pruning must also lower the estimated ASR significantly over the ``n_triggered`` triggered
    defense-validation images, at an allowed accuracy cost, or nothing is pruned ("no evidence, no
    pruning"). A ``veto`` (a reason, e.g. :func:`onp.backdoor_verdict.no_backdoor_reason`: the
    backdoor verdict found no backdoor) prunes nothing whatever the pruning. The return of the final
    state leaves out the charge of a prune the env refused (it was never made). Returns ``{"info",
    "return", "fallback", "judgement", "vetoed"}``; ``fallback`` is ``None`` or
    describes the rejected pruning; ``judgement`` is the :class:`~onp.evidence.Judgement` of what is
    kept (its ``verdict``: removed / not removed / nothing pruned); ``vetoed``: whether a ``veto`` was
    given (the model is not to be repaired at all, :func:`agents.finetune_pruned`'s ``finish_unpruned``).
    """
    chosen, ret = _selected_state(result, select)
    initial = result["infos"][0]
    rule = evidence if evidence is not None else EvidenceRule(alpha=None, max_acc_drop=1.0)
    judgement = rule.judge(initial, chosen, n_triggered)
    reason = None
    if veto is not None and chosen["n_pruned"] > 0:
        reason = veto
    elif not judgement.keep:
        reason = judgement.reason
    elif min_return is not None and ret < float(min_return) and chosen["n_pruned"] > 0:
        reason = (
            f"no backdoor neurons found within the budget (defense-val return {ret:+.4f} < rollout.min_return "
            f"{float(min_return):+.4f})"
        )
    fallback = None
    if reason is not None:
        fallback = _rejected_record(chosen, ret, judgement.p_value, reason)
        if log is not None:
            log(
                f"[onp] the policy's pruning of {int(chosen['n_pruned'])} neurons (defense-val return {ret:+.4f}, "
                f"ACC {chosen['acc']:.3f}, ASR {initial['asr']:.3f} -> {chosen['asr']:.3f}) is not kept: {reason}; "
                f"pruning nothing instead"
            )
        judgement = replace(judgement, keep=False, verdict="nothing pruned", reason=reason)
        chosen, ret = initial, 0.0
    return {
        "info": chosen,
        "return": float(ret),
        "fallback": fallback,
        "judgement": judgement,
        "vetoed": veto is not None,
    }
