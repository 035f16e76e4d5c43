"""Updaters over flat host parameter vectors, and learning-rate schedules.

Conventions follow PyTorch's ``torch.optim`` so runs can be compared one for one:

- ``gd`` / ``sgd``: ``w -= lr * g``;
- ``momentum``: ``v = mu * v + g``; classical ``w -= lr * v``, Nesterov ``w -= lr * (g + mu * v)``;
- ``adam``: ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g^2``,
  ``w -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)``.

State (moments, velocity) and the arithmetic of a step are in the *gradient's* dtype unless the updater is made
with a ``state_dtype``, applied in place to the weights in theirs: float32 gradients update float64 master weights
with float32 moments (as PyTorch keeps the state of a float32 model), half the memory traffic of a float64 step;
every pass writes into buffers allocated once. ``step(..., scale=s)`` takes ``s * grad`` as the gradient (e.g. a
gradient *sum* with ``s = 1 / count``): the factor rides in the constants of the first pass over the gradient
instead of costing passes of its own. L2 regularization (``regParam``) is not applied here: the trainer adds
``regParam * w`` to the gradient, as Spark does. The hyper-parameters come from a :class:`~.config.TrainConfig`,
which checked them when it was built.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from .config import TrainConfig

UPDATER_SOLVERS = ("gd", "sgd", "momentum", "adam")


class Updater(ABC):
    """Applies one optimizer step in place to a flat host vector; its state survives a checkpoint."""

    def __init__(self, state_dtype: Any = None) -> None:
        self.steps = 0
        self.state_dtype = None if state_dtype is None else np.dtype(state_dtype)
        self._scratch: np.ndarray | None = None  # reused for the temporaries of every step

    def step(self, weights: np.ndarray, grad: np.ndarray, lr: float, scale: float = 1.0) -> None:
        """``weights`` <- one update with gradient ``scale * grad`` (same shape) and learning rate ``lr``, in
        place."""
        if weights.shape != grad.shape or weights.ndim != 1:
            raise ValueError(f"weights and grad must be vectors of the same length, got {weights.shape} and "
                             f"{grad.shape}")
        self.steps += 1
        t = self.state_dtype or grad.dtype
        tmp = self._scratch = _reuse(self._scratch, grad.shape, t)
        self._step(weights, grad, t.type(lr), t.type(scale), tmp)

    @abstractmethod
    def _step(self, w: np.ndarray, g: np.ndarray, lr: np.floating, scale: np.floating, tmp: np.ndarray) -> None:
        """One step with the gradient ``scale * g``; ``lr``, ``scale`` and the scratch vector ``tmp`` have the
        state's dtype."""

    def _buffers(self) -> dict[str, np.ndarray | None]:
        return {}

    def state_dict(self) -> dict[str, np.ndarray]:
        """The state as arrays (``.npz``-able): the step count and every moment buffer (copies)."""
        d = {"steps": np.asarray(self.steps, dtype=np.int64)}
        d.update({k: v.copy() for k, v in self._buffers().items() if v is not None})
        return d

    def load_state_dict(self, d: dict[str, np.ndarray]) -> None:
        """Restore a :meth:`state_dict`; continuing gives the same steps as the updater that saved it."""
        names = set(self._buffers())
        unknown = set(d) - names - {"steps"}
        if "steps" not in d or unknown:
            raise ValueError(f"{type(self).__name__} state must hold 'steps' and optionally "
                             f"{sorted(names)}, got keys {sorted(d)}")
        self.steps = int(np.asarray(d["steps"]))
        for k in names:
            setattr(self, k, np.array(d[k], copy=True) if k in d else None)

    @staticmethod
    def _like(buf: np.ndarray | None, tmp: np.ndarray, name: str) -> np.ndarray:
        """``buf`` as a state buffer shaped and typed like the scratch vector ``tmp``: zeros when absent."""
        if buf is None:
            return np.zeros_like(tmp)
        if buf.shape != tmp.shape:
            raise ValueError(f"updater state {name!r} has shape {buf.shape} but the weights have {tmp.shape}")
        return buf if buf.dtype == tmp.dtype else buf.astype(tmp.dtype)


class SGD(Updater):
    """Plain (stochastic) gradient descent."""

    def _step(self, w: np.ndarray, g: np.ndarray, lr: np.floating, scale: np.floating, tmp: np.ndarray) -> None:
        np.multiply(g, lr * scale, out=tmp, dtype=tmp.dtype)
        w -= tmp


