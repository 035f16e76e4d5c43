"""Conversion to and from Spark ML's MultilayerPerceptronClassificationModel.

Both sides use the same flat weight layout (per affine layer: W numOut x numIn column-major, then b), so the weights
carry over unchanged. pyspark has no public constructor for the Spark model: it is built through the JVM with the
Scala constructor ``MultilayerPerceptronClassificationModel(uid, weights)`` and given its ``layers`` param.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from pyspark.ml.classification import MultilayerPerceptronClassificationModel
from pyspark.ml.common import _py2java
from pyspark.ml.linalg import DenseVector
from pyspark.sql import SparkSession

from ..nn.layers import SoftmaxCrossEntropy
from ..nn.topology import FeedForwardTopology

if TYPE_CHECKING:
    from .classifier import DeepClassificationModel

# params both models have with the same meaning (Spark's MLP validates solver: only l-bfgs and gd carry over)
_SHARED = ("featuresCol", "labelCol", "predictionCol", "probabilityCol", "rawPredictionCol", "thresholds",
           "maxIter", "tol", "stepSize", "blockSize", "seed", "solver")
_SPARK_SOLVERS = ("l-bfgs", "gd")


def from_spark(cls: type[DeepClassificationModel], model: Any) -> DeepClassificationModel:
    if not isinstance(model, MultilayerPerceptronClassificationModel):
        raise TypeError(f"fromSpark expects a pyspark MultilayerPerceptronClassificationModel, got {type(model)}")
    topology = FeedForwardTopology.multilayer_perceptron(model.getLayers())
    ours = cls(topology, model.weights.toArray())
    for name in _SHARED:
        if model.hasParam(name) and model.isSet(model.getParam(name)):
            ours._set(**{name: model.getOrDefault(name)})
    ours._set(dtype="float64")
    return ours


def to_spark(model: DeepClassificationModel) -> MultilayerPerceptronClassificationModel:
    topology = model.network
    sizes = topology.mlp_sizes()
    if sizes is None or not isinstance(topology.loss_layer, SoftmaxCrossEntropy):
        raise ValueError(f"toSpark needs a Spark MLP topology (flat input, affine layers with sigmoid between them, "
                         f"softmax on top); this model's topology is {topology.spec!r} with input shape "
                         f"{list(topology.input_shape)}")
    spark = SparkSession.getActiveSession()
    if spark is None:
        raise RuntimeError("toSpark needs an active SparkSession")
    jvm = spark.sparkContext._jvm
    jweights = _py2java(spark.sparkContext, DenseVector(np.asarray(model.weights.toArray(), dtype=np.float64)))
    jmodel = jvm.org.apache.spark.ml.classification.MultilayerPerceptronClassificationModel(model.uid, jweights)
    spark_model = MultilayerPerceptronClassificationModel(jmodel)
    values: dict[str, Any] = {"layers": sizes}
    for name in _SHARED:
        if model.isSet(model.getParam(name)) and (name != "solver" or model.getSolver() in _SPARK_SOLVERS):
            values[name] = model.getOrDefault(name)
    spark_model._set(**values)
    spark_model._transfer_params_to_java()
    return spark_model
