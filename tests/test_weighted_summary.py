"""Summary metrics with weightCol: each row counts with its weight, as in Spark's summaries (MulticlassMetrics /
RegressionMetrics with weights) -- against hand-computed values, Spark's evaluators with weightCol, and rows of
weight 2 against duplicated rows."""

from __future__ import annotations

import numpy as np
import pytest

from sparkdl_hetero.nn.model import FeedForwardModel
from sparkdl_hetero.nn.topology import FeedForwardTopology

# weights of 0, 1, 2 and a fraction, so that a weighted and an unweighted figure differ
_W = [2.0, 1.0, 0.0, 0.5, 1.0, 2.0, 1.0, 3.0, 1.0, 2.0, 0.25, 1.0]


def _classification_df(spark, weights=_W):
    from pyspark.ml.linalg import Vectors

    rng = np.random.default_rng(4)
    x = rng.normal(size=(len(weights), 2))
    y = np.arange(len(weights)) % 3
    rows = [(Vectors.dense(r), float(t), float(w)) for r, t, w in zip(x, y, weights, strict=True)]
    return spark.createDataFrame(rows, ["features", "label", "w"])


def _classifier():
    from sparkdl_hetero.ml import DeepClassificationModel

    top = FeedForwardTopology.multilayer_perceptron([2, 3])
    model = DeepClassificationModel(top, FeedForwardModel.initial_weights(top, np.random.default_rng(1)))
    model.set(model.weightCol, "w")
    return model


def test_classification_metrics_weigh_each_row(spark) -> None:
    from pyspark.ml.evaluation import MulticlassClassificationEvaluator

    df = _classification_df(spark)
    model = _classifier()
    s = model.evaluate(df)
    assert s.weightCol == "w"
    out = s.predictions.select("label", "prediction", "w").toPandas()
    lab, pred, w = out["label"].to_numpy(), out["prediction"].to_numpy(), out["w"].to_numpy()
    assert 0 < np.sum(lab == pred) < len(lab)  # some right, some wrong: the weights matter
    # by hand: the weighted share of right predictions; per label, precision and recall over weight sums
    assert s.accuracy == pytest.approx(np.sum(w * (lab == pred)) / np.sum(w), rel=1e-12)
    labels = np.unique(lab)
    tp = np.array([np.sum(w * ((lab == k) & (pred == k))) for k in labels])
    precision = tp / np.array([np.sum(w * (pred == k)) or 1.0 for k in labels])
    recall = tp / np.array([np.sum(w * (lab == k)) for k in labels])
    share = np.array([np.sum(w * (lab == k)) for k in labels]) / np.sum(w)
    assert s.weightedPrecision == pytest.approx(float(share @ precision), rel=1e-12)
    assert s.weightedRecall == pytest.approx(float(share @ recall), rel=1e-12)
    assert s.accuracy != pytest.approx(float(np.mean(lab == pred)))  # not the unweighted figure
    # Spark's evaluators with the same weight column agree
    for metric, value in [("accuracy", s.accuracy), ("weightedPrecision", s.weightedPrecision),
                          ("weightedRecall", s.weightedRecall), ("f1", s.weightedFMeasure()),
                          ("weightedFalsePositiveRate", s.weightedFalsePositiveRate)]:
        want = MulticlassClassificationEvaluator(metricName=metric, weightCol="w").evaluate(s.predictions)
        assert value == pytest.approx(want, rel=1e-12), metric


def test_classification_weight_two_equals_a_duplicated_row(spark) -> None:
    weights = [2.0 if i % 4 == 0 else 1.0 for i in range(12)]
    df = _classification_df(spark, weights)
    duplicated = df.unionByName(df.where("w = 2.0")).drop("w")  # no weight column: every row weighs 1
    model = _classifier()
    a, b = model.evaluate(df), model.evaluate(duplicated)
    assert a.weightCol == "w" and b.weightCol == ""
    for name in ("accuracy", "weightedPrecision", "weightedRecall", "weightedTruePositiveRate",
                 "weightedFalsePositiveRate"):
        assert getattr(a, name) == pytest.approx(getattr(b, name), rel=1e-12), name
    assert a.weightedFMeasure(0.5) == pytest.approx(b.weightedFMeasure(0.5), rel=1e-12)
    assert a.precisionByLabel == pytest.approx(b.precisionByLabel, rel=1e-12)


