"""Engine throughput: samples/s of one training epoch on Fashion-MNIST, ours (NumPy backend) vs PyTorch CPU.

Same data, same order, same batch size, same optimizer (Adam), float32, same thread count. Each engine trains its
epoch in a process of its own, and the processes alternate -- ours, PyTorch, ours, ... ``--rounds`` times each --
so that both see the same drift of machine load; the figure is each engine's median over its rounds (the range is
printed beside it). Separate processes, because in one process each engine's idle worker threads (OpenBLAS's after
ours, OpenMP's after PyTorch's) keep spinning into the other's turn: with 2 threads the in-process ratio moved from
0.38x to 0.93x with the number of batches per turn. With more than one thread, OpenBLAS's idle workers also spin
within our own process; ``OPENBLAS_THREAD_TIMEOUT=4`` in the environment makes them sleep at once (the header says
which was measured; see docs/benchmarks.md).
Models: ``mlp`` (Spark's [784,100,10]), ``lenet`` (LeNet-5), and on 3x32x32 inputs (Fashion-MNIST padded to 32x32,
its channel repeated 3 times) ``vgg`` (the VGG-style network of issue 15) and ``resnet8`` (ResNet-8 with batch
normalization). Goals (ours / PyTorch): MLP >= 0.8x, LeNet-5 >= 2x, VGG >= 1.0x. After the epochs, the peak RSS of
a ResNet-8 training process at batch ``--batch`` is printed for both engines (goal: ours within 2x PyTorch's), each
measured in a fresh process. torch is not a dependency: without it only our figures are printed. Run under the
shared lock, e.g.

    flock /tmp/bench.lock .venv/bin/python bench/engine.py [--samples 60000] [--batch 64] [--threads 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
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
VGG = ("conv(32,3,pad=1)-relu-conv(32,3,pad=1)-relu-maxpool(2)-conv(64,3,pad=1)-relu-conv(64,3,pad=1)-relu-maxpool(2)"
       "-flatten-affine(256)-relu-affine(10)")
GOALS = {"mlp": 0.8, "lenet": 2.0, "vgg": 1.0}
RGB32 = ("vgg", "resnet8")  # the models trained on 3x32x32 inputs


def topology(name: str) -> FeedForwardTopology:
    if name == "mlp":
        return FeedForwardTopology.multilayer_perceptron([784, 100, 10])
    if name == "vgg":
        return FeedForwardTopology.from_spec(VGG, (3, 32, 32))
    if name == "resnet8":
        return FeedForwardTopology.from_spec("resnet8", (3, 32, 32))
    return FeedForwardTopology.from_spec(LENET, (1, 28, 28))


def rgb32(x: np.ndarray) -> np.ndarray:
    """Fashion-MNIST rows (n, 784) as 3x32x32 images (zero border of 2, the channel repeated), flattened C, H, W."""
    img = np.zeros((len(x), 1, 32, 32), dtype=x.dtype)
    img[:, 0, 2:30, 2:30] = x.reshape(-1, 28, 28)
    return np.ascontiguousarray(np.repeat(img, 3, axis=1).reshape(len(x), -1))


def torch_module(name: str) -> Any:
    """The network ``name`` in PyTorch (the same layers as :func:`topology`)."""
    import torch.nn as tnn

    if name == "mlp":
        return tnn.Sequential(tnn.Linear(784, 100), tnn.Sigmoid(), tnn.Linear(100, 10))
    if name == "lenet":
        return tnn.Sequential(
            tnn.Conv2d(1, 6, 5, padding=2), tnn.ReLU(), tnn.MaxPool2d(2),
            tnn.Conv2d(6, 16, 5), tnn.ReLU(), tnn.MaxPool2d(2), tnn.Flatten(),
            tnn.Linear(400, 120), tnn.ReLU(), tnn.Linear(120, 84), tnn.ReLU(), tnn.Linear(84, 10))
    if name == "vgg":
        return tnn.Sequential(
            tnn.Conv2d(3, 32, 3, padding=1), tnn.ReLU(), tnn.Conv2d(32, 32, 3, padding=1), tnn.ReLU(),
            tnn.MaxPool2d(2), tnn.Conv2d(32, 64, 3, padding=1), tnn.ReLU(), tnn.Conv2d(64, 64, 3, padding=1),
            tnn.ReLU(), tnn.MaxPool2d(2), tnn.Flatten(), tnn.Linear(64 * 8 * 8, 256), tnn.ReLU(), tnn.Linear(256, 10))

    class Block(tnn.Module):  # ResNet's basic block, as the spec's res(...) with a strided 1x1 projection
        def __init__(self, c_in: int, c_out: int, stride: int) -> None:
            super().__init__()
            self.body = tnn.Sequential(
                tnn.Conv2d(c_in, c_out, 3, stride, 1), tnn.BatchNorm2d(c_out), tnn.ReLU(),
                tnn.Conv2d(c_out, c_out, 3, 1, 1), tnn.BatchNorm2d(c_out))
            self.skip = tnn.Identity() if c_in == c_out and stride == 1 else tnn.Conv2d(c_in, c_out, 1, stride)

        def forward(self, x: Any) -> Any:
            return self.body(x) + self.skip(x)

    return tnn.Sequential(
        tnn.Conv2d(3, 16, 3, padding=1), tnn.BatchNorm2d(16), tnn.ReLU(), Block(16, 16, 1), tnn.ReLU(),
        Block(16, 32, 2), tnn.ReLU(), Block(32, 64, 2), tnn.ReLU(), tnn.AdaptiveAvgPool2d(1), tnn.Flatten(),
        tnn.Linear(64, 10))


class Ours:
    """Our engine: the in-process trainer with one persistent updater."""

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
        self.model = torch_module(name)
        self.torch, self.batch = torch, batch
        self.shape = {"mlp": (-1, 784), "lenet": (-1, 1, 28, 28)}.get(name, (-1, 3, 32, 32))
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
        self.model.eval()  # batch normalization with its running statistics
        with self.torch.no_grad():
            pred = np.concatenate([self.model(self.torch.from_numpy(x[i:i + 1024].reshape(self.shape))).argmax(dim=1)
                                   .numpy() for i in range(0, len(x), 1024)])
        self.model.train()
        return float(np.mean(pred == y))


def make_engine(engine: str, name: str, batch: int, lr: float, seed: int, threads: int) -> Any:
    """``Ours`` or ``Torch`` (``engine``: "ours" or "torch") for model ``name``; PyTorch on ``threads`` threads."""
    if engine == "torch":
        import torch

        torch.set_num_threads(threads)
        torch.set_num_interop_threads(1)
        return Torch(name, batch, lr, seed)
    return Ours(name, batch, lr, seed)


def _status_mb(field: str) -> float:
    """A memory field of this process' /proc status (Linux) in MiB: VmRSS (now), VmHWM (peak). Not getrusage's
    ru_maxrss, which a process inherits from its parent across exec."""
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
    return kb / 1024


def rss_child(engine: str, name: str, batch: int, threads: int) -> None:
    """Print this process' RSS after building ``engine``'s ``name`` and its peak RSS over 5 training steps."""
    with threadpool_limits(limits=threads):
        rng = np.random.default_rng(0)
        x = rng.random((5 * batch, topology(name).num_inputs), dtype=np.float32)
        y = rng.integers(0, 10, 5 * batch)
        eng = make_engine(engine, name, batch, 1e-3, 0, threads)
        before = _status_mb("VmRSS")
        eng.run(x, y)
    print(f"{before:.1f} {_status_mb('VmHWM'):.1f}")


def peak_rss(engine: str, name: str, batch: int, threads: int) -> tuple[float, float]:
    """(RSS before training, peak RSS) in MiB of a fresh process training ``name`` with ``engine``."""
    out = subprocess.run([sys.executable, __file__, "--rss-child", engine, "--models", name, "--batch", str(batch),
                          "--threads", str(threads)], check=True, capture_output=True, text=True).stdout
    before, peak = (float(v) for v in out.split())
    return before, peak


def epoch_child(engine: str, name: str, a: argparse.Namespace) -> None:
    """Train one epoch of ``name`` with ``engine`` in this process; print samples/s, mean loss, test accuracy."""
    x_train, y_train, x_test, y_test = fashion_mnist()
    x, y = x_train[:a.samples], y_train[:a.samples]
    if name in RGB32:
        x, x_test = rgb32(x), rgb32(x_test)
    with threadpool_limits(limits=a.threads):
        eng = make_engine(engine, name, a.batch, a.lr, a.seed, a.threads)
        eng.run(x[:4 * a.batch], y[:4 * a.batch])  # warm-up: allocations, thread pools
        order = np.random.default_rng(a.seed).permutation(len(x))
        x, y = x[order], y[order]
        t = time.perf_counter()
        loss = eng.run(x, y)
        spent = time.perf_counter() - t
        print(f"{len(x) / spent} {loss / len(x)} {eng.accuracy(x_test, y_test)}")


def epoch(engine: str, name: str, a: argparse.Namespace) -> tuple[float, float, float]:
    """(samples/s, mean loss, test accuracy) of one epoch of ``name`` trained by ``engine`` in a fresh process."""
    out = subprocess.run([sys.executable, __file__, "--epoch-child", engine, "--models", name, "--batch", str(a.batch),
                          "--threads", str(a.threads), "--samples", str(a.samples), "--lr", str(a.lr),
                          "--seed", str(a.seed)], check=True, capture_output=True, text=True).stdout
    rate, loss, acc = (float(v) for v in out.split())
    return rate, loss, acc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=60000, help="training rows in the epoch")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="epochs each engine trains, alternating processes")
    ap.add_argument("--models", default="mlp,lenet,vgg,resnet8")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rss-child", choices=("ours", "torch"), help=argparse.SUPPRESS)  # peak_rss's subprocess
    ap.add_argument("--epoch-child", choices=("ours", "torch"), help=argparse.SUPPRESS)  # epoch's subprocess
    a = ap.parse_args()
    if a.rss_child:
        rss_child(a.rss_child, a.models, a.batch, a.threads)
        return
    if a.epoch_child:
        epoch_child(a.epoch_child, a.models, a)
        return
    try:
        import torch

        peer = f"PyTorch {torch.__version__}"
    except ImportError:
        torch = None
        peer = ""
    with threadpool_limits(limits=a.threads):
        blas = "; ".join(f"{i['internal_api']} {i.get('version')} {i.get('architecture')} threads={i['num_threads']}"
                         for i in threadpool_info() if i["user_api"] == "blas")
        timeout = os.environ.get("OPENBLAS_THREAD_TIMEOUT", "unset")
        print(f"# {a.samples} samples/epoch, batch {a.batch}, Adam lr {a.lr}, float32, {a.threads} threads, "
              f"{a.rounds} rounds of one process per engine, alternating; BLAS: {blas}; "
              f"OPENBLAS_THREAD_TIMEOUT={timeout}")
        if torch is None:
            print("# torch is not installed: only our figures (pip install torch==2.13.0 for the comparison)")
        for name in a.models.split(","):
            engines = ["ours", "torch"] if torch is not None else ["ours"]
            runs: dict[str, list[tuple[float, float, float]]] = {k: [] for k in engines}
            for _ in range(a.rounds):
                for k in engines:
                    runs[k].append(epoch(k, name, a))
            rate = {k: float(np.median([r[0] for r in v])) for k, v in runs.items()}
            for k, v in runs.items():
                label = f"[{peer}]" if k == "torch" else ""
                print(f"{name:6s} {k:6s}: {rate[k]:9.0f} samples/s  (range {min(r[0] for r in v):.0f}-"
                      f"{max(r[0] for r in v):.0f}; loss {v[0][1]:.4f}, test acc {v[0][2]:.4f}) {label}")
            if "torch" in rate:
                ratio = rate["ours"] / rate["torch"]
                goal = f"goal >= {GOALS[name]}x: {'met' if ratio >= GOALS[name] else 'NOT met'}" \
                    if name in GOALS else "no goal"
                print(f"{name:6s} ratio : {ratio:.2f}x  ({goal})")
        if "resnet8" in a.models.split(","):
            rss = {k: peak_rss(k, "resnet8", a.batch, a.threads) for k in (["ours", "torch"] if torch else ["ours"])}
            for k, (before, peak) in rss.items():
                print(f"resnet8 peak RSS, batch {a.batch}, {k:6s}: {peak:7.1f} MiB (before the first step "
                      f"{before:.1f} MiB; the steps' growth {peak - before:.1f} MiB)")
            if "torch" in rss:
                ratio = rss["ours"][1] / rss["torch"][1]
                print(f"resnet8 peak RSS ratio ours/torch: {ratio:.2f}x (goal <= 2x: "
                      f"{'met' if ratio <= 2 else 'NOT met'})")


if __name__ == "__main__":
    main()
