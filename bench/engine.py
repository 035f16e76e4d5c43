"""Engine throughput: samples/s of one training epoch on Fashion-MNIST, ours (NumPy backend) vs PyTorch CPU.

Same data, same order, same batch size, same optimizer (Adam), float32, same thread count, one process.
The two engines train in alternation, a chunk of batches each (``--chunk``), and each one's time is summed over
the epoch: both see the same machine load, so the ratio stays meaningful on a busy machine.
Goals: MLP [784,100,10] >= 0.8x PyTorch, LeNet-5 >= 0.5x. torch is not a dependency: without it only our
figures are printed. Run under the shared lock, e.g.

    flock /tmp/bench.lock .venv/bin/python bench/engine.py [--samples 60000] [--batch 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

from sparkdl_hetero.data import fashion_mnist
from sparkdl_hetero.distributed.config import TrainConfig
from sparkdl_hetero.nn import FeedForwardModel, FeedForwardTopology
from sparkdl_hetero.nn.optim import make_updater
from sparkdl_hetero.nn.trainer import accuracy, train

LENET = "conv(6,5,pad=2)-relu-maxpool(2)-conv(16,5)-relu-maxpool(2)-flatten-affine(120)-relu-affine(84)-relu-affine(10)"
GOALS = {"mlp": 0.8, "lenet": 0.5}


def topology(name: str) -> FeedForwardTopology:
    if name == "mlp":
        return FeedForwardTopology.multilayer_perceptron([784, 100, 10])
    return FeedForwardTopology.from_spec(LENET, (1, 28, 28))


class Ours:
    """Our engine: the in-process trainer, called per chunk with one persistent updater."""

    def __init__(self, name: str, batch: int, lr: float, seed: int) -> None:
        self.cfg = TrainConfig(solver="adam", stepSize=lr, batchSize=batch, seed=seed)
        self.model = FeedForwardModel(topology(name), seed=seed)
        self.updater = make_updater(self.cfg)

    def run(self, x: np.ndarray, y: np.ndarray) -> float:
        """Train on these rows (in batches); return the summed batch loss."""
        return train(self.model, x, y, self.cfg, epochs=1, updater=self.updater)[0] * len(x)

    def accuracy(self, x: np.ndarray, y: np.ndarray) -> float:
        return accuracy(self.model, x, y)


class Torch:
    """The same network and optimizer in PyTorch."""

    def __init__(self, name: str, batch: int, lr: float, seed: int) -> None:
        import torch
        import torch.nn as tnn

        torch.manual_seed(seed)
        if name == "mlp":
            self.model = tnn.Sequential(tnn.Linear(784, 100), tnn.Sigmoid(), tnn.Linear(100, 10))
        else:
            self.model = tnn.Sequential(
                tnn.Conv2d(1, 6, 5, padding=2), tnn.ReLU(), tnn.MaxPool2d(2),
                tnn.Conv2d(6, 16, 5), tnn.ReLU(), tnn.MaxPool2d(2), tnn.Flatten(),
                tnn.Linear(400, 120), tnn.ReLU(), tnn.Linear(120, 84), tnn.ReLU(), tnn.Linear(84, 10))
        self.torch, self.batch = torch, batch
        self.shape = (-1, 784) if name == "mlp" else (-1, 1, 28, 28)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=lr)
        self.loss_fn = tnn.CrossEntropyLoss()

    def run(self, x: np.ndarray, y: np.ndarray) -> float:
        tx, ty = self.torch.from_numpy(x.reshape(self.shape)), self.torch.from_numpy(y)
        total = 0.0
        for i in range(0, len(x), self.batch):
            self.opt.zero_grad()
            loss = self.loss_fn(self.model(tx[i:i + self.batch]), ty[i:i + self.batch])
            loss.backward()
            self.opt.step()
            total += float(loss.detach()) * len(ty[i:i + self.batch])
        return total

    def accuracy(self, x: np.ndarray, y: np.ndarray) -> float:
        with self.torch.no_grad():
            pred = self.model(self.torch.from_numpy(x.reshape(self.shape))).argmax(dim=1).numpy()
        return float(np.mean(pred == y))


def epoch(engines: dict[str, Any], x: np.ndarray, y: np.ndarray, chunk: int, seed: int) -> dict[str, tuple]:
    """One epoch, engines alternating per chunk of rows -> name: (samples/s, mean loss)."""
    order = np.random.default_rng(seed).permutation(len(x))
    spent = dict.fromkeys(engines, 0.0)
    loss = dict.fromkeys(engines, 0.0)
    for i in range(0, len(x), chunk):
        xs, ys = x[order[i:i + chunk]], y[order[i:i + chunk]]
        for name, eng in engines.items():
            t = time.perf_counter()
            loss[name] += eng.run(xs, ys)
            spent[name] += time.perf_counter() - t
    return {name: (len(x) / spent[name], loss[name] / len(x)) for name in engines}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=60000, help="training rows in the epoch")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=10, help="batches each engine runs before the other's turn")
    ap.add_argument("--epochs", type=int, default=1, help="epochs measured (each printed)")
    ap.add_argument("--models", default="mlp,lenet")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    x_train, y_train, x_test, y_test = fashion_mnist()
    x, y = x_train[:a.samples], y_train[:a.samples]
    try:
        import torch

        torch.set_num_threads(a.threads)
        torch.set_num_interop_threads(1)
        peer = f"PyTorch {torch.__version__}"
    except ImportError:
        torch = None
        peer = ""
    with threadpool_limits(limits=a.threads):
        blas = "; ".join(f"{i['internal_api']} {i.get('version')} {i.get('architecture')} threads={i['num_threads']}"
                         for i in threadpool_info() if i["user_api"] == "blas")
        print(f"# {len(x)} samples/epoch, batch {a.batch}, Adam lr {a.lr}, float32, {a.threads} threads, "
              f"engines alternate every {a.chunk} batches; BLAS: {blas}")
        if torch is None:
            print("# torch is not installed: only our figures (pip install torch==2.13.0 for the comparison)")
        for name in a.models.split(","):
            engines: dict[str, Any] = {"ours": Ours(name, a.batch, a.lr, a.seed)}
            if torch is not None:
                engines["torch"] = Torch(name, a.batch, a.lr, a.seed)
            for eng in engines.values():  # warm-up: allocations, thread pools
                eng.run(x[:4 * a.batch], y[:4 * a.batch])
            for e in range(a.epochs):
                res = epoch(engines, x, y, a.chunk * a.batch, a.seed + e)
                acc = {k: eng.accuracy(x_test, y_test) for k, eng in engines.items()}
                for k, (rate, loss) in res.items():
                    label = f"[{peer}]" if k == "torch" else ""
                    print(f"{name:6s} epoch {e + 1} {k:6s}: {rate:9.0f} samples/s  (loss {loss:.4f}, test acc "
                          f"{acc[k]:.4f}) {label}")
                if "torch" in res:
                    ratio = res["ours"][0] / res["torch"][0]
                    verdict = "met" if ratio >= GOALS[name] else "NOT met"
                    print(f"{name:6s} epoch {e + 1} ratio : {ratio:.2f}x  (goal >= {GOALS[name]}x: {verdict})")


if __name__ == "__main__":
    main()
