"""Training through ``treeAggregate``: the optimizer runs on the driver, executors compute gradient sums.

The objective (with a mentor's weights, for distillation) is broadcast once per fit and destroyed at its end.
Each evaluation ships the flat weights (float32) in the task closure (no broadcast to create and destroy),
runs one ``treeAggregate`` over the cached handles RDD of :mod:`.data` -- every task sums gradient (float32),
loss and count (with ``weightCol``: weighted sums, and the weights' sum as the count) over its partition's
resident blocks with a replica built once per Python worker -- and the driver
sums in float64 and runs the solver of :mod:`sparkdl_hetero.nn.solvers` (one BLAS thread: two made its vector
operations slower on 2 busy cores). Solvers:

- ``l-bfgs``: Breeze's L-BFGS as Spark runs it (two-loop recursion, strong Wolfe line search, Spark's stopping rules
  and ``objectiveHistory``) on the full-batch mean loss + L2.
- ``gd``: Spark's ``GradientDescent`` as the MLP uses it: each iteration samples ``miniBatchFraction`` of the rows
  (1.0: all), ``w -= lr * (mean gradient + regParam * w)``; stops when ``||w_i - w_(i-1)|| < tol * max(||w_i||,
  1)``. The history holds the loss before each update.
- ``sgd`` / ``momentum`` (``nesterov``) / ``adam``: epochs of global mini-batches of ``batchSize`` rows
  (each partition contributes its share of a per-epoch permutation), one ``treeAggregate`` per step, the updater
  of :mod:`sparkdl_hetero.nn.optim`. The history holds each epoch's mean mini-batch loss; ``tol`` is not used.

Validation (the rows of a validation indicator column, which never train): after each epoch of a mini-batch solver
(every ``validationInterval`` iterations of gd / l-bfgs) one more job sums the validation loss and metric
(accuracy, or RMSE) over every partition's validation rows; the figures go to the stats' ``validation`` list and,
for mini-batch solvers, to the progress bar and early stopping: training stops after ``patience`` epochs without an
improvement of ``tol`` and returns the best validated weights.

``regParam`` adds ``regParam / 2 * ||w||^2`` to the loss; the learning rate follows ``lrSchedule``. Checkpoints
every ``checkpointInterval`` iterations (mini-batch solvers: steps) when ``checkpointDir`` is set, and a fit
resumes from the latest one. A non-finite loss raises :class:`TrainingDivergedError` carrying the last good
weights.

Cost of one evaluation (``bench/vs_spark_mlp.py``, MLP [784,100,10] on 60k Fashion-MNIST rows, local[2], a quiet
moment of a shared 2-core machine): the slowest task's forward/backward ~0.17 s (about 80% of it the first
layer's two GEMMs) plus ~0.1 s of Spark job latency (an empty job costs ~0.07 s). Shipping and decoding the
cached float32 blocks JVM -> Python instead of reading the resident blocks would add ~0.25 s per evaluation.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from ..nn import solvers
from ..nn.model import FeedForwardModel
from ..nn.objective import Objective
from ..nn.solvers import Hooks, SolverState
from .checkpoint import Checkpoint, load_compatible, save_checkpoint
from .config import TrainConfig, TrainResult
from .data import PartitionedData, resident_blocks, resident_validation, resident_weights
from .executor import accumulate_gradient, blas_limit, peak_rss_bytes, validation_metrics, validation_sums


# ---- executor side ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Job:
    """What a task needs besides the weights: which rows, and how to build the replica. The objective (a mentor's
    weights included) travels as a broadcast made once per fit, so a task ships only this small record."""

    fit_id: str
    objective: Any  # Broadcast of the Objective
    backend: str
    dtype: str
    seed: int
    kind: str = "full"  # full | fraction | batch
    fraction: float = 1.0
    iteration: int = 0
    epoch: int = 0
    step: int = 0
    steps_per_epoch: int = 1


_REPLICAS: dict[tuple, tuple[Any, str]] = {}  # per Python worker: (fit id, backend, dtype) -> (replica, account)
_PERMS: dict[tuple, np.ndarray] = {}  # per Python worker: (fit id, seed, partition, epoch) -> row permutation


def _replica(job: _Job) -> tuple[Any, str]:
    """This worker's replica for the fit, built once on the backend placement picks for the task, and a line
    saying where it computes."""
    key = (job.fit_id, job.backend, job.dtype)
    entry = _REPLICAS.get(key)
    if entry is None:
        from .placement import task_backend

        while len(_REPLICAS) >= 4:  # a worker serving several fits (cross-validation) keeps the latest few
            _REPLICAS.pop(next(iter(_REPLICAS)))
        backend, account = task_backend(job.backend)
        entry = _REPLICAS[key] = (job.objective.value.replica(backend, np.dtype(job.dtype), job.seed), account)
    return entry


def _rows(job: _Job, part: int, n: int) -> np.ndarray | None:
    """Row indices of this partition that the evaluation uses (sorted); ``None``: all rows."""
    if job.kind == "full":
        return None
    if job.kind == "fraction":
        if job.fraction >= 1.0:
            return None
        rng = np.random.default_rng([job.seed, job.iteration, part])
        return np.flatnonzero(rng.random(n) < job.fraction)
    key = (job.fit_id, job.seed, part, job.epoch)
    perm = _PERMS.get(key)
    if perm is None:
        for k in [k for k in _PERMS if k[0] != job.fit_id or k[2] == part]:
            del _PERMS[k]  # other fits' and this partition's earlier epochs
        perm = _PERMS[key] = np.random.default_rng([job.seed, job.epoch, part]).permutation(n)
    s, steps = job.step, job.steps_per_epoch
    return np.sort(perm[s * n // steps:(s + 1) * n // steps])


def partition_gradient(job: _Job, x: np.ndarray, y: np.ndarray, part: int, weights: np.ndarray,
                       cpus: int = 1, w: np.ndarray | None = None, state: np.ndarray | None = None,
                       ) -> tuple[np.ndarray | None, float, int, float, str, np.ndarray | None]:
    """(gradient sum, loss sum, rows, count, backend account, model state sum) of one partition's selected rows at
    ``weights``; the gradient in the replica's dtype (float32: half the bytes to ship; the driver sums in float64).
    With sample weights ``w`` the sums are weighted and the count is the weights' sum (else the rows). ``state``:
    the model state the pass starts from (None: the topology has none); the state sum is the replica's state
    after the pass times the rows (None without state), for the driver's row-weighted mean."""
    idx = _rows(job, part, len(y))
    m = len(y) if idx is None else len(idx)
    if m == 0:
        return None, 0.0, 0, 0.0, "", None
    rep, account = _replica(job)
    rep.set_weights(weights)
    if state is not None:
        rep.set_state(state)
    rep.zero_grad()
    with blas_limit(cpus):
        loss, count = accumulate_gradient(rep, x, y, idx, w)
    state_sum = None if state is None else np.asarray(rep.get_state(), dtype=np.float64) * m
    return rep.get_gradient(), loss, m, count, account, state_sum


