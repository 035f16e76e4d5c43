"""DataFrame -> per-partition float32 blocks, validated on the way in and kept resident next to the executors.

One Spark job converts and validates: the features column (a Spark ML ``Vector``, dense or sparse, or an
``array`` of numbers) becomes ``array<float>`` in the JVM (``vector_to_array``), ``mapInArrow`` hands each
partition to Python as Arrow record batches, and each batch is checked and appended -- as raw float32 rows,
int32 class labels or float64 regression targets, and float64 weights when a weight column is given, no per-row
Python -- to files in the executor's Spark work directory (the rows of a validation indicator column to files of
their own: they never train). The job returns one small
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
# module-level cache of the executor's Python worker: (fit id, partition) -> the partition's arrays (views of
# memory-mapped files, see :func:`_map_blocks`) and its features file (whose absence means "released")
_RESIDENT: dict[tuple[str, int], tuple[dict[str, np.ndarray | None], str]] = {}

_NUMERIC = ("byte", "short", "int", "long", "float", "double", "decimal")
HANDLE_SCHEMA = (
    "part int, n long, nv long, regression boolean, weighted boolean, host string, xpath string, ypath string, "
    "wpath string, vxpath string, "
    "vypath string, vwpath string, null_x long, null_y long, null_elem long, bad_len long, bad_len_value long, "
    "nonfinite long, nonfinite_value double, bad_label long, bad_label_value double, bad_label_len long, "
    "bad_label_len_value long, null_w long, bad_weight long, bad_weight_value double, null_v long"
)


@dataclass(frozen=True)
class Layout:
    """What the converted columns are: ``num_features`` features, labels that are class indices in
    ``[0, num_outputs)`` or (``regression``) ``num_outputs`` target values, and whether a weight column and a
    validation indicator column come along (columns ``w`` and ``v`` of the Arrow DataFrame)."""

    num_features: int
    num_outputs: int
    regression: bool = False
    weighted: bool = False
    indicated: bool = False

    @property
    def label_dtype(self) -> np.dtype:
        """Class indices as int32; regression targets as float64 (targets keep their precision: they are few per
        row, where the features are many and float32)."""
        return np.dtype(np.float64 if self.regression else np.int32)


@dataclass
class Handle:
    """Where one partition's blocks live (training rows, then the rows of the validation indicator), and what the
    validation pass counted in it."""

    part: int
    n: int
    nv: int
    regression: bool  # labels are float64 targets (else int32 class indices)
    weighted: bool  # weights come along
    host: str
    xpath: str
    ypath: str
    wpath: str = ""
    vxpath: str = ""
    vypath: str = ""
    vwpath: str = ""
    null_x: int = 0
    null_y: int = 0
    null_elem: int = 0
    bad_len: int = 0
    bad_len_value: int = 0
    nonfinite: int = 0
    nonfinite_value: float = 0.0
    bad_label: int = 0
    bad_label_value: float = 0.0
    bad_label_len: int = 0
    bad_label_len_value: int = 0
    null_w: int = 0
    bad_weight: int = 0
    bad_weight_value: float = 0.0
    null_v: int = 0

    @property
    def failed(self) -> bool:
        """Whether the validation pass found a value that fails the fit (then nothing more is written)."""
        return bool(self.bad_len or self.null_elem or self.nonfinite or self.bad_label or self.bad_label_len
                    or self.bad_weight)


def _blocks_dir(fit_id: str) -> str:
    from pyspark import SparkFiles

    try:
        root = SparkFiles.getRootDirectory()
    except Exception:  # outside a Spark worker (the driver before a context exists): the temp directory
        import tempfile

        root = tempfile.gettempdir()
    return os.path.join(root, _SUBDIR, fit_id)


def _check_batch(batch, layout: Layout, h: Handle) -> dict[str, np.ndarray] | None:  # noqa: ANN001 -- Arrow
    """One Arrow batch (columns x, y[, w][, v]) as arrays -- ``x`` (n, d) float32, ``y`` class indices or (n, k)
    targets, ``w`` weights or None, ``v`` the validation indicator or None -- counting into ``h`` what is wrong;
    None when the batch holds nothing to keep (or the fit will fail anyway)."""
    import pyarrow.compute as pc

    cols = {name: batch.column(i) for i, name in enumerate(batch.schema.names)}
    h.null_x += cols["x"].null_count
    h.null_y += cols["y"].null_count
    h.null_w += cols["w"].null_count if "w" in cols else 0
    h.null_v += cols["v"].null_count if "v" in cols else 0
    if any(c.null_count for c in cols.values()):
        keep = cols["x"].is_valid()
        for c in cols.values():
            keep = pc.and_(keep, c.is_valid())
        cols = {name: c.filter(keep) for name, c in cols.items()}
    d = layout.num_features
    lengths = pc.list_value_length(cols["x"]).to_numpy(zero_copy_only=False)
    bad = lengths != d
    if bad.any():
        h.bad_len += int(bad.sum())
        h.bad_len_value = int(lengths[bad][0])
        return None
    values = cols["x"].flatten()
    if values.null_count:
        h.null_elem += values.null_count
        return None
    x = values.to_numpy(zero_copy_only=False)
    if x.dtype != np.float32:
        x = x.astype(np.float32)
    finite = np.isfinite(x)
    if not finite.all():
        h.nonfinite += int(x.size - np.count_nonzero(finite))
        h.nonfinite_value = float(x[~finite][0])
    n = len(lengths)
    out: dict[str, np.ndarray] = {"x": x.reshape(n, d)}
    k = layout.num_outputs
    if layout.regression:
        lengths = pc.list_value_length(cols["y"]).to_numpy(zero_copy_only=False)
        bad = lengths != k
        if bad.any():
            h.bad_label_len += int(bad.sum())
            h.bad_label_len_value = int(lengths[bad][0])
            return None
        flat = cols["y"].flatten()
        y = flat.to_numpy(zero_copy_only=False).astype(np.float64) if not flat.null_count \
            else np.full(n * k, np.nan)  # a null inside a label vector: counted as non-finite
        wrong = ~np.isfinite(y)
        if wrong.any():
            h.bad_label += int(wrong.sum())
            h.bad_label_value = float(y[wrong][0])
        out["y"] = y.reshape(n, k)
    else:
        y = cols["y"].to_numpy(zero_copy_only=False)
        yi = np.floor(y)
        wrong = (yi != y) | (y < 0) | (y >= k) | ~np.isfinite(y)
        if wrong.any():
            h.bad_label += int(wrong.sum())
            h.bad_label_value = float(y[wrong][0])
        out["y"] = yi.astype(np.int32)
    if "w" in cols:
        w = cols["w"].to_numpy(zero_copy_only=False).astype(np.float64)
        wrong = ~(np.isfinite(w) & (w >= 0))
        if wrong.any():
            h.bad_weight += int(wrong.sum())
            h.bad_weight_value = float(w[wrong][0])
        out["w"] = w
    if "v" in cols:
        out["v"] = cols["v"].to_numpy(zero_copy_only=False).astype(bool)
    return None if h.failed else out


def convert_partition(batches: Iterator, fit_id: str, layout: Layout, resident: bool = True) -> Iterator:
    """mapInArrow body: validate and append every batch to this partition's files (training rows and validation
    rows apart; ``resident=False``: validate and count only, no files); yield one handle row."""
    import pyarrow as pa
    from pyspark import TaskContext

    part = TaskContext.get().partitionId()
    h = Handle(part, 0, 0, layout.regression, layout.weighted, socket.gethostname(), "", "")
    paths: dict[str, str] = {}
    if resident:
        directory = _blocks_dir(fit_id)
        os.makedirs(directory, exist_ok=True)
        ext = "f64" if layout.regression else "i32"
        paths = {"x": f"x-{part}.f32", "y": f"y-{part}.{ext}", "vx": f"vx-{part}.f32", "vy": f"vy-{part}.{ext}"}
        if layout.weighted:
            paths.update(w=f"w-{part}.f64", vw=f"vw-{part}.f64")
        if not layout.indicated:
            paths = {k: v for k, v in paths.items() if not k.startswith("v")}
        paths = {k: os.path.join(directory, v) for k, v in paths.items()}
    files = {k: open(p, "wb") for k, p in paths.items()}  # noqa: SIM115 -- closed in the finally below
    try:
        for batch in batches:
            if batch.num_rows == 0:
                continue
            arrays = _check_batch(batch, layout, h)
            if arrays is None:
                continue  # the fit will fail: keep counting, stop writing
            val = arrays.pop("v", None)
            for name, a in arrays.items() if files else ():
                if val is None:
                    files[name].write(np.ascontiguousarray(a).data)
                else:
                    files[name].write(np.ascontiguousarray(a[~val]).data)
                    files["v" + name].write(np.ascontiguousarray(a[val]).data)
            nv = 0 if val is None else int(np.count_nonzero(val))
            h.n += len(arrays["y"]) - nv
            h.nv += nv
    finally:
        for f in files.values():
            f.close()
    for key, p in paths.items():
        rows = h.nv if key.startswith("v") else h.n
        if rows == 0:
            os.remove(p)
        else:
            setattr(h, {"x": "xpath", "y": "ypath", "w": "wpath"}.get(key, key + "path"), p)
    yield pa.RecordBatch.from_pylist([vars(h)], schema=arrow_schema(HANDLE_SCHEMA))


def arrow_blocks(batches: Iterator, layout: Layout) -> dict[str, np.ndarray]:
    """Rows already validated by :func:`prepare` (the Arrow DataFrame's batches) as arrays: ``x`` (n, d) float32,
    ``y`` (labels as :attr:`Layout.label_dtype`), and ``w`` / ``v`` when the layout has them -- for a task that
    keeps its rows in memory (barrier mode)."""
    parts: dict[str, list[np.ndarray]] = {}
    for batch in batches:
        if batch.num_rows:
            arrays = _check_batch(batch, layout, Handle(0, 0, 0, layout.regression, layout.weighted, "", "", ""))
            for name, a in (arrays or {}).items():
                parts.setdefault(name, []).append(a)
    d, k = layout.num_features, layout.num_outputs
    empty = {"x": np.zeros((0, d), np.float32),
             "y": np.zeros((0, k) if layout.regression else 0, layout.label_dtype)}
    if layout.weighted:
        empty["w"] = np.zeros(0)
    if layout.indicated:
        empty["v"] = np.zeros(0, bool)
    return {name: np.concatenate(parts[name]) if name in parts else a for name, a in empty.items()}


def arrow_schema(ddl: str):  # noqa: ANN201 -- pyarrow is imported lazily
    """The Arrow schema of a flat Spark DDL schema string (``"name type, ..."``) of the types used here."""
    import pyarrow as pa

    types = {"int": pa.int32(), "long": pa.int64(), "string": pa.string(), "double": pa.float64(),
             "boolean": pa.bool_(), "binary": pa.binary()}
    return pa.schema([(name, types[t]) for name, t in (f.split() for f in ddl.split(", "))])


def _map_blocks(handle: Handle) -> dict[str, np.ndarray | None]:
    """The partition's files as arrays (memory-mapped): x, y, w (None without weights) and the same for the
    validation rows (vx, vy, vw)."""
    out: dict[str, np.ndarray | None] = {}
    ydtype = np.float64 if handle.regression else np.int32
    for prefix, rows in (("", handle.n), ("v", handle.nv)):
        paths = {"x": handle.vxpath if prefix else handle.xpath, "y": handle.vypath if prefix else handle.ypath,
                 "w": handle.vwpath if prefix else handle.wpath}
        for name, dtype, matrix in (("x", np.float32, True), ("y", ydtype, handle.regression),
                                    ("w", np.float64, False)):
            if name == "w" and not handle.weighted:
                out[prefix + name] = None
            elif rows == 0:
                out[prefix + name] = np.zeros((0, 0) if matrix else 0, dtype)
            else:  # the row width from the file's size
                a = np.asarray(np.memmap(paths[name], dtype=dtype, mode="r"))
                out[prefix + name] = a.reshape((rows, -1) if matrix else (rows,))
    return out


def _resident(fit_id: str, handle: Handle) -> dict[str, np.ndarray | None] | None:
    key = (fit_id, handle.part)
    entry = _RESIDENT.get(key)
    if entry is None:
        paths = [p for p in (handle.xpath, handle.ypath, handle.wpath, handle.vxpath, handle.vypath, handle.vwpath)
                 if p]
        if paths and (handle.host != socket.gethostname() or not all(os.path.exists(p) for p in paths)):
            return None
        for k in [k for k, v in _RESIDENT.items() if k[0] != fit_id and not os.path.exists(v[1])]:
            del _RESIDENT[k]  # another fit's blocks whose files were released: unmap them
        arrays = _map_blocks(handle)
        if not paths:  # nothing written: nothing to keep either
            return arrays
        entry = _RESIDENT[key] = (arrays, paths[0])
    return entry[0]


def resident_blocks(fit_id: str, handle: Handle) -> tuple[np.ndarray, np.ndarray] | None:
    """The partition's training rows ``(x (n, d) float32, y)`` -- ``y`` class indices (n,) int32, or (n, k)
    float64 regression targets -- memory-mapped once per Python worker; ``None`` when its files are not on this
    host."""
    arrays = _resident(fit_id, handle)
    return None if arrays is None else (arrays["x"], arrays["y"])


def resident_weights(fit_id: str, handle: Handle) -> np.ndarray | None:
    """The training rows' weights (float64), or None when the data has no weight column (or its files are not on
    this host: :func:`resident_blocks` says which)."""
    arrays = _resident(fit_id, handle)
    return None if arrays is None else arrays["w"]


def resident_validation(fit_id: str, handle: Handle) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
    """The partition's validation rows (those of the validation indicator column): ``(x, y, w or None)``;
    ``None`` when its files are not on this host."""
    arrays = _resident(fit_id, handle)
    return None if arrays is None else (arrays["vx"], arrays["vy"], arrays["vw"])


def release_resident(fit_id: str) -> int:
    """Drop this worker's cached blocks of ``fit_id`` and delete its files on this host; the number released."""
    keys = [k for k in _RESIDENT if k[0] == fit_id]
    for k in keys:
        del _RESIDENT[k]
    shutil.rmtree(_blocks_dir(fit_id), ignore_errors=True)
    return len(keys)


