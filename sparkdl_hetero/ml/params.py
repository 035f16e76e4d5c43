"""The Params shared by the network estimators and their models (Spark ML conventions).

Spark's ``MultilayerPerceptronClassifier`` params keep their names, meanings and defaults; the extra params are the
knobs of :class:`~sparkdl_hetero.nn.config.TrainConfig` under the same names, with the knob's default, doc and type
(see :func:`_knob_param`). A fit builds a TrainConfig from the params, which checks every value: the checks live
there only. Every knob is a param except those in :data:`KNOBS_NOT_PARAMS`.
"""

from __future__ import annotations

from typing import Any

from pyspark.ml.param import Param, Params, TypeConverters
from pyspark.ml.param.shared import (
    HasBlockSize,
    HasMaxIter,
    HasRegParam,
    HasSeed,
    HasSolver,
    HasStepSize,
    HasTol,
    HasValidationIndicatorCol,
    HasWeightCol,
)

from ..nn.config import KNOBS, KNOBS_BY_NAME, TrainConfig
from ..nn.layers import LossLayer
from ..nn.topology import FeedForwardTopology

#: knobs that are not params: straggler is a benchmarking aid of the barrier mode (jobs/speedup.py), not a setting
#: of a model
KNOBS_NOT_PARAMS = ("straggler",)
#: knob params whose default is Spark's, not the knob's: Spark's seed defaults to a hash of the class name
SPARK_DEFAULT_PARAMS = ("seed",)

_CONVERTERS = {int: TypeConverters.toInt, float: TypeConverters.toFloat, bool: TypeConverters.toBoolean,
               str: TypeConverters.toString, list: TypeConverters.toListInt}


def _param(name: str, doc: str, converter: Any) -> Param:
    return Param(Params._dummy(), name, doc, typeConverter=converter)


def _knob_param(name: str) -> Param:
    """The param of the TrainConfig knob ``name``: the knob's doc and allowed values, a converter to its type."""
    k = KNOBS_BY_NAME[name]
    doc = k.doc if k.check is None else f"{k.doc} Must be {k.expected}."
    return _param(name, doc, _CONVERTERS[k.type])


