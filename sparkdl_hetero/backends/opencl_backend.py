"""OpenCL backend: pyopencl arrays on one device, GEMM through CLBlast, every other op in kernels/opencl_ops.cl.

Device arrays are ``pyopencl.array.Array``. The engine's weight and gradient views are slices of one flat
vector, i.e. arrays at an offset inside a shared buffer: every launch passes (buffer, element offset) pairs
(pyclblast ignores an array's own offset, so GEMM passes the offsets explicitly). One context, in-order queue
and memory pool per device and one compiled program per (context, element type) are cached for the process.
Not thread-safe: one backend is used by one thread at a time (one Spark task per Python worker).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .activations import activation as _activation
from .base import Array
from .errors import BackendUnavailable
from .kernel_source import check_launch_size, kernel_source
from .numpy_backend import NumpyBackend
from .shared_kernels import ConvPoolKernels

try:
    import pyclblast
    import pyopencl as cl
    import pyopencl.array as cla
    import pyopencl.tools as cltools
except ImportError as _exc:  # pragma: no cover - exercised where pyopencl is not installed
    _IMPORT_ERROR: ImportError | None = _exc
else:
    _IMPORT_ERROR = None

ENV_DEVICE = "SPARKDL_OPENCL_DEVICE"
_INSTALL = ("Install it with: pip install 'sparkdl-hetero[opencl]' plus an OpenCL runtime and CLBlast "
            "(Debian: apt-get install pocl-opencl-icd ocl-icd-opencl-dev libclblast-dev)")
_DEVICE_TYPES = {"cpu": "CPU", "gpu": "GPU", "accelerator": "ACCELERATOR", "all": "ALL"}
_SUM_PARTS = 256  # partial sums per reduction; the host adds them in float64
_HOST = NumpyBackend()


def _require() -> None:
    if _IMPORT_ERROR is not None:
        raise BackendUnavailable("opencl", f"cannot import pyopencl/pyclblast ({_IMPORT_ERROR})", _INSTALL)


def list_devices() -> list[tuple[int, int, str, str]]:
    """Every OpenCL device as ``(platform index, device index, device type, "device (platform)")``; empty when
    pyopencl is missing or no platform is installed."""
    if _IMPORT_ERROR is not None:
        return []
    try:
        platforms = cl.get_platforms()
    except cl.Error:
        return []
    return [(p, d, _type_name(dev), f"{dev.name.strip()} ({plat.name.strip()})")
            for p, plat in enumerate(platforms) for d, dev in enumerate(plat.get_devices())]


def _type_name(dev: Any) -> str:
    for name in ("gpu", "accelerator", "cpu"):
        if dev.type & getattr(cl.device_type, _DEVICE_TYPES[name]):
            return name
    return "other"


def parse_device_spec(spec: str) -> tuple[int | None, int | None, str | None]:
    """``"P"``, ``"P:D"`` (platform and device indices) or a device type (cpu, gpu, accelerator, all)."""
    s = spec.strip().lower()
    if s in _DEVICE_TYPES:
        return None, None, s
    parts = s.split(":")
    if len(parts) <= 2 and all(p.isdigit() for p in parts):
        return int(parts[0]), int(parts[1]) if len(parts) == 2 else None, None
    raise ValueError(f"{ENV_DEVICE}={spec!r}: expected 'P', 'P:D' (platform/device indices) or one of "
                     f"{', '.join(_DEVICE_TYPES)}")


def select_device(platform: int | None = None, device: int | None = None, device_type: str | None = None) -> Any:
    """The OpenCL device chosen by indices and/or type; without any, by ``$SPARKDL_OPENCL_DEVICE``, else the
    first device of the first platform."""
    _require()
    if platform is None and device is None and device_type is None and os.environ.get(ENV_DEVICE):
        platform, device, device_type = parse_device_spec(os.environ[ENV_DEVICE])
    try:
        platforms = cl.get_platforms()
    except cl.Error as exc:
        raise BackendUnavailable("opencl", f"no OpenCL platform is installed ({exc})", _INSTALL) from exc
    if not platforms:
        raise BackendUnavailable("opencl", "no OpenCL platform is installed", _INSTALL)
    if platform is not None and not 0 <= platform < len(platforms):
        raise ValueError(f"OpenCL platform {platform} does not exist; platforms: "
                         f"{[f'{i}: {p.name.strip()}' for i, p in enumerate(platforms)]}")
    if device_type is not None and device_type.lower() not in _DEVICE_TYPES:
        raise ValueError(f"unknown OpenCL device type {device_type!r}; expected one of {', '.join(_DEVICE_TYPES)}")
    want = getattr(cl.device_type, _DEVICE_TYPES[device_type.lower()]) if device_type else cl.device_type.ALL
    candidates = [dev for p in ([platforms[platform]] if platform is not None else platforms)
                  for dev in p.get_devices() if dev.type & want]
    if not candidates:
        raise BackendUnavailable("opencl", f"no OpenCL device of type {device_type!r} (devices: "
                                 f"{[name for *_, name in list_devices()]})", _INSTALL)
    if device is None:
        return candidates[0]
    if not 0 <= device < len(candidates):
        raise ValueError(f"OpenCL device {device} does not exist; devices: "
                         f"{[f'{i}: {d.name.strip()}' for i, d in enumerate(candidates)]}")
    return candidates[device]


@dataclass
class _DeviceState:
    """What is built once per device for the whole process."""

    device: Any
    context: Any
    queue: Any
    allocator: Any
    kernels: dict[str, dict[str, Any]] = field(default_factory=dict)  # dtype name -> kernel name -> cl.Kernel


_STATES: dict[int, _DeviceState] = {}


def _state(device: Any) -> _DeviceState:
    st = _STATES.get(device.int_ptr)
    if st is None:
        ctx = cl.Context([device])
        queue = cl.CommandQueue(ctx)
        st = _DeviceState(device, ctx, queue, cltools.MemoryPool(cltools.ImmediateAllocator(queue)))
        _STATES[device.int_ptr] = st
    return st


def _supports_fp64(device: Any) -> bool:
    return bool(device.double_fp_config) or "cl_khr_fp64" in device.extensions


class OpenCLBackend(ConvPoolKernels):
    """Every op on one OpenCL device (float32; float64 when the device has fp64). softmax_xent, convolution and
    pooling come from :class:`ConvPoolKernels`."""

    name = "opencl"

    def __init__(self, platform: int | None = None, device: int | None = None,
                 device_type: str | None = None) -> None:
        self.device = select_device(platform, device, device_type)
        st = _state(self.device)
        self.context, self.queue, self._alloc, self._kernels = st.context, st.queue, st.allocator, st.kernels
        self.fp64 = _supports_fp64(self.device)

    def describe(self) -> str:
        return f"opencl: {self.device.name.strip()} ({self.device.platform.name.strip()})"

    # ---- launching -------------------------------------------------------------------------------------
    def program(self, dtype: np.dtype) -> dict[str, Any]:
        """The kernels compiled for ``dtype`` on this context (built on first use)."""
        dtype = np.dtype(dtype)
        ks = self._kernels.get(dtype.name)
        if ks is None:
            if dtype == np.float64 and not self.fp64:
                raise ValueError(f"the OpenCL device {self.device.name.strip()} has no float64 support; "
                                 "use dtype float32")
            if dtype not in (np.float32, np.float64):
                raise ValueError(f"the OpenCL backend computes in float32 or float64, not {dtype}")
            real = "double" if dtype == np.float64 else "float"
            prg = cl.Program(self.context, kernel_source("opencl_ops.cl")).build(options=[f"-DREAL={real}"])
            ks = {k.function_name: k for k in prg.all_kernels()}
            self._kernels[dtype.name] = ks
        return ks

    def launch(self, kernel: str, dtype: Any, count: int, *args: Any) -> None:
        """Run ``kernel`` of kernels/opencl_ops.cl built for ``dtype`` over ``count`` work items. ``args`` follow
        the kernel's parameters after ``count``: device arrays (passed as buffer + element offset, see
        kernels/portable.h) and NumPy scalars of the parameters' exact types."""
        if count <= 0:
            return
        check_launch_size(kernel, count, [a.size for a in args if isinstance(a, cla.Array)])
        flat: list[Any] = [np.int64(count)]
        for a in args:
            if isinstance(a, cla.Array):
                flat += [a.base_data, np.int64(a.offset // a.dtype.itemsize)]
            else:
                flat.append(a)
        self.program(dtype)[kernel](self.queue, (count,), None, *flat)

    def _check(self, a: Array, what: str) -> Array:
        if not isinstance(a, cla.Array):
            raise TypeError(f"{what} must be a pyopencl array of this backend, got {type(a).__name__}")
        if not a.flags.c_contiguous:
            raise ValueError(f"{what} must be contiguous (shape {a.shape}, strides {a.strides})")
        return a

    _kernel_input = _check  # ConvPoolKernels' hook: arrays are checked, never copied

    def _empty(self, shape: tuple[int, ...], dtype: Any) -> Array:
        return cla.empty(self.queue, tuple(int(s) for s in shape), np.dtype(dtype), allocator=self._alloc)

    # ---- memory ----------------------------------------------------------------------------------------
    def asarray(self, host: np.ndarray, dtype: Any = None) -> Array:
        h = np.ascontiguousarray(host, dtype=dtype)
        out = self._empty(h.shape, h.dtype)
        if h.size:
            cl.enqueue_copy(self.queue, out.base_data, h, dst_offset=out.offset)
        return out

    def to_host(self, a: Array) -> np.ndarray:
        out = np.empty(a.shape, dtype=a.dtype)
        if a.size:
            cl.enqueue_copy(self.queue, out, self._check(a, "to_host").base_data, src_offset=a.offset)
        return out

    def zeros(self, shape: tuple[int, ...], dtype: Any) -> Array:
        out = self._empty(shape, dtype)
        self.fill(out, 0.0)
        return out

    def copy_into(self, dst: Array, src: Array | np.ndarray) -> None:
        self._check(dst, "copy_into destination")
        self._same_size(dst, src, "copy_into")
        if isinstance(src, cla.Array) and src.dtype == dst.dtype:
            if dst.size:
                cl.enqueue_copy(self.queue, dst.base_data, self._check(src, "copy_into source").base_data,
                                byte_count=dst.nbytes, src_offset=src.offset, dst_offset=dst.offset)
            return
        h = self.to_host(src) if isinstance(src, cla.Array) else src
        h = np.ascontiguousarray(h, dtype=dst.dtype)
        if dst.size:
            cl.enqueue_copy(self.queue, dst.base_data, h, dst_offset=dst.offset)

    def fill(self, a: Array, value: float) -> None:
        self.launch("fill", a.dtype, self._check(a, "fill").size, a, a.dtype.type(value))

    # ---- linear algebra --------------------------------------------------------------------------------
    def gemm(self, a: Array, b: Array, out: Array | None = None, trans_a: bool = False,
             trans_b: bool = False, alpha: float = 1.0, beta: float = 0.0) -> Array:
        self._check(a, "gemm a")
        self._check(b, "gemm b")
        if a.ndim != 2 or b.ndim != 2:
            raise ValueError(f"gemm needs matrices, got shapes {a.shape} and {b.shape}")
        m, k = a.shape[::-1] if trans_a else a.shape
        kb, n = b.shape[::-1] if trans_b else b.shape
        if k != kb:
            raise ValueError(f"gemm: inner sizes differ: op(a) is {m}x{k}, op(b) is {kb}x{n}")
        if out is None:
            out, beta = self._empty((m, n), a.dtype), 0.0
        elif tuple(self._check(out, "gemm out").shape) != (m, n):
            raise ValueError(f"gemm: out has shape {out.shape}, expected {(m, n)}")
        if not a.dtype == b.dtype == out.dtype:
            raise ValueError(f"gemm: dtypes differ ({a.dtype}, {b.dtype}, {out.dtype})")
        if m == 0 or n == 0:
            return out
        if k == 0:  # an empty sum: out = beta * out
            if beta == 0.0:
                self.fill(out, 0.0)
            else:
                self.launch("axpy", out.dtype, out.size, out, out, out.dtype.type(beta - 1.0))
            return out
        isz = a.dtype.itemsize
        pyclblast.gemm(self.queue, m, n, k, a, b, out, a_ld=a.shape[1], b_ld=b.shape[1], c_ld=n,
                       alpha=alpha, beta=beta, a_transp=trans_a, b_transp=trans_b,
                       a_offset=a.offset // isz, b_offset=b.offset // isz, c_offset=out.offset // isz)
        return out

    def add_row(self, y: Array, b: Array) -> None:
        self._check(y, "add_row y")
        if y.ndim != 2 or b.size != y.shape[1]:
            raise ValueError(f"add_row: y {y.shape} needs a row of {y.shape[-1]} values, got {b.shape}")
        self.launch("add_row", y.dtype, y.size, y, self._check(b, "add_row b"), np.int32(y.shape[1]))

    def col_sum(self, x: Array, out: Array, alpha: float = 1.0, beta: float = 0.0) -> None:
        self._check(x, "col_sum x")
        self._check(out, "col_sum out")
        rows, cols = x.shape
        if out.size != cols:
            raise ValueError(f"col_sum: out has {out.size} values for {cols} columns")
        # enough partial sums to keep the device busy, each over a contiguous run of rows
        chunks = max(1, min(rows, 4096 // max(cols, 1)))
        chunk_rows = max(1, math.ceil(rows / chunks))
        chunks = max(1, math.ceil(rows / chunk_rows))
        partial = self._empty((chunks, cols), x.dtype)
        if rows == 0:
            self.fill(partial, 0.0)
        self.launch("col_sum_partial", x.dtype, chunks * cols if rows else 0, partial, x, np.int64(rows),
                  np.int32(cols), np.int64(chunk_rows))
        t = x.dtype.type
        self.launch("col_sum_final", x.dtype, cols, out, partial, np.int32(chunks), t(alpha), t(beta))

    def axpy(self, y: Array, x: Array, alpha: float) -> None:
        self._same_size(y, x, "axpy")
        self.launch("axpy", y.dtype, self._check(y, "axpy y").size, y, self._check(x, "axpy x"), y.dtype.type(alpha))

    def mul(self, a: Array, b: Array) -> Array:
        self._same_size(a, b, "mul")
        out = self._empty(a.shape, a.dtype)
        self.launch("mul", a.dtype, a.size, out, self._check(a, "mul a"), self._check(b, "mul b"))
        return out

    def add(self, a: Array, b: Array) -> Array:
        self._same_size(a, b, "add")
        out = self._empty(a.shape, a.dtype)
        self.launch("add", a.dtype, a.size, out, self._check(a, "add a"), self._check(b, "add b"))
        return out

    def sum(self, a: Array) -> float:
        n = self._check(a, "sum").size
        if n == 0:
            return 0.0
        chunk = math.ceil(n / min(n, _SUM_PARTS))
        parts = math.ceil(n / chunk)
        partial = self._empty((parts,), a.dtype)
        self.launch("sum_partial", a.dtype, parts, partial, a, np.int64(n), np.int64(chunk))
        return float(self.to_host(partial).sum(dtype=np.float64))

    # ---- activations and losses ------------------------------------------------------------------------
    @staticmethod
    def _act_code(kind: str) -> np.int32:
        return np.int32(_activation(kind).code)  # the kernels' ACT_* value

    def activation(self, kind: str, x: Array, alpha: float = 0.01) -> Array:
        code = self._act_code(kind)
        y = self._empty(x.shape, x.dtype)
        self.launch("activation", x.dtype, self._check(x, "activation x").size, y, x, code, x.dtype.type(alpha))
        return y

    def activation_backward(self, kind: str, y: Array, delta: Array, alpha: float = 0.01) -> Array:
        code = self._act_code(kind)
        self._same_size(y, delta, "activation_backward")
        dx = self._empty(delta.shape, delta.dtype)
        self.launch("activation_backward", delta.dtype, delta.size, dx, self._check(y, "activation_backward y"),
                  self._check(delta, "activation_backward delta"), code, delta.dtype.type(alpha))
        return dx

    def softmax(self, z: Array) -> Array:
        rows, cols = self._check(z, "softmax z").shape
        out = self._empty(z.shape, z.dtype)
        self.launch("softmax", z.dtype, rows, out, z, np.int32(cols))
        return out

    def sigmoid_sq(self, z: Array, target: Array, scale: float,
                   weight: Array | None = None) -> tuple[float, Array]:
        self._same_size(z, target, "sigmoid_sq targets")
        sq, delta = self._empty(z.shape, z.dtype), self._empty(z.shape, z.dtype)
        self.launch("sigmoid_sq", z.dtype, self._check(z, "sigmoid_sq z").size, sq, delta, z,
                  self._check(target, "sigmoid_sq targets"), z.dtype.type(scale))
        if weight is None:
            return 0.5 * self.sum(sq), delta
        if weight.size != z.shape[0]:
            raise ValueError(f"sigmoid_sq weights: one per row expected ({z.shape[0]}), got {weight.shape}")
        return 0.5 * self.sum(self.scale_rows(sq, weight)), self.scale_rows(delta, weight)

    def row_rmse(self, a: Array, b: Array, scale: float) -> tuple[float, Array]:
        rows, cols = self._check(a, "row_rmse a").shape
        self._same_size(a, b, "row_rmse")
        r, delta = self._empty((rows,), a.dtype), self._empty(a.shape, a.dtype)
        self.launch("row_rmse", a.dtype, rows, r, delta, a, self._check(b, "row_rmse b"), np.int32(cols),
                  a.dtype.type(scale))
        return self.sum(r), delta

    # ---- batch normalization ---------------------------------------------------------------------------
    # On the host (NumPy's code, so both backends compute the same statistics): a per-channel reduction and a
    # broadcast per layer, whose transfers cost less than a network's convolutions; results return to the device
    def batchnorm_forward(self, x: Array, gamma: Array, beta: Array, mean: Array, var: Array, eps: float,
                          momentum: float, training: bool) -> tuple[Array, Array, Array]:
        h_mean, h_var = self.to_host(mean), self.to_host(var)
        y, mu, inv_std = _HOST.batchnorm_forward(self.to_host(x), self.to_host(gamma), self.to_host(beta), h_mean,
                                                 h_var, eps, momentum, training)
        if training:
            self.copy_into(mean, h_mean)
            self.copy_into(var, h_var)
        return self.asarray(y), self.asarray(mu), self.asarray(inv_std)

    def batchnorm_backward(self, dy: Array, x: Array, gamma: Array, mu: Array, inv_std: Array, dgamma: Array,
                           dbeta: Array, training: bool, need_dx: bool) -> Array | None:
        h_dgamma, h_dbeta = self.to_host(dgamma), self.to_host(dbeta)
        dx = _HOST.batchnorm_backward(self.to_host(dy), self.to_host(x), self.to_host(gamma), self.to_host(mu),
                                      self.to_host(inv_std), h_dgamma, h_dbeta, training, need_dx)
        self.copy_into(dgamma, h_dgamma)
        self.copy_into(dbeta, h_dbeta)
        return None if dx is None else self.asarray(dx)

    # ---- dropout ---------------------------------------------------------------------------------------
    def dropout_mask(self, shape: tuple[int, ...], keep: float, rng: np.random.Generator, dtype: Any) -> Array:
        # drawn on the host from the model's generator, so every backend drops the same units for one seed
        return self.asarray(_HOST.dropout_mask(shape, keep, rng, dtype))
