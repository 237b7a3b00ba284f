"""``python -m onp.defend``: defend a model you received -- a backdoor verdict, then a pruning repair.

Examples::

    python -m onp.defend --arch resnet18 --weights suspect.pt --clean-data my_images/
    python -m onp.defend --arch resnet18 --width 64 --weights suspect.safetensors --clean-data clean.npz --defense auto
    python -m onp.defend --arch my_net.py:Net --weights net.pt --clean-data clean.npz --mean 0.5 --std 0.5
    python -m onp.defend --weights attack_result.pt --clean-data clean.npz   # BackdoorBench: --arch from the file
    python -m onp.defend ... --test-data test.npz --attack badnets      # adds test ACC / ASR (trigger-aware)

Python (``onp.defend`` is this module, and calling it calls :func:`defend`)::

    import onp
    report = onp.defend(model, clean_x, clean_y)          # defense="ppo-gnn"
    print(report.verdict.summary(), report.metrics["val"])

Steps (:func:`run_defense`): (1) split the clean images into defense-train and defense-validation
(stratified, seeded); (2) **verdict before pruning**: reverse-engineer one trigger per class on
defense-train (the ``synthesized-multi`` ASR estimator: a patch and a blend per class, cached on
disk) and take each class's trigger-size anomaly index; the model is *suspected* when a class's index
is at most -2 and its trigger's latent gap or mask compactness confirms it, or its latent gap alone is
large, or else when MM-BD's maximum margin of a class is significant (p < 0.005; the default detector,
``confirmed-or-margin``: :mod:`onp.backdoor_verdict`); (3) if not
suspected and not ``force``, prune nothing ("no backdoor found"); else run the defense: ``ppo-gnn``
(learn a pruning policy on this model, as ``onp.train`` does), a baseline (its own operating point
on defense data), or ``auto`` (a portfolio; the best reward val ACC - estimated val ASR wins); (4)
"no evidence, no pruning" (:mod:`onp.evidence`) for every defense: a repair is kept only if it
lowers the estimated ASR significantly at an allowed accuracy cost. Nothing is chosen on test data;
``--test-data`` (and ``--attack``, trigger-aware) only add numbers to the report.

The run folder (``--out``, default ``runs/defend/<arch>-<defense>-s<seed>``; :func:`onp.io.run_folder`
rules) holds the repaired weights under the user's own key names (``model.pt``, or
``model.safetensors`` when the input was safetensors), ``pruned.json`` (neuron ids and names),
``config.json``, ``train_config.json`` (the learned defense's resolved settings), ``report.md``,
``report.json`` (strict JSON), ``metrics.json``, ``trigger.png``, ``env.json`` and ``README.md``
(:func:`onp.defense_report.write_defense_run`).

``--arch path/file.py:Class`` or ``package.module:factory`` imports your code: onp does so only
because you typed it (on the command line or in your Python call); ``onp.defend`` reads no config
file, so nothing named inside a file is ever imported. ``--arch`` may be left out for a BackdoorBench
``attack_result.pt``, which names its architecture (:func:`resolve_arch`).

Where the parts live: the result types and the run folder's files in :mod:`onp.defense_report`, the
user's model (building, normalisation, output check) in :mod:`onp.user_model`, the import of user code
in :mod:`onp.user_code`; this module runs the defense and the command line (it sits above the core:
it uses ``agents``, ``baselines`` and ``envs``) and re-exports their public names.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import re
import sys
import tempfile
import time
import types
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from .attacks import Attack, build_attack
from .attacks.image_trigger import ImageTrigger
from .backdoor_verdict import INVERSION_KEYS, backdoor_verdict
from .cli_common import device_arg, finite_float, fraction, int_at_least, path_arg, run_cli
from .config import deep_update, parse_overrides
from .data.defense import DefenseData
from .data.user_data import CleanImages, load_clean_images, split_defense, to_defense_data
from .defend_config import DefendConfig, is_user_arch
from .defense_report import (
    ASR_ESTIMATE_NOTE,
    DefenseReport,
    RecoveredTrigger,
    Verdict,
    plot_trigger,
    report_markdown,
    write_defense_run,
)
from .evidence import EvidenceRule, Judgement
from .io import PathLike, cache_root, run_folder, to_jsonable
from .masks import apply_pruning
from .metrics import accuracy, evaluate_backdoor, predict, with_der
from .registry import Registry, UnknownNameError
from .rundir import reproduce_line
from .seeding import seed_everything
from .train_config import RolloutConfig
from .user_model import (
    NormalizedModel,
    build_arch,
    build_user_model,
    check_output,
    output_shape,
    resolve_arch,
    unwrap,
    with_normalization,
)

if TYPE_CHECKING:
    import gymnasium as gym

    from envs import ASRProbe, NeuronPruningEnv
    from envs.target import PruningTarget

    from .data.augment import Augment
    from .foreign_weights import WeightsFile

__all__ = [
    "defend",
    "run_defend",
    "run_defense",
    "DefenseReport",
    "Verdict",
    "RecoveredTrigger",
    "defense_choices",
    "build_user_model",
    "images_from_arrays",
    "write_defense_run",
    "report_markdown",
    "plot_trigger",
    "main",
    "resolve_arch",
    "ASR_ESTIMATE_NOTE",
]

#: stamped clean images shown in trigger.png
N_STAMPED = 4

Log = Callable[[str], None]


# --------------------------------------------------------------------------------------------------
# the defender's images given as arrays (the Python API)


def _as_numpy(a: Any) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, Tensor) else np.asarray(a)


def _layout_of(shape: Tuple[int, ...]) -> Tuple[int, Tuple[int, int]]:
    """Channels and ``(H, W)`` of an image batch ``(N, C, H, W)``, ``(N, H, W, C)`` or ``(N, H, W)``."""
    if len(shape) == 3:
        return 1, (shape[1], shape[2])
    if len(shape) == 4 and shape[1] in (1, 3):
        return shape[1], (shape[2], shape[3])
    if len(shape) == 4 and shape[3] in (1, 3):
        return shape[3], (shape[1], shape[2])
    raise ValueError(
        f"clean_x must be images (N, C, H, W), (N, H, W, C) or (N, H, W) with 1 or 3 channels; got shape {shape}"
    )


def images_from_arrays(
    x: Any,
    y: Any,
    *,
    num_classes: int,
    channels: int,
    image_size: Tuple[int, int],
    what: str = "clean_x/clean_y",
    val: Any = None,
) -> CleanImages:
    """Clean images given as arrays (torch or numpy; uint8 0..255 or float in [0, 1]; NCHW, NHWC or
    NHW) with integer labels, checked exactly as an ``.npz`` file is by
    :func:`onp.data.user_data.load_clean_images` (size, channels, label range, counts). ``val``: an
    optional bool mask of the images that are the defender's own defense-validation split."""
    with tempfile.TemporaryDirectory(prefix="onp-defend-") as tmp:
        path = Path(tmp) / "arrays.npz"
        arrays: Dict[str, Any] = {"x": _as_numpy(x), "y": _as_numpy(y)}
        if val is not None:
            arrays["val"] = _as_numpy(val)
        np.savez(path, **arrays)
        try:
            images = load_clean_images(path, num_classes=num_classes, channels=channels, image_size=image_size)
        except ValueError as exc:
            raise ValueError(str(exc).replace(str(path), what)) from None
    images.source = what
    return images


