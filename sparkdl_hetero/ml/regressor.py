"""DeepRegressor / DeepRegressionModel: the classifier's engine, topologies, modes and backends with a linear
output layer and a regression loss (Spark ``LinearRegression``'s ``squaredError`` or ``huber``).

Nothing is standardized silently: put a ``StandardScaler`` before the regressor in a ``Pipeline`` when the
features' scales differ (see the README), and scale large targets yourself.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
from pyspark import keyword_only
from pyspark.ml.base import PredictionModel, Predictor
from pyspark.ml.functions import array_to_vector
from pyspark.ml.linalg import DenseVector, Vector, VectorUDT
from pyspark.ml.param import Param, Params, TypeConverters
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql.functions import arrow_udf
from pyspark.sql.types import ArrayType, NumericType

from ..nn.config import check_knob
from ..nn.layers import DEFAULT_HUBER_DELTA, Huber, LossLayer, SquaredError
from ..nn.model import FeedForwardModel
from ..nn.topology import FeedForwardTopology
from .network import (
    NetworkModel,
    NetworkSetters,
    check_features_column,
    features_array,
    features_matrix,
    fit_network,
)
from .params import _DeepNetworkParams
from .persistence import PersistentParams
from .summary import DeepRegressionSummary, DeepRegressionTrainingSummary

LOSSES = ("squaredError", "huber")


class _DeepRegressorParams(_DeepNetworkParams):
    """Params of :class:`DeepRegressor` and :class:`DeepRegressionModel`: the network params plus the loss."""

    loss: Param[str] = Param(Params._dummy(), "loss", f"The loss function: {' or '.join(LOSSES)} (Spark "
                             "LinearRegression's names): squaredError is half the squared error, huber quadratic "
                             "within delta of the label and linear beyond.", TypeConverters.toString)
    delta: Param[float] = Param(Params._dummy(), "delta", "Huber's threshold on the error (loss huber); Spark's "
                                "epsilon applies to the error divided by a jointly estimated scale, delta to the "
                                "error itself. Must be > 0.", TypeConverters.toFloat)

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._setDefault(loss="squaredError", delta=DEFAULT_HUBER_DELTA)

    def getLoss(self) -> str:
        return self.getOrDefault(self.loss)

    def getDelta(self) -> float:
        return self.getOrDefault(self.delta)

    def _top_loss(self) -> LossLayer:
        loss, delta = self.getLoss(), self.getDelta()
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        if loss == "squaredError":
            return SquaredError()
        if not (np.isfinite(delta) and delta > 0):
            raise ValueError(f"delta must be a finite number > 0, got {delta}")
        return Huber(float(delta))


def _check_regression_topology(topology: FeedForwardTopology, loss: LossLayer) -> None:
    """The output layer must be the regression loss the params ask for."""
    top = topology.loss_layer
    if top.class_labels:
        raise ValueError(f"topology {topology.spec!r} ends with {top.spec()!r}, a classification output; "
                         f"DeepRegressor needs a linear output: end the topology with an affine layer (the loss "
                         f"param adds {loss.spec()!r})")
    if top != loss:
        raise ValueError(f"topology {topology.spec!r} ends with the loss {top.spec()!r} but the loss param asks "
                         f"for {loss.spec()!r}; drop the loss from the topology or make them agree")


def _label_size(dataset: DataFrame, col: str) -> int | None:
    """Outputs per row of the label column: 1 for a number, the first non-null vector's size otherwise (None when
    there is none)."""
    if col not in dataset.columns:
        raise ValueError(f"label column {col!r} not found in the DataFrame; it has columns {dataset.columns}")
    dt = dataset.schema[col].dataType
    if isinstance(dt, NumericType):
        return 1
    if not (isinstance(dt, VectorUDT) or (isinstance(dt, ArrayType) and isinstance(dt.elementType, NumericType))):
        raise ValueError(f"label column {col!r} must be a number, a Vector or an array of numbers, "
                         f"got {dt.simpleString()}")
    row = dataset.select(col).where(F.col(col).isNotNull()).first()
    if row is None:
        return None
    return int(row[0].size) if isinstance(row[0], Vector) else len(row[0])


class DeepRegressor(NetworkSetters, Predictor, _DeepRegressorParams, PersistentParams):
    """Trains a feed-forward network (an MLP given by ``layers``, or any topology spec incl. CNNs) for regression
    on Spark: one output per label value (``labelCol`` a number, or a Vector / array for several outputs).

    >>> DeepRegressor(layers=[8, 32, 1], solver="adam", stepSize=1e-2, epochs=50)  # doctest: +SKIP
    >>> DeepRegressor(topology="affine(64)-relu-affine(64)-relu-affine(1)", loss="huber", delta=1.0)  # doctest: +SKIP
    """

    _array_params = ("initialWeights",)

    @keyword_only
    def __init__(self, *, featuresCol: str = "features", labelCol: str = "label", predictionCol: str = "prediction",
                 maxIter: int = 100, tol: float = 1e-6, seed: int | None = None, layers: list[int] | None = None,
                 stepSize: float = 0.03, solver: str = "l-bfgs", loss: str = "squaredError",
                 delta: float = DEFAULT_HUBER_DELTA, **extra: Any) -> None:
        """Keyword arguments: any param of this class by name (topology, inputShape, weightCol, batchSize, epochs,
        regParam, backend, mode, dtype, ...)."""
        super().__init__()
        self.setParams(**self._input_kwargs)

    @keyword_only
    def setParams(self, **kwargs: Any) -> DeepRegressor:
        """Sets params by name (any param of this class)."""
        return self._set(**self._input_kwargs)

    def setLoss(self, value: str) -> DeepRegressor:
        return self._set(loss=value)

    def setDelta(self, value: float) -> DeepRegressor:
        return self._set(delta=value)

    def _fit(self, dataset: DataFrame) -> DeepRegressionModel:
        loss = self._top_loss()  # a bad loss or delta fails before any Spark job
        label = self.getLabelCol()

        def check(topology: FeedForwardTopology) -> None:
            _check_regression_topology(topology, loss)
            k = _label_size(dataset, label)
            if k is not None and k != topology.num_outputs:
                raise ValueError(f"label column {label!r} holds {k} value{'s' if k != 1 else ''} per row but "
                                 f"topology {topology.spec!r} has {topology.num_outputs} output"
                                 f"{'s' if topology.num_outputs != 1 else ''}; make its last affine layer "
                                 f"affine({k})")

        return fit_network(self, dataset, DeepRegressionModel, regression=True, check=check)


class DeepRegressionModel(NetworkModel, PredictionModel, _DeepRegressorParams, PersistentParams):
    """A trained regression network: ``transform`` adds the prediction column (a double, or a Vector with several
    outputs). Build one from weights directly with ``DeepRegressionModel(FeedForwardTopology..., weights)``;
    ``state``: the batch normalization statistics (``FeedForwardModel.get_state()``; None: the initial ones)."""

    def __init__(self, topology: FeedForwardTopology | None = None, weights: Any = None, *, state: Any = None,
                 objectiveHistory: list[float] | None = None, totalIterations: int | None = None) -> None:
        super().__init__()
        if topology is not None:
            _check_regression_topology(topology, topology.loss_layer)
        self._init_network(topology, weights, objectiveHistory, totalIterations, state)

    @property
    def numOutputs(self) -> int:
        return self.network.num_outputs

    def _output_metadata(self) -> dict[str, Any]:
        return {"numOutputs": self.numOutputs}

    @property
    def summary(self) -> DeepRegressionTrainingSummary:
        """Objective history and total iterations; regression metrics on the training set when the model was fit
        in this session. Also callable (``model.summary()``)."""
        if not self.hasSummary:
            raise RuntimeError(f"No training summary available for this {type(self).__name__}")
        train, stats = self._training if self._training is not None else (None, {})
        return DeepRegressionTrainingSummary(self, train, self._history, self._iterations, stats)

    def evaluate(self, dataset: DataFrame) -> DeepRegressionSummary:
        """RMSE, MSE, MAE, r2 and explained variance of this model on a labeled dataset."""
        if not isinstance(dataset, DataFrame):
            raise TypeError(f"dataset must be a DataFrame but got {type(dataset)}.")
        return DeepRegressionSummary(self, dataset)

    def predict(self, value: Vector) -> float | DenseVector:
        """The prediction for one feature vector: a float, or a DenseVector with several outputs."""
        out = self._driver_model().predict(np.asarray(value.toArray(), np.float64)[None])[0]
        return float(out[0]) if out.size == 1 else DenseVector(out)

    def _transform(self, dataset: DataFrame) -> DataFrame:
        feats, pred = self.getFeaturesCol(), self.getPredictionCol()
        check_features_column(dataset, feats)
        if not pred:
            return dataset
        if pred in dataset.columns:
            raise ValueError(f"output column {pred!r} already exists in the DataFrame")
        dtype, backend = self.getDtype(), self.getBackend()
        check_knob("dtype", dtype)
        check_knob("backend", backend)
        udf = _predict_udf(self.network.to_dict(), self._weights, self._state, dtype, backend, feats)
        out = udf(features_array(dataset, feats, dtype))
        return dataset.withColumn(pred, out[0] if self.numOutputs == 1 else array_to_vector(out))


def _predict_udf(topology: dict, weights: np.ndarray, state: np.ndarray, dtype: str, backend: str,
                 features_col: str) -> Any:
    """An Arrow UDF (array of features -> array of outputs), one engine model per task."""

    def predict(batches: Iterator[pa.Array]) -> Iterator[pa.Array]:
        from pyspark import TaskContext
        from threadpoolctl import threadpool_limits

        from ..distributed.placement import task_backend

        ctx = TaskContext.get()
        cpus = max(1, int(ctx.cpus())) if ctx is not None else 1
        with threadpool_limits(limits=cpus, user_api="blas"):  # no BLAS oversubscription of the task's cores
            be, _ = task_backend(backend)
            topo = FeedForwardTopology.from_dict(topology)
            model = FeedForwardModel(topo, weights, dtype=np.dtype(dtype), backend=be, state=state)
            d, k = topo.num_inputs, topo.num_outputs
            for arr in batches:
                x = features_matrix(arr, d, features_col)
                y = model.predict(x) if len(x) else np.zeros((0, k))
                offsets = pa.array(np.arange(0, len(x) * k + 1, k, dtype=np.int32))
                yield pa.ListArray.from_arrays(offsets, pa.array(np.asarray(y, np.float64).ravel()))

    return arrow_udf(predict, "array<double>")
