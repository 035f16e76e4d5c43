"""Regression losses (squared error, Huber) and per-row sample weights: the engine against finite differences and
hand-computed values, the backends against each other."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sparkdl_hetero.backends import BackendUnavailable, get_backend
from sparkdl_hetero.backends.base import Backend
from sparkdl_hetero.nn.layers import Huber, SpecError, SquaredError
from sparkdl_hetero.nn.model import FeedForwardModel
from sparkdl_hetero.nn.topology import FeedForwardTopology

NP = get_backend("numpy")
REF = get_backend("numpy", reference=True)


def _numeric_grad(f, w: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    g = np.empty_like(w)
    for i in range(w.size):
        wp, wm = w.copy(), w.copy()
        wp[i] += eps
        wm[i] -= eps
        g[i] = (f(wp) - f(wm)) / (2 * eps)
    return g


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
    numeric = _numeric_grad(f, w0)
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