def _task(handles: Any, job: _Job, weights: np.ndarray, state: np.ndarray | None = None) -> Any:
    """mapPartitions body: one (gradient sum, loss sum, rows, missing partitions, {backend account: the
    worker's peak RSS in bytes}, seconds computing, count: the rows' weights summed, model state sum) per
    partition (see :func:`partition_gradient` for ``state``)."""
    from pyspark import TaskContext

    ctx = TaskContext.get()
    cpus = max(1, int(ctx.cpus())) if ctx is not None else 1
    for h in handles:
        blocks = resident_blocks(job.fit_id, h)
        if blocks is None:
            yield None, 0.0, 0, (h.part,), {}, 0.0, 0.0, None
            continue
        t0 = time.perf_counter()
        g, loss, n, count, account, s = partition_gradient(job, blocks[0], blocks[1], h.part, weights, cpus,
                                                           resident_weights(job.fit_id, h), state)
        yield g, loss, n, (), {account: peak_rss_bytes()} if account else {}, time.perf_counter() - t0, count, s


def _validation_task(handles: Any, job: _Job, weights: np.ndarray) -> Any:
    """mapPartitions body: the (loss, metric, count) sums of :func:`.executor.validation_sums` over each
    partition's validation rows, or the partition's number when its files are not on this host."""
    from pyspark import TaskContext

    ctx = TaskContext.get()
    cpus = max(1, int(ctx.cpus())) if ctx is not None else 1
    for h in handles:
        if h.nv == 0:
            continue
        rows = resident_validation(job.fit_id, h)
        if rows is None:
            yield h.part
            continue
        rep, _ = _replica(job)
        rep.set_weights(weights)
        with blas_limit(cpus):
            yield validation_sums(rep, *rows)


