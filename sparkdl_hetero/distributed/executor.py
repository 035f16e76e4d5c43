"""Helpers for code running inside Spark tasks, shared by the training modes."""

from __future__ import annotations

from typing import Any

import numpy as np

# rows per compute_gradient call when a task evaluates many rows: bounds the rows gathered (copied) per call from
# a sampled index (MLP [784,100,10], 30,000 rows on one thread: 4096-row chunks 59-60 ms, 1024 54-55 ms); the
# model splits each call further into passes that fit the cache (FeedForwardModel.rows_per_pass)
CHUNK_ROWS = 1024
_CONTROLLER: list = []  # per Python worker: one threadpoolctl controller (building it scans the loaded libraries)


def blas_limit(cpus: int) -> Any:
    """Context manager limiting the BLAS thread pools of this Python worker to ``cpus`` threads (the task's
    ``spark.task.cpus``), so concurrent tasks on one executor do not oversubscribe its cores."""
    from threadpoolctl import ThreadpoolController

    if not _CONTROLLER:
        _CONTROLLER.append(ThreadpoolController())
    return _CONTROLLER[0].limit(limits=cpus, user_api="blas")


def peak_rss_bytes() -> int:
    """This process's peak resident set size in bytes (Linux: VmHWM; elsewhere getrusage)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def accumulate_gradient(replica: Any, x: np.ndarray, y: np.ndarray, idx: np.ndarray | None,
                        w: np.ndarray | None = None) -> tuple[float, float]:
    """Add the gradient *sum* over rows ``idx`` of ``x``/``y`` (None: all rows) to ``replica``'s gradient, in
    chunks of :data:`CHUNK_ROWS` rows, each row's share multiplied by its weight in ``w`` when given; returns
    (the loss sum, the count) over those rows -- the count being the sum of their weights when weighted."""
    m = len(y) if idx is None else len(idx)
    loss = 0.0
    for lo in range(0, m, CHUNK_ROWS):
        hi = min(m, lo + CHUNK_ROWS)
        sel = slice(lo, hi) if idx is None else idx[lo:hi]
        if w is None:
            loss += replica.compute_gradient(x[sel], y[sel], scale=float(hi - lo)) * (hi - lo)
        else:
            loss += replica.compute_gradient(x[sel], y[sel], scale=float(hi - lo), sample_weight=w[sel]) * (hi - lo)
    if w is None:
        return loss, float(m)
    return loss, float(np.sum(w if idx is None else w[idx], dtype=np.float64))


def validation_sums(replica: Any, x: np.ndarray, y: np.ndarray, w: np.ndarray | None) -> np.ndarray:
    """(loss sum, metric sum, count) over validation rows at the replica's current weights, as float64 -- the
    metric being correct predictions (classification) or each row's mean squared error over its outputs
    (regression), each row weighted by ``w`` when given and the count the sum of the weights. Summed over every
    worker, they give the global mean loss, accuracy or mean squared error (see :func:`validation_metrics`).
    Inference mode, forward only (the replica's ``loss`` and ``predict``): the figures of the model ``transform``
    would apply, and the replica's gradient and state stay as they were."""
    regression = not replica.topology.loss_layer.class_labels
    out = np.zeros(3)
    for lo in range(0, len(y), CHUNK_ROWS):
        xb, yb = x[lo:lo + CHUNK_ROWS], y[lo:lo + CHUNK_ROWS]
        wb = None if w is None else w[lo:lo + CHUNK_ROWS]
        out[0] += replica.loss(xb, yb, wb) * len(yb)
        pred = replica.predict(xb)
        if regression:
            per_row = np.mean((pred - np.asarray(yb, np.float64).reshape(len(yb), -1)) ** 2, axis=1)
        else:
            per_row = (np.argmax(pred, axis=1) == yb).astype(np.float64)
        out[1] += float(per_row.sum() if wb is None else per_row @ wb)
        out[2] += len(yb) if wb is None else float(np.sum(wb))
    return out


def validation_metrics(sums: np.ndarray, regression: bool) -> tuple[float, float]:
    """(mean loss, metric) from :func:`validation_sums` added over every worker: accuracy, or the RMSE (over
    every output of every row)."""
    n = sums[2] if sums[2] > 0 else 1.0
    if regression:
        return float(sums[0] / n), float(np.sqrt(sums[1] / n))
    return float(sums[0] / n), float(sums[1] / n)
