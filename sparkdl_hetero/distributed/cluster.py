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

    row = spark.range(0, 1 << 16).select(F.max(F.spark_partition_id()).alias("p")).first()
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


def is_connect(spark: SparkSession) -> bool:
    """Whether ``spark`` is a Spark Connect session (no SparkContext, RDD API or JVM gateway in this process)."""
    return type(spark).__module__.startswith("pyspark.sql.connect")


def task_slots(spark: SparkSession) -> int:
    """The number of tasks the cluster can run at once: executors x cores / spark.task.cpus."""
    task_cpus = _conf_int(spark, "spark.task.cpus") or 1
    return _executor_cores(spark) // task_cpus


def check_barrier_slots(spark: SparkSession, num_workers: int | None) -> int:
    """The worker count for a stage that needs all its tasks at once: ``num_workers``, or the cluster's task slots
    when it is None or 0; a ValueError naming both numbers and what to change when the cluster cannot run them."""
    if (spark.conf.get("spark.dynamicAllocation.enabled", "false") or "false").lower() == "true":
        raise ValueError("barrier training needs all its tasks at once, which Spark does not run with dynamic "
                         "allocation: set spark.dynamicAllocation.enabled=false")
    slots = task_slots(spark)
    if slots < 1:
        raise ValueError(f"the cluster has no task slot for a barrier stage: spark.master "
                         f"{spark.conf.get('spark.master', None)!r} with spark.task.cpus="
                         f"{spark.conf.get('spark.task.cpus', '1')}; give executors at least that many cores")
    if not num_workers:
        return slots
    if num_workers < 0:
        raise ValueError(f"numWorkers must be positive, got {num_workers}")
    if num_workers > slots:
        raise ValueError(f"numWorkers={num_workers} but the cluster runs only {slots} tasks at once (executors x "
                         f"cores / spark.task.cpus), and barrier training needs all its workers at once: set "
                         f"numWorkers <= {slots}, or give the application more executors or cores")
    return num_workers


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
