"""DataFrame -> per-partition float32 blocks, validated on the way in and kept resident next to the executors.

One Spark job converts and validates: the features column (a Spark ML ``Vector``, dense or sparse, or an
``array`` of numbers) becomes ``array<float>`` in the JVM (``vector_to_array``), ``mapInArrow`` hands each
partition to Python as Arrow record batches, and each batch is checked and appended -- as raw float32 rows and
int32 labels, no per-row Python -- to two files in the executor's Spark work directory. The job returns one small
*handle* row per partition (its row count, file paths and validation counters); the driver turns the counters into
a :class:`ValueError` naming column, expected and actual values before any training starts.

Training jobs then run over the cached handles DataFrame (one DataFrame API for classic and Spark Connect
sessions): the JVM ships a few bytes per partition, and the Python worker maps the partition's files
(``np.memmap``, shared through the page cache by every worker of the host) and keeps them in a module-level cache
keyed by fit id and partition. Spark schedules a task where its cached handle lives, so the files are found; when a
task lands on a host without them (executor lost, locality given up), :func:`resident_blocks` returns ``None`` and
the trainer recomputes that partition from the persisted Arrow DataFrame (:meth:`PartitionedData.rebuild`), which
writes the files on that host again.
"""

from __future__ import annotations

import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

_SUBDIR = "sparkdl-hetero-blocks"
# module-level cache of the executor's Python worker: (fit id, partition) -> (features, labels, features file)
# as views of memory-mapped files
_RESIDENT: dict[tuple[str, int], tuple[np.ndarray, np.ndarray, str]] = {}

_NUMERIC = ("byte", "short", "int", "long", "float", "double", "decimal")
_HANDLE_SCHEMA = (
    "part int, n long, host string, xpath string, ypath string, "
    "null_x long, null_y long, null_elem long, bad_len long, bad_len_value long, "
    "nonfinite long, nonfinite_value double, bad_label long, bad_label_value double"
)


@dataclass
class Handle:
    """Where one partition's blocks live, and what the validation pass counted in it."""

    part: int
    n: int
    host: str
    xpath: str
    ypath: str
    null_x: int = 0
    null_y: int = 0
    null_elem: int = 0
    bad_len: int = 0
    bad_len_value: int = 0
    nonfinite: int = 0
    nonfinite_value: float = 0.0
    bad_label: int = 0
    bad_label_value: float = 0.0


def _blocks_dir(fit_id: str) -> str:
    from pyspark import SparkFiles

    try:
        root = SparkFiles.getRootDirectory()
    except Exception:  # outside a Spark worker (the driver before a context exists): the temp directory
        import tempfile

        root = tempfile.gettempdir()
    return os.path.join(root, _SUBDIR, fit_id)