# --------------------------------------------------------------------------------------------------
# the defense


@dataclass
class _Session:
    """One defense in progress: the model, the defender's split, the env that judges every repair."""

    cfg: DefendConfig
    model: nn.Module
    data: DefenseData
    env: gym.Env
    train_cfg: Dict[str, Any]
    rule: EvidenceRule
    work_dir: Path
    log: Log
    progress: bool
    source: str

    @property
    def base(self) -> NeuronPruningEnv:
        return self.env.unwrapped  # type: ignore[return-value]

    @property
    def target(self) -> PruningTarget:
        return self.base.target

    @property
    def augment(self) -> "Augment":
        """The defenses' training augmentation: pad-and-crop, flips only with ``hflip`` (the user's word)."""
        from baselines.base import default_augment

        return default_augment(self.data.train_x, hflip=self.cfg.hflip)

    @property
    def n_triggered(self) -> int:
        return int(len(self.target.probe.images))

    @property
    def initial(self) -> Dict[str, Any]:
        """The unrepaired model on the env's reward batch (an env info: ``acc``, ``asr``, ``n_pruned``)."""
        return {"acc": float(self.target.initial.acc), "asr": float(self.target.initial.asr), "n_pruned": 0}


@dataclass
class _Candidate:
    """One defense's repair after the evidence rule (``model`` is the unrepaired one when it was refused)."""

    defense: str
    model: nn.Module
    pruned: List[int]
    judgement: Judgement
    val: Dict[str, float]
    seconds: float
    info: Dict[str, Any] = field(default_factory=dict)

    @property
    def reward(self) -> float:
        """val ACC - estimated val ASR of the kept repair (what ``auto`` maximises)."""
        return self.val["acc"] - self.val["asr"]

    def to_dict(self) -> Dict[str, Any]:
        return {
            "defense": self.defense,
            "outcome": self.judgement.verdict,
            "keep": self.judgement.keep,
            "reason": self.judgement.reason,
            "n_pruned": len(self.pruned),
            "val_acc": self.val["acc"],
            "val_asr": self.val["asr"],
            "reward": self.reward,
            "seconds": round(self.seconds, 2),
            **self.info,
        }


Runner = Callable[[_Session, str], _Candidate]
#: defenses of onp.defend other than the baselines (every baseline of ``baselines.DEFENSES`` is one too)
RUNNERS: Registry[Runner] = Registry("defense")


def _baselines() -> Any:
    import baselines

    return baselines


def defense_choices() -> List[str]:
    """Every ``defense``: ``auto``, ``ppo-gnn`` and the baselines."""
    return RUNNERS.names() + _baselines().DEFENSES.names()


def _runner(name: str) -> Runner:
    """The function that runs defense ``name`` (:data:`RUNNERS`, else a baseline); unknown: the choices."""
    if name in RUNNERS:
        return RUNNERS.get(name)
    if name in _baselines().DEFENSES:
        return _run_baseline
    raise UnknownNameError("defense", name, defense_choices())


def _val_metrics(model: nn.Module, target: PruningTarget) -> Dict[str, float]:
    """Clean ACC and estimated ASR of ``model`` on the env's reward batch (defense-validation images and
    the same images stamped with the synthesized trigger): the figures every repair is judged on."""
    pred = predict(model, target.batch.contiguous())
    n = target.n_clean
    return {"acc": accuracy(pred[:n], target.clean_y), "asr": accuracy(pred[n:], target.probe.target_labels)}


def _candidate(
    s: _Session, name: str, model: nn.Module, pruned: List[int], judgement: Judgement, t0: float, info: Dict[str, Any]
) -> _Candidate:
    """A :class:`_Candidate`; a repair the rule refused is replaced by the unrepaired model."""
    if not judgement.keep:
        model, pruned = copy.deepcopy(s.model), []
    return _Candidate(
        name, model.eval(), pruned, judgement, _val_metrics(model, s.target), time.perf_counter() - t0, info
    )


