"""Summaries of the network models: classification (the members of Spark's
MultilayerPerceptronClassificationSummary) and regression (those of Spark's LinearRegressionSummary).

Classification metrics come from one confusion matrix (a single ``groupBy(label, prediction)`` job summing the
rows' weights), with Spark's MulticlassMetrics definitions: labels are the distinct values of the label column; a
metric whose denominator is zero is 0. Regression metrics come from one aggregation job with Spark's RegressionMetrics
definitions; with several outputs, errors are averaged over every (row, output) and r2 / explained variance over
the outputs. As in Spark's summaries, when the model's ``weightCol`` is set and the DataFrame has that column, each
row counts with its weight (MulticlassMetrics / RegressionMetrics with weights: weight sums instead of counts),
so that a row of weight 2 counts as two rows. One exception: r2's SStot is the weighted sum of squares about the
weighted mean, where RegressionMetrics takes the unbiased weighted variance times (weight sum - 1), which a
duplicated row and a weight of 2 do not give alike.
"""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np
from pyspark.sql import DataFrame

if TYPE_CHECKING:
    from .classifier import DeepClassificationModel
    from .regressor import DeepRegressionModel


class _ModelSummary:
    """A model's predictions on a labeled DataFrame, computed on first use, and its column names."""

    def __init__(self, model: Any, dataset: DataFrame | None) -> None:
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
        """The column weighing each row in the metrics: the model's ``weightCol`` when it is set and the DataFrame
        has that column, as in Spark's summaries; ``""`` otherwise (every row weighs 1)."""
        m = self._model
        col = m.getOrDefault(m.weightCol) if m.isDefined(m.weightCol) else ""
        return col if col and self._dataset is not None and col in self._dataset.columns else ""

    def _weight(self) -> Any:
        """The rows' weights as a double Column (1.0 without :attr:`weightCol`)."""
        from pyspark.sql import functions as F

        return F.col(self.weightCol).cast("double") if self.weightCol else F.lit(1.0)


