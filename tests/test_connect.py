"""Save/load, damaged saves, Spark-MLP interop, executor probing and task slots from a classic and from a Spark
Connect session (both on the test run's one local[2] application, see conftest)."""

from __future__ import annotations

import dataclasses
import glob
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyspark.ml.classification import MultilayerPerceptronClassificationModel, MultilayerPerceptronClassifier
from pyspark.ml.linalg import Vectors
from pyspark.sql import functions as F

from sparkdl_hetero.data.parquet import fashion_mnist_parquet
from sparkdl_hetero.distributed.cluster import check_barrier_slots, task_slots
from sparkdl_hetero.distributed.config import TrainConfig
from sparkdl_hetero.distributed.data import prepare
from sparkdl_hetero.distributed.placement import probe_executors
from sparkdl_hetero.distributed.tree_aggregate import TreeAggregateTrainer
from sparkdl_hetero.ml.classifier import DeepClassificationModel, DeepClassifier
from sparkdl_hetero.ml.persistence import DamagedSaveError, MissingSaveFileError
from sparkdl_hetero.nn.model import FeedForwardModel
from sparkdl_hetero.nn.objective import Objective
from sparkdl_hetero.nn.topology import FeedForwardTopology

LAYERS = [4, 5, 3]
KINDS = ["classic", "connect"]


@pytest.fixture(params=KINDS)
def session(request):
    return request.getfixturevalue("spark" if request.param == "classic" else "connect")


def _model(seed: int = 0) -> DeepClassificationModel:
    topo = FeedForwardTopology.multilayer_perceptron(LAYERS)
    return DeepClassificationModel(topo, np.random.default_rng(seed).normal(size=topo.num_weights))


def _save(session, model, path: str) -> None:
    model.write().session(session).save(path)


def _load(session, path: str) -> DeepClassificationModel:
    return DeepClassificationModel.read().session(session).load(path)


def _features(n: int = 12) -> np.ndarray:
    return np.random.default_rng(3).normal(size=(n, LAYERS[0]))


# ---- persistence -------------------------------------------------------------------------------------------------
def test_save_load_round_trip(session, tmp_path):
    model = _model(1)
    model = model.copy({model.probabilityCol: "p"})
    path = str(tmp_path / "m")
    _save(session, model, path)
    assert glob.glob(os.path.join(path, "data", "*.parquet")) and glob.glob(os.path.join(path, "metadata", "part-*"))
    assert not glob.glob(os.path.join(path, "**", "*.pkl"), recursive=True)
    meta = json.loads(open(glob.glob(os.path.join(path, "metadata", "part-*"))[0]).read())
    assert meta["class"] == "sparkdl_hetero.ml.classifier.DeepClassificationModel" and meta["uid"] == model.uid
    assert meta["formatVersion"] == 2 and meta["arrays"]["weights"]["shape"] == [model.network.num_weights]
    loaded = DeepClassificationModel.load(path)  # the active session of this kind
    assert loaded.uid == model.uid and loaded.getProbabilityCol() == "p" and loaded.getLayers() == LAYERS
    np.testing.assert_array_equal(loaded.weights.toArray(), model.weights.toArray())
    with pytest.raises(FileExistsError, match=r"metadata already exists; use write\(\)\.overwrite\(\)"):
        _save(session, model, path)
    other = _model(2)
    other.write().session(session).overwrite().save(path)
    np.testing.assert_array_equal(_load(session, path).weights.toArray(), other.weights.toArray())

    est = DeepClassifier(layers=LAYERS, solver="adam", initialWeights=np.arange(43.0))
    est.write().session(session).save(str(tmp_path / "est"))
    est2 = DeepClassifier.read().session(session).load(str(tmp_path / "est"))
    assert est2.uid == est.uid and est2.getSolver() == "adam"
    np.testing.assert_array_equal(est2.getInitialWeights().toArray(), np.arange(43.0))


