"""Validation in inference mode: the engine's forward-only loss (batch normalization's running statistics, no
dropout, nothing changes), the validation sums every training mode reports from it, and a barrier fit's validation
loss against the one its fitted model's ``transform`` gives."""

from __future__ import annotations

import numpy as np
import pytest

from sparkdl_hetero.distributed.executor import CHUNK_ROWS, validation_sums
from sparkdl_hetero.nn.distill import DistillationObjective
from sparkdl_hetero.nn.model import FeedForwardModel
from sparkdl_hetero.nn.topology import FeedForwardTopology

SPEC = "conv(4,3)-batchnorm-relu-dropout(0.5)-flatten-affine(3)"
SHAPE = (1, 6, 6)


def _model(seed: int = 0) -> FeedForwardModel:
    """A float64 batch-norm + dropout model whose running statistics moved away from the initial ones."""
    topo = FeedForwardTopology.from_spec(SPEC, SHAPE)
    rng = np.random.default_rng(seed)
    model = FeedForwardModel(topo, FeedForwardModel.initial_weights(topo, rng), seed=seed, dtype=np.float64)
    for _ in range(3):
        model.compute_gradient(rng.normal(1.5, 2.0, size=(16, 36)), rng.integers(0, 3, 16))
    return model


def _rows(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(1.5, 2.0, size=(n, 36)), rng.integers(0, 3, n), rng.uniform(0.2, 2.0, n)


def _nll(prob: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Each row's cross-entropy from its class probabilities."""
    return -np.log(prob[np.arange(len(y)), y.astype(int)])


# ---- engine --------------------------------------------------------------------------------------------------
def test_loss_is_the_mean_loss_of_what_predict_returns() -> None:
    model = _model()
    x, y, w = _rows(40, 1)
    nll = _nll(model.predict(x), y)
    assert model.loss(x, y) == pytest.approx(nll.mean(), rel=1e-12)
    assert model.loss(x, y, sample_weight=w) == pytest.approx(np.sum(w * nll) / len(y), rel=1e-12)
    # the training-mode loss (batch statistics, dropout) is another number: the comparison tells them apart
    assert abs(model.compute_gradient(x, y) - nll.mean()) > 1e-3


def test_loss_changes_nothing_and_draws_no_dropout_mask() -> None:
    a, b = _model(), _model()  # twins: same weights, state and dropout stream
    x, y, _ = _rows(40, 2)
    a.backend.fill(a.gradient, 0.5)
    weights, state, grad = a.get_weights(), a.get_state(), a.get_gradient()
    first = a.loss(x, y)
    assert a.loss(x, y) == first  # dropout is off: the same number every time
    np.testing.assert_array_equal(a.get_weights(), weights)
    np.testing.assert_array_equal(a.get_state(), state)  # the running statistics did not move
    np.testing.assert_array_equal(a.get_gradient(), grad)
    a.zero_grad()
    b.zero_grad()
    # the dropout stream was not consumed either: the twins' next training step is the same
    assert a.compute_gradient(x, y) == b.compute_gradient(x, y)
    np.testing.assert_array_equal(a.get_gradient(), b.get_gradient())
    np.testing.assert_array_equal(a.get_state(), b.get_state())


def test_loss_checks_its_input() -> None:
    model = _model()
    x, y, _ = _rows(40, 3)
    with pytest.raises(ValueError, match=r"sample_weight must have one value per row \(40\), got shape \(3,\)"):
        model.loss(x, y, sample_weight=np.ones(3))
    with pytest.raises(ValueError, match="loss needs at least one row, got none"):
        model.loss(x[:0], y[:0])


def test_validation_sums_are_inference_mode_sums_and_leave_the_state() -> None:
    model = _model()
    n = 2 * CHUNK_ROWS + 5  # several chunks
    x, y, w = _rows(n, 4)
    state = model.get_state()
    prob = model.predict(x)
    correct = (prob.argmax(axis=1) == y).astype(np.float64)
    nll = _nll(prob, y)
    np.testing.assert_allclose(validation_sums(model, x, y, None), [nll.sum(), correct.sum(), n], rtol=1e-12)
    np.testing.assert_allclose(validation_sums(model, x, y, w), [w @ nll, w @ correct, w.sum()], rtol=1e-12)
    np.testing.assert_array_equal(model.get_state(), state)


def test_the_distillation_replica_validates_the_mentee_on_the_labels() -> None:
    mentee = FeedForwardTopology.from_spec("affine(5)-tanh-dropout(0.3)-affine(3)", 6)
    mentor = FeedForwardTopology.from_spec("affine(8)-sigmoid-affine(3)", 6)
    mentor_w = FeedForwardModel.initial_weights(mentor, np.random.default_rng(7)) * 3.0
    obj = DistillationObjective(mentee, mentor, mentor_w, alpha=0.5, temperature=2.0)
    rep = obj.replica(dtype=np.float64, seed=0)
    w = obj.initial_weights(1)
    rep.set_weights(w)
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(30, 6)), rng.integers(0, 3, 30)
    plain = FeedForwardModel(mentee, obj.model_weights(w), dtype=np.float64)
    assert rep.loss(x, y) == pytest.approx(_nll(plain.predict(x), y).mean(), rel=1e-12)
    assert abs(rep.loss(x, y) - rep.compute_gradient(x, y)) > 1e-3  # not the distillation objective


# ---- Spark ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["barrier", "treeAggregate"])
def test_a_fit_validates_the_model_transform_applies(spark, mode) -> None:  # noqa: ANN001
    """The reported validation loss and accuracy of the fitted batch-norm + dropout model are those of its
    ``transform`` on the validation rows (running statistics, no dropout), not of a training pass."""
    from pyspark.ml.linalg import Vectors

    from sparkdl_hetero.ml import DeepClassifier

    rng = np.random.default_rng(9)
    y = rng.integers(0, 3, 240)
    img = rng.normal(0.5, 0.3, size=(240, 6, 6)) + 2.0
    for k in range(3):  # a weak signal: a loss far from 0, where float32 probabilities keep their digits
        img[y == k, 2 * k:2 * k + 2, :] += 0.15
    x = img.reshape(240, 36)
    df = spark.createDataFrame([(Vectors.dense(x[i]), float(y[i]), i % 4 == 0) for i in range(240)],
                               ["features", "label", "isVal"])
    model = DeepClassifier(topology="conv(4,3)-batchnorm-relu-dropout(0.25)-flatten-affine(3)",
                           inputShape=list(SHAPE), solver="adam", stepSize=0.02, epochs=3, batchSize=32,
                           mode=mode, seed=4, validationIndicatorCol="isVal", verbose=False).fit(df)
    rows = model.transform(df.where("isVal")).select("probability", "prediction", "label").collect()
    prob = np.array([r["probability"].toArray() for r in rows])
    labels = np.array([r["label"] for r in rows])
    recomputed = _nll(prob, labels).mean()
    history = model.summary.validationHistory
    assert len(history) == 3
    # the fit returns the weights and state of its best validated epoch (the last one when it was the best)
    best = min(range(3), key=lambda i: history[i][0])
    # float32 replicas and float32 transform, different row chunks: float32 rounding through a few layers
    assert history[best][0] == pytest.approx(recomputed, rel=1e-5)
    assert history[best][1] == pytest.approx(np.mean(np.array([r["prediction"] for r in rows]) == labels))
    # a training-mode pass (batch statistics, dropout) over the same rows gives another loss
    engine = FeedForwardModel(model.network, model.weights.toArray(), seed=0, state=model.state)
    assert abs(engine.compute_gradient(x[::4], y[::4]) - recomputed) > 1e-3
