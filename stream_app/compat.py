"""Compatibility fixes for the embedded broker (Tansu). Applied only when it is in use.

1. Parked fetches are not woken by new data: the broker re-checks after half the remaining wait,
   so with Faust's fixed 1,500 ms fetch wait every hop costs ~750 ms. We lower the wait of the
   worker consumer to ``fetch_max_wait_ms``.
2. ListOffsets(latest) returns the base offset of the last record batch + 1 instead of the high
   watermark when that batch holds several records. Faust uses it as the changelog highwater when
   recovering tables: a restart with local state dies with ConsistencyError, and changelog-only
   recovery drops the tail of the last batch. Fetch responses do report the right high watermark,
   so after the lookup we fetch one record at (end - 1) and take the watermark from the response.

Both are patches of Faust's aiokafka driver class, so they affect the whole process: they are
installed by the worker entry point, never on import.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

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


async def _true_high_watermarks(consumer, reported: Mapping) -> dict:
    """Correct the end offsets of non-empty partitions with the watermark of a real fetch."""
    import aiokafka

    nonempty = [tp for tp, end in reported.items() if end]
    if not nonempty:
        return dict(reported)
    client = consumer._client
    probe = aiokafka.AIOKafkaConsumer(
        bootstrap_servers=client._bootstrap_servers, enable_auto_commit=False,
        fetch_max_wait_ms=10, request_timeout_ms=client._request_timeout_ms,
        security_protocol=client._security_protocol, ssl_context=client._ssl_context,
        sasl_mechanism=client._sasl_mechanism,
        sasl_plain_username=client._sasl_plain_username,
        sasl_plain_password=client._sasl_plain_password,
    )
    corrected = dict(reported)
    await probe.start()
    try:
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
