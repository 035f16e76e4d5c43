"""Mentor-guided training objective: loss vs a NumPy reference, gradients vs finite differences, errors."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import log_softmax, softmax

from sparkdl_hetero.backends import NumpyBackend
from sparkdl_hetero.backends.base import Backend
from sparkdl_hetero.nn import Affine, FeedForwardModel, FeedForwardTopology
from sparkdl_hetero.nn.distill import DistillationObjective
from sparkdl_hetero.nn.objective import Objective

MENTEE = FeedForwardTopology.from_spec("affine(5)-tanh-affine(3)", 6)
MENTOR = FeedForwardTopology.from_spec("affine(8)-sigmoid-affine(5)-tanh-affine(3)", 6)
CNN_MENTEE = FeedForwardTopology.from_spec("conv(3,3,pad=1)-tanh-avgpool(2)-flatten-affine(3)", (2, 6, 6))
CNN_MENTOR = FeedForwardTopology.from_spec("conv(4,3,pad=1)-sigmoid-avgpool(2)-flatten-affine(7)-tanh-affine(3)",
                                           (2, 6, 6))


def _data(n: int, d: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)), rng.integers(0, k, n)


def _mentor_weights(topology: FeedForwardTopology, seed: int = 7) -> np.ndarray:
    return FeedForwardModel.initial_weights(topology, np.random.default_rng(seed)) * 3.0


def _fd_check(obj: DistillationObjective, x: np.ndarray, y: np.ndarray, seed: int = 1) -> None:
    rep = obj.replica(dtype=np.float64)
    w = obj.initial_weights(seed)
    rep.set_weights(w)
    grad = np.zeros(obj.num_weights)
    rep.compute_gradient(x, y, grad_out=grad)
    eps = 1e-6
    # every weight of small problems; else a fixed sample that spans the mentee and every adapter block
    idx = np.arange(w.size) if w.size <= 300 else np.sort(np.random.default_rng(0).choice(w.size, 300, False))
    blocks = [0] + [o for _, _, _, o in obj.adapters] + [obj.num_weights]
    assert all(np.any((idx >= lo) & (idx < hi)) for lo, hi in zip(blocks, blocks[1:], strict=False))
    fd = np.empty(idx.size)
    for q, p in enumerate(idx):
        wp, wm = w.copy(), w.copy()
        wp[p] += eps
        wm[p] -= eps
        rep.set_weights(wp)
        lp = rep.compute_gradient(x, y)
        rep.set_weights(wm)
        lm = rep.compute_gradient(x, y)
        fd[q] = (lp - lm) / (2 * eps)
    np.testing.assert_allclose(grad[idx], fd, rtol=1e-5, atol=1e-8)
    assert np.abs(grad[idx]).max() > 1e-3  # the check is not vacuous


def _reference_loss(obj: DistillationObjective, w: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    """The combined loss computed independently from the layer outputs of two plain float64 models."""
    mentee = FeedForwardModel(obj.topology, obj.model_weights(w), dtype=np.float64)
    mentor = FeedForwardModel(obj.mentor_topology, obj.mentor_weights, dtype=np.float64)
    hs, gs = mentee.forward(x), mentor.forward(x)
    z, zm, t, a = hs[-1], gs[-1], obj.temperature, obj.alpha
    ce = -log_softmax(z, axis=1)[np.arange(len(y)), y].mean()
    p = softmax(zm / t, axis=1)
    kl = (p * (np.log(p) - log_softmax(z / t, axis=1))).sum(axis=1).mean()
    loss = a * ce + (1 - a) * t * t * kl
    adapters = {k: (o, layer, shape) for k, layer, shape, o in obj.adapters}
    for k, ((i, j), wk) in enumerate(zip(obj.hint_layers, obj.hint_weights, strict=True)):
        h = hs[i].reshape(len(x), -1)
        if k in adapters:
            o, layer, shape = adapters[k]
            assert isinstance(layer, Affine)  # this reference only knows affine adapters
            d_in = shape[0]
            wt = w[o:o + d_in * layer.num_out].reshape(d_in, layer.num_out)
            h = h @ wt + w[o + d_in * layer.num_out:o + (d_in + 1) * layer.num_out]
        g = gs[j].reshape(len(x), -1)
        loss += wk * np.sqrt(((h - g) ** 2).mean(axis=1)).mean()
    return float(loss)


# ---- the loss itself ------------------------------------------------------------------------------------------
def test_loss_matches_numpy_reference_with_adapter() -> None:
    x, y = _data(9, 6, 3)
    obj = DistillationObjective(MENTEE, MENTOR, _mentor_weights(MENTOR), alpha=0.3, temperature=2.5,
                                hint_layers=[(1, 1), (0, 2)], hint_weights=[0.7, 0.4])
    # (1, 1): widths 5 vs 8 -> an affine adapter of (5 + 1) * 8 weights; (0, 2): widths 5 vs 5 -> none
    assert [(k, layer.spec()) for k, layer, _, _ in obj.adapters] == [(0, "affine(8)")]
    assert obj.num_weights == MENTEE.num_weights + 48
    w = obj.initial_weights(3)
    rep = obj.replica(dtype=np.float64)
    rep.set_weights(w)
    assert rep.compute_gradient(x, y) == pytest.approx(_reference_loss(obj, w, x, y), rel=1e-12)


def test_temperature_scales_soft_target_term_by_t_squared() -> None:
    x, y = _data(7, 6, 3)
    w = None
    losses = []
    for t in (1.0, 4.0):
        obj = DistillationObjective(MENTEE, MENTOR, _mentor_weights(MENTOR), alpha=0.0, temperature=t)
        w = obj.initial_weights(0) if w is None else w
        rep = obj.replica(dtype=np.float64)
        rep.set_weights(w)
        losses.append(rep.compute_gradient(x, y))
        assert losses[-1] == pytest.approx(_reference_loss(obj, w, x, y), rel=1e-12)
    assert losses[0] > 0 and losses[1] != pytest.approx(losses[0])


# ---- gradients vs finite differences --------------------------------------------------------------------------
def test_gradient_without_adapters_matches_finite_differences() -> None:
    x, y = _data(8, 6, 3)
    obj = DistillationObjective(MENTEE, MENTOR, _mentor_weights(MENTOR), alpha=0.4, temperature=2.0,
                                hint_layers=[(1, 3), (0, 2)], hint_weights=[0.5, 1.5])
    assert obj.adapters == [] and obj.num_weights == MENTEE.num_weights
    _fd_check(obj, x, y)


def test_gradient_with_adapters_matches_finite_differences() -> None:
    x, y = _data(8, 6, 3)
    # two hints on the same mentee layer (deltas add up), one through an adapter 5 -> 8, one through 5 -> 3
    obj = DistillationObjective(MENTEE, MENTOR, _mentor_weights(MENTOR), alpha=0.25, temperature=3.0,
                                hint_layers=[(1, 1), (1, 4), (2, 0)], hint_weights=[0.8, 0.3, 0.2])
    assert [layer.spec() for _, layer, _, _ in obj.adapters] == ["affine(8)", "affine(3)", "affine(8)"]
    _fd_check(obj, x, y)


def test_gradient_with_image_hints_matches_finite_differences() -> None:
    x, y = _data(5, 72, 3)
    # (1, 1): images (h, w, c) (6, 6, 3) vs (6, 6, 4) -> 1x1 conv adapter; (3, 3): flat 27 vs 36 -> affine;
    # (0, 4): an image (6, 6, 3) vs a flat 7 -> affine adapter on the flattened image
    obj = DistillationObjective(CNN_MENTEE, CNN_MENTOR, _mentor_weights(CNN_MENTOR), alpha=0.5, temperature=2.0,
                                hint_layers=[(1, 1), (3, 3), (0, 4)], hint_weights=[1.0, 0.5, 0.3])
    specs = [layer.spec() for _, layer, _, _ in obj.adapters]
    assert specs == ["conv(4,1,stride=1,pad=0)", "affine(36)", "affine(7)"]
    _fd_check(obj, x, y)


def test_image_hint_of_equal_shape_needs_no_adapter() -> None:
    mentor = FeedForwardTopology.from_spec("conv(3,3,pad=1)-relu-flatten-affine(3)", (2, 6, 6))
    obj = DistillationObjective(CNN_MENTEE, mentor, _mentor_weights(mentor), hint_layers=[(0, 0)])
    assert obj.adapters == []
    x, y = _data(4, 72, 3)
    rep = obj.replica(dtype=np.float64)
    w = obj.initial_weights(0)
    rep.set_weights(w)
    loss = rep.compute_gradient(x, y)
    mentee_m = FeedForwardModel(CNN_MENTEE, w, dtype=np.float64)
    mentor_m = FeedForwardModel(mentor, obj.mentor_weights, dtype=np.float64)
    h, g = mentee_m.forward(x)[0].reshape(4, -1), mentor_m.forward(x)[0].reshape(4, -1)
    ce = mentee_m.compute_gradient(x, y)
    assert loss == pytest.approx(ce + np.sqrt(((h - g) ** 2).mean(axis=1)).mean(), rel=1e-12)


# ---- plain training as a special case ---------------------------------------------------------------------------
def test_alpha_one_without_hints_is_ordinary_training_exactly() -> None:
    topo = FeedForwardTopology.from_spec("affine(7)-relu-dropout(0.3)-affine(3)", 6)
    x, y = _data(16, 6, 3)
    x = x.astype(np.float32)
    obj = DistillationObjective(topo, MENTOR, _mentor_weights(MENTOR), alpha=1.0, temperature=3.0)
    plain = Objective(topo)
    assert obj.num_weights == plain.num_weights
    w = obj.initial_weights(5)
    np.testing.assert_array_equal(w, plain.initial_weights(5))
    rep, ref = obj.replica(seed=11), plain.replica(seed=11)
    rep.set_weights(w)
    ref.set_weights(w)
    for _ in range(2):  # same dropout masks from the same seed, same accumulation
        assert rep.compute_gradient(x, y, scale=0.5) == ref.compute_gradient(x, y, scale=0.5)
    np.testing.assert_array_equal(rep.get_gradient(), ref.get_gradient())
    g1, g2 = np.zeros(obj.num_weights), np.zeros(obj.num_weights)
    rep.compute_gradient(x, y, grad_out=g1)
    ref.compute_gradient(x, y, grad_out=g2)
    np.testing.assert_array_equal(g1, g2)
    assert np.abs(g1).max() > 0


def test_model_weights_drop_adapters_and_mentor_stays_frozen() -> None:
    x, y = _data(32, 6, 3)
    mw = _mentor_weights(MENTOR)
    obj = DistillationObjective(MENTEE, MENTOR, mw, alpha=0.5, temperature=2.0, hint_layers=[(1, 1)])
    mw[:] = 0  # the objective keeps its own copy
    frozen = obj.mentor_weights.copy()
    rep = obj.replica(dtype=np.float64)
    w = obj.initial_weights(0)
    first = None
    for _ in range(30):
        rep.set_weights(w)
        g = np.zeros_like(w)
        loss = rep.compute_gradient(x, y, grad_out=g)
        first = loss if first is None else first
        w = w - 0.2 * g
    assert loss < 0.8 * first
    np.testing.assert_array_equal(obj.mentor_weights, frozen)
    np.testing.assert_array_equal(rep.mentor.get_weights(), frozen)
    np.testing.assert_array_equal(obj.model_weights(w), w[:MENTEE.num_weights])
    assert obj.model_weights(w).shape == (MENTEE.num_weights,)
    rep.set_weights(w)  # the replica predicts with the mentee alone
    assert rep.topology is MENTEE
    np.testing.assert_array_equal(rep.predict(x), FeedForwardModel(MENTEE, obj.model_weights(w),
                                                                   dtype=np.float64).predict(x))


# ---- the backend op --------------------------------------------------------------------------------------------
def test_row_rmse_value_gradient_and_host_default() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4, 5)), rng.normal(size=(4, 5))
    b[2] = a[2]  # a zero row: value 0, gradient 0
    be = NumpyBackend()
    loss, delta = be.row_rmse(a, b, 0.5)
    r = np.sqrt(((a - b) ** 2).mean(axis=1))
    assert loss == pytest.approx(r.sum(), rel=1e-12)
    expected = 0.5 * (a - b) / (5 * np.where(r > 0, r, 1))[:, None]
    np.testing.assert_allclose(delta, expected, rtol=1e-12)
    assert not delta[2].any()
    loss2, delta2 = Backend.row_rmse(be, a, b, 0.5)  # the host default other backends inherit
    assert loss2 == loss
    np.testing.assert_array_equal(delta2, delta)


# ---- errors ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    (dict(alpha=1.5), r"alpha must be in \[0, 1\], got 1.5"),
    (dict(alpha=-0.1), r"alpha must be in \[0, 1\], got -0.1"),
    (dict(temperature=0.0), r"temperature must be a finite number > 0, got 0.0"),
    (dict(temperature=-2), r"temperature must be a finite number > 0, got -2"),
    (dict(hint_layers=[(3, 0)]), r"hint pair 0: mentee layer index 3 is out of range \[0, 3\)"),
    (dict(hint_layers=[(0, 1), (-1, 0)]), r"hint pair 1: mentee layer index -1 is out of range \[0, 3\)"),
    (dict(hint_layers=[(0, 5)]), r"hint pair 0: mentor layer index 5 is out of range \[0, 5\)"),
    (dict(hint_layers=[(0, 1)], hint_weights=[1.0, 2.0]),
     r"hint_weights must be one weight per hint pair \(1 pairs \[\(0, 1\)\]\), got \[1.0, 2.0\]"),
    (dict(hint_layers=[(0, 1)], hint_weights=[-1.0]), r"hint_weights must be finite and >= 0, got \[-1.0\]"),
    (dict(hint_layers=[(0, 1, 2)]), r"hint pair 0 must be two layer indices \(mentee, mentor\), got \(0, 1, 2\)"),
    (dict(hint_layers=[1, 2]), r"hint pair 0 must be two layer indices \(mentee, mentor\), got \(1,\)"),
    (dict(hint_layers=[(0.5, 1)]), r"hint pair 0 must be two layer indices \(mentee, mentor\), got \(0.5, 1\)"),
])
def test_bad_settings_raise(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{message}"):  # the engine speaks its own argument names
        DistillationObjective(MENTEE, MENTOR, _mentor_weights(MENTOR), **kwargs)


def test_mentor_of_another_input_size_or_class_count_is_rejected() -> None:
    other_in = FeedForwardTopology.from_spec("affine(3)", 7)
    with pytest.raises(ValueError, match=r"the mentor takes 7 input features \(input shape \(7,\)\) but the mentee "
                                         r"6 \(input shape \(6,\)\)"):
        DistillationObjective(MENTEE, other_in, np.zeros(other_in.num_weights))
    other_out = FeedForwardTopology.from_spec("affine(4)", 6)
    with pytest.raises(ValueError, match="the mentor predicts 4 classes but the mentee 3"):
        DistillationObjective(MENTEE, other_out, np.zeros(other_out.num_weights))
    with pytest.raises(ValueError, match=r"mentor weights must be a vector of 21 values .* got shape \(20,\)"):
        DistillationObjective(MENTEE, FeedForwardTopology.from_spec("affine(3)", 6), np.zeros(20))


def test_image_hints_of_different_height_and_width_are_rejected() -> None:
    mentor = FeedForwardTopology.from_spec("conv(4,3)-relu-flatten-affine(3)", (2, 6, 6))
    with pytest.raises(ValueError, match=r"hint pair 0 \(0, 0\): mentee layer 0 outputs an image of shape "
                                         r"\(3, 6, 6\) and mentor layer 0 one of shape \(4, 4, 4\)"):
        DistillationObjective(CNN_MENTEE, mentor, _mentor_weights(mentor), hint_layers=[(0, 0)])


def test_replica_rejects_wrong_parameter_vector() -> None:
    obj = DistillationObjective(MENTEE, MENTOR, _mentor_weights(MENTOR), hint_layers=[(1, 1)])
    with pytest.raises(ValueError, match=r"weights must be a vector of 101 values \(mentee \+ adapters\), "
                                         r"got shape \(53,\)"):
        obj.replica().set_weights(np.zeros(MENTEE.num_weights))


# ---- other backends ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("image_mentee", [False, True])
def test_opencl_replica_matches_numpy(image_mentee: bool) -> None:
    """The same loss and gradient on the OpenCL backend (PoCL) as on NumPy, including a batch already on the
    device in the mentee's layout (re-laid out for a mentor of another input shape)."""
    from sparkdl_hetero.backends import get_backend

    flat = FeedForwardTopology.from_spec("affine(4)-tanh-affine(3)", 72)
    mentee, mentor = (CNN_MENTEE, flat) if image_mentee else (flat, CNN_MENTOR)
    hints = [(1, 1), (3, 0)] if image_mentee else [(1, 1), (1, 4)]
    obj = DistillationObjective(mentee, mentor, _mentor_weights(mentor), alpha=0.3, temperature=2.0,
                                hint_layers=hints, hint_weights=[0.5, 0.7])
    assert obj.adapters  # adapters on the device too
    x, y = _data(6, 72, 3)
    x = x.astype(np.float32)
    w = obj.initial_weights(2)
    results = []
    for backend in ("numpy", get_backend("opencl")):
        rep = obj.replica(backend=backend)
        rep.set_weights(w)
        loss = rep.compute_gradient(x, y)
        results.append((loss, rep.get_gradient()))
        if backend != "numpy":
            device_x = rep.mentee.device_batch(x)  # (n, h, w, c) for an image mentee
            assert not isinstance(device_x, np.ndarray)
            rep.zero_grad()
            assert rep.compute_gradient(device_x, y, on_device=True) == pytest.approx(loss, rel=1e-6)
            np.testing.assert_allclose(rep.get_gradient(), results[-1][1], rtol=1e-5, atol=1e-7)
    (l_np, g_np), (l_cl, g_cl) = results
    assert l_cl == pytest.approx(l_np, rel=1e-5)
    np.testing.assert_allclose(g_cl, g_np, rtol=1e-3, atol=1e-5 * np.abs(g_np).max())
