"""What a trainer minimizes. Trainers (treeAggregate, barrier) see only this interface.

An :class:`Objective` is picklable configuration shipped to executors; :meth:`Objective.replica` builds the
executor-side :class:`Replica` that computes losses and gradients for one flat parameter vector.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from ..backends import Backend
from .model import FeedForwardModel
from .topology import FeedForwardTopology


class Replica(Protocol):
    """A copy of the trained parameters on one backend, computing mean losses and accumulating gradients."""

    num_weights: int
    topology: FeedForwardTopology  # the trained model's topology

    def set_weights(self, weights: np.ndarray) -> None: ...

    def get_weights(self) -> np.ndarray: ...

    def zero_grad(self) -> None: ...

    def get_gradient(self) -> np.ndarray: ...

    def compute_gradient(self, x: np.ndarray, y: np.ndarray, grad_out: np.ndarray | None = None,
                         scale: float = 1.0, sample_weight: np.ndarray | None = None) -> float: ...

    def loss(self, x: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None = None) -> float:
        """The trained model's mean loss over host rows ``x`` in inference mode (batch normalization's running
        statistics, no dropout), forward only: nothing changes (validation; see
        :meth:`FeedForwardModel.loss`)."""
        ...

    def predict(self, x: np.ndarray) -> np.ndarray:
        """The trained model's class probabilities for host rows ``x``."""
        ...


class Objective:
    """Plain supervised training of one topology: the parameters are the model's weights."""

    def __init__(self, topology: FeedForwardTopology) -> None:
        self.topology = topology

    @property
    def num_weights(self) -> int:
        return self.topology.num_weights

    def initial_weights(self, seed: int | None) -> np.ndarray:
        return FeedForwardModel.initial_weights(self.topology, np.random.default_rng(seed))

    def replica(self, backend: str | Backend = "numpy", dtype: Any = np.float32, seed: int | None = None) -> Replica:
        return FeedForwardModel(self.topology, np.zeros(self.num_weights), seed=seed, dtype=dtype, backend=backend)

    def model_weights(self, weights: np.ndarray) -> np.ndarray:
        """The trained model's weights out of the parameter vector (objectives may train extra parameters)."""
        return weights
