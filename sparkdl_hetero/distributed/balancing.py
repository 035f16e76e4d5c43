"""Heterogeneity-aware split of a global mini-batch among barrier workers (no Spark, no sockets).

The global batch is split in proportion to each rank's measured compute throughput: measured every step, the median
of the last :data:`THROUGHPUT_WINDOW` steps at the current split -- and re-split when that shortens the predicted
step by more than :data:`REBALANCE_GAIN` and by more than the measurement noise allows (:func:`balanced_shares`),
first after :data:`FIRST_MEASUREMENTS` steps at a split (the first re-split only by more than
:data:`FIRST_REBALANCE_GAIN`), then every :data:`REBALANCE_EVERY` steps; a re-split restarts the measurements, since
a rank's throughput depends on its share through fixed per-step costs. :class:`Balancer` holds that state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

REBALANCE_EVERY = 10  # steps between re-splits of the global batch
REBALANCE_GAIN = 0.01  # a re-split is applied only if it shortens the predicted step by this fraction...
FIRST_REBALANCE_GAIN = 0.2  # ...or by this much at the first re-split, e.g. for a straggler
WARMUP_STEPS = 2  # steps not measured (they include one-off costs)
FIRST_MEASUREMENTS = 5  # the first re-split takes the median of this many steps: one slow step does not move rows
THROUGHPUT_WINDOW = 10  # a rank's throughput is the median of its last this many steps' measurements
NOISE_MARGIN = 5.0  # x (MAD / median) / sqrt(window): ~2 standard errors of the ratio of two ranks' medians


def split_batch(batch: int, weights: np.ndarray) -> np.ndarray:
    """``batch`` split in proportion to ``weights`` (largest remainder), each share at least 1 when possible."""
    w = np.maximum(np.asarray(weights, dtype=np.float64), 0.0)
    k = len(w)
    if batch < k or not np.isfinite(w).all() or w.sum() <= 0:
        w = np.ones(k)
    floor = min(1, batch // k)
    rest = batch - floor * k
    exact = rest * w / w.sum()
    shares = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - shares), kind="stable")
    shares[order[:rest - int(shares.sum())]] += 1
    return shares + floor


def rebalance(shares: np.ndarray, throughput: np.ndarray, min_gain: float = REBALANCE_GAIN) -> np.ndarray:
    """The split of ``sum(shares)`` in proportion to ``throughput``, taken only if it shortens the predicted step
    (the slowest rank's share / throughput) by more than ``min_gain``: measurement noise between equally fast
    workers does not move rows back and forth, each move costing the slower rank's time."""
    new = split_batch(int(np.sum(shares)), throughput)
    thr = np.maximum(np.asarray(throughput, dtype=np.float64), 1e-12)
    if np.max(new / thr) < (1.0 - min_gain) * np.max(shares / thr):
        return new
    return shares


def balanced_shares(shares: np.ndarray, samples: np.ndarray, min_gain: float = REBALANCE_GAIN) -> np.ndarray:
    """:func:`rebalance` on the median of per-step throughput ``samples`` (one row per step, one column per rank),
    the predicted gain also having to beat the noise of those medians: ``NOISE_MARGIN`` x the largest relative
    median absolute deviation / sqrt(steps). Equally fast workers then keep an even split on a noisy machine (a row
    moved makes the receiving rank slower through its fixed per-step costs); a straggler's large gain passes."""
    samples = np.asarray(samples, dtype=np.float64)
    throughput = np.median(samples, axis=0)
    if len(samples) > 1:
        mad = np.median(np.abs(samples - throughput), axis=0) / np.maximum(throughput, 1e-12)
        min_gain = max(min_gain, NOISE_MARGIN * float(np.max(mad)) / math.sqrt(len(samples)))
    return rebalance(shares, throughput, min_gain)


@dataclass
class BalancerState:
    """What a checkpoint keeps of a :class:`Balancer`: the throughput estimate (samples/s per rank; ``None``: none
    measured yet) and the split it led to."""

    throughput: list[float] | None = None
    shares: list[int] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"throughput": self.throughput, "shares": self.shares}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> BalancerState:
        thr = d.get("throughput")
        return cls(None if thr is None else [float(v) for v in thr], [int(s) for s in d.get("shares", [])])


class Balancer:
    """The split of a global batch of ``batch`` rows among ranks holding ``rows`` rows each: in proportion to the
    rows, then (``balance=True``) to the throughputs :meth:`record` is given every step. Every rank feeds it the
    same all-reduced throughputs, so every rank holds the same :attr:`shares`."""

    def __init__(self, batch: int, rows: list[int], balance: bool, state: BalancerState | None = None) -> None:
        self.balance = balance
        world = len(rows)
        measured = state is not None and state.throughput is not None
        self.throughput = np.asarray(state.throughput if measured else rows, dtype=np.float64)
        self._window = np.empty((THROUGHPUT_WINDOW, world))  # the last steps' throughputs at this split, a ring
        self._window[0] = self.throughput
        self._measurements = int(measured)  # how many the ring has seen since the last re-split
        self._measured = measured  # a first re-split happened (or the estimate comes from a checkpoint)
        self.shares = split_batch(batch, self.throughput if balance else np.asarray(rows, dtype=np.float64))

    def record(self, throughputs: np.ndarray, steps_done: int) -> bool:
        """Take every rank's throughput of the step that made ``steps_done`` steps in all; re-split when due.
        Returns whether :attr:`shares` changed. The first :data:`WARMUP_STEPS` steps are not measured."""
        if steps_done <= WARMUP_STEPS:
            return False
        np.maximum(throughputs, 1e-9, out=self._window[self._measurements % THROUGHPUT_WINDOW])
        self._measurements += 1
        m = self._measurements
        due = m == FIRST_MEASUREMENTS or (m > FIRST_MEASUREMENTS and steps_done % REBALANCE_EVERY == 0)
        if not (self.balance and due):
            return False
        seen = self._seen()
        new = balanced_shares(self.shares, seen, REBALANCE_GAIN if self._measured else FIRST_REBALANCE_GAIN)
        self._measured = True
        if np.array_equal(new, self.shares):
            return False
        self.throughput = np.median(seen, axis=0)  # the ring restarts at the new split
        self.shares, self._measurements = new, 0
        return True

    def _seen(self) -> np.ndarray:
        return self._window[:min(self._measurements, THROUGHPUT_WINDOW)]

    def snapshot(self) -> BalancerState:
        """The current estimate (the median of the measurements at this split, when there are any) and split."""
        if self._measurements:
            self.throughput = np.median(self._seen(), axis=0)
        return BalancerState([float(v) for v in self.throughput], [int(s) for s in self.shares])
