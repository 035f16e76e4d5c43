"""Mentor-guided training on Fashion-MNIST: does a trained LeNet-5 mentor help a small MLP mentee learn from a
small subset?

1. trains the mentor (LeNet-5) on the full training set, in-process (or loads it from ``--mentor-cache``);
2. for each mentee and seed, draws a subset of ``--subset`` training rows and trains the mentee (an MLP, by
   default Spark's [784, 32, 10]) twice with the same initial weights, batch order and epochs: alone (labels only) and
   with the mentor (soft targets at temperature T + a hint from a hidden layer);
3. prints both test accuracies (mean ± std over the seeds) and the gain (mean ± std of the paired differences).

    python jobs/mentor.py                    # or: spark-submit jobs/mentor.py (runs in the driver process)
    python jobs/mentor.py --mentee "784,32,10;affine(100)-relu-affine(10)" --alpha 0.5 --temperature 2 --hint 1:8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sparkdl_hetero.data import fashion_mnist  # noqa: E402
from sparkdl_hetero.distributed.config import TrainConfig  # noqa: E402
from sparkdl_hetero.nn import FeedForwardModel, FeedForwardTopology  # noqa: E402
from sparkdl_hetero.nn.distill import DistillationObjective  # noqa: E402
from sparkdl_hetero.nn.objective import Objective  # noqa: E402
from sparkdl_hetero.nn.trainer import accuracy, train  # noqa: E402

LENET5 = ("conv(6,5,pad=2)-relu-maxpool(2)-conv(16,5)-relu-maxpool(2)-flatten-affine(120)-relu-affine(84)-relu"
          "-affine(10)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="Fashion-MNIST directory (default: Debian's dataset package)")
    p.add_argument("--mentor", default=LENET5, help="mentor topology spec on (1, 28, 28) inputs")
    p.add_argument("--mentor-epochs", type=int, default=5)
    p.add_argument("--mentor-step-size", type=float, default=0.002, help="the mentor's Adam step size")
    p.add_argument("--mentor-cache", default="/tmp/sparkdl_mentor_lenet5.npz",
                   help="reuse the mentor from this .npz if it matches --mentor and --mentor-epochs; '' to retrain")
    p.add_argument("--mentee", default="784,32,10",
                   help="mentees, ';'-separated: Spark MLP layer sizes (sigmoid) or a topology spec on 784 inputs")
    p.add_argument("--subset", type=int, default=2000, help="training rows the mentee sees")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=40, help="mentee epochs (same with and without the mentor)")
    p.add_argument("--step-size", type=float, default=0.003, help="the mentee's Adam step size")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--alpha", type=float, default=0.5, help="distillAlpha: weight of the label loss")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--hint", default="1:8",
                   help="hint pairs mentee:mentor layer indices, comma-separated ('' none); default: the mentee's "
                        "hidden layer to the mentor's relu(120) layer, through an adapter")
    p.add_argument("--hint-weight", type=float, default=1.0, help="weight of every hint pair")
    return p.parse_args(argv)


def _config(args: argparse.Namespace, seed: int, step_size: float) -> TrainConfig:
    return TrainConfig(solver="adam", stepSize=step_size, batchSize=args.batch_size, seed=seed, verbose=False)


def train_mentor(args: argparse.Namespace, x: np.ndarray, y: np.ndarray, x_test: np.ndarray,
                 y_test: np.ndarray) -> tuple[FeedForwardTopology, np.ndarray]:
    """The trained mentor (from the cache when it holds the same spec and epochs)."""
    topology = FeedForwardTopology.from_spec(args.mentor, (1, 28, 28))
    meta = json.dumps({"spec": topology.spec, "epochs": args.mentor_epochs, "stepSize": args.mentor_step_size,
                       "batchSize": args.batch_size})
    if args.mentor_cache and os.path.exists(args.mentor_cache):
        with np.load(args.mentor_cache, allow_pickle=False) as f:
            if str(f["meta"]) == meta:
                print(f"mentor: loaded from {args.mentor_cache}", flush=True)
                return topology, f["weights"]
    model = FeedForwardModel(topology, seed=0)
    t0 = time.perf_counter()
    train(model, x, y, _config(args, 0, args.mentor_step_size), epochs=args.mentor_epochs,
          on_epoch=lambda e, loss: print(f"mentor epoch {e + 1}/{args.mentor_epochs}: loss {loss:.4f} "
                                         f"({time.perf_counter() - t0:.0f} s)", flush=True))
    print(f"mentor: test accuracy {accuracy(model, x_test, y_test):.4f}", flush=True)
    weights = model.get_weights()
    if args.mentor_cache:
        np.savez(args.mentor_cache, weights=weights, meta=np.array(meta))
    return topology, weights


def _mentee_topology(text: str) -> FeedForwardTopology:
    if all(part.strip().isdigit() for part in text.split(",")):
        return FeedForwardTopology.multilayer_perceptron([int(s) for s in text.split(",")])
    return FeedForwardTopology.from_spec(text, 784)


def _hints(text: str) -> list[tuple[int, int]]:
    return [(int(a), int(b)) for a, b in (pair.split(":") for pair in text.split(",") if pair.strip())]


def _std(v: np.ndarray) -> float:
    """Sample standard deviation (0 for a single value)."""
    return float(v.std(ddof=1)) if len(v) > 1 else 0.0


def run(args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    """Test accuracies per mentee spec: {"alone": [...], "mentored": [...]} over the seeds."""
    x, y, x_test, y_test = fashion_mnist(args.data)
    mentor_topology, mentor_weights = train_mentor(args, x, y, x_test, y_test)
    mentor_acc = accuracy(FeedForwardModel(mentor_topology, mentor_weights), x_test, y_test)
    hints = _hints(args.hint)
    seeds = [int(s) for s in args.seeds.split(",")]
    results: dict[str, dict[str, list[float]]] = {}
    for spec in (s.strip() for s in args.mentee.split(";")):
        mentee = _mentee_topology(spec)
        distill = DistillationObjective(mentee, mentor_topology, mentor_weights, alpha=args.alpha,
                                        temperature=args.temperature, hint_layers=hints,
                                        hint_weights=[args.hint_weight] * len(hints))
        acc = results[spec] = {"alone": [], "mentored": []}
        for seed in seeds:
            rows = np.random.default_rng(seed).choice(len(x), size=args.subset, replace=False)
            xs, ys = x[rows], y[rows]
            for name, objective in (("alone", Objective(mentee)), ("mentored", distill)):
                replica = objective.replica(seed=seed)
                replica.set_weights(objective.initial_weights(seed))  # same mentee initialization in both runs
                t0 = time.perf_counter()
                train(replica, xs, ys, _config(args, seed, args.step_size), epochs=args.epochs)
                trained = FeedForwardModel(mentee, objective.model_weights(replica.get_weights()))
                acc[name].append(accuracy(trained, x_test, y_test))
                print(f"{mentee.spec} seed {seed} {name:>8}: test accuracy {acc[name][-1]:.4f} "
                      f"({time.perf_counter() - t0:.1f} s)", flush=True)
    print()
    print(f"mentor {mentor_topology.spec} (full training set, {args.mentor_epochs} epochs): test accuracy "
          f"{100 * mentor_acc:.2f} %")
    print(f"mentees: {args.subset} training rows, {args.epochs} epochs, Adam {args.step_size}, batch "
          f"{args.batch_size}, seeds {args.seeds} (each seed: its own subset and initialization, shared by both "
          f"runs); with the mentor: distillAlpha={args.alpha}, temperature={args.temperature}, hintLayers={hints}, "
          f"hintWeights={[args.hint_weight] * len(hints)}")
    print("| mentee | alone (labels only) | with the mentor | gain (points, goal >= 1.5) |")
    print("| --- | --- | --- | --- |")
    for spec, acc in results.items():
        alone, mentored = 100 * np.array(acc["alone"]), 100 * np.array(acc["mentored"])
        gain = mentored - alone
        print(f"| {_mentee_topology(spec).spec} | {alone.mean():.2f} ± {_std(alone):.2f} % | "
              f"{mentored.mean():.2f} ± {_std(mentored):.2f} % | {gain.mean():+.2f} ± {_std(gain):.2f} |")
    return results


if __name__ == "__main__":
    run(parse_args())
