"""Training the way Spark ML's ``treeAggregate`` does it: the optimizer runs on the driver, executors compute
gradient sums -- from a classic and from a Spark Connect session (which has no SparkContext, RDD API or broadcast).

Each evaluation ships the flat weights (float32), the model state (batch normalization's statistics, when the
topology has any) and the objective (pickled once per fit on the driver, with a mentor's weights for distillation;
unpickled once per Python worker when it builds its replica) in the task closure, runs one ``mapInArrow`` job over
the cached handles DataFrame of :mod:`.data` -- every task sums gradient (float32), loss and count (with
``weightCol``: weighted sums, and the weights' sum as the count) and the state after its pass times its rows over
its partition's resident blocks with a replica built once per Python worker and answers one row holding them as
bytes (a classic session runs the same task over the handles DataFrame's RDD, whose jobs cost less fixed time than
DataFrame jobs) -- and the driver sums in float64 (the next state: the row-weighted mean of the tasks' states) and
runs the solver of :mod:`sparkdl_hetero.nn.solvers` (one BLAS thread: two made its vector operations slower on 2
busy cores). Solvers:

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
(accuracy, or RMSE) over every partition's validation rows; the figures go to the stats' ``validation`` list, to the
progress bar and to early stopping (:class:`~sparkdl_hetero.nn.solvers.EarlyStopping`): training stops after
``patience`` validations without an improvement of ``tol`` and returns the best validated weights.

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
import pickle
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from ..nn import solvers
from ..nn.model import FeedForwardModel
from ..nn.objective import Objective
from ..nn.solvers import EarlyStopping, Hooks, SolverState
from .checkpoint import Checkpoint, load_compatible, save_checkpoint
from .cluster import is_connect, tagged, training_resources
from .config import TrainConfig, TrainResult
from .data import Handle, PartitionedData, arrow_schema, resident_blocks, resident_validation, resident_weights
from .executor import accumulate_gradient, blas_limit, peak_rss_bytes, validation_metrics, validation_sums


# ---- executor side ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Job:
    """What a task needs besides the weights: which rows, and how to build the replica (the objective, a mentor's
    weights included, pickled once per fit: a task that already has its replica does not unpickle it)."""

    fit_id: str
    objective: bytes  # the pickled Objective
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
        objective = pickle.loads(job.objective)
        entry = _REPLICAS[key] = (objective.replica(backend, np.dtype(job.dtype), job.seed), account)
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


_PARTIAL_SCHEMA = ("part int, missing boolean, grad binary, loss double, n long, count double, state binary, "
                   "account string, rss long, seconds double")
_VALIDATION_SCHEMA = "part int, missing boolean, loss double, metric double, count double"


def _partial(h: Handle, cpus: int, job: _Job, weights: np.ndarray, state: np.ndarray | None = None) -> dict:
    """One partition's answer to an evaluation (a :data:`_PARTIAL_SCHEMA` row): whether its blocks are missing on
    this host, its gradient sum (bytes of the replica's dtype), loss sum, rows, count (the weights' sum with a
    weight column), model state sum (float64 bytes, empty without state; see :func:`partition_gradient`), the
    backend account with the worker's peak RSS in bytes, and the seconds spent computing."""
    blocks = resident_blocks(job.fit_id, h)
    if blocks is None:
        return {"part": h.part, "missing": True, "grad": b"", "loss": 0.0, "n": 0, "count": 0.0, "state": b"",
                "account": "", "rss": 0, "seconds": 0.0}
    t0 = time.perf_counter()
    g, loss, n, count, account, s = partition_gradient(job, blocks[0], blocks[1], h.part, weights, cpus,
                                                       resident_weights(job.fit_id, h), state)
    return {"part": h.part, "missing": False, "grad": b"" if g is None else g.tobytes(), "loss": loss, "n": n,
            "count": count, "state": b"" if s is None else s.tobytes(), "account": account,
            "rss": peak_rss_bytes() if account else 0, "seconds": time.perf_counter() - t0}


def _validation_partial(h: Handle, cpus: int, job: _Job, weights: np.ndarray,
                        state: np.ndarray | None = None) -> dict:
    """One partition's answer to a validation (a :data:`_VALIDATION_SCHEMA` row): the (loss, metric, count) sums of
    :func:`.executor.validation_sums` over its validation rows at ``weights`` and the model ``state`` (None: the
    topology has none), or ``missing`` when their files are not on this host."""
    sums = np.zeros(3)
    if h.nv:
        rows = resident_validation(job.fit_id, h)
        if rows is None:
            return {"part": h.part, "missing": True, "loss": 0.0, "metric": 0.0, "count": 0.0}
        rep, _ = _replica(job)
        rep.set_weights(weights)
        if state is not None:  # inference uses the running statistics: the driver's, not this replica's last pass
            rep.set_state(state)
        with blas_limit(cpus):
            sums = validation_sums(rep, *rows)
    return {"part": h.part, "missing": False, "loss": float(sums[0]), "metric": float(sums[1]),
            "count": float(sums[2])}


