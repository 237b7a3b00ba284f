"""The backdoored-model zoo: train once, cache by config hash, load everywhere.

>>> from onp.zoo import BackdoorConfig, get_backdoored, load_bundle
>>> model, meta = get_backdoored(BackdoorConfig(attack="badnets"))       # doctest: +SKIP
>>> bundle = load_bundle(BackdoorConfig(attack="badnets"))                # doctest: +SKIP
>>> bundle.defense_data, bundle.attack, bundle.test_x                     # doctest: +SKIP

Each artifact directory holds ``model.pt`` (a state_dict), ``meta.json``, ``config.json``,
``splits.npz`` (the defender pool index file) and ``trigger.pt`` (the trigger's tensors).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

from .attacks import ATTACKS, Attack, build_attack
from .attacks.base import MODES
from .classifier_training import PoisonPlan, TrainRecipe, train_classifier
from .config import check_types, from_dict, stable_hash
from .data import DATASETS, Dataset, DatasetSpec, ImageSet, load_dataset
from .data.augment import Augment
from .data.defense import DefenseData
from .data.splits import Splits, as_float, make_splits
from .io import (
    MARKER,
    CheckpointError,
    PathLike,
    atomic_torch_save,
    atomic_write_json,
    cache_root,
    load_checkpoint,
    load_state_dict_into,
    read_json,
    run_folder,
    write_marker,
)
from .metrics import evaluate_backdoor
from .models import DEFAULT_WIDTH, MODELS, build_model_for
from .rundir import environment_info
from .seeding import seed_everything

ARTIFACT_FILES = ("model.pt", "meta.json", "config.json", "splits.npz", "trigger.pt")
#: the epoch checkpoint of an unfinished training (the next identical call resumes from it)
TRAIN_STATE = "train_state.pt"


#: training epochs of the backdoored model when ``BackdoorConfig.epochs`` is None. The full
#: Fashion-MNIST recipe is 5 epochs (~2,300 SGD steps of 128 images). The bundled 12,000-image sample
#: gets 20 (~1,800 steps): with 5 epochs (~450 steps) a sample model stays at ~85% clean accuracy and
#: its backdoor is spread out; CLP's pruning order then removed it on one of three seeds
#: (docs/results.md §8). The count was set in advance from the number of SGD steps, not tuned on test
#: data.
RECIPE_EPOCHS = {"full": 5, "sample": 20}


@dataclass
class BackdoorConfig:
    """Everything that determines a backdoored model (and so its cache key)."""

    model: str = "resnet18"
    width: Optional[int] = None  # None -> the architecture's CPU default (16 for resnet18)
    dataset: str = "fashion-mnist"
    data_source: str = "auto"  # auto | full | sample
    attack: str = "badnets"
    attack_params: Dict[str, Any] = field(default_factory=dict)
    target: int = 0
    mode: str = "all2one"
    poison_rate: float = 0.1
    clean: bool = False  # train an unpoisoned model with the same recipe (false-positive studies)
    epochs: Optional[int] = None  # None -> the recipe's for the data: RECIPE_EPOCHS (5 full, 20 sample)
    batch_size: int = 128
    lr: float = 0.1
    weight_decay: float = 5e-4
    seed: int = 0
    defense_size: int = 500
    defense_val_fraction: float = 0.5
    split_seed: int = 0
    max_train: Optional[int] = None  # cap the attacker's training set (quick tests)

    def validate(self) -> "BackdoorConfig":
        check_types(self, "backdoor config")
        MODELS.check(self.model)
        DATASETS.check(self.dataset)
        ATTACKS.check(self.attack)
        if not 0.0 < self.poison_rate < 1.0:
            raise ValueError(f"poison_rate must be in (0, 1), got {self.poison_rate}")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"epochs must be >= 1 or null, got {self.epochs}")
        for key in ("lr", "weight_decay"):
            val = getattr(self, key)
            if not isinstance(val, (int, float)) or not math.isfinite(val) or val < 0 or (key == "lr" and val == 0):
                raise ValueError(f"{key} must be a finite number {'> 0' if key == 'lr' else '>= 0'}, got {val!r}")
        if self.width is not None and not 1 <= self.width <= 4096:
            raise ValueError(f"width must be in [1, 4096], got {self.width}")
        if self.defense_size < 2:
            raise ValueError(f"defense_size must be >= 2, got {self.defense_size}")
        if self.data_source not in ("auto", "full", "sample"):
            raise ValueError(f"data_source must be auto, full or sample; got {self.data_source!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        if not 0.0 < self.defense_val_fraction < 1.0:
            raise ValueError(f"defense_val_fraction must be in (0, 1), got {self.defense_val_fraction}")
        for key in ("target", "seed", "split_seed"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
        if not 1 <= self.batch_size <= 100_000 or (self.epochs or 0) > 100_000:
            raise ValueError(
                f"batch_size must be in [1, 100000] and epochs <= 100000; got {self.batch_size}, {self.epochs}"
            )
        if self.max_train is not None and self.max_train < 1:
            raise ValueError(f"max_train must be >= 1 or null, got {self.max_train}")
        return self

    def resolved(self) -> "BackdoorConfig":
        """A copy with defaults filled in (the width), validated."""
        check_types(self, "backdoor config")
        width = DEFAULT_WIDTH.get(self.model, 16) if self.width is None else self.width
        return dataclasses.replace(self, width=width).validate()

    def for_data(self, dataset: Dataset) -> "BackdoorConfig":
        """:meth:`resolved`, with ``epochs: None`` replaced by the recipe's for ``dataset``
        (:data:`RECIPE_EPOCHS`: the bundled sample is trained longer than the full dataset)."""
        cfg = self.resolved()
        if cfg.epochs is None:
            cfg = dataclasses.replace(cfg, epochs=RECIPE_EPOCHS["sample" if dataset.is_sample else "full"])
        return cfg

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "BackdoorConfig":
        return from_dict(cls, data, "backdoor config")


@dataclass
class BackdoorBundle:
    """A loaded backdoored model with its attack, its dataset spec and the split data.

    ``defense_data`` is what defenses may use; ``test_x``/``test_y`` are for final reporting only.
    """

    model: nn.Module
    meta: Dict[str, Any]
    attack: Attack
    dataset: Dataset
    splits: Splits
    path: Path

    @property
    def spec(self) -> DatasetSpec:
        return self.dataset.spec

    @property
    def config(self) -> BackdoorConfig:
        return BackdoorConfig.from_dict(self.meta["config"])

    @property
    def defense_data(self) -> DefenseData:
        tr = self.dataset.train.subset(self.splits.defense_train)
        va = self.dataset.train.subset(self.splits.defense_val)
        return DefenseData(as_float(tr.images), tr.labels, as_float(va.images), va.labels, self.spec.num_classes)

    @property
    def test_x(self) -> torch.Tensor:
        return as_float(self.dataset.test.images)

    @property
    def test_y(self) -> torch.Tensor:
        return self.dataset.test.labels

    def fresh_model(self) -> nn.Module:
        """A new copy of the backdoored model (for defenses that edit weights)."""
        return load_model(self.path, self.meta)


def _data_key(ds: Dataset) -> Dict[str, Any]:
    return {"sample": ds.is_sample, "num_train": len(ds.train), "num_test": len(ds.test)}


def artifact_dir(config: BackdoorConfig, dataset: Dataset, cache_dir: Optional[PathLike] = None) -> Path:
    """``<cache>/zoo/<model>-w<width>-<dataset>-<attack|clean>-<hash>``, hash over the resolved config."""
    cfg = config.for_data(dataset)
    key = {k: v for k, v in cfg.to_dict().items() if k != "data_source"}
    key["data"] = _data_key(dataset)
    name = "clean" if cfg.clean else cfg.attack
    return cache_root(cache_dir) / "zoo" / f"{cfg.model}-w{cfg.width}-{cfg.dataset}-{name}-{stable_hash(key)}"


def _make_attack(cfg: BackdoorConfig, spec: DatasetSpec) -> Attack:
    return build_attack(
        cfg.attack,
        spec.image_shape,
        spec.num_classes,
        target=cfg.target,
        mode=cfg.mode,
        seed=cfg.seed,
        **cfg.attack_params,
    )


def _is_complete(path: Path) -> bool:
    return all((path / f).exists() for f in ARTIFACT_FILES)


def load_model(path: Path, meta: Optional[Dict[str, Any]] = None) -> nn.Module:
    """Rebuild the architecture from ``meta.json`` and load ``model.pt`` (weights_only)."""
    path = Path(path)
    meta = meta or read_json(path / "meta.json")
    cfg = BackdoorConfig.from_dict(meta["config"])
    spec = DATASETS.get(cfg.dataset).spec
    model = build_model_for(cfg.model, spec, cfg.width)
    state = load_checkpoint(path / "model.pt")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path / 'model.pt'}: expected a state_dict, got {type(state).__name__}")
    load_state_dict_into(model, state, path / "model.pt")
    return model.eval()


def get_backdoored(
    config: Union[BackdoorConfig, Dict[str, Any], None] = None,
    *,
    cache_dir: Optional[PathLike] = None,
    data_dir: Optional[Path] = None,
    overwrite: bool = False,
    device: str = "cpu",
    progress: bool = True,
) -> Tuple[nn.Module, Dict[str, Any]]:
    """Return ``(model, metadata)`` for ``config``, training and caching it on the first call.

    A second identical call loads the cached artifact at once. ``overwrite=True`` retrains (the cached
    model is replaced only once the new one is complete). An interrupted training resumes from its
    last completed epoch on the next call; a training that fails or diverges (non-finite weights:
    ``ValueError`` naming ``lr``) caches nothing that a later call could load.
    """
    bundle = load_bundle(
        config, cache_dir=cache_dir, data_dir=data_dir, overwrite=overwrite, device=device, progress=progress
    )
    return bundle.model, bundle.meta


def load_bundle(
    config: Union[BackdoorConfig, Dict[str, Any], None] = None,
    *,
    cache_dir: Optional[PathLike] = None,
    data_dir: Optional[Path] = None,
    overwrite: bool = False,
    device: str = "cpu",
    progress: bool = True,
    train_if_missing: bool = True,
) -> BackdoorBundle:
    """Like :func:`get_backdoored` but returns a :class:`BackdoorBundle` with the splits and attack."""
    cfg = config if isinstance(config, BackdoorConfig) else BackdoorConfig.from_dict(config or {})
    cfg = cfg.resolved()
    dataset = load_dataset(cfg.dataset, data_dir=data_dir, source=cfg.data_source)
    cfg = cfg.for_data(dataset)  # the epochs of the data actually used (full or the bundled sample)
    path = artifact_dir(cfg, dataset, cache_dir)
    complete = _is_complete(path)
    if not complete and not train_if_missing:
        raise FileNotFoundError(f"no cached model for this config at {path}; run python -m onp.backdoor first")
    if overwrite or not complete:
        _adopt_legacy_artifact(path)
        # a failed training leaves nothing but a resumable epoch checkpoint; overwrite=True retrains in a
        # staging folder next to the artifact and replaces it only once the new model is complete
        with run_folder(
            path,
            tool="onp.zoo",
            overwrite=overwrite,
            resume=not overwrite,
            done_file="meta.json",
            resumable=(TRAIN_STATE,),
        ) as work:
            _train_artifact(cfg, dataset, work, device=device, progress=progress)
    elif progress:
        print(f"[onp] using cached model {path}")
    return open_bundle(path, dataset=dataset)


def _read_meta(path: Path) -> Tuple[Dict[str, Any], BackdoorConfig]:
    if not (path / "meta.json").exists():
        raise CheckpointError(f"{path}: not an onp model directory (no meta.json)")
    meta = read_json(path / "meta.json")
    try:
        return meta, BackdoorConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path / 'meta.json'}: malformed metadata ({exc})") from exc


def model_config(path: Union[str, Path]) -> BackdoorConfig:
    """The :class:`BackdoorConfig` of the model folder ``path`` (its ``meta.json``; nothing loaded)."""
    return _read_meta(Path(path))[1]


def open_bundle(
    path: Union[str, Path], *, dataset: Optional[Dataset] = None, data_dir: Optional[Path] = None
) -> BackdoorBundle:
    """Open an existing artifact directory (e.g. one passed as ``--checkpoint``)."""
    path = Path(path)
    meta, cfg = _read_meta(path)
    if dataset is None:
        dataset = load_dataset(cfg.dataset, data_dir=data_dir, source=cfg.data_source)
    if _data_key(dataset) != meta.get("data"):
        raise CheckpointError(
            f"{path}: the model was trained on {meta.get('data')} but the dataset found now is "
            f"{_data_key(dataset)} ({dataset.source}); pass the same --data-dir/data_source"
        )
    splits = Splits.load(path / "splits.npz")
    if splits.digest() != meta.get("split_sha256"):
        raise CheckpointError(f"{path / 'splits.npz'}: split index file does not match meta.json's split_sha256")
    attack = _make_attack(cfg, dataset.spec)
    return BackdoorBundle(load_model(path, meta), meta, attack, dataset, splits, path)


def _adopt_legacy_artifact(path: Path) -> None:
    """Mark an artifact folder cached before onp wrote markers (it holds only an artifact's own files)."""
    known = set(ARTIFACT_FILES) | {"env.json", TRAIN_STATE}
    if (
        path.is_dir()
        and not (path / MARKER).exists()
        and any(path.iterdir())
        and all(p.name in known or p.name.endswith(".tmp") for p in path.iterdir())
    ):
        write_marker(path, "onp.zoo")


def _check_finite(model: nn.Module, metrics: Dict[str, Any], cfg: BackdoorConfig, state_path: Path) -> None:
    """Refuse a diverged training: non-finite weights or metrics raise a ValueError naming ``lr``.

    The epoch checkpoint holds the same weights, so it is deleted (nothing to resume from)."""
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    bad += [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        state_path.unlink(missing_ok=True)
        raise ValueError(
            f"training {cfg.model} on {cfg.dataset} diverged: non-finite values in {', '.join(bad[:3])}"
            f"{' ...' if len(bad) > 3 else ''} with lr={cfg.lr} (weight_decay={cfg.weight_decay}); "
            f"nothing was cached: lower the config key lr (the default is 0.1)"
        )


def _train_artifact(cfg: BackdoorConfig, dataset: Dataset, path: Path, *, device: str, progress: bool) -> None:
    """Train the backdoored model of ``cfg`` into the (existing) folder ``path``; ``meta.json`` last."""
    cfg = cfg.for_data(dataset)  # meta.json records the epochs actually trained
    atk = _attacker_data(cfg, dataset, path)
    if progress:
        print(
            f"[onp] training {cfg.model} (width {cfg.width}) on {cfg.dataset} [{dataset.source}], "
            f"{len(atk.train)} attacker images, {atk.kind(cfg)}, {cfg.epochs} epochs"
        )
    state_path = path / TRAIN_STATE
    model, train_seconds = _train_backdoored(cfg, dataset.spec, atk, state_path, device=device, progress=progress)
    metrics = evaluate_backdoor(model, as_float(dataset.test.images), dataset.test.labels, atk.attack)
    _check_finite(model, metrics, cfg, state_path)
    env = environment_info()  # git commit, package versions, hardware
    meta = _artifact_meta(cfg, dataset, atk, env, train_seconds=train_seconds, metrics=metrics)
    atomic_torch_save(path / "trigger.pt", atk.attack.trigger_pattern())
    atomic_write_json(path / "config.json", cfg.to_dict())
    atomic_write_json(path / "env.json", env)
    atomic_torch_save(path / "model.pt", model.state_dict())
    atomic_write_json(path / "meta.json", meta)  # written last: its presence marks a complete artifact
    if state_path.exists():
        state_path.unlink()
    if progress:
        print(
            f"[onp] {path.name}: test ACC {metrics['acc']:.4f}  ASR {metrics['asr']:.4f}  RA {metrics['ra']:.4f}  "
            f"(train {train_seconds:.0f}s)"
        )


@dataclass
class _AttackerData:
    """What the attacker trains on: the splits, its training images, the attack and the poisoning plan."""

    splits: Splits
    train: ImageSet
    attack: Attack
    plan: PoisonPlan

    def kind(self, cfg: BackdoorConfig) -> str:
        """The poisoning, for the progress line."""
        if cfg.clean:
            return "clean (unpoisoned)"
        return f"{cfg.attack} ({cfg.mode}, target {cfg.target}, {int(self.plan.poisoned.sum())} poisoned images)"


def _attacker_data(cfg: BackdoorConfig, dataset: Dataset, path: Path) -> _AttackerData:
    """The splits (``splits.npz`` in ``path``, made and saved on first use), the attacker's training
    images (at most ``max_train``, drawn with ``seed``), the attack and which images it poisons."""
    splits_path = path / "splits.npz"
    if splits_path.exists():
        splits = Splits.load(splits_path)
    else:
        splits = make_splits(len(dataset.train), cfg.defense_size, cfg.defense_val_fraction, cfg.split_seed)
        splits.save(splits_path)
    attacker = splits.attacker_train
    if cfg.max_train is not None:
        attacker = np.sort(
            np.random.default_rng(cfg.seed).choice(attacker, min(cfg.max_train, len(attacker)), replace=False)
        )
    train = dataset.train.subset(attacker)
    attack = _make_attack(cfg, dataset.spec)
    plan = (
        PoisonPlan.clean(train.labels)
        if cfg.clean
        else PoisonPlan.for_attack(attack, train.labels, cfg.poison_rate, cfg.seed)
    )
    return _AttackerData(splits, train, attack, plan)


def _train_backdoored(
    cfg: BackdoorConfig, spec: DatasetSpec, atk: _AttackerData, state_path: Path, *, device: str, progress: bool
) -> Tuple[nn.Module, float]:
    """Seed, build and train the model on the attacker's (poisoned) images (resumable from
    ``state_path``); returns it on the CPU in eval mode, with the training's wall seconds."""
    seed_everything(cfg.seed)
    model = build_model_for(cfg.model, spec, cfg.width)
    recipe = TrainRecipe(int(cfg.epochs or 0), cfg.batch_size, cfg.lr, 0.9, cfg.weight_decay, cfg.seed)
    t0 = time.time()
    train_classifier(
        model,
        atk.train.images,
        atk.plan,
        attack=None if cfg.clean else atk.attack,
        augment=Augment.for_spec(spec),
        recipe=recipe,
        state_path=state_path,
        device=device,
        progress=progress,
    )
    train_seconds = time.time() - t0
    model = model.cpu().to(memory_format=torch.contiguous_format).eval()  # type: ignore[call-overload]  # not in the stubs
    return model, train_seconds


def _artifact_meta(
    cfg: BackdoorConfig,
    dataset: Dataset,
    atk: _AttackerData,
    env: Dict[str, Any],
    *,
    train_seconds: float,
    metrics: Dict[str, Any],
) -> Dict[str, Any]:
    """``meta.json`` of a trained artifact: the config, data, poisoning, splits, versions and test metrics."""
    return {
        "config": cfg.to_dict(),
        "model": cfg.model,
        "width": cfg.width,
        "dataset": cfg.dataset,
        "data_source": dataset.source,
        "data": _data_key(dataset),
        "attack": None if cfg.clean else atk.attack.params(),
        "clean": cfg.clean,
        "target": cfg.target,
        "mode": cfg.mode,
        "poison_rate": 0.0 if cfg.clean else cfg.poison_rate,
        "num_poisoned": int(atk.plan.poisoned.sum()),
        "num_attacker_train": len(atk.train),
        "split_sha256": atk.splits.digest(),
        "split_sizes": atk.splits.sizes(),
        "seed": cfg.seed,
        "versions": env,
        "train_seconds": round(train_seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "test_metrics": metrics,
        "test_metrics_note": "ASR/RA use the attack's real trigger on non-target test images"
        + (" (clean model: measures the trigger's natural effect)" if cfg.clean else ""),
    }
