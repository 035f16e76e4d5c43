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


def accumulate_gradient(replica: Any, x: np.ndarray, y: np.ndarray, idx: np.ndarray | None) -> float:
    """Add the gradient *sum* over rows ``idx`` of ``x``/``y`` (None: all rows) to ``replica``'s gradient, in
    chunks of :data:`CHUNK_ROWS` rows; returns the loss sum over those rows."""
    m = len(y) if idx is None else len(idx)
    loss = 0.0
    for lo in range(0, m, CHUNK_ROWS):
        hi = min(m, lo + CHUNK_ROWS)
        sel = slice(lo, hi) if idx is None else idx[lo:hi]
        loss += replica.compute_gradient(x[sel], y[sel], scale=float(hi - lo)) * (hi - lo)
    return loss
