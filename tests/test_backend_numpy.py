"""The NumPy backend against its reference (the plain array-module code): every op agrees within the rounding of
its arithmetic, a model's gradient is the same through both; the debugging switch; the activation registry
against the kernels' ACT_* codes; the backend seam's host_memory; the layers' commute rule; training steps that
reuse freed memory."""

from __future__ import annotations

import platform
import re
import subprocess
import sys
from importlib import resources

import numpy as np
import pytest

from sparkdl_hetero.backends import NumpyBackend, get_backend
from sparkdl_hetero.backends.activations import NAMES, REGISTRY, activation
from sparkdl_hetero.nn import FeedForwardModel, FeedForwardTopology
from sparkdl_hetero.nn.topology import parse_layer

LENET = "conv(6,5,pad=2)-relu-maxpool(2)-conv(16,5)-relu-maxpool(2)-flatten-affine(120)-relu-affine(84)-relu-affine(10)"
FAST, REF = NumpyBackend(), get_backend("numpy", reference=True)


def _tol(dtype, terms: int = 1) -> float:
    """Relative tolerance of a result that sums ``terms`` rounded products (a few roundings per element op)."""
    return float(8 * (terms + 1) * np.finfo(dtype).eps)


def _close(got, want, dtype, terms: int = 1, magnitude=None) -> None:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    mag = np.abs(want) if magnitude is None else magnitude
    assert np.all(np.abs(got - want) <= _tol(dtype, terms) * mag + np.finfo(dtype).tiny), \
        f"max difference {np.max(np.abs(got - want))}"


def test_reference_switch_and_environment(monkeypatch):
    assert type(get_backend("numpy")) is NumpyBackend
    assert type(REF) is not NumpyBackend and "reference" in REF.describe()
    monkeypatch.setenv("SPARKDL_NUMPY_REFERENCE", "1")
    assert type(get_backend("numpy")) is type(REF)
    assert type(get_backend("numpy", reference=False)) is NumpyBackend
    assert type(get_backend("auto", opencl=False)) is type(REF)
    monkeypatch.setenv("SPARKDL_NUMPY_REFERENCE", "0")
    assert type(get_backend("numpy")) is NumpyBackend
    with pytest.raises(ValueError, match=r"backend 'numpy' takes the options \['reference'\]; got \['device'\]"):
        get_backend("numpy", device=0)


def test_host_memory_of_the_numpy_backends():
    assert FAST.host_memory and REF.host_memory


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_op_agrees_with_the_reference(dtype):
    rng = np.random.default_rng(7)

    def r(*shape):
        return rng.standard_normal(shape).astype(dtype)

    a, b = r(300, 40), r(40, 7)
    mag = np.abs(a) @ np.abs(b)
    for ta, tb in [(False, False), (True, False), (False, True)]:
        x, y = (a.T.copy() if ta else a), (b.T.copy() if tb else b)
        _close(FAST.gemm(x, y, trans_a=ta, trans_b=tb), REF.gemm(x, y, trans_a=ta, trans_b=tb), dtype, 40, mag)
    out1, out2 = r(300, 7), None
    out2 = out1.copy()
    FAST.gemm(a, b, out=out1, alpha=0.5, beta=0.25)
    REF.gemm(a, b, out=out2, alpha=0.5, beta=0.25)
    _close(out1, out2, dtype, 41, mag + np.abs(out2))
    outer = FAST.gemm(r(400, 1), r(1, 120))  # an inner dimension of 1: the broadcast path
    assert outer.shape == (400, 120)
    tall = r(3000, 6)
    for rows in (tall, tall[:10]):
        y1, y2, v = rows.copy(), rows.copy(), r(6)
        FAST.add_row(y1, v)
        REF.add_row(y2, v)
        np.testing.assert_array_equal(y1, y2)
        s1, s2 = r(6), None
        s2 = s1.copy()
        FAST.col_sum(rows, s1, alpha=2.0, beta=0.5)
        REF.col_sum(rows, s2, alpha=2.0, beta=0.5)
        _close(s1, s2, dtype, len(rows), 2 * np.abs(rows).sum(axis=0) + np.abs(s2))
    z = r(50, 10) * 20
    t = rng.dirichlet(np.ones(10), size=50).astype(dtype)
    _close(FAST.softmax(z), REF.softmax(z), dtype, 10 * 20)
    (l1, d1), (l2, d2) = FAST.softmax_xent(z, t, 0.3), REF.softmax_xent(z, t, 0.3)
    assert l1 == pytest.approx(l2, rel=_tol(dtype, 500))
    _close(d1, d2, dtype, 200, 0.3 * np.ones_like(d2))
    (l1, d1), (l2, d2) = FAST.sigmoid_sq(z, t, 0.5), REF.sigmoid_sq(z, t, 0.5)
    assert l1 == pytest.approx(l2, rel=_tol(dtype, 500))
    _close(d1, d2, dtype, 4, np.ones_like(d2))
    for kind in NAMES:
        x = r(20, 30) * 4
        _close(FAST.activation(kind, x, 0.2), REF.activation(kind, x, 0.2), dtype, 4)
        fy, dy = REF.activation(kind, x, 0.2), r(20, 30)
        _close(FAST.activation_backward(kind, fy, dy, 0.2), REF.activation_backward(kind, fy, dy, 0.2), dtype)
    img = r(3, 10, 11, 4)
    for k, stride, pad in [(3, 1, 1), (5, 1, 2), (3, 2, 0), (2, 2, 1)]:
        cols = FAST.im2col(img, k, k, stride, pad)
        np.testing.assert_array_equal(cols, REF.im2col(img, k, k, stride, pad))
        np.testing.assert_array_equal(FAST.col2im(cols, img.shape, k, k, stride, pad),
                                      REF.col2im(cols, img.shape, k, k, stride, pad))
        w, dyc = r(k * k * 4, 5), r(cols.shape[0], 5)
        _close(FAST.conv_backward_input(dyc, w, img.shape, k, k, stride, pad),
               REF.conv_backward_input(dyc, w, img.shape, k, k, stride, pad), dtype, 5 * k * k,
               REF.col2im(np.abs(dyc) @ np.abs(w).T, img.shape, k, k, stride, pad))
    for k, stride in [(2, 2), (3, 2), (3, 3)]:
        (y1, i1), (y2, i2) = FAST.maxpool(img, k, stride), REF.maxpool(img, k, stride)
        np.testing.assert_array_equal(y1, y2)
        np.testing.assert_array_equal(i1, i2)
        g = r(*y1.shape)
        np.testing.assert_array_equal(FAST.maxpool_backward(g, i1, img.shape, k, stride),
                                      REF.maxpool_backward(g, i2, img.shape, k, stride))
        np.testing.assert_array_equal(FAST.avgpool(img, k, stride), REF.avgpool(img, k, stride))
        np.testing.assert_array_equal(FAST.avgpool_backward(g, img.shape, k, stride),
                                      REF.avgpool_backward(g, img.shape, k, stride))