def _regression_df(spark, weights=_W, outputs: int = 1):
    from pyspark.ml.linalg import Vectors

    rng = np.random.default_rng(6)
    x = rng.normal(size=(len(weights), 3))
    y = rng.normal(size=(len(weights), outputs))
    rows = [(Vectors.dense(r), float(t[0]) if outputs == 1 else Vectors.dense(t), float(w))
            for r, t, w in zip(x, y, weights, strict=True)]
    return spark.createDataFrame(rows, ["features", "label", "w"])


def _regressor(outputs: int = 1):
    from sparkdl_hetero.ml import DeepRegressionModel

    top = FeedForwardTopology.from_spec(f"affine(4)-tanh-affine({outputs})-squared_error", 3)
    model = DeepRegressionModel(top, FeedForwardModel.initial_weights(top, np.random.default_rng(2)))
    model.set(model.weightCol, "w")
    return model


def test_regression_metrics_weigh_each_row(spark) -> None:
    from pyspark.ml.evaluation import RegressionEvaluator

    df = _regression_df(spark)
    s = _regressor().evaluate(df)
    out = s.predictions.select("label", "prediction", "w").toPandas()
    lab, pred, w = out["label"].to_numpy(), out["prediction"].to_numpy(), out["w"].to_numpy()
    err = pred - lab
    mean = np.sum(w * lab) / np.sum(w)
    assert s.numInstances == len(lab)  # rows, as Spark counts them
    assert s.meanSquaredError == pytest.approx(np.sum(w * err ** 2) / np.sum(w), rel=1e-12)
    assert s.rootMeanSquaredError == pytest.approx(np.sqrt(np.sum(w * err ** 2) / np.sum(w)), rel=1e-12)
    assert s.meanAbsoluteError == pytest.approx(np.sum(w * np.abs(err)) / np.sum(w), rel=1e-12)
    assert s.r2 == pytest.approx(1 - np.sum(w * err ** 2) / np.sum(w * (lab - mean) ** 2), rel=1e-12)
    assert s.explainedVariance == pytest.approx(np.sum(w * (pred - mean) ** 2) / np.sum(w), rel=1e-12)
    assert s.meanSquaredError != pytest.approx(float(np.mean(err ** 2)))  # not the unweighted figure
    # Spark's evaluator agrees, r2 apart: its weighted SStot is the unbiased weighted variance times (weight sum
    # - 1), which is not the sum of squares, so a weight of 2 and a duplicated row give different r2 there
    for metric, value in [("mse", s.meanSquaredError), ("rmse", s.rootMeanSquaredError),
                          ("mae", s.meanAbsoluteError), ("var", s.explainedVariance)]:
        want = RegressionEvaluator(metricName=metric, weightCol="w").evaluate(s.predictions)
        assert value == pytest.approx(want, rel=1e-9), metric


@pytest.mark.parametrize("outputs", [1, 2])
def test_regression_weight_two_equals_a_duplicated_row(spark, outputs) -> None:
    weights = [2.0 if i % 3 == 0 else 1.0 for i in range(12)]
    df = _regression_df(spark, weights, outputs)
    duplicated = df.unionByName(df.where("w = 2.0")).drop("w")
    model = _regressor(outputs)
    a, b = model.evaluate(df), model.evaluate(duplicated)
    for name in ("meanSquaredError", "rootMeanSquaredError", "meanAbsoluteError", "r2", "explainedVariance"):
        assert getattr(a, name) == pytest.approx(getattr(b, name), rel=1e-12), name
    assert a.numInstances == 12 and b.numInstances == 16


def test_the_training_summary_weighs_the_training_rows(spark) -> None:
    """A model fit with weightCol reports weighted metrics on its training rows."""
    from sparkdl_hetero.ml import DeepRegressor

    df = _regression_df(spark)
    model = DeepRegressor(topology="affine(4)-tanh-affine(1)", solver="l-bfgs", maxIter=3, seed=1, verbose=False,
                          weightCol="w").fit(df)
    assert model.summary.weightCol == "w"
    assert model.summary.meanSquaredError == pytest.approx(model.evaluate(df).meanSquaredError, rel=1e-12)
    out = model.transform(df).select("label", "prediction", "w").toPandas()
    err = out["prediction"].to_numpy() - out["label"].to_numpy()
    w = out["w"].to_numpy()
    assert model.summary.meanSquaredError == pytest.approx(np.sum(w * err ** 2) / np.sum(w), rel=1e-12)
