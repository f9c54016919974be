"""How far the ingest agent is behind its input, read from the batches it takes.

Each partition's lag is the high watermark its last fetch response reported minus the offset
after the last event the agent took from it; the worker's lag is their sum. A partition the
agent has not taken from for ``horizon_s`` no longer counts: it was revoked, or it ran dry
(its last batch then said so). The figure is exported as ``streamrec_ingest_lag_events`` and
tells index builds to wait during a backlog (``STREAMREC_INDEX_BACKLOG_EVENTS``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any


class IntakeLag:
    """Events not yet taken in, per partition, as of the last batch from each."""

    def __init__(self, highwater: Callable[[Any], int | None], horizon_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.highwater = highwater
        self.horizon_s = horizon_s
        self.clock = clock
        self._lag: dict[Any, tuple[int, float]] = {}  # partition -> (events behind, when)

    def observe(self, taken: Iterable[tuple[Any, int]]) -> None:
        """Record a batch: its (partition, offset) pairs, in any order."""
        last: dict[Any, int] = {}
        for partition, offset in taken:
            last[partition] = max(offset, last.get(partition, -1))
        now = self.clock()
        for partition, offset in last.items():
            try:
                end = self.highwater(partition)
            except Exception:  # noqa: BLE001 - a consumer that is stopping: no figure
                end = None
            if end is not None:
                self._lag[partition] = (max(0, end - offset - 1), now)

    def events(self) -> int:
        """The events behind, summed over the partitions taken from within ``horizon_s``."""
        oldest = self.clock() - self.horizon_s
        return sum(lag for lag, when in self._lag.values() if when >= oldest)
