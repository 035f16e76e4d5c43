"""Datasets as Parquet (``features array<float>, label double``), the form a Spark job reads with
``spark.read.parquet``: executors read the files themselves, so no task carries the data from driver memory and
the same job runs on a cluster given a path every node reaches (HDFS, S3, a shared mount)."""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from .fashion_mnist import fashion_mnist

#: rows per Parquet row group: the unit Spark splits a file into partitions by
ROW_GROUP_ROWS = 4096
_DONE = "_SUCCESS"


def write_parquet(x: np.ndarray, y: np.ndarray, path: str, extra: Mapping[str, np.ndarray] | None = None) -> str:
    """Write samples ``x`` (n, d) and labels ``y`` (n,) to the Parquet directory ``path`` (replacing it) through
    pyarrow's file systems (a local path or a URI such as ``hdfs://`` or ``s3://``); returns ``path``. ``extra``:
    more columns by name, one value per sample (e.g. a device id or a validation indicator)."""
    import pyarrow as pa
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    x = np.ascontiguousarray(np.asarray(x).reshape(len(x), -1), dtype=np.float32)
    y = np.asarray(y)
    if len(x) != len(y):
        raise ValueError(f"write_parquet: {len(x)} samples but {len(y)} labels")
    feats = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), x.shape[1]).cast(pa.list_(pa.float32()))
    columns = {"features": feats, "label": pa.array(y.astype(np.float64))}
    for name, values in (extra or {}).items():
        if len(values) != len(y):
            raise ValueError(f"write_parquet: column {name!r} has {len(values)} values for {len(y)} samples")
        columns[name] = pa.array(np.asarray(values))
    table = pa.table(columns)
    fs, root = pafs.FileSystem.from_uri(path) if "://" in path else (pafs.LocalFileSystem(), os.path.abspath(path))
    if fs.get_file_info(root).type != pafs.FileType.NotFound:
        fs.delete_dir(root)
    fs.create_dir(root, recursive=True)
    pq.write_table(table, f"{root}/part-00000.parquet", filesystem=fs, row_group_size=ROW_GROUP_ROWS)
    with fs.open_output_stream(f"{root}/{_DONE}"):
        pass
    return path


def _complete(path: str) -> bool:
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(path) if "://" in path else (pafs.LocalFileSystem(), os.path.abspath(path))
    return fs.get_file_info(f"{root}/{_DONE}").type == pafs.FileType.File


def fashion_mnist_parquet(directory: str, source: str | os.PathLike | None = None) -> tuple[str, str]:
    """Fashion-MNIST's train and test splits as Parquet under ``directory`` (``train/``, ``test/``), converted
    from the IDX files in ``source`` (see :func:`fashion_mnist`) only when a complete conversion is not there yet;
    returns the two paths. Features are pixels / 255 in row-major 28x28 order, labels 0-9."""
    train, test = f"{directory.rstrip('/')}/train", f"{directory.rstrip('/')}/test"
    if not (_complete(train) and _complete(test)):
        x_train, y_train, x_test, y_test = fashion_mnist(source)
        write_parquet(x_train, y_train, train)
        write_parquet(x_test, y_test, test)
    return train, test
