"""The reference backend: array-module code written once for NumPy (and reused by CuPy with ``xp=cupy``)."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import as_strided

from .base import Array, Backend, _row_rmse, pool_out

_RUN = 256  # elements per inner-loop run that make NumPy's per-call overhead small against the arithmetic
# OpenBLAS on AVX-512 cores (SkylakeX kernels) multiplies float32 products of up to 1e6 multiply-adds (M*N*K)
# with unpacked "small matrix" kernels, and larger ones through packed blocks; for skinny products -- a first
# convolution's (n*784 x 25) @ (25 x 6) -- the packing dominates: pieces under the limit run ~2x faster
_SMALL_GEMM = 1_000_000
_SMALL_GEMM_CORES = ("skylakex", "cooperlake", "sapphirerapids")  # OpenBLAS core names, lower case
# up to this many rows a bias add / column sum is one broadcast pass / one reduction: a small batch's
# (12 x 120) bias gradient 4.0 -> 1.3 us, its bias add 1.8 -> 0.9 us (the GEMV and tiled forms pay fixed costs)
_FEW_ROWS = 64


@functools.cache
def _small_gemm_kernels() -> bool:
    """Whether NumPy's BLAS is an OpenBLAS running one of the cores with the small-matrix sgemm kernels (the
    core OpenBLAS picked at load time, e.g. after ``OPENBLAS_CORETYPE``)."""
    from threadpoolctl import threadpool_info

    return any(i.get("internal_api") == "openblas" and "numpy" in str(i.get("filepath", ""))
               and str(i.get("architecture")).lower() in _SMALL_GEMM_CORES for i in threadpool_info())


def _skinny_piece(m: int, k: int, n: int, dtype: Any, b_transposed: bool) -> int:
    """Rows (of op(a), when ``m >= k``) or inner indices (otherwise) per piece that keep a skinny float32
    product ``(m x k) @ (k x n)`` under the small-kernel limit; 0 when it should run as one call. Measured (one
    thread): row pieces of >= 512 gain unless b is transposed (conv1 (25088 x 25) @ (25 x 6) 175 -> 96 us, an
    MLP's (4096 x 100) @ (100 x 10) 112 -> 75 us; (4096 x 10) @ (100 x 10)^T 59 -> 69 us); inner pieces of
    >= 256 gain (conv2's weight gradient (150 x 3200) @ (3200 x 16) 117 -> 97 us); shorter pieces lose."""
    if dtype != np.float32 or m * k * n <= _SMALL_GEMM or not _small_gemm_kernels():
        return 0
    piece = _SMALL_GEMM // (m * k * n // max(m, k))
    if m >= k:
        return piece if piece >= 512 and not b_transposed else 0
    return piece if piece >= 256 else 0


def _numpy_expit(x: np.ndarray) -> np.ndarray:
    """``1 / (1 + exp(-x))`` in ``x``'s dtype: three vectorized passes, ~4x faster than scipy's expit on float32.
    For very negative ``x``, ``exp(-x)`` overflows to inf and the result is the correct 0."""
    y = np.negative(x)
    with np.errstate(over="ignore"):
        np.exp(y, out=y)
    y += 1
    return np.reciprocal(y, out=y)


def _accumulate(out: Array, r: Array, beta: float) -> Array:
    """``out = r`` (beta 0) or ``out = beta * out + r``, in place; returns ``out``."""
    if beta == 0.0:
        out[...] = r
    else:
        if beta != 1.0:
            out *= beta
        out += r
    return out


def _rows_per_run(rows: int, cols: int) -> int:
    """The largest power of two ``r`` dividing ``rows`` with ``r * cols <= _RUN``: a contiguous (rows, cols)
    matrix read as (rows / r, r * cols) has r times longer rows (1 when ``cols`` is already long)."""
    r = 1
    while rows % (2 * r) == 0 and 2 * r * cols <= _RUN:
        r *= 2
    return r


@functools.cache
def _opaque(nbytes: int) -> np.dtype:
    return np.dtype((np.void, nbytes))


def _pixels(a: np.ndarray) -> np.ndarray:
    """A C-contiguous (..., c) array as its (...) pixels, each one opaque item of c values (same memory): a
    strided copy of pixels then runs item by item instead of paying NumPy's per-run cost every c values."""
    return a.view(_opaque(a.shape[-1] * a.itemsize))[..., 0]


def _unpixels(p: np.ndarray, dtype: Any, c: int) -> np.ndarray:
    """The inverse of :func:`_pixels` for a C-contiguous array of pixels: shape ``p.shape + (c,)``."""
    return p.view(dtype).reshape(p.shape + (c,))


def _fused_expit(xp: Any) -> Any:
    """The array module's overflow-free logistic function with its input's dtype (:func:`_numpy_expit` for
    NumPy, cupyx's one-pass expit for CuPy), or ``None`` for other modules (the generic code is used)."""
    name = getattr(xp, "__name__", "")
    if name == "numpy":
        return _numpy_expit
    if name == "cupy":
        from cupyx.scipy.special import expit

        return expit
    return None


class ArrayModuleBackend(Backend):
    """Implements every op with a NumPy-compatible array module ``xp``."""

    def __init__(self, xp: Any = np) -> None:
        self.xp = xp
        self._ones_cache: dict[str, Array] = {}
        self._expit = _fused_expit(xp)

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
        return _accumulate(out, r, beta)

    def add_row(self, y: Array, b: Array) -> None:
        y += b

    def _ones(self, n: int, dtype: Any) -> Array:
        """A cached vector of ``n`` ones (column sums as a GEMV: much faster than ``sum(axis=0)`` on tall,
        narrow matrices)."""
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
        _accumulate(out, s, beta)

    def axpy(self, y: Array, x: Array, alpha: float) -> None:
        if alpha == 1.0:
            y += x
        else:
            y += alpha * x

    def mul(self, a: Array, b: Array) -> Array:
        return a * b

    def sum(self, a: Array) -> float:
        return float(a.sum(dtype=self.xp.float64))

    # ---- activations and losses ----------------------------------------------------------------------
    def _sigmoid(self, x: Array) -> Array:
        if self._expit is not None:
            return self._expit(x)
        xp = self.xp
        # exp of a non-positive number never overflows
        e = xp.exp(-xp.abs(x))
        return xp.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(x.dtype, copy=False)

    def activation(self, kind: str, x: Array, alpha: float = 0.01) -> Array:
        xp = self.xp
        if kind == "sigmoid":
            return self._sigmoid(x)
        if kind == "tanh":
            return xp.tanh(x)
        if kind == "relu":
            return xp.maximum(x, 0)
        if kind == "leaky_relu":
            return xp.where(x > 0, x, x * x.dtype.type(alpha))
        if kind == "identity":
            return x.copy()
        raise ValueError(f"unknown activation {kind!r}")

    def activation_backward(self, kind: str, y: Array, delta: Array, alpha: float = 0.01) -> Array:
        xp = self.xp
        if kind == "sigmoid":  # delta * y * (1 - y) with one temporary
            out = 1 - y
            out *= y
            out *= delta
            return out
        if kind == "tanh":
            return delta * (1 - y * y)
        if kind == "relu":
            return delta * (y > 0)
        if kind == "leaky_relu":
            return xp.where(y > 0, delta, delta * delta.dtype.type(alpha))
        if kind == "identity":
            return delta.copy()
        raise ValueError(f"unknown activation {kind!r}")

    def _log_softmax(self, z: Array) -> Array:
        xp = self.xp
        s = z - z.max(axis=1, keepdims=True)
        return s - xp.log(xp.exp(s).sum(axis=1, keepdims=True))

    def softmax(self, z: Array) -> Array:
        return self.xp.exp(self._log_softmax(z))

    def softmax_xent(self, z: Array, target: Array, scale: float) -> tuple[float, Array]:
        logp = self._log_softmax(z)
        loss = -float((target * logp).sum(dtype=self.xp.float64))
        delta = self.xp.exp(logp)
        delta -= target
        delta *= delta.dtype.type(scale)
        return loss, delta

    def sigmoid_sq(self, z: Array, target: Array, scale: float) -> tuple[float, Array]:
        o = self._sigmoid(z)
        err = o - target
        loss = 0.5 * float((err * err).sum(dtype=self.xp.float64))
        return loss, err * o * (1 - o) * z.dtype.type(scale)

    def row_rmse(self, a: Array, b: Array, scale: float) -> tuple[float, Array]:
        return _row_rmse(self.xp, a, b, scale)

    # ---- convolution and pooling (NHWC) --------------------------------------------------------------
    def _pad(self, x: Array, pad: int) -> Array:
        if pad == 0:
            return x
        return self.xp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

    def im2col(self, x: Array, kh: int, kw: int, stride: int, pad: int) -> Array:
        xp = self.xp
        n, h, w, c = x.shape
        oh, ow = pool_out(h, kh, stride, pad), pool_out(w, kw, stride, pad)
        if c == 1:
            # one channel: gather each kernel offset as a whole (n, oh, ow) plane -- long contiguous runs --
            # into (kh*kw, rows) and return its transpose (an F-ordered view that GEMM takes as it is)
            xq = self._pad(x, pad)
            t = xp.empty((kh * kw, n, oh, ow), dtype=x.dtype)
            for p in range(kh * kw):
                i, j = divmod(p, kw)
                t[p] = xq[:, i:i + stride * oh:stride, j:j + stride * ow:stride, 0]
            return t.reshape(kh * kw, n * oh * ow).T
        xp_ = xp.ascontiguousarray(self._pad(x, pad))
        sn, sh, sw, sc = xp_.strides
        win = xp.lib.stride_tricks.as_strided(
            xp_, shape=(n, oh, ow, kh, kw, c), strides=(sn, sh * stride, sw * stride, sh, sw, sc))
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

    def maxpool(self, x: Array, k: int, stride: int) -> tuple[Array, Array]:
        xp = self.xp
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
                         stride: int) -> Array:
        xp = self.xp
        dx = xp.zeros(x_shape, dtype=dy.dtype)
        oh, ow = dy.shape[1], dy.shape[2]
        for p in range(k * k):
            win = self._window(dx, p // k, p % k, oh, ow, stride)
            if stride >= k:  # disjoint windows: each position is written once
                xp.multiply(dy, idx == p, out=win)
            else:
                win += dy * (idx == p)
        return dx

    def avgpool(self, x: Array, k: int, stride: int) -> Array:
        n, h, w, c = x.shape
        oh, ow = pool_out(h, k, stride), pool_out(w, k, stride)
        y = self._window(x, 0, 0, oh, ow, stride).copy()
        for p in range(1, k * k):
            y += self._window(x, p // k, p % k, oh, ow, stride)
        y *= y.dtype.type(1.0 / (k * k))
        return y

    def avgpool_backward(self, dy: Array, x_shape: tuple[int, int, int, int], k: int, stride: int) -> Array:
        dx = self.xp.zeros(x_shape, dtype=dy.dtype)
        g = dy * dy.dtype.type(1.0 / (k * k))
        oh, ow = dy.shape[1], dy.shape[2]
        for p in range(k * k):
            win = self._window(dx, p // k, p % k, oh, ow, stride)
            if stride >= k:  # disjoint windows: each position is written once
                win[...] = g
            else:
                win += g
        return dx

    def dropout_mask(self, shape: tuple[int, ...], keep: float, rng: np.random.Generator, dtype: Any) -> Array:
        m = (rng.random(shape) < keep).astype(dtype) * np.asarray(1.0 / keep, dtype=dtype)
        return self.xp.asarray(m)


class NumpyBackend(ArrayModuleBackend):
    """Plain NumPy on the host CPU (the default).

    NumPy pays a fixed cost per inner-loop run, so on NHWC images with few channels (LeNet's 6) an operation over
    a strided view with runs of ``c`` elements costs several times one over contiguous memory. The overrides
    below rearrange the work into long runs; they compute the same values (sums may be ordered differently)."""

    name = "numpy"
    # LeNet-5 forward + backward, one thread, ms per 1024 rows by rows per pass: 16: 45, 32: 38, 64: 37, 128: 44,
    # 256: 55, 1024: 95 -- a pass whose activations (conv1's columns: 78 KB a row) outgrow the caches slows down
    cache_bytes = 8 << 20

    def __init__(self) -> None:
        super().__init__(np)

    def gemm(self, a: Array, b: Array, out: Array | None = None, trans_a: bool = False,
             trans_b: bool = False, alpha: float = 1.0, beta: float = 0.0) -> Array:
        opa = a.T if trans_a else a
        opb = b.T if trans_b else b
        (m, k), n = opa.shape, opb.shape[1]
        piece = 0
        if m * k * n > _SMALL_GEMM and alpha == 1.0:
            piece = _skinny_piece(m, k, n, np.result_type(opa, opb), trans_b)
        if k == 1 and alpha == 1.0:  # an outer product (a one-row batch's weight gradient): matmul's loop
            r = opa * opb  # for an inner dimension of 1 takes ~50 us on (400 x 1) @ (1 x 120), this ~2 us
        elif piece == 0:
            return super().gemm(a, b, out, trans_a, trans_b, alpha, beta)
        elif m >= k:  # a long output: blocks of rows
            r = out if out is not None and beta == 0.0 else np.empty((m, n), dtype=np.float32)
            for lo in range(0, m, piece):
                np.matmul(opa[lo:lo + piece], opb, out=r[lo:lo + piece])
        else:  # a long inner dimension: a sum of products over blocks of it
            r = opa[:, :piece] @ opb[:piece]
            for lo in range(piece, k, piece):
                r += opa[:, lo:lo + piece] @ opb[lo:lo + piece]
        if out is None or r is out:
            return r
        return _accumulate(out, r, beta)

    def add_row(self, y: Array, b: Array) -> None:
        rows, cols = y.shape
        r = _rows_per_run(rows, cols) if y.flags.c_contiguous and rows > _FEW_ROWS else 1
        if r == 1:
            y += b
        else:  # narrow rows (a convolution's filters): add r copies of b to r rows at once
            tiled = np.empty((r, cols), dtype=y.dtype)
            tiled[...] = b
            y.reshape(rows // r, r * cols).__iadd__(tiled.reshape(-1))

    def _col_sums(self, x: Array) -> Array:
        rows, cols = x.shape
        if rows <= _FEW_ROWS:
            return np.add.reduce(x, axis=0)
        r = _rows_per_run(rows, cols) if x.flags.c_contiguous else 1
        if r == 1:
            return super()._col_sums(x)
        # narrow columns: sum r rows at once, then the r partial sums
        return super()._col_sums(super()._col_sums(x.reshape(rows // r, r * cols)).reshape(r, cols))

    @staticmethod
    def _padded(x: np.ndarray, pad: int) -> np.ndarray:
        """``x`` (n, h, w, c) with ``pad`` zeros on each side of h and w, C-contiguous."""
        if pad == 0:
            return np.ascontiguousarray(x)
        n, h, w, c = x.shape
        xq = np.zeros((n, h + 2 * pad, w + 2 * pad, c), dtype=x.dtype)
        xq[:, pad:pad + h, pad:pad + w] = x
        return xq

    def im2col(self, x: Array, kh: int, kw: int, stride: int, pad: int) -> Array:
        n, h, w, c = x.shape
        oh, ow = pool_out(h, kh, stride, pad), pool_out(w, kw, stride, pad)
        xq = self._padded(x, pad)
        if c == 1:
            # one channel: the kw column shifts of every padded row (runs of ow), then each kernel offset as
            # a whole (n, oh, ow) plane (runs of oh*ow) in (kh*kw, rows), returned transposed (an F-ordered
            # view GEMM takes as it is)
            u = np.empty((kw, n, xq.shape[1], ow), dtype=x.dtype)
            for j in range(kw):
                u[j] = xq[:, :, j:j + stride * ow:stride, 0]
            t = np.empty((kh, kw, n, oh, ow), dtype=x.dtype)
            for i in range(kh):
                t[i] = u[:, :, i:i + stride * oh:stride]
            return t.reshape(kh * kw, n * oh * ow).T
        # kw neighbouring pixels of a row are kw*c contiguous values: copy each as one opaque item
        sn, sh, sw, sc = xq.strides
        win = as_strided(xq, shape=(n, oh, ow, kh, kw * c), strides=(sn, sh * stride, sw * stride, sh, sc))
        item = _opaque(kw * c * x.itemsize)
        cols = np.empty((n, oh, ow, kh), dtype=item)
        cols[...] = win.view(item)[..., 0]
        return cols.view(x.dtype).reshape(n * oh * ow, kh * kw * c)

    @staticmethod
    def _log_softmax_t(z: Array) -> Array:
        """Log-softmax of the rows of ``z``, transposed ((classes, rows), C-contiguous): with few classes the
        reductions across a row's classes become element-wise passes over whole class rows."""
        s = z.T.copy()  # a copy even when z.T is already contiguous (one row): modified in place below
        s -= s.max(axis=0)
        s -= np.log(np.exp(s).sum(axis=0))
        return s

    def softmax(self, z: Array) -> Array:
        return np.ascontiguousarray(np.exp(self._log_softmax_t(z)).T)

    def softmax_xent(self, z: Array, target: Array, scale: float) -> tuple[float, Array]:
        logp = self._log_softmax_t(z)
        t = np.ascontiguousarray(target.T)
        loss = -float((t * logp).sum(dtype=np.float64))
        delta = np.exp(logp, out=logp)
        delta -= t
        delta *= delta.dtype.type(scale)
        return loss, np.ascontiguousarray(delta.T)

    def maxpool(self, x: Array, k: int, stride: int) -> tuple[Array, Array]:
        if stride != k or k == 1:
            return super().maxpool(x, k, stride)
        # disjoint windows: each of the k*k window positions as one contiguous plane (pixels copied as opaque
        # items), then a pairwise tournament of neighbouring groups in raster order in which the later group wins
        # only when strictly greater -- the first maximum in raster order, as in the general path. Whole-plane
        # passes: (32, 28, 28, 6) 105 -> 72 us, one thread
        n, h, w, c = x.shape
        oh, ow = pool_out(h, k, k), pool_out(w, k, k)
        itype = np.int8 if k * k < 128 else np.int32
        px = _pixels(np.ascontiguousarray(x))
        level: list[tuple[np.ndarray, Any]] = [
            (_unpixels(px[:, i:k * oh:k, j:k * ow:k].copy(), x.dtype, c), i * k + j)
            for i in range(k) for j in range(k)]
        while len(level) > 1:
            paired = []
            for (m_left, i_left), (m_right, i_right) in zip(level[0::2], level[1::2], strict=False):
                take = np.greater(m_right, m_left)
                np.maximum(m_left, m_right, out=m_left)
                idx = (i_right - i_left) * (take.view(np.int8) if itype == np.int8 else take.astype(itype))
                idx += i_left
                paired.append((m_left, idx))
            level = paired + level[len(paired) * 2:]
        return level[0]

    def maxpool_backward(self, dy: Array, idx: Array, x_shape: tuple[int, int, int, int], k: int,
                         stride: int) -> Array:
        n, h, w, c = x_shape
        oh, ow = dy.shape[1], dy.shape[2]
        if stride != k or h != oh * k or w != ow * k:
            return super().maxpool_backward(dy, idx, x_shape, k, stride)
        dx = np.empty(x_shape, dtype=dy.dtype)  # the disjoint windows tile the image: every pixel is written
        win = _pixels(dx).reshape(n, oh, k, ow, k)
        for p in range(k * k):
            win[:, :, p // k, :, p % k] = _pixels(np.ascontiguousarray(dy * (idx == p)))
        return dx

    def conv_backward_input(self, dy: Array, w: Array, x_shape: tuple[int, int, int, int], kh: int, kw: int,
                            stride: int, pad: int) -> Array:
        n, h, wd, c = x_shape
        oh, ow = pool_out(h, kh, stride, pad), pool_out(wd, kw, stride, pad)
        hp, wp = h + 2 * pad, wd + 2 * pad
        f = dy.shape[1]
        if stride == 1:
            # the input delta is a full correlation of dy with the flipped kernel. Gather, for every position of
            # a padded input row, the kw dy pixels its kernel row sees (contiguous runs of kw*f); one GEMM sums
            # over (j, f) for each kernel row i at once; regrouped by i (whole pixels), kh adds of whole
            # shifted image rows sum over i
            dyp = np.zeros((n, oh, wp + kw - 1, f), dtype=dy.dtype)
            dyp[:, :, kw - 1:kw - 1 + ow] = dy.reshape(n, oh, ow, f)
            sn, so, sx, sf = dyp.strides
            rows = np.ascontiguousarray(as_strided(dyp, shape=(n, oh, wp, kw * f), strides=(sn, so, sx, sf)))
            # the flipped kernel as (j, f) x (i, c), zero columns up to a multiple of 16: OpenBLAS's AVX-512
            # kernels take 32 columns in 2/3 of the time of 30 (LeNet conv2: 175 -> 112 us at batch 32)
            wf = np.zeros((kw * f, -(-kh * c // 16) * 16), dtype=w.dtype)
            wf[:, :kh * c] = w.reshape(kh, kw, c, f)[:, ::-1].transpose(1, 3, 0, 2).reshape(kw * f, kh * c)
            part = self.gemm(rows.reshape(n * oh * wp, kw * f), wf)[:, :kh * c]  # (n, oh, wp) x (i, c)
            by_row = _unpixels(np.ascontiguousarray(_pixels(part.reshape(-1, kh, c)).T), dy.dtype, c)
            by_row = by_row.reshape(kh, n, oh * wp * c)
            out = np.zeros((n, hp * wp * c), dtype=dy.dtype)
            for i in range(kh):
                out[:, i * wp * c:(i + oh) * wp * c] += by_row[i]
            out = out.reshape(n, hp, wp, c)
            return np.ascontiguousarray(out[:, pad:pad + h, pad:pad + wd]) if pad else out
        # strided: (dy w^T)^T = w dy^T holds every kernel offset as a contiguous (c, n, oh, ow) block: accumulate
        # them into a channel-first image (long contiguous runs), then transpose once
        blocks = self.gemm(w, dy, trans_b=True).reshape(kh * kw, c, n, oh, ow)
        out = np.zeros((c, n, hp, wp), dtype=dy.dtype)
        for p in range(kh * kw):
            i, j = divmod(p, kw)
            out[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride] += blocks[p]
        return np.ascontiguousarray(out[:, :, pad:pad + h, pad:pad + wd].transpose(1, 2, 3, 0))
