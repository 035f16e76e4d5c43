"""The mesh of authenticated connections between the ranks, and the framed non-blocking I/O over it.

:meth:`Transport.connect` connects to every lower rank and accepts every higher one, each connection authenticated
both ways (:mod:`.auth`). Then the sockets turn non-blocking and there are no helper threads: whenever a rank waits
-- for a frame, or for the kernel to take what it sends -- it polls every connection, receiving (a data frame
straight into the vector waiting for it) and answering whatever arrives, so ranks sending to each other never
deadlock and a wait wakes on the data itself, not on a hand-off between threads. A frame longer than its kind's
limit (the expected vector size for data) is refused before it is buffered.

Waiting on a peer longer than ``timeout`` raises :class:`CommTimeout` naming the rank to blame: the waiting rank
asks "whom are you waiting on?" along the chain of waits, and the rank that waits on nobody, or does not answer (a
rank busy outside any collective answers only when it enters one), is named. The first rank to fail tells every
other rank (an abort frame carrying the verdict), so all of them fail with the same error and culprit instead of
hanging. A peer that closes its socket is noticed at the next wait.
"""

from __future__ import annotations

import math
import select
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import numpy as np

from .auth import authenticate_from, authenticate_to, check_secret
from .codec import decode_object, encode_object
from .errors import ERROR_TYPES, CommError, CommTimeout, PeerLost, ProtocolError
from .frames import CONTROL_LIMIT, HEADER, MAGIC, FrameKind

DIAL_RETRY_SECONDS = 0.05  # a peer that does not listen yet is only slow to start: try again soon, until the deadline
ADMIT_SECONDS = 10.0  # a connection that has not completed the handshake by then is dropped: a stranger that
# connects and stays silent cannot hold up accepting the real peers for the whole timeout
TRACE_ANSWER_SECONDS = 5.0  # a rank inside any wait answers a query at once, so one that has not answered by then is
# busy outside the collectives; shorter than the timeout, so following a chain of waits does not cost a timeout a hop
MIN_WAIT_SECONDS = 0.01  # a socket timeout of 0 would make it non-blocking: a deadline just passed waits this long
FAREWELL_SECONDS = 1.0  # verdicts and goodbyes are best effort (the peer may be dead): failing or closing does not
# wait longer for them to go out


class _Peer:
    """One authenticated connection, non-blocking once the mesh is up: the frame being received (parsed as its
    bytes arrive), complete frames, and the bytes not yet handed to the kernel."""

    def __init__(self, rank: int, sock: socket.socket) -> None:
        self.rank = rank
        self.sock = sock
        self.frames: deque[tuple[FrameKind, Any]] = deque()  # complete data/object/ready frames, in arrival order
        self.failure: CommError | None = None  # why the connection is unusable (EOF, oversized frame, ...)
        self.left = False  # said goodbye
        self.status: deque[int | None] = deque()  # answers to our "whom are you waiting on?" queries
        self.outbox: deque[memoryview] = deque()  # queued frames' bytes, in order
        self.header = bytearray(HEADER.size)
        self.kind = FrameKind.DATA
        self.payload: Any = None  # the current frame's payload buffer once its header is in (None: in the header)
        self.view: memoryview | None = None  # ... as bytes
        self.got = 0  # bytes of the current header or payload received
        self.into: np.ndarray | None = None  # where the next frame to be taken goes, if a data frame of its size
        self.events = 0  # the poll mask registered for the socket (0: not registered)


