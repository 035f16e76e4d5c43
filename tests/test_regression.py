"""Regression losses (squared error, Huber) and per-row sample weights: the engine against finite differences and
hand-computed values, the backends against each other."""

from __future__ import annotations

import math

import numpy as np
import pytest
from _helpers import numeric_grad

from sparkdl_hetero.backends import BackendUnavailable, get_backend
from sparkdl_hetero.backends.base import Backend
from sparkdl_hetero.nn.layers import Huber, SpecError, SquaredError
from sparkdl_hetero.nn.model import FeedForwardModel
from sparkdl_hetero.nn.topology import FeedForwardTopology

NP = get_backend("numpy")
REF = get_backend("numpy", reference=True)


def _weighted_objective(model: FeedForwardModel, x, y, w):
    """f(weights) = sum_i w_i loss_i / n, computed row by row from the forward outputs."""
    def f(weights):
        model.set_weights(weights)
        z = model.backend.to_host(model.forward(x)[-1])
        t = np.asarray(y, dtype=np.float64).reshape(len(x), -1)
        e = z - t
        top = model.topology.loss_layer
        if isinstance(top, Huber):
            per = np.where(np.abs(e) <= top.delta, 0.5 * e * e, top.delta * (np.abs(e) - 0.5 * top.delta))
        else:
            per = 0.5 * e * e
        return float((per.sum(axis=1) * w).sum() / len(x))
    return f


# ---- the loss layers ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss", ["squared_error", "huber(0.3)"])
@pytest.mark.parametrize("outputs", [1, 3])
def test_regression_gradient_matches_finite_differences(loss: str, outputs: int) -> None:
    rng = np.random.default_rng(outputs)
    x = rng.normal(size=(7, 4))
    y = rng.normal(size=(7,)) * 2 if outputs == 1 else rng.normal(size=(7, outputs)) * 2
    w = rng.uniform(0, 3, size=7)
    w[2] = 0.0  # a zero weight is allowed: the row counts for nothing
    top = FeedForwardTopology.from_spec(f"affine(5)-tanh-affine({outputs})-{loss}", 4)
    model = FeedForwardModel(top, seed=1, dtype=np.float64)
    w0 = model.get_weights()
    f = _weighted_objective(model, x, y, w)
    numeric = numeric_grad(f, w0)
    model.set_weights(w0)
    model.zero_grad()
    loss_value = model.compute_gradient(x, y, sample_weight=w)
    analytic = model.get_gradient()
    assert np.abs(analytic).max() > 1e-6
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-9)
    assert loss_value == pytest.approx(f(w0), rel=1e-12)


def test_huber_is_quadratic_inside_linear_outside_by_hand() -> None:
    z = np.array([[0.0, 2.0], [1.0, -3.0]])
    t = np.array([[0.5, 0.0], [1.0, 0.0]])
    # errors -0.5 (inside, 0.125), 2 (outside, 1 * (2 - 0.5) = 1.5), 0 (0), -3 (outside, 2.5)
    for be in (NP, REF):
        loss, delta = be.huber(z, t, 2.0, 1.0)
        assert loss == pytest.approx(0.125 + 1.5 + 0.0 + 2.5, rel=1e-15)
        np.testing.assert_array_equal(delta, np.array([[-1.0, 2.0], [0.0, -2.0]]))  # clip(e, -1, 1) * 2
        loss, delta = be.huber(z, t, 1.0, math.inf, np.array([2.0, 0.5]))  # squared error, weighted rows
        assert loss == pytest.approx(2 * (0.125 + 2.0) + 0.5 * (0.0 + 4.5), rel=1e-15)
        np.testing.assert_array_equal(delta, np.array([[-1.0, 4.0], [0.0, -1.5]]))


def test_squared_error_mean_loss_is_half_the_mse_as_in_spark() -> None:
    top = FeedForwardTopology.from_spec("affine(1)", 2, loss=SquaredError())
    model = FeedForwardModel(top, np.array([1.0, -1.0, 0.5]), dtype=np.float64)  # y = x0 - x1 + 0.5
    x = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    y = np.array([1.0, 0.0, 0.5])
    pred = model.predict(x).ravel()
    np.testing.assert_array_equal(pred, [1.5, -0.5, 0.5])
    assert model.compute_gradient(x, y) == pytest.approx(0.5 * np.mean((pred - y) ** 2), rel=1e-15)


