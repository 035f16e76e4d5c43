"""The barrier-mode transport: real TCP sockets on 127.0.0.1, one thread per rank.

Failures are staged, not timed: a stalled rank is one blocked outside any collective until the others have named
it, a dead rank is a process that exits without closing anything, a misbehaving rank is bare sockets that
authenticate and then send what a communicator never would. Wall-clock bounds appear only where the behaviour is
about time (a timeout), and then generously.
"""

from __future__ import annotations

import math
import os
import re
import socket
import threading
import time

import numpy as np
import pytest
from _helpers import connect_as_highest_rank, run_ranks, wait_until_closed
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from sparkdl_hetero.distributed.comm import (
    MAGIC,
    AuthenticationError,
    CommError,
    CommTimeout,
    Communicator,
    FrameKind,
    PeerFailed,
    PeerLost,
    ProtocolError,
    decode_object,
    encode_object,
    new_secret,
)
from sparkdl_hetero.distributed.comm.auth import authenticate_from, authenticate_to
from sparkdl_hetero.distributed.comm.frames import HEADER
from sparkdl_hetero.distributed.comm.shm import FILE_PREFIX, map_peer_file

SLACK = 10.0  # seconds a contended test machine may add to a wait that is bounded by design


def _shm_files() -> set[str]:
    return {f for f in os.listdir("/dev/shm") if f.startswith(FILE_PREFIX)}


@pytest.mark.parametrize("algorithm", ["hub", "ring", "auto"])  # auto: the direct exchange with 2 ranks
@pytest.mark.parametrize("world", [2, 3, 4])
def test_allreduce_equals_sum_and_is_bit_identical(algorithm: str, world: int) -> None:
    rng = np.random.default_rng(world)
    size = 1001  # not divisible by the number of ranks: uneven ring chunks
    data = [rng.normal(size=size).astype(np.float32) for _ in range(world)]
    results = run_ranks(world, lambda c: [c.allreduce(data[c.rank], algorithm) for _ in range(3)])
    for res in results:
        assert not isinstance(res, Exception), res
    expected = np.sum(np.stack(data).astype(np.float64), axis=0)
    for res in results:
        for out in res:
            assert out.dtype == np.float32
            np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
            assert out.tobytes() == results[0][0].tobytes()  # every rank, every call: the same bits


@pytest.mark.parametrize("algorithm", ["hub", "auto"])
def test_vectors_larger_than_the_socket_buffers(algorithm: str) -> None:
    n = 3_000_000  # 12 MB float32: a send is taken in several writes
    data = [np.random.default_rng(r).normal(size=n).astype(np.float32) for r in range(2)]
    results = run_ranks(2, lambda c: c.allreduce(data[c.rank], algorithm), max_elements=n)
    assert not any(isinstance(r, Exception) for r in results), results
    assert results[0].tobytes() == results[1].tobytes()
    np.testing.assert_array_equal(results[0], data[0] + data[1])


@pytest.mark.parametrize(("algorithm", "shm_dir"), [("auto", None), ("auto", "/dev/shm"), ("hub", None)])
def test_allreduce_into_out_also_when_the_next_frames_come_early(algorithm: str, shm_dir: str | None) -> None:
    data = [np.random.default_rng(r).normal(size=1001).astype(np.float32) for r in range(2)]

    def fn(c: Communicator) -> list[np.ndarray]:
        outs = [np.empty(1001, np.float32) for _ in range(2)]
        sums = []
        for i in range(8):
            if c.rank == 0 and i % 2:  # makes it likely that rank 1's next frame is in before rank 0 asks for it
                time.sleep(0.02)
            got = c.allreduce(data[c.rank] * (i + 1), algorithm, out=outs[i % 2])
            assert got is outs[i % 2]
            sums.append(got.copy())
        return sums

    results = run_ranks(2, fn, shm_dir=shm_dir)
    assert not any(isinstance(r, Exception) for r in results), results
    for i in range(8):
        expected = data[0] * (i + 1) + data[1] * (i + 1)
        assert results[0][i].tobytes() == results[1][i].tobytes() == expected.tobytes()


def test_allreduce_out_must_be_a_separate_vector_like_the_input() -> None:
    c = Communicator(0, 1, "127.0.0.1")
    x = np.ones(4, np.float32)
    for bad in (x, np.empty(4), np.empty(5, np.float32), np.empty(8, np.float32)[::2]):
        with pytest.raises(ValueError, match=r"out must be a contiguous float32 vector of 4 values apart from the "
                                             r"input, got float(32|64) \((4|5),\)"):
            c.allreduce(x, out=bad)
    out = np.empty(4, np.float32)
    assert c.allreduce(x, out=out) is out and out.tolist() == [1.0] * 4
    c.close()