def _drop_crc(path: str) -> None:
    for crc in glob.glob(os.path.join(path, "**", ".*.crc"), recursive=True):
        os.remove(crc)


def _data_file(path: str) -> str:
    return glob.glob(os.path.join(path, "data", "*.parquet"))[0]


def _truncate(file: str) -> None:
    with open(file, "rb") as f:
        head = f.read()[:-40]
    with open(file, "wb") as f:
        f.write(head)


def _corrupt(path: str, what: str) -> None:
    if what == "truncated":  # Hadoop's checksum catches it
        _truncate(_data_file(path))
    elif what == "truncated-nocrc":  # Parquet's own footer check catches it
        _truncate(_data_file(path))
        _drop_crc(path)
    elif what == "replaced-nocrc":  # a valid file with other weights: only our sha256 catches it
        file = _data_file(path)
        buf = io.BytesIO()
        np.save(buf, np.zeros(43))
        pq.write_table(pa.table({"name": ["weights"], "npy": [buf.getvalue()]}), file)
        _drop_crc(path)
    elif what == "json":
        part = glob.glob(os.path.join(path, "metadata", "part-*"))[0]
        with open(part, "w") as f:
            f.write('{"class": "sparkdl_hetero.ml.classifier.DeepClassificationModel", "uid": ')
        _drop_crc(path)
    elif what == "json-crc":  # edited with the checksum file left in place
        part = glob.glob(os.path.join(path, "metadata", "part-*"))[0]
        with open(part, "w") as f:
            f.write("{}")
    elif what == "missing":
        shutil.rmtree(os.path.join(path, "data"))
    elif what == "version":
        part = glob.glob(os.path.join(path, "metadata", "part-*"))[0]
        meta = json.loads(open(part).read())
        meta["formatVersion"] = 99
        with open(part, "w") as f:
            f.write(json.dumps(meta))
        _drop_crc(path)


@pytest.mark.parametrize("what, error, message", [
    ("truncated", DamagedSaveError, r"cannot read .*data: \[FAILED_READ_FILE.*\] .*part-.*parquet.*checksum error"),
    ("truncated-nocrc", DamagedSaveError, r"cannot read .*data: \[FAILED_READ_FILE.*\] .*part-.*parquet"),
    ("replaced-nocrc", DamagedSaveError, r"array 'weights' in .*data does not match the sha256 in the metadata"),
    ("json", DamagedSaveError, r"metadata is not valid JSON .* in .*metadata"),
    ("json-crc", DamagedSaveError, r"cannot read .*metadata: .*part-.*checksum error"),
    ("missing", MissingSaveFileError, r"array file .*data is missing"),
    ("version", DamagedSaveError, r"format version 99 in .*metadata is not one this version of sparkdl_hetero "
                                  r"reads \(1, 2\)"),
])
def test_damaged_save_is_a_clear_error(session, tmp_path, what, error, message):
    path = str(tmp_path / what)
    _save(session, _model(), path)
    _corrupt(path, what)
    with pytest.raises(error, match=message) as info:
        _load(session, path)
    assert path in str(info.value) and "at org.apache" not in str(info.value) and "Py4J" not in str(info.value)
    assert isinstance(info.value, ValueError)


def test_missing_save_and_format_1(session, tmp_path):
    with pytest.raises(MissingSaveFileError, match=r"cannot load DeepClassificationModel from .*nowhere: "
                                                   r".*metadata does not exist"):
        _load(session, str(tmp_path / "nowhere"))
    # a format-1 save (one .npy file per array) written by hand as the earlier version laid it out
    model, path = _model(4), str(tmp_path / "v1")
    _save(session, model, path)
    part = glob.glob(os.path.join(path, "metadata", "part-*"))[0]
    meta = json.loads(open(part).read())
    meta["formatVersion"], meta["arrays"] = 1, {"weights": "data/weights.npy"}
    shutil.rmtree(os.path.join(path, "data"))
    os.makedirs(os.path.join(path, "data"))
    np.save(os.path.join(path, "data", "weights.npy"), model.weights.toArray())
    with open(part, "w") as f:
        f.write(json.dumps(meta))
    _drop_crc(path)
    np.testing.assert_array_equal(_load(session, path).weights.toArray(), model.weights.toArray())
    with open(os.path.join(path, "data", "weights.npy"), "wb") as f:
        f.write(b"not a numpy file")
    with pytest.raises(DamagedSaveError, match=r"weights.npy is not a valid .npy file"):
        _load(session, path)


