"""Share each consumer poll among the partitions that have records waiting; and two fixes of
the positions a poll or a seek leaves behind.

aiokafka's fetcher hands out buffered records partition by partition, in the order their fetch
responses arrived, until a poll's ``max_records`` are used up; a partition keeps its place in
that order until it is drained. A fetch always brings a partition's first record batch whole,
however large (a producer's batch of 256 KiB holds about 2,000 events), so during a backlog the
event partitions filled every poll of 500 records and the training partitions behind them were
served only when an event partition happened to run dry. The learn agent then received nothing
for up to a second at a time while the ingest agent took events in, and the learner process
idled (traced poll by poll, ``docs/throughput.md``).

:func:`fair_records` first gives every partition with records waiting an equal share of the
poll (at least one record), then what is left of it in the fetcher's own order. It does so by
calling aiokafka's own ``fetched_records`` once per partition, so records keep their order
within a partition, positions move as they always do, and a poll with nothing buffered waits
for data exactly as before.

An optimization of Faust's aiokafka driver (``AIOKafkaConsumerThread._fetch_records``),
installed on the consumer of an app by :func:`install_fair_fetch`, nowhere else. It reads the
fetcher's buffer (``Fetcher._records``, aiokafka 0.10–0.14); a fetcher without one gets
aiokafka's own poll.

A fix goes with it, installed whether polls are shared or not
(:func:`install_active_only_polls`): a poll takes a partition's records only while the
partition is active. Faust hands the consumer's thread its live set of active partitions, and
the event loop goes on changing it. At the end of a table recovery Faust pauses the changelog
partitions before it resumes the others: a poll that ran (or waited for records) in between
saw an empty set, which aiokafka and the fair poll read as "every partition", and took the
records buffered for the topics still paused. Faust dropped them, their partitions not being
active, while their positions had moved past them; its seek to the committed offsets that
follows puts a position back only where an offset was committed. A worker restarted with
training messages not yet committed lost the first fetch of each training partition that way,
without a word (seen in a worker's log: a poll with no partition active returned 12 and 7
training records; the crash test of ``tests/test_broker_integration.py`` failed now and then).
Faust also drops the records of a poll that returns while a rebalance has stopped the flow
(one that waited across it, taking the new assignment's partitions before the recovery paused
them), and seeks back to the committed offsets, at once and again at the end of the recovery.
aiokafka's seek to the committed offsets leaves a partition without one where it is, past the
dropped records: a deployment's first events, or its training messages before the first
checkpoint, could be lost that way when a second worker joined. :func:`install_full_seeks` makes
that seek put such a partition back after the last record Faust gave its streams since the
assignment, or where the assignment started it when none (the group's reset policy,
"earliest": its first offset, where aiokafka starts every partition without a committed
offset at each rebalance anyway).
"""

from __future__ import annotations

import logging
import types
from collections.abc import Container, Mapping
from typing import Any

import faust
from aiokafka.consumer.fetcher import FetchError, FetchResult, OffsetResetStrategy
from aiokafka.errors import IllegalStateError

from .delivery import patch_consumer

log = logging.getLogger(__name__)


def install_fair_fetch(app: faust.App) -> None:
    """Make the consumer this app creates share each poll fairly (:func:`share_polls`)."""
    patch_consumer(app, share_polls)


def install_active_only_polls(app: faust.App) -> None:
    """Make the consumer this app creates poll only partitions active as their records are
    taken (:func:`poll_active_only`). Install it last: it wraps the patches of the poll
    installed before it."""
    patch_consumer(app, poll_active_only)


def install_full_seeks(app: faust.App) -> None:
    """Make the consumer this app creates seek a partition without a committed offset back to
    the first record its streams were not given, when Faust seeks to the committed offsets
    (:func:`seek_uncommitted_too`)."""
    patch_consumer(app, seek_uncommitted_too)