def test_regression_specs_parse_print_and_reject_bad_delta() -> None:
    top = FeedForwardTopology.from_spec("affine(3)-relu-affine(2)-huber(delta=0.5)", 4)
    assert top.spec == "affine(3)-relu-affine(2)-huber(0.5)"
    assert FeedForwardTopology.from_spec(top.spec, 4) == top
    assert FeedForwardTopology.from_spec("affine(1)-huber", 4).loss_layer == Huber(1.35)
    assert FeedForwardTopology.from_spec("affine(1)", 4, loss=SquaredError()).spec == "affine(1)-squared_error"
    assert FeedForwardTopology.from_spec("affine(2)", 4).spec == "affine(2)-softmax"  # the default stays
    for bad in ("0", "inf"):
        with pytest.raises(SpecError, match=r"huber\(.*\): delta must be a finite number > 0"):
            FeedForwardTopology.from_spec(f"affine(1)-huber({bad})", 4)
    with pytest.raises(SpecError, match=r"huber\(-1.0\): delta must be a finite number > 0"):
        Huber(-1.0)


def test_regression_targets_must_match_the_outputs() -> None:
    model = FeedForwardModel(FeedForwardTopology.from_spec("affine(2)-squared_error", 3), seed=0)
    with pytest.raises(ValueError, match=r"targets must have 2 columns, got 1"):
        model.compute_gradient(np.zeros((4, 3)), np.zeros(4))


# ---- sample weights -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["affine(4)-sigmoid-affine(3)-softmax", "affine(4)-sigmoid-affine(3)-sigmoid_mse",
                                  "affine(4)-relu-affine(2)-squared_error", "affine(4)-relu-affine(1)-huber(0.2)"])
def test_weight_two_equals_the_duplicated_row(spec: str) -> None:
    rng = np.random.default_rng(3)
    top = FeedForwardTopology.from_spec(spec, 5)
    x = rng.normal(size=(6, 5))
    y = rng.normal(size=(6, top.num_outputs)) if not top.loss_layer.class_labels else rng.integers(0, 3, size=6)
    model = FeedForwardModel(top, seed=2, dtype=np.float64)
    w = np.ones(6)
    w[1] = 2.0
    w[4] = 0.0
    keep = [0, 1, 1, 2, 3, 5]  # row 1 twice, row 4 dropped
    g_w = np.zeros(top.num_weights)
    loss_w = model.compute_gradient(x, y, g_w, scale=6.0, sample_weight=w) * 6  # weighted sums
    g_d = np.zeros(top.num_weights)
    loss_d = model.compute_gradient(x[keep], y[keep], g_d, scale=6.0) * 6
    np.testing.assert_allclose(g_w, g_d, rtol=1e-12, atol=1e-14)
    assert loss_w == pytest.approx(loss_d, rel=1e-12)


def test_unit_weights_change_nothing_and_bad_shapes_are_refused() -> None:
    rng = np.random.default_rng(5)
    model = FeedForwardModel(FeedForwardTopology.from_spec("affine(3)-tanh-affine(3)", 4), seed=0)
    x, y = rng.normal(size=(9, 4)), rng.integers(0, 3, size=9)
    g1, g2 = np.zeros(model.num_weights), np.zeros(model.num_weights)
    assert model.compute_gradient(x, y, g1) == model.compute_gradient(x, y, g2, sample_weight=np.ones(9))
    np.testing.assert_array_equal(g1, g2)
    with pytest.raises(ValueError, match=r"sample_weight must have one value per row \(9\), got shape \(8,\)"):
        model.compute_gradient(x, y, sample_weight=np.ones(8))


