"""Barrier mode: the training loop over real sockets (threads), and the Spark mode end to end (local[2])."""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import pytest
from _helpers import run_ranks
from hypothesis import given, settings
from hypothesis import strategies as st

from sparkdl_hetero.distributed.balancing import (
    FIRST_MEASUREMENTS,
    WARMUP_STEPS,
    Balancer,
    BalancerState,
    balanced_shares,
    rebalance,
)
from sparkdl_hetero.distributed.barrier import BarrierWorker, split_batch, train_worker
from sparkdl_hetero.distributed.comm import Communicator
from sparkdl_hetero.distributed.config import TrainConfig
from sparkdl_hetero.nn.model import FeedForwardModel
from sparkdl_hetero.nn.objective import Objective
from sparkdl_hetero.nn.topology import FeedForwardTopology


def blobs(n: int, seed: int = 0, d: int = 6, k: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian blobs: learnable, with some overlap."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=2.0, size=(k, d))
    y = rng.integers(0, k, n)
    x = (centers[y] + rng.normal(size=(n, d))).astype(np.float32)
    return x, y.astype(np.int32)


def objective(d: int = 6, k: int = 3) -> Objective:
    return Objective(FeedForwardTopology.multilayer_perceptron([d, 10, k]))


def run_workers(world: int, fn: Callable[[Communicator], object]) -> list[object]:
    """run_ranks, failing the test with the first rank's exception."""
    out = run_ranks(world, fn, timeout=20.0, join_timeout=120.0)
    for r, res in enumerate(out):
        if isinstance(res, Exception):
            raise AssertionError(f"rank {r} failed: {res!r}") from res
    return out


# ---- without Spark ---------------------------------------------------------------------------------------
def test_split_batch_is_proportional_and_exact() -> None:
    np.testing.assert_array_equal(split_batch(64, np.array([3.0, 1.0])), [48, 16])
    np.testing.assert_array_equal(split_batch(10, np.array([1.0, 1.0, 1.0])), [4, 3, 3])
    assert split_batch(64, np.array([1e6, 1.0])).tolist() == [63, 1]  # everyone keeps at least one sample
    assert split_batch(7, np.array([0.0, 0.0])).sum() == 7  # no measurement: equal split
    for seed in range(20):
        w = np.random.default_rng(seed).random(5)
        s = split_batch(100, w)
        assert s.sum() == 100 and (s >= 1).all()
        assert np.all(np.abs(s - 95 * w / w.sum() - 1) <= 1.0)


def test_rebalance_moves_rows_only_when_the_predicted_step_is_shorter() -> None:
    even = np.array([32, 32])
    # 4% apart (noise between equal workers): 33/31 would shorten the slowest rank's time by 0.8%: kept as is
    assert rebalance(even, np.array([1.04, 1.0])).tolist() == [32, 32]
    assert rebalance(even, np.array([1.04, 1.0]), min_gain=0.0).tolist() == [33, 31]
    assert rebalance(even, np.array([1.3, 1.0]), min_gain=0.2).tolist() == [32, 32]  # 12% shorter: not enough
    assert rebalance(even, np.array([3.0, 1.0])).tolist() == [48, 16]  # a real straggler: 25% shorter
    assert rebalance(np.array([48, 16]), np.array([1.0, 1.0])).tolist() == [32, 32]  # it caught up


def test_balanced_shares_ignore_noise_between_equal_workers_but_follow_a_straggler() -> None:
    even = np.array([32, 32])
    moved = plain_moved = 0
    for seed in range(200):  # 10 steps' throughputs of two equally fast workers, 8% noise per step
        samples = 1000.0 * np.exp(np.random.default_rng(seed).normal(0.0, 0.08, size=(10, 2)))
        moved += balanced_shares(even, samples).tolist() != [32, 32]
        plain_moved += rebalance(even, np.median(samples, axis=0)).tolist() != [32, 32]
        slow = samples / [1.0, 3.0]  # the same noise, rank 1 three times slower: a large move at once
        assert 46 <= balanced_shares(even, slow)[0] <= 50
    assert moved <= 2 and plain_moved >= 40  # the median alone passes the 1% rule a third of the time
    # a real, steady 8% difference measured with little noise still moves a row
    steady = 1000.0 * np.exp(np.random.default_rng(0).normal(0.0, 0.01, size=(10, 2))) * [1.08, 1.0]
    assert balanced_shares(even, steady).tolist() == [33, 31]
    # one measurement (the first re-split): no noise estimate, only the given minimum gain applies
    assert balanced_shares(even, np.array([[1.3, 1.0]]), 0.2).tolist() == [32, 32]
    assert balanced_shares(even, np.array([[3.0, 1.0]]), 0.2).tolist() == [48, 16]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_reduced_sums_are_the_sums_over_the_global_batch(dtype: str) -> None:
    obj = objective()
    x, y = blobs(100, seed=1)
    parts = [(x[:30], y[:30]), (x[30:], y[30:])]
    picks = [np.arange(0, 30, 3), np.arange(0, 70)[::-1][:54][::-1]]  # unequal shares: 10 and 54 rows
    w = obj.initial_weights(3)
    cfg = TrainConfig(mode="barrier", solver="sgd", dtype=dtype)

    def fn(c: Communicator) -> tuple:
        worker = BarrierWorker(c, obj, cfg, *parts[c.rank], w)
        g, loss, n, _ = worker.reduced_sums(picks[c.rank])
        return g.astype(np.float64) / n, loss / n, n, None

    (g0, f0, n0, _), (g1, f1, n1, _) = run_workers(2, fn)
    assert n0 == n1 == 64
    assert g0.tobytes() == g1.tobytes() and f0 == f1  # bit-identical on both ranks
    xs = np.concatenate([parts[0][0][picks[0]], parts[1][0][picks[1]]])
    ys = np.concatenate([parts[0][1][picks[0]], parts[1][1][picks[1]]])
    ref = FeedForwardModel(obj.topology, w, dtype=np.float64)
    grad = np.zeros(obj.num_weights)
    loss = ref.compute_gradient(xs, ys, grad_out=grad)
    tol = 1e-5 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(g0, grad, rtol=tol, atol=tol)
    assert f0 == pytest.approx(loss, rel=tol)


def _train_threads(cfg: TrainConfig, world: int = 2, n: int = 400) -> list[tuple]:
    obj = objective()
    x, y = blobs(n, seed=2)
    bounds = np.linspace(0, n, world + 1).astype(int)
    w0 = obj.initial_weights(0)

    def fn(c: Communicator) -> tuple:
        lo, hi = bounds[c.rank], bounds[c.rank + 1]
        worker, stop, summaries = train_worker(c, obj, cfg, x[lo:hi], y[lo:hi], w0)
        return worker, stop, summaries

    return run_workers(world, fn)


@pytest.mark.parametrize("solver,lr,sync,algo", [("adam", 0.05, 1, "hub"), ("momentum", 0.05, 1, "ring"),
                                                 ("sgd", 0.3, 3, "auto")])
def test_replicas_stay_bit_identical(solver: str, lr: float, sync: int, algo: str) -> None:
    cfg = TrainConfig(mode="barrier", solver=solver, epochs=4, batchSize=32, stepSize=lr, syncEvery=sync,
                      allReduce=algo, straggler={1: 2.0})
    results = _train_threads(cfg, world=3)
    weights = [r[0].weights for r in results]
    assert results[0][0].iteration == 4 * 13
    for w in weights[1:]:
        assert w.tobytes() == weights[0].tobytes()
    assert results[0][0].history[-1] < 0.6 * results[0][0].history[0]  # it learned


def test_balancing_gives_the_slow_worker_a_smaller_share() -> None:
    cfg = TrainConfig(mode="barrier", solver="sgd", epochs=3, batchSize=64, stepSize=0.05,
                      straggler={1: 4.0})
    worker = _train_threads(cfg, n=2000)[0][0]
    fast, slow = worker.extra["finalShares"]
    assert fast + slow == 64
    assert fast > 1.8 * slow, worker.extra
    plain = _train_threads(TrainConfig(mode="barrier", solver="sgd", epochs=1, batchSize=64, balance=False,
                                       straggler={1: 4.0}), n=2000)[0][0]
    assert plain.extra["finalShares"] == [32, 32]


def test_early_stopping_stops_every_rank_together() -> None:
    cfg = TrainConfig(mode="barrier", solver="adam", epochs=200, batchSize=32, stepSize=0.05,
                      validationFraction=0.25, patience=2)
    results = _train_threads(cfg)
    stops = {r[1] for r in results}
    assert stops == {"early stopping: validation loss did not improve for 2 epochs"}
    iterations = {r[0].iteration for r in results}
    val = results[0][0].extra["validation"]
    epochs = len(results[0][0].history)
    assert len(iterations) == 1 and epochs == len(val) < 200  # stopped at an epoch's end, long before the 200th
    assert iterations.pop() % epochs == 0
    best = min(v[0] for v in val)
    assert all(v[0] > best - 1e-6 for v in val[-2:])  # the last `patience` epochs did not improve
    assert results[0][0].weights.tobytes() == results[1][0].weights.tobytes()


def test_lbfgs_replicas_agree_and_match_a_single_process_lbfgs() -> None:
    from sparkdl_hetero.nn.lbfgs import minimize_lbfgs

    cfg = TrainConfig(mode="barrier", solver="l-bfgs", maxIter=15, dtype="float64", regParam=1e-3)
    results = _train_threads(cfg)
    w = results[0][0].weights
    assert w.tobytes() == results[1][0].weights.tobytes()
    obj = objective()
    x, y = blobs(400, seed=2)
    model = FeedForwardModel(obj.topology, obj.initial_weights(0), dtype=np.float64)

    def fun(v: np.ndarray) -> tuple[float, np.ndarray]:
        model.set_weights(v)
        g = np.zeros_like(v)
        f = model.compute_gradient(x, y, grad_out=g)
        return f + 0.5e-3 * v @ v, g + 1e-3 * v

    ref_hist: list[float] = []
    ref_x, ref_f, _ = minimize_lbfgs(fun, obj.initial_weights(0), 15, cfg.tol, ref_hist, lambda x, f: None)
    hist = results[0][0].history
    assert len(hist) == 16
    assert hist[-1] == pytest.approx(ref_f, rel=1e-6)
    np.testing.assert_allclose(hist, ref_hist, rtol=1e-6)
    np.testing.assert_allclose(w, ref_x, rtol=1e-4, atol=1e-6)



BN_SPEC = "affine(8)-batchnorm(momentum=0.3,eps=0.001)-relu-affine(3)"


def test_the_first_step_leaves_every_replica_with_the_mean_of_their_batch_norm_states() -> None:
    # one step over every row (batchSize = all rows, shares = each worker's rows): a replica's state after its
    # training forward is what one engine model with the initial weights gets on that worker's rows
    obj = Objective(FeedForwardTopology.from_spec(BN_SPEC, 6))
    x, y = blobs(90, seed=3)
    parts = [(x[:30], y[:30]), (x[30:], y[30:])]
    w0 = obj.initial_weights(1)
    cfg = TrainConfig(mode="barrier", solver="sgd", epochs=1, batchSize=90, stepSize=0.1, dtype="float64",
                      balance=False)
    results = run_workers(2, lambda c: train_worker(c, obj, cfg, *parts[c.rank], w0)[0].model_state())
    per_rank = []
    for xr, yr in parts:
        ref = FeedForwardModel(obj.topology, w0, dtype=np.float64)
        ref.compute_gradient(xr, yr)
        per_rank.append(ref.get_state())
    assert per_rank[0].shape == (16,) and not np.allclose(per_rank[0], per_rank[1])  # the workers' stats differ
    assert results[0].tobytes() == results[1].tobytes()
    np.testing.assert_allclose(results[0], (per_rank[0] + per_rank[1]) / 2, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sync,algo", [(1, "ring"), (3, "hub")])
def test_batch_norm_state_is_bit_identical_on_every_replica(sync: int, algo: str) -> None:
    obj = Objective(FeedForwardTopology.from_spec(BN_SPEC, 6))
    x, y = blobs(300, seed=4)
    bounds = [0, 90, 200, 300]
    cfg = TrainConfig(mode="barrier", solver="adam", epochs=2, batchSize=32, stepSize=0.05, syncEvery=sync,
                      allReduce=algo, validationFraction=0.2)
    w0 = obj.initial_weights(0)

    def fn(c: Communicator) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = bounds[c.rank], bounds[c.rank + 1]
        worker = train_worker(c, obj, cfg, x[lo:hi], y[lo:hi], w0)[0]
        return worker.weights, worker.model_state()

    results = run_workers(3, fn)
    initial = FeedForwardModel.initial_state(obj.topology)
    for w, state in results[1:]:
        assert w.tobytes() == results[0][0].tobytes()
        assert state.tobytes() == results[0][1].tobytes()
    assert not np.allclose(results[0][1], initial, atol=1e-2)  # the running statistics moved



def test_a_resumed_run_starts_from_the_checkpointed_batch_norm_state(tmp_path) -> None:
    from sparkdl_hetero.distributed.checkpoint import load_checkpoint

    obj = Objective(FeedForwardTopology.from_spec(BN_SPEC, 6))
    x, y = blobs(200, seed=6)
    cfg = TrainConfig(mode="barrier", solver="adam", epochs=2, batchSize=32, stepSize=0.05,
                      checkpointDir=str(tmp_path / "ckpt"), checkpointInterval=5)
    w0 = obj.initial_weights(0)

    def fn(c: Communicator) -> tuple[int, np.ndarray]:
        worker = train_worker(c, obj, cfg, x[c.rank::2], y[c.rank::2], w0)[0]
        return worker.iteration, worker.model_state()

    first = run_workers(2, fn)
    ckpt = load_checkpoint(cfg.checkpointDir)
    assert ckpt is not None and ckpt.iteration == first[0][0] == 14
    np.testing.assert_array_equal(ckpt.model_state, first[0][1])
    again = run_workers(2, fn)  # nothing left to train: every replica ends with the checkpoint's state
    assert [it for it, _ in again] == [14, 14]
    for _, state in again:
        assert state.tobytes() == ckpt.model_state.tobytes()


# ---- Spark (local[2]: two barrier slots) -------------------------------------------------------------------
@pytest.fixture(scope="module")
def blob_df(spark):  # noqa: ANN001, ANN201
    from pyspark.ml.linalg import Vectors

    x, y = blobs(1200, seed=5)
    rows = [(Vectors.dense(a.astype(float)), float(b)) for a, b in zip(x, y, strict=True)]
    return spark.createDataFrame(rows, ["features", "label"]).repartition(3)


def _accuracy(obj: Objective, weights: np.ndarray) -> float:
    x, y = blobs(1200, seed=5)
    model = FeedForwardModel(obj.topology, weights)
    return float(np.mean(np.argmax(model.predict(x), axis=1) == y))


def test_barrier_fit_on_spark(blob_df) -> None:  # noqa: ANN001
    from sparkdl_hetero.distributed.fit import fit

    obj = objective()
    cfg = TrainConfig(mode="barrier", solver="adam", epochs=5, batchSize=32, stepSize=0.02, verbose=False)
    res = fit(blob_df, "features", "label", obj, cfg)
    assert res.iterations == 5 * 38
    assert len(res.objectiveHistory) == 5 and res.objectiveHistory[-1] < res.objectiveHistory[0]
    assert _accuracy(obj, res.weights) > 0.9
    st = res.stats
    assert st["mode"] == "barrier" and st["numWorkers"] == 2 and st["straggler"] in (0, 1)
    assert sorted(w["rank"] for w in st["workers"]) == [0, 1]
    # each rank's backend, resolved in its task as treeAggregate's tasks do: "host pid N partition RANK: numpy"
    assert [a.split(" partition ", 1)[1] for a in st["backends"]] == ["0: numpy", "1: numpy"]
    assert sum(w["rows"] for w in st["workers"]) == 1200
    for w in st["workers"]:
        assert w["steps"] == 190 and 0 < w["stepMean"] <= w["stepP95"] + 1e-9
        assert w["computeShare"] + w["commShare"] == pytest.approx(1.0)
    assert len(st["epochSeconds"]) == 5 and min(st["epochSeconds"]) > 0
    assert sum(st["epochSeconds"]) <= st["trainSeconds"]


def test_barrier_bad_input_names_the_column(spark) -> None:  # noqa: ANN001
    from sparkdl_hetero.distributed.fit import fit

    df = spark.createDataFrame([([1.0, 2.0], 0.0), ([1.0, 2.0, 3.0], 1.0)], ["f", "label"])
    with pytest.raises(ValueError, match="features column 'f' has 1 rows of size"):
        fit(df, "f", "label", objective(2, 2), TrainConfig(mode="barrier", solver="sgd"))
    with pytest.raises(ValueError, match=r"straggler rank 5 is not a worker rank \(0..1\)"):
        fit(df.limit(1), "f", "label", objective(2, 2),
            TrainConfig(mode="barrier", solver="sgd", straggler={5: 2.0}))


def test_fault_mid_training_resumes_from_the_checkpoint(spark, blob_df, tmp_path) -> None:  # noqa: ANN001
    from sparkdl_hetero.distributed.barrier import FAULT_PROPERTY
    from sparkdl_hetero.distributed.fit import fit

    obj = objective()
    base = dict(mode="barrier", solver="adam", epochs=5, batchSize=32, stepSize=0.02, verbose=False)
    clean = fit(blob_df, "features", "label", obj, TrainConfig(**base))
    marker = tmp_path / "fault-happened"
    spark.sparkContext.setLocalProperty(FAULT_PROPERTY, f"1:120:{marker}")
    try:
        res = fit(blob_df, "features", "label", obj,
                  TrainConfig(**base, checkpointDir=str(tmp_path / "ckpt"), checkpointInterval=25))
    finally:
        spark.sparkContext.setLocalProperty(FAULT_PROPERTY, None)
    assert os.path.exists(marker)  # the fault did happen
    assert len(res.stats["failedAttempts"]) == 1 and "injected fault on rank 1 at step 120" in \
        res.stats["failedAttempts"][0]
    assert res.iterations == clean.iterations == 190
    # resumed at step 100 (the last checkpoint before the fault): the final attempt ran 90 steps, not 190
    assert all(w["steps"] == 90 for w in res.stats["workers"])
    assert len(res.objectiveHistory) == 5
    assert _accuracy(obj, res.weights) >= _accuracy(obj, clean.weights) - 0.02


def test_deep_classifier_in_barrier_mode(blob_df) -> None:  # noqa: ANN001
    from sparkdl_hetero.ml import DeepClassifier

    clf = DeepClassifier(layers=[6, 10, 3], mode="barrier", solver="momentum", stepSize=0.05, epochs=3,
                         batchSize=32, seed=3, verbose=False)
    model = clf.fit(blob_df)
    acc = model.transform(blob_df).selectExpr("avg(cast(prediction = label as double))").first()[0]
    assert acc > 0.9
    assert len(model.summary.objectiveHistory) == 3


def test_diverging_loss_raises_the_same_error_as_tree_aggregate(blob_df) -> None:  # noqa: ANN001
    from sparkdl_hetero.distributed.config import TrainingDivergedError
    from sparkdl_hetero.distributed.fit import fit

    cfg = TrainConfig(mode="barrier", solver="gd", stepSize=1e40, maxIter=5, numWorkers=2, verbose=False)
    with pytest.raises(TrainingDivergedError, match=r"the loss became (nan|inf) at iteration 2 \(gd, stepSize") as e:
        fit(blob_df, "features", "label", objective(), cfg)
    assert e.value.iteration == 2 and e.value.weights is None  # barrier workers do not ship weights on failure
    assert len(e.value.history) == 1 and np.isfinite(e.value.history[0])  # iteration 1's loss at the start weights


# the barrier knobs' checks (syncEvery, validationFraction, allReduce, commTimeout, ...): tests/test_config.py


def _record(balancer: Balancer, steps: range, throughputs: list[float]) -> list[bool]:
    return [balancer.record(np.array(throughputs), t) for t in steps]


def test_a_re_split_restarts_the_throughput_measurements() -> None:
    """Throughput measured at one split says little about another (fixed per-step costs): after a re-split the
    next one is weighed on FIRST_MEASUREMENTS steps at the new split only, not on a ring mixing both."""
    b = Balancer(64, [1000, 1000], balance=True)
    assert b.shares.tolist() == [32, 32]
    first = WARMUP_STEPS + FIRST_MEASUREMENTS
    changed = _record(b, range(1, first + 1), [4000.0, 1000.0])  # a 4x faster rank 0
    assert changed == [False] * (first - 1) + [True]  # warm-up steps are not measured; the first look re-splits
    assert b.shares.tolist() == split_batch(64, np.array([4.0, 1.0])).tolist() == [51, 13]
    # at the new split the ranks measure equal: a ring still holding the 4:1 steps would keep a 2.5:1 median
    changed = _record(b, range(first + 1, first + FIRST_MEASUREMENTS + 1), [1000.0, 1000.0])
    assert changed == [False] * (FIRST_MEASUREMENTS - 1) + [True]
    assert b.shares.tolist() == [32, 32]
    assert b.snapshot() == BalancerState([1000.0, 1000.0], [32, 32])


def test_one_slow_step_at_the_start_does_not_unbalance_equal_workers() -> None:
    b = Balancer(64, [1000, 1000], balance=True)
    steps = range(1, WARMUP_STEPS + FIRST_MEASUREMENTS + 1)
    # the warm-up steps (one-off costs) and then the first measured step of rank 1 (a GC pause, say) are slow
    thr = {t: [1000.0, 100.0] if t <= WARMUP_STEPS + 1 else [1000.0, 1010.0] for t in steps}
    assert not any(b.record(np.array(thr[t]), t) for t in steps)
    assert b.shares.tolist() == [32, 32]
    # the same look with a real straggler (every step 4x slower) moves rows to rank 0
    s = Balancer(64, [1000, 1000], balance=True)
    assert _record(s, steps, [1000.0, 250.0])[-1] and s.shares[0] > 2 * s.shares[1]


def test_balancer_state_survives_a_checkpoint_and_balance_off_keeps_the_row_split() -> None:
    b = Balancer(64, [1000, 1000], balance=True)
    _record(b, range(1, WARMUP_STEPS + FIRST_MEASUREMENTS + 1), [3000.0, 1000.0])
    state = BalancerState.from_json(b.snapshot().to_json())
    resumed = Balancer(64, [1000, 1000], balance=True, state=state)
    assert resumed.shares.tolist() == b.shares.tolist() == [48, 16]
    np.testing.assert_array_equal(resumed.throughput, [3000.0, 1000.0])
    off = Balancer(64, [3000, 1000], balance=False)
    assert off.shares.tolist() == [48, 16]
    assert not any(_record(off, range(1, 40), [1000.0, 3000.0])) and off.shares.tolist() == [48, 16]


def test_the_driver_tells_deterministic_failures_by_class_name_not_by_message() -> None:
    from sparkdl_hetero.distributed.errors import NOT_RETRIABLE_MARK, NotRetriableError, is_not_retriable

    wrapped = NotRetriableError.wrapping(ValueError("bad rows"))
    assert str(wrapped) == "ValueError: bad rows" and is_not_retriable(wrapped)
    spark_text = ("org.apache.spark.SparkException: Job aborted due to stage failure: ...\n"
                  "Traceback (most recent call last):\n  File \"worker.py\", line 1, in main\n"
                  f"{NOT_RETRIABLE_MARK}: ValueError: bad rows\n")
    assert is_not_retriable(RuntimeError(spark_text))
    # a transient failure whose message happens to mention an error name is retried
    transient = ("org.apache.spark.SparkException: Job aborted\nTraceback (most recent call last):\n"
                 "sparkdl_hetero.distributed.comm.CommError: peer 1 aborted: ValueError while reading\n")
    assert not is_not_retriable(RuntimeError(transient))
    # Spark's own refusal of a barrier stage (more tasks than slots, after its minutes of re-checking) repeats too
    refusal = ("org.apache.spark.SparkException: [SPARK-24819]: Barrier execution mode does not allow run a barrier "
               "stage that requires more slots than the total number of slots in the cluster currently.")
    assert is_not_retriable(RuntimeError(refusal))


def test_a_deterministic_task_failure_is_not_retried(blob_df, tmp_path) -> None:  # noqa: ANN001
    from sparkdl_hetero.distributed.checkpoint import Checkpoint, save_checkpoint
    from sparkdl_hetero.distributed.fit import fit

    ckpt = str(tmp_path / "other")  # another training's checkpoint: every task's restore raises ValueError
    save_checkpoint(ckpt, Checkpoint(np.zeros(5), 3, [1.0], {}, "gd"))
    cfg = TrainConfig(mode="barrier", solver="sgd", epochs=1, numWorkers=2, checkpointDir=ckpt, verbose=False)
    with pytest.raises(RuntimeError, match=r"barrier training failed after 1 attempt\(s\): .*NotRetriableError: "
                                           r"ValueError: checkpointDir .* holds a checkpoint of solver 'gd'"):
        fit(blob_df, "features", "label", objective(), cfg)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(batch=st.integers(1, 512), world=st.integers(1, 6), data=st.data())
def test_every_split_the_balancer_makes_covers_the_batch(batch: int, world: int, data: st.DataObject) -> None:
    positive = st.floats(1.0, 1e6, allow_nan=False)
    rows = data.draw(st.lists(st.integers(1, 10_000), min_size=world, max_size=world))
    b = Balancer(batch, rows, balance=True)
    for t in range(1, 40):
        b.record(np.array(data.draw(st.lists(positive, min_size=world, max_size=world))), t)
        assert b.shares.sum() == batch and (b.shares >= min(1, batch // world)).all(), b.shares
    exact = split_batch(batch, np.asarray(rows, dtype=np.float64))
    floor = min(1, batch // world)
    assert np.all(np.abs(exact - floor - (batch - floor * world) * np.asarray(rows) / sum(rows)) < 1.0)


@pytest.mark.parametrize(("error", "deterministic"), [(ValueError("bad rows"), True), (RuntimeError("flaky"), False)])
def test_a_peer_stopped_by_a_deterministic_failure_knows_it(error: Exception, deterministic: bool) -> None:
    """The rank whose failure Spark reports may be the one stopped by the other's abort: it must not make the
    driver retry a deterministic failure."""
    from sparkdl_hetero.distributed.comm import CommError
    from sparkdl_hetero.distributed.errors import NOT_RETRIABLE, NotRetriableError, from_peer

    def fn(comm: Communicator) -> object:
        if comm.rank == 0:
            comm.abort(NotRetriableError.wrapping(error) if isinstance(error, NOT_RETRIABLE) else error)
            return None
        return comm.allgather(1)

    peer = run_ranks(2, fn)[1]
    assert isinstance(peer, CommError) and from_peer(peer) is deterministic, peer
