"""The NumPy engine: gradients against finite differences, Spark's flat layout and init, spec errors, dtypes,
numerical stability, extra deltas, and learning Fashion-MNIST in-process."""

from __future__ import annotations

import numpy as np
import pytest
from _helpers import numeric_grad

from sparkdl_hetero.backends import NumpyBackend, get_backend
from sparkdl_hetero.data import fashion_mnist, read_libsvm
from sparkdl_hetero.distributed.config import TrainConfig
from sparkdl_hetero.nn import FeedForwardModel, FeedForwardTopology, SpecError, one_hot
from sparkdl_hetero.nn.trainer import accuracy, train

LENET = "conv(6,5,pad=2)-relu-maxpool(2)-conv(16,5)-relu-maxpool(2)-flatten-affine(120)-relu-affine(84)-relu-affine(10)"


# ---- finite differences ---------------------------------------------------------------------------------------
def _objective(model: FeedForwardModel, x, y, extra_dirs=None):
    """f(w) = mean loss + sum_i <c_i, output_i>, with the model's random state (dropout) reset per call."""
    state = model.rng.bit_generator.state

    def f(w):
        model.rng.bit_generator.state = state
        model.set_weights(w)
        outs = model.forward(x, training=True)
        loss, _ = model.topology.loss_layer.loss(model.backend, outs[-1], model.target(y), 1.0)
        return loss / len(x) + sum(float(np.sum(c * outs[i])) for i, c in (extra_dirs or {}).items())

    return f, state


def _check_gradient(topology, x, y, seed=0, extra=None):
    model = FeedForwardModel(topology, seed=seed, dtype=np.float64)
    w0 = model.get_weights()
    f, state = _objective(model, x, y, extra)
    numeric = numeric_grad(f, w0)
    model.set_weights(w0)
    model.rng.bit_generator.state = state
    model.zero_grad()
    if extra is None:
        model.compute_gradient(x, y)
    else:
        outs = model.forward(x, training=True)
        _, delta = topology.loss_layer.loss(model.backend, outs[-1], model.target(y), 1.0 / len(x))
        model.backward(delta, extra={i: c.copy() for i, c in extra.items()})
    analytic = model.get_gradient()
    assert analytic.dtype == np.float64
    assert np.abs(analytic).max() > 1e-6, "a gradient check on an all-zero gradient proves nothing"
    np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-8)
    return model


def _data(rng, n, d, k):
    return rng.normal(size=(n, d)), rng.integers(0, k, size=n)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("act", ["sigmoid", "tanh", "relu", "leaky_relu(0.1)", "identity"])
def test_gradient_affine_and_activations(act, seed):
    rng = np.random.default_rng(seed)
    d, h, k, n = (int(v) for v in rng.integers(2, 7, size=4))
    x, y = _data(rng, n, d, k)
    _check_gradient(FeedForwardTopology.from_spec(f"affine({h})-{act}-affine({k})", d), x, y, seed)


@pytest.mark.parametrize("seed", range(3))
def test_gradient_spark_mlp_both_losses(seed):
    rng = np.random.default_rng(seed)
    sizes = [int(v) for v in rng.integers(2, 6, size=4)]
    x, y = _data(rng, 5, sizes[0], sizes[-1])
    for softmax in (True, False):
        _check_gradient(FeedForwardTopology.multilayer_perceptron(sizes, softmax_on_top=softmax), x, y, seed)


def test_gradient_soft_targets():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(6, 3))
    t = rng.dirichlet(np.ones(4), size=6)  # a (batch, classes) matrix is taken as targets
    for loss in ("softmax", "sigmoid_mse"):
        _check_gradient(FeedForwardTopology.from_spec(f"affine(4)-{loss}", 3), x, t)


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("spec", [
    "conv(3,3)-flatten-affine(3)",
    "conv(3,3,stride=2,pad=1)-tanh-flatten-affine(3)",
    "conv(2,3,pad=1)-sigmoid-conv(3,2,stride=2,pad=2)-flatten-affine(3)",  # conv's input delta
    "conv(2,1)-maxpool(2)-flatten-affine(3)",
    "conv(2,1)-maxpool(3,stride=2)-flatten-affine(3)",  # overlapping windows
    "conv(2,2)-avgpool(2)-flatten-affine(3)",
    "conv(2,1)-avgpool(3,stride=1)-flatten-affine(3)",  # overlapping windows
    "conv(2,3,pad=1)-relu-maxpool(2)-flatten-affine(4)-relu-affine(3)",
])
def test_gradient_conv_pool_flatten(spec, seed):
    rng = np.random.default_rng(seed)
    c, h, w = 1 + seed, int(rng.integers(6, 9)), int(rng.integers(6, 9))  # one channel and several
    x, y = _data(rng, 3, c * h * w, 3)
    _check_gradient(FeedForwardTopology.from_spec(spec, (c, h, w)), x, y, seed)


