"""Errors raised when a backend cannot be used."""

from __future__ import annotations


class BackendUnavailable(RuntimeError):
    """A backend that was asked for by name cannot run here; the message says which, why and how to fix it."""

    def __init__(self, backend: str, reason: str, fix: str) -> None:
        super().__init__(f"backend {backend!r} is not available: {reason}. {fix}")
        self.backend = backend
        self.reason = reason
        self.fix = fix
