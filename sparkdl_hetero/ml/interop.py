"""Conversion to and from Spark ML's MultilayerPerceptronClassificationModel.

Both sides use the same flat weight layout (per affine layer: W numOut x numIn column-major, then b), so the weights
carry over unchanged. pyspark has no public constructor for the Spark model, and the JVM gateway does not exist under
Spark Connect: ``toSpark`` writes the model in Spark ML's own on-disk format (metadata JSON + Parquet ``weights``)
to a temporary directory and loads it with ``MultilayerPerceptronClassificationModel.load``, which works from a
classic and from a Connect session. ``fromSpark`` reads ``weights`` and ``getLayers()``, public in both kinds.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from typing import TYPE_CHECKING, Any

import numpy as np
from pyspark.ml.classification import MultilayerPerceptronClassificationModel
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
_SPARK_CLASS = "org.apache.spark.ml.classification.MultilayerPerceptronClassificationModel"
#: Spark conf naming a directory every node of the cluster reaches (HDFS, S3, NFS) for toSpark's hand-over files;
#: the default, the driver's temporary directory, serves local and single-machine sessions
TMP_DIR_CONF = "spark.sparkdl_hetero.tmpDir"


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
    params: dict[str, Any] = {"layers": sizes}
    for name in _SHARED:
        if model.isSet(model.getParam(name)) and (name != "solver" or model.getSolver() in _SPARK_SOLVERS):
            params[name] = model.getOrDefault(name)
    metadata = {"class": _SPARK_CLASS, "timestamp": int(time.time() * 1000), "sparkVersion": spark.version,
                "uid": model.uid, "paramMap": params, "defaultParamMap": {}}
    weights = DenseVector(np.asarray(model.weights.toArray(), dtype=np.float64))
    base = spark.conf.get(TMP_DIR_CONF, None) or tempfile.gettempdir()
    path = os.path.join(base, f"sparkdl-hetero-tospark-{uuid.uuid4().hex}")
    try:
        spark.createDataFrame([(json.dumps(metadata),)], schema="value string").coalesce(1) \
            .write.text(os.path.join(path, "metadata"))
        spark.createDataFrame([(weights,)], ["weights"]).coalesce(1).write.parquet(os.path.join(path, "data"))
        return MultilayerPerceptronClassificationModel.load(path)
    finally:
        # the load has read the weights; a directory on a cluster file system is left to that system's cleanup
        shutil.rmtree(path, ignore_errors=True)
