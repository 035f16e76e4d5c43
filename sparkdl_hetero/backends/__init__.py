"""Array backends behind the engine's seam: NumPy (default), OpenCL, CuPy.

``get_backend(name, **options)``:
- ``"numpy"``: ``reference`` (bool): True runs the plain reference code of :mod:`.array_module` without the
  NumPy fast paths, for debugging (default: ``$SPARKDL_NUMPY_REFERENCE`` set to 1/true/yes, else False);
- ``"opencl"``: ``platform``, ``device`` (indices), ``device_type`` (cpu, gpu, accelerator, all); without any,
  ``$SPARKDL_OPENCL_DEVICE`` ("P", "P:D" or a type), else the first device;
- ``"cupy"``: ``device`` (GPU id, default 0);
- ``"auto"``: ``gpu`` (a GPU id; None: ``$SPARKDL_GPU`` if set) and ``opencl`` (True: any device, or a device
  spec string as above; None: ``$SPARKDL_OPENCL_DEVICE`` if set; False: never): CuPy on that GPU if one is given
  and cupy works, else OpenCL if a device was asked for and is present, else NumPy. The environment variables let
  each worker machine of one job say what it has (docker/docker-compose.yml sets them).
Asking for ``"opencl"`` or ``"cupy"`` where it cannot run raises :class:`BackendUnavailable` (which backend,
why, how to install it); only ``"auto"`` falls back.
"""

from __future__ import annotations

import os

import numpy as np

from .array_module import ArrayModuleBackend
from .base import Backend
from .errors import BackendUnavailable
from .numpy_backend import NumpyBackend

__all__ = ["BACKENDS", "ArrayModuleBackend", "Backend", "BackendUnavailable", "NumpyBackend", "get_backend",
           "resolve_auto"]

BACKENDS = ("numpy", "opencl", "cupy", "auto")
ENV_GPU = "SPARKDL_GPU"
ENV_NUMPY_REFERENCE = "SPARKDL_NUMPY_REFERENCE"
_OPTIONS = {"numpy": {"reference"}, "opencl": {"platform", "device", "device_type"}, "cupy": {"device"},
            "auto": {"gpu", "opencl"}}


def get_backend(name: str | Backend = "numpy", **options: object) -> Backend:
    """The backend called ``name`` (see the module docstring); a :class:`Backend` instance is returned as it is."""
    if isinstance(name, Backend):
        return name
    if name not in _OPTIONS:
        raise ValueError(f"unknown backend {name!r}; expected one of: {', '.join(BACKENDS)}")
    unknown = set(options) - _OPTIONS[name]
    if unknown:
        raise ValueError(f"backend {name!r} takes the options {sorted(_OPTIONS[name]) or 'none'}; "
                         f"got {sorted(unknown)}")
    if name == "numpy":
        return _numpy(options.get("reference"))  # type: ignore[arg-type]
    if name == "opencl":
        from .opencl_backend import OpenCLBackend

        return OpenCLBackend(**options)  # type: ignore[arg-type]
    if name == "cupy":
        from .cupy_backend import CupyBackend

        return CupyBackend(**options)  # type: ignore[arg-type]
    return resolve_auto(**options)[0]  # type: ignore[arg-type]


def resolve_auto(gpu: int | str | None = None, opencl: bool | str | None = None) -> tuple[Backend, str]:
    """The ``"auto"`` choice and a one-line account of it (what was tried and why it was passed over)."""
    if gpu is None:
        gpu = os.environ.get(ENV_GPU) or None
    if opencl is None:
        from .opencl_backend import ENV_DEVICE

        opencl = os.environ.get(ENV_DEVICE) or None
    passed_over = []
    if gpu is not None:
        try:
            from .cupy_backend import CupyBackend

            be: Backend = CupyBackend(device=int(gpu))
            return be, _account(be, passed_over)
        except BackendUnavailable as exc:
            passed_over.append(f"cupy on GPU {gpu}: {exc.reason}")
    if opencl:
        try:
            from .opencl_backend import OpenCLBackend, parse_device_spec

            platform, device, device_type = (None, None, None) if opencl is True else parse_device_spec(str(opencl))
            be = OpenCLBackend(platform, device, device_type)
            return be, _account(be, passed_over)
        except (BackendUnavailable, ValueError) as exc:
            passed_over.append(f"opencl {opencl}: {exc.reason if isinstance(exc, BackendUnavailable) else exc}")
    be = _numpy()
    return be, _account(be, passed_over)


def _numpy(reference: bool | None = None) -> Backend:
    """The NumPy backend, or the reference array-module code over NumPy (``reference``; None: the environment)."""
    if reference is None:
        reference = os.environ.get(ENV_NUMPY_REFERENCE, "").strip().lower() in ("1", "true", "yes")
    return ArrayModuleBackend(np) if reference else NumpyBackend()


def _account(be: Backend, passed_over: list[str]) -> str:
    return be.describe() + (f" (passed over: {'; '.join(passed_over)})" if passed_over else "")
