"""Dataset readers on real files (Spark's sample data, Debian's Fashion-MNIST) and on broken ones."""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np
import pytest

from sparkdl_hetero.data import fashion_mnist, read_idx, read_libsvm
from sparkdl_hetero.data.fashion_mnist import DEFAULT_DIR, ENV_VAR


# ---- libsvm -------------------------------------------------------------------------------------------------
def test_spark_multiclass_sample(spark_data_dir):
    x, y = read_libsvm(os.path.join(spark_data_dir, "sample_multiclass_classification_data.txt"))
    assert x.shape == (150, 4) and x.dtype == np.float32 and y.dtype == np.float64
    assert np.bincount(y.astype(int)).tolist() == [50, 50, 50]
    # the file's first line: "1 1:-0.222222 2:0.5 3:-0.762712 4:-0.833333"
    assert y[0] == 1.0
    np.testing.assert_array_equal(x[0], np.array([-0.222222, 0.5, -0.762712, -0.833333], dtype=np.float32))


def test_spark_libsvm_sample(spark_data_dir):
    path = os.path.join(spark_data_dir, "sample_libsvm_data.txt")
    x, y = read_libsvm(path)
    assert x.shape == (100, 692)  # Spark's docs: 692 features
    assert np.bincount(y.astype(int)).tolist() == [43, 57]
    # first line starts "0 128:51 129:159 130:253": 1-based indices land in columns 127, 128, 129
    assert y[0] == 0 and x[0, 126] == 0 and x[0, 127:130].tolist() == [51, 159, 253]
    with open(path) as f:
        assert np.count_nonzero(x) == sum(line.count(":") for line in f)  # this file stores no explicit zeros
    x2, _ = read_libsvm(path, num_features=700)
    assert x2.shape == (100, 700) and np.array_equal(x2[:, :692], x) and not x2[:, 692:].any()


