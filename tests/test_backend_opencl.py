"""The OpenCL backend (PoCL here) against the NumPy backend: every op on random shapes (odd sizes, strides,
padding, views at offsets inside one buffer), whole training steps of a LeNet and an MLP, device selection."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from sparkdl_hetero.backends import BackendUnavailable, NumpyBackend, get_backend, resolve_auto
from sparkdl_hetero.nn import FeedForwardModel, FeedForwardTopology

ocl = pytest.importorskip("sparkdl_hetero.backends.opencl_backend")
if not ocl.list_devices():
    pytest.skip("no OpenCL platform/device is installed", allow_module_level=True)

LENET = "conv(6,5,pad=2)-relu-maxpool(2)-conv(16,5)-relu-maxpool(2)-flatten-affine(120)-relu-affine(84)-relu-affine(10)"
NP = NumpyBackend()
DTYPES = [np.float32, np.float64]


@pytest.fixture(scope="module")
def be() -> ocl.OpenCLBackend:
    return ocl.OpenCLBackend()


def close(got: np.ndarray, want: np.ndarray, rel: float = 1e-4) -> None:
    """Equal shapes and a max error within ``rel`` of the largest reference magnitude."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, (got.shape, want.shape)
    assert np.all(np.isfinite(got)), "non-finite values"
    scale = max(float(np.abs(want).max(initial=0.0)), 1e-30)
    err = float(np.abs(got.astype(np.float64) - want).max(initial=0.0))
    assert err <= rel * scale, f"max error {err:.3g} > {rel} x {scale:.3g}"


def sum_bound(terms: int, dtype, magnitude):
    """The worst-case rounding error of a float sum of ``terms`` values, in any order, whose absolute values add up
    to ``magnitude``: ``terms * eps * magnitude`` (to first order), plus one rounding of the result."""
    return (terms + 1) * np.finfo(dtype).eps * np.asarray(magnitude, np.float64)


def rel_for(dtype) -> float:
    return 1e-4 if dtype == np.float32 else 1e-10


def rand(rng: np.random.Generator, *shape: int, dtype=np.float32) -> np.ndarray:
    return rng.standard_normal(shape).astype(dtype)


def view(be, host: np.ndarray, offset: int) -> tuple[object, object]:
    """``host`` on the device as a view at ``offset`` elements inside a larger flat vector (NaN around it)."""
    flat = np.full(host.size + offset + 5, np.nan, dtype=host.dtype)
    flat[offset:offset + host.size] = host.ravel()
    big = be.asarray(flat)
    return big[offset:offset + host.size].reshape(host.shape), big


def test_has_fp64_on_pocl(be):
    assert be.fp64, "PoCL on x86 supports float64; the float64 tests below rely on it"


# ---- memory -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_memory_ops_respect_views(be, dtype):
    rng = np.random.default_rng(1)
    host = rand(rng, 3, 7, dtype=dtype)
    v, big = view(be, host, 11)
    np.testing.assert_array_equal(be.to_host(v), host)
    be.fill(v, 2.5)
    out = be.to_host(big)
    assert np.all(out[11:32] == 2.5) and np.all(np.isnan(out[:11])) and np.all(np.isnan(out[32:]))
    new = rand(rng, 21, dtype=dtype)
    be.copy_into(v, new)  # from the host
    np.testing.assert_array_equal(be.to_host(v).ravel(), new)
    src, _ = view(be, new[::-1].copy(), 3)
    be.copy_into(v, src)  # device to device, both at offsets
    np.testing.assert_array_equal(be.to_host(v).ravel(), new[::-1])
    out = be.to_host(big)
    assert np.all(np.isnan(out[:11])) and np.all(np.isnan(out[32:]))
    z = be.zeros((4, 5), dtype)
    assert be.to_host(z).dtype == dtype and not be.to_host(z).any()
    with pytest.raises(ValueError, match=r"copy_into: sizes differ \(\(3, 7\) vs \(20,\)\)"):
        be.copy_into(v, np.zeros(20, dtype))


def test_to_host_is_a_copy(be):
    a = be.asarray(np.arange(6, dtype=np.float32))
    h = be.to_host(a)
    h[:] = -1
    np.testing.assert_array_equal(be.to_host(a), np.arange(6))


