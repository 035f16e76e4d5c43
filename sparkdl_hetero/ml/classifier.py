"""DeepClassifier / DeepClassificationModel: a drop-in for Spark ML's MultilayerPerceptronClassifier that also
trains CNNs, with modern updaters, on accelerated backends."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark import keyword_only
from pyspark.ml.classification import ProbabilisticClassificationModel, ProbabilisticClassifier
from pyspark.ml.functions import array_to_vector, vector_to_array
from pyspark.ml.linalg import DenseVector, Vector, VectorUDT
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql.functions import arrow_udf
from pyspark.sql.types import ArrayType, NumericType

from ..nn.config import check_knob
from ..nn.model import FeedForwardModel
from ..nn.topology import FeedForwardTopology
from .mentor import _MentorParams
from .params import _DeepClassifierParams
from .persistence import PersistentParams
from .summary import DeepClassificationSummary, DeepClassificationTrainingSummary


def _features_size(dataset: DataFrame, col: str) -> int | None:
    """The length of the first feature vector (None when the DataFrame is empty)."""
    row = dataset.select(col).first()
    if row is None or row[0] is None:
        return None
    return int(row[0].size) if isinstance(row[0], Vector) else len(row[0])


def _check_features_column(dataset: DataFrame, col: str) -> None:
    """Transform's input check (training input is checked by distributed.data)."""
    if col not in dataset.columns:
        raise ValueError(f"features column {col!r} not found; the DataFrame has columns {dataset.columns}")
    dt = dataset.schema[col].dataType
    if not (isinstance(dt, VectorUDT) or (isinstance(dt, ArrayType) and isinstance(dt.elementType, NumericType))):
        raise ValueError(f"features column {col!r} must be a Vector or an array of numbers, got {dt.simpleString()}")