def test_gradient_dropout_fixed_mask():
    rng = np.random.default_rng(5)
    x, y = _data(rng, 8, 5, 3)
    topo = FeedForwardTopology.from_spec("affine(7)-tanh-dropout(0.4)-affine(3)", 5)
    model = _check_gradient(topo, x, y, seed=3)
    # the mask really dropped units while training, and scaled the kept ones by 1/keep
    model.set_weights(model.get_weights())
    before, after = model.forward(x, training=True)[1:3]
    dropped = after == 0
    assert dropped.any() and (~dropped).any()
    np.testing.assert_allclose(after[~dropped], before[~dropped] / 0.6, rtol=1e-12)
    # no dropout at inference
    before, after = model.forward(x, training=False)[1:3]
    np.testing.assert_array_equal(before, after)


def test_gradient_extra_deltas():
    """backward(delta, extra={i: c}) is the gradient of mean loss + <c, output_i>; delta None starts at i."""
    rng = np.random.default_rng(6)
    topo = FeedForwardTopology.from_spec("affine(4)-tanh-affine(5)-relu-affine(3)", 3)
    x, y = _data(rng, 4, 3, 3)
    extra = {1: rng.normal(size=(4, 4)), 3: rng.normal(size=(4, 5))}
    _check_gradient(topo, x, y, seed=1, extra=extra)
    # extra alone: only layers at or below index 1 receive gradient, equal to d<c, tanh(affine(x))>/dw
    model = FeedForwardModel(topo, seed=1, dtype=np.float64)
    w0 = model.get_weights()
    c = extra[1]

    def f(w):
        model.set_weights(w)
        return float(np.sum(c * model.forward(x)[1]))

    numeric = numeric_grad(f, w0)
    model.set_weights(w0)
    model.zero_grad()
    model.forward(x, training=True)
    model.backward(None, extra={1: c.copy()})
    g = model.get_gradient()
    np.testing.assert_allclose(g, numeric, rtol=1e-6, atol=1e-9)
    assert not g[topo.offsets[2]:].any() and g[:topo.offsets[1]].any()


def test_compute_gradient_accumulates_scale_and_grad_out():
    rng = np.random.default_rng(7)
    topo = FeedForwardTopology.multilayer_perceptron([4, 6, 3])
    x, y = _data(rng, 10, 4, 3)
    model = FeedForwardModel(topo, seed=0, dtype=np.float64)
    model.compute_gradient(x, y)
    g1 = model.get_gradient()
    model.compute_gradient(x, y, scale=0.5)  # accumulates
    np.testing.assert_allclose(model.get_gradient(), 1.5 * g1, rtol=1e-12)
    out = np.ones(topo.num_weights)
    loss = model.compute_gradient(x, y, grad_out=out)
    np.testing.assert_allclose(out, 1.0 + g1, rtol=1e-12)
    p = model.predict(x)
    assert loss == pytest.approx(-np.mean(np.log(p[np.arange(10), y])), rel=1e-12)


def test_a_training_step_keeps_no_step_buffers_alive():
    # every forward cache (a convolution's columns: MBs) is freed by the backward that uses it, so a step's buffers
    # do not stay alive beside the next step's: after a step only the model's own arrays remain
    import tracemalloc

    x, y = np.random.default_rng(0).random((32, 784), dtype=np.float32), np.arange(32) % 10
    model = FeedForwardModel(FeedForwardTopology.from_spec(LENET, (1, 28, 28)), seed=0)
    model.compute_gradient(x, y)
    tracemalloc.start()
    try:
        model.compute_gradient(x, y)
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak > 2_000_000  # the step did allocate its columns (2.5 MB for the first convolution alone)
    assert held < 20_000, f"{held} bytes of the step still referenced"


@pytest.mark.parametrize("spec", [LENET, "conv(4,3,pad=1)-relu-maxpool(3,stride=2)-flatten-affine(5)",
                                  "conv(3,3)-relu-maxpool(2)-relu-maxpool(2)-flatten-affine(4)"])