def test_allreduce_rejects_an_unknown_algorithm() -> None:
    with Communicator(0, 1, "127.0.0.1") as c, pytest.raises(
            ValueError, match=r"allReduce must be one of auto, hub, ring; got 'tree'"):
        c.allreduce(np.ones(3), "tree")


# no directory for the files (different hosts, no /dev/shm): the vectors go through the sockets
@pytest.mark.parametrize("shm_dir", ["/dev/shm", None, "/nonexistent"])
def test_two_ranks_on_one_host_exchange_through_shared_memory(shm_dir: str | None) -> None:
    before = _shm_files()
    data = [np.random.default_rng(r).normal(size=(5, 1001)).astype(np.float32) for r in range(2)]

    def fn(c: Communicator) -> tuple:
        out = np.empty(1001, np.float32)
        sums = [c.allreduce(v, out=out).copy() for v in data[c.rank]]  # 5 exchanges: both slots reused
        return c.shares_memory, _shm_files() - before, sums, c.bytes_sent

    results = run_ranks(2, fn, shm_dir=shm_dir)
    assert not any(isinstance(r, Exception) for r in results), results
    for used, leftover, sums, sent in results:
        assert used == (shm_dir == "/dev/shm")
        assert not leftover  # unlinked once both ranks mapped it
        for i, v in enumerate(sums):
            assert v.tobytes() == (data[0][i] + data[1][i]).tobytes() == results[0][2][i].tobytes()
        assert sent >= 5 * 4004  # the vectors count as sent either way


def test_a_file_that_is_not_the_peers_is_not_mapped(tmp_path) -> None:  # noqa: ANN001
    assert map_peer_file(str(tmp_path / "x"), "00" * 16, 64) is None  # not in /dev/shm
    assert map_peer_file(f"/dev/shm/{FILE_PREFIX}missing", "00" * 16, 64) is None
    assert map_peer_file("", "00" * 16, 64) is None  # the peer offered none
    path = f"/dev/shm/{FILE_PREFIX}test-{os.getpid()}"
    with open(path, "wb") as f:
        f.write(b"\1" * 16 + b"\0" * 48)
    try:
        assert map_peer_file(path, "00" * 16, 64) is None  # another nonce: not the peer's file
        assert map_peer_file(path, "01" * 16, 128) is None  # another size
        assert map_peer_file(path, "01" * 16, 64, directory=None) is None  # this rank shares nothing
        assert map_peer_file(path, "01" * 16, 64) is not None
    finally:
        os.unlink(path)


def test_ring_with_fewer_elements_than_ranks() -> None:
    results = run_ranks(4, lambda c: c.allreduce(np.array([c.rank + 1.0, 2.0]), "ring"))
    for res in results:
        np.testing.assert_array_equal(res, [10.0, 8.0])


def test_weighted_mean_normalizes_by_total_weight() -> None:
    # rank r holds the sum of r + 1 samples whose values are all r: the mean over all samples is sum(r*(r+1))/sum(r+1)
    results = run_ranks(3, lambda c: c.weighted_mean(np.full(5, c.rank * (c.rank + 1.0)), c.rank + 1.0))
    for mean, total in results:
        assert total == 6.0
        np.testing.assert_allclose(mean, np.full(5, (0 + 2 + 6) / 6.0))


def test_allgather_and_broadcast_of_small_objects() -> None:
    def fn(c: Communicator) -> tuple:
        info = c.allgather({"rank": c.rank, "samples": 10 * c.rank, "w": np.arange(3, dtype=np.float32) * c.rank})
        flag = c.broadcast({"stop": True} if c.rank == 1 else None, root=1)
        return info, flag

    for info, flag in run_ranks(3, fn):
        assert [d["rank"] for d in info] == [0, 1, 2]
        assert [d["samples"] for d in info] == [0, 10, 20]
        np.testing.assert_array_equal(info[2]["w"], np.array([0, 2, 4], dtype=np.float32))
        assert info[2]["w"].dtype == np.float32
        assert flag == {"stop": True}


def test_objects_are_json_not_pickle() -> None:
    results = run_ranks(2, lambda c: c.allgather({1, 2}))
    for res in results:
        assert isinstance(res, TypeError)
        assert "JSON values and numpy arrays only" in str(res)