class Transport:
    """One rank's connections to every other rank. ``max_data_bytes`` and ``max_object_bytes`` bound data and
    object frames; ``timeout`` (seconds) is how long any wait on a peer may last."""

    def __init__(self, rank: int, world_size: int, timeout: float, max_data_bytes: int, max_object_bytes: int) -> None:
        self.rank = rank
        self.world_size = world_size
        self.timeout = timeout
        self._limits = {FrameKind.DATA: max_data_bytes, FrameKind.OBJECT: max_object_bytes}
        self._peers: dict[int, _Peer] = {}
        self._poller = select.poll()
        self._by_fd: dict[int, _Peer] = {}
        self._abort: CommError | None = None  # the verdict: the first failure here, or one a peer sent
        self._closing = False
        self._waiting_on: int | None = None  # the peer this rank is blocked on (answered to queries)
        self.bytes_sent = 0

    # ---- connection setup ------------------------------------------------------------------------------
    def connect(self, listener: socket.socket, addresses: Sequence[tuple[str, int]], secret: bytes) -> None:
        """Open and authenticate the full mesh: connect to every lower rank, accept every higher one on
        ``listener`` (closed afterwards); then switch every connection to non-blocking I/O."""
        if len(addresses) != self.world_size:
            raise ValueError(f"expected {self.world_size} addresses, got {len(addresses)}")
        check_secret(secret)
        deadline = time.monotonic() + self.timeout
        for r in range(self.rank):
            self._dial(r, tuple(addresses[r]), secret, deadline)
        expected = set(range(self.rank + 1, self.world_size))
        while expected:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                ranks = ", ".join(str(r) for r in sorted(expected))
                raise CommTimeout(f"rank {self.rank}: rank {min(expected)} did not connect within "
                                  f"{self.timeout:g} s (still missing: {ranks})", min(expected))
            listener.settimeout(remaining)
            try:
                sock, _ = listener.accept()
            except TimeoutError:
                continue
            r = self._admit(sock, secret, expected)
            if r is not None:
                expected.discard(r)
        listener.close()
        for peer in self._peers.values():
            peer.sock.setblocking(False)
            self._by_fd[peer.sock.fileno()] = peer
            self._watch(peer)

    def _dial(self, r: int, address: tuple[str, int], secret: bytes, deadline: float) -> None:
        while True:  # the peer may not listen yet only if it is slow to start; retry until the deadline
            try:
                sock = socket.create_connection(address, timeout=max(deadline - time.monotonic(), MIN_WAIT_SECONDS))
                break
            except OSError as e:
                if time.monotonic() >= deadline:
                    raise CommTimeout(f"rank {self.rank}: cannot reach rank {r} at {address[0]}:{address[1]} "
                                      f"within {self.timeout:g} s: {e}", r) from e
                time.sleep(DIAL_RETRY_SECONDS)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(max(deadline - time.monotonic(), MIN_WAIT_SECONDS))
        try:
            authenticate_to(sock, secret, self.rank, r)
        except TimeoutError as e:
            raise CommTimeout(f"rank {self.rank}: rank {r} did not complete the authentication handshake within "
                              f"{self.timeout:g} s", r) from e
        self._peers[r] = _Peer(r, sock)

    def _admit(self, sock: socket.socket, secret: bytes, expected: set[int]) -> int | None:
        """Authenticate one incoming connection; a stranger is dropped (None) and accepting goes on."""
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(min(self.timeout, ADMIT_SECONDS))
        r = authenticate_from(sock, secret, self.rank, expected)
        if r is not None:
            self._peers[r] = _Peer(r, sock)
        return r

    # ---- sending and receiving -------------------------------------------------------------------------
    def _limit(self, kind: FrameKind) -> int:
        """The most payload bytes a frame of ``kind`` may carry."""
        return self._limits.get(kind, CONTROL_LIMIT)

    def send(self, r: int, kind: FrameKind, payload: bytes | memoryview) -> None:
        """Hand a frame to the kernel (the caller may reuse ``payload`` afterwards). While the peer's socket is
        full this rank keeps receiving on every connection, so ranks sending to each other never deadlock."""
        peer = self._peers[r]
        if len(payload) > self._limit(kind):
            raise ProtocolError(f"rank {self.rank}: refusing to send {len(payload)} bytes in one {kind.label} frame to "
                                f"rank {r} (limit {self._limit(kind)})", self.rank)
        self._queue(peer, kind, payload)
        if peer.outbox:
            self._waiting_on = r
            try:
                flushed = self._progress(lambda: not peer.outbox, time.monotonic() + self.timeout)
            finally:
                self._waiting_on = None
            if not flushed:
                self.fail(CommTimeout(f"rank {self.rank}: rank {r} took nothing for {self.timeout:g} s: stalled or "
                                      "dead", r))
        if self._abort is not None or peer.failure is not None:  # a verdict received first names the culprit
            error_type = PeerLost if peer.failure is None else type(peer.failure)
            self.fail(error_type(f"rank {self.rank}: sending to rank {r} failed ({peer.failure}); rank {r} died or "
                                 "stalled", r))
        self.bytes_sent += HEADER.size + len(payload)

    def recv(self, r: int, kind: FrameKind) -> Any:
        """The next frame from rank ``r`` (bytes, or a vector for data frames); raises CommError (a subclass naming
        the failure) on abort, peer failure or timeout."""
        peer = self._peers[r]
        deadline = time.monotonic() + self.timeout
        self._waiting_on = r
        try:
            return self._wait_frame(peer, kind, deadline)
        finally:
            self._waiting_on = None

    def exchange_data(self, r: int, payload: memoryview, into: np.ndarray) -> np.ndarray:
        """Send a data frame to rank ``r`` and receive its next one, straight into ``into`` when its frame has not
        started arriving before (then into a vector of its own, returned instead)."""
        peer = self._peers[r]
        peer.into = into
        try:
            self.send(r, FrameKind.DATA, payload)
            return self.recv(r, FrameKind.DATA)
        finally:
            peer.into = None

    def peer_ranks(self) -> list[int]:
        """Every other rank, in rank order."""
        return sorted(self._peers)

    def _wait_frame(self, peer: _Peer, kind: FrameKind, deadline: float) -> Any:
        r = peer.rank
        self._pump_in(peer)  # usually there already: no poll
        while True:
            if self._abort is not None:
                err = self._abort
                break
            if peer.frames:
                got_kind, payload = peer.frames.popleft()
                if got_kind != kind:
                    err = ProtocolError(f"rank {self.rank}: protocol error, expected a {kind.label} frame from rank "
                                        f"{r}, got {got_kind.label}", r)
                    break
                return payload
            if peer.left:
                err = PeerLost(f"rank {r} said goodbye and left the job", r)
                break
            if peer.failure is not None:
                err = type(peer.failure)(str(peer.failure), r)
                break
            if not self._progress(lambda: bool(peer.frames) or peer.failure is not None, deadline):
                culprit = self._trace(r) if self.world_size > 2 else r  # with two, the other one is to blame
                if culprit is None:  # something arrived while tracing
                    continue
                via = "" if culprit == r else f" (rank {r} is waiting on it)"
                err = CommTimeout(f"rank {self.rank}: rank {culprit} sent nothing for {self.timeout:g} s{via}: "
                                  "stalled or dead", culprit)
                break
        self.fail(err)

    def _trace(self, r: int) -> int | None:
        """Follow "whom are you waiting on?" from rank ``r`` to the rank that is not waiting on anyone (the
        culprit), or one that does not answer (a rank busy outside any collective answers only when it enters
        one). None if a frame from ``r`` or an abort arrived meanwhile."""
        seen = {self.rank}
        cur = r
        waited = self._peers[r]
        while True:
            peer = self._peers[cur]
            if peer.failure is not None or peer.left:
                return cur
            peer.status.clear()
            self._queue(peer, FrameKind.QUERY, b"")
            self._progress(lambda p=peer: bool(p.status) or p.failure is not None or bool(waited.frames),
                           time.monotonic() + min(self.timeout, TRACE_ANSWER_SECONDS))
            if self._abort is not None or waited.frames:
                return None
            if not peer.status:
                return cur
            nxt = peer.status.popleft()
            if nxt is None or nxt in seen or nxt not in self._peers:
                return cur
            seen.add(cur)
            cur = nxt

    def fail(self, err: CommError) -> NoReturn:
        """Tell every peer (best effort, briefly) who is to blame, then raise. A verdict received from a peer
        before wins over ``err``: every rank raises the same error type, message and culprit."""
        if self._abort is None:
            self._abort = err
        verdict = self._abort
        payload = encode_object({"rank": verdict.rank, "message": str(verdict), "type": type(verdict).__name__})
        told = [p for r, p in self._peers.items() if r != verdict.rank and p.failure is None]
        for peer in told:
            self._queue(peer, FrameKind.ABORT, payload)
        self._flush(told, FAREWELL_SECONDS)
        raise type(verdict)(str(verdict), verdict.rank)

    def close(self) -> None:
        """Say goodbye to every peer (briefly) and close the sockets."""
        if self._closing:
            return
        self._closing = True
        live = [p for p in self._peers.values() if p.failure is None]
        if self._abort is None and self._by_fd:  # the mesh was up
            for peer in live:
                self._queue(peer, FrameKind.GOODBYE, b"")
            self._flush(live, FAREWELL_SECONDS)
        for peer in self._peers.values():
            try:
                peer.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            peer.sock.close()

    # ---- the machinery -----------------------------------------------------------------------------------
    def _flush(self, peers: list[_Peer], seconds: float) -> None:
        """Push the peers' queued frames out for at most ``seconds`` (receiving meanwhile)."""
        deadline = time.monotonic() + seconds
        while any(p.outbox for p in peers) and time.monotonic() < deadline:
            self._poll(deadline - time.monotonic())

    def _watch(self, peer: _Peer) -> None:
        """Poll the socket for what the peer needs now: input always, output while bytes wait in its outbox."""
        events = 0 if peer.failure is not None else select.POLLIN | (select.POLLOUT if peer.outbox else 0)
        if events == peer.events:
            return
        fd = peer.sock.fileno()
        if not events:
            if fd >= 0:
                self._poller.unregister(fd)
        elif peer.events:
            self._poller.modify(fd, events)
        else:
            self._poller.register(fd, events)
        peer.events = events

    def _lost(self, peer: _Peer, error: CommError, close: bool = False) -> None:
        """The connection to ``peer`` is unusable (EOF, a socket error, a malformed frame): stop polling it."""
        if peer.failure is None and not self._closing and not peer.left:
            peer.failure = error
        peer.outbox.clear()
        if peer.failure is None:  # closed after its goodbye (or while we close): not an error
            peer.failure = PeerLost(f"rank {peer.rank} left the job", peer.rank)
        self._watch(peer)
        if close:
            peer.sock.close()

    def _pump_in(self, peer: _Peer, force: bool = False) -> None:
        """Read whatever the peer's socket holds (never blocks) and handle every frame it completes; ``force``:
        also after a failure to send (a verdict it sent before closing is still read)."""
        if peer.failure is not None and not force:
            return
        sock, r = peer.sock, peer.rank
        while True:
            view = memoryview(peer.header)[peer.got:] if peer.payload is None else peer.view[peer.got:]
            try:
                k = sock.recv_into(view) if len(view) else 0
            except BlockingIOError:
                return
            except OSError as e:
                self._lost(peer, PeerLost(f"rank {r} closed the connection or died ({e})", r))
                return
            if k == 0 and len(view):
                self._lost(peer, PeerLost(f"rank {r} closed the connection or died (connection closed)", r))
                return
            peer.got += k
            if peer.payload is None:
                if peer.got < HEADER.size:
                    continue
                magic, number, length = HEADER.unpack(peer.header)
                kind = FrameKind.parse(number)
                if magic != MAGIC or kind is None:
                    self._lost(peer, ProtocolError(f"rank {r} sent a malformed frame header", r), close=True)
                    return
                if length > self._limit(kind):
                    self._lost(peer, ProtocolError(f"rank {r} sent a {kind.label} frame of {length} bytes, larger "
                                                   f"than the limit of {self._limit(kind)} bytes", r), close=True)
                    return
                if kind == FrameKind.DATA:  # into the vector waiting for the next frame when it fits, else a fresh one
                    into, peer.into = (peer.into, None) if not peer.frames else (None, peer.into)
                    payload = into if into is not None and into.nbytes == length else np.empty(length, np.uint8)
                    peer.view = memoryview(payload).cast("B")
                else:
                    payload = bytearray(length)
                    peer.view = memoryview(payload)
                peer.kind, peer.payload, peer.got = kind, payload, 0
            if peer.got == len(peer.view):
                kind, payload = peer.kind, peer.payload
                peer.payload = peer.view = None
                peer.got = 0
                try:
                    self._dispatch(peer, kind, payload)
                except ValueError as e:  # an undecodable control frame
                    self._lost(peer, ProtocolError(f"rank {r} sent a malformed {kind.label} frame ({e})", r),
                               close=True)
                    return
                if peer.left:
                    return

    def _dispatch(self, peer: _Peer, kind: FrameKind, payload: Any) -> None:
        if kind == FrameKind.GOODBYE:
            peer.left = True
            self._watch(peer)
        elif kind == FrameKind.QUERY:  # answered from inside whichever wait this rank is in
            self._queue(peer, FrameKind.STATUS, encode_object({"waiting_on": self._waiting_on}))
        elif kind == FrameKind.STATUS:
            peer.status.append(decode_object(payload)["waiting_on"])
        elif kind == FrameKind.ABORT:
            info = decode_object(payload)
            if self._abort is None:
                error_type = ERROR_TYPES.get(str(info.get("type")), CommError)
                self._abort = error_type(str(info.get("message")), info.get("rank"))
        else:
            peer.frames.append((kind, payload))

    def _queue(self, peer: _Peer, kind: FrameKind, payload: bytes | memoryview) -> None:
        """Append a frame to the peer's outbox and hand the kernel what it takes now."""
        if peer.failure is not None:
            return
        peer.outbox.append(memoryview(HEADER.pack(MAGIC, kind, len(payload))))
        if len(payload):
            peer.outbox.append(memoryview(payload).cast("B"))
        self._pump_out(peer)

    def _pump_out(self, peer: _Peer) -> None:
        """Send queued bytes until the socket would block (header and payload in one system call)."""
        out = peer.outbox
        while out:
            try:
                sent = peer.sock.sendmsg(list(out)[:2])
            except BlockingIOError:
                break
            except OSError as e:
                self._lost(peer, PeerLost(f"sending to rank {peer.rank} failed ({e})", peer.rank))
                self._pump_in(peer, force=True)  # it may have closed because it aborted: read its verdict
                return
            while sent:
                head = out[0]
                if sent < len(head):
                    out[0] = head[sent:]
                    break
                sent -= len(head)
                out.popleft()
        self._watch(peer)

    def _progress(self, done: Callable[[], bool], deadline: float) -> bool:
        """Move bytes on every connection until ``done()`` or an abort; False if ``deadline`` passed first."""
        while not done() and self._abort is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._poll(remaining)
        return True

    def _poll(self, seconds: float) -> None:
        """Wait at most ``seconds`` for any connection to be ready, then receive (and handle) what arrived and send
        what fits. Every wait of this rank is here: a peer's data, queries and verdicts are read while it waits."""
        for fd, events in self._poller.poll(max(1, math.ceil(seconds * 1000))):
            peer = self._by_fd[fd]
            if events & select.POLLNVAL:  # closed behind our back
                self._poller.unregister(fd)
                peer.events = 0
                self._lost(peer, PeerLost(f"rank {peer.rank}'s connection was closed", peer.rank))
            elif events & ~select.POLLOUT:
                self._pump_in(peer)
            if events & select.POLLOUT and peer.failure is None:
                self._pump_out(peer)
