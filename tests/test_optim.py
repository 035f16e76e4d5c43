"""Updaters and learning-rate schedules against hand-computed references."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sparkdl_hetero.distributed.config import TrainConfig
from sparkdl_hetero.nn.optim import SGD, Adam, Momentum, learning_rate, make_updater


def _run(cfg, grads, w0=(1.0, -2.0), lr=0.1, dtype=np.float64):
    up = make_updater(cfg)
    w = np.array(w0, dtype=dtype)
    for g in grads:
        up.step(w, np.asarray(g, dtype=dtype), lr)
    return w, up


G = [0.5, -1.0]  # the same gradient every step keeps the hand computation short


@pytest.mark.parametrize("solver", ["gd", "sgd"])
def test_sgd_by_hand(solver):
    w, up = _run(TrainConfig(solver=solver), [G, G])
    # w - 2 * 0.1 * g
    np.testing.assert_allclose(w, [0.9, -1.8], rtol=0, atol=1e-15)
    assert isinstance(up, SGD) and up.steps == 2


def test_classical_momentum_by_hand():
    w, up = _run(TrainConfig(solver="momentum", momentum=0.9), [G, G, G])
    # v1 = g = .5 -> w .95; v2 = .9*.5+.5 = .95 -> w .855; v3 = .9*.95+.5 = 1.355 -> w .7195
    np.testing.assert_allclose(w, [0.7195, -1.439], rtol=0, atol=1e-14)
    np.testing.assert_allclose(up.velocity, [1.355, -2.71], rtol=0, atol=1e-14)
    assert isinstance(up, Momentum) and not up.nesterov


def test_nesterov_by_hand_and_differs_from_classical():
    w, up = _run(TrainConfig(solver="momentum", momentum=0.9, nesterov=True), [G, G])
    # step 1: v = .5, update g + mu v = .95 -> w .905; step 2: v = .95, update .5 + .855 = 1.355 -> w .7695
    np.testing.assert_allclose(w, [0.7695, -1.539], rtol=0, atol=1e-14)
    classical, _ = _run(TrainConfig(solver="momentum", momentum=0.9), [G, G])
    np.testing.assert_allclose(classical, [0.855, -1.71], rtol=0, atol=1e-14)
    # Nesterov looks ahead: after the same steps it has moved further along the (constant) descent direction
    assert np.all(np.abs(w - [1.0, -2.0]) > np.abs(classical - [1.0, -2.0]))


def test_momentum_zero_is_sgd():
    grads = np.random.default_rng(0).normal(size=(4, 2))
    w_m, _ = _run(TrainConfig(solver="momentum", momentum=0.0, nesterov=True), grads)
    w_s, _ = _run(TrainConfig(solver="sgd"), grads)
    np.testing.assert_allclose(w_m, w_s, rtol=0, atol=1e-15)


def _adam_reference(w0, grads, lr, b1, b2, eps):
    """Element by element in Python floats, straight from the paper's Algorithm 1."""
    w = list(w0)
    m = [0.0] * len(w)
    v = [0.0] * len(w)
    for t, g in enumerate(grads, start=1):
        for i, gi in enumerate(g):
            m[i] = b1 * m[i] + (1 - b1) * gi
            v[i] = b2 * v[i] + (1 - b2) * gi * gi
            mhat = m[i] / (1 - b1 ** t)
            vhat = v[i] / (1 - b2 ** t)
            w[i] -= lr * mhat / (math.sqrt(vhat) + eps)
    return w


def test_adam_against_reference():
    grads = np.random.default_rng(1).normal(size=(5, 3)).tolist()
    cfg = TrainConfig(solver="adam", beta1=0.8, beta2=0.99, epsilon=1e-6)
    w, up = _run(cfg, grads, w0=(0.3, -0.1, 2.0), lr=0.05)
    ref = _adam_reference([0.3, -0.1, 2.0], grads, 0.05, 0.8, 0.99, 1e-6)
    np.testing.assert_allclose(w, ref, rtol=1e-13, atol=1e-15)
    assert isinstance(up, Adam) and up.steps == 5


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_adam_bias_correction_first_step_is_lr(scale):
    # with bias correction the first step is lr * g / |g| whatever the gradient scale; without it it would
    # be lr * (1 - b1) / sqrt(1 - b2) = 3.16 lr
    w, _ = _run(TrainConfig(solver="adam", epsilon=1e-12), [[0.5 * scale, -1.0 * scale]], lr=0.1)
    np.testing.assert_allclose(w, [0.9, -1.9], rtol=0, atol=1e-9)
    # a constant gradient keeps the bias-corrected step at exactly lr
    w, _ = _run(TrainConfig(solver="adam", epsilon=1e-12), [[0.5 * scale, -1.0 * scale]] * 4, lr=0.1)
    np.testing.assert_allclose(w, [0.6, -1.6], rtol=0, atol=1e-9)


