"""Every training knob, defined once: its name, type, default, allowed values and a one-line doc.

:class:`TrainConfig` *is* the table: each field is declared with :func:`knob`, and :data:`KNOBS` reads the
fields back as :class:`Knob` records, so the engine (:mod:`.optim`, :mod:`.trainer`), the distributed modes and
the Spark ML params all see the same defaults and the same checks. Constructing a TrainConfig checks every knob
and raises :class:`ConfigError` (a ``ValueError``) reading ``"<name> must be <expected>, got <actual>"``; a
TrainConfig is frozen, so a valid one stays valid. Names follow Spark ML's params where Spark has one.
"""

from __future__ import annotations

import dataclasses
import numbers
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..backends import BACKENDS

SOLVERS = ("l-bfgs", "gd", "sgd", "momentum", "adam")
MODES = ("auto", "treeAggregate", "barrier", "federated")
#: solvers whose iteration is one pass over all the rows (Spark ML's treeAggregate pattern); the others take steps on
#: mini-batches
FULL_BATCH_SOLVERS = ("l-bfgs", "gd")
DTYPES = ("float32", "float64")
SCHEDULES = ("constant", "step", "cosine")
ALL_REDUCE = ("auto", "hub", "ring")
FEDERATED_ALGORITHMS = ("fedavg", "cad")


class ConfigError(ValueError):
    """A setting out of its allowed values: ``"<name> must be <expected>, got <actual>"``.

    ``name`` is the setting's name as the raising layer spells it (a knob, or an engine argument such as
    ``alpha``); a layer that exposes it under another name re-raises :meth:`renamed`.
    """

    def __init__(self, name: str, expected: str, actual: Any) -> None:
        super().__init__(f"{name} must be {expected}, got {_show(actual)}")
        self.name, self.expected, self.actual = name, expected, actual

    def renamed(self, name: str) -> ConfigError:
        """The same error about the setting called ``name``."""
        return ConfigError(name, self.expected, self.actual)


def _show(value: Any) -> str:
    if isinstance(value, (str, Mapping)):
        return repr(value)
    if isinstance(value, np.generic):
        return str(value.item())
    return str(value)


@dataclass(frozen=True)
class Range:
    """Numbers between ``lo`` and ``hi`` (None: unbounded), each end closed unless marked open."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def __call__(self, value: Any) -> bool:
        v = float(value)
        return ((self.lo is None or (v > self.lo if self.lo_open else v >= self.lo))
                and (self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)))

    @property
    def expected(self) -> str:
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {_num(self.lo)}"
        if self.lo is None:
            return f"{'<' if self.hi_open else '<='} {_num(self.hi)}"
        return f"in {'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}{')' if self.hi_open else ']'}"


def _num(x: float | None) -> str:
    return str(int(x)) if x is not None and float(x).is_integer() else str(x)


@dataclass(frozen=True)
class OneOf:
    """One of a fixed set of strings."""

    choices: tuple[str, ...]

    def __call__(self, value: Any) -> bool:
        return value in self.choices

    @property
    def expected(self) -> str:
        return f"one of {', '.join(self.choices)}"


@dataclass(frozen=True)
class RankFactors:
    """A map of worker rank (an integer >= 0) to a factor >= 1."""

    def __call__(self, value: Any) -> bool:
        return all(isinstance(r, numbers.Integral) and not isinstance(r, bool) and r >= 0
                   and _is_real(f) and f >= 1.0 for r, f in value.items())

    @property
    def expected(self) -> str:
        return "a map of worker rank (an integer >= 0) to slow-down factor (>= 1)"


@dataclass(frozen=True)
class Indices:
    """A list of distinct integers >= 0 (e.g. layer indices)."""

    def __call__(self, value: Any) -> bool:
        return (all(isinstance(i, numbers.Integral) and not isinstance(i, (bool, np.bool_)) and i >= 0 for i in value)
                and len(set(value)) == len(value))

    @property
    def expected(self) -> str:
        return "a list of distinct integers >= 0"


Check = Range | OneOf | RankFactors | Indices


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


# what a value of each knob type must be, before its check runs
_TYPES: dict[type, tuple[str, Callable[[Any], bool]]] = {
    int: ("an integer", lambda v: isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))),
    float: ("a number", _is_real),
    bool: ("true or false", lambda v: isinstance(v, (bool, np.bool_))),
    str: ("a string", lambda v: isinstance(v, str)),
    dict: ("a map", lambda v: isinstance(v, Mapping)),
    list: ("a list", lambda v: isinstance(v, (list, tuple))),
}


@dataclass(frozen=True)
class Knob:
    """One training knob: ``name``, its value ``type`` (int, float, bool, str, dict or list), ``default``, ``check``
    (None: any value of the type) and a one-line ``doc``."""

    name: str
    type: type
    default: Any
    check: Check | None
    doc: str

    @property
    def expected(self) -> str:
        """What a valid value is, as the errors say it."""
        return self.check.expected if self.check is not None else _TYPES[self.type][0]

    def validate(self, value: Any) -> None:
        """Raise :class:`ConfigError` unless ``value`` is of this knob's type and passes its check."""
        what, is_type = _TYPES[self.type]
        if not is_type(value):
            raise ConfigError(self.name, what, value)
        if self.check is not None and not self.check(value):
            raise ConfigError(self.name, self.check.expected, value)


