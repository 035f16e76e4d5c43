"""DeepClassifier / DeepClassificationModel as Spark ML stages, against Spark's own MultilayerPerceptronClassifier."""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest
from pyspark.ml import Pipeline, PipelineModel
from pyspark.ml.classification import MultilayerPerceptronClassificationModel, MultilayerPerceptronClassifier
from pyspark.ml.evaluation import MulticlassClassificationEvaluator
from pyspark.ml.feature import StandardScaler
from pyspark.ml.linalg import DenseVector, Vectors, VectorUDT
from pyspark.ml.tuning import CrossValidator, CrossValidatorModel, ParamGridBuilder
from pyspark.sql.types import DoubleType

from sparkdl_hetero.ml import DeepClassificationModel, DeepClassifier
from sparkdl_hetero.ml.params import KNOBS_NOT_PARAMS, SPARK_DEFAULT_PARAMS
from sparkdl_hetero.nn.config import KNOBS
from sparkdl_hetero.nn.topology import FeedForwardTopology

LAYERS = [4, 5, 4, 3]
SMALL_CNN = "conv(2,3)-relu-maxpool(2)-flatten-affine(3)"


@pytest.fixture(scope="module")
def iris(spark, spark_data_dir):
    """Spark's sample_multiclass_classification_data.txt (150 rows, 4 features, 3 classes), 60/40 as Spark's
    MLP example splits it."""
    df = spark.read.format("libsvm").load(os.path.join(spark_data_dir, "sample_multiclass_classification_data.txt"))
    train, test = df.randomSplit([0.6, 0.4], 1234)
    return df.cache(), train.cache(), test.cache()