def _rebuild_partitions(batches: Iterator, fit_id: str, layout: Layout, parts: frozenset[int]) -> Iterator:
    """mapInArrow body of :meth:`PartitionedData.rebuild`: convert the partitions in ``parts`` again (on the host
    that runs them); any other partition is left alone -- converting its (filtered-out) rows would truncate the
    files it has on this host."""
    from pyspark import TaskContext

    if TaskContext.get().partitionId() in parts:
        yield from convert_partition(batches, fit_id, layout)
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
    handles_df: object  # DataFrame of handle rows (HANDLE_SCHEMA), cached: one row per partition
    handles: list[Handle]
    layout: Layout
    arrow_df: object  # the (x array<float>, y[, w][, v]) DataFrame (cached unless the input is), to rebuild
    extra: dict = field(default_factory=dict)

    @property
    def num_features(self) -> int:
        return self.layout.num_features

    @property
    def num_classes(self) -> int:
        """The model's outputs: classes, or regression targets per row."""
        return self.layout.num_outputs

    @property
    def count(self) -> int:
        """Training rows (the validation indicator's rows apart)."""
        return sum(h.n for h in self.handles)

    @property
    def validation_count(self) -> int:
        return sum(h.nv for h in self.handles)

    @property
    def num_partitions(self) -> int:
        return len(self.handles)

    @property
    def tag(self) -> str:
        """The Spark job tag of this fit's jobs (``spark.interruptTag`` cancels them)."""
        from .cluster import fit_tag

        return fit_tag(self.fit_id)

    def partition_sizes(self) -> list[int]:
        return [h.n for h in self.handles]

    def rebuild(self, parts: list[int]):  # noqa: ANN201 -- a DataFrame of handle rows
        """A fresh (uncached) conversion of the partitions ``parts`` only: running it writes their files on the host
        that runs each of them and yields their handles -- the fallback when a task finds no files."""
        from pyspark.sql import functions as F

        fit_id, layout, keep = self.fit_id, self.layout, frozenset(parts)
        rows = self.arrow_df.where(F.spark_partition_id().isin(sorted(keep)))  # the others ship no rows
        return rows.mapInArrow(lambda it: _rebuild_partitions(it, fit_id, layout, keep), HANDLE_SCHEMA)

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


