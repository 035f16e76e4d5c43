"""Batch normalization, residual blocks, global average pooling and padded pooling: gradients against finite
differences (float64, training mode), PyTorch's semantics, the non-trained state API, spec parsing and layout."""

from __future__ import annotations

import numpy as np
import pytest
from _helpers import numeric_grad

from sparkdl_hetero.backends import Backend, get_backend
from sparkdl_hetero.nn import PRESETS, FeedForwardModel, FeedForwardTopology, SpecError
from sparkdl_hetero.nn.model import rows_per_pass

BLOCK = "res(conv(4,3,pad=1)-batchnorm-tanh-conv(4,3,pad=1)-batchnorm)"


def _check_gradient(topology: FeedForwardTopology, x: np.ndarray, y: np.ndarray, seed: int = 0,
                    backend: str | Backend = "numpy") -> FeedForwardModel:
    """compute_gradient (training mode) against central differences of the mean training loss."""
    model = FeedForwardModel(topology, seed=seed, dtype=np.float64, backend=get_backend(backend))
    # non-trivial scales and shifts, so that their gradients and their effect on the input delta are exercised
    w0 = model.get_weights() + np.random.default_rng(seed).normal(scale=0.3, size=model.num_weights)

    def f(w: np.ndarray) -> float:
        model.set_weights(w)
        out = model.forward(x, training=True)[-1]
        return topology.loss_layer.loss(model.backend, out, model.target(y), 1.0)[0] / len(x)

    numeric = numeric_grad(f, w0)
    model.set_weights(w0)
    model.zero_grad()
    model.compute_gradient(x, y)
    analytic = model.get_gradient()
    assert np.abs(analytic).max() > 1e-6, "a gradient check on an all-zero gradient proves nothing"
    np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-8)
    return model


@pytest.mark.parametrize("spec, shape", [
    ("affine(5)-batchnorm-tanh-affine(3)", 4),  # per feature
    ("affine(5)-batchnorm(momentum=0.3,eps=0.01)-affine(3)", 4),
    ("conv(3,3,pad=1)-batchnorm-tanh-flatten-affine(3)", (2, 5, 5)),  # per channel
    ("conv(3,3)-batchnorm-relu-maxpool(2)-flatten-affine(3)", (1, 6, 6)),
    (BLOCK + "-flatten-affine(3)", (4, 5, 5)),  # identity shortcut
    ("res(conv(3,3,stride=2,pad=1)-batchnorm-tanh)-flatten-affine(3)", (2, 6, 5)),  # strided 1x1 projection
    ("res(conv(5,3,pad=1)-tanh)-gap-affine(3)", (2, 5, 5)),  # channel projection, stride 1
    ("res(affine(6)-batchnorm-tanh)-res(affine(6)-tanh)-affine(3)", 4),  # flat: affine projection, identity
    ("res(res(conv(2,3,pad=1)-tanh)-conv(3,3,pad=1))-gap-affine(3)", (2, 4, 4)),  # nested blocks
    ("conv(3,3,pad=1)-tanh-gap-affine(3)", (2, 5, 4)),  # non-square image
    ("conv(3,2)-avgpool(3,stride=2,pad=1)-flatten-affine(3)", (2, 7, 6)),
    ("conv(3,2)-maxpool(3,stride=2,pad=1)-flatten-affine(3)", (2, 7, 6)),
    ("avgpool(2,pad=1)-flatten-affine(3)", (2, 5, 5)),
])
def test_gradients_in_training_mode(spec, shape):
    rng = np.random.default_rng(1)
    topo = FeedForwardTopology.from_spec(spec, shape)
    x = rng.normal(size=(6, topo.num_inputs))
    _check_gradient(topo, x, rng.integers(0, 3, 6), seed=2)


def test_gradients_on_the_reference_backend():
    rng = np.random.default_rng(3)
    topo = FeedForwardTopology.from_spec("res(conv(3,3,stride=2,pad=1)-batchnorm-tanh)-gap-affine(3)", (2, 6, 6))
    x = rng.normal(size=(5, topo.num_inputs))
    _check_gradient(topo, x, rng.integers(0, 3, 5), backend=get_backend("numpy", reference=True))


def _bn_reference(x2: np.ndarray, gamma, beta, mean, var, eps):
    return gamma * (x2 - mean) / np.sqrt(var + eps) + beta