# ---- interop -----------------------------------------------------------------------------------------------------
def test_interop_with_spark_mlp_both_ways(session):
    x = _features()
    df = session.createDataFrame([(Vectors.dense(r), float(i % 3)) for i, r in enumerate(x)], ["features", "label"])
    spark_model = MultilayerPerceptronClassifier(layers=LAYERS, maxIter=10, seed=11).fit(df)
    ours = DeepClassificationModel.fromSpark(spark_model)
    assert ours.getLayers() == LAYERS and ours.getDtype() == "float64" and ours.getMaxIter() == 10
    spark_rows = spark_model.transform(df).select("rawPrediction", "probability").collect()
    for r, s in zip(x, spark_rows, strict=True):
        np.testing.assert_allclose(ours.predictRaw(Vectors.dense(r)).toArray(), s[0].toArray(), rtol=0, atol=1e-9)
        np.testing.assert_allclose(ours.predictProbability(Vectors.dense(r)).toArray(), s[1].toArray(),
                                   rtol=0, atol=1e-9)

    mine = _model(5)
    mine = mine.copy({mine.dtype: "float64", mine.solver: "adam", mine.predictionCol: "pred"})
    back = mine.toSpark()
    assert isinstance(back, MultilayerPerceptronClassificationModel)
    assert back.getLayers() == LAYERS and back.getPredictionCol() == "pred" and back.getSolver() == "l-bfgs"
    np.testing.assert_array_equal(back.weights.toArray(), mine.weights.toArray())
    back_rows = back.transform(df).select("rawPrediction", "probability", "pred").collect()
    for r, s in zip(x, back_rows, strict=True):
        np.testing.assert_allclose(mine.predictRaw(Vectors.dense(r)).toArray(), s[0].toArray(), rtol=0, atol=1e-9)
        np.testing.assert_allclose(mine.predictProbability(Vectors.dense(r)).toArray(), s[1].toArray(),
                                   rtol=0, atol=1e-9)
        assert mine.predict(Vectors.dense(r)) == s[2]


# ---- training in both session kinds ---------------------------------------------------------------------------------
def _blobs(session, n: int = 90):
    """Three learnable Gaussian blobs in 4 dimensions, in 2 partitions."""
    rng = np.random.default_rng(0)
    centers = rng.normal(scale=3.0, size=(3, LAYERS[0]))
    y = rng.integers(0, 3, n)
    x = centers[y] + rng.normal(size=(n, LAYERS[0]))
    return session.createDataFrame([(Vectors.dense(r), float(c)) for r, c in zip(x, y, strict=True)],
                                   ["features", "label"]).repartition(2), x, y


