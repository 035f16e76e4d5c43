"""The reference backend: every op written once, plainly, over a NumPy-compatible array module ``xp``.

This is the version to read first and to trust: :class:`~.numpy_backend.NumpyBackend` overrides some ops with
faster NumPy-specific code that must compute the same values, and the CuPy backend reuses this class with
``xp=cupy``. ``get_backend("numpy", reference=True)`` (or ``SPARKDL_NUMPY_REFERENCE=1``) runs the engine on this
class over NumPy, e.g. to tell whether a wrong result comes from a fast path.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .activations import activation as _activation
from .base import Array, Backend, _huber, _row_rmse, pool_out


def accumulate(out: Array, r: Array, beta: float) -> Array:
    """``out = r`` (beta 0) or ``out = beta * out + r``, in place; returns ``out``."""
    if beta == 0.0:
        out[...] = r
    else:
        if beta != 1.0:
            out *= beta
        out += r
    return out


class ArrayModuleBackend(Backend):
    """Implements every op with a NumPy-compatible array module ``xp`` (NumPy by default)."""

    name = "numpy-reference"

    def __init__(self, xp: Any = np) -> None:
        self.xp = xp
        self._ones_cache: dict[str, Array] = {}

    @property
    def host_memory(self) -> bool:
        return self.xp is np

    def describe(self) -> str:
        return "numpy (reference array-module code, no fast paths)" if self.xp is np else self.name

    # ---- memory --------------------------------------------------------------------------------------
    def asarray(self, host: np.ndarray, dtype: Any = None) -> Array:
        return self.xp.ascontiguousarray(self.xp.asarray(host, dtype=dtype))

    def to_host(self, a: Array) -> np.ndarray:
        return np.array(a, copy=True)  # never alias the device array

    def zeros(self, shape: tuple[int, ...], dtype: Any) -> Array:
        return self.xp.zeros(shape, dtype=dtype)

    def copy_into(self, dst: Array, src: Array | np.ndarray) -> None:
        dst[...] = self.xp.asarray(src).reshape(dst.shape)

    def fill(self, a: Array, value: float) -> None:
        a.fill(value)

    # ---- linear algebra ------------------------------------------------------------------------------
    def gemm(self, a: Array, b: Array, out: Array | None = None, trans_a: bool = False,
             trans_b: bool = False, alpha: float = 1.0, beta: float = 0.0) -> Array:
        opa = a.T if trans_a else a
        opb = b.T if trans_b else b
        if out is None:
            r = opa @ opb
            if alpha != 1.0:
                r *= alpha
            return r
        if beta == 0.0 and alpha == 1.0:
            self.xp.matmul(opa, opb, out=out)
            return out
        r = opa @ opb
        if alpha != 1.0:
            r *= alpha
        return accumulate(out, r, beta)

    def add_row(self, y: Array, b: Array) -> None:
        y += b

    def _ones(self, n: int, dtype: Any) -> Array:
        """A cached vector of ``n`` ones (column sums as a GEMV: BLAS streams a tall, narrow matrix once, where
        ``sum(axis=0)`` reduces it column by column)."""
        key = np.dtype(dtype).str
        v = self._ones_cache.get(key)
        if v is None or v.shape[0] < n:
            v = self._ones_cache[key] = self.xp.ones(max(n, 1024), dtype=dtype)
        return v[:n]

    def _col_sums(self, x: Array) -> Array:
        """``x.sum(axis=0)`` (a new vector)."""
        return self.xp.matmul(self._ones(x.shape[0], x.dtype), x)

    def col_sum(self, x: Array, out: Array, alpha: float = 1.0, beta: float = 0.0) -> None:
        s = self._col_sums(x)
        if alpha != 1.0:
            s *= alpha
        accumulate(out, s, beta)

    def axpy(self, y: Array, x: Array, alpha: float) -> None:
        if alpha == 1.0:
            y += x
        else:
            y += alpha * x

    def mul(self, a: Array, b: Array) -> Array:
        return a * b

    def add(self, a: Array, b: Array) -> Array:
        return a + b

    def sum(self, a: Array) -> float:
        return float(a.sum(dtype=self.xp.float64))

    # ---- activations and losses ----------------------------------------------------------------------
    def activation(self, kind: str, x: Array, alpha: float = 0.01) -> Array:
        return _activation(kind).forward(self.xp, x, alpha)

    def activation_backward(self, kind: str, y: Array, delta: Array, alpha: float = 0.01) -> Array:
        return _activation(kind).backward(self.xp, y, delta, alpha)

    def _log_softmax(self, z: Array) -> Array:
        xp = self.xp
        s = z - z.max(axis=1, keepdims=True)
        return s - xp.log(xp.exp(s).sum(axis=1, keepdims=True))

    def softmax(self, z: Array) -> Array:
        return self.xp.exp(self._log_softmax(z))

    @staticmethod
    def _column(w: Array, dtype: Any) -> Array:
        """Row weights as an (n, 1) column of ``dtype`` (broadcast over a row's columns)."""
        return w.astype(dtype, copy=False).reshape(-1, 1)

    def softmax_xent(self, z: Array, target: Array, scale: float,
                     weight: Array | None = None) -> tuple[float, Array]:
        logp = self._log_softmax(z)
        t = target if weight is None else target * self._column(weight, z.dtype)
        loss = -float((t * logp).sum(dtype=self.xp.float64))
        delta = self.xp.exp(logp)
        delta -= target
        if weight is not None:
            delta *= self._column(weight, z.dtype)
        delta *= delta.dtype.type(scale)
        return loss, delta

    def sigmoid_sq(self, z: Array, target: Array, scale: float,
                   weight: Array | None = None) -> tuple[float, Array]:
        o = self.activation("sigmoid", z)
        err = o - target
        sq = err * err
        delta = err * o * (1 - o) * z.dtype.type(scale)
        if weight is not None:
            sq *= self._column(weight, z.dtype)
            delta *= self._column(weight, z.dtype)
        return 0.5 * float(sq.sum(dtype=self.xp.float64)), delta

    def huber(self, z: Array, target: Array, scale: float, threshold: float,
              weight: Array | None = None) -> tuple[float, Array]:
        return _huber(self.xp, z, target, scale, threshold, weight)

    def scale_rows(self, a: Array, w: Array) -> Array:
        return a * self._column(w, a.dtype)

    def row_rmse(self, a: Array, b: Array, scale: float) -> tuple[float, Array]:
        return _row_rmse(self.xp, a, b, scale)

    # ---- convolution and pooling (NHWC) --------------------------------------------------------------
    def _pad(self, x: Array, pad: int, value: float = 0.0) -> Array:
        if pad == 0:
            return x
        return self.xp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=value)

    def _crop(self, a: Array, pad: int) -> Array:
        """The inverse of :meth:`_pad`: the inner (h, w) of a padded (n, h + 2 pad, w + 2 pad, c), contiguous."""
        if pad == 0:
            return a
        return self.xp.ascontiguousarray(a[:, pad:a.shape[1] - pad, pad:a.shape[2] - pad, :])

    def im2col(self, x: Array, kh: int, kw: int, stride: int, pad: int) -> Array:
        xp = self.xp
        n, h, w, c = x.shape
        oh, ow = pool_out(h, kh, stride, pad), pool_out(w, kw, stride, pad)
        xq = xp.ascontiguousarray(self._pad(x, pad))
        sn, sh, sw, sc = xq.strides
        # every output pixel's (kh, kw, c) window as a strided view, copied into rows by the reshape
        win = xp.lib.stride_tricks.as_strided(
            xq, shape=(n, oh, ow, kh, kw, c), strides=(sn, sh * stride, sw * stride, sh, sw, sc))
        return win.reshape(n * oh * ow, kh * kw * c)

    def col2im(self, cols: Array, x_shape: tuple[int, int, int, int], kh: int, kw: int, stride: int,
               pad: int) -> Array:
        n, h, w, c = x_shape
        oh, ow = pool_out(h, kh, stride, pad), pool_out(w, kw, stride, pad)
        out = self.xp.zeros((n, h + 2 * pad, w + 2 * pad, c), dtype=cols.dtype)
        # one transposing copy makes every (i, j) block contiguous, so each add streams whole rows
        blocks = self.xp.ascontiguousarray(cols.reshape(n * oh * ow, kh * kw, c).transpose(1, 0, 2))
        for p in range(kh * kw):
            i, j = divmod(p, kw)
            out[:, i:i + stride * oh:stride, j:j + stride * ow:stride, :] += blocks[p].reshape(n, oh, ow, c)
        if pad:
            out = out[:, pad:pad + h, pad:pad + w, :]
        return self.xp.ascontiguousarray(out)

    @staticmethod
    def _window(a: Array, i: int, j: int, oh: int, ow: int, stride: int) -> Array:
        return a[:, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride, :]

    def maxpool(self, x: Array, k: int, stride: int, pad: int = 0) -> tuple[Array, Array]:
        xp = self.xp
        x = self._pad(x, pad, -xp.inf)
        n, h, w, c = x.shape
        oh, ow = pool_out(h, k, stride), pool_out(w, k, stride)
        y = self._window(x, 0, 0, oh, ow, stride).copy()
        for p in range(1, k * k):
            xp.maximum(y, self._window(x, p // k, p % k, oh, ow, stride), out=y)
        # the first window position (raster order) holding the maximum: visit positions last to first
        idx = xp.full(y.shape, k * k - 1, dtype=xp.int8 if k * k < 128 else xp.int32)
        hit = xp.empty(y.shape, dtype=bool)
        for p in range(k * k - 2, -1, -1):
            xp.equal(self._window(x, p // k, p % k, oh, ow, stride), y, out=hit)
            idx -= (idx - p) * hit  # idx = p where hit; arithmetic: masked stores crawl on irregular masks
        return y, idx

    def maxpool_backward(self, dy: Array, idx: Array, x_shape: tuple[int, int, int, int], k: int,
                         stride: int, pad: int = 0) -> Array:
        xp = self.xp
        n, h, w, c = x_shape
        dx = xp.zeros((n, h + 2 * pad, w + 2 * pad, c), dtype=dy.dtype)
        oh, ow = dy.shape[1], dy.shape[2]
        for p in range(k * k):
            win = self._window(dx, p // k, p % k, oh, ow, stride)
            if stride >= k:  # disjoint windows: each position is written once
                xp.multiply(dy, idx == p, out=win)
            else:
                win += dy * (idx == p)
        return self._crop(dx, pad)

    def avgpool(self, x: Array, k: int, stride: int, pad: int = 0) -> Array:
        x = self._pad(x, pad)
        n, h, w, c = x.shape
        oh, ow = pool_out(h, k, stride), pool_out(w, k, stride)
        y = self._window(x, 0, 0, oh, ow, stride).copy()
        for p in range(1, k * k):
            y += self._window(x, p // k, p % k, oh, ow, stride)
        y *= y.dtype.type(1.0 / (k * k))
        return y

    def avgpool_backward(self, dy: Array, x_shape: tuple[int, int, int, int], k: int, stride: int,
                         pad: int = 0) -> Array:
        n, h, w, c = x_shape
        dx = self.xp.zeros((n, h + 2 * pad, w + 2 * pad, c), dtype=dy.dtype)
        g = dy * dy.dtype.type(1.0 / (k * k))
        oh, ow = dy.shape[1], dy.shape[2]
        for p in range(k * k):
            win = self._window(dx, p // k, p % k, oh, ow, stride)
            if stride >= k:  # disjoint windows: each position is written once
                win[...] = g
            else:
                win += g
        return self._crop(dx, pad)

    def global_avgpool(self, x: Array) -> Array:
        n, h, w, c = x.shape
        return x.reshape(n, h * w, c).mean(axis=1)

    def global_avgpool_backward(self, dy: Array, x_shape: tuple[int, int, int, int]) -> Array:
        n, h, w, c = x_shape
        dx = self.xp.empty(x_shape, dtype=dy.dtype)
        dx[...] = (dy * dy.dtype.type(1.0 / (h * w))).reshape(n, 1, 1, c)
        return dx

    # ---- batch normalization -------------------------------------------------------------------------
    def _rowwise(self, op: Any, x: Array, v: Array, out: Array | None = None) -> Array:
        """``op(x, v)`` for a ufunc ``op``, a (rows, c) matrix ``x`` and a vector ``v`` of c values broadcast over
        the rows (into ``out`` when given)."""
        return op(x, v, out=out)

    def batchnorm_forward(self, x: Array, gamma: Array, beta: Array, mean: Array, var: Array, eps: float,
                          momentum: float, training: bool) -> tuple[Array, Array, Array]:
        xp, t = self.xp, x.dtype.type
        if training:
            rows = x.shape[0]
            mu = self._col_sums(x) * t(1.0 / rows)
            xc = self._rowwise(xp.subtract, x, mu)
            v = self._col_sums(xc * xc) * t(1.0 / rows)  # two passes: no cancellation between E[x^2] and mu^2
            mean *= t(1.0 - momentum)
            mean += t(momentum) * mu
            var *= t(1.0 - momentum)
            var += t(momentum * rows / (rows - 1)) * v
        else:
            mu, v = mean.copy(), var
            xc = self._rowwise(xp.subtract, x, mu)
        inv_std = 1 / xp.sqrt(v + t(eps))
        self._rowwise(xp.multiply, xc, gamma * inv_std, out=xc)
        self._rowwise(xp.add, xc, beta, out=xc)
        return xc, mu, inv_std

    def batchnorm_backward(self, dy: Array, x: Array, gamma: Array, mu: Array, inv_std: Array, dgamma: Array,
                           dbeta: Array, training: bool, need_dx: bool) -> Array | None:
        xp, t = self.xp, x.dtype.type
        xc = self._rowwise(xp.subtract, x, mu)
        dg = self._col_sums(dy * xc) * inv_std  # sum(dy * xhat), xhat = xc * inv_std
        db = self._col_sums(dy)
        dgamma += dg
        dbeta += db
        if not need_dx:
            return None
        scale = gamma * inv_std
        if not training:
            return self._rowwise(xp.multiply, dy, scale)
        # d/dx of gamma * xhat + beta through the batch mean and variance: the delta minus its mean and minus its
        # projection on xhat, scaled: dx = scale * (dy - (db + xhat * dg) / rows), as per-column terms of dy and xc
        rows = x.shape[0]
        self._rowwise(xp.multiply, xc, -scale * inv_std * dg * t(1.0 / rows), out=xc)
        self._rowwise(xp.add, xc, -scale * db * t(1.0 / rows), out=xc)
        dx = self._rowwise(xp.multiply, dy, scale)
        dx += xc
        return dx

    def dropout_mask(self, shape: tuple[int, ...], keep: float, rng: np.random.Generator, dtype: Any) -> Array:
        m = (rng.random(shape) < keep).astype(dtype) * np.asarray(1.0 / keep, dtype=dtype)
        return self.xp.asarray(m)
