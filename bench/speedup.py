"""Barrier mode on LeNet-5 / Fashion-MNIST vs its peers, all from the same run (run under the bench lock):

    flock /tmp/bench.lock .venv/bin/python bench/speedup.py [--quick]

1. node-count speedup, 2 executors vs 1 (local-cluster, 1 core each; goal >= 1.9x), and the machine's ceiling for
   it from the same run (``bench/ceiling.py``: 2 independent processes vs 1, no communication);
2. samples/s at 2 executors vs single-process PyTorch CPU (2 threads) and pyspark's TorchDistributor
   (2 processes, gloo) -- the peers are skipped with a message when torch is not installed;
3. a fast and a 3x-slowed worker, with and without balancing, vs the ideal (goal: within 1.1x of it); 2 epochs
   each, the balanced run's also shown one by one (the first includes the balancer finding the split);
4. test accuracy after 5 epochs (Adam, batch 64; goal >= 0.88) and each worker's peak RSS vs
   2 x its data share (float32) + 300 MB.
The machine is shared: figures are noisy. ``--repeats k`` runs every configuration of sections 1-3 (and
single-process PyTorch) k times, interleaved, and reports each one's median run (every run's figure is printed too);
TorchDistributor runs once (a second run in the same driver JVM crashed and a third exhausted the driver's heap).
Everything is printed and written to bench-output/speedup.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _job():  # noqa: ANN202 -- the jobs/speedup.py module
    spec = importlib.util.spec_from_file_location("speedup_job", os.path.join(ROOT, "jobs", "speedup.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---- peers --------------------------------------------------------------------------------------------------
def _torch_lenet():  # noqa: ANN202
    import torch.nn as tnn

    return tnn.Sequential(tnn.Conv2d(1, 6, 5, padding=2), tnn.ReLU(), tnn.MaxPool2d(2), tnn.Conv2d(6, 16, 5),
                          tnn.ReLU(), tnn.MaxPool2d(2), tnn.Flatten(), tnn.Linear(400, 120), tnn.ReLU(),
                          tnn.Linear(120, 84), tnn.ReLU(), tnn.Linear(84, 10))


def torch_single(x: np.ndarray, y: np.ndarray, epochs: int = 1, batch: int = 64, threads: int = 2) -> float:
    """Single-process PyTorch CPU samples/s (Adam, batch 64)."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = _torch_lenet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    xt = torch.from_numpy(x.reshape(-1, 1, 28, 28))
    yt = torch.from_numpy(y.astype(np.int64))
    loss_fn = torch.nn.CrossEntropyLoss()
    t0 = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt), batch):
            idx = perm[i:i + batch]
            opt.zero_grad()
            loss_fn(model(xt[idx]), yt[idx]).backward()
            opt.step()
    return epochs * len(xt) / (time.perf_counter() - t0)


def _distributor_train(x: np.ndarray, y: np.ndarray, batch: int) -> float:
    """TorchDistributor body (one process of two): DDP over gloo, global batch ``batch``; samples/s."""
    import time as _time

    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = DistributedDataParallel(_torch_lenet())
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    xs = torch.from_numpy(x[rank::world].reshape(-1, 1, 28, 28))
    ys = torch.from_numpy(y[rank::world].astype(np.int64))
    loss_fn = torch.nn.CrossEntropyLoss()
    local = batch // world
    dist.barrier()
    t0 = _time.perf_counter()
    for i in range(0, len(xs), local):
        opt.zero_grad()
        loss_fn(model(xs[i:i + local]), ys[i:i + local]).backward()
        opt.step()
    dist.barrier()
    seconds = _time.perf_counter() - t0
    dist.destroy_process_group()
    return len(x) / seconds


def torch_distributor(x: np.ndarray, y: np.ndarray, batch: int = 64) -> float:
    """pyspark's TorchDistributor, 2 processes on local[2], one epoch; samples/s (training loop only)."""
    from pyspark.ml.torch.distributor import TorchDistributor
    from pyspark.sql import SparkSession

    spark = SparkSession.builder.master("local[2]").config("spark.ui.enabled", "false").getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    try:
        return float(TorchDistributor(num_processes=2, local_mode=True, use_gpu=False)
                     .run(_distributor_train, x, y, batch))
    finally:
        spark.stop()


# ---- main ---------------------------------------------------------------------------------------------------
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer samples (a smoke run, not the figures)")
    p.add_argument("--output", default="bench-output")
    p.add_argument("--batch-size", type=int, default=64, help="global batch size of sections 1-3")
    p.add_argument("--sections", default="1234", help="which sections to run")
    p.add_argument("--ceiling-rounds", type=int, default=3,
                   help="rounds of bench/ceiling.py after section 1 (0: skip)")
    p.add_argument("--repeats", type=int, default=1,
                   help="runs of each configuration (median reported; TorchDistributor runs once)")
    opts = p.parse_args()
    job = _job()
    samples = 6000 if opts.quick else 12000
    batch = ["--batch-size", str(opts.batch_size)]
    args = job.parse_args(["--samples", str(samples), "--epochs", "2", "--executors", "2",
                           "--test-samples", "2000", "--output", opts.output, *batch])
    data = job.load(args)
    out: dict = {}

    print(f"load average before: {os.getloadavg()} on {os.cpu_count()} cores (other users' processes count)")
    if "1" in opts.sections or "2" in opts.sections:
        print(f"== 1. node-count speedup (LeNet-5, Adam, global batch {opts.batch_size}) ==", flush=True)
        rows = median_runs(opts.repeats, [lambda n=n: job.run_one(args, data, n) for n in (1, 2)])
        job.print_table(rows, rows[0]["epochSeconds"])
        speedup = rows[0]["epochSeconds"] / rows[1]["epochSeconds"]
        print(f"speedup at 2 executors: {speedup:.2f}x (goal >= 1.9x); load average {os.getloadavg()}", flush=True)
        out["speedup"] = {"rows": rows, "speedup": speedup}
        if opts.ceiling_rounds:
            from ceiling import ceiling

            print("the machine's ceiling: the same per-worker step (forward/backward + Adam) in 2 independent "
                  "processes at half the batch vs 1 process, no Spark, no communication", flush=True)
            best = ceiling(opts.batch_size, opts.ceiling_rounds)
            out["speedup"]["ceiling"] = best
            print("ceiling, median of rounds: " + "; ".join(f"{e} {v:.2f}x" for e, v in best.items())
                  + f" -- the 2-executor speedup above is {speedup / best['ours']:.2f} of ours", flush=True)
    if "2" in opts.sections:
        section2(rows[1]["samplesPerSecond"], data, opts.batch_size, out, opts.repeats)
    if "3" in opts.sections:
        section3(job, samples, data, batch, out, opts.repeats)
    if "4" in opts.sections:
        section4(job, opts.quick, out)
    print(f"load average after: {os.getloadavg()}")
    os.makedirs(opts.output, exist_ok=True)
    with open(os.path.join(opts.output, "speedup.json"), "w") as f:
        json.dump(out, f, indent=1)
    return 0