@RUNNERS.register("ppo-gnn")
def _run_ppo_gnn(s: _Session, name: str) -> _Candidate:
    """Learn a pruning policy on this model (MaskablePPO + GNN, ``onp.train``'s agent and settings), or
    load the trained one of ``policy``, run it once deterministically, keep its pruning by
    ``select_pruning`` and the evidence rule."""
    from agents import finetune_pruned, rollout, select_pruning

    t0 = time.perf_counter()
    cfg = s.train_cfg
    agent, timesteps = _ppo_gnn_agent(s, name)
    res = rollout(agent, s.env)
    rc = RolloutConfig.from_dict(cfg["rollout"])
    sel = select_pruning(
        res, select=rc.select, min_return=rc.min_return, evidence=s.rule, n_triggered=s.n_triggered, log=s.log
    )
    pruned = [int(i) for i in sel["info"]["pruned"]]
    model = apply_pruning(s.model, s.base.graph, pruned, cfg["env"]["mask_mode"])
    tuned = finetune_pruned(
        model,
        pruned,
        env=s.base,
        data=s.data,
        rollout=rc,
        judgement=sel["judgement"],
        seed=s.cfg.seed,
        log=s.log,
        finish_unpruned=True,  # only a suspected (or forced) model is defended
        augment=s.augment,  # the FST finisher's: the one the baselines get here
    )
    info = {
        "timesteps": timesteps,
        **({"policy": s.cfg.policy} if s.cfg.policy else {}),
        "episode_return": float(res["return"]),
        "fallback": sel["fallback"],
        "finetune": tuned.info,
    }
    return _candidate(s, name, tuned.model, pruned, tuned.judgement, t0, info)


def _ppo_gnn_agent(s: _Session, name: str) -> Tuple[Any, int]:
    """The ppo-gnn agent and its PPO env steps: the trained policy of ``policy`` (weights only, on this
    model's graph; 0 steps), else one learned here."""
    from agents import PPOGNNAgent, build_agent

    if s.cfg.policy:
        s.log(f"[onp] {name}: applying the trained policy of {s.cfg.policy} (no training)")
        return PPOGNNAgent.load(Path(s.cfg.policy), s.env, device=s.cfg.device), 0
    cfg = s.train_cfg
    work = s.work_dir / name
    work.mkdir(parents=True, exist_ok=True)
    s.log(f"[onp] {name}: learning a pruning policy ({cfg['ppo']['total_timesteps']} PPO env steps) in {work}")
    agent = build_agent(name, s.env, seed=s.cfg.seed, device=s.cfg.device)
    learned = agent.learn(s.env, cfg, work, progress=s.progress, log=s.log)
    return agent, int(learned.timesteps)


def _run_baseline(s: _Session, name: str) -> _Candidate:
    """Fit baseline ``name`` on the defense data (its own operating point, on defense-validation), then
    judge its repair by the evidence rule on the env's reward batch. A baseline that fine-tunes
    instead of pruning (ft, ngf) is judged the same way: its changed weights are the repair."""
    t0 = time.perf_counter()
    params = s.cfg.params if name == s.cfg.defense else {}
    s.log(f"[onp] {name}: fitting the baseline on {len(s.data.train_y)} defense-train images")
    result = _baselines().build_defense(name, **params).fit(s.model, s.data, seed=s.cfg.seed, augment=s.augment)
    prunes = result.pruned is not None
    pruned = [int(i) for i in result.pruned] if result.pruned is not None else []
    after = _val_metrics(result.model, s.target)
    judgement = s.rule.judge(s.initial, {**after, "n_pruned": len(pruned) if prunes else 1}, s.n_triggered)
    if not prunes:
        judgement = dataclasses.replace(judgement, n_pruned=0)
    info = {
        "modifies": "bn masks" if prunes else "weights (fine-tuning)",
        "operating_point": to_jsonable(result.info.get("operating_point")),
    }
    return _candidate(s, name, result.model, pruned, judgement, t0, info)


@RUNNERS.register("auto")
def _run_auto(s: _Session, name: str) -> _Candidate:
    """Run every defense of ``portfolio``; keep the repair with the best reward val ACC - estimated val
    ASR on defense-validation (the first one on ties; refused repairs count as the unrepaired model)."""
    t0 = time.perf_counter()
    tried = []
    for defense in s.cfg.portfolio:
        s.log(f"[onp] auto: trying {defense}")
        tried.append(_runner(defense)(s, defense))
    best = max(tried, key=lambda c: c.reward)
    s.log(
        f"[onp] auto: {best.defense} has the best reward on defense-validation ({best.reward:+.4f}: val ACC "
        f"{best.val['acc']:.3f} - estimated val ASR {best.val['asr']:.3f})"
    )
    return dataclasses.replace(
        best, seconds=time.perf_counter() - t0, info={**best.info, "portfolio": [c.to_dict() for c in tried]}
    )


def _no_defense(s: _Session, verdict: Verdict) -> _Candidate:
    """Prune nothing: no backdoor is suspected (and ``force`` is off)."""
    judgement = s.rule.judge(s.initial, s.initial, s.n_triggered)
    judgement = dataclasses.replace(
        judgement,
        reason=f"no backdoor found ({verdict.evidence()}); force=True (--force) defends anyway",
    )
    return _Candidate("none", copy.deepcopy(s.model).eval(), [], judgement, _val_metrics(s.model, s.target), 0.0)


def _verdict(probe: ASRProbe, cfg: DefendConfig) -> Verdict:
    """The backdoor verdict from the trigger inversion the estimator did (its probe's ``info``)."""
    verdict = backdoor_verdict(probe.info, estimator=cfg.asr_estimator, threshold=cfg.anomaly_threshold)
    if verdict is None:
        missing = [k for k in INVERSION_KEYS if k not in probe.info]
        raise ValueError(
            f"ASR estimator {cfg.asr_estimator!r} reports no {', '.join(missing)}; the backdoor verdict "
            f"needs a trigger-inversion estimator such as 'synthesized' or 'synthesized-multi'"
        )
    return verdict


