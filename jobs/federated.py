"""Federated learning on Spark: FedAvg vs CAD (context-aware decoupled sub-models) on Fashion-MNIST split over devices.

    spark-submit [--master ...] jobs/federated.py [--devices 20 --classes-per-device 5 | --dirichlet 0.3]
        [--rounds 30] [--client-fraction 0.5] [--local-epochs 1] [--seeds 0,1,2]

The training images are split over ``--devices`` devices (each with ``--classes-per-device`` classes, as the CAD
poster's 5 of 10, or a Dirichlet split); the test images are validation rows (they never train) on which the global
model is measured after each round. For each seed, FedAvg and CAD run with the same initial weights and the same
device selection; the job prints a table per round (validation accuracy, bytes sent down and up, device seconds),
the ratios CAD / FedAvg, and saves OUTPUT/federated.png (accuracy vs round, bytes per round) and OUTPUT/result.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from train import LENET  # noqa: E402 -- jobs/train.py, next to this file

ALGORITHMS = ("fedavg", "cad")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="jobs/federated.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description=__doc__.split("\n\n")[0])
    d = p.add_argument_group("data")
    d.add_argument("--data-dir", help="Fashion-MNIST directory (default: $SPARKDL_FASHION_MNIST, then "
                   "/usr/share/datasets/fashion-mnist)")
    d.add_argument("--train-limit", type=int, default=0, help="use only the first N training images (0: all)")
    d.add_argument("--test-limit", type=int, default=0, help="use only the first N test images (0: all)")
    d.add_argument("--devices", type=int, default=20, help="number of devices the training images are split over")
    d.add_argument("--classes-per-device", type=int, default=5, help="classes of each device (ignored with "
                   "--dirichlet)")
    d.add_argument("--dirichlet", type=float, help="split each class over the devices by Dirichlet(alpha) instead")
    f = p.add_argument_group("federated training")
    f.add_argument("--model", default="lenet", help="'lenet' (LeNet-5), 'mlp' (784-100-10 ReLU) or a layer spec")
    f.add_argument("--rounds", type=int, default=30, help="communication rounds")
    f.add_argument("--client-fraction", type=float, default=0.5, help="fraction C of the devices per round")
    f.add_argument("--local-epochs", type=int, default=1, help="local epochs E per round")
    f.add_argument("--batch-size", type=int, default=32, help="local mini-batch B")
    f.add_argument("--solver", default="sgd", choices=("sgd", "momentum", "adam", "gd"), help="device optimizer")
    f.add_argument("--step-size", type=float, default=0.05, help="device learning rate")
    f.add_argument("--cad-keep", type=float, default=0.5, help="CAD: fraction of filters kept per decoupled layer")
    f.add_argument("--cad-warmup", type=int, default=1, help="CAD: first rounds run as FedAvg")
    f.add_argument("--seeds", default="0", help="comma-separated seeds (initial weights, device split and "
                   "selection); each runs FedAvg and CAD")
    f.add_argument("--partitions", type=int, default=0, help="partitions the devices are spread over (0: Spark's "
                   "default parallelism)")
    o = p.add_argument_group("output")
    o.add_argument("--output", default="federated-output", help="directory for federated.png and result.json")
    o.add_argument("--parquet-dir", help="directory (local, or a URI every node reaches, e.g. hdfs://...) for the "
                   "devices' data as Parquet (default: OUTPUT/data)")
    o.add_argument("--log-level", default="WARN", help="Spark's log level")
    o.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.devices < 1 or args.rounds < 1:
        p.error(f"--devices and --rounds must be >= 1, got {args.devices} and {args.rounds}")
    try:
        args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    if not args.seed_list:
        p.error("--seeds: expected at least one seed")
    return args


def device_frame(spark, args: argparse.Namespace, seed: int, x: np.ndarray, y: np.ndarray,  # noqa: ANN001, ANN201
                 device: np.ndarray, valid: np.ndarray):
    """The DataFrame (features array<float>, label, device, valid) of one seed's split, written once as Parquet
    under ``--parquet-dir`` and read back by the executors (no task carries the images from driver memory)."""
    from sparkdl_hetero.data.parquet import write_parquet

    directory = args.parquet_dir or os.path.join(args.output, "data")
    path = write_parquet(x, y, f"{directory.rstrip('/')}/devices-seed-{seed}",
                         {"device": device.astype(np.int64), "valid": valid.astype(bool)})
    return spark.read.parquet(path)


def run(spark, args: argparse.Namespace, seed: int, data: tuple) -> dict[str, list[dict]]:  # noqa: ANN001
    """FedAvg and CAD for one seed: their round histories."""
    from sparkdl_hetero.data import assign_devices
    from sparkdl_hetero.ml import DeepClassifier

    xtr, ytr, xte, yte = data
    split = assign_devices(ytr, args.devices, classes_per_device=None if args.dirichlet else args.classes_per_device,
                           dirichlet_alpha=args.dirichlet, seed=seed)
    test_device = np.arange(len(yte)) % args.devices  # validation rows: spread over the devices, never trained
    df = device_frame(spark, args, seed, np.concatenate([xtr, xte]), np.concatenate([ytr, yte]),
                      np.concatenate([split.device, test_device]),
                      np.r_[np.zeros(len(ytr), bool), np.ones(len(yte), bool)]).cache()
    df.count()
    if args.model == "mlp":
        spec = "flatten-affine(100)-relu-affine(10)"
    else:
        spec = LENET if args.model == "lenet" else args.model
    histories = {}
    for algorithm in ALGORITHMS:
        est = DeepClassifier(
            topology=spec, inputShape=[1, 28, 28], mode="federated", deviceCol="device",
            validationIndicatorCol="valid", federatedAlgorithm=algorithm, rounds=args.rounds,
            clientFraction=args.client_fraction, localEpochs=args.local_epochs, batchSize=args.batch_size,
            solver=args.solver, stepSize=args.step_size, cadKeep=args.cad_keep, cadWarmupRounds=args.cad_warmup,
            seed=seed, numWorkers=args.partitions, verbose=not args.quiet)
        start = time.perf_counter()
        model = est.fit(df)
        print(f"seed {seed}, {algorithm}: {args.rounds} rounds in {time.perf_counter() - start:.1f} s "
              f"({model.network.num_weights} weights)", flush=True)
        histories[algorithm] = model.summary.roundHistory
    df.unpersist()
    return histories


def print_table(histories: dict[str, list[dict]]) -> None:
    print(f"{'round':>5} {'algo':>6} {'accuracy':>8} {'bytesDown':>10} {'bytesUp':>10} {'devSec':>8}  ran")
    for i in range(len(histories["fedavg"])):
        for algorithm in ALGORITHMS:
            e = histories[algorithm][i]
            acc = e["validationAccuracy"] if e["validationAccuracy"] is not None else float("nan")
            dropped = f" dropped {[d['device'] for d in e['dropped']]}" if e["dropped"] else ""
            print(f"{e['round']:>5} {algorithm:>6} {acc:>8.4f} {e['bytesDown']:>10} {e['bytesUp']:>10} "
                  f"{e['deviceSeconds']:>8.2f}  {e['algorithm']}{dropped}")


def ratios(histories: dict[str, list[dict]]) -> dict[str, float]:
    """CAD / FedAvg over the rounds CAD decoupled: bytes (down + up) and device seconds; final accuracies."""
    cad_rounds = [i for i, e in enumerate(histories["cad"]) if e["algorithm"] == "cad"]

    def total(algorithm: str, key: str) -> float:
        return float(sum(histories[algorithm][i][key] for i in cad_rounds))

    out = {"finalAccuracyFedAvg": histories["fedavg"][-1]["validationAccuracy"],
           "finalAccuracyCAD": histories["cad"][-1]["validationAccuracy"]}
    if cad_rounds:
        out["bytesRatio"] = (total("cad", "bytesDown") + total("cad", "bytesUp")) / max(
            total("fedavg", "bytesDown") + total("fedavg", "bytesUp"), 1.0)
        out["deviceSecondsRatio"] = total("cad", "deviceSeconds") / max(total("fedavg", "deviceSeconds"), 1e-12)
    return out


def save_figure(results: dict[int, dict[str, list[dict]]], path: str) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no PNG (pip install 'sparkdl-hetero[plot]')"
    fig, (ax_acc, ax_bytes) = plt.subplots(1, 2, figsize=(11, 4))
    colors = {"fedavg": "tab:blue", "cad": "tab:orange"}
    for seed, histories in results.items():
        for algorithm, h in histories.items():
            rounds = [e["round"] for e in h]
            label = f"{algorithm} (seed {seed})" if len(results) > 1 else algorithm
            ax_acc.plot(rounds, [e["validationAccuracy"] for e in h], color=colors[algorithm], label=label,
                        alpha=0.9, marker="o" if len(rounds) < 20 else None)
            ax_bytes.plot(rounds, [(e["bytesDown"] + e["bytesUp"]) / 1e6 for e in h], color=colors[algorithm],
                          label=label, alpha=0.9)
    ax_acc.set_xlabel("communication round")
    ax_acc.set_ylabel("validation accuracy")
    ax_acc.set_title("accuracy vs round")
    ax_bytes.set_xlabel("communication round")
    ax_bytes.set_ylabel("MB per round (down + up)")
    ax_bytes.set_title("bytes per round")
    for ax in (ax_acc, ax_bytes):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"figure: {path}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pyspark.sql import SparkSession

    from sparkdl_hetero.data import fashion_mnist

    xtr, ytr, xte, yte = fashion_mnist(args.data_dir)
    if args.train_limit:
        xtr, ytr = xtr[:args.train_limit], ytr[:args.train_limit]
    if args.test_limit:
        xte, yte = xte[:args.test_limit], yte[:args.test_limit]
    # spark.log.level: as in jobs/train.py (works from a classic and a Spark Connect session)
    spark = SparkSession.builder.appName("sparkdl-hetero federated").config("spark.log.level",
                                                                            args.log_level).getOrCreate()
    split = f"Dirichlet({args.dirichlet})" if args.dirichlet else f"{args.classes_per_device} classes each"
    print(f"train: {len(xtr)} images over {args.devices} devices ({split}), validation: {len(xte)} images; "
          f"C={args.client_fraction}, E={args.local_epochs}, B={args.batch_size}, {args.solver} "
          f"{args.step_size}, {args.rounds} rounds, seeds {args.seed_list}", flush=True)
    results, summary = {}, {}
    for seed in args.seed_list:
        results[seed] = run(spark, args, seed, (xtr, ytr, xte, yte))
        print(f"-- seed {seed}")
        print_table(results[seed])
        summary[seed] = ratios(results[seed])
        r = summary[seed]
        print(f"bytes per round CAD/FedAvg: {r.get('bytesRatio', float('nan')):.3f}; device seconds CAD/FedAvg: "
              f"{r.get('deviceSecondsRatio', float('nan')):.3f} (rounds CAD decoupled); final accuracy FedAvg "
              f"{r['finalAccuracyFedAvg']:.4f}, CAD {r['finalAccuracyCAD']:.4f}", flush=True)
    os.makedirs(args.output, exist_ok=True)
    print(save_figure(results, os.path.join(args.output, "federated.png")))
    with open(os.path.join(args.output, "result.json"), "w") as f:
        json.dump({"args": {k: v for k, v in vars(args).items()}, "summary": summary,
                   "roundHistory": {str(s): h for s, h in results.items()}}, f, indent=1)
    spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