#: Spark's error condition for a local checkpoint's block lost with its executor (a stable identifier, which is
#: all a job's failure carries of the task's error under both session kinds)
_LOST_CHECKPOINT = "CHECKPOINT_RDD_BLOCK_ID_NOT_FOUND"


def _task_cpus() -> int:
    from pyspark import TaskContext

    ctx = TaskContext.get()
    return max(1, int(ctx.cpus())) if ctx is not None else 1


def _task(batches: Iterator, answer: Callable[[Handle, int], dict], schema: str) -> Iterator:
    """mapInArrow body over handle rows: one ``answer(handle, task cpus)`` row (of the DDL ``schema``) per
    partition."""
    import pyarrow as pa

    cpus = _task_cpus()
    rows = [answer(Handle(**row), cpus) for batch in batches for row in batch.to_pylist()]
    if rows:
        yield pa.RecordBatch.from_pylist(rows, schema=arrow_schema(schema))


def _rdd_task(handles: Iterator, answer: Callable[[Handle, int], dict]) -> Iterator:
    """The same over an RDD of handles (classic sessions, see :meth:`TreeAggregateTrainer.run_job`)."""
    cpus = _task_cpus()
    for h in handles:
        yield answer(h, cpus)


# ---- driver side ------------------------------------------------------------------------------------------
class TreeAggregateTrainer:
    """Runs one fit: evaluations over Spark, the solver loop on the driver, progress, checkpoints."""

    def __init__(self, data: PartitionedData, objective: Objective, config: TrainConfig) -> None:
        self.data, self.objective, self.config = data, objective, config
        self.dtype = np.dtype(config.dtype)
        self.evaluations = 0
        self.samples = 0
        self.fallbacks = 0
        self.backends: dict[str, int] = {}  # "host pid N partition P: backend" -> that worker's peak RSS
        self.compute_seconds = 0.0  # per evaluation, the slowest task's time in forward/backward, summed
        self.started = time.perf_counter()
        self.bar: Any = None
        self.objective_bytes = pickle.dumps(objective)  # once per fit; every task's closure carries these bytes
        self.spark = data.arrow_df.sparkSession
        # A classic session runs the evaluations over the handles as an RDD: a DataFrame job (planning, SQL
        # execution, Arrow both ways) costs more fixed time per evaluation than an RDD job, even over the
        # checkpoint below (bench/vs_spark_mlp.py; docs/benchmarks.md), and a Connect session, which has no RDD
        # API, pays it.
        # the training stage's own resources (a GPU per task when training uses GPUs): None, Spark's default
        self.profile = training_resources(self.spark, config.backend, config.taskGpus, config.taskCpus).profile
        self.handles_rdd = None
        if not is_connect(self.spark):
            self.handles_rdd = data.handles_df.rdd.map(lambda row: Handle(**row.asDict()))
            if self.profile is not None:
                self.handles_rdd = self.handles_rdd.withResources(self.profile)
        # A Connect session sends a job's whole plan (here: the handles' lineage back to the user's source) with
        # every job, and the server resolves it again; the evaluations run over a lineage-free copy of the handle
        # rows instead (a local checkpoint, stored where the cached handles are, so tasks still run beside their
        # blocks). A lost checkpoint block (its executor is gone) falls back to the persisted handles, which Spark
        # recomputes (see run_job).
        self.eval_df = data.handles_df
        if self.handles_rdd is None:
            with tagged(self.spark, data.tag, "checkpoint of the handles"):
                self.eval_df = data.handles_df.localCheckpoint(eager=True)
        self.validation: list[list[float]] = []  # [loss, metric] after each epoch (validation rows only)
        self.steps_per_epoch = 0  # mini-batch solvers
        # the model's non-trained state (batch normalization's statistics): the row-weighted mean of the tasks'
        # states after each evaluation, where the next evaluation's tasks start
        self.model_state = FeedForwardModel.initial_state(objective.topology)

    # -- one distributed evaluation --
    def run_job(self, answer: Callable[[Handle, int], dict], schema: str, label: str) -> list:
        """Every partition's ``answer`` row (``schema``: its DDL, with ``part`` and ``missing``): one Spark job (two
        when partitions must be recomputed), tagged with the fit's tag and ``label``."""
        task = partial(_task, answer=answer, schema=schema)
        with tagged(self.spark, self.data.tag, label):
            if self.handles_rdd is not None:
                rows = self.handles_rdd.mapPartitions(partial(_rdd_task, answer=answer)).collect()
            else:
                try:
                    rows = self.eval_df.mapInArrow(task, schema, profile=self.profile).collect()
                except Exception as e:  # noqa: BLE001 -- re-raised unless it is a lost checkpoint block
                    if self.eval_df is self.data.handles_df or _LOST_CHECKPOINT not in str(e):
                        raise
                    self.eval_df = self.data.handles_df
                    rows = self.eval_df.mapInArrow(task, schema, profile=self.profile).collect()
            missing = sorted(r["part"] for r in rows if r["missing"])
            if missing:  # partitions whose task ran on a host without their files: recompute them there
                self.fallbacks += len(missing)
                again = self.data.rebuild(missing).mapInArrow(task, schema, profile=self.profile).collect()
                if sorted(r["part"] for r in again if not r["missing"]) != missing:
                    raise RuntimeError(f"partitions {missing} have no blocks even after recomputing them on the "
                                       f"executor that ran them")
                rows = [r for r in rows if not r["missing"]] + again
        return rows

    def evaluate(self, w: np.ndarray, job: _Job, label: str) -> tuple[np.ndarray, float, float]:
        """Gradient sum, loss sum and count over the rows ``job`` selects, at weights ``w`` (weighted sums and the
        weights' sum with a weight column); the model state moves to the row-weighted mean of the tasks' states."""
        with np.errstate(over="ignore"):  # weights beyond float32 become inf: the loss check reports it
            weights = np.ascontiguousarray(w, dtype=self.dtype)
        state = np.asarray(self.model_state, dtype=self.dtype) if self.model_state.size else None
        rows = self.run_job(partial(_partial, job=job, weights=weights, state=state), _PARTIAL_SCHEMA, label)
        g = np.zeros(self.objective.num_weights)
        state_sum = None
        for r in rows:
            if r["grad"]:
                g += np.frombuffer(r["grad"], dtype=self.dtype)
            if r["state"]:
                s = np.frombuffer(r["state"], dtype=np.float64)
                state_sum = s.copy() if state_sum is None else state_sum + s
            if r["account"]:
                self.backends[r["account"]] = max(r["rss"], self.backends.get(r["account"], 0))
        n = sum(r["n"] for r in rows)
        self.evaluations += 1
        self.samples += n
        self.compute_seconds += max((r["seconds"] for r in rows), default=0.0)
        if state_sum is not None and n:
            self.model_state = state_sum / n
        return g, sum(r["loss"] for r in rows), sum(r["count"] for r in rows)

    def validate(self, w: np.ndarray, epoch: int, unit: str = "epoch") -> tuple[float, float]:
        """The global (mean loss, accuracy or RMSE) over every partition's validation rows at weights ``w``, after
        ``epoch`` (a 0-based epoch, or iteration of a full-batch solver: ``unit``)."""
        weights = np.ascontiguousarray(w, dtype=self.dtype)
        state = np.asarray(self.model_state, dtype=self.dtype) if self.model_state.size else None
        rows = self.run_job(partial(_validation_partial, job=self.job(), weights=weights, state=state),
                            _VALIDATION_SCHEMA, f"validation after {unit} {epoch + 1}")
        sums = np.array([sum(r[k] for r in rows) for k in ("loss", "metric", "count")], dtype=np.float64)
        return validation_metrics(sums, not self.objective.topology.loss_layer.class_labels)

    def job(self, **kw: Any) -> _Job:
        c = self.config
        return _Job(self.data.fit_id, self.objective_bytes, c.backend, c.dtype, c.seed, **kw)

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

    def solve(self, state: SolverState) -> str:
        """Run ``config.solver`` from ``state`` over Spark evaluations; returns why it stopped."""
        c = self.config
        hooks = Hooks(checkpoint_due=self.checkpoint_due, checkpoint=self.checkpoint)
        full_batch = c.solver in ("gd", "l-bfgs")
        early = EarlyStopping()
        if self.data.validation_count:
            regression = not self.objective.topology.loss_layer.class_labels

            def epoch_end(epoch: int, _loss: float) -> str:
                """After each epoch (full-batch solvers: each iteration, validating every validationInterval)."""
                if full_batch and (epoch + 1) % c.validationInterval:
                    return ""
                vloss, metric = self.validate(state.weights, epoch, "iteration" if full_batch else "epoch")
                self.validation.append([vloss, metric])
                if self.bar is not None:
                    self.bar.set_postfix(val_loss=f"{vloss:.5g}", **{"val_rmse" if regression else "val_acc":
                                                                    f"{metric:.4g}"}, refresh=False)
                return early.update(vloss, c, state.weights, self.model_state,
                                    "validations" if full_batch else "epochs")

            hooks.epoch_end = epoch_end
        stop = self.full_batch(state, hooks) if full_batch else self.minibatch(state, hooks)
        best = early.best()
        if best is not None:  # the best validated weights, not the last ones
            state.weights, self.model_state = best
        return stop

    def full_batch(self, state: SolverState, hooks: Hooks) -> str:
        """gd or l-bfgs over full-batch (gd: sampled) evaluations; returns why it stopped."""
        c = self.config
        self.progress(c.maxIter, state.iteration, "iteration")
        hooks.iteration_end = lambda _state, loss, _n: self.tick(loss)
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

    def minibatch(self, state: SolverState, hooks: Hooks) -> str:
        """``config.solver``'s epochs of global mini-batches; returns why it stopped."""
        c = self.config
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
        return solvers.minibatch(state, c, steps_per_epoch, step, hooks, keep_last_good=True)


def train(data: PartitionedData, objective: Objective, config: TrainConfig,
          initial_weights: np.ndarray) -> TrainResult:
    """Fit ``objective`` on ``data`` with ``config.solver`` through treeAggregate (resuming from a checkpoint)."""
    return TreeAggregateTrainer(data, objective, config).run(initial_weights)