def _mlp_forward(sizes: list[int], w: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Spark's MLP in plain NumPy: (rawPrediction, probability), float64, straight from the weight layout."""
    a, o = x, 0
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        W = w[o:o + n_in * n_out].reshape(n_in, n_out)  # column-major numOut x numIn == row-major (numIn, numOut)
        b = w[o + n_in * n_out:o + n_in * n_out + n_out]
        o += n_in * n_out + n_out
        a = a @ W + b
        if i < len(sizes) - 2:
            a = 1.0 / (1.0 + np.exp(-a))
    e = np.exp(a - a.max(axis=1, keepdims=True))
    return a, e / e.sum(axis=1, keepdims=True)


def _random_model(seed: int = 0, sizes: list[int] = LAYERS) -> DeepClassificationModel:
    topo = FeedForwardTopology.multilayer_perceptron(sizes)
    return DeepClassificationModel(topo, np.random.default_rng(seed).normal(size=topo.num_weights))


def _outputs(df, cols=("rawPrediction", "probability", "prediction")) -> list[np.ndarray]:
    rows = df.orderBy("id").select(*cols).collect() if "id" in df.columns else df.select(*cols).collect()
    return [np.array([r[c].toArray() if hasattr(r[c], "toArray") else r[c] for r in rows]) for c in cols]


# ---- params ---------------------------------------------------------------------------------------------------
def test_params_and_defaults_equal_spark_mlp(spark):
    ours, spark = DeepClassifier(), MultilayerPerceptronClassifier()
    for p in spark.params:
        assert ours.hasParam(p.name), f"DeepClassifier lacks Spark MLP's param {p.name}"
        if p.name == "seed":  # both default to a hash of the class name
            assert ours.hasDefault("seed") and spark.hasDefault("seed")
            continue
        assert ours.hasDefault(p.name) == spark.hasDefault(p.name), p.name
        if spark.hasDefault(p.name):
            assert ours.getOrDefault(p.name) == spark.getOrDefault(p.name), p.name
    assert (ours.getMaxIter(), ours.getTol(), ours.getBlockSize(), ours.getSolver(), ours.getStepSize()) == \
        (100, 1e-6, 128, "l-bfgs", 0.03)
    # extras carry TrainConfig's defaults and map onto it
    cfg = DeepClassifier(layers=[2, 2], solver="adam", epochs=3, beta1=0.8, nesterov=True, seed=7)._train_config()
    assert (cfg.solver, cfg.epochs, cfg.beta1, cfg.nesterov, cfg.seed, cfg.maxIter, cfg.batchSize) == \
        ("adam", 3, 0.8, True, 7, 100, 64)


def test_every_knob_is_a_param_with_its_default_and_every_param_is_known():
    """TrainConfig's knobs and the estimator's params cannot drift: same names, same defaults, the knob's doc."""
    est = DeepClassifier()
    names = {p.name for p in est.params}
    for k in KNOBS:
        if k.name in KNOBS_NOT_PARAMS:
            assert k.name not in names
            continue
        assert k.name in names, f"knob {k.name} has no param"
        if k.name not in SPARK_DEFAULT_PARAMS:
            assert est.getOrDefault(k.name) == k.default, k.name
        spark_shared = {"seed", "maxIter", "tol", "stepSize", "regParam"}  # pyspark's HasX params keep their docs
        assert k.name in spark_shared or est.getParam(k.name).doc.startswith(k.doc), k.name
    # every other param is Spark's (columns, thresholds, layers, initialWeights), the network's, the mentor's or a
    # federated column
    others = {"featuresCol", "labelCol", "predictionCol", "probabilityCol", "rawPredictionCol", "thresholds",
              "weightCol", "validationIndicatorCol", "layers", "initialWeights", "topology", "inputShape", "mentor",
              "distillAlpha", "temperature", "hintLayers", "hintWeights", "deviceCol"}
    assert names - {k.name for k in KNOBS} == others
    # a param set by name reaches the TrainConfig of the fit, converted to the knob's type
    cfg = DeepClassifier(maxIter=7.0, commTimeout=5, balance=False, allReduce="ring")._train_config()
    assert (cfg.maxIter, cfg.commTimeout, cfg.balance, cfg.allReduce) == (7, 5.0, False, "ring")
    assert type(cfg.maxIter) is int and type(cfg.commTimeout) is float
    assert DeepClassifier().blockSize.doc.startswith("Accepted for compatibility with Spark's "
                                                     "MultilayerPerceptronClassifier only")


def test_constructor_setters_and_copy_semantics():
    est = DeepClassifier(layers=LAYERS, blockSize=1, seed=123, topology="", backend="numpy")
    assert est.setMaxIter(7) is est and est.getMaxIter() == 7
    assert est.setLayers([2, 3, 2]).getLayers() == [2, 3, 2]
    other = est.copy({est.maxIter: 50, est.stepSize: 0.5})
    assert (other.getMaxIter(), other.getStepSize(), est.getMaxIter(), est.getStepSize()) == (50, 0.5, 7, 0.03)
    assert other.uid == est.uid
    with pytest.raises(TypeError, match="has no param 'nonsense'"):
        DeepClassifier(nonsense=1)
    with pytest.raises(TypeError, match="layers"):
        DeepClassifier(layers="four")


# ---- the model without training --------------------------------------------------------------------------------
def test_transform_matches_numpy_reference_and_spark_columns(iris):
    df, _, _ = iris
    model = _random_model().setDtype("float64")
    out = model.transform(df)
    schema = {f.name: f.dataType for f in out.schema.fields}
    assert isinstance(schema["rawPrediction"], VectorUDT) and isinstance(schema["probability"], VectorUDT)
    assert isinstance(schema["prediction"], DoubleType)
    assert out.columns == ["label", "features", "rawPrediction", "probability", "prediction"]
    rows = out.collect()
    x = np.array([r.features.toArray() for r in rows])
    raw, prob = _mlp_forward(LAYERS, model.weights.toArray(), x)
    np.testing.assert_allclose([r.rawPrediction.toArray() for r in rows], raw, rtol=0, atol=1e-12)
    np.testing.assert_allclose([r.probability.toArray() for r in rows], prob, rtol=0, atol=1e-12)
    assert [r.prediction for r in rows] == prob.argmax(axis=1).astype(float).tolist()
    # single-row API agrees with transform
    r0 = rows[0]
    np.testing.assert_allclose(model.predictRaw(r0.features).toArray(), raw[0], atol=1e-12)
    np.testing.assert_allclose(model.predictProbability(r0.features).toArray(), prob[0], atol=1e-12)
    assert model.predict(r0.features) == r0.prediction
    assert (model.numFeatures, model.numClasses, model.weights.size, model.getLayers()) == (4, 3, 64, LAYERS)


def test_transform_float32_array_features_thresholds_and_output_cols(spark):
    model = _random_model(1)
    x = np.random.default_rng(2).normal(size=(50, 4))
    df = spark.createDataFrame([(i, [float(v) for v in row]) for i, row in enumerate(x)], ["id", "features"])
    raw32, prob32, _ = _outputs(model.transform(df))
    raw, prob = _mlp_forward(LAYERS, model.weights.toArray(), x)
    np.testing.assert_allclose(raw32, raw, atol=1e-5)
    np.testing.assert_allclose(prob32, prob, atol=1e-5)
    # thresholds as Spark defines them: argmax of probability / threshold
    t = [0.9, 0.2, 0.5]
    (pred,) = _outputs(model.copy({model.thresholds: t}).transform(df), ("prediction",))
    np.testing.assert_array_equal(pred, (prob / np.array(t)).argmax(axis=1))
    # an empty output column name skips that column, as in Spark
    only = model.copy({model.rawPredictionCol: "", model.probabilityCol: ""}).transform(df)
    assert only.columns == ["id", "features", "prediction"]
    with pytest.raises(ValueError, match="output column 'prediction' already exists"):
        model.transform(only)
    with pytest.raises(ValueError, match=r"features column 'id' must be a Vector or an array of numbers, got bigint"):
        model.copy({model.featuresCol: "id"}).transform(df)
    with pytest.raises(ValueError, match=r"thresholds must have one value per class \(3\), got 2"):
        model.copy({model.thresholds: [0.5, 0.5]}).transform(df)
    with pytest.raises(ValueError, match="^dtype must be one of float32, float64, got 'float16'$"):
        model.copy().setDtype("float16").transform(df)
    with pytest.raises(ValueError, match="^backend must be one of numpy, opencl, cupy, auto, got 'tpu'$"):
        model.copy().setBackend("tpu").transform(df)


def test_cnn_model_transform_and_save_load(spark, tmp_path):
    topo = FeedForwardTopology.from_spec(SMALL_CNN, (1, 6, 6))
    model = DeepClassificationModel(topo, np.random.default_rng(3).normal(size=topo.num_weights) * 0.3)
    x = np.random.default_rng(4).normal(size=(20, 36))
    df = spark.createDataFrame([(i, Vectors.dense(row)) for i, row in enumerate(x)], ["id", "features"])
    raw, prob, pred = _outputs(model.transform(df))
    from sparkdl_hetero.nn.model import FeedForwardModel

    ref = FeedForwardModel(topo, model.weights.toArray(), dtype=np.float64)
    np.testing.assert_allclose(prob, ref.predict(x), atol=1e-5)
    assert not model.isDefined(model.layers)
    path = str(tmp_path / "cnn")
    model.write().save(path)
    loaded = DeepClassificationModel.load(path)
    assert loaded.getTopology() == topo.spec and loaded.getInputShape() == [1, 6, 6]
    np.testing.assert_array_equal(_outputs(loaded.transform(df))[1], prob)
    with pytest.raises(ValueError, match=r"toSpark needs a Spark MLP topology .* this model's topology is "
                                         r"'conv\(2,3"):
        model.toSpark()


def test_transform_on_the_opencl_backend(spark):
    """The model's backend computes the predictions on the executors (PoCL's OpenCL CPU device here)."""
    topo = FeedForwardTopology.from_spec(SMALL_CNN, (1, 6, 6))
    model = DeepClassificationModel(topo, np.random.default_rng(7).normal(size=topo.num_weights) * 0.3)
    x = np.random.default_rng(8).normal(size=(30, 36))
    df = spark.createDataFrame([(i, Vectors.dense(row)) for i, row in enumerate(x)], ["id", "features"])
    on_numpy = _outputs(model.transform(df))
    on_opencl = _outputs(model.copy().setBackend("opencl").transform(df))
    np.testing.assert_allclose(on_opencl[0], on_numpy[0], atol=1e-4)
    np.testing.assert_allclose(on_opencl[1], on_numpy[1], atol=1e-5)
    with pytest.raises(ValueError, match="backend must be one of numpy, opencl, cupy, auto, got 'tpu'"):
        model.copy().setBackend("tpu").transform(df)


def test_model_constructor_rejects_wrong_weights():
    topo = FeedForwardTopology.multilayer_perceptron(LAYERS)
    with pytest.raises(ValueError, match=r"has 64 weights, got 63"):
        DeepClassificationModel(topo, np.zeros(63))
    with pytest.raises(ValueError, match="weights must be finite; got 1 NaN/inf"):
        DeepClassificationModel(topo, np.r_[np.zeros(63), np.nan])


# ---- interop -----------------------------------------------------------------------------------------------------
def test_interop_with_spark_mlp_both_ways(iris):
    df, train, _ = iris
    spark_model = MultilayerPerceptronClassifier(layers=LAYERS, maxIter=20, seed=11).fit(train)
    ours = DeepClassificationModel.fromSpark(spark_model)
    assert ours.getLayers() == LAYERS and ours.getDtype() == "float64" and ours.getMaxIter() == 20
    for a, b in zip(_outputs(ours.transform(df)), _outputs(spark_model.transform(df)), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-9)

    mine = _random_model(5)
    mine = mine.copy({mine.dtype: "float64", mine.solver: "adam", mine.predictionCol: "pred"})
    back = mine.toSpark()
    assert isinstance(back, MultilayerPerceptronClassificationModel)
    assert back.getLayers() == LAYERS and back.getPredictionCol() == "pred" and back.getSolver() == "l-bfgs"
    np.testing.assert_array_equal(back.weights.toArray(), mine.weights.toArray())
    cols = ("rawPrediction", "probability", "pred")
    for a, b in zip(_outputs(mine.transform(df), cols), _outputs(back.transform(df), cols), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-9)
    with pytest.raises(TypeError, match="fromSpark expects a pyspark MultilayerPerceptronClassificationModel"):
        DeepClassificationModel.fromSpark(mine)


# ---- training through the estimator ------------------------------------------------------------------------------
def _mlp_program(cls, train, test) -> tuple[float, object]:
    """A program written for MultilayerPerceptronClassifier (Spark's example), parameterized by the class."""
    trainer = cls(maxIter=100, layers=LAYERS, blockSize=128, seed=1234)
    model = trainer.fit(train)
    result = model.transform(test)
    evaluator = MulticlassClassificationEvaluator(metricName="accuracy")
    accuracy = evaluator.evaluate(result.select("prediction", "label"))
    assert model.weights.size == 64 and model.getLayers() == LAYERS and model.numFeatures == 4
    summary = model.summary()
    if cls is DeepClassifier:  # l-bfgs history: the initial loss, then one per iteration
        assert summary.totalIterations == len(summary.objectiveHistory) - 1 >= 1
    else:
        assert summary.totalIterations >= 1 and summary.objectiveHistory
    return accuracy, model


def test_pyspark_mlp_docstring_program_with_our_classes(spark, tmp_path):
    """The example in pyspark's MultilayerPerceptronClassifier docstring, run with our classes under its names."""
    MLPC, MLPCModel = DeepClassifier, DeepClassificationModel  # noqa: N806 -- the program's names
    df = spark.createDataFrame([(0.0, Vectors.dense([0.0, 0.0])), (1.0, Vectors.dense([0.0, 1.0])),
                                (1.0, Vectors.dense([1.0, 0.0])), (0.0, Vectors.dense([1.0, 1.0]))],
                               ["label", "features"])
    mlp = MLPC(layers=[2, 2, 2], seed=123, verbose=False)
    assert mlp.setMaxIter(100) is mlp and mlp.getMaxIter() == 100 and mlp.getBlockSize() == 128
    assert mlp.setBlockSize(1).getBlockSize() == 1
    model = mlp.fit(df)
    assert model.setFeaturesCol("features") is model
    assert (model.getMaxIter(), model.getLayers(), model.weights.size) == (100, [2, 2, 2], 12)
    test_df = spark.createDataFrame([(Vectors.dense([1.0, 0.0]),), (Vectors.dense([0.0, 0.0]),)], ["features"])
    head = test_df.head().features
    assert model.predict(head) == float(np.argmax(model.predictProbability(head).toArray()))
    assert model.predictRaw(head).size == 2 and sum(model.predictProbability(head)) == pytest.approx(1.0)
    assert [r.prediction for r in model.transform(test_df).collect()][0] == model.predict(head)
    mlp.save(str(tmp_path / "mlp"))
    mlp2 = MLPC.load(str(tmp_path / "mlp"))
    assert mlp2.getBlockSize() == 1
    model.save(str(tmp_path / "mlp_model"))
    model2 = MLPCModel.load(str(tmp_path / "mlp_model"))
    assert model.getLayers() == model2.getLayers() and model.weights == model2.weights
    assert model.transform(test_df).take(1) == model2.transform(test_df).take(1)
    model3 = mlp2.setInitialWeights(list(range(0, 12))).fit(df)
    assert model3.weights != model2.weights and model3.getLayers() == model.getLayers()


def test_reaches_spark_mlp_accuracy_on_spark_example(iris):
    _, train, test = iris
    spark_acc, _ = _mlp_program(MultilayerPerceptronClassifier, train, test)
    our_acc, model = _mlp_program(DeepClassifier, train, test)
    assert our_acc >= spark_acc - 1e-9, (our_acc, spark_acc)
    assert our_acc > 0.9
    hist = model.summary.objectiveHistory
    assert hist[-1] < 0.1 * hist[0] and model.summary.totalIterations == len(hist) - 1
    stats = model.summary.trainingStats
    assert stats["mode"] == "treeAggregate" and stats["solver"] == "l-bfgs" and stats["backends"]
    # evaluate() and the training summary agree with Spark's evaluator
    ev = model.evaluate(test)
    preds = model.transform(test)
    for metric, value in [("accuracy", ev.accuracy), ("weightedPrecision", ev.weightedPrecision),
                          ("weightedRecall", ev.weightedRecall), ("f1", ev.weightedFMeasure())]:
        assert value == pytest.approx(MulticlassClassificationEvaluator(metricName=metric).evaluate(preds),
                                      abs=1e-12), metric
    assert ev.labels == [0.0, 1.0, 2.0] and ev.accuracy == pytest.approx(our_acc)
    assert model.summary.accuracy == pytest.approx(
        MulticlassClassificationEvaluator(metricName="accuracy").evaluate(model.transform(train)))


def test_pipeline_fit_save_load(iris, tmp_path):
    _, train, test = iris
    scaler = StandardScaler(inputCol="features", outputCol="scaled")
    clf = DeepClassifier(layers=[4, 6, 3], featuresCol="scaled", solver="adam", stepSize=0.05, epochs=15,
                         batchSize=16, seed=3, verbose=False)
    pipe = Pipeline(stages=[scaler, clf])
    pm = pipe.fit(train)
    assert isinstance(pm.stages[-1], DeepClassificationModel)
    before = pm.transform(test)
    acc = MulticlassClassificationEvaluator(metricName="accuracy").evaluate(before)
    assert acc > 0.8
    pipe.write().save(str(tmp_path / "pipe"))
    pipe2 = Pipeline.load(str(tmp_path / "pipe"))
    assert isinstance(pipe2.getStages()[1], DeepClassifier) and pipe2.getStages()[1].getEpochs() == 15
    pm.write().save(str(tmp_path / "pm"))
    pm2 = PipelineModel.load(str(tmp_path / "pm"))
    assert isinstance(pm2.stages[-1], DeepClassificationModel)
    for a, b in zip(_outputs(before), _outputs(pm2.transform(test)), strict=True):
        np.testing.assert_array_equal(a, b)


def test_cross_validator_with_param_grid(iris, tmp_path):
    _, train, test = iris
    clf = DeepClassifier(layers=LAYERS, seed=1234, verbose=False)
    grid = ParamGridBuilder().addGrid(clf.maxIter, [1, 60]).build()
    cv = CrossValidator(estimator=clf, estimatorParamMaps=grid, numFolds=2, seed=7,
                        evaluator=MulticlassClassificationEvaluator(metricName="accuracy"))
    cvm = cv.fit(train)
    assert len(cvm.avgMetrics) == 2 and cvm.avgMetrics[1] > cvm.avgMetrics[0]
    best = cvm.bestModel
    assert isinstance(best, DeepClassificationModel) and best.getMaxIter() == 60
    assert clf.getMaxIter() == 100  # the grid's values went to copies
    assert MulticlassClassificationEvaluator(metricName="accuracy").evaluate(cvm.transform(test)) > 0.85
    cvm.write().save(str(tmp_path / "cvm"))
    loaded = CrossValidatorModel.load(str(tmp_path / "cvm"))
    assert loaded.avgMetrics == cvm.avgMetrics and isinstance(loaded.bestModel, DeepClassificationModel)
    np.testing.assert_array_equal(loaded.bestModel.weights.toArray(), best.weights.toArray())


def test_cnn_through_the_estimator(spark):
    rng = np.random.default_rng(0)
    n, k = 240, 3
    y = rng.integers(0, k, n)
    x = rng.normal(scale=0.3, size=(n, 1, 6, 6))
    for c in range(k):  # class c: a bright column at position 2c
        x[y == c, 0, :, 2 * c] += 2.0
    df = spark.createDataFrame([(float(lbl), Vectors.dense(row.ravel())) for lbl, row in zip(y, x, strict=True)],
                               ["label", "features"]).repartition(2)
    clf = DeepClassifier(topology=SMALL_CNN, inputShape=[1, 6, 6], solver="adam", stepSize=0.02, epochs=8,
                         batchSize=32, seed=1, verbose=False)
    model = clf.fit(df)
    assert model.getInputShape() == [1, 6, 6]
    assert model.getTopology() == FeedForwardTopology.from_spec(SMALL_CNN, (1, 6, 6)).spec
    assert not model.isDefined(model.layers) and model.numFeatures == 36 and model.numClasses == 3
    assert model.evaluate(df).accuracy > 0.95
    with pytest.raises(ValueError, match=r"layer 0 \(conv\(2,3,.*with input shape \(36,\): .*needs an image input"):
        DeepClassifier(topology=SMALL_CNN).fit(df)  # no inputShape: the flat vector size cannot feed a conv


def test_bad_input_errors_before_training(spark, iris):
    df, _, _ = iris
    with pytest.raises(ValueError, match="set layers .* or topology"):
        DeepClassifier().fit(df)
    with pytest.raises(ValueError, match=r"features column 'pixels' not found"):
        DeepClassifier(layers=LAYERS, featuresCol="pixels").fit(df)
    with pytest.raises(ValueError, match=r"features column 'features' has .*rows of size 4.*takes 5 inputs"):
        DeepClassifier(layers=[5, 3]).fit(df)
    with pytest.raises(ValueError, match=r"label column 'label' has \d+ values that are not integer class indices "
                                         r"in \[0, 2\)"):
        DeepClassifier(layers=[4, 2]).fit(df)
    with pytest.raises(ValueError, match="solver must be one of l-bfgs, gd, sgd, momentum, adam, got 'newton'"):
        DeepClassifier(layers=LAYERS, solver="newton").fit(df)
    with pytest.raises(ValueError, match="backend must be one of numpy, opencl, cupy, auto, got 'tpu'"):
        DeepClassifier(layers=LAYERS, backend="tpu").fit(df)
    with pytest.raises(ValueError, match="dtype must be one of float32, float64, got 'float16'"):
        DeepClassifier(layers=LAYERS, dtype="float16").fit(df)
    with pytest.raises(ValueError, match="^batchSize must be >= 1, got 0$"):
        DeepClassifier(layers=LAYERS, batchSize=0).fit(df)
    with pytest.raises(ValueError, match=r"^validationFraction must be in \[0, 1\), got 1.0$"):
        DeepClassifier(layers=LAYERS, mode="barrier", validationFraction=1.0).fit(df)
    with pytest.raises(ValueError, match=r"label column 'label' has 50 values that are not integer class indices "
                                         r"in \[0, 3\) \(first found: -1.0\)"):
        DeepClassifier(layers=LAYERS).fit(df.selectExpr("label - 1 AS label", "features"))
    nan = spark.createDataFrame([(0.0, Vectors.dense([1.0, 2.0, float("nan"), 0.0])),
                                 (1.0, Vectors.dense([1.0, 2.0, 3.0, 4.0]))], ["label", "features"])
    with pytest.raises(ValueError, match=r"features column 'features' has 1 non-finite values \(first found: nan\)"):
        DeepClassifier(layers=LAYERS).fit(nan)
    with pytest.raises(ValueError, match=r"initialWeights has 3 values but topology .* needs 64"):
        DeepClassifier(layers=LAYERS, initialWeights=[0.0, 1.0, 2.0]).fit(df)
    with pytest.raises(ValueError, match="empty"):
        DeepClassifier(layers=LAYERS).fit(df.limit(0))
    with pytest.raises(ValueError, match=r"layer 0 .*conv"):
        DeepClassifier(topology="conv(2,9)-flatten-affine(3)", inputShape=[1, 2, 2]).fit(df)


def test_initial_weights_are_used(iris):
    _, train, _ = iris
    w0 = np.random.default_rng(9).uniform(-0.5, 0.5, 64)
    model = DeepClassifier(layers=LAYERS, maxIter=0, initialWeights=DenseVector(w0), verbose=False).fit(train)
    np.testing.assert_array_equal(model.weights.toArray(), w0)


def test_resume_from_checkpoint(iris, tmp_path):
    _, train, _ = iris
    ckpt = str(tmp_path / "ckpt")
    # treeAggregate resumes exactly (barrier mode, auto's choice for adam, balances batch shares by measured speed)
    common = dict(layers=LAYERS, solver="adam", mode="treeAggregate", stepSize=0.05, batchSize=16, seed=5,
                  verbose=False)
    straight = DeepClassifier(epochs=4, **common).fit(train)
    first = DeepClassifier(epochs=2, checkpointDir=ckpt, checkpointInterval=1, **common).fit(train)
    assert os.listdir(ckpt)
    resumed = DeepClassifier(epochs=4, checkpointDir=ckpt, checkpointInterval=1, **common).fit(train)
    assert resumed.summary.objectiveHistory[:2] == pytest.approx(first.summary.objectiveHistory)
    np.testing.assert_allclose(resumed.weights.toArray(), straight.weights.toArray(), rtol=1e-6, atol=1e-7)


# ---- persistence -------------------------------------------------------------------------------------------------
def test_save_load_model_and_estimator(iris, tmp_path):
    df, _, _ = iris
    topo = FeedForwardTopology.multilayer_perceptron(LAYERS)
    model = DeepClassificationModel(topo, np.random.default_rng(6).normal(size=64), objectiveHistory=[1.0, 0.5, 0.25],
                                    totalIterations=2)
    model = model.copy({model.probabilityCol: "p"})
    path = str(tmp_path / "m")
    model.write().save(path)
    files = sorted(os.path.relpath(f, path) for f in glob.glob(path + "/**/*", recursive=True) if os.path.isfile(f))
    assert any(f.startswith("data/") and f.endswith(".parquet") for f in files)
    assert all(not f.endswith((".pkl", ".pickle")) for f in files)
    loaded = DeepClassificationModel.load(path)
    assert loaded.uid == model.uid and loaded.getProbabilityCol() == "p" and loaded.getLayers() == LAYERS
    assert loaded.summary.objectiveHistory == [1.0, 0.5, 0.25] and loaded.summary.totalIterations == 2
    with pytest.raises(RuntimeError, match="use model.evaluate"):
        _ = loaded.summary.accuracy
    np.testing.assert_array_equal(loaded.weights.toArray(), model.weights.toArray())
    cols = ("rawPrediction", "p", "prediction")
    for a, b in zip(_outputs(model.transform(df), cols), _outputs(loaded.transform(df), cols), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(Exception, match="already exists"):
        model.write().save(path)
    model.write().overwrite().save(path)

    est = DeepClassifier(layers=LAYERS, solver="momentum", nesterov=True, initialWeights=np.arange(64.0),
                         checkpointDir="/tmp/x", thresholds=[0.2, 0.3, 0.5])
    est.write().save(str(tmp_path / "est"))
    est2 = DeepClassifier.load(str(tmp_path / "est"))
    assert est2.uid == est.uid
    assert {p.name: v for p, v in est2.extractParamMap().items() if p.name != "initialWeights"} == \
        {p.name: v for p, v in est.extractParamMap().items() if p.name != "initialWeights"}
    np.testing.assert_array_equal(est2.getInitialWeights().toArray(), np.arange(64.0))


# damaged saves (truncated, edited without checksums, broken JSON, missing files): tests/test_connect.py, in
# both session kinds


def test_load_wrong_path_or_class(tmp_path, spark):
    with pytest.raises(FileNotFoundError, match=r"cannot load DeepClassificationModel from .*nowhere.*metadata "
                                                r"does not exist"):
        DeepClassificationModel.load(str(tmp_path / "nowhere"))
    DeepClassifier(layers=LAYERS).write().save(str(tmp_path / "est"))
    with pytest.raises(ValueError, match=r"holds a sparkdl_hetero.ml.classifier.DeepClassifier, not a "
                                         r"sparkdl_hetero.ml.classifier.DeepClassificationModel"):
        DeepClassificationModel.load(str(tmp_path / "est"))
    # a metadata file claiming a topology that does not parse
    _random_model().write().save(str(tmp_path / "m"))
    part = glob.glob(str(tmp_path / "m" / "metadata" / "part-*"))[0]
    meta = json.loads(open(part).read())
    meta["paramMap"]["topology"] = "affine(5)-wobble"
    with open(part, "w") as f:
        f.write(json.dumps(meta))
    for crc in glob.glob(str(tmp_path / "m" / "metadata" / ".*.crc")):
        os.remove(crc)
    with pytest.raises(ValueError, match="unknown layer 'wobble'"):
        DeepClassificationModel.load(str(tmp_path / "m"))
