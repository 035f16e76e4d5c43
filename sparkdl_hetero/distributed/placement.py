"""Which backend a Spark task computes on: the GPU Spark assigned to the task, the OpenCL device asked for,
or NumPy -- with a one-line description for the job log (which executor used what)."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

from pyspark import SparkContext
from pyspark.sql import SparkSession

from ..backends import Backend, BackendUnavailable, get_backend, resolve_auto


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
    be, account = backend_for(name, assigned_gpu(), **options)
    return be, f"{_where()}: {account}"


def _where() -> str:
    """``host pid N`` (and ``partition P`` inside a Spark task)."""
    from pyspark import TaskContext

    ctx = TaskContext.get()
    where = f"{socket.gethostname()} pid {os.getpid()}"
    return where if ctx is None else f"{where} partition {ctx.partitionId()}"


_PROBE_COLUMNS = ("status", "account", "reason", "fix")


def probe_executors(spark: SparkSession | SparkContext, name: str, num_tasks: int,
                    **options: object) -> list[str]:
    """Resolve the backend in ``num_tasks`` Spark tasks (one small DataFrame job, e.g. at fit start; works from a
    classic and a Spark Connect session) and return each task's account for the job log; a backend asked for by
    name that cannot run on an executor raises :class:`BackendUnavailable` on the driver, naming that executor.
    A classic SparkContext is accepted for callers that hold one."""
    import pyarrow as pa

    if isinstance(spark, SparkContext):
        spark = SparkSession(spark)

    def probe(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for _ in batches:
            pass
        try:
            row = ["ok", task_backend(name, **options)[1], "", ""]
        except BackendUnavailable as exc:
            row = ["unavailable", exc.backend, f"{exc.reason} (on {_where()})", exc.fix]
        yield pa.RecordBatch.from_arrays([pa.array([v]) for v in row], names=list(_PROBE_COLUMNS))

    schema = ", ".join(f"{c} string" for c in _PROBE_COLUMNS)
    results = spark.range(0, num_tasks, 1, num_tasks).mapInArrow(probe, schema).collect()
    for r in results:
        if r.status == "unavailable":
            raise BackendUnavailable(r.account, r.reason, r.fix)
    return [r.account for r in results]


def _gpu_index(address: str) -> int:
    try:
        return int(address)
    except ValueError:
        raise ValueError(f"Spark assigned GPU address {address!r}; expected a CUDA device index such as '0' "
                         "(check spark.worker.resource.gpu.discoveryScript)") from None
