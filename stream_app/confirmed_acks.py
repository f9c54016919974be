"""Event batches acknowledged only once the broker has everything they wrote.

A batch of events writes records of its own: its users' histories to the table's changelog,
its training messages, and its dead letters and re-routed events. Faust commits a message's
offset once it is acknowledged, and flushes the producer before it commits, but a flush waits
for the producer's deliveries without looking at how they ended: a record the broker refused,
or one that ran out of retries (``producer_request_timeout``), was logged, and the events that
wrote it were committed all the same. A history missing from the changelog is lost when its
worker dies (the next owner restores the table from the changelog), a lost training message
is an event the model never learns, a lost dead letter is a malformed event gone.

Here a batch is acknowledged once every record it wrote is delivered. A record whose delivery
failed (or whose send raised) is sent again, with a growing pause, until it is delivered; the
batch stays unacknowledged meanwhile, so Faust's commit stops before it and a worker that dies
reads it again. A changelog record is sent again with the history as stored now, not as it
was: a resend landing after a newer record of the same user would otherwise leave the older
history last in the changelog. Once a rebalance has passed, a changelog record is given up
and counted: the batch's acknowledgement no longer counts, and the partition's owner, maybe
this worker again, reads its events again and writes their histories anew (also a history
whose events it finds there already: ``stream_app.app.histories_to_write``).

A record that the broker keeps refusing (an ACL that denies the topic) holds its batch until
it is delivered, which can be long: Faust keeps the acknowledgements after the gap, and this
keeps the batches. Past ``HELD_LIMIT`` batches held, or ``HELD_BYTES_LIMIT`` bytes of their
messages, the ingest stops taking more (the lag and ``streamrec_ingest_unconfirmed_batches``
show it) rather than fill the memory, and goes on where it stopped once the broker takes the
records.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

#: seconds before the first resend of a failed record, doubled up to ``MAX_PAUSE_S``
FIRST_PAUSE_S = 0.5
MAX_PAUSE_S = 30.0
#: batches held before the ingest waits: far above the few in flight on a healthy broker
HELD_LIMIT = 1_000
#: bytes of the held batches' messages before the ingest waits: 1,000 batches of 256 events
#: of the largest size accepted (16 KiB) would be 4 GiB
HELD_BYTES_LIMIT = 256 * 1024 * 1024


@dataclass
class Sent:
    """Records handed to the producer for a batch: ``delivery`` ends when the broker has them
    (or raises why not); ``resend`` sends them again and returns the new delivery, or None
    when they must not be sent again."""

    record: str  # what they are, as the metrics label it: changelog, train, dead_letter, reroute
    delivery: asyncio.Future
    resend: Callable[[], Awaitable[asyncio.Future | None]]
    #: bytes ``resend`` keeps alive until the delivery (a training message, a dead letter),
    #: counted with the batch's events against ``limit_bytes``
    held_bytes: int = 0


async def until_delivered(records: list[Sent], metrics=None) -> None:
    """Wait until every one of ``records`` is delivered, sending again what fails: for a
    caller that acknowledges by returning (Faust's stream)."""
    confirmed = AcksAfterDelivery(lambda batch: None, metrics)
    confirmed.hold([], records)
    try:
        await confirmed.settled(None)
    finally:  # also when the agent is cancelled at a stop
        confirmed.close()


async def sent(record: str, send: Callable[[], Awaitable[asyncio.Future]],
               resend: Callable[[], Awaitable[asyncio.Future]] | None = None, *,
               held_bytes: int = 0) -> Sent:
    """``send()`` as a :class:`Sent`; a send that raises is a failed delivery, sent again
    later like any other, by ``resend`` (``send`` again where None)."""
    try:
        delivery = await send()
    except Exception as error:  # noqa: BLE001 - held, and sent again
        delivery = failed(error)
    return Sent(record, delivery, resend or send, held_bytes)


def held_size(messages: list, records: list[Sent]) -> int:
    """The bytes a batch held for its deliveries keeps alive: its messages' values, and what
    its records' resends would send again. Counting the events alone, the training
    messages (each example carries its user's history: 3 times the events at the default
    history, 68 at 300 events of long ids) took a worker to gigabytes under a limit of
    256 MiB while the broker refused them."""
    return (sum(len(message.value or b"") for message in messages)
            + sum(record.held_bytes for record in records))


class NotToBeSent(RuntimeError):
    """The delivery of a record that must not be sent at all (a changelog record of a
    consumer generation that has passed): given up at once, not sent again."""


def failed(error: BaseException) -> asyncio.Future:
    delivery = asyncio.get_running_loop().create_future()
    delivery.set_exception(error)
    return delivery


def taken_by_broker(delivery: asyncio.Future) -> bool:
    """Whether a send's delivery has come back as taken (done, not cancelled, no error)."""
    return delivery.done() and not delivery.cancelled() and delivery.exception() is None


class AcksAfterDelivery:
    """Holds each batch until the records it wrote are delivered, then acknowledges it, in
    the order the batches were held: Faust commits a partition up to its first gap in the
    acknowledged offsets, but it passes over a gap at the very start (no offset committed
    yet) or one offset wide, so a batch acknowledged before an earlier one could have its
    offsets committed over the earlier one's."""

    def __init__(self, ack: Callable[[list], None], metrics=None,
                 first_pause_s: float = FIRST_PAUSE_S, max_pause_s: float = MAX_PAUSE_S,
                 limit: int = HELD_LIMIT, limit_bytes: int = HELD_BYTES_LIMIT) -> None:
        self.ack = ack
        self.metrics = metrics
        self.first_pause_s = first_pause_s
        self.max_pause_s = max_pause_s
        self.limit = limit
        self.limit_bytes = limit_bytes
        # [batch, records left, bytes]
        self._held: collections.deque[list] = collections.deque()
        self.held_bytes = 0
        self._none_waiting = asyncio.Event()
        self._none_waiting.set()
        # clear while ``limit`` batches, or ``limit_bytes`` of them, are held: take no more
        self.room = asyncio.Event()
        self.room.set()
        self._retrying: set[asyncio.Task] = set()
        self._closed = False

    @property
    def waiting(self) -> int:
        """Batches held: taken in, not yet acknowledged."""
        return len(self._held)

    def hold(self, batch: list, records: list[Sent], size: int = 0) -> None:
        """Acknowledge ``batch`` once every one of ``records`` is delivered and every batch
        held before it is acknowledged: at once when that is so now, from a delivery's
        callback otherwise (no task per batch). ``size``: the batch's bytes, for
        ``limit_bytes``."""
        undelivered = [r for r in records if not taken_by_broker(r.delivery)]
        if not undelivered and not self._held:
            self.ack(batch)
            return
        entry = [batch, len(undelivered), size]
        self._held.append(entry)
        self.held_bytes += size
        self._none_waiting.clear()
        if self.waiting >= self.limit or self.held_bytes >= self.limit_bytes:
            self.room.clear()

        def one_delivered() -> None:
            entry[1] -= 1
            if entry[1] == 0:
                self._acknowledge_ready()

        for record in undelivered:
            self._follow(record, record.delivery, one_delivered, self.first_pause_s)

    def _acknowledge_ready(self) -> None:
        """The delivered batches at the head of the line, in order."""
        held = self._held
        while held and held[0][1] == 0:
            batch, _, size = held.popleft()
            self.held_bytes -= size
            self.ack(batch)
        if not held:
            self._none_waiting.set()
        if len(held) < self.limit and self.held_bytes < self.limit_bytes:
            self.room.set()

    async def settled(self, timeout_s: float | None) -> bool:
        """Wait until no batch is held (every one acknowledged), at most ``timeout_s``: a
        worker that stops lets its last commit take them. False if some still are."""
        try:
            await asyncio.wait_for(self._none_waiting.wait(), timeout_s)
        except asyncio.TimeoutError:
            return False
        return True

    def _follow(self, record: Sent, delivery: asyncio.Future, delivered: Callable[[], None],
                pause_s: float) -> None:
        def done(finished: asyncio.Future) -> None:
            if taken_by_broker(finished):
                delivered()
                return
            if self._closed:
                return
            if not finished.cancelled() and isinstance(finished.exception(), NotToBeSent):
                log.info("a %s record was not sent: %s", record.record, finished.exception())
                self._count("given_up", record)
                delivered()  # as a resend that gives up: the batch may be acknowledged
                return
            error = "cancelled" if finished.cancelled() else repr(finished.exception())
            # at the first failure and once the pause is at its longest, not at every retry
            # of every record (a refusing broker fails them all; the metric counts each)
            level = logging.WARNING if pause_s in (self.first_pause_s, self.max_pause_s) \
                else logging.DEBUG
            log.log(level, "a %s delivery failed (%s); sending it again in %.1f s",
                    record.record, error, pause_s)
            self._count("retried", record)
            task = asyncio.ensure_future(self._again(record, delivered, pause_s))
            self._retrying.add(task)
            task.add_done_callback(self._retrying.discard)

        delivery.add_done_callback(done)

    async def _again(self, record: Sent, delivered: Callable[[], None], pause_s: float) -> None:
        await asyncio.sleep(pause_s)
        if self._closed:
            return
        try:
            delivery = await record.resend()
        except Exception as error:  # noqa: BLE001 - sent again after the next pause
            delivery = failed(error)
        if delivery is None:
            log.warning("a %s record was not sent again: a rebalance has passed, and the "
                        "partition's owner reads the uncommitted events again", record.record)
            self._count("given_up", record)
            delivered()  # nothing more to wait for: the batch may be acknowledged
            return
        self._follow(record, delivery, delivered, min(2 * pause_s, self.max_pause_s))

    def close(self) -> None:
        """Stop sending anything again (the worker stops: what is still held is read again
        at its next start)."""
        self._closed = True
        for task in list(self._retrying):
            task.cancel()

    def _count(self, outcome: str, record: Sent) -> None:
        if self.metrics is not None:
            self.metrics.resends.labels(record.record, outcome).inc()

    def export(self, metrics) -> None:
        """Its gauge on the worker's metrics page."""
        metrics.gauge("streamrec_ingest_unconfirmed_batches",
                      "Event batches taken in whose records (histories' changelog, training "
                      "messages, dead letters) the broker has not yet confirmed: their offsets "
                      "are committed once it has.", lambda: self.waiting)
