"""Helpers shared by several test modules (not collected: the name does not start with ``test_``)."""

from __future__ import annotations

import threading
from collections.abc import Callable

from sparkdl_hetero.distributed.comm import Communicator, new_secret


def run_ranks(world: int, fn: Callable[[Communicator], object], *, timeout: float = 10.0,
              max_elements: int = 1 << 16, join_timeout: float = 60.0) -> list[object]:
    """Build a connected mesh of ``world`` communicators on 127.0.0.1 and run ``fn`` on each in its own thread.
    Returns each rank's result or the exception it raised; fails the test if a rank is still running after
    ``join_timeout`` seconds."""
    comms = [Communicator(r, world, "127.0.0.1", timeout=timeout, max_elements=max_elements) for r in range(world)]
    addresses = [c.address for c in comms]
    secret = new_secret()
    results: list[object] = [None] * world

    def body(r: int) -> None:
        try:
            comms[r].connect(addresses, secret)
            results[r] = fn(comms[r])
        except Exception as e:  # noqa: BLE001 - handed back to the test
            results[r] = e
        finally:
            comms[r].close()

    threads = [threading.Thread(target=body, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=join_timeout)
        assert not t.is_alive(), "a rank hung"
    return results
