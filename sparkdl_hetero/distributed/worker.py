"""One barrier rank's training loop over a connected :class:`~.comm.Communicator`; independent of Spark (tests run
ranks in threads).

Every rank keeps its rows in memory and a full replica of the parameters (through the
:class:`~sparkdl_hetero.nn.objective.Objective` / ``Replica`` interface only) and drives a solver of
:mod:`sparkdl_hetero.nn.solvers`: each step is local forward/backward, one all-reduce, and the same update on every
replica, so the replicas stay bit-identical.

Mini-batch solvers: the global batch ``batchSize`` is split by a :class:`~.balancing.Balancer` (``balance=True``: in
proportion to the measured compute throughputs; ``balance=False``: to the rows). Each worker sends the *sum* of its
samples' gradients with its sample count; the all-reduced sum divided by the total count is exactly the mean
gradient of the global batch. With sample weights the sums are weighted and the count is the weights' sum: the
weighted mean over the global batch, whatever the split. Throughputs ride in the same vector (one slot per rank), so
every rank computes the same split. ``syncEvery=k>1``: k local steps on each worker, then the weights are averaged,
weighted by the samples each worker used (local SGD / FedAvg; shares then stay proportional to the rows, throughputs
are not exchanged between averagings). An epoch is ``ceil(rows / batchSize)`` global steps. Validation rows (a
validation indicator column's, or with ``validationFraction`` that share of each worker's rows, held out): the all-
reduced validation loss after each epoch drives early stopping with ``patience`` -- every rank takes the same
decision, so all stop together, and the best weights are returned.

Model state (batch normalization's running statistics, ``topology.num_state`` values, updated by every training
forward pass and trained by no gradient): after each all-reduce every replica sets its state to the mean of the
replicas' states. With ``syncEvery=1`` the states ride at the end of the all-reduced gradient vector (no second
exchange per step); local steps average them with the weights. The replicas thus end bit-identical, state included
(the digests cover it). Validation passes do not move the state.

Full-batch solvers (``gd``, ``l-bfgs``): every rank runs the same solver on the all-reduced full-batch loss and
gradient (no driver round trip per iteration); with validation rows, the all-reduced validation loss every
``validationInterval`` iterations drives the same early stopping (:class:`~sparkdl_hetero.nn.solvers.EarlyStopping`).

Rank 0 writes checkpoints every ``checkpointInterval`` steps. ``config.straggler`` ({rank: factor}) slows a worker
by pausing ``(factor - 1)`` x its compute time per step, busy in a ``sched_yield`` loop (see :func:`pause`): a
benchmarking aid reproducing a slow device.
"""

from __future__ import annotations

import hashlib
import math
import os
import time

import numpy as np

from ..backends import Backend
from ..nn import solvers
from ..nn.objective import Objective
from ..nn.optim import make_updater
from ..nn.solvers import EarlyStopping, Hooks, SolverState
from .balancing import Balancer, BalancerState
from .checkpoint import Checkpoint, load_compatible, save_checkpoint
from .comm import Communicator
from .config import TrainConfig
from .errors import InjectedFault, ReplicasDivergedError
from .executor import accumulate_gradient, peak_rss_bytes, validation_metrics, validation_sums


