"""A real standalone cluster on loopback (a Master and two Workers from the venv's pyspark): an executor is killed
in the middle of a fit, in barrier and in treeAggregate mode. The fit must complete (Spark replaces the executor,
training resumes from the checkpoint) with the expected iterations and a model that works -- never hang, never
return a wrong model, never give up.

The driver runs in a subprocess (this file run as a script): the test session already owns a local SparkContext.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spark_class() -> str:
    import pyspark

    return os.path.join(os.path.dirname(pyspark.__file__), "bin", "spark-class")


def _wait_port(port: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


@pytest.fixture(scope="module")
def standalone(tmp_path_factory):  # noqa: ANN201
    """spark://127.0.0.1:PORT with two 1-core workers; stopped (by process id) afterwards."""
    work = tmp_path_factory.mktemp("standalone")
    env = dict(os.environ, SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=sys.executable,
               SPARK_LOG_DIR=str(work), SPARK_WORKER_DIR=str(work / "work"))
    port = _free_port()
    procs: list[subprocess.Popen] = []
    logs = []

    def start(args: list[str], name: str) -> None:
        log = open(work / f"{name}.log", "w")  # noqa: SIM115 - closed at teardown
        logs.append(log)
        procs.append(subprocess.Popen([_spark_class(), *args], env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))

    start(["org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port", str(port),
           "--webui-port", str(_free_port())], "master")
    try:
        _wait_port(port, time.monotonic() + 60)
        for i in range(2):
            start(["org.apache.spark.deploy.worker.Worker", f"spark://127.0.0.1:{port}", "--host", "127.0.0.1",
                   "--cores", "1", "--memory", "1g", "--webui-port", str(_free_port()),
                   "--work-dir", str(work / f"work{i}")], f"worker{i}")
        yield f"spark://127.0.0.1:{port}", work
    finally:
        for p in reversed(procs):
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        for log in logs:
            log.close()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["barrier", "treeAggregate"])
def test_killing_an_executor_mid_fit(standalone, mode: str, tmp_path) -> None:  # noqa: ANN001
    master, _ = standalone
    out = tmp_path / "result.json"
    cmd = [sys.executable, os.path.abspath(__file__), master, mode, str(tmp_path / "ckpt"), str(out)]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=420,
                              env=dict(os.environ, SPARK_LOCAL_IP="127.0.0.1"))
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the fit hung after an executor was killed ({mode}): {str(e.stderr)[-3000:]}")
    assert out.exists(), proc.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["killed"], res  # an executor was really killed mid-fit
    # the standalone master replaces the lost executor and the fit resumes from its checkpoint: it completes
    assert res["ok"], res
    assert res["iterations"] == res["expected_iterations"], res
    assert res["accuracy"] > 0.9, res  # not a silently wrong model


# ---- the driver (run in a subprocess) ----------------------------------------------------------------------
def _kill_one_executor(app_id: str) -> int | None:
    """SIGKILL one executor JVM of this application (found by its app id in /proc); its pid."""
    for pid in sorted(os.listdir("/proc")):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
        except OSError:
            continue
        if b"org.apache.spark.executor.CoarseGrainedExecutorBackend" in cmd and app_id.encode() in cmd:
            os.kill(int(pid), signal.SIGKILL)
            return int(pid)
    return None


def _driver(master: str, mode: str, ckpt: str, out: str) -> None:
    import threading

    from pyspark.ml.linalg import Vectors
    from pyspark.sql import SparkSession

    sys.path.insert(0, HERE)
    from test_barrier import blobs, objective  # noqa: PLC0415

    from sparkdl_hetero.distributed.config import TrainConfig
    from sparkdl_hetero.distributed.fit import fit
    from sparkdl_hetero.nn.model import FeedForwardModel

    spark = (SparkSession.builder.master(master).appName(f"kill-executor-{mode}")
             .config("spark.ui.enabled", "false").config("spark.executor.memory", "768m")
             .config("spark.driver.host", "127.0.0.1").config("spark.task.maxFailures", "4")
             .config("spark.sql.shuffle.partitions", "2").getOrCreate())
    sc = spark.sparkContext
    sc.setLogLevel("ERROR")
    deadline = time.monotonic() + 90
    while sc._jsc.sc().getExecutorMemoryStatus().size() < 3 and time.monotonic() < deadline:  # 2 + the driver
        time.sleep(0.5)
    x, y = blobs(2000, seed=5)
    df = spark.createDataFrame([(Vectors.dense(a.astype(float)), float(b)) for a, b in zip(x, y, strict=True)],
                               ["features", "label"]).repartition(2)
    obj = objective()
    if mode == "barrier":
        cfg = TrainConfig(mode="barrier", solver="adam", epochs=10, batchSize=32, stepSize=0.01,
                          straggler={0: 4.0, 1: 4.0}, checkpointDir=ckpt, checkpointInterval=50,
                          commTimeout=30.0, verbose=False)
        expected = 10 * 63
    else:
        cfg = TrainConfig(mode="treeAggregate", solver="l-bfgs", maxIter=30, checkpointDir=ckpt,
                          checkpointInterval=2, verbose=False)
        expected = 30
    killed: list[int] = []

    def killer() -> None:  # once the first checkpoint exists, training is under way: kill an executor
        stop = time.monotonic() + 240
        while time.monotonic() < stop and not done.is_set():
            if os.path.exists(os.path.join(ckpt, "latest.json")):
                pid = _kill_one_executor(sc.applicationId)
                if pid:
                    killed.append(pid)
                return
            time.sleep(0.1)

    done = threading.Event()
    t = threading.Thread(target=killer, daemon=True)
    t.start()
    result: dict = {"mode": mode, "expected_iterations": expected}
    try:
        res = fit(df, "features", "label", obj, cfg)
        model = FeedForwardModel(obj.topology, res.weights)
        result.update(ok=True, iterations=res.iterations, failed_attempts=res.stats.get("failedAttempts"),
                      accuracy=float(np.mean(np.argmax(model.predict(x), axis=1) == y)))
    except Exception as e:  # noqa: BLE001 - reported to the test
        result.update(ok=False, error=f"{type(e).__name__}: {e}"[:3000])
    done.set()
    t.join(5)
    result["killed"] = killed
    with open(out, "w") as f:
        json.dump(result, f)
    spark.stop()


if __name__ == "__main__":
    _driver(*sys.argv[1:5])