def test_weights_hold_across_passes() -> None:
    """A batch larger than a training pass: each pass takes its own rows' weights."""
    rng = np.random.default_rng(6)
    top = FeedForwardTopology.from_spec("affine(3)-relu-affine(2)-squared_error", 4)
    model = FeedForwardModel(top, seed=0, dtype=np.float64)
    x, y, w = rng.normal(size=(100, 4)), rng.normal(size=(100, 2)), rng.uniform(0, 2, size=100)
    whole = np.zeros(top.num_weights)
    loss = model.compute_gradient(x, y, whole, sample_weight=w)
    model.rows_per_pass = 32
    parts = np.zeros(top.num_weights)
    loss_parts = model.compute_gradient(x, y, parts, sample_weight=w)
    np.testing.assert_allclose(parts, whole, rtol=1e-12, atol=1e-15)
    assert loss_parts == pytest.approx(loss, rel=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_weighted_losses_agree_across_numpy_backends_and_the_generic_row_scaling(dtype) -> None:
    """The NumPy fast path, the reference code and the base class's generic ops (what kernel backends inherit:
    :meth:`Backend.scale_rows` through GEMM, :meth:`Backend.huber` through the host) give the same values."""
    rng = np.random.default_rng(7)
    z, w = rng.normal(size=(5, 3)).astype(dtype), rng.uniform(0, 2, size=5).astype(dtype)
    t = np.eye(3, dtype=dtype)[rng.integers(0, 3, size=5)]
    eps = float(np.finfo(dtype).eps) * 30
    for op, args in (("softmax_xent", (z, t, 0.5, w)), ("sigmoid_sq", (z, t, 0.5, w)),
                     ("huber", (z, t, 0.5, 0.7, w))):
        want_loss, want_delta = getattr(REF, op)(*args)
        got_loss, got_delta = getattr(NP, op)(*args)
        assert got_loss == pytest.approx(want_loss, rel=eps)
        np.testing.assert_allclose(got_delta, want_delta, rtol=eps, atol=eps)
        # the unweighted op with rows scaled afterwards: the weights multiply each row's delta
        plain = getattr(REF, op)(*args[:-1])[1]
        np.testing.assert_allclose(Backend.scale_rows(REF, plain, w), want_delta, rtol=eps, atol=eps)
    loss, delta = Backend.huber(REF, z, t, 0.5, 0.7, w)
    want_loss, want_delta = REF.huber(z, t, 0.5, 0.7, w)
    assert loss == pytest.approx(want_loss, rel=eps)
    np.testing.assert_allclose(delta, want_delta, rtol=eps, atol=eps)


def test_weighted_losses_on_opencl() -> None:
    """The OpenCL backend: its kernels' losses with rows weighted through the generic ops, Huber through the
    host default; the same values as the NumPy backend (float32 bounds)."""
    try:
        be = get_backend("opencl")
    except BackendUnavailable as e:
        pytest.skip(f"no OpenCL backend: {e}")
    rng = np.random.default_rng(8)
    z, w = rng.normal(size=(6, 3)).astype(np.float32), rng.uniform(0, 2, size=6).astype(np.float32)
    t = np.eye(3, dtype=np.float32)[rng.integers(0, 3, size=6)]
    eps = float(np.finfo(np.float32).eps) * 30
    for op, extra in (("softmax_xent", ()), ("sigmoid_sq", ()), ("huber", (0.7,))):
        want_loss, want_delta = getattr(NP, op)(z, t, 0.5, *extra, w)
        loss, delta = getattr(be, op)(be.asarray(z), be.asarray(t), 0.5, *extra, be.asarray(w))
        assert loss == pytest.approx(want_loss, rel=eps)
        np.testing.assert_allclose(be.to_host(delta), want_delta, rtol=eps, atol=eps)


# ---- Spark: the input conversion ----------------------------------------------------------------------------
def _resident(data) -> dict[str, np.ndarray]:
    """Every partition's resident training and validation rows (what the trainer's tasks see), concatenated."""
    from sparkdl_hetero.distributed.data import Handle, resident_blocks, resident_validation, resident_weights

    fit_id = data.fit_id

    def fetch(handles):
        for h in handles:
            x, y = resident_blocks(fit_id, h)
            w = resident_weights(fit_id, h)
            vx, vy, vw = resident_validation(fit_id, h)
            yield {"x": np.array(x), "y": np.array(y), "w": None if w is None else np.array(w),
                   "vx": np.array(vx), "vy": np.array(vy), "vw": None if vw is None else np.array(vw)}

    parts = data.handles_df.rdd.map(lambda row: Handle(**row.asDict())).mapPartitions(fetch).collect()
    return {k: None if parts[0][k] is None else np.concatenate([p[k] for p in parts if len(p[k])] or [parts[0][k]])
            for k in parts[0]}


def _order(x: np.ndarray) -> np.ndarray:
    return np.lexsort(x.T[::-1])


def test_prepare_regression_labels_weights_and_validation_rows(spark) -> None:
    from sparkdl_hetero.distributed.data import prepare

    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 3)).round(3)
    y = rng.normal(size=(20, 2))
    w = rng.uniform(0, 2, size=20)
    w[3] = 0.0
    v = np.arange(20) % 4 == 0
    rows = [(x[i].tolist(), y[i].tolist(), float(w[i]), bool(v[i])) for i in range(20)]
    df = spark.createDataFrame(rows, "features array<double>, label array<double>, w double, val boolean") \
        .repartition(3)
    data = prepare(df, "features", "label", 3, 2, regression=True, weight_col="w", validation_col="val")
    try:
        got = _resident(data)
        assert data.count == 15 and data.validation_count == 5
        assert got["y"].dtype == np.float64 and got["y"].shape == (15, 2) and got["w"].dtype == np.float64
        xt = x[~v].astype(np.float32)
        o, want = _order(got["x"]), _order(xt)
        np.testing.assert_array_equal(got["x"][o], xt[want])
        np.testing.assert_array_equal(got["y"][o], y[~v][want])  # float64 targets kept exactly
        np.testing.assert_array_equal(got["w"][o], w[~v][want])
        xv = x[v].astype(np.float32)
        o, want = _order(got["vx"]), _order(xv)
        np.testing.assert_array_equal(got["vy"][o], y[v][want])
        np.testing.assert_array_equal(got["vw"][o], w[v][want])
    finally:
        data.release()


