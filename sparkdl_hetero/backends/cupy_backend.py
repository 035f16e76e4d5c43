"""CuPy backend: the array-module code with ``xp = cupy`` (cuBLAS through cupy's matmul) plus own CUDA kernels
(kernels/cuda_ops.cu) for what cupy has no single op for: im2col/col2im, pooling, fused softmax cross-entropy.

The class takes the array module and the kernel launcher as parameters: on a GPU they are cupy and
:class:`CudaLauncher`; without one, tests run the same code with NumPy arrays and a launcher that runs the same
kernel text (kernels/conv_pool.h, shared with the OpenCL backend) on an OpenCL device.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from .base import Array, pool_out
from .errors import BackendUnavailable
from .kernel_source import check_launch_size, kernel_source
from .numpy_backend import ArrayModuleBackend

_INSTALL = ("Install it with: pip install 'sparkdl-hetero[gpu]' (cupy-cuda12x) on a machine with an NVIDIA GPU "
            "and driver")
_BLOCK = 256


class KernelLauncher(Protocol):
    """Runs a kernel of kernels/conv_pool.h over ``count`` items; ``args`` are the kernel's parameters after
    ``count``: arrays of the backend's module (each becomes a pointer + element offset pair) and NumPy scalars."""

    def __call__(self, kernel: str, dtype: Any, count: int, *args: Any) -> None: ...


