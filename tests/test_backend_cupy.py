"""The CuPy backend without a GPU: its code run with NumPy arrays, its kernels (the text shared with the OpenCL
backend, kernels/conv_pool.h) run on the OpenCL CPU device, every kernels/*.cu compiled with nvcc. Tests
marked ``gpu`` run the real thing and skip without a CUDA device."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from sparkdl_hetero.backends import BackendUnavailable, NumpyBackend, get_backend
from sparkdl_hetero.backends.cupy_backend import CupyBackend, load_cupy
from sparkdl_hetero.nn import FeedForwardModel, FeedForwardTopology

KERNELS = Path(__file__).resolve().parents[1] / "kernels"
LENET = "conv(6,5,pad=2)-relu-maxpool(2)-conv(16,5)-relu-maxpool(2)-flatten-affine(120)-relu-affine(84)-relu-affine(10)"
NP = NumpyBackend()
CUDA_KERNELS = {"im2col", "col2im", "maxpool", "maxpool_backward", "avgpool", "avgpool_backward", "softmax_xent"}


class OpenCLHostLauncher:
    """Runs a kernel for NumPy arrays on the OpenCL device: copies the arrays up, launches, copies them back."""

    def __init__(self) -> None:
        ocl = pytest.importorskip("sparkdl_hetero.backends.opencl_backend")
        if not ocl.list_devices():
            pytest.skip("no OpenCL device to run the shared kernels on")
        self.be = ocl.OpenCLBackend()
        self.calls: list[str] = []

    def __call__(self, kernel: str, dtype, count: int, *args) -> None:
        dev = [self.be.asarray(a) if isinstance(a, np.ndarray) else a for a in args]
        self.be.launch(kernel, dtype, count, *dev)
        for a, d in zip(args, dev, strict=True):
            if isinstance(a, np.ndarray):
                a[...] = self.be.to_host(d)
        self.calls.append(kernel)


@pytest.fixture(scope="module")
def emulated() -> CupyBackend:
    return CupyBackend(xp=np, launcher=OpenCLHostLauncher())


def close(got, want, rel=1e-4) -> None:
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape
    err = float(np.abs(got.astype(np.float64) - want).max(initial=0.0))
    assert err <= rel * max(float(np.abs(want).max(initial=0.0)), 1e-30), err


@pytest.mark.parametrize("n,h,w,c,k,stride,pad", [(2, 7, 9, 3, 3, 2, 1), (1, 6, 5, 2, 2, 1, 0), (3, 9, 9, 4, 4, 3, 2)])
def test_kernel_ops_match_numpy(emulated, n, h, w, c, k, stride, pad):
    rng = np.random.default_rng(h + k)
    launcher = emulated.launch
    launcher.calls.clear()
    x = rng.standard_normal((n, h, w, c)).astype(np.float32)
    cols = emulated.im2col(x, k, k, stride, pad)
    close(cols, NP.im2col(x, k, k, stride, pad))
    g = rng.standard_normal(cols.shape).astype(np.float32)
    close(emulated.col2im(g, x.shape, k, k, stride, pad), NP.col2im(g, x.shape, k, k, stride, pad))
    y, idx = emulated.maxpool(x, k, stride)
    wy, widx = NP.maxpool(x, k, stride)
    close(y, wy)
    np.testing.assert_array_equal(idx, widx)
    dy = rng.standard_normal(wy.shape).astype(np.float32)
    close(emulated.maxpool_backward(dy, idx, x.shape, k, stride), NP.maxpool_backward(dy, widx, x.shape, k, stride))
    close(emulated.avgpool(x, k, stride), NP.avgpool(x, k, stride))
    close(emulated.avgpool_backward(dy, x.shape, k, stride), NP.avgpool_backward(dy, x.shape, k, stride))
    z = rng.standard_normal((7, 5)).astype(np.float32) * 50
    t = np.eye(5, dtype=np.float32)[rng.integers(0, 5, 7)]
    loss, delta = emulated.softmax_xent(z, t, 0.5)
    wl, wd = NP.softmax_xent(z, t, 0.5)
    assert loss == pytest.approx(wl, rel=1e-5)
    close(delta, wd)
    assert set(launcher.calls) == CUDA_KERNELS, "every op with an own kernel went through the launcher"


def assert_lenet_step_equals_numpy(backend: CupyBackend, seed: int, batch: int, rel: float) -> None:
    """One LeNet-5 gradient step on ``backend`` gives the NumPy backend's loss (to ``rel``) and gradient."""
    rng = np.random.default_rng(seed)
    topo = FeedForwardTopology.from_spec(LENET, (1, 28, 28))
    x, y = rng.random((batch, 784)).astype(np.float32), rng.integers(0, 10, batch)
    ref, got = (FeedForwardModel(topo, seed=2, backend=b) for b in ("numpy", backend))
    assert got.compute_gradient(x, y) == pytest.approx(ref.compute_gradient(x, y), rel=rel)
    close(got.get_gradient(), ref.get_gradient(), 1e-3)


def test_lenet_step_through_the_cupy_code_path_equals_numpy(emulated):
    assert_lenet_step_equals_numpy(emulated, seed=3, batch=5, rel=1e-5)
    assert "cupy code on the host" in emulated.describe()


