"""Federated mode on Spark (FedAvg, CAD): the estimator, the round history, checkpoints, failures, bad input; the
model's filter visualization; jobs/federated.py through spark-submit. Small: a few hundred rows, a few devices."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest
from pyspark.ml.linalg import Vectors

from sparkdl_hetero.data import assign_devices
from sparkdl_hetero.ml import DeepClassificationModel, DeepClassifier
from sparkdl_hetero.nn import FeedForwardModel, FeedForwardTopology
from sparkdl_hetero.nn.visualize import filter_preferences

CNN = "conv(8,3,pad=1)-relu-maxpool(2)-conv(16,3,pad=1)-relu-maxpool(2)-flatten-affine(32)-relu-affine(4)"
SHAPE = [1, 8, 8]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPARK_SUBMIT = os.path.join(os.path.dirname(sys.executable), "spark-submit")


def _images(n: int = 320, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """4 classes of 8x8 images: a bright quadrant per class, plus noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    x = rng.normal(0.0, 0.3, (n, 8, 8))
    for c in range(4):
        r, q = divmod(c, 2)
        x[y == c, r * 4:r * 4 + 4, q * 4:q * 4 + 4] += 1.0
    return x.reshape(n, -1), y


@pytest.fixture(scope="module")
def fed_df(spark):  # noqa: ANN001, ANN201
    """320 images over 4 devices of 2 classes each; every 8th row a validation row."""
    x, y = _images()
    dev = assign_devices(y, 4, classes_per_device=2, seed=1).device
    rows = [(Vectors.dense(x[i]), float(y[i]), int(dev[i]), i % 8 == 0) for i in range(len(y))]
    df = spark.createDataFrame(rows, ["features", "label", "device", "valid"]).cache()
    df.count()
    return df


def _cnn(**kw: object) -> DeepClassifier:
    base = dict(topology=CNN, inputShape=SHAPE, mode="federated", deviceCol="device", solver="sgd", stepSize=0.1,
                batchSize=16, rounds=2, clientFraction=0.5, localEpochs=1, seed=3, verbose=False,
                validationIndicatorCol="valid")
    base.update(kw)
    return DeepClassifier(**base)


def test_fedavg_one_device_one_full_batch_is_one_gd_step(spark) -> None:  # noqa: ANN001
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 5)), rng.integers(0, 3, 60)
    df = spark.createDataFrame([(Vectors.dense(x[i]), float(y[i]), "only") for i in range(60)],
                               ["features", "label", "device"])
    common = dict(layers=[5, 4, 3], stepSize=0.5, seed=11, dtype="float64", verbose=False)
    fed = DeepClassifier(mode="federated", solver="sgd", batchSize=100, rounds=1, localEpochs=1, clientFraction=1.0,
                         **common).fit(df)
    gd = DeepClassifier(mode="treeAggregate", solver="gd", maxIter=1, **common).fit(df)
    w0 = FeedForwardModel.initial_weights(FeedForwardTopology.multilayer_perceptron([5, 4, 3]),
                                          np.random.default_rng(11))
    assert not np.allclose(gd.weights.toArray(), w0)  # the step moved the weights
    np.testing.assert_allclose(fed.weights.toArray(), gd.weights.toArray(), rtol=1e-12, atol=1e-12)
    h = fed.summary.roundHistory
    assert [e["devices"] for e in h] == [["only"]] and h[0]["rows"] == 60 and h[0]["dropped"] == []


