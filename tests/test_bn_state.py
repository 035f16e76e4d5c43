"""Batch normalization's running statistics (the model state) outside the engine: the fitted model carries them,
transform / ONNX / save-load use them, both training modes return them, checkpoints keep them."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from sparkdl_hetero.distributed.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from sparkdl_hetero.nn.model import FeedForwardModel
from sparkdl_hetero.nn.solvers import SolverState
from sparkdl_hetero.nn.topology import FeedForwardTopology

SPEC = "conv(4,3)-batchnorm-relu-flatten-affine(3)"
SHAPE = (1, 6, 6)


def _trained_engine_model(seed: int = 0) -> tuple[FeedForwardTopology, np.ndarray, np.ndarray]:
    """A BN topology's weights and a state moved away from the initial one by a few training forwards."""
    topo = FeedForwardTopology.from_spec(SPEC, SHAPE)
    rng = np.random.default_rng(seed)
    w = FeedForwardModel.initial_weights(topo, rng)
    model = FeedForwardModel(topo, w, dtype=np.float64)
    for _ in range(3):
        model.compute_gradient(rng.normal(1.5, 2.0, size=(16, 36)), rng.integers(0, 3, 16))
    return topo, w, model.get_state()


def _images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Tiny learnable images: the class sets the brightness of one third of the picture, on an offset."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.normal(0.5, 0.3, size=(n, 6, 6)) + 2.0
    for k in range(3):
        x[y == k, 2 * k:2 * k + 2, :] += 1.5
    return x.reshape(n, 36), y


# ---- no Spark ----------------------------------------------------------------------------------------------
def test_checkpoints_keep_the_model_state(tmp_path) -> None:
    _, w, state = _trained_engine_model()
    save_checkpoint(str(tmp_path / "a"), Checkpoint.of(SolverState(w, 7), "adam", None, state))
    got = load_checkpoint(str(tmp_path / "a"))
    assert got is not None and got.iteration == 7
    np.testing.assert_array_equal(got.model_state, state)
    save_checkpoint(str(tmp_path / "b"), Checkpoint.of(SolverState(w, 3), "adam"))
    assert load_checkpoint(str(tmp_path / "b")).model_state.shape == (0,)


def test_the_model_predicts_with_its_state_and_checks_it() -> None:
    from pyspark.ml.linalg import Vectors

    from sparkdl_hetero.ml import DeepClassificationModel

    topo, w, state = _trained_engine_model()
    x = np.random.default_rng(5).normal(1.5, 2.0, size=36)
    model = DeepClassificationModel(topo, w, state=state)
    np.testing.assert_array_equal(model.state, state)
    want = FeedForwardModel(topo, w, dtype=np.float64, state=state).predict(x[None])[0]
    np.testing.assert_allclose(model.predictProbability(Vectors.dense(x)).toArray(), want, rtol=1e-12)
    fresh = DeepClassificationModel(topo, w)  # no state given: the initial running statistics
    np.testing.assert_array_equal(fresh.state, FeedForwardModel.initial_state(topo))
    assert not np.allclose(fresh.predictProbability(Vectors.dense(x)).toArray(), want, atol=1e-3)
    assert DeepClassificationModel(FeedForwardTopology.multilayer_perceptron([4, 3]), np.zeros(15)).state.shape == (0,)
    with pytest.raises(ValueError, match=r"has 8 state values \(batch normalization statistics\), got 3"):
        DeepClassificationModel(topo, w, state=np.zeros(3))
    bad = state.copy()
    bad[1] = np.nan
    with pytest.raises(ValueError, match="state must be finite; got 1 NaN/inf values"):
        DeepClassificationModel(topo, w, state=bad)


