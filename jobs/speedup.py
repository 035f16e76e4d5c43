"""Node-count speedup of barrier-mode training: the same model and samples on 1, 2, ... N executors.

    spark-submit jobs/speedup.py [--executors 2] [--samples 12000] [--epochs 2] [--straggler 1:3] [--master URL]

By default each run starts its own ``local-cluster[n,1,MB]`` (n executor JVMs with one core each) on this
machine; with ``--master`` every run uses that cluster (it needs at least N task slots) and ``numWorkers=n``.
Prints a table (executors, epoch seconds, samples/s, speedup, efficiency, test accuracy) and saves a PNG.
Epoch seconds are the workers' training time (rendezvous to last step) divided by the epochs: Spark's job start
and the one-off input conversion are reported apart (``fit s``).

``--straggler RANK:FACTOR`` is a benchmarking aid reproducing a fast and a slow device: that worker stays busy
(yielding its core) for (FACTOR - 1) x its compute time every step. The job then also runs the slow worker alone and
the max(2, N) workers with that one slowed, with and without balancing (heterogeneity-aware batch shares), and
compares with the ideal epoch time ``samples / (sum of the workers' samples/s alone)``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

LENET = ("conv(6,5,pad=2)-relu-maxpool(2)-conv(16,5)-relu-maxpool(2)-flatten-affine(120)-relu-affine(84)-relu-"
         "affine(10)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="jobs/speedup.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--executors", type=int, default=2, help="largest number of executors N (runs 1..N)")
    p.add_argument("--master", default="", help="a Spark master to use for every run (default: a "
                   "local-cluster[n,1,MB] per run)")
    p.add_argument("--executor-memory", type=int, default=1536, help="MB per executor of local-cluster")
    p.add_argument("--model", default="lenet", help="'lenet' or a layer spec for 1x28x28 inputs")
    p.add_argument("--samples", type=int, default=12000, help="training samples (first N of Fashion-MNIST)")
    p.add_argument("--test-samples", type=int, default=10000, help="test samples for the accuracy column")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64, help="global batch size")
    p.add_argument("--solver", default="adam", choices=("sgd", "momentum", "adam"))
    p.add_argument("--step-size", type=float, default=0.001)
    p.add_argument("--all-reduce", default="auto", choices=("auto", "hub", "ring"))
    p.add_argument("--straggler", default="", help="RANK:FACTOR -- slow that worker down (benchmarking aid)")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST directory")
    p.add_argument("--output", default="speedup-output", help="directory for speedup.png and speedup.json")
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args(argv)
    if args.executors < 1:
        p.error(f"--executors must be >= 1, got {args.executors}")
    if args.straggler:
        try:
            rank, factor = args.straggler.split(":")
            args.straggler_rank, args.straggler_factor = int(rank), float(factor)
        except ValueError:
            p.error(f"--straggler must be RANK:FACTOR (e.g. 1:3), got {args.straggler!r}")
        world = max(2, args.executors)  # the straggler runs' workers
        if not 0 <= args.straggler_rank < world:
            p.error(f"--straggler rank must be a worker rank of the {world}-worker runs (0..{world - 1}), "
                    f"got {args.straggler_rank}")
        if not args.straggler_factor >= 1:
            p.error(f"--straggler factor must be >= 1, got {args.straggler_factor:g}")
    return args


def load(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sparkdl_hetero.data.fashion_mnist import fashion_mnist

    xtr, ytr, xte, yte = fashion_mnist(args.data_dir)
    xtr = xtr.reshape(len(xtr), -1)[:args.samples].astype(np.float32)
    xte = xte.reshape(len(xte), -1)[:args.test_samples].astype(np.float32)
    if xtr.max() > 1.0:
        xtr /= np.float32(255.0)
        xte /= np.float32(255.0)
    return xtr, ytr[:args.samples].astype(np.float64), xte, yte[:args.test_samples]


def session(args: argparse.Namespace, n: int):  # noqa: ANN201 -- a SparkSession
    from pyspark.sql import SparkSession

    master = args.master or f"local-cluster[{n},1,{args.executor_memory}]"
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = (SparkSession.builder.master(master).appName(f"sparkdl-hetero speedup n={n}")
               .config("spark.ui.enabled", "false").config("spark.task.maxFailures", "1")
               .config("spark.executorEnv.PYSPARK_PYTHON", sys.executable).config("spark.log.level", "ERROR"))
    if args.master:
        return builder.getOrCreate()
    # local-cluster starts its executors asynchronously: wait for all n (one core each) before the first timed fit.
    # A barrier stage of n tasks starts only when n task slots are registered; Spark re-checks every interval, up to
    # maxFailures times (two minutes), then fails the job.
    spark = (builder.config("spark.scheduler.barrier.maxConcurrentTasksCheck.interval", "1s")
             .config("spark.scheduler.barrier.maxConcurrentTasksCheck.maxFailures", "120").getOrCreate())
    spark.range(0, n, 1, n).mapInArrow(_drain, "id long", barrier=True).collect()
    return spark


def _drain(batches):  # noqa: ANN001, ANN202 -- mapInArrow's iterators of Arrow batches
    """A task that reads its input and answers nothing."""
    for _ in batches:
        pass
    yield from ()


def dataframe(spark, x: np.ndarray, y: np.ndarray, partitions: int):  # noqa: ANN001, ANN201
    import pyarrow as pa

    feats = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), x.shape[1]).cast(pa.list_(pa.float32()))
    return spark.createDataFrame(pa.table({"features": feats, "label": pa.array(y)})).repartition(partitions)


def run_one(args: argparse.Namespace, data: tuple, n: int, straggler: dict[int, float] | None = None,
            balance: bool = True, label: str = "") -> dict:
    """One fit on ``n`` executors; its timings, accuracy and per-worker figures."""
    from sparkdl_hetero.distributed.config import TrainConfig
    from sparkdl_hetero.distributed.fit import fit
    from sparkdl_hetero.nn.model import FeedForwardModel
    from sparkdl_hetero.nn.objective import Objective
    from sparkdl_hetero.nn.topology import FeedForwardTopology

    xtr, ytr, xte, yte = data
    topology = FeedForwardTopology.from_spec(LENET if args.model == "lenet" else args.model, (1, 28, 28))
    objective = Objective(topology)
    spark = session(args, n)
    try:
        df = dataframe(spark, xtr, ytr, n).cache()
        df.count()
        cfg = TrainConfig(mode="barrier", solver=args.solver, stepSize=args.step_size, epochs=args.epochs,
                          batchSize=args.batch_size, numWorkers=n, allReduce=args.all_reduce, seed=args.seed,
                          balance=balance, straggler=dict(straggler or {}), verbose=False)
        t0 = time.perf_counter()
        res = fit(df, "features", "label", objective, cfg)
        fit_seconds = time.perf_counter() - t0
    finally:
        spark.stop()
    model = FeedForwardModel(topology, res.weights)
    acc = float(np.mean(np.concatenate([np.argmax(model.predict(xte[i:i + 2000]), axis=1)
                                        for i in range(0, len(xte), 2000)]) == yte)) if len(xte) else float("nan")
    st = res.stats
    train_s = st["trainSeconds"]
    return {"label": label or f"{n} executor(s)", "executors": n, "epochSeconds": train_s / args.epochs,
            "samplesPerSecond": st["trainSamplesPerSecond"], "fitSeconds": fit_seconds, "accuracy": acc,
            "straggler": st["straggler"], "finalShares": st.get("finalShares"), "balance": balance,
            "epochList": st.get("epochSeconds", []),
            "workers": [{k: w[k] for k in ("rank", "rows", "stepMean", "stepP95", "computeShare", "commShare",
                                           "computeSamplesPerSecond", "peakRssMB", "dataMB")}
                        for w in st["workers"]],
            "loss": res.objectiveHistory[-1] if res.objectiveHistory else float("nan")}


def print_table(rows: list[dict], base: float) -> None:
    print(f"{'run':<28} {'executors':>9} {'epoch s':>8} {'samples/s':>10} {'speedup':>8} {'effic.':>7} "
          f"{'test acc':>8} {'fit s':>6}")
    for r in rows:
        sp = base / r["epochSeconds"]
        print(f"{r['label']:<28} {r['executors']:>9} {r['epochSeconds']:>8.2f} {r['samplesPerSecond']:>10,.0f} "
              f"{sp:>8.2f} {sp / r['executors']:>7.2f} {r['accuracy']:>8.4f} {r['fitSeconds']:>6.1f}"
              + (f"  straggler: rank {r['straggler']}, shares {r['finalShares']}" if r["executors"] > 1 else ""))
        for w in r["workers"]:
            print(f"    rank {w['rank']}: {w['rows']} rows, step {w['stepMean'] * 1e3:.1f} ms (p95 "
                  f"{w['stepP95'] * 1e3:.1f}), compute {w['computeShare']:.0%} / comm {w['commShare']:.0%}, "
                  f"compute {w['computeSamplesPerSecond']:,.0f} samples/s, peak RSS {w['peakRssMB']:.0f} MB "
                  f"(data {w['dataMB']:.0f} MB)")
    sys.stdout.flush()


def straggler_summary(ideal: float, fast: dict, both: dict, plain: dict) -> str:
    """The fast+slow runs against the ideal epoch time (samples / sum of the workers' throughputs alone), per
    epoch too: the first epoch includes the balancer finding the split, later ones show the settled split."""
    per_epoch = ", ".join(f"{e:.2f} s = {e / ideal:.2f}x" for e in both["epochList"])
    return (f"ideal epoch {ideal:.2f} s (samples / sum of the workers' throughputs alone); balanced "
            f"{both['epochSeconds']:.2f} s = {both['epochSeconds'] / ideal:.2f}x the ideal (goal <= 1.1x; by epoch: "
            f"{per_epoch}), shares {both['finalShares']}; not balanced {plain['epochSeconds']:.2f} s = "
            f"{plain['epochSeconds'] / ideal:.2f}x; fast worker alone {fast['epochSeconds']:.2f} s = "
            f"{fast['epochSeconds'] / ideal:.2f}x")


def plot(rows: list[dict], path: str) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no PNG (pip install 'sparkdl-hetero[plot]')"
    ns = [r["executors"] for r in rows]
    base = rows[0]["epochSeconds"]
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(ns, [base / r["epochSeconds"] for r in rows], "o-", label="measured")
    ax.plot(ns, ns, "--", color="gray", label="linear")
    ax.set_xlabel("executors (1 core each)")
    ax.set_ylabel("speedup (epoch time, 1 executor / n)")
    ax.set_xticks(ns)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"plot: {path}"


def run(args: argparse.Namespace) -> dict:
    """Every run of the job; returns the figures (also written to OUTPUT/speedup.json)."""
    data = load(args)
    print(f"{args.model}: {len(data[0])} training samples x {args.epochs} epochs, global batch {args.batch_size}, "
          f"{args.solver}; master {args.master or 'local-cluster[n,1,MB]'}", flush=True)
    rows = [run_one(args, data, n) for n in range(1, args.executors + 1)]
    out: dict = {"speedup": rows}
    print_table(rows, rows[0]["epochSeconds"])
    if args.straggler:
        rank, factor = args.straggler_rank, args.straggler_factor
        n = max(2, args.executors)
        fast = rows[0]
        slow = run_one(args, data, 1, {0: factor}, label=f"slow alone (x{factor:g})")
        both = run_one(args, data, n, {rank: factor}, True, "fast+slow, balanced")
        plain = run_one(args, data, n, {rank: factor}, False, "fast+slow, not balanced")
        ideal = len(data[0]) / (fast["samplesPerSecond"] * (n - 1) + slow["samplesPerSecond"])
        out["straggler"] = {"slowAlone": slow, "balanced": both, "unbalanced": plain, "idealEpochSeconds": ideal}
        print(f"\nstraggler: rank {rank} slowed x{factor:g}")
        print_table([fast, slow, both, plain], fast["epochSeconds"])
        print(straggler_summary(ideal, fast, both, plain), flush=True)
    os.makedirs(args.output, exist_ok=True)
    print(plot(rows, os.path.join(args.output, "speedup.png")))
    with open(os.path.join(args.output, "speedup.json"), "w") as f:
        json.dump(out, f, indent=1)
    return out


def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
