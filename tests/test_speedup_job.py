"""jobs/speedup.py through spark-submit on a tiny configuration: the table, the straggler comparison, PNG and JSON."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB = os.path.join(ROOT, "jobs", "speedup.py")
SPARK_SUBMIT = os.path.join(os.path.dirname(sys.executable), "spark-submit")


@pytest.mark.parametrize(("value", "message"), [
    ("1-3", "--straggler must be RANK:FACTOR (e.g. 1:3), got '1-3'"),
    ("2:3", "--straggler rank must be a worker rank of the 2-worker runs (0..1), got 2"),
    ("1:0.5", "--straggler factor must be >= 1, got 0.5"),
])
def test_bad_straggler_is_a_clear_error(value: str, message: str) -> None:
    proc = subprocess.run([sys.executable, JOB, "--straggler", value], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_speedup_job_with_a_straggler(tmp_path) -> None:  # noqa: ANN001
    out = str(tmp_path / "out")
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable)
    cmd = [SPARK_SUBMIT, "--driver-memory", "1g", JOB, "--master", "local[2]", "--samples", "1280",
           "--test-samples", "200", "--epochs", "2", "--straggler", "1:3", "--output", out]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, f"speedup.py failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
    rows = re.findall(r"^(1|2) executor\(s\)\s+(\d) ", proc.stdout, re.M)
    assert [r[0] for r in rows] == ["1", "2", "1"], proc.stdout  # the speedup table; 1 executor again beside the slow
    assert re.search(r"^fast\+slow, balanced\s+2 ", proc.stdout, re.M), proc.stdout
    summary = re.search(r"^ideal epoch (\d+\.\d+) s .* balanced (\d+\.\d+) s = .*by epoch: (.*)\), shares \[(\d+), "
                        r"(\d+)\]; not balanced", proc.stdout, re.M)
    assert summary, proc.stdout
    assert len(summary.group(3).split(", ")) == 2  # one figure per epoch
    with open(os.path.join(out, "speedup.json")) as f:
        result = json.load(f)
    assert [r["executors"] for r in result["speedup"]] == [1, 2]
    st = result["straggler"]
    fast, slow = st["balanced"]["finalShares"]
    assert fast + slow == 64 and fast > slow, st["balanced"]  # the slowed rank 1 got the smaller share
    assert st["unbalanced"]["finalShares"] == [32, 32]
    assert len(st["balanced"]["epochList"]) == 2 and st["idealEpochSeconds"] > 0
    with open(os.path.join(out, "speedup.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
