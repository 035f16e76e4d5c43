"""NumpyBackend: the reference array-module code (:mod:`.array_module`) with NumPy fast paths.

Each override below computes the same values as the reference op (sums may be ordered differently) and says why
it exists. Most have one reason: NumPy pays a fixed cost per call and per inner-loop run, so on NHWC images with
few channels (LeNet's 6) an op over a strided view with runs of ``c`` elements costs several times one over
contiguous memory; the overrides rearrange the work into long runs and whole-array passes.

Debugging switch: ``get_backend("numpy", reference=True)``, or the environment variable
``SPARKDL_NUMPY_REFERENCE=1`` (read by ``get_backend("numpy")`` and ``"auto"``'s NumPy fallback), gives the
reference :class:`~.array_module.ArrayModuleBackend` over NumPy instead, without any of these fast paths.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import as_strided

from .array_module import ArrayModuleBackend, accumulate
from .base import Array, pool_out

_RUN = 256  # elements per inner-loop run that make NumPy's per-call overhead small against the arithmetic
# BLAS libraries (OpenBLAS on AVX-512 cores among them) multiply float32 products up to about this many
# multiply-adds (M*N*K) with unpacked "small matrix" kernels and larger ones through packed blocks; for skinny
# products -- a first convolution's (n*784 x 25) @ (25 x 6) -- packing dominates, so pieces under the limit run
# faster. A BLAS without such kernels runs the pieces at about the cost of one call (each piece is still hundreds of
# rows), so the rule does not depend on the CPU model
_SMALL_GEMM = 1_000_000
# up to this many rows a bias add / column sum is one broadcast pass / one reduction: the GEMV and tiled forms
# pay fixed costs that a small batch does not recover
_FEW_ROWS = 64
# a convolution builds its im2col columns for as many images at a time as fit in about this many bytes per BLAS
# thread -- a core's share of cache -- and multiplies them at once: the columns (kh*kw times the input) are then
# read by the GEMM from cache instead of being written to and read back from memory, and rebuilding them for the
# backward pass costs less than keeping a batch's worth alive
_CONV_BLOCK_BYTES = 1 << 20
# GEMM outputs at least this many columns wide fill whole SIMD-register-wide blocks (16 float32 values with AVX-512)
# of BLAS kernels; narrower ones run through slower edge paths
_WIDE = 16


# glibc's malloc returns freed memory above this much at the top of its heap to the system, and serves allocations of
# at least _MMAP_BYTES with fresh mappings (see _steady_heap)
_TRIM_BYTES = 128 << 20
_MMAP_BYTES = 32 << 20  # glibc's largest allowed value on 64-bit systems


@functools.cache
def _steady_heap() -> bool:
    """Keep the memory one training step frees for the next step's arrays (glibc only; True when set).

    A step allocates and frees the same arrays every time -- activations, columns, deltas: MBs each. By default,
    glibc serves allocations above a moving threshold (128 KiB at first) with fresh mappings and gives the top of
    its heap back to the system once more than twice that is free, so every step faults its arrays' pages in
    again, zeroed by the kernel (a network whose batch normalization runs on the whole batch pays it on every
    layer). Fixed thresholds keep arrays up to ``_MMAP_BYTES`` on the heap and up to ``_TRIM_BYTES`` of free heap
    for reuse. The setting is the process's: set once, by the first NumPy backend. Another C library: nothing
    changes."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, _MMAP_BYTES)) and bool(mallopt(m_trim_threshold, _TRIM_BYTES))


@functools.cache
def _blas_controllers() -> tuple[Any, ...]:
    """threadpoolctl's controllers of the BLAS libraries NumPy loaded (their thread counts are read live)."""
    from threadpoolctl import ThreadpoolController

    return tuple(lib for lib in ThreadpoolController().lib_controllers if lib.user_api == "blas")


def _blas_threads() -> int:
    """The number of threads BLAS calls use now (under threadpool_limits too); 1 when unknown."""
    return max([1, *(lib.num_threads for lib in _blas_controllers())])


def _skinny_piece(m: int, k: int, n: int, dtype: Any, b_transposed: bool) -> int:
    """Rows (of op(a), when ``m >= k``) or inner indices (otherwise) per piece that keep a skinny float32
    product ``(m x k) @ (k x n)`` under the small-kernel limit; 0 when it should run as one call. Row pieces of
    at least 512 gain unless b is transposed (those pieces were measured slower than one call); inner pieces
    of at least 256 gain; shorter pieces pay more per call than the small kernels save."""
    if dtype != np.float32 or m * k * n <= _SMALL_GEMM:
        return 0
    piece = _SMALL_GEMM // (m * k * n // max(m, k))
    if m >= k:
        return piece if piece >= 512 and not b_transposed else 0
    return piece if piece >= 256 else 0


