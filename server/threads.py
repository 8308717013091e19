"""Running torch work off the serving thread without slowing it down for good."""
from __future__ import annotations

import threading
from typing import Callable, TypeVar

T = TypeVar("T")


def run_isolated(fn: Callable[[], T], name: str = "isolated") -> T:
    """Run ``fn`` in a new thread that ends when it returns, and return its result (or raise its error).

    torch's OpenMP pool belongs to the thread that uses it. A long-lived second thread running parallel torch
    ops (a thread-pool worker, a watcher loop) would keep a second pool alive, and with more OpenMP threads
    than cores GNU OpenMP stops spinning at barriers, which slowed the serving thread's decode steps by about
    a third on 2 cores. A thread that ends frees its pool."""
    result: list = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            result.append(fn())
        except BaseException as e:  # handed back to the caller below
            errors.append(e)
    thread = threading.Thread(target=target, name=name)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return result[0]