# ---- GEMM ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ta,tb", list(itertools.product([False, True], repeat=2)))
def test_gemm_on_views_matches_numpy(be, dtype, ta, tb):
    rng = np.random.default_rng(2)
    m, k, n = 13, 7, 5
    a = rand(rng, *((k, m) if ta else (m, k)), dtype=dtype)
    b = rand(rng, *((n, k) if tb else (k, n)), dtype=dtype)
    c = rand(rng, m, n, dtype=dtype)
    da, _ = view(be, a, 3)
    db, _ = view(be, b, 17)
    dc, big = view(be, c, 9)
    want = NP.gemm(a, b, c.copy(), trans_a=ta, trans_b=tb, alpha=0.7, beta=1.3)
    got = be.gemm(da, db, dc, trans_a=ta, trans_b=tb, alpha=0.7, beta=1.3)
    assert got is dc
    close(be.to_host(dc), want, rel_for(dtype))
    assert np.all(np.isnan(be.to_host(big)[:9])), "GEMM wrote outside its output view"
    close(be.to_host(be.gemm(da, db, trans_a=ta, trans_b=tb)), NP.gemm(a, b, trans_a=ta, trans_b=tb),
          rel_for(dtype))


def test_gemm_beta_zero_ignores_nan_output(be):
    rng = np.random.default_rng(3)
    a, b = rand(rng, 4, 3), rand(rng, 3, 2)
    out = be.asarray(np.full((4, 2), np.nan, np.float32))
    be.gemm(be.asarray(a), be.asarray(b), out, beta=0.0)
    close(be.to_host(out), a @ b)


def test_gemm_shape_errors(be):
    a, b = be.zeros((4, 3), np.float32), be.zeros((4, 2), np.float32)
    with pytest.raises(ValueError, match=r"gemm: inner sizes differ: op\(a\) is 4x3, op\(b\) is 4x2"):
        be.gemm(a, b)
    with pytest.raises(ValueError, match=r"gemm: out has shape \(2, 2\), expected \(3, 2\)"):
        be.gemm(a, b, be.zeros((2, 2), np.float32), trans_a=True)


def test_gemm_empty_inner_dimension(be):
    out = be.asarray(np.ones((2, 3), np.float32))
    be.gemm(be.zeros((2, 0), np.float32), be.zeros((0, 3), np.float32), out, beta=0.5)
    np.testing.assert_array_equal(be.to_host(out), np.full((2, 3), 0.5))


# ---- vector ops and reductions ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,cols", [(1, 1), (7, 3), (129, 10), (50_177, 6)])
def test_add_row_and_col_sum(be, dtype, rows, cols):
    rng = np.random.default_rng(rows)
    x, b, o = rand(rng, rows, cols, dtype=dtype), rand(rng, cols, dtype=dtype), rand(rng, cols, dtype=dtype)
    dx, _ = view(be, x, 5)
    db, _ = view(be, b, 2)
    be.add_row(dx, db)
    want = x.copy()
    NP.add_row(want, b)
    close(be.to_host(dx), want, rel_for(dtype))
    for alpha, beta in [(1.0, 0.0), (0.5, 1.0), (-2.0, 0.25)]:
        do, big = view(be, o, 7)
        be.col_sum(dx, do, alpha=alpha, beta=beta)
        w = alpha * want.astype(np.float64).sum(axis=0) + beta * o
        mag = abs(alpha) * np.abs(want).sum(axis=0, dtype=np.float64) + abs(beta) * np.abs(o)
        assert np.all(np.abs(be.to_host(do) - w) <= sum_bound(rows + 1, dtype, mag))
        assert np.isnan(be.to_host(big)[6]) and np.isnan(be.to_host(big)[7 + cols])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 2, 255, 257, 100_003])
def test_axpy_mul_sum(be, dtype, n):
    rng = np.random.default_rng(n)
    x, y = rand(rng, n, dtype=dtype), rand(rng, n, dtype=dtype)
    dx, _ = view(be, x, 1)
    dy, _ = view(be, y, 4)
    be.axpy(dy, dx, -0.3)
    want = y.copy()
    NP.axpy(want, x, -0.3)
    close(be.to_host(dy), want, rel_for(dtype))
    close(be.to_host(be.mul(dx, dy)), NP.mul(x, want), rel_for(dtype))
    exact = float(x.astype(np.float64).sum())
    assert abs(be.sum(dx) - exact) <= sum_bound(n, dtype, np.abs(x).sum(dtype=np.float64))


def test_sum_of_positive_values_is_accurate(be):
    x = np.full(1_000_001, 0.1, np.float32)
    assert be.sum(be.asarray(x)) == pytest.approx(float(x.astype(np.float64).sum()), rel=1e-5)