def _numpy_expit(x: np.ndarray) -> np.ndarray:
    """``1 / (1 + exp(-x))`` in ``x``'s dtype: three in-place vectorized passes and no temporaries, where the
    reference's overflow-free form needs a select and several temporaries. For very negative ``x``, ``exp(-x)``
    overflows to inf and the result is the correct 0."""
    y = np.negative(x)
    with np.errstate(over="ignore"):
        np.exp(y, out=y)
    y += 1
    return np.reciprocal(y, out=y)


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


class NumpyBackend(ArrayModuleBackend):
    """NumPy on the host CPU (the default): the reference ops with the fast paths below."""

    name = "numpy"
    # a pass whose activations (a LeNet's conv1 columns: tens of KB a row) outgrow the CPU caches slows down; a
    # cache-sized pass keeps them resident between forward and backward
    cache_bytes = 8 << 20

    def __init__(self) -> None:
        super().__init__(np)
        _steady_heap()

    def describe(self) -> str:
        return self.name

    def activation(self, kind: str, x: Array, alpha: float = 0.01) -> Array:
        if kind == "sigmoid":  # the in-place logistic (see _numpy_expit)
            return _numpy_expit(x)
        return super().activation(kind, x, alpha)

    def gemm(self, a: Array, b: Array, out: Array | None = None, trans_a: bool = False,
             trans_b: bool = False, alpha: float = 1.0, beta: float = 0.0) -> Array:
        opa = a.T if trans_a else a
        opb = b.T if trans_b else b
        (m, k), n = opa.shape, opb.shape[1]
        piece = 0
        if m * k * n > _SMALL_GEMM and alpha == 1.0:
            piece = _skinny_piece(m, k, n, np.result_type(opa, opb), trans_b)
        if k == 1 and alpha == 1.0:  # an outer product (a one-row batch's weight gradient): matmul runs an inner
            r = opa * opb  # dimension of 1 through a slow generic loop, broadcasting is one element-wise pass
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
        return accumulate(out, r, beta)

    def add_row(self, y: Array, b: Array) -> None:
        rows, cols = y.shape
        r = _rows_per_run(rows, cols) if y.flags.c_contiguous and rows > _FEW_ROWS else 1
        if r == 1:
            y += b
        else:  # narrow rows (a convolution's filters): add r copies of b to r rows at once
            tiled = np.empty((r, cols), dtype=y.dtype)
            tiled[...] = b
            y.reshape(rows // r, r * cols).__iadd__(tiled.reshape(-1))

    def _rowwise(self, op: Any, x: Array, v: Array, out: Array | None = None) -> Array:
        rows, cols = x.shape
        r = _rows_per_run(rows, cols) if x.flags.c_contiguous and rows > _FEW_ROWS else 1
        if r == 1 or (out is not None and not out.flags.c_contiguous):
            return op(x, v, out=out)
        # narrow rows (a convolution's channels): r copies of v against r rows at once, as add_row does
        tiled = np.empty((r, cols), dtype=np.result_type(x, v))
        tiled[...] = v
        wide = out.reshape(rows // r, r * cols) if out is not None else None
        return op(x.reshape(rows // r, r * cols), tiled.reshape(-1), out=wide).reshape(rows, cols)

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

    def softmax_xent(self, z: Array, target: Array, scale: float,
                     weight: Array | None = None) -> tuple[float, Array]:
        logp = self._log_softmax_t(z)
        t = np.ascontiguousarray(target.T)
        w = None if weight is None else weight.astype(z.dtype, copy=False)  # a row in the transposed layout
        loss = -float(((t if w is None else t * w) * logp).sum(dtype=np.float64))
        delta = np.exp(logp, out=logp)
        delta -= t
        if w is not None:
            delta *= w
        delta *= delta.dtype.type(scale)
        return loss, np.ascontiguousarray(delta.T)

    def maxpool(self, x: Array, k: int, stride: int, pad: int = 0) -> tuple[Array, Array]:
        if stride != k or k == 1 or pad:
            return super().maxpool(x, k, stride, pad)
        # disjoint windows: each of the k*k window positions as one contiguous plane (pixels copied as opaque
        # items), then a pairwise tournament of neighbouring groups in raster order in which the later group wins
        # only when strictly greater -- the first maximum in raster order, as in the general path. Whole-plane
        # passes instead of the reference's strided windows (runs of c values)
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
                         stride: int, pad: int = 0) -> Array:
        n, h, w, c = x_shape
        oh, ow = dy.shape[1], dy.shape[2]
        if stride != k or h != oh * k or w != ow * k or pad:
            return super().maxpool_backward(dy, idx, x_shape, k, stride, pad)
        dx = np.empty(x_shape, dtype=dy.dtype)  # the disjoint windows tile the image: every pixel is written
        win = _pixels(dx).reshape(n, oh, k, ow, k)
        for p in range(k * k):
            win[:, :, p // k, :, p % k] = _pixels(np.ascontiguousarray(dy * (idx == p)))
        return dx

    def _conv_rows(self, x: Array, w: Array, k: int, pad: int) -> Array:
        """A stride-1 convolution of ``x`` (n, h, w, c) with a k x k kernel ``w`` (k*k*c, f), zero padding ``pad``:
        (n*oh*ow, f) rows. Instead of im2col's k*k copies of every pixel, k: the k neighbours of each position of
        a padded row, contiguous (k*c values); kernel row i then multiplies the rows of output row y + i, one
        contiguous slice per image, and the k products add up."""
        n, c = x.shape[0], x.shape[3]
        xq = self._padded(x, pad)
        oh, ow, kc = xq.shape[1] - k + 1, xq.shape[2] - k + 1, k * c
        sn, sh, sw, sc = xq.strides
        rows = np.ascontiguousarray(as_strided(xq, shape=(n, xq.shape[1], ow, kc), strides=(sn, sh, sw, sc)))
        y = rows[:, :oh].reshape(n, oh * ow, kc) @ w[:kc]
        for i in range(1, k):
            y += rows[:, i:i + oh].reshape(n, oh * ow, kc) @ w[i * kc:(i + 1) * kc]
        return y.reshape(n * oh * ow, w.shape[1])

    @staticmethod
    def _conv_blocks(x_shape: tuple[int, ...], kh: int, kw: int, stride: int, pad: int,
                     itemsize: int) -> tuple[int, int]:
        """(images per block, output pixels per image) for a convolution of ``x_shape`` (see _CONV_BLOCK_BYTES)."""
        n, h, w, c = x_shape
        pixels = pool_out(h, kh, stride, pad) * pool_out(w, kw, stride, pad)
        return max(1, _CONV_BLOCK_BYTES * _blas_threads() // (pixels * kh * kw * c * itemsize)), pixels

    def conv_forward(self, x: Array, w: Array, b: Array, kh: int, kw: int, stride: int, pad: int) -> Array:
        n = x.shape[0]
        step, p = self._conv_blocks(x.shape, kh, kw, stride, pad, x.itemsize)
        if step >= n:
            return super().conv_forward(x, w, b, kh, kw, stride, pad)
        y = np.empty((n * p, w.shape[1]), dtype=x.dtype)
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            yb = y[lo * p:hi * p]
            self.gemm(self.im2col(x[lo:hi], kh, kw, stride, pad), w, out=yb)
            self.add_row(yb, b)  # while the block is in cache
        return y

    def conv_backward(self, x: Array, dy: Array, w: Array, gw: Array, gb: Array, kh: int, kw: int, stride: int,
                      pad: int, need_dx: bool) -> Array | None:
        n = x.shape[0]
        step, p = self._conv_blocks(x.shape, kh, kw, stride, pad, x.itemsize)
        if step >= n:
            return super().conv_backward(x, dy, w, gw, gb, kh, kw, stride, pad, need_dx)
        dx = np.empty(x.shape, dtype=dy.dtype) if need_dx else None
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            dyb = dy[lo * p:hi * p]
            self.gemm(self.im2col(x[lo:hi], kh, kw, stride, pad), dyb, out=gw, trans_a=True, beta=1.0)
            if dx is not None:
                dx[lo:hi] = self.conv_backward_input(dyb, w, (hi - lo, *x.shape[1:]), kh, kw, stride, pad)
        self.col_sum(dy, gb, beta=1.0)
        return dx

    def conv_backward_input(self, dy: Array, w: Array, x_shape: tuple[int, int, int, int], kh: int, kw: int,
                            stride: int, pad: int) -> Array:
        n, h, wd, c = x_shape
        oh, ow = pool_out(h, kh, stride, pad), pool_out(wd, kw, stride, pad)
        hp, wp = h + 2 * pad, wd + 2 * pad
        f = dy.shape[1]
        if stride == 1 and kh == kw and pad < kh and c >= _WIDE:
            # the input delta is a full correlation of dy with the kernel: a stride-1 convolution of dy, padded by
            # kh - 1 - pad, with the kernel flipped in both directions and its channel axes swapped
            flipped = np.ascontiguousarray(w.reshape(kh, kw, c, f)[::-1, ::-1].transpose(0, 1, 3, 2))
            return self._conv_rows(dy.reshape(n, oh, ow, f), flipped.reshape(kh * kw * f, c), kh,
                                   kh - 1 - pad).reshape(x_shape)
        if stride == 1:
            # the input delta is a full correlation of dy with the flipped kernel. Gather, for every position of
            # a padded input row, the kw dy pixels its kernel row sees (contiguous runs of kw*f); one GEMM sums
            # over (j, f) for each kernel row i at once; regrouped by i (whole pixels), kh adds of whole
            # shifted image rows sum over i
            dyp = np.zeros((n, oh, wp + kw - 1, f), dtype=dy.dtype)
            dyp[:, :, kw - 1:kw - 1 + ow] = dy.reshape(n, oh, ow, f)
            sn, so, sx, sf = dyp.strides
            rows = np.ascontiguousarray(as_strided(dyp, shape=(n, oh, wp, kw * f), strides=(sn, so, sx, sf)))
            # the flipped kernel as (j, f) x (i, c), zero columns up to a multiple of 16: BLAS kernels work on
            # whole SIMD-register-wide column blocks, and a ragged last block takes a slower edge path
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