@pytest.mark.parametrize("solver, mode", [("l-bfgs", "treeAggregate"), ("adam", "barrier")])
def test_fit_transform_save_load(session, tmp_path, solver, mode):
    df, x, y = _blobs(session)
    clf = DeepClassifier(layers=LAYERS, solver=solver, maxIter=20, epochs=10, batchSize=16, stepSize=0.05, seed=3,
                         verbose=False)
    model = clf.fit(df)
    stats = model.summary.trainingStats
    assert stats["mode"] == mode and stats["modeReason"].startswith("mode='auto'")
    assert stats.get("fallbackPartitions", 0) == 0
    history = model.summary.objectiveHistory
    assert history[-1] < history[0]
    rows = model.transform(df).select("features", "probability", "prediction").collect()
    for r in rows:
        np.testing.assert_allclose(r["probability"].toArray(),
                                   model.predictProbability(r["features"]).toArray(), rtol=1e-5, atol=1e-6)
    assert np.mean([r["prediction"] == model.predict(r["features"]) for r in rows]) == 1.0
    path = str(tmp_path / "model")
    model.write().session(session).save(path)
    loaded = _load(session, path)
    np.testing.assert_array_equal(loaded.weights.toArray(), model.weights.toArray())
    again = loaded.transform(df).select("prediction").collect()
    assert [r["prediction"] for r in again] == [r["prediction"] for r in rows]


def test_gradient_and_the_rebuild_of_missing_blocks(session):
    """One treeAggregate evaluation equals the single-process gradient, also when every task finds no resident
    blocks (handles of another host) and recomputes its partition where it runs (classic: over the handles' RDD;
    Connect: through mapInArrow)."""
    df, x, y = _blobs(session, 60)
    objective = Objective(FeedForwardTopology.multilayer_perceptron(LAYERS, softmax_on_top=True))
    w = objective.initial_weights(1)
    reference = np.zeros(objective.num_weights)
    loss = FeedForwardModel(objective.topology, w, dtype=np.float64).compute_gradient(x, y, grad_out=reference)
    data = prepare(df, "features", "label", LAYERS[0], LAYERS[-1])
    try:
        trainer = TreeAggregateTrainer(data, objective, TrainConfig(verbose=False))
        g, loss_sum, n = trainer.evaluate(w, trainer.job(), "test")
        assert n == len(y) and trainer.fallbacks == 0
        np.testing.assert_allclose(g / n, reference, rtol=1e-4, atol=1e-6)  # float32 sums vs float64
        assert loss_sum / n == pytest.approx(loss, rel=1e-5)
        moved = dataclasses.replace(data, fit_id=data.fit_id + "-moved",
                                    handles_df=data.handles_df.withColumn("host", F.lit("elsewhere")))
        other = TreeAggregateTrainer(moved, objective, TrainConfig(verbose=False))
        g2, loss2, n2 = other.evaluate(w, other.job(), "fallback")
        assert other.fallbacks == 2 and n2 == n
        np.testing.assert_allclose(g2, g, rtol=1e-6, atol=1e-7)
        assert loss2 == pytest.approx(loss_sum, rel=1e-6)
        moved.release()
    finally:
        data.release()


def test_connect_evaluations_survive_a_lost_checkpoint_block(spark, connect):
    """Under Connect the evaluations run over a local checkpoint of the handle rows; when its blocks are gone (as
    with their executor), the next evaluation falls back to the persisted handles and gives the same gradient."""
    df, _, _ = _blobs(connect, 60)
    objective = Objective(FeedForwardTopology.multilayer_perceptron(LAYERS, softmax_on_top=True))
    w = objective.initial_weights(2)
    data = prepare(df, "features", "label", LAYERS[0], LAYERS[-1])
    persisted = spark.sparkContext._jsc.getPersistentRDDs()  # the one JVM both session kinds share
    before = set(persisted.keySet())
    try:
        trainer = TreeAggregateTrainer(data, objective, TrainConfig(verbose=False))
        g, loss, n = trainer.evaluate(w, trainer.job(), "over the checkpoint")
        checkpoints = [i for i in spark.sparkContext._jsc.getPersistentRDDs().keySet() if i not in before]
        assert checkpoints and trainer.eval_df is not data.handles_df
        for i in checkpoints:
            spark.sparkContext._jsc.getPersistentRDDs().get(i).unpersist(True)
        g2, loss2, n2 = trainer.evaluate(w, trainer.job(), "after the blocks are lost")
        assert trainer.eval_df is data.handles_df and n2 == n
        np.testing.assert_array_equal(g2, g)
        assert loss2 == loss
    finally:
        data.release()


