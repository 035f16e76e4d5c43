"""The ops whose kernels are written once in kernels/conv_pool.h (compiled as OpenCL C by the OpenCL backend and
as CUDA C++ by the CuPy backend): convolution lowering, pooling and the fused softmax cross-entropy.

:class:`ConvPoolKernels` holds their launch wrappers (output allocation, output shapes, shape checks, kernel
arguments) once; a backend that runs those kernels inherits it and provides three hooks: ``launch``, ``_empty``
and ``_kernel_input``.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, Protocol

import numpy as np

from .base import Array, Backend, pool_out


class KernelLauncher(Protocol):
    """Runs a kernel of kernels/conv_pool.h over ``count`` items; ``args`` are the kernel's parameters after
    ``count``: arrays of the backend (each becomes a pointer + element offset pair) and NumPy scalars."""

    def __call__(self, kernel: str, dtype: Any, count: int, *args: Any) -> None: ...


class ConvPoolKernels(Backend):
    """im2col/col2im, max/avg/global-average pooling (forward and backward) and softmax_xent through the kernels of
    kernels/conv_pool.h. Put it before any other implementation of these ops among a backend's bases."""

    launch: KernelLauncher  # a method or an instance attribute of the backend

    @abstractmethod
    def _empty(self, shape: tuple[int, ...], dtype: Any) -> Array:
        """A new uninitialised array of this backend."""

    @abstractmethod
    def _kernel_input(self, a: Array, what: str) -> Array:
        """``a`` as a contiguous array of this backend that a kernel can read (a backend may copy it or reject
        it with an error naming ``what``)."""

    @staticmethod
    def _same_size(a: Array, b: Any, what: str) -> None:
        if a.size != b.size:
            raise ValueError(f"{what}: sizes differ ({a.shape} vs {b.shape})")

    def softmax_xent(self, z: Array, target: Array, scale: float,
                     weight: Array | None = None) -> tuple[float, Array]:
        z = self._kernel_input(z, "softmax_xent z")
        rows, cols = z.shape
        self._same_size(z, target, "softmax_xent targets")
        loss, delta = self._empty((rows,), z.dtype), self._empty(z.shape, z.dtype)
        self.launch("softmax_xent", z.dtype, rows, loss, delta, z, self._kernel_input(target, "softmax_xent targets"),
                    np.int32(cols), z.dtype.type(scale))
        if weight is None:
            return self.sum(loss), delta
        self._same_size(loss, weight, "softmax_xent weights")
        return self.sum(self.mul(loss, weight)), self.scale_rows(delta, weight)

    def im2col(self, x: Array, kh: int, kw: int, stride: int, pad: int) -> Array:
        x = self._kernel_input(x, "im2col x")
        n, h, w, c = x.shape
        oh, ow = pool_out(h, kh, stride, pad), pool_out(w, kw, stride, pad)
        cols = self._empty((n * oh * ow, kh * kw * c), x.dtype)
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
        dx = self._empty(x_shape, cols.dtype)
        i32 = np.int32
        self.launch("col2im", cols.dtype, n * h * w, dx, self._kernel_input(cols, "col2im cols"), i32(h), i32(w),
                    i32(c), i32(kh), i32(kw), i32(stride), i32(pad), i32(oh), i32(ow))
        return dx

    def maxpool(self, x: Array, k: int, stride: int, pad: int = 0) -> tuple[Array, Array]:
        x = self._kernel_input(x, "maxpool x")
        n, h, w, c = x.shape
        oh, ow = pool_out(h, k, stride, pad), pool_out(w, k, stride, pad)
        y, idx = self._empty((n, oh, ow, c), x.dtype), self._empty((n, oh, ow, c), np.int32)
        i32 = np.int32
        self.launch("maxpool", x.dtype, n * oh * ow, y, idx, x, i32(h), i32(w), i32(c), i32(k), i32(stride), i32(pad),
                    i32(oh), i32(ow))
        return y, idx

    def maxpool_backward(self, dy: Array, idx: Array, x_shape: tuple[int, int, int, int], k: int,
                         stride: int, pad: int = 0) -> Array:
        n, h, w, c = x_shape
        dx = self._empty(x_shape, dy.dtype)
        i32 = np.int32
        self.launch("maxpool_backward", dy.dtype, n * h * w, dx, self._kernel_input(dy, "maxpool_backward dy"),
                    self._kernel_input(idx, "maxpool_backward idx"), i32(h), i32(w), i32(c), i32(k), i32(stride),
                    i32(pad), i32(dy.shape[1]), i32(dy.shape[2]))
        return dx

    def avgpool(self, x: Array, k: int, stride: int, pad: int = 0) -> Array:
        x = self._kernel_input(x, "avgpool x")
        n, h, w, c = x.shape
        oh, ow = pool_out(h, k, stride, pad), pool_out(w, k, stride, pad)
        y = self._empty((n, oh, ow, c), x.dtype)
        i32 = np.int32
        self.launch("avgpool", x.dtype, n * oh * ow, y, x, i32(h), i32(w), i32(c), i32(k), i32(stride), i32(pad),
                    i32(oh), i32(ow))
        return y

    def avgpool_backward(self, dy: Array, x_shape: tuple[int, int, int, int], k: int, stride: int,
                         pad: int = 0) -> Array:
        n, h, w, c = x_shape
        dx = self._empty(x_shape, dy.dtype)
        i32 = np.int32
        self.launch("avgpool_backward", dy.dtype, n * h * w, dx, self._kernel_input(dy, "avgpool_backward dy"),
                    i32(h), i32(w), i32(c), i32(k), i32(stride), i32(pad), i32(dy.shape[1]), i32(dy.shape[2]))
        return dx

    def global_avgpool(self, x: Array) -> Array:
        x = self._kernel_input(x, "global_avgpool x")
        n, h, w, c = x.shape
        y = self._empty((n, c), x.dtype)
        self.launch("global_avgpool", x.dtype, n * c, y, x, np.int32(h * w), np.int32(c))
        return y

    def global_avgpool_backward(self, dy: Array, x_shape: tuple[int, int, int, int]) -> Array:
        n, h, w, c = x_shape
        dx = self._empty(x_shape, dy.dtype)
        self.launch("global_avgpool_backward", dy.dtype, n * h * w * c, dx,
                    self._kernel_input(dy, "global_avgpool_backward dy"), np.int32(h * w), np.int32(c))
        return dx
