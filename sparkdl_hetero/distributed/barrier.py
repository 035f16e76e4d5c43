"""Barrier-mode training (``mode="barrier"``): one long-running task per worker, the reduction over sockets.

The validated input is repartitioned into ``numWorkers`` partitions and handed to one barrier task each
(``mapInArrow(..., barrier=True)``); every task keeps its rows in memory and a full replica of the parameters
(through the :class:`~sparkdl_hetero.nn.objective.Objective` / ``Replica`` interface only). The tasks meet once
through ``BarrierTaskContext.allGather`` (address, port, and rank 0's fresh job secret), open an authenticated
mesh (:mod:`.comm`) and from then on never talk to Spark: each step is local forward/backward, one all-reduce,
and the same update on every replica, so the replicas stay bit-identical.

Mini-batch solvers (``sgd``, ``momentum``, ``adam``): the global batch ``batchSize`` is split among the workers in
proportion to their measured compute throughput (``balance=True``; measured every step, the median of the last
:data:`THROUGHPUT_WINDOW` steps at the current split -- and re-split when that shortens the predicted step by more
than :data:`REBALANCE_GAIN` and by more than the measurement noise allows (:func:`balanced_shares`), first after
:data:`FIRST_MEASUREMENTS` steps at a split (the first re-split only by more than :data:`FIRST_REBALANCE_GAIN`),
then every :data:`REBALANCE_EVERY` steps; a re-split restarts the measurements, since a rank's throughput depends on
its share through fixed per-step costs) or to their number of rows (``balance=False``: plain synchronous training).
Each worker sends the *sum* of its samples' gradients with its sample count; the all-reduced sum divided by the
total count is exactly the mean gradient of the global batch. Throughputs ride in the same vector (one slot per
rank), so every rank computes the same split. ``syncEvery=k>1``: k local steps on each worker, then the weights are
averaged, weighted by the samples each worker used (local SGD / FedAvg; shares then stay proportional to the rows,
throughputs are not exchanged between averagings). An epoch is ``ceil(rows / batchSize)`` global steps.
``validationFraction``: each worker holds out that share of its rows; the all-reduced validation loss after each
epoch drives early stopping with ``patience`` -- every rank takes the same decision, so all stop together, and the
best weights are returned.

Full-batch solvers: ``gd`` (``w -= lr * mean gradient``) and ``l-bfgs`` -- every task runs the same L-BFGS
on the all-reduced full-batch loss and gradient (no driver round trip per iteration), with the stopping rules of
:mod:`.lbfgs` shared with the treeAggregate mode.

Checkpoints (rank 0 writes, every ``checkpointInterval`` steps, to ``checkpointDir`` -- a directory every executor
can read, as Spark's own checkpoint directory) let a retried barrier stage resume where it was. When Spark gives up
on the stage (e.g. ``spark.task.maxFailures=1`` in local mode), the driver re-runs the job up to
:data:`DRIVER_RETRIES` times, again resuming from the checkpoint; input and divergence errors are not retried.
``config.straggler`` ({rank: factor}) slows a worker by pausing ``(factor - 1)`` x its compute time per step, busy
in a ``sched_yield`` loop (see :func:`_pause`): a benchmarking aid reproducing a slow device. Testing aid: the Spark
local property ``sparkdl_hetero.injectFault = "rank:step:marker-file"`` makes that rank raise at that step once (the
marker file records that the fault happened; retried attempts run normally).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..nn.objective import Objective
from ..nn.optim import learning_rate, make_updater
from .checkpoint import Checkpoint, load_compatible, save_checkpoint
from .comm import CommError, Communicator, new_secret
from .config import TrainConfig, TrainingDivergedError, TrainResult
from .data import prepare
from .executor import CHUNK_ROWS, blas_limit
from .lbfgs import minimize_lbfgs

REBALANCE_EVERY = 10  # steps between re-splits of the global batch
REBALANCE_GAIN = 0.01  # a re-split is applied only if it shortens the predicted step by this fraction...
FIRST_REBALANCE_GAIN = 0.2  # ...or by this much at the first re-split, e.g. for a straggler
WARMUP_STEPS = 2  # steps not measured (they include one-off costs)
FIRST_MEASUREMENTS = 5  # the first re-split takes the median of this many steps: one slow step does not move rows
THROUGHPUT_WINDOW = 10  # a rank's throughput is the median of its last this many steps' measurements
NOISE_MARGIN = 5.0  # x (MAD / median) / sqrt(window): ~2 standard errors of the ratio of two ranks' medians
FAULT_PROPERTY = "sparkdl_hetero.injectFault"
_OUT_SCHEMA = "rank int, meta string, weights binary"
DRIVER_RETRIES = 2  # barrier jobs re-run by the driver after Spark gave up (each resumes from the checkpoint)
_NOT_RETRIED = ("ValueError", "FloatingPointError", "replicas diverged")  # deterministic: a retry fails again


class InjectedFault(RuntimeError):
    """Raised by the testing aid ``sparkdl_hetero.injectFault``."""


def split_batch(batch: int, weights: np.ndarray) -> np.ndarray:
    """``batch`` split in proportion to ``weights`` (largest remainder), each share at least 1 when possible."""
    w = np.maximum(np.asarray(weights, dtype=np.float64), 0.0)
    k = len(w)
    if batch < k or not np.isfinite(w).all() or w.sum() <= 0:
        w = np.ones(k)
    floor = min(1, batch // k)
    rest = batch - floor * k
    exact = rest * w / w.sum()
    shares = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - shares), kind="stable")
    shares[order[:rest - int(shares.sum())]] += 1
    return shares + floor


def rebalance(shares: np.ndarray, throughput: np.ndarray, min_gain: float = REBALANCE_GAIN) -> np.ndarray:
    """The split of ``sum(shares)`` in proportion to ``throughput``, taken only if it shortens the predicted step
    (the slowest rank's share / throughput) by more than ``min_gain``: measurement noise between equally fast
    workers does not move rows back and forth, each move costing the slower rank's time."""
    new = split_batch(int(np.sum(shares)), throughput)
    thr = np.maximum(np.asarray(throughput, dtype=np.float64), 1e-12)
    if np.max(new / thr) < (1.0 - min_gain) * np.max(shares / thr):
        return new
    return shares


def balanced_shares(shares: np.ndarray, samples: np.ndarray, min_gain: float = REBALANCE_GAIN) -> np.ndarray:
    """:func:`rebalance` on the median of per-step throughput ``samples`` (one row per step, one column per rank),
    the predicted gain also having to beat the noise of those medians: ``NOISE_MARGIN`` x the largest relative
    median absolute deviation / sqrt(steps). Equally fast workers then keep an even split on a noisy machine (each
    row moved makes the receiving rank ~3% slower at LeNet's 32 rows); a straggler's gain (25% and more) passes."""
    samples = np.asarray(samples, dtype=np.float64)
    throughput = np.median(samples, axis=0)
    if len(samples) > 1:
        mad = np.median(np.abs(samples - throughput), axis=0) / np.maximum(throughput, 1e-12)
        min_gain = max(min_gain, NOISE_MARGIN * float(np.max(mad)) / math.sqrt(len(samples)))
    return rebalance(shares, throughput, min_gain)


def _pause(seconds: float) -> None:
    """Stay busy for ``seconds``, yielding the core in a loop (the straggler emulation).
    Not a sleep: after sleeping, this machine's next compute step ran ~30% slower (cold caches, an idle vCPU),
    making a "3x" worker ~4x slower alone; a slow device is busy while it computes. ``sched_yield`` releases the GIL
    (the socket reader threads keep draining) and lets any other runnable process have the core."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        os.sched_yield()


def _peak_rss_mb() -> float:
    """Peak resident memory of this process (the Python worker holding the data), in MiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else 0.0


class _Cursor:
    """Walks a worker's rows in a fresh permutation per pass (seeded by seed, rank and pass)."""

    def __init__(self, n: int, seed: int, rank: int, start: int) -> None:
        self.n, self.seed, self.rank, self.passes = n, seed, rank, start
        self.perm = self._perm()
        self.pos = 0

    def _perm(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.rank, self.passes]).permutation(self.n)

    def take(self, b: int) -> np.ndarray:
        out = []
        while b > 0 and self.n:
            if self.pos == self.n:
                self.passes += 1
                self.perm, self.pos = self._perm(), 0
            k = min(b, self.n - self.pos)
            out.append(self.perm[self.pos:self.pos + k])
            self.pos += k
            b -= k
        if not out:
            return np.zeros(0, np.int64)
        return np.sort(out[0] if len(out) == 1 else np.concatenate(out))  # rows in memory order


