"""What DeepClassifier and DeepRegressor (and their models) share: the estimator's setters and fit, the trained
network's state (topology, weights, BN statistics, history), its persistence, ONNX export and the executors'
feature batches."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow.compute as pc
from pyspark.ml.functions import vector_to_array
from pyspark.ml.linalg import Vector, VectorUDT
from pyspark.sql import Column, DataFrame
from pyspark.sql.types import ArrayType, NumericType

from ..nn.model import FeedForwardModel
from ..nn.topology import FeedForwardTopology


def features_size(dataset: DataFrame, col: str) -> int | None:
    """The length of the first feature vector (None when the DataFrame is empty)."""
    row = dataset.select(col).first()
    if row is None or row[0] is None:
        return None
    return int(row[0].size) if isinstance(row[0], Vector) else len(row[0])


def check_features_column(dataset: DataFrame, col: str) -> None:
    """Transform's input check (training input is checked by distributed.data)."""
    if col not in dataset.columns:
        raise ValueError(f"features column {col!r} not found; the DataFrame has columns {dataset.columns}")
    dt = dataset.schema[col].dataType
    if not (isinstance(dt, VectorUDT) or (isinstance(dt, ArrayType) and isinstance(dt.elementType, NumericType))):
        raise ValueError(f"features column {col!r} must be a Vector or an array of numbers, got {dt.simpleString()}")


def features_array(dataset: DataFrame, col: str, dtype: str) -> Column:
    """The features column as an array of ``dtype`` floats, what the prediction UDFs read."""
    c = dataset[col]
    if isinstance(dataset.schema[col].dataType, VectorUDT):
        return vector_to_array(c, dtype)
    return c.cast(f"array<{'float' if dtype == 'float32' else 'double'}>")


def features_matrix(arr: Any, d: int, features_col: str) -> np.ndarray:
    """An Arrow list array of feature rows as an (n, d) matrix; ValueError on null rows or a wrong size."""
    n = len(arr)
    if arr.null_count:
        raise ValueError(f"features column {features_col!r} has {arr.null_count} null rows")
    lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
    if n and np.any(lengths != d):
        raise ValueError(f"features column {features_col!r}: the model takes vectors of size {d}, "
                         f"got size {int(lengths[lengths != d][0])}")
    return arr.flatten().to_numpy(zero_copy_only=False).reshape(n, d)


