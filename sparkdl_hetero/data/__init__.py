"""Dataset readers: IDX (MNIST, Fashion-MNIST) and libsvm text, returning NumPy arrays."""