class DeepClassificationSummary(_ModelSummary):
    """Metrics of a model on a labeled DataFrame (what ``model.evaluate(df)`` returns)."""

    _model: DeepClassificationModel

    @cached_property
    def _confusion(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(labels, predicted values, counts[i, j]: the rows -- their weights' sum -- with label labels[i] predicted
        values[j])."""
        from pyspark.sql import functions as F

        label, pred = self.labelCol, self.predictionCol
        if label not in self.predictions.columns:
            raise ValueError(f"label column {label!r} not found; the DataFrame has columns "
                             f"{self._dataset.columns if self._dataset is not None else []}")
        rows = self.predictions.groupBy(label, pred).agg(F.sum(self._weight())).collect()
        if not rows:
            raise ValueError("cannot compute metrics of an empty DataFrame")
        labels = np.array(sorted({float(r[0]) for r in rows}))
        values = np.array(sorted({float(r[0]) for r in rows} | {float(r[1]) for r in rows}))
        counts = np.zeros((labels.size, values.size))
        for r in rows:
            counts[np.searchsorted(labels, float(r[0])), np.searchsorted(values, float(r[1]))] += float(r[2] or 0.0)
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


class TrainingInfo:
    """What a fit reports beside the metrics: the objective history, iterations and the training mode's stats.

    Also callable and returning itself: pyspark declares the MLP model's ``summary`` as a method, so programs
    written for it call ``model.summary()``; both spellings work here.
    """

    def _init_training(self, objective_history: list[float], total_iterations: int, stats: dict | None) -> None:
        self._history = list(objective_history)
        self._iterations = total_iterations
        self._stats = dict(stats or {})

    def __call__(self) -> TrainingInfo:
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

    @property
    def stepLossHistory(self) -> list[tuple[int, float]]:
        """Mini-batch solvers: (global step, mean training loss of the steps since the previous point), a point
        every few steps (:data:`~sparkdl_hetero.nn.solvers.STEP_HISTORY_STEPS`): a finer curve than the per-epoch
        objectiveHistory; empty otherwise."""
        return [(int(p[0]), float(p[1])) for p in self._stats.get("stepLoss", [])]

    @property
    def validationHistory(self) -> list[tuple[float, float]]:
        """(validation loss, accuracy -- or RMSE for a regressor) after each epoch, computed over every worker's
        validation rows (validationIndicatorCol, or validationFraction in barrier mode); empty without them."""
        return [(float(v[0]), float(v[1])) for v in self._stats.get("validation", [])]


class DeepClassificationTrainingSummary(TrainingInfo, DeepClassificationSummary):
    """The evaluation summary on the training set, plus the objective history (see :class:`TrainingInfo`)."""

    def __init__(self, model: DeepClassificationModel, dataset: DataFrame | None, objective_history: list[float],
                 total_iterations: int, stats: dict | None = None) -> None:
        DeepClassificationSummary.__init__(self, model, dataset)
        self._init_training(objective_history, total_iterations, stats)


class DeepRegressionSummary(_ModelSummary):
    """Regression metrics of a model on a labeled DataFrame (what ``model.evaluate(df)`` returns)."""

    _model: DeepRegressionModel

    @property
    def featuresCol(self) -> str:
        return self._model.getFeaturesCol()

    @cached_property
    def _sums(self) -> np.ndarray:
        """Per output j: the weights' sum (the rows without weightCol), the weighted sums of labels, of squared
        labels, of predictions, of squared predictions, of squared errors, of absolute errors, and the rows -- an
        (outputs, 8) array from one aggregation job."""
        from pyspark.ml.functions import vector_to_array
        from pyspark.ml.linalg import VectorUDT
        from pyspark.sql import functions as F
        from pyspark.sql.types import NumericType

        df = self.predictions
        if self.labelCol not in df.columns:
            raise ValueError(f"label column {self.labelCol!r} not found; the DataFrame has columns {df.columns}")

        def as_array(col: str):  # noqa: ANN202 -- a pyspark Column
            dt = df.schema[col].dataType
            if isinstance(dt, NumericType):
                return F.array(F.col(col).cast("double"))
            if isinstance(dt, VectorUDT):
                return vector_to_array(F.col(col), "float64")
            return F.col(col).cast("array<double>")

        pairs = df.select(self._weight().alias("w"),
                          F.posexplode(F.arrays_zip(as_array(self.labelCol).alias("l"),
                                                    as_array(self.predictionCol).alias("p"))).alias("j", "lp"))
        w, lab, pred = F.col("w"), F.col("lp.l"), F.col("lp.p")
        err = pred - lab
        rows = pairs.groupBy("j").agg(F.sum(w), F.sum(w * lab), F.sum(w * lab * lab), F.sum(w * pred),
                                      F.sum(w * pred * pred), F.sum(w * err * err), F.sum(w * F.abs(err)),
                                      F.count(F.lit(1))).collect()
        if not rows:
            raise ValueError("cannot compute metrics of an empty DataFrame")
        out = np.zeros((max(r[0] for r in rows) + 1, 8))
        for r in rows:
            out[r[0]] = [float(v or 0.0) for v in r[1:]]
        return out

    @property
    def numInstances(self) -> int:
        return int(self._sums[0, 7])

    @property
    def meanSquaredError(self) -> float:
        s = self._sums
        return float(s[:, 5].sum() / s[:, 0].sum())

    @property
    def rootMeanSquaredError(self) -> float:
        return float(np.sqrt(self.meanSquaredError))

    @property
    def meanAbsoluteError(self) -> float:
        s = self._sums
        return float(s[:, 6].sum() / s[:, 0].sum())

    @property
    def r2(self) -> float:
        """``1 - SSerr / SStot`` (Spark's r2, without its adjustment for an intercept-free model; weighted sums with
        :attr:`weightCol`)."""
        n, sl, sll = self._sums[:, 0], self._sums[:, 1], self._sums[:, 2]
        sst = sll - sl * sl / n
        return float(np.mean(1.0 - _div(self._sums[:, 5], sst)))

    @property
    def explainedVariance(self) -> float:
        """``sum (prediction - mean label)^2 / n`` (Spark's RegressionMetrics.explainedVariance; with
        :attr:`weightCol`: weighted sum and mean, ``n`` the weights' sum)."""
        n, sl, sp, spp = self._sums[:, 0], self._sums[:, 1], self._sums[:, 3], self._sums[:, 4]
        mean = sl / n
        return float(np.mean((spp - 2 * mean * sp + n * mean * mean) / n))


class DeepRegressionTrainingSummary(TrainingInfo, DeepRegressionSummary):
    """The regression metrics on the training set, plus the objective history (see :class:`TrainingInfo`)."""

    def __init__(self, model: DeepRegressionModel, dataset: DataFrame | None, objective_history: list[float],
                 total_iterations: int, stats: dict | None = None) -> None:
        DeepRegressionSummary.__init__(self, model, dataset)
        self._init_training(objective_history, total_iterations, stats)


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.divide(a, b, out=np.zeros(np.broadcast(a, b).shape), where=b != 0)