def _convert_partition(batches: Iterator, fit_id: str, num_features: int, num_classes: int,
                       resident: bool = True) -> Iterator:
    """mapInArrow body: validate and append every batch to this partition's files (``resident=False``: validate
    only); yield one handle row."""
    import pyarrow as pa
    import pyarrow.compute as pc
    from pyspark import TaskContext

    part = TaskContext.get().partitionId()
    d = num_features
    h = Handle(part, 0, socket.gethostname(), "", "")
    if resident:
        directory = _blocks_dir(fit_id)
        os.makedirs(directory, exist_ok=True)
        h.xpath = os.path.join(directory, f"x-{part}.f32")
        h.ypath = os.path.join(directory, f"y-{part}.i32")
    with open(h.xpath or os.devnull, "wb") as fx, open(h.ypath or os.devnull, "wb") as fy:
        for batch in batches:
            if batch.num_rows == 0:
                continue
            xcol, ycol = batch.column(0), batch.column(1)
            h.null_x += xcol.null_count
            h.null_y += ycol.null_count
            if xcol.null_count or ycol.null_count:
                keep = pc.and_(pc.is_valid(xcol), pc.is_valid(ycol))
                xcol, ycol = xcol.filter(keep), ycol.filter(keep)
            lengths = pc.list_value_length(xcol).to_numpy(zero_copy_only=False)
            bad = lengths != d
            if bad.any():
                h.bad_len += int(bad.sum())
                h.bad_len_value = int(lengths[bad][0])
                continue
            values = xcol.flatten()
            if values.null_count:
                h.null_elem += values.null_count
                continue
            x = values.to_numpy(zero_copy_only=False)
            if x.dtype != np.float32:
                x = x.astype(np.float32)
            finite = np.isfinite(x)
            if not finite.all():
                h.nonfinite += int(x.size - np.count_nonzero(finite))
                h.nonfinite_value = float(x[~finite][0])
            y = ycol.to_numpy(zero_copy_only=False)
            yi = np.floor(y)
            wrong = (yi != y) | (y < 0) | (y >= num_classes) | ~np.isfinite(y)
            if wrong.any():
                h.bad_label += int(wrong.sum())
                h.bad_label_value = float(y[wrong][0])
            if h.bad_len or h.null_elem or h.nonfinite or h.bad_label:
                continue  # the fit will fail: keep counting, stop writing
            fx.write(x.data)
            fy.write(yi.astype(np.int32).data)
            h.n += len(y)
    if h.n == 0 and resident:
        for p in (h.xpath, h.ypath):
            os.remove(p)
        h.xpath = h.ypath = ""
    yield pa.RecordBatch.from_pylist([vars(h)], schema=_arrow_handle_schema())


def _arrow_handle_schema():  # noqa: ANN202 -- pyarrow is imported lazily
    import pyarrow as pa

    types = {"int": pa.int32(), "long": pa.int64(), "string": pa.string(), "double": pa.float64()}
    return pa.schema([(name, types[t]) for name, t in (f.split() for f in _HANDLE_SCHEMA.split(", "))])


def resident_blocks(fit_id: str, handle: Handle) -> tuple[np.ndarray, np.ndarray] | None:
    """The partition's ``(x (n, d) float32, y (n,) int32)``, memory-mapped once per Python worker; ``None`` when
    its files are not on this host."""
    key = (fit_id, handle.part)
    blocks = _RESIDENT.get(key)
    if blocks is None:
        if handle.n == 0:
            return np.zeros((0, 0), np.float32), np.zeros(0, np.int32)
        if handle.host != socket.gethostname() or not os.path.exists(handle.xpath) \
                or not os.path.exists(handle.ypath):
            return None
        for k in [k for k, v in _RESIDENT.items() if k[0] != fit_id and not os.path.exists(v[2])]:
            del _RESIDENT[k]  # another fit's blocks whose files were released: unmap them
        y = np.memmap(handle.ypath, dtype=np.int32, mode="r", shape=(handle.n,))
        x = np.memmap(handle.xpath, dtype=np.float32, mode="r")
        blocks = _RESIDENT[key] = (np.asarray(x).reshape(handle.n, -1), np.asarray(y), handle.xpath)
    return blocks[0], blocks[1]


def release_resident(fit_id: str) -> int:
    """Drop this worker's cached blocks of ``fit_id`` and delete its files on this host; the number released."""
    keys = [k for k in _RESIDENT if k[0] == fit_id]
    for k in keys:
        del _RESIDENT[k]
    shutil.rmtree(_blocks_dir(fit_id), ignore_errors=True)
    return len(keys)


def _rebuild_partitions(batches: Iterator, fit_id: str, num_features: int, num_classes: int,
                        parts: frozenset[int]) -> Iterator:
    """mapInArrow body of :meth:`PartitionedData.rebuild`: convert the partitions in ``parts`` again (on the host
    that runs them); any other partition is left alone -- converting its (filtered-out) rows would truncate the
    files it has on this host."""
    from pyspark import TaskContext

    if TaskContext.get().partitionId() in parts:
        yield from _convert_partition(batches, fit_id, num_features, num_classes)
    else:
        for _ in batches:
            pass


