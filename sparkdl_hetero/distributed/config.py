"""Training result and divergence error shared by every distributed mode (no Spark objects); the configuration
(:class:`TrainConfig` and its value sets) is :mod:`sparkdl_hetero.nn.config`'s, re-exported here."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..nn.config import DTYPES, MODES, SOLVERS, TrainConfig
from ..nn.solvers import TrainingDivergedError  # defined with the solvers; importable here

__all__ = ["DTYPES", "MODES", "SOLVERS", "TrainConfig", "TrainResult", "TrainingDivergedError"]


@dataclass
class TrainResult:
    """What a fit returns to the estimator."""

    weights: np.ndarray  # the objective's parameters
    objectiveHistory: list[float] = field(default_factory=list)
    iterations: int = 0
    stats: dict = field(default_factory=dict)  # mode-specific: per-worker timings, backends used, ...
    state: np.ndarray = field(default_factory=lambda: np.zeros(0))  # the model's non-trained state (BN statistics)