def knob(default: Any, check: Check | None, doc: str) -> Any:
    """A :class:`TrainConfig` field: its default, its check and its doc (the type is the field's annotation)."""
    meta = {"check": check, "doc": doc}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


_AT_LEAST_0, _AT_LEAST_1, _ABOVE_0 = Range(0), Range(1), Range(0, lo_open=True)
_DECAY = Range(0.0, 1.0, hi_open=True)
_FRACTION = Range(0.0, 1.0, lo_open=True)


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of a fit (see the module docstring); invalid values raise :class:`ConfigError`."""

    solver: str = knob("l-bfgs", OneOf(SOLVERS), "The optimization algorithm.")
    maxIter: int = knob(100, _AT_LEAST_0, "l-bfgs / gd: iterations; mini-batch solvers: epochs when epochs is 0.")
    tol: float = knob(1e-6, _AT_LEAST_0, "Convergence tolerance of the iterative solvers.")
    stepSize: float = knob(0.03, _ABOVE_0, "Learning rate (the base of the schedule).")
    regParam: float = knob(0.0, _AT_LEAST_0, "L2 regularization on every weight.")
    blockSize: int = knob(128, _AT_LEAST_1, "Accepted for compatibility with Spark's "
                          "MultilayerPerceptronClassifier only: training does not read it.")
    batchSize: int = knob(64, _AT_LEAST_1, "Global mini-batch size for sgd, momentum and adam (federated mode: "
                          "each device's local mini-batch).")
    epochs: int = knob(0, _AT_LEAST_0, "Passes over the data for mini-batch solvers (0: maxIter).")
    miniBatchFraction: float = knob(1.0, _FRACTION,
                                    "gd: fraction of the rows sampled per iteration (Spark's GradientDescent).")
    momentum: float = knob(0.9, _DECAY, "Momentum coefficient (solver momentum).")
    nesterov: bool = knob(False, None, "Nesterov momentum (solver momentum).")
    beta1: float = knob(0.9, _DECAY, "Adam's first-moment decay.")
    beta2: float = knob(0.999, _DECAY, "Adam's second-moment decay.")
    epsilon: float = knob(1e-8, _ABOVE_0, "Adam's denominator epsilon.")
    lrSchedule: str = knob("constant", OneOf(SCHEDULES), "Learning-rate schedule.")
    lrDecay: float = knob(0.1, _ABOVE_0, "Step schedule: factor applied every lrDecaySteps steps.")
    lrDecaySteps: int = knob(0, _AT_LEAST_0, "Step schedule: steps between decays (>= 1 with lrSchedule step).")
    seed: int = knob(0, _AT_LEAST_0, "Seed of the initial weights, the row order and the sampling.")
    dtype: str = knob("float32", OneOf(DTYPES), "Floating-point type of training and prediction.")
    backend: str = knob("numpy", OneOf(BACKENDS), "Array backend on executors.")
    mode: str = knob("auto", OneOf(MODES), "Distributed training mode; auto: treeAggregate for the full-batch "
                     "solvers (l-bfgs, gd), barrier for the mini-batch solvers (sgd, momentum, adam); federated only "
                     "when set.")
    numWorkers: int = knob(0, _AT_LEAST_0, "Barrier mode: number of workers (0: the cluster's task slots); "
                           "federated mode: partitions the devices are spread over (0: the cluster's task slots).")
    taskGpus: int = knob(-1, Range(-1), "GPUs each training task asks for through a Spark ResourceProfile, so that "
                         "only the training stage holds GPUs and the stages before it keep every CPU (-1: one when "
                         "training uses GPUs -- backend cupy or auto on executors with GPUs "
                         "(spark.executor.resource.gpu.amount) -- else none; 0: none).")
    taskCpus: int = knob(0, _AT_LEAST_0, "CPUs each training task asks for through a Spark ResourceProfile (0: "
                         "spark.task.cpus; with GPUs per task, the executor's cores shared among the tasks its GPUs "
                         "admit).")
    checkpointDir: str = knob("", None, "Directory for training checkpoints; a fit with the same directory "
                              "resumes from the last checkpoint. Empty: no checkpoints.")
    checkpointInterval: int = knob(10, None, "Iterations (federated mode: rounds) between checkpoints (>= 1 when "
                                   "checkpointDir is set).")
    verbose: bool = knob(True, None, "Show a progress bar on the driver.")
    syncEvery: int = knob(1, _AT_LEAST_1, "Barrier mode: local steps between all-reduces.")
    allReduce: str = knob("auto", OneOf(ALL_REDUCE), "Barrier mode: all-reduce transport.")
    balance: bool = knob(True, None, "Barrier mode: per-worker batch shares matched to each worker's speed.")
    validationFraction: float = knob(0.0, Range(0.0, 1.0, hi_open=True),
                                     "Fraction held out for early stopping (0: off).")
    patience: int = knob(3, _AT_LEAST_1, "Early stopping: validations (mini-batch solvers: epochs; gd, l-bfgs: every "
                         "validationInterval iterations) without an improvement of tol before stopping; the best "
                         "validated weights are returned.")
    validationInterval: int = knob(10, _AT_LEAST_1, "Full-batch solvers (gd, l-bfgs): iterations between "
                                   "validations, which early stopping counts (mini-batch solvers validate after "
                                   "each epoch).")
    commTimeout: float = knob(120.0, _ABOVE_0, "Barrier mode: seconds before a silent peer is an error.")
    straggler: dict[int, float] = knob({}, RankFactors(), "Barrier mode, benchmarking aid: rank -> slow-down "
                                       "factor.")
    rounds: int = knob(10, _AT_LEAST_1, "Federated mode: communication rounds.")
    clientFraction: float = knob(0.1, _FRACTION, "Federated mode: fraction C of the devices selected per round "
                                 "(at least one).")
    localEpochs: int = knob(1, _AT_LEAST_1, "Federated mode: passes E of a selected device over its rows per round.")
    federatedAlgorithm: str = knob("fedavg", OneOf(FEDERATED_ALGORITHMS), "Federated mode: fedavg (every device "
                                   "trains the whole model) or cad (context-aware sub-models).")
    cadKeep: float = knob(0.5, _FRACTION, "CAD: fraction of each decoupled layer's filters a device keeps.")
    cadLayers: list[int] = knob([], Indices(), "CAD: indices of the decoupled layers (empty: the deeper half of "
                                "the conv layers and the hidden affine layers).")
    cadWarmupRounds: int = knob(1, _AT_LEAST_0, "CAD: first rounds run as FedAvg, gathering the filter statistics.")

    def __post_init__(self) -> None:
        self.validate()

    def resolved_mode(self) -> tuple[str, str]:
        """The mode a fit runs (``treeAggregate``, ``barrier`` or ``federated``) and why, in a sentence for the fit's
        stats; ``auto`` never picks federated (a different algorithm, not a different way to run the same one)."""
        if self.mode != "auto":
            return self.mode, f"mode={self.mode!r} was set"
        if self.solver in FULL_BATCH_SOLVERS:
            return "treeAggregate", (f"mode='auto' with the full-batch solver {self.solver!r}: one Spark job per "
                                     f"evaluation over all the rows, as Spark ML's MLP trains")
        return "barrier", (f"mode='auto' with the mini-batch solver {self.solver!r}: long-running workers that "
                           f"all-reduce every step, instead of one Spark job per mini-batch step")

    def validate(self) -> None:
        """Check every knob, then the knobs that depend on each other; raise :class:`ConfigError` on the first
        invalid one."""
        for k in KNOBS:
            k.validate(getattr(self, k.name))
        if self.lrSchedule == "step" and self.lrDecaySteps < 1:
            raise ConfigError("lrDecaySteps", ">= 1 with lrSchedule='step'", self.lrDecaySteps)
        if self.checkpointDir and self.checkpointInterval < 1:
            raise ConfigError("checkpointInterval", ">= 1 when checkpointDir is set", self.checkpointInterval)


def _knobs() -> tuple[Knob, ...]:
    hints = typing.get_type_hints(TrainConfig)
    return tuple(Knob(f.name, typing.get_origin(hints[f.name]) or hints[f.name],
                      f.default_factory() if f.default is dataclasses.MISSING else f.default,
                      f.metadata["check"], f.metadata["doc"]) for f in dataclasses.fields(TrainConfig))


#: every knob of :class:`TrainConfig`, in field order
KNOBS: tuple[Knob, ...] = _knobs()
KNOBS_BY_NAME: dict[str, Knob] = {k.name: k for k in KNOBS}


def check_knob(name: str, value: Any) -> None:
    """Raise :class:`ConfigError` unless ``value`` is valid for the knob ``name`` (e.g. a model's ``dtype``
    outside any TrainConfig)."""
    KNOBS_BY_NAME[name].validate(value)