class BarrierWorker:
    """One rank's training loop over a connected :class:`Communicator`; independent of Spark (tests run it in
    threads). ``x``/``y`` are this worker's rows."""

    def __init__(self, comm: Communicator, objective: Objective, config: TrainConfig, x: np.ndarray,
                 y: np.ndarray, initial_weights: np.ndarray, fault_step: int = -1) -> None:
        self.comm, self.objective, self.config = comm, objective, config
        self.rank, self.world = comm.rank, comm.world_size
        self.dtype = np.dtype(config.dtype)
        self.replica = objective.replica(config.backend, self.dtype, config.seed)
        self.nw = objective.num_weights
        self.fault_step = fault_step
        n = len(y)
        nval = int(round(n * config.validationFraction)) if config.validationFraction > 0 else 0
        order = np.random.default_rng([config.seed, 7919, self.rank]).permutation(n)
        val, train = np.sort(order[:nval]), np.sort(order[nval:])
        self.x, self.y = (x[train], y[train]) if nval else (x, y)
        self.xv, self.yv = (x[val], y[val]) if nval else (x[:0], y[:0])
        self.weights = np.asarray(initial_weights, dtype=np.float64).copy()
        self.iteration = 0
        self.history: list[float] = []
        self.extra: dict = {}
        self.updater_state: dict = {}
        self.straggle = float({int(k): v for k, v in dict(config.straggler).items()}.get(self.rank, 1.0))
        if self.straggle < 1.0:
            raise ValueError(f"straggler factors must be >= 1, got {self.straggle} for rank {self.rank}")
        # per-step buffers, allocated once: the replica's weights, the vector all-reduced every step and its sum
        self._w_model = np.empty(self.nw, self.dtype)
        self._reduced = np.zeros(self.nw + 2 + self.world, self.dtype)
        self._summed = np.empty_like(self._reduced)
        # timings of this rank
        self.step_seconds: list[float] = []
        self.compute_seconds = 0.0
        self.comm_seconds = 0.0
        self.samples = 0
        self.started = time.perf_counter()
        # all-reduced counts, identical on every rank
        self.train_rows = 0
        self.val_rows = 0

    # ---- pieces ----------------------------------------------------------------------------------------
    def _gradient_sum(self, idx: np.ndarray | None) -> tuple[np.ndarray, float, int]:
        """(sum of per-sample gradients, sum of losses, count) over this worker's rows ``idx`` (None: all), at
        the current weights, straggler delay included."""
        t0 = time.perf_counter()
        rep = self.replica
        np.copyto(self._w_model, self.weights, casting="same_kind")
        rep.set_weights(self._w_model)
        rep.zero_grad()
        m = len(self.y) if idx is None else len(idx)
        loss = 0.0
        for lo in range(0, m, CHUNK_ROWS):
            hi = min(m, lo + CHUNK_ROWS)
            sel = slice(lo, hi) if idx is None else idx[lo:hi]
            loss += rep.compute_gradient(self.x[sel], self.y[sel], scale=float(hi - lo)) * (hi - lo)
        g = rep.get_gradient() if m else np.zeros(self.nw, self.dtype)
        elapsed = time.perf_counter() - t0
        if self.straggle > 1.0:
            _pause((self.straggle - 1.0) * elapsed)
        self.compute_seconds += time.perf_counter() - t0
        self.samples += m
        return g, loss, m

    def _allreduce(self, v: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        t0 = time.perf_counter()
        out = self.comm.allreduce(v, self.config.allReduce, out)
        self.comm_seconds += time.perf_counter() - t0
        return out

    def reduced_sums(self, idx: np.ndarray | None) -> tuple[np.ndarray, float, int, np.ndarray]:
        """The gradient sum (in the model's dtype) and loss sum over every worker's selected rows, the total
        count, and every rank's compute throughput for this step (samples/s, float64) -- identical on all ranks.
        The gradient sum is a view of the all-reduce's output buffer, which the next call overwrites."""
        c0 = self.compute_seconds
        g, loss, m = self._gradient_sum(idx)
        v, nw = self._reduced, self.nw
        v[:nw] = g
        v[nw:] = 0
        v[nw] = loss
        v[nw + 1] = m
        v[nw + 2 + self.rank] = m / max(self.compute_seconds - c0, 1e-9)
        out = self._allreduce(v, self._summed)
        total = int(round(float(out[nw + 1])))
        if total == 0:
            raise ValueError("no worker has rows to train on")
        return out[:nw], float(out[nw]), total, out[nw + 2:].astype(np.float64)

    def combined_gradient(self, idx: np.ndarray | None) -> tuple[np.ndarray, float, int, np.ndarray]:
        """:meth:`reduced_sums` as means: the mean gradient (float64) and mean loss over every worker's selected
        rows, the total count, and every rank's throughput."""
        g, loss, total, thr = self.reduced_sums(idx)
        mean = g.astype(np.float64)
        mean /= total
        return mean, loss / total, total, thr

    def _objective(self, loss_sum: float, g_sum: np.ndarray, n: int) -> tuple[float, np.ndarray, float]:
        """(mean loss + L2, g, s) from ``n`` samples' loss and gradient sums, ``s * g`` being the mean gradient
        + L2: the updater folds ``s = 1 / n`` into its first pass over the sum; with ``regParam`` the float64 mean
        gradient is formed here."""
        n = max(n, 1)
        if self.config.regParam:
            f, g = self._regularized(loss_sum / n, g_sum.astype(np.float64) / n)
            return f, g, 1.0
        return loss_sum / n, g_sum, 1.0 / n

    def _regularized(self, f: float, g: np.ndarray) -> tuple[float, np.ndarray]:
        reg = self.config.regParam
        if reg:
            g = (g + reg * self.weights).astype(g.dtype, copy=False)
            f += 0.5 * reg * float(self.weights @ self.weights)
        return f, g

    def _check_finite(self, f: float) -> None:
        if not math.isfinite(f):
            i = self.iteration + 1  # the iteration being computed, numbered from 1 as in treeAggregate mode
            raise TrainingDivergedError(f"the loss became {f} at iteration {i} ({self.config.solver}, stepSize "
                                        f"{self.config.stepSize}); training stopped", None, i, list(self.history))

    def _validation(self) -> tuple[float, float]:
        """All-reduced (mean loss, accuracy) on the held-out rows at the current weights."""
        rep = self.replica
        rep.set_weights(self.weights.astype(self.dtype))
        loss = correct = 0.0
        for lo in range(0, len(self.yv), CHUNK_ROWS):
            xb, yb = self.xv[lo:lo + CHUNK_ROWS], self.yv[lo:lo + CHUNK_ROWS]
            rep.zero_grad()
            loss += rep.compute_gradient(xb, yb) * len(yb)
            correct += float(np.sum(np.argmax(rep.predict(xb), axis=1) == yb))
        out = self._allreduce(np.array([loss, correct, len(self.yv)], dtype=np.float64))
        return float(out[0] / out[2]), float(out[1] / out[2])

    def _maybe_fault(self) -> None:
        if self.iteration == self.fault_step:
            raise InjectedFault(f"injected fault on rank {self.rank} at step {self.iteration}")

    def _checkpoint_due(self) -> bool:
        c = self.config
        return self.rank == 0 and bool(c.checkpointDir) and self.iteration % c.checkpointInterval == 0

    def _checkpoint(self, force: bool = False) -> None:
        c = self.config
        if self.rank == 0 and c.checkpointDir and (force or self._checkpoint_due()):
            save_checkpoint(c.checkpointDir, Checkpoint(self.weights, self.iteration, self.history,
                                                        self.updater_state, c.solver, self.extra))

    def restore(self) -> None:
        """Continue from the latest compatible checkpoint (every rank reads the same one; checked)."""
        c = self.config
        ckpt = load_compatible(c.checkpointDir, c.solver, self.nw) if c.checkpointDir else None
        if ckpt is not None:
            self.weights = ckpt.weights.astype(np.float64)
            self.iteration, self.history = ckpt.iteration, list(ckpt.history)
            self.updater_state, self.extra = dict(ckpt.updater_state), dict(ckpt.extra)
        digests = self.comm.allgather(self.digest())
        if len(set(digests)) != 1:
            raise RuntimeError(f"workers started from different states (checkpoint digests {digests}); "
                               f"is checkpointDir {c.checkpointDir!r} on a file system every executor shares?")

    def digest(self) -> str:
        return hashlib.sha256(self.weights.tobytes()).hexdigest()[:16] + f"@{self.iteration}"

    # ---- solvers ---------------------------------------------------------------------------------------
    def run(self) -> str:
        """Train; returns why training stopped."""
        counts = self.comm.allreduce(np.array([len(self.y), len(self.yv)], dtype=np.float64), "hub")
        self.train_rows, self.val_rows = int(counts[0]), int(counts[1])
        if self.train_rows == 0:
            raise ValueError("no worker has training rows")
        if self.config.solver == "l-bfgs":
            return self.lbfgs()
        if self.config.solver == "gd":
            return self.gd()
        return self.minibatch()

    def minibatch(self) -> str:
        c = self.config
        batch = c.batchSize
        steps_per_epoch = max(1, math.ceil(self.train_rows / batch))
        epochs = c.epochs if c.epochs > 0 else c.maxIter
        total = epochs * steps_per_epoch
        # float64 state: float32 Adam moments saved ~0.08 ms per LeNet-5 step but lowered the 3-epoch test accuracy
        # in 7 of 9 paired seeds (same batches, balance off; mean -0.0015, at most -0.0054)
        updater = make_updater(c, np.float64)
        if self.updater_state:
            updater.load_state_dict(self.updater_state)
        ex = self.extra
        rows = self.comm.allgather(len(self.y))
        throughput = np.asarray(ex.get("throughput", rows), dtype=np.float64)
        window = np.empty((THROUGHPUT_WINDOW, self.world))  # the last steps' throughputs at the current split, a ring
        window[0] = throughput
        measurements = int("throughput" in ex)  # how many the ring has seen since the last re-split
        shares = split_batch(batch, throughput if c.balance else rows)
        loss_sum, count = float(ex.get("epochLossSum", 0.0)), int(ex.get("epochCount", 0))
        best = (float(ex.get("bestLoss", math.inf)), int(ex.get("badEpochs", 0)))
        best_weights = self.weights.copy()
        measured = "throughput" in ex
        cursor = _Cursor(len(self.y), c.seed, self.rank, self.iteration)
        k = max(1, c.syncEvery)
        local_samples = 0
        stop = f"{epochs} epochs"
        epoch_started = time.perf_counter()

        def snapshot() -> None:  # what a checkpoint holds (taken when one is written, not every step)
            nonlocal throughput
            if measurements:
                throughput = np.median(window[:min(measurements, THROUGHPUT_WINDOW)], axis=0)
            self.updater_state = updater.state_dict()
            self.extra.update(epochLossSum=loss_sum, epochCount=count, bestLoss=best[0], badEpochs=best[1],
                              throughput=[float(v) for v in throughput], shares=[int(s) for s in shares])

        while self.iteration < total:
            self._maybe_fault()
            t = self.iteration
            t0 = time.perf_counter()
            idx = cursor.take(int(shares[self.rank]))
            lr = learning_rate(c, t, total)
            if k == 1:
                g, loss, n, thr = self.reduced_sums(idx)
                f, g, scale = self._objective(loss, g, n)
                self._check_finite(f)
                updater.step(self.weights, g, lr, scale)
            else:  # a local step; the weights are averaged every k steps
                g, loss, n = self._gradient_sum(idx)
                f, g, scale = self._objective(loss, g, n)
                if n:
                    updater.step(self.weights, g, lr, scale)
                local_samples += n
                if (t + 1) % k == 0 or t + 1 == total:
                    self._average(local_samples)
                    local_samples = 0
            self.iteration += 1
            self.step_seconds.append(time.perf_counter() - t0)
            loss_sum += f * n
            count += n
            if k == 1 and self.iteration > WARMUP_STEPS:  # the first steps carry one-off costs: not measured
                np.maximum(thr, 1e-9, out=window[measurements % THROUGHPUT_WINDOW])
                measurements += 1
                due = measurements == FIRST_MEASUREMENTS or (
                    measurements > FIRST_MEASUREMENTS and self.iteration % REBALANCE_EVERY == 0)
                if c.balance and due:
                    seen = window[:min(measurements, THROUGHPUT_WINDOW)]
                    new = balanced_shares(shares, seen, REBALANCE_GAIN if measured else FIRST_REBALANCE_GAIN)
                    measured = True
                    if not np.array_equal(new, shares):  # a rank's throughput depends on its share (fixed per-step
                        throughput = np.median(seen, axis=0)  # costs): the ring restarts at the new split
                        shares, measurements = new, 0
            if self.iteration % steps_per_epoch == 0:
                if k > 1:  # the epoch's mean loss over every worker's samples
                    tot = self._allreduce(np.array([loss_sum, count], dtype=np.float64))
                    loss_sum, count = float(tot[0]), int(tot[1])
                self.history.append(loss_sum / max(count, 1))
                loss_sum, count = 0.0, 0
                # the epoch's training steps, validation excluded (a resumed epoch: since the resume)
                self.extra.setdefault("epochSeconds", []).append(time.perf_counter() - epoch_started)
                if self.val_rows:
                    vloss, vacc = self._validation()
                    self.extra.setdefault("validation", []).append([vloss, vacc])
                    if vloss < best[0] - c.tol:
                        best, best_weights = (vloss, 0), self.weights.copy()
                    else:
                        best = (best[0], best[1] + 1)
                    if best[1] >= c.patience:
                        stop = f"early stopping: validation loss did not improve for {c.patience} epochs"
                        break
                epoch_started = time.perf_counter()
            if self.iteration % k == 0 and self._checkpoint_due():
                snapshot()
                self._checkpoint()
        snapshot()  # for the final checkpoint and the summary
        if self.val_rows and best[1] > 0:  # the best validated weights, not the last ones
            self.weights = best_weights
        self.extra["finalShares"] = [int(s) for s in shares]
        return stop

    def _average(self, local_samples: int) -> None:
        t0 = time.perf_counter()
        mean, _ = self.comm.weighted_mean(self.weights * local_samples, float(max(local_samples, 0)),
                                          self.config.allReduce)
        self.weights = np.asarray(mean, dtype=np.float64)
        self.comm_seconds += time.perf_counter() - t0

    def full_batch(self) -> tuple[float, np.ndarray]:
        """Mean loss + L2 and its gradient over every worker's training rows, at the current weights."""
        g, f, _, _ = self.combined_gradient(None)
        return self._regularized(f, g)

    def gd(self) -> str:
        c = self.config
        updater = make_updater(c)
        stop = "max iterations"
        while self.iteration < c.maxIter:
            self._maybe_fault()
            t0 = time.perf_counter()
            i = self.iteration
            f, g = self.full_batch()
            self._check_finite(f)
            prev = self.weights.copy()
            updater.step(self.weights, g, learning_rate(c, i, c.maxIter))
            self.iteration += 1
            self.history.append(f)
            self.step_seconds.append(time.perf_counter() - t0)
            self._checkpoint()
            diff = float(np.linalg.norm(self.weights - prev))
            if i > 0 and diff < c.tol * max(float(np.linalg.norm(self.weights)), 1.0):
                stop = "weights converged"
                break
        return stop

    def lbfgs(self) -> str:
        c = self.config
        t_iter = [time.perf_counter()]

        def fun(w: np.ndarray) -> tuple[float, np.ndarray]:
            self.weights = np.array(w, dtype=np.float64)
            f, g = self.full_batch()
            self._check_finite(f)
            return f, g

        def on_iteration(x: np.ndarray, f: float) -> None:
            self.iteration += 1
            self.weights = x
            now = time.perf_counter()
            self.step_seconds.append(now - t_iter[0])
            t_iter[0] = now
            self._checkpoint()
            self._maybe_fault()

        remaining = c.maxIter - self.iteration
        if remaining <= 0:
            return "max iterations (resumed from a finished checkpoint)"
        x, _, stop = minimize_lbfgs(fun, self.weights.copy(), remaining, c.tol, self.history, on_iteration)
        if self.iteration == 0:
            self.weights = x
        return stop

    # ---- summary ---------------------------------------------------------------------------------------
    def summary(self) -> dict:
        """This rank's timings."""
        wall = time.perf_counter() - self.started
        steps = self.step_seconds
        busy = self.compute_seconds + self.comm_seconds
        return {"rank": self.rank, "rows": int(len(self.y)), "steps": len(steps),
                "stepMean": float(np.mean(steps)) if steps else 0.0, "stepP95": _percentile(steps, 95),
                "computeSeconds": self.compute_seconds, "commSeconds": self.comm_seconds,
                "computeShare": self.compute_seconds / busy if busy else 0.0,
                "commShare": self.comm_seconds / busy if busy else 0.0,
                "samples": self.samples, "samplesPerSecond": self.samples / max(wall, 1e-9),
                "computeSamplesPerSecond": self.samples / max(self.compute_seconds, 1e-9),
                "bytesSent": self.comm.bytes_sent, "seconds": wall, "peakRssMB": _peak_rss_mb(),
                "dataMB": (self.x.nbytes + self.xv.nbytes) / 2**20}


def train_worker(comm: Communicator, objective: Objective, config: TrainConfig, x: np.ndarray, y: np.ndarray,
                 initial_weights: np.ndarray, fault_step: int = -1) -> tuple[BarrierWorker, str, list[dict]]:
    """Run one rank to the end: restore, train, check the replicas agree, gather every rank's summary."""
    worker = BarrierWorker(comm, objective, config, x, y, initial_weights, fault_step)
    worker.restore()
    stop = worker.run()
    worker._checkpoint(force=True)
    digests = comm.allgather(worker.digest())
    if len(set(digests)) != 1:
        raise RuntimeError(f"replicas diverged: weight digests per rank {digests}")
    summaries = comm.allgather(worker.summary())
    return worker, stop, summaries


# ---- Spark side ----------------------------------------------------------------------------------------------
def _task_host(ctx: Any) -> str:
    """This executor's address as Spark knows it (sockets bind there, not to every interface)."""
    import socket

    address = ctx.getTaskInfos()[ctx.partitionId()].address
    host = address.rsplit(":", 1)[0] if ":" in address else address
    try:
        return socket.gethostbyname(host)
    except OSError:
        return "127.0.0.1"


def _fault_step(ctx: Any, rank: int) -> int:
    """The testing aid: ``"rank:step:marker"`` makes ``rank`` fail at ``step`` once -- the first task to get
    there creates the marker file, later attempts see it and run normally."""
    spec = ctx.getLocalProperty(FAULT_PROPERTY)
    if not spec:
        return -1
    r, step, marker = spec.split(":", 2)
    if int(r) != rank or os.path.exists(marker):
        return -1
    with open(marker, "w") as f:
        f.write(f"rank {rank} fails at step {step}\n")
    return int(step)


def _barrier_task(batches: Iterator, objective: Objective, config: TrainConfig, initial_weights: np.ndarray,
                  num_features: int) -> Iterator:
    """mapInArrow(barrier=True) body: gather this partition's rows, meet the others, train, rank 0 answers."""
    import pyarrow as pa
    from pyspark import BarrierTaskContext

    ctx = BarrierTaskContext.get()
    rank = ctx.partitionId()
    world = len(ctx.getTaskInfos())
    xs, ys = [], []
    for batch in batches:
        if batch.num_rows:
            xs.append(batch.column(0).flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False))
            ys.append(batch.column(1).to_numpy(zero_copy_only=False).astype(np.int32))
    x = np.concatenate(xs).reshape(-1, num_features) if xs else np.zeros((0, num_features), np.float32)
    y = np.concatenate(ys) if ys else np.zeros(0, np.int32)
    del xs, ys
    comm = Communicator(rank, world, _task_host(ctx), timeout=config.commTimeout,
                        max_elements=objective.num_weights + world + 8)
    try:
        secret = new_secret().hex() if rank == 0 else ""
        infos = [json.loads(s) for s in ctx.allGather(json.dumps(
            {"host": comm.address[0], "port": comm.address[1], "secret": secret}))]
        comm.connect([(i["host"], i["port"]) for i in infos], bytes.fromhex(infos[0]["secret"]))
        diverged: TrainingDivergedError | None = None
        with blas_limit(max(1, int(ctx.cpus()))):
            try:
                worker, stop, summaries = train_worker(comm, objective, config, x, y, initial_weights,
                                                       _fault_step(ctx, rank))
            except TrainingDivergedError as e:  # the loss is all-reduced: every rank stops at the same step
                diverged = e
    except BaseException as e:
        comm.abort(e)
        raise
    comm.close()
    if rank == 0:
        if diverged is not None:  # answered, not raised: the driver raises the same error type as treeAggregate
            meta: dict = {"diverged": str(diverged), "iterations": diverged.iteration, "history": diverged.history}
            weights = b""
        else:
            kept = ("validation", "finalShares", "throughput", "epochSeconds")
            meta = {"history": worker.history, "iterations": worker.iteration, "stop": stop,
                    "workers": summaries, "extra": {k: v for k, v in worker.extra.items() if k in kept}}
            weights = worker.weights.tobytes()
        yield pa.RecordBatch.from_pylist([{"rank": 0, "meta": json.dumps(meta), "weights": weights}],
                                         schema=pa.schema([("rank", pa.int32()), ("meta", pa.string()),
                                                           ("weights", pa.binary())]))


