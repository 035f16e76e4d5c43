"""Optional MLflow logging of a fit, after it ends (no run-time dependency on MLflow).

When ``mlflow`` has been imported and a run is active, :func:`log_fit` logs into it the estimator's params
(explicit and default values), the fitted model summary's histories as metrics with their step, the training stats
(every one in the ``training_stats.json`` artifact, the numeric ones also as ``stats.<name>`` metrics) and the
saved model (the ``model`` artifact directory, which the model class's ``load`` reads). A run that already holds a
fit (a loop, a CrossValidator) gets each further fit in a nested run. Without MLflow or an active run it does
nothing: a run can only be active once ``mlflow`` is imported, so looking it up in ``sys.modules`` imports nothing.
A logging failure warns (naming what failed) and never loses the fitted model.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable
from typing import Any

#: the tag marking a run that holds a fit; a further fit in that run goes to a nested run
FIT_TAG = "sparkdl_hetero.fit"
#: MLflow's limit on a param value's length when its own constant cannot be read
_PARAM_LIMIT = 6000


def log_fit(estimator: Any, model: Any, metric_name: str) -> None:
    """Log ``estimator``'s fit of ``model`` into the active MLflow run, if any; ``metric_name``: the key of the second
    figure of the validation history (``validationAccuracy``, ``validationRMSE``)."""
    mlflow = sys.modules.get("mlflow")
    if mlflow is None or not hasattr(mlflow, "active_run"):
        return
    try:
        run = mlflow.active_run()
        if run is None:
            return
        client = mlflow.tracking.MlflowClient()
        nested = FIT_TAG in client.get_run(run.info.run_id).data.tags
    except Exception as e:  # noqa: BLE001 -- a tracking store that cannot answer must not fail the fit
        warnings.warn(f"MLflow logging of the fit failed (the active run could not be read): "
                      f"{type(e).__name__}: {e}", RuntimeWarning, stacklevel=3)
        return
    if nested:
        try:
            with mlflow.start_run(nested=True, run_name=f"{type(estimator).__name__} fit"):
                _log_parts(mlflow, estimator, model, metric_name)
        except Exception as e:  # noqa: BLE001
            warnings.warn(f"MLflow logging of the fit failed (the nested run could not be started or ended): "
                          f"{type(e).__name__}: {e}", RuntimeWarning, stacklevel=3)
    else:
        _log_parts(mlflow, estimator, model, metric_name)


def _log_parts(mlflow: Any, estimator: Any, model: Any, metric_name: str) -> None:
    parts: list[tuple[str, Callable[[], None]]] = [
        ("params", lambda: mlflow.log_params(estimator_params(estimator, _param_limit()))),
        ("metrics", lambda: _log_metrics(mlflow, model, metric_name)),
        ("training stats", lambda: _log_stats(mlflow, model.summary.trainingStats)),
        ("model", lambda: _log_model(mlflow, model)),
        ("fit tag", lambda: mlflow.set_tag(FIT_TAG, type(model).__name__)),
    ]
    for what, log in parts:
        try:
            log()
        except Exception as e:  # noqa: BLE001 -- the fitted model is returned whatever the tracking store does
            warnings.warn(f"MLflow logging of the {what} failed: {type(e).__name__}: {e}; the fitted model is "
                          f"returned without it", RuntimeWarning, stacklevel=4)


def _param_limit() -> int:
    try:
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH
    except ImportError:
        return _PARAM_LIMIT
    return int(MAX_PARAM_VAL_LENGTH)


def param_text(value: Any, limit: int = _PARAM_LIMIT) -> str:
    """A param value as MLflow stores it: lists and dicts as JSON, the rest as ``str``; a value longer than
    ``limit`` characters is cut to ``limit`` ending in an ellipsis."""
    text = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def estimator_params(estimator: Any, limit: int = _PARAM_LIMIT) -> dict[str, str]:
    """Every param with a value (explicit or default) by name, as :func:`param_text` writes it."""
    return {p.name: param_text(v, limit) for p, v in estimator.extractParamMap().items()}


def _metric_points(model: Any, metric_name: str) -> Iterable[tuple[str, float, int]]:
    """(key, value, step) of every history the model's summary has: the training loss per iteration or epoch,
    the step losses, the validation loss and metric per validation point, the federated rounds' figures."""
    summary = model.summary
    for i, loss in enumerate(summary.objectiveHistory):
        yield "trainingLoss", loss, i
    for step, loss in summary.stepLossHistory:
        yield "stepLoss", loss, step
    for i, (loss, metric) in enumerate(summary.validationHistory):
        yield "validationLoss", loss, i
        yield metric_name, metric, i
    for r in summary.roundHistory:
        for key in ("trainLoss", "validationLoss", "validationAccuracy", "bytesDown", "bytesUp", "seconds"):
            if isinstance(r.get(key), (int, float)):
                yield f"round.{key}", r[key], int(r["round"])


def _log_metrics(mlflow: Any, model: Any, metric_name: str) -> None:
    from mlflow.entities import Metric

    run_id = mlflow.active_run().info.run_id
    now = int(1000 * time.time())
    metrics = [Metric(key, float(value), now, int(step)) for key, value, step in _metric_points(model, metric_name)
               if math.isfinite(float(value))]
    if metrics:
        mlflow.tracking.MlflowClient().log_batch(run_id, metrics=metrics)


def _log_stats(mlflow: Any, stats: dict) -> None:
    mlflow.log_dict(json.loads(json.dumps(stats, default=str)), "training_stats.json")
    numeric = {f"stats.{k}": float(v) for k, v in stats.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    if numeric:
        mlflow.log_metrics(numeric)


def _log_model(mlflow: Any, model: Any) -> None:
    with tempfile.TemporaryDirectory(prefix="sparkdl-mlflow-") as tmp:
        path = os.path.join(tmp, "model")
        # the save goes through Spark's data sources: a driver-local file: URI, which the driver and (in local
        # mode, or on a shared mount) the executors write alike
        model.save("file://" + path)
        mlflow.log_artifacts(path, artifact_path="model")