def _release_task(batches: Iterator, fit_id: str) -> Iterator:
    """mapInArrow body: release ``fit_id``'s blocks in this worker and host (consuming the input: a worker that
    leaves input unread is not reused by Spark)."""
    import pyarrow as pa

    for _ in batches:
        pass
    yield pa.RecordBatch.from_pylist([{"released": release_resident(fit_id)}],
                                     schema=pa.schema([("released", pa.int64())]))


@dataclass
class PartitionedData:
    """A validated DataFrame as resident float32 blocks: what trainers run over."""

    fit_id: str
    handles_df: object  # DataFrame of handle rows (_HANDLE_SCHEMA), cached: one row per partition
    handles: list[Handle]
    num_features: int
    num_classes: int
    arrow_df: object  # the (features array<float>, label double) DataFrame (cached unless the input is), to rebuild
    extra: dict = field(default_factory=dict)

    @property
    def count(self) -> int:
        return sum(h.n for h in self.handles)

    @property
    def num_partitions(self) -> int:
        return len(self.handles)

    @property
    def tag(self) -> str:
        """The Spark job tag of this fit's jobs (``spark.interruptTag`` cancels them)."""
        return f"sparkdl-hetero-fit-{self.fit_id[:8]}"

    def partition_sizes(self) -> list[int]:
        return [h.n for h in self.handles]

    def rebuild(self, parts: list[int]):  # noqa: ANN201 -- a DataFrame of handle rows
        """A fresh (uncached) conversion of the partitions ``parts`` only: running it writes their files on the host
        that runs each of them and yields their handles -- the fallback when a task finds no files."""
        from pyspark.sql import functions as F

        fit_id, d, k, keep = self.fit_id, self.num_features, self.num_classes, frozenset(parts)
        rows = self.arrow_df.where(F.spark_partition_id().isin(sorted(keep)))  # the others ship no rows
        return rows.mapInArrow(lambda it: _rebuild_partitions(it, fit_id, d, k, keep), _HANDLE_SCHEMA)

    def release(self) -> None:
        """Delete the blocks on every executor (best effort: Spark removes its work directories at exit anyway)
        and unpersist the cached data."""
        from .cluster import tagged

        fit_id = self.fit_id
        spark = self.arrow_df.sparkSession
        try:
            n = max(1, self.num_partitions)
            if self.extra.get("resident", True):  # validated only: nothing was written
                with tagged(spark, self.tag):
                    spark.range(0, n * 2, 1, n * 2).mapInArrow(lambda it: _release_task(it, fit_id),
                                                               "released long").collect()
                    self.handles_df.mapInArrow(lambda it: _release_task(it, fit_id), "released long").collect()
        finally:
            release_resident(fit_id)
            self.handles_df.unpersist()
            if self.extra.get("persistedInput"):
                self.arrow_df.unpersist()


def _features_expr(df, features_col: str):  # noqa: ANN001, ANN202 -- pyspark objects
    """The features column as ``array<float>``; ValueError when it is neither a Vector nor a numeric array."""
    from pyspark.ml.functions import vector_to_array
    from pyspark.ml.linalg import VectorUDT
    from pyspark.sql import functions as F
    from pyspark.sql.types import ArrayType, NumericType

    dtype = df.schema[features_col].dataType
    if isinstance(dtype, VectorUDT):
        col = F.col(features_col)  # vector_to_array fails on null: nulls pass through to be counted
        return F.when(col.isNull(), F.lit(None).cast("array<float>")).otherwise(vector_to_array(col, "float32"))
    if isinstance(dtype, ArrayType) and isinstance(dtype.elementType, NumericType):
        return F.col(features_col).cast("array<float>")
    raise ValueError(f"features column {features_col!r} must be a Vector (VectorUDT) or an array of numbers, "
                     f"got {dtype.simpleString()}")


