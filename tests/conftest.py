"""One SparkSession for the whole test session (local[2]); BLAS kept to one thread per task."""

from __future__ import annotations

import os
import sys

import pytest

os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)

# test modules that start Spark themselves (spark-submit, a local-cluster driver in a subprocess)
_SPARK_MODULES = {"test_barrier_cluster", "test_speedup_job", "test_train_job"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tier the suite: every test that needs a JVM (the ``spark`` fixture, or a module that starts Spark itself)
    is marked ``spark``, so ``pytest -m "not spark"`` runs the engine, backend and transport tests alone."""
    for item in items:
        if "spark" in getattr(item, "fixturenames", ()) or item.module.__name__ in _SPARK_MODULES:
            item.add_marker(pytest.mark.spark)


@pytest.fixture(scope="session")
def spark():
    from pyspark.sql import SparkSession

    session = (
        SparkSession.builder.master("local[2]")
        .appName("sparkdl-hetero-tests")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "4")
        .config("spark.driver.memory", "2g")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.python.worker.reuse", "true")
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


@pytest.fixture(scope="session")
def spark_data_dir() -> str:
    """Spark's own example data (data/mllib) shipped inside the pyspark package."""
    import pyspark

    path = os.path.join(os.path.dirname(pyspark.__file__), "data", "mllib")
    if not os.path.isdir(path):
        pytest.fail(f"pyspark ships no data/mllib at {path}")
    return path
