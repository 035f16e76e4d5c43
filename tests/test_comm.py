"""The barrier-mode transport: real TCP sockets on 127.0.0.1, one thread per rank."""

from __future__ import annotations

import os
import re
import socket
import struct
import threading
import time

import numpy as np
import pytest
from _helpers import run_ranks

from sparkdl_hetero.distributed import comm
from sparkdl_hetero.distributed.comm import MAGIC, CommError, Communicator, new_secret


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


@pytest.mark.parametrize("algorithm", ["auto", "hub"])
def test_allreduce_into_out_also_when_the_next_frames_come_early(algorithm: str) -> None:
    data = [np.random.default_rng(r).normal(size=1001).astype(np.float32) for r in range(2)]

    def fn(c: Communicator) -> list[np.ndarray]:
        outs = [np.empty(1001, np.float32) for _ in range(2)]
        sums = []
        for i in range(8):
            if c.rank == 0 and i % 2:  # rank 1's next frame is already in (or on its way) when rank 0 asks for it
                time.sleep(0.02)
            got = c.allreduce(data[c.rank] * (i + 1), algorithm, out=outs[i % 2])
            assert got is outs[i % 2]
            sums.append(got.copy())
        return sums

    results = run_ranks(2, fn)
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


@pytest.mark.parametrize("shared", [True, False])
def test_two_ranks_on_one_host_exchange_through_shared_memory(shared: bool, monkeypatch) -> None:  # noqa: ANN001
    if not shared:  # no /dev/shm (or different hosts): the vectors go through the sockets
        monkeypatch.setattr(comm, "_SHM_DIR", "/nonexistent")
    before = {f for f in os.listdir("/dev/shm") if f.startswith("sparkdl-hetero-")}
    data = [np.random.default_rng(r).normal(size=(5, 1001)).astype(np.float32) for r in range(2)]

    def fn(c: Communicator) -> tuple:
        out = np.empty(1001, np.float32)
        sums = [c.allreduce(v, out=out).copy() for v in data[c.rank]]  # 5 exchanges: both slots reused
        leftover = {f for f in os.listdir("/dev/shm") if f.startswith("sparkdl-hetero-")} - before
        return c._shared is not None, leftover, sums, c.bytes_sent

    results = run_ranks(2, fn)
    assert not any(isinstance(r, Exception) for r in results), results
    for used, leftover, sums, sent in results:
        assert used == shared
        assert not leftover  # unlinked once both ranks mapped it
        for i, v in enumerate(sums):
            assert v.tobytes() == (data[0][i] + data[1][i]).tobytes() == results[0][2][i].tobytes()
        assert sent >= 5 * 4004  # the vectors count as sent either way


def test_a_file_that_is_not_the_peers_is_not_mapped(tmp_path) -> None:  # noqa: ANN001
    c = Communicator(0, 2, "127.0.0.1")
    assert c._map_peer(str(tmp_path / "x"), "00" * 16, 64) is None  # not in /dev/shm
    assert c._map_peer("/dev/shm/sparkdl-hetero-missing", "00" * 16, 64) is None
    path = f"/dev/shm/sparkdl-hetero-test-{os.getpid()}"
    with open(path, "wb") as f:
        f.write(b"\1" * 16 + b"\0" * 48)
    try:
        assert c._map_peer(path, "00" * 16, 64) is None  # another nonce: not the peer's file
        assert c._map_peer(path, "01" * 16, 128) is None  # another size
        assert c._map_peer(path, "01" * 16, 64) is not None
    finally:
        os.unlink(path)
        c.close()


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
    with pytest.raises(CommError, match=r"rank 0 refused the connection during authentication \(wrong job secret"):
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
        s.sendall(b"SDLA" + b"\0" * 32)
        s.recv(1024)
        s.sendall(b"\1" * 32)
        time.sleep(0.5)
        s.close()

    t = threading.Thread(target=fake_server)
    t.start()
    client = Communicator(1, 2, "127.0.0.1", timeout=5.0)
    with pytest.raises(CommError, match="rank 0 failed authentication") as info:
        client.connect([addr, client.address], new_secret())
    assert info.value.rank == 0
    client.close()
    t.join(5)
    listener.close()


