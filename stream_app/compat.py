"""Compatibility fixes for the embedded broker (Tansu). Applied only when it is in use.

1. Parked fetches are not woken by new data: the broker re-checks after half the remaining wait,
   so with Faust's fixed 1,500 ms fetch wait every hop costs ~750 ms. We lower the wait of the
   worker consumer to ``fetch_max_wait_ms``.
2. ListOffsets(latest) returns the base offset of the last record batch + 1 instead of the high
   watermark when that batch holds several records. Faust uses it as the changelog highwater when
   recovering tables: a restart with local state dies with ConsistencyError, and changelog-only
   recovery drops the tail of the last batch. Fetch responses do report the right high watermark,
   so after the lookup we fetch one record at (end - 1) and take the watermark from the response.

3. A fetch that takes the broker longer than its wait comes back empty. The memory storage
   lists every record batch of a partition on every fetch, so a fetch's cost grows with the
   partition; once it passes the wait, every fetch of that consumer returns nothing, from any
   offset, while the reported high watermark stays above its position: the consumer stalls for
   good. Measured with kafka-python on one partition of 2-record batches: a 5 ms wait stalls at
   30,000 records, 10 and 20 ms at 100,000, 50 ms does not (``docs/throughput.md``). A reply
   topic writes a batch or two per answer, so a client waiting on it with a 5 ms wait stopped
   receiving after about 25,000 answers. :class:`FetchWaitGuard` doubles a consumer's wait
   whenever its position has stood still below the high watermark for a second; the worker
   consumer gets it through :func:`guard_fetch_wait`, :class:`~stream_app.client.RecClient`
   in its own wait loop. A longer wait costs latency only where the broker had nothing yet to
   send (it parks such a fetch for the wait).

Fixes 1 and 2 are patches of Faust's aiokafka driver class, so they affect the whole process:
they are installed by the worker entry point, never on import. Fix 3 is installed on the
consumer instance of an app (``create_app``), with the embedded broker only.
"""

from __future__ import annotations

import asyncio
import logging
import time
import types
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)
_installed: dict[str, object] = {}


def install_embedded_broker_fixes(fetch_max_wait_ms: int) -> None:
    """Patch Faust's aiokafka driver for the embedded broker (idempotent)."""
    from faust.transport.drivers import aiokafka as driver

    thread_cls = driver.AIOKafkaConsumerThread
    if "create" not in _installed:
        _installed["create"] = thread_cls._create_worker_consumer
        _installed["highwaters"] = thread_cls._highwaters
    original_create = _installed["create"]
    original_highwaters = _installed["highwaters"]

    def _create_worker_consumer(self, transport):
        consumer = original_create(self, transport)
        consumer._fetch_max_wait_ms = fetch_max_wait_ms  # read by the fetcher at start()
        return consumer

    async def _highwaters(self, partitions):
        reported = await original_highwaters(self, partitions)
        if self.consumer.in_transaction:
            return reported
        return await _true_high_watermarks(self._ensure_consumer(), reported)

    thread_cls._create_worker_consumer = _create_worker_consumer
    thread_cls._highwaters = _highwaters
    log.info("embedded-broker fixes installed (fetch wait %d ms, exact end offsets)",
             fetch_max_wait_ms)


async def exact_end_offsets(consumer, partitions) -> dict:
    """An aiokafka consumer's ``end_offsets`` of ``partitions``, corrected as Faust's are
    (bug 1): a reader that tells old records from new by the end offsets it saw at its start
    would take the last batch's for new."""
    return await _true_high_watermarks(consumer, await consumer.end_offsets(partitions))


async def _true_high_watermarks(consumer, reported: Mapping) -> dict:
    """Correct the end offsets of non-empty partitions with the watermark of a real fetch."""
    import aiokafka

    nonempty = [tp for tp, end in reported.items() if end]
    if not nonempty:
        return dict(reported)
    client = consumer._client
    probe = aiokafka.AIOKafkaConsumer(
        bootstrap_servers=client._bootstrap_servers, enable_auto_commit=False,
        fetch_max_wait_ms=500,  # returns at once when the record is there (fix 3: not 10)
        request_timeout_ms=client._request_timeout_ms,
        security_protocol=client._security_protocol, ssl_context=client._ssl_context,
        sasl_mechanism=client._sasl_mechanism,
        sasl_plain_username=client._sasl_plain_username,
        sasl_plain_password=client._sasl_plain_password,
    )
    corrected = dict(reported)
    try:
        await probe.start()  # in the try: a start that fails has opened a client to close
        probe.assign(nonempty)
        for tp in nonempty:
            probe.seek(tp, reported[tp] - 1)
        pending = set(nonempty)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10.0
        while pending and loop.time() < deadline:
            await probe.getmany(*pending, timeout_ms=200)
            for tp in list(pending):
                watermark = probe.highwater(tp)
                if watermark is not None:
                    corrected[tp] = max(reported[tp], watermark)
                    pending.discard(tp)
        if pending:
            log.warning("could not confirm end offsets of %s; using the reported ones", pending)
    finally:
        await probe.stop()
    changed = {tp: (reported[tp], corrected[tp]) for tp in nonempty if corrected[tp] != reported[tp]}
    if changed:
        log.info("end offsets corrected from fetch watermarks: %s", changed)
    return corrected