def test_fedavg_and_cad_round_history_and_bytes(fed_df) -> None:  # noqa: ANN001
    fedavg = _cnn(rounds=3).fit(fed_df)
    cad = _cnn(rounds=3, federatedAlgorithm="cad", cadKeep=0.5, cadWarmupRounds=1).fit(fed_df)
    hf, hc = fedavg.summary.roundHistory, cad.summary.roundHistory
    assert [e["round"] for e in hf] == [e["round"] for e in hc] == [1, 2, 3]
    keys = {"round", "algorithm", "devices", "dropped", "bytesDown", "bytesUp", "deviceSeconds", "maxDeviceSeconds",
            "rows", "trainLoss", "validationLoss", "validationAccuracy", "seconds"}
    for e in hf + hc:
        assert keys <= set(e)
        assert len(e["devices"]) == 2 and e["dropped"] == []  # round(0.5 * 4) devices
        assert e["deviceSeconds"] > 0 and np.isfinite(e["trainLoss"])
        assert 0.0 <= e["validationAccuracy"] <= 1.0 and e["validationLoss"] > 0
    assert [e["devices"] for e in hf] == [e["devices"] for e in hc]  # same seed, same selection
    assert [e["algorithm"] for e in hc] == ["fedavg", "cad", "cad"]
    n = cad.network.num_weights
    for e in hf:  # FedAvg ships the whole float32 model each way, per device
        assert 2 * 4 * n < e["bytesDown"] < 2 * 4 * n + 4096
        assert 2 * 4 * n < e["bytesUp"] < 2 * 4 * n + 4096
    assert hc[0]["bytesDown"] == hf[0]["bytesDown"]  # the warm-up round is FedAvg (plus statistics up)
    for ef, ec in zip(hf[1:], hc[1:], strict=True):
        assert ec["bytesDown"] < 0.8 * ef["bytesDown"] and ec["bytesUp"] < 0.8 * ef["bytesUp"]
    assert fedavg.summary.trainingStats["mode"] == "federated"
    assert len(fedavg.summary.objectiveHistory) == 3
    # where each task computed, resolved per task as in the other modes: "host pid N partition P: numpy"
    accounts = fedavg.summary.trainingStats["backends"]
    assert accounts and all(re.fullmatch(r".+ pid \d+ partition \d+: numpy", a) for a in accounts)


def test_every_job_of_a_federated_fit_carries_the_fit_tag(spark, fed_df, monkeypatch) -> None:  # noqa: ANN001
    """As in the other modes, every Spark job of the fit runs under the fit's tag (``spark.interruptTag`` cancels
    them), a round's job also under a tag naming the round; none is left on the thread afterwards."""
    from sparkdl_hetero.distributed.config import TrainConfig
    from sparkdl_hetero.distributed.fit import fit
    from sparkdl_hetero.nn.objective import Objective

    tags: list[set[str]] = []
    frame = type(fed_df)
    collect = frame.collect

    def recording(self):  # noqa: ANN001, ANN202
        tags.append(set(self.sparkSession.getTags()))
        return collect(self)

    monkeypatch.setattr(frame, "collect", recording)
    config = TrainConfig(mode="federated", solver="sgd", stepSize=0.1, batchSize=16, rounds=2, clientFraction=0.5,
                         localEpochs=1, seed=3, verbose=False)
    fit(fed_df, "features", "label", Objective(FeedForwardTopology.from_spec(CNN, SHAPE)), config,
        device_col="device", validation_col="valid")
    monkeypatch.undo()
    fit_tags = {t for job in tags for t in job if re.fullmatch(r"sparkdl-hetero-fit-[0-9a-f]{8}", t)}
    assert len(tags) >= 4 and len(fit_tags) == 1  # conversion, two rounds, the last validation, release
    (tag,) = fit_tags
    assert all(tag in job for job in tags), tags
    assert {f"{tag}-round-1", f"{tag}-round-2", f"{tag}-validation"} <= set().union(*tags)
    assert not spark.getTags()


def test_resume_from_a_checkpoint_gives_the_same_model(fed_df, tmp_path) -> None:  # noqa: ANN001
    full = _cnn(rounds=3, federatedAlgorithm="cad").fit(fed_df)
    ckpt = str(tmp_path / "ckpt")
    _cnn(rounds=2, federatedAlgorithm="cad", checkpointDir=ckpt, checkpointInterval=1).fit(fed_df)
    resumed = _cnn(rounds=3, federatedAlgorithm="cad", checkpointDir=ckpt, checkpointInterval=1).fit(fed_df)
    np.testing.assert_allclose(resumed.weights.toArray(), full.weights.toArray(), rtol=1e-6, atol=1e-7)
    h = resumed.summary.roundHistory
    assert [e["round"] for e in h] == [1, 2, 3]
    assert [e["devices"] for e in h] == [e["devices"] for e in full.summary.roundHistory]
    assert resumed.summary.trainingStats["jobs"] == 2  # round 3 and the last validation only


