"""The per-job secret and the HMAC challenge-response that authenticates each connection both ways.

The accepting end sends a hello and a fresh nonce; the connecting end answers with both ranks, a nonce of its own
and a MAC over the two nonces and the ranks; the accepting end checks it and answers with a MAC of its own (the
nonces in the other order, under another label), which the connecting end checks. Neither end reveals anything a
stranger could replay: each MAC covers a nonce the checking end has just chosen.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import socket
import struct

from .errors import AuthenticationError

HELLO = b"SDLA"  # the accepting end's greeting: a connecting rank that reads anything else has reached a stranger
SECRET_BYTES = 32  # a fresh secret: as strong as the HMAC-SHA256 key it becomes
MIN_SECRET_BYTES = 16  # below this, a secret could be guessed
NONCE_BYTES = 32  # random per connection, long enough never to repeat: a recorded handshake cannot be replayed
MAC_BYTES = hashlib.sha256().digest_size
_RANKS = struct.Struct("!II")  # the connecting rank, the rank it wants to reach


def new_secret() -> bytes:
    """A fresh per-job secret."""
    return secrets.token_bytes(SECRET_BYTES)


def check_secret(secret: bytes) -> None:
    """ValueError if ``secret`` is too short to be one."""
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"the job secret must have at least {MIN_SECRET_BYTES} bytes, got {len(secret)}")


def _mac(secret: bytes, *parts: bytes) -> bytes:
    return hmac.new(secret, b"".join(parts), hashlib.sha256).digest()


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Exactly ``n`` bytes (honouring the socket's timeout); EOF raises ConnectionError."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise ConnectionError("connection closed")
        got += k
    return bytes(buf)


def authenticate_to(sock: socket.socket, secret: bytes, rank: int, peer: int) -> None:
    """The connecting end: prove to ``peer`` (at the other end of ``sock``) that this ``rank`` holds ``secret`` and
    check that the peer holds it too. Raises :class:`AuthenticationError` if it does not (or is no sparkdl-hetero
    peer, or closes the connection: it refused our proof), TimeoutError when the socket's timeout passes first. The
    socket is closed on failure."""
    try:
        hello = recv_exact(sock, len(HELLO) + NONCE_BYTES)
        if hello[:len(HELLO)] != HELLO:
            raise AuthenticationError(f"rank {rank}: rank {peer} at {_address(sock)} is not a sparkdl-hetero peer",
                                      peer)
        nonce_s = hello[len(HELLO):]
        nonce_c = secrets.token_bytes(NONCE_BYTES)
        ids = _RANKS.pack(rank, peer)
        sock.sendall(ids + nonce_c + _mac(secret, b"client", nonce_s, nonce_c, ids))
        reply = recv_exact(sock, MAC_BYTES)
        if not hmac.compare_digest(reply, _mac(secret, b"server", nonce_c, nonce_s, ids)):
            raise AuthenticationError(f"rank {rank}: rank {peer} failed authentication (it does not hold the job "
                                      "secret)", peer)
    except TimeoutError:
        sock.close()
        raise
    except OSError as e:
        sock.close()
        raise AuthenticationError(f"rank {rank}: rank {peer} refused the connection during authentication (wrong job "
                                  f"secret?): {e}", peer) from e
    except AuthenticationError:
        sock.close()
        raise


def authenticate_from(sock: socket.socket, secret: bytes, rank: int, expected: set[int]) -> int | None:
    """The accepting end (this ``rank``): the rank of the peer at the other end of ``sock`` if it proves it holds
    ``secret``, wants this rank and is one of ``expected``; otherwise None, with the socket closed (a stranger, or
    a peer with another secret, learns nothing and gets no answer)."""
    try:
        nonce_s = secrets.token_bytes(NONCE_BYTES)
        sock.sendall(HELLO + nonce_s)
        msg = recv_exact(sock, _RANKS.size + NONCE_BYTES + MAC_BYTES)
        ids, nonce_c, mac = msg[:_RANKS.size], msg[_RANKS.size:-MAC_BYTES], msg[-MAC_BYTES:]
        r, target = _RANKS.unpack(ids)
        if (target != rank or r not in expected
                or not hmac.compare_digest(mac, _mac(secret, b"client", nonce_s, nonce_c, ids))):
            sock.close()
            return None
        sock.sendall(_mac(secret, b"server", nonce_c, nonce_s, ids))
    except OSError:
        sock.close()
        return None
    return r


def _address(sock: socket.socket) -> str:
    try:
        host, port = sock.getpeername()[:2]
    except OSError:
        return "an unknown address"
    return f"{host}:{port}"