# ---- the codec -----------------------------------------------------------------------------------------
_DTYPES = st.sampled_from(["<f4", "<f8", ">f8", "<i4", "<i8", "|u1", "|b1", "<c8"])


@settings(max_examples=60, deadline=None)
@given(arr=hnp.arrays(_DTYPES, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)))
def test_codec_round_trip_keeps_an_arrays_dtype_shape_and_bits(arr: np.ndarray) -> None:
    back = decode_object(encode_object({"a": [arr, {"b": arr}]}))
    for got in (back["a"][0], back["a"][1]["b"]):
        assert isinstance(got, np.ndarray) and got.dtype == arr.dtype and got.shape == arr.shape
        assert got.tobytes() == arr.tobytes()  # bits, so NaN payloads and signed zeros too
        assert got.flags.writeable


def test_codec_round_trip_of_json_values() -> None:
    obj = {"s": "é", "n": None, "t": True, "i": -3, "f": 0.1, "nan": math.nan, "inf": -math.inf, "l": [1, [2.5]],
           "np": [np.float32(1.5), np.int64(7)]}
    back = decode_object(encode_object(obj))
    assert math.isnan(back.pop("nan"))
    assert back == {"s": "é", "n": None, "t": True, "i": -3, "f": 0.1, "inf": -math.inf, "l": [1, [2.5]],
                    "np": [1.5, 7]}
    assert [type(v) for v in back["np"]] == [float, int]  # numpy scalars travel as plain numbers


def test_codec_refuses_what_json_cannot_say_and_malformed_bytes() -> None:
    for obj, name in (({1, 2}, "set"), (object(), "object"), (b"raw", "bytes")):
        with pytest.raises(TypeError, match=rf"cannot send an object of type {name} \(JSON values and numpy arrays "
                                            r"only\)"):
            encode_object(obj)
    for data in (b"\xff\xfe", b"{not json", b""):
        with pytest.raises(ValueError):  # the transport drops a peer that sends these
            decode_object(data)


# ---- authentication ------------------------------------------------------------------------------------
def _handshake(client_secret: bytes, server_secret: bytes, target: int = 0,
               expected: frozenset[int] = frozenset({1})) -> tuple[object, object]:
    """Rank 1 authenticates to rank 0 over a socket pair: (what the client got: None or its error, the rank the
    server admitted or None)."""
    client, server = socket.socketpair()
    for s in (client, server):
        s.settimeout(30.0)
    admitted: list[object] = []
    t = threading.Thread(target=lambda: admitted.append(authenticate_from(server, server_secret, 0, set(expected))))
    t.start()
    try:
        authenticate_to(client, client_secret, 1, target)
        got: object = None
    except AuthenticationError as e:
        got = e
    finally:
        client.close()
    t.join(30)
    server.close()
    assert not t.is_alive()
    return got, admitted[0]


def test_handshake_admits_a_peer_with_the_secret() -> None:
    secret = new_secret()
    assert _handshake(secret, secret) == (None, 1)


@pytest.mark.parametrize("case", ["wrong secret", "wrong target", "unexpected rank"])
def test_handshake_rejects_a_wrong_secret_or_rank(case: str) -> None:
    secret = new_secret()
    err, admitted = _handshake(new_secret() if case == "wrong secret" else secret, secret,
                               target=5 if case == "wrong target" else 0,
                               expected=frozenset({2}) if case == "unexpected rank" else frozenset({1}))
    assert admitted is None  # dropped without an answer
    assert isinstance(err, AuthenticationError) and isinstance(err, CommError), err
    target = 5 if case == "wrong target" else 0
    assert err.rank == target
    assert f"rank 1: rank {target} refused the connection during authentication (wrong job secret?)" in str(err)


def test_secrets_are_fresh_and_a_short_one_is_refused() -> None:
    assert len(new_secret()) >= 32 and new_secret() != new_secret()
    c = Communicator(0, 2, "127.0.0.1")
    with pytest.raises(ValueError, match="the job secret must have at least 16 bytes, got 8"):
        c.connect([c.address, ("127.0.0.1", 1)], b"12345678")
    c.close()


