"""Per-step reduction transport between barrier tasks: authenticated TCP, a hub, a ring and a direct all-reduce.

Every task builds a :class:`Communicator` bound to its executor's own address, the tasks exchange (host, port) and a
per-job secret (:func:`new_secret`) once (Spark's ``allGather``), then :meth:`Communicator.connect` opens a full
mesh of sockets, each connection authenticated both ways by an HMAC challenge-response over the secret.

The package, one job a module:

- :mod:`.codec` -- the object codec for control messages (JSON with numpy arrays; never pickle);
- :mod:`.auth` -- the job secret and the handshake;
- :mod:`.frames` -- the wire format: frame header and :class:`FrameKind`;
- :mod:`.transport` -- the mesh: dialing and accepting, non-blocking framed I/O, failure tracing and abort;
- :mod:`.shm` -- the shared-memory files two ranks on one host exchange their vectors through;
- :mod:`.communicator` -- the collectives.

Errors: every transport failure raises :class:`CommError` (``rank``: the peer to blame, None when unknown), as one
of these subclasses; every rank of a failed collective raises the same type, message and culprit:

- :class:`CommTimeout` -- a peer did not connect, answer, send or take anything within ``timeout``: stalled or dead;
- :class:`PeerLost` -- a peer's connection closed (it died, or left) while it was still needed;
- :class:`AuthenticationError` -- the other end is no sparkdl-hetero peer, or does not hold the job secret;
- :class:`ProtocolError` -- a malformed frame, one of the wrong kind or size, or one over its kind's limit;
- :class:`PeerFailed` -- a peer failed with an error of its own and aborted (:meth:`Communicator.abort`).
"""

from .auth import new_secret
from .codec import decode_object, encode_object
from .communicator import RING_MIN_BYTES, Communicator
from .errors import AuthenticationError, CommError, CommTimeout, PeerFailed, PeerLost, ProtocolError
from .frames import MAGIC, FrameKind

__all__ = ["MAGIC", "RING_MIN_BYTES", "AuthenticationError", "CommError", "CommTimeout", "Communicator", "FrameKind",
           "PeerFailed", "PeerLost", "ProtocolError", "decode_object", "encode_object", "new_secret"]