class NetworkSetters:
    """The setters of the training params every network estimator has (Spark MLP's, then ours); setting a param
    the estimator does not have is a TypeError naming it. Listed first among an estimator's bases."""

    def _set(self, **kwargs: Any) -> Any:
        unknown = [k for k in kwargs if not self.hasParam(k)]  # type: ignore[attr-defined]
        if unknown:
            raise TypeError(f"{type(self).__name__} has no param {', '.join(map(repr, unknown))}")
        return super()._set(**kwargs)  # type: ignore[misc]

    def setLayers(self, value: list[int]) -> Any:
        return self._set(layers=value)

    def setBlockSize(self, value: int) -> Any:
        return self._set(blockSize=value)

    def setInitialWeights(self, value: Vector) -> Any:
        return self._set(initialWeights=value)

    def setMaxIter(self, value: int) -> Any:
        return self._set(maxIter=value)

    def setSeed(self, value: int) -> Any:
        return self._set(seed=value)

    def setTol(self, value: float) -> Any:
        return self._set(tol=value)

    def setStepSize(self, value: float) -> Any:
        return self._set(stepSize=value)

    def setSolver(self, value: str) -> Any:
        return self._set(solver=value)

    def setTopology(self, value: str) -> Any:
        return self._set(topology=value)

    def setInputShape(self, value: list[int]) -> Any:
        return self._set(inputShape=value)

    def setBatchSize(self, value: int) -> Any:
        return self._set(batchSize=value)

    def setEpochs(self, value: int) -> Any:
        return self._set(epochs=value)

    def setRegParam(self, value: float) -> Any:
        return self._set(regParam=value)

    def setBackend(self, value: str) -> Any:
        return self._set(backend=value)

    def setMode(self, value: str) -> Any:
        return self._set(mode=value)

    def setCheckpointDir(self, value: str) -> Any:
        return self._set(checkpointDir=value)

    def setCheckpointInterval(self, value: int) -> Any:
        return self._set(checkpointInterval=value)

    def setVerbose(self, value: bool) -> Any:
        return self._set(verbose=value)

    def setMiniBatchFraction(self, value: float) -> Any:
        return self._set(miniBatchFraction=value)

    def setMomentum(self, value: float) -> Any:
        return self._set(momentum=value)

    def setNesterov(self, value: bool) -> Any:
        return self._set(nesterov=value)

    def setBeta1(self, value: float) -> Any:
        return self._set(beta1=value)

    def setBeta2(self, value: float) -> Any:
        return self._set(beta2=value)

    def setEpsilon(self, value: float) -> Any:
        return self._set(epsilon=value)

    def setLrSchedule(self, value: str) -> Any:
        return self._set(lrSchedule=value)

    def setLrDecay(self, value: float) -> Any:
        return self._set(lrDecay=value)

    def setLrDecaySteps(self, value: int) -> Any:
        return self._set(lrDecaySteps=value)

    def setNumWorkers(self, value: int) -> Any:
        return self._set(numWorkers=value)

    def setTaskGpus(self, value: int) -> Any:
        return self._set(taskGpus=value)

    def setTaskCpus(self, value: int) -> Any:
        return self._set(taskCpus=value)

    def setSyncEvery(self, value: int) -> Any:
        return self._set(syncEvery=value)

    def setAllReduce(self, value: str) -> Any:
        return self._set(allReduce=value)

    def setBalance(self, value: bool) -> Any:
        return self._set(balance=value)

    def setValidationFraction(self, value: float) -> Any:
        return self._set(validationFraction=value)

    def setPatience(self, value: int) -> Any:
        return self._set(patience=value)

    def setValidationInterval(self, value: int) -> Any:
        return self._set(validationInterval=value)

    def setCommTimeout(self, value: float) -> Any:
        return self._set(commTimeout=value)

    def setDtype(self, value: str) -> Any:
        return self._set(dtype=value)

    def setWeightCol(self, value: str) -> Any:
        return self._set(weightCol=value)

    def setValidationIndicatorCol(self, value: str) -> Any:
        return self._set(validationIndicatorCol=value)

    def setDeviceCol(self, value: str) -> Any:
        return self._set(deviceCol=value)

    def setRounds(self, value: int) -> Any:
        return self._set(rounds=value)

    def setClientFraction(self, value: float) -> Any:
        return self._set(clientFraction=value)

    def setLocalEpochs(self, value: int) -> Any:
        return self._set(localEpochs=value)

    def setFederatedAlgorithm(self, value: str) -> Any:
        return self._set(federatedAlgorithm=value)

    def setCadKeep(self, value: float) -> Any:
        return self._set(cadKeep=value)

    def setCadLayers(self, value: list[int]) -> Any:
        return self._set(cadLayers=value)

    def setCadWarmupRounds(self, value: int) -> Any:
        return self._set(cadWarmupRounds=value)


