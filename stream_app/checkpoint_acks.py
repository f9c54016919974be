"""Training messages committed once a checkpoint of the model holds what they taught.

Faust commits a message's offset once it is acknowledged. Acknowledged as it is handed to the
learner, a batch would be lost by a learner that died (or a worker killed with it) before its
next checkpoint: Kafka would have it as done, the model would not. Here a batch stays
unacknowledged until a checkpoint written after it is on the disk: a crash then delivers again
everything the checkpoint lacks, and the positions saved with the model
(:mod:`state.stream_positions`) skip what it holds. Each training message is learned once
across crashes, restarts and rebalances of one worker.

With ``STREAMREC_SHARE_ITEMS`` only a publish of the item rows acknowledges: the batches whose
learning the published rows hold are acknowledged once it is flushed. A checkpoint then counts
for this worker alone (the app's ``checkpointed`` leaves the acks): after a crash its items may
go to another worker, which starts them from the item-rows topic, not from this checkpoint.

The cost: offsets of the training topic are committed once per checkpoint
(``STREAMREC_CHECKPOINT_INTERVAL_S``) instead of every few seconds, so a restart reads up to
that much of the topic again (and skips it, cheaply, where the model holds it), and the
messages of that interval stay referenced here until then (their values are dropped once
handed to the learner; at most ``UNCOMMITTED_LIMIT`` of them).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable

from .batch_intake import BatchIntake

#: messages held unacknowledged before the learn task asks for an early checkpoint and waits
#: for it (a few hundred bytes each: their values are dropped); with sharing it asks for
#: nothing and waits for the next publish, which alone makes room. A checkpoint interval holds
#: far fewer (one training message per item partition and ingest batch); saves that keep
#: failing (a full disk), or with sharing publishes that keep failing, stop the intake here
#: instead of filling the memory.
UNCOMMITTED_LIMIT = 100_000


class AcksAfterCheckpoint:
    """Batches of one intake, numbered as they are handed to the learner, acknowledged when a
    checkpoint (with sharing, a publish of item rows) holding them is written."""

    def __init__(self, intake: BatchIntake, ask_checkpoint: Callable[[], None] = lambda: None,
                 limit: int = UNCOMMITTED_LIMIT) -> None:
        self.intake = intake
        self.ask_checkpoint = ask_checkpoint
        self.limit = limit
        self._pending: collections.deque[tuple[int, list]] = collections.deque()
        self.waiting = 0  # messages learned or being learned, not yet acknowledged
        self.room = asyncio.Event()  # clear while ``limit`` messages wait: take no more
        self.room.set()

    def handed(self, number: int, batch: list) -> None:
        """Batch ``number`` (increasing) is with the learner; its values are no longer
        needed here."""
        for message in batch:
            message.value = None
        self._pending.append((number, batch))
        self.waiting += len(batch)
        if self.waiting >= self.limit and self.room.is_set():
            self.room.clear()
            self.ask_checkpoint()

    def checkpointed(self, through: int) -> None:
        """A checkpoint (or a publish) holding every batch up to number ``through`` is
        written."""
        pending = self._pending
        while pending and pending[0][0] <= through:
            _, batch = pending.popleft()
            self.waiting -= len(batch)
            self.intake.ack(batch)
        if self.waiting < self.limit:
            self.room.set()

    def export(self, metrics) -> None:
        """Its gauge on the worker's metrics page."""
        metrics.gauge("streamrec_train_uncommitted_messages",
                      "Training messages handed to the learner whose offsets wait for a "
                      "checkpoint (with sharing, a publish of their rows) to hold them before "
                      "they are committed.", lambda: self.waiting)