def _stats(meta: dict, config: TrainConfig, world: int, seconds: float) -> dict:
    workers = meta["workers"]
    slowest = min(workers, key=lambda s: s["computeSamplesPerSecond"])
    samples = sum(s["samples"] for s in workers)
    return {"mode": "barrier", "solver": config.solver, "converged": meta["stop"], "numWorkers": world,
            "allReduce": config.allReduce, "balance": config.balance, "syncEvery": config.syncEvery,
            "seconds": seconds, "samples": samples, "samplesPerSecond": samples / max(seconds, 1e-9),
            "trainSeconds": max(s["seconds"] for s in workers),
            "trainSamplesPerSecond": samples / max(max(s["seconds"] for s in workers), 1e-9),
            "straggler": slowest["rank"] if world > 1 else None, "workers": workers, **meta["extra"]}


def fit_barrier(df: Any, features_col: str, label_col: str, objective: Objective, config: TrainConfig,
                initial_weights: np.ndarray) -> TrainResult:
    """Train ``objective`` on ``df`` in barrier mode (see the module docstring)."""
    if config.syncEvery < 1:
        raise ValueError(f"syncEvery must be >= 1, got {config.syncEvery}")
    if not 0.0 <= config.validationFraction < 1.0:
        raise ValueError(f"validationFraction must be in [0, 1), got {config.validationFraction}")
    if config.patience < 1:
        raise ValueError(f"patience must be >= 1, got {config.patience}")
    if config.allReduce not in ("auto", "hub", "ring"):
        raise ValueError(f"allReduce must be one of auto, hub, ring; got {config.allReduce!r}")
    if config.commTimeout <= 0:
        raise ValueError(f"commTimeout must be > 0, got {config.commTimeout}")
    for r, factor in dict(config.straggler).items():
        if float(factor) < 1.0:
            raise ValueError(f"straggler factors must be >= 1, got {factor} for rank {r}")
    world = config.numWorkers or df.sparkSession.sparkContext.defaultParallelism
    if world < 1:
        raise ValueError(f"numWorkers must be >= 1, got {world}")
    for r in dict(config.straggler):
        if not 0 <= int(r) < world:
            raise ValueError(f"straggler rank {r} is not a worker rank (0..{world - 1})")
    topology = objective.topology
    d = topology.num_inputs
    data = prepare(df, features_col, label_col, d, topology.num_outputs)
    sc = data.handles_rdd.context
    try:
        w0 = np.asarray(initial_weights, dtype=np.float64)
        parts = data.arrow_df.repartition(world)
        sc.setJobDescription(f"sparkdl-hetero fit {data.fit_id[:8]}: barrier training on {world} workers")
        started = time.perf_counter()
        failures: list[str] = []
        try:
            while True:
                try:
                    rows = parts.mapInArrow(lambda it: _barrier_task(it, objective, config, w0, d), _OUT_SCHEMA,
                                            barrier=True).collect()
                    break
                except Exception as e:  # Spark gave up on the stage: resume from the checkpoint, a few times
                    cause = _root_cause(e)
                    failures.append(cause)
                    if len(failures) > DRIVER_RETRIES or any(m in cause for m in _NOT_RETRIED):
                        raise RuntimeError(f"barrier training failed after {len(failures)} attempt(s): "
                                           f"{cause}") from e
        finally:
            sc.setJobDescription(None)
        seconds = time.perf_counter() - started
    finally:
        data.release()
    if len(rows) != 1:
        raise RuntimeError(f"barrier training returned {len(rows)} results, expected one from rank 0")
    meta = json.loads(rows[0]["meta"])
    if "diverged" in meta:
        raise TrainingDivergedError(meta["diverged"], None, meta["iterations"], meta["history"])
    weights = np.frombuffer(rows[0]["weights"], dtype=np.float64).copy()
    stats = _stats(meta, config, world, seconds)
    stats["failedAttempts"] = failures
    return TrainResult(weights, meta["history"], meta["iterations"], stats)


def _root_cause(e: Exception) -> str:
    """The Python error inside a Spark failure message (the last traceback line that names an error)."""
    text = str(e)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for marker in ("CommError", "InjectedFault", "FloatingPointError", "ValueError", "RuntimeError",
                   "ExecutorLostFailure", "SparkException", "Error:"):
        hits = [ln for ln in lines if marker in ln]
        if hits:  # Python errors: the innermost (last) line; Spark's: the first, which says what failed
            return (hits[0] if marker in ("ExecutorLostFailure", "SparkException") else hits[-1])[:1000]
    return (lines[0] if lines else repr(e))[:1000]


__all__ = ["BarrierWorker", "CommError", "fit_barrier", "split_batch", "train_worker"]
