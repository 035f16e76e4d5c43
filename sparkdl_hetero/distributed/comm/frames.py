"""The wire format after the handshake: every frame is ``magic | kind | length`` followed by ``length`` bytes."""

from __future__ import annotations

import enum
import struct

MAGIC = b"SDLH"  # starts every frame: a stream that lost its framing is noticed at the next header
HEADER = struct.Struct("!4sBQ")  # magic, kind, payload length
CONTROL_LIMIT = 1 << 16  # control frames carry a few small fields: a larger one is refused before it is buffered
READY_PAYLOAD = struct.Struct("!QQ")  # a ready frame's payload: the exchange number, the bytes in the shared slot


class FrameKind(enum.IntEnum):
    """What a frame carries; its lower-case name is the one error messages use."""

    DATA = 1  # a vector of a collective (limit: the communicator's vector size)
    OBJECT = 2  # a JSON message (limit: the communicator's object size)
    ABORT = 3  # the verdict of the first rank to fail: the rank to blame, the message, the error type
    GOODBYE = 4  # the sender closes normally: its end of the connection is not a failure
    QUERY = 5  # "whom are you waiting on?", answered from inside whatever wait the receiver is in
    STATUS = 6  # the answer to a query: a rank, or None when not waiting
    READY = 7  # a two-rank exchange through shared memory: the sender's vector is in its slot

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, value: int) -> FrameKind | None:
        """The kind numbered ``value``, None for a number no kind has."""
        try:
            return cls(value)
        except ValueError:
            return None
