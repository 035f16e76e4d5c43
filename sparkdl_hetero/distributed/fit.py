"""The one entry point of distributed training: validate, convert, dispatch on the mode
(:meth:`~sparkdl_hetero.nn.config.TrainConfig.resolved_mode`: ``auto`` picks by solver); the fit's stats say which
mode ran (``mode``) and why (``modeReason``)."""

from __future__ import annotations

import numpy as np

from ..nn.objective import Objective
from .cluster import task_slots
from .config import TrainConfig, TrainResult
from .data import prepare
from .placement import probe_executors


def _initial_weights(objective: Objective, config: TrainConfig, initial_weights: np.ndarray | None) -> np.ndarray:
    n = objective.num_weights
    if initial_weights is None:
        return np.asarray(objective.initial_weights(config.seed), dtype=np.float64)
    w = np.asarray(initial_weights, dtype=np.float64).ravel()
    if w.shape != (n,):
        raise ValueError(f"initialWeights must hold {n} values for this model, got {w.size}")
    if not np.all(np.isfinite(w)):
        raise ValueError(f"initialWeights must be finite, got {int(np.sum(~np.isfinite(w)))} NaN/inf values")
    return w


def fit(df, features_col: str, label_col: str, objective: Objective, config: TrainConfig,  # noqa: ANN001
        initial_weights: np.ndarray | None = None, *, regression: bool = False, weight_col: str = "",
        validation_col: str = "", device_col: str = "") -> TrainResult:
    """Train ``objective`` on the rows of ``df`` (features: a Vector or numeric array of the model's input size;
    label: integer class indices, or with ``regression`` the model's outputs: a number, Vector or array).
    ``weight_col``: per-row weights (the loss is the weighted mean); ``validation_col``: a boolean column whose true
    rows never train (see :func:`.data.prepare`); federated mode: ``device_col`` groups the rows into devices.
    Every input check raises ValueError before any training starts (``config`` checked its knobs when it was
    built)."""
    inputs = {"regression": regression, "weight_col": weight_col, "validation_col": validation_col}
    w0 = _initial_weights(objective, config, initial_weights)
    topology = objective.topology
    if config.mode == "federated":
        from .federated import check_federated

        if regression or weight_col:
            raise ValueError("mode='federated' trains classifiers without weightCol; use mode='barrier' or "
                             "'treeAggregate' for regression or weighted rows")
        check_federated(objective, config)
    if config.backend in ("opencl", "cupy"):  # asked for by name: an executor that cannot run it fails the fit now
        probe_executors(df.sparkSession, config.backend, task_slots(df.sparkSession))
    mode, why = config.resolved_mode()
    if mode == "barrier":
        try:
            from .barrier import fit_barrier
        except ImportError as e:
            raise ValueError(f"mode='barrier' is not available in this installation ({e}); "
                             f"use mode='treeAggregate'") from e
        result = fit_barrier(df, features_col, label_col, objective, config, w0, **inputs)
    elif mode == "federated":
        from .federated import fit_federated

        result = fit_federated(df, features_col, label_col, device_col, validation_col, objective, config, w0)
    else:
        data = prepare(df, features_col, label_col, topology.num_inputs, topology.num_outputs, **inputs)
        try:
            from .tree_aggregate import train

            result = train(data, objective, config, w0)
        finally:
            data.release()
    result.stats["modeReason"] = why
    return result
