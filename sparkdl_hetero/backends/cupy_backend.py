"""CuPy backend: the array-module code with ``xp = cupy`` (cuBLAS through cupy's matmul) plus own CUDA kernels
(kernels/cuda_ops.cu) for what cupy has no single op for: im2col/col2im, pooling, fused softmax cross-entropy.

The class takes the array module and the kernel launcher as parameters: on a GPU they are cupy and
:class:`CudaLauncher`; without one, tests run the same code with NumPy arrays and a launcher that runs the same
kernel text (kernels/conv_pool.h, shared with the OpenCL backend) on an OpenCL device.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .array_module import ArrayModuleBackend
from .base import Array
from .errors import BackendUnavailable
from .kernel_source import check_launch_size, kernel_source
from .shared_kernels import ConvPoolKernels, KernelLauncher

_INSTALL = ("Install it with: pip install 'sparkdl-hetero[gpu]' (cupy-cuda12x) on a machine with an NVIDIA GPU "
            "and driver")
_BLOCK = 256


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


class CupyBackend(ConvPoolKernels, ArrayModuleBackend):
    """cupy arrays on one GPU (``device``, default 0); ``xp``/``launcher`` replace cupy and CUDA in tests.
    softmax_xent, convolution and pooling come from :class:`ConvPoolKernels`, the rest from the array module."""

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

    def activation(self, kind: str, x: Array, alpha: float = 0.01) -> Array:
        if kind == "sigmoid" and self.xp is not np:  # cupyx's expit: one fused, overflow-free kernel
            from cupyx.scipy.special import expit

            return expit(x)
        return super().activation(kind, x, alpha)

    def to_host(self, a: Array) -> np.ndarray:
        # cupy refuses implicit conversion to NumPy (np.array(gpu_array) raises): copy explicitly
        return self.xp.asnumpy(a) if self.xp is not np else super().to_host(a)

    def _empty(self, shape: tuple[int, ...], dtype: Any) -> Array:
        return self.xp.empty(shape, dtype)

    def _kernel_input(self, a: Array, what: str) -> Array:
        return self.xp.ascontiguousarray(a)  # a copy only when ``a`` is not contiguous