def test_a_failing_device_is_dropped_and_reported(spark, fed_df) -> None:  # noqa: ANN001
    from sparkdl_hetero.distributed.federated import FAULT_PROPERTY

    clean = _cnn(rounds=1, clientFraction=1.0).fit(fed_df)
    spark.sparkContext.setLocalProperty(FAULT_PROPERTY, "2")
    try:
        model = _cnn(rounds=1, clientFraction=1.0).fit(fed_df)
        spark.sparkContext.setLocalProperty(FAULT_PROPERTY, "0,1,2,3")
        with pytest.raises(Exception, match="round 1: every selected device failed"):
            _cnn(rounds=1, clientFraction=1.0).fit(fed_df)
    finally:
        spark.sparkContext.setLocalProperty(FAULT_PROPERTY, None)
    e = model.summary.roundHistory[0]
    assert e["devices"] == [0, 1, 2, 3]
    assert e["dropped"] == [{"device": 2, "error": "RuntimeError: injected fault on device 2"}]
    assert e["rows"] < clean.summary.roundHistory[0]["rows"]
    assert not np.allclose(model.weights.toArray(), clean.weights.toArray())


@pytest.mark.parametrize(("change", "message"), [
    (dict(deviceCol="nope"), "deviceCol 'nope' not found in the DataFrame"),
    (dict(deviceCol="label"), "deviceCol 'label' must be an integer or string column, got double"),
    (dict(validationIndicatorCol="device"), "validationIndicatorCol 'device' must be a boolean column, got bigint"),
    (dict(clientFraction=0.0), "clientFraction must be in (0, 1], got 0.0"),
    (dict(clientFraction=1.5), "clientFraction must be in (0, 1], got 1.5"),
    (dict(rounds=0), "rounds must be >= 1, got 0"),
    (dict(cadKeep=1.5, federatedAlgorithm="cad"), "cadKeep must be in (0, 1], got 1.5"),
    (dict(federatedAlgorithm="fedprox"), "federatedAlgorithm must be one of fedavg, cad, got 'fedprox'"),
    (dict(solver="l-bfgs"), "solver must be one of gd, sgd, momentum, adam with mode='federated'"),
    (dict(federatedAlgorithm="cad", cadLayers=[0, 9]), "cadLayers: layer 9 (affine(4)) cannot be decoupled"),
])
def test_bad_params_are_clear_errors(fed_df, change: dict, message: str) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match=re.escape(message)):
        _cnn(**change).fit(fed_df)


def test_bad_rows_are_clear_errors(spark, fed_df) -> None:  # noqa: ANN001
    from pyspark.sql import functions as F

    only_valid = fed_df.withColumn("valid", F.col("valid") | (F.col("device") == 3))
    with pytest.raises(ValueError, match=re.escape("1 devices have no training rows (only rows flagged by "
                                                   "validationIndicatorCol 'valid'), e.g. ['3']")):
        _cnn().fit(only_valid)
    bad_label = fed_df.withColumn("label", F.when(F.col("device") == 1, F.lit(7.0)).otherwise(F.col("label")))
    with pytest.raises(ValueError, match=re.escape("device '1' has ") + r"\d+" + re.escape(
            " labels outside the model's classes [0, 4) in label column 'label' (first found: 7.0)")):
        _cnn().fit(bad_label)
    null_device = fed_df.withColumn("device", F.when(F.col("device") == 0, F.lit(None)).otherwise(F.col("device")))
    with pytest.raises(ValueError, match=r"deviceCol 'device' has \d+ null values"):
        _cnn().fit(null_device)


