"""Per-task backend choice on Spark executors: the GPU Spark assigns, auto fallbacks, the job-log description."""

from __future__ import annotations

import pytest

from sparkdl_hetero.backends import BackendUnavailable
from sparkdl_hetero.distributed.placement import backend_for, probe_executors, task_backend


def _has_cupy_gpu() -> bool:
    from sparkdl_hetero.backends.cupy_backend import load_cupy

    try:
        load_cupy(0)
    except BackendUnavailable:
        return False
    return True


def _has_opencl() -> bool:
    try:
        from sparkdl_hetero.backends.opencl_backend import list_devices
    except ImportError:
        return False
    return bool(list_devices())


def test_auto_with_an_assigned_gpu_falls_back_and_says_why():
    if _has_cupy_gpu():
        pytest.skip("a CUDA GPU is present: auto would use it")
    be, account = backend_for("auto", "0")
    assert be.name == "numpy"
    assert account.startswith("numpy (passed over: cupy on GPU 0: ") and account.endswith("[Spark assigned GPU 0]")
    if _has_opencl():
        be, account = backend_for("auto", "0", opencl=True)
        assert be.name == "opencl" and "passed over: cupy on GPU 0" in account


def test_explicit_cupy_uses_the_assigned_gpu_and_fails_clearly():
    if _has_cupy_gpu():
        pytest.skip("a CUDA GPU is present")
    with pytest.raises(BackendUnavailable, match="backend 'cupy' is not available"):
        backend_for("cupy", "0")


def test_bad_gpu_address():
    with pytest.raises(ValueError, match="Spark assigned GPU address 'gpu-a'; expected a CUDA device index"):
        backend_for("auto", "gpu-a")


def test_no_gpu_and_nothing_asked_is_numpy():
    be, account = backend_for("auto", None)
    assert (be.name, account) == ("numpy", "numpy")


def test_task_backend_inside_spark_tasks(spark):
    """Each task resolves its own backend and reports where it ran; no GPU is assigned under local[2]."""
    opencl = _has_opencl()

    def run(it):
        be, account = task_backend("auto", opencl=opencl)
        yield be.name, account

    rows = spark.sparkContext.parallelize(range(2), 2).mapPartitions(run).collect()
    assert len(rows) == 2
    for name, account in rows:
        assert name == ("opencl" if opencl else "numpy")
        assert " pid " in account and " partition " in account and f": {name}" in account
    outside_be, outside = task_backend("numpy")
    assert outside_be.name == "numpy" and " partition " not in outside


def test_probe_executors_logs_each_task_and_fails_clearly(spark):
    sc = spark.sparkContext
    accounts = probe_executors(sc, "numpy", 2)
    assert len(accounts) == 2 and all(a.endswith(": numpy") and " partition " in a for a in accounts)
    if _has_cupy_gpu():
        return
    with pytest.raises(BackendUnavailable, match=r"backend 'cupy' is not available: cannot import cupy .*"
                                                 r"\(on .* pid \d+ partition \d\)\. Install it with"):
        probe_executors(sc, "cupy", 2)


def test_fit_with_an_unavailable_backend_fails_before_training(spark):
    if _has_cupy_gpu():
        pytest.skip("a CUDA GPU is present")
    from sparkdl_hetero.distributed.config import TrainConfig
    from sparkdl_hetero.distributed.fit import fit
    from sparkdl_hetero.nn import FeedForwardTopology
    from sparkdl_hetero.nn.objective import Objective

    df = spark.createDataFrame([([0.0, 1.0], 0), ([1.0, 0.0], 1)], ["features", "label"])
    objective = Objective(FeedForwardTopology.multilayer_perceptron([2, 2]))
    with pytest.raises(BackendUnavailable, match=r"backend 'cupy' is not available: cannot import cupy .*\(on "):
        fit(df, "features", "label", objective, TrainConfig(backend="cupy", maxIter=1, verbose=False))
