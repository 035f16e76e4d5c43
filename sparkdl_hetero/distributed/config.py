"""Training configuration, result and divergence error shared by every distributed mode (no Spark objects)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..backends import BACKENDS
from ..nn.solvers import TrainingDivergedError as TrainingDivergedError  # defined with the solvers; importable here

SOLVERS = ("l-bfgs", "gd", "sgd", "momentum", "adam")
MODES = ("treeAggregate", "barrier")
DTYPES = ("float32", "float64")


@dataclass
class TrainConfig:
    """Every knob of a fit. Names follow Spark ML's params where Spark has one."""

    solver: str = "l-bfgs"
    maxIter: int = 100  # l-bfgs / gd: iterations; mini-batch solvers: at most this many epochs when epochs=0
    tol: float = 1e-6
    stepSize: float = 0.03
    regParam: float = 0.0  # L2 on every weight
    blockSize: int = 128  # rows stacked per block (Spark's meaning)
    batchSize: int = 64  # global mini-batch size for sgd/momentum/adam
    epochs: int = 0  # mini-batch solvers: passes over the data (0: use maxIter)
    miniBatchFraction: float = 1.0  # gd: fraction of rows sampled per iteration (Spark's GradientDescent)
    momentum: float = 0.9
    nesterov: bool = False
    beta1: float = 0.9
    beta2: float = 0.999
    epsilon: float = 1e-8
    lrSchedule: str = "constant"  # constant | step | cosine
    lrDecay: float = 0.1  # step schedule: factor applied every lrDecaySteps
    lrDecaySteps: int = 0
    seed: int = 0
    dtype: str = "float32"
    backend: str = "numpy"  # numpy | opencl | cupy | auto
    mode: str = "treeAggregate"  # treeAggregate | barrier
    numWorkers: int = 0  # 0: one per partition / executor slot
    checkpointDir: str = ""
    checkpointInterval: int = 10
    verbose: bool = True  # progress bar on the driver
    # barrier mode
    syncEvery: int = 1
    allReduce: str = "auto"  # auto | hub | ring
    balance: bool = True  # heterogeneity-aware per-worker batch shares
    validationFraction: float = 0.0  # early stopping split (0: off)
    patience: int = 3
    commTimeout: float = 120.0  # seconds before a silent peer is an error
    straggler: dict[int, float] = field(default_factory=dict)  # benchmarking aid: rank -> slow-down factor

    def __post_init__(self) -> None:
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {', '.join(SOLVERS)}, got {self.solver!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")


@dataclass
class TrainResult:
    """What a fit returns to the estimator."""

    weights: np.ndarray  # the objective's parameters
    objectiveHistory: list[float] = field(default_factory=list)
    iterations: int = 0
    stats: dict = field(default_factory=dict)  # mode-specific: per-worker timings, backends used, ...