def test_wrong_secret_is_rejected_and_the_real_peer_still_gets_in() -> None:
    server = Communicator(0, 2, "127.0.0.1", timeout=5.0)
    secret = new_secret()
    errors: list[Exception] = []

    def serve() -> None:
        try:
            server.connect([server.address, ("127.0.0.1", 1)], secret)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=serve)
    t.start()
    intruder = Communicator(1, 2, "127.0.0.1", timeout=5.0)
    with pytest.raises(AuthenticationError,
                       match=r"rank 0 refused the connection during authentication \(wrong job secret"):
        intruder.connect([server.address, intruder.address], new_secret())
    intruder.close()
    peer = Communicator(1, 2, "127.0.0.1", timeout=5.0)
    peer.connect([server.address, peer.address], secret)
    t.join(10)
    assert not errors
    out = [None, None]
    t2 = threading.Thread(target=lambda: out.__setitem__(0, server.allreduce(np.ones(3))))
    t2.start()
    out[1] = peer.allreduce(np.ones(3))
    t2.join(10)
    np.testing.assert_array_equal(out[0], [2, 2, 2])
    np.testing.assert_array_equal(out[1], [2, 2, 2])
    server.close()
    peer.close()


def test_server_that_lacks_the_secret_is_rejected_by_the_client() -> None:
    # a listener that answers the hello with garbage must not be trusted by the connecting rank
    listener = socket.create_server(("127.0.0.1", 0))
    addr = listener.getsockname()[:2]

    def fake_server() -> None:
        s, _ = listener.accept()
        s.settimeout(30.0)
        s.sendall(b"SDLA" + b"\0" * 32)
        s.recv(1024)
        s.sendall(b"\1" * 32)
        while s.recv(1024):  # until the client hangs up
            pass
        s.close()

    t = threading.Thread(target=fake_server)
    t.start()
    client = Communicator(1, 2, "127.0.0.1", timeout=5.0)
    with pytest.raises(AuthenticationError, match="rank 0 failed authentication") as info:
        client.connect([addr, client.address], new_secret())
    assert info.value.rank == 0
    client.close()
    t.join(30)
    listener.close()


def test_missing_peer_times_out_naming_it() -> None:
    c = Communicator(0, 3, "127.0.0.1", timeout=1.0)
    t0 = time.monotonic()
    with pytest.raises(CommTimeout, match=r"rank 1 did not connect within 1 s \(still missing: 1, 2\)") as info:
        c.connect([c.address, ("127.0.0.1", 1), ("127.0.0.1", 1)], new_secret())
    assert info.value.rank == 1
    assert 1.0 <= time.monotonic() - t0 < 1.0 + SLACK  # it waited the timeout, and then not much longer
    c.close()


# ---- frames a communicator never sends -----------------------------------------------------------------
@pytest.mark.parametrize(("header", "message"), [
    (HEADER.pack(MAGIC, FrameKind.DATA, 100 * 8 + 1), "rank 2 sent a data frame of 801 bytes, larger than the limit "
                                                      "of 800 bytes"),
    (HEADER.pack(MAGIC, FrameKind.OBJECT, 300), "rank 2 sent a object frame of 300 bytes, larger than the limit of "
                                                "200 bytes"),
    (HEADER.pack(b"HTTP", FrameKind.DATA, 8), "rank 2 sent a malformed frame header"),
    (HEADER.pack(MAGIC, 99, 8), "rank 2 sent a malformed frame header"),
])
def test_oversized_or_malformed_frame_is_rejected(header: bytes, message: str) -> None:
    def stand_in(addresses: list, secret: bytes) -> None:  # rank 2: writes past the API's own checks
        socks = connect_as_highest_rank(addresses, secret)
        socks[0].sendall(header + b"\0" * 16)
        wait_until_closed(socks)

    results = run_ranks(3, lambda c: c.allreduce(np.ones(10), "hub"), stand_in=stand_in, max_elements=100,
                        max_object_bytes=200)
    for err in results[:2]:  # rank 0 drops rank 2 and fails; its verdict fails rank 1 the same way
        assert isinstance(err, ProtocolError), results
        assert err.rank == 2
        assert message in str(err)


def test_vector_larger_than_limit_is_refused_locally() -> None:
    results = run_ranks(2, lambda c: c.allreduce(np.ones(101)), max_elements=100)
    for res in results:
        assert isinstance(res, ValueError)
        assert "exceeds this communicator's limit of 800 bytes" in str(res)