def _combine(a: tuple, b: tuple) -> tuple:
    ga, gb = a[0], b[0]
    if ga is None:
        g = gb
    elif gb is None:
        g = ga
    else:
        g = ga if ga.dtype == np.float64 else ga.astype(np.float64)
        g += gb
    workers = dict(a[4])
    for k, v in b[4].items():
        workers[k] = max(v, workers.get(k, 0))
    s = b[7] if a[7] is None else a[7] if b[7] is None else a[7] + b[7]
    return g, a[1] + b[1], a[2] + b[2], a[3] + b[3], workers, max(a[5], b[5]), a[6] + b[6], s


# ---- driver side ------------------------------------------------------------------------------------------
class TreeAggregateTrainer:
    """Runs one fit: evaluations over Spark, the solver loop on the driver, progress, checkpoints."""

    def __init__(self, data: PartitionedData, objective: Objective, config: TrainConfig) -> None:
        self.data, self.objective, self.config = data, objective, config
        self.sc = data.handles_rdd.context
        self.dtype = np.dtype(config.dtype)
        self.evaluations = 0
        self.samples = 0
        self.fallbacks = 0
        self.backends: dict[str, int] = {}  # "host pid N partition P: backend" -> that worker's peak RSS
        self.compute_seconds = 0.0  # per evaluation, the slowest task's time in forward/backward, summed
        self.started = time.perf_counter()
        self.bar: Any = None
        self.objective_bc: Any = None  # the objective, broadcast once for the whole fit
        self.validation: list[list[float]] = []  # [loss, metric] after each epoch (validation rows only)
        self.steps_per_epoch = 0  # mini-batch solvers
        # the model's non-trained state (batch normalization's statistics): the row-weighted mean of the tasks'
        # states after each evaluation, where the next evaluation's tasks start
        self.model_state = FeedForwardModel.initial_state(objective.topology)

    # -- one distributed evaluation --
    def evaluate(self, w: np.ndarray, job: _Job, label: str) -> tuple[np.ndarray, float, float]:
        """Gradient sum, loss sum and count over the rows ``job`` selects, at weights ``w`` (weighted sums and the
        weights' sum with a weight column)."""
        sc = self.sc
        with np.errstate(over="ignore"):  # weights beyond float32 become inf: the loss check reports it
            weights = np.ascontiguousarray(w, dtype=self.dtype)
        state = np.asarray(self.model_state, dtype=self.dtype) if self.model_state.size else None
        task = partial(_task, job=job, weights=weights, state=state)
        sc.setJobDescription(f"sparkdl-hetero fit {self.data.fit_id[:8]}: {label}")
        try:
            zero: tuple = (None, 0.0, 0, (), {}, 0.0, 0.0, None)
            g, loss, n, missing, accounts, busy, count, s = self.data.handles_rdd.mapPartitions(task) \
                .treeAggregate(zero, _combine, _combine, depth=2)
            if missing:  # partitions whose task ran on a host without their files: recompute them there
                self.fallbacks += len(missing)
                rdd = self.data.rebuild_rdd().mapPartitions(task)
                for part in sc.runJob(rdd, lambda it: [_combine_all(it)], partitions=sorted(missing)):
                    if part[3]:
                        raise RuntimeError(f"partitions {list(part[3])} have no blocks even after recomputing "
                                           f"them on the executor that ran them")
                    g, loss, n, _, accounts, busy, count, s = _combine((g, loss, n, (), accounts, busy, count, s),
                                                                       part)
        finally:
            sc.setJobDescription(None)
        self.evaluations += 1
        self.samples += n
        for k, v in accounts.items():
            self.backends[k] = max(v, self.backends.get(k, 0))
        self.compute_seconds += busy
        if s is not None and n:
            self.model_state = s / n
        g = np.zeros(self.objective.num_weights) if g is None else g.astype(np.float64, copy=g.dtype != np.float64)
        return g, loss, count

    def validate(self, w: np.ndarray, epoch: int, unit: str = "epoch") -> tuple[float, float]:
        """The global (mean loss, accuracy or RMSE) over every partition's validation rows at weights ``w``, after
        ``epoch`` (a 0-based epoch, or iteration of a full-batch solver: ``unit``)."""
        job = self.job()
        weights = np.ascontiguousarray(w, dtype=self.dtype)
        task = partial(_validation_task, job=job, weights=weights)
        self.sc.setJobDescription(f"sparkdl-hetero fit {self.data.fit_id[:8]}: validation after {unit} {epoch + 1}")
        try:
            parts = self.data.handles_rdd.mapPartitions(task).collect()
            missing = sorted(p for p in parts if isinstance(p, int))
            if missing:  # recompute the partitions whose files are gone, where their task runs
                self.fallbacks += len(missing)
                rdd = self.data.rebuild_rdd().mapPartitions(task)
                parts = [p for p in parts if not isinstance(p, int)] + [
                    q for q in self.sc.runJob(rdd, lambda it: list(it), partitions=missing)]
                if any(isinstance(p, int) for p in parts):
                    raise RuntimeError("validation partitions have no blocks even after recomputing them")
        finally:
            self.sc.setJobDescription(None)
        sums = np.sum(parts, axis=0) if parts else np.zeros(3)
        return validation_metrics(sums, not self.objective.topology.loss_layer.class_labels)

    def job(self, **kw: Any) -> _Job:
        c = self.config
        if self.objective_bc is None:
            self.objective_bc = self.sc.broadcast(self.objective)
        return _Job(self.data.fit_id, self.objective_bc, c.backend, c.dtype, c.seed, **kw)

    # -- bookkeeping --
    def progress(self, total: int, initial: int, unit: str) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, unit=unit, desc=f"{self.config.solver} ({unit})",
                        disable=not self.config.verbose, dynamic_ncols=True)

    def tick(self, loss: float, n: int = 1) -> None:
        if self.bar is not None:
            elapsed = max(time.perf_counter() - self.started, 1e-9)
            self.bar.set_postfix(loss=f"{loss:.5g}", samples_s=f"{self.samples / elapsed:,.0f}", refresh=False)
            self.bar.update(n)

    def checkpoint_due(self, iteration: int) -> bool:
        c = self.config
        return bool(c.checkpointDir) and c.checkpointInterval > 0 and iteration % c.checkpointInterval == 0

    def checkpoint(self, state: SolverState) -> None:
        save_checkpoint(self.config.checkpointDir, Checkpoint.of(state, self.config.solver, None, self.model_state))

    def result(self, state: SolverState, converged: str) -> TrainResult:
        seconds = time.perf_counter() - self.started
        extra = {"validation": self.validation} if self.validation else {}
        if state.step_history:
            extra.update(stepLoss=state.step_history, stepsPerEpoch=self.steps_per_epoch)
        return TrainResult(state.weights, list(state.history), state.iteration, state=self.model_state, stats={
            **extra, "mode": "treeAggregate", "solver": self.config.solver, "converged": converged,
            "evaluations": self.evaluations, "seconds": seconds, "samples": self.samples,
            "samplesPerSecond": self.samples / max(seconds, 1e-9), "numPartitions": self.data.num_partitions,
            "partitionSizes": self.data.partition_sizes(), "fallbackPartitions": self.fallbacks,
            "backends": sorted(self.backends), "workerPeakRSS": dict(self.backends),
            "computeSeconds": self.compute_seconds})

    # -- solvers --
    def run(self, initial_weights: np.ndarray) -> TrainResult:
        c = self.config
        ckpt = load_compatible(c.checkpointDir, c.solver, self.objective.num_weights) if c.checkpointDir else None
        if ckpt is not None:
            if ckpt.model_state.size != self.model_state.size:
                raise ValueError(f"checkpointDir {c.checkpointDir!r} holds a checkpoint with {ckpt.model_state.size} "
                                 f"model state values; topology {self.objective.topology.spec!r} has "
                                 f"{self.model_state.size} (use another checkpointDir or delete it)")
            state = ckpt.solver_state()
            self.model_state = ckpt.model_state.astype(np.float64)
        else:
            state = SolverState(np.asarray(initial_weights, dtype=np.float64).copy())
        try:
            with blas_limit(1):  # the driver only does vector operations: more BLAS threads only add latency
                return self.result(state, self.solve(state))
        finally:
            if self.bar is not None:
                self.bar.close()
            if self.objective_bc is not None:
                self.objective_bc.destroy()
                self.objective_bc = None

    def solve(self, state: SolverState) -> str:
        """Run ``config.solver`` from ``state`` over Spark evaluations; returns why it stopped."""
        c = self.config
        hooks = Hooks(checkpoint_due=self.checkpoint_due, checkpoint=self.checkpoint)
        if c.solver in ("gd", "l-bfgs"):
            self.progress(c.maxIter, state.iteration, "iteration")

            def iteration_end(_state: SolverState, loss: float, _n: float) -> None:
                if self.data.validation_count and state.iteration % c.validationInterval == 0:
                    self.validation.append(list(self.validate(state.weights, state.iteration - 1, "iteration")))
                self.tick(loss)

            hooks.iteration_end = iteration_end
            full = self.job()

            def evaluate(w: np.ndarray, iteration: int | None) -> tuple[float, np.ndarray, float]:
                if iteration is None:
                    label = f"l-bfgs iteration {state.iteration + 1}, evaluation {self.evaluations + 1}"
                    g, loss, n = self.evaluate(w, full, label)
                else:
                    job = self.job(kind="fraction", fraction=c.miniBatchFraction, iteration=iteration)
                    g, loss, n = self.evaluate(w, job, f"gd iteration {iteration + 1}")
                return loss, g, n

            solve = solvers.lbfgs if c.solver == "l-bfgs" else solvers.gd
            return solve(state, c, evaluate, hooks)
        steps_per_epoch = self.steps_per_epoch = max(1, math.ceil(self.data.count / c.batchSize))
        self.progress(solvers.epochs_of(c) * steps_per_epoch, state.iteration, "step")

        def step(w: np.ndarray, t: int) -> tuple[float, np.ndarray, float]:
            epoch, k = divmod(t, steps_per_epoch)
            job = self.job(kind="batch", epoch=epoch, step=k, steps_per_epoch=steps_per_epoch)
            g, loss, n = self.evaluate(w, job, f"{c.solver} epoch {epoch + 1} step {k + 1}")
            return loss, g, n

        def step_end(_state: SolverState, loss: float, n: float) -> None:
            if n:
                self.tick(loss)
            elif self.bar is not None:
                self.bar.update(1)

        hooks.iteration_end = step_end
        best = [math.inf, 0, None, None]  # best validation loss, epochs since it improved, its weights and state
        if self.data.validation_count:
            regression = not self.objective.topology.loss_layer.class_labels

            def epoch_end(epoch: int, _loss: float) -> str:
                vloss, metric = self.validate(state.weights, epoch)
                self.validation.append([vloss, metric])
                if self.bar is not None:
                    self.bar.set_postfix(val_loss=f"{vloss:.5g}", **{"val_rmse" if regression else "val_acc":
                                                                    f"{metric:.4g}"}, refresh=False)
                if vloss < best[0] - c.tol:
                    best[:] = [vloss, 0, state.weights.copy(), self.model_state]
                else:
                    best[1] += 1
                if best[1] >= c.patience:
                    return f"early stopping: validation loss did not improve for {c.patience} epochs"
                return ""

            hooks.epoch_end = epoch_end
        stop = solvers.minibatch(state, c, steps_per_epoch, step, hooks, keep_last_good=True)
        if best[2] is not None and best[1] > 0:  # the best validated weights, not the last ones
            state.weights, self.model_state = best[2], best[3]
        return stop


def _combine_all(it: Any) -> tuple:
    acc: tuple = (None, 0.0, 0, (), {}, 0.0, 0.0, None)
    for v in it:
        acc = _combine(acc, v)
    return acc


def train(data: PartitionedData, objective: Objective, config: TrainConfig,
          initial_weights: np.ndarray) -> TrainResult:
    """Fit ``objective`` on ``data`` with ``config.solver`` through treeAggregate (resuming from a checkpoint)."""
    return TreeAggregateTrainer(data, objective, config).run(initial_weights)