def test_prepare_scalar_and_vector_regression_labels(spark) -> None:
    from pyspark.ml.linalg import Vectors

    from sparkdl_hetero.distributed.data import prepare

    df = spark.createDataFrame([([1.0, 2.0], 0.5), ([3.0, 4.0], -1.5)], "features array<double>, label double")
    data = prepare(df, "features", "label", 2, 1, regression=True)
    try:
        got = _resident(data)
        assert got["w"] is None and len(got["vx"]) == 0
        np.testing.assert_array_equal(np.sort(got["y"].ravel()), [-1.5, 0.5])
    finally:
        data.release()
    df = spark.createDataFrame([(Vectors.dense([1.0, 2.0]), Vectors.dense([0.5, 7.0]))], ["features", "label"])
    data = prepare(df, "features", "label", 2, 2, regression=True)
    try:
        np.testing.assert_array_equal(_resident(data)["y"], [[0.5, 7.0]])
    finally:
        data.release()


@pytest.mark.parametrize(("rows", "schema", "kw", "match"), [
    ([([1.0], float("nan"))], "features array<double>, label double", {},
     r"label column 'label' has 1 non-finite values \(first found: nan\); expected finite numbers"),
    ([([1.0], [1.0, float("inf")])], "features array<double>, label array<double>", {"k": 2},
     r"label column 'label' has 1 non-finite values \(first found: inf\)"),
    ([([1.0], [1.0, 2.0, 3.0])], "features array<double>, label array<double>", {"k": 2},
     r"label column 'label' has 1 labels of size 3 \(first found\); the model has 2 outputs"),
    ([([1.0], 1.0, -0.5)], "features array<double>, label double, w double", {"weight_col": "w"},
     r"weight column 'w' has 1 values that are negative or not finite \(first found: -0.5\); expected finite "
     r"weights >= 0"),
    ([([1.0], 1.0, float("inf"))], "features array<double>, label double, w double", {"weight_col": "w"},
     r"weight column 'w' has 1 values that are negative or not finite \(first found: inf\)"),
    ([([1.0], 1.0, None)], "features array<double>, label double, w double", {"weight_col": "w"},
     r"weight column 'w' has 1 null rows; expected none"),
    ([([1.0], 1.0, "a")], "features array<double>, label double, w string", {"weight_col": "w"},
     r"weight column 'w' must be numeric \(weights >= 0\), got string"),
    ([([1.0], 1.0, 1)], "features array<double>, label double, v int", {"validation_col": "v"},
     r"validation indicator column 'v' must be boolean, got int"),
    ([([1.0], 1.0, True)], "features array<double>, label double, v boolean", {"validation_col": "v"},
     r"no training rows: validation indicator column 'v' is true on all 1 rows; expected at least one row"),
    ([([1.0], "a")], "features array<double>, label string", {},
     r"label column 'label' must be a number, a Vector or an array of numbers, got string"),
])
def test_prepare_regression_errors(spark, rows, schema, kw, match) -> None:
    from sparkdl_hetero.distributed.data import prepare

    kw = dict(kw)
    k = kw.pop("k", 1)
    with pytest.raises(ValueError, match=match):
        prepare(spark.createDataFrame(rows, schema), "features", "label", 1, k, regression=True, **kw)