def test_string_devices_and_the_mentor_with_fedavg(spark, fed_df) -> None:  # noqa: ANN001
    from pyspark.sql import functions as F

    named = fed_df.withColumn("device", F.concat(F.lit("phone-"), F.col("device").cast("string")))
    mentor = _cnn(rounds=1, clientFraction=1.0).fit(fed_df)
    mentee = _cnn(rounds=1, clientFraction=1.0, mentor=mentor, distillAlpha=0.5).fit(named)
    assert mentee.summary.roundHistory[0]["devices"] == ["phone-0", "phone-1", "phone-2", "phone-3"]
    with pytest.raises(ValueError, match="use the mentor params with federatedAlgorithm='fedavg'"):
        _cnn(federatedAlgorithm="cad", mentor=mentor).fit(named)


def test_model_filter_preferences_and_visualization(spark, fed_df, tmp_path) -> None:  # noqa: ANN001
    model = _cnn(rounds=2, clientFraction=1.0, cadLayers=[3], cadKeep=0.75).fit(fed_df)
    model.save(str(tmp_path / "model"))
    loaded = DeepClassificationModel.load(str(tmp_path / "model"))
    assert (loaded.getMode(), loaded.getDeviceCol(), loaded.getCadLayers(), loaded.getCadKeep(), loaded.getRounds()) \
        == ("federated", "device", [3], 0.75, 2)
    pref = model.filterPreferences(fed_df, 3)
    x, y = _images()
    local = FeedForwardModel(model.network, model.weights.toArray(), dtype=np.float64)
    np.testing.assert_allclose(pref, filter_preferences(local, x, y, 3), rtol=1e-5, atol=1e-6)
    assert pref.shape == (4, 16)
    images = model.visualizeFilters(3, filters=[0, 2], iterations=30, seed=1)
    assert images.shape == (2, 1, 8, 8) and np.all(np.isfinite(images))
    with pytest.raises(ValueError, match="layer must be the index of a conv or affine layer"):
        model.visualizeFilters(1)


