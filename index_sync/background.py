"""Threads for work that may wait: index builds and Deep Retrieval M-steps.

They run beside the work that must not wait (taking events in, learning, answering), on the
same cores: the index build thread was about a sixth of a worker's CPU samples in a profile of
``benchmarks/stream_roundtrip.py``, and at a million items a build holds a core for minutes. A
build at a lower CPU priority uses what the others leave; it then finishes later, and the items
that moved meanwhile are scored exactly by the serving index until it does. hnswlib releases
the interpreter lock while it builds, so a build waiting for a core does not hold up the event
loop. (At the benchmark's scale the priority made no measurable difference,
``docs/throughput.md``.)
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger(__name__)

#: highest nice value on Linux
MAX_NICE = 19


def background_executor(name: str, niceness: int) -> ThreadPoolExecutor:
    """One worker thread whose CPU priority is ``niceness`` below its process's (0: equal).
    Threads it starts (hnswlib's build threads) inherit the priority."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix=name,
                              initializer=lower_this_thread, initargs=(niceness,))


def lower_this_thread(niceness: int) -> None:
    """Raise the calling thread's nice value by ``niceness`` (Linux keeps a nice value per
    thread; elsewhere, or where it is refused, the thread keeps its priority)."""
    if niceness <= 0 or not hasattr(os, "setpriority"):
        return
    thread = threading.get_native_id()
    try:
        now = os.getpriority(os.PRIO_PROCESS, thread)
        os.setpriority(os.PRIO_PROCESS, thread, min(MAX_NICE, now + niceness))
    except OSError as error:
        log.warning("could not lower the priority of %s: %s",
                    threading.current_thread().name, error)