def test_training_step_pools_before_relu_with_the_layer_by_layer_gradient(spec):
    # compute_gradient runs relu -> max-pool as pool -> relu; the public forward/backward go layer by layer. Half
    # of every image is zero (the convolution outputs its bias there: ties in every such window; negative biases
    # give windows whose maximum is negative) -- the gradients must be identical, bit for bit
    rng = np.random.default_rng(3)
    topo = FeedForwardTopology.from_spec(spec, (1, 28, 28) if spec == LENET else (1, 12, 12))
    n = 6
    x = rng.standard_normal((n, topo.num_inputs)).astype(np.float32)
    x[:, : topo.num_inputs // 2] = 0.0
    y = rng.integers(0, topo.num_outputs, n)
    model = FeedForwardModel(topo, seed=5)
    assert topo.layers[1].commutes_with_next(topo.layers[2])  # the relu -> max-pool pair the step swaps
    loss = model.compute_gradient(x, y, scale=2.0)
    fused = model.get_gradient()
    model.zero_grad()
    outs = model.forward(x, training=True)
    ref_loss, delta = topo.loss_layer.loss(model.backend, outs[-1], model.target(y), 2.0 / n)
    model.backward(delta)
    assert loss == ref_loss / n
    np.testing.assert_array_equal(fused, model.get_gradient())
    assert np.count_nonzero(fused) > topo.num_weights // 4


# ---- Spark's flat layout and init ------------------------------------------------------------------------------
@pytest.mark.parametrize("sizes, count", [([4, 5, 4, 3], 64), ([2, 2, 2], 12), ([784, 100, 10], 79510)])
def test_spark_weight_count(sizes, count):
    assert FeedForwardTopology.multilayer_perceptron(sizes).num_weights == count


def test_affine_layout_is_spark_column_major_then_bias():
    topo = FeedForwardTopology.multilayer_perceptron([3, 2])
    model = FeedForwardModel(topo, np.zeros(8), dtype=np.float64)
    x = np.eye(3)
    # W is 2 x 3 column-major: flat[1] is W[1, 0] (row 1, column 0); flat[6:8] is b
    for pos, (o, i) in enumerate([(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)]):
        w = np.zeros(8)
        w[pos] = 1.0
        model.set_weights(w)
        expected = np.zeros((3, 2))
        expected[i, o] = 1.0
        np.testing.assert_array_equal(model.predict_raw(x), expected)
    model.set_weights(np.array([0, 0, 0, 0, 0, 0, 0.5, -2.0]))
    np.testing.assert_array_equal(model.predict_raw(x), np.tile([0.5, -2.0], (3, 1)))


def test_mlp_forward_matches_a_hand_written_one():
    rng = np.random.default_rng(8)
    sizes = [4, 5, 4, 3]
    topo = FeedForwardTopology.multilayer_perceptron(sizes)
    w = rng.normal(size=64)
    x = rng.normal(size=(7, 4))
    a, o = x, 0
    for li, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        W = w[o:o + n_in * n_out].reshape(n_out, n_in, order="F")
        b = w[o + n_in * n_out:o + n_in * n_out + n_out]
        o += n_in * n_out + n_out
        a = a @ W.T + b
        if li < len(sizes) - 2:
            a = 1 / (1 + np.exp(-a))
    e = np.exp(a - a.max(axis=1, keepdims=True))
    model = FeedForwardModel(topo, w, dtype=np.float64)
    np.testing.assert_allclose(model.predict_raw(x), a, rtol=1e-12)
    np.testing.assert_allclose(model.predict(x), e / e.sum(axis=1, keepdims=True), rtol=1e-12)
    sig = FeedForwardModel(FeedForwardTopology.multilayer_perceptron(sizes, softmax_on_top=False), w,
                           dtype=np.float64)
    np.testing.assert_allclose(sig.predict(x), 1 / (1 + np.exp(-a)), rtol=1e-12)


def test_spark_initialization_range():
    topo = FeedForwardTopology.multilayer_perceptron([784, 100, 10])
    w = FeedForwardModel(topo, seed=3).get_weights()
    for layer, n_in in ((0, 784), (2, 100)):
        block = w[topo.offsets[layer]:topo.offsets[layer + 1]]
        bound = 2.4 / np.sqrt(n_in)
        assert np.abs(block).max() <= bound
        assert block.min() < -0.95 * bound and block.max() > 0.95 * bound  # fills the range
        assert abs(block.mean()) < 0.05 * bound and block.std() == pytest.approx(bound / np.sqrt(3), rel=0.05)
    # same seed, same weights; another seed, others
    np.testing.assert_array_equal(w, FeedForwardModel(topo, seed=3).get_weights())
    assert not np.array_equal(w, FeedForwardModel(topo, seed=4).get_weights())


def test_conv_fan_in_and_layout():
    topo = FeedForwardTopology.from_spec("conv(4,3)-flatten-affine(2)", (2, 5, 5))
    assert topo.offsets[:2] == [0, (3 * 3 * 2 + 1) * 4]
    w = FeedForwardModel(topo, seed=0, dtype=np.float64).get_weights()[:76]
    assert np.abs(w).max() <= 2.4 / np.sqrt(18) and np.abs(w).max() > 0.9 * 2.4 / np.sqrt(18)
    # weights (kh, kw, c_in, filters) row-major then bias; inputs are given as (c, h, w) rows
    model = FeedForwardModel(topo, np.zeros(topo.num_weights), dtype=np.float64)
    x = np.random.default_rng(0).normal(size=(2, 2, 5, 5))
    wts = np.zeros(topo.num_weights)
    k = np.zeros((3, 3, 2, 4))
    k[1, 2, 1, 3] = 1.0  # filter 3 reads channel 1 at kernel offset (1, 2)
    wts[:72] = k.ravel()
    wts[72 + 3] = 0.25
    model.set_weights(wts)
    conv_out = model.forward(x.reshape(2, -1))[0]  # (n, oh, ow, filters)
    np.testing.assert_allclose(conv_out[..., 3], x[:, 1, 1:4, 2:5] + 0.25, rtol=1e-12)
    assert not conv_out[..., :3].any()


# ---- spec errors ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, shape, message", [
    ("conv(6,5)-bogus", (1, 28, 28), r"layer 1 \('bogus'\): unknown layer 'bogus'; expected one of affine, avgpool"),
    ("conv(6,30)-flatten-affine(3)", (1, 28, 28),
     r"layer 0 \(conv\(6,30,stride=1,pad=0\)\) with input shape \(1, 28, 28\): .*a 30x30 window does not fit an "
     r"input of 28x28"),
    ("conv(6,5)-affine(3)", (1, 28, 28),
     r"layer 1 \(affine\(3\)\) with input shape \(6, 24, 24\): affine\(3\) needs a flat input but gets shape "
     r"\(6, 24, 24\); add 'flatten' before it"),
    ("affine(3)-conv(2,2)", (4,), r"layer 1 \(conv.*\) with input shape \(3,\): .*needs an image input"),
    ("conv(6,5,foo=1)", (1, 8, 8), r"layer 0 \('conv\(6,5,foo=1\)'\): unknown argument 'foo'; expected filters, "
                                   r"kernel, stride, pad"),
    ("conv(6)", (1, 8, 8), r"layer 0 \('conv\(6\)'\): missing argument kernel"),
    ("affine(x)", (4,), r"layer 0 \('affine\(x\)'\): 'x' is not a number"),
    ("affine(2.5)", (4,), r"expected a whole number, got 2.5"),
    ("affine(0)", (4,), r"layer 0 \('affine\(0\)'\): affine\(0\): the output size must be >= 1"),
    ("dropout(1.5)", (4,), r"layer 0 \('dropout\(1.5\)'\): dropout\(1.5\): the rate must be in \[0, 1\)"),
    ("softmax-affine(3)", (4,), r"layer 0 \(softmax\): a loss layer can only be the last layer"),
    ("conv(2,3)-maxpool(3)-flatten-affine(2)", (1, 4, 4),
     r"layer 1 \(maxpool\(3,stride=3\)\) with input shape \(2, 2, 2\): .*3x3 window does not fit an input of 2x2"),
    ("flatten-affine(3)-", (1, 2, 2), r"empty layer in spec 'flatten-affine\(3\)-'"),
    ("conv(2,1)", (1, 3, 3), r"layer 1 \(softmax\) with input shape \(2, 3, 3\): softmax needs a flat input but gets "
                             r"shape \(2, 3, 3\); add 'flatten' before it"),
    ("affine(3)", (1, 2), r"input shape must be \(features,\) or \(channels, height, width\)"),
])
def test_spec_errors(spec, shape, message):
    with pytest.raises(SpecError, match=message):
        FeedForwardTopology.from_spec(spec, shape)