def _ptx_entries(src: Path, real: str, tmp_path: Path) -> set[str]:
    out = tmp_path / f"{src.stem}_{real}.ptx"
    r = subprocess.run(["nvcc", "--ptx", f"-DREAL={real}", str(src), "-o", str(out)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, f"nvcc failed on {src.name} (REAL={real}):\n{r.stderr[-3000:]}"
    return set(re.findall(r"\.entry\s+(\w+)", out.read_text()))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("src", sorted(KERNELS.glob("*.cu")), ids=lambda p: p.name)
def test_cuda_sources_compile_with_nvcc(src, tmp_path):
    for real in ("float", "double"):
        entries = _ptx_entries(src, real, tmp_path)
        assert entries, f"{src.name} defines no kernel"
        if src.name == "cuda_ops.cu":
            assert CUDA_KERNELS <= entries, f"kernels the backend launches are missing: {CUDA_KERNELS - entries}"


def test_cupy_backend_without_cupy_is_a_clear_error():
    try:
        import cupy  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("cupy is installed here")
    with pytest.raises(BackendUnavailable, match=r"backend 'cupy' is not available: cannot import cupy .*"
                                                 r"pip install 'sparkdl-hetero\[gpu\]'"):
        get_backend("cupy", device=0)


# ---- on a real GPU ------------------------------------------------------------------------------------------
def _gpu_backend() -> CupyBackend:
    try:
        load_cupy(0)
    except BackendUnavailable as exc:
        pytest.skip(f"no CUDA GPU: {exc.reason}")
    return CupyBackend(device=0)


@pytest.mark.gpu
def test_gpu_ops_match_numpy():
    be = _gpu_backend()
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 9, 7, 3)).astype(np.float32)
    dx = be.asarray(x)
    close(be.to_host(be.im2col(dx, 3, 3, 2, 1)), NP.im2col(x, 3, 3, 2, 1))
    g = rng.standard_normal(NP.im2col(x, 3, 3, 2, 1).shape).astype(np.float32)
    close(be.to_host(be.col2im(be.asarray(g), x.shape, 3, 3, 2, 1)), NP.col2im(g, x.shape, 3, 3, 2, 1))
    y, idx = be.maxpool(dx, 3, 2)
    wy, widx = NP.maxpool(x, 3, 2)
    close(be.to_host(y), wy)
    np.testing.assert_array_equal(be.to_host(idx), widx)
    z = rng.standard_normal((6, 4)).astype(np.float32)
    t = np.eye(4, dtype=np.float32)[rng.integers(0, 4, 6)]
    loss, delta = be.softmax_xent(be.asarray(z), be.asarray(t), 1.0)
    assert loss == pytest.approx(NP.softmax_xent(z, t, 1.0)[0], rel=1e-5)
    assert be.describe().startswith("cupy: GPU 0")


@pytest.mark.gpu
def test_gpu_lenet_step_equals_numpy():
    assert_lenet_step_equals_numpy(_gpu_backend(), seed=6, batch=8, rel=1e-4)


@pytest.mark.gpu
def test_gpu_out_of_range_device_is_a_clear_error():
    _gpu_backend()
    with pytest.raises(BackendUnavailable, match=r"GPU 4096 does not exist \(\d+ GPU\(s\) visible\)"):
        CupyBackend(device=4096)


class _StandInCupy:
    """Just enough of cupy's surface for CudaLauncher (NVRTC and a device cannot run here): records launches."""

    ndarray = np.ndarray

    def __init__(self) -> None:
        self.launches: list[tuple] = []
        self.modules: list[tuple[str, tuple]] = []
        outer = self

        class RawModule:
            def __init__(self, code: str, options: tuple) -> None:
                outer.modules.append((code, options))

            def get_function(self, name: str):
                return lambda grid, block, args: outer.launches.append((name, grid, block, args))

        class _Device:
            def __init__(self, device: int) -> None:
                self.device = device

            def __enter__(self):
                return self

            def __exit__(self, *exc) -> None:
                return None

        self.RawModule = RawModule
        self.cuda = type("cuda", (), {"Device": _Device})


def test_cuda_launcher_marshals_arguments_like_the_kernel_signature():
    from sparkdl_hetero.backends.cupy_backend import CudaLauncher

    cp = _StandInCupy()
    launcher = CudaLauncher(cp, device=0)
    x, cols = np.zeros((1, 4, 4, 1), np.float64), np.zeros((9, 4), np.float64)
    launcher("im2col", np.float64, 300, cols, x, np.int32(4))
    launcher("im2col", np.float64, 0, cols, x, np.int32(4))  # nothing to do: no launch
    launcher("maxpool", np.float64, 10, cols, x)
    (code, options), = cp.modules  # compiled once per dtype
    assert options == ("-DREAL=double",) and '#include "' not in code and "KERNEL void im2col(" in code
    (name, grid, block, args), second = cp.launches
    assert (name, grid, block) == ("im2col", (2,), (256,))
    assert args[0] == 300 and args[0].dtype == np.int64
    assert args[1] is cols and args[2] == 0 and args[2].dtype == np.int64  # (pointer, element offset) pairs
    assert args[3] is x and args[4] == 0 and args[5] == 4 and args[5].dtype == np.int32
    assert second[0] == "maxpool"
    with pytest.raises(ValueError, match="the CuPy kernels compute in float32 or float64, not int32"):
        launcher("im2col", np.int32, 5, cols)