def seek_uncommitted_too(consumer: Any) -> None:
    """The consumer thread's seek to the committed offsets, followed in the same thread call
    by :func:`rewind_uncommitted` of the partitions it found none for, but for the tables'
    changelogs: the group never commits them (a table's store keeps how far it has read its
    changelog, and the recovery seeks there), and a standby replica would read its whole
    changelog again from the start."""
    thread = consumer._thread
    given = record_given(consumer)

    async def seek_to_committed(self):
        kafka_consumer = self._ensure_consumer()
        changelogs = set(consumer.app.tables.changelog_topics)

        async def seek():
            committed = await kafka_consumer.seek_to_committed()
            generation = consumer.app.consumer_generation_id
            await rewind_uncommitted(kafka_consumer, {
                tp: offset for tp, offset in committed.items() if tp.topic not in changelogs},
                delivered={tp: offset for tp, (of_generation, offset) in given.copy().items()
                           if of_generation == generation})  # a copy: the loop adds to it
            return committed

        return await self.call_thread(seek)

    thread.seek_to_committed = types.MethodType(seek_to_committed, thread)


def record_given(consumer: Any) -> dict:
    """Partition → (consumer generation, offset) of the last message the consumer's drain loop
    gave its streams, kept by wrapping its callback (read once, when the loop starts).

    Faust's own ``_read_offset`` cannot say this after a rebalance: the revocation clears a
    partition's entry while the drain loop waits on the delivery of a message, and the loop
    then writes that message's offset back. A rewind past it would skip what the old
    generation fetched and the intake dropped unacknowledged, never to be read again."""
    given: dict = {}
    stock = consumer.callback

    def callback(message):  # the coroutine as the stock one makes it: delivery's checks hold
        given[message.tp] = (message.generation_id, message.offset)
        return stock(message)

    consumer.callback = callback
    return given


async def rewind_uncommitted(kafka_consumer: Any, committed: dict,
                             delivered: Mapping | None = None) -> list:
    """Seek the partitions of ``committed`` (aiokafka's answer to a seek to the committed
    offsets: partition → offset) that have no committed offset back to the first record not
    delivered: past the last offset ``delivered`` names for it (the last offsets given to the
    streams in this consumer generation, :func:`record_given`), else to its first offset,
    where a group whose reset policy is "earliest" starts it; returns those partitions.
    Nothing for another policy. aiokafka's seek leaves such a partition (and one committed at
    0) where its last poll left it, and a seek to its start would deliver again what the
    streams took between the recovery's resume of the flow and its seek. A partition no
    longer assigned is left alone: its next assignment starts it from the reset policy. Never
    raises: a seek that fails leaves the positions as aiokafka's own seek did (logged), and
    the seek to the committed offsets goes on, where an error would stop a table recovery."""
    if kafka_consumer._fetcher._default_reset_strategy != OffsetResetStrategy.EARLIEST:
        return []
    uncommitted = [tp for tp, offset in committed.items() if not offset or offset < 0]
    last = {tp: (delivered or {}).get(tp) for tp in uncommitted}
    try:
        for tp, offset in last.items():
            if offset is not None:
                kafka_consumer.seek(tp, offset + 1)
        unread = [tp for tp, offset in last.items() if offset is None]
        if unread:
            await kafka_consumer.seek_to_beginning(*unread)
    except IllegalStateError:
        log.info("a rebalance took partitions of %s first", uncommitted)
        return []
    except Exception:  # noqa: BLE001 - the stock seek's result stands
        log.warning("could not seek %s back", uncommitted, exc_info=True)
        return []
    return uncommitted


class ActivePartitions:
    """Faust's live set of active partitions as a poll should read it: a partition is taken
    while it is in the set (a C-level lookup, atomic under the GIL, so the event loop's thread
    may change the set meanwhile), and the view is never empty (aiokafka reads an empty set as
    every partition)."""

    __slots__ = ("_live",)

    def __init__(self, live: Container) -> None:
        self._live = live

    def __contains__(self, tp: object) -> bool:
        return tp in self._live

    def __bool__(self) -> bool:
        return True


