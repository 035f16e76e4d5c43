"""Two ranks on one host exchange their vectors through shared memory instead of loopback TCP.

Each rank maps a file of its own in ``/dev/shm`` (mode 0600, random name, space reserved up front) that the other
maps read-only; a nonce sent over the authenticated socket proves the file is the peer's. Both unlink it once the
offer is settled, so nothing is left behind even if a rank dies. The file holds a header and two slots; the direct
exchange alternates between the slots, so a rank overwrites a slot only two exchanges later, when its peer has
certainly read it. On different hosts, or without a usable directory, the offer fails on either side and the
vectors go through the socket; only a small "ready" frame ever does here, so every failure is still noticed,
traced and propagated through the socket.
"""

from __future__ import annotations

import mmap
import os
import secrets
from collections.abc import Callable
from typing import Any

import numpy as np

SHM_DIR = "/dev/shm"
FILE_PREFIX = "sparkdl-hetero-"
NAME_BYTES = 16  # random bytes in a file's name: no other process guesses it or collides with it
NONCE_BYTES = 16  # random: a file that starts with the nonce the peer sent is that peer's, not a stale one
HEAD_BYTES = 64  # the file starts with its owner's nonce; the slots follow at a cache-line boundary


def file_size(slot_bytes: int) -> int:
    """The bytes of one rank's file: the header and two slots of ``slot_bytes``."""
    return HEAD_BYTES + 2 * slot_bytes


class SharedSlots:
    """This rank's file (written) and the peer's (read), each a header and two slots of ``slot_bytes``."""

    def __init__(self, mine: mmap.mmap, theirs: mmap.mmap, slot_bytes: int) -> None:
        self._mine = np.frombuffer(mine, np.uint8)
        self._theirs = np.frombuffer(theirs, np.uint8)
        self._slot_bytes = slot_bytes

    def _start(self, exchange: int) -> int:
        return HEAD_BYTES + (exchange % 2) * self._slot_bytes

    def put(self, exchange: int, x: np.ndarray) -> None:
        """Write the vector ``x`` into this rank's slot for exchange number ``exchange``."""
        start = self._start(exchange)
        np.copyto(self._mine[start:start + x.nbytes].view(x.dtype), x)

    def get(self, exchange: int, like: np.ndarray) -> np.ndarray:
        """The peer's vector for exchange number ``exchange`` (read-only, in its file), shaped like ``like``."""
        start = self._start(exchange)
        return self._theirs[start:start + like.nbytes].view(like.dtype)


def share(directory: str | None, slot_bytes: int, send: Callable[[Any], None],
          recv: Callable[[], Any]) -> SharedSlots | None:
    """Offer the peer a file in ``directory`` (None: offer none) and map the one it offers; ``send`` and ``recv``
    carry objects over the authenticated connection. Both ranks must call this together; both get the slots, or
    both None when either side could not create or map its file."""
    size = file_size(slot_bytes)
    nonce = secrets.token_bytes(NONCE_BYTES)
    mine: mmap.mmap | None = None
    path = os.path.join(directory, f"{FILE_PREFIX}{secrets.token_hex(NAME_BYTES)}") if directory else ""
    if path:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError:
            path = ""
    if path:
        try:
            os.posix_fallocate(fd, 0, size)  # no SIGBUS later on a full file system: refused now instead
            mine = mmap.mmap(fd, size)
            mine[:NONCE_BYTES] = nonce
        except (OSError, AttributeError):  # no space, or no posix_fallocate on this platform
            mine = None
        finally:
            os.close(fd)
    try:
        send({"path": path if mine is not None else "", "nonce": nonce.hex()})
        offer = recv()
        theirs = map_peer_file(str(offer.get("path", "")), str(offer.get("nonce", "")), size, directory)
        send({"mapped": theirs is not None})
        peer_mapped = recv().get("mapped") is True
    finally:
        if path:
            os.unlink(path)  # both mapped it (or gave up): nothing left behind, even if a rank dies
    if mine is not None and theirs is not None and peer_mapped:
        return SharedSlots(mine, theirs, slot_bytes)
    return None


def map_peer_file(path: str, nonce: str, size: int, directory: str | None = SHM_DIR) -> mmap.mmap | None:
    """The peer's file, read-only, if it is the one it offered: directly inside ``directory``, ``size`` bytes,
    starting with ``nonce`` (hex); None otherwise (another host's path, a missing file, a stale or foreign one)."""
    if not path or not directory or os.path.dirname(path) != os.path.normpath(directory):
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        if os.fstat(fd).st_size != size:
            return None
        m = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    return m if m[:NONCE_BYTES].hex() == nonce else None