def test_mlp_size_errors_and_spec_error_is_value_error():
    with pytest.raises(SpecError, match=r"at least an input and an output size, all >= 1, got \[3, 0, 2\]"):
        FeedForwardTopology.multilayer_perceptron([3, 0, 2])
    assert issubclass(SpecError, ValueError)


def test_model_input_errors():
    model = FeedForwardModel(FeedForwardTopology.multilayer_perceptron([4, 3]), seed=0)
    with pytest.raises(ValueError, match=r"weights must be a vector of 15 values .* got shape \(14,\)"):
        FeedForwardModel(model.topology, np.zeros(14))
    with pytest.raises(ValueError, match=r"input must be a \(batch, 4\) array, got \(2, 5\)"):
        model.predict(np.zeros((2, 5)))
    with pytest.raises(ValueError, match=r"labels must be integers in \[0, 3\); got \[3\]"):
        model.compute_gradient(np.zeros((2, 4)), np.array([0, 3]))


# ---- dtypes and stability --------------------------------------------------------------------------------------
def test_float32_default_float64_on_request():
    topo = FeedForwardTopology.from_spec("conv(2,3)-relu-avgpool(2)-flatten-affine(3)", (1, 6, 6))
    x, y = _data(np.random.default_rng(0), 4, 36, 3)
    m32 = FeedForwardModel(topo, seed=0)
    assert m32.weights.dtype == m32.gradient.dtype == np.float32
    m32.compute_gradient(x, y)
    assert all(o.dtype == np.float32 for o in m32.forward(x, training=True))
    assert m32.get_gradient().dtype == np.float32 and m32.predict(x).dtype == np.float32
    m64 = FeedForwardModel(topo, seed=0, dtype=np.float64)
    m64.compute_gradient(x, y)
    assert m64.predict(x).dtype == np.float64
    np.testing.assert_allclose(m32.get_gradient(), m64.get_gradient(), rtol=1e-3, atol=1e-5)