def fit_network(estimator: Any, dataset: DataFrame, model_class: type, objective_of: Any = None, *,
                regression: bool = False, check: Any = None) -> Any:
    """An estimator's fit: its TrainConfig (every invalid knob fails first), the topology (the input size from
    the data when nothing else says), the initial weights, the objective (``objective_of(topology)``, default the
    plain one), :func:`~sparkdl_hetero.distributed.fit.fit` with the estimator's weight and validation indicator
    columns, then the ``model_class`` model (the estimator's uid and params, the training summary), logged to the
    active MLflow run if there is one (:mod:`.tracking`). ``check(topology)`` runs before any Spark job over the
    data."""
    from ..distributed.data import check_columns
    from ..distributed.fit import fit
    from ..nn.objective import Objective
    from .tracking import log_fit

    config = estimator._train_config()
    features, label = estimator.getFeaturesCol(), estimator.getLabelCol()
    weight_col, validation_col = (estimator.getOrDefault(p) if estimator.isDefined(p) else ""
                                  for p in ("weightCol", "validationIndicatorCol"))
    size = None
    if estimator.getTopology() and not estimator.getInputShape() and not estimator.isDefined(estimator.layers):
        check_columns(dataset, features, label, regression=regression, weight_col=weight_col,
                      validation_col=validation_col)
        size = features_size(dataset, features)
        if size is None:
            raise ValueError(f"the DataFrame is empty: no rows in features column {features!r} to train on")
    topology = estimator._build_topology(size)
    if check is not None:
        check(topology)
    initial = None
    if estimator.isDefined(estimator.initialWeights):
        initial = estimator.getInitialWeights().toArray()
        if initial.shape != (topology.num_weights,):
            raise ValueError(f"initialWeights has {initial.size} values but topology {topology.spec!r} with "
                             f"input shape {list(topology.input_shape)} needs {topology.num_weights}")
    objective = Objective(topology) if objective_of is None else objective_of(topology)
    if topology.num_state and config.mode == "federated":
        raise ValueError(f"topology {topology.spec!r} has batch normalization, whose running statistics the "
                         f"federated mode does not merge yet; use mode='barrier' or drop the batchnorm layers")
    if topology.num_state and type(objective) is not Objective:
        raise ValueError(f"topology {topology.spec!r} has batch normalization, whose running statistics a mentor's "
                         f"distillation does not train yet; drop the mentor or the batchnorm layers")
    result = fit(dataset, features, label, objective, config, initial, regression=regression,
                 weight_col=weight_col, validation_col=validation_col, device_col=estimator.getDeviceCol())
    if result.state.shape != (topology.num_state,):
        raise RuntimeError(f"mode {config.mode!r} returned {result.state.size} model state values, topology "
                           f"{topology.spec!r} has {topology.num_state}")
    model = model_class(topology, objective.model_weights(result.weights), state=result.state,
                        objectiveHistory=result.objectiveHistory, totalIterations=result.iterations)
    model._resetUid(estimator.uid)
    estimator._copyValues(model)
    model._set_topology(topology)
    model._training = (dataset, result.stats)
    log_fit(estimator, model, "validationRMSE" if regression else "validationAccuracy")
    return model


