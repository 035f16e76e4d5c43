"""The solver layer (sparkdl_hetero.nn.solvers) driven by in-process callbacks: no Spark, no sockets."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from sparkdl_hetero.distributed.config import TrainConfig
from sparkdl_hetero.nn import FeedForwardModel, FeedForwardTopology, solvers
from sparkdl_hetero.nn.model import one_hot
from sparkdl_hetero.nn.optim import learning_rate, make_updater
from sparkdl_hetero.nn.solvers import Hooks, SolverState, TrainingDivergedError
from sparkdl_hetero.nn.trainer import train

EPS64 = np.finfo(np.float64).eps


def _points(n: int = 40, d: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d))


def _sums(a: np.ndarray, w: np.ndarray, rows: np.ndarray | slice) -> tuple[float, np.ndarray, int]:
    """Sums of loss 0.5 * ||w - a_i||^2 and its gradient w - a_i over ``rows``."""
    diff = w - a[rows]
    return 0.5 * float(np.sum(diff * diff)), diff.sum(axis=0), len(diff)


def test_gd_is_the_hand_computed_update_and_stops_when_the_weights_settle() -> None:
    a = _points()
    cfg = TrainConfig(solver="gd", stepSize=0.5, regParam=0.1, maxIter=500, tol=1e-9)
    state = SolverState(np.zeros(5))
    stop = solvers.gd(state, cfg, lambda w, _i: _sums(a, w, slice(None)))
    w, hist = np.zeros(5), []
    for _ in range(state.iteration):
        loss = 0.5 * np.mean(np.sum((w - a) ** 2, axis=1)) + 0.05 * float(w @ w)
        hist.append(loss)
        w = w - 0.5 * ((w - a.mean(axis=0)) + 0.1 * w)
    assert stop == "weights converged" and 1 < state.iteration < 500
    np.testing.assert_allclose(state.weights, w, rtol=0, atol=100 * EPS64)
    np.testing.assert_allclose(state.history, hist, rtol=100 * EPS64)
    np.testing.assert_allclose(state.weights, a.mean(axis=0) / 1.1, atol=1e-8)  # the L2-regularized minimum


def test_lbfgs_reaches_the_regularized_minimum_and_keeps_spark_history() -> None:
    a = _points()
    cfg = TrainConfig(solver="l-bfgs", maxIter=50, tol=1e-12, regParam=0.5)
    state = SolverState(np.ones(5))
    seen: list[int] = []
    stop = solvers.lbfgs(state, cfg, lambda w, rows: _sums(a, w, slice(None)) if rows is None else None,
                         Hooks(iteration_end=lambda s, _f, _n: seen.append(s.iteration)))
    assert stop in ("gradient converged", "function values converged")
    np.testing.assert_allclose(state.weights, a.mean(axis=0) / 1.5, atol=1e-6)
    assert len(state.history) == state.iteration + 1 and seen == list(range(1, state.iteration + 1))


def _minibatch_reference(a: np.ndarray, cfg: TrainConfig, batch: int, epochs: int) -> tuple[np.ndarray, list]:
    """The mini-batch loop by hand: mean gradient + L2 of fixed consecutive batches, one updater step each."""
    w, upd, hist = np.zeros(a.shape[1]), make_updater(cfg), []
    steps = -(-len(a) // batch)
    for e in range(epochs):
        tot = 0.0
        for b in range(steps):
            rows = a[b * batch:(b + 1) * batch]
            f = 0.5 * np.mean(np.sum((w - rows) ** 2, axis=1)) + 0.5 * cfg.regParam * float(w @ w)
            g = (w - rows).mean(axis=0) + cfg.regParam * w
            upd.step(w, g, learning_rate(cfg, e * steps + b, epochs * steps))
            tot += f * len(rows)
        hist.append(tot / len(a))
    return w, hist


@pytest.mark.parametrize("solver", ["sgd", "momentum", "adam"])
@pytest.mark.parametrize("reg", [0.0, 0.01])
def test_minibatch_equals_the_hand_loop_and_resumes_exactly(solver: str, reg: float) -> None:
    a, batch, epochs = _points(), 16, 3
    cfg = TrainConfig(solver=solver, stepSize=0.05, regParam=reg, epochs=epochs, lrSchedule="cosine")
    steps = -(-len(a) // batch)

    def step(w: np.ndarray, t: int) -> tuple[float, np.ndarray, int]:
        b = t % steps
        return _sums(a, w, slice(b * batch, (b + 1) * batch))

    state = SolverState(np.zeros(5))
    saved: list[SolverState] = []
    hooks = Hooks(checkpoint_due=lambda it: it == 4, checkpoint=lambda s: saved.append(copy.deepcopy(s)))
    assert solvers.minibatch(state, cfg, steps, step, hooks) == f"{epochs} epochs"
    w, hist = _minibatch_reference(a, cfg, batch, epochs)
    np.testing.assert_allclose(state.weights, w, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(state.history, hist, rtol=1e-12)
    # resumed mid-epoch from the checkpoint at step 4 (updater state, epoch loss sums): the same end
    (ckpt,) = saved
    assert ckpt.iteration == 4 and ckpt.epoch_count == 16 and int(ckpt.updater_state["steps"]) == 4
    solvers.minibatch(ckpt, cfg, steps, step)
    np.testing.assert_array_equal(ckpt.weights, state.weights)
    assert ckpt.history == state.history


def test_divergence_carries_the_last_good_weights_when_asked() -> None:
    a = _points()
    cfg = TrainConfig(solver="gd", stepSize=1e200, maxIter=5)
    w0 = np.full(5, 0.5)
    message = r"the loss became inf at iteration 2 \(gd, stepSize 1e\+200\); training stopped. The last weights"
    with np.errstate(over="ignore"), pytest.raises(TrainingDivergedError, match=message) as e:
        solvers.gd(SolverState(w0.copy()), cfg, lambda w, _i: _sums(a, w, slice(None)))
    np.testing.assert_array_equal(e.value.weights, w0)
    assert e.value.iteration == 2 and len(e.value.history) == 1
    message = r"at iteration 2 \(sgd.*training stopped$"
    with np.errstate(over="ignore"), pytest.raises(TrainingDivergedError, match=message) as e:
        solvers.minibatch(SolverState(w0.copy()), TrainConfig(solver="sgd", stepSize=1e200, epochs=2), 1,
                          lambda w, _t: _sums(a, w, slice(None)))
    assert e.value.weights is None


def test_early_stop_and_epoch_totals_hooks() -> None:
    a = _points()
    cfg = TrainConfig(solver="sgd", stepSize=0.1, epochs=10)
    epochs_seen: list[int] = []

    def epoch_end(epoch: int, _loss: float) -> str:
        epochs_seen.append(epoch)
        return "stop now" if epoch == 2 else ""

    state = SolverState(np.zeros(5))
    stop = solvers.minibatch(state, cfg, 2, lambda w, t: _sums(a, w, slice(t % 2 * 20, t % 2 * 20 + 20)),
                             Hooks(epoch_end=epoch_end, epoch_loss=lambda s, n: (2 * s, 2 * n)))
    assert stop == "stop now" and epochs_seen == [0, 1, 2] and state.iteration == 6 and len(state.history) == 3


def test_in_process_trainer_equals_the_plain_mean_gradient_loop() -> None:
    topo = FeedForwardTopology.multilayer_perceptron([6, 8, 3])
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 6)).astype(np.float32)
    y = rng.integers(0, 3, 50)
    cfg = TrainConfig(solver="adam", stepSize=0.01, batchSize=16, epochs=2, regParam=0.001, seed=4)
    model = FeedForwardModel(topo, seed=0)
    ref = FeedForwardModel(topo, seed=0)
    hist = train(model, x, y, cfg)
    # the loop as written before the solver layer: mean gradient + L2 in the model's dtype, one step per batch
    yy, upd, order_rng, w, expected = one_hot(y, 3, ref.dtype), make_updater(cfg), np.random.default_rng(4), \
        ref.weights, []
    for e in range(2):
        order, tot = order_rng.permutation(50), 0.0
        for b in range(4):
            idx = order[b * 16:(b + 1) * 16]
            ref.zero_grad()
            loss = ref.compute_gradient(x[idx], yy[idx]) + 0.0005 * float(np.dot(w, w))
            g = ref.gradient.astype(np.float64) + 0.001 * w
            upd.step(w, g, learning_rate(cfg, e * 4 + b, 8))
            tot += loss * len(idx)
        expected.append(tot / 50)
    f32 = float(np.finfo(np.float32).eps)
    np.testing.assert_allclose(model.weights, ref.weights, rtol=0, atol=1e3 * f32 * cfg.stepSize)
    np.testing.assert_allclose(hist, expected, rtol=1e2 * f32)
