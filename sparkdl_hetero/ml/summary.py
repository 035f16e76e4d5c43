"""Classification summaries with the same members as Spark's MultilayerPerceptronClassificationSummary.

All metrics come from one confusion matrix (a single ``groupBy(label, prediction).count()`` job), with Spark's
MulticlassMetrics definitions: labels are the distinct values of the label column; a metric whose denominator is
zero is 0.
"""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
from pyspark.sql import DataFrame

if TYPE_CHECKING:
    from .classifier import DeepClassificationModel


class DeepClassificationSummary:
    """Metrics of a model on a labeled DataFrame (what ``model.evaluate(df)`` returns)."""

    def __init__(self, model: DeepClassificationModel, dataset: DataFrame | None) -> None:
        self._model = model
        self._dataset = dataset

    @cached_property
    def predictions(self) -> DataFrame:
        """The dataset with the model's output columns."""
        if self._dataset is None:
            raise RuntimeError("training predictions are not kept with a saved model; use model.evaluate(df) "
                               "for metrics")
        return self._model.transform(self._dataset)

    @property
    def predictionCol(self) -> str:
        return self._model.getPredictionCol()

    @property
    def labelCol(self) -> str:
        return self._model.getLabelCol()

    @property
    def weightCol(self) -> str:
        return ""

    @cached_property
    def _confusion(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(labels, predicted values, counts[i, j] of rows with label labels[i] predicted values[j])."""
        label, pred = self.labelCol, self.predictionCol
        if label not in self.predictions.columns:
            raise ValueError(f"label column {label!r} not found; the DataFrame has columns "
                             f"{self._dataset.columns if self._dataset is not None else []}")
        rows = self.predictions.groupBy(label, pred).count().collect()
        if not rows:
            raise ValueError("cannot compute metrics of an empty DataFrame")
        labels = np.array(sorted({float(r[0]) for r in rows}))
        values = np.array(sorted({float(r[0]) for r in rows} | {float(r[1]) for r in rows}))
        counts = np.zeros((labels.size, values.size))
        for r in rows:
            counts[np.searchsorted(labels, float(r[0])), np.searchsorted(values, float(r[1]))] += r[2]
        return labels, values, counts

    @cached_property
    def _per_label(self) -> dict[str, np.ndarray]:
        labels, values, counts = self._confusion
        cols = np.searchsorted(values, labels)
        tp = counts[np.arange(labels.size), cols]
        label_count = counts.sum(axis=1)
        predicted = counts.sum(axis=0)[cols]
        total = counts.sum()
        fp = predicted - tp
        return {"tp": tp, "fp": fp, "count": label_count, "total": np.array(total),
                "precision": _div(tp, tp + fp), "recall": _div(tp, label_count),
                "fpr": _div(fp, total - label_count)}

    def _weighted(self, per_label: np.ndarray) -> float:
        m = self._per_label
        return float(np.sum(per_label * m["count"]) / m["total"])

    @property
    def labels(self) -> list[float]:
        return self._confusion[0].tolist()

    @property
    def accuracy(self) -> float:
        m = self._per_label
        return float(m["tp"].sum() / m["total"])

    @property
    def truePositiveRateByLabel(self) -> list[float]:
        return self._per_label["recall"].tolist()

    @property
    def falsePositiveRateByLabel(self) -> list[float]:
        return self._per_label["fpr"].tolist()

    @property
    def precisionByLabel(self) -> list[float]:
        return self._per_label["precision"].tolist()

    @property
    def recallByLabel(self) -> list[float]:
        return self._per_label["recall"].tolist()

    def fMeasureByLabel(self, beta: float = 1.0) -> list[float]:
        return self._f_measure(beta).tolist()

    def _f_measure(self, beta: float) -> np.ndarray:
        p, r = self._per_label["precision"], self._per_label["recall"]
        b2 = beta * beta
        return _div((1 + b2) * p * r, b2 * p + r)

    @property
    def weightedTruePositiveRate(self) -> float:
        return self._weighted(self._per_label["recall"])

    @property
    def weightedFalsePositiveRate(self) -> float:
        return self._weighted(self._per_label["fpr"])

    @property
    def weightedRecall(self) -> float:
        return self._weighted(self._per_label["recall"])

    @property
    def weightedPrecision(self) -> float:
        return self._weighted(self._per_label["precision"])

    def weightedFMeasure(self, beta: float = 1.0) -> float:
        return self._weighted(self._f_measure(beta))


class DeepClassificationTrainingSummary(DeepClassificationSummary):
    """The evaluation summary on the training set, plus the objective history.

    Also callable and returning itself: pyspark declares the MLP model's ``summary`` as a method, so programs
    written for it call ``model.summary()``; both spellings work here.
    """

    def __init__(self, model: DeepClassificationModel, dataset: DataFrame | None, objective_history: list[float],
                 total_iterations: int, stats: dict | None = None) -> None:
        super().__init__(model, dataset)
        self._history = list(objective_history)
        self._iterations = total_iterations
        self._stats = dict(stats or {})

    def __call__(self) -> DeepClassificationTrainingSummary:
        return self

    @property
    def objectiveHistory(self) -> list[float]:
        """The loss at each iteration (regularization included)."""
        return list(self._history)

    @property
    def totalIterations(self) -> int:
        return self._iterations

    @property
    def roundHistory(self) -> list[dict]:
        """Federated mode: one entry per communication round -- ``round``, ``algorithm`` (what the round ran:
        ``fedavg``, or ``cad`` after the warm-up), ``devices`` (selected), ``dropped`` (devices whose training failed,
        with the error), ``bytesDown`` / ``bytesUp`` (the serialized payloads sent to and received from the
        devices), ``deviceSeconds`` (summed; ``maxDeviceSeconds``: the slowest), ``rows`` trained, ``trainLoss``
        (the devices' last local epoch, row-weighted; a CAD sub-model's loss is over its own classes),
        ``validationLoss`` / ``validationAccuracy`` (the global model after the round on the rows flagged by
        validationIndicatorCol; None without it) and ``seconds`` (wall). Empty for other modes and loaded models."""
        return [dict(e) for e in self._stats.get("roundHistory", [])]

    @property
    def trainingStats(self) -> dict:
        """What the training mode reported (e.g. mode, solver, stopping reason, the backend each worker used,
        timings); empty for a loaded model."""
        return dict(self._stats)


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.divide(a, b, out=np.zeros(np.broadcast(a, b).shape), where=b != 0)