class Momentum(Updater):
    """Heavy-ball momentum, classical or Nesterov (PyTorch's formulation, dampening 0)."""

    def __init__(self, momentum: float, nesterov: bool, state_dtype: Any = None) -> None:
        super().__init__(state_dtype)
        self.momentum, self.nesterov = momentum, nesterov
        self.velocity: np.ndarray | None = None

    def _buffers(self) -> dict[str, np.ndarray | None]:
        return {"velocity": self.velocity}

    def _step(self, w: np.ndarray, g: np.ndarray, lr: np.floating, scale: np.floating, tmp: np.ndarray) -> None:
        v = self.velocity = self._like(self.velocity, tmp, "velocity")
        mu = tmp.dtype.type(self.momentum)
        v *= mu
        np.multiply(g, scale, out=tmp, dtype=tmp.dtype)  # the gradient, in the state's dtype
        v += tmp
        if self.nesterov:  # lr (g + mu v) = lr g + (lr mu) v
            tmp *= lr
            w -= tmp
            np.multiply(v, lr * mu, out=tmp)
        else:
            np.multiply(v, lr, out=tmp)
        w -= tmp


class Adam(Updater):
    """Adam with bias correction (Kingma & Ba 2015)."""

    def __init__(self, beta1: float, beta2: float, epsilon: float, state_dtype: Any = None) -> None:
        super().__init__(state_dtype)
        self.beta1, self.beta2, self.epsilon = beta1, beta2, epsilon
        self.m: np.ndarray | None = None
        self.v: np.ndarray | None = None
        self._cast: np.ndarray | None = None  # the gradient in the state's dtype, when it differs

    def _buffers(self) -> dict[str, np.ndarray | None]:
        return {"m": self.m, "v": self.v}

    def _step(self, w: np.ndarray, g: np.ndarray, lr: np.floating, scale: np.floating, tmp: np.ndarray) -> None:
        m = self.m = self._like(self.m, tmp, "m")
        v = self.v = self._like(self.v, tmp, "v")
        t = tmp.dtype.type
        if g.dtype != tmp.dtype:  # one cast pass: cheaper than two mixed-type passes
            self._cast = _reuse(self._cast, g.shape, tmp.dtype)
            np.copyto(self._cast, g, casting="same_kind")
            g = self._cast
        m *= t(self.beta1)
        np.multiply(g, t(1.0 - self.beta1) * scale, out=tmp)
        m += tmp
        v *= t(self.beta2)
        np.multiply(g, g, out=tmp)
        tmp *= t(1.0 - self.beta2) * scale * scale
        v += tmp
        c1 = 1.0 - self.beta1 ** self.steps
        s2 = math.sqrt(1.0 - self.beta2 ** self.steps)
        # lr (m / c1) / (sqrt(v) / s2 + eps) == (lr s2 / c1) m / (sqrt(v) + eps s2): one pass fewer
        np.sqrt(v, out=tmp)
        tmp += t(self.epsilon * s2)
        np.divide(m, tmp, out=tmp)
        tmp *= t(float(lr) * s2 / c1)
        w -= tmp


def _reuse(buf: np.ndarray | None, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """``buf`` when it has this shape and dtype, else a new (uninitialized) vector that has."""
    return buf if buf is not None and buf.shape == shape and buf.dtype == dtype else np.empty(shape, dtype)


def make_updater(cfg: TrainConfig, state_dtype: Any = None) -> Updater:
    """The updater for ``cfg.solver`` (gd, sgd, momentum, adam); its state and arithmetic in ``state_dtype``
    (default: each step's gradient dtype)."""
    if cfg.solver in ("gd", "sgd"):
        return SGD(state_dtype)
    if cfg.solver == "momentum":
        return Momentum(float(cfg.momentum), bool(cfg.nesterov), state_dtype)
    if cfg.solver == "adam":
        return Adam(float(cfg.beta1), float(cfg.beta2), float(cfg.epsilon), state_dtype)
    raise ValueError(f"solver {cfg.solver!r} has no step updater; expected one of {', '.join(UPDATER_SOLVERS)} "
                     f"(l-bfgs is a full-batch solver handled by the trainer)")


def learning_rate(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """The learning rate at 0-based ``step`` of ``total_steps`` under ``cfg.lrSchedule``.

    ``constant``: ``stepSize``; ``step``: ``stepSize * lrDecay ** (step // lrDecaySteps)``;
    ``cosine``: ``stepSize * (1 + cos(pi * step / total_steps)) / 2`` (reaches 0 at ``total_steps``).
    """
    base = float(cfg.stepSize)
    if cfg.lrSchedule == "step":
        return base * float(cfg.lrDecay) ** (step // cfg.lrDecaySteps)
    if cfg.lrSchedule == "cosine":
        if total_steps < 1:
            raise ValueError(f"lrSchedule='cosine' needs total_steps >= 1, got {total_steps}")
        return base * 0.5 * (1.0 + math.cos(math.pi * min(max(step, 0), total_steps) / total_steps))
    return base
