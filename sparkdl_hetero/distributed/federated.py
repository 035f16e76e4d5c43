"""Federated training on Spark: FedAvg and context-aware decoupled sub-models (CAD), one Spark job per round.

A *device* is the group of rows sharing a value of ``deviceCol`` (an integer or string column). The rows are
repartitioned by device (a device's rows live in one partition, sorted: training rows, then the rows flagged by
``validationIndicatorCol``) and converted once, in one job, into the resident float32 blocks of :mod:`.data`
(the same files, memory-mapped by the Python workers, and the same validation counters); the job's cached handle
rows (one per partition, listing its devices' row ranges and classes) are what every round's job runs over, so
Spark schedules a round's task where its blocks are. A task that finds no blocks (executor lost) answers so, and the
driver reconverts and trains those partitions in a second job of that round.

A round (:meth:`FederatedTrainer.round`): the driver selects ``max(1, round(clientFraction * devices))`` devices
(``default_rng([seed, round])``, so FedAvg and CAD with one seed pick the same devices), builds each one's plan
(CAD: its classes and critical paths, :func:`~sparkdl_hetero.nn.cad.critical_paths`) and runs one job whose
closure carries the global weights and the plans. A task trains the selected devices of its partition one after
another: each device decodes its *download* (the weights it receives: the whole model, or its sub-model with the
sub-model's spec; serialized ``.npz``, whose length is ``bytesDown``), trains ``localEpochs`` epochs with a fresh
optimizer (:func:`~sparkdl_hetero.nn.federated.local_update`) and encodes its *upload* (trained weights, row
count and, for CAD, its per-class activation sums; the length is ``bytesUp``). The task merges its devices'
uploads into one partial :class:`~sparkdl_hetero.nn.federated.RoundAggregator` and one partial
:class:`~sparkdl_hetero.nn.cad.ActivationStats`, so the driver holds the global weights and the running merge,
one partial per task, never one model per device.

CAD's server statistics (classes x filters per decoupled layer) *decay*: before a round's statistics are added,
the kept sums and counts are multiplied by :data:`STATS_DECAY`. The devices measure the model they received, which
changes every round, so old measurements fade; a class no selected device held this round keeps its (older)
preferences instead of losing them, which a per-round reset would do. Devices measure before training (the
model the server will decouple next is the merged one, not a device's own overfit copy), on a random sample of
at most :data:`~sparkdl_hetero.nn.cad.STATS_ROWS_PER_CLASS` rows of each of its classes. The first
``cadWarmupRounds`` rounds run FedAvg and gather statistics; with no statistics yet (``cadWarmupRounds=0``), one
forward-only job over every device's training rows measures the initial model first.

Validation: the rows flagged by ``validationIndicatorCol`` never train; each round's job also evaluates the
weights it ships (the previous round's result) on the flagged rows of every partition, so round ``r``'s loss and
accuracy arrive with round ``r + 1``'s job, and one last evaluation-only job follows the last round.

Failures: a device whose training raises is retried with its task by Spark (the task re-raises while attempts are
left); on the last attempt the task reports the device dropped and the round merges the others; ``roundHistory``
lists the dropped devices and their errors. When every selected device of a round fails, the fit stops with a
RuntimeError. Testing aid: the Spark local property ``sparkdl_hetero.injectDeviceFault`` (comma-separated device
keys, as strings) makes those devices fail on every attempt.

Checkpoints every ``checkpointInterval`` rounds (and after the last) to ``checkpointDir``: the global weights, the
round, the loss history, CAD's statistics and the round history; a fit with the same directory resumes.
Mentor-guided training (a :class:`~sparkdl_hetero.nn.distill.DistillationObjective`) works with FedAvg: each
device trains the distillation objective (adapters included) locally; CAD's sub-models drop output classes a mentor
still predicts, so a mentor with CAD is refused.

Placement and jobs as in the other modes: a round's stage asks for the training resources (a GPU per task when
training uses GPUs, :func:`.cluster.training_resources`), each task resolves its backend for the GPU Spark assigned
to it (:func:`.placement.task_backend`; the stats' ``backends`` list every task's account), and every job of the fit
carries the fit's tag (:func:`.cluster.tagged`; ``spark.interruptTag`` cancels them).

Only DataFrame APIs run here (``mapInArrow``, ``repartition``, ``persist``), no SparkContext, so the mode runs under
Spark Connect.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..backends import Backend
from ..nn.cad import STATS_ROWS_PER_CLASS, ActivationStats, check_cad_layers, critical_paths, stats_rows, submodel
from ..nn.config import ConfigError
from ..nn.distill import DistillationObjective
from ..nn.federated import RoundAggregator, local_update
from ..nn.model import FeedForwardModel
from ..nn.objective import Objective
from ..nn.topology import FeedForwardTopology
from .checkpoint import Checkpoint, load_compatible, save_checkpoint
from .cluster import fit_tag, tagged, task_slots, training_resources
from .config import TrainConfig, TrainResult
from .data import (
    HANDLE_SCHEMA,
    Handle,
    Layout,
    arrow_schema,
    check_columns,
    convert_partition,
    features_expr,
    raise_for_bad_input,
    release_resident,
    resident_blocks,
)
from .executor import blas_limit, validation_sums

FAULT_PROPERTY = "sparkdl_hetero.injectDeviceFault"
STATS_DECAY = 0.5  # CAD: factor on the server's statistics before a round's are added (see the module docstring)
LOCAL_SOLVERS = ("gd", "sgd", "momentum", "adam")
_DEVICES_SCHEMA = HANDLE_SCHEMA + ", devices string, null_device long, null_valid long"
_OUT_SCHEMA = ("kind string, part int, device string, rows long, bytes_down long, bytes_up long, seconds double, "
               "loss double, error string, val_loss double, val_correct double, val_count long, payload binary, "
               "backend string")


# ---- payloads: what a device receives and sends (.npz bytes, never pickle) ----------------------------------
def encode_payload(arrays: dict[str, np.ndarray], meta: dict) -> bytes:
    """Arrays and a JSON-able ``meta`` as the bytes of an uncompressed ``.npz``: what travels, and its length."""
    buf = io.BytesIO()
    np.savez(buf, **arrays, meta=np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8))
    return buf.getvalue()


def decode_payload(data: bytes) -> tuple[dict[str, np.ndarray], dict]:
    """The arrays and meta :func:`encode_payload` encoded."""
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(arrays.pop("meta").tobytes().decode("utf-8"))
    return arrays, meta


# ---- executor side --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Device:
    """One device of a partition: its key, its rows in the partition's blocks (training rows first, then its
    validation rows) and the classes of its training rows."""

    key: str
    start: int
    train: int
    valid: int
    classes: tuple[int, ...]


def _convert_devices(batches: Iterator, fit_id: str, d: int, k: int) -> Iterator:
    """mapInArrow body of the conversion: the rows of :mod:`.data`'s conversion (x, y) into the partition's
    blocks, plus each device's row range and classes (rows arrive sorted by device, then validation flag)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    keys: list = []
    flags: list = []
    labels: list = []
    counts = {"null_device": 0, "null_valid": 0}

    def rows() -> Iterator:
        for b in batches:
            dev, valid = b.column(0), b.column(1)
            counts["null_device"] += dev.null_count
            counts["null_valid"] += valid.null_count
            keys.append(dev)
            flags.append(pc.fill_null(valid, False))
            labels.append(b.column(3))
            yield pa.RecordBatch.from_arrays([b.column(2), b.column(3)], names=["x", "y"])

    for out in convert_partition(rows(), fit_id, Layout(d, k)):
        devices = []
        if keys and not counts["null_device"]:
            key = pa.chunked_array(keys).to_numpy(zero_copy_only=False)
            valid = pa.chunked_array(flags).to_numpy(zero_copy_only=False).astype(bool)
            y = pa.chunked_array(labels).to_numpy(zero_copy_only=False)
            bounds = np.flatnonzero(key[1:] != key[:-1]) + 1
            for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(key)], strict=True):
                yt = y[lo:hi][~valid[lo:hi]]
                yv = y[lo:hi]
                bad = yv[~np.isfinite(yv) | (yv != np.floor(yv)) | (yv < 0) | (yv >= k)]
                devices.append({"key": str(key[lo]), "start": int(lo), "train": int(yt.size),
                                "valid": int(hi - lo - yt.size), "bad": int(bad.size),
                                "bad_value": float(bad[0]) if bad.size else 0.0,
                                "classes": np.unique(yt[np.isfinite(yt) & (yt >= 0) & (yt < k)]).astype(int).tolist()})
        yield pa.RecordBatch.from_arrays(
            [*out.columns, pa.array([json.dumps(devices)]), pa.array([counts["null_device"]], pa.int64()),
             pa.array([counts["null_valid"]], pa.int64())],
            names=[*out.schema.names, "devices", "null_device", "null_valid"])