# ---- Spark: DeepRegressor -----------------------------------------------------------------------------------
def _friedman(n: int, seed: int, noise: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """A smooth nonlinear target of 3 features with Gaussian noise of known scale."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, size=(n, 3))
    y = np.sin(np.pi * x[:, 0]) + x[:, 1] ** 2 - 0.5 * x[:, 2] + noise * rng.normal(size=n)
    return x, y


def _df(spark, x: np.ndarray, y: np.ndarray, partitions: int = 2, extra: dict | None = None):
    from pyspark.ml.linalg import Vectors

    cols = {"features": [Vectors.dense(r) for r in x],
            "label": [float(v) if np.ndim(v) == 0 else Vectors.dense(v) for v in y], **(extra or {})}
    names = list(cols)
    rows = [tuple(cols[c][i] for c in names) for i in range(len(x))]
    return spark.createDataFrame(rows, names).repartition(partitions)


def _regressor(**kw):
    from sparkdl_hetero.ml import DeepRegressor

    base = dict(topology="affine(16)-tanh-affine(1)", solver="l-bfgs", maxIter=60, seed=3, verbose=False,
                dtype="float64")
    return DeepRegressor(**{**base, **kw})


def test_regressor_fits_a_nonlinear_function_and_reports_spark_metrics(spark) -> None:
    x, y = _friedman(300, 0)
    df = _df(spark, x, y)
    model = _regressor().fit(df)
    s = model.summary
    assert s.objectiveHistory[-1] < 0.25 * s.objectiveHistory[0]
    pred = np.array([model.predict(v) for v in df.select("features").toPandas()["features"]])
    out = model.transform(df).select("label", "prediction").toPandas()
    assert out["prediction"].dtype == np.float64
    err = out["prediction"].to_numpy() - out["label"].to_numpy()
    assert s.rootMeanSquaredError == pytest.approx(float(np.sqrt(np.mean(err ** 2))), rel=1e-9)
    assert s.meanAbsoluteError == pytest.approx(float(np.mean(np.abs(err))), rel=1e-9)
    lab = out["label"].to_numpy()
    assert s.r2 == pytest.approx(1 - np.sum(err ** 2) / np.sum((lab - lab.mean()) ** 2), rel=1e-9)
    assert s.rootMeanSquaredError < 0.5 * np.std(y)  # far better than predicting the mean
    # the driver's single-row prediction agrees with transform
    assert sorted(pred) == pytest.approx(sorted(out["prediction"]), rel=1e-9)


def test_regressor_multi_output_vector_labels_and_huber(spark) -> None:
    from pyspark.ml.linalg import DenseVector

    x, y1 = _friedman(200, 1)
    y = np.column_stack([y1, 2 * x[:, 0]])
    df = _df(spark, x, y)
    model = _regressor(topology="affine(16)-tanh-affine(2)", loss="huber", delta=0.5).fit(df)
    assert model.numOutputs == 2 and model.network.spec.endswith("huber(0.5)")
    row = model.transform(df).select("prediction").first()[0]
    assert isinstance(row, DenseVector) and row.size == 2
    assert model.summary.rootMeanSquaredError < 0.5 * np.std(y)


@pytest.mark.parametrize(("kw", "match"), [
    ({"topology": "affine(16)-tanh-affine(1)-softmax"},
     r"topology 'affine\(16\)-tanh-affine\(1\)-softmax' ends with 'softmax', a classification output; "
     r"DeepRegressor needs a linear output"),
    ({"topology": "affine(16)-tanh-affine(2)"},
     r"label column 'label' holds 1 value per row but topology '.*' has 2 outputs; make its last affine layer "
     r"affine\(1\)"),
    ({"topology": "affine(1)-huber(0.5)"},
     r"ends with the loss 'huber\(0.5\)' but the loss param asks for 'squared_error'"),
    ({"loss": "absolute"}, r"loss must be one of squaredError, huber, got 'absolute'"),
    ({"loss": "huber", "delta": 0.0}, r"delta must be a finite number > 0, got 0.0"),
])
def test_regressor_refuses_mismatched_outputs_before_training(spark, kw, match) -> None:
    x, y = _friedman(10, 2)
    with pytest.raises(ValueError, match=match):
        _regressor(**kw).fit(_df(spark, x, y))


def test_regressor_refuses_non_finite_labels(spark) -> None:
    x, y = _friedman(10, 2)
    y[4] = np.nan
    with pytest.raises(ValueError, match=r"label column 'label' has 1 non-finite values \(first found: nan\)"):
        _regressor().fit(_df(spark, x, y))


def test_regressor_pipeline_cross_validator_and_persistence(spark, tmp_path) -> None:
    from pyspark.ml import Pipeline, PipelineModel
    from pyspark.ml.evaluation import RegressionEvaluator
    from pyspark.ml.feature import StandardScaler
    from pyspark.ml.tuning import CrossValidator, ParamGridBuilder

    from sparkdl_hetero.ml import DeepRegressionModel, DeepRegressor

    x, y = _friedman(120, 3)
    df = _df(spark, x * 10, y)  # features on a larger scale: the pipeline standardizes them
    reg = _regressor(featuresCol="scaled", maxIter=30)
    pipe = Pipeline(stages=[StandardScaler(inputCol="features", outputCol="scaled"), reg])
    grid = ParamGridBuilder().addGrid(reg.regParam, [0.0, 1e-3]).build()
    cv = CrossValidator(estimator=pipe, estimatorParamMaps=grid, evaluator=RegressionEvaluator(), numFolds=2,
                        seed=1)
    best = cv.fit(df).bestModel
    rmse = RegressionEvaluator().evaluate(best.transform(df))
    assert rmse < 0.6 * np.std(y)
    best.write().overwrite().save(str(tmp_path / "pipe"))
    loaded = PipelineModel.load(str(tmp_path / "pipe"))
    a = best.transform(df).select("prediction").toPandas()["prediction"].to_numpy()
    b = loaded.transform(df).select("prediction").toPandas()["prediction"].to_numpy()
    np.testing.assert_array_equal(a, b)
    m = loaded.stages[-1]
    assert isinstance(m, DeepRegressionModel) and m.getLoss() == "squaredError"
    np.testing.assert_array_equal(m.weights.toArray(), best.stages[-1].weights.toArray())
    reg.write().overwrite().save(str(tmp_path / "est"))
    est = DeepRegressor.load(str(tmp_path / "est"))
    assert est.getTopology() == reg.getTopology() and est.getFeaturesCol() == "scaled"


def test_regression_model_onnx_round_trip(tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from sparkdl_hetero.ml import DeepRegressionModel

    top = FeedForwardTopology.from_spec("affine(5)-relu-affine(2)-huber(0.7)", 3)
    w = FeedForwardModel.initial_weights(top, np.random.default_rng(0))
    model = DeepRegressionModel(top, w)
    path = tmp_path / "reg.onnx"
    model.exportOnnx(str(path))
    x = np.random.default_rng(1).normal(size=(6, 3)).astype(np.float32)
    sess = ort.InferenceSession(str(path))
    (got,) = sess.run(["prediction"], {"features": x})
    want = FeedForwardModel(top, w, dtype=np.float64).predict(x.astype(np.float64))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"ends with 'softmax', a classification output"):
        DeepRegressionModel(FeedForwardTopology.from_spec("affine(2)", 3))


# ---- weights in the training modes (no Spark) ---------------------------------------------------------------
@pytest.mark.parametrize("spec", ["affine(10)-sigmoid-affine(3)", "affine(10)-tanh-affine(2)-squared_error"])
def test_barrier_combined_weighted_gradient_equals_the_single_process_one(spec: str) -> None:
    """Unequal shares of two workers, rows with weights (zeros included): the all-reduced weighted sums divided by
    the all-reduced weight sum are the single-process weighted mean gradient and loss, to float64 rounding."""
    from _helpers import run_ranks

    from sparkdl_hetero.distributed.barrier import BarrierWorker
    from sparkdl_hetero.distributed.config import TrainConfig
    from sparkdl_hetero.nn.objective import Objective

    rng = np.random.default_rng(4)
    top = FeedForwardTopology.from_spec(spec, 6)
    obj = Objective(top)
    n = 100
    x = rng.normal(size=(n, 6)).astype(np.float32)
    y = rng.normal(size=(n, 2)) if not top.loss_layer.class_labels else rng.integers(0, 3, n).astype(np.int32)
    w = rng.uniform(0, 3, size=n)
    w[::7] = 0.0
    parts = [slice(0, 30), slice(30, n)]
    picks = [np.arange(0, 30, 3), np.arange(0, 70)[::-1][:54][::-1]]  # 10 and 54 rows
    w0 = obj.initial_weights(3)
    cfg = TrainConfig(mode="barrier", solver="sgd", dtype="float64")

    def fn(c):
        s = parts[c.rank]
        worker = BarrierWorker(c, obj, cfg, x[s], y[s], w0, w=w[s])
        g, loss, count, _ = worker.reduced_sums(picks[c.rank])
        return g.astype(np.float64) / count, loss / count, count

    out = run_ranks(2, fn, timeout=20.0, join_timeout=120.0)
    for r in out:
        assert not isinstance(r, Exception), r
    (g0, f0, c0), (g1, f1, c1) = out
    rows = np.concatenate([np.arange(30)[picks[0]], 30 + picks[1]])
    assert c0 == c1 == pytest.approx(float(w[rows].sum()), rel=1e-15)
    assert g0.tobytes() == g1.tobytes() and f0 == f1
    ref = FeedForwardModel(top, w0, dtype=np.float64)
    grad = np.zeros(obj.num_weights)
    loss = ref.compute_gradient(x[rows], y[rows], grad_out=grad, scale=len(rows), sample_weight=w[rows])
    grad /= w[rows].sum()
    loss *= len(rows) / w[rows].sum()
    np.testing.assert_allclose(g0, grad, rtol=1e-12, atol=1e-14)
    assert f0 == pytest.approx(loss, rel=1e-12)


def test_weighted_gradient_by_hand_through_accumulate_gradient() -> None:
    """A one-weight-layer linear model: the weighted gradient sum is X^T (w * (Xb - y)) -- by hand."""
    from sparkdl_hetero.distributed.executor import accumulate_gradient

    x = np.array([[1.0, 2.0], [0.0, 1.0], [3.0, -1.0]])
    y = np.array([1.0, -1.0, 0.5])
    w = np.array([2.0, 0.0, 0.5])
    top = FeedForwardTopology.from_spec("affine(1)-squared_error", 2)
    model = FeedForwardModel(top, np.array([0.5, -0.25, 0.1]), dtype=np.float64)  # W = [0.5, -0.25], b = 0.1
    model.zero_grad()
    loss, count = accumulate_gradient(model, x, y, None, w)
    e = x @ np.array([0.5, -0.25]) + 0.1 - y  # errors: -0.4, 0.85, 1.35
    np.testing.assert_allclose(model.get_gradient(), np.concatenate([x.T @ (w * e), [np.sum(w * e)]]), rtol=1e-15)
    assert loss == pytest.approx(float(np.sum(w * 0.5 * e * e)), rel=1e-15) and count == 2.5
    model.zero_grad()
    loss, count = accumulate_gradient(model, x, y, np.array([0, 2]), w)  # a selection of the rows
    assert count == 2.5 and loss == pytest.approx(float(w[0] * 0.5 * e[0] ** 2 + w[2] * 0.5 * e[2] ** 2))


def test_solvers_divide_by_a_weight_sum_below_one() -> None:
    """A count that is a sum of weights (0.25 here) divides the sums as it is; a count of 0 updates nothing."""
    from sparkdl_hetero.nn.solvers import mean_objective

    f, g = mean_objective(0.5, np.array([1.0, -2.0]), 0.25, np.zeros(2), 0.0)
    assert f == 2.0 and g.tolist() == [4.0, -8.0]
    f, g = mean_objective(0.0, np.zeros(2), 0.0, np.zeros(2), 0.0)
    assert f == 0.0 and g.tolist() == [0.0, 0.0]


# ---- Spark: weightCol and validationIndicatorCol in both modes --------------------------------------------------
@pytest.mark.parametrize("mode", ["treeAggregate", "barrier"])
def test_weight_two_trains_like_the_duplicated_rows(spark, mode) -> None:
    """Full-batch l-bfgs on rows with weights 1/2/0 reaches the weights it reaches on the data with the weight-2
    rows duplicated and the weight-0 rows dropped (the same objective, summed in another order)."""
    x, y = _friedman(60, 5)
    w = np.where(np.arange(60) % 5 == 0, 2.0, 1.0)
    w[np.arange(60) % 7 == 3] = 0.0
    weighted = _df(spark, x, y, extra={"w": [float(v) for v in w]})
    idx = np.concatenate([np.flatnonzero(w > 0), np.flatnonzero(w == 2.0)])
    duplicated = _df(spark, x[idx], y[idx])
    kw = dict(mode=mode, numWorkers=2, maxIter=15, tol=0.0)
    a = _regressor(weightCol="w", **kw).fit(weighted)
    b = _regressor(**kw).fit(duplicated)
    np.testing.assert_allclose(a.summary.objectiveHistory, b.summary.objectiveHistory, rtol=1e-9)
    np.testing.assert_allclose(a.weights.toArray(), b.weights.toArray(), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("mode", ["treeAggregate", "barrier"])
def test_validation_indicator_history_and_best_weights(spark, mode) -> None:
    """One (loss, RMSE) per epoch over the indicator's rows, which never train; the returned model is the one with
    the lowest validation loss, whose loss and RMSE a direct computation on those rows gives again."""
    from pyspark.ml.linalg import Vectors

    x, y = _friedman(200, 6)
    val = np.arange(200) % 4 == 0
    df = _df(spark, x, y, extra={"isVal": [bool(v) for v in val]})
    model = _regressor(mode=mode, numWorkers=2, solver="adam", stepSize=0.05, batchSize=32, epochs=4, tol=0.0,
                       patience=10, validationIndicatorCol="isVal").fit(df)
    hist = model.summary.validationHistory
    assert len(hist) == 4
    # the executors hold the features as float32: predict the same rounded rows here
    pred = np.array([model.predict(Vectors.dense(r.astype(np.float32))) for r in x[val]])
    err = pred - y[val]
    best = min(hist)
    assert best[0] == pytest.approx(0.5 * np.mean(err ** 2), rel=1e-9)  # squared error: half the MSE
    assert best[1] == pytest.approx(np.sqrt(np.mean(err ** 2)), rel=1e-9)
    stats = model.summary.trainingStats  # 150 training rows: the validation rows apart
    if mode == "barrier":
        assert sum(w["rows"] for w in stats["workers"]) == 150
    else:
        assert stats["samples"] == 4 * 150


def test_minibatch_step_history_is_the_mean_loss_of_every_few_steps() -> None:
    """A point every STEP_HISTORY_STEPS steps: the count-weighted mean of those steps' losses (the weights' sums
    as counts), beside the per-epoch history."""
    from sparkdl_hetero.nn.config import TrainConfig
    from sparkdl_hetero.nn.solvers import STEP_HISTORY_STEPS, SolverState, minibatch

    losses = np.arange(1.0, 1.0 + 3 * STEP_HISTORY_STEPS)
    counts = np.where(np.arange(losses.size) % 2 == 0, 2.0, 0.5)

    def step(w: np.ndarray, t: int) -> tuple[float, np.ndarray, float]:
        return float(losses[t] * counts[t]), np.zeros_like(w), float(counts[t])

    state = SolverState(np.zeros(2))
    minibatch(state, TrainConfig(solver="sgd", epochs=3), STEP_HISTORY_STEPS, step)
    k = STEP_HISTORY_STEPS
    want = [[k * (i + 1), float(np.average(losses[i * k:(i + 1) * k], weights=counts[i * k:(i + 1) * k]))]
            for i in range(3)]
    assert [p[0] for p in state.step_history] == [p[0] for p in want]
    assert [p[1] for p in state.step_history] == pytest.approx([p[1] for p in want], rel=1e-15)
    assert state.history == pytest.approx([p[1] for p in want])  # one epoch per point here


@pytest.mark.parametrize("mode", ["treeAggregate", "barrier"])
def test_full_batch_validation_every_interval(spark, mode) -> None:
    """gd validates every validationInterval iterations; the last entry is the returned model's, as a direct
    computation on the validation rows gives it."""
    from pyspark.ml.linalg import Vectors

    x, y = _friedman(120, 7)
    val = np.arange(120) % 3 == 0
    df = _df(spark, x, y, extra={"isVal": [bool(v) for v in val]})
    model = _regressor(mode=mode, numWorkers=2, solver="gd", stepSize=0.2, maxIter=6, tol=0.0, validationInterval=2,
                       validationIndicatorCol="isVal").fit(df)
    hist = model.summary.validationHistory
    assert len(hist) == 3
    err = np.array([model.predict(Vectors.dense(r.astype(np.float32))) for r in x[val]]) - y[val]
    assert hist[-1][0] == pytest.approx(0.5 * np.mean(err ** 2), rel=1e-9)
    assert hist[-1][1] == pytest.approx(np.sqrt(np.mean(err ** 2)), rel=1e-9)