def median_runs(repeats: int, runs: list, names: list[str] | None = None) -> list:
    """Call every function of ``runs`` ``repeats`` times, interleaved; for each, the result of its median run
    (by epoch seconds for job rows, by value for numbers; the upper one of an even count). Every run's figure is
    printed."""
    results: list[list] = [[] for _ in runs]
    for _ in range(max(1, repeats)):
        for i, fn in enumerate(runs):
            results[i].append(fn())
    if repeats <= 1:
        return [r[0] for r in results]
    picked = []
    for res in results:
        key = (lambda r: r["epochSeconds"]) if isinstance(res[0], dict) else (lambda r: r)
        ordered = sorted(res, key=key)
        shown = [f"{key(r):.3f} s" if isinstance(r, dict) else f"{r:,.0f}" for r in res]
        name = res[0]["label"] if isinstance(res[0], dict) else (names or [])[len(picked)] + " samples/s"
        print(f"  {name}: runs {', '.join(shown)} -> median {shown[res.index(ordered[len(ordered) // 2])]}")
        picked.append(ordered[len(ordered) // 2])
    return picked


def section2(ours: float, data: tuple, batch: int, out: dict, repeats: int = 1) -> None:
    print("\n== 2. samples/s at 2 executors vs PyTorch peers ==", flush=True)
    try:
        import torch  # noqa: F401

        (single,) = median_runs(repeats, [lambda: torch_single(data[0], data[1], batch=batch)], ["PyTorch 1 process"])
        dist = torch_distributor(data[0], data[1], batch)
        print(f"sparkdl-hetero barrier, 2 executors: {ours:,.0f} samples/s")
        print(f"PyTorch CPU, 1 process, 2 threads:  {single:,.0f} samples/s  -> ours / peer = {ours / single:.2f}")
        print(f"TorchDistributor, 2 processes:      {dist:,.0f} samples/s  -> ours / peer = {ours / dist:.2f} "
              f"(goal >= 2)", flush=True)
        out["peers"] = {"ours": ours, "torchSingle": single, "torchDistributor": dist}
    except ImportError:
        print("torch is not installed: PyTorch peers skipped (pip install torch to compare)", flush=True)


def section3(job, samples: int, data: tuple, batch: list[str], out: dict, repeats: int = 1) -> None:  # noqa: ANN001
    print("\n== 3. a fast and a 3x slowed worker ==", flush=True)
    args1 = job.parse_args(["--samples", str(samples), "--epochs", "2", "--test-samples", "0", *batch])
    fast, slow, both, plain = median_runs(repeats, [
        lambda: job.run_one(args1, data, 1, label="fast alone"),
        lambda: job.run_one(args1, data, 1, {0: 3.0}, label="slow alone (x3)"),
        lambda: job.run_one(args1, data, 2, {1: 3.0}, True, "fast+slow, balanced"),
        lambda: job.run_one(args1, data, 2, {1: 3.0}, False, "fast+slow, not balanced")])
    ideal = samples / (fast["samplesPerSecond"] + slow["samplesPerSecond"])
    job.print_table([fast, slow, both, plain], fast["epochSeconds"])
    print(job.straggler_summary(ideal, fast, both, plain), flush=True)
    out["straggler"] = {"fast": fast, "slow": slow, "balanced": both, "unbalanced": plain, "ideal": ideal}


def section4(job, quick: bool, out: dict) -> None:  # noqa: ANN001
    print("\n== 4. 5 epochs of LeNet-5 on all of Fashion-MNIST, 2 executors ==", flush=True)
    args5 = job.parse_args(["--samples", "6000" if quick else "60000", "--epochs", "5",
                            "--test-samples", "10000"])
    full = job.run_one(args5, job.load(args5), 2, label="2 executors, 5 epochs")
    job.print_table([full], full["epochSeconds"])
    print(f"test accuracy after 5 epochs: {full['accuracy']:.4f} (goal >= 0.88)")
    for w in full["workers"]:
        bound = 2 * w["dataMB"] + 300
        print(f"rank {w['rank']}: peak RSS {w['peakRssMB']:.0f} MB vs bound 2 x {w['dataMB']:.0f} + 300 = "
              f"{bound:.0f} MB -> {'within' if w['peakRssMB'] <= bound else 'OVER'}")
    out["accuracy"] = full


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    sys.exit(main())
