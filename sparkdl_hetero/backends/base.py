"""The backend seam: every array operation the engine performs on activations, weights and gradients.

A backend owns its arrays ("device arrays": NumPy arrays, CuPy arrays, pyopencl Arrays). The engine only
creates them through the backend, slices/reshapes contiguous ones (``a[i:j]``, ``a.reshape(...)``,
``a.shape``, ``a.dtype``) and passes them back to backend methods. Data crosses to the host only through
:meth:`Backend.to_host`.

Layout conventions:
- matrices are row-major, one sample per row;
- images are NHWC (``(n, h, w, c)``), contiguous;
- ``im2col`` columns are ordered ``(kh, kw, c)``, rows ``(n, oh, ow)``.
Backends know nothing of layers: these are plain tensor operations.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from .activations import NAMES

Array = Any  # a backend-native array
ACTIVATIONS = NAMES  # the activation kinds of :meth:`Backend.activation` (registered in :mod:`.activations`)


class Backend(ABC):
    """Array operations used by the engine. Subclasses implement them for one kind of device."""

    name: str = "abstract"
    #: bytes of activations a training pass should keep within (the engine splits a batch into passes of as
    #: many rows as fit); None: the whole batch in one pass (accelerators want large batches)
    cache_bytes: int | None = None
    #: arrays of this backend are host NumPy arrays: a vector can be updated in place by NumPy code
    host_memory: bool = False

    # ---- memory --------------------------------------------------------------------------------------
    @abstractmethod
    def asarray(self, host: np.ndarray, dtype: Any = None) -> Array:
        """Copy a host array to the device (contiguous), optionally converting its dtype."""

    @abstractmethod
    def to_host(self, a: Array) -> np.ndarray:
        """Copy a device array to a new host NumPy array (never a view of the device array)."""

    @abstractmethod
    def zeros(self, shape: tuple[int, ...], dtype: Any) -> Array:
        """A new zero-filled device array."""

    @abstractmethod
    def copy_into(self, dst: Array, src: Array | np.ndarray) -> None:
        """Overwrite ``dst`` (a device array, possibly a view) with ``src`` (device or host), same size."""

    @abstractmethod
    def fill(self, a: Array, value: float) -> None:
        """Set every element of ``a`` (possibly a view) to ``value``."""

    # ---- linear algebra ------------------------------------------------------------------------------
    @abstractmethod
    def gemm(self, a: Array, b: Array, out: Array | None = None, trans_a: bool = False,
             trans_b: bool = False, alpha: float = 1.0, beta: float = 0.0) -> Array:
        """``out = alpha * op(a) @ op(b) + beta * out``; allocates ``out`` when None (then beta is ignored)."""

    @abstractmethod
    def add_row(self, y: Array, b: Array) -> None:
        """In place: ``y[i, :] += b`` for every row i."""

    @abstractmethod
    def col_sum(self, x: Array, out: Array, alpha: float = 1.0, beta: float = 0.0) -> None:
        """In place: ``out = alpha * x.sum(axis=0) + beta * out``."""

    @abstractmethod
    def axpy(self, y: Array, x: Array, alpha: float) -> None:
        """In place: ``y += alpha * x``."""

    @abstractmethod
    def mul(self, a: Array, b: Array) -> Array:
        """Element-wise product, a new array."""

    @abstractmethod
    def add(self, a: Array, b: Array) -> Array:
        """Element-wise sum of two arrays of one shape, a new array."""

    @abstractmethod
    def sum(self, a: Array) -> float:
        """Sum of all elements, as a host float."""

    # ---- activations and losses ----------------------------------------------------------------------
    @abstractmethod
    def activation(self, kind: str, x: Array, alpha: float = 0.01) -> Array:
        """``f(x)`` for ``kind`` in :data:`ACTIVATIONS` (see :mod:`.activations`; ``alpha`` is the slope of those
        that take one), a new array."""

    @abstractmethod
    def activation_backward(self, kind: str, y: Array, delta: Array, alpha: float = 0.01) -> Array:
        """``delta * f'(x)`` computed from the forward output ``y = f(x)``, a new array."""

    @abstractmethod
    def softmax(self, z: Array) -> Array:
        """Row-wise softmax, numerically stable."""

    @abstractmethod
    def softmax_xent(self, z: Array, target: Array, scale: float,
                     weight: Array | None = None) -> tuple[float, Array]:
        """Softmax + cross-entropy on logits ``z`` against row targets (one-hot or soft).

        Returns ``(sum over rows of -sum(t * log softmax(z)), (softmax(z) - t) * scale)``; finite even
        when a probability underflows (computed through log-softmax). ``weight``: a vector of one weight per row
        that multiplies each row's loss and delta (see :meth:`scale_rows`).
        """

    @abstractmethod
    def sigmoid_sq(self, z: Array, target: Array, scale: float,
                   weight: Array | None = None) -> tuple[float, Array]:
        """Sigmoid + squared error: ``o = sigmoid(z)``; returns ``(sum((o - t)^2) / 2,
        (o - t) * o * (1 - o) * scale)``, each row's share multiplied by its ``weight`` when given."""

    def huber(self, z: Array, target: Array, scale: float, threshold: float,
              weight: Array | None = None) -> tuple[float, Array]:
        """Identity output, Huber loss of each element's error ``e = z - t``: ``e^2 / 2`` where
        ``|e| <= threshold``, ``threshold * (|e| - threshold / 2)`` beyond (``threshold = inf``: the squared error
        ``e^2 / 2`` everywhere). Returns ``(sum of the losses, clip(e, -threshold, threshold) * scale)``, each row's
        share multiplied by its ``weight`` when given. This default goes through the host (the loss layer's
        outputs are few per row); array-module backends override it with device code."""
        hz = self.to_host(z)
        hw = None if weight is None else self.to_host(weight)
        loss, delta = _huber(np, hz, self.to_host(target), scale, threshold, hw)
        return loss, self.asarray(delta, dtype=hz.dtype)

    def scale_rows(self, a: Array, w: Array) -> Array:
        """``a[i, :] * w[i]`` for an (n, k) matrix ``a`` and a vector ``w`` of n values, a new array. This default
        forms the (n, k) matrix of each row's value as an outer product with a row of ones (one GEMM) and
        multiplies element-wise, through ops every backend has; array-module backends override it by
        broadcasting."""
        ones = self.asarray(np.ones((1, a.shape[1])), dtype=a.dtype)
        return self.mul(a, self.gemm(w.reshape(w.shape[0], 1), ones))

    # ---- convolution and pooling (NHWC) --------------------------------------------------------------
    @abstractmethod
    def im2col(self, x: Array, kh: int, kw: int, stride: int, pad: int) -> Array:
        """``x`` (n, h, w, c) -> columns (n*oh*ow, kh*kw*c), zero padding ``pad`` on each side."""

    @abstractmethod
    def col2im(self, cols: Array, x_shape: tuple[int, int, int, int], kh: int, kw: int, stride: int,
               pad: int) -> Array:
        """Adjoint of :meth:`im2col`: scatter-add columns back to an (n, h, w, c) array."""

    def conv_backward_input(self, dy: Array, w: Array, x_shape: tuple[int, int, int, int], kh: int, kw: int,
                            stride: int, pad: int) -> Array:
        """A convolution's input delta: ``col2im(dy @ w^T)`` for ``dy`` (n*oh*ow, filters) and weights ``w``
        (kh*kw*c, filters). Backends may override it to fuse or reorder the two steps."""
        return self.col2im(self.gemm(dy, w, trans_b=True), x_shape, kh, kw, stride, pad)

    def conv_forward(self, x: Array, w: Array, b: Array, kh: int, kw: int, stride: int, pad: int) -> Array:
        """A convolution of ``x`` (n, h, w, c) with weights ``w`` (kh*kw*c, filters) and bias ``b``: the
        (n*oh*ow, filters) rows of ``im2col(x) @ w + b``. Backends may override it to work in blocks of images."""
        y = self.gemm(self.im2col(x, kh, kw, stride, pad), w)
        self.add_row(y, b)
        return y

    def conv_backward(self, x: Array, dy: Array, w: Array, gw: Array, gb: Array, kh: int, kw: int, stride: int,
                      pad: int, need_dx: bool) -> Array | None:
        """For :meth:`conv_forward` of ``x`` and output delta ``dy`` (n*oh*ow, filters): adds the weight gradient
        ``im2col(x)^T @ dy`` to ``gw`` and the bias gradient to ``gb``; returns the input delta when ``need_dx``.
        The columns are computed again from ``x`` rather than kept from the forward pass: a convolution's columns
        are ``kh * kw`` times its input, and rebuilding them costs less than holding them between the passes."""
        self.gemm(self.im2col(x, kh, kw, stride, pad), dy, out=gw, trans_a=True, beta=1.0)
        self.col_sum(dy, gb, beta=1.0)
        return self.conv_backward_input(dy, w, tuple(x.shape), kh, kw, stride, pad) if need_dx else None

    @abstractmethod
    def maxpool(self, x: Array, k: int, stride: int, pad: int = 0) -> tuple[Array, Array]:
        """Max pooling of (n, h, w, c), floor mode, ``pad`` ignored positions (-inf) on each side (``pad <= k // 2``:
        every window holds an input) -> (output, argmax index ``di * k + dj`` within the padded window)."""

    @abstractmethod
    def maxpool_backward(self, dy: Array, idx: Array, x_shape: tuple[int, int, int, int], k: int,
                         stride: int, pad: int = 0) -> Array:
        """Route ``dy`` to the argmax positions; overlapping windows accumulate."""

    @abstractmethod
    def avgpool(self, x: Array, k: int, stride: int, pad: int = 0) -> Array:
        """Average pooling of (n, h, w, c), floor mode, ``pad`` zeros on each side counted in every window's
        ``k * k`` (PyTorch's ``count_include_pad=True``)."""

    @abstractmethod
    def avgpool_backward(self, dy: Array, x_shape: tuple[int, int, int, int], k: int, stride: int,
                         pad: int = 0) -> Array:
        """Spread ``dy / k^2`` over each window; overlapping windows accumulate."""

    @abstractmethod
    def global_avgpool(self, x: Array) -> Array:
        """The mean of every channel of (n, h, w, c) over its h*w pixels: (n, c)."""

    @abstractmethod
    def global_avgpool_backward(self, dy: Array, x_shape: tuple[int, int, int, int]) -> Array:
        """Adjoint of :meth:`global_avgpool`: ``dy[b, ch] / (h * w)`` at every pixel of channel ``ch``."""

    # ---- batch normalization (the columns of a (rows, c) matrix: features, or NHWC channels) -------------
    @abstractmethod
    def batchnorm_forward(self, x: Array, gamma: Array, beta: Array, mean: Array, var: Array, eps: float,
                          momentum: float, training: bool) -> tuple[Array, Array, Array]:
        """``y = gamma * (x - mu) * inv_std + beta`` per column of ``x`` (rows, c), ``inv_std = 1 / sqrt(v + eps)``.

        ``training``: ``mu`` and ``v`` are the batch's column mean and biased variance, and the running
        statistics ``mean`` and ``var`` (device vectors, updated in place) move towards them as PyTorch's do:
        ``mean = (1 - momentum) * mean + momentum * mu``, ``var = (1 - momentum) * var + momentum * v * rows /
        (rows - 1)``. Otherwise ``mu, v = mean, var`` (left unchanged). Returns ``(y, mu, inv_std)``, the last two
        new vectors for :meth:`batchnorm_backward`."""

    @abstractmethod
    def batchnorm_backward(self, dy: Array, x: Array, gamma: Array, mu: Array, inv_std: Array, dgamma: Array,
                           dbeta: Array, training: bool, need_dx: bool) -> Array | None:
        """For the forward pass that returned ``mu, inv_std``: adds ``sum(dy * xhat)`` to ``dgamma`` and ``sum(dy)``
        to ``dbeta`` (in place, ``xhat = (x - mu) * inv_std``) and returns the input delta when ``need_dx`` --
        through the batch statistics when ``training``, else ``dy * gamma * inv_std``."""

    @abstractmethod
    def dropout_mask(self, shape: tuple[int, ...], keep: float, rng: np.random.Generator, dtype: Any) -> Array:
        """A mask of ``1/keep`` (kept, probability ``keep``) and ``0`` values, drawn from ``rng``."""

    # ---- distillation hints --------------------------------------------------------------------------
    def row_rmse(self, a: Array, b: Array, scale: float) -> tuple[float, Array]:
        """Per-row root-mean-square difference of two (n, d) matrices: ``r_i = sqrt(mean_j (a_ij - b_ij)^2)``.

        Returns ``(sum_i r_i, scale * (a - b) / (d * r_i))`` (the gradient w.r.t. ``a``; 0 on rows where
        ``r_i = 0``). This default goes through the host; backends override it with device code.
        """
        ha = self.to_host(a)
        loss, delta = _row_rmse(np, ha, self.to_host(b), scale)
        return loss, self.asarray(delta, dtype=ha.dtype)

    # ---- helpers shared by every backend -------------------------------------------------------------
    def describe(self) -> str:
        """One line naming the backend and its device, for job logs."""
        return self.name


