"""Two lock-stepped LeNet-5 compute loops on the two cores vs one alone: how much one worker's step slows the other's.

Barrier mode's two workers compute their 32-row shares at the same moment, then exchange, then update. Here each
process (one BLAS thread) repeats what a worker does per step without Spark or sockets between steps' compute:
draw ``--batch`` random rows of its 6,000 Fashion-MNIST rows, ``zero_grad`` + ``compute_gradient`` (timed: the
"compute"), then -- unless ``--no-update`` -- the barrier's update (the float32 gradient into float64 Adam state
and weights, the weights copied back into the float32 model). With two processes, both wait for each other after
every compute (a one-byte exchange over a socket pair), so their computes overlap as in barrier mode. "alone" and
"pair" runs alternate (``--repeats``) so both see the same machine load; each prints every process's median
compute time per step. Run under the shared lock, e.g.

    flock /tmp/bench.lock env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python bench/engine_pair.py
"""

from __future__ import annotations

import argparse
import os
import socket
import time

import numpy as np
from engine_step import WorkerStep
from threadpoolctl import threadpool_limits

ROWS = 6000  # each worker's share of the data (barrier mode's 12,000 rows on 2 workers)


def _loop(batch: int, steps: int, update: bool, seed: int, peer: socket.socket | None) -> float:
    """Median seconds of ``compute_gradient`` per step over the last 80% of ``steps``."""
    worker = WorkerStep(ROWS)
    rng = np.random.default_rng(seed)
    times = np.empty(steps)
    with threadpool_limits(limits=1):
        for s in range(steps):
            idx = np.sort(rng.choice(ROWS, batch, replace=False))
            t = time.perf_counter()
            worker.compute(idx, batch)
            times[s] = time.perf_counter() - t
            if peer is not None:
                peer.sendall(b"x")
                peer.recv(1)
            if update:
                worker.update(batch)
    return float(np.median(times[steps // 5:]))


def _pair(batch: int, steps: int, update: bool) -> tuple[float, float]:
    a, b = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the second worker: reports its median over the socket pair, then leaves without cleanup
        a.close()
        med = _loop(batch, steps, update, 2, b)
        b.sendall(f"{med:.9f}\n".encode())
        os._exit(0)
    b.close()
    med = _loop(batch, steps, update, 1, a)
    other = float(a.makefile().readline())
    os.waitpid(pid, 0)
    a.close()
    return med, other


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32, help="rows per worker per step")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3, help="alone/pair alternations")
    ap.add_argument("--no-update", action="store_true", help="compute only (no Adam update between steps)")
    a = ap.parse_args()
    update = not a.no_update
    print(f"# LeNet-5, {a.batch} rows per step, {a.steps} steps, update between steps: {update}; one BLAS thread "
          f"per process; load average {os.getloadavg()} on {os.cpu_count()} cores (noisy shared machine)")
    alone, pair = [], []
    for r in range(a.repeats):
        alone.append(_loop(a.batch, a.steps, update, 1, None))
        pair.extend(_pair(a.batch, a.steps, update))
        print(f"round {r + 1}: alone {alone[-1] * 1e3:.3f} ms; pair {pair[-2] * 1e3:.3f} / {pair[-1] * 1e3:.3f} ms "
              "compute per step", flush=True)
    ma, mp = float(np.median(alone)), float(np.median(pair))
    print(f"median compute per step: alone {ma * 1e3:.3f} ms, pair {mp * 1e3:.3f} ms = {mp / ma:.2f}x alone")
    print(f"# load average after {os.getloadavg()}")


if __name__ == "__main__":
    main()