@dataclass(frozen=True)
class _RoundJob:
    """What a round's tasks need: the global weights and every selected device's plan (a small closure)."""

    fit_id: str
    objective: Objective
    config: TrainConfig
    weights: np.ndarray  # the objective's parameters, in config.dtype
    plans: dict  # device key -> (classes, {layer: filters} for a CAD sub-model or None for the whole model, seed)
    stats_layers: tuple[int, ...]  # CAD: layers whose activations devices measure (empty: none)
    train: bool = True  # False: only measure (CAD's first statistics)
    evaluate: bool = False  # evaluate the weights on the partitions' validation rows
    attempts: int = 1  # Spark's attempts per task: a failing device is re-raised while attempts are left


def _model(job: _RoundJob, backend: Backend, topology: FeedForwardTopology | None) -> Any:
    """A fresh model for ``topology``, or (None) the objective's replica (a mentor's distillation replica), on the
    task's ``backend``."""
    c = job.config
    if topology is None:
        return job.objective.replica(backend, np.dtype(c.dtype), c.seed)
    return FeedForwardModel(topology, np.zeros(topology.num_weights), dtype=np.dtype(c.dtype), backend=backend)


def _train_device(job: _RoundJob, dev: _Device, x: np.ndarray, y: np.ndarray,
                  backend: Backend) -> tuple[bytes, bytes, float, float]:
    """One device's round on the task's ``backend``: (download bytes, upload bytes, seconds computing, last epoch's
    mean loss)."""
    topo = job.objective.topology
    classes, filters, seed = job.plans[dev.key]
    sub = submodel(topo, classes, filters) if filters is not None else None
    meta = {"spec": (sub.topology if sub else topo).spec, "inputShape": list(topo.input_shape),
            "classes": list(classes)}
    down = encode_payload({"weights": (sub.weights(job.weights) if sub else job.weights)}, meta)
    # the device: decode what it received, measure, train, encode what it sends
    start = time.perf_counter()
    arrays, meta = decode_payload(down)
    w = arrays["weights"]
    model = _model(job, backend, FeedForwardTopology.from_spec(meta["spec"], meta["inputShape"]) if sub else None)
    up_arrays: dict[str, np.ndarray] = {}
    if job.stats_layers:
        stats = ActivationStats(topo, job.stats_layers)  # CAD refuses mentors: the model is a FeedForwardModel
        model.set_weights(w.astype(model.dtype))
        rows = stats_rows(y, STATS_ROWS_PER_CLASS, seed)
        stats.add(model, x[rows], y[rows], sub)
        cls = np.asarray(classes)
        for i in job.stats_layers:
            kept = sub.filters[i] if sub else np.arange(stats.sums[i].shape[1])
            up_arrays[f"sums_{i}"] = stats.sums[i][np.ix_(cls, kept)]
            up_arrays[f"counts_{i}"] = stats.counts[i][cls, kept[0]]  # the same for every filter of a class
    loss = float("nan")
    if job.train:
        cfg = dataclasses.replace(job.config, seed=int(seed))
        labels = sub.local_labels(y) if sub else y
        result = local_update(model, w, x, labels, cfg, job.config.localEpochs)
        up_arrays["weights"] = result.weights.astype(job.weights.dtype, copy=False)
        loss = float(result.history[-1])
    up = encode_payload(up_arrays, {"rows": int(len(y))})
    return down, up, time.perf_counter() - start, loss


