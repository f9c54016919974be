"""Where the model stands in the training topic: the next offset to learn, per partition.

Kafka delivers a message again whenever its offset was not committed before a crash or a
rebalance (Faust drops the acknowledgements it has not committed when a partition is revoked),
and the item learner, unlike the histories (which recognise an event id they hold), would learn
a training message twice. So the positions are saved in the model's checkpoint file, in the
same atomic write as the rows they produced (what Kafka Streams and Flink do with their source
offsets): a message below its partition's position is one the model already holds, and is
skipped. The worker commits a training message only once a checkpoint holds it
(``stream_app/app.py``), so that a crash loses nothing either: between the two, each message
is learned once.

Positions belong to one topic: a checkpoint made on another training topic name starts with
none. A training topic deleted and made again restarts its offsets at 0, below every saved
position: its messages are then skipped (and counted) until they pass them; remove the
checkpoint's model file, or keep the topic, when that happens.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PREFIX = "stream_"


class StreamPositions:
    """Next offset to learn per partition of ``topic``; each message is let in once."""

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self._next: dict[int, int] = {}

    def admit(self, partitions: Sequence[int], offsets: Sequence[int]) -> list[bool]:
        """For each message (in the order taken), whether it is new: its offset is at or past
        its partition's position, which then moves past it."""
        fresh = []
        for partition, offset in zip(partitions, offsets):
            partition, offset = int(partition), int(offset)
            new = offset >= self._next.get(partition, 0)
            if new:
                self._next[partition] = offset + 1
            fresh.append(new)
        return fresh

    def next_offsets(self) -> dict[int, int]:
        return dict(self._next)

    def to_arrays(self) -> dict[str, np.ndarray]:
        partitions = np.array(sorted(self._next), dtype=np.int64)
        return {f"{PREFIX}topic": np.array(self.topic),
                f"{PREFIX}partitions": partitions,
                f"{PREFIX}next": np.array([self._next[p] for p in partitions.tolist()],
                                          dtype=np.int64)}

    def set_arrays(self, data: dict[str, np.ndarray]) -> None:
        """The positions saved in ``data``; none where it has none (a checkpoint from before
        they were saved) or where they were taken on another topic."""
        self._next = {}
        if f"{PREFIX}topic" not in data or str(data[f"{PREFIX}topic"]) != self.topic:
            return
        self._next = {int(p): int(n) for p, n in zip(data[f"{PREFIX}partitions"],
                                                     data[f"{PREFIX}next"])}