def test_softmax_xent_finite_when_probabilities_underflow():
    be = NumpyBackend()
    for dtype in (np.float32, np.float64):
        z = np.array([[1000.0, 0.0, -1000.0], [-5000.0, 5000.0, 0.0]], dtype=dtype)
        t = one_hot(np.array([2, 0]), 3, dtype)
        loss, delta = be.softmax_xent(z, t, 0.5)
        assert np.isfinite(loss) and loss == pytest.approx(2000.0 + 10000.0, rel=1e-6)
        assert np.all(np.isfinite(delta))
        np.testing.assert_allclose(delta, 0.5 * (np.array([[1, 0, 0], [0, 1, 0]]) - t), atol=1e-7)
        p = be.softmax(z)
        assert np.all(np.isfinite(p)) and p[0, 2] == 0.0
        loss, delta = be.sigmoid_sq(z, t, 1.0)
        assert np.isfinite(loss) and np.all(np.isfinite(delta))
    # through a model whose logits are huge
    topo = FeedForwardTopology.multilayer_perceptron([2, 3])
    model = FeedForwardModel(topo, np.array([1e4, -1e4, 0, 0, 0, 0, 0, 0, 0]))
    loss = model.compute_gradient(np.array([[1.0, 0.0]]), np.array([1]))
    assert np.isfinite(loss) and loss == pytest.approx(2e4, rel=1e-6)
    assert np.all(np.isfinite(model.get_gradient()))


# ---- the in-process trainer ----------------------------------------------------------------------------------
def test_trainer_one_full_batch_step_by_hand():
    rng = np.random.default_rng(9)
    topo = FeedForwardTopology.multilayer_perceptron([3, 4, 2])
    x, y = _data(rng, 6, 3, 2)
    model = FeedForwardModel(topo, seed=0, dtype=np.float64)
    w0 = model.get_weights()
    model.compute_gradient(x, y)
    g = model.get_gradient()
    cfg = TrainConfig(solver="sgd", stepSize=0.5, batchSize=6, regParam=0.1, seed=0)
    history = train(model, x, y, cfg, epochs=1)
    np.testing.assert_allclose(model.get_weights(), w0 - 0.5 * (g + 0.1 * w0), rtol=1e-12)
    assert len(history) == 1


def test_trainer_is_seeded_and_learns_spark_sample(spark_data_dir):
    x, y = read_libsvm(f"{spark_data_dir}/sample_multiclass_classification_data.txt")
    y = y.astype(np.int64)
    topo = FeedForwardTopology.multilayer_perceptron([4, 8, 3])
    cfg = TrainConfig(solver="momentum", stepSize=0.1, batchSize=16, seed=1, lrSchedule="cosine")
    runs = []
    for _ in range(2):
        model = FeedForwardModel(topo, seed=2)
        runs.append((train(model, x, y, cfg, epochs=30), model.get_weights()))
    assert runs[0][0] == runs[1][0] and np.array_equal(runs[0][1], runs[1][1])
    history = runs[0][0]
    assert history[-1] < 0.5 * history[0]
    model.set_weights(runs[0][1])
    assert accuracy(model, x, y) > 0.9


def test_trainer_errors():
    model = FeedForwardModel(FeedForwardTopology.multilayer_perceptron([2, 2]), seed=0)
    with pytest.raises(ValueError, match="x has 3 rows but y has 2 labels"):
        train(model, np.zeros((3, 2)), np.zeros(2), TrainConfig(solver="sgd"))
    with pytest.raises(ValueError, match="batchSize must be >= 1, got 0"):
        train(model, np.zeros((3, 2)), np.zeros(3), TrainConfig(solver="sgd", batchSize=0))
    with pytest.raises(ValueError, match="regParam must be >= 0, got -1.0"):
        train(model, np.zeros((3, 2)), np.zeros(3), TrainConfig(solver="sgd", regParam=-1.0))
    w0 = model.get_weights()
    with pytest.raises(ValueError, match=r"labels must be integers in \[0, 2\); got \[2.0, 0.5\]"):
        train(model, np.zeros((4, 2)), np.array([0, 2, 1, 0.5]), TrainConfig(solver="sgd", batchSize=2))
    np.testing.assert_array_equal(model.get_weights(), w0)  # rejected before any step


def test_lenet_learns_fashion_mnist():
    x_train, y_train, x_test, y_test = fashion_mnist()
    model = FeedForwardModel(FeedForwardTopology.from_spec(LENET, (1, 28, 28)), seed=0)
    cfg = TrainConfig(solver="adam", stepSize=2e-3, batchSize=64, seed=0)
    history = train(model, x_train[:4000], y_train[:4000], cfg, epochs=2)
    assert history[1] < history[0]
    acc = accuracy(model, x_test[:2000], y_test[:2000])
    assert acc > 0.7, f"test accuracy {acc} (chance is 0.1)"