def _numeric_array_expr(df, col: str, element: str, role: str, expected: str):  # noqa: ANN001, ANN202
    """A Vector or numeric-array column as ``array<element>`` (nulls kept, to be counted); ValueError naming the
    ``role`` column otherwise."""
    from pyspark.ml.functions import vector_to_array
    from pyspark.ml.linalg import VectorUDT
    from pyspark.sql import functions as F
    from pyspark.sql.types import ArrayType, NumericType

    dtype = df.schema[col].dataType
    if isinstance(dtype, VectorUDT):
        c = F.col(col)  # vector_to_array fails on null: nulls pass through to be counted
        width = "float32" if element == "float" else "float64"
        return F.when(c.isNull(), F.lit(None).cast(f"array<{element}>")).otherwise(vector_to_array(c, width))
    if isinstance(dtype, ArrayType) and isinstance(dtype.elementType, NumericType):
        return F.col(col).cast(f"array<{element}>")
    raise ValueError(f"{role} column {col!r} must be {expected}, got {dtype.simpleString()}")


def features_expr(df, features_col: str):  # noqa: ANN001, ANN202 -- pyspark objects
    """The features column as ``array<float>``; ValueError when it is neither a Vector nor a numeric array."""
    return _numeric_array_expr(df, features_col, "float", "features", "a Vector (VectorUDT) or an array of numbers")


