"""Save/load of the estimator and model: Spark's metadata JSON (what Pipeline and PipelineModel readers expect)
plus NumPy ``.npy`` arrays under ``data/``. No pickle. Files go through Hadoop's FileSystem, so any path Spark can
write (local, HDFS, S3...) works."""

from __future__ import annotations

import io
import json
import os
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import numpy as np
from pyspark.ml.util import DefaultParamsWriter, MLReadable, MLReader, MLWritable, MLWriter
from pyspark.sql import SparkSession

if TYPE_CHECKING:
    from pyspark.ml.param import Params

FORMAT_VERSION = 1
T = TypeVar("T", bound="PersistentParams")


class PersistentParams(MLWritable, MLReadable):
    """A Params stage whose state is JSON-able params, extra metadata and named NumPy arrays."""

    #: params saved as .npy arrays instead of JSON values
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


def _fs(spark: SparkSession, path: str) -> tuple[Any, Any]:
    jvm = spark.sparkContext._jvm
    p = jvm.org.apache.hadoop.fs.Path(path)
    return p.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration()), p


def write_bytes(spark: SparkSession, path: str, data: bytes) -> None:
    fs, p = _fs(spark, path)
    out = fs.create(p, True)
    try:
        out.write(bytearray(data))
    finally:
        out.close()


def read_bytes(spark: SparkSession, path: str) -> bytes:
    """The file's bytes; FileNotFoundError naming the path when it is missing."""
    fs, p = _fs(spark, path)
    if not fs.exists(p):
        raise FileNotFoundError(f"{path} does not exist")
    stream = fs.open(p)
    try:
        return bytes(spark.sparkContext._jvm.org.apache.commons.io.IOUtils.toByteArray(stream))
    finally:
        stream.close()


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


class ParamsArraysWriter(MLWriter):
    """Writes ``path/metadata`` (Spark's DefaultParamsWriter format) and ``path/data/<name>.npy``."""

    def __init__(self, instance: PersistentParams) -> None:
        super().__init__()
        self.instance = instance

    def saveImpl(self, path: str) -> None:
        inst: Any = self.instance
        params = {p.name: v for p, v in inst._paramMap.items()
                  if p.name not in inst._array_params and p.name not in inst._state_params}
        arrays = {p.name: np.asarray(v.toArray() if hasattr(v, "toArray") else v, dtype=np.float64)
                  for p, v in inst._paramMap.items() if p.name in inst._array_params}
        arrays.update(inst._state_arrays())
        extra = {"formatVersion": FORMAT_VERSION, "arrays": {name: f"data/{name}.npy" for name in arrays},
                 **inst._state_metadata()}
        DefaultParamsWriter.saveMetadata(inst, path, self.sparkSession, extraMetadata=extra, paramMap=params)
        for name, rel in extra["arrays"].items():
            write_bytes(self.sparkSession, os.path.join(path, rel), _npy_bytes(arrays[name]))


class ParamsArraysReader(MLReader, Generic[T]):
    """Reads what :class:`ParamsArraysWriter` wrote, with a clear error for every way the files can be wrong."""

    def __init__(self, cls: type[T]) -> None:
        super().__init__()
        self.cls = cls

    def load(self, path: str) -> T:
        spark = self.sparkSession
        name = self.cls.__name__
        meta_dir = os.path.join(path, "metadata")
        fs, p = _fs(spark, meta_dir)
        if not fs.exists(p):
            raise FileNotFoundError(f"cannot load {name} from {path}: {meta_dir} does not exist")
        row = spark.read.text(meta_dir).first()
        try:
            meta = json.loads(row[0]) if row is not None else None
        except json.JSONDecodeError as e:
            raise ValueError(f"cannot load {name} from {path}: metadata is not valid JSON ({e})") from None
        if not isinstance(meta, dict) or not {"class", "uid", "paramMap"} <= meta.keys():
            raise ValueError(f"cannot load {name} from {path}: metadata must be a JSON object with class, uid "
                             f"and paramMap")
        expected = f"{self.cls.__module__}.{name}"
        if meta["class"] != expected:
            raise ValueError(f"cannot load {name} from {path}: it holds a {meta['class']}, not a {expected}")
        instance: Any = self.cls()
        instance._resetUid(meta["uid"])
        _set_params(instance, meta.get("defaultParamMap", {}), path, default=True)
        _set_params(instance, meta["paramMap"], path, default=False)
        arrays = {}
        for key, rel in meta.get("arrays", {}).items():
            file = os.path.join(path, rel)
            try:
                arrays[key] = np.load(io.BytesIO(read_bytes(spark, file)), allow_pickle=False)
            except FileNotFoundError:
                raise FileNotFoundError(f"cannot load {name} from {path}: array file {file} is missing") from None
            except ValueError as e:
                raise ValueError(f"cannot load {name} from {path}: {file} is not a valid .npy file ({e})") from None
        for key in instance._array_params:
            if key in arrays:
                instance._set(**{key: arrays.pop(key)})
        try:
            instance._restore_state(meta, arrays, path)
        except (KeyError, TypeError) as e:
            raise ValueError(f"cannot load {name} from {path}: metadata lacks or mistypes {e}") from None
        return instance


def _set_params(instance: Params, values: dict[str, Any], path: str, default: bool) -> None:
    for key, value in values.items():
        if not instance.hasParam(key):
            raise ValueError(f"cannot load {type(instance).__name__} from {path}: unknown param {key!r}")
        try:
            if default:
                instance._setDefault(**{key: value})
            else:
                instance._set(**{key: value})
        except TypeError as e:
            raise ValueError(f"cannot load {type(instance).__name__} from {path}: param {key!r}: {e}") from None