def check_columns(df, features_col: str, label_col: str) -> None:  # noqa: ANN001 -- a pyspark DataFrame
    """Schema checks (no Spark job): both columns exist, features a vector/array, label numeric."""
    from pyspark.sql.types import NumericType

    names = df.columns
    for role, col in (("features", features_col), ("label", label_col)):
        if col not in names:
            raise ValueError(f"{role} column {col!r} not found in the DataFrame; it has columns {names}")
    _features_expr(df, features_col)
    ltype = df.schema[label_col].dataType
    if not isinstance(ltype, NumericType):
        raise ValueError(f"label column {label_col!r} must be numeric (integer class indices), "
                         f"got {ltype.simpleString()}")


def _raise_for(handles: list[Handle], features_col: str, label_col: str, d: int, k: int) -> None:
    def total(name: str) -> int:
        return sum(getattr(h, name) for h in handles)

    def first(name: str, value: str):  # noqa: ANN202
        return next(getattr(h, value) for h in handles if getattr(h, name))

    if total("null_x"):
        raise ValueError(f"features column {features_col!r} has {total('null_x')} null rows; expected none")
    if total("null_y"):
        raise ValueError(f"label column {label_col!r} has {total('null_y')} null rows; expected none")
    if total("bad_len"):
        raise ValueError(f"features column {features_col!r} has {total('bad_len')} rows of size "
                         f"{first('bad_len', 'bad_len_value')} (first found); the model takes {d} inputs")
    if total("null_elem"):
        raise ValueError(f"features column {features_col!r} has {total('null_elem')} null values inside its "
                         f"arrays; expected finite numbers")
    if total("nonfinite"):
        raise ValueError(f"features column {features_col!r} has {total('nonfinite')} non-finite values "
                         f"(first found: {first('nonfinite', 'nonfinite_value')}); expected finite numbers "
                         f"(after conversion to float32)")
    if total("bad_label"):
        raise ValueError(f"label column {label_col!r} has {total('bad_label')} values that are not integer class "
                         f"indices in [0, {k}) (first found: {first('bad_label', 'bad_label_value')})")
    if not sum(h.n for h in handles):
        raise ValueError(f"the DataFrame is empty: no rows in columns {features_col!r}, {label_col!r}; "
                         f"expected at least one")


def prepare(df, features_col: str, label_col: str, num_features: int, num_classes: int,  # noqa: ANN001
            fit_id: str | None = None, resident: bool = True) -> PartitionedData:
    """Validate ``df`` and convert it to resident blocks in one Spark job; ValueError (naming column, expected
    and actual values) on any bad input, before training. ``resident=False`` validates only (barrier mode reads
    the Arrow DataFrame itself): no files to write, none to release."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    from .cluster import tagged

    check_columns(df, features_col, label_col)
    fit_id = fit_id or uuid.uuid4().hex
    arrow_df = df.select(_features_expr(df, features_col).alias("x"),
                         F.col(label_col).cast("double").alias("y"))
    level = df.storageLevel
    persisted = not (level.useMemory or level.useDisk)
    if persisted:  # as Spark ML does: cache an uncached input so a recomputed partition gets the same rows
        arrow_df.persist(StorageLevel.MEMORY_AND_DISK)
    d, k = num_features, num_classes
    handles_df = arrow_df.mapInArrow(lambda it: _convert_partition(it, fit_id, d, k, resident), _HANDLE_SCHEMA)
    handles_df.persist(StorageLevel.MEMORY_AND_DISK)
    data = PartitionedData(fit_id, handles_df, [], d, k, arrow_df,
                           {"persistedInput": persisted, "resident": resident})
    with tagged(df.sparkSession, data.tag):
        data.handles = sorted((Handle(**r.asDict()) for r in handles_df.collect()), key=lambda h: h.part)
    try:
        _raise_for(data.handles, features_col, label_col, d, k)
    except ValueError:
        data.release()
        raise
    return data
