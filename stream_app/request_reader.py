"""Read the request topic with a consumer of its own, so answers do not queue behind events.

Faust's consumer reads every topic of an app in one loop: it hands a poll of up to 500 records
to the streams message by message and polls again only when the last one is delivered. While a
worker takes in a backlog, every poll is full of events and lasts as long as the ingest agent
takes to process them (~140 ms at 3,500 events/s), so a request read through it waited one or
two such polls before anything looked at it: p50 271 / p99 640 ms for 4 clients, while
answering took 3-11 ms (traced in ``docs/throughput.md``).

:class:`RequestReader` is an aiokafka consumer on the worker's event loop that reads only the
request topic and hands each request to the worker's answer as soon as a fetch brings it. It
joins no group: it is assigned by hand the request partitions whose numbers are the event
partitions the worker's Faust consumer holds. Requests are keyed by user like events, so
request partition p meets partition p of the history table, which lives where event
partition p is taken in (the request topic must have the events topic's partition count, as
:func:`~stream_app.kafka.ensure_topics` creates it). The reader follows Faust's rebalances: it
stops reading when partitions are revoked and reads the new set when the rebalance completes,
that is once the tables are recovered, as Faust resumed its own agents.

Offsets are committed under the group ``<app_id>-requests`` at most every ``commit_every_s``,
and whenever the assignment changes or the reader stops, each partition up to its first
request whose answer is not settled yet (the broker has neither taken it nor refused it):
at least once, so after a crash a request may be answered twice (clients keep the first
answer to an id), and never committed with its answer still in the producer's buffer. A
partition this group never committed is read from where the app's own consumer group left it
(the Faust agent that read requests before this reader did), else from its oldest request, as
Faust's consumer read it.

A poll shares its requests among the partitions with some buffered
(:func:`~stream_app.fair_fetch.fair_records`), so a flood on one partition does not hold the
others' answers. The periodic commit runs beside the answering; a change of partitions waits
for the coordinator (its commit, and the lookups of the committed offsets)
``COORDINATOR_WAIT_S`` in all: a refused or timed-out commit goes with the next, a lookup that
did not end starts a new consumer. A partition with ``MAX_UNSETTLED`` answers waiting behind
one the broker has not settled is paused until they settle.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from .compat import FetchWaitGuard, check_aiokafka
from .fair_fetch import fair_records
from .kafka import aiokafka_config, topic_partitions
from .settings import Settings

log = logging.getLogger(__name__)

#: most requests handed over from one fetch; a rebalance waits for the batch in hand
MAX_BATCH = 100
#: longest a change of partitions, or a stop, waits for the answers in flight before it
#: commits (those not settled by then are answered again by the partition's next reader)
SETTLE_WAIT_S = 5.0
#: longest wait for the group's coordinator (a commit, or a lookup of the committed offsets):
#: aiokafka retries both for as long as the coordinator is out of reach, and a change of
#: partitions waits for them inside Faust's rebalance
COORDINATOR_WAIT_S = 5.0
#: most requests of a partition answered while the answer of the oldest has not settled (the
#: broker neither took it nor refused it): past it the partition is paused until they settle,
#: instead of holding a task and an entry for every request a refusing broker leaves behind
MAX_UNSETTLED = 1000


def _left(deadline: float) -> float:
    """Seconds from now to ``deadline`` (monotonic), none below 0."""
    return max(deadline - time.monotonic(), 0.0)


def _loop_time(deadline: float) -> float:
    """``deadline`` (monotonic) on the running loop's clock."""
    return asyncio.get_running_loop().time() + _left(deadline)


async def keep_reading(read: Callable[[], Awaitable[None]], name: str,
                       retry_after_s: float) -> None:
    """``read()`` (one consumer's life) again and again until cancelled: a failure is logged
    and the next consumer starts after ``retry_after_s``."""
    while True:
        try:
            await read()
        except Exception:  # noqa: BLE001 - a reader must outlive its consumers
            log.exception("%s failed; starting again in %g s", name, retry_after_s)
        await asyncio.sleep(retry_after_s)

