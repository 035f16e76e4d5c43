"""The Params shared by DeepClassifier and DeepClassificationModel (Spark ML conventions).

Spark's ``MultilayerPerceptronClassifier`` params keep their names, meanings and defaults; the extra params are the
knobs of :class:`~sparkdl_hetero.distributed.config.TrainConfig` under the same names, with its defaults.
"""

from __future__ import annotations

import dataclasses
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
)

from ..distributed.config import MODES, SOLVERS, TrainConfig
from ..nn.topology import FeedForwardTopology

# Spark's MultilayerPerceptronClassifier defaults (its _MultilayerPerceptronParams.__init__).
SPARK_MLP_DEFAULTS: dict[str, Any] = {"maxIter": 100, "tol": 1e-6, "blockSize": 128, "stepSize": 0.03,
                                      "solver": "l-bfgs"}


def _param(name: str, doc: str, converter: Any) -> Param:
    return Param(Params._dummy(), name, doc, typeConverter=converter)


class _DeepClassifierParams(HasSeed, HasMaxIter, HasTol, HasStepSize, HasSolver,
                            HasBlockSize, HasRegParam):
    """Params of :class:`DeepClassifier` and :class:`DeepClassificationModel` (the column and threshold params
    come from pyspark's ProbabilisticClassifier / ProbabilisticClassificationModel)."""

    # ---- Spark's MLP params (same names, same meaning) ----
    layers: Param[list[int]] = _param(
        "layers", "Sizes of layers from input layer to output layer, e.g. [780, 100, 10]: a Spark MLP "
        "(sigmoid hidden layers, softmax output). Ignored when topology is set, except that layers[0] then gives "
        "the input size if inputShape is unset.", TypeConverters.toListInt)
    solver: Param[str] = _param(
        "solver", f"The optimization algorithm. Supported options: {', '.join(SOLVERS)}.", TypeConverters.toString)
    initialWeights: Param[Any] = _param("initialWeights", "The initial weights of the model (a flat vector in "
                                        "Spark's layout).", TypeConverters.toVector)
    # ---- architecture ----
    topology: Param[str] = _param(
        "topology", "A layer spec, e.g. 'conv(6,5,pad=2)-relu-maxpool(2)-conv(16,5)-relu-maxpool(2)-flatten-"
        "affine(120)-relu-affine(84)-relu-affine(10)'; empty: the Spark MLP given by layers.", TypeConverters.toString)
    inputShape: Param[list[int]] = _param(
        "inputShape", "Input shape: [features] or [channels, height, width] (features in C,H,W order); empty: "
        "layers[0] or the size of the first feature vector.", TypeConverters.toListInt)
    # ---- mini-batch training and updaters ----
    batchSize: Param[int] = _param("batchSize", "Global mini-batch size for sgd, momentum and adam.",
                                   TypeConverters.toInt)
    miniBatchFraction: Param[float] = _param("miniBatchFraction", "gd: fraction of the rows sampled per "
                                             "iteration (Spark's GradientDescent), in (0, 1].",
                                             TypeConverters.toFloat)
    epochs: Param[int] = _param("epochs", "Passes over the data for mini-batch solvers (0: maxIter).",
                                TypeConverters.toInt)
    momentum: Param[float] = _param("momentum", "Momentum coefficient (solver momentum).", TypeConverters.toFloat)
    nesterov: Param[bool] = _param("nesterov", "Nesterov momentum (solver momentum).", TypeConverters.toBoolean)
    beta1: Param[float] = _param("beta1", "Adam's first-moment decay.", TypeConverters.toFloat)
    beta2: Param[float] = _param("beta2", "Adam's second-moment decay.", TypeConverters.toFloat)
    epsilon: Param[float] = _param("epsilon", "Adam's denominator epsilon.", TypeConverters.toFloat)
    lrSchedule: Param[str] = _param("lrSchedule", "Learning-rate schedule: constant, step or cosine.",
                                    TypeConverters.toString)
    lrDecay: Param[float] = _param("lrDecay", "Step schedule: factor applied every lrDecaySteps steps.",
                                   TypeConverters.toFloat)
    lrDecaySteps: Param[int] = _param("lrDecaySteps", "Step schedule: steps between decays.", TypeConverters.toInt)
    # ---- execution ----
    backend: Param[str] = _param("backend", "Array backend on executors: numpy, opencl, cupy or auto.",
                                 TypeConverters.toString)
    mode: Param[str] = _param("mode", f"Distributed training mode: {', '.join(MODES)}.", TypeConverters.toString)
    dtype: Param[str] = _param("dtype", "Floating-point type of training and prediction: float32 or float64.",
                               TypeConverters.toString)
    numWorkers: Param[int] = _param("numWorkers", "Barrier mode: number of workers (0: one per partition).",
                                    TypeConverters.toInt)
    checkpointDir: Param[str] = _param(
        "checkpointDir", "Directory for training checkpoints; a fit with the same directory resumes from the last "
        "checkpoint. Empty: no checkpoints.", TypeConverters.toString)
    checkpointInterval: Param[int] = _param("checkpointInterval", "Iterations between checkpoints.",
                                            TypeConverters.toInt)
    verbose: Param[bool] = _param("verbose", "Show a progress bar on the driver.", TypeConverters.toBoolean)
    # ---- barrier mode ----
    syncEvery: Param[int] = _param("syncEvery", "Barrier mode: local steps between all-reduces.",
                                   TypeConverters.toInt)
    allReduce: Param[str] = _param("allReduce", "Barrier mode: all-reduce transport: auto, hub or ring.",
                                   TypeConverters.toString)
    balance: Param[bool] = _param("balance", "Barrier mode: per-worker batch shares matched to each worker's "
                                  "speed.", TypeConverters.toBoolean)
    validationFraction: Param[float] = _param("validationFraction", "Fraction held out for early stopping "
                                              "(0: off).", TypeConverters.toFloat)
    patience: Param[int] = _param("patience", "Early stopping: evaluations without improvement before stopping.",
                                  TypeConverters.toInt)
    commTimeout: Param[float] = _param("commTimeout", "Barrier mode: seconds before a silent peer is an error.",
                                       TypeConverters.toFloat)

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)
                    if f.default is not dataclasses.MISSING and self.hasParam(f.name) and f.name != "seed"}
        self._setDefault(**defaults)
        self._setDefault(**SPARK_MLP_DEFAULTS, topology="", inputShape=[])

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

    def getCommTimeout(self) -> float:
        return self.getOrDefault(self.commTimeout)

    def _train_config(self) -> TrainConfig:
        """The TrainConfig these params describe (every TrainConfig field that has a param of the same name)."""
        values = {f.name: self.getOrDefault(f.name) for f in dataclasses.fields(TrainConfig)
                  if self.hasParam(f.name) and self.isDefined(self.getParam(f.name))}
        values["seed"] = int(values.get("seed", 0)) % (2 ** 63)  # Spark's default seed is a hash: may be negative
        return TrainConfig(**values)

    def _build_topology(self, num_features: int | None) -> FeedForwardTopology:
        """The network these params describe; ``num_features`` (from the data) is used when nothing else says."""
        spec, shape = self.getTopology(), self.getInputShape()
        layers = self.getOrDefault(self.layers) if self.isDefined(self.layers) else None
        if not spec:
            if not layers:
                raise ValueError("set layers (Spark MLP sizes, e.g. [784, 100, 10]) or topology (a layer spec)")
            return FeedForwardTopology.multilayer_perceptron(layers)
        if not shape:
            shape = [layers[0]] if layers else [num_features] if num_features else []
        if not shape:
            raise ValueError(f"cannot tell the input shape of topology {spec!r}: set inputShape or layers")
        return FeedForwardTopology.from_spec(spec, shape)
