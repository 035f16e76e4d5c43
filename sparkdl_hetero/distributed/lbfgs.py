"""L-BFGS with Spark's (Breeze's) stopping rules, shared by the treeAggregate and barrier modes.

scipy's L-BFGS-B (10 corrections, its own tolerances off) runs at most ``max_iter`` iterations and stops when
:func:`convergence` says so: the loss improved by at most ``tol * |initial loss|`` over the last
:data:`FVAL_MEMORY` iterations, or ``||gradient|| <= max(tol * loss, 1e-8)``. The history holds the initial
loss and the loss after each iteration, as Spark's ``summary.objectiveHistory``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

FVAL_MEMORY = 20  # Breeze's default history length for the function-value convergence test


def convergence(history: list[float], gradient: np.ndarray, tol: float) -> str:
    """Why L-BFGS should stop after the iteration whose loss is ``history[-1]`` (``history[0]``: the initial
    loss) with that iteration's ``gradient``; ``""``: continue."""
    f = history[-1]
    recent = history[1:][-FVAL_MEMORY:]
    if len(recent) >= FVAL_MEMORY and abs(f - max(recent)) <= tol * abs(history[0]):
        return "function values converged"
    if float(np.linalg.norm(gradient)) <= max(tol * f, 1e-8):
        return "gradient converged"
    return ""


def minimize_lbfgs(fun: Callable[[np.ndarray], tuple[float, np.ndarray]], x0: np.ndarray, max_iter: int,
                   tol: float, history: list[float],
                   on_iteration: Callable[[np.ndarray, float], None]) -> tuple[Any, str]:
    """Minimize ``fun(w) -> (loss, gradient)`` from ``x0`` for at most ``max_iter`` iterations.

    ``history`` (resumed fits pass theirs) gets the first evaluation's loss when empty, then the loss after
    each iteration; ``on_iteration(x, loss)`` runs after each iteration's append, before the convergence test.
    Returns scipy's result and why it stopped (``"max iterations"``, a :func:`convergence` reason, or
    ``"l-bfgs stopped: <scipy's message>"``).
    """
    from scipy.optimize import minimize

    last: dict[str, Any] = {}
    stop = ""
    done = 0

    def evaluate(w: np.ndarray) -> tuple[float, np.ndarray]:
        f, g = fun(w)
        last.update(x=np.array(w, dtype=np.float64), f=f, g=g)
        if not history:
            history.append(f)
        return f, g

    def callback(intermediate_result: Any) -> None:
        nonlocal stop, done
        done += 1
        x = np.array(intermediate_result.x, dtype=np.float64)
        if np.array_equal(last.get("x"), x):
            f, g = float(intermediate_result.fun), last["g"]
        else:  # scipy's last evaluation was not at the accepted point
            f, g = evaluate(x)
        history.append(f)
        on_iteration(x, f)
        stop = convergence(history, g, tol)
        if stop:
            raise StopIteration

    res = minimize(evaluate, x0, jac=True, method="L-BFGS-B", callback=callback,
                   options={"maxiter": max_iter, "maxcor": 10, "ftol": 0.0, "gtol": 0.0,
                            "maxfun": max(15000, 50 * max_iter)})
    if not stop:
        stop = "max iterations" if done >= max_iter else f"l-bfgs stopped: {res.message}"
    return res, stop