def poll_active_only(consumer: Any) -> None:
    """The consumer thread's poll reads the active partitions through
    :class:`ActivePartitions`, and takes nothing when none is active as it starts; ``None``
    (a client-only app) keeps meaning every partition. A partition paused while the poll
    waits for records is no longer taken (aiokafka checks the set at each wake-up)."""
    thread = consumer._thread
    inner = thread._fetch_records

    async def _fetch_records(self, kafka_consumer, active_partitions, timeout=None,
                             max_records=None):
        if active_partitions is not None:
            if not active_partitions:
                return {}
            active_partitions = ActivePartitions(active_partitions)
        return await inner(kafka_consumer, active_partitions, timeout=timeout,
                           max_records=max_records)

    thread._fetch_records = types.MethodType(_fetch_records, thread)


def share_polls(consumer: Any) -> None:
    """Replace the poll of the consumer's driver thread by one through :func:`fair_records`;
    Faust's own poll where the flow is suspended, the client is closing, no record limit is
    set or the fetcher keeps no buffer to read, and when nothing is buffered."""
    thread = consumer._thread
    stock = thread._fetch_records

    async def _fetch_records(self, kafka_consumer, active_partitions, timeout=None,
                             max_records=None):
        fetcher = kafka_consumer._fetcher
        buffered = getattr(fetcher, "_records", None)
        if (not self.consumer.flow_active or max_records is None or kafka_consumer._closed
                or fetcher._closed or not isinstance(buffered, dict)):
            return await stock(kafka_consumer, active_partitions, timeout=timeout,
                               max_records=max_records)
        with fetcher._subscriptions.fetch_context():
            records = await fair_records(fetcher, active_partitions, max_records)
        if records:
            return records
        return await stock(kafka_consumer, active_partitions, timeout=timeout,
                           max_records=max_records)

    thread._fetch_records = types.MethodType(_fetch_records, thread)
    log.info("fair polls across partitions installed")


async def fair_records(fetcher: Any, partitions: Container | None,
                       max_records: int) -> dict:
    """Up to ``max_records`` buffered records of ``partitions`` without waiting: an equal share
    for each partition that has some, then the rest of the budget in the fetcher's order.
    ``fetcher`` is aiokafka's ``Fetcher`` (its ``_records``: partition → buffered result).

    While an asked partition's buffered result is a fetch error, nothing is taken: aiokafka's
    own call (made when this returns nothing) hands out the results buffered before the error
    and then raises it, as it does without fair polls; a partition's next result queues
    behind the error. Raising here would drop the records taken from other partitions, whose
    positions have moved; and taking them while the error waited put it off for as long as
    they had records, the partition stalled without a word."""
    if _holds_error(fetcher, partitions):
        return {}
    waiting = _with_records(fetcher, partitions)
    if not waiting:
        return {}
    share = max(1, max_records // len(waiting))
    records: dict = {}
    left = max_records
    for tp in waiting:
        if left <= 0:
            break
        left -= _take(records, await fetcher.fetched_records({tp}, 0, min(share, left)))
    for tp in _with_records(fetcher, partitions):
        if left <= 0:
            break
        left -= _take(records, await fetcher.fetched_records({tp}, 0, left))
    return records


def _holds_error(fetcher: Any, partitions: Container | None) -> bool:
    return any(type(result) is FetchError for _, result in _buffered(fetcher, partitions))


def _with_records(fetcher: Any, partitions: Container | None) -> list:
    return [tp for tp, result in _buffered(fetcher, partitions) if type(result) is FetchResult]


def _buffered(fetcher: Any, partitions: Container | None) -> list:
    """(partition, buffered result) of the asked ``partitions`` (every one where None or
    empty, as aiokafka reads them), in the fetcher's order."""
    return [(tp, result) for tp, result in fetcher._records.items()
            if not partitions or tp in partitions]


def _take(records: dict, fetched: dict) -> int:
    """Add ``fetched`` to ``records`` (extending a partition's list); how many were added."""
    added = 0
    for tp, batch in fetched.items():
        records.setdefault(tp, []).extend(batch)
        added += len(batch)
    return added