@pytest.mark.parametrize("cfg", [
    TrainConfig(solver="sgd"),
    TrainConfig(solver="momentum", momentum=0.7),
    TrainConfig(solver="momentum", momentum=0.7, nesterov=True),
    TrainConfig(solver="adam"),
])
def test_state_round_trip_continues_identically(cfg, tmp_path):
    rng = np.random.default_rng(2)
    grads = rng.normal(size=(6, 7)).astype(np.float32)
    a = make_updater(cfg)
    wa = rng.normal(size=7).astype(np.float32)
    for g in grads[:3]:
        a.step(wa, g, 0.01)
    np.savez(tmp_path / "state.npz", **a.state_dict())
    with np.load(tmp_path / "state.npz") as f:
        state = dict(f)
    b = make_updater(cfg)
    b.load_state_dict(state)
    wb = wa.copy()
    for g in grads[3:]:
        a.step(wa, g, 0.01)
        b.step(wb, g, 0.01)
    assert np.array_equal(wa, wb)
    assert a.steps == b.steps == 6
    # a fresh updater (no state) would have continued differently for stateful solvers
    if cfg.solver != "sgd":
        c = make_updater(cfg)
        wc = wb.copy()
        c.step(wc, grads[0], 0.01)
        b.step(wb, grads[0], 0.01)
        assert not np.array_equal(wb, wc)


def test_state_dict_is_a_copy_and_checked():
    up = make_updater(TrainConfig(solver="adam"))
    w = np.ones(3)
    up.step(w, np.ones(3), 0.1)
    s = up.state_dict()
    s["m"][:] = 99
    assert not np.any(up.m == 99)
    with pytest.raises(ValueError, match=r"Adam state must hold 'steps'.*\['m', 'v'\].*got keys \['velocity'\]"):
        up.load_state_dict({"velocity": np.ones(3)})
    up.load_state_dict({"steps": np.asarray(1), "m": np.ones(4), "v": np.ones(4)})
    with pytest.raises(ValueError, match=r"updater state 'm' has shape \(4,\) but the weights have \(3,\)"):
        up.step(w, np.ones(3), 0.1)


def test_float32_stays_float32_in_place():
    for solver in ("sgd", "momentum", "adam"):
        up = make_updater(TrainConfig(solver=solver))
        w = np.ones(5, dtype=np.float32)
        before = w.__array_interface__["data"][0]
        up.step(w, np.full(5, 0.5, dtype=np.float32), 0.1)
        assert w.dtype == np.float32 and w.__array_interface__["data"][0] == before
        assert np.all(w < 1)
        assert all(v.dtype == np.float32 for k, v in up.state_dict().items() if k != "steps")


@pytest.mark.parametrize("cfg", [TrainConfig(solver="sgd"), TrainConfig(solver="momentum", momentum=0.7),
                                 TrainConfig(solver="momentum", momentum=0.7, nesterov=True),
                                 TrainConfig(solver="adam", beta1=0.8, beta2=0.99, epsilon=1e-6)])
def test_float32_gradients_keep_float32_state_and_update_float64_weights(cfg):
    rng = np.random.default_rng(3)
    grads = rng.normal(size=(5, 4)).astype(np.float32)
    w0 = rng.normal(size=4)
    w = w0.copy()
    up = make_updater(cfg)
    for g in grads:
        up.step(w, g, 0.05)
    assert w.dtype == np.float64
    assert all(v.dtype == np.float32 for k, v in up.state_dict().items() if k != "steps")
    ref, _ = _run(cfg, grads.astype(np.float64), w0=w0, lr=0.05)  # the same steps in float64
    assert not np.array_equal(w, ref)  # float32 state: rounded differently...
    np.testing.assert_allclose(w, ref, rtol=1e-6, atol=1e-7)  # ...but only by float32 rounding


@pytest.mark.parametrize("cfg", [TrainConfig(solver="sgd"), TrainConfig(solver="momentum", momentum=0.7),
                                 TrainConfig(solver="momentum", momentum=0.7, nesterov=True),
                                 TrainConfig(solver="adam", beta1=0.8, beta2=0.99, epsilon=1e-6)])
