"""Barrier-mode training (``mode="barrier"``), the Spark side: one long-running barrier task per worker.

The validated input is repartitioned into ``numWorkers`` partitions and handed to one barrier task each
(``mapInArrow(..., barrier=True)``); every task gathers its rows, meets the others once through
``BarrierTaskContext.allGather`` (address, port, and rank 0's fresh job secret), opens an authenticated mesh
(:mod:`.comm`) and from then on never talks to Spark: it runs :func:`.worker.train_worker` (the solvers, the
all-reduce, batch balancing by :mod:`.balancing`, validation and stragglers are described there). Each task resolves
its backend for the GPU Spark assigned to it (:func:`.placement.task_backend`, as the treeAggregate tasks do) and
hands it to the worker. Rank 0 answers with the weights, history, every rank's timings and every rank's backend
account (the stats' ``backends``, in rank order).

A fit's stats hold ``fixedCost``, where the time around training goes (seconds): the slot check, the input's
conversion and validation (``prepare``), until rank 0's task starts (the repartition's shuffle included), gathering
its rows, the rendezvous, training, the answer reaching the driver, releasing the converted blocks
(``bench/fit_overhead.py`` prints them).

Checkpoints (rank 0 writes, every ``checkpointInterval`` steps, to ``checkpointDir`` -- a directory every executor
can read, as Spark's own checkpoint directory) let a retried barrier stage resume where it was. When Spark gives up
on the stage (e.g. ``spark.task.maxFailures=1`` in local mode), the driver re-runs the job up to
:data:`DRIVER_RETRIES` times, again resuming from the checkpoint; deterministic failures (input errors, divergence,
replicas that disagree) are not retried -- decided by type, see :mod:`.errors`. Testing aid: the Spark local
property ``sparkdl_hetero.injectFault = "rank:step:marker-file"`` makes that rank raise at that step once (the
marker file records that the fault happened; retried attempts run normally).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..nn.objective import Objective
from .balancing import split_batch
from .cluster import check_barrier_slots, tagged, training_resources
from .comm import CommError, Communicator, new_secret
from .config import TrainConfig, TrainingDivergedError, TrainResult
from .data import Layout, arrow_blocks, prepare
from .errors import NOT_RETRIABLE, NotRetriableError, failure_summary, from_peer, is_not_retriable
from .executor import blas_limit
from .placement import assigned_gpu, task_backend
from .worker import BarrierWorker, train_worker

FAULT_PROPERTY = "sparkdl_hetero.injectFault"
_OUT_SCHEMA = "rank int, meta string, weights binary"
DRIVER_RETRIES = 2  # barrier jobs re-run by the driver after Spark gave up (each resumes from the checkpoint)


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
                  layout: Layout) -> Iterator:
    """mapInArrow(barrier=True) body: gather this partition's rows, meet the others, train, rank 0 answers."""
    import pyarrow as pa
    from pyspark import BarrierTaskContext

    timeline = {"taskStart": time.time()}  # wall clock: compared with the driver's (same host on local-cluster)
    ctx = BarrierTaskContext.get()
    rank = ctx.partitionId()
    world = len(ctx.getTaskInfos())
    rows = arrow_blocks(batches, layout)
    x, y, w = rows["x"], rows["y"], rows.get("w")
    validation = None
    if "v" in rows:  # the validation indicator's rows never train
        v = rows["v"]
        validation = (x[v], y[v], None if w is None else w[v])
        x, y, w = x[~v], y[~v], None if w is None else w[~v]
    del rows
    timeline["rowsGathered"] = time.time()
    comm = Communicator(rank, world, _task_host(ctx), timeout=config.commTimeout,
                        max_elements=objective.num_weights + objective.topology.num_state + world + 8)
    try:
        backend, account = task_backend(config.backend)
        secret = new_secret().hex() if rank == 0 else ""
        infos = [json.loads(s) for s in ctx.allGather(json.dumps(
            {"host": comm.address[0], "port": comm.address[1], "secret": secret, "gpu": assigned_gpu(),
             "backend": account}))]
        comm.connect([(i["host"], i["port"]) for i in infos], bytes.fromhex(infos[0]["secret"]))
        timeline["connected"] = time.time()
        diverged: TrainingDivergedError | None = None
        with blas_limit(max(1, int(ctx.cpus()))):
            try:
                worker, stop, summaries = train_worker(comm, objective, config, x, y, initial_weights,
                                                       _fault_step(ctx, rank), w=w, validation=validation,
                                                       backend=backend)
            except TrainingDivergedError as e:  # the loss is all-reduced: every rank stops at the same step
                diverged = e
    except BaseException as e:  # the driver sees only the traceback text: a deterministic failure says so by type
        deterministic = isinstance(e, NOT_RETRIABLE) or (isinstance(e, CommError) and from_peer(e))
        failure = NotRetriableError.wrapping(e) if deterministic else e
        comm.abort(failure)
        if deterministic:
            raise failure from e
        raise
    comm.close()
    timeline["trained"] = time.time()
    if rank == 0:
        if diverged is not None:  # answered, not raised: the driver raises the same error type as treeAggregate
            meta: dict = {"diverged": str(diverged), "iterations": diverged.iteration, "history": diverged.history}
            weights = b""
        else:
            meta = {"history": worker.history, "iterations": worker.iteration, "stop": stop,
                    "workers": summaries, "extra": worker.extra, "state": worker.model_state().tolist(),
                    "taskGpus": [i["gpu"] for i in infos], "backends": [i["backend"] for i in infos],
                    "timeline": timeline}
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
            "straggler": slowest["rank"] if world > 1 else None, "workers": workers,
            "taskGpus": meta["taskGpus"], "backends": meta["backends"], **meta["extra"]}