class DeepClassifier(ProbabilisticClassifier, _DeepClassifierParams, _MentorParams, PersistentParams):
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
        batchSize, epochs, momentum, nesterov, beta1, beta2, epsilon, lrSchedule, regParam, backend, mode, dtype,
        checkpointDir, checkpointInterval, verbose, ...)."""
        super().__init__()
        self.setParams(**self._input_kwargs)

    @keyword_only
    def setParams(self, **kwargs: Any) -> DeepClassifier:
        """Sets params by name (any param of this class)."""
        return self._set(**self._input_kwargs)

    def _set(self, **kwargs: Any) -> Any:
        unknown = [k for k in kwargs if not self.hasParam(k)]
        if unknown:
            raise TypeError(f"{type(self).__name__} has no param {', '.join(map(repr, unknown))}")
        return super()._set(**kwargs)

    # Spark MLP's setters, then ours.
    def setLayers(self, value: list[int]) -> DeepClassifier:
        return self._set(layers=value)

    def setBlockSize(self, value: int) -> DeepClassifier:
        return self._set(blockSize=value)

    def setInitialWeights(self, value: Vector) -> DeepClassifier:
        return self._set(initialWeights=value)

    def setMaxIter(self, value: int) -> DeepClassifier:
        return self._set(maxIter=value)

    def setSeed(self, value: int) -> DeepClassifier:
        return self._set(seed=value)

    def setTol(self, value: float) -> DeepClassifier:
        return self._set(tol=value)

    def setStepSize(self, value: float) -> DeepClassifier:
        return self._set(stepSize=value)

    def setSolver(self, value: str) -> DeepClassifier:
        return self._set(solver=value)

    def setTopology(self, value: str) -> DeepClassifier:
        return self._set(topology=value)

    def setInputShape(self, value: list[int]) -> DeepClassifier:
        return self._set(inputShape=value)

    def setBatchSize(self, value: int) -> DeepClassifier:
        return self._set(batchSize=value)

    def setEpochs(self, value: int) -> DeepClassifier:
        return self._set(epochs=value)

    def setRegParam(self, value: float) -> DeepClassifier:
        return self._set(regParam=value)

    def setBackend(self, value: str) -> DeepClassifier:
        return self._set(backend=value)

    def setMode(self, value: str) -> DeepClassifier:
        return self._set(mode=value)

    def setCheckpointDir(self, value: str) -> DeepClassifier:
        return self._set(checkpointDir=value)

    def setCheckpointInterval(self, value: int) -> DeepClassifier:
        return self._set(checkpointInterval=value)

    def setVerbose(self, value: bool) -> DeepClassifier:
        return self._set(verbose=value)

    def setMiniBatchFraction(self, value: float) -> DeepClassifier:
        return self._set(miniBatchFraction=value)

    def setMomentum(self, value: float) -> DeepClassifier:
        return self._set(momentum=value)

    def setNesterov(self, value: bool) -> DeepClassifier:
        return self._set(nesterov=value)

    def setBeta1(self, value: float) -> DeepClassifier:
        return self._set(beta1=value)

    def setBeta2(self, value: float) -> DeepClassifier:
        return self._set(beta2=value)

    def setEpsilon(self, value: float) -> DeepClassifier:
        return self._set(epsilon=value)

    def setLrSchedule(self, value: str) -> DeepClassifier:
        return self._set(lrSchedule=value)

    def setLrDecay(self, value: float) -> DeepClassifier:
        return self._set(lrDecay=value)

    def setLrDecaySteps(self, value: int) -> DeepClassifier:
        return self._set(lrDecaySteps=value)

    def setNumWorkers(self, value: int) -> DeepClassifier:
        return self._set(numWorkers=value)

    def setTaskGpus(self, value: int) -> DeepClassifier:
        return self._set(taskGpus=value)

    def setTaskCpus(self, value: int) -> DeepClassifier:
        return self._set(taskCpus=value)

    def setSyncEvery(self, value: int) -> DeepClassifier:
        return self._set(syncEvery=value)

    def setAllReduce(self, value: str) -> DeepClassifier:
        return self._set(allReduce=value)

    def setBalance(self, value: bool) -> DeepClassifier:
        return self._set(balance=value)

    def setValidationFraction(self, value: float) -> DeepClassifier:
        return self._set(validationFraction=value)

    def setPatience(self, value: int) -> DeepClassifier:
        return self._set(patience=value)

    def setCommTimeout(self, value: float) -> DeepClassifier:
        return self._set(commTimeout=value)

    def setDtype(self, value: str) -> DeepClassifier:
        return self._set(dtype=value)

    def _fit(self, dataset: DataFrame) -> DeepClassificationModel:
        from ..distributed.data import check_columns
        from ..distributed.fit import fit

        config = self._train_config()  # every invalid knob fails here, before any Spark job
        features, label = self.getFeaturesCol(), self.getLabelCol()
        size = None
        if self.getTopology() and not self.getInputShape() and not self.isDefined(self.layers):
            check_columns(dataset, features, label)
            size = _features_size(dataset, features)
            if size is None:
                raise ValueError(f"the DataFrame is empty: no rows in features column {features!r} to train on")
        topology = self._build_topology(size)
        initial = None
        if self.isDefined(self.initialWeights):
            initial = self.getInitialWeights().toArray()
            if initial.shape != (topology.num_weights,):
                raise ValueError(f"initialWeights has {initial.size} values but topology {topology.spec!r} with "
                                 f"input shape {list(topology.input_shape)} needs {topology.num_weights}")
        objective = self._objective(topology)  # plain, or distillation when a mentor is set
        result = fit(dataset, features, label, objective, config, initial)
        model = DeepClassificationModel(topology, objective.model_weights(result.weights),
                                        objectiveHistory=result.objectiveHistory, totalIterations=result.iterations)
        model._resetUid(self.uid)
        self._copyValues(model)
        model._set_topology(topology)
        model._training = (dataset, result.stats)
        return model


class DeepClassificationModel(ProbabilisticClassificationModel, _DeepClassifierParams, PersistentParams):
    """A trained network: ``transform`` adds rawPrediction, probability and prediction, like Spark's MLP model.

    Build one from weights directly with ``DeepClassificationModel(FeedForwardTopology..., weights)``.
    """

    _array_params = ("initialWeights",)

    def __init__(self, topology: FeedForwardTopology | None = None, weights: Any = None, *,
                 objectiveHistory: list[float] | None = None, totalIterations: int | None = None) -> None:
        super().__init__()
        self._topology: FeedForwardTopology | None = None
        self._weights = np.zeros(0)
        self._history = [float(v) for v in (objectiveHistory or [])]
        self._iterations = int(totalIterations if totalIterations is not None else len(self._history))
        self._training: tuple[DataFrame, dict] | None = None
        self._local: FeedForwardModel | None = None
        if topology is not None:
            self._set_topology(topology)
            self._set_weights(np.zeros(topology.num_weights) if weights is None else weights)

    def _set_topology(self, topology: FeedForwardTopology) -> None:
        self._topology = topology
        self._set(topology=topology.spec, inputShape=list(topology.input_shape))
        sizes = topology.mlp_sizes()
        if sizes is not None:
            self._set(layers=sizes)
        elif self.isSet(self.layers):
            self.clear(self.layers)

    def _set_weights(self, weights: Any) -> None:
        w = np.asarray(weights.toArray() if isinstance(weights, Vector) else weights, dtype=np.float64)
        n = self.network.num_weights
        if w.shape != (n,):
            raise ValueError(f"topology {self.network.spec!r} with input shape {list(self.network.input_shape)} "
                             f"has {n} weights, got {w.size} (shape {w.shape})")
        if not np.all(np.isfinite(w)):
            raise ValueError(f"weights must be finite; got {int(np.sum(~np.isfinite(w)))} NaN/inf values")
        self._weights = w
        self._local = None

    def setBackend(self, value: str) -> DeepClassificationModel:
        """The array backend ``transform`` uses on the executors."""
        return self._set(backend=value)

    def setDtype(self, value: str) -> DeepClassificationModel:
        """The floating-point type of ``transform`` (float64: Spark's MLP predictions to 1e-9)."""
        return self._set(dtype=value)

    # ---- what Spark's MLP model exposes ----
    @property
    def network(self) -> FeedForwardTopology:
        """The network's topology (the ``topology`` *param* holds its spec string)."""
        if self._topology is None:
            raise ValueError("this DeepClassificationModel has no topology yet")
        return self._topology

    @property
    def weights(self) -> DenseVector:
        """All weights in one flat vector (Spark's layout for MLPs)."""
        return DenseVector(self._weights)

    @property
    def numFeatures(self) -> int:
        return self.network.num_inputs

    @property
    def numClasses(self) -> int:
        return self.network.num_outputs

    @property
    def hasSummary(self) -> bool:
        return bool(self._history) or self._training is not None

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
    def _driver_model(self) -> FeedForwardModel:
        if self._local is None:
            self._local = FeedForwardModel(self.network, self._weights, dtype=np.float64)
        return self._local

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
        _check_features_column(dataset, feats)
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
        col = dataset[feats]
        x = vector_to_array(col, dtype) if isinstance(dataset.schema[feats].dataType, VectorUDT) \
            else col.cast(f"array<{'float' if dtype == 'float32' else 'double'}>")
        udf = _predict_udf(self.network.to_dict(), self._weights, dtype, backend, self._thresholds(),
                           feats)
        tmp = f"_{self.uid}_out"
        out = dataset.withColumn(tmp, udf(x))
        exprs = {"raw": array_to_vector(F.col(tmp)["raw"]), "prob": array_to_vector(F.col(tmp)["prob"]),
                 "pred": F.col(tmp)["pred"]}
        return out.select(*[F.col(f"`{c}`") for c in dataset.columns],
                          *[exprs[k].alias(c) for k, c in outputs.items()])

    # ---- interop with Spark's MultilayerPerceptronClassificationModel ----
    @classmethod
    def fromSpark(cls, model: Any) -> DeepClassificationModel:
        """The same network as a Spark ``MultilayerPerceptronClassificationModel`` (float64, so predictions agree
        with Spark's to 1e-9)."""
        from .interop import from_spark

        return from_spark(cls, model)

    def exportOnnx(self, path: str) -> None:
        """Write the network as an ONNX file (needs the 'onnx' extra): float32 feature rows in, probabilities out."""
        from ..nn.onnx_export import export_onnx

        export_onnx(self.network, self._weights, path)

    def toSpark(self) -> Any:
        """This model as a Spark ``MultilayerPerceptronClassificationModel`` (Spark MLP topologies only)."""
        from .interop import to_spark

        return to_spark(self)

    # ---- persistence ----
    def _state_metadata(self) -> dict[str, Any]:
        return {"numFeatures": self.numFeatures, "numClasses": self.numClasses,
                "numWeights": self.network.num_weights, "objectiveHistory": self._history,
                "totalIterations": self._iterations}

    def _state_arrays(self) -> dict[str, np.ndarray]:
        return {"weights": self._weights}

    def _restore_state(self, metadata: dict[str, Any], arrays: dict[str, np.ndarray], path: str) -> None:
        if "weights" not in arrays:
            raise ValueError(f"cannot load {type(self).__name__} from {path}: no weights array in the metadata")
        topology = self._build_topology(None)
        w = arrays["weights"]
        if w.shape != (topology.num_weights,) or int(metadata["numWeights"]) != topology.num_weights:
            raise ValueError(f"cannot load {type(self).__name__} from {path}: topology {topology.spec!r} has "
                             f"{topology.num_weights} weights, the saved weights have {w.size} (metadata says "
                             f"{metadata['numWeights']})")
        self._set_topology(topology)
        self._set_weights(w)
        self._history = [float(v) for v in metadata["objectiveHistory"]]
        self._iterations = int(metadata["totalIterations"])

    def copy(self, extra: dict | None = None) -> DeepClassificationModel:
        that = super().copy(extra)
        that._local = None
        return that

    def __repr__(self) -> str:
        spec = self._topology.spec if self._topology is not None else "?"
        return f"DeepClassificationModel: uid={self.uid}, topology={spec}, numWeights={self._weights.size}"


def _prediction(prob: np.ndarray, thresholds: np.ndarray | None) -> np.ndarray:
    """Spark's probability2prediction: argmax of probability / threshold (a zero threshold wins)."""
    if thresholds is None:
        return prob.argmax(axis=1).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = np.where(thresholds == 0.0, np.inf, prob / np.where(thresholds == 0.0, 1.0, thresholds))
    return scaled.argmax(axis=1).astype(np.float64)


def _predict_udf(topology: dict, weights: np.ndarray, dtype: str, backend: str, thresholds: np.ndarray | None,
                 features_col: str) -> Any:
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
            model = FeedForwardModel(topo, weights, dtype=np.dtype(dtype), backend=be)
            d, k = topo.num_inputs, topo.num_outputs
            for arr in batches:
                yield _predict_batch(model, arr, d, k, thresholds, features_col)

    return arrow_udf(predict, "raw array<double>, prob array<double>, pred double")


def _predict_batch(model: FeedForwardModel, arr: Any, d: int, k: int, thresholds: np.ndarray | None,
                   features_col: str) -> pa.Array:
    n = len(arr)
    if arr.null_count:
        raise ValueError(f"features column {features_col!r} has {arr.null_count} null rows")
    lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
    if n and np.any(lengths != d):
        raise ValueError(f"features column {features_col!r}: the model takes vectors of size {d}, "
                         f"got size {int(lengths[lengths != d][0])}")
    x = arr.flatten().to_numpy(zero_copy_only=False).reshape(n, d)
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
