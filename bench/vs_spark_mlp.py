"""Ours vs Spark ML's MultilayerPerceptronClassifier: MLP [784,100,10], l-bfgs, Fashion-MNIST, local[2].

Both fit the same cached DataFrame (same partitions) in the same run, after one untimed 2-iteration fit of
each (the JVM's and the Python workers' one-time start-up is not an iteration cost; --no-warmup times it).
Prints seconds per iteration (wall time of the whole fit / iterations, so each side's data preparation is
included; ours also without it), test accuracy of both, the ratios, and each Python worker's peak RSS against
the goal (2x its partition's data as float32 + 300 MB). Optionally (--shipping) measures what a job costs that
only ships and decodes the cached float32 blocks JVM -> Python, i.e. what every iteration would pay without the
resident blocks.

With --connect both fit through a Spark Connect session (``SparkSession.builder.remote(master)`` starts a local
Connect server in this process's application), the session kind the Spark 4 users without a SparkContext have.

    flock /tmp/bench.lock .venv/bin/python bench/vs_spark_mlp.py [--iters 100] [--partitions 2] [--shipping]
    flock /tmp/bench.lock .venv/bin/python bench/vs_spark_mlp.py --connect [--iters 100]
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time

import numpy as np

os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)


def _python_workers(root: int) -> dict[int, tuple[int, int]]:
    """pid -> (peak RSS, current RSS) in bytes of every PySpark daemon/worker process descending from ``root``
    (this process, which launched the JVM; other Spark applications on the machine are left out)."""
    parents, info = {}, {}
    for d in glob.glob("/proc/[0-9]*"):
        try:
            pid = int(d[6:])
            with open(f"{d}/stat") as f:
                parents[pid] = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"{d}/cmdline", "rb") as f:
                cmd = f.read()
            if b"pyspark.daemon" not in cmd and b"pyspark.worker" not in cmd:
                continue
            fields = {}
            with open(f"{d}/status") as f:
                for line in f:
                    k, _, v = line.partition(":")
                    fields[k] = v.strip()
            info[pid] = (int(fields["VmHWM"].split()[0]) * 1024, int(fields["VmRSS"].split()[0]) * 1024)
        except (OSError, KeyError, ValueError, IndexError):
            continue

    def descends(pid: int) -> bool:
        while pid > 1:
            if pid == root:
                return True
            pid = parents.get(pid, 0)
        return False

    return {pid: v for pid, v in info.items() if descends(pid)}


def _dataframe(spark, x: np.ndarray, y: np.ndarray, partitions: int):  # noqa: ANN001, ANN202
    import pyarrow as pa
    from pyspark.ml.functions import array_to_vector
    from pyspark.sql import functions as F

    offsets = np.arange(0, x.size + 1, x.shape[1], dtype=np.int32)
    table = pa.table({"x": pa.ListArray.from_arrays(pa.array(offsets), pa.array(x.ravel().astype(np.float64))),
                      "label": pa.array(y.astype(np.float64))})
    df = spark.createDataFrame(table).select(array_to_vector(F.col("x")).alias("features"), "label")
    return df.repartition(partitions)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=100, help="l-bfgs iterations (maxIter) for both (default 100)")
    ap.add_argument("--partitions", type=int, default=2)
    ap.add_argument("--master", default="local[2]")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--skip-spark", action="store_true", help="only ours (quick profiling runs)")
    ap.add_argument("--shipping", action="store_true", help="also time a job that ships the cached blocks")
    ap.add_argument("--no-warmup", action="store_true",
                    help="time the first fit of the application (default: one untimed 2-iteration fit of each side "
                         "first, so neither pays the JVM's and the Python workers' one-time start-up)")
    ap.add_argument("--connect", action="store_true",
                    help="both sides fit through a Spark Connect session on --master (a local Connect server)")
    ap.add_argument("--barrier", action="store_true",
                    help="also fit in barrier mode (same l-bfgs, no Spark job per iteration)")
    args = ap.parse_args()
    if args.connect and args.shipping:
        ap.error("--shipping times an RDD job, which a Connect session does not have")

    from pyspark.ml.classification import MultilayerPerceptronClassifier
    from pyspark.ml.evaluation import MulticlassClassificationEvaluator
    from pyspark.sql import SparkSession

    from sparkdl_hetero.data import fashion_mnist
    from sparkdl_hetero.distributed.config import TrainConfig
    from sparkdl_hetero.distributed.fit import fit
    from sparkdl_hetero.nn.model import FeedForwardModel
    from sparkdl_hetero.nn.objective import Objective
    from sparkdl_hetero.nn.topology import FeedForwardTopology

    builder = SparkSession.builder.remote(args.master) if args.connect else SparkSession.builder.master(args.master)
    spark = (builder.appName("bench-vs-spark-mlp")
             .config("spark.driver.memory", "6g").config("spark.ui.showConsoleProgress", "false")
             .config("spark.sql.execution.arrow.pyspark.enabled", "true")
             .config("spark.python.worker.reuse", "true").getOrCreate())
    if not args.connect:
        spark.sparkContext.setLogLevel("ERROR")
    x_train, y_train, x_test, y_test = fashion_mnist()
    df = _dataframe(spark, x_train, y_train, args.partitions).cache()
    n = df.count()
    print(f"Fashion-MNIST: {n} train rows in {args.partitions} partitions, {len(y_test)} test rows; "
          f"master {args.master} ({'Spark Connect' if args.connect else 'classic'} session); maxIter {args.iters}")
    layers = [784, 100, 10]

    topology = FeedForwardTopology.multilayer_perceptron(layers, softmax_on_top=True)
    mlp = MultilayerPerceptronClassifier(layers=layers, maxIter=args.iters, tol=1e-6, blockSize=128,
                                         seed=args.seed, solver="l-bfgs")
    if not args.no_warmup:  # the same for both: code paths compiled and loaded, Python workers started
        fit(df, "features", "label", Objective(topology), TrainConfig(solver="l-bfgs", maxIter=2, verbose=False))
        if not args.skip_spark:
            mlp.copy({mlp.maxIter: 2}).fit(df)
    print(f"load average before the timed fits: {os.getloadavg()[0]:.2f}")

    # ---- ours ----
    config = TrainConfig(solver="l-bfgs", maxIter=args.iters, tol=1e-6, seed=args.seed, verbose=False)
    t0 = time.perf_counter()
    result = fit(df, "features", "label", Objective(topology), config)
    ours_wall = time.perf_counter() - t0
    workers = _python_workers(os.getpid())  # the JVM this script launched (either session kind) and its workers
    ours_acc = float((FeedForwardModel(topology, result.weights).predict(x_test).argmax(1) == y_test).mean())
    ours_iters = max(result.iterations, 1)
    st = result.stats
    print(f"ours : {ours_wall:7.1f} s wall, {result.iterations} iterations, {st['evaluations']} evaluations "
          f"(treeAggregate jobs), {ours_wall / ours_iters:.3f} s/iter wall, {st['seconds'] / ours_iters:.3f} s/iter "
          f"training loop only ({st['seconds'] / max(st['evaluations'], 1):.3f} s/evaluation), "
          f"test accuracy {ours_acc:.4f}, stop: {st['converged']}")
    print(f"       slowest task's forward/backward per evaluation {st['computeSeconds'] / st['evaluations']:.3f} s; "
          f"the rest is Spark job + driver overhead. Replicas built: {len(st['backends'])}")
    part_bytes = max(st["partitionSizes"]) * 784 * 4
    goal = 2 * part_bytes + 300 * 2**20
    print(f"Python workers (goal per worker: peak RSS <= 2 x {part_bytes / 2**20:.0f} MB + 300 MB "
          f"= {goal / 2**20:.0f} MB); training workers, as their tasks reported:")
    for account, peak in sorted(st["workerPeakRSS"].items()):
        print(f"  {account}: peak RSS {peak / 2**20:7.1f} MB {'OK' if peak <= goal else 'OVER GOAL'}")
    print("  every PySpark process of this run still alive after the fit (incl. daemons, conversion workers):")
    for pid, (peak, rss) in sorted(workers.items()):
        print(f"  pid {pid}: peak RSS {peak / 2**20:7.1f} MB, now {rss / 2**20:7.1f} MB "
              f"{'OK' if peak <= goal else 'OVER GOAL'}")

    barrier_per_iter = None
    if args.barrier:
        t0 = time.perf_counter()
        res_b = fit(df, "features", "label", Objective(topology),
                    TrainConfig(solver="l-bfgs", maxIter=args.iters, tol=1e-6, seed=args.seed, verbose=False,
                                mode="barrier", numWorkers=args.partitions))
        barrier_wall = time.perf_counter() - t0
        barrier_acc = float((FeedForwardModel(topology, res_b.weights).predict(x_test).argmax(1) == y_test).mean())
        barrier_per_iter = barrier_wall / max(res_b.iterations, 1)
        print(f"ours, barrier mode: {barrier_wall:7.1f} s wall, {res_b.iterations} iterations, "
              f"{barrier_wall / max(res_b.iterations, 1):.3f} s/iter wall, test accuracy {barrier_acc:.4f}")

    if args.shipping:
        _shipping(spark, df, x_train, y_train, args.partitions)

    if args.skip_spark:
        spark.stop()
        return
    # ---- Spark ML ----
    t0 = time.perf_counter()
    model = mlp.fit(df)
    spark_wall = time.perf_counter() - t0
    spark_iters = max(model.summary().totalIterations, 1)
    test_df = _dataframe(spark, x_test, y_test, args.partitions)
    spark_acc = MulticlassClassificationEvaluator(metricName="accuracy").evaluate(model.transform(test_df))
    print(f"spark: {spark_wall:7.1f} s wall, {spark_iters} iterations, {spark_wall / spark_iters:.3f} s/iter wall, "
          f"test accuracy {spark_acc:.4f}")
    speedup = (spark_wall / spark_iters) / (ours_wall / ours_iters)
    print(f"ratio: ours is {speedup:.2f}x faster per iteration (goal >= 2.5x); accuracy ours - spark = "
          f"{ours_acc - spark_acc:+.4f} (goal >= -0.005)")
    if barrier_per_iter is not None:
        print(f"ratio, barrier mode: {(spark_wall / spark_iters) / barrier_per_iter:.2f}x faster per iteration; "
              f"accuracy ours - spark = {barrier_acc - spark_acc:+.4f}")
    print("(2 shared cores: figures are noisy)")
    spark.stop()


def _shipping(spark, df, x: np.ndarray, y: np.ndarray, partitions: int) -> None:  # noqa: ANN001
    """Time a job over a cached RDD of float32 blocks that only decodes them: the per-iteration cost the
    resident blocks avoid."""
    sc = spark.sparkContext
    rows = np.array_split(np.arange(len(y)), partitions * 8)
    rdd = sc.parallelize([(x[r], y[r].astype(np.int32)) for r in rows], partitions).cache()
    rdd.count()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        rdd.map(lambda b: float(b[0][:, 0].sum())).sum()
        times.append(time.perf_counter() - t0)
    empty = sc.parallelize(range(partitions), partitions).cache()
    empty.count()
    t0 = time.perf_counter()
    for _ in range(3):
        empty.map(lambda v: v).sum()
    base = (time.perf_counter() - t0) / 3
    print(f"shipping: a job that only ships + unpickles the cached float32 blocks takes {min(times):.3f} s "
          f"(an empty job {base:.3f} s): {min(times) - base:.3f} s per iteration the resident blocks avoid")
    rdd.unpersist()
    empty.unpersist()


if __name__ == "__main__":
    main()