@pytest.mark.parametrize("spec, shape", [
    (LENET, (1, 28, 28)), ("affine(30)-sigmoid-affine(20)-tanh-affine(5)", 40),
    ("conv(4,3,pad=1)-batchnorm-relu-res(conv(8,3,stride=2,pad=1)-batchnorm-relu-conv(8,3,pad=1)-batchnorm)-relu"
     "-maxpool(3,stride=2,pad=1)-avgpool(2,stride=1,pad=1)-gap-affine(5)", (3, 12, 12)),
])
def test_model_gradient_is_the_same_through_both_backends(spec, shape):
    topo = FeedForwardTopology.from_spec(spec, shape)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((40, topo.num_inputs))
    y = rng.integers(0, topo.num_outputs, 40)
    got = []
    for be in (FAST, REF):
        m = FeedForwardModel(topo, seed=3, dtype=np.float64, backend=be)
        got.append((m.compute_gradient(x, y), m.get_gradient(), m.get_state()))
    (l1, g1, s1), (l2, g2, s2) = got
    eps = np.finfo(np.float64).eps
    assert l1 == pytest.approx(l2, rel=1e4 * eps)
    np.testing.assert_allclose(g1, g2, rtol=1e6 * eps, atol=1e6 * eps * np.abs(g2).max())
    np.testing.assert_allclose(s1, s2, rtol=1e6 * eps, atol=1e6 * eps)


# ---- the activation registry ------------------------------------------------------------------------------------
def test_registry_codes_match_the_opencl_kernels():
    text = resources.files("sparkdl_hetero.kernels").joinpath("opencl_ops.cl").read_text(encoding="utf-8")
    defines = {name.lower(): int(code) for name, code in re.findall(r"#define\s+ACT_(\w+)\s+(\d+)", text)}
    assert defines == {name: act.code for name, act in REGISTRY.items()}


def test_every_registered_activation_parses_and_prints_back():
    for name, act in REGISTRY.items():
        layer = parse_layer(f"{name}(0.3)" if act.has_alpha else name)
        assert layer.kind == name and parse_layer(layer.spec()) == layer
        assert act.onnx_op and act.onnx_attributes(0.3) == ({"alpha": 0.3} if act.has_alpha else {})
    with pytest.raises(ValueError, match="unknown activation 'swish'; expected one of sigmoid, tanh, relu"):
        activation("swish")


