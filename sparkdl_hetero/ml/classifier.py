"""DeepClassifier / DeepClassificationModel: a drop-in for Spark ML's MultilayerPerceptronClassifier that also
trains CNNs, with modern updaters, on accelerated backends."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
from pyspark import keyword_only
from pyspark.ml.classification import ProbabilisticClassificationModel, ProbabilisticClassifier
from pyspark.ml.functions import array_to_vector
from pyspark.ml.linalg import DenseVector, Vector
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql.functions import arrow_udf

from ..nn.config import check_knob
from ..nn.model import FeedForwardModel
from ..nn.topology import FeedForwardTopology
from .mentor import _mentor_network, _MentorParams
from .network import (
    NetworkModel,
    NetworkSetters,
    check_features_column,
    features_array,
    features_matrix,
    fit_network,
)
from .params import _DeepClassifierParams
from .persistence import PersistentParams
from .summary import DeepClassificationSummary, DeepClassificationTrainingSummary


class DeepClassifier(NetworkSetters, ProbabilisticClassifier, _DeepClassifierParams, _MentorParams,
                     PersistentParams):
    """Trains a feed-forward network (Spark's MLP, or any topology spec incl. CNNs) on Spark.

    Written for ``MultilayerPerceptronClassifier``? Change only the class name: same params, same defaults.

    >>> DeepClassifier(layers=[4, 5, 4, 3], blockSize=128, seed=1234, maxIter=100)  # doctest: +SKIP
    >>> DeepClassifier(topology="conv(6,5,pad=2)-relu-maxpool(2)-flatten-affine(10)", inputShape=[1, 28, 28],
    ...                solver="adam", stepSize=1e-3, epochs=3)  # doctest: +SKIP
    """

    _array_params = ("initialWeights",)

    @keyword_only
    def __init__(self, *, featuresCol: str = "features", labelCol: str = "label", predictionCol: str = "prediction",
                 maxIter: int = 100, tol: float = 1e-6, seed: int | None = None, layers: list[int] | None = None,
                 blockSize: int = 128, stepSize: float = 0.03, solver: str = "l-bfgs",
                 initialWeights: Vector | None = None, probabilityCol: str = "probability",
                 rawPredictionCol: str = "rawPrediction", **extra: Any) -> None:
        """Spark MLP's keyword arguments, plus any other param of this class by name (topology, inputShape,
        weightCol, batchSize, epochs, momentum, nesterov, beta1, beta2, epsilon, lrSchedule, regParam, backend, mode,
        dtype, checkpointDir, checkpointInterval, verbose, ...)."""
        super().__init__()
        self.setParams(**self._input_kwargs)

    @keyword_only
    def setParams(self, **kwargs: Any) -> DeepClassifier:
        """Sets params by name (any param of this class)."""
        return self._set(**self._input_kwargs)

    def _fit(self, dataset: DataFrame) -> DeepClassificationModel:
        if self._has_mentor() and self.isDefined(self.weightCol) and self.getWeightCol():
            raise ValueError(f"weightCol ({self.getWeightCol()!r}) cannot be combined with a mentor: distillation "
                             f"weighs every row alike; unset one of them")
        mentor_topology = _mentor_network(self.getMentor())[0] if self._has_mentor() else None
        if mentor_topology is not None and mentor_topology.num_state:
            raise ValueError(f"the mentor's topology {mentor_topology.spec!r} has batch normalization, whose "
                             f"running statistics distillation does not use yet; use a mentor without batchnorm")
        return fit_network(self, dataset, DeepClassificationModel, self._objective)  # plain, or distillation


class DeepClassificationModel(NetworkModel, ProbabilisticClassificationModel, _DeepClassifierParams,
                              PersistentParams):
    """A trained network: ``transform`` adds rawPrediction, probability and prediction, like Spark's MLP model.

    Build one from weights directly with ``DeepClassificationModel(FeedForwardTopology..., weights)``; ``state``:
    the batch normalization statistics (``FeedForwardModel.get_state()``; None: the initial ones).
    """

    def __init__(self, topology: FeedForwardTopology | None = None, weights: Any = None, *, state: Any = None,
                 objectiveHistory: list[float] | None = None, totalIterations: int | None = None) -> None:
        super().__init__()
        self._init_network(topology, weights, objectiveHistory, totalIterations, state)

    @property
    def numClasses(self) -> int:
        return self.network.num_outputs

    def _output_metadata(self) -> dict[str, Any]:
        return {"numClasses": self.numClasses}

    @property
    def summary(self) -> DeepClassificationTrainingSummary:
        """Objective history and total iterations; classification metrics on the training set when the model
        was fit in this session. Also callable (``model.summary()``), like pyspark's MLP model."""
        if not self.hasSummary:
            raise RuntimeError(f"No training summary available for this {type(self).__name__}")
        train, stats = self._training if self._training is not None else (None, {})
        return DeepClassificationTrainingSummary(self, train, self._history, self._iterations, stats)

    def evaluate(self, dataset: DataFrame) -> DeepClassificationSummary:
        """Accuracy, precision, recall... of this model on a labeled dataset."""
        if not isinstance(dataset, DataFrame):
            raise TypeError(f"dataset must be a DataFrame but got {type(dataset)}.")
        return DeepClassificationSummary(self, dataset)

    # ---- single-row predictions (driver, float64) ----
    def predictRaw(self, value: Vector) -> DenseVector:
        return DenseVector(self._driver_model().predict_raw(np.asarray(value.toArray(), np.float64)[None])[0])

    def predictProbability(self, value: Vector) -> DenseVector:
        return DenseVector(self._driver_model().predict(np.asarray(value.toArray(), np.float64)[None])[0])

    def predict(self, value: Vector) -> float:
        prob = self._driver_model().predict(np.asarray(value.toArray(), np.float64)[None])
        return float(_prediction(prob, self._thresholds())[0])

    def _thresholds(self) -> np.ndarray | None:
        if not self.isDefined(self.thresholds):
            return None
        t = np.asarray(self.getThresholds(), dtype=np.float64)
        if t.shape != (self.numClasses,):
            raise ValueError(f"thresholds must have one value per class ({self.numClasses}), got {t.size}")
        return t

    # ---- transform (executors, Arrow batches) ----
    def _transform(self, dataset: DataFrame) -> DataFrame:
        feats = self.getFeaturesCol()
        check_features_column(dataset, feats)
        outputs = {"raw": self.getRawPredictionCol(), "prob": self.getProbabilityCol(),
                   "pred": self.getPredictionCol()}
        outputs = {k: c for k, c in outputs.items() if c}
        for c in outputs.values():
            if c in dataset.columns:
                raise ValueError(f"output column {c!r} already exists in the DataFrame")
        if not outputs:
            return dataset
        dtype, backend = self.getDtype(), self.getBackend()
        check_knob("dtype", dtype)
        check_knob("backend", backend)
        x = features_array(dataset, feats, dtype)
        udf = _predict_udf(self.network.to_dict(), self._weights, self._state, dtype, backend, self._thresholds(),
                           feats)
        tmp = f"_{self.uid}_out"
        out = dataset.withColumn(tmp, udf(x))
        exprs = {"raw": array_to_vector(F.col(tmp)["raw"]), "prob": array_to_vector(F.col(tmp)["prob"]),
                 "pred": F.col(tmp)["pred"]}
        return out.select(*[F.col(f"`{c}`") for c in dataset.columns],
                          *[exprs[k].alias(c) for k, c in outputs.items()])

    # ---- what the filters respond to (the CAD poster's filter visualization) ----
    def visualizeFilters(self, layer: int, filters: list[int] | None = None, iterations: int = 100,
                         stepSize: float = 0.05, l2: float = 1.0, blur: float = 0.0, jitter: int = 0,
                         seed: int = 0) -> np.ndarray:
        """One input per filter of conv/affine layer ``layer`` (all its filters, or ``filters``) that maximizes the
        filter's mean activation, by gradient ascent from random noise with an L2 (and optional blur / jitter)
        regularizer (:func:`~sparkdl_hetero.nn.visualize.visualize_filters`): (filters, channels, height, width)
        for an image model, (filters, features) otherwise."""
        from ..nn.visualize import visualize_filters

        return visualize_filters(self._driver_model(), layer, filters, iterations=iterations, step_size=stepSize,
                                 l2=l2, blur=blur, jitter=jitter, seed=seed)

    def filterPreferences(self, dataset: DataFrame, layer: int) -> np.ndarray:
        """The (classes, filters) matrix of each filter's mean activation over the rows of each class of
        ``dataset`` (featuresCol, labelCol) at conv/affine layer ``layer``, computed on the executors: the
        preference CAD ranks filters by (NaN for a class without rows)."""
        from ..distributed.federated import filter_preferences_df

        return filter_preferences_df(dataset, self.getFeaturesCol(), self.getLabelCol(), self.network,
                                     self._weights, layer, self.getDtype(), self.getBackend())

    # ---- interop with Spark's MultilayerPerceptronClassificationModel ----
    @classmethod
    def fromSpark(cls, model: Any) -> DeepClassificationModel:
        """The same network as a Spark ``MultilayerPerceptronClassificationModel`` (float64, so predictions agree
        with Spark's to 1e-9)."""
        from .interop import from_spark

        return from_spark(cls, model)

    def toSpark(self) -> Any:
        """This model as a Spark ``MultilayerPerceptronClassificationModel`` (Spark MLP topologies only)."""
        from .interop import to_spark

        return to_spark(self)


