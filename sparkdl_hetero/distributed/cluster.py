"""What the cluster can run at once, from a classic or a Spark Connect session (no SparkContext needed).

Barrier stages need all their tasks at once; Spark does not fail a barrier stage that asks for more tasks than the
cluster has slots, it re-checks for minutes. :func:`check_barrier_slots` turns that into an error within seconds.

How the slots are known (``spark.conf`` is readable under Connect):

- ``local`` / ``local[N]`` / ``local[N,F]``: N (1 for ``local``); ``local[*]``: the driver's cores, read by one tiny
  job (its default parallelism), since under Connect the driver is not this process.
- ``local-cluster[N,C,M]``: N executors x C cores.
- other masters (standalone, YARN, Kubernetes): ``spark.executor.instances`` x ``spark.executor.cores``, else
  ``spark.cores.max`` (standalone), else the cores registered right now, read by one tiny job. The last one cannot
  know executors that have not registered yet, and Spark reports at least 2 there even on a one-core cluster.

Every count is divided by ``spark.task.cpus``. Dynamic allocation is reported as an error by
:func:`check_barrier_slots`, because Spark runs no barrier stage with it.

The jobs of a fit are grouped by a tag (:func:`tagged`): ``spark.interruptTag`` cancels them, in both session kinds.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pyspark.sql import SparkSession

_LOCAL = re.compile(r"local(?:\[(\*|\d+)(?:,\s*\d+)?\])?$")
_TAG_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")  # Spark refuses tags with commas; keep them plain
_LOCAL_CLUSTER = re.compile(r"local-cluster\[\s*(\d+)\s*,\s*(\d+)\s*,\s*\d+\s*\]$")


def _conf_int(spark: SparkSession, key: str) -> int | None:
    value = spark.conf.get(key, None)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"Spark conf {key} must be an integer, got {value!r}") from None


def _running_cores(spark: SparkSession) -> int:
    """The application's default parallelism (the cores registered now, at least 2 off local mode), from the
    number of partitions Spark gives a range without an explicit count: one small job, no RDD API."""
    from pyspark.sql import functions as F

    # max() of spark_partition_id() itself is refused (a non-deterministic aggregate argument): project it first
    row = spark.range(0, 1 << 16).select(F.spark_partition_id().alias("p")).agg(F.max("p").alias("p")).first()
    return int(row["p"]) + 1 if row is not None and row["p"] is not None else 1


def _executor_cores(spark: SparkSession) -> int:
    """Cores the cluster gives the application's tasks, before dividing by spark.task.cpus."""
    master = (spark.conf.get("spark.master", None) or "").strip()
    m = _LOCAL.match(master)
    if m:
        if m.group(1) is None:
            return 1
        return _running_cores(spark) if m.group(1) == "*" else int(m.group(1))
    m = _LOCAL_CLUSTER.match(master)
    if m:
        return int(m.group(1)) * int(m.group(2))
    instances = _conf_int(spark, "spark.executor.instances")
    cores = _conf_int(spark, "spark.executor.cores")
    if instances is not None and cores is not None:
        return instances * cores
    cores_max = _conf_int(spark, "spark.cores.max")
    if cores_max is not None:
        return cores_max
    return _running_cores(spark)


def _executor_cores_each(spark: SparkSession) -> int | None:
    """Cores of one executor (local-cluster's C, else spark.executor.cores), None when the conf does not say."""
    m = _LOCAL_CLUSTER.match((spark.conf.get("spark.master", None) or "").strip())
    return int(m.group(2)) if m else _conf_int(spark, "spark.executor.cores")


def _executor_gpus(spark: SparkSession) -> float:
    value = spark.conf.get("spark.executor.resource.gpu.amount", None)
    try:
        return float(value) if value else 0.0
    except ValueError:
        raise ValueError(f"Spark conf spark.executor.resource.gpu.amount must be a number, got {value!r}") from None


@dataclass(frozen=True)
class TrainingResources:
    """What each training task asks for (``profile``: a Spark ResourceProfile for the training stage only, None:
    Spark's default profile) and how many training tasks the cluster runs at once with it."""

    cpus: int
    gpus: int
    profile: Any
    slots: int