def test_batchnorm_training_and_inference_semantics():
    """Training normalizes with the batch statistics and moves the running ones by momentum (the variance
    unbiased); inference normalizes with the running ones; the input delta of inference is dy * gamma / std."""
    rng = np.random.default_rng(4)
    topo = FeedForwardTopology.from_spec("batchnorm(momentum=0.25,eps=0.001)-flatten-affine(2)", (3, 4, 2))
    model = FeedForwardModel(topo, dtype=np.float64)
    c = 3
    gamma, beta = rng.normal(size=c), rng.normal(size=c)
    w = model.get_weights()
    w[:c], w[c:2 * c] = gamma, beta
    model.set_weights(w)
    assert np.array_equal(model.get_state(), np.r_[np.zeros(c), np.ones(c)])
    mean, var = np.zeros(c), np.ones(c)
    for _ in range(2):
        x = rng.normal(loc=3.0, scale=2.0, size=(5, 24))
        x2 = x.reshape(5, 3, 4, 2).transpose(0, 2, 3, 1).reshape(-1, c)  # (rows, channels)
        got = model.forward(x, training=True)[0].reshape(-1, c)
        np.testing.assert_allclose(got, _bn_reference(x2, gamma, beta, x2.mean(0), x2.var(0), 1e-3), rtol=1e-12,
                                   atol=1e-12)
        mean = 0.75 * mean + 0.25 * x2.mean(0)
        var = 0.75 * var + 0.25 * x2.var(0, ddof=1)
        np.testing.assert_allclose(model.get_state(), np.r_[mean, var], rtol=1e-12)
    x = rng.normal(size=(1, 24))  # a single row is fine at inference
    before = model.get_state()
    got = model.forward(x)[0].reshape(-1, c)
    x2 = x.reshape(1, 3, 4, 2).transpose(0, 2, 3, 1).reshape(-1, c)
    np.testing.assert_allclose(got, _bn_reference(x2, gamma, beta, mean, var, 1e-3), rtol=1e-12)
    assert np.array_equal(model.get_state(), before), "inference must not move the running statistics"
    # backward after an inference forward: the normalization is a fixed per-channel affine map
    dy = rng.normal(size=model.forward(x)[0].shape)
    model.zero_grad()
    dx = model.layer_models[0].backward(dy, need_dx=True)
    np.testing.assert_allclose(dx, dy * gamma / np.sqrt(var + 1e-3), rtol=1e-12)


def test_batchnorm_training_needs_more_than_one_value_per_channel():
    model = FeedForwardModel(FeedForwardTopology.from_spec("affine(3)-batchnorm-affine(2)", 4))
    with pytest.raises(ValueError, match=r"batchnorm\(momentum=0.1,eps=1e-05\) needs more than one value per "
                                         r"channel while training.*\(1, 3\)"):
        model.compute_gradient(np.ones((1, 4)), np.array([1]))
    model.predict(np.ones((1, 4)))  # inference is per row


def test_batchnorm_matches_pytorch_in_eval_and_train_mode():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    c, h, w, n = 4, 5, 3, 6
    topo = FeedForwardTopology.from_spec("batchnorm(momentum=0.2,eps=0.0001)-flatten-affine(2)", (c, h, w))
    gamma, beta = rng.normal(size=c), rng.normal(size=c)
    mean, var = rng.normal(size=c), rng.uniform(0.5, 2.0, size=c)
    weights = FeedForwardModel.initial_weights(topo, rng)
    weights[:2 * c] = np.r_[gamma, beta]
    model = FeedForwardModel(topo, weights, state=np.r_[mean, var])
    bn = torch.nn.BatchNorm2d(c, eps=1e-4, momentum=0.2)
    with torch.no_grad():
        bn.weight.copy_(torch.from_numpy(gamma))
        bn.bias.copy_(torch.from_numpy(beta))
        bn.running_mean.copy_(torch.from_numpy(mean))
        bn.running_var.copy_(torch.from_numpy(var))
    x = (rng.normal(size=(n, c * h * w)) * 3 + 1).astype(np.float32)
    xt = torch.from_numpy(x.reshape(n, c, h, w))

    def ours(training: bool) -> np.ndarray:  # the engine's NHWC output as NCHW
        return model.forward(x, training=training)[0].transpose(0, 3, 1, 2)

    bn.eval()
    with torch.no_grad():
        np.testing.assert_allclose(ours(False), bn(xt).numpy(), rtol=1e-5, atol=1e-5)
        bn.train()
        want = bn(xt).numpy()
    np.testing.assert_allclose(ours(True), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.get_state(), np.r_[bn.running_mean.numpy(), bn.running_var.numpy()],
                               rtol=1e-5, atol=1e-6)


