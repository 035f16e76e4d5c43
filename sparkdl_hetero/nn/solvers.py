"""The solvers of every training mode: gd, l-bfgs and the mini-batch solvers (sgd, momentum, adam). No Spark here.

A mode (treeAggregate, barrier, the in-process trainer) says only how rows are reached and how gradients are
summed, through one callback:

- full-batch solvers (:func:`gd`, :func:`lbfgs`): ``evaluate(weights, iteration) -> (loss_sum, gradient_sum,
  count)`` over the rows of the evaluation -- ``iteration`` is the gd iteration whose row sample
  (``miniBatchFraction``) to use, ``None`` for every row (l-bfgs); a mode that does not sample ignores it;
- mini-batch solvers (:func:`minibatch`): ``step(weights, t) -> (loss_sum, gradient_sum, count)`` over global
  step ``t``'s mini-batch (the mode picks the rows of step ``t``: epoch ``t // steps_per_epoch``).

Sums, not means: the solver divides by the count (a mini-batch step folds ``1 / count`` into the updater's first
pass over the gradient instead of forming the mean). With per-row weights (``weightCol``) the sums are weighted
and the count is the sum of the weights (a float): the solver's mean is then the weighted mean, as Spark's
classifiers define it; a count of 0 (no rows, or only zero weights) updates nothing. ``gradient_sum`` may be any
float dtype and is not kept.

The solvers own the bookkeeping every mode shares, in a :class:`SolverState` the mode may checkpoint: iteration
and epoch counts, L2 (``regParam / 2 * ||w||^2`` on the loss, ``regParam * w`` on the gradient), the divergence
check (:class:`TrainingDivergedError`), stopping rules (gd: ``||w_i - w_(i-1)|| < tol * max(||w_i||, 1)``; l-bfgs:
:mod:`.lbfgs`; mini-batch: the epoch count), the learning-rate schedule, the history (gd: the loss before each
update; l-bfgs: the initial loss and the loss after each iteration; mini-batch: each epoch's mean loss, and a finer
``step_history``: the mean loss of every :data:`STEP_HISTORY_STEPS` steps) and the updater's state.
:class:`Hooks` let a mode add progress, checkpoints, fault injection, weight averaging and early stopping without
a copy of the loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .lbfgs import minimize_lbfgs
from .optim import Updater, learning_rate, make_updater

#: mini-batch solvers: steps per point of the finer training-loss history (loss curves with more than one point per
#: epoch; with syncEvery > 1 a step's loss is the worker's own)
STEP_HISTORY_STEPS = 10

Evaluate = Callable[[np.ndarray, "int | None"], tuple[float, np.ndarray, float]]
Step = Callable[[np.ndarray, int], tuple[float, np.ndarray, float]]


class TrainingDivergedError(FloatingPointError):
    """The loss became NaN or infinite (raised by every mode); ``weights`` are the last weights with a finite loss
    (``None`` before the first finite one, and in barrier mode, whose workers do not ship weights on failure)."""

    def __init__(self, message: str, weights: np.ndarray | None, iteration: int, history: list[float]) -> None:
        super().__init__(message)
        self.weights = weights
        self.iteration = iteration
        self.history = history


@dataclass
class SolverState:
    """What a solver carries from one iteration to the next, and what a checkpoint restores."""

    weights: np.ndarray  # updated in place by mini-batch steps; the hooks may replace it (weight averaging)
    iteration: int = 0  # gd / l-bfgs: iterations done; mini-batch solvers: global steps done
    history: list[float] = field(default_factory=list)
    updater_state: dict[str, np.ndarray] = field(default_factory=dict)  # refreshed before each checkpoint
    epoch_loss_sum: float = 0.0  # mini-batch solvers: the current epoch's sum of loss x samples so far
    epoch_count: float = 0.0  # ... and its samples (their weights' sum)
    step_history: list[list[float]] = field(default_factory=list)  # [global step, mean loss of the steps before]
    window_loss_sum: float = 0.0  # mini-batch solvers: the steps since the last step_history point
    window_count: float = 0.0

    def extra(self) -> dict[str, Any]:
        """The JSON-able values of this state (a checkpoint stores them next to the arrays)."""
        return {"epochLossSum": float(self.epoch_loss_sum), "epochCount": float(self.epoch_count),
                "stepHistory": self.step_history, "windowLossSum": float(self.window_loss_sum),
                "windowCount": float(self.window_count)}

    def load_extra(self, extra: dict[str, Any]) -> None:
        """Restore what :meth:`extra` saved."""
        self.epoch_loss_sum = float(extra.get("epochLossSum", 0.0))
        self.epoch_count = float(extra.get("epochCount", 0.0))
        self.step_history = [list(p) for p in extra.get("stepHistory", [])]
        self.window_loss_sum = float(extra.get("windowLossSum", 0.0))
        self.window_count = float(extra.get("windowCount", 0.0))


@dataclass
class Hooks:
    """What a mode adds to a solver's loop; every hook is optional.

    - ``iteration_start(iteration)``: before each gd iteration and mini-batch step, and after each l-bfgs
      iteration (fault injection);
    - ``iteration_end(state, loss, count)``: after each iteration / step, its loss (mini-batch: the step's mean
      loss) and samples (progress bars, timings, weight averaging, throughput measurements);
    - ``checkpoint_due(iteration) -> bool`` and ``checkpoint(state)``: whether to save after this iteration, and
      the save itself (``state.updater_state`` is refreshed first);
    - ``epoch_end(epoch, loss) -> str``: a reason to stop (early stopping), or ``""``; mini-batch solvers: after
      each epoch's history entry; full-batch solvers, whose iteration is a pass over every row: after each
      iteration (``epoch``: its 0-based index), once its checkpoint is written;
    - mini-batch only: ``epoch_loss(loss_sum, count) -> (loss_sum, count)`` the epoch's totals over every worker
      (when ``count`` is local).
    """

    iteration_start: Callable[[int], None] | None = None
    iteration_end: Callable[[SolverState, float, float], None] | None = None
    checkpoint_due: Callable[[int], bool] | None = None
    checkpoint: Callable[[SolverState], None] | None = None
    epoch_loss: Callable[[float, float], tuple[float, float]] | None = None
    epoch_end: Callable[[int, float], str] | None = None



@dataclass
class EarlyStopping:
    """Early stopping on the validation loss, one rule for every mode and solver: a validation point improves
    when its loss is below the best so far by more than ``tol``; after ``patience`` points in a row without an
    improvement training stops, and the best point's weights and model state are the ones to return."""

    best_loss: float = math.inf
    bad_points: int = 0  # validation points since the best one
    weights: np.ndarray | None = None  # the best point's (None: none seen by this process yet)
    state: np.ndarray | None = None

    def update(self, loss: float, config: Any, weights: np.ndarray, state: np.ndarray, unit: str) -> str:
        """Record a validation point (copies of ``weights`` and ``state`` when it is the best); returns the reason
        to stop after ``config.patience`` points without improvement (``unit`` names the points), else ``""``."""
        if loss < self.best_loss - config.tol:
            self.best_loss, self.bad_points = loss, 0
            self.weights, self.state = np.array(weights, dtype=np.float64), np.array(state)
            return ""
        self.bad_points += 1
        if self.bad_points >= config.patience:
            return f"early stopping: validation loss did not improve for {config.patience} {unit}"
        return ""

    def best(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The best point's (weights, state) when training went on past it; None when the last point is the best
        (or none was recorded)."""
        if self.bad_points > 0 and self.weights is not None and self.state is not None:
            return self.weights, self.state
        return None


def _reg(config: Any) -> float:
    return float(getattr(config, "regParam", 0.0))


def _divisor(count: float) -> float:
    """What sums are divided by: the count (a sample count or a sum of weights, possibly below 1); 1 when 0."""
    return count if count > 0 else 1.0


def mean_objective(loss_sum: float, gradient_sum: np.ndarray, count: float, weights: np.ndarray,
                   reg: float) -> tuple[float, np.ndarray]:
    """Mean loss + L2 and its gradient (float64, a new vector) from ``count`` samples' sums at ``weights``."""
    n = _divisor(count)
    g = gradient_sum.astype(np.float64)
    g /= n
    f = loss_sum / n
    if reg:
        g += reg * weights
        f += 0.5 * reg * float(weights @ weights)
    return f, g


def _step_objective(loss_sum: float, gradient_sum: np.ndarray, count: float, weights: np.ndarray,
                    reg: float) -> tuple[float, np.ndarray, float]:
    """(mean loss + L2, g, s), ``s * g`` being the mean gradient + L2: without L2 the sum itself with ``s = 1 / n``
    (the updater folds it into its first pass; no vector formed); with L2 the float64 mean gradient."""
    if reg:
        f, g = mean_objective(loss_sum, gradient_sum, count, weights, reg)
        return f, g, 1.0
    return loss_sum / _divisor(count), gradient_sum, 1.0 / _divisor(count)


def _diverged(config: Any, f: float, iteration: int, good: np.ndarray | None, history: list[float],
              keep_last_good: bool) -> TrainingDivergedError:
    message = (f"the loss became {f} at iteration {iteration} ({config.solver}, stepSize {config.stepSize}); "
               f"training stopped")
    if keep_last_good:
        message += ". The last weights with a finite loss are in this error's .weights"
    return TrainingDivergedError(message, None if good is None else good.copy(), iteration, list(history))


def _after(state: SolverState, hooks: Hooks, loss: float, count: float) -> str:
    """A full-batch iteration's end: its hook, a checkpoint when due (no updater state to save), then
    ``epoch_end``'s reason to stop, or ``""``."""
    if hooks.iteration_end is not None:
        hooks.iteration_end(state, loss, count)
    if hooks.checkpoint is not None and (hooks.checkpoint_due is None or hooks.checkpoint_due(state.iteration)):
        hooks.checkpoint(state)
    return hooks.epoch_end(state.iteration - 1, loss) if hooks.epoch_end is not None else ""


def gd(state: SolverState, config: Any, evaluate: Evaluate, hooks: Hooks | None = None, *,
       keep_last_good: bool = True) -> str:
    """Spark's ``GradientDescent`` as the MLP uses it: ``w -= lr * (mean gradient + regParam * w)`` for at most
    ``config.maxIter`` iterations; an iteration whose sample is empty is skipped (counted, no update). Returns why
    it stopped. ``keep_last_good``: a divergence error carries the weights of the last finite loss."""
    hooks = hooks or Hooks()
    updater = make_updater(config)
    reg = _reg(config)
    prev: np.ndarray | None = None
    while state.iteration < config.maxIter:
        i = state.iteration
        if hooks.iteration_start is not None:
            hooks.iteration_start(i)
        loss_sum, g_sum, n = evaluate(state.weights, i)
        if n == 0:  # Spark skips an iteration whose sample is empty
            state.iteration += 1
            continue
        f, g = mean_objective(loss_sum, g_sum, n, state.weights, reg)
        if not math.isfinite(f):
            raise _diverged(config, f, i + 1, prev, state.history, keep_last_good)
        prev = state.weights.copy()
        updater.step(state.weights, g, learning_rate(config, i, config.maxIter))
        state.iteration += 1
        state.history.append(f)
        reason = _after(state, hooks, f, n)
        if reason:
            return reason
        diff = float(np.linalg.norm(state.weights - prev))
        if i > 0 and diff < config.tol * max(float(np.linalg.norm(state.weights)), 1.0):
            return "weights converged"
    return "max iterations"


def lbfgs(state: SolverState, config: Any, evaluate: Evaluate, hooks: Hooks | None = None, *,
          keep_last_good: bool = True) -> str:
    """:func:`.lbfgs.minimize_lbfgs` on the full-batch mean loss + L2, resumed at ``state`` (its history and
    iteration count), for at most ``config.maxIter`` iterations in all. Returns why it stopped."""
    hooks = hooks or Hooks()
    reg = _reg(config)
    remaining = config.maxIter - state.iteration
    if remaining <= 0:
        return "max iterations"
    good = state.weights.copy() if keep_last_good else None

    def fun(w: np.ndarray) -> tuple[float, np.ndarray]:
        loss_sum, g_sum, n = evaluate(w, None)
        f, g = mean_objective(loss_sum, g_sum, n, w, reg)
        if not math.isfinite(f):
            raise _diverged(config, f, state.iteration + 1, good, state.history, keep_last_good)
        return f, g

    def on_iteration(x: np.ndarray, f: float) -> str:
        nonlocal good
        state.iteration += 1
        state.weights = x
        if keep_last_good:
            good = x.copy()
        reason = _after(state, hooks, f, 0)
        if hooks.iteration_start is not None and not reason:
            hooks.iteration_start(state.iteration)
        return reason

    if hooks.iteration_start is not None:
        hooks.iteration_start(state.iteration)
    x, _, stop = minimize_lbfgs(fun, state.weights.copy(), remaining, config.tol, state.history, on_iteration)
    state.weights = x
    return stop


def epochs_of(config: Any) -> int:
    """The mini-batch solvers' number of epochs: ``epochs``, or ``maxIter`` when it is 0."""
    return int(config.epochs or config.maxIter)


def minibatch(state: SolverState, config: Any, steps_per_epoch: int, step: Step, hooks: Hooks | None = None, *,
              epochs: int | None = None, updater: Updater | None = None, check_finite: bool = True,
              keep_last_good: bool = False) -> str:
    """``epochs`` (default :func:`epochs_of`) epochs of ``steps_per_epoch`` steps of ``config.solver``'s updater
    (``updater``: one made by the caller, e.g. with float64 state), each on ``step``'s sums; a step of no samples
    updates nothing. ``check_finite=False``: no divergence check (a step's loss is local to one worker, or the
    caller never checked). ``keep_last_good``: keep a copy of the weights before each step for the divergence
    error (one copy per step). Returns why it stopped."""
    hooks = hooks or Hooks()
    epochs = epochs_of(config) if epochs is None else int(epochs)
    total = epochs * steps_per_epoch
    if updater is None:
        updater = make_updater(config)
    if state.updater_state:
        updater.load_state_dict(state.updater_state)
    reg = _reg(config)
    prev = state.weights.copy() if keep_last_good else None
    stop = f"{epochs} epochs"
    while state.iteration < total:
        t = state.iteration
        if hooks.iteration_start is not None:
            hooks.iteration_start(t)
        w = state.weights
        loss_sum, g_sum, n = step(w, t)
        f = 0.0
        if n:
            f, g, scale = _step_objective(loss_sum, g_sum, n, w, reg)
            if check_finite and not math.isfinite(f):
                raise _diverged(config, f, t + 1, prev, state.history, keep_last_good)
            if prev is not None:
                prev[:] = w
            updater.step(w, g, learning_rate(config, t, total), scale)
            state.epoch_loss_sum += f * n
            state.epoch_count += n
            state.window_loss_sum += f * n
            state.window_count += n
        state.iteration += 1
        if state.iteration % STEP_HISTORY_STEPS == 0 and state.window_count > 0:
            state.step_history.append([state.iteration, state.window_loss_sum / state.window_count])
            state.window_loss_sum, state.window_count = 0.0, 0.0
        if hooks.iteration_end is not None:
            hooks.iteration_end(state, f, n)
        if state.iteration % steps_per_epoch == 0:
            loss_sum, count = state.epoch_loss_sum, state.epoch_count
            if hooks.epoch_loss is not None:
                loss_sum, count = hooks.epoch_loss(loss_sum, count)
            state.history.append(loss_sum / _divisor(count))
            state.epoch_loss_sum, state.epoch_count = 0.0, 0.0
            reason = hooks.epoch_end(state.iteration // steps_per_epoch - 1, state.history[-1]) \
                if hooks.epoch_end is not None else ""
            if reason:
                stop = reason
                break
        if hooks.checkpoint is not None and (hooks.checkpoint_due is None or hooks.checkpoint_due(state.iteration)):
            state.updater_state = updater.state_dict()
            hooks.checkpoint(state)
    state.updater_state = updater.state_dict()
    return stop


__all__ = ["STEP_HISTORY_STEPS", "EarlyStopping", "Evaluate", "Hooks", "SolverState", "Step", "TrainingDivergedError",
           "epochs_of", "gd", "lbfgs", "mean_objective", "minibatch"]