def _weighted_blobs(session, n: int = 80):
    """Blobs with a weight column ``w`` and a validation indicator ``v``, in 2 partitions; the rows as arrays with
    the partition each is in (the features rounded to float32, as training reads them)."""
    rng = np.random.default_rng(4)
    centers = rng.normal(scale=3.0, size=(3, LAYERS[0]))
    y = rng.integers(0, 3, n)
    x = centers[y] + rng.normal(size=(n, LAYERS[0]))
    w = rng.uniform(0.5, 2.0, n)
    v = rng.random(n) < 0.25
    df = session.createDataFrame([(Vectors.dense(r), float(c), float(wi), bool(vi))
                                  for r, c, wi, vi in zip(x, y, w, v, strict=True)],
                                 ["features", "label", "w", "v"]).repartition(2)
    rows = df.withColumn("pid", F.spark_partition_id()).collect()
    x = np.array([r["features"].toArray() for r in rows]).astype(np.float32).astype(np.float64)
    return (df, x, np.array([int(r["label"]) for r in rows]), np.array([r["w"] for r in rows]),
            np.array([r["v"] for r in rows]), np.array([r["pid"] for r in rows]))


def test_weighted_sums_and_validation_rows(session):
    """With a weight column and a validation indicator, one evaluation answers the weighted gradient and loss sums
    of the training rows with the weights' sum as the count, and a validation the weighted mean loss and accuracy
    of the validation rows, as a single process computes them (classic: the handles' RDD; Connect: mapInArrow)."""
    df, x, y, w, v, _ = _weighted_blobs(session)
    objective = Objective(FeedForwardTopology.multilayer_perceptron(LAYERS, softmax_on_top=True))
    w0 = objective.initial_weights(2)
    model = FeedForwardModel(objective.topology, w0, dtype=np.float64)
    t = ~v
    reference = np.zeros(objective.num_weights)
    loss = model.compute_gradient(x[t], y[t], grad_out=reference, scale=t.sum(), sample_weight=w[t]) * t.sum()
    vloss = model.compute_gradient(x[v], y[v], sample_weight=w[v]) * v.sum() / w[v].sum()
    accuracy = float(w[v] @ (np.argmax(model.predict(x[v]), axis=1) == y[v])) / w[v].sum()
    data = prepare(df, "features", "label", LAYERS[0], LAYERS[-1], weight_col="w", validation_col="v")
    try:
        assert data.count == t.sum() and data.validation_count == v.sum()
        trainer = TreeAggregateTrainer(data, objective, TrainConfig(verbose=False, dtype="float64"))
        g, loss_sum, count = trainer.evaluate(w0, trainer.job(), "weighted")
        assert count == pytest.approx(w[t].sum(), rel=1e-12)
        np.testing.assert_allclose(g, reference, rtol=1e-9, atol=1e-12)
        assert loss_sum == pytest.approx(loss, rel=1e-9)
        got_loss, got_accuracy = trainer.validate(w0, 0)
        assert got_loss == pytest.approx(vloss, rel=1e-9)
        assert got_accuracy == pytest.approx(accuracy, rel=1e-12)
    finally:
        data.release()