class FetchWaitGuard:
    """Doubles a fetch wait (up to ``cap_ms``) each time some partition's position has stood
    still below its high watermark for ``stall_s`` (fix 3 of this module).

    Pure bookkeeping, fed by :meth:`check` with what the consumer knows; whoever owns the
    consumer applies the new wait. A partition counts as stalled from the second check that
    finds it behind at the same position, so a consumer that is merely polled rarely is not
    mistaken for a stalled one; after a raise, the clock starts again at the new wait."""

    def __init__(self, wait_ms: int, *, cap_ms: int = 1000, stall_s: float = 1.0) -> None:
        self.wait_ms = wait_ms
        self.cap_ms = cap_ms
        self.stall_s = stall_s
        self._positions: dict = {}
        self._stalled_since: dict = {}

    def check(self, positions: Mapping, highwaters: Mapping, now: float) -> int | None:
        """The new wait when it must rise, else None. ``positions`` and ``highwaters`` map
        each partition that can fetch now to its next offset and to the last high watermark
        seen (None before any fetch)."""
        stalled = {}
        for tp, position in positions.items():
            highwater = highwaters.get(tp)
            if highwater is not None and highwater > position == self._positions.get(tp):
                stalled[tp] = self._stalled_since.get(tp, now)
        self._positions = dict(positions)
        self._stalled_since = stalled
        if self.wait_ms >= self.cap_ms or all(now - since < self.stall_s
                                              for since in stalled.values()):
            return None
        self.wait_ms = min(self.cap_ms, max(1, self.wait_ms * 2))
        self._stalled_since = {}
        log.warning("fetches of %s stand still below the high watermark; fetch wait raised to "
                    "%d ms (the embedded broker answers a fetch that outlasts its wait with "
                    "nothing)", sorted(str(tp) for tp in stalled), self.wait_ms)
        return self.wait_ms


def guard_fetch_wait(consumer: Any, *, check_every_s: float = 0.5) -> None:
    """Give the aiokafka consumer behind a Faust consumer a :class:`FetchWaitGuard`, checked
    after its polls at most every ``check_every_s``, on the consumer's own thread. Paused
    partitions and partitions with records buffered are left out: they stand still on
    purpose."""
    thread = consumer._thread
    stock = thread._fetch_records
    guard: FetchWaitGuard | None = None
    checked = 0.0

    async def _fetch_records(self, kafka_consumer, active_partitions, timeout=None,
                             max_records=None):
        nonlocal guard, checked
        records = await stock(kafka_consumer, active_partitions, timeout=timeout,
                              max_records=max_records)
        now = time.monotonic()
        fetcher = getattr(kafka_consumer, "_fetcher", None)
        if now - checked >= check_every_s and fetcher is not None:
            checked = now
            if guard is None:
                guard = FetchWaitGuard(fetcher._fetch_max_wait_ms)
            check_aiokafka(guard, kafka_consumer, now)
        return records

    thread._fetch_records = types.MethodType(_fetch_records, thread)
    log.info("fetch-wait guard installed")


def check_aiokafka(guard: FetchWaitGuard, kafka_consumer: Any, now: float) -> None:
    """Check ``guard`` with what an aiokafka consumer knows and give its fetcher the raised
    wait, if any (the worker's consumer and the request reader)."""
    fetcher = kafka_consumer._fetcher
    raised = guard.check(*_fetch_states(kafka_consumer, fetcher), now)
    if raised is not None:
        fetcher._fetch_max_wait_ms = raised  # read for every fetch request it builds


def _fetch_states(kafka_consumer: Any, fetcher: Any) -> tuple[dict, dict]:
    """Positions and high watermarks of the assigned partitions that fetch now."""
    assignment = kafka_consumer._subscription.subscription
    assignment = assignment.assignment if assignment is not None else None
    if assignment is None:
        return {}, {}
    positions, highwaters = {}, {}
    for tp in assignment.tps:
        state = assignment.state_value(tp)
        if state.paused or not state.has_valid_position or tp in fetcher._records:
            continue
        positions[tp] = state.position
        highwaters[tp] = state.highwater
    return positions, highwaters
