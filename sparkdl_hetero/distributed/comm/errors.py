"""The transport's errors: one base type to catch, a subclass per kind of failure."""

from __future__ import annotations


class CommError(RuntimeError):
    """A transport failure; ``rank`` is the peer to blame (None when unknown)."""

    def __init__(self, message: str, rank: int | None = None) -> None:
        super().__init__(message)
        self.rank = rank


class CommTimeout(CommError):
    """A peer did not connect, answer, send or take anything within the communicator's timeout: stalled or dead."""


class PeerLost(CommError):
    """A peer's connection closed (it died, or said goodbye and left) while this rank still needed it."""


class AuthenticationError(CommError):
    """The handshake failed: the other end is not a sparkdl-hetero peer, or it does not hold the job secret."""


class ProtocolError(CommError):
    """A frame that breaks the protocol: malformed, of an unexpected kind or size, or larger than its kind's limit
    (also refused before sending)."""


class PeerFailed(CommError):
    """A peer failed with an error of its own and aborted the job (see :meth:`Communicator.abort`)."""


ERROR_TYPES: dict[str, type[CommError]] = {
    t.__name__: t for t in (CommError, CommTimeout, PeerLost, AuthenticationError, ProtocolError, PeerFailed)}
"""By name: an abort frame names the type, so every rank raises the same one."""
