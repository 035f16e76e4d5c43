"""jobs/train.py through spark-submit on tiny configurations: printed accuracy, saved model, loss curve."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from sparkdl_hetero.ml import DeepClassificationModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB = os.path.join(ROOT, "jobs", "train.py")
SPARK_SUBMIT = os.path.join(os.path.dirname(sys.executable), "spark-submit")
ACCURACY = re.compile(r"^test accuracy: (\d\.\d{4})$", re.M)


def _submit(*args: str, timeout: float = 420) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable)
    cmd = [SPARK_SUBMIT, "--master", "local[2]", "--driver-memory", "1g", "--conf", "spark.ui.enabled=false",
           JOB, "--quiet", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, f"train.py failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
    assert "of very large size" not in proc.stderr  # the data is read by the executors, not shipped in tasks
    return proc


def _check_outputs(out: str, stdout: str, spark) -> tuple[float, DeepClassificationModel]:
    match = ACCURACY.findall(stdout)
    assert len(match) == 1, stdout
    accuracy = float(match[0])
    with open(os.path.join(out, "result.json")) as f:
        result = json.load(f)
    assert result["testAccuracy"] == pytest.approx(accuracy, abs=5e-5)
    with open(os.path.join(out, "loss.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    model = DeepClassificationModel.load(os.path.join(out, "model"))
    assert model.summary.objectiveHistory == pytest.approx(result["objectiveHistory"])
    return accuracy, model


def test_help_documents_every_flag():
    proc = subprocess.run([sys.executable, JOB, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    flags = set(re.findall(r"^\s+(--[a-z-]+)", proc.stdout, re.M))
    assert {"--dataset", "--model", "--solver", "--mode", "--epochs", "--batch-size", "--backend",
            "--output"} <= flags
    for flag in flags:  # every flag's line (or the next) carries a description
        block = re.search(rf"^\s+{flag}\b.*?(?=^\s+--|\Z)", proc.stdout, re.M | re.S).group(0)
        words = re.sub(rf"{flag}( [A-Z_{{}},.-]+)?", "", block).split()
        assert len(words) >= 3, f"{flag} has no description: {block!r}"
    assert "--master" not in proc.stdout.split("options:")[1]  # the master comes from spark-submit


def test_fashion_mnist_lenet_tiny(spark, tmp_path):
    if not os.path.isdir("/usr/share/datasets/fashion-mnist") and not os.environ.get("SPARKDL_FASHION_MNIST"):
        pytest.fail("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    out = str(tmp_path / "out")
    proc = _submit("--train-limit", "400", "--test-limit", "200", "--epochs", "1", "--batch-size", "50",
                   "--step-size", "0.003", "--output", out)
    assert "train: 400 samples, test: 200 samples, 10 classes, input shape (1, 28, 28)" in proc.stdout
    accuracy, model = _check_outputs(out, proc.stdout, spark)
    assert accuracy > 0.3  # one epoch of 400 images: far above chance (0.1)
    assert model.getInputShape() == [1, 28, 28] and model.network.num_weights == 61706


def test_libsvm_mlp_lbfgs(spark, spark_data_dir, tmp_path):
    out = str(tmp_path / "out")
    data = os.path.join(spark_data_dir, "sample_multiclass_classification_data.txt")
    proc = _submit("--dataset", data, "--model", "mlp", "--hidden", "5,4", "--solver", "l-bfgs", "--max-iter", "60",
                   "--seed", "1", "--output", out)
    assert "train: 120 samples, test: 30 samples, 3 classes, input shape (4,)" in proc.stdout
    accuracy, model = _check_outputs(out, proc.stdout, spark)
    assert accuracy >= 0.8
    assert model.getLayers() == [4, 5, 4, 3]
    assert np.all(np.isfinite(model.weights.toArray()))


def test_idx_files_mlp_in_tree_aggregate_mode(spark, tmp_path):
    """An IDX images + labels pair as --dataset (Fashion-MNIST's test files), a held-out split, treeAggregate."""
    root = os.environ.get("SPARKDL_FASHION_MNIST") or "/usr/share/datasets/fashion-mnist"
    images, labels = (os.path.join(root, f) for f in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"))
    if not os.path.isfile(images):
        pytest.fail(f"Fashion-MNIST is not installed ({images} missing)")
    out = str(tmp_path / "out")
    proc = _submit("--dataset", images, "--labels", labels, "--train-limit", "500", "--test-limit", "300",
                   "--model", "mlp", "--hidden", "32", "--solver", "l-bfgs", "--max-iter", "15",
                   "--mode", "treeAggregate", "--output", out)
    assert "train: 500 samples, test: 300 samples, 10 classes, input shape (1, 28, 28)" in proc.stdout
    assert re.search(r"^backend: .*numpy", proc.stdout, re.M), proc.stdout
    accuracy, model = _check_outputs(out, proc.stdout, spark)
    assert accuracy > 0.5 and model.getLayers() == [784, 32, 10]


def test_bad_dataset_path_is_a_clear_error(tmp_path):
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable)
    proc = subprocess.run([sys.executable, JOB, "--dataset", str(tmp_path / "missing.txt")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert f"--dataset {str(tmp_path / 'missing.txt')!r}: no such file" in proc.stderr
