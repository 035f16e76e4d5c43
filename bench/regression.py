"""DeepRegressor vs Spark ML's LinearRegression and GBTRegressor: test RMSE and fit time, same split, same session.

Datasets:
- ``friedman``: Friedman's #1 function of 10 uniform features (5 of them irrelevant),
  ``y = 10 sin(pi x1 x2) + 20 (x3 - 0.5)^2 + 10 x4 + 5 x5 + noise`` with Gaussian noise of standard deviation
  ``--noise`` (the best possible test RMSE is the noise's); nonlinear, so a linear model cannot reach it;
- ``spark-linear``: Spark's ``data/mllib/sample_linear_regression_data.txt`` (shipped with pyspark; LIBSVM format,
  10 features, 501 rows), whose targets are mostly noise.

Every model sees the same cached, standardized training split (a ``StandardScaler`` fit on it, as the README
recommends in a Pipeline) and is scored on the same test split with ``RegressionEvaluator``. The fit times are
wall times of ``fit`` (after one untimed small fit of each kind, so JVM and Python-worker start-up are not counted).

    flock /tmp/bench.lock .venv/bin/python bench/regression.py [--dataset friedman] [--rows 20000] [--epochs 60]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)


def friedman(n: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Friedman #1 rows (see the module docstring)."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(size=(n, 10))
    y = (10 * np.sin(np.pi * x[:, 0] * x[:, 1]) + 20 * (x[:, 2] - 0.5) ** 2 + 10 * x[:, 3] + 5 * x[:, 4]
         + noise * rng.normal(size=n))
    return x, y


def spark_linear() -> tuple[np.ndarray, np.ndarray]:
    """Spark's sample_linear_regression_data.txt as dense rows."""
    import pyspark

    path = os.path.join(os.path.dirname(pyspark.__file__), "data", "mllib", "sample_linear_regression_data.txt")
    if not os.path.exists(path):
        raise SystemExit(f"{path} not found: this pyspark installation does not ship its sample data")
    xs, ys = [], []
    with open(path) as f:
        for line in f:
            parts = line.split()
            if not parts:
                continue
            ys.append(float(parts[0]))
            row = np.zeros(10)
            for item in parts[1:]:
                i, v = item.split(":")
                row[int(i) - 1] = float(v)
            xs.append(row)
    return np.array(xs), np.array(ys)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", choices=["friedman", "spark-linear"], default="friedman")
    ap.add_argument("--rows", type=int, default=20000, help="friedman: rows (80%% train, 20%% test)")
    ap.add_argument("--noise", type=float, default=1.0, help="friedman: noise standard deviation")
    ap.add_argument("--topology", default="affine(64)-relu-affine(64)-relu-affine(1)")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--partitions", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

    from pyspark.ml.evaluation import RegressionEvaluator
    from pyspark.ml.feature import StandardScaler
    from pyspark.ml.linalg import Vectors
    from pyspark.ml.regression import GBTRegressor, LinearRegression
    from pyspark.sql import SparkSession

    from sparkdl_hetero.ml import DeepRegressor

    x, y = friedman(args.rows, args.noise, args.seed) if args.dataset == "friedman" else spark_linear()
    spark = (SparkSession.builder.master(f"local[{args.partitions}]").appName("bench-regression")
             .config("spark.ui.enabled", "false").config("spark.ui.showConsoleProgress", "false")
             .config("spark.sql.execution.arrow.pyspark.enabled", "true")
             .getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    rows = [(Vectors.dense(r), float(v)) for r, v in zip(x, y, strict=True)]
    df = spark.createDataFrame(rows, ["raw", "label"]).repartition(args.partitions)
    train, test = df.randomSplit([0.8, 0.2], seed=args.seed)
    scaler = StandardScaler(inputCol="raw", outputCol="features", withMean=True).fit(train)
    train, test = scaler.transform(train).cache(), scaler.transform(test).cache()
    n_train, n_test = train.count(), test.count()
    evaluator = RegressionEvaluator(metricName="rmse")
    models = {
        "DeepRegressor": lambda epochs: DeepRegressor(topology=args.topology, solver="adam", stepSize=args.lr,
                                                      batchSize=args.batch, epochs=epochs, seed=args.seed,
                                                      verbose=False),
        "LinearRegression": lambda _: LinearRegression(),
        "GBTRegressor": lambda _: GBTRegressor(maxIter=100, maxDepth=5, seed=args.seed),
    }
    print(f"{args.dataset}: {n_train} training rows, {n_test} test rows, local[{args.partitions}]"
          + (f", noise sd {args.noise} (the best possible RMSE)" if args.dataset == "friedman" else ""))
    print(f"{'model':<18} {'test RMSE':>10} {'fit s':>8}")
    for name, make in models.items():
        make(1).fit(train.limit(64))  # untimed: start-up costs are not the fit's
        t0 = time.perf_counter()
        model = make(args.epochs).fit(train)
        seconds = time.perf_counter() - t0
        print(f"{name:<18} {evaluator.evaluate(model.transform(test)):>10.4f} {seconds:>8.1f}")
    spark.stop()


if __name__ == "__main__":
    main()