def _prediction(prob: np.ndarray, thresholds: np.ndarray | None) -> np.ndarray:
    """Spark's probability2prediction: argmax of probability / threshold (a zero threshold wins)."""
    if thresholds is None:
        return prob.argmax(axis=1).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = np.where(thresholds == 0.0, np.inf, prob / np.where(thresholds == 0.0, 1.0, thresholds))
    return scaled.argmax(axis=1).astype(np.float64)


def _predict_udf(topology: dict, weights: np.ndarray, state: np.ndarray, dtype: str, backend: str,
                 thresholds: np.ndarray | None, features_col: str) -> Any:
    """An Arrow UDF (array of features -> struct of raw, prob, pred), one engine model per task."""

    def predict(batches: Iterator[pa.Array]) -> Iterator[pa.Array]:
        from pyspark import TaskContext
        from threadpoolctl import threadpool_limits

        from ..distributed.placement import task_backend

        ctx = TaskContext.get()
        cpus = max(1, int(ctx.cpus())) if ctx is not None else 1
        with threadpool_limits(limits=cpus, user_api="blas"):  # no BLAS oversubscription of the task's cores
            be, _ = task_backend(backend)  # "auto" and Spark-assigned GPUs resolve as in training
            topo = FeedForwardTopology.from_dict(topology)
            model = FeedForwardModel(topo, weights, dtype=np.dtype(dtype), backend=be, state=state)
            d, k = topo.num_inputs, topo.num_outputs
            for arr in batches:
                yield _predict_batch(model, arr, d, k, thresholds, features_col)

    return arrow_udf(predict, "raw array<double>, prob array<double>, pred double")


def _predict_batch(model: FeedForwardModel, arr: Any, d: int, k: int, thresholds: np.ndarray | None,
                   features_col: str) -> pa.Array:
    x = features_matrix(arr, d, features_col)
    n = len(x)
    if n:
        outs = model.forward(x)
        be = model.backend
        raw = np.asarray(be.to_host(outs[-1]), dtype=np.float64)
        prob = np.asarray(be.to_host(model.topology.loss_layer.output(be, outs[-1])), dtype=np.float64)
    else:
        raw = prob = np.zeros((0, k))
    offsets = pa.array(np.arange(0, n * k + 1, k, dtype=np.int32))
    return pa.StructArray.from_arrays(
        [pa.ListArray.from_arrays(offsets, pa.array(raw.ravel())),
         pa.ListArray.from_arrays(offsets, pa.array(prob.ravel())),
         pa.array(_prediction(prob, thresholds))], names=["raw", "prob", "pred"])