def test_batchnorm_state_is_the_row_weighted_mean_of_the_partitions(session):
    """After one evaluation the model state (batch normalization's running statistics) is the row-weighted mean
    of the states each partition's pass leaves, starting from the initial state."""
    df, x, y, w, v, pid = _weighted_blobs(session)
    topology = FeedForwardTopology.from_spec("affine(5)-batchnorm-tanh-affine(3)", LAYERS[0])
    objective = Objective(topology)
    w0 = objective.initial_weights(3)
    initial = FeedForwardModel.initial_state(topology)
    expected = np.zeros_like(initial)
    for p in np.unique(pid[~v]):
        rows = (pid == p) & ~v
        model = FeedForwardModel(topology, w0, dtype=np.float64)
        model.set_state(initial)
        model.compute_gradient(x[rows], y[rows], sample_weight=w[rows])
        expected += model.get_state() * rows.sum()
    expected /= (~v).sum()
    data = prepare(df, "features", "label", LAYERS[0], LAYERS[-1], weight_col="w", validation_col="v")
    try:
        trainer = TreeAggregateTrainer(data, objective, TrainConfig(verbose=False, dtype="float64"))
        np.testing.assert_array_equal(trainer.model_state, initial)
        trainer.evaluate(w0, trainer.job(), "state")
        assert not np.allclose(trainer.model_state, initial)
        np.testing.assert_allclose(trainer.model_state, expected, rtol=1e-9, atol=1e-12)
    finally:
        data.release()


def test_pipeline_fit_save_load(session, tmp_path):
    from pyspark.ml import Pipeline, PipelineModel
    from pyspark.ml.feature import StandardScaler

    df, _, _ = _blobs(session)
    pipeline = Pipeline(stages=[StandardScaler(inputCol="features", outputCol="scaled"),
                                DeepClassifier(layers=LAYERS, featuresCol="scaled", maxIter=10, seed=1,
                                               verbose=False)])
    model = pipeline.fit(df)
    expected = [r["prediction"] for r in model.transform(df).select("prediction").collect()]
    path = str(tmp_path / "pipeline")
    model.write().save(path)
    loaded = PipelineModel.load(path)
    assert isinstance(loaded.stages[1], DeepClassificationModel)
    np.testing.assert_array_equal(loaded.stages[1].weights.toArray(), model.stages[1].weights.toArray())
    assert [r["prediction"] for r in loaded.transform(df).select("prediction").collect()] == expected


# ---- executors and slots -----------------------------------------------------------------------------------------
def test_probe_executors_from_a_session(session):
    accounts = probe_executors(session, "numpy", 2)
    assert len(accounts) == 2 and all(a.endswith(": numpy") and " partition " in a for a in accounts)


def test_task_slots_local(session):
    assert task_slots(session) == 2
    assert check_barrier_slots(session, None) == 2 and check_barrier_slots(session, 1) == 1
    with pytest.raises(ValueError, match=r"numWorkers=3 but the cluster runs only 2 tasks at once .* set "
                                         r"numWorkers <= 2, or give the application more executors or cores"):
        check_barrier_slots(session, 3)


