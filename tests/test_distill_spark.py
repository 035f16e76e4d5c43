"""Mentor-guided training through DeepClassifier on Spark: both training modes, a Spark MLP mentor, the
mentor left untouched, plain training as the alpha=1 special case, errors, persistence."""

from __future__ import annotations

import os

import numpy as np
import pytest
from pyspark.ml.classification import MultilayerPerceptronClassifier

from sparkdl_hetero.ml.classifier import DeepClassificationModel, DeepClassifier
from sparkdl_hetero.nn import FeedForwardTopology
from sparkdl_hetero.nn.distill import DistillationObjective

MENTEE = [4, 3, 3]  # 27 weights


@pytest.fixture(scope="module")
def iris(spark, spark_data_dir):
    """Spark's sample_multiclass_classification_data.txt: 150 rows, 4 features, 3 classes, in 2 partitions."""
    path = os.path.join(spark_data_dir, "sample_multiclass_classification_data.txt")
    return spark.read.format("libsvm").load(path).repartition(2).cache()


@pytest.fixture(scope="module")
def mentor(iris) -> DeepClassificationModel:
    return DeepClassifier(layers=[4, 10, 3], maxIter=60, seed=1, verbose=False).fit(iris)


def _accuracy(model, df) -> float:
    rows = model.transform(df).select("label", "prediction").collect()
    return float(np.mean([r.label == r.prediction for r in rows]))


@pytest.mark.parametrize("mode, extra", [
    ("treeAggregate", dict(solver="l-bfgs", maxIter=30)),
    ("barrier", dict(solver="adam", stepSize=0.05, batchSize=16, epochs=8, numWorkers=2)),
])
def test_mentored_fit_in_both_modes(iris, mentor, mode: str, extra: dict) -> None:
    frozen = mentor.weights.toArray().copy()
    clf = DeepClassifier(layers=MENTEE, seed=3, mode=mode, verbose=False, mentor=mentor, distillAlpha=0.5,
                         temperature=2.0, hintLayers=[[1, 1]], hintWeights=[0.3], **extra)
    model = clf.fit(iris)
    # the adapter (3 -> 10) was trained beside the mentee and dropped from the model
    assert model.weights.size == FeedForwardTopology.multilayer_perceptron(MENTEE).num_weights == 27
    assert model.getLayers() == MENTEE
    np.testing.assert_array_equal(mentor.weights.toArray(), frozen)  # the mentor is never updated
    history = model.summary.objectiveHistory
    assert all(np.isfinite(history)) and history[-1] < history[0]
    assert _accuracy(model, iris) > 0.8