# ---- the layers' commute rule -----------------------------------------------------------------------------------
@pytest.mark.parametrize("first, second, commutes", [("relu", "maxpool(2)", True), ("relu", "avgpool(2)", False),
                                                     ("leaky_relu", "maxpool(2)", False),
                                                     ("sigmoid", "maxpool(2)", False), ("maxpool(2)", "relu", False),
                                                     ("relu", "relu", False)])
def test_commutes_with_next(first, second, commutes):
    assert parse_layer(first).commutes_with_next(parse_layer(second)) is commutes


# ---- the model's explicit device-input path ---------------------------------------------------------------------
def test_device_batch_in_the_engine_layout_runs_through_forward_device():
    """On the NumPy backend a device batch IS a NumPy array: the model cannot tell it from host rows, so the
    device path is explicit (an NHWC batch given to forward would be taken as rows and refused)."""
    topo = FeedForwardTopology.from_spec("conv(3,3,pad=1)-relu-maxpool(2)-flatten-affine(4)", (2, 6, 6))
    model = FeedForwardModel(topo, seed=1, dtype=np.float64)
    x = np.random.default_rng(2).standard_normal((5, topo.num_inputs))
    batch = model.device_batch(x)
    assert batch.shape == (5, 6, 6, 2)
    np.testing.assert_array_equal(batch, x.reshape(5, 2, 6, 6).transpose(0, 2, 3, 1))
    for a, b in zip(model.forward_device(batch), model.forward(x), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match=r"input must be a \(batch, 72\) array, got \(5, 6, 6, 2\)"):
        model.forward(batch)


@pytest.mark.parametrize("n, h, c, f, k, stride, pad", [
    (16, 32, 8, 5, 3, 1, 1), (40, 28, 1, 6, 5, 1, 2), (40, 31, 6, 7, 3, 2, 1), (40, 48, 16, 4, 1, 2, 0),
    (9, 20, 32, 24, 3, 1, 1), (3, 9, 16, 5, 3, 1, 2), (4, 10, 20, 6, 5, 1, 0)])
def test_convolution_in_blocks_of_images_equals_the_reference(n, h, c, f, k, stride, pad):
    """NumPy's convolution works on blocks of images that fit a core's cache (the first shapes span several blocks
    with one BLAS thread) and, from 16 input channels, takes the input delta of a stride-1 convolution as a
    convolution of dy (the last ones); forward, weight/bias gradients and input delta equal the reference's."""
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(n + h)
    x = rng.standard_normal((n, h, h, c)).astype(np.float32)
    w = rng.standard_normal((k * k * c, f)).astype(np.float32)
    b = rng.standard_normal(f).astype(np.float32)
    with threadpool_limits(limits=1):
        y = FAST.conv_forward(x, w, b, k, k, stride, pad)
        want = REF.conv_forward(x, w, b, k, k, stride, pad)
        cols = np.abs(REF.im2col(x, k, k, stride, pad))
        _close(y, want, np.float32, k * k * c + 1, cols @ np.abs(w) + np.abs(b))
        dy = rng.standard_normal(y.shape).astype(np.float32)
        grads = []
        for be in (FAST, REF):
            gw, gb = np.ones_like(w), np.ones_like(b)  # accumulated into
            dx = be.conv_backward(x, dy, w, gw, gb, k, k, stride, pad, need_dx=True)
            grads.append((gw, gb, dx))
            assert be.conv_backward(x, dy, w, gw.copy(), gb.copy(), k, k, stride, pad, need_dx=False) is None
    (gw1, gb1, dx1), (gw2, gb2, dx2) = grads
    _close(gw1, gw2, np.float32, y.shape[0] + 1, cols.T @ np.abs(dy) + 1)
    _close(gb1, gb2, np.float32, y.shape[0] + 1, np.abs(dy).sum(0) + 1)
    _close(dx1, dx2, np.float32, k * k * f, REF.col2im(np.abs(dy) @ np.abs(w).T, x.shape, k, k, stride, pad))


_FAULTS_SCRIPT = """
import resource
import numpy as np
from sparkdl_hetero.nn import FeedForwardModel, FeedForwardTopology
model = FeedForwardModel(FeedForwardTopology.from_spec("resnet8", (3, 32, 32)), seed=0)
rng = np.random.default_rng(0)
x, y = rng.random((64, 3 * 32 * 32), dtype=np.float32), rng.integers(0, 10, 64)
for _ in range(2):
    model.compute_gradient(x, y)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    model.compute_gradient(x, y)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 4)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the malloc thresholds are glibc's")
def test_training_steps_reuse_the_memory_the_previous_step_freed():
    # a ResNet-8 step at batch 64 frees MBs of arrays; with glibc's default thresholds the next step faults their
    # pages in again, the backend's thresholds keep them (a fresh process: the setting is process-wide)
    per_step = int(subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT], check=True,
                                  capture_output=True, text=True).stdout)
    assert per_step < 100, f"{per_step} minor page faults per training step"
