"""Dataset readers: IDX (MNIST, Fashion-MNIST) and libsvm text, returning NumPy arrays."""

from .fashion_mnist import fashion_mnist
from .idx import read_idx
from .libsvm import read_libsvm

__all__ = ["fashion_mnist", "read_idx", "read_libsvm"]
