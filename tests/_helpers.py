"""Helpers shared by several test modules (not collected: the name does not start with ``test_``)."""

from __future__ import annotations

import multiprocessing
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from sparkdl_hetero.distributed.comm import Communicator, new_secret
from sparkdl_hetero.distributed.comm.auth import authenticate_to

Address = tuple[str, int]


def run_ranks(world: int, fn: Callable[[Communicator], object], *, timeout: float = 10.0,
              max_elements: int = 1 << 16, join_timeout: float = 60.0,
              stand_in: Callable[[list[Address], bytes], object] | None = None,
              dead_rank: int | None = None, before_death: Callable[[Communicator], object] | None = None,
              **options: Any) -> list[object]:
    """Build a connected mesh of ``world`` communicators on 127.0.0.1 and run ``fn`` on each in its own thread.
    Returns each rank's result or the exception it raised; fails the test if a rank is still running after
    ``join_timeout`` seconds. ``options`` go to every :class:`Communicator`.

    ``stand_in(addresses, secret)`` plays the highest rank instead of a communicator (in a thread; its result is
    that rank's): e.g. bare sockets that authenticate (:func:`connect_as_highest_rank`) and then misbehave.
    ``dead_rank`` runs in a process of its own that calls ``before_death(communicator)`` (a module-level function)
    once connected and then exits without closing anything, as a crashed executor would: its result is None."""
    settings = dict(timeout=timeout, max_elements=max_elements, **options)
    local = [r for r in range(world) if not (stand_in is not None and r == world - 1) and r != dead_rank]
    comms = {r: Communicator(r, world, "127.0.0.1", **settings) for r in local}
    addresses: list[Address] = [comms[r].address if r in comms else ("127.0.0.1", 1) for r in range(world)]
    secret = new_secret()
    results: list[object] = [None] * world
    child = None
    if dead_rank is not None:
        child, addresses[dead_rank] = _start_doomed(dead_rank, world, settings, before_death, join_timeout)

    def body(r: int) -> None:
        try:
            if r not in comms:
                results[r] = stand_in(addresses, secret)
                return
            comms[r].connect(addresses, secret)
            results[r] = fn(comms[r])
        except Exception as e:  # noqa: BLE001 - handed back to the test
            results[r] = e
        finally:
            if r in comms:
                comms[r].close()

    threads = [threading.Thread(target=body, args=(r,)) for r in range(world) if r != dead_rank]
    for t in threads:
        t.start()
    if child is not None:
        conn, process = child
        conn.send((addresses, secret))
    for t in threads:
        t.join(timeout=join_timeout)
        assert not t.is_alive(), "a rank hung"
    if child is not None:
        last_words = conn.recv() if conn.poll(join_timeout) else "nothing"
        process.join(join_timeout)
        conn.close()
        assert not process.is_alive(), "the rank meant to die hung"
        assert last_words is None, f"the rank meant to die failed before: {last_words}"
    return results


def _start_doomed(rank: int, world: int, settings: dict, before_death: Callable[[Communicator], object] | None,
                  join_timeout: float) -> tuple[tuple[Any, Any], Address]:
    """Start rank ``rank`` in a process of its own; returns (its end of the pipe, the process) and its address."""
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that runs threads
    conn, child_conn = ctx.Pipe()
    process = ctx.Process(target=_doomed_rank, args=(rank, world, settings, before_death, child_conn), daemon=True)
    process.start()
    child_conn.close()
    assert conn.poll(join_timeout), "the rank meant to die did not start"
    address = conn.recv()
    assert not isinstance(address, str), f"the rank meant to die failed to start: {address}"
    return (conn, process), tuple(address)


def _doomed_rank(rank: int, world: int, settings: dict, before_death: Callable[[Communicator], object] | None,
                 conn: Any) -> None:
    try:
        c = Communicator(rank, world, "127.0.0.1", **settings)
        conn.send(c.address)
        addresses, secret = conn.recv()
        c.connect(addresses, secret)
        if before_death is not None:
            before_death(c)
    except Exception as e:  # noqa: BLE001 - reported to run_ranks, which fails the test
        conn.send(f"{type(e).__name__}: {e}")
    else:
        conn.send(None)
    os._exit(0)  # dies: the system closes its sockets, no goodbye, no verdict


def connect_as_highest_rank(addresses: list[Address], secret: bytes, timeout: float = 30.0) -> dict[int, socket.socket]:
    """Bare sockets playing the highest rank of a mesh: connected and authenticated to every other rank (the highest
    rank only connects; it accepts nobody). Returns them by rank, blocking with ``timeout``."""
    rank = len(addresses) - 1
    socks = {}
    for r in range(rank):
        sock = socket.create_connection(addresses[r], timeout=timeout)
        authenticate_to(sock, secret, rank, r)
        socks[r] = sock
    return socks


def wait_until_closed(socks: dict[int, socket.socket]) -> None:
    """Read (and drop) whatever the ranks at the other ends send until each has closed its end."""
    for sock in socks.values():
        try:
            while sock.recv(1 << 16):
                pass
        except OSError:
            pass
        sock.close()


def numeric_grad(f: Callable[[np.ndarray], float], w: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central finite differences of ``f`` at ``w``, one coordinate at a time (the reference of the gradient
    checks)."""
    g = np.empty_like(w)
    for i in range(w.size):
        wp, wm = w.copy(), w.copy()
        wp[i] += eps
        wm[i] -= eps
        g[i] = (f(wp) - f(wm)) / (2 * eps)
    return g