@pytest.mark.spark  # starts its own local-cluster in a subprocess
@pytest.mark.slow
def test_one_core_cluster_with_default_params(tmp_path):
    """A one-executor, one-core cluster (where Spark's defaultParallelism says 2) has one slot: the estimator with
    default params fits there in both modes mode='auto' picks (l-bfgs: treeAggregate; adam: barrier on the one
    slot), and asking for more workers than slots is a ValueError naming both numbers before any training job."""
    script = tmp_path / "slots.py"
    script.write_text(textwrap.dedent("""
        import sys
        from pyspark.ml.linalg import Vectors
        from pyspark.sql import SparkSession
        from sparkdl_hetero.distributed.cluster import check_barrier_slots, task_slots
        from sparkdl_hetero.ml.classifier import DeepClassifier
        spark = (SparkSession.builder.master("local-cluster[1,1,1024]").config("spark.ui.enabled", "false")
                 .getOrCreate())
        try:
            check_barrier_slots(spark, 2)
        except ValueError as e:
            message = str(e)
        print("RESULT", task_slots(spark), check_barrier_slots(spark, 0), spark.sparkContext.defaultParallelism,
              "|", message)
        df = spark.createDataFrame([(Vectors.dense([i % 3, (i * 7) % 5, 1.0, -1.0]), float(i % 3))
                                    for i in range(60)], ["features", "label"]).repartition(2)
        for solver in ("l-bfgs", "adam"):
            model = DeepClassifier(layers=[4, 5, 3], solver=solver, maxIter=3, verbose=False).fit(df)
            stats = model.summary.trainingStats
            print("FIT", solver, stats["mode"], stats.get("numWorkers"), "|", stats["modeReason"])
        try:
            DeepClassifier(layers=[4, 5, 3], solver="adam", numWorkers=2, verbose=False).fit(df)
        except ValueError as e:
            print("OVERSUBSCRIBED", type(e).__name__, "|", e)
        spark.stop()
    """))
    env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("SPARK_CONNECT_MODE_ENABLED", None)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    lines = {ln.split()[0]: ln for ln in out.stdout.splitlines() if ln.split() and ln.split()[0].isupper()}
    assert "OVERSUBSCRIBED" in lines, out.stderr[-3000:]
    counts, message = lines["RESULT"].split("|", 1)
    assert counts.split()[1:] == ["1", "1", "2"]
    assert "numWorkers=2 but the cluster runs only 1 tasks at once" in message
    fits = [ln for ln in out.stdout.splitlines() if ln.startswith("FIT")]
    assert fits[0].split("|")[0].split() == ["FIT", "l-bfgs", "treeAggregate", "None"]
    assert fits[1].split("|")[0].split() == ["FIT", "adam", "barrier", "1"]
    assert "mode='auto' with the mini-batch solver 'adam'" in fits[1]
    assert lines["OVERSUBSCRIBED"].startswith("OVERSUBSCRIBED ValueError | numWorkers=2 but the cluster runs only 1 "
                                              "tasks at once")


@pytest.mark.spark  # starts its own local-cluster in a subprocess
@pytest.mark.slow
def test_training_stage_alone_asks_for_a_gpu_per_task(tmp_path):
    """Stage-level scheduling on a local-cluster whose worker has one (fake) GPU found by docker/gpu-discovery.sh:
    with backend auto, the training stage of every mode gets the GPU through its ResourceProfile and each task
    computes on what auto makes of that GPU (its account in the stats), an ETL stage gets none; asking for more GPUs
    than an executor has fails before training, naming the conf."""
    from sparkdl_hetero.distributed.placement import backend_for

    # what auto makes of GPU 0 on this machine (the executors run here): numpy, saying why cupy was passed over,
    # where cupy has no GPU
    auto_gpu0 = backend_for("auto", "0")[1]
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "nvidia-smi"
    fake.write_text("#!/bin/sh\nprintf '0\\n'\n")
    fake.chmod(0o755)
    script = tmp_path / "gpus.py"
    script.write_text(textwrap.dedent(f"""
        import pyarrow as pa
        from pyspark import TaskContext
        from pyspark.ml.linalg import Vectors
        from pyspark.sql import SparkSession
        from sparkdl_hetero.ml.classifier import DeepClassifier
        spark = (SparkSession.builder.master("local-cluster[1,2,1024]").config("spark.ui.enabled", "false")
                 .config("spark.worker.resource.gpu.amount", "1")
                 .config("spark.worker.resource.gpu.discoveryScript", {os.path.abspath("docker/gpu-discovery.sh")!r})
                 .config("spark.executor.resource.gpu.amount", "1").getOrCreate())

        def resources(batches):
            for _ in batches:
                pass
            yield pa.RecordBatch.from_pylist([{{"gpus": ",".join(sorted(TaskContext.get().resources()))}}])

        etl = spark.range(0, 4, 1, 2).mapInArrow(resources, "gpus string").collect()
        print("ETL", sorted(r["gpus"] for r in etl))
        df = spark.createDataFrame([(Vectors.dense([i % 3, (i * 7) % 5, 1.0, -1.0]), float(i % 3), i % 2)
                                    for i in range(60)], ["features", "label", "device"]).repartition(2)
        for solver, extra in (("l-bfgs", {{}}), ("adam", {{}}),
                              ("sgd", {{"mode": "federated", "deviceCol": "device", "rounds": 1}})):
            stats = DeepClassifier(layers=[4, 5, 3], solver=solver, maxIter=3, backend="auto", verbose=False,
                                   **extra).fit(df).summary.trainingStats
            # every mode: each task's (barrier: each rank's) backend account
            print("FIT", solver, stats["mode"], stats.get("numWorkers"), "|", " ; ".join(stats["backends"]))
        try:
            DeepClassifier(layers=[4, 5, 3], backend="auto", taskGpus=2, verbose=False).fit(df)
        except ValueError as e:
            print("TOOMANY", "|", e)
        spark.stop()
    """))
    env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}
    env.pop("SPARK_CONNECT_MODE_ENABLED", None)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    lines = [ln for ln in out.stdout.splitlines() if ln.split() and ln.split()[0] in ("ETL", "FIT", "TOOMANY")]
    assert len(lines) == 5, out.stdout[-2000:] + out.stderr[-3000:]
    assert lines[0] == "ETL ['', '']"  # Spark's default profile: ETL tasks hold no GPU
    assert auto_gpu0.endswith("[Spark assigned GPU 0]")
    if auto_gpu0.startswith("numpy"):
        assert auto_gpu0.startswith("numpy (passed over: cupy on GPU 0: ")
    for line, mode, workers in ((lines[1], "treeAggregate", "None"), (lines[2], "barrier", "1"),
                                (lines[3], "federated", "None")):
        head, accounts = line.split("|", 1)
        assert head.split()[2:] == [mode, workers]
        # "host pid N partition P: <what auto made of the GPU Spark assigned to the task>"
        assert accounts.strip() and all(a.strip().endswith(": " + auto_gpu0) for a in accounts.split(" ; "))
    assert lines[4] == ("TOOMANY | taskGpus=2 but each executor has spark.executor.resource.gpu.amount=1: set "
                        "taskGpus <= 1 (0: no GPUs), or give the executors GPUs (spark.executor.resource.gpu.amount "
                        "and a discovery script)")