def fit_barrier(df: Any, features_col: str, label_col: str, objective: Objective, config: TrainConfig,
                initial_weights: np.ndarray, **inputs: Any) -> TrainResult:
    """Train ``objective`` on ``df`` in barrier mode (see the module docstring); ``inputs``: the regression,
    weight and validation column options of :func:`.data.prepare`."""
    called = time.time()
    resources = training_resources(df.sparkSession, config.backend, config.taskGpus, config.taskCpus)
    # fails within seconds, never waits for slots
    world = check_barrier_slots(df.sparkSession, config.numWorkers, resources)
    for r in dict(config.straggler):
        if not 0 <= int(r) < world:
            raise ValueError(f"straggler rank {r} is not a worker rank (0..{world - 1})")
    topology = objective.topology
    d = topology.num_inputs
    checked = time.time()
    # the tasks read arrow_df: validated only, no resident files
    data = prepare(df, features_col, label_col, d, topology.num_outputs, resident=False, **inputs)
    layout = data.layout
    prepared = time.time()
    try:
        w0 = np.asarray(initial_weights, dtype=np.float64)
        parts = data.arrow_df.repartition(world)
        started = time.perf_counter()
        failures: list[str] = []
        with tagged(df.sparkSession, data.tag, f"barrier training on {world} workers"):
            while True:
                try:
                    rows = parts.mapInArrow(lambda it: _barrier_task(it, objective, config, w0, layout), _OUT_SCHEMA,
                                            barrier=True, profile=resources.profile).collect()
                    break
                except Exception as e:  # Spark gave up on the stage: resume from the checkpoint, a few times
                    cause = failure_summary(e)
                    failures.append(cause)
                    if len(failures) > DRIVER_RETRIES or is_not_retriable(e):
                        raise RuntimeError(f"barrier training failed after {len(failures)} attempt(s): "
                                           f"{cause}") from e
        seconds = time.perf_counter() - started
        answered = time.time()
    finally:
        data.release()
    released = time.time()
    if len(rows) != 1:
        raise RuntimeError(f"barrier training returned {len(rows)} results, expected one from rank 0")
    meta = json.loads(rows[0]["meta"])
    if "diverged" in meta:
        raise TrainingDivergedError(meta["diverged"], None, meta["iterations"], meta["history"])
    weights = np.frombuffer(rows[0]["weights"], dtype=np.float64).copy()
    stats = _stats(meta, config, world, seconds)
    stats["failedAttempts"] = failures
    t = meta["timeline"]  # rank 0's (every rank waits for the others at the rendezvous)
    stats["fixedCost"] = {"slotsCheckSeconds": checked - called, "prepareSeconds": prepared - checked,
                          "taskStartSeconds": t["taskStart"] - prepared, "rowsSeconds": t["rowsGathered"] -
                          t["taskStart"], "rendezvousSeconds": t["connected"] - t["rowsGathered"],
                          "trainingSeconds": t["trained"] - t["connected"], "resultSeconds": answered - t["trained"],
                          "releaseSeconds": released - answered}
    return TrainResult(weights, meta["history"], meta["iterations"], stats, np.asarray(meta["state"], np.float64))


__all__ = ["FAULT_PROPERTY", "BarrierWorker", "CommError", "fit_barrier", "split_batch", "train_worker"]
