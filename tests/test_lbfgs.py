"""The shared L-BFGS solver (Breeze's algorithm as Spark runs it) on functions with known minima."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import rosen, rosen_der

from sparkdl_hetero.nn.lbfgs import MEMORY, _direction, convergence, minimize_lbfgs


class Counted:
    """``(f, g)`` of a function, counting evaluations."""

    def __init__(self, f, g) -> None:  # noqa: ANN001
        self.f, self.g, self.calls = f, g, 0

    def __call__(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        self.calls += 1
        return float(self.f(x)), self.g(x)


def test_rosenbrock_reaches_its_minimum_with_a_decreasing_history() -> None:
    fun = Counted(rosen, rosen_der)
    seen: list[tuple[np.ndarray, float]] = []
    history: list[float] = []
    x, f, stop = minimize_lbfgs(fun, np.array([-1.2, 1.0]), 200, 1e-12, history, lambda x, f: seen.append((x, f)))
    np.testing.assert_allclose(x, [1.0, 1.0], atol=1e-5)
    assert f < 1e-10 and stop == "gradient converged"
    assert len(history) == len(seen) + 1 and history[0] == pytest.approx(rosen([-1.2, 1.0]))
    assert all(b < a for a, b in zip(history, history[1:], strict=False))  # strong Wolfe: sufficient decrease
    assert [s[1] for s in seen] == history[1:] and seen[-1][0] is x
    assert fun.calls < 2 * len(seen)  # one evaluation per trial step, mostly one trial per iteration


def test_ill_conditioned_quadratic_one_evaluation_per_iteration_and_max_iter() -> None:
    rng = np.random.default_rng(0)
    d = np.logspace(0, 2, 500)  # condition number 100
    c = rng.normal(size=500)
    fun = Counted(lambda x: 0.5 * (x - c) @ (d * (x - c)), lambda x: d * (x - c))
    history: list[float] = []
    x, f, stop = minimize_lbfgs(fun, np.zeros(500), 300, 0.0, history, lambda x, f: None)
    np.testing.assert_allclose(x, c, atol=1e-6)
    assert stop == "gradient converged"  # tol 0: ||g|| <= 1e-8
    assert fun.calls <= 1.2 * (len(history) - 1) + 2
    history = []
    _, _, stop = minimize_lbfgs(fun, np.zeros(500), 7, 0.0, history, lambda x, f: None)
    assert stop == "max iterations" and len(history) == 8


def test_direction_is_the_inverse_hessian_of_a_quadratic_once_the_memory_spans_it() -> None:
    """With n A-conjugate pairs (s, y = A s) the BFGS recursion is exact: it returns -A^-1 g."""
    rng = np.random.default_rng(1)
    n = 6
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    a = q @ np.diag(np.linspace(1, 5, n)) @ q.T
    from collections import deque

    pairs: deque = deque(maxlen=MEMORY)
    for s in q.T:  # A's eigenvectors: A-conjugate
        y = a @ s
        pairs.append((s, y, 1.0 / (s @ y)))
    g = rng.normal(size=n)
    np.testing.assert_allclose(_direction(g, pairs), -np.linalg.solve(a, g), rtol=1e-8)
    np.testing.assert_array_equal(_direction(g, deque()), -g)


def test_a_wrong_gradient_stops_with_a_line_search_message_not_a_loop() -> None:
    fun = Counted(lambda x: float(x @ x), lambda x: -2 * x)  # gradient of the wrong sign: no descent exists
    history: list[float] = []
    x0 = np.ones(3)
    x, f, stop = minimize_lbfgs(fun, x0, 50, 1e-6, history, lambda x, f: None)
    assert stop.startswith("l-bfgs stopped: no step along the search direction satisfies the strong Wolfe")
    np.testing.assert_array_equal(x, x0)
    assert f == 3.0 and history == [3.0] and fun.calls < 40


def test_resumed_history_is_extended_and_function_value_convergence() -> None:
    history = [5.0, 4.0]  # a resumed fit: its history goes on
    fun = Counted(lambda x: float(x @ x) + 1.0, lambda x: 2 * x)
    minimize_lbfgs(fun, np.ones(2), 3, 1e-9, history, lambda x, f: None)
    assert history[:2] == [5.0, 4.0] and len(history) >= 3
    flat = [10.0] + [1.0] * 20
    assert convergence(flat, np.ones(2), 1e-6) == "function values converged"
    assert convergence(flat[:20], np.ones(2), 1e-6) == ""