def test_object_larger_than_limit_is_refused_before_sending() -> None:
    results = run_ranks(3, lambda c: c.allgather("x" * 300 if c.rank == 1 else c.rank), max_object_bytes=200)
    err = results[1]
    assert isinstance(err, ProtocolError) and err.rank == 1, results
    assert "rank 1: refusing to send 302 bytes in one object frame to rank 0 (limit 200)" in str(err)
    assert isinstance(results[0], PeerLost) and results[0].rank == 1, results  # rank 1 closed: rank 0 learns it
    assert "rank 1 said goodbye and left the job" in str(results[0])


# ---- failures of peers ---------------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", ["hub", "ring"])
def test_stalled_peer_is_named_after_the_timeout(algorithm: str) -> None:
    timeout = 1.0
    named = threading.Semaphore(0)

    def fn(c: Communicator) -> object:
        c.allreduce(np.ones(8), algorithm)
        if c.rank == 2:  # stalls: busy outside any collective (answers nothing) until both others named it
            return "stalled" if named.acquire(timeout=60) and named.acquire(timeout=60) else "not named"
        t0 = time.monotonic()
        try:
            c.allreduce(np.ones(8), algorithm)
        except CommError as e:
            return e, time.monotonic() - t0
        finally:
            named.release()
        return "no error"

    results = run_ranks(3, fn, timeout=timeout)
    assert results[2] == "stalled"
    for r in (0, 1):
        err, elapsed = results[r]
        assert isinstance(err, CommTimeout), results
        assert err.rank == 2, (r, str(err))
        assert re.search(r"rank 2 sent nothing for 1 s", str(err)), str(err)
        assert elapsed < 3 * timeout + SLACK  # a timeout, then at most one unanswered query a hop


def _exchange_once(c: Communicator) -> None:  # the rank that dies, before it dies
    c.allreduce(np.ones(8), "auto")


def test_dead_peer_is_named_at_once() -> None:
    def fn(c: Communicator) -> object:
        t0 = time.monotonic()
        try:
            c.allreduce(np.ones(4), "hub")
        except CommError as e:
            return e, time.monotonic() - t0
        return "no error"

    timeout = 30.0
    results = run_ranks(3, fn, timeout=timeout, dead_rank=1)  # dies as soon as the mesh is up
    for r in (0, 2):
        err, elapsed = results[r]
        assert isinstance(err, PeerLost), results
        assert err.rank == 1
        assert "rank 1 closed the connection or died" in str(err)
        assert elapsed < timeout / 2  # the closed socket is noticed, not the timeout


@pytest.mark.parametrize("shm_dir", ["/dev/shm", None])  # None: the vectors go through the sockets
@pytest.mark.parametrize("dies", [False, True])
def test_two_rank_exchange_names_a_stalled_or_dead_peer(dies: bool, shm_dir: str | None) -> None:
    timeout = 30.0 if dies else 1.0  # a death is noticed at once, not after the timeout
    named = threading.Event()

    def fn(c: Communicator) -> object:
        _exchange_once(c)
        if c.rank == 1:  # stalls until rank 0 named it (only when it does not die: then it is another process)
            return "stalled" if named.wait(60) else "not named"
        t0 = time.monotonic()
        try:
            c.allreduce(np.ones(8), "auto")
        except CommError as e:
            return e, time.monotonic() - t0
        finally:
            named.set()
        return "no error"

    results = run_ranks(2, fn, timeout=timeout, shm_dir=shm_dir,
                        **({"dead_rank": 1, "before_death": _exchange_once} if dies else {}))
    assert results[1] == (None if dies else "stalled")
    err, elapsed = results[0]
    assert isinstance(err, PeerLost if dies else CommTimeout) and err.rank == 1, err
    assert re.search(r"rank 1 (closed the connection or died|died or stalled)" if dies
                     else r"rank 1 sent nothing for 1 s", str(err)), str(err)
    if dies:
        assert elapsed < timeout / 2
    else:  # two ranks: no tracing, the other one is named once the timeout has passed
        assert timeout <= elapsed < timeout + SLACK


def test_abort_fails_every_other_rank_naming_the_one_that_failed() -> None:
    def fn(c: Communicator) -> object:
        if c.rank == 1:
            c.abort(ValueError("bad batch"))
            return "aborted"
        return c.allreduce(np.ones(4), "hub")

    results = run_ranks(3, fn, timeout=30.0)
    assert results[1] == "aborted"
    for r in (0, 2):
        assert isinstance(results[r], PeerFailed), results
        assert results[r].rank == 1
        assert str(results[r]) == "rank 1 failed: ValueError: bad batch"
