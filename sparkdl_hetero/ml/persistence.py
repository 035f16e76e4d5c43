"""Save/load of the estimator and model through Spark's own data sources, so it works from a classic and from a
Spark Connect session and on any file system the cluster reaches (local, HDFS, S3...). No py4j, no pickle.

Layout (format version 2):

- ``path/metadata``: one-line text file in Spark ML's DefaultParamsWriter format (class, uid, paramMap,
  defaultParamMap, sparkVersion) plus ``formatVersion`` and, for every saved array, its dtype, shape and the
  sha256 of its ``.npy`` bytes; Pipeline / PipelineModel readers and Spark tooling read it as they read their own.
- ``path/data``: one Parquet file of ``(name string, npy binary)`` rows, each array as NumPy ``.npy`` bytes
  (``allow_pickle=False`` on both sides).

Format version 1 (``data/<name>.npy`` files) still loads. Every way a save can be damaged (missing file, truncated
or edited file, broken JSON, checksum mismatch, a save copied without Hadoop's ``.crc`` files) is a
:class:`DamagedSaveError` naming the file and what is wrong, never a raw Spark/JVM error.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import numpy as np
from pyspark.ml.util import DefaultParamsWriter, MLReadable, MLReader, MLWritable, MLWriter
from pyspark.sql import SparkSession

if TYPE_CHECKING:
    from pyspark.ml.param import Params

FORMAT_VERSION = 2
_READABLE_VERSIONS = (1, 2)
T = TypeVar("T", bound="PersistentParams")


class DamagedSaveError(ValueError):
    """A saved stage whose files are missing, unreadable or inconsistent; the message names the file."""


class MissingSaveFileError(DamagedSaveError, FileNotFoundError):
    """A file of a saved stage does not exist."""


class PersistentParams(MLWritable, MLReadable):
    """A Params stage whose state is JSON-able params, extra metadata and named NumPy arrays."""

    #: params saved as arrays instead of JSON values
    _array_params: tuple[str, ...] = ()
    #: params saved by _state_metadata/_state_arrays and restored by _restore_state, not as JSON values
    _state_params: tuple[str, ...] = ()

    def _state_metadata(self) -> dict[str, Any]:
        """Extra JSON metadata beside the params."""
        return {}

    def _state_arrays(self) -> dict[str, np.ndarray]:
        """Arrays to save beside the params (besides the array params)."""
        return {}

    def _restore_state(self, metadata: dict[str, Any], arrays: dict[str, np.ndarray], path: str) -> None:
        """Rebuild the non-param state after the params were set; raise ValueError on inconsistent data."""

    def write(self) -> MLWriter:
        return ParamsArraysWriter(self)

    @classmethod
    def read(cls: type[T]) -> MLReader[T]:
        return ParamsArraysReader(cls)


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


_ERROR_CLASS = re.compile(r"\[([A-Z][A-Z_]*(?:\.[A-Z_]+)*)\]\s*([^\n]*)")
_CAUSE = re.compile(r"^(?:Caused by: )?(?:[a-z]+\.)+[A-Za-z]*(?:Exception|Error): ([^\n]+)$", re.M)


def _spark_error(exc: BaseException) -> str:
    """What went wrong in a Spark read, in one line without the JVM stack trace: Spark's error that names the
    file (e.g. FAILED_READ_FILE) and the root cause (checksum, not a Parquet file, ...)."""
    text = str(exc)
    found = [m for m in _ERROR_CLASS.finditer(text) if m.group(1) != "SQLSTATE"]
    named = next((m for m in found if "file" in m.group(2).lower()), found[-1] if found else None)
    head = f"[{named.group(1)}] {named.group(2).split(' SQLSTATE')[0]}" if named else ""
    causes = [c.strip() for c in _CAUSE.findall(text)]
    cause = causes[-1] if causes else ""
    if "ChecksumException" in text:
        cause = f"checksum error, the file was changed or truncated after it was written ({cause})"
    parts = [p for p in (head, cause) if p] or [text.strip().splitlines()[0] if text.strip() else type(exc).__name__]
    return "; ".join(p[:400] for p in parts)


def _is_missing(exc: BaseException) -> bool:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return "PATH_NOT_FOUND" in first or "does not exist" in first


class ParamsArraysWriter(MLWriter):
    """Writes ``path/metadata`` (Spark's DefaultParamsWriter format) and ``path/data`` (Parquet of .npy bytes)."""

    def __init__(self, instance: PersistentParams) -> None:
        super().__init__()
        self.instance = instance

    def save(self, path: str) -> None:
        """Save to ``path``; ``overwrite()`` replaces an existing save, otherwise an existing one is an error.
        (Replaces MLWriter.save, whose overwrite goes through the py4j gateway.)"""
        self.saveImpl(path)

    def saveImpl(self, path: str) -> None:
        inst: Any = self.instance
        spark = self.sparkSession
        params = {p.name: v for p, v in inst._paramMap.items()
                  if p.name not in inst._array_params and p.name not in inst._state_params}
        arrays = {p.name: np.asarray(v.toArray() if hasattr(v, "toArray") else v, dtype=np.float64)
                  for p, v in inst._paramMap.items() if p.name in inst._array_params}
        arrays.update(inst._state_arrays())
        blobs = {name: _npy_bytes(a) for name, a in arrays.items()}
        extra = {"formatVersion": FORMAT_VERSION,
                 "arrays": {name: {"dtype": str(np.asarray(a).dtype), "shape": list(np.shape(a)),
                                   "sha256": hashlib.sha256(blobs[name]).hexdigest()} for name, a in arrays.items()},
                 **inst._state_metadata()}
        meta = DefaultParamsWriter._get_metadata_to_save(inst, spark, extraMetadata=extra, paramMap=params)
        mode = "overwrite" if self.shouldOverwrite else "error"
        meta_dir = os.path.join(path, "metadata")
        try:
            spark.createDataFrame([(meta,)], schema="value string").coalesce(1).write.mode(mode).text(meta_dir)
        except Exception as e:
            if "PATH_ALREADY_EXISTS" in str(e) or "already exists" in str(e):
                raise FileExistsError(f"cannot save {type(inst).__name__} to {path}: {meta_dir} already exists; "
                                      f"use write().overwrite().save(path) to replace it") from None
            raise
        if blobs:
            rows = [(name, blob) for name, blob in blobs.items()]
            (spark.createDataFrame(rows, schema="name string, npy binary").coalesce(1)
             .write.mode("overwrite").parquet(os.path.join(path, "data")))


class ParamsArraysReader(MLReader, Generic[T]):
    """Reads what :class:`ParamsArraysWriter` wrote, with a clear error for every way the files can be wrong."""

    def __init__(self, cls: type[T]) -> None:
        super().__init__()
        self.cls = cls

    def load(self, path: str) -> T:
        spark = self.sparkSession
        name = self.cls.__name__
        where = f"cannot load {name} from {path}"
        meta = _read_metadata(spark, path, where)
        expected = f"{self.cls.__module__}.{name}"
        if meta["class"] != expected:
            raise ValueError(f"{where}: it holds a {meta['class']}, not a {expected}")
        version = meta.get("formatVersion")
        if version not in _READABLE_VERSIONS:
            readable = ", ".join(map(str, _READABLE_VERSIONS))
            raise DamagedSaveError(f"{where}: format version {version!r} in {os.path.join(path, 'metadata')} is not "
                                   f"one this version of sparkdl_hetero reads ({readable}); it was saved by a "
                                   f"different version of the library")
        instance: Any = self.cls()
        instance._resetUid(meta["uid"])
        _set_params(instance, meta.get("defaultParamMap", {}), path, default=True)
        _set_params(instance, meta["paramMap"], path, default=False)
        specs = meta.get("arrays", {})
        if not isinstance(specs, dict):
            raise DamagedSaveError(f"{where}: 'arrays' in {os.path.join(path, 'metadata')} must be a JSON object")
        arrays = _read_arrays_v1(spark, path, specs, where) if version == 1 else _read_arrays(spark, path, specs, where)
        for key in instance._array_params:
            if key in arrays:
                instance._set(**{key: arrays.pop(key)})
        try:
            instance._restore_state(meta, arrays, path)
        except (KeyError, TypeError) as e:
            raise DamagedSaveError(f"{where}: metadata lacks or mistypes {e}") from None
        return instance


def _collect(read: Callable[[str], Any], directory: str, where: str, missing: str) -> list[Any]:
    """The rows of ``read(directory)``; Spark's errors as our own: missing, or damaged naming the file."""
    try:
        return read(directory).collect()
    except Exception as e:
        if _is_missing(e):
            raise MissingSaveFileError(f"{where}: {missing}") from None
        raise DamagedSaveError(f"{where}: cannot read {directory}: {_spark_error(e)}") from None


def _read_metadata(spark: SparkSession, path: str, where: str) -> dict[str, Any]:
    meta_dir = os.path.join(path, "metadata")
    rows = _collect(spark.read.text, meta_dir, where, f"{meta_dir} does not exist")
    try:
        meta = json.loads("\n".join(r[0] for r in rows)) if rows else None
    except json.JSONDecodeError as e:
        raise DamagedSaveError(f"{where}: metadata is not valid JSON ({e}) in {meta_dir}") from None
    if not isinstance(meta, dict) or not {"class", "uid", "paramMap"} <= meta.keys():
        raise DamagedSaveError(f"{where}: metadata in {meta_dir} must be a JSON object with class, uid and paramMap")
    return meta


def _read_arrays(spark: SparkSession, path: str, specs: dict[str, Any], where: str) -> dict[str, np.ndarray]:
    """Format 2: the Parquet file of .npy bytes, each array checked against its sha256, dtype and shape."""
    if not specs:
        return {}
    data_dir = os.path.join(path, "data")
    rows = _collect(spark.read.parquet, data_dir, where, f"array file {data_dir} is missing")
    blobs: dict[str, bytes] = {}
    for row in rows:
        d = row.asDict()
        if not isinstance(d.get("name"), str) or not isinstance(d.get("npy"), (bytes, bytearray)):
            raise DamagedSaveError(f"{where}: {data_dir} must hold (name string, npy binary) rows, got columns "
                                   f"{sorted(d)}")
        blobs[d["name"]] = bytes(d["npy"])
    arrays = {}
    for key, spec in specs.items():
        if key not in blobs:
            raise DamagedSaveError(f"{where}: array {key!r} is missing from {data_dir}")
        blob = blobs[key]
        if not isinstance(spec, dict) or not {"sha256", "dtype", "shape"} <= spec.keys():
            raise DamagedSaveError(f"{where}: metadata entry for array {key!r} must give sha256, dtype and shape")
        if hashlib.sha256(blob).hexdigest() != spec["sha256"]:
            raise DamagedSaveError(f"{where}: array {key!r} in {data_dir} does not match the sha256 in the metadata "
                                   f"(the file was changed or damaged after it was written)")
        try:
            a = np.load(io.BytesIO(blob), allow_pickle=False)
        except ValueError as e:
            raise DamagedSaveError(f"{where}: array {key!r} in {data_dir} is not a valid .npy file ({e})") from None
        if str(a.dtype) != spec["dtype"] or list(a.shape) != list(spec["shape"]):
            raise DamagedSaveError(f"{where}: array {key!r} in {data_dir} is {a.dtype} {list(a.shape)}, the metadata "
                                   f"says {spec['dtype']} {list(spec['shape'])}")
        arrays[key] = a
    return arrays


def _read_arrays_v1(spark: SparkSession, path: str, specs: dict[str, Any], where: str) -> dict[str, np.ndarray]:
    """Format 1: one ``.npy`` file per array, read through Spark's binaryFile source."""
    arrays = {}
    for key, rel in specs.items():
        file = os.path.join(path, str(rel))
        try:
            rows = spark.read.format("binaryFile").load(file).select("content").collect()
        except Exception as e:
            if _is_missing(e):
                raise MissingSaveFileError(f"{where}: array file {file} is missing") from None
            raise DamagedSaveError(f"{where}: cannot read {file}: {_spark_error(e)}") from None
        if not rows:
            raise MissingSaveFileError(f"{where}: array file {file} is missing")
        try:
            arrays[key] = np.load(io.BytesIO(bytes(rows[0][0])), allow_pickle=False)
        except ValueError as e:
            raise DamagedSaveError(f"{where}: {file} is not a valid .npy file ({e})") from None
    return arrays


def _set_params(instance: Params, values: dict[str, Any], path: str, default: bool) -> None:
    for key, value in values.items():
        if not instance.hasParam(key):
            raise DamagedSaveError(f"cannot load {type(instance).__name__} from {path}: unknown param {key!r}")
        try:
            if default:
                instance._setDefault(**{key: value})
            else:
                instance._set(**{key: value})
        except TypeError as e:
            raise DamagedSaveError(f"cannot load {type(instance).__name__} from {path}: param {key!r}: {e}") from None