def _receive(job: _RoundJob, dev: _Device, up: bytes, agg: RoundAggregator, stats: ActivationStats | None) -> None:
    """The server's side of one upload: merge the weights (at the sub-model's indices) and the statistics."""
    arrays, meta = decode_payload(up)
    classes, filters, _ = job.plans[dev.key]
    if "weights" in arrays:
        index = submodel(job.objective.topology, classes, filters).index if filters is not None else None
        agg.add(arrays["weights"].astype(np.float64), int(meta["rows"]), index)
    if stats is not None:
        cls = np.asarray(classes)
        for i in stats.layers:
            kept = filters[i] if filters is not None and i in filters else np.arange(stats.sums[i].shape[1])
            at = np.ix_(cls, np.asarray(kept))
            stats.sums[i][at] += arrays[f"sums_{i}"]
            stats.counts[i][at] += arrays[f"counts_{i}"][:, None]


def _validate(job: _RoundJob, backend: Backend, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(loss sum, correct predictions) of the global model on validation rows ``x``, ``y``
    (:func:`.executor.validation_sums`, as the other modes validate)."""
    model = _model(job, backend, job.objective.topology)
    model.set_weights(job.objective.model_weights(job.weights).astype(model.dtype))
    sums = validation_sums(model, x, y, None)
    return float(sums[0]), float(sums[1])


def _round_task(rows: Iterator, job: _RoundJob) -> Iterator:
    """mapInArrow body of a round over the cached handle rows: train this partition's selected devices, one row
    per device, then one row with the partition's partial merge and validation sums."""
    import pyarrow as pa
    from pyspark import TaskContext

    from .placement import task_backend

    ctx = TaskContext.get()
    faulty = set(filter(None, (ctx.getLocalProperty(FAULT_PROPERTY) or "").split(",")))
    backend, account = task_backend(job.config.backend)
    out: list[dict] = []
    for batch in rows:
        for r in batch.to_pylist():
            devices = [_Device(d["key"], d["start"], d["train"], d["valid"], tuple(d["classes"]))
                       for d in json.loads(r.pop("devices"))]
            r.pop("null_device")
            r.pop("null_valid")
            handle = Handle(**r)
            blocks = resident_blocks(job.fit_id, handle)
            if blocks is None:
                out.append(_row(kind="missing", part=handle.part))
                continue
            x, y = blocks
            agg = RoundAggregator(job.weights.astype(np.float64))
            stats = ActivationStats(job.objective.topology, job.stats_layers) if job.stats_layers else None
            received = 0
            with blas_limit(max(1, int(ctx.cpus()))):
                for dev in devices:
                    if dev.key not in job.plans:
                        continue
                    lo, hi = dev.start, dev.start + dev.train
                    try:
                        if dev.key in faulty:
                            raise RuntimeError(f"injected fault on device {dev.key}")
                        down, up, seconds, loss = _train_device(job, dev, x[lo:hi], y[lo:hi], backend)
                        _receive(job, dev, up, agg, stats)
                        received += 1
                    except Exception as e:
                        if ctx.attemptNumber() + 1 < job.attempts:
                            raise  # Spark retries the task
                        out.append(_row(kind="device", part=handle.part, device=dev.key, error=f"{type(e).__name__}: "
                                        f"{e}"))
                        continue
                    out.append(_row(kind="device", part=handle.part, device=dev.key, rows=dev.train,
                                    bytes_down=len(down), bytes_up=len(up), seconds=seconds, loss=loss))
                val_loss = val_correct = 0.0
                val_count = 0
                if job.evaluate:
                    idx = np.concatenate([np.arange(d.start + d.train, d.start + d.train + d.valid) for d in devices]
                                         + [np.zeros(0, np.int64)])
                    if idx.size:
                        val_loss, val_correct = _validate(job, backend, x[idx], y[idx])
                        val_count = int(idx.size)
            payload = b""
            if received:  # the partition's partial merge: one per task, whatever its number of devices
                partial = {f"agg/{k}": v for k, v in agg.state_dict().items()}
                if stats is not None:
                    partial.update({f"stats/{k}": v for k, v in stats.state_dict().items()})
                payload = encode_payload(partial, {})
            out.append(_row(kind="partial", part=handle.part, val_loss=val_loss, val_correct=val_correct,
                            val_count=val_count, payload=payload, backend=account))
    if out:
        yield pa.RecordBatch.from_pylist(out, schema=arrow_schema(_OUT_SCHEMA))


def _row(**kw: Any) -> dict:
    row = {"kind": "", "part": -1, "device": "", "rows": 0, "bytes_down": 0, "bytes_up": 0, "seconds": 0.0,
           "loss": float("nan"), "error": "", "val_loss": 0.0, "val_correct": 0.0, "val_count": 0, "payload": b"",
           "backend": ""}
    row.update(kw)
    return row


def _fallback_task(batches: Iterator, job: _RoundJob, d: int, k: int, missing: list[int]) -> Iterator:
    """A round's task for a partition whose blocks were not found: convert its rows again here, then train.
    Other partitions convert nothing (converting their empty selection would replace their blocks)."""
    from pyspark import TaskContext

    if TaskContext.get().partitionId() not in missing:
        for _ in batches:  # consume the input: a worker that leaves input unread is not reused by Spark
            pass
        return
    yield from _round_task(_convert_devices(batches, job.fit_id, d, k), job)


def _release_task(batches: Iterator, fit_id: str) -> Iterator:
    import pyarrow as pa

    for _ in batches:  # consume the input: a worker that leaves input unread is not reused by Spark
        pass
    yield pa.RecordBatch.from_pylist([{"released": release_resident(fit_id)}], schema=pa.schema([("released",
                                                                                                   pa.int64())]))


# ---- driver side -----------------------------------------------------------------------------------------------
@dataclass
class DeviceData:
    """The converted devices of a fit: the cached handle DataFrame the rounds run over, and the device table."""

    fit_id: str
    rows_df: Any  # the repartitioned, sorted (device, valid, x, y) DataFrame, persisted
    handles_df: Any  # one handle row per partition, persisted
    devices: dict[str, _Device]  # key -> device
    keys: list[str]  # the devices in selection order
    integer_keys: bool  # deviceCol is an integer column: keys are reported as integers
    num_partitions: int
    num_features: int
    num_classes: int
    validation_rows: int = 0
    extra: dict = field(default_factory=dict)

    def report_key(self, key: str) -> int | str:
        return int(key) if self.integer_keys else key

    @property
    def tag(self) -> str:
        """The Spark job tag of this fit's jobs (``spark.interruptTag`` cancels them)."""
        return fit_tag(self.fit_id)

    def release(self) -> None:
        """Delete the blocks on the executors (best effort) and unpersist the cached DataFrames."""
        fit_id = self.fit_id
        spark = self.handles_df.sparkSession
        try:
            n = max(1, self.num_partitions)
            with tagged(spark, self.tag):
                spark.range(0, n * 2, numPartitions=n * 2).mapInArrow(lambda it: _release_task(it, fit_id),
                                                                       "released long").collect()
                self.handles_df.mapInArrow(lambda it: _release_task(it, fit_id), "released long").collect()
        finally:
            release_resident(fit_id)
            self.handles_df.unpersist()
            self.rows_df.unpersist()


def _task_attempts(spark: Any) -> int:
    """How many times Spark runs a failing task: ``local[N, F]``: F; other local masters: 1; else
    ``spark.task.maxFailures``."""
    import re

    master = (spark.conf.get("spark.master", None) or "").replace(" ", "")
    m = re.fullmatch(r"local(?:\[[^,\]]+(?:,(\d+))?\])?", master)
    if m:
        return int(m.group(1)) if m.group(1) else 1
    return max(1, int(spark.conf.get("spark.task.maxFailures", "4") or 4))


def check_device_columns(df: Any, device_col: str, validation_col: str) -> None:  # noqa: ANN401
    """Schema checks (no job): ``device_col`` exists and is an integer or string column; ``validation_col``
    (when set) exists and is boolean."""
    from pyspark.sql.types import BooleanType, IntegralType, StringType

    if not device_col or device_col not in df.columns:
        raise ValueError(f"deviceCol {device_col!r} not found in the DataFrame; it has columns {df.columns} "
                         f"(mode='federated' groups rows into devices by this column)")
    dtype = df.schema[device_col].dataType
    if not isinstance(dtype, (IntegralType, StringType)):
        raise ValueError(f"deviceCol {device_col!r} must be an integer or string column, got {dtype.simpleString()}")
    if validation_col:
        if validation_col not in df.columns:
            raise ValueError(f"validationIndicatorCol {validation_col!r} not found in the DataFrame; it has columns "
                             f"{df.columns}")
        vtype = df.schema[validation_col].dataType
        if not isinstance(vtype, BooleanType):
            raise ValueError(f"validationIndicatorCol {validation_col!r} must be a boolean column, got "
                             f"{vtype.simpleString()}")


def prepare_devices(df: Any, features_col: str, label_col: str, device_col: str, validation_col: str,  # noqa: ANN401
                    num_features: int, num_classes: int, num_partitions: int = 0) -> DeviceData:
    """Validate ``df`` and convert it to resident blocks, a device's rows in one partition, in one Spark job;
    ValueError (naming column, device, expected and actual values) on any bad input, before training."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F
    from pyspark.sql.types import IntegralType

    check_columns(df, features_col, label_col)
    check_device_columns(df, device_col, validation_col)
    spark = df.sparkSession
    parts = num_partitions or task_slots(spark)
    fit_id = uuid.uuid4().hex
    valid = F.col(validation_col) if validation_col else F.lit(False)
    rows_df = (df.select(F.col(device_col).cast("string").alias("device"), valid.alias("valid"),
                         features_expr(df, features_col).alias("x"), F.col(label_col).cast("double").alias("y"))
               .repartition(parts, "device").sortWithinPartitions("device", "valid"))
    rows_df.persist(StorageLevel.MEMORY_AND_DISK)  # a recomputed partition gets the same rows in the same order
    d, k = num_features, num_classes
    handles_df = rows_df.mapInArrow(lambda it: _convert_devices(it, fit_id, d, k), _DEVICES_SCHEMA)
    handles_df.persist(StorageLevel.MEMORY_AND_DISK)
    integer = isinstance(df.schema[device_col].dataType, IntegralType)
    data = DeviceData(fit_id, rows_df, handles_df, {}, [], integer, parts, d, k)
    try:
        with tagged(spark, data.tag):
            collected = handles_df.collect()
        handles, devices = [], []
        null_device = null_valid = 0
        for row in collected:
            r = row.asDict()
            devices += [(r["part"], dev) for dev in json.loads(r.pop("devices"))]
            null_device += r.pop("null_device")
            null_valid += r.pop("null_valid")
            handles.append(Handle(**r))
        if null_device:
            raise ValueError(f"deviceCol {device_col!r} has {null_device} null values; every row needs a device")
        if null_valid:
            raise ValueError(f"validationIndicatorCol {validation_col!r} has {null_valid} null values; expected true "
                             f"or false")
        for _, dev in devices:
            if dev["bad"]:
                raise ValueError(f"device {dev['key']!r} has {dev['bad']} labels outside the model's classes "
                                 f"[0, {k}) in label column {label_col!r} (first found: {dev['bad_value']})")
        raise_for_bad_input(handles, features_col, label_col, Layout(d, k), "", "")
        empty = [dev["key"] for _, dev in devices if dev["train"] == 0]
        if empty:
            raise ValueError(f"{len(empty)} devices have no training rows (only rows flagged by "
                             f"validationIndicatorCol {validation_col!r}), e.g. {empty[:5]}; every device needs at "
                             f"least one")
    except BaseException:
        data.release()
        raise
    data.devices = {dev["key"]: _Device(dev["key"], dev["start"], dev["train"], dev["valid"], tuple(dev["classes"]))
                    for _, dev in devices}
    data.keys = sorted(data.devices, key=(lambda s: int(s)) if integer else None)
    data.validation_rows = sum(dev.valid for dev in data.devices.values())
    return data


def check_federated(objective: Objective, config: TrainConfig) -> list[int]:
    """The federated knobs that depend on the model (ValueError before any Spark job); CAD's decoupled layers."""
    if config.solver not in LOCAL_SOLVERS:
        raise ConfigError("solver", f"one of {', '.join(LOCAL_SOLVERS)} with mode='federated' (each device's local "
                          f"optimizer)", config.solver)
    if config.federatedAlgorithm != "cad":
        return []
    if isinstance(objective, DistillationObjective):
        raise ValueError("federatedAlgorithm='cad' trains sub-models without the classes other devices hold, which "
                         "a mentor's soft targets cover: use the mentor params with federatedAlgorithm='fedavg'")
    return check_cad_layers(objective.topology, config.cadLayers or None)


class FederatedTrainer:
    """The rounds of one federated fit, driven from the driver."""

    def __init__(self, data: DeviceData, objective: Objective, config: TrainConfig, cad_layers: list[int]) -> None:
        self.data, self.objective, self.config = data, objective, config
        self.cad = config.federatedAlgorithm == "cad"
        self.layers = tuple(cad_layers)
        self.stats = ActivationStats(objective.topology, self.layers) if self.cad else None
        self.spark = data.handles_df.sparkSession
        self.attempts = _task_attempts(self.spark)
        # the rounds' own resources (a GPU per task when training uses GPUs): None, Spark's default profile
        self.profile = training_resources(self.spark, config.backend, config.taskGpus, config.taskCpus).profile
        self.backends: set[str] = set()  # every task's backend account
        self.order = {key: i for i, key in enumerate(data.keys)}  # a device's index: its batch order's seed
        self.history: list[dict] = []
        self.losses: list[float] = []
        self.started = time.perf_counter()
        self.jobs = 0
        self.fallbacks = 0

    # -- selection and plans --
    def selected(self, r: int) -> list[str]:
        """The devices of round ``r`` (1-based): ``max(1, round(C * devices))`` of them, drawn with the seed."""
        keys = self.data.keys
        m = max(1, int(math.floor(self.config.clientFraction * len(keys) + 0.5)))
        pick = np.random.default_rng([self.config.seed, r]).choice(len(keys), size=m, replace=False)
        return [keys[i] for i in sorted(pick)]

    def _plans(self, r: int, keys: list[str], decouple: bool) -> dict:
        plans = {}
        for key in keys:
            classes = list(self.data.devices[key].classes)
            filters = critical_paths(self.stats, classes, self.config.cadKeep) if decouple else None
            seed = np.random.SeedSequence([self.config.seed, r, self.order[key]]).generate_state(1)[0]
            plans[key] = (classes, filters, int(seed))
        return plans

    # -- one job --
    def run_job(self, job: _RoundJob, label: str) -> list:
        """Run one round's job over the cached handles (and, for partitions without blocks, a second job that
        converts them again); the result rows."""
        from pyspark.sql import functions as F

        self.jobs += 1
        with tagged(self.spark, self.data.tag, label):
            rows = self.data.handles_df.mapInArrow(lambda it: _round_task(it, job), _OUT_SCHEMA,
                                                   profile=self.profile).collect()
            missing = sorted({r["part"] for r in rows if r["kind"] == "missing"})
            if missing:
                self.fallbacks += len(missing)
                d, k = self.data.num_features, self.data.num_classes
                redo = self.data.rows_df.where(F.spark_partition_id().isin(missing))
                rows = [r for r in rows if r["kind"] != "missing"] + \
                    redo.mapInArrow(lambda it: _fallback_task(it, job, d, k, missing), _OUT_SCHEMA,
                                    profile=self.profile).collect()
                if any(r["kind"] == "missing" for r in rows):
                    raise RuntimeError(f"{label}: partitions {missing} have no blocks even after converting them "
                                       f"again on the executor that ran them")
        self.backends.update(r["backend"] for r in rows if r["backend"])
        return rows

    def job(self, weights: np.ndarray, plans: dict, stats: bool, train: bool = True,
            evaluate: bool = False) -> _RoundJob:
        c = self.config
        w = np.ascontiguousarray(weights, dtype=np.dtype(c.dtype))
        return _RoundJob(self.data.fit_id, self.objective, c, w, plans, self.layers if stats else (), train,
                         evaluate, self.attempts)

    # -- the rounds --
    def round(self, r: int, weights: np.ndarray) -> np.ndarray:
        """Run round ``r`` from global ``weights``; append its history entry; the new global weights."""
        c = self.config
        t0 = time.perf_counter()
        keys = self.selected(r)
        decouple = self.cad and r > c.cadWarmupRounds
        if decouple and not self._has_stats():
            self._measure(weights)
        plans = self._plans(r, keys, decouple)
        evaluate = self.data.validation_rows > 0
        rows = self.run_job(self.job(weights, plans, self.cad, evaluate=evaluate), f"round {r}")
        agg = RoundAggregator(np.asarray(weights, dtype=np.float64))
        fresh = ActivationStats(self.objective.topology, self.layers) if self.cad else None
        val = np.zeros(3)
        entry: dict[str, Any] = {"round": r, "algorithm": "cad" if decouple else "fedavg",
                                 "devices": [self.data.report_key(k) for k in keys], "dropped": [],
                                 "bytesDown": 0, "bytesUp": 0, "deviceSeconds": 0.0, "maxDeviceSeconds": 0.0,
                                 "rows": 0, "trainLoss": float("nan"), "validationLoss": None,
                                 "validationAccuracy": None}
        loss_sum = 0.0
        for row in rows:
            if row["kind"] == "device":
                if row["error"]:
                    entry["dropped"].append({"device": self.data.report_key(row["device"]), "error": row["error"]})
                    continue
                entry["bytesDown"] += row["bytes_down"]
                entry["bytesUp"] += row["bytes_up"]
                entry["deviceSeconds"] += row["seconds"]
                entry["maxDeviceSeconds"] = max(entry["maxDeviceSeconds"], row["seconds"])
                entry["rows"] += row["rows"]
                loss_sum += row["loss"] * row["rows"]
            elif row["kind"] == "partial" and row["payload"]:
                arrays, _ = decode_payload(row["payload"])
                part = RoundAggregator(np.asarray(weights, dtype=np.float64))
                part.load_state_dict({k[4:]: v for k, v in arrays.items() if k.startswith("agg/")})
                agg.merge(part)
                if fresh is not None:
                    fresh.merge(self._stats_of(arrays))
            if row["kind"] == "partial":
                val += (row["val_loss"], row["val_correct"], row["val_count"])
        if agg.devices == 0:
            errors = "; ".join(f"{d['device']}: {d['error']}" for d in entry["dropped"][:3])
            raise RuntimeError(f"round {r}: every selected device failed ({len(keys)} devices), e.g. {errors}")
        self._record_validation(val)
        if fresh is not None:
            self._decay_and_add(fresh)
        entry["trainLoss"] = loss_sum / max(entry["rows"], 1)
        entry["seconds"] = time.perf_counter() - t0
        self.history.append(entry)
        self.losses.append(entry["trainLoss"])
        return agg.result()

    def _has_stats(self) -> bool:
        return self.stats is not None and any(np.any(self.stats.counts[i] > 0) for i in self.layers)

    def _measure(self, weights: np.ndarray) -> None:
        """CAD without statistics: one forward-only job over every device's training rows."""
        plans = self._plans(0, self.data.keys, False)
        rows = self.run_job(self.job(weights, plans, True, train=False), "activation statistics")
        fresh = ActivationStats(self.objective.topology, self.layers)
        for row in rows:
            if row["kind"] == "partial" and row["payload"]:
                fresh.merge(self._stats_of(decode_payload(row["payload"])[0]))
        self._decay_and_add(fresh)

    def _stats_of(self, arrays: dict[str, np.ndarray]) -> ActivationStats:
        stats = ActivationStats(self.objective.topology, self.layers)
        stats.load_state_dict({k[6:]: v for k, v in arrays.items() if k.startswith("stats/")})
        return stats

    def _decay_and_add(self, fresh: ActivationStats) -> None:
        for i in self.layers:
            self.stats.sums[i] *= STATS_DECAY
            self.stats.counts[i] *= STATS_DECAY
        self.stats.merge(fresh)

    def _record_validation(self, val: np.ndarray) -> None:
        """The validation sums a job computed belong to the weights it shipped: the last round's result."""
        if val[2] and self.history:
            self.history[-1]["validationLoss"] = float(val[0] / val[2])
            self.history[-1]["validationAccuracy"] = float(val[1] / val[2])

    def evaluate(self, weights: np.ndarray) -> None:
        """The last round's validation: one evaluation-only job."""
        rows = self.run_job(self.job(weights, {}, False, train=False, evaluate=True), "validation")
        val = np.zeros(3)
        for row in rows:
            if row["kind"] == "partial":
                val += (row["val_loss"], row["val_correct"], row["val_count"])
        self._record_validation(val)

    def run(self, initial_weights: np.ndarray) -> TrainResult:
        from tqdm.auto import tqdm

        c = self.config
        solver = f"federated-{c.federatedAlgorithm}"
        ckpt = load_compatible(c.checkpointDir, solver, self.objective.num_weights) if c.checkpointDir else None
        weights = np.asarray(initial_weights, dtype=np.float64).copy()
        start = 0
        if ckpt is not None:
            weights, start = ckpt.weights.astype(np.float64), ckpt.iteration
            self.losses = list(ckpt.history)
            self.history = list(ckpt.extra.get("roundHistory", []))
            if self.stats is not None and ckpt.updater_state:
                self.stats.load_state_dict(ckpt.updater_state)
        bar = tqdm(total=c.rounds, initial=start, unit="round", desc=f"federated {c.federatedAlgorithm}",
                   disable=not c.verbose, dynamic_ncols=True)
        try:
            with blas_limit(1):
                for r in range(start + 1, c.rounds + 1):
                    weights = self.round(r, weights)
                    e = self.history[-1]
                    bar.set_postfix(loss=f"{e['trainLoss']:.4g}", down=e["bytesDown"], up=e["bytesUp"],
                                    dropped=len(e["dropped"]), refresh=False)
                    bar.update(1)
                    if c.checkpointDir and (r % max(1, c.checkpointInterval) == 0 or r == c.rounds):
                        save_checkpoint(c.checkpointDir, Checkpoint(
                            weights, r, list(self.losses), self.stats.state_dict() if self.stats else {}, solver,
                            {"roundHistory": self.history}))
                if self.data.validation_rows and self.history and self.history[-1]["validationAccuracy"] is None:
                    self.evaluate(weights)
        finally:
            bar.close()
        seconds = time.perf_counter() - self.started
        return TrainResult(weights, list(self.losses), len(self.history), {
            "mode": "federated", "algorithm": c.federatedAlgorithm, "solver": c.solver, "seconds": seconds,
            "roundHistory": [dict(e) for e in self.history], "numDevices": len(self.data.keys),
            "numPartitions": self.data.num_partitions, "validationRows": self.data.validation_rows,
            "cadLayers": list(self.layers), "jobs": self.jobs, "fallbackPartitions": self.fallbacks,
            "backends": sorted(self.backends)})


def _preferences_task(batches: Iterator, topology: dict, weights: np.ndarray, layer: int, dtype: str,
                      backend: str) -> Iterator:
    import pyarrow as pa

    from .placement import task_backend

    topo = FeedForwardTopology.from_dict(topology)
    be, _ = task_backend(backend)
    model = FeedForwardModel(topo, weights, dtype=np.dtype(dtype), backend=be)
    stats = ActivationStats(topo, [layer])
    for b in batches:
        if b.num_rows:
            x = b.column(0).flatten().to_numpy(zero_copy_only=False).reshape(b.num_rows, -1)
            stats.add(model, x, b.column(1).to_numpy(zero_copy_only=False))
    yield pa.RecordBatch.from_pylist([{"payload": encode_payload(stats.state_dict(), {})}],
                                     schema=pa.schema([("payload", pa.binary())]))


def filter_preferences_df(df: Any, features_col: str, label_col: str, topology: FeedForwardTopology,  # noqa: ANN401
                          weights: np.ndarray, layer: int, dtype: str = "float32",
                          backend: str = "numpy") -> np.ndarray:
    """:func:`~sparkdl_hetero.nn.visualize.filter_preferences` over a DataFrame: each task sums its rows'
    activations per class (:class:`~sparkdl_hetero.nn.cad.ActivationStats`), the driver adds them up."""
    from pyspark.sql import functions as F

    check_columns(df, features_col, label_col)
    stats = ActivationStats(topology, [layer])  # checks the layer before any job
    spec, w = topology.to_dict(), np.asarray(weights)
    rows = df.select(features_expr(df, features_col).alias("x"), F.col(label_col).cast("double").alias("y")) \
        .mapInArrow(lambda it: _preferences_task(it, spec, w, layer, dtype, backend), "payload binary").collect()
    for row in rows:
        part = ActivationStats(topology, [layer])
        part.load_state_dict(decode_payload(row["payload"])[0])
        stats.merge(part)
    return stats.means(layer)


def fit_federated(df: Any, features_col: str, label_col: str, device_col: str, validation_col: str,  # noqa: ANN401
                  objective: Objective, config: TrainConfig, initial_weights: np.ndarray) -> TrainResult:
    """Federated training of ``objective`` over the devices of ``df`` (see the module docstring)."""
    layers = check_federated(objective, config)
    topo = objective.topology
    data = prepare_devices(df, features_col, label_col, device_col, validation_col, topo.num_inputs,
                           topo.num_outputs, config.numWorkers)
    try:
        return FederatedTrainer(data, objective, config, layers).run(initial_weights)
    finally:
        data.release()