class _DeepNetworkParams(HasSeed, HasMaxIter, HasTol, HasStepSize, HasSolver, HasBlockSize, HasRegParam,
                         HasWeightCol, HasValidationIndicatorCol):
    """Params of every network estimator and model (the feature, label and prediction column params come from
    pyspark's Predictor / PredictionModel bases). ``weightCol``: per-row weights in the loss, as Spark's
    classifiers define it (finite, >= 0; the loss is the weighted mean). ``validationIndicatorCol``: a boolean
    column whose true rows never train; the validation loss and metric after each epoch (mini-batch solvers; gd and
    l-bfgs: every ``validationInterval`` iterations) go to the summary's ``validationHistory`` and drive early
    stopping (``patience``)."""

    # ---- Spark's MLP params (same names, same meaning) ----
    layers: Param[list[int]] = _param(
        "layers", "Sizes of layers from input layer to output layer, e.g. [780, 100, 10]: a Spark MLP "
        "(sigmoid hidden layers, softmax output). Ignored when topology is set, except that layers[0] then gives "
        "the input size if inputShape is unset.", TypeConverters.toListInt)
    solver: Param[str] = _knob_param("solver")
    initialWeights: Param[Any] = _param("initialWeights", "The initial weights of the model (a flat vector in "
                                        "Spark's layout).", TypeConverters.toVector)
    blockSize: Param[int] = _knob_param("blockSize")  # overrides HasBlockSize's doc: training does not read it
    # ---- architecture ----
    topology: Param[str] = _param(
        "topology", "A layer spec, e.g. 'conv(6,5,pad=2)-relu-maxpool(2)-conv(16,5)-relu-maxpool(2)-flatten-"
        "affine(120)-relu-affine(84)-relu-affine(10)'; empty: the Spark MLP given by layers.", TypeConverters.toString)
    inputShape: Param[list[int]] = _param(
        "inputShape", "Input shape: [features] or [channels, height, width] (features in C,H,W order); empty: "
        "layers[0] or the size of the first feature vector.", TypeConverters.toListInt)
    # ---- mini-batch training and updaters ----
    batchSize: Param[int] = _knob_param("batchSize")
    miniBatchFraction: Param[float] = _knob_param("miniBatchFraction")
    epochs: Param[int] = _knob_param("epochs")
    momentum: Param[float] = _knob_param("momentum")
    nesterov: Param[bool] = _knob_param("nesterov")
    beta1: Param[float] = _knob_param("beta1")
    beta2: Param[float] = _knob_param("beta2")
    epsilon: Param[float] = _knob_param("epsilon")
    lrSchedule: Param[str] = _knob_param("lrSchedule")
    lrDecay: Param[float] = _knob_param("lrDecay")
    lrDecaySteps: Param[int] = _knob_param("lrDecaySteps")
    # ---- execution ----
    backend: Param[str] = _knob_param("backend")
    mode: Param[str] = _knob_param("mode")
    dtype: Param[str] = _knob_param("dtype")
    numWorkers: Param[int] = _knob_param("numWorkers")
    taskGpus: Param[int] = _knob_param("taskGpus")
    taskCpus: Param[int] = _knob_param("taskCpus")
    checkpointDir: Param[str] = _knob_param("checkpointDir")
    checkpointInterval: Param[int] = _knob_param("checkpointInterval")
    verbose: Param[bool] = _knob_param("verbose")
    # ---- barrier mode ----
    syncEvery: Param[int] = _knob_param("syncEvery")
    allReduce: Param[str] = _knob_param("allReduce")
    balance: Param[bool] = _knob_param("balance")
    validationFraction: Param[float] = _knob_param("validationFraction")
    patience: Param[int] = _knob_param("patience")
    validationInterval: Param[int] = _knob_param("validationInterval")
    commTimeout: Param[float] = _knob_param("commTimeout")
    # ---- federated mode ----
    deviceCol: Param[str] = _param("deviceCol", "Federated mode: the column (integer or string) whose value names the "
                                   "device a row belongs to.", TypeConverters.toString)
    rounds: Param[int] = _knob_param("rounds")
    clientFraction: Param[float] = _knob_param("clientFraction")
    localEpochs: Param[int] = _knob_param("localEpochs")
    federatedAlgorithm: Param[str] = _knob_param("federatedAlgorithm")
    cadKeep: Param[float] = _knob_param("cadKeep")
    cadLayers: Param[list[int]] = _knob_param("cadLayers")
    cadWarmupRounds: Param[int] = _knob_param("cadWarmupRounds")

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        # the knobs' defaults are Spark MLP's for its params (maxIter, tol, blockSize, stepSize, solver)
        self._setDefault(**{k.name: k.default for k in KNOBS
                            if k.name not in KNOBS_NOT_PARAMS + SPARK_DEFAULT_PARAMS}, topology="", inputShape=[],
                         deviceCol="device")

    def getLayers(self) -> list[int]:
        return self.getOrDefault(self.layers)

    def getInitialWeights(self) -> Any:
        return self.getOrDefault(self.initialWeights)

    def getTopology(self) -> str:
        return self.getOrDefault(self.topology)

    def getInputShape(self) -> list[int]:
        return self.getOrDefault(self.inputShape)

    def getBatchSize(self) -> int:
        return self.getOrDefault(self.batchSize)

    def getEpochs(self) -> int:
        return self.getOrDefault(self.epochs)

    def getBackend(self) -> str:
        return self.getOrDefault(self.backend)

    def getMode(self) -> str:
        return self.getOrDefault(self.mode)

    def getDtype(self) -> str:
        return self.getOrDefault(self.dtype)

    def getCheckpointDir(self) -> str:
        return self.getOrDefault(self.checkpointDir)

    def getCheckpointInterval(self) -> int:
        return self.getOrDefault(self.checkpointInterval)

    def getVerbose(self) -> bool:
        return self.getOrDefault(self.verbose)

    def getMiniBatchFraction(self) -> float:
        return self.getOrDefault(self.miniBatchFraction)

    def getMomentum(self) -> float:
        return self.getOrDefault(self.momentum)

    def getNesterov(self) -> bool:
        return self.getOrDefault(self.nesterov)

    def getBeta1(self) -> float:
        return self.getOrDefault(self.beta1)

    def getBeta2(self) -> float:
        return self.getOrDefault(self.beta2)

    def getEpsilon(self) -> float:
        return self.getOrDefault(self.epsilon)

    def getLrSchedule(self) -> str:
        return self.getOrDefault(self.lrSchedule)

    def getLrDecay(self) -> float:
        return self.getOrDefault(self.lrDecay)

    def getLrDecaySteps(self) -> int:
        return self.getOrDefault(self.lrDecaySteps)

    def getNumWorkers(self) -> int:
        return self.getOrDefault(self.numWorkers)

    def getTaskGpus(self) -> int:
        return self.getOrDefault(self.taskGpus)

    def getTaskCpus(self) -> int:
        return self.getOrDefault(self.taskCpus)

    def getSyncEvery(self) -> int:
        return self.getOrDefault(self.syncEvery)

    def getAllReduce(self) -> str:
        return self.getOrDefault(self.allReduce)

    def getBalance(self) -> bool:
        return self.getOrDefault(self.balance)

    def getValidationFraction(self) -> float:
        return self.getOrDefault(self.validationFraction)

    def getPatience(self) -> int:
        return self.getOrDefault(self.patience)

    def getValidationInterval(self) -> int:
        return self.getOrDefault(self.validationInterval)

    def getCommTimeout(self) -> float:
        return self.getOrDefault(self.commTimeout)

    def getDeviceCol(self) -> str:
        return self.getOrDefault(self.deviceCol)

    def getRounds(self) -> int:
        return self.getOrDefault(self.rounds)

    def getClientFraction(self) -> float:
        return self.getOrDefault(self.clientFraction)

    def getLocalEpochs(self) -> int:
        return self.getOrDefault(self.localEpochs)

    def getFederatedAlgorithm(self) -> str:
        return self.getOrDefault(self.federatedAlgorithm)

    def getCadKeep(self) -> float:
        return self.getOrDefault(self.cadKeep)

    def getCadLayers(self) -> list[int]:
        return list(self.getOrDefault(self.cadLayers))

    def getCadWarmupRounds(self) -> int:
        return self.getOrDefault(self.cadWarmupRounds)

    def _train_config(self) -> TrainConfig:
        """The TrainConfig these params describe (every knob that has a param of the same name); building it checks
        every value."""
        values = {k.name: self.getOrDefault(k.name) for k in KNOBS
                  if self.hasParam(k.name) and self.isDefined(self.getParam(k.name))}
        values["seed"] = int(values.get("seed", 0)) % (2 ** 63)  # Spark's default seed is a hash: may be negative
        return TrainConfig(**values)

    def _top_loss(self) -> LossLayer | None:
        """The loss layer put on top of a topology that does not end with one (None: softmax)."""
        return None

    def _build_topology(self, num_features: int | None) -> FeedForwardTopology:
        """The network these params describe; ``num_features`` (from the data) is used when nothing else says."""
        spec, shape = self.getTopology(), self.getInputShape()
        layers = self.getOrDefault(self.layers) if self.isDefined(self.layers) else None
        loss = self._top_loss()
        if not spec:
            if not layers:
                raise ValueError("set layers (Spark MLP sizes, e.g. [784, 100, 10]) or topology (a layer spec)")
            mlp = FeedForwardTopology.multilayer_perceptron(layers)
            return mlp if loss is None else FeedForwardTopology(mlp.layers[:-1], layers[0], loss)
        if not shape:
            shape = [layers[0]] if layers else [num_features] if num_features else []
        if not shape:
            raise ValueError(f"cannot tell the input shape of topology {spec!r}: set inputShape or layers")
        return FeedForwardTopology.from_spec(spec, shape, loss)


class _DeepClassifierParams(_DeepNetworkParams):
    """Params of :class:`DeepClassifier` and :class:`DeepClassificationModel` (the column and threshold params
    come from pyspark's ProbabilisticClassifier / ProbabilisticClassificationModel)."""
