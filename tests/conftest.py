"""One Spark application for the whole test session (local[2]), reached both as a classic SparkSession (`spark`)
and through Spark Connect (`connect`); BLAS kept to one thread per task."""

from __future__ import annotations

import os
import socket
import sys
import uuid

import pytest

os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
# the Connect server inside the test JVM and the Connect client of this process share this per-run secret
os.environ.setdefault("SPARK_CONNECT_AUTHENTICATE_TOKEN", uuid.uuid4().hex)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CONNECT_PORT = _free_port()

# test modules that start Spark themselves (spark-submit, a local-cluster driver in a subprocess)
_SPARK_MODULES = {"test_barrier_cluster", "test_speedup_job", "test_train_job"}
# fixtures that start (or pick) a Spark session
_SPARK_FIXTURES = {"spark", "connect", "session"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tier the suite: every test that needs a JVM (the ``spark`` or ``connect`` fixture, ``session`` -- either of
    them, by parameter --, or a module that starts Spark itself) is marked ``spark``, so ``pytest -m "not spark"``
    runs the engine, backend and transport tests alone."""
    for item in items:
        if _SPARK_FIXTURES & set(getattr(item, "fixturenames", ())) or item.module.__name__ in _SPARK_MODULES:
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
        # the same JVM serves Spark Connect clients (see the `connect` fixture) on a loopback port of this run
        .config("spark.plugins", "org.apache.spark.sql.connect.SparkConnectPlugin")
        .config("spark.connect.grpc.binding.address", "127.0.0.1")
        .config("spark.connect.grpc.binding.port", str(CONNECT_PORT))
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


@pytest.fixture(scope="session")
def _connect_session(spark):
    from pyspark.sql.connect.session import SparkSession as ConnectSession

    session = ConnectSession.builder.remote(f"sc://localhost:{CONNECT_PORT}").getOrCreate()
    yield session
    session.stop()


@pytest.fixture
def connect(_connect_session, monkeypatch):
    """A Spark Connect session on the test session's application, for tests that must pass in both session kinds.

    Findings that shape it (pyspark 4.3):

    - ``SparkSession.builder.remote("local[2]")`` does not start a separate server: it starts a classic
      SparkContext in this process with ``spark.plugins=...SparkConnectPlugin`` and connects to it, and it refuses
      (SESSION_ALREADY_EXIST) when a classic session already runs. So the classic ``spark`` fixture starts that
      plugin itself, on a free loopback port, and this fixture connects to it with a plain Connect client: one JVM
      and one ``local[2]`` application for both kinds, no second start-up.
    - The client must use ``sc://localhost`` (not 127.0.0.1): with an auth token pyspark only skips TLS for the
      host name ``localhost``. The token is this run's SPARK_CONNECT_AUTHENTICATE_TOKEN, read by both sides.
    - pyspark picks the classic or the Connect implementation of ``pyspark.sql.functions``, ``pyspark.ml``
      readers/writers and ``SparkSession.getActiveSession`` from the process-wide environment variable
      SPARK_CONNECT_MODE_ENABLED. It is therefore set for the duration of each test using this fixture only
      (function scope, over the session-scoped client), so classic tests in the same run are unaffected.
    """
    monkeypatch.setenv("SPARK_CONNECT_MODE_ENABLED", "1")
    return _connect_session


@pytest.fixture(scope="session")
def spark_data_dir() -> str:
    """Spark's own example data (data/mllib) shipped inside the pyspark package."""
    import pyspark

    path = os.path.join(os.path.dirname(pyspark.__file__), "data", "mllib")
    if not os.path.isdir(path):
        pytest.fail(f"pyspark ships no data/mllib at {path}")
    return path