@pytest.mark.spark
def test_federated_job_through_spark_submit(tmp_path) -> None:  # noqa: ANN001
    if not os.path.isdir("/usr/share/datasets/fashion-mnist") and not os.environ.get("SPARKDL_FASHION_MNIST"):
        pytest.fail("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    out = str(tmp_path / "out")
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable)
    cmd = [SPARK_SUBMIT, "--master", "local[2]", "--driver-memory", "1g", "--conf", "spark.ui.enabled=false",
           os.path.join(ROOT, "jobs", "federated.py"), "--quiet", "--train-limit", "600", "--test-limit", "200",
           "--devices", "4", "--classes-per-device", "5", "--rounds", "2", "--client-fraction", "0.5",
           "--model", "mlp", "--output", out]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=420, cwd=ROOT)
    assert proc.returncode == 0, f"federated.py failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    table = re.findall(r"^\s*(\d+)\s+(fedavg|cad)\s+(\d\.\d{4})\s+(\d+)\s+(\d+)\s+(\d+\.\d+)", proc.stdout, re.M)
    assert [(r, a) for r, a, *_ in table] == [("1", "fedavg"), ("1", "cad"), ("2", "fedavg"), ("2", "cad")]
    with open(os.path.join(out, "federated.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "bytes per round CAD/FedAvg" in proc.stdout
    assert os.path.isfile(os.path.join(out, "data", "devices-seed-0", "part-00000.parquet"))  # executors read it



@pytest.mark.spark
def test_visualize_job_filters_and_preferences(fed_df, tmp_path) -> None:  # noqa: ANN001
    """jobs/visualize.py on a saved model: the filter grid, and the preference heatmap on Fashion-MNIST."""
    if not os.path.isdir("/usr/share/datasets/fashion-mnist") and not os.environ.get("SPARKDL_FASHION_MNIST"):
        pytest.fail("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    from pyspark.ml.linalg import DenseVector

    from sparkdl_hetero.ml import DeepClassificationModel

    topo = FeedForwardTopology.from_spec("conv(4,5)-relu-maxpool(2)-conv(6,5)-relu-flatten-affine(10)", [1, 28, 28])
    model = DeepClassificationModel(topo, DenseVector(FeedForwardModel.initial_weights(topo,
                                                                                       np.random.default_rng(0))))
    path = str(tmp_path / "model")
    model.save(path)
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable)
    job = os.path.join(ROOT, "jobs", "visualize.py")
    for extra, out in (([], "filters.png"), (["--preferences", "--limit", "300"], "prefs.png")):
        cmd = [SPARK_SUBMIT, "--master", "local[2]", "--driver-memory", "1g", "--conf", "spark.ui.enabled=false",
               job, "--model", path, "--layer", "3", "--iterations", "10", "--out", str(tmp_path / out), *extra]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert proc.returncode == 0, f"visualize.py failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
        with open(tmp_path / out, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_partial_merges_of_tasks_equal_one_merge_of_every_device() -> None:
    """What a task ships (its devices' partial RoundAggregator as a state dict, through a payload) merges on the
    server into the same result as adding every device to one aggregator."""
    from sparkdl_hetero.distributed.federated import decode_payload, encode_payload
    from sparkdl_hetero.nn.federated import RoundAggregator

    rng = np.random.default_rng(5)
    g = rng.normal(size=50)
    updates = [(rng.normal(size=k), int(rng.integers(1, 9)), np.sort(rng.choice(50, k, replace=False)))
               for k in (50, 20, 35, 7)]
    one = RoundAggregator(g)
    for w, rows, index in updates:
        one.add(w, rows, index)
    server = RoundAggregator(g)
    for task in (updates[:1], updates[1:]):
        part = RoundAggregator(g)
        for w, rows, index in task:
            part.add(w, rows, index)
        arrays, meta = decode_payload(encode_payload(part.state_dict(), {"task": 1}))
        assert meta == {"task": 1}
        shipped = RoundAggregator(g)
        shipped.load_state_dict(arrays)
        server.merge(shipped)
    np.testing.assert_allclose(server.result(), one.result(), rtol=1e-12, atol=1e-12)
    assert (server.devices, server.rows) == (one.devices, one.rows) == (4, sum(r for _, r, _ in updates))
    with pytest.raises(ValueError, match="an aggregator state of 50 weights needs mean and rows of that length"):
        RoundAggregator(g).load_state_dict({"mean": np.zeros(3), "rows": np.zeros(3), "counts": np.zeros(2)})


def test_fedavg_and_cad_under_spark_connect(connect) -> None:  # noqa: ANN001
    """The mode uses DataFrame APIs only: the same fit runs from a Spark Connect session."""
    x, y = _images(160, seed=4)
    dev = assign_devices(y, 4, classes_per_device=2, seed=1).device
    df = connect.createDataFrame([(x[i].tolist(), float(y[i]), f"d{dev[i]}", i % 8 == 0) for i in range(len(y))],
                                 ["features", "label", "device", "valid"])
    for algorithm in ("fedavg", "cad"):
        model = _cnn(rounds=2, federatedAlgorithm=algorithm).fit(df)
        h = model.summary.roundHistory
        assert [e["round"] for e in h] == [1, 2] and all(e["validationAccuracy"] is not None for e in h)
        assert h[-1]["algorithm"] == algorithm
    assert model.filterPreferences(df, 3).shape == (4, 16)


def test_cad_without_warm_up_measures_the_initial_model_first(fed_df) -> None:  # noqa: ANN001
    model = _cnn(rounds=1, federatedAlgorithm="cad", cadWarmupRounds=0, cadKeep=0.25).fit(fed_df)
    h = model.summary.roundHistory
    assert h[0]["algorithm"] == "cad" and h[0]["validationAccuracy"] is not None
    assert model.summary.trainingStats["jobs"] == 3  # the statistics, round 1, the last validation
    fedavg = _cnn(rounds=1).fit(fed_df).summary.roundHistory[0]
    assert h[0]["bytesDown"] < 0.5 * fedavg["bytesDown"]  # a quarter of the decoupled filters, and fewer classes
