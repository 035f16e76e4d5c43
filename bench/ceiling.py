"""The machine's ceiling for 2 workers vs 1: the same per-worker work in independent processes, with no communication.

A barrier worker's step is a forward/backward over its share of the global batch plus the update of its full
replica. Here one process does that at the whole batch (``--batch``, 64 by default) and then two processes at the
same moment do it at half the batch each, with no Spark, no sockets and no waiting on each other: their summed
samples/s over the one's is what 2 workers vs 1 could reach on this machine at best. Ours (LeNet-5, float32 forward
and backward, the barrier's float64 Adam state) and PyTorch's (LeNet-5, ``torch.optim.Adam``; when torch is
installed) alternate in rounds (``--rounds``), one BLAS thread per process. Run under the shared lock, e.g.

    flock /tmp/bench.lock env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python bench/ceiling.py

``bench/speedup.py`` prints the same figure next to its 2-vs-1 speedup, from the same run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROWS = 6000  # rows a worker draws its batches from


def _ours(batch: int) -> Callable[[int], None]:
    from engine_step import WorkerStep

    worker = WorkerStep(ROWS)

    def step(i: int) -> None:
        lo = (i * batch) % (ROWS - batch)
        worker.compute(slice(lo, lo + batch), batch)
        worker.update(batch)

    return step


def _torch(batch: int) -> Callable[[int], None]:
    import torch
    from engine_step import _fashion_like
    from speedup import _torch_lenet

    torch.set_num_threads(1)
    torch.manual_seed(0)
    x, y = _fashion_like(ROWS, 0)
    xt, yt = torch.from_numpy(x).view(-1, 1, 28, 28), torch.from_numpy(y.astype(np.int64))
    model = _torch_lenet()
    opt = torch.optim.Adam(model.parameters(), 1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step(i: int) -> None:
        lo = (i * batch) % (ROWS - batch)
        opt.zero_grad()
        loss_fn(model(xt[lo:lo + batch]), yt[lo:lo + batch]).backward()
        opt.step()

    return step


def worker(engine: str, batch: int, seconds: float) -> None:
    """One process: warm up, say "ready", wait for the go line on stdin, step for ``seconds``, print samples/s."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        step = (_ours if engine == "ours" else _torch)(batch)
        for i in range(20):
            step(i)
        print("ready", flush=True)
        sys.stdin.readline()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            step(n)
            n += 1
        print(f"{n * batch / (time.perf_counter() - t0):.3f}", flush=True)


def together(engine: str, batches: list[int], seconds: float) -> list[float]:
    """samples/s of one process per entry of ``batches``, all stepping at the same time."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", engine, str(b), str(seconds)], env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for b in batches]
    try:
        for p in procs:
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError(f"a {engine} worker failed to start (exit code {p.wait()})")
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        return [float(p.stdout.readline()) for p in procs]
    finally:  # after their figure the workers exit; on an error they are stopped
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def ceiling(batch: int = 64, rounds: int = 3, seconds: float = 3.0, verbose: bool = True) -> dict[str, float]:
    """Median over ``rounds`` of (two processes at ``batch // 2`` each, summed samples/s) / (one at ``batch``),
    per engine (ours; torch when installed)."""
    engines = ["ours"]
    try:
        import torch  # noqa: F401

        engines.append("torch")
    except ImportError:
        pass
    ratios: dict[str, list[float]] = {e: [] for e in engines}
    for r in range(rounds):
        for e in engines:
            (one,) = together(e, [batch], seconds)
            two = together(e, [batch // 2, batch - batch // 2], seconds)
            ratios[e].append(sum(two) / one)
            if verbose:
                print(f"  round {r + 1} {e:>5}: 1 process at {batch} rows {one:,.0f} samples/s; 2 processes at "
                      f"{batch // 2} rows {two[0]:,.0f} + {two[1]:,.0f} = {sum(two):,.0f}; ratio {ratios[e][-1]:.2f}",
                      flush=True)
    return {e: float(np.median(v)) for e, v in ratios.items()}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64, help="global batch: one process's rows per step")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=3.0, help="stepping time of each measurement")
    a = ap.parse_args()
    print(f"# LeNet-5 step (forward/backward + Adam), one BLAS thread per process; load average {os.getloadavg()} "
          f"on {os.cpu_count()} cores (noisy shared machine)")
    med = ceiling(a.batch, a.rounds, a.seconds)
    for e, v in med.items():
        print(f"{e}: 2 independent processes vs 1, median of {a.rounds}: {v:.2f}x")
    print(f"# load average after {os.getloadavg()}")


if __name__ == "__main__":
    main()