def _fit_stamp(clean: Tensor, stamped: Tensor) -> Tuple[Tensor, Tensor]:
    """``(mask * pattern, mask)`` of ``stamped = (1 - mask) * clean + mask * pattern``, by least squares
    per pixel over the images: ``stamped - clean`` is linear in ``clean`` with slope ``-mask`` and
    intercept ``mask * pattern``. Where ``clean`` is constant over the images the slope is taken as 0."""
    d = stamped - clean
    xm, dm = clean.mean(0), d.mean(0)
    var = ((clean - xm) ** 2).mean(0)
    cov = ((clean - xm) * (d - dm)).mean(0)
    slope = torch.where(var > 1e-6, cov / var.clamp_min(1e-6), torch.zeros_like(var))
    return (dm - slope * xm).clamp(0, 1), (-slope).clamp(0, 1).amax(0, keepdim=True)


def _recover_trigger(probe: ASRProbe, data: DefenseData, target: int) -> RecoveredTrigger:
    """The estimated target's trigger: from the probe's ``info`` when the estimator records its
    ``mask`` and ``pattern``, else fitted from the stamped images and their clean originals (of the
    first trigger family only, when the probe stamps several: ``info["family_slices"]``)."""
    info = probe.info
    images = probe.images
    slices = info.get("family_slices")
    if slices:
        start, end = min(slices.values())
        images = images[start:end]
    if "mask" in info and "pattern" in info:
        mask, pattern = torch.as_tensor(info["mask"]), torch.as_tensor(info["pattern"])
        stamp = mask * pattern
    else:
        clean = data.val_x[data.val_y != target][: len(images)]
        stamp, mask = _fit_stamp(clean, images)
    return RecoveredTrigger(stamp=stamp, mask=mask, stamped=images[:N_STAMPED].clone(), target=target)


@contextlib.contextmanager
def _work_folder(work_dir: Optional[PathLike]) -> Iterator[Path]:
    """``work_dir`` (a learned policy's files go there), or a temporary folder deleted afterwards."""
    if work_dir is not None:
        yield Path(work_dir)
        return
    with tempfile.TemporaryDirectory(prefix="onp-defend-") as tmp:
        yield Path(tmp)


def _open_session(
    model: nn.Module, images: CleanImages, cfg: DefendConfig, work: Path, log: Log, progress: bool
) -> _Session:
    """Split the images, build the env on the model (its ASR estimator inverts the triggers)."""
    from agents.vec_envs import EnvFactory, env_kwargs_from_config
    from envs import PruningSubject

    train, val = split_defense(images, val_fraction=cfg.val_fraction, seed=cfg.seed)
    if images.val is not None:
        log(
            f"[onp] using your own split of the clean images: {len(train)} defense-train, {len(val)} defense-validation"
        )
    data = to_defense_data(train, val)
    subject = PruningSubject(copy.deepcopy(model).cpu().eval(), None, data, name="defended model")
    train_cfg = cfg.learned_config()
    env = EnvFactory(subject, env_kwargs_from_config(train_cfg["env"], cfg.cache_dir), seed=cfg.seed, monitor=False)()
    delta = float(train_cfg["env"]["delta"])
    rule = RolloutConfig.from_dict(train_cfg["rollout"]).evidence_rule(delta)
    return _Session(cfg, subject.model, data, env, train_cfg, rule, work, log, progress, images.source)


def _test_metrics(before: nn.Module, after: nn.Module, test: CleanImages, cfg: DefendConfig) -> Dict[str, Any]:
    """Test ACC before/after; with ``cfg.attack`` also ASR, RA and DER (trigger-aware). Reporting only."""
    out: Dict[str, Any] = {
        "n": len(test),
        "source": test.source,
        "acc_before": accuracy(predict(before, test.x), test.y),
        "acc_after": accuracy(predict(after, test.x), test.y),
    }
    if not cfg.trigger_aware:
        return out
    attack = _known_trigger(cfg, tuple(test.x.shape[1:]), test.num_classes)
    b = evaluate_backdoor(before, test.x, test.y, attack)
    a = with_der(b, evaluate_backdoor(after, test.x, test.y, attack))
    out.update(
        asr_before=b["asr"],
        asr_after=a["asr"],
        ra_before=b["ra"],
        ra_after=a["ra"],
        der=a["der"],
        trigger_aware=True,
        attack=attack.params(),
        note="trigger-aware: ASR/RA with the trigger you gave (--attack or --trigger-image/--trigger-mask), "
        "on the test images; for reporting only, never used by the defense",
    )
    return out


def _known_trigger(cfg: DefendConfig, shape: Tuple[int, ...], num_classes: int) -> Attack:
    """The trigger the user knows: a registered attack (``cfg.attack``) or two image files."""
    if cfg.trigger_image is not None:
        assert cfg.target is not None  # DefendConfig checks that trigger_image comes with target
        return ImageTrigger(shape, num_classes, image=cfg.trigger_image, mask=cfg.trigger_mask, target=cfg.target)
    assert cfg.attack is not None
    target = {} if cfg.target is None else {"target": cfg.target}
    return build_attack(cfg.attack, shape, num_classes, **{**cfg.attack_params, **target})


def _check_known_trigger(cfg: DefendConfig, test: Optional[CleanImages], how: str) -> None:
    """A known trigger (``attack`` or ``trigger_image``) needs test images, and its files and parameters
    are checked before any defending."""
    if not cfg.trigger_aware:
        return
    if test is None:
        raise ValueError(f"a known trigger (attack or trigger_image) only measures test ASR: give {how}")
    _known_trigger(cfg, tuple(test.x.shape[1:]), test.num_classes)