def test_alpha_one_without_hints_fits_like_plain_training(iris, mentor) -> None:
    common = dict(layers=MENTEE, seed=5, maxIter=8, verbose=False)
    plain = DeepClassifier(**common).fit(iris)
    guided = DeepClassifier(mentor=mentor, distillAlpha=1.0, **common).fit(iris)
    np.testing.assert_allclose(guided.weights.toArray(), plain.weights.toArray(), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(guided.summary.objectiveHistory, plain.summary.objectiveHistory, rtol=1e-6)


def test_spark_mlp_model_as_mentor(iris) -> None:
    spark_mentor = MultilayerPerceptronClassifier(layers=[4, 6, 3], maxIter=30, seed=7).fit(iris)
    clf = DeepClassifier(layers=MENTEE, seed=2, maxIter=5, verbose=False, mentor=spark_mentor, distillAlpha=0.2)
    objective = clf._objective(FeedForwardTopology.multilayer_perceptron(MENTEE))
    assert isinstance(objective, DistillationObjective)
    np.testing.assert_array_equal(objective.mentor_weights, spark_mentor.weights.toArray())
    assert objective.mentor_topology.mlp_sizes() == [4, 6, 3]
    assert objective.alpha == 0.2
    assert clf.fit(iris).weights.size == 27


def test_defaults_and_no_mentor_means_plain_objective() -> None:
    clf = DeepClassifier(layers=MENTEE)
    assert (clf.getDistillAlpha(), clf.getTemperature(), clf.getHintLayers(), clf.getHintWeights()) == \
        (0.5, 2.0, [], [])
    assert type(clf._objective(FeedForwardTopology.multilayer_perceptron(MENTEE))).__name__ == "Objective"
    clf.setMentor(None)
    assert type(clf._objective(FeedForwardTopology.multilayer_perceptron(MENTEE))).__name__ == "Objective"


def test_bad_mentor_settings_fail_before_training(iris, mentor) -> None:
    other = DeepClassificationModel(FeedForwardTopology.multilayer_perceptron([4, 2]), np.zeros(10))
    with pytest.raises(ValueError, match="the mentor predicts 2 classes but the mentee 3"):
        DeepClassifier(layers=MENTEE, mentor=other, verbose=False).fit(iris)
    wide = DeepClassificationModel(FeedForwardTopology.multilayer_perceptron([5, 3]), np.zeros(18))
    with pytest.raises(ValueError, match=r"the mentor takes 5 input features \(input shape \(5,\)\) but the mentee 4"):
        DeepClassifier(layers=MENTEE, mentor=wide, verbose=False).fit(iris)
    with pytest.raises(TypeError, match="mentor must be a DeepClassificationModel or a Spark "
                                        "MultilayerPerceptronClassificationModel, got str"):
        DeepClassifier(layers=MENTEE, mentor="model.onnx", verbose=False).fit(iris)
    with pytest.raises(ValueError, match=r"hint pair 0: mentor layer index 3 is out of range \[0, 3\)"):
        DeepClassifier(layers=MENTEE, mentor=mentor, hintLayers=[[0, 3]], verbose=False).fit(iris)
    # the engine's errors name its arguments; the estimator's name the params that set them
    with pytest.raises(ValueError, match=r"^temperature must be a finite number > 0, got 0.0$"):
        DeepClassifier(layers=MENTEE, mentor=mentor, temperature=0.0, verbose=False).fit(iris)
    with pytest.raises(ValueError, match=r"^distillAlpha must be in \[0, 1\], got 2.0$"):
        DeepClassifier(layers=MENTEE, mentor=mentor, distillAlpha=2.0, verbose=False).fit(iris)
    with pytest.raises(ValueError, match=r"^hintWeights must be one weight per hint pair \(1 pairs \[\(0, 0\)\]\), "
                                         r"got \[1.0, 1.0\]$"):
        DeepClassifier(layers=MENTEE, mentor=mentor, hintLayers=[[0, 0]], hintWeights=[1.0, 1.0]).fit(iris)
    with pytest.raises(ValueError, match=r"^hintWeights must be finite and >= 0, got \[-1.0\]$"):
        DeepClassifier(layers=MENTEE, mentor=mentor, hintLayers=[[0, 0]], hintWeights=[-1.0]).fit(iris)
    with pytest.raises(TypeError, match=r"hintLayers must be a list of \[mentee layer, mentor layer\] index pairs"):
        DeepClassifier(layers=MENTEE, hintLayers=[[0, 1, 2]])


def test_estimator_with_mentor_saves_and_loads(tmp_path, mentor) -> None:
    clf = DeepClassifier(layers=MENTEE, mentor=mentor, distillAlpha=0.4, temperature=3.0, hintLayers=[[1, 1]],
                         hintWeights=[0.25])
    path = str(tmp_path / "clf")
    clf.save(path)
    loaded = DeepClassifier.load(path)
    assert (loaded.getDistillAlpha(), loaded.getTemperature(), loaded.getHintLayers(), loaded.getHintWeights()) == \
        (0.4, 3.0, [[1, 1]], [0.25])
    assert loaded.getMentor().network == mentor.network
    np.testing.assert_array_equal(loaded.getMentor().weights.toArray(), mentor.weights.toArray())
    assert not any(name.endswith(".pkl") for _, _, files in os.walk(path) for name in files)