def test_libsvm_comments_blank_lines_and_empty_rows(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("# header\n\n2 3:1.5\n0\n  1 1:-1 2:2e-1  \n")
    x, y = read_libsvm(p)
    assert y.tolist() == [2.0, 0.0, 1.0]
    np.testing.assert_array_equal(x, np.array([[0, 0, 1.5], [0, 0, 0], [-1, 0.2, 0]], dtype=np.float32))


@pytest.mark.parametrize("text, message", [
    ("1 1:0.5\nx 2:1\n", r"a\.txt, line 2: the label 'x' is not a number"),
    ("1 1:0.5 2-3\n", r"a\.txt, line 1: expected index:value, got '2-3'"),
    ("1 1:zero\n", r"a\.txt, line 1: expected index:value, got '1:zero'"),
    ("1 0:1.0\n", r"a\.txt, line 1: indices are 1-based, got index 0"),
    ("1 1:1\n1 3:1 2:1\n", r"a\.txt, line 2: indices must be strictly increasing, got 3 then 2"),
    ("1 2:1 2:1\n", r"a\.txt, line 1: indices must be strictly increasing, got 2 then 2"),
])
def test_libsvm_errors(tmp_path, text, message):
    p = tmp_path / "a.txt"
    p.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_libsvm(p)


def test_libsvm_too_few_features(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("1 1:1\n0 2:1 9:1\n")
    with pytest.raises(ValueError, match=r"a\.txt: example 1 has feature index 9 but num_features is 4"):
        read_libsvm(p, num_features=4)


# ---- IDX ----------------------------------------------------------------------------------------------------
def _idx_bytes(a: np.ndarray, code: int) -> bytes:
    head = bytes([0, 0, code, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape)
    return head + a.astype(a.dtype.newbyteorder(">")).tobytes()


@pytest.mark.parametrize("dtype, code", [("u1", 0x08), ("i1", 0x09), ("i2", 0x0B), ("i4", 0x0C), ("f4", 0x0D),
                                         ("f8", 0x0E)])
@pytest.mark.parametrize("compress", [False, True])
def test_idx_round_trip(tmp_path, dtype, code, compress):
    a = (np.random.default_rng(0).normal(size=(3, 4, 5)) * 50).astype(dtype)
    data = _idx_bytes(a, code)
    p = tmp_path / "a.idx"  # gzip data is recognized by content, not by name
    p.write_bytes(gzip.compress(data) if compress else data)
    b = read_idx(p)
    assert b.shape == (3, 4, 5) and b.dtype == np.dtype(dtype) and b.dtype.isnative
    np.testing.assert_array_equal(b, a)


@pytest.mark.parametrize("data, message", [
    (b"\x00\x00", r"not an IDX file: 2 bytes, shorter than the 4-byte magic number"),
    (b"\x1f\x00\x08\x01" + b"\x00" * 8, r"not an IDX file: magic number 1f000801 \(expected 0000 then a type code"),
    (b"\x00\x00\x07\x01\x00\x00\x00\x01\x00", r"not an IDX file: magic number 00000701"),
    (b"\x00\x00\x08\x00", r"IDX header declares 0 dimensions"),
    (b"\x00\x00\x08\x03\x00\x00\x00\x02\x00\x00", r"truncated IDX header: 3 dimensions need 16 bytes, file has 10"),
    (b"\x00\x00\x08\x02\x00\x00\x00\x02\x00\x00\x00\x03" + b"\x01" * 5,
     r"IDX dimensions \(2, 3\) of 1-byte values need 6 data bytes, found 5 \(truncated\)"),
    (b"\x00\x00\x0d\x01\x00\x00\x00\x02" + b"\x01" * 9,
     r"IDX dimensions \(2,\) of 4-byte values need 8 data bytes, found 9 \(trailing data\)"),
])
def test_idx_bad_files(tmp_path, data, message):
    p = tmp_path / "bad-idx1-ubyte"
    p.write_bytes(data)
    with pytest.raises(ValueError, match="bad-idx1-ubyte: " + message):
        read_idx(p)


def test_idx_truncated_gzip(tmp_path):
    good = gzip.compress(_idx_bytes(np.arange(1000, dtype=np.uint8).reshape(10, 100) % 7, 0x08))
    p = tmp_path / "t.gz"
    p.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=r"t\.gz: corrupt or truncated gzip data"):
        read_idx(p)
    p.write_bytes(good[:10] + bytes(b ^ 0xFF for b in good[10:30]) + good[30:])
    with pytest.raises(ValueError, match=r"t\.gz: corrupt or truncated gzip data"):
        read_idx(p)


def test_real_fashion_mnist_idx():
    labels = read_idx(os.path.join(DEFAULT_DIR, "t10k-labels-idx1-ubyte.gz"))
    assert labels.shape == (10000,) and labels.dtype == np.uint8
    images = read_idx(os.path.join(DEFAULT_DIR, "t10k-images-idx3-ubyte.gz"))
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8


# ---- Fashion-MNIST ------------------------------------------------------------------------------------------
def test_fashion_mnist():
    x_train, y_train, x_test, y_test = fashion_mnist()
    assert x_train.shape == (60000, 784) and x_test.shape == (10000, 784)
    assert x_train.dtype == x_test.dtype == np.float32
    assert y_train.dtype == y_test.dtype == np.int64
    assert x_train.min() == 0.0 and x_train.max() == 1.0 and x_test.max() == 1.0
    assert np.bincount(y_train).tolist() == [6000] * 10 and np.bincount(y_test).tolist() == [1000] * 10
    assert y_train[:5].tolist() == [9, 0, 0, 3, 0] and y_test[:5].tolist() == [9, 2, 1, 1, 6]
    raw = read_idx(os.path.join(DEFAULT_DIR, "train-images-idx3-ubyte.gz"))
    np.testing.assert_array_equal(x_train[17], raw[17].reshape(-1).astype(np.float32) / np.float32(255))


def _copy_test_split(src: str, dst, uncompress: bool) -> None:
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        with open(os.path.join(src, stem + ".gz"), "rb") as f:
            data = f.read()
        if uncompress:
            (dst / stem).write_bytes(gzip.decompress(data))
        else:
            (dst / (stem + ".gz")).write_bytes(data)


def test_fashion_mnist_path_and_env(tmp_path, monkeypatch):
    _copy_test_split(DEFAULT_DIR, tmp_path, uncompress=True)
    _, _, x_test, y_test = fashion_mnist(tmp_path)
    ref = fashion_mnist()
    np.testing.assert_array_equal(x_test, ref[2])
    np.testing.assert_array_equal(y_test, ref[3])
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv(ENV_VAR, str(empty))
    with pytest.raises(FileNotFoundError, match=r"no train-images-idx3-ubyte\.gz \(or train-images-idx3-ubyte\) in "
                                                r".*empty\. Install it with `apt-get install dataset-fashion-mnist`"):
        fashion_mnist()
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    np.testing.assert_array_equal(fashion_mnist()[3], ref[3])


def test_fashion_mnist_mismatched_labels(tmp_path):
    _copy_test_split(DEFAULT_DIR, tmp_path, uncompress=False)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(np.zeros(7, np.uint8), 0x08)))
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte\.gz: expected 10000 labels for .*t10k-images-idx3"
                                         r"-ubyte\.gz, got shape \(7,\)"):
        fashion_mnist(tmp_path)
