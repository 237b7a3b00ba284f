"""The interface every baseline defense implements, plus the helpers they share.

A defense is a class registered in :data:`DEFENSES`. It is built with its hyperparameters
(:func:`build_defense`) and run with :meth:`Defense.fit`, which sees **only** the defender's data
(:class:`onp.data.defense.DefenseData`) and returns a :class:`DefenseResult`.

Neuron numbering is the one of :mod:`onp.graph.layout` (:class:`~onp.graph.layout.NeuronLayout`,
shared with the neuron graph, the masks and the environment): BatchNorm2d layers in torch.fx
topological order, channels in order inside a layer; node = layer offset + channel.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import numbers
import time
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Type, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from onp.data.augment import Augment
from onp.data.defense import DefenseData
from onp.graph.frontier import UnsupportedModelError
from onp.graph.layout import NeuronLayout, neuron_layout
from onp.registry import Registry

#: Called by some defenses at interesting moments (e.g. RNP after unlearning) as
#: ``report_fn(event, model)``; the CLI uses it to log test metrics. Its return value is ignored:
#: nothing it computes can influence the defense.
ReportFn = Callable[[str, nn.Module], Any]


class DefenseError(ValueError):
    """A defense cannot run on this model or data (the message says why and what is needed)."""


@dataclass
class DefenseResult:
    """What a defense returns.

    Attributes:
        model: the repaired network (a new module; the input model is never modified).
        scores: per-neuron suspiciousness in graph numbering (higher = more suspicious), or None for
            methods that do not score neurons. Each method documents its score.
        pruned: pruned neuron ids (graph numbering), or None for methods that do not prune.
        wall_time: seconds spent in :meth:`Defense.fit`.
        forward_passes / backward_passes: number of mini-batch forward / backward passes.
        info: operating point, defense-validation sweep, method-specific diagnostics and notes.
    """

    model: nn.Module
    scores: Optional[Tensor] = None
    pruned: Optional[List[int]] = None
    wall_time: float = 0.0
    forward_passes: int = 0
    backward_passes: int = 0
    info: Dict[str, Any] = field(default_factory=dict)

    @property
    def n_pruned(self) -> int:
        return len(self.pruned) if self.pruned is not None else 0


class PassCounter:
    """Counts mini-batch forward and backward passes.

    Every forward pass of a defense goes through ``counter(model, x)`` and every backward pass through
    ``counter.backward(loss)``, so the counts are exact (one per mini-batch, whatever its size).
    """

    def __init__(self) -> None:
        self.forward = 0
        self.backward_count = 0

    def __call__(self, model: nn.Module, x: Tensor) -> Tensor:
        self.forward += 1
        return model(x)

    def backward(self, loss: Tensor, **kwargs: Any) -> None:
        loss.backward(**kwargs)
        self.backward_count += 1

    def grad(self, loss: Tensor, inputs: Sequence[Tensor]) -> Tuple[Tensor, ...]:
        """``torch.autograd.grad`` counted as one backward pass."""
        self.backward_count += 1
        return torch.autograd.grad(loss, list(inputs))


# --------------------------------------------------------------------------------------------------
# neurons


def bn_layout(model: nn.Module, method: str) -> NeuronLayout:
    """:func:`onp.graph.neuron_layout` of ``model``, or a :class:`DefenseError` naming ``method`` if the
    model has no BatchNorm2d layer."""
    try:
        return neuron_layout(model)
    except UnsupportedModelError as exc:
        raise DefenseError(
            f"{type(model).__name__} has no BatchNorm2d layer; the defense {method!r} masks or prunes BN "
            f"channels (neurons) and needs a model with BatchNorm2d after its convolutions"
        ) from exc


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (the CPU for a model without parameters)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def bn_gammas(model: nn.Module, layout: NeuronLayout) -> Tensor:
    mods = dict(model.named_modules())
    return torch.cat([mods[layer.bn_name].weight.detach().flatten() for layer in layout.layers])


# --------------------------------------------------------------------------------------------------
# data helpers


def require_data(name: str, data: Optional[DefenseData]) -> DefenseData:
    if data is None:
        raise DefenseError(f"defense {name!r} needs the defender's clean data (a DefenseData); got None")
    return data


def require_layout(name: str, layout: Optional[NeuronLayout]) -> NeuronLayout:
    """The neuron layout that :meth:`Defense.fit` computes for a defense with ``needs_bn``."""
    if layout is None:
        raise DefenseError(f"defense {name!r} needs the model's neuron layout (needs_bn)")
    return layout


def require_images(
    name: str, n_have: int, n_need: int, what: str = "defense-train images", hint: str = "batch_size"
) -> None:
    if n_have < n_need:
        raise DefenseError(
            f"defense {name!r} needs at least {n_need} {what} for one batch of {n_need} "
            f"but got {n_have}; use more defense data or a smaller {hint} "
            f"(e.g. --set {hint}={max(1, n_have)})"
        )


def default_augment(x: Tensor, hflip: bool = False) -> Augment:
    """Pad-and-crop augmentation scaled to the image size; flips only when the caller says they are safe
    (DefenseData does not carry the dataset spec; the CLI passes ``Augment.for_spec(spec)``)."""
    return Augment(padding=max(1, round(x.shape[-2] / 8)), hflip=hflip)


def epoch_batches(n: int, batch_size: int, gen: torch.Generator, drop_last: bool = False) -> Iterator[Tensor]:
    """Shuffled index batches covering ``range(n)`` once."""
    perm = torch.randperm(n, generator=gen)
    stop = n - (n % batch_size) if drop_last and n >= batch_size else n
    for i in range(0, stop, batch_size):
        yield perm[i : i + batch_size]


def sample_batch(n: int, batch_size: int, gen: torch.Generator) -> Tensor:
    """``batch_size`` indices drawn uniformly *with replacement* (ANP / NGF style)."""
    return torch.randint(0, n, (batch_size,), generator=gen)


@torch.no_grad()
def eval_accuracy(
    model: nn.Module, x: Tensor, y: Tensor, counter: Optional[PassCounter] = None, batch_size: int = 512
) -> float:
    """Clean accuracy in eval mode (restores the previous mode); counts forward passes.

    NaN for no images (e.g. defense-val under ``protocol=paper``; run files write it as ``null``)."""
    if len(y) == 0:
        return math.nan
    was = model.training
    model.eval()
    correct: float = 0
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size]
        logits = counter(model, xb) if counter is not None else model(xb)
        correct += (logits.argmax(1) == y[i : i + batch_size]).sum().item()
    model.train(was)
    return correct / len(y)


def _tensors_to_cpu(obj: Any) -> Any:
    """``obj`` with every tensor inside dicts, lists and tuples moved to the CPU."""
    if isinstance(obj, Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _tensors_to_cpu(v) for k, v in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(_tensors_to_cpu(v) for v in obj)
    return obj


def _on_cpu(result: DefenseResult) -> DefenseResult:
    """``result`` with its model, scores and the tensors in ``info`` on the CPU."""
    result.model = result.model.cpu()
    if result.scores is not None:
        result.scores = result.scores.cpu()
    result.info = _tensors_to_cpu(result.info)
    return result


def freeze(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# --------------------------------------------------------------------------------------------------
# the interface


@dataclass
class DefenseParams:
    """Base of every defense's hyperparameter dataclass."""

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def _conform(tp: Any, value: Any) -> Tuple[bool, Any]:
    """Whether ``value`` is of type hint ``tp`` (numbers finite, no bool for a number, lists for
    tuples), and the value to store (a tuple for a ``Tuple`` field)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        try:
            from onp.config import check_finite

            check_finite(value)
        except ValueError:
            return False, value
        return True, value
    if origin is typing.Union:
        for arg in args:
            ok, out = (value is None, None) if arg is type(None) else _conform(arg, value)
            if ok:
                return True, out
        return False, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool), value
    if tp is float:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
        return ok, value
    if tp is str:
        return isinstance(value, str), value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return False, value
        items = args[:1] * len(value) if origin is list or (len(args) == 2 and args[1] is Ellipsis) else args
        if args and len(items) != len(value):
            return False, value
        done = [_conform(t, v) for t, v in zip(items, value)] if args else [(True, v) for v in value]
        return all(ok for ok, _ in done), origin(v for _, v in done)
    if origin is dict:
        return isinstance(value, dict) and all(_conform(args[1] if args else Any, v)[0] for v in value.values()), value
    return isinstance(value, tp) if isinstance(tp, type) else True, value


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin in (tuple, list):
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s" if args else "a list"
    return {bool: "true or false", int: "an integer", float: "a finite number", str: "a string", dict: "a mapping"}.get(
        origin or tp, getattr(tp, "__name__", str(tp))
    )


def check_param_types(params_cls: type, params: Dict[str, Any], defense: str) -> Dict[str, Any]:
    """``params`` checked against the types that ``params_cls`` (a :class:`DefenseParams` dataclass)
    declares: an ``int`` hyperparameter refuses ``"abc"`` and ``2.5``, a ``float`` one NaN and
    infinity, a ``bool`` one ``1``. The one check of every defense's hyperparameters (``--set``,
    config files, the Python API); :class:`DefenseError` names the key, the value and the type."""
    hints = typing.get_type_hints(params_cls)
    defaults = {f.name: f.default for f in dataclasses.fields(params_cls)}
    out = {}
    for key, value in params.items():
        ok, out[key] = _conform(hints.get(key, Any), value)
        if not ok:
            example = (
                ""
                if defaults.get(key, dataclasses.MISSING) in (None, dataclasses.MISSING)
                else f" (default {defaults[key]!r})"
            )
            raise DefenseError(
                f"defense {defense!r}: hyperparameter {key} must be {_describe(hints.get(key, Any))}"
                f"{example}; got {value!r}"
            )
    return out


OPERATING_POINT_RULES = ("delta", "threshold", "number")


@dataclass
class PruningParams(DefenseParams):
    """Operating-point hyperparameters shared by the pruning defenses (see :mod:`baselines.operating_point`)."""

    operating_point: str = "delta"  # delta | threshold | number
    delta: float = 0.05  # max clean-ACC drop on defense-val (absolute) for the delta rule
    max_fraction: float = 0.5  # largest fraction of neurons the delta rule considers
    grid_step: float = 0.01  # grid spacing (fraction of all neurons) for the delta rule
    n_prune: Optional[int] = None  # for operating_point=number


class Defense:
    """A backdoor defense. Subclasses set ``name``, ``needs_bn``, ``needs_data``, ``Params`` and
    implement :meth:`_fit`.

    ``fit`` deep-copies the model first, so the caller's model is never modified.
    """

    name: str = "defense"
    needs_bn: bool = True
    needs_data: bool = True
    prunes: bool = False
    Params = DefenseParams

    def __init__(self, **params: Any):
        valid = [f.name for f in dataclasses.fields(self.Params)]
        unknown = sorted(set(params) - set(valid))
        if unknown:
            raise DefenseError(
                f"unknown hyperparameter(s) {unknown} for defense {self.name!r}; valid: {', '.join(valid)}"
            )
        self.params = self.Params(**check_param_types(self.Params, params, self.name))
        if isinstance(self.params, PruningParams):
            self._validate_operating_point(self.params)
        self.validate()

    def _validate_operating_point(self, p: PruningParams) -> None:
        if p.operating_point not in OPERATING_POINT_RULES:
            raise DefenseError(
                f"unknown operating_point {p.operating_point!r} for {self.name!r}; valid choices: "
                f"{', '.join(OPERATING_POINT_RULES)}"
            )
        if p.operating_point == "threshold" and not hasattr(p, "threshold"):
            raise DefenseError(
                f"operating_point='threshold' needs a mask-based method (rnp, anp); {self.name!r} "
                f"supports delta or number"
            )
        if p.operating_point == "number" and (p.n_prune is None or p.n_prune < 0):
            raise DefenseError("operating_point='number' needs n_prune >= 0 (e.g. --set n_prune=20)")
        if p.delta < 0 or not 0 < p.max_fraction <= 1 or not 0 < p.grid_step <= 1:
            raise DefenseError("need delta >= 0, 0 < max_fraction <= 1 and 0 < grid_step <= 1")

    def validate(self) -> None:
        """Check hyperparameter values (override to add checks)."""

    @classmethod
    def defaults(cls) -> Dict[str, Any]:
        return cls.Params().to_dict()

    def fit(
        self,
        model: nn.Module,
        defense_data: Optional[DefenseData],
        *,
        seed: int = 0,
        augment: Optional[Augment] = None,
        report_fn: Optional[ReportFn] = None,
        device: Optional[torch.device | str] = None,
    ) -> DefenseResult:
        """Run the defense on a copy of ``model`` using only ``defense_data``.

        Args:
            model: the (possibly backdoored) network; not modified.
            defense_data: the defender's clean data (None only for data-free methods).
            seed: seeds every random choice of the defense (batch order, initialisations).
            augment: training augmentation (crop/flip); default pad-and-crop without flips.
            report_fn: optional ``report_fn(event, model)`` callback for logging (return value ignored).
            device: where the defense computes (default ``cpu``; e.g. ``cuda``). Random draws stay on
                the CPU generator, so a seed picks the same batches on every device; the result (model,
                scores, tensors in ``info``) is returned on the CPU.
        """
        if self.needs_data:
            require_data(self.name, defense_data)
        dev = torch.device(device if device is not None else "cpu")
        work = copy.deepcopy(model).to(dev)
        data = defense_data.to(dev) if defense_data is not None else None
        layout = bn_layout(work, self.name) if self.needs_bn else None
        counter = PassCounter()
        t0 = time.perf_counter()
        result = _on_cpu(
            self._fit(work, data, layout=layout, seed=seed, augment=augment, report_fn=report_fn, counter=counter)
        )
        result.wall_time = time.perf_counter() - t0  # moving the result to the CPU waits for the device
        result.forward_passes = counter.forward
        result.backward_passes = counter.backward_count
        result.info.setdefault("defense", self.name)
        result.info.setdefault("params", self.params.to_dict())
        result.model.eval()
        return result

    def _fit(
        self,
        model: nn.Module,
        data: Optional[DefenseData],
        *,
        layout: Optional[NeuronLayout],
        seed: int,
        augment: Optional[Augment],
        report_fn: Optional[ReportFn],
        counter: PassCounter,
    ) -> DefenseResult:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params})"


DEFENSES: Registry = Registry("defense")


_DefenseClass = TypeVar("_DefenseClass", bound=Type[Defense])


def register_defense(name: str) -> Callable[[_DefenseClass], _DefenseClass]:
    """Class decorator: register a :class:`Defense` subclass under ``name`` (also sets ``cls.name``)."""

    def deco(cls: _DefenseClass) -> _DefenseClass:
        cls.name = name
        DEFENSES.register(name, cls)
        return cls

    return deco


def build_defense(name: str, **params: Any) -> Defense:
    """Build a registered defense; unknown names or hyperparameters raise errors listing valid ones."""
    return DEFENSES.get(name)(**params)


def ce(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits, y)