# ---- the state API ---------------------------------------------------------------------------------------------
def test_state_layout_and_errors():
    topo = FeedForwardTopology.from_spec(f"conv(4,3,pad=1)-batchnorm-relu-{BLOCK}-gap-affine(5)-batchnorm", (2, 6, 6))
    assert topo.num_state == 2 * 4 + 2 * (2 * 4) + 2 * 5
    assert topo.state_offsets == [0, 0, 8, 8, 24, 24, 24, 34, 34]
    model = FeedForwardModel(topo)
    assert model.num_state == 34
    np.testing.assert_array_equal(model.get_state(), FeedForwardModel.initial_state(topo))
    with pytest.raises(ValueError, match=r"state must be a vector of 34 values for .* got shape \(3,\)"):
        model.set_state(np.zeros(3))
    with pytest.raises(ValueError, match="state must be a vector of 34 values"):
        FeedForwardModel(topo, state=np.zeros(35))
    assert FeedForwardModel(FeedForwardTopology.from_spec("affine(3)", 2)).get_state().shape == (0,)


def test_a_model_built_with_a_saved_state_predicts_like_the_trained_one():
    rng = np.random.default_rng(6)
    topo = FeedForwardTopology.from_spec(f"conv(4,3,pad=1)-batchnorm-relu-{BLOCK}-gap-affine(3)", (1, 6, 6))
    model = FeedForwardModel(topo, seed=1)
    x, y = rng.normal(size=(8, 36)).astype(np.float32), rng.integers(0, 3, 8)
    for _ in range(3):
        model.compute_gradient(x, y)
    state = model.get_state()
    assert not np.array_equal(state, FeedForwardModel.initial_state(topo))
    again = FeedForwardModel(topo, model.get_weights(), state=state)
    np.testing.assert_array_equal(again.predict(x), model.predict(x))
    fresh = FeedForwardModel(topo, model.get_weights())
    assert not np.allclose(fresh.predict(x), model.predict(x)), "the state must matter at inference"


def test_replicas_averaging_their_state_stay_identical_and_track_the_mean_batch_statistics():
    """Data-parallel training as the state API prescribes: each replica steps on its own batch, then every
    replica takes the mean of the replicas' states. They end identical, and the running means equal those of one
    model whose batch means are the replicas' mean."""
    rng = np.random.default_rng(7)
    topo = FeedForwardTopology.from_spec("affine(4)-batchnorm(momentum=0.3)-tanh-affine(3)", 5)
    w0 = FeedForwardModel.initial_weights(topo, rng)
    replicas = [FeedForwardModel(topo, w0, dtype=np.float64) for _ in range(3)]
    single = FeedForwardModel(topo, w0, dtype=np.float64)
    expected_mean = np.zeros(4)
    for _ in range(4):
        batches = [rng.normal(size=(6, 5)) for _ in replicas]
        for m, xb in zip(replicas, batches, strict=True):
            m.compute_gradient(xb, rng.integers(0, 3, 6))
        mean_state = np.mean([m.get_state() for m in replicas], axis=0)
        for m in replicas:
            m.set_state(mean_state)
        h = np.mean([(xb @ w0[:20].reshape(5, 4) + w0[20:24]).mean(0) for xb in batches], axis=0)
        expected_mean = 0.7 * expected_mean + 0.3 * h
    states = [m.get_state() for m in replicas]
    for s in states[1:]:
        np.testing.assert_array_equal(s, states[0])
    np.testing.assert_allclose(states[0][:4], expected_mean, rtol=1e-12, atol=1e-14)
    assert single.get_state()[4:].tolist() == [1.0] * 4


def test_a_batch_with_batch_statistics_runs_in_one_pass():
    be = get_backend("numpy")
    assert rows_per_pass(FeedForwardTopology.from_spec("conv(6,5,pad=2)-relu-flatten-affine(10)", (1, 28, 28)),
                         be, np.float32) is not None
    for spec in ("conv(6,5,pad=2)-batchnorm-relu-flatten-affine(10)", "res(conv(6,5,pad=2)-batchnorm)-gap-affine(3)"):
        assert rows_per_pass(FeedForwardTopology.from_spec(spec, (1, 28, 28)), be, np.float32) is None