def pause(seconds: float) -> None:
    """Stay busy for ``seconds``, yielding the core in a loop (the straggler emulation).
    Not a sleep: after sleeping, the next compute step runs slower (cold caches, an idle vCPU), making a straggler
    slower than its factor; a slow device is busy while it computes. ``sched_yield`` releases the GIL (the socket
    reader threads keep draining) and lets any other runnable process have the core."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        os.sched_yield()


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


Rows = tuple[np.ndarray, np.ndarray, "np.ndarray | None"]  # features, labels, sample weights (None: all 1)


class BarrierWorker:
    """One rank's training loop (see the module docstring). ``x``/``y`` are this worker's rows, ``w`` their
    sample weights (None: unweighted); ``validation``: this worker's validation rows (x, y, w), instead of
    ``validationFraction`` of its rows; ``backend``: what the replica computes on (the caller resolves it for the
    device it was given, e.g. the GPU Spark assigned to the task; None: ``config.backend``)."""

    def __init__(self, comm: Communicator, objective: Objective, config: TrainConfig, x: np.ndarray,
                 y: np.ndarray, initial_weights: np.ndarray, fault_step: int = -1, *, w: np.ndarray | None = None,
                 validation: Rows | None = None, backend: str | Backend | None = None) -> None:
        self.comm, self.objective, self.config = comm, objective, config
        self.rank, self.world = comm.rank, comm.world_size
        self.dtype = np.dtype(config.dtype)
        self.replica = objective.replica(config.backend if backend is None else backend, self.dtype, config.seed)
        self.nw = objective.num_weights
        self.ns = objective.topology.num_state
        self.fault_step = fault_step
        n = len(y)
        nval = int(round(n * config.validationFraction)) if config.validationFraction > 0 and validation is None \
            else 0
        order = np.random.default_rng([config.seed, 7919, self.rank]).permutation(n)
        val, train = np.sort(order[:nval]), np.sort(order[nval:])
        self.x, self.y, self.w = (x[train], y[train], None if w is None else w[train]) if nval else (x, y, w)
        if validation is not None:
            self.xv, self.yv, self.wv = validation
        else:
            self.xv, self.yv, self.wv = (x[val], y[val], None if w is None else w[val]) if nval \
                else (x[:0], y[:0], None)
        self.state = SolverState(np.asarray(initial_weights, dtype=np.float64).copy())
        self.balancer_state: BalancerState | None = None  # a checkpoint's, until the mini-batch loop starts
        self.balancer: Balancer | None = None
        self.early = EarlyStopping()
        self.extra: dict = {}  # reported: per-epoch seconds and validation, the final shares and throughputs
        self.straggle = float({int(k): v for k, v in dict(config.straggler).items()}.get(self.rank, 1.0))
        # per-step buffers, allocated once: the replica's weights, the vector all-reduced every step and its sum
        self._w_model = np.empty(self.nw, self.dtype)
        self._reduced = np.zeros(self.nw + 3 + self.world + self.ns, self.dtype)
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

    @property
    def weights(self) -> np.ndarray:
        return self.state.weights

    @weights.setter
    def weights(self, value: np.ndarray) -> None:
        self.state.weights = value

    def model_state(self) -> np.ndarray:
        """The replica's non-trained state (float64; empty when the topology has none)."""
        if not self.ns:
            return np.zeros(0)
        return np.asarray(self.replica.get_state(), dtype=np.float64)

    @property
    def iteration(self) -> int:
        return self.state.iteration

    @property
    def history(self) -> list[float]:
        return self.state.history

    # ---- pieces ----------------------------------------------------------------------------------------
    def _gradient_sum(self, idx: np.ndarray | None) -> tuple[np.ndarray, float, int, float]:
        """(sum of per-sample gradients, sum of losses, rows, count) over this worker's rows ``idx`` (None: all),
        at the current weights, straggler delay included; weighted sums and the weights' sum as the count when
        the rows have weights (else the count is the rows)."""
        t0 = time.perf_counter()
        rep = self.replica
        np.copyto(self._w_model, self.weights, casting="same_kind")
        rep.set_weights(self._w_model)
        rep.zero_grad()
        m = len(self.y) if idx is None else len(idx)
        loss, count = accumulate_gradient(rep, self.x, self.y, idx, self.w)
        g = rep.get_gradient() if m else np.zeros(self.nw, self.dtype)
        elapsed = time.perf_counter() - t0
        if self.straggle > 1.0:
            pause((self.straggle - 1.0) * elapsed)
        self.compute_seconds += time.perf_counter() - t0
        self.samples += m
        return g, loss, m, count

    def _allreduce(self, v: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        t0 = time.perf_counter()
        out = self.comm.allreduce(v, self.config.allReduce, out)
        self.comm_seconds += time.perf_counter() - t0
        return out

    def reduced_sums(self, idx: np.ndarray | None) -> tuple[np.ndarray, float, float, np.ndarray]:
        """The gradient sum (in the model's dtype) and loss sum over every worker's selected rows, the total
        count (rows, or the weights' sum), and every rank's compute throughput for this step (samples/s,
        float64) -- identical on all ranks. The gradient sum is a view of the all-reduce's output buffer, which
        the next call overwrites. The replicas' model states ride after the throughputs; every replica leaves
        with their mean."""
        c0 = self.compute_seconds
        g, loss, m, count = self._gradient_sum(idx)
        v, nw = self._reduced, self.nw
        v[:nw] = g
        v[nw:] = 0
        v[nw] = loss
        v[nw + 1] = count
        v[nw + 2] = m
        v[nw + 3 + self.rank] = m / max(self.compute_seconds - c0, 1e-9)
        s0 = nw + 3 + self.world  # the model state's slots
        if self.ns:
            v[s0:] = self.replica.get_state()
        out = self._allreduce(v, self._summed)
        if int(round(float(out[nw + 2]))) == 0:
            raise ValueError("no worker has rows to train on")
        if self.ns:
            self.replica.set_state(out[s0:] / self.world)
        total = float(out[nw + 1]) if self.w is not None else float(round(float(out[nw + 1])))
        return out[:nw], float(out[nw]), total, out[nw + 3:s0].astype(np.float64)

    def _validation(self) -> tuple[float, float]:
        """All-reduced (mean loss, accuracy or RMSE) on the validation rows of every worker at the current
        weights (weighted means with sample weights)."""
        rep = self.replica
        rep.set_weights(self.weights.astype(self.dtype))
        state = self.model_state()
        sums = validation_sums(rep, self.xv, self.yv, self.wv)
        if self.ns:  # the validation's forward passes moved the state: it must not learn from validation rows
            rep.set_state(state)
        out = self._allreduce(sums)
        return validation_metrics(out, not self.objective.topology.loss_layer.class_labels)

    def _maybe_fault(self, iteration: int) -> None:
        if iteration == self.fault_step:
            raise InjectedFault(f"injected fault on rank {self.rank} at step {iteration}")

    def _checkpoint_due(self, iteration: int) -> bool:
        c = self.config
        return self.rank == 0 and bool(c.checkpointDir) and iteration % c.checkpointInterval == 0

    def _mode_state(self) -> dict:
        """This mode's checkpointed state besides the solver's (JSON)."""
        out: dict = {k: self.extra[k] for k in ("validation", "epochSeconds") if k in self.extra}
        if self.balancer is not None:
            self.balancer_state = self.balancer.snapshot()
        if self.balancer_state is not None:
            out.update(self.balancer_state.to_json())
        out.update(bestLoss=self.early.best_loss, badEpochs=self.early.bad_points)
        return out

    def checkpoint(self, force: bool = False) -> None:
        """Rank 0 saves the state when a checkpoint is due (``force``: now)."""
        c = self.config
        if self.rank == 0 and c.checkpointDir and (force or self._checkpoint_due(self.iteration)):
            save_checkpoint(c.checkpointDir, Checkpoint.of(self.state, c.solver, self._mode_state(),
                                                            self.model_state()))

    def restore(self) -> None:
        """Continue from the latest compatible checkpoint (every rank reads the same one; checked)."""
        c = self.config
        ckpt = load_compatible(c.checkpointDir, c.solver, self.nw) if c.checkpointDir else None
        if ckpt is not None:
            if ckpt.model_state.size != self.ns:
                raise ValueError(f"checkpointDir {c.checkpointDir!r} holds a checkpoint with {ckpt.model_state.size} "
                                 f"model state values; topology {self.objective.topology.spec!r} has {self.ns} "
                                 f"(use another checkpointDir or delete it)")
            self.state = ckpt.solver_state()
            if self.ns:
                self.replica.set_state(ckpt.model_state)
            ex = ckpt.extra
            if "shares" in ex:
                self.balancer_state = BalancerState.from_json(ex)
            self.early = EarlyStopping(float(ex.get("bestLoss", math.inf)), int(ex.get("badEpochs", 0)))
            self.extra.update({k: list(ex[k]) for k in ("validation", "epochSeconds") if k in ex})
        digests = self.comm.allgather(self.digest())
        if len(set(digests)) != 1:
            raise ReplicasDivergedError(f"workers started from different states (checkpoint digests {digests}); "
                                        f"is checkpointDir {c.checkpointDir!r} on a file system every executor "
                                        f"shares?")

    def digest(self) -> str:
        """The weights, model state and iteration in a few characters (replicas must agree on it)."""
        h = hashlib.sha256(self.weights.tobytes())
        h.update(self.model_state().tobytes())
        return h.hexdigest()[:16] + f"@{self.iteration}"

    # ---- solvers ---------------------------------------------------------------------------------------
    def run(self) -> str:
        """Train; returns why training stopped."""
        counts = self.comm.allreduce(np.array([len(self.y), len(self.yv)], dtype=np.float64), "hub")
        self.train_rows, self.val_rows = int(counts[0]), int(counts[1])
        if self.train_rows == 0:
            raise ValueError("no worker has training rows")
        if self.early.weights is None:  # resumed past the best point: the resumed weights stand in for it
            self.early.weights, self.early.state = self.weights.copy(), self.model_state()
        stop = self._full_batch() if self.config.solver in ("gd", "l-bfgs") else self.minibatch()
        best = self.early.best() if self.val_rows else None
        if best is not None:  # the best validated weights, not the last ones
            self.weights = best[0]
            if self.ns:
                self.replica.set_state(best[1])
        return stop

    def _validate(self, unit: str) -> str:
        """One validation point: the all-reduced validation loss and metric, recorded, then early stopping's
        reason to stop (``unit`` names the points), or ``""``; every rank takes the same decision."""
        vloss, vmetric = self._validation()
        self.extra.setdefault("validation", []).append([vloss, vmetric])
        return self.early.update(vloss, self.config, self.weights, self.model_state(), unit)

    def _evaluate(self, w: np.ndarray, _iteration: int | None) -> tuple[float, np.ndarray, float]:
        """The solvers' full-batch callback: sums over every worker's training rows at ``w``."""
        if w is not self.weights:  # an l-bfgs trial point
            self.weights = np.array(w, dtype=np.float64)
        g, loss, n, _ = self.reduced_sums(None)
        return loss, g, n

    def _full_batch(self) -> str:
        started = [time.perf_counter()]  # of the current iteration, its checkpoint excluded

        def start(iteration: int) -> None:
            self._maybe_fault(iteration)
            started[0] = time.perf_counter()

        def timed(_state: SolverState, _loss: float, _count: float) -> None:
            self.step_seconds.append(time.perf_counter() - started[0])

        def validate(iteration: int, _loss: float) -> str:
            if not self.val_rows or (iteration + 1) % self.config.validationInterval:
                return ""
            return self._validate("validations")

        hooks = Hooks(iteration_start=start, iteration_end=timed, checkpoint_due=self._checkpoint_due,
                      checkpoint=lambda _state: self.checkpoint(force=True), epoch_end=validate)
        solve = solvers.lbfgs if self.config.solver == "l-bfgs" else solvers.gd
        return solve(self.state, self.config, self._evaluate, hooks, keep_last_good=False)

    def minibatch(self) -> str:
        c = self.config
        steps_per_epoch = max(1, math.ceil(self.train_rows / c.batchSize))
        total = solvers.epochs_of(c) * steps_per_epoch
        k = max(1, c.syncEvery)
        # float64 state: float32 Adam moments were a little faster per step but lowered the test accuracy in most
        # paired seeds (same batches, balance off)
        updater = make_updater(c, np.float64)
        balancer = self.balancer = Balancer(c.batchSize, self.comm.allgather(len(self.y)), c.balance,
                                            self.balancer_state)
        cursor = _Cursor(len(self.y), c.seed, self.rank, self.iteration)
        local = [0.0, 0.0, np.zeros(0)]  # count since the last averaging, this step's start, its throughputs
        epoch_started = [time.perf_counter()]

        def step(w: np.ndarray, t: int) -> tuple[float, np.ndarray, float]:
            local[1] = time.perf_counter()
            idx = cursor.take(int(balancer.shares[self.rank]))
            if k == 1:
                g, loss, n, local[2] = self.reduced_sums(idx)
            else:  # a local step; the weights are averaged every k steps
                g, loss, _, n = self._gradient_sum(idx)
            return loss, g, n

        def step_end(state: SolverState, loss: float, n: float) -> None:
            if k > 1:
                local[0] += n
                if state.iteration % k == 0 or state.iteration == total:
                    self._average(local[0])
                    local[0] = 0.0
            self.step_seconds.append(time.perf_counter() - local[1])
            if k == 1:
                balancer.record(local[2], state.iteration)

        def epoch_loss(loss_sum: float, count: float) -> tuple[float, float]:
            if k == 1:
                return loss_sum, count
            tot = self._allreduce(np.array([loss_sum, count], dtype=np.float64))  # over every worker's samples
            return float(tot[0]), float(tot[1])

        def epoch_end(_epoch: int, _loss: float) -> str:
            # the epoch's training steps, validation excluded (a resumed epoch: since the resume)
            self.extra.setdefault("epochSeconds", []).append(time.perf_counter() - epoch_started[0])
            reason = self._validate("epochs") if self.val_rows else ""
            epoch_started[0] = time.perf_counter()
            return reason

        hooks = Hooks(iteration_start=self._maybe_fault, iteration_end=step_end,
                      checkpoint_due=lambda it: it % k == 0 and self._checkpoint_due(it),
                      checkpoint=lambda _state: self.checkpoint(force=True), epoch_loss=epoch_loss,
                      epoch_end=epoch_end)
        stop = solvers.minibatch(self.state, c, steps_per_epoch, step, hooks, updater=updater,
                                 check_finite=k == 1)
        snapshot = balancer.snapshot()
        self.extra["throughput"] = snapshot.throughput
        self.extra["finalShares"] = snapshot.shares
        self.extra["stepLoss"] = self.state.step_history
        self.extra["stepsPerEpoch"] = steps_per_epoch
        return stop

    def _average(self, local_samples: float) -> None:
        t0 = time.perf_counter()
        mean, _ = self.comm.weighted_mean(self.weights * local_samples, float(max(local_samples, 0)),
                                          self.config.allReduce)
        self.weights = np.asarray(mean, dtype=np.float64)
        if self.ns:  # every replica takes the mean state, as after a synchronized step
            self.replica.set_state(self.comm.allreduce(self.model_state(), self.config.allReduce) / self.world)
        self.comm_seconds += time.perf_counter() - t0

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
                "bytesSent": self.comm.bytes_sent, "seconds": wall, "peakRssMB": peak_rss_bytes() / 2**20,
                "dataMB": (self.x.nbytes + self.xv.nbytes) / 2**20}


def train_worker(comm: Communicator, objective: Objective, config: TrainConfig, x: np.ndarray, y: np.ndarray,
                 initial_weights: np.ndarray, fault_step: int = -1, *, w: np.ndarray | None = None,
                 validation: Rows | None = None,
                 backend: str | Backend | None = None) -> tuple[BarrierWorker, str, list[dict]]:
    """Run one rank to the end: restore, train, check the replicas agree, gather every rank's summary (``w``,
    ``validation``, ``backend``: see :class:`BarrierWorker`)."""
    worker = BarrierWorker(comm, objective, config, x, y, initial_weights, fault_step, w=w, validation=validation,
                           backend=backend)
    worker.restore()
    stop = worker.run()
    worker.checkpoint(force=True)
    digests = comm.allgather(worker.digest())
    if len(set(digests)) != 1:
        raise ReplicasDivergedError(f"replicas diverged: weight digests per rank {digests}")
    summaries = comm.allgather(worker.summary())
    return worker, stop, summaries