class RequestReader:
    """Feeds every request of the partitions it is told to follow to ``answer`` (an async
    callable taking the consumer record: ``key``, ``value``, ``topic``, ``partition``,
    ``offset``, ``timestamp`` in ms), one at a time, in offset order within a partition.

    ``answer`` may return an awaitable that settles once the answer is delivered (or its
    failure dealt with): the request is committed only after it, and after every request of
    its partition before it. ``answer`` should not raise (the worker's turns errors into
    error responses); if it, or what it returned, does, the error is logged and the request
    counts as handled.

    One request at a time: answering them concurrently (``asyncio.gather`` over a fetched
    batch) left the wait of requests during a backlog as it was (mean 40 against 35 ms, one
    run), since an answer's time is its CPU work on the loop."""

    def __init__(self, settings: Settings, answer: Callable[[Any], Awaitable[None]], *,
                 commit_every_s: float = 1.0) -> None:
        self.settings = settings
        self.topic = settings.topic_requests
        self.group_id = f"{settings.app_id}-requests"
        self._answer = answer
        self._commit_every_s = commit_every_s
        self._consumer: Any = None
        self._partitions: frozenset[int] = frozenset()
        self._generation = 0  # bumped by every change of the partitions read
        self._next: dict[Any, int] = {}  # partition -> offset after the last request handled
        # partition number -> offset after the last request handed to ``answer``, for the
        # partitions read now (the commits can lag it, behind answers not settled)
        self._handed: dict[int, int] = {}
        # partition -> (offset after a request, its answer's delivery), oldest first: answers
        # not known to be settled, and the requests after them
        self._unsettled: dict[Any, collections.deque[tuple[int, asyncio.Future | None]]] = {}
        self._committed_at = 0.0
        self._committing: asyncio.Task | None = None  # the last periodic commit
        self._consumer_failed = False  # its partitions could not be assigned: start anew
        self._lock = asyncio.Lock()  # a batch in hand, or a change of partitions
        self._guard = FetchWaitGuard(settings.worker_fetch_max_wait_ms) \
            if settings.compat_fixes else None

    @property
    def partitions(self) -> frozenset[int]:
        return self._partitions

    async def run(self, retry_after_s: float = 1.0) -> None:
        """Read and answer requests until cancelled. When the consumer fails (the broker out of
        reach, an error of the client) the failure is logged and a new consumer starts after
        ``retry_after_s``, from the last commit: a worker whose reader had died would go on
        taking events in and answer nothing."""
        await keep_reading(self._read, "the request reader", retry_after_s)

    async def _read(self) -> None:
        """One consumer's life: answer requests until cancelled or failed; commit what was
        answered on the way out."""
        from aiokafka import AIOKafkaConsumer

        consumer = AIOKafkaConsumer(
            group_id=self.group_id, client_id=self.group_id, enable_auto_commit=False,
            auto_offset_reset="earliest", fetch_max_wait_ms=self.settings.worker_fetch_max_wait_ms,
            **aiokafka_config(self.settings))
        self._consumer_failed = False
        try:
            await consumer.start()
            await self._check_partition_count(consumer)
            async with self._lock:
                self._consumer = consumer
                await self._assign()
            while True:
                batches = await self._poll(consumer, self.settings.fair_polls)
                if self._consumer_failed:
                    raise RuntimeError("the request partitions were not assigned")
                fetched_in = self._generation  # read as the poll returns, before any wait
                async with self._lock:
                    # a batch fetched before the partitions changed is read again from the
                    # commits made by that change; one fetched after it is the new set's
                    if fetched_in == self._generation:
                        await self._handle(batches)
                    self._pause_unsettled(consumer)
                    await self._commit(due_only=True)
                self._guard_fetch_wait()
        finally:
            try:
                async with self._lock:
                    await self._commit()
            finally:
                self._consumer = None
                await consumer.stop()  # also after a failed start: it closes what it opened

    @staticmethod
    async def _poll(consumer: Any, fair: bool = True) -> dict:
        """Up to ``MAX_BATCH`` requests: an equal share for each partition with requests buffered
        (:func:`~stream_app.fair_fetch.fair_records`; ``fair``, as ``STREAMREC_FAIR_POLLS`` says),
        else aiokafka's poll, which waits for the next fetch. aiokafka's own order hands out a
        partition's buffered fetch (up to a megabyte, thousands of requests) before the next
        partition's first request: one user's flood held every other partition's answers."""
        fetcher = getattr(consumer, "_fetcher", None)  # aiokafka 0.10-0.14's, as fair_fetch
        if fair and isinstance(getattr(fetcher, "_records", None), dict) and not fetcher._closed:
            with consumer._subscription.fetch_context():
                records = await fair_records(fetcher, None, MAX_BATCH)
            if records:
                return records
        return await consumer.getmany(timeout_ms=1000, max_records=MAX_BATCH)

    def _pause_unsettled(self, consumer: Any) -> None:
        """Pause a partition whose answers wait on more than ``MAX_UNSETTLED`` unsettled
        ones, resume it once they settled (its buffered requests are fetched again)."""
        self._advance()
        paused = consumer.paused()
        for tp in consumer.assignment():
            waiting = len(self._unsettled.get(tp, ()))
            if waiting >= MAX_UNSETTLED and tp not in paused:
                log.warning("%d answers of %s are not delivered yet: its requests wait", waiting,
                            tp)
                consumer.pause(tp)
            elif waiting < MAX_UNSETTLED and tp in paused:
                consumer.resume(tp)

    async def _check_partition_count(self, consumer: Any) -> None:
        """Log an error when the request topic's partition count is not the events topic's as
        the cluster reports it (``settings.partitions``, what the worker creates it with,
        while the cluster does not know it yet): requests on a partition numbered past the
        events' would never be read, and the others would not meet their users' histories."""
        count = len(await topic_partitions(consumer, self.topic))
        events = (len(await topic_partitions(consumer, self.settings.topic_events))
                  or self.settings.partitions)
        if count != events:
            log.error("the request topic %s has %d partitions and the events topic %s %d: "
                      "they must be equal (requests are read where their user's events are)",
                      self.topic, count, self.settings.topic_events, events)

    async def follow(self, partitions: Iterable[int]) -> None:
        """Read exactly these request partitions from now on (commits first what was answered,
        so a partition that moves to another worker is read there from the next request). Once
        it returns, no request of a partition left out is handed to ``answer``."""
        wanted = frozenset(partitions)
        async with self._lock:
            if wanted == self._partitions:
                return
            # none between two consumers: the next commits what stays. The coordinator's waits
            # of the commit and the assign share one deadline, inside Faust's rebalance
            deadline = await self._commit()
            for tp in [tp for tp in self._unsettled if tp.partition not in wanted]:
                del self._unsettled[tp]  # answers not settled in time: the next reader's
            # a commit naming a partition the consumer no longer holds is refused whole
            self._next = {tp: offset for tp, offset in self._next.items()
                          if tp.partition in wanted}
            self._partitions = wanted
            self._handed = {p: offset for p, offset in self._handed.items() if p in wanted}
            try:
                if self._consumer is not None:
                    await self._assign(deadline)
            except Exception:  # noqa: BLE001 - raised here, it would stop the rebalance
                log.exception("could not assign the request partitions %s; the reader "
                              "starts a new consumer", sorted(wanted))
                self._consumer_failed = True
            finally:  # after the assign's awaits: a batch fetched during them is dropped too
                self._generation += 1
        log.info("reading requests of partitions %s", sorted(wanted))

    async def _assign(self, deadline: float | None = None) -> None:
        """Assign the partitions followed, each from where it should be read; the lookups of
        the group's offsets wait for the coordinator until ``deadline`` (monotonic; None:
        ``COORDINATOR_WAIT_S`` from now), then raise TimeoutError (a new consumer tries
        again)."""
        from aiokafka import TopicPartition

        if deadline is None:
            deadline = time.monotonic() + COORDINATOR_WAIT_S
        partitions = [TopicPartition(self.topic, p) for p in sorted(self._partitions)]
        starts = await self._where_the_app_left_off(partitions, deadline)
        # no await from here to the seeks: a fetch in between would read from the oldest
        # request, and a getmany waiting meanwhile would hand those requests to be answered
        self._consumer.assign(partitions)
        for tp, offset in starts.items():
            self._consumer.seek(tp, offset)
            log.info("reading %s from offset %d, where the app's group left it", tp, offset)
        for tp in partitions:  # kept: on after what was handed, not from the commit (which
            if tp.partition in self._handed:  # an answer in flight holds back): no repeats
                self._consumer.seek(tp, self._handed[tp.partition])

    async def _where_the_app_left_off(self, partitions: list, deadline: float) -> dict:
        """Where to start each partition this reader's group never committed: where the app's
        own group committed it, if it did. A Faust agent of the app read requests until this
        reader replaced it, and an upgraded worker goes on from there instead of answering
        every retained request again. Others (a new app, or that lookup failing) start at the
        oldest request. A lookup still waiting at ``deadline`` raises TimeoutError."""
        from aiokafka.admin import AIOKafkaAdminClient

        fresh = [tp for tp in partitions if await asyncio.wait_for(
            self._consumer.committed(tp), _left(deadline)) is None]
        if not fresh:
            return {}
        admin = AIOKafkaAdminClient(client_id=self.group_id, **aiokafka_config(self.settings))
        try:
            async with asyncio.timeout_at(_loop_time(deadline)):
                await admin.start()
                offsets = await admin.list_consumer_group_offsets(self.settings.app_id,
                                                                  partitions=fresh)
        except TimeoutError:
            raise  # not "from the oldest": every retained request would be answered again
        except Exception:  # noqa: BLE001 - see the docstring
            log.warning("could not read the app's request offsets; reading %s from the oldest",
                        fresh, exc_info=True)
            return {}
        finally:
            await admin.close()
        return {tp: offsets[tp].offset for tp in fresh
                if tp in offsets and offsets[tp].offset >= 0}

    async def _handle(self, batches: dict) -> None:
        for tp, records in batches.items():
            if tp.partition not in self._partitions:
                continue
            for record in records:
                settles = None
                try:
                    settles = await self._answer(record)
                except Exception:  # noqa: BLE001 - the reader never stops for one request
                    log.exception("request at %s/%d/%d failed", record.topic, record.partition,
                                  record.offset)
                self._handled(tp, record.offset + 1, settles)
                self._handed[tp.partition] = record.offset + 1

    def _handled(self, tp: Any, next_offset: int, settles: Awaitable | None) -> None:
        """The request before ``next_offset`` is answered; committed once ``settles`` has,
        and the requests before it."""
        line = self._unsettled.get(tp)
        if settles is None and not line:
            self._next[tp] = next_offset
            return
        future = None if settles is None else asyncio.ensure_future(settles)
        self._unsettled.setdefault(tp, collections.deque()).append((next_offset, future))

    def _advance(self) -> None:
        """Move each partition's commit past its requests whose answers have settled, in
        order, up to the first that has not."""
        for tp, line in list(self._unsettled.items()):
            while line and (line[0][1] is None or line[0][1].done()):
                next_offset, future = line.popleft()
                if future is not None and not future.cancelled() and future.exception():
                    log.error("the answer before offset %d of %s failed: %r", next_offset, tp,
                              future.exception())
                self._next[tp] = next_offset
            if not line:
                del self._unsettled[tp]

    async def _settle(self, timeout_s: float) -> None:
        """Wait at most ``timeout_s`` for the answers in flight to settle."""
        futures = [future for line in self._unsettled.values() for _, future in line
                   if future is not None]
        if futures:
            await asyncio.wait(futures, timeout=timeout_s)

    async def _commit(self, due_only: bool = False) -> float | None:
        """Commit the offsets after the requests answered and settled (all, after a wait of
        at most ``SETTLE_WAIT_S`` for the answers in flight; or only when the last commit is
        ``commit_every_s`` old, with no wait, beside the answering: a coordinator out of reach
        must not stop it). A full commit first ends the periodic one under way (waited for,
        then cancelled), so that commits land in order, and waits for the coordinator
        ``COORDINATOR_WAIT_S`` in all; it returns that deadline (monotonic), for the
        coordinator's waits that follow it."""
        now = time.monotonic()
        if self._consumer is None or (
                due_only and now - self._committed_at < self._commit_every_s):
            return None
        if due_only and self._committing is not None and not self._committing.done():
            return None
        if not due_only:
            await self._settle(SETTLE_WAIT_S)
        deadline = time.monotonic() + COORDINATOR_WAIT_S
        if self._committing is not None and not self._committing.done():
            await asyncio.wait([self._committing], timeout=_left(deadline))
            self._committing.cancel()  # its offsets go with this commit
            await asyncio.wait([self._committing])
        self._advance()
        if not self._next:
            return deadline
        offsets, self._next = self._next, {}
        self._committed_at = now
        sending = self._send_commit(self._consumer, offsets, deadline)
        if due_only:
            self._committing = asyncio.ensure_future(sending)
        else:
            await sending
        return deadline

    async def _send_commit(self, consumer: Any, offsets: dict, deadline: float) -> None:
        """Commit ``offsets``, waiting until ``deadline`` at most. A commit that failed (or
        was cancelled) is logged, and its offsets go with the next one (a partition with no
        request after them would otherwise keep its old commit, and its requests would be
        answered again at the next rebalance)."""
        try:
            await asyncio.wait_for(consumer.commit(offsets), _left(deadline))
        except (Exception, asyncio.CancelledError) as error:  # noqa: BLE001 - see above
            log.warning("could not commit request offsets %s: %r", offsets, error)
            for tp, offset in offsets.items():
                self._next[tp] = max(offset, self._next.get(tp, offset))
            if isinstance(error, asyncio.CancelledError):
                raise

    def _guard_fetch_wait(self) -> None:
        """Fix 3 of :mod:`stream_app.compat` (embedded broker only): raise the fetch wait while
        a partition stands still below its high watermark."""
        if self._guard is not None and self._consumer is not None:
            check_aiokafka(self._guard, self._consumer, time.monotonic())
