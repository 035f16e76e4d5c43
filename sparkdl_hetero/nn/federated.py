"""The two halves of a federated round without Spark: a device's local training and the server's merge.

FedAvg (McMahan et al. 2017): each selected device trains the global weights for E epochs on its rows and the
server replaces the weights by the row-weighted mean of the devices' results. CAD is the same round on sub-models
(:mod:`.cad`): a device holds part of the parameters, and each parameter becomes the row-weighted mean over the
devices that held it; parameters nobody held keep their value. FedAvg is the case where every device holds all.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from .model import FeedForwardModel
from .optim import make_updater
from .topology import FeedForwardTopology
from .trainer import train


@dataclass(frozen=True)
class LocalResult:
    """A device's update: its trained weights, the rows it trained on, the seconds training took and the loss
    history (one mean loss per epoch)."""

    weights: np.ndarray
    rows: int
    seconds: float
    history: list[float]


def local_update(model: FeedForwardModel | FeedForwardTopology, weights: np.ndarray, x: np.ndarray, y: np.ndarray,
                 config: Any, epochs: int) -> LocalResult:
    """Train ``weights`` for ``epochs`` epochs on a device's rows ``x`` and labels ``y`` (the model's output
    indices: a sub-model's local labels), mini-batches of ``config.batchSize``, with a fresh optimizer for
    ``config.solver`` (sgd, momentum, adam; gd), as a device that keeps no optimizer state between rounds.

    ``model``: a model to reuse (its weights are overwritten), or a topology to build one for, with
    ``config.dtype`` and ``config.backend``. The batch order follows ``config.seed``: give each device and round
    its own."""
    if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 1:
        raise ValueError(f"localEpochs must be an integer >= 1, got {epochs!r}")
    if len(x) == 0:
        raise ValueError("a device needs at least one training row, got none")
    if isinstance(model, FeedForwardTopology):
        model = FeedForwardModel(model, np.asarray(weights), seed=getattr(config, "seed", None),
                                 dtype=getattr(config, "dtype", "float32"), backend=getattr(config, "backend", "numpy"))
    else:
        model.set_weights(np.asarray(weights, dtype=model.dtype))
    updater = make_updater(config)
    start = time.perf_counter()
    history = train(model, x, y, config, epochs=int(epochs), updater=updater)
    seconds = time.perf_counter() - start
    return LocalResult(model.get_weights(), len(x), seconds, history)


class RoundAggregator:
    """The server's merge of one round, fed one device result at a time: per parameter, a running row-weighted
    mean over the devices that held it (float64), so the driver holds the global weights and two vectors, not one
    model per device. West's incremental update ``m += rows / total * (w - m)`` starts from the first result
    itself, so results that equal the global weights merge back to them bit for bit."""

    def __init__(self, global_weights: np.ndarray) -> None:
        w = np.asarray(global_weights)
        if w.ndim != 1 or not np.issubdtype(w.dtype, np.floating):
            raise ValueError(f"global_weights must be a float vector, got shape {w.shape} dtype {w.dtype}")
        self._global = w.copy()
        self._mean = np.zeros(w.size)
        self._rows = np.zeros(w.size)
        self.devices = 0  # results added
        self.rows = 0  # rows behind them

    @property
    def num_weights(self) -> int:
        return self._global.size

    @property
    def held(self) -> np.ndarray:
        """Which parameters some device held this round."""
        return self._rows > 0

    def add(self, weights: np.ndarray, rows: int, index: np.ndarray | None = None) -> None:
        """Merge one device's trained ``weights``, trained on ``rows`` rows; ``index[j]``: the global parameter of
        ``weights[j]`` (a sub-model's :attr:`~.cad.SubModel.index`), None for the whole vector."""
        w = np.asarray(weights)
        if isinstance(rows, bool) or not isinstance(rows, (int, np.integer)) or rows < 1:
            raise ValueError(f"rows must be an integer >= 1, got {rows!r}")
        at: slice | np.ndarray = slice(None)
        if index is None:
            if w.shape != (self.num_weights,):
                raise ValueError(f"weights must be a vector of {self.num_weights} values, got shape {w.shape}")
        else:
            at = np.asarray(index)
            if at.ndim != 1 or w.shape != at.shape or not np.issubdtype(at.dtype, np.integer):
                raise ValueError(f"weights (shape {w.shape}) and index (shape {at.shape}, dtype {at.dtype}) must be "
                                 f"vectors of the same length, the index of integers")
            if at.size and (at.min() < 0 or at.max() >= self.num_weights or np.unique(at).size != at.size):
                raise ValueError(f"index must hold distinct parameter indices in [0, {self.num_weights})")
        if not np.all(np.isfinite(w)):
            raise ValueError(f"a device's weights hold {int(np.sum(~np.isfinite(w)))} non-finite values")
        total = self._rows[at] + rows
        mean = self._mean[at]
        mean += (rows / total) * (w - mean)
        self._mean[at] = mean
        self._rows[at] = total
        self.devices += 1
        self.rows += int(rows)

    def merge(self, other: RoundAggregator) -> None:
        """Fold in another aggregator of the same round (e.g. the partial merge of one task's devices)."""
        if other.num_weights != self.num_weights:
            raise ValueError(f"cannot merge an aggregator of {other.num_weights} weights into one of "
                             f"{self.num_weights}")
        at = other._rows > 0
        total = self._rows[at] + other._rows[at]
        mean = self._mean[at]
        mean += (other._rows[at] / total) * (other._mean[at] - mean)
        self._mean[at] = mean
        self._rows[at] = total
        self.devices += other.devices
        self.rows += other.rows

    def state_dict(self) -> dict[str, np.ndarray]:
        """The running merge as arrays (per parameter: ``mean`` and ``rows``; ``counts``: devices and rows added),
        so a partial merge (one task's devices) travels to the server as data."""
        return {"mean": self._mean.copy(), "rows": self._rows.copy(),
                "counts": np.array([self.devices, self.rows], dtype=np.int64)}

    def load_state_dict(self, d: dict[str, np.ndarray]) -> None:
        """Restore a :meth:`state_dict` of an aggregator of the same number of weights."""
        mean, rows = np.asarray(d["mean"], dtype=np.float64), np.asarray(d["rows"], dtype=np.float64)
        counts = np.asarray(d["counts"])
        if mean.shape != (self.num_weights,) or rows.shape != mean.shape or counts.shape != (2,):
            raise ValueError(f"an aggregator state of {self.num_weights} weights needs mean and rows of that length "
                             f"and two counts, got shapes {mean.shape}, {rows.shape}, {counts.shape}")
        self._mean[...] = mean
        self._rows[...] = rows
        self.devices, self.rows = int(counts[0]), int(counts[1])

    def result(self) -> np.ndarray:
        """The new global weights (the global weights' dtype): the merged mean where some device held a
        parameter, the old value elsewhere."""
        return np.where(self._rows > 0, self._mean, self._global).astype(self._global.dtype)
