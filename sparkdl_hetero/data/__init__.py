"""Dataset readers: IDX (MNIST, Fashion-MNIST) and libsvm text, returning NumPy arrays; federated device splits."""

from .devices import DeviceAssignment, assign_devices
from .fashion_mnist import fashion_mnist
from .idx import read_idx
from .libsvm import read_libsvm

__all__ = ["DeviceAssignment", "assign_devices", "fashion_mnist", "read_idx", "read_libsvm"]
