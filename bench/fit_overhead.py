"""Where the fixed cost of a barrier fit goes: a 1-epoch LeNet-5 fit of Fashion-MNIST rows on local-cluster[2,1,...],
in a cold application (first fit: JVM, executors and Python workers start) and warm (the same fit again).

Prints the fit's wall time and its ``trainingStats["fixedCost"]`` breakdown (see sparkdl_hetero/distributed/
barrier.py): slot check, conversion and validation of the input, until rank 0's task starts (the repartition
included), gathering its rows, the rendezvous, training, the answer, the release of the converted blocks; and what
is left (the estimator's own work around the mode: topology, model, summary).

    flock /tmp/bench.lock .venv/bin/python bench/fit_overhead.py [--rows 20000] [--master local-cluster[2,1,2048]]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)

LENET = ("conv(6,5,pad=2)-relu-maxpool(2)-conv(16,5)-relu-maxpool(2)-flatten-affine(120)-relu-affine(84)-relu-"
         "affine(10)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--master", default="local-cluster[2,1,2048]")
    ap.add_argument("--fits", type=int, default=3, help="fits in the same application (the first one cold)")
    args = ap.parse_args()

    from pyspark.sql import SparkSession

    from sparkdl_hetero.data import fashion_mnist
    from sparkdl_hetero.data.parquet import write_parquet
    from sparkdl_hetero.ml import DeepClassifier

    x, y, _, _ = fashion_mnist()
    path = write_parquet(x[:args.rows], y[:args.rows], os.path.join(tempfile.mkdtemp(), "train"))
    t0 = time.perf_counter()
    spark = (SparkSession.builder.master(args.master).appName("bench-fit-overhead")
             .config("spark.ui.showConsoleProgress", "false").getOrCreate())
    print(f"session started in {time.perf_counter() - t0:.1f} s; master {args.master}; {args.rows} rows (Parquet); "
          f"load average {os.getloadavg()[0]:.2f}")
    df = spark.read.parquet(path)
    clf = DeepClassifier(topology=LENET, inputShape=[1, 28, 28], solver="adam", stepSize=1e-3, epochs=1,
                         batchSize=64, verbose=False)
    for i in range(args.fits):
        t0 = time.perf_counter()
        model = clf.fit(df)
        wall = time.perf_counter() - t0
        stats = model.summary.trainingStats
        cost = stats["fixedCost"]
        parts = ", ".join(f"{k.removesuffix('Seconds')} {v:.2f}" for k, v in cost.items())
        print(f"fit {i + 1} ({'cold' if i == 0 else 'warm'}): {wall:.2f} s wall, mode {stats['mode']} on "
              f"{stats['numWorkers']} workers; {parts}; the rest (estimator around the mode) "
              f"{wall - sum(cost.values()):.2f}")
    spark.stop()


if __name__ == "__main__":
    main()