# ---- forward semantics against direct loops ---------------------------------------------------------------
@pytest.mark.parametrize("c, k, stride, pad", [(1, 5, 1, 2), (1, 3, 2, 0), (3, 3, 1, 1), (2, 2, 2, 1)])
def test_conv_forward_is_a_direct_convolution(c, k, stride, pad):
    rng = np.random.default_rng(c * 10 + k)
    n, h, w, f = 2, 7, 6, 4
    topo = FeedForwardTopology.from_spec(f"conv({f},{k},stride={stride},pad={pad})-flatten-affine(2)", (c, h, w))
    wts = rng.normal(size=topo.num_weights)
    model = FeedForwardModel(topo, wts, dtype=np.float64)
    x = rng.normal(size=(n, c, h, w))
    kern = wts[:k * k * c * f].reshape(k, k, c, f)
    bias = wts[k * k * c * f:(k * k * c + 1) * f]
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh, ow = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    ref = np.zeros((n, oh, ow, f))
    for a in range(oh):
        for b in range(ow):
            patch = xp[:, :, a * stride:a * stride + k, b * stride:b * stride + k]  # (n, c, k, k)
            ref[:, a, b, :] = np.einsum("ncij,ijcf->nf", patch, kern) + bias
    np.testing.assert_allclose(model.forward(x.reshape(n, -1))[0], ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode, k, stride", [("max", 2, 2), ("max", 3, 2), ("avg", 2, 2), ("avg", 3, 1)])
def test_pool_forward_is_a_direct_pool(mode, k, stride):
    rng = np.random.default_rng(k + stride)
    x = rng.normal(size=(2, 3, 7, 8))  # (n, c, h, w)
    topo = FeedForwardTopology.from_spec(f"conv(3,1)-{mode}pool({k},stride={stride})-flatten-affine(2)", (3, 7, 8))
    wts = np.zeros(topo.num_weights)
    wts[:9] = np.eye(3).ravel()  # the 1x1 conv passes the image through
    out = FeedForwardModel(topo, wts, dtype=np.float64).forward(x.reshape(2, -1))[1]
    oh, ow = (7 - k) // stride + 1, (8 - k) // stride + 1
    reduce = np.max if mode == "max" else np.mean
    ref = np.array([[[reduce(x[:, :, a * stride:a * stride + k, b * stride:b * stride + k], axis=(2, 3))
                      for b in range(ow)] for a in range(oh)]])[0].transpose(2, 0, 1, 3)
    np.testing.assert_allclose(out, ref, rtol=1e-12)


@pytest.mark.parametrize("c, k, stride, pad", [(1, 5, 1, 2), (3, 3, 2, 1), (2, 2, 1, 0), (6, 5, 1, 0), (4, 3, 1, 1)])
def test_im2col_col2im_adjoint_and_fused_input_delta(c, k, stride, pad):
    """<im2col(x), C> == <x, col2im(C)>, and NumPy's fused conv input delta equals col2im(dy w^T)."""
    be = NumpyBackend()
    rng = np.random.default_rng(k)
    shape = (3, 7, 6, c)
    x = rng.normal(size=shape)
    cols = be.im2col(x, k, k, stride, pad)
    ccols = rng.normal(size=cols.shape)
    assert np.dot(cols.ravel(), ccols.ravel()) == pytest.approx(np.dot(x.ravel(), be.col2im(ccols, shape, k, k, stride,
                                                                                              pad).ravel()), rel=1e-12)
    dy, w = rng.normal(size=(cols.shape[0], 4)), rng.normal(size=(cols.shape[1], 4))
    np.testing.assert_allclose(be.conv_backward_input(dy, w, shape, k, k, stride, pad),
                               be.col2im(dy @ w.T, shape, k, k, stride, pad), rtol=1e-12, atol=1e-12)


def test_trainer_on_a_device_backend_matches_numpy(spark_data_dir):
    """The trainer's device path (host updater, weights copied back) on PoCL's OpenCL device equals NumPy's."""
    from sparkdl_hetero.backends import BackendUnavailable

    try:
        be = get_backend("opencl")
    except BackendUnavailable as exc:
        pytest.skip(str(exc))
    x, y = read_libsvm(f"{spark_data_dir}/sample_multiclass_classification_data.txt")
    topo = FeedForwardTopology.multilayer_perceptron([4, 6, 3])
    cfg = TrainConfig(solver="adam", stepSize=0.05, batchSize=32, seed=3)
    results = []
    for backend in ("numpy", be):
        model = FeedForwardModel(topo, seed=5, backend=backend)
        results.append((train(model, x, y.astype(int), cfg, epochs=3), model.get_weights()))
    assert not model.backend.host_memory  # really on the device
    np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-4)
    np.testing.assert_allclose(results[1][1], results[0][1], rtol=1e-3, atol=1e-4)
    assert not np.allclose(results[0][1], FeedForwardModel(topo, seed=5).get_weights())


# ---- NumpyBackend's fast paths against the generic array-module code ------------------------------------------
@pytest.mark.parametrize("n, h, w, c, k", [(4, 28, 28, 6, 2), (2, 10, 10, 16, 2), (1, 7, 9, 2, 2), (2, 9, 7, 3, 3),
                                           (3, 6, 6, 1, 3), (2, 8, 8, 1, 2), (1, 9, 8, 2, 4), (1, 12, 13, 2, 12)])
