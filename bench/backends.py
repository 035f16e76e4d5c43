"""Per-op and per-training-step times of every available backend on the same shapes (LeNet-5 layers, MLP
[784,100,10]; batch 64 and 128), and our OpenCL GEMM against calling CLBlast directly on the same buffers.

    flock /tmp/bench.lock .venv/bin/python bench/backends.py [--batches 64 128] [--rounds 5]

Times are the best of several rounds (each round: enough calls to take ~0.2 s, the device queue drained at its
end): the minimum is the estimate least disturbed by other processes on a shared machine. Ours and CLBlast's
GEMM are timed in alternating rounds. Expect noise of 10-30% anyway when the machine is busy.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np

from sparkdl_hetero.backends import Backend, BackendUnavailable, NumpyBackend
from sparkdl_hetero.nn import FeedForwardModel, FeedForwardTopology

LENET = "conv(6,5,pad=2)-relu-maxpool(2)-conv(16,5)-relu-maxpool(2)-flatten-affine(120)-relu-affine(84)-relu-affine(10)"


def available_backends() -> list[tuple[Backend, Callable[[], None]]]:
    """(backend, sync) for every backend that runs here; sync waits for queued device work."""
    out: list[tuple[Backend, Callable[[], None]]] = [(NumpyBackend(), lambda: None)]
    try:
        from sparkdl_hetero.backends.opencl_backend import OpenCLBackend

        cl_be = OpenCLBackend()
        out.append((cl_be, cl_be.queue.finish))
    except (ImportError, BackendUnavailable) as exc:
        print(f"# opencl skipped: {exc}")
    try:
        from sparkdl_hetero.backends.cupy_backend import CupyBackend

        cp_be = CupyBackend()
        out.append((cp_be, cp_be.xp.cuda.Device(cp_be.device).synchronize))
    except BackendUnavailable as exc:
        print(f"# cupy skipped: {exc.reason}")
    return out


def timeit_many(fns: list[Callable[[], object]], sync: Callable[[], None], rounds: int,
                budget: float = 0.2) -> list[float]:
    """Best seconds per call of each function, the functions timed in alternating rounds."""
    reps = []
    for fn in fns:
        fn()
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        reps.append(max(1, int(budget / max(time.perf_counter() - t0, 1e-6))))
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            for _ in range(reps[i]):
                fn()
            sync()
            best[i] = min(best[i], (time.perf_counter() - t0) / reps[i])
    return best


def timeit(fn: Callable[[], object], sync: Callable[[], None], rounds: int, budget: float = 0.2) -> float:
    """Best seconds per call."""
    return timeit_many([fn], sync, rounds, budget)[0]


def op_cases(batch: int, rng: np.random.Generator) -> list[tuple[str, Callable[[Backend], Callable[[], object]]]]:
    """(name, make(backend) -> the call to time) for the LeNet/MLP layer shapes at ``batch``."""
    f32 = np.float32

    def arr(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(f32)

    x1, x2 = arr(batch, 28, 28, 1), arr(batch, 14, 14, 6)
    c1, c2 = arr(batch * 784, 25), arr(batch * 100, 150)
    w1, w2 = arr(25, 6), arr(150, 16)
    a1, p1 = arr(batch, 28, 28, 6), arr(batch, 14, 14, 6)
    mlp_x, mlp_w, fc_x, fc_w = arr(batch, 784), arr(784, 100), arr(batch, 400), arr(400, 120)
    logits, target = arr(batch, 10), np.eye(10, dtype=f32)[rng.integers(0, 10, batch)]

    def case(fn: Callable[..., object], *hosts: np.ndarray) -> Callable[[Backend], Callable[[], object]]:
        def make(be: Backend) -> Callable[[], object]:
            dev = [be.asarray(h) for h in hosts]
            return lambda: fn(be, *dev)
        return make

    def maxpool_bwd(be: Backend, a: object, g: object) -> object:
        _, idx = be.maxpool(a, 2, 2)
        return lambda: be.maxpool_backward(g, idx, a1.shape, 2, 2)

    def make_maxpool_bwd(be: Backend) -> Callable[[], object]:
        return maxpool_bwd(be, be.asarray(a1), be.asarray(p1))

    return [
        ("im2col conv1 (k5 pad2, 28x28x1)", case(lambda be, x: be.im2col(x, 5, 5, 1, 2), x1)),
        ("im2col conv2 (k5, 14x14x6)", case(lambda be, x: be.im2col(x, 5, 5, 1, 0), x2)),
        ("col2im conv2", case(lambda be, c: be.col2im(c, x2.shape, 5, 5, 1, 0), c2)),
        (f"gemm conv1 {batch * 784}x25x6", case(lambda be, a, b: be.gemm(a, b), c1, w1)),
        (f"gemm conv2 {batch * 100}x150x16", case(lambda be, a, b: be.gemm(a, b), c2, w2)),
        (f"gemm conv2 dW 150x{batch * 100}x16 (a^T)",
         case(lambda be, a, b: be.gemm(a, b, trans_a=True), c2, arr(batch * 100, 16))),
        (f"gemm fc {batch}x400x120", case(lambda be, a, b: be.gemm(a, b), fc_x, fc_w)),
        (f"gemm mlp {batch}x784x100", case(lambda be, a, b: be.gemm(a, b), mlp_x, mlp_w)),
        ("relu (b,28,28,6)", case(lambda be, a: be.activation("relu", a), a1)),
        ("maxpool 2x2 (b,28,28,6)", case(lambda be, a: be.maxpool(a, 2, 2), a1)),
        ("maxpool backward", make_maxpool_bwd),
        ("col_sum conv1 bias", case(lambda be, a, o: be.col_sum(a, o, beta=1.0), arr(batch * 784, 6), arr(6))),
        ("softmax_xent (b,10)", case(lambda be, z, t: be.softmax_xent(z, t, 1.0 / batch), logits, target)),
    ]


def bench_ops(backends: list, batches: list[int], rounds: int) -> None:
    names = [be.name for be, _ in backends]
    print("\n## per-op times (ms); ratio = numpy / backend (> 1: faster than NumPy)")
    print(f"{'op':44s}" + "".join(f"{n:>12s}" for n in names) + "".join(f"{'x ' + n:>12s}" for n in names[1:]))
    for batch in batches:
        print(f"# batch {batch}")
        for name, make in op_cases(batch, np.random.default_rng(batch)):
            t = [timeit(make(be), sync, rounds) for be, sync in backends]
            print(f"{name:44s}" + "".join(f"{v * 1e3:12.3f}" for v in t)
                  + "".join(f"{t[0] / v:12.2f}" for v in t[1:]))


def bench_steps(backends: list, batches: list[int], rounds: int) -> None:
    """One training step = compute_gradient (upload the batch, forward, loss, backward; the gradient stays on
    the device) + fetching the flat gradient to the host, as a distributed step does."""
    names = [be.name for be, _ in backends]
    print("\n## training step: compute_gradient + gradient to host (ms, samples/s)")
    print(f"{'model':24s}{'batch':>6s}" + "".join(f"{n:>12s}{'samples/s':>12s}" for n in names))
    rng = np.random.default_rng(0)
    for label, topo in [("MLP [784,100,10]", FeedForwardTopology.multilayer_perceptron([784, 100, 10])),
                        ("LeNet-5", FeedForwardTopology.from_spec(LENET, (1, 28, 28)))]:
        for batch in batches:
            x, y = rng.random((batch, 784)).astype(np.float32), rng.integers(0, 10, batch)
            row = f"{label:24s}{batch:6d}"
            for be, sync in backends:
                m = FeedForwardModel(topo, seed=0, backend=be)

                def step(m: FeedForwardModel = m, x: np.ndarray = x, y: np.ndarray = y) -> None:
                    m.compute_gradient(x, y)
                    m.get_gradient()

                t = timeit(step, sync, rounds)
                row += f"{t * 1e3:12.2f}{batch / t:12.0f}"
            print(row)


def bench_clblast(rounds: int) -> None:
    """Our OpenCL gemm vs pyclblast.gemm on the same device buffers (goal: ours >= 0.9x CLBlast's speed)."""
    try:
        import pyclblast

        from sparkdl_hetero.backends.opencl_backend import OpenCLBackend

        be = OpenCLBackend()
    except (ImportError, BackendUnavailable) as exc:
        print(f"\n# CLBlast comparison skipped: {exc}")
        return
    print("\n## OpenCL GEMM: ours (OpenCLBackend.gemm) vs CLBlast called directly, same buffers; "
          "ratio = CLBlast time / ours (goal >= 0.9)")
    print(f"{'m x k x n':30s}{'ours ms':>10s}{'GFLOP/s':>10s}{'clblast ms':>12s}{'GFLOP/s':>10s}{'ratio':>8s}")
    rng = np.random.default_rng(1)
    shapes = [(512, 512, 512, False, False), (64 * 784, 25, 6, False, False), (150, 64 * 100, 16, True, False),
              (128, 784, 100, False, False), (784, 128, 100, True, False), (128, 100, 784, False, True)]
    for m, k, n, ta, tb in shapes:
        a = be.asarray(rng.standard_normal((k, m) if ta else (m, k)).astype(np.float32))
        b = be.asarray(rng.standard_normal((n, k) if tb else (k, n)).astype(np.float32))
        c = be.zeros((m, n), np.float32)
        def direct(a=a, b=b, c=c, m=m, n=n, k=k, ta=ta, tb=tb) -> None:
            pyclblast.gemm(be.queue, m, n, k, a, b, c, a_ld=a.shape[1], b_ld=b.shape[1], c_ld=n, a_transp=ta,
                           b_transp=tb)

        ours, peer = timeit_many([lambda a=a, b=b, c=c, ta=ta, tb=tb: be.gemm(a, b, c, trans_a=ta, trans_b=tb),
                                  direct], be.queue.finish, rounds)
        flops = 2.0 * m * n * k
        label = f"{m}x{k}x{n}" + (" a^T" if ta else "") + (" b^T" if tb else "")
        print(f"{label:30s}{ours * 1e3:10.3f}{flops / ours / 1e9:10.2f}{peer * 1e3:12.3f}{flops / peer / 1e9:10.2f}"
              f"{peer / ours:8.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--skip-ops", action="store_true", help="only the training steps and the CLBlast comparison")
    ap.add_argument("--only-gemm", action="store_true", help="only the CLBlast comparison")
    args = ap.parse_args()
    if args.only_gemm:
        bench_clblast(args.rounds)
        return
    backends = available_backends()
    print("# backends: " + "; ".join(be.describe() for be, _ in backends))
    from threadpoolctl import threadpool_info

    print("# BLAS threads: " + ", ".join(f"{i['internal_api']}={i['num_threads']}" for i in threadpool_info()))
    if not args.skip_ops:
        bench_ops(backends, args.batches, args.rounds)
    bench_steps(backends, args.batches, args.rounds)
    bench_clblast(args.rounds)


if __name__ == "__main__":
    main()
