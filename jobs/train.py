"""Train a network on Spark with DeepClassifier, print its test accuracy, save the model and its loss curve.

    spark-submit [--master ...] jobs/train.py [flags]      # see --help; the master comes from spark-submit

With no flags: LeNet-5 on Fashion-MNIST, Adam (step 0.001), 3 epochs, batch 64, NumPy backend, barrier mode (one
long-running task per executor slot, all-reduce between them: no Spark job per mini-batch step).
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
SOLVERS = ("l-bfgs", "gd", "sgd", "momentum", "adam")
MINI_BATCH_SOLVERS = ("sgd", "momentum", "adam")  # their objective history has one point per epoch


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None and those the help text already explains."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="jobs/train.py", formatter_class=_Help,
        description="Train an MLP or CNN with sparkdl-hetero's DeepClassifier on any Spark master (set by "
                    "spark-submit --master), print the test accuracy, save the model and a PNG of the loss curve.")
    d = p.add_argument_group("data")
    d.add_argument("--dataset", default="fashion-mnist",
                   help="'fashion-mnist' (its train/test split), a libsvm text file, or an IDX images file "
                        "(with --labels)")
    d.add_argument("--labels", help="IDX labels file for an IDX --dataset")
    d.add_argument("--test-dataset", help="test set in the same format as --dataset (default: hold out "
                   "--test-fraction of --dataset; Fashion-MNIST uses its own test split)")
    d.add_argument("--test-labels", help="IDX labels file for an IDX --test-dataset")
    d.add_argument("--test-fraction", type=float, default=0.2, help="held-out fraction when there is no test set")
    d.add_argument("--data-dir", help="Fashion-MNIST directory (default: $SPARKDL_FASHION_MNIST, then "
                   "/usr/share/datasets/fashion-mnist)")
    d.add_argument("--parquet-dir", help="directory (local, or a URI every node reaches, e.g. hdfs://...) where "
                   "the dataset is converted to Parquet for Spark to read; Fashion-MNIST is converted once "
                   "(default: OUTPUT/data)")
    d.add_argument("--num-features", type=int, default=0, help="libsvm: number of features (0: infer)")
    d.add_argument("--train-limit", type=int, default=0, help="use only the first N training samples (0: all)")
    d.add_argument("--test-limit", type=int, default=0, help="use only the first N test samples (0: all)")
    d.add_argument("--partitions", type=int, default=0,
                   help="partitions of the training DataFrame (0: the cluster's task slots)")
    m = p.add_argument_group("model")
    m.add_argument("--model", default="lenet",
                   help="'lenet' (LeNet-5), 'resnet8' (ResNet-8 with batch normalization), 'mlp' (Spark's sigmoid "
                        "MLP with --hidden layers) or a layer spec such as 'affine(256)-relu-dropout(0.2)-affine(10)'")
    m.add_argument("--hidden", default="100", help="mlp: comma-separated hidden layer sizes")
    m.add_argument("--input-shape", help="C,H,W (or D) of the input; default: 1,H,W for image data, D otherwise")
    t = p.add_argument_group("training")
    t.add_argument("--solver", default="adam", choices=SOLVERS, help="optimizer")
    t.add_argument("--step-size", type=float, help="learning rate (default: 0.001 for adam, 0.03 otherwise)")
    t.add_argument("--epochs", type=int, default=3, help="passes over the data (mini-batch solvers)")
    t.add_argument("--batch-size", type=int, default=64, help="global mini-batch size (mini-batch solvers)")
    t.add_argument("--max-iter", type=int, default=100, help="l-bfgs/gd iterations")
    t.add_argument("--tol", type=float, default=1e-6, help="convergence tolerance (Spark's meaning)")
    t.add_argument("--reg-param", type=float, default=0.0, help="L2 regularization")
    t.add_argument("--momentum", type=float, default=0.9, help="momentum coefficient (solver momentum)")
    t.add_argument("--nesterov", action="store_true", help="Nesterov momentum (solver momentum)")
    t.add_argument("--lr-schedule", default="constant", choices=("constant", "step", "cosine"),
                   help="learning-rate schedule")
    t.add_argument("--mode", default="barrier", choices=("treeAggregate", "barrier"),
                   help="distributed mode: driver-side optimizer over treeAggregate, or all-reduce between "
                        "barrier tasks")
    t.add_argument("--backend", default="numpy", help="executor array backend: numpy, opencl, cupy or auto")
    t.add_argument("--dtype", default="float32", choices=("float32", "float64"), help="floating-point type")
    t.add_argument("--seed", type=int, default=42, help="random seed (initial weights, shuffling)")
    t.add_argument("--checkpoint-dir", default="", help="checkpoint directory; a rerun resumes from it")
    t.add_argument("--checkpoint-interval", type=int, default=10, help="iterations between checkpoints")
    o = p.add_argument_group("output")
    o.add_argument("--output", default="train-output",
                   help="directory for the saved model (OUTPUT/model), the loss curve (OUTPUT/loss.png) and "
                        "the figures (OUTPUT/result.json)")
    o.add_argument("--model-path", help="where to save the model, any path Spark can write (default: OUTPUT/model)")
    o.add_argument("--log-level", default="WARN", help="Spark's log level (INFO, WARN, ERROR...)")
    o.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if not 0 < args.test_fraction < 1:
        p.error(f"--test-fraction must be in (0, 1), got {args.test_fraction}")
    return args


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if not values:
        raise SystemExit(f"{flag}: expected at least one integer")
    return values


def load_data(args: argparse.Namespace) -> tuple[str, str, tuple[int, ...]]:
    """Parquet directories (features array<float>, label double) of the training and test sets, and the input
    shape of one sample in C,H,W or (D,) order. Fashion-MNIST is converted once into ``--parquet-dir``; a libsvm or
    IDX dataset is written there on every run (it is read from this machine's files anyway)."""
    from sparkdl_hetero.data.parquet import fashion_mnist_parquet, write_parquet

    directory = args.parquet_dir or os.path.join(args.output, "data")
    if args.dataset == "fashion-mnist":
        train, test = fashion_mnist_parquet(f"{directory.rstrip('/')}/fashion-mnist", args.data_dir)
        shape: tuple[int, ...] = (1, 28, 28)
    else:
        xtr, ytr, shape = _read(args.dataset, args.labels, args.num_features)
        if args.test_dataset:
            xte, yte, _ = _read(args.test_dataset, args.test_labels, xtr.shape[1])
        else:
            order = np.random.default_rng(args.seed).permutation(len(xtr))
            n_test = max(1, int(round(len(xtr) * args.test_fraction)))
            xte, yte = xtr[order[:n_test]], ytr[order[:n_test]]
            xtr, ytr = xtr[order[n_test:]], ytr[order[n_test:]]
        train = write_parquet(xtr, ytr, f"{directory.rstrip('/')}/train")
        test = write_parquet(xte, yte, f"{directory.rstrip('/')}/test")
    if args.input_shape:
        shape = tuple(_ints(args.input_shape, "--input-shape"))
    return train, test, shape


def _read(path: str, labels: str | None, num_features: int | None) -> tuple[np.ndarray, np.ndarray, tuple]:
    from sparkdl_hetero.data import read_idx, read_libsvm

    if not os.path.isfile(path):
        raise SystemExit(f"--dataset {path!r}: no such file")
    with open(path, "rb") as f:
        head = f.read(3)
    is_idx = head[:2] == b"\x1f\x8b" or (head[:2] == b"\0\0" and len(head) == 3)  # gzip or IDX magic
    if not is_idx:
        x, y = read_libsvm(path, num_features or None)
        return x, y, (x.shape[1],)
    if not labels:
        raise SystemExit(f"{path} is an IDX file: pass its labels file with --labels / --test-labels")
    images, y = read_idx(path), read_idx(labels)
    if len(images) != len(y):
        raise SystemExit(f"{path} has {len(images)} samples but {labels} has {len(y)} labels")
    x = images.reshape(len(images), -1).astype(np.float32)
    if images.dtype == np.uint8:
        x /= np.float32(255.0)
    shape = (1, *images.shape[1:]) if images.ndim == 3 else (x.shape[1],)  # (n, rows, cols) images: 1 channel
    return x, y.astype(np.float64), shape


def read_dataframe(spark, path: str, limit: int, partitions: int):  # noqa: ANN001, ANN201 -- pyspark
    """The Parquet dataset at ``path`` (its first ``limit`` rows when limit > 0) in ``partitions`` partitions."""
    df = spark.read.parquet(path)
    if limit:
        df = df.limit(limit)
    return df.repartition(partitions)


def build_classifier(args: argparse.Namespace, shape: tuple[int, ...], num_classes: int):  # noqa: ANN201
    from sparkdl_hetero.ml import DeepClassifier

    step = args.step_size if args.step_size is not None else (0.001 if args.solver == "adam" else 0.03)
    est = DeepClassifier(
        solver=args.solver, stepSize=step, maxIter=args.max_iter, tol=args.tol, seed=args.seed,
        epochs=args.epochs, batchSize=args.batch_size, regParam=args.reg_param, momentum=args.momentum,
        nesterov=args.nesterov, lrSchedule=args.lr_schedule, mode=args.mode, backend=args.backend,
        dtype=args.dtype, checkpointDir=args.checkpoint_dir, checkpointInterval=args.checkpoint_interval,
        verbose=not args.quiet)
    num_inputs = int(np.prod(shape))
    if args.model == "mlp":
        return est.setLayers([num_inputs, *_ints(args.hidden, "--hidden"), num_classes])
    spec = LENET if args.model == "lenet" else args.model
    return est.setTopology(spec).setInputShape(list(shape))


def save_loss_curve(history: list[float], path: str, title: str, xlabel: str,
                    stats: dict | None = None) -> str:
    """Write the loss curve PNG; a message instead when matplotlib is missing. With a mini-batch solver's stats the
    training loss is drawn every few steps (``stepLoss``, x in epochs) and the validation loss after each epoch
    on top (``validation``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no loss curve PNG (pip install 'sparkdl-hetero[plot]')"
    stats = stats or {}
    fig, ax = plt.subplots(figsize=(6, 4))
    steps, per_epoch = stats.get("stepLoss", []), stats.get("stepsPerEpoch", 0)
    if steps and per_epoch:
        ax.plot([p[0] / per_epoch for p in steps], [p[1] for p in steps], label="training loss", linewidth=1)
    else:
        ax.plot(np.arange(1, len(history) + 1), history, marker="o" if len(history) < 30 else None,
                label="training loss")
    validation = stats.get("validation", [])
    if validation:
        ax.plot(np.arange(1, len(validation) + 1), [v[0] for v in validation], marker="o", label="validation loss")
        ax.legend()
    ax.set_xlabel(xlabel)
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"loss curve: {path}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pyspark.ml.evaluation import MulticlassClassificationEvaluator
    from pyspark.sql import SparkSession
    from pyspark.sql import functions as F

    from sparkdl_hetero.distributed.cluster import task_slots

    train_path, test_path, shape = load_data(args)
    # spark.log.level: applied when this builder starts the SparkContext (spark-submit); a Spark Connect client has
    # no JVM of its own to quiet, and the server keeps the log level its operator chose
    spark = SparkSession.builder.appName("sparkdl-hetero train").config("spark.log.level", args.log_level).getOrCreate()
    partitions = args.partitions or task_slots(spark)
    train_df = read_dataframe(spark, train_path, args.train_limit, partitions).cache()
    test_df = read_dataframe(spark, test_path, args.test_limit, partitions).cache()
    (n_train, max_train), (n_test, max_test) = (
        df.agg(F.count("label"), F.max("label")).first() for df in (train_df, test_df))
    num_classes = int(max(max_train, max_test)) + 1
    est = build_classifier(args, shape, num_classes)
    print(f"train: {n_train} samples, test: {n_test} samples, {num_classes} classes, input shape {shape}, "
          f"{partitions} partitions, master {spark.conf.get('spark.master')}", flush=True)

    start = time.perf_counter()
    model = est.fit(train_df)
    seconds = time.perf_counter() - start
    history = model.summary.objectiveHistory
    print(f"model: {model.getTopology()} ({model.network.num_weights} weights); solver {args.solver}, "
          f"{model.summary.totalIterations} iterations in {seconds:.1f} s; final loss "
          f"{history[-1] if history else float('nan'):.4f}", flush=True)

    stats = model.summary.trainingStats
    if "samplesPerSecond" in stats:
        print(f"throughput: {stats['samplesPerSecond']:.0f} samples/s ({stats.get('mode', args.mode)} mode)")
    for line in stats.get("backends", []):
        print(f"backend: {line}")
    predictions = model.transform(test_df)
    accuracy = MulticlassClassificationEvaluator(metricName="accuracy").evaluate(predictions)
    print(f"test accuracy: {accuracy:.4f}", flush=True)

    os.makedirs(args.output, exist_ok=True)
    model_path = args.model_path or os.path.join(args.output, "model")
    model.write().overwrite().save(model_path)
    print(f"model saved: {model_path}")
    print(save_loss_curve(history, os.path.join(args.output, "loss.png"),
                          f"{args.model if args.model in ('mlp', 'lenet') else 'spec'} / {args.solver}: "
                          f"test accuracy {accuracy:.4f}",
                          "epoch" if args.solver in MINI_BATCH_SOLVERS else "iteration", stats))
    with open(os.path.join(args.output, "result.json"), "w") as f:
        json.dump({"testAccuracy": accuracy, "trainSeconds": seconds, "objectiveHistory": history,
                   "topology": model.getTopology(), "inputShape": list(shape), "args": vars(args)}, f, indent=1)
    spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