def _check_own_split(images: CleanImages, cfg: DefendConfig, what: str) -> None:
    """Images that carry their own defense-validation split take no ``val_fraction``."""
    if images.val is not None and "val_fraction" in cfg.model_fields_set:
        raise ValueError(f"{what} marks its own defense-validation images (val); drop val_fraction (--val-fraction)")


def _pruned_per_layer(names: Sequence[str]) -> Dict[str, int]:
    return dict(Counter(name.rsplit("[", 1)[0] for name in names))


def _report(
    s: _Session, cand: _Candidate, verdict: Verdict, trigger: RecoveredTrigger, test: Optional[CleanImages], t0: float
) -> DefenseReport:
    """The :class:`DefenseReport` of the kept repair (figures measured on the returned model)."""
    graph = s.base.graph
    names = graph.neuron_names(cand.pruned)
    if isinstance(s.model, NormalizedModel):
        names = [n.removeprefix(NormalizedModel.PREFIX) for n in names]
    before = _val_metrics(s.model, s.target)
    trigger.pred_before = predict(s.model, trigger.stamped).tolist()
    trigger.pred_after = predict(cand.model, trigger.stamped).tolist()
    metrics: Dict[str, Any] = {
        "val": {
            "acc_before": before["acc"],
            "acc_after": cand.val["acc"],
            "asr_before": before["asr"],
            "asr_after": cand.val["asr"],
            "n_clean": int(s.target.n_clean),
            "n_triggered": s.n_triggered,
            "asr_is_estimate": True,
            "asr_note": ASR_ESTIMATE_NOTE,
        },
        "suspected": verdict.suspected,
        "forced": bool(s.cfg.force and not verdict.suspected),
        "outcome": cand.judgement.verdict,
        "defense": s.cfg.defense,
        "chosen_defense": cand.defense,
        "defense_info": cand.info,
        "defense_seconds": round(cand.seconds, 2),
        "n_pruned": len(cand.pruned),
        "num_neurons": int(graph.num_nodes),
        "pruned_per_layer": _pruned_per_layer(names),
        "asr_estimator": s.cfg.asr_estimator,
        "trigger_aware": False,
        "clean_source": s.source,
        "n_defense_train": len(s.data.train_y),
        "n_defense_val": len(s.data.val_y),
    }
    if test is not None:
        metrics["test"] = _test_metrics(s.model, cand.model, test, s.cfg)
    wall = time.perf_counter() - t0
    metrics["wall_time"] = round(wall, 2)
    return DefenseReport(
        model=unwrap(cand.model),
        pruned=list(cand.pruned),
        pruned_names=names,
        verdict=verdict,
        judgement=cand.judgement,
        defense=s.cfg.defense,
        metrics=metrics,
        wall_time=wall,
        trigger=trigger,
    )


def run_defense(
    model: nn.Module,
    images: CleanImages,
    cfg: DefendConfig,
    *,
    test: Optional[CleanImages] = None,
    work_dir: Optional[PathLike] = None,
    log: Log = print,
    progress: bool = False,
) -> DefenseReport:
    """Defend ``model`` with the defender's clean ``images`` as ``cfg`` says (the module doc's steps).

    Args:
        model: the model as it is defended: images in [0, 1] in, logits out (a :class:`~onp.user_model.NormalizedModel`
            wrapper where the user gave ``mean``/``std``); not modified.
        images: the clean images (:func:`onp.data.user_data.load_clean_images` or :func:`images_from_arrays`).
        cfg: the settings (defense, estimator, threshold, ``force``, seed ...).
        test: optional held-out images: test ACC (and ASR with ``cfg.attack``) in the report only.
        work_dir: where a learned defense writes its policy (default: a temporary folder).
        log: progress messages; progress: progress bars.
    """
    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    try:
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        seed_everything(cfg.seed, deterministic=cfg.deterministic)
        with _work_folder(work_dir) as work:
            s = _open_session(model, images, cfg, work, log, progress)
            try:
                verdict = _verdict(s.target.probe, cfg)
                log(f"[onp] {verdict.summary()}")
                trigger = _recover_trigger(s.target.probe, s.data, verdict.estimated_target)
                if verdict.suspected or cfg.force:
                    if not verdict.suspected:
                        log(f"[onp] force: defending anyway with {cfg.defense}")
                    cand = _runner(cfg.defense)(s, cfg.defense)
                else:
                    cand = _no_defense(s, verdict)
                return _report(s, cand, verdict, trigger, test, t0)
            finally:
                s.env.close()
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------------
# the two entry points


def _check_names(cfg: DefendConfig) -> None:
    """Every name of ``cfg`` (defense, portfolio, baseline hyperparameters, estimator, attack), before any
    model is loaded."""
    _runner(cfg.defense)
    bl = _baselines()
    if cfg.defense in bl.DEFENSES:
        bl.build_defense(cfg.defense, **cfg.params)
    elif cfg.params:
        raise ValueError(
            f"params are a baseline's hyperparameters; defense {cfg.defense!r} takes none (the learned "
            f"defense's settings go in train, e.g. --set train.ppo.total_timesteps=5000)"
        )
    if cfg.defense == "auto":
        for name in cfg.portfolio:
            if name == "auto":
                raise ValueError("portfolio: 'auto' cannot be part of its own portfolio")
            _runner(name)
    from envs import ASR_ESTIMATORS

    ASR_ESTIMATORS.check(cfg.asr_estimator)
    if cfg.attack is not None:
        from .attacks import ATTACKS

        ATTACKS.check(cfg.attack)


def _printer(quiet: bool) -> Log:
    return (lambda msg: None) if quiet else (lambda msg: print(msg, flush=True))


def _print_summary(report: DefenseReport) -> None:
    for line in report.summary_lines():
        print(f"[onp] {line}", flush=True)