class NetworkModel:
    """The state of a trained network model -- topology, flat weights, the non-trained model state (batch
    normalization's running statistics, see :attr:`state`), objective history -- with its checks,
    persistence (see :mod:`.persistence`), ONNX export and a float64 driver-side engine model for single rows.
    Subclasses name their outputs in the saved metadata (:meth:`_output_metadata`). First among a model's bases:
    its members implement pyspark's abstract ones (numFeatures)."""

    _array_params = ("initialWeights",)
    _set: Any
    isSet: Any
    clear: Any
    layers: Any

    def _init_network(self, topology: FeedForwardTopology | None, weights: Any,
                      objectiveHistory: list[float] | None, totalIterations: int | None,
                      state: Any = None) -> None:
        self._topology: FeedForwardTopology | None = None
        self._weights = np.zeros(0)
        self._state = np.zeros(0)
        self._history = [float(v) for v in (objectiveHistory or [])]
        self._iterations = int(totalIterations if totalIterations is not None else len(self._history))
        self._training: tuple[DataFrame, dict] | None = None
        self._local: FeedForwardModel | None = None
        if topology is not None:
            self._set_topology(topology)
            self._set_weights(np.zeros(topology.num_weights) if weights is None else weights)
            self._set_state(FeedForwardModel.initial_state(topology) if state is None else state)

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

    def _set_state(self, state: Any) -> None:
        s = np.asarray(state.toArray() if isinstance(state, Vector) else state, dtype=np.float64)
        n = self.network.num_state
        if s.shape != (n,):
            raise ValueError(f"topology {self.network.spec!r} with input shape {list(self.network.input_shape)} "
                             f"has {n} state values (batch normalization statistics), got {s.size} (shape {s.shape})")
        if not np.all(np.isfinite(s)):
            raise ValueError(f"state must be finite; got {int(np.sum(~np.isfinite(s)))} NaN/inf values")
        self._state = s
        self._local = None

    def setBackend(self, value: str) -> Any:
        """The array backend ``transform`` uses on the executors."""
        return self._set(backend=value)

    def setDtype(self, value: str) -> Any:
        """The floating-point type of ``transform`` (float64: Spark's MLP predictions to 1e-9)."""
        return self._set(dtype=value)

    @property
    def network(self) -> FeedForwardTopology:
        """The network's topology (the ``topology`` *param* holds its spec string)."""
        if self._topology is None:
            raise ValueError(f"this {type(self).__name__} has no topology yet")
        return self._topology

    @property
    def weights(self) -> Any:
        """All weights in one flat vector (Spark's layout for MLPs)."""
        from pyspark.ml.linalg import DenseVector

        return DenseVector(self._weights)

    @property
    def state(self) -> np.ndarray:
        """The non-trained model state: batch normalization's running means and variances in layer order (the
        topology's ``state_offsets``), which ``transform`` uses; empty when no layer has state."""
        return self._state.copy()

    @property
    def numFeatures(self) -> int:
        return self.network.num_inputs

    @property
    def hasSummary(self) -> bool:
        return bool(self._history) or self._training is not None

    def _driver_model(self) -> FeedForwardModel:
        if self._local is None:
            self._local = FeedForwardModel(self.network, self._weights, dtype=np.float64, state=self._state)
        return self._local

    def exportOnnx(self, path: str) -> None:
        """Write the network as an ONNX file (needs the 'onnx' extra): float32 feature rows in, the loss layer's
        output (probabilities, or the regression outputs) out."""
        from ..nn.onnx_export import export_onnx

        export_onnx(self.network, self._weights, path, state=self._state)

    # ---- persistence ----
    def _output_metadata(self) -> dict[str, Any]:
        """The saved metadata naming the model's outputs (e.g. numClasses)."""
        return {}

    def _state_metadata(self) -> dict[str, Any]:
        return {"numFeatures": self.numFeatures, **self._output_metadata(),
                "numWeights": self.network.num_weights, "objectiveHistory": self._history,
                "totalIterations": self._iterations}

    def _state_arrays(self) -> dict[str, np.ndarray]:
        return {"weights": self._weights, "state": self._state}

    def _restore_state(self, metadata: dict[str, Any], arrays: dict[str, np.ndarray], path: str) -> None:
        if "weights" not in arrays:
            raise ValueError(f"cannot load {type(self).__name__} from {path}: no weights array in the metadata")
        topology = self._build_topology(None)  # type: ignore[attr-defined]
        w = arrays["weights"]
        if w.shape != (topology.num_weights,) or int(metadata["numWeights"]) != topology.num_weights:
            raise ValueError(f"cannot load {type(self).__name__} from {path}: topology {topology.spec!r} has "
                             f"{topology.num_weights} weights, the saved weights have {w.size} (metadata says "
                             f"{metadata['numWeights']})")
        if "state" not in arrays and topology.num_state:  # a save from before the model had state
            raise ValueError(f"cannot load {type(self).__name__} from {path}: topology {topology.spec!r} has "
                             f"{topology.num_state} state values (batch normalization statistics) but the save has "
                             f"no state array; it was saved by a version that did not keep them: retrain the model")
        self._set_topology(topology)
        self._set_weights(w)
        self._set_state(arrays.get("state", FeedForwardModel.initial_state(topology)))
        self._history = [float(v) for v in metadata["objectiveHistory"]]
        self._iterations = int(metadata["totalIterations"])

    def copy(self, extra: dict | None = None) -> Any:
        that = super().copy(extra)  # type: ignore[misc]
        that._local = None
        return that

    def __repr__(self) -> str:
        spec = self._topology.spec if self._topology is not None else "?"
        return f"{type(self).__name__}: uid={self.uid}, topology={spec}, numWeights={self._weights.size}"  # type: ignore[attr-defined]