# ---- activations and losses ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["sigmoid", "tanh", "relu", "leaky_relu", "identity"])
def test_activations_and_derivatives(be, dtype, kind):
    rng = np.random.default_rng(5)
    x = rand(rng, 9, 13, dtype=dtype) * 4
    x[0, :4] = [-1000, 1000, 0, -0.0]  # sigmoid must not overflow
    d = rand(rng, 9, 13, dtype=dtype)
    dxv, _ = view(be, x, 3)
    y = be.activation(kind, dxv, alpha=0.05)
    close(be.to_host(y), NP.activation(kind, x, alpha=0.05), rel_for(dtype))
    ddv, _ = view(be, d, 6)
    got = be.activation_backward(kind, y, ddv, alpha=0.05)
    close(be.to_host(got), NP.activation_backward(kind, NP.activation(kind, x, alpha=0.05), d, alpha=0.05),
          rel_for(dtype))


def test_unknown_activation(be):
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        be.activation("swish", be.zeros((2, 2), np.float32))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,cols", [(1, 2), (17, 10), (64, 3)])
def test_softmax_and_losses(be, dtype, rows, cols):
    rng = np.random.default_rng(rows * cols)
    z = rand(rng, rows, cols, dtype=dtype) * 3
    z[0, 0] = 800  # extreme logits: probabilities underflow, the loss must stay finite
    labels = rng.integers(0, cols, rows)
    t = np.eye(cols, dtype=dtype)[labels]
    t[-1] = rng.dirichlet(np.ones(cols)).astype(dtype)  # a soft target row
    dz, _ = view(be, z, 2)
    dt, _ = view(be, t, 5)
    close(be.to_host(be.softmax(dz)), NP.softmax(z), rel_for(dtype))
    loss, delta = be.softmax_xent(dz, dt, 0.25)
    want_loss, want_delta = NP.softmax_xent(z, t, 0.25)
    assert np.isfinite(loss) and loss == pytest.approx(want_loss, rel=rel_for(dtype))
    close(be.to_host(delta), want_delta, rel_for(dtype))
    st = rng.random((rows, cols)).astype(dtype)
    loss, delta = be.sigmoid_sq(dz, be.asarray(st), 0.5)
    want_loss, want_delta = NP.sigmoid_sq(z, st, 0.5)
    assert loss == pytest.approx(want_loss, rel=rel_for(dtype))
    close(be.to_host(delta), want_delta, rel_for(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_row_rmse(be, dtype):
    rng = np.random.default_rng(8)
    a, b = rand(rng, 6, 11, dtype=dtype), rand(rng, 6, 11, dtype=dtype)
    b[2] = a[2]  # a zero row: zero gradient, not NaN
    loss, delta = be.row_rmse(be.asarray(a), be.asarray(b), 0.3)
    want_loss, want_delta = NP.row_rmse(a, b, 0.3)
    assert loss == pytest.approx(want_loss, rel=rel_for(dtype))
    close(be.to_host(delta), want_delta, rel_for(dtype))
    assert not be.to_host(delta)[2].any()


# ---- convolution and pooling --------------------------------------------------------------------------------
CONV_CASES = [  # n, h, w, c, k, stride, pad
    (2, 7, 9, 3, 3, 2, 1), (1, 5, 5, 1, 5, 1, 2), (3, 8, 6, 2, 2, 2, 0), (2, 11, 7, 5, 4, 3, 2),
    (1, 6, 6, 4, 1, 1, 0), (2, 28, 28, 1, 5, 1, 2), (1, 10, 9, 2, 2, 3, 1),  # the last: stride > kernel
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,h,w,c,k,stride,pad", CONV_CASES)
def test_im2col_col2im(be, dtype, n, h, w, c, k, stride, pad):
    rng = np.random.default_rng(h * w + k)
    x = rand(rng, n, h, w, c, dtype=dtype)
    dxv, _ = view(be, x, 3)
    cols = be.im2col(dxv, k, k, stride, pad)
    want = NP.im2col(x, k, k, stride, pad)
    close(be.to_host(cols), want, rel_for(dtype))
    g = rand(rng, *want.shape, dtype=dtype)
    dg, _ = view(be, g, 1)
    close(be.to_host(be.col2im(dg, x.shape, k, k, stride, pad)), NP.col2im(g, x.shape, k, k, stride, pad),
          rel_for(dtype))


def test_launch_rejects_tensors_beyond_32_bit_indexing(be):
    with pytest.raises(ValueError, match=r"im2col: 2147483648 elements exceed the kernels' 32-bit indexing"):
        be.launch("im2col", np.float32, 2**31)


def test_col2im_shape_error(be):
    with pytest.raises(ValueError, match=r"col2im: columns of shape \(3, 9\) do not match \(1, 4, 4, 1\)"):
        be.col2im(be.zeros((3, 9), np.float32), (1, 4, 4, 1), 3, 3, 1, 0)


POOL_CASES = [(2, 8, 8, 3, 2, 2, 0), (1, 7, 9, 2, 2, 2, 0), (2, 9, 7, 4, 3, 2, 0), (1, 5, 5, 1, 3, 1, 0),
              (3, 6, 10, 6, 1, 1, 0), (1, 9, 8, 2, 2, 3, 0), (2, 7, 6, 3, 3, 2, 1), (1, 5, 5, 2, 2, 2, 1),
              (1, 4, 6, 2, 3, 1, 1)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,h,w,c,k,stride,pad", POOL_CASES)
def test_pooling(be, dtype, n, h, w, c, k, stride, pad):
    rng = np.random.default_rng(h * 10 + w + k)
    x = rand(rng, n, h, w, c, dtype=dtype)
    dxv, _ = view(be, x, 2)
    y, idx = be.maxpool(dxv, k, stride, pad)
    wy, widx = NP.maxpool(x, k, stride, pad)
    close(be.to_host(y), wy, rel_for(dtype))
    np.testing.assert_array_equal(be.to_host(idx), widx)
    g = rand(rng, *wy.shape, dtype=dtype)
    dg, _ = view(be, g, 4)
    close(be.to_host(be.maxpool_backward(dg, idx, x.shape, k, stride, pad)),
          NP.maxpool_backward(g, widx, x.shape, k, stride, pad), rel_for(dtype))
    close(be.to_host(be.avgpool(dxv, k, stride, pad)), NP.avgpool(x, k, stride, pad), rel_for(dtype))
    close(be.to_host(be.avgpool_backward(dg, x.shape, k, stride, pad)),
          NP.avgpool_backward(g, x.shape, k, stride, pad), rel_for(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_global_avgpool_and_add(be, dtype):
    rng = np.random.default_rng(12)
    x = rand(rng, 3, 5, 4, 6, dtype=dtype)
    xv, _ = view(be, x, 3)
    close(be.to_host(be.global_avgpool(xv)), NP.global_avgpool(x), rel_for(dtype))
    g = rand(rng, 3, 6, dtype=dtype)
    gv, _ = view(be, g, 1)
    close(be.to_host(be.global_avgpool_backward(gv, x.shape)), NP.global_avgpool_backward(g, x.shape), rel_for(dtype))
    close(be.to_host(be.add(xv, xv)), x + x, rel_for(dtype))


def test_maxpool_ties_pick_the_first_position_like_numpy(be):
    x = np.zeros((1, 4, 4, 2), np.float32)
    x[0, 1, 1, 1] = 1.0
    _, idx = be.maxpool(be.asarray(x), 2, 2)
    np.testing.assert_array_equal(be.to_host(idx), NP.maxpool(x, 2, 2)[1])
    assert be.to_host(idx)[0, 0, 0, 1] == 3 and be.to_host(idx)[0, 0, 0, 0] == 0


def test_dropout_mask_equals_numpy_for_one_seed(be):
    got = be.to_host(be.dropout_mask((5, 7), 0.6, np.random.default_rng(4), np.float32))
    np.testing.assert_array_equal(got, NP.dropout_mask((5, 7), 0.6, np.random.default_rng(4), np.float32))


# ---- whole training steps -----------------------------------------------------------------------------------
def _step(topo, backend, x, y, dtype=np.float32, steps=2):
    """Two accumulated compute_gradient calls from the same weights; returns (losses, gradient, predictions)."""
    m = FeedForwardModel(topo, seed=7, dtype=dtype, backend=backend)
    losses = [m.compute_gradient(x, y, scale=s) for s in (1.0, 0.5)[:steps]]
    return losses, m.get_gradient(), m.predict(x), m


@pytest.mark.parametrize("dtype", DTYPES)
def test_lenet_training_step_equals_numpy(be, dtype):
    rng = np.random.default_rng(9)
    topo = FeedForwardTopology.from_spec(LENET, (1, 28, 28))
    x, y = rng.random((6, 784)).astype(dtype), rng.integers(0, 10, 6)
    l_np, g_np, p_np, _ = _step(topo, "numpy", x, y, dtype)
    l_cl, g_cl, p_cl, m = _step(topo, be, x, y, dtype)
    assert l_cl == pytest.approx(l_np, rel=rel_for(dtype))
    assert np.abs(g_np).max() > 1e-3
    close(g_cl, g_np, 10 * rel_for(dtype))
    close(p_cl, p_np, rel_for(dtype))
    assert type(m.gradient).__module__.startswith("pyopencl"), "the gradient must stay on the device"


def test_mlp_sigmoid_mse_and_dropout_step_equals_numpy(be):
    rng = np.random.default_rng(10)
    topo = FeedForwardTopology.from_spec("affine(13)-sigmoid-dropout(0.3)-affine(9)-tanh-affine(4)-sigmoid_mse", 11)
    x, y = rng.standard_normal((17, 11)).astype(np.float32), rng.integers(0, 4, 17)
    l_np, g_np, p_np, _ = _step(topo, "numpy", x, y)
    l_cl, g_cl, p_cl, _ = _step(topo, be, x, y)
    assert l_cl == pytest.approx(l_np, rel=1e-4)
    close(g_cl, g_np)
    close(p_cl, p_np)


@pytest.mark.parametrize("dtype", DTYPES)
def test_batchnorm_residual_gap_training_step_and_state_equal_numpy(be, dtype):
    rng = np.random.default_rng(13)
    topo = FeedForwardTopology.from_spec("conv(4,3,pad=1)-batchnorm-relu-res(conv(6,3,stride=2,pad=1)-batchnorm-relu"
                                         "-conv(6,3,pad=1)-batchnorm)-relu-avgpool(3,stride=1,pad=1)-gap-affine(3)",
                                         (2, 8, 7))
    x, y = rng.random((6, 112)).astype(dtype), rng.integers(0, 3, 6)
    l_np, g_np, p_np, m_np = _step(topo, "numpy", x, y, dtype)
    l_cl, g_cl, p_cl, m_cl = _step(topo, be, x, y, dtype)
    assert l_cl == pytest.approx(l_np, rel=rel_for(dtype))
    close(g_cl, g_np, 10 * rel_for(dtype))
    close(p_cl, p_np, rel_for(dtype))
    close(m_cl.get_state(), m_np.get_state(), rel_for(dtype))
    assert not np.array_equal(m_np.get_state(), FeedForwardModel.initial_state(topo))
    assert type(m_cl.state).__module__.startswith("pyopencl"), "the state must stay on the device"


def test_gradients_on_caller_views_equal_numpy(be):
    """A model built on views inside larger device vectors accumulates into exactly its slice of them."""
    rng = np.random.default_rng(11)
    topo = FeedForwardTopology.from_spec("conv(3,3,pad=1)-relu-avgpool(2)-flatten-affine(5)-leaky_relu-affine(3)",
                                         (2, 6, 6))
    n = topo.num_weights
    w0 = FeedForwardModel.initial_weights(topo, np.random.default_rng(1))
    x, y = rng.random((4, 72)).astype(np.float32), rng.integers(0, 3, 4)
    ref = FeedForwardModel(topo, w0, backend="numpy")
    ref_loss = ref.compute_gradient(x, y)
    big_w, big_g = be.asarray(np.full(n + 20, 9.0, np.float32)), be.zeros((n + 20,), np.float32)
    m = FeedForwardModel(topo, w0, backend=be, views=(big_w[7:7 + n], big_g[7:7 + n]))
    loss = m.compute_gradient(x, y)
    assert loss == pytest.approx(ref_loss, rel=1e-4)
    g = be.to_host(big_g)
    close(g[7:7 + n], ref.get_gradient())
    assert not g[:7].any() and not g[7 + n:].any()
    np.testing.assert_array_equal(be.to_host(big_w)[:7], 9.0)


# ---- device selection and backend choice --------------------------------------------------------------------
def test_kernels_compile_once_per_context(be):
    other = ocl.OpenCLBackend()
    assert other.context is be.context
    assert other.program(np.float32) is be.program(np.float32)
    assert not be.host_memory  # pyopencl arrays: NumPy code cannot update them in place


def test_device_selection_errors():
    with pytest.raises(ValueError, match=r"OpenCL platform 99 does not exist; platforms: \['0: "):
        ocl.OpenCLBackend(platform=99)
    with pytest.raises(ValueError, match="unknown OpenCL device type 'tpu'"):
        ocl.OpenCLBackend(device_type="tpu")
    if not any(t == "accelerator" for _, _, t, _ in ocl.list_devices()):
        with pytest.raises(BackendUnavailable, match="backend 'opencl' is not available: no OpenCL device of "
                                                     "type 'accelerator'.*apt-get install pocl-opencl-icd"):
            ocl.OpenCLBackend(device_type="accelerator")


def test_device_from_environment(monkeypatch):
    p, d, t, name = ocl.list_devices()[0]
    monkeypatch.setenv(ocl.ENV_DEVICE, f"{p}:{d}")
    assert get_backend("opencl").describe() == f"opencl: {name}"
    monkeypatch.setenv(ocl.ENV_DEVICE, "0:x")
    with pytest.raises(ValueError, match=r"SPARKDL_OPENCL_DEVICE='0:x': expected 'P', 'P:D'"):
        get_backend("opencl")


def test_get_backend_options_and_auto(monkeypatch):
    monkeypatch.delenv(ocl.ENV_DEVICE, raising=False)
    monkeypatch.delenv("SPARKDL_GPU", raising=False)
    with pytest.raises(ValueError, match=r"backend 'opencl' takes the options \['device', 'device_type', "
                                         r"'platform'\]; got \['gpu'\]"):
        get_backend("opencl", gpu=0)
    with pytest.raises(ValueError, match="unknown backend 'tpu'; expected one of: numpy, opencl, cupy, auto"):
        get_backend("tpu")
    assert get_backend("auto").name == "numpy"  # nothing asked for: NumPy
    be, why = resolve_auto(opencl=True)
    assert be.name == "opencl" and why.startswith("opencl: ")
    if any(t == "accelerator" for _, _, t, _ in ocl.list_devices()):
        return
    be, why = resolve_auto(opencl="accelerator")
    assert be.name == "numpy" and "passed over: opencl accelerator: no OpenCL device of type" in why


# ---- end to end on Spark ------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec,shape,solver", [("affine(32)-relu-affine(10)", 784, "l-bfgs"),
                                               ("conv(4,5,stride=2)-relu-maxpool(2)-flatten-affine(10)", (1, 28, 28),
                                                "adam")])
def test_spark_fit_on_opencl_reaches_the_numpy_accuracy(spark, spec, shape, solver):
    """The same treeAggregate fit of a small Fashion-MNIST subset, once on NumPy, once on PoCL."""
    import pandas as pd

    from sparkdl_hetero.data import fashion_mnist
    from sparkdl_hetero.distributed.config import TrainConfig
    from sparkdl_hetero.distributed.fit import fit
    from sparkdl_hetero.nn.objective import Objective

    x_tr, y_tr, x_te, y_te = fashion_mnist()
    x_tr, y_tr, x_te, y_te = x_tr[:1500], y_tr[:1500], x_te[:1000], y_te[:1000]
    df = spark.createDataFrame(pd.DataFrame({"features": list(x_tr), "label": y_tr})).repartition(2)
    topo = FeedForwardTopology.from_spec(spec, shape)
    acc = {}
    for backend in ("numpy", "opencl"):
        cfg = TrainConfig(solver=solver, maxIter=20, epochs=2, batchSize=64, stepSize=0.01, seed=3,
                          backend=backend, verbose=False)
        result = fit(df, "features", "label", Objective(topo), cfg)
        pred = FeedForwardModel(topo, result.weights).predict(x_te).argmax(axis=1)
        acc[backend] = float(np.mean(pred == y_te))
    assert acc["numpy"] > 0.65, acc
    assert acc["opencl"] >= acc["numpy"] - 0.02, acc


def test_auto_reads_what_the_worker_machine_has_from_the_environment(monkeypatch):
    monkeypatch.setenv(ocl.ENV_DEVICE, "cpu")
    monkeypatch.setenv("SPARKDL_GPU", "0")
    be, why = resolve_auto()
    assert be.name == "opencl" and why.startswith("opencl: ")
    try:
        import cupy  # noqa: F401
    except ImportError:
        assert "passed over: cupy on GPU 0: cannot import cupy" in why
    be, why = resolve_auto(opencl=False, gpu=None)
    assert be.name in ("numpy", "cupy")
