"""Helpers for code running inside Spark tasks, shared by the training modes."""

from __future__ import annotations

from typing import Any

_CONTROLLER: list = []  # per Python worker: one threadpoolctl controller (building it scans the loaded libraries)


def blas_limit(cpus: int) -> Any:
    """Context manager limiting the BLAS thread pools of this Python worker to ``cpus`` threads (the task's
    ``spark.task.cpus``), so concurrent tasks on one executor do not oversubscribe its cores."""
    from threadpoolctl import ThreadpoolController

    if not _CONTROLLER:
        _CONTROLLER.append(ThreadpoolController())
    return _CONTROLLER[0].limit(limits=cpus, user_api="blas")