def test_missing_peer_times_out_naming_it() -> None:
    c = Communicator(0, 3, "127.0.0.1", timeout=1.0)
    t0 = time.monotonic()
    with pytest.raises(CommError, match=r"rank 1 did not connect within 1 s \(still missing: 1, 2\)"):
        c.connect([c.address, ("127.0.0.1", 1), ("127.0.0.1", 1)], new_secret())
    assert time.monotonic() - t0 < 5
    c.close()


def test_oversized_frame_is_rejected() -> None:
    def fn(c: Communicator) -> object:
        if c.rank == 1:
            # a frame announcing more than the data limit (max_elements * 8 bytes) — written past the API's own check
            peer = c._peers[0]
            peer.sock.sendall(struct.pack("!4sBQ", MAGIC, 1, 100 * 8 + 1) + b"\0" * 16)
            time.sleep(1.0)
            return None
        return c.allreduce(np.ones(10), "hub")

    results = run_ranks(2, fn, timeout=5.0, max_elements=100)
    err = results[0]
    assert isinstance(err, CommError)
    assert err.rank == 1
    assert "rank 1 sent a data frame of 801 bytes, larger than the limit of 800 bytes" in str(err)


def test_vector_larger_than_limit_is_refused_locally() -> None:
    results = run_ranks(2, lambda c: c.allreduce(np.ones(101)), max_elements=100)
    for res in results:
        assert isinstance(res, ValueError)
        assert "exceeds this communicator's limit of 800 bytes" in str(res)


@pytest.mark.parametrize("algorithm", ["hub", "ring"])
def test_stalled_peer_is_named_within_the_timeout(algorithm: str) -> None:
    timeout = 1.0

    def fn(c: Communicator) -> object:
        c.allreduce(np.ones(8), algorithm)
        if c.rank == 2:
            time.sleep(3 * timeout + 2)  # stalls: never joins the second reduction
            return "slept"
        t0 = time.monotonic()
        try:
            c.allreduce(np.ones(8), algorithm)
        except CommError as e:
            return e, time.monotonic() - t0
        return "no error"

    results = run_ranks(3, fn, timeout=timeout)
    for r in (0, 1):
        err, elapsed = results[r]
        assert isinstance(err, CommError), results
        assert err.rank == 2, (r, str(err))
        assert "rank 2" in str(err)
        assert elapsed < 2 * timeout + 1.5


def test_dead_peer_is_named_at_once() -> None:
    def fn(c: Communicator) -> object:
        if c.rank == 1:
            for p in c._peers.values():  # dies: its sockets close without a goodbye
                p.sock.shutdown(socket.SHUT_RDWR)
            return None
        t0 = time.monotonic()
        try:
            c.allreduce(np.ones(4), "hub")
        except CommError as e:
            return e, time.monotonic() - t0
        return "no error"

    results = run_ranks(3, fn, timeout=30.0)
    for r in (0, 2):
        err, elapsed = results[r]
        assert isinstance(err, CommError), results
        assert err.rank == 1
        assert "rank 1" in str(err)
        assert elapsed < 5.0  # the closed socket is noticed, not the 30 s timeout


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("dies", [False, True])
def test_two_rank_exchange_names_a_stalled_or_dead_peer(dies: bool, shared: bool, monkeypatch) -> None:  # noqa: ANN001
    if not shared:  # the vectors go through the sockets, as between two hosts
        monkeypatch.setattr(comm, "_SHM_DIR", "/nonexistent")
    timeout = 30.0 if dies else 1.0  # a death is noticed at once, not after the timeout

    def fn(c: Communicator) -> object:
        c.allreduce(np.ones(8), "auto")
        if c.rank == 1:
            if dies:
                for p in c._peers.values():
                    p.sock.shutdown(socket.SHUT_RDWR)
            else:
                time.sleep(3 * timeout + 2)
            return None
        t0 = time.monotonic()
        try:
            c.allreduce(np.ones(8), "auto")
        except CommError as e:
            return e, time.monotonic() - t0
        return "no error"

    err, elapsed = run_ranks(2, fn, timeout=timeout)[0]
    assert isinstance(err, CommError) and err.rank == 1, err
    assert re.search(r"rank 1 (closed the connection or died|died or stalled)" if dies
                     else r"rank 1 sent nothing for 1 s", str(err)), str(err)
    assert elapsed < (5.0 if dies else timeout + 1.0)  # two ranks: no tracing, the other one is named
