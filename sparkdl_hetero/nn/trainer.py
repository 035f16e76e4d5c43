"""A small in-process mini-batch trainer: one model, one process (tests, benchmarks, local jobs)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from . import solvers
from .config import TrainConfig
from .model import FeedForwardModel, one_hot
from .optim import Updater


def train(model: FeedForwardModel, x: np.ndarray, y: np.ndarray, config: TrainConfig, *, epochs: int | None = None,
          updater: Updater | None = None, on_epoch: Callable[[int, float], None] | None = None) -> list[float]:
    """Train ``model`` in place on rows ``x`` and labels ``y`` (integers, or a (rows, classes) target matrix)
    with mini-batches; return the loss history.

    ``config`` supplies ``solver``, ``stepSize``, ``batchSize``, ``regParam``, ``seed``, ``epochs`` / ``maxIter``
    and the updater's and schedule's knobs (see :mod:`.optim`). Each epoch visits the rows in a fresh
    permutation drawn from ``default_rng(seed)``. L2: ``regParam * w`` is added to every batch gradient and
    ``regParam / 2 * |w|^2`` to its loss. History entry ``e`` is the mean objective over epoch ``e``'s
    batches (weighted by batch size); ``on_epoch(e, loss)`` is called after each epoch. The loop is
    :func:`.solvers.minibatch`'s; a non-finite loss is not checked here.
    """
    n, y = len(x), np.asarray(y)
    if len(y) != n:
        raise ValueError(f"x has {n} rows but y has {len(y)} labels")
    batch = int(config.batchSize)
    epochs = int(epochs if epochs is not None else solvers.epochs_of(config))
    if y.ndim == 1:  # one-hot once (labels checked before any step), then rows are gathered per batch
        y = one_hot(y, model.topology.num_outputs, model.dtype)
    rng = np.random.default_rng(config.seed)
    host = model.backend.host_memory  # host arrays (NumPy backend): update the model's own vectors in place
    per_epoch = -(-n // batch)
    order = np.zeros(0, np.int64)

    def step(w: np.ndarray, t: int) -> tuple[float, np.ndarray, int]:
        nonlocal order
        b = t % per_epoch
        if b == 0:
            order = rng.permutation(n)
        idx = order[b * batch:(b + 1) * batch]
        if not host:
            model.set_weights(w)
        model.zero_grad()
        m = len(idx)
        loss = model.compute_gradient(x[idx], y[idx], scale=float(m))  # the batch's gradient sum
        return loss * m, model.gradient if host else model.get_gradient(), m

    def epoch_end(epoch: int, loss: float) -> str:
        if on_epoch is not None:
            on_epoch(epoch, loss)
        return ""

    state = solvers.SolverState(model.weights if host else model.get_weights())
    solvers.minibatch(state, config, per_epoch, step, solvers.Hooks(epoch_end=epoch_end), epochs=epochs,
                      updater=updater, check_finite=False)
    if not host:
        model.set_weights(state.weights)
    return state.history


def accuracy(model: FeedForwardModel, x: np.ndarray, y: np.ndarray, batch: int = 1024) -> float:
    """Fraction of rows whose arg-max prediction equals the integer label."""
    if len(x) == 0:
        raise ValueError("accuracy of an empty set")
    hits = sum(int(np.sum(model.predict_raw(x[i:i + batch]).argmax(axis=1) == y[i:i + batch]))
               for i in range(0, len(x), batch))
    return hits / len(x)