def defend(
    model: nn.Module,
    clean_x: Any,
    clean_y: Any,
    defense: str = "ppo-gnn",
    *,
    test_x: Any = None,
    test_y: Any = None,
    clean_val: Any = None,
    out: Optional[PathLike] = None,
    overwrite: bool = False,
    quiet: bool = True,
    **options: Any,
) -> DefenseReport:
    """Defend ``model`` with a few hundred clean images: a backdoor verdict, then a repair.

    Args:
        model: your ``nn.Module`` (images in [0, 1] in, logits out; pass ``mean``/``std`` if it expects
            normalised images). It is not modified.
        clean_x, clean_y: clean images (torch or numpy; uint8 0..255 or float in [0, 1]; ``(N, C, H, W)``,
            ``(N, H, W, C)`` or ``(N, H, W)``) and integer labels; at least 20.
        defense: ``"ppo-gnn"`` (default), ``"auto"`` or a baseline (``onp.defend.defense_choices()``).
        test_x, test_y: optional held-out images for test ACC (and ASR with ``attack=...``) in the report.
        clean_val: optional bool ``(N,)``: which clean images are your own defense-validation split
            (default: a stratified split, ``val_fraction`` of each class, drawn with ``seed``).
        out: also write the run folder there (as ``python -m onp.defend`` does); ``overwrite`` replaces
            an earlier onp run there.
        quiet: print nothing (default); ``False`` prints progress and the summary.
        **options: :class:`onp.defend_config.DefendConfig` keys, e.g. ``force=True``,
            ``anomaly_threshold=2.0``, ``seed=1``, ``train={"ppo": {"total_timesteps": 5000}}``,
            ``estimator_params={"steps": 150}``; ``num_classes``, ``in_channels`` and ``input_size`` are
            read from the model and the images unless given.

    Returns:
        :class:`DefenseReport` (``report.model`` is the repaired model).
    """
    if "method" in options:  # the keyword's name before it was renamed (issue #15: one word per concept)
        options = dict(options)
        defense = options.pop("method")
    cfg, wrapped = _api_config(model, clean_x, defense, options)
    shape: Dict[str, Any] = {"num_classes": cfg.num_classes, "channels": cfg.in_channels, "image_size": cfg.image_size}
    images = images_from_arrays(clean_x, clean_y, val=clean_val, **shape)
    _check_own_split(images, cfg, "clean_val")
    test = None if test_x is None else images_from_arrays(test_x, test_y, what="test_x/test_y", **shape)
    _check_known_trigger(cfg, test, "test_x and test_y")
    log = _printer(quiet)
    if out is None:
        report = run_defense(wrapped, images, cfg, test=test, log=log, progress=not quiet)
    else:
        with run_folder(Path(out), tool="onp.defend", overwrite=overwrite) as run_dir:
            report = run_defense(
                wrapped, images, cfg, test=test, work_dir=run_dir / "learn", log=log, progress=not quiet
            )
            write_defense_run(run_dir, report, cfg, weights=report.model.state_dict(), command="onp.defend(...)")
        report.run_dir = Path(out)
    if not quiet:
        _print_summary(report)
    return report


def _api_config(
    model: nn.Module, clean_x: Any, defense: str, options: Mapping[str, Any]
) -> Tuple[DefendConfig, nn.Module]:
    """:func:`defend`'s config (the image shape and class count read from the images and the model unless
    given; every option checked before the model runs) and the model as it is defended (normalising
    first where ``mean``/``std`` are given)."""
    taken = sorted(k for k in ("arch", "weights", "clean_data", "indices", "test_data", "test_indices") if k in options)
    if taken:
        raise ValueError(
            f"defend() takes the model and the images themselves; {', '.join(taken)} are options of "
            f"python -m onp.defend (run_defend)"
        )
    channels, (height, width) = _layout_of(tuple(_as_numpy(clean_x).shape))
    shape = {"in_channels": channels, "input_size": [height, width], **options, "defense": defense}
    cfg = DefendConfig.from_dict(shape)
    wrapped = with_normalization(model, cfg.mean, cfg.std, cfg.in_channels)
    if "num_classes" not in options:
        classes = output_shape(wrapped, cfg.in_channels, cfg.image_size, "the model")[-1]
        cfg = DefendConfig.from_dict({**shape, "num_classes": classes})
    _check_names(cfg)
    check_output(wrapped, cfg.in_channels, cfg.image_size, cfg.num_classes, "the model")
    return cfg, wrapped


def _load_images(cfg: DefendConfig, source: str, indices: Optional[str]) -> CleanImages:
    """The images of ``source`` (a folder, an ``.npz`` or a dataset name with ``indices``) for this model."""
    return load_clean_images(
        source,
        num_classes=cfg.num_classes,
        channels=cfg.in_channels,
        image_size=cfg.image_size,
        indices=indices,
        data_dir=cfg.data_dir,
        data_source=cfg.data_source,
    )


def default_run_dir(cfg: DefendConfig) -> Path:
    """``runs/defend/<arch>-<defense>-s<seed>`` (a file-based ``--arch`` is named by its class)."""
    arch = (cfg.arch or "model").rsplit(":", 1)[-1]
    return Path("runs") / "defend" / re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{arch}-{cfg.defense}-s{cfg.seed}")


def _from_file_line(cfg: DefendConfig, wf: WeightsFile) -> str:
    """The log line naming the model that a BackdoorBench file gave (no ``--arch``)."""
    h, w = cfg.image_size
    norm = f"--mean {cfg.mean} --std {cfg.std}" if cfg.mean is not None else "no --mean/--std"
    return (
        f"the model, from the BackdoorBench file {wf.path.name} (model_name {wf.model_name!r}): "
        f"--arch {cfg.arch} --width {cfg.width} --num-classes {cfg.num_classes} --in-channels {cfg.in_channels} "
        f"--input-size {h} {w}, {norm}"
    )


