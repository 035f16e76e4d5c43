"""What bounds CAD's accuracy against FedAvg (issue 13): an ablation of the CAD round, in-process, no Spark.

Drives :mod:`sparkdl_hetero.nn.federated` and :mod:`sparkdl_hetero.nn.cad` the way
:mod:`sparkdl_hetero.distributed.federated` does (same device selection ``default_rng([seed, round])``, same
per-device batch-order seeds, statistics measured on the received model before training and decayed by
``STATS_DECAY`` per round, the same ``.npz`` payloads for the byte counts), with the device split of
``jobs/federated.py`` (:func:`~sparkdl_hetero.data.assign_devices`, ``--classes-per-device`` classes each).
LeNet-5, E=1, B=32, sgd 0.05, C=0.5 by default, as the job.

Validation rows are a held-out part of the TRAINING images (``--validation`` of them, drawn with a fixed seed of
their own), never the test images, so nothing here is chosen on the rows the job reports. ``--train-limit N``
keeps only the first N of the remaining training images (a subsample, to fit a shared machine), split over the
devices.

Variants (``--variants``, comma-separated names; default: all but the sanity check):
- ``fedavg``: the reference.
- ``cad``: the issue's CAD (cadKeep 0.5, context-aware output layer, one warm-up round).
- ``keep75``, ``keep100``: cadKeep 0.75 and 1.0; 1.0 keeps every filter, so only the context-aware output layer
  differs from FedAvg.
- ``fullout``: cadKeep 0.5 with the whole output layer on every device (softmax over all classes): outside the
  issue's design, isolates the output layer.
- ``keep100-fullout``: sanity check, must track ``fedavg`` (the sub-model is the whole model).
- ``warmup5``: five FedAvg rounds before decoupling.
- ``nodecay``, ``freshstats``: server statistics accumulated without decay, or replaced by each round's.
- ``frozen``: the critical paths of each class set fixed after the warm-up (no path changes between rounds).
- ``remeasure``: after the warm-up, one forward-only pass of the merged model over every device's rows (what the
  Spark mode does when ``cadWarmupRounds=0``), so the first decoupling uses preferences of a trained model: with the
  default one warm-up round, the devices measured the model they received, the initial one.
- ``oracle``: before each decoupled round the preferences are those of the whole current global model over every
  device's rows (no device could send them: they need the whole model): isolates the preferences' quality
  (stale, measured on sub-models) from the structure (dropped filters, output layer).
- ``raw``: a device keeps the filters with the highest mean activation over its classes (the preference matrix's
  entries themselves) instead of the highest z-scored preference: the filters that carry most of the signal on its
  rows, so the dropped ones are the quietest on them.
- ``fc-only``, ``fc1-only``: ``cadLayers`` the two hidden affine layers, or the first: the conv layers stay whole.
- ``compensate``: the server folds the dropped filters' mean activation over the device's classes (from its
  statistics) into the bias of the next layer's kept units before sending, and takes it out again before merging:
  the sub-model keeps its size and shape but stops missing the dropped filters' average signal (conv -> affine
  through a max-pool uses the conv channel's spatial mean, an underestimate). Outside the issue's design
  (the sub-model no longer equals the full model with the dropped filters zeroed); a probe of the mechanism.
- ``mergeall``: every parameter averaged over all the round's devices, a device that did not hold it counting
  with the unchanged global value (FedAvg's averaging strength; outside the issue's merge rule).

Printed: per variant, the validation accuracy at the ``--report`` rounds (mean over seeds, and per seed), bytes
(down + up) and device seconds per round as a ratio to FedAvg's over the rounds the variant decoupled (the job's
ratio), the mean fraction of the weights some device held, the mean share of a round's devices behind a held
weight, and the path churn (fraction of a device's kept filters that change from one round to the next).
Device seconds on a shared machine are noisy. Run e.g.

    PYTHONPATH=. .venv/bin/python bench/cad_ablation.py --rounds 20 --seeds 0,1 --train-limit 20000 --jobs 2
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_limits

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sparkdl_hetero.data import assign_devices, fashion_mnist  # noqa: E402
from sparkdl_hetero.distributed.federated import STATS_DECAY, encode_payload  # noqa: E402
from sparkdl_hetero.nn import Affine, FeedForwardModel, FeedForwardTopology  # noqa: E402
from sparkdl_hetero.nn.cad import ActivationStats, critical_paths, default_cad_layers, submodel  # noqa: E402
from sparkdl_hetero.nn.config import TrainConfig  # noqa: E402
from sparkdl_hetero.nn.federated import RoundAggregator, local_update  # noqa: E402
from sparkdl_hetero.nn.objective import Objective  # noqa: E402
from sparkdl_hetero.nn.trainer import accuracy  # noqa: E402

LENET = "conv(6,5,pad=2)-relu-maxpool(2)-conv(16,5)-relu-maxpool(2)-flatten-affine(120)-relu-affine(84)-relu-affine(10)"
VALIDATION_SEED = 20260  # the held-out training rows: independent of the run seeds


@dataclass(frozen=True)
class Variant:
    name: str
    cad: bool = True
    keep: float = 0.5
    full_output: bool = False
    warmup: int = 1
    decay: float = STATS_DECAY
    frozen: bool = False
    merge_all: bool = False
    remeasure: bool = False
    oracle: bool = False
    score: str = "z"
    layers: tuple[int, ...] | None = None
    compensate: bool = False


VARIANTS = {v.name: v for v in (
    Variant("fedavg", cad=False),
    Variant("cad"),
    Variant("keep75", keep=0.75),
    Variant("keep100", keep=1.0),
    Variant("fullout", full_output=True),
    Variant("keep100-fullout", keep=1.0, full_output=True),
    Variant("warmup5", warmup=5),
    Variant("nodecay", decay=1.0),
    Variant("freshstats", decay=0.0),
    Variant("frozen", frozen=True),
    Variant("mergeall", merge_all=True),
    Variant("remeasure", remeasure=True),
    Variant("oracle", oracle=True),
    Variant("raw", score="raw"),
    Variant("fc-only", layers=(7, 9)),
    Variant("fc1-only", layers=(7,)),
    Variant("compensate", compensate=True),
)}
DEFAULT_VARIANTS = [n for n in VARIANTS if n != "keep100-fullout"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"of {list(VARIANTS)}")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--seeds", default="0", help="comma-separated: initial weights, device split and selection")
    p.add_argument("--train-limit", type=int, default=0, help="first N training images after the held-out ones "
                   "(0: all)")
    p.add_argument("--validation", type=int, default=5000, help="training images held out as validation rows")
    p.add_argument("--devices", type=int, default=20)
    p.add_argument("--classes-per-device", type=int, default=5)
    p.add_argument("--client-fraction", type=float, default=0.5)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--step-size", type=float, default=0.05)
    p.add_argument("--report", default="5,10,15,20", help="rounds whose accuracy is printed (the last round is "
                   "always evaluated)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (one BLAS thread each)")
    p.add_argument("--curves", action="store_true", help="evaluate and print every round's accuracy")
    args = p.parse_args(argv)
    args.variant_list = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variant_list if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {unknown}; known: {list(VARIANTS)}")
    if "fedavg" not in args.variant_list:
        args.variant_list.insert(0, "fedavg")  # the reference of the ratios
    args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.report_rounds = sorted({int(r) for r in args.report.split(",") if r.strip() and int(r) <= args.rounds}
                                | {args.rounds})
    return args


_DATA: dict = {}


def load_data(args: argparse.Namespace) -> None:
    x, y = fashion_mnist()[:2]
    perm = np.random.default_rng(VALIDATION_SEED).permutation(len(y))
    val, pool = perm[:args.validation], np.sort(perm[args.validation:])
    if args.train_limit:
        pool = pool[:args.train_limit]
    _DATA.update(xv=x[val], yv=y[val], x=x[pool], y=y[pool])


def evaluator_with(model: FeedForwardModel, w: np.ndarray) -> FeedForwardModel:
    model.set_weights(w.astype(model.dtype))
    return model


def _paths(stats: ActivationStats, classes: tuple[int, ...], v: Variant) -> dict[int, np.ndarray]:
    if v.score == "z":
        return critical_paths(stats, classes, v.keep)
    out = {}
    for i in stats.layers:
        m = stats.means(i)[list(classes)]
        seen = ~np.isnan(m)
        score = np.where(seen, m, 0.0).sum(axis=0) / np.maximum(seen.sum(axis=0), 1)
        n = max(1, int(np.floor(v.keep * score.size + 0.5)))
        out[i] = np.sort(np.argsort(-score, kind="stable")[:n])
    return out


def _compensation(topo: FeedForwardTopology, stats: ActivationStats, w: np.ndarray, classes: list[int],
                  sub: object) -> tuple[np.ndarray, np.ndarray]:
    """(positions in the sub-model's weight vector, values): the bias shift of each kept unit of the layer after a
    decoupled one that stands for the dropped filters' mean activation over ``classes``."""
    weighted = [i for i, layer in enumerate(topo.layers) if layer.weight_size(topo.shapes[i])]
    pos, val = [], []
    where = {int(g): k for k, g in enumerate(sub.index)}
    for i in stats.layers:
        j = weighted[weighted.index(i) + 1]
        m = np.nan_to_num(stats.means(i)[classes]).mean(axis=0)
        dropped = np.setdiff1d(np.arange(m.size), sub.filters[i])
        n_in, n_out = int(np.prod(topo.shapes[j])), topo.shapes[j + 1][-1]
        if not isinstance(topo.layers[j], Affine) or n_in % m.size:
            raise ValueError(f"layer {j} after decoupled layer {i} is not an affine layer reading its filters")
        feats = np.arange(n_in).reshape(-1, m.size)  # position * channels + channel, as flatten lays them out
        x = np.zeros(n_in)
        x[feats[:, dropped]] = m[dropped]
        off = topo.offsets[j]
        comp = x @ w[off:off + n_in * n_out].reshape(n_in, n_out)
        kept = sub.filters[j]
        pos.append([where[off + n_in * n_out + int(u)] for u in kept])
        val.append(comp[kept])
    return np.concatenate(pos).astype(np.int64), np.concatenate(val)


def _dropped(stats: ActivationStats, classes: list[list[int]], keys: list[int], paths: dict) -> float:
    """The share of the mean activation over a device's classes (per the server's statistics) that its dropped
    filters carry, averaged over the selected devices and the decoupled layers."""
    shares = []
    for d in keys:
        for i in stats.layers:
            m = np.nan_to_num(stats.means(i)[classes[d]]).mean(axis=0)
            total = m.sum()
            if total > 0:
                shares.append(1.0 - m[paths[d][i]].sum() / total)
    return float(np.mean(shares)) if shares else float("nan")


def _churn(prev: dict | None, cur: dict) -> float:
    if prev is None:
        return float("nan")
    changed = [1.0 - np.intersect1d(prev[k][i], cur[k][i]).size / cur[k][i].size for k in cur for i in cur[k]]
    return float(np.mean(changed))


def run(task: tuple[str, int, argparse.Namespace]) -> dict:
    """One variant and seed: accuracy at the evaluated rounds and per-round bytes, seconds and merge shares."""
    name, seed, args = task
    v = VARIANTS[name]
    x, y, xv, yv = _DATA["x"], _DATA["y"], _DATA["xv"], _DATA["yv"]
    topo = FeedForwardTopology.from_spec(LENET, [1, 28, 28])
    split = assign_devices(y, args.devices, classes_per_device=args.classes_per_device, seed=seed)
    rows = [split.rows(d) for d in range(args.devices)]
    layers = list(v.layers) if v.layers else default_cad_layers(topo)
    stats = ActivationStats(topo, layers)
    w = np.asarray(Objective(topo).initial_weights(seed), dtype=np.float64)
    evaluator = FeedForwardModel(topo, np.zeros(topo.num_weights))
    all_classes = np.arange(topo.num_outputs)
    m = max(1, int(np.floor(args.client_fraction * args.devices + 0.5)))
    out: dict = {"name": name, "seed": seed, "acc": {}, "rounds": []}
    frozen: dict = {}
    prev_paths = None
    with threadpool_limits(1):
        for r in range(1, args.rounds + 1):
            keys = sorted(np.random.default_rng([seed, r]).choice(args.devices, size=m, replace=False).tolist())
            decouple = v.cad and r > v.warmup
            paths = None
            if decouple and (v.oracle or (v.remeasure and r == v.warmup + 1)):
                measured = ActivationStats(topo, layers)
                measured.add(evaluator_with(evaluator, w), x, y)
                if v.oracle:
                    stats = measured
                else:
                    for i in layers:
                        stats.sums[i] *= v.decay
                        stats.counts[i] *= v.decay
                    stats.merge(measured)
            if decouple:
                paths = {}
                for d in range(args.devices):  # every class set's paths, for the churn; the selected ones train
                    cls = tuple(split.classes[d])
                    if v.frozen and cls not in frozen:
                        frozen[cls] = _paths(stats, cls, v)
                    paths[d] = frozen[cls] if v.frozen else _paths(stats, cls, v)
            agg = RoundAggregator(w)
            fresh = ActivationStats(topo, layers)
            holders = np.zeros(w.size)
            entry = {"round": r, "down": 0, "up": 0, "seconds": 0.0, "decoupled": decouple,
                     "churn": _churn(prev_paths, paths) if paths else float("nan"),
                     "dropped": _dropped(stats, split.classes, keys, paths) if paths else float("nan")}
            prev_paths = paths
            for d in keys:
                xd, yd = x[rows[d]], y[rows[d]]
                cls = np.asarray(split.classes[d])
                sub = submodel(topo, all_classes if v.full_output else cls, paths[d]) if decouple else None
                sub_topo = sub.topology if sub else topo
                wd = (sub.weights(w) if sub else w).astype(np.float32)
                comp = _compensation(topo, stats, w, list(cls), sub) if sub and v.compensate else None
                if comp is not None:
                    wd[comp[0]] += comp[1].astype(np.float32)
                entry["down"] += len(encode_payload({"weights": wd}, {"spec": sub_topo.spec, "classes": cls.tolist()}))
                model = FeedForwardModel(sub_topo, wd)
                start = time.perf_counter()
                up: dict[str, np.ndarray] = {}
                if v.cad:
                    before = {i: fresh.sums[i].copy() for i in layers}
                    fresh.add(model, xd, yd, sub)
                    for i in layers:
                        kept = sub.filters[i] if sub else np.arange(fresh.sums[i].shape[1])
                        up[f"sums_{i}"] = (fresh.sums[i] - before[i])[np.ix_(cls, kept)]
                        up[f"counts_{i}"] = np.zeros(len(cls))
                labels = sub.local_labels(yd) if sub else yd
                dcfg = TrainConfig(solver="sgd", stepSize=args.step_size, batchSize=args.batch_size, verbose=False,
                                   seed=int(np.random.SeedSequence([seed, r, d]).generate_state(1)[0]))
                res = local_update(model, wd, xd, labels, dcfg, args.local_epochs)
                entry["seconds"] += time.perf_counter() - start
                if comp is not None:
                    res.weights[comp[0]] -= comp[1].astype(res.weights.dtype)
                up["weights"] = res.weights.astype(np.float32)
                entry["up"] += len(encode_payload(up, {"rows": int(len(yd))}))
                index = sub.index if sub else np.arange(w.size)
                holders[index] += 1
                if v.merge_all:
                    full = w.copy()
                    full[index] = res.weights
                    agg.add(full, res.rows)
                else:
                    agg.add(res.weights.astype(np.float64), res.rows, None if sub is None else sub.index)
            held = holders > 0
            entry["held"] = float(held.mean())
            entry["holders"] = float(holders[held].mean() / len(keys))
            if v.cad:
                for i in layers:
                    stats.sums[i] *= v.decay
                    stats.counts[i] *= v.decay
                stats.merge(fresh)
            w = agg.result()
            if args.curves or r in args.report_rounds:
                out["acc"][r] = accuracy(evaluator_with(evaluator, w), xv, yv)
            out["rounds"].append(entry)
    return out


def _mean(values: list[float]) -> float:
    vals = [x for x in values if not np.isnan(x)]
    return float(np.mean(vals)) if vals else float("nan")


def print_table(results: list[dict], args: argparse.Namespace) -> None:
    by = {(r["name"], r["seed"]): r for r in results}
    cols = args.report_rounds
    window = 5 if args.curves else 1
    head = " ".join(f"{('~r' if window > 1 else 'r') + str(c):>7}" for c in cols)
    if window > 1:
        print(f"\naccuracy: mean over the {window} rounds ending at the round named (rounds are noisy)")
    print(f"\n{'variant':<16} {head} {'bytes':>6} {'devsec':>6} {'held':>5} {'share':>5} {'churn':>5} {'drop':>5}  "
          f"per seed (last column)")
    for name in args.variant_list:
        runs = [by[(name, s)] for s in args.seed_list]
        def acc(run: dict, c: int) -> float:
            return _mean([run["acc"][r] for r in range(max(1, c - window + 1), c + 1)])

        accs = " ".join(f"{_mean([acc(run, c) for run in runs]):>7.4f}" for c in cols)
        ratios_b, ratios_s, held, share, churn, drop = [], [], [], [], [], []
        for run in runs:
            ref = by[("fedavg", run["seed"])]["rounds"]
            idx = [i for i, e in enumerate(run["rounds"]) if e["decoupled"]] or list(range(len(ref)))
            ratios_b.append(sum(run["rounds"][i]["down"] + run["rounds"][i]["up"] for i in idx)
                            / sum(ref[i]["down"] + ref[i]["up"] for i in idx))
            ratios_s.append(sum(run["rounds"][i]["seconds"] for i in idx) / sum(ref[i]["seconds"] for i in idx))
            held.append(_mean([run["rounds"][i]["held"] for i in idx]))
            share.append(_mean([run["rounds"][i]["holders"] for i in idx]))
            churn.append(_mean([run["rounds"][i]["churn"] for i in idx]))
            drop.append(_mean([run["rounds"][i]["dropped"] for i in idx]))
        last = ", ".join(f"{acc(run, cols[-1]):.4f}" for run in runs)
        print(f"{name:<16} {accs} {_mean(ratios_b):>6.3f} {_mean(ratios_s):>6.3f} {_mean(held):>5.2f} "
              f"{_mean(share):>5.2f} {_mean(churn):>5.2f} {_mean(drop):>5.2f}  {last}")
    if args.curves:
        print("\naccuracy per round (mean over seeds)")
        for name in args.variant_list:
            runs = [by[(name, s)] for s in args.seed_list]
            print(f"{name:<16} " + " ".join(f"{_mean([run['acc'][r] for run in runs]):.3f}"
                                              for r in range(1, args.rounds + 1)))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_data(args)
    print(f"LeNet-5, {len(_DATA['y'])} training images over {args.devices} devices x {args.classes_per_device} "
          f"classes, {len(_DATA['yv'])} held-out TRAINING images as validation; C={args.client_fraction}, "
          f"E={args.local_epochs}, B={args.batch_size}, sgd {args.step_size}, {args.rounds} rounds, seeds "
          f"{args.seed_list}", flush=True)
    tasks = [(name, seed, args) for seed in args.seed_list for name in args.variant_list]
    start = time.perf_counter()
    if args.jobs > 1:
        with mp.get_context("fork").Pool(args.jobs) as pool:
            results = []
            for res in pool.imap_unordered(run, tasks):
                results.append(res)
                print(f"  {res['name']} seed {res['seed']}: {res['acc']} ({time.perf_counter() - start:.0f} s)",
                      flush=True)
    else:
        results = []
        for task in tasks:
            results.append(run(task))
            print(f"  {task[0]} seed {task[1]}: {results[-1]['acc']} ({time.perf_counter() - start:.0f} s)",
                  flush=True)
    print_table(results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
