"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package (or any directory of the same files)."""

from __future__ import annotations

import os

import numpy as np

from .idx import read_idx

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
ENV_VAR = "SPARKDL_FASHION_MNIST"
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find(directory: str, stem: str) -> str:
    for name in (stem + ".gz", stem):
        p = os.path.join(directory, name)
        if os.path.isfile(p):
            return p
    raise FileNotFoundError(
        f"Fashion-MNIST not found: no {stem}.gz (or {stem}) in {directory}. Install it with "
        f"`apt-get install dataset-fashion-mnist` (Debian/Ubuntu; ./dev.sh does it), or point path= or "
        f"${ENV_VAR} to a directory holding the four IDX files.")


def _split(directory: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    images_path, labels_path = (_find(directory, s) for s in FILES[split])
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{images_path}: expected (n, rows, cols) unsigned bytes, got {images.dtype} {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(f"{labels_path}: expected {len(images)} labels for {images_path}, got shape {labels.shape}")
    x = images.reshape(len(images), -1).astype(np.float32)
    x /= np.float32(255.0)
    return x, labels.astype(np.int64)


def fashion_mnist(path: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, y_train, x_test, y_test)``: images as float32 rows of 784 pixels in [0, 1] (row-major 28x28,
    i.e. (1, 28, 28) inputs), labels int64 in 0..9.

    ``path`` defaults to ``$SPARKDL_FASHION_MNIST``, then Debian's ``/usr/share/datasets/fashion-mnist``.
    """
    directory = os.fspath(path) if path is not None else os.environ.get(ENV_VAR) or DEFAULT_DIR
    x_train, y_train = _split(directory, "train")
    x_test, y_test = _split(directory, "test")
    return x_train, y_train, x_test, y_test
