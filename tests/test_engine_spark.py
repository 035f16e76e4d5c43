"""The engine against real Spark ML: a trained MultilayerPerceptronClassificationModel's weights give the same
probabilities; Spark's own ann topology (softmaxOnTop=false, its initialization) agrees with ours.

pyspark's Python API has no ``softmaxOnTop`` param, so Spark's sigmoid-on-top topology is reached through the
JVM (``org.apache.spark.ml.ann.FeedForwardTopology``, public in bytecode) over py4j.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from sparkdl_hetero.nn import FeedForwardModel, FeedForwardTopology

LAYERS = [4, 5, 4, 3]


@pytest.fixture(scope="module")
def spark_mlp(spark, spark_data_dir):
    from pyspark.ml.classification import MultilayerPerceptronClassifier

    df = spark.read.format("libsvm").load(os.path.join(spark_data_dir, "sample_multiclass_classification_data.txt"))
    model = MultilayerPerceptronClassifier(layers=LAYERS, maxIter=25, seed=11, blockSize=32).fit(df)
    return model, df


def _java(spark, values, kind):
    gw = spark.sparkContext._gateway
    arr = gw.new_array(getattr(spark._jvm, kind), len(values))
    for i, v in enumerate(values):
        arr[i] = v
    return arr


def _java_vector(spark, values):
    return spark._jvm.org.apache.spark.ml.linalg.Vectors.dense(_java(spark, [float(v) for v in values], "double"))


def test_spark_model_probabilities_match(spark_mlp):
    model, df = spark_mlp
    assert model.getLayers() == LAYERS
    w = model.weights.toArray()
    ours = FeedForwardModel(FeedForwardTopology.multilayer_perceptron(LAYERS), w, dtype=np.float64)
    assert ours.num_weights == w.size == 64
    rows = model.transform(df).select("features", "rawPrediction", "probability", "prediction").collect()
    x = np.array([r.features.toArray() for r in rows])
    spark_prob = np.array([r.probability.toArray() for r in rows])
    spark_raw = np.array([r.rawPrediction.toArray() for r in rows])
    # trained for real: the probabilities are far from uniform
    assert spark_prob.max(axis=1).mean() > 0.6
    np.testing.assert_allclose(ours.predict(x), spark_prob, rtol=0, atol=1e-9)
    np.testing.assert_allclose(ours.predict_raw(x), spark_raw, rtol=0, atol=1e-9)
    np.testing.assert_array_equal(ours.predict(x).argmax(axis=1), [r.prediction for r in rows])


def test_sigmoid_on_top_matches_spark_ann(spark, spark_mlp):
    model, _ = spark_mlp
    w = model.weights.toArray()
    jvm = spark._jvm
    topo = jvm.org.apache.spark.ml.ann.FeedForwardTopology.multiLayerPerceptron(_java(spark, LAYERS, "int"), False)
    spark_model = topo.model(_java_vector(spark, w))
    ours = FeedForwardModel(FeedForwardTopology.multilayer_perceptron(LAYERS, softmax_on_top=False), w,
                            dtype=np.float64)
    x = np.random.default_rng(0).normal(size=(6, 4))
    expected = np.array([list(spark_model.predict(_java_vector(spark, row)).toArray()) for row in x])
    got = ours.predict(x)
    assert not np.allclose(got.sum(axis=1), 1.0)  # sigmoid outputs, not a softmax
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


def test_initialization_bounds_match_spark(spark):
    sizes = [30, 20, 5]
    jvm = spark._jvm
    topo = jvm.org.apache.spark.ml.ann.FeedForwardTopology.multiLayerPerceptron(_java(spark, sizes, "int"), True)
    spark_w = np.array(list(topo.model(7).weights().toArray()))
    ours = FeedForwardTopology.multilayer_perceptron(sizes)
    assert spark_w.size == ours.num_weights
    our_w = FeedForwardModel(ours, seed=7, dtype=np.float64).get_weights()
    for layer, n_in in ((0, 30), (2, 20)):
        lo, hi = ours.offsets[layer], ours.offsets[layer + 1]
        bound = 2.4 / np.sqrt(n_in)
        for w in (spark_w[lo:hi], our_w[lo:hi]):
            assert np.abs(w).max() <= bound and np.abs(w).max() > 0.8 * bound
