"""A topic's messages from Faust's consumer to one task, in batches, without a Faust stream.

An agent over ``stream.take_events`` receives each message through four layers that the
ingest step never uses one by one: the conductor decodes it into an ``Event`` and puts it on
the topic's queue, the stream takes it off, calls the sensors, sets the current event and
acks the previous one, and ``take_events`` collects it into a batch. On this machine that was
the larger part of a worker's event loop: a bare agent that only counts the events of a topic
spent 266-303 µs of CPU per event with Faust's delivery and 105-139 µs with the worker's
direct delivery (``delivery.py``), and 22-39 µs when the messages went straight into batches
(``benchmarks/stream_roundtrip.py``'s bare agents, docs/throughput.md).

:class:`BatchIntake` puts its own handler where the conductor would put the compiled one for
each partition of the topic. The handler keeps what Faust's does for flow and durability:
it waits while the flow is suspended (a rebalance) and while the producer's buffer is over
its limit, and when more than ``capacity`` messages wait it stops the consumer fetching that
partition until half are taken (Faust's ``on_buffer_full``/``on_buffer_drop``); should the
consumer go on delivering (it ignores that call during a table recovery), a delivery waits
once twice ``capacity`` messages wait, a wait that a rebalance interrupts as Faust's own. Offsets are
committed by Faust as always, from acks: :meth:`BatchIntake.take` hands out a batch and marks
its messages in flight (what Faust's ``wait_empty`` waits for), :meth:`BatchIntake.ack`
acks them once the task has made their effects durable (the broker has confirmed the records
they wrote: :mod:`stream_app.confirmed_acks`; training messages, once a checkpoint holds what
they taught: :mod:`stream_app.checkpoint_acks`). A message fetched before a rebalance
(another generation) is dropped unacknowledged, as a Faust stream drops it: the partition's
new owner, or this worker after the seek to the committed offsets that follows every
assignment, reads it again.

Faust's sensors (its ``Monitor``) do not see these messages; the worker's own metrics count
them. The one figure of the monitor that Faust's consumer reads, the last time a partition's
stream took an event (its slow-processing check logs an error for a partition without one),
is kept for the batches. Installed on one app's conductor instance by :meth:`BatchIntake.install`, never on
Faust's classes; ``STREAMREC_BATCH_INTAKE=false`` keeps the ingest agent on Faust's stream,
and so does a Faust that lacks one of the internals used here (:meth:`BatchIntake.missing`,
logged as a warning).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Any

import faust
from faust.types import TP

log = logging.getLogger(__name__)


class BatchIntake:
    """Messages of ``topic`` in batches of at most ``batch_size``, each handed out as soon
    as it is full or ``wait_s`` after the take began to wait for it to fill."""

    def __init__(self, app: faust.App, topic: faust.TopicT, batch_size: int, wait_s: float,
                 capacity: int | None = None) -> None:
        self.app = app
        self.topic = topic
        self.batch_size = batch_size
        self.wait_s = wait_s
        self.capacity = capacity or 4 * batch_size
        self._waiting: collections.deque = collections.deque()
        self._arrived = asyncio.Event()
        self._filled = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._held_back: set = set()  # partitions whose fetching this intake stopped
        self._generation: int | None = None  # of the last message delivered

    @staticmethod
    def missing(app: faust.App) -> list[str]:
        """The Faust internals this intake needs that ``app`` lacks (none on the Faust this
        project pins; the worker takes Faust's stream when any is missing)."""
        from faust.transport.consumer import Consumer

        needs = {"conductor": (app.topics, ["_build_handler", "add"]),
                 "app": (app, ["flow_control", "consumer_generation_id"]),
                 "Consumer": (Consumer, ["on_buffer_full", "on_buffer_drop", "ack", "unacked"])}
        return [f"{owner}.{name}" for owner, (holder, names) in needs.items()
                for name in names if not hasattr(holder, name)]

    def install(self) -> None:
        """Subscribe the app to the topic and deliver its partitions' messages here."""
        conductor = self.app.topics
        stock = conductor._build_handler
        names = set(self.topic.topics)

        def build_handler(tp, channels):
            return self._deliver if tp.topic in names else stock(tp, channels)

        conductor._build_handler = build_handler
        conductor.add(self.topic)

    async def _deliver(self, message: Any) -> None:
        """What the conductor's handler would do before the stream, minus the stream."""
        app = self.app
        await app.flow_control.acquire()
        await app.producer.buffer.wait_until_ebb()
        if message.generation_id != self._generation:  # a rebalance resumed every partition
            self._generation = message.generation_id
            self._held_back.clear()
        waiting = self._waiting
        waiting.append(message)
        if len(waiting) == 1:
            self._arrived.set()
        if len(waiting) >= self.batch_size:
            self._filled.set()
        if len(waiting) >= self.capacity:
            if message.tp not in self._held_back:
                # Faust's own partition type: a message fetched by the fair poll carries
                # aiokafka's, and Faust's fetchable set asserts that it holds only its own
                tp = TP(message.tp.topic, message.tp.partition)
                self._held_back.add(tp)
                app.consumer.on_buffer_full(tp)
            if len(waiting) >= 2 * self.capacity:
                self._room.clear()
                await self._room.wait()

    async def take(self) -> list:
        """The next batch of current messages (never empty); they count as in flight until
        :meth:`ack`."""
        while True:
            if not self._waiting:
                self._arrived.clear()
                await self._arrived.wait()
            if len(self._waiting) < self.batch_size:
                self._filled.clear()
                try:
                    await asyncio.wait_for(self._filled.wait(), self.wait_s)
                except asyncio.TimeoutError:
                    pass
            await self.app.flow_control.acquire()  # not during a rebalance
            batch = self._current(self._pop())
            if batch:
                return batch

    def _pop(self) -> list:
        waiting = self._waiting
        batch = [waiting.popleft() for _ in range(min(self.batch_size, len(waiting)))]
        if len(waiting) < 2 * self.capacity:
            self._room.set()
        if self._held_back and len(waiting) <= self.capacity // 2:
            # after a rebalance Faust has set every partition's fetching anew (a recovery may
            # keep some paused, some may be another worker's now): nothing of ours to resume
            if self.app.consumer_generation_id == self._generation:
                for tp in self._held_back:
                    self.app.consumer.on_buffer_drop(tp)
            self._held_back.clear()
        return batch

    def _current(self, batch: list) -> list:
        """The messages of this consumer generation, marked in flight; the rest dropped."""
        generation = self.app.consumer_generation_id
        current = [message for message in batch if message.generation_id == generation]
        if len(current) < len(batch):
            log.info("dropped %d messages fetched before a rebalance (read again from the "
                     "committed offsets)", len(batch) - len(current))
        self.app.consumer.unacked.update(current)
        self._taken_from({message.tp for message in current})
        return current

    def _taken_from(self, partitions: set) -> None:
        """Tell Faust's slow-processing check that these partitions' events are taken."""
        inbound = getattr(getattr(self.app, "monitor", None), "stream_inbound_time", None)
        if inbound is not None:
            now = time.monotonic()
            for tp in partitions:
                inbound[tp] = now

    def ack(self, batch: list) -> None:
        """Let Faust commit past these messages; those of an older generation (a rebalance
        while the batch was processed) only leave the in-flight set."""
        consumer = self.app.consumer
        generation = self.app.consumer_generation_id
        for message in batch:
            if message.generation_id == generation:
                consumer.ack(message)
            else:
                consumer.unacked.discard(message)