def _label_expr(df, label_col: str, regression: bool):  # noqa: ANN001, ANN202 -- pyspark objects
    """Class labels as ``double``; regression labels (a number, a Vector or an array of numbers) as
    ``array<double>``."""
    from pyspark.sql import functions as F
    from pyspark.sql.types import NumericType

    ltype = df.schema[label_col].dataType
    if isinstance(ltype, NumericType):
        c = F.col(label_col).cast("double")
        return F.when(c.isNull(), F.lit(None).cast("array<double>")).otherwise(F.array(c)) if regression else c
    if not regression:
        raise ValueError(f"label column {label_col!r} must be numeric (integer class indices), "
                         f"got {ltype.simpleString()}")
    return _numeric_array_expr(df, label_col, "double", "label", "a number, a Vector or an array of numbers")


def check_columns(df, features_col: str, label_col: str, *, regression: bool = False,  # noqa: ANN001
                  weight_col: str = "", validation_col: str = "") -> None:
    """Schema checks (no Spark job): the columns exist, features a vector/array, the label numeric (class
    indices), or for ``regression`` a number, vector or array; the weight column numeric, the validation indicator
    boolean."""
    from pyspark.sql.types import BooleanType, NumericType

    names = df.columns
    for role, col in (("features", features_col), ("label", label_col), ("weight", weight_col),
                      ("validation indicator", validation_col)):
        if col and col not in names:
            raise ValueError(f"{role} column {col!r} not found in the DataFrame; it has columns {names}")
    features_expr(df, features_col)
    _label_expr(df, label_col, regression)
    if weight_col and not isinstance(df.schema[weight_col].dataType, NumericType):
        raise ValueError(f"weight column {weight_col!r} must be numeric (weights >= 0), "
                         f"got {df.schema[weight_col].dataType.simpleString()}")
    if validation_col and not isinstance(df.schema[validation_col].dataType, BooleanType):
        raise ValueError(f"validation indicator column {validation_col!r} must be boolean, "
                         f"got {df.schema[validation_col].dataType.simpleString()}")