@pytest.mark.parametrize("kind", ["normal", "relu", "integers"])
def test_maxpool_disjoint_windows_fast_path_equals_general_path(n, h, w, c, k, kind):
    """Same maxima, same first-in-raster-order argmax (ties: relu zeros, repeated integers), same input delta."""
    rng = np.random.default_rng(h * w + c)
    x = rng.normal(size=(n, h, w, c)).astype(np.float32)
    x = {"normal": x, "relu": np.maximum(x, 0), "integers": np.round(x)}[kind]
    fast, general = NumpyBackend(), get_backend("numpy", reference=True)
    y, idx = fast.maxpool(x, k, k)
    wy, widx = general.maxpool(x, k, k)
    np.testing.assert_array_equal(y, wy)
    assert idx.dtype == widx.dtype
    np.testing.assert_array_equal(idx, widx)
    dy = rng.normal(size=y.shape).astype(np.float32)
    want = general.maxpool_backward(dy, widx, x.shape, k, k)
    np.testing.assert_array_equal(fast.maxpool_backward(dy, idx, x.shape, k, k), want)
    np.testing.assert_array_equal(fast.maxpool_backward(np.asfortranarray(dy), idx, x.shape, k, k), want)


@pytest.mark.parametrize("rows, cols", [(25088, 6), (3200, 16), (96, 10), (7, 3), (64, 120), (1, 6)])
def test_bias_add_and_column_sum_on_narrow_rows_equal_the_plain_ops(rows, cols):
    rng = np.random.default_rng(rows)
    be = NumpyBackend()
    x = rng.normal(size=(rows, cols)).astype(np.float32)
    b = rng.normal(size=cols).astype(np.float32)
    y = x.copy()
    be.add_row(y, b)
    np.testing.assert_array_equal(y, x + b)
    out = rng.normal(size=cols).astype(np.float32)
    want = 0.5 * x.astype(np.float64).sum(axis=0) + 0.25 * out
    bound = _sum_error_bound(rows, np.float32, 0.5 * np.abs(x).sum(axis=0, dtype=np.float64) + 0.25 * np.abs(out))
    be.col_sum(x, out, alpha=0.5, beta=0.25)
    assert np.all(np.abs(out - want) <= bound)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sigmoid_equals_scipy_expit_and_saturates(dtype):
    from scipy.special import expit

    x = np.concatenate([np.linspace(-30, 30, 601), [-1e4, -200.0, -90.0, 0.0, 90.0, 200.0, 1e4]]).astype(dtype)
    with np.errstate(over="raise", divide="raise", invalid="raise"):  # no overflow warning escapes
        y = NumpyBackend().activation("sigmoid", x)
    assert y.dtype == dtype
    np.testing.assert_allclose(y, expit(x), rtol=4 * np.finfo(dtype).eps, atol=np.finfo(dtype).tiny)
    assert y[-7] == 0.0 and y[-1] == 1.0 and y[-4] == 0.5


def _sum_error_bound(k: int, dtype, magnitude):
    """The worst-case rounding error of a float sum of ``k`` terms (any order: a BLAS kernel, pieces, pairwise)
    whose absolute values add up to ``magnitude``: ``k * eps * magnitude`` (Higham's gamma_k bound, to first
    order), plus one rounding of the result."""
    return (k + 1) * np.finfo(dtype).eps * magnitude


@pytest.mark.parametrize("m, k, n, trans_a, trans_b", [
    (20000, 25, 6, False, False), (20000, 25, 6, True, False), (9000, 100, 10, False, False),
    (25, 20000, 6, False, False), (25, 20000, 6, True, True), (150, 9000, 16, True, False),
    (9000, 150, 16, False, False), (9000, 10, 100, False, True), (64, 400, 120, False, False)])
@pytest.mark.parametrize("beta", [0.0, 1.0, 0.5])
def test_skinny_gemm_in_pieces_equals_one_product(m, k, n, trans_a, trans_b, beta):
    """Skinny float32 products (which the NumPy backend may run in pieces) equal the float64 product within the
    rounding bound of their k-term sums, with or without ``out``/``beta``, as the reference backend's do."""
    rng = np.random.default_rng(m + k)
    a = rng.normal(size=(k, m) if trans_a else (m, k)).astype(np.float32)
    b = rng.normal(size=(n, k) if trans_b else (k, n)).astype(np.float32)
    opa, opb = (a.T if trans_a else a).astype(np.float64), (b.T if trans_b else b).astype(np.float64)
    want, magnitude = opa @ opb, np.abs(opa) @ np.abs(opb)
    for be in (NumpyBackend(), get_backend("numpy", reference=True)):
        got = be.gemm(a, b, trans_a=trans_a, trans_b=trans_b)
        assert got.shape == want.shape and got.dtype == np.float32
        assert np.all(np.abs(got - want) <= _sum_error_bound(k, np.float32, magnitude))
        out = rng.normal(size=want.shape).astype(np.float32)
        expect = want + beta * out
        bound = _sum_error_bound(k + 1, np.float32, magnitude + abs(beta) * np.abs(out))
        got = be.gemm(a, b, out=out, trans_a=trans_a, trans_b=trans_b, beta=beta)
        assert got is out
        assert np.all(np.abs(out - expect) <= bound)


@pytest.mark.parametrize("n, h, w, c, k, stride, pad", [(4, 28, 28, 1, 5, 1, 2), (4, 14, 14, 6, 5, 1, 0),
                                                        (2, 7, 9, 3, 3, 2, 1), (2, 8, 8, 1, 4, 3, 1),
                                                        (3, 9, 9, 4, 4, 3, 2)])