class CudaLauncher:
    """Launches kernels/cuda_ops.cu with cupy (NVRTC), compiled once per element type and device."""

    def __init__(self, cupy: Any, device: int) -> None:
        self.cp, self.device = cupy, device
        self._modules: dict[str, Any] = {}

    def _module(self, dtype: np.dtype) -> Any:
        mod = self._modules.get(dtype.name)
        if mod is None:
            if dtype not in (np.float32, np.float64):
                raise ValueError(f"the CuPy kernels compute in float32 or float64, not {dtype}")
            real = "double" if dtype == np.float64 else "float"
            mod = self.cp.RawModule(code=kernel_source("cuda_ops.cu"), options=(f"-DREAL={real}",))
            self._modules[dtype.name] = mod
        return mod

    def __call__(self, kernel: str, dtype: Any, count: int, *args: Any) -> None:
        if count <= 0:
            return
        check_launch_size(kernel, count, [a.size for a in args if isinstance(a, self.cp.ndarray)])
        flat: list[Any] = [np.int64(count)]
        for a in args:
            # a cupy array's pointer already points at its first element (views included): offset 0
            flat += [a, np.int64(0)] if isinstance(a, self.cp.ndarray) else [a]
        with self.cp.cuda.Device(self.device):
            fn = self._module(np.dtype(dtype)).get_function(kernel)
            fn(((count + _BLOCK - 1) // _BLOCK,), (_BLOCK,), tuple(flat))


def load_cupy(device: int) -> Any:
    """Import cupy and check that GPU ``device`` exists; :class:`BackendUnavailable` says why not."""
    try:
        import cupy
    except Exception as exc:  # ImportError, or a CUDA library that fails to load
        raise BackendUnavailable("cupy", f"cannot import cupy ({exc})", _INSTALL) from exc
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # cupy's CUDARuntimeError when there is no driver or no device
        raise BackendUnavailable("cupy", f"CUDA reports no usable GPU ({exc})", _INSTALL) from exc
    if not 0 <= device < count:
        raise BackendUnavailable("cupy", f"GPU {device} does not exist ({count} GPU(s) visible)",
                                 "Pass a device id below the number of visible GPUs (check CUDA_VISIBLE_DEVICES)")
    return cupy


class CupyBackend(ArrayModuleBackend):
    """cupy arrays on one GPU (``device``, default 0); ``xp``/``launcher`` replace cupy and CUDA in tests."""

    name = "cupy"

    def __init__(self, device: int = 0, xp: Any = None, launcher: KernelLauncher | None = None) -> None:
        if xp is None:
            xp = load_cupy(device)
            xp.cuda.Device(device).use()  # this thread's allocations and cuBLAS calls go to that GPU
        if launcher is None:
            launcher = CudaLauncher(xp, device)
        super().__init__(xp)
        self.device = device
        self.launch = launcher

    def describe(self) -> str:
        if self.xp is np:
            return f"cupy code on the host (numpy arrays, kernels via {type(self.launch).__name__})"
        props = self.xp.cuda.runtime.getDeviceProperties(self.device)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        return f"cupy: GPU {self.device} ({name})"

    def to_host(self, a: Array) -> np.ndarray:
        # cupy refuses implicit conversion to NumPy (np.array(gpu_array) raises): copy explicitly
        return self.xp.asnumpy(a) if self.xp is not np else super().to_host(a)

    def _c(self, a: Array) -> Array:
        return self.xp.ascontiguousarray(a)

    def softmax_xent(self, z: Array, target: Array, scale: float) -> tuple[float, Array]:
        z, target = self._c(z), self._c(target)
        rows, cols = z.shape
        loss, delta = self.xp.empty((rows,), z.dtype), self.xp.empty(z.shape, z.dtype)
        self.launch("softmax_xent", z.dtype, rows, loss, delta, z, target, np.int32(cols), z.dtype.type(scale))
        return float(loss.sum(dtype=self.xp.float64)), delta

    def im2col(self, x: Array, kh: int, kw: int, stride: int, pad: int) -> Array:
        x = self._c(x)
        n, h, w, c = x.shape
        oh, ow = pool_out(h, kh, stride, pad), pool_out(w, kw, stride, pad)
        cols = self.xp.empty((n * oh * ow, kh * kw * c), x.dtype)
        i32 = np.int32
        self.launch("im2col", x.dtype, n * oh * ow * kh, cols, x, i32(h), i32(w), i32(c), i32(kh), i32(kw), i32(stride),
                    i32(pad), i32(oh), i32(ow))
        return cols

    def col2im(self, cols: Array, x_shape: tuple[int, int, int, int], kh: int, kw: int, stride: int,
               pad: int) -> Array:
        n, h, w, c = x_shape
        oh, ow = pool_out(h, kh, stride, pad), pool_out(w, kw, stride, pad)
        if cols.shape != (n * oh * ow, kh * kw * c):
            raise ValueError(f"col2im: columns of shape {cols.shape} do not match {x_shape} with a {kh}x{kw} "
                             f"window, stride {stride}, pad {pad}")
        dx = self.xp.empty(x_shape, cols.dtype)
        i32 = np.int32
        self.launch("col2im", cols.dtype, n * h * w, dx, self._c(cols), i32(h), i32(w), i32(c), i32(kh), i32(kw),
                    i32(stride), i32(pad), i32(oh), i32(ow))
        return dx

    def maxpool(self, x: Array, k: int, stride: int) -> tuple[Array, Array]:
        x = self._c(x)
        n, h, w, c = x.shape
        oh, ow = pool_out(h, k, stride), pool_out(w, k, stride)
        y, idx = self.xp.empty((n, oh, ow, c), x.dtype), self.xp.empty((n, oh, ow, c), self.xp.int32)
        i32 = np.int32
        self.launch("maxpool", x.dtype, n * oh * ow, y, idx, x, i32(h), i32(w), i32(c), i32(k), i32(stride), i32(oh),
                    i32(ow))
        return y, idx

    def maxpool_backward(self, dy: Array, idx: Array, x_shape: tuple[int, int, int, int], k: int,
                         stride: int) -> Array:
        n, h, w, c = x_shape
        dx = self.xp.empty(x_shape, dy.dtype)
        i32 = np.int32
        self.launch("maxpool_backward", dy.dtype, n * h * w, dx, self._c(dy), self._c(idx),
                    i32(h), i32(w), i32(c), i32(k), i32(stride), i32(dy.shape[1]), i32(dy.shape[2]))
        return dx

    def avgpool(self, x: Array, k: int, stride: int) -> Array:
        x = self._c(x)
        n, h, w, c = x.shape
        oh, ow = pool_out(h, k, stride), pool_out(w, k, stride)
        y = self.xp.empty((n, oh, ow, c), x.dtype)
        i32 = np.int32
        self.launch("avgpool", x.dtype, n * oh * ow, y, x, i32(h), i32(w), i32(c), i32(k), i32(stride), i32(oh),
                    i32(ow))
        return y

    def avgpool_backward(self, dy: Array, x_shape: tuple[int, int, int, int], k: int, stride: int) -> Array:
        n, h, w, c = x_shape
        dx = self.xp.empty(x_shape, dy.dtype)
        i32 = np.int32
        self.launch("avgpool_backward", dy.dtype, n * h * w, dx, self._c(dy), i32(h), i32(w), i32(c), i32(k),
                    i32(stride), i32(dy.shape[1]), i32(dy.shape[2]))
        return dx