# ---- residual layout and the spec grammar ------------------------------------------------------------------------
def test_residual_weights_are_views_of_the_one_flat_vector():
    topo = FeedForwardTopology.from_spec("res(conv(3,3,stride=2,pad=1)-batchnorm)-gap-affine(2)", (2, 6, 6))
    conv, bn, proj = 3 * 3 * 2 * 3 + 3, 2 * 3, 1 * 1 * 2 * 3 + 3
    assert topo.offsets[:2] == [0, conv + bn + proj]
    model = FeedForwardModel(topo, seed=0)
    x = np.random.default_rng(0).normal(size=(4, 72)).astype(np.float32)
    before = model.predict(x)
    w = model.get_weights()
    w[conv + bn:conv + bn + proj] = 0  # the projection's block of the flat vector
    model.set_weights(w)
    assert not np.allclose(model.predict(x), before)
    # with a zero projection and a zero batch-norm scale (shift 0), the block outputs 0 whatever the input
    w[conv:conv + 3] = 0
    model.set_weights(w)
    p = model.predict(x)
    np.testing.assert_array_equal(p, np.broadcast_to(p[0], p.shape))


def test_identity_shortcut_adds_the_input():
    topo = FeedForwardTopology.from_spec("res(affine(3))-affine(2)", 3)
    assert topo.num_weights == 12 + 8  # no projection
    model = FeedForwardModel(topo, np.r_[np.zeros(12), np.ones(8)], dtype=np.float64)
    x = np.array([[1.0, 2.0, 3.0]])
    np.testing.assert_allclose(model.forward(x)[0], x)


def test_resnet8_preset():
    topo = FeedForwardTopology.from_spec("resnet8", (3, 32, 32))
    assert topo.spec.startswith("conv(16,3,stride=1,pad=1)-batchnorm(momentum=0.1,eps=1e-05)-relu-res(")
    assert FeedForwardTopology.from_spec(topo.spec, (3, 32, 32)) == topo  # the expanded spec round-trips
    assert topo.spec.count("res(") == 3 and topo.spec.endswith("-gap-affine(10)-softmax")
    assert topo.shapes[-1] == (10,) and topo.shapes[-4] == (8, 8, 64)
    assert topo.spec.count("conv(") == 7  # the stem and two per block (+ the affine layer: 8 weighted layers)
    assert FeedForwardTopology.from_spec("ResNet8", (1, 28, 28)).shapes[-4] == (7, 7, 64)
    assert "resnet8" in PRESETS and "lenet" in PRESETS


@pytest.mark.parametrize("spec, shape, message", [
    ("res(conv(3,3)", (1, 6, 6), r"unbalanced '\('"),
    ("affine(3))-relu", 4, r"unbalanced '\)'"),
    ("res()-affine(2)", 4, "a residual block needs layers"),
    ("res(affine(3)-softmax)-affine(2)", 4, r"a loss layer \(softmax\) cannot be inside a residual block"),
    ("res(conv(3,3)-bogus)-gap-affine(2)", (1, 6, 6), r"layer 0 \('res\(conv\(3,3\)-bogus\)'\) > layer 1 "
                                                        r"\('bogus'\): unknown layer 'bogus'"),
    ("res(flatten)-affine(2)", (1, 6, 6),
     r"no 1x1 projection with one stride maps the input shape \(1, 6, 6\) onto the block's output shape \(36,\)"),
    ("res(conv(3,3))-gap-affine(2)", (1, 6, 6), r"onto the block.s output shape \(3, 4, 4\)"),  # 6 -> 4: no stride
    ("batchnorm(momentum=1.5)-affine(2)", 4, r"momentum must be in \[0, 1\], got 1.5"),
    ("batchnorm(eps=0)-affine(2)", 4, "eps must be > 0, got 0"),
    ("maxpool(2,pad=2)-flatten-affine(2)", (1, 6, 6), r"pad must be in \[0, 1\] \(half the window\), got 2"),
    ("gap-affine(2)", 4, r"gap needs an image input"),
])
def test_spec_errors(spec, shape, message):
    with pytest.raises(SpecError, match=message):
        FeedForwardTopology.from_spec(spec, shape)


def test_specs_print_back_and_reparse():
    spec = ("conv(4,3,stride=1,pad=1)-batchnorm(momentum=0.05,eps=0.001)-res(res(conv(4,3,stride=1,pad=1)-relu)"
            "-avgpool(3,stride=1,pad=1))-maxpool(2,stride=2)-maxpool(3,stride=2,pad=1)-gap-affine(3)-softmax")
    topo = FeedForwardTopology.from_spec(spec, (2, 8, 8))
    assert topo.spec == spec
    assert FeedForwardTopology.from_spec("avgpool(2)-flatten-affine(2)", (1, 4, 4)).spec.startswith(
        "avgpool(2,stride=2)-")  # no pad argument when there is none: the specs of saved models are unchanged
