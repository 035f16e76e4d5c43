"""Per-step reduction transport between barrier tasks: authenticated TCP, a hub and a ring all-reduce.

Every task builds a :class:`Communicator` bound to its executor's own address, the tasks exchange
(host, port) and a per-job secret once (Spark's ``allGather``), then :meth:`Communicator.connect` opens a full
mesh of sockets. Each connection is authenticated both ways by an HMAC challenge-response over the secret.

Frames are ``magic | kind | length`` followed by the payload; a frame longer than its kind's limit (the expected
vector size for data) is refused. One reader thread per peer drains its socket into a queue, so sends never
deadlock and a peer that closes its socket is noticed at once. Waiting on a peer longer than ``timeout`` raises
:class:`CommError` naming that peer's rank; the first rank to fail tells every other rank (an ``abort`` frame), so
all of them fail with the same culprit instead of hanging.

Summation order is fixed (rank order at the hub, ring order per chunk), and every chunk is reduced on exactly
one rank and then copied, so every rank receives bit-identical results. With two ranks, ``auto`` uses a direct
exchange instead: both send their vector at once and both add the two in rank order (the same operation on the
same operands: bit-identical too), one transfer of latency instead of the hub's two in a row.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np

MAGIC = b"SDLH"
_HEADER = struct.Struct("!4sBQ")
_DATA, _OBJ, _ABORT, _BYE, _QUERY, _STATUS = 1, 2, 3, 4, 5, 6
_KIND_NAMES = {_DATA: "data", _OBJ: "object", _ABORT: "abort", _BYE: "goodbye", _QUERY: "query", _STATUS: "status"}
_HELLO = b"SDLA"
_NONCE = 32
_MAC = 32
_ABORT_LIMIT = 1 << 16
RING_MIN_BYTES = 1 << 18  # "auto" uses the ring from this vector size on (and only with more than two ranks)


class CommError(RuntimeError):
    """A transport failure; ``rank`` is the peer to blame (None when unknown)."""

    def __init__(self, message: str, rank: int | None = None) -> None:
        super().__init__(message)
        self.rank = rank


def new_secret() -> bytes:
    """A fresh per-job secret."""
    return secrets.token_bytes(32)


def _mac(secret: bytes, *parts: bytes) -> bytes:
    return hmac.new(secret, b"".join(parts), hashlib.sha256).digest()


def _recv_exact(sock: socket.socket, n: int) -> bytes:
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


def _send_frame(sock: socket.socket, header: bytes, payload: bytes | memoryview) -> None:
    """Header and payload in one system call when the socket takes them at once (no copy joining them)."""
    if not len(payload):
        sock.sendall(header)
        return
    sent = sock.sendmsg([header, payload])
    if sent < len(header):
        sock.sendall(header[sent:])
        sent = len(header)
    if sent - len(header) < len(payload):
        sock.sendall(memoryview(payload)[sent - len(header):])


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        a = np.ascontiguousarray(obj)
        return {"__ndarray__": [a.dtype.str, list(a.shape), base64.b64encode(a.tobytes()).decode("ascii")]}
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot send an object of type {type(obj).__name__} (JSON values and numpy arrays only)")


def _json_hook(d: dict) -> Any:
    if len(d) == 1 and "__ndarray__" in d:
        dtype, shape, data = d["__ndarray__"]
        return np.frombuffer(base64.b64decode(data), dtype=np.dtype(dtype)).reshape(shape).copy()
    return d


def encode_object(obj: Any) -> bytes:
    """JSON (numpy arrays as base64) — never pickle: a peer's bytes are never executed."""
    return json.dumps(obj, default=_json_default, allow_nan=True).encode("utf-8")


def decode_object(data: bytes) -> Any:
    return json.loads(data.decode("utf-8"), object_hook=_json_hook)


class _Peer:
    """One authenticated connection: the socket, a reader thread and the frames it has received."""

    def __init__(self, rank: int, sock: socket.socket) -> None:
        self.rank = rank
        self.sock = sock
        self.frames: deque[tuple[int, bytes]] = deque()
        self.failure: str | None = None  # why the connection is unusable (EOF, oversized frame, ...)
        self.left = False  # said goodbye
        self.status: deque[int | None] = deque()  # answers to our "whom are you waiting on?" queries
        self.send_lock = threading.Lock()