def training_resources(spark: SparkSession, backend: str, task_gpus: int, task_cpus: int) -> TrainingResources:
    """The resources of the training stage: ``task_gpus`` GPUs (-1: one when the backend computes on GPUs -- cupy,
    or auto on executors with GPUs -- else none) and ``task_cpus`` CPUs (0: spark.task.cpus, or with GPUs the
    executor's cores shared among the tasks its GPUs admit), as a ResourceProfile when they differ from Spark's
    default profile, so the stages before training keep every CPU and never hold a GPU (xgboost's design). A
    ValueError when the cluster cannot give them, naming the conf to change."""
    default_cpus = _conf_int(spark, "spark.task.cpus") or 1
    executor_gpus = _executor_gpus(spark)
    gpus = task_gpus if task_gpus >= 0 else int(executor_gpus >= 1 and backend in ("cupy", "auto"))
    if gpus > executor_gpus:
        raise ValueError(f"taskGpus={gpus} but each executor has spark.executor.resource.gpu.amount="
                         f"{executor_gpus:g}: set taskGpus <= {int(executor_gpus)} (0: no GPUs), or give the "
                         f"executors GPUs (spark.executor.resource.gpu.amount and a discovery script)")
    cores = _executor_cores_each(spark)
    per_executor = int(executor_gpus // gpus) if gpus else None  # training tasks an executor's GPUs admit
    cpus = task_cpus or (max(1, cores // per_executor) if gpus and cores and per_executor else default_cpus)
    if cores is not None and cpus > cores:
        raise ValueError(f"taskCpus={cpus} but each executor has {cores} cores: set taskCpus <= {cores}")
    slots = _executor_cores(spark) // cpus
    if per_executor is not None and cores:
        slots = min(slots, _executor_cores(spark) // cores * per_executor)
    if gpus == 0 and cpus == default_cpus:
        return TrainingResources(cpus, 0, None, task_slots(spark))
    master = (spark.conf.get("spark.master", None) or "").strip()
    if _LOCAL.match(master):
        raise ValueError(f"taskGpus={task_gpus}, taskCpus={task_cpus} ask for a ResourceProfile of the training "
                         f"stage, which Spark does not schedule in local mode ({master}): leave them at their "
                         f"defaults, or run on a cluster")
    from pyspark.resource import ResourceProfileBuilder, TaskResourceRequests

    requests = TaskResourceRequests().cpus(cpus)
    if gpus:
        requests = requests.resource("gpu", float(gpus))
    return TrainingResources(cpus, gpus, ResourceProfileBuilder().require(requests).build, max(slots, 0))


def is_connect(spark: SparkSession) -> bool:
    """Whether ``spark`` is a Spark Connect session (no SparkContext, RDD API or JVM gateway in this process)."""
    return type(spark).__module__.startswith("pyspark.sql.connect")


def task_slots(spark: SparkSession) -> int:
    """The number of tasks the cluster can run at once: executors x cores / spark.task.cpus."""
    task_cpus = _conf_int(spark, "spark.task.cpus") or 1
    return _executor_cores(spark) // task_cpus


def check_barrier_slots(spark: SparkSession, num_workers: int | None,
                        resources: TrainingResources | None = None) -> int:
    """The worker count for a stage that needs all its tasks at once: ``num_workers``, or the cluster's task slots
    (for tasks of ``resources`` when they have their own profile) when it is None or 0; a ValueError naming both
    numbers and what to change when the cluster cannot run them."""
    if (spark.conf.get("spark.dynamicAllocation.enabled", "false") or "false").lower() == "true":
        raise ValueError("barrier training needs all its tasks at once, which Spark does not run with dynamic "
                         "allocation: set spark.dynamicAllocation.enabled=false")
    own = resources is not None and resources.profile is not None
    slots = resources.slots if own else task_slots(spark)
    how = (f"its executors' cores and GPUs for tasks of taskCpus={resources.cpus}, taskGpus={resources.gpus}"
           if own else "executors x cores / spark.task.cpus")
    if slots < 1:
        raise ValueError(f"the cluster has no task slot for a barrier stage: spark.master "
                         f"{spark.conf.get('spark.master', None)!r} with {how}; give executors at least that many "
                         f"cores (and GPUs)")
    if not num_workers:
        return slots
    if num_workers < 0:
        raise ValueError(f"numWorkers must be positive, got {num_workers}")
    if num_workers > slots:
        raise ValueError(f"numWorkers={num_workers} but the cluster runs only {slots} tasks at once ({how}), and "
                         f"barrier training needs all its workers at once: set numWorkers <= {slots}, or give the "
                         f"application more executors or cores")
    return num_workers


def fit_tag(fit_id: str) -> str:
    """The Spark job tag of the fit ``fit_id``'s jobs (every mode's; ``spark.interruptTag`` cancels them)."""
    return f"sparkdl-hetero-fit-{fit_id[:8]}"


@contextmanager
def tagged(spark: SparkSession, tag: str, label: str = "") -> Iterator[None]:
    """Tag every Spark job this thread starts inside the block with ``tag`` and, when given, ``tag-label`` (what the
    job does, for the UI), in a classic and a Connect session alike; an interrupt of the driver (Ctrl-C) cancels the
    tagged jobs still running instead of leaving them to run on."""
    tags = [tag] + ([f"{tag}-{_TAG_UNSAFE.sub('-', label)}"] if label else [])
    for t in tags:
        spark.addTag(t)
    try:
        yield
    except KeyboardInterrupt:
        spark.interruptTag(tag)
        raise
    finally:
        for t in tags:
            spark.removeTag(t)