def run_defend(
    config: Union[DefendConfig, Mapping[str, Any]],
    out: Optional[PathLike] = None,
    *,
    overwrite: bool = False,
    quiet: bool = False,
    command: Optional[str] = None,
) -> DefenseReport:
    """``python -m onp.defend`` as a function: build ``arch``, load ``weights`` (:mod:`onp.foreign_weights`:
    weights-only, key prefixes and layouts handled), read ``clean_data`` (and ``test_data``), defend
    (:func:`run_defense`) and write the run folder ``out`` (:func:`write_defense_run`).

    ``arch`` may be left out when ``weights`` is a BackdoorBench ``attack_result.pt``: the architecture
    and its options come from the file, settings given explicitly win (:func:`resolve_arch`).

    Every input is checked before the run folder is created: a bad one is a ``ValueError``,
    ``FileNotFoundError`` or :class:`~onp.io.CheckpointError` naming it.
    """
    from .foreign_weights import load_into, to_user_keys

    cfg = config if isinstance(config, DefendConfig) else DefendConfig.from_dict(config)
    needed = ("arch", "weights", "clean_data") if cfg.weights is None else ("weights", "clean_data")
    missing = [f"--{k.replace('_', '-')}" for k in needed if getattr(cfg, k) is None]
    if missing:
        raise ValueError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} required")
    assert cfg.weights is not None and cfg.clean_data is not None
    _check_names(cfg)
    cache_root(cfg.cache_dir)  # an empty ONP_CACHE, or one at a file, is refused before any work
    cfg, read = resolve_arch(cfg)  # no --arch: a BackdoorBench file names it
    assert cfg.arch is not None and cfg.weights is not None and cfg.clean_data is not None
    log = _printer(quiet)
    if read is not None:
        log(f"[onp] {_from_file_line(cfg, read)}")
    net = build_arch(
        cfg.arch, num_classes=cfg.num_classes, in_channels=cfg.in_channels, width=cfg.width, mean=cfg.mean, std=cfg.std
    )
    loaded = load_into(net, read if read is not None else cfg.weights)
    model = net if not is_user_arch(cfg.arch) else with_normalization(net, cfg.mean, cfg.std, cfg.in_channels)
    check_output(model, cfg.in_channels, cfg.image_size, cfg.num_classes, f"--arch {cfg.arch}")
    images = _load_images(cfg, cfg.clean_data, cfg.indices)
    _check_own_split(images, cfg, cfg.clean_data)
    test = _load_images(cfg, cfg.test_data, cfg.test_indices) if cfg.test_data else None
    _check_known_trigger(cfg, test, "--test-data")
    final = Path(out) if out is not None else default_run_dir(cfg)
    with run_folder(final, tool="onp.defend", overwrite=overwrite) as run_dir:
        report = run_defense(model, images, cfg, test=test, work_dir=run_dir / "learn", log=log, progress=not quiet)
        weights = to_user_keys(report.model.state_dict(), loaded.key_map)
        write_defense_run(run_dir, report, cfg, weights=weights, weights_format=loaded.file.format, command=command)
    report.run_dir = final
    _print_summary(report)
    return report


# --------------------------------------------------------------------------------------------------
# command line


def _model_flags(p: argparse.ArgumentParser) -> None:
    """``--arch``, ``--weights`` and the model's shape and normalisation."""
    m = p.add_argument_group("the model")
    from .models import MODELS

    m.add_argument(
        "--arch",
        default=None,
        help=f"a registered architecture ({', '.join(MODELS.names())}) or your "
        f"own: path/file.py:Class, package.module:factory (imports that code); "
        f"optional for a BackdoorBench attack_result.pt (read from the file)",
    )
    m.add_argument(
        "--weights",
        type=path_arg,
        default=None,
        help="state_dict .pt/.pth (weights-only), .safetensors, or BackdoorBench attack_result.pt",
    )
    m.add_argument("--width", type=int_at_least(1), default=None, help="first-stage width (default: the arch's)")
    m.add_argument("--num-classes", type=int_at_least(2), default=None, help="classes (default 10)")
    m.add_argument("--in-channels", type=int, choices=[1, 3], default=None, help="image channels (default 3)")
    m.add_argument(
        "--input-size",
        type=int_at_least(1),
        nargs="+",
        default=None,
        metavar="N",
        help="image size: H (square) or H W (default 32)",
    )
    m.add_argument(
        "--mean",
        type=finite_float,
        nargs="+",
        default=None,
        help="per-channel normalisation your model expects (with --std); onp's own archs apply it inside",
    )
    m.add_argument("--std", type=finite_float, nargs="+", default=None)


def _data_flags(p: argparse.ArgumentParser) -> None:
    """The defender's clean images, the optional test images and a known trigger."""
    d = p.add_argument_group("the defender's images")
    d.add_argument(
        "--clean-data",
        default=None,
        help="a folder (one sub-folder per class), an .npz with x and y, or a registered dataset name with --indices",
    )
    d.add_argument("--indices", type=path_arg, default=None, help="with a dataset name: its train-split indices")
    d.add_argument("--val-fraction", type=fraction, default=None, help="share for defense-validation (default 0.5)")
    d.add_argument(
        "--hflip",
        action="store_true",
        default=None,
        help="horizontal flips keep your labels (clothes, most photos; not digits or signs): the defenses' "
        "training flips images too, as onp.baseline and onp.compare do for such a dataset (default: no flips)",
    )
    d.add_argument("--test-data", default=None, help="optional held-out images (same formats): test ACC")
    d.add_argument("--test-indices", type=path_arg, default=None)
    d.add_argument(
        "--attack",
        default=None,
        help="a registered attack: adds test ASR with its trigger (trigger-aware; needs --test-data)",
    )
    d.add_argument("--trigger-image", type=path_arg, default=None, help="a trigger you know: its pattern (PNG/JPEG)")
    d.add_argument(
        "--trigger-mask",
        type=path_arg,
        default=None,
        help="its mask (greyscale PNG, white = the trigger's pixels); with --trigger-image, --target and --test-data",
    )
    d.add_argument("--target", type=int_at_least(0), default=None, help="the known trigger's target class")
    d.add_argument("--data-dir", type=path_arg, default=None)
    d.add_argument("--data-source", choices=["auto", "full", "sample"], default=None)