def raise_for_bad_input(handles: list[Handle], features_col: str, label_col: str, layout: Layout,
                        weight_col: str, validation_col: str) -> None:
    """ValueError naming the column, the expected and the actual value for the first kind of bad input that the
    conversion counted in ``handles``; nothing when all is well."""
    def total(name: str) -> int:
        return sum(getattr(h, name) for h in handles)

    def first(name: str, value: str):  # noqa: ANN202
        return next(getattr(h, value) for h in handles if getattr(h, name))

    d, k = layout.num_features, layout.num_outputs
    if total("null_x"):
        raise ValueError(f"features column {features_col!r} has {total('null_x')} null rows; expected none")
    if total("null_y"):
        raise ValueError(f"label column {label_col!r} has {total('null_y')} null rows; expected none")
    if total("null_w"):
        raise ValueError(f"weight column {weight_col!r} has {total('null_w')} null rows; expected none")
    if total("null_v"):
        raise ValueError(f"validation indicator column {validation_col!r} has {total('null_v')} null rows; "
                         f"expected true or false")
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
    if total("bad_label_len"):
        raise ValueError(f"label column {label_col!r} has {total('bad_label_len')} labels of size "
                         f"{first('bad_label_len', 'bad_label_len_value')} (first found); the model has {k} "
                         f"output{'s' if k != 1 else ''}")
    if total("bad_label"):
        if layout.regression:
            raise ValueError(f"label column {label_col!r} has {total('bad_label')} non-finite values (first "
                             f"found: {first('bad_label', 'bad_label_value')}); expected finite numbers")
        raise ValueError(f"label column {label_col!r} has {total('bad_label')} values that are not integer class "
                         f"indices in [0, {k}) (first found: {first('bad_label', 'bad_label_value')})")
    if total("bad_weight"):
        raise ValueError(f"weight column {weight_col!r} has {total('bad_weight')} values that are negative or "
                         f"not finite (first found: {first('bad_weight', 'bad_weight_value')}); expected finite "
                         f"weights >= 0")
    if not sum(h.n for h in handles):
        if total("nv"):
            raise ValueError(f"no training rows: validation indicator column {validation_col!r} is true on all "
                             f"{total('nv')} rows; expected at least one row to train on")
        raise ValueError(f"the DataFrame is empty: no rows in columns {features_col!r}, {label_col!r}; "
                         f"expected at least one")


