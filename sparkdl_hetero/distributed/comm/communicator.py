"""The collectives every barrier task calls: all-reduce (hub, ring, or a direct two-rank exchange), a weighted
mean, all-gather and broadcast of small objects, and abort.

Summation order is fixed (rank order at the hub, ring order per chunk), and every chunk is reduced on exactly one
rank and then copied, so every rank receives bit-identical results. With two ranks, ``auto`` uses a direct
exchange instead: both send their vector at once and both add the two in rank order (the same operation on the same
operands: bit-identical too), one transfer of latency instead of the hub's two in a row. Two ranks on one host move
the vectors through shared memory (:mod:`.shm`) and only a small "ready" frame through their socket.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from .codec import decode_object, encode_object
from .errors import CommError, PeerFailed, ProtocolError
from .frames import READY_PAYLOAD, FrameKind
from .shm import SHM_DIR, SharedSlots, share
from .transport import Transport

RING_MIN_BYTES = 1 << 18  # "auto" uses the ring from this vector size on (and only with more than two ranks): below
# it the ring's 2 (n - 1) steps of latency cost more than the hub's bandwidth bottleneck at rank 0
ELEMENT_BYTES = 8  # max_elements counts values of the widest dtype a vector has (float64)
LISTEN_BACKLOG = 8  # at least: room for every peer connecting at once, and a stranger or two besides
ALGORITHMS = ("auto", "hub", "ring")


class Communicator:
    """One rank's end of the mesh.

    ``max_elements`` bounds data frames (vectors of at most that many 8-byte values); ``max_object_bytes``
    bounds control messages. ``timeout`` (seconds) is how long any wait on a peer may last. ``shm_dir`` is where two
    ranks on one host share their vectors (None: always through the socket).
    """

    def __init__(self, rank: int, world_size: int, host: str = "127.0.0.1", *, timeout: float = 120.0,
                 max_elements: int = 1 << 20, max_object_bytes: int = 1 << 20, port: int = 0,
                 shm_dir: str | None = SHM_DIR) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        self.rank = rank
        self.world_size = world_size
        self.timeout = float(timeout)
        self.max_data_bytes = int(max_elements) * ELEMENT_BYTES
        self.max_object_bytes = int(max_object_bytes)
        self.shm_dir = shm_dir
        self._listener = socket.create_server((host, port), backlog=max(world_size, LISTEN_BACKLOG))
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self._transport = Transport(rank, world_size, self.timeout, self.max_data_bytes, self.max_object_bytes)
        self._shared: SharedSlots | None = None  # two ranks on one host: the files they exchange through
        self._exchanges = 0  # direct exchanges so far (they alternate between the two shared slots)
        self._shared_bytes = 0  # bytes of vectors handed over through the shared files
        self.comm_seconds = 0.0  # wall time spent inside collective calls

    @property
    def bytes_sent(self) -> int:
        """Bytes this rank has sent: frames through its sockets and vectors through shared memory."""
        return self._transport.bytes_sent + self._shared_bytes

    @property
    def shares_memory(self) -> bool:
        """Whether the two-rank exchange goes through shared memory (both ranks on one host) rather than sockets."""
        return self._shared is not None

    def connect(self, addresses: Sequence[tuple[str, int]], secret: bytes) -> None:
        """Open and authenticate the full mesh: connect to every lower rank, accept every higher one."""
        self._transport.connect(self._listener, addresses, secret)
        if self.world_size == 2:
            other = 1 - self.rank
            self._shared = share(self.shm_dir, self.max_data_bytes,
                                 lambda obj: self._transport.send(other, FrameKind.OBJECT, encode_object(obj)),
                                 lambda: decode_object(self._transport.recv(other, FrameKind.OBJECT)))

    # ---- all-reduce ------------------------------------------------------------------------------------
    def allreduce(self, x: np.ndarray, algorithm: str = "auto", out: np.ndarray | None = None) -> np.ndarray:
        """The element-wise sum of ``x`` over all ranks (same dtype), bit-identical on every rank; written into
        ``out`` (a vector like ``x``, not overlapping it) when given -- a step loop then allocates nothing."""
        x = np.ascontiguousarray(x).ravel()
        if x.nbytes > self.max_data_bytes:
            raise ValueError(f"vector of {x.nbytes} bytes exceeds this communicator's limit of "
                             f"{self.max_data_bytes} bytes (max_elements)")
        if algorithm not in ALGORITHMS:
            raise ValueError(f"allReduce must be one of {', '.join(ALGORITHMS)}; got {algorithm!r}")
        if out is not None and (out.shape != x.shape or out.dtype != x.dtype or not out.flags.c_contiguous
                                or np.may_share_memory(out, x)):
            raise ValueError(f"out must be a contiguous {x.dtype} vector of {x.size} values apart from the input, "
                             f"got {out.dtype} {out.shape}")
        t0 = time.perf_counter()
        try:
            if self.world_size == 1:
                total = x
            elif algorithm == "auto" and self.world_size == 2:
                return self._exchange(x, np.empty_like(x) if out is None else out)
            else:
                if algorithm == "auto":
                    algorithm = "ring" if x.nbytes >= RING_MIN_BYTES else "hub"
                total = self._hub(x) if algorithm == "hub" else self._ring(x)
            if out is None:
                return total.copy() if total is x else total
            out[...] = total
            return out
        finally:
            self.comm_seconds += time.perf_counter() - t0

    def weighted_mean(self, x: np.ndarray, weight: float, algorithm: str = "auto") -> tuple[np.ndarray, float]:
        """sum_r(x_r) / sum_r(weight_r) and the total weight: callers send weight-scaled sums (e.g. gradient sums
        over their samples with weight = sample count) and get the mean over everyone's samples."""
        buf = np.empty(x.size + 1, dtype=np.float64 if x.dtype == np.float64 else np.float32)
        buf[:-1] = x.ravel()
        buf[-1] = weight
        out = self.allreduce(buf, algorithm)
        total = float(out[-1])
        if total <= 0:
            raise CommError(f"rank {self.rank}: the total weight of a mean is {total}", None)
        return (out[:-1] / out.dtype.type(total)).astype(x.dtype, copy=False), total

    def _exchange(self, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Two ranks: send ``x`` to the other, receive its vector (straight into ``out``), add them in rank
        order."""
        if self._shared is not None:
            return self._exchange_shared(x, out)
        other = 1 - self.rank
        y = self._as_vector(self._transport.exchange_data(other, memoryview(x).cast("B"), out), x, other)
        if y is not out:  # its frame had started arriving before (into a vector of its own)
            out[...] = y
        if self.rank == 0:
            return np.add(x, out, out=out)
        out += x
        return out

    def _exchange_shared(self, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        """The direct exchange through the shared files: ``x`` into this rank's slot, "ready" both ways, then the sum
        read from the peer's slot. Two slots, alternating: a rank writes slot s again two exchanges later, when the
        peer has certainly read it (its "ready" for the exchange in between came after that read)."""
        other = 1 - self.rank
        seq, self._exchanges = self._exchanges, self._exchanges + 1
        self._shared.put(seq, x)
        self._transport.send(other, FrameKind.READY, READY_PAYLOAD.pack(seq, x.nbytes))
        payload = self._transport.recv(other, FrameKind.READY)
        got = READY_PAYLOAD.unpack(payload) if len(payload) == READY_PAYLOAD.size else None
        if got != (seq, x.nbytes):
            self._transport.fail(ProtocolError(f"rank {self.rank}: protocol error, rank {other} announced {got} for "
                                               f"shared exchange {seq} of {x.nbytes} bytes", other))
        self._shared_bytes += x.nbytes
        y = self._shared.get(seq, x)
        return np.add(x, y, out=out) if self.rank == 0 else np.add(y, x, out=out)  # rank order: the same bits

    def _hub(self, x: np.ndarray) -> np.ndarray:
        t = self._transport
        if self.rank != 0:
            t.send(0, FrameKind.DATA, memoryview(x).cast("B"))
            return self._as_vector(t.recv(0, FrameKind.DATA), x, 0)
        acc = x.copy()
        for r in range(1, self.world_size):  # fixed order: rank 0 + rank 1 + ... (deterministic rounding)
            acc += self._as_vector(t.recv(r, FrameKind.DATA), x, r)
        view = memoryview(acc).cast("B")
        for r in range(1, self.world_size):
            t.send(r, FrameKind.DATA, view)
        return acc

    def _ring(self, x: np.ndarray) -> np.ndarray:
        t = self._transport
        n, r = self.world_size, self.rank
        right, left = (r + 1) % n, (r - 1) % n
        buf = x.copy()
        bounds = np.linspace(0, x.size, n + 1).astype(np.int64)
        chunk = [buf[bounds[i]:bounds[i + 1]] for i in range(n)]
        for s in range(n - 1):  # reduce-scatter: afterwards this rank owns the full sum of chunk (r + 1) % n
            t.send(right, FrameKind.DATA, memoryview(chunk[(r - s) % n]).cast("B"))
            c = (r - s - 1) % n
            chunk[c] += self._as_vector(t.recv(left, FrameKind.DATA), chunk[c], left)
        for s in range(n - 1):  # all-gather: pass the finished chunks around
            t.send(right, FrameKind.DATA, memoryview(chunk[(r + 1 - s) % n]).cast("B"))
            c = (r - s) % n
            chunk[c][...] = self._as_vector(t.recv(left, FrameKind.DATA), chunk[c], left)
        return buf

    def _as_vector(self, payload: np.ndarray, like: np.ndarray, r: int) -> np.ndarray:
        """A data frame's payload (bytes, or the vector it was received into) as a writable vector like ``like``."""
        if payload.nbytes != like.nbytes:
            self._transport.fail(ProtocolError(f"rank {r} sent {payload.nbytes // like.itemsize} values, rank "
                                               f"{self.rank} expected {like.size}", r))
        return payload if payload.dtype == like.dtype else payload.view(like.dtype)

    # ---- objects ---------------------------------------------------------------------------------------
    def allgather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (JSON values / numpy arrays), in rank order, on every rank (through rank 0)."""
        t = self._transport
        t0 = time.perf_counter()
        try:
            if self.world_size == 1:
                return [decode_object(encode_object(obj))]
            data = encode_object(obj)
            if self.rank != 0:
                t.send(0, FrameKind.OBJECT, data)
                return decode_object(t.recv(0, FrameKind.OBJECT))
            items = [obj] + [decode_object(t.recv(r, FrameKind.OBJECT)) for r in range(1, self.world_size)]
            out = encode_object(items)
            for r in range(1, self.world_size):
                t.send(r, FrameKind.OBJECT, out)
            return decode_object(out)
        finally:
            self.comm_seconds += time.perf_counter() - t0

    def broadcast(self, obj: Any = None, root: int = 0) -> Any:
        """``root``'s object on every rank."""
        t = self._transport
        t0 = time.perf_counter()
        try:
            if self.rank == root:
                data = encode_object(obj)
                for r in t.peer_ranks():
                    t.send(r, FrameKind.OBJECT, data)
                return decode_object(data)
            return decode_object(t.recv(root, FrameKind.OBJECT))
        finally:
            self.comm_seconds += time.perf_counter() - t0

    # ---- ending ----------------------------------------------------------------------------------------
    def abort(self, error: BaseException) -> None:
        """This rank failed with ``error``: tell every peer (so they fail at once with :class:`PeerFailed`, naming
        this rank), then close."""
        try:
            self._transport.fail(PeerFailed(f"rank {self.rank} failed: {type(error).__name__}: {error}", self.rank))
        except CommError:
            pass
        self.close()

    def close(self) -> None:
        """Say goodbye to every peer (briefly) and close the sockets."""
        self._shared = None  # the mappings go with their last views
        self._transport.close()
        try:
            self._listener.close()
        except OSError:
            pass

    def __enter__(self) -> Communicator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