def pool_out(size: int, k: int, stride: int, pad: int = 0) -> int:
    """Output length of a window of ``k`` sliding by ``stride`` over ``size`` (+ ``pad`` on each side)."""
    return (size + 2 * pad - k) // stride + 1


def _huber(xp: Any, z: Array, t: Array, scale: float, threshold: float,
           w: Array | None) -> tuple[float, Array]:
    """:meth:`Backend.huber` written for a NumPy-like array module ``xp``."""
    e = z - t
    if math.isinf(threshold):
        per = e * e
        per *= per.dtype.type(0.5)
        g = e
    else:
        a = xp.abs(e)
        h = z.dtype.type(threshold)
        per = xp.where(a <= h, z.dtype.type(0.5) * e * e, h * (a - z.dtype.type(0.5) * h))
        g = xp.clip(e, -h, h)
    if w is not None:
        col = w.astype(z.dtype, copy=False).reshape(-1, 1)
        per *= col
        g *= col
    g *= z.dtype.type(scale)
    return float(per.sum(dtype=xp.float64)), g


def _row_rmse(xp: Any, a: Array, b: Array, scale: float) -> tuple[float, Array]:
    """:meth:`Backend.row_rmse` written for a NumPy-like array module ``xp``."""
    diff = a - b
    r = xp.sqrt((diff * diff).mean(axis=1, keepdims=True))
    inv = xp.where(r > 0, 1.0 / (a.shape[1] * xp.where(r > 0, r, 1)), 0).astype(a.dtype, copy=False)
    diff *= inv
    diff *= a.dtype.type(scale)
    return float(r.sum(dtype=xp.float64)), diff
