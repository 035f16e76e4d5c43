"""A small in-process mini-batch trainer: one model, one process (tests, benchmarks, local jobs)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .config import TrainConfig
from .model import FeedForwardModel, one_hot
from .optim import Updater, learning_rate, make_updater


def train(model: FeedForwardModel, x: np.ndarray, y: np.ndarray, config: TrainConfig, *, epochs: int | None = None,
          updater: Updater | None = None, on_epoch: Callable[[int, float], None] | None = None) -> list[float]:
    """Train ``model`` in place on rows ``x`` and labels ``y`` (integers, or a (rows, classes) target matrix)
    with mini-batches; return the loss history.

    ``config`` supplies ``solver``, ``stepSize``, ``batchSize``, ``regParam``, ``seed``, ``epochs`` / ``maxIter``
    and the updater's and schedule's knobs (see :mod:`.optim`). Each epoch visits the rows in a fresh
    permutation drawn from ``default_rng(seed)``. L2: ``regParam * w`` is added to every batch gradient and
    ``regParam / 2 * |w|^2`` to its loss. History entry ``e`` is the mean objective over epoch ``e``'s
    batches (weighted by batch size); ``on_epoch(e, loss)`` is called after each epoch.
    """
    n, y = len(x), np.asarray(y)
    if len(y) != n:
        raise ValueError(f"x has {n} rows but y has {len(y)} labels")
    batch = int(config.batchSize)
    epochs = int(epochs if epochs is not None else (config.epochs or config.maxIter))
    reg = float(config.regParam)
    if y.ndim == 1:  # one-hot once (labels checked before any step), then rows are gathered per batch
        y = one_hot(y, model.topology.num_outputs, model.dtype)
    updater = updater or make_updater(config)
    rng = np.random.default_rng(config.seed)
    host = model.backend.host_memory  # host arrays (NumPy backend): update the model's own vectors in place
    w = model.weights if host else model.get_weights()
    per_epoch = -(-n // batch)
    total = epochs * per_epoch
    history: list[float] = []
    for epoch in range(epochs):
        order = rng.permutation(n)
        loss_sum = 0.0
        for b in range(per_epoch):
            idx = order[b * batch:(b + 1) * batch]
            model.zero_grad()
            loss = model.compute_gradient(x[idx], y[idx])
            g = model.gradient if host else model.get_gradient()
            if reg:
                loss += 0.5 * reg * float(np.dot(w, w))
                g += w.dtype.type(reg) * w
            updater.step(w, g, learning_rate(config, epoch * per_epoch + b, total))
            if not host:
                model.set_weights(w)
            loss_sum += loss * len(idx)
        history.append(loss_sum / n)
        if on_epoch is not None:
            on_epoch(epoch, history[-1])
    return history


def accuracy(model: FeedForwardModel, x: np.ndarray, y: np.ndarray, batch: int = 1024) -> float:
    """Fraction of rows whose arg-max prediction equals the integer label."""
    if len(x) == 0:
        raise ValueError("accuracy of an empty set")
    hits = sum(int(np.sum(model.predict_raw(x[i:i + batch]).argmax(axis=1) == y[i:i + batch]))
               for i in range(0, len(x), batch))
    return hits / len(x)