def test_im2col_fast_paths_equal_the_generic_columns(n, h, w, c, k, stride, pad):
    x = np.random.default_rng(h * c).normal(size=(n, h, w, c)).astype(np.float32)
    ref = get_backend("numpy", reference=True)
    got, want = NumpyBackend().im2col(x, k, k, stride, pad), ref.im2col(x, k, k, stride, pad)
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("rows, k", [(4096, 10), (3, 4), (5, 1000), (1, 2)])
def test_softmax_on_class_rows_equals_the_generic_softmax(rows, k):
    rng = np.random.default_rng(k)
    z = (rng.normal(size=(rows, k)) * 30).astype(np.float32)
    z[0, 0] = 5000.0  # one probability 1, the rest underflow
    t = rng.dirichlet(np.ones(k), size=rows).astype(np.float32)  # soft targets
    fast, general = NumpyBackend(), get_backend("numpy", reference=True)
    z0, t0 = z.copy(), t.copy()
    # float32 rounding of log p (~|log p| ulp) moves tiny probabilities by a few 1e-6 relative
    np.testing.assert_allclose(fast.softmax(z), general.softmax(z), rtol=5e-5, atol=1e-20)
    loss, delta = fast.softmax_xent(z, t, 0.25)
    np.testing.assert_array_equal(z, z0)  # inputs untouched (one row: z.T is a contiguous view)
    np.testing.assert_array_equal(t, t0)
    want_loss, want_delta = general.softmax_xent(z, t, 0.25)
    assert np.isfinite(loss) and loss == pytest.approx(want_loss, rel=1e-6)
    assert delta.shape == (rows, k) and delta.flags.c_contiguous
    np.testing.assert_allclose(delta, want_delta, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("trans_a, beta", [(True, 1.0), (False, 0.0), (True, 0.5)])
def test_gemm_with_an_inner_dimension_of_one_is_the_outer_product(trans_a, beta):
    rng = np.random.default_rng(1)
    a = rng.normal(size=(1, 400) if trans_a else (400, 1)).astype(np.float32)
    b = rng.normal(size=(1, 120)).astype(np.float32)
    out = rng.normal(size=(400, 120)).astype(np.float32)
    want = np.outer(a, b) + beta * out
    got = NumpyBackend().gemm(a, b, out=out, trans_a=trans_a, beta=beta)
    assert got is out
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(NumpyBackend().gemm(a, b, trans_a=trans_a), np.outer(a, b), rtol=1e-6)


# ---- passes of a few rows -------------------------------------------------------------------------------------
class _WholeBatchBackend(NumpyBackend):
    """NumPy taking any batch in one pass, as the accelerator backends do."""

    cache_bytes = None


def test_rows_per_pass_follows_the_largest_activations() -> None:
    lenet = FeedForwardTopology.from_spec(LENET, (1, 28, 28))  # conv1: 784 + 4704 + 19600 columns a row
    mlp = FeedForwardTopology.multilayer_perceptron([784, 100, 10])
    assert FeedForwardModel(lenet).rows_per_pass == 64  # 8 MiB / (25088 * 4 B) = 83 -> 64
    assert FeedForwardModel(lenet, dtype=np.float64).rows_per_pass == 32
    assert FeedForwardModel(mlp).rows_per_pass == 1024  # capped
    assert FeedForwardModel(lenet, backend=_WholeBatchBackend()).rows_per_pass is None


@pytest.mark.parametrize("labels", [True, False])  # integer labels, or a (rows, classes) target matrix
def test_a_batch_in_passes_has_the_gradient_and_loss_of_one_pass(labels: bool) -> None:
    topo = FeedForwardTopology.from_spec("conv(3,3,pad=1)-relu-maxpool(2)-flatten-affine(5)-sigmoid-affine(4)",
                                         (1, 6, 6))
    rng = np.random.default_rng(3)
    x = rng.normal(size=(77, 36))  # 77 rows: passes of 32, 32 and 13
    y = rng.integers(0, 4, 77)
    target = y if labels else one_hot(y, 4, np.float64) * 0.9 + 0.025
    whole = FeedForwardModel(topo, seed=1, dtype=np.float64, backend=_WholeBatchBackend())
    parts = FeedForwardModel(topo, whole.get_weights(), dtype=np.float64)
    assert parts.rows_per_pass == 1024
    parts.rows_per_pass = 32
    for model in (whole, parts):
        model.zero_grad()
    l1 = whole.compute_gradient(x, target, scale=3.0)
    l2 = parts.compute_gradient(x, target, scale=3.0)
    assert l2 == pytest.approx(l1, rel=1e-13)
    np.testing.assert_allclose(parts.get_gradient(), whole.get_gradient(), rtol=1e-12, atol=1e-15)
    out = np.ones(topo.num_weights)  # grad_out: added to, after the model's own gradient is reset
    assert parts.compute_gradient(x, target, grad_out=out) == pytest.approx(l1, rel=1e-13)
    np.testing.assert_allclose(out - 1.0, whole.get_gradient() / 3.0, rtol=1e-10, atol=1e-13)