def _defense_flags(p: argparse.ArgumentParser) -> None:
    """The defense, the verdict's threshold and the learned defense's main settings."""
    f = p.add_argument_group("the defense")
    f.add_argument(
        "--defense",
        "--method",
        default=None,
        help="ppo-gnn (default), auto, or a baseline (see --list); --method: the old spelling",
    )
    f.add_argument(
        "--portfolio", nargs="+", default=None, help="the defenses --defense auto tries (default ppo-gnn clp fp)"
    )
    f.add_argument(
        "--threshold",
        type=finite_float,
        default=None,
        help="with estimator_params.detector trigger-size: suspected when the estimated target's anomaly index "
        "<= -threshold (default 2; the default detector, confirmed-or-margin, has fixed ones and refuses another)",
    )
    f.add_argument("--force", action="store_true", default=None, help="defend even when no backdoor is suspected")
    f.add_argument(
        "--asr-estimator",
        default=None,
        help="synthesized-multi (default), synthesized, ...; 'trigger' needs the real trigger",
    )
    f.add_argument("--timesteps", type=int_at_least(0), default=None, help="ppo-gnn: PPO env steps")
    f.add_argument(
        "--policy",
        type=path_arg,
        default=None,
        help="ppo-gnn: apply this trained policy (an onp.train run folder) instead of training one",
    )
    f.add_argument("--budget", type=finite_float, default=None, help="ppo-gnn: most neurons pruned (fraction/count)")
    f.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any config key, dotted (train.ppo.n_steps=64, estimator_params.steps=150, params.delta=0.1)",
    )
    f.add_argument("--list", action="store_true", help="list the defenses and exit")


def _running_flags(p: argparse.ArgumentParser) -> None:
    """Seed, device, threads, cache and the run folder."""
    r = p.add_argument_group("running")
    r.add_argument("--seed", type=int_at_least(0), default=None)
    r.add_argument("--deterministic", action="store_true", default=None)
    r.add_argument("--device", type=device_arg, default=None, help="device of the learned policy")
    r.add_argument("--torch-threads", type=int_at_least(1), default=None)
    r.add_argument("--cache-dir", type=path_arg, default=None, help="cache of reverse-engineered triggers")
    r.add_argument(
        "--out", type=path_arg, default=None, help="run folder (default runs/defend/<arch>-<defense>-s<seed>)"
    )
    r.add_argument("--overwrite", action="store_true", help="replace an earlier onp run folder (after success)")
    r.add_argument("--quiet", action="store_true", help="print only the summary")


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m onp.defend`` flags (each maps to one :class:`DefendConfig` key)."""
    p = argparse.ArgumentParser(
        prog="python -m onp.defend",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="See docs/defend.md for the verdict, the defenses and the files written.",
    )
    for add_flags in (_model_flags, _data_flags, _defense_flags, _running_flags):
        add_flags(p)
    return p


#: flag dest -> the :class:`DefendConfig` key it sets (dotted for nested ones)
FLAG_KEYS = {
    "arch": "arch",
    "weights": "weights",
    "width": "width",
    "num_classes": "num_classes",
    "in_channels": "in_channels",
    "input_size": "input_size",
    "mean": "mean",
    "std": "std",
    "clean_data": "clean_data",
    "indices": "indices",
    "val_fraction": "val_fraction",
    "hflip": "hflip",
    "test_data": "test_data",
    "test_indices": "test_indices",
    "attack": "attack",
    "trigger_image": "trigger_image",
    "trigger_mask": "trigger_mask",
    "target": "target",
    "data_dir": "data_dir",
    "data_source": "data_source",
    "defense": "defense",
    "portfolio": "portfolio",
    "threshold": "anomaly_threshold",
    "force": "force",
    "asr_estimator": "asr_estimator",
    "timesteps": "train.ppo.total_timesteps",
    "budget": "train.env.budget",
    "policy": "policy",
    "seed": "seed",
    "deterministic": "deterministic",
    "device": "device",
    "torch_threads": "torch_threads",
    "cache_dir": "cache_dir",
}


def config_from_args(args: argparse.Namespace) -> Dict[str, Any]:
    """The defend config of the command line: the flags, then ``--set`` (the last word)."""
    nested: Dict[str, Any] = {}
    for dest, key in FLAG_KEYS.items():
        value = getattr(args, dest)
        if value is None:
            continue
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = str(value) if isinstance(value, Path) else value
    return deep_update(nested, parse_overrides(args.set))


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list:
        print("\n".join(defense_choices()))
        return 0
    cfg = DefendConfig.from_dict(config_from_args(args))
    line = reproduce_line(["python -m onp.defend"] + list(argv if argv is not None else sys.argv[1:]))
    run_defend(cfg, args.out, overwrite=args.overwrite, quiet=args.quiet, command=line)
    return 0


class _CallableModule(types.ModuleType):
    """``onp.defend`` is both this module (``python -m onp.defend``) and the function the issue asks for
    (``onp.defend(model, clean_x, clean_y)``): calling the module calls :func:`defend`."""

    def __call__(self, *args: Any, **kwargs: Any) -> DefenseReport:
        return defend(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
