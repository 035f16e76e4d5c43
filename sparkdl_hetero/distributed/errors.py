"""Typed failures of distributed training, and how the barrier driver tells a retriable one from a deterministic one.

Deterministic failures fail again when retried: bad input and bad params (``ValueError``, raised on the driver
before any job, or in a task), more workers than the cluster's slots (a ``ValueError`` of
:func:`.cluster.check_barrier_slots` before the job; Spark's own refusal of a barrier stage if the cluster shrank
after that check), a diverging loss (:class:`TrainingDivergedError`, a ``FloatingPointError``) and replicas that
disagree (:class:`ReplicasDivergedError`). Transient ones (a lost executor, a peer's :class:`~.comm.CommError`, an
:class:`InjectedFault`) are worth a retry from the checkpoint.

Why a wrapper class: Spark hands the driver a Python exception raised in a task only as the text of the task's
traceback inside its own exception, so the driver cannot catch the task's exception type. A barrier task therefore
raises every deterministic failure as :class:`NotRetriableError`, whose fully qualified class name
(:data:`NOT_RETRIABLE_MARK`) the driver looks for verbatim at the start of a traceback line: the decision rests on
one class name this package owns, never on the wording of an error message. The rank that fails aborts the mesh
with that wrapper (:meth:`.comm.Communicator.abort` names the error's class to every peer), so a peer that stops on
the abort -- and whose failure Spark may report first -- raises it as not retriable too (:func:`from_peer`).
"""

from __future__ import annotations

import re

from ..nn.solvers import TrainingDivergedError


class ReplicasDivergedError(RuntimeError):
    """The barrier workers' weights differ after training (or at the start: different checkpoints)."""


class InjectedFault(RuntimeError):
    """Raised by the testing aid ``sparkdl_hetero.injectFault``."""


class NotRetriableError(RuntimeError):
    """A barrier task's deterministic failure (see the module docstring); the message starts with the original
    error's class name."""

    @classmethod
    def wrapping(cls, e: BaseException) -> NotRetriableError:
        return cls(f"{type(e).__name__}: {e}")


def from_peer(comm_error: BaseException) -> bool:
    """Whether a peer's abort (a ``CommError`` naming the peer's error class, ``"...: NotRetriableError: ..."``)
    stopped this rank because of a deterministic failure."""
    return f"{NotRetriableError.__name__}: " in str(comm_error)


NOT_RETRIABLE: tuple[type[BaseException], ...] = (ValueError, TrainingDivergedError, FloatingPointError,
                                                  ReplicasDivergedError)
NOT_RETRIABLE_MARK = f"{NotRetriableError.__module__}.{NotRetriableError.__qualname__}"
_MARK_LINE = re.compile(r"^\s*" + re.escape(NOT_RETRIABLE_MARK) + r": ", re.MULTILINE)
# Spark's own refusals of a barrier stage, by the issue ids its messages start with: more tasks than slots after its
# minutes of re-checking (SPARK-24819), dynamic allocation (SPARK-24942). A re-run meets the same cluster.
_SPARK_BARRIER_REFUSALS = re.compile(r"\[SPARK-24819\]|\[SPARK-24942\]")


def is_not_retriable(spark_failure: BaseException) -> bool:
    """Whether the failure Spark reports carries a :class:`NotRetriableError` raised by a task (or is one)."""
    if isinstance(spark_failure, (NotRetriableError, *NOT_RETRIABLE)):
        return True
    text = str(spark_failure)
    return bool(_MARK_LINE.search(text) or _SPARK_BARRIER_REFUSALS.search(text))


def failure_summary(spark_failure: BaseException) -> str:
    """One line saying what failed, for the fit's ``failedAttempts`` and the final error (a description only; the
    retry decision is :func:`is_not_retriable`'s): a Python error's innermost traceback line, or the first line of
    Spark's own failure."""
    lines = [ln.strip() for ln in str(spark_failure).splitlines() if ln.strip()]
    for marker in ("NotRetriableError", "CommError", "InjectedFault", "FloatingPointError", "ValueError",
                   "RuntimeError", "ExecutorLostFailure", "SparkException", "Error:"):
        hits = [ln for ln in lines if marker in ln]
        if hits:
            return (hits[0] if marker in ("ExecutorLostFailure", "SparkException") else hits[-1])[:1000]
    return (lines[0] if lines else repr(spark_failure))[:1000]