def test_float64_state_with_a_scaled_float32_gradient_sum(cfg):
    # what barrier mode passes: the float32 sum of 64 samples' gradients, scale 1/64, float64 state
    rng = np.random.default_rng(4)
    sums = rng.normal(size=(5, 6)).astype(np.float32) * 64
    w0 = rng.normal(size=6)
    w = w0.copy()
    up = make_updater(cfg, np.float64)
    for g in sums:
        up.step(w, g, 0.05, scale=1 / 64)
    assert all(v.dtype == np.float64 for k, v in up.state_dict().items() if k != "steps")
    ref, _ = _run(cfg, sums.astype(np.float64) / 64, w0=w0, lr=0.05)  # the mean gradients, in float64
    np.testing.assert_allclose(w, ref, rtol=1e-14, atol=1e-15)  # float64 rounding only (the scale is exact)
    # a scale that is not a power of two: the same steps up to float64 rounding
    w3, up3 = w0.copy(), make_updater(cfg, np.float64)
    for g in sums:
        up3.step(w3, g, 0.05, scale=1 / 3)
    ref3, _ = _run(cfg, sums.astype(np.float64) / 3, w0=w0, lr=0.05)
    np.testing.assert_allclose(w3, ref3, rtol=1e-13, atol=1e-15)
    assert not np.allclose(w3, w, rtol=1e-6)  # the scale matters


def test_step_shape_mismatch():
    with pytest.raises(ValueError, match=r"same length, got \(3,\) and \(2,\)"):
        make_updater(TrainConfig(solver="sgd")).step(np.ones(3), np.ones(2), 0.1)


def test_make_updater_errors():
    with pytest.raises(ValueError, match="solver 'l-bfgs' has no step updater; expected one of gd, sgd, momentum"):
        make_updater(TrainConfig(solver="l-bfgs"))
    # out-of-range hyper-parameters never reach an updater: the config refuses them when it is built
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\), got 1.0"):
        TrainConfig(solver="momentum", momentum=1.0)
    with pytest.raises(ValueError, match=r"beta2 must be in \[0, 1\), got 1.5"):
        TrainConfig(solver="adam", beta2=1.5)
    with pytest.raises(ValueError, match="epsilon must be > 0, got 0.0"):
        TrainConfig(solver="adam", epsilon=0.0)


def test_the_config_s_settings_reach_the_updater():
    up = make_updater(TrainConfig(solver="momentum", momentum=0.5, nesterov=True))
    assert isinstance(up, Momentum) and up.momentum == 0.5 and up.nesterov
    up = make_updater(TrainConfig(solver="adam", beta1=0.8, beta2=0.99, epsilon=1e-6))
    assert isinstance(up, Adam) and (up.beta1, up.beta2, up.epsilon) == (0.8, 0.99, 1e-6)


def test_schedules():
    assert learning_rate(TrainConfig(stepSize=0.2), 57, 100) == 0.2
    cfg = TrainConfig(stepSize=0.2, lrSchedule="step", lrDecay=0.5, lrDecaySteps=10)
    assert [learning_rate(cfg, s, 100) for s in (0, 9, 10, 19, 20, 35)] == [0.2, 0.2, 0.1, 0.1, 0.05, 0.025]
    cfg = TrainConfig(stepSize=0.2, lrSchedule="cosine")
    assert learning_rate(cfg, 0, 100) == pytest.approx(0.2, abs=1e-15)
    assert learning_rate(cfg, 50, 100) == pytest.approx(0.1, abs=1e-15)
    assert learning_rate(cfg, 75, 100) == pytest.approx(0.1 * (1 + math.cos(0.75 * math.pi)), abs=1e-15)
    assert learning_rate(cfg, 100, 100) == pytest.approx(0.0, abs=1e-15)
    assert learning_rate(cfg, 150, 100) == pytest.approx(0.0, abs=1e-15)


def test_schedule_errors():
    # a schedule's settings are checked when the config is built, before any step
    with pytest.raises(ValueError, match="lrDecaySteps must be >= 1 with lrSchedule='step', got 0"):
        TrainConfig(lrSchedule="step")
    with pytest.raises(ValueError, match="lrSchedule must be one of constant, step, cosine, got 'linear'"):
        TrainConfig(lrSchedule="linear")
    with pytest.raises(ValueError, match="stepSize must be > 0, got -0.1"):
        TrainConfig(stepSize=-0.1)
    with pytest.raises(ValueError, match="total_steps >= 1, got 0"):
        learning_rate(TrainConfig(lrSchedule="cosine"), 0, 0)
