"""Array backends behind the engine's seam: NumPy (default), OpenCL, CuPy."""

from __future__ import annotations

from .base import Backend
from .numpy_backend import NumpyBackend

__all__ = ["Backend", "NumpyBackend", "get_backend"]


def get_backend(name: str | Backend = "numpy", **options: object) -> Backend:
    """The backend called ``name``; a :class:`Backend` instance is returned as it is."""
    if isinstance(name, Backend):
        return name
    if name == "numpy":
        return NumpyBackend()
    raise ValueError(f"unknown backend {name!r}; expected one of: numpy")
