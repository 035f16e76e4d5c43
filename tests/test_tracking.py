"""MLflow logging of a fit (sparkdl_hetero.ml.tracking), read back from a local tracking store through
MlflowClient: params, metric histories, training stats and the model artifact."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from sparkdl_hetero.ml.tracking import FIT_TAG, estimator_params, param_text


def test_param_text_writes_lists_as_json_and_cuts_long_values() -> None:
    assert param_text([2, 3, 1]) == "[2, 3, 1]"
    assert param_text("adam") == "adam"
    assert param_text(0.5) == "0.5"
    assert param_text(True) == "True"
    cut = param_text("x" * 50, limit=10)
    assert cut == "x" * 9 + "…" and len(cut) == 10


def test_estimator_params_hold_explicit_and_default_values() -> None:
    from sparkdl_hetero.ml import DeepClassifier

    params = estimator_params(DeepClassifier(layers=[2, 3, 2], solver="adam", epochs=2))
    assert params["layers"] == "[2, 3, 2]" and params["solver"] == "adam" and params["epochs"] == "2"
    assert params["maxIter"] == str(DeepClassifier().getMaxIter())  # a default value


@pytest.fixture
def mlflow(tmp_path, monkeypatch):
    """MLflow logging to a local file store in ``tmp_path`` (no server), restored afterwards. MLflow 3 keeps the
    file store behind an opt-in; its SQLite store needs SQLAlchemy, which mlflow-skinny does not bring."""
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(_store_uri(tmp_path))
    yield mlflow
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(before)


def _store_uri(tmp_path) -> str:
    return "file://" + str(tmp_path / "mlruns")


def _blobs(spark, n: int = 48, seed: int = 0, extra: dict | None = None):
    from pyspark.ml.linalg import Vectors

    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    x = rng.normal(size=(n, 2)) + 2.0 * y[:, None]
    cols = {"features": [Vectors.dense(r) for r in x], "label": [float(v) for v in y], **(extra or {})}
    names = list(cols)
    return spark.createDataFrame([tuple(cols[c][i] for c in names) for i in range(n)], names).repartition(2)


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def _download_model(client, run_id: str, tmp_path) -> str:
    local = client.download_artifacts(run_id, "model", str(tmp_path / "download"))
    assert os.path.isdir(os.path.join(local, "metadata")) and os.path.isdir(os.path.join(local, "data"))
    return local


def test_classifier_fit_logs_params_histories_stats_and_the_model(spark, mlflow, tmp_path) -> None:
    from sparkdl_hetero.ml import DeepClassificationModel, DeepClassifier

    df = _blobs(spark)
    est = DeepClassifier(layers=[2, 4, 2], solver="adam", stepSize=0.05, batchSize=8, epochs=3, seed=1,
                         verbose=False, dtype="float64")
    with mlflow.start_run() as run:
        model = est.fit(df)
    client = mlflow.tracking.MlflowClient()
    data = client.get_run(run.info.run_id).data
    want = {p.name: v for p, v in est.extractParamMap().items()}
    assert set(data.params) == set(want)
    assert data.params == estimator_params(est)
    assert data.params["layers"] == "[2, 4, 2]" and data.params["solver"] == "adam"
    assert data.params["epochs"] == "3" and data.params["stepSize"] == "0.05"
    assert data.params["maxIter"] == str(want["maxIter"])  # a default value
    assert data.tags[FIT_TAG] == "DeepClassificationModel"

    summary = model.summary
    hist = _history(client, run.info.run_id, "trainingLoss")
    assert [s for s, _ in hist] == list(range(len(summary.objectiveHistory))) and len(hist) == 3
    assert [v for _, v in hist] == summary.objectiveHistory
    assert _history(client, run.info.run_id, "stepLoss") == summary.stepLossHistory

    local = client.download_artifacts(run.info.run_id, "training_stats.json", str(tmp_path / "stats"))
    with open(local) as f:
        stats = json.load(f)
    assert stats["mode"] == summary.trainingStats["mode"] and stats["solver"] == "adam"
    numeric = {k: v for k, v in summary.trainingStats.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert numeric and all(data.metrics[f"stats.{k}"] == v for k, v in numeric.items())

    loaded = DeepClassificationModel.load(_download_model(client, run.info.run_id, tmp_path))
    np.testing.assert_array_equal(loaded.weights.toArray(), model.weights.toArray())
    a = model.transform(df).select("probability").toPandas()["probability"]
    b = loaded.transform(df).select("probability").toPandas()["probability"]
    np.testing.assert_allclose(np.stack(b.map(lambda v: v.toArray())), np.stack(a.map(lambda v: v.toArray())),
                               rtol=1e-12)


def test_regressor_validation_curves_are_logged_per_epoch(spark, mlflow, tmp_path) -> None:
    from pyspark.ml.linalg import Vectors

    from sparkdl_hetero.ml import DeepRegressionModel, DeepRegressor

    rng = np.random.default_rng(2)
    x = rng.uniform(-1, 1, size=(60, 2))
    y = np.sin(2 * x[:, 0]) + x[:, 1]
    val = np.arange(60) % 4 == 0
    df = spark.createDataFrame([(Vectors.dense(r), float(t), bool(v)) for r, t, v in zip(x, y, val, strict=True)],
                               ["features", "label", "isVal"]).repartition(2)
    est = DeepRegressor(topology="affine(8)-tanh-affine(1)", mode="barrier", numWorkers=2, solver="adam",
                        stepSize=0.05, batchSize=8, epochs=3, patience=10, tol=0.0, seed=3, verbose=False,
                        dtype="float64", validationIndicatorCol="isVal")
    with mlflow.start_run() as run:
        model = est.fit(df)
    client = mlflow.tracking.MlflowClient()
    history = model.summary.validationHistory
    assert len(history) == 3
    assert _history(client, run.info.run_id, "validationLoss") == [(i, v[0]) for i, v in enumerate(history)]
    assert _history(client, run.info.run_id, "validationRMSE") == [(i, v[1]) for i, v in enumerate(history)]
    assert client.get_run(run.info.run_id).data.params["validationIndicatorCol"] == "isVal"
    loaded = DeepRegressionModel.load(_download_model(client, run.info.run_id, tmp_path))
    np.testing.assert_array_equal(loaded.transform(df).select("prediction").toPandas()["prediction"],
                                  model.transform(df).select("prediction").toPandas()["prediction"])


def test_no_active_run_logs_nothing_and_a_second_fit_goes_to_a_nested_run(spark, mlflow) -> None:
    from sparkdl_hetero.ml import DeepClassifier

    df = _blobs(spark, n=24)
    est = DeepClassifier(layers=[2, 3, 2], solver="l-bfgs", maxIter=3, seed=1, verbose=False)
    est.fit(df)
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []
    with mlflow.start_run() as run:
        est.fit(df)
        est.copy({est.maxIter: 4}).fit(df)  # other params: into a run of its own, nested in the active one
        assert mlflow.active_run().info.run_id == run.info.run_id
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert len(runs) == 2
    child = next(r for r in runs if r.info.run_id != run.info.run_id)
    assert child.data.tags["mlflow.parentRunId"] == run.info.run_id
    assert child.data.params["maxIter"] == "4"
    assert mlflow.tracking.MlflowClient().get_run(run.info.run_id).data.params["maxIter"] == "3"


def test_a_logging_failure_warns_and_returns_the_model(spark, mlflow, monkeypatch) -> None:
    from sparkdl_hetero.ml import DeepClassifier

    def broken(*_args, **_kw) -> None:
        raise OSError("artifact store unreachable")

    monkeypatch.setattr(mlflow, "log_artifacts", broken)
    df = _blobs(spark, n=24)
    with mlflow.start_run() as run, pytest.warns(RuntimeWarning, match="logging of the model failed: OSError: "
                                                                        "artifact store unreachable"):
        model = DeepClassifier(layers=[2, 3, 2], solver="l-bfgs", maxIter=3, seed=1, verbose=False).fit(df)
    assert model.summary.totalIterations > 0
    data = mlflow.tracking.MlflowClient().get_run(run.info.run_id).data
    assert data.params["maxIter"] == "3"  # the other parts are logged all the same


def test_federated_rounds_are_logged_per_round(spark, mlflow) -> None:
    from sparkdl_hetero.ml import DeepClassifier

    n = 48
    df = _blobs(spark, n=n, extra={"device": [f"d{i % 3}" for i in range(n)], "valid": [i % 4 == 0 for i in range(n)]})
    est = DeepClassifier(layers=[2, 3, 2], mode="federated", deviceCol="device", solver="sgd", stepSize=0.2,
                         batchSize=8, rounds=3, clientFraction=1.0, localEpochs=1, seed=3, verbose=False,
                         validationIndicatorCol="valid")
    with mlflow.start_run() as run:
        model = est.fit(df)
    client = mlflow.tracking.MlflowClient()
    rounds = model.summary.roundHistory
    assert len(rounds) == 3
    for key in ("validationAccuracy", "validationLoss", "bytesUp", "bytesDown", "trainLoss"):
        assert _history(client, run.info.run_id, f"round.{key}") == [(r["round"], r[key]) for r in rounds], key
