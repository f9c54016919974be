"""Items withdrawn from the catalogue (delisted, recalled, taken down): no worker answers with
them until they are restored.

Whoever owns the catalogue writes :class:`~stream_app.wire.ItemWithdrawal` records to the
withdrawn-items topic, keyed by the item: ``"withdrawn": true`` withdraws it, ``false`` (or a
record without a value, a tombstone) restores it. The topic is compacted, so it holds each
item's last word, and every worker reads all of it, from its beginning at each start, outside
any consumer group: the withdrawals are the same everywhere, whatever partitions a worker
holds. The model goes on learning withdrawn items from the events that name them, so an item
restored comes back as learned. A record that does not decode is logged, counted and skipped:
the topic is an operator's, and nothing of a user's is lost with it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from pydantic import ValidationError

from .compat import FetchWaitGuard, check_aiokafka
from .kafka import aiokafka_config, assign_whole_topic
from .request_reader import keep_reading
from .settings import Settings
from .wire import ItemWithdrawal, is_item_id

log = logging.getLogger(__name__)

#: longest the first answers of a worker wait for the withdrawn items to be read to the
#: topic's end; past it they are answered, and the wait is logged
CATCH_UP_WAIT_S = 30.0


class Withdrawals:
    """The withdrawn items as of the records read so far; ``on_change`` is given the new set
    after each fetch that changed it, ``on_skip`` is called for each record skipped."""

    def __init__(self, settings: Settings,
                 on_change: Callable[[frozenset[str]], None] = lambda items: None,
                 on_skip: Callable[[], None] = lambda: None) -> None:
        self.settings = settings
        self.items: frozenset[str] = frozenset()
        self.skipped = 0  # records that are not a withdrawal
        self._on_change, self._on_skip = on_change, on_skip
        self._next: dict[int, int] = {}  # partition: the offset a new consumer starts from
        # set once the topic is read to the end it had when the first reader started
        self.caught_up = asyncio.Event()
        self._catch_up: dict[Any, int] | None = None  # partition: end offset, until read

    async def wait_caught_up(self, timeout_s: float = CATCH_UP_WAIT_S) -> bool:
        """Wait until the withdrawals written before this start are read (True), or for
        ``timeout_s`` (False, logged): a worker that answered before would answer with items
        withdrawn, and one whose reader cannot read the topic must still answer."""
        try:
            await asyncio.wait_for(self.caught_up.wait(), timeout_s)
        except asyncio.TimeoutError:
            log.warning("the withdrawn items are not read after %.0f s: answering without "
                        "the rest of them", timeout_s)
            return False
        return True

    def take(self, records: Iterable[Any]) -> None:
        """Records (``key``, ``value``) in topic order: each item's last record decides."""
        items = set(self.items)
        for record in records:
            change = self._change_of(record)
            if change is not None:
                item, withdrawn = change
                if withdrawn:
                    items.add(item)
                else:
                    items.discard(item)
        if items != self.items:
            self.items = frozenset(items)
            self._on_change(self.items)

    def _change_of(self, record: Any) -> tuple[str, bool] | None:
        if record.value is None:  # a tombstone: the key's item is restored
            try:
                item = record.key.decode()
            except (AttributeError, UnicodeDecodeError):
                item = ""
            if is_item_id(item):
                return item, False
            return self._skipped(record, "a tombstone whose key is not an item id")
        try:
            withdrawal = ItemWithdrawal.model_validate_json(record.value)
        except ValidationError as error:
            return self._skipped(record, str(error.errors(include_url=False)[:3]))
        return withdrawal.item_id, withdrawal.withdrawn

    def _skipped(self, record: Any, reason: str) -> None:
        self.skipped += 1
        self._on_skip()
        log.warning("withdrawn-items record at %s[%s]@%s skipped: %s",
                    getattr(record, "topic", "?"), getattr(record, "partition", "?"),
                    getattr(record, "offset", "?"), reason[:300])
        return None

    def _note_caught_up(self) -> None:
        """Whether every partition is read to the end it had when the first reader started."""
        if self._catch_up is None or self.caught_up.is_set():
            return
        if all(self._next.get(partition, 0) >= end for partition, end in self._catch_up.items()):
            log.info("withdrawn items read: %d withdrawn", len(self.items))
            self.caught_up.set()

    async def read(self, retry_after_s: float = 1.0) -> None:
        """Follow the topic until cancelled; a failed consumer is logged and a new one goes on
        from where it left the topic."""
        await keep_reading(self._read, "the withdrawn-items reader", retry_after_s)

    async def _read(self) -> None:
        from aiokafka import AIOKafkaConsumer

        settings = self.settings
        consumer: Any = AIOKafkaConsumer(
            client_id=f"{settings.app_id}-withdrawn-items", enable_auto_commit=False,
            auto_offset_reset="earliest", fetch_max_wait_ms=settings.worker_fetch_max_wait_ms,
            **aiokafka_config(settings))
        guard = (FetchWaitGuard(settings.worker_fetch_max_wait_ms)
                 if settings.compat_fixes else None)
        try:
            await consumer.start()
            ends = await assign_whole_topic(consumer, settings.withdrawn_topic, self._next,
                                            settings, ends=self._catch_up is None)
            if self._catch_up is None:
                self._catch_up = {tp.partition: end for tp, end in ends.items() if end > 0}
            while True:
                self._note_caught_up()
                # a thousand records a fetch: the first read of a long topic gives the loop
                # a turn every few milliseconds
                batches = await consumer.getmany(timeout_ms=1000, max_records=1000)
                self.take(record for batch in batches.values() for record in batch)
                for tp, batch in batches.items():
                    if batch:
                        self._next[tp.partition] = batch[-1].offset + 1
                if guard is not None:
                    check_aiokafka(guard, consumer, time.monotonic())
        finally:
            await consumer.stop()