def prepare(df, features_col: str, label_col: str, num_features: int, num_classes: int,  # noqa: ANN001
            fit_id: str | None = None, *, regression: bool = False, weight_col: str = "",
            validation_col: str = "", resident: bool = True) -> PartitionedData:
    """Validate ``df`` and convert it to resident blocks in one Spark job; ValueError (naming column, expected
    and actual values) on any bad input, before training. ``regression``: the labels are ``num_classes`` target
    values per row (a number when 1, else a Vector or array) instead of class indices. ``weight_col``: per-row
    weights (finite, >= 0); ``validation_col``: a boolean column whose true rows are kept apart for validation
    (:func:`resident_validation`) and never train. ``resident=False`` validates only (barrier mode reads the
    Arrow DataFrame itself): no files to write, none to release."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    from .cluster import tagged

    check_columns(df, features_col, label_col, regression=regression, weight_col=weight_col,
                  validation_col=validation_col)
    fit_id = fit_id or uuid.uuid4().hex
    cols = [features_expr(df, features_col).alias("x"), _label_expr(df, label_col, regression).alias("y")]
    if weight_col:
        cols.append(F.col(weight_col).cast("double").alias("w"))
    if validation_col:
        cols.append(F.col(validation_col).alias("v"))
    arrow_df = df.select(*cols)
    level = df.storageLevel
    persisted = not (level.useMemory or level.useDisk)
    if persisted:  # as Spark ML does: cache an uncached input so a recomputed partition gets the same rows
        arrow_df.persist(StorageLevel.MEMORY_AND_DISK)
    layout = Layout(num_features, num_classes, regression, bool(weight_col), bool(validation_col))
    handles_df = arrow_df.mapInArrow(lambda it: convert_partition(it, fit_id, layout, resident), HANDLE_SCHEMA)
    handles_df.persist(StorageLevel.MEMORY_AND_DISK)
    data = PartitionedData(fit_id, handles_df, [], layout, arrow_df,
                           {"persistedInput": persisted, "resident": resident})
    with tagged(df.sparkSession, data.tag):
        data.handles = sorted((Handle(**r.asDict()) for r in handles_df.collect()), key=lambda h: h.part)
    try:
        raise_for_bad_input(data.handles, features_col, label_col, layout, weight_col, validation_col)
    except ValueError:
        data.release()
        raise
    return data
