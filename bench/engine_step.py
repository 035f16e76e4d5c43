"""Per-step cost of the engine: one forward + backward (``compute_gradient``, no update) on ONE BLAS thread.

What barrier mode's workers and treeAggregate's tasks spend per step, measured without Spark:
- LeNet-5 (``bench/engine.py``'s topology, softmax cross-entropy, float32) at small batches (a worker's share
  of a global batch of 64: 64 rows alone, 32 at 2 workers, ~50 and ~12 for a fast worker beside a 3x-slower
  one), ours vs PyTorch CPU's forward + backward of the same network on the same rows (``zero_grad`` included
  in both);
- MLP [784,100,10] (Spark's topology: sigmoid hidden layer, softmax on top) over one treeAggregate task's rows
  in chunks of ``--chunk`` rows, as ``partition_gradient`` does.
Both engines alternate in rounds (``--rounds``), so they see the same machine load; the median step time per
batch size is reported. Run under the shared lock, e.g.

    flock /tmp/bench.lock env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python bench/engine_step.py
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import numpy as np
from threadpoolctl import threadpool_limits

from sparkdl_hetero.nn import FeedForwardModel, FeedForwardTopology

LENET = "conv(6,5,pad=2)-relu-maxpool(2)-conv(16,5)-relu-maxpool(2)-flatten-affine(120)-relu-affine(84)-relu-affine(10)"


def _fashion_like(rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST training rows when installed (pixel statistics matter little here, but use the real thing),
    else uniform random pixels -- said on stdout."""
    try:
        from sparkdl_hetero.data import fashion_mnist

        x, y = fashion_mnist()[:2]
    except (ImportError, OSError, ValueError) as exc:
        print(f"# Fashion-MNIST unavailable ({exc}): random pixels")
        rng = np.random.default_rng(seed)
        return rng.random((rows, 784), dtype=np.float32), rng.integers(0, 10, rows)
    reps = -(-rows // len(x))
    return np.tile(x, (reps, 1))[:rows], np.tile(y, reps)[:rows]


class WorkerStep:
    """A barrier worker's per-step work without Spark or sockets, on ``rows`` Fashion-MNIST rows: :meth:`compute`
    (zero_grad + forward/backward of the selected rows) and :meth:`update` (the float32 gradient into float64 Adam
    state and weights, then the weights copied back into the float32 model), as ``BarrierWorker`` does."""

    def __init__(self, rows: int) -> None:
        from sparkdl_hetero.nn.optim import Adam

        self.x, y = _fashion_like(rows, 0)  # float32 pixels in [0, 1]
        self.y = y.astype(np.float64)  # barrier mode's label column
        self.model = FeedForwardModel(FeedForwardTopology.from_spec(LENET, (1, 28, 28)), seed=0)
        self.weights = self.model.get_weights().astype(np.float64)
        self._w32 = np.empty_like(self.weights, dtype=np.float32)
        self.adam = Adam(0.9, 0.999, 1e-8, state_dtype=np.float64)

    def compute(self, rows: np.ndarray | slice, batch: int) -> None:
        self.model.zero_grad()
        self.model.compute_gradient(self.x[rows], self.y[rows], scale=float(batch))

    def update(self, batch: int) -> None:
        self.adam.step(self.weights, self.model.gradient, 1e-4, 1.0 / batch)
        np.copyto(self._w32, self.weights, casting="same_kind")
        self.model.set_weights(self._w32)


def _ours_step(topo: FeedForwardTopology, seed: int) -> Callable[[np.ndarray, np.ndarray], None]:
    model = FeedForwardModel(topo, seed=seed)

    def step(x: np.ndarray, y: np.ndarray) -> None:
        model.zero_grad()
        model.compute_gradient(x, y)

    return step


def _torch_step(seed: int) -> Callable[[np.ndarray, np.ndarray], None] | None:
    try:
        import torch
        import torch.nn as tnn
    except ImportError:
        return None
    from speedup import _torch_lenet

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    model = _torch_lenet()
    loss_fn = tnn.CrossEntropyLoss()

    def step(x: np.ndarray, y: np.ndarray) -> None:
        model.zero_grad()
        loss_fn(model(torch.from_numpy(x).view(-1, 1, 28, 28)), torch.from_numpy(y)).backward()

    return step


def lenet(batches: list[int], rounds: int, steps: int, seed: int) -> None:
    x, y = _fashion_like(4096, seed)
    y = y.astype(np.int64)
    engines = {"ours": _ours_step(FeedForwardTopology.from_spec(LENET, (1, 28, 28)), seed)}
    peer = _torch_step(seed)
    if peer is None:
        print("# torch is not installed: only our figures")
    else:
        engines["torch"] = peer
    times: dict[tuple[str, int], list[float]] = {(k, b): [] for k in engines for b in batches}
    for r in range(rounds + 1):  # round 0 warms up (buffers, thread pools)
        for b in batches:
            for name, step in engines.items():
                for s in range(steps):
                    lo = ((r * steps + s) * b) % (len(x) - b)
                    xb, yb = x[lo:lo + b], y[lo:lo + b]
                    t = time.perf_counter()
                    step(xb, yb)
                    if r:
                        times[(name, b)].append(time.perf_counter() - t)
    for b in batches:
        med = {k: float(np.median(times[(k, b)])) for k in engines}
        line = f"lenet batch {b:3d}: ours {med['ours'] * 1e3:6.3f} ms/step = {b / med['ours']:7.0f} samples/s"
        if "torch" in med:
            line += (f"; torch {med['torch'] * 1e3:6.3f} ms/step = {b / med['torch']:7.0f} samples/s; "
                     f"ours/torch = {med['torch'] / med['ours']:.2f}x")
        print(line, flush=True)


def mlp(rows: int, chunk: int, rounds: int, seed: int) -> None:
    x, y = _fashion_like(rows, seed)
    model = FeedForwardModel(FeedForwardTopology.multilayer_perceptron([784, 100, 10]), seed=seed)
    ts = []
    for r in range(rounds + 1):
        t = time.perf_counter()
        model.zero_grad()
        for lo in range(0, rows, chunk):
            hi = min(rows, lo + chunk)
            model.compute_gradient(x[lo:hi], y[lo:hi], scale=float(hi - lo))
        if r:
            ts.append(time.perf_counter() - t)
    med = float(np.median(ts))
    print(f"mlp [784,100,10] {rows} rows in chunks of {chunk}: {med * 1e3:.1f} ms = {rows / med:,.0f} samples/s "
          f"(median of {rounds})", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="12,32,50,64", help="LeNet batch sizes")
    ap.add_argument("--rounds", type=int, default=20, help="alternation rounds")
    ap.add_argument("--steps", type=int, default=20, help="steps per engine, batch size and round")
    ap.add_argument("--mlp-rows", type=int, default=30000, help="rows of one MLP task (0: skip the MLP)")
    ap.add_argument("--chunk", default="4096", help="MLP rows per compute_gradient call (comma-separated list)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(f"# one BLAS thread; load average {os.getloadavg()} on {os.cpu_count()} cores (noisy shared machine)")
    with threadpool_limits(limits=1):
        if a.batches:
            lenet([int(b) for b in a.batches.split(",")], a.rounds, a.steps, a.seed)
        for c in (a.chunk.split(",") if a.mlp_rows else []):
            mlp(a.mlp_rows, int(c), max(3, a.rounds // 2), a.seed)
    print(f"# load average after {os.getloadavg()}")


if __name__ == "__main__":
    main()