def test_onnx_export_uses_the_state(tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from sparkdl_hetero.ml import DeepClassificationModel

    topo, w, state = _trained_engine_model(1)
    path = str(tmp_path / "bn.onnx")
    DeepClassificationModel(topo, w, state=state).exportOnnx(path)
    x = np.random.default_rng(2).normal(1.5, 2.0, size=(7, 36)).astype(np.float32)
    (got,) = ort.InferenceSession(path).run(["probability"], {"features": x})
    want = FeedForwardModel(topo, w, dtype=np.float64, state=state).predict(x.astype(np.float64))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ---- Spark -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def image_df(spark):  # noqa: ANN001, ANN201
    from pyspark.ml.linalg import Vectors

    x, y = _images(200, seed=9)
    return spark.createDataFrame([(Vectors.dense(a), float(b)) for a, b in zip(x, y, strict=True)],
                                 ["features", "label"])


def _probabilities(df) -> np.ndarray:  # noqa: ANN001
    return np.array([r["probability"].toArray() for r in df.select("probability").collect()])


def _fit(image_df, mode: str):  # noqa: ANN001, ANN202
    from sparkdl_hetero.ml import DeepClassifier

    clf = DeepClassifier(topology=SPEC, inputShape=list(SHAPE), solver="adam", stepSize=0.02, epochs=3,
                         batchSize=32, mode=mode, seed=4, verbose=False)
    return clf.fit(image_df).setDtype("float64")


def _check_state_is_used(model, image_df) -> np.ndarray:  # noqa: ANN001
    """The model's state moved away from the initial one and transform predicts with it; returns the
    probabilities."""
    topo = model.network
    assert model.state.shape == (topo.num_state,) == (8,)
    mean, var = model.state[:4], model.state[4:]  # per channel: the running means, then the variances
    assert np.all(np.abs(mean) > 0.1) and not np.allclose(var, 1.0, atol=0.05), model.state
    prob = _probabilities(model.transform(image_df))
    x, _ = _images(200, seed=9)
    ref = FeedForwardModel(topo, model.weights.toArray(), dtype=np.float64, state=model.state)
    np.testing.assert_allclose(prob, ref.predict(x), rtol=1e-9, atol=1e-12)
    no_state = FeedForwardModel(topo, model.weights.toArray(), dtype=np.float64)
    assert np.abs(no_state.predict(x) - prob).max() > 1e-3  # the state matters for these predictions
    return prob


def test_barrier_fit_carries_the_state_to_transform_save_load_and_onnx(image_df, tmp_path) -> None:
    from sparkdl_hetero.ml import DeepClassificationModel

    model = _fit(image_df, "barrier")
    prob = _check_state_is_used(model, image_df)
    path = str(tmp_path / "bn_model")
    model.write().save(path)
    loaded = DeepClassificationModel.load(path).setDtype("float64")
    np.testing.assert_array_equal(loaded.state, model.state)
    np.testing.assert_array_equal(_probabilities(loaded.transform(image_df)), prob)
    try:
        import onnx  # noqa: F401
        import onnxruntime as ort
    except ImportError:
        return
    onnx_path = str(tmp_path / "bn.onnx")
    model.exportOnnx(onnx_path)
    x, _ = _images(200, seed=9)
    (got,) = ort.InferenceSession(onnx_path).run(["probability"], {"features": x.astype(np.float32)})
    np.testing.assert_allclose(got, prob, rtol=1e-5, atol=1e-5)


def test_tree_aggregate_fit_returns_the_state(image_df) -> None:
    _check_state_is_used(_fit(image_df, "treeAggregate"), image_df)


def test_distillation_refuses_batch_norm_on_either_side(image_df) -> None:
    from sparkdl_hetero.ml import DeepClassificationModel, DeepClassifier

    topo, w, state = _trained_engine_model()
    plain = FeedForwardTopology.from_spec("flatten-affine(3)", SHAPE)
    with pytest.raises(ValueError, match=r"the mentor's topology 'conv\(4,3.*' has batch normalization"):
        DeepClassifier(topology="flatten-affine(3)", inputShape=list(SHAPE),
                       mentor=DeepClassificationModel(topo, w, state=state)).fit(image_df)
    with pytest.raises(ValueError, match=r"topology 'conv\(4,3.*' has batch normalization, whose running statistics "
                                         r"a mentor's distillation does not train yet"):
        DeepClassifier(topology=SPEC, inputShape=list(SHAPE),
                       mentor=DeepClassificationModel(plain, np.zeros(plain.num_weights))).fit(image_df)


def _drop_state_array(spark, src: str, dst: str) -> None:  # noqa: ANN001
    """A copy of a save as a version without the model state wrote it: no 'state' array, in data or metadata."""
    meta = json.loads(spark.read.text(os.path.join(src, "metadata")).collect()[0][0])
    del meta["arrays"]["state"]
    spark.createDataFrame([(json.dumps(meta),)], "value string").coalesce(1).write.text(os.path.join(dst, "metadata"))
    data = spark.read.parquet(os.path.join(src, "data"))
    data.where(data.name != "state").coalesce(1).write.parquet(os.path.join(dst, "data"))


def test_a_save_without_state_loads_only_for_a_topology_without_state(spark, tmp_path) -> None:
    from sparkdl_hetero.ml import DeepClassificationModel

    topo, w, state = _trained_engine_model()
    DeepClassificationModel(topo, w, state=state).write().save(str(tmp_path / "bn"))
    _drop_state_array(spark, str(tmp_path / "bn"), str(tmp_path / "bn_old"))
    with pytest.raises(ValueError, match=r"topology 'conv\(4,3.*' has 8 state values .* the save has no state "
                                         r"array"):
        DeepClassificationModel.load(str(tmp_path / "bn_old"))
    mlp = FeedForwardTopology.multilayer_perceptron([4, 3])
    w_mlp = np.arange(15, dtype=np.float64) / 10
    DeepClassificationModel(mlp, w_mlp).write().save(str(tmp_path / "mlp"))
    _drop_state_array(spark, str(tmp_path / "mlp"), str(tmp_path / "mlp_old"))
    loaded = DeepClassificationModel.load(str(tmp_path / "mlp_old"))
    assert loaded.state.shape == (0,)
    np.testing.assert_array_equal(loaded.weights.toArray(), w_mlp)
