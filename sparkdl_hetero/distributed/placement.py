"""Which backend a Spark task computes on: the GPU Spark assigned to the task, the OpenCL device asked for,
or NumPy -- with a one-line description for the job log (which executor used what)."""

from __future__ import annotations

import os
import socket

from ..backends import Backend, get_backend, resolve_auto


def assigned_gpu() -> str | None:
    """The first GPU address Spark assigned to the running task (``TaskContext.resources()["gpu"]``), if any."""
    from pyspark import TaskContext

    ctx = TaskContext.get()
    if ctx is None:
        return None
    gpu = ctx.resources().get("gpu")
    return gpu.addresses[0] if gpu is not None and gpu.addresses else None


def backend_for(name: str | Backend, gpu: str | None, **options: object) -> tuple[Backend, str]:
    """Resolve ``name`` given the task's GPU address ``gpu`` (None: none assigned).

    ``"auto"``: CuPy on that GPU if cupy works, else OpenCL if ``opencl=`` asks for a device and it is present,
    else NumPy. ``"cupy"``: the assigned GPU, else ``device=`` (default 0). Others: :func:`get_backend`.
    """
    if isinstance(name, Backend):
        return name, name.describe()
    note = f" [Spark assigned GPU {gpu}]" if gpu is not None else ""
    if name == "auto":
        opts = dict(options)
        if gpu is not None:
            opts["gpu"] = _gpu_index(gpu)
        be, account = resolve_auto(**opts)  # type: ignore[arg-type]
        return be, account + note
    if name == "cupy" and gpu is not None:
        options = {**options, "device": _gpu_index(gpu)}
    be = get_backend(name, **options)
    return be, be.describe() + note


def task_backend(name: str | Backend, **options: object) -> tuple[Backend, str]:
    """The backend for the running Spark task (call it on executors) and ``"host pid N partition P: ..."``."""
    from pyspark import TaskContext

    be, account = backend_for(name, assigned_gpu(), **options)
    ctx = TaskContext.get()
    where = f"{socket.gethostname()} pid {os.getpid()}"
    if ctx is not None:
        where += f" partition {ctx.partitionId()}"
    return be, f"{where}: {account}"


def _gpu_index(address: str) -> int:
    try:
        return int(address)
    except ValueError:
        raise ValueError(f"Spark assigned GPU address {address!r}; expected a CUDA device index such as '0' "
                         "(check spark.worker.resource.gpu.discoveryScript)") from None