class Communicator:
    """One rank's end of the mesh.

    ``max_elements`` bounds data frames (vectors of at most that many 8-byte values); ``max_object_bytes``
    bounds control messages. ``timeout`` (seconds) is how long any wait on a peer may last.
    """

    def __init__(self, rank: int, world_size: int, host: str = "127.0.0.1", *, timeout: float = 120.0,
                 max_elements: int = 1 << 20, max_object_bytes: int = 1 << 20, port: int = 0) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        self.rank = rank
        self.world_size = world_size
        self.timeout = float(timeout)
        self.max_data_bytes = int(max_elements) * 8
        self.max_object_bytes = int(max_object_bytes)
        self._listener = socket.create_server((host, port), backlog=max(world_size, 8))
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self._peers: dict[int, _Peer] = {}
        self._cond = threading.Condition()
        self._abort: tuple[int | None, str] | None = None
        self._closing = False
        self._waiting_on: int | None = None  # the peer this rank is blocked on (answered to queries)
        self.bytes_sent = 0
        self.comm_seconds = 0.0  # wall time spent inside collective calls

    # ---- connection setup ------------------------------------------------------------------------------
    def connect(self, addresses: Sequence[tuple[str, int]], secret: bytes) -> None:
        """Open and authenticate the full mesh: connect to every lower rank, accept every higher one."""
        if len(addresses) != self.world_size:
            raise ValueError(f"expected {self.world_size} addresses, got {len(addresses)}")
        if len(secret) < 16:
            raise ValueError("the job secret must have at least 16 bytes")
        deadline = time.monotonic() + self.timeout
        for r in range(self.rank):
            self._dial(r, tuple(addresses[r]), secret, deadline)
        expected = set(range(self.rank + 1, self.world_size))
        while expected:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                ranks = ", ".join(str(r) for r in sorted(expected))
                raise CommError(f"rank {self.rank}: rank {min(expected)} did not connect within "
                                f"{self.timeout:g} s (still missing: {ranks})", min(expected))
            self._listener.settimeout(remaining)
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            r = self._admit(sock, secret, expected)
            if r is not None:
                expected.discard(r)
        self._listener.close()
        for peer in self._peers.values():
            peer.sock.settimeout(self.timeout)
            threading.Thread(target=self._read_loop, args=(peer,), daemon=True,
                             name=f"comm-{self.rank}<-{peer.rank}").start()

    def _dial(self, r: int, address: tuple[str, int], secret: bytes, deadline: float) -> None:
        while True:  # the peer may not listen yet only if it is slow to start; retry until the deadline
            try:
                sock = socket.create_connection(address, timeout=max(deadline - time.monotonic(), 0.01))
                break
            except OSError as e:
                if time.monotonic() >= deadline:
                    raise CommError(f"rank {self.rank}: cannot reach rank {r} at {address[0]}:{address[1]} "
                                    f"within {self.timeout:g} s: {e}", r) from e
                time.sleep(0.05)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            hello = _recv_exact(sock, len(_HELLO) + _NONCE)
            if hello[:len(_HELLO)] != _HELLO:
                raise CommError(f"rank {self.rank}: rank {r} at {address} is not a sparkdl-hetero peer", r)
            nonce_s = hello[len(_HELLO):]
            nonce_c = secrets.token_bytes(_NONCE)
            ids = struct.pack("!II", self.rank, r)
            sock.sendall(ids + nonce_c + _mac(secret, b"client", nonce_s, nonce_c, ids))
            reply = _recv_exact(sock, _MAC)
        except TimeoutError as e:
            sock.close()
            raise CommError(f"rank {self.rank}: rank {r} did not complete the authentication handshake within "
                            f"{self.timeout:g} s", r) from e
        except OSError as e:
            sock.close()
            raise CommError(f"rank {self.rank}: rank {r} refused the connection during authentication "
                            f"(wrong job secret?): {e}", r) from e
        if not hmac.compare_digest(reply, _mac(secret, b"server", nonce_c, nonce_s, ids)):
            sock.close()
            raise CommError(f"rank {self.rank}: rank {r} failed authentication (it does not hold the job secret)", r)
        self._peers[r] = _Peer(r, sock)

    def _admit(self, sock: socket.socket, secret: bytes, expected: set[int]) -> int | None:
        """Authenticate one incoming connection; a stranger is dropped (None) and accepting goes on."""
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(min(self.timeout, 10.0))
        try:
            nonce_s = secrets.token_bytes(_NONCE)
            sock.sendall(_HELLO + nonce_s)
            msg = _recv_exact(sock, 8 + _NONCE + _MAC)
        except OSError:
            sock.close()
            return None
        ids, nonce_c, mac = msg[:8], msg[8:8 + _NONCE], msg[8 + _NONCE:]
        r, target = struct.unpack("!II", ids)
        ok = (target == self.rank and r in expected
              and hmac.compare_digest(mac, _mac(secret, b"client", nonce_s, nonce_c, ids)))
        if not ok:
            sock.close()
            return None
        try:
            sock.sendall(_mac(secret, b"server", nonce_c, nonce_s, ids))
        except OSError:
            sock.close()
            return None
        self._peers[r] = _Peer(r, sock)
        return r

    # ---- frames ----------------------------------------------------------------------------------------
    def _limit(self, kind: int) -> int:
        if kind == _DATA:
            return self.max_data_bytes
        if kind == _OBJ:
            return self.max_object_bytes
        return _ABORT_LIMIT

    def _read_loop(self, peer: _Peer) -> None:
        sock = peer.sock
        try:
            while True:
                header = self._read(sock, _HEADER.size)
                magic, kind, length = _HEADER.unpack(header)
                if magic != MAGIC or kind not in _KIND_NAMES:
                    raise CommError(f"rank {peer.rank} sent a malformed frame header", peer.rank)
                if length > self._limit(kind):
                    raise CommError(f"rank {peer.rank} sent a {_KIND_NAMES[kind]} frame of {length} bytes, "
                                    f"larger than the limit of {self._limit(kind)} bytes", peer.rank)
                payload = self._read(sock, length) if length else b""
                with self._cond:
                    if kind == _BYE:
                        peer.left = True
                    elif kind == _QUERY:
                        waiting_on = self._waiting_on
                    elif kind == _STATUS:
                        peer.status.append(decode_object(payload)["waiting_on"])
                    elif kind == _ABORT:
                        info = decode_object(payload)
                        if self._abort is None:
                            self._abort = (info.get("rank"), str(info.get("message")))
                    else:
                        peer.frames.append((kind, payload))
                    self._cond.notify_all()
                if kind == _QUERY:  # answered by this thread: works while the main thread is blocked
                    answer = encode_object({"waiting_on": waiting_on})
                    with peer.send_lock:
                        sock.sendall(_HEADER.pack(MAGIC, _STATUS, len(answer)) + answer)
                if kind == _BYE:
                    return
        except (OSError, CommError, ValueError) as e:
            with self._cond:
                if not self._closing and not peer.left:
                    peer.failure = (str(e) if isinstance(e, CommError)
                                    else f"rank {peer.rank} closed the connection or died ({e})")
                self._cond.notify_all()
            if isinstance(e, CommError):
                sock.close()

    def _read(self, sock: socket.socket, n: int) -> bytearray:
        """Like :func:`_recv_exact`, but a quiet peer is not an error here (waits are timed by the caller); the
        buffer itself is returned (not copied: a data frame becomes a writable vector in place)."""
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            try:
                k = sock.recv_into(view[got:])
            except TimeoutError:
                if self._closing:
                    raise ConnectionError("closing") from None
                continue
            if k == 0:
                raise ConnectionError("connection closed")
            got += k
        return buf

    def _send(self, r: int, kind: int, payload: bytes | memoryview) -> None:
        peer = self._peers[r]
        if len(payload) > self._limit(kind):
            raise CommError(f"rank {self.rank}: refusing to send a {_KIND_NAMES[kind]} frame of {len(payload)} "
                            f"bytes to rank {r} (limit {self._limit(kind)})", self.rank)
        try:
            with peer.send_lock:
                _send_frame(peer.sock, _HEADER.pack(MAGIC, kind, len(payload)), payload)
        except OSError as e:
            with self._cond:  # the peer may have closed because it aborted: prefer its verdict if it comes
                self._cond.wait_for(lambda: self._abort is not None, timeout=1.0)
            self._fail(CommError(f"rank {self.rank}: sending to rank {r} failed ({e}); rank {r} died or stalled", r))
        self.bytes_sent += _HEADER.size + len(payload)

    def _recv(self, r: int, kind: int) -> bytes:
        """The next frame from rank ``r``; raises CommError on abort, peer failure or timeout."""
        peer = self._peers[r]
        deadline = time.monotonic() + self.timeout
        with self._cond:
            self._waiting_on = r
            try:
                return self._wait_frame(peer, kind, deadline)
            finally:
                self._waiting_on = None

    def _wait_frame(self, peer: _Peer, kind: int, deadline: float) -> bytes:
        r = peer.rank
        with self._cond:
            while True:
                if self._abort is not None:
                    culprit, message = self._abort
                    break
                if peer.frames:
                    got_kind, payload = peer.frames.popleft()
                    if got_kind != kind:
                        culprit, message = r, (f"rank {self.rank}: protocol error, expected a "
                                               f"{_KIND_NAMES[kind]} frame from rank {r}, got {_KIND_NAMES[got_kind]}")
                        break
                    return payload
                if peer.failure is not None or peer.left:
                    culprit, message = r, peer.failure or f"rank {r} said goodbye and left the job"
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    culprit = self._trace(r)
                    if culprit is None:  # something arrived while tracing
                        continue
                    via = "" if culprit == r else f" (rank {r} is waiting on it)"
                    message = (f"rank {self.rank}: rank {culprit} sent nothing for {self.timeout:g} s{via}: "
                               "stalled or dead")
                    break
                self._cond.wait(remaining)
        self._fail(CommError(message, culprit))
        raise AssertionError("unreachable")

    def _trace(self, r: int) -> int | None:
        """Follow "whom are you waiting on?" from rank ``r`` to the rank that is not waiting on anyone (the
        culprit), or one that does not answer. Called with the condition held; None if a frame/abort arrived."""
        seen = {self.rank}
        cur = r
        while True:
            peer = self._peers[cur]
            if peer.failure is not None or peer.left:
                return cur
            peer.status.clear()
            query = _HEADER.pack(MAGIC, _QUERY, 0)
            try:
                with peer.send_lock:
                    peer.sock.sendall(query)
            except OSError:
                return cur
            answer_by = time.monotonic() + min(self.timeout, 5.0)
            while not peer.status and peer.failure is None and time.monotonic() < answer_by:
                self._cond.wait(answer_by - time.monotonic())
                if self._abort is not None or self._peers[r].frames:
                    return None
            if not peer.status:
                return cur
            nxt = peer.status.popleft()
            if nxt is None or nxt in seen or nxt not in self._peers:
                return cur
            seen.add(cur)
            cur = nxt

    def _fail(self, err: CommError) -> None:
        """Tell every peer (best effort) who is to blame, then raise."""
        with self._cond:
            first = self._abort is None
            if first:
                self._abort = (err.rank, str(err))
            culprit, message = self._abort
        payload = encode_object({"rank": culprit, "message": message})
        for r, peer in self._peers.items():
            if r == culprit or peer.failure is not None:
                continue
            try:
                peer.sock.settimeout(1.0)
                with peer.send_lock:
                    peer.sock.sendall(_HEADER.pack(MAGIC, _ABORT, len(payload)) + payload)
            except OSError:
                pass
        raise CommError(message, culprit)

    # ---- collectives -----------------------------------------------------------------------------------
    def allreduce(self, x: np.ndarray, algorithm: str = "auto") -> np.ndarray:
        """The element-wise sum of ``x`` over all ranks (same dtype), bit-identical on every rank."""
        x = np.ascontiguousarray(x).ravel()
        if x.nbytes > self.max_data_bytes:
            raise ValueError(f"vector of {x.nbytes} bytes exceeds this communicator's limit of "
                             f"{self.max_data_bytes} bytes (max_elements)")
        if algorithm not in ("auto", "hub", "ring"):
            raise ValueError(f"allReduce must be one of auto, hub, ring; got {algorithm!r}")
        t0 = time.perf_counter()
        try:
            if self.world_size == 1:
                return x.copy()
            if algorithm == "auto" and self.world_size == 2:
                return self._exchange(x)
            if algorithm == "auto":
                algorithm = "ring" if x.nbytes >= RING_MIN_BYTES else "hub"
            return self._hub(x) if algorithm == "hub" else self._ring(x)
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

    def _exchange(self, x: np.ndarray) -> np.ndarray:
        """Two ranks: send ``x`` to the other, receive its vector, add them in rank order."""
        other = 1 - self.rank
        self._send(other, _DATA, memoryview(x).cast("B"))
        y = self._as_vector(self._recv(other, _DATA), x, other)  # a fresh writable buffer
        if self.rank == 0:
            return np.add(x, y, out=y)
        y += x
        return y

    def _hub(self, x: np.ndarray) -> np.ndarray:
        if self.rank != 0:
            self._send(0, _DATA, memoryview(x).cast("B"))
            return self._as_vector(self._recv(0, _DATA), x, 0)
        acc = x.copy()
        for r in range(1, self.world_size):  # fixed order: rank 0 + rank 1 + ... (deterministic rounding)
            acc += self._as_vector(self._recv(r, _DATA), x, r)
        view = memoryview(acc).cast("B")
        for r in range(1, self.world_size):
            self._send(r, _DATA, view)
        return acc

    def _as_vector(self, payload: bytes | bytearray, like: np.ndarray, r: int) -> np.ndarray:
        v = np.frombuffer(payload, dtype=like.dtype)
        if v.size != like.size:
            self._fail(CommError(f"rank {r} sent {v.size} values, rank {self.rank} expected {like.size}", r))
        return v

    def _ring(self, x: np.ndarray) -> np.ndarray:
        n, r = self.world_size, self.rank
        right, left = (r + 1) % n, (r - 1) % n
        buf = x.copy()
        bounds = np.linspace(0, x.size, n + 1).astype(np.int64)
        chunk = [buf[bounds[i]:bounds[i + 1]] for i in range(n)]
        for s in range(n - 1):  # reduce-scatter: afterwards this rank owns the full sum of chunk (r + 1) % n
            self._send(right, _DATA, memoryview(chunk[(r - s) % n]).cast("B"))
            c = (r - s - 1) % n
            chunk[c] += self._as_vector(self._recv(left, _DATA), chunk[c], left)
        for s in range(n - 1):  # all-gather: pass the finished chunks around
            self._send(right, _DATA, memoryview(chunk[(r + 1 - s) % n]).cast("B"))
            c = (r - s) % n
            chunk[c][...] = self._as_vector(self._recv(left, _DATA), chunk[c], left)
        return buf

    def allgather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (JSON values / numpy arrays), in rank order, on every rank (through rank 0)."""
        t0 = time.perf_counter()
        try:
            if self.world_size == 1:
                return [decode_object(encode_object(obj))]
            data = encode_object(obj)
            if self.rank != 0:
                self._send(0, _OBJ, data)
                return decode_object(self._recv(0, _OBJ))
            items = [obj] + [decode_object(self._recv(r, _OBJ)) for r in range(1, self.world_size)]
            out = encode_object(items)
            for r in range(1, self.world_size):
                self._send(r, _OBJ, out)
            return decode_object(out)
        finally:
            self.comm_seconds += time.perf_counter() - t0

    def broadcast(self, obj: Any = None, root: int = 0) -> Any:
        """``root``'s object on every rank."""
        t0 = time.perf_counter()
        try:
            if self.rank == root:
                data = encode_object(obj)
                for r in self._peers:
                    self._send(r, _OBJ, data)
                return decode_object(data)
            return decode_object(self._recv(root, _OBJ))
        finally:
            self.comm_seconds += time.perf_counter() - t0

    def abort(self, error: BaseException) -> None:
        """This rank failed with ``error``: tell every peer (so they fail at once, naming this rank), then close."""
        try:
            self._fail(CommError(f"rank {self.rank} failed: {type(error).__name__}: {error}", self.rank))
        except CommError:
            pass
        self.close()

    def close(self) -> None:
        """Say goodbye to every peer and close the sockets."""
        with self._cond:
            if self._closing:
                return
            self._closing = True
        for peer in self._peers.values():
            if peer.failure is None and self._abort is None:
                try:
                    peer.sock.settimeout(1.0)
                    with peer.send_lock:
                        peer.sock.sendall(_HEADER.pack(MAGIC, _BYE, 0))
                except OSError:
                    pass
        for peer in self._peers.values():  # shutdown wakes the reader thread; the peer saw our goodbye first
            try:
                peer.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            peer.sock.close()
        try:
            self._listener.close()
        except OSError:
            pass

    def __enter__(self) -> Communicator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
