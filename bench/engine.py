"""Engine throughput: samples/s of one training epoch on Fashion-MNIST, ours (NumPy backend) vs PyTorch CPU.

Same data, same order, same batch size, same optimizer (Adam), float32, same thread count, one process.
Goals: MLP [784,100,10] >= 0.8x PyTorch, LeNet-5 >= 0.5x. torch is not a dependency: without it only our
figures are printed. Run under the shared lock, e.g.

    flock /tmp/bench.lock .venv/bin/python bench/engine.py [--samples 60000] [--batch 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

from sparkdl_hetero.data import fashion_mnist
from sparkdl_hetero.distributed.config import TrainConfig
from sparkdl_hetero.nn import FeedForwardModel, FeedForwardTopology
from sparkdl_hetero.nn.trainer import accuracy, train

LENET = "conv(6,5,pad=2)-relu-maxpool(2)-conv(16,5)-relu-maxpool(2)-flatten-affine(120)-relu-affine(84)-relu-affine(10)"
GOALS = {"mlp": 0.8, "lenet": 0.5}


def topology(name: str) -> FeedForwardTopology:
    if name == "mlp":
        return FeedForwardTopology.multilayer_perceptron([784, 100, 10])
    return FeedForwardTopology.from_spec(LENET, (1, 28, 28))


def ours(name: str, x: np.ndarray, y: np.ndarray, xt: np.ndarray, yt: np.ndarray, batch: int, lr: float,
         seed: int) -> tuple[float, float, float]:
    """(samples/s, last epoch loss, test accuracy) of one epoch with our engine."""
    cfg = TrainConfig(solver="adam", stepSize=lr, batchSize=batch, seed=seed)
    model = FeedForwardModel(topology(name), seed=seed)
    train(model, x[:20 * batch], y[:20 * batch], cfg, epochs=1)  # warm-up: allocations, BLAS threads
    model = FeedForwardModel(topology(name), seed=seed)
    t = time.perf_counter()
    history = train(model, x, y, cfg, epochs=1)
    dt = time.perf_counter() - t
    return len(x) / dt, history[-1], accuracy(model, xt, yt)


def torch_model(name: str):
    import torch.nn as tnn

    if name == "mlp":
        return tnn.Sequential(tnn.Linear(784, 100), tnn.Sigmoid(), tnn.Linear(100, 10))
    return tnn.Sequential(
        tnn.Conv2d(1, 6, 5, padding=2), tnn.ReLU(), tnn.MaxPool2d(2),
        tnn.Conv2d(6, 16, 5), tnn.ReLU(), tnn.MaxPool2d(2), tnn.Flatten(),
        tnn.Linear(400, 120), tnn.ReLU(), tnn.Linear(120, 84), tnn.ReLU(), tnn.Linear(84, 10))


def pytorch(name: str, x: np.ndarray, y: np.ndarray, xt: np.ndarray, yt: np.ndarray, batch: int, lr: float,
            seed: int) -> tuple[float, float, float]:
    """(samples/s, epoch loss, test accuracy) of the same epoch with PyTorch on the CPU."""
    import torch

    torch.manual_seed(seed)
    shape = (-1, 784) if name == "mlp" else (-1, 1, 28, 28)
    tx, ty = torch.from_numpy(x.reshape(shape)), torch.from_numpy(y)
    loss_fn = torch.nn.CrossEntropyLoss()

    def epoch(model, opt, n):
        order = torch.from_numpy(np.random.default_rng(seed).permutation(n))
        total = 0.0
        for i in range(0, n, batch):
            idx = order[i:i + batch]
            opt.zero_grad()
            loss = loss_fn(model(tx[idx]), ty[idx])
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        return total / n

    model = torch_model(name)
    epoch(model, torch.optim.Adam(model.parameters(), lr=lr), 20 * batch)  # warm-up
    model = torch_model(name)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    t = time.perf_counter()
    loss = epoch(model, opt, len(x))
    dt = time.perf_counter() - t
    with torch.no_grad():
        pred = model(torch.from_numpy(xt.reshape(shape))).argmax(dim=1).numpy()
    return len(x) / dt, loss, float(np.mean(pred == yt))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=60000, help="training rows in the epoch")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1,
                    help="epochs measured per engine (interleaved); the best is reported")
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
        print(f"# {len(x)} samples/epoch, batch {a.batch}, Adam lr {a.lr}, float32, {a.threads} threads; "
              f"BLAS: {blas}")
        if torch is None:
            print("# torch is not installed: only our figures (pip install torch==2.13.0 for the comparison)")
        for name in a.models.split(","):
            runs: dict[str, list[tuple[float, float, float]]] = {"ours": [], "torch": []}
            for _ in range(a.repeats):  # interleaved, so both see the same machine load
                runs["ours"].append(ours(name, x, y, x_test, y_test, a.batch, a.lr, a.seed))
                if torch is not None:
                    runs["torch"].append(pytorch(name, x, y, x_test, y_test, a.batch, a.lr, a.seed))
            best = max(runs["ours"], key=lambda r: r[0])
            print(f"{name:6s} ours   : {best[0]:9.0f} samples/s  (epoch loss {best[1]:.4f}, test acc {best[2]:.4f})"
                  f"  all: {', '.join(f'{r[0]:.0f}' for r in runs['ours'])}")
            if torch is not None:
                ref = max(runs["torch"], key=lambda r: r[0])
                ratio = best[0] / ref[0]
                print(f"{name:6s} torch  : {ref[0]:9.0f} samples/s  (epoch loss {ref[1]:.4f}, test acc {ref[2]:.4f})"
                      f"  all: {', '.join(f'{r[0]:.0f}' for r in runs['torch'])}  [{peer}]")
                verdict = "met" if ratio >= GOALS[name] else "NOT met"
                print(f"{name:6s} ratio  : {ratio:.2f}x  (goal >= {GOALS[name]}x: {verdict})")


if __name__ == "__main__":
    main()