# ---- datasets as Parquet -----------------------------------------------------------------------------------------
def _write_idx(path: str, a: np.ndarray) -> None:
    import gzip
    import struct

    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">BBBB", 0, 0, 0x08, a.ndim) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes())


def test_fashion_mnist_parquet_converts_once(session, tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    src.mkdir()
    data = {}
    for split, n in (("train", 5), ("t10k", 3)):
        images, labels = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n, np.uint8)
        _write_idx(str(src / f"{split}-images-idx3-ubyte.gz"), images)
        _write_idx(str(src / f"{split}-labels-idx1-ubyte.gz"), labels)
        data[split] = (images, labels)
    train, test = fashion_mnist_parquet(str(tmp_path / "pq"), str(src))
    for path, (images, labels) in ((train, data["train"]), (test, data["t10k"])):
        rows = session.read.parquet(path).collect()
        x = np.array([r["features"] for r in rows], dtype=np.float32)
        np.testing.assert_array_equal(x, images.reshape(len(images), -1).astype(np.float32) / np.float32(255))
        np.testing.assert_array_equal([r["label"] for r in rows], labels.astype(np.float64))
    assert dict(session.read.parquet(train).dtypes) == {"features": "array<float>", "label": "double"}
    shutil.rmtree(src)  # a complete conversion is reused: the source is not read again
    assert fashion_mnist_parquet(str(tmp_path / "pq"), str(src)) == (train, test)
    os.remove(os.path.join(test, "_SUCCESS"))  # an interrupted conversion is redone (and needs its source)
    with pytest.raises(FileNotFoundError, match="Fashion-MNIST not found"):
        fashion_mnist_parquet(str(tmp_path / "pq"), str(src))
