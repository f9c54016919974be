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
import math
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
#: during the first read of the topic, the set of more than ``QUIET_COPY_ITEMS`` withdrawn
#: items is handed on at most every ``CATCH_UP_COPY_S``, and once read to the end: a copy per
#: fetch of a thousand records made a million withdrawals a read of quadratic time, which
#: held the loop hundreds of milliseconds a fetch and had not caught up after 30 s
QUIET_COPY_ITEMS = 10_000
CATCH_UP_COPY_S = 1.0


class Withdrawals:
    """The withdrawn items as of the records read so far; ``on_change`` is given the new set
    after each fetch that changed it, ``on_skip`` is called for each record skipped."""

    def __init__(self, settings: Settings,
                 on_change: Callable[[frozenset[str]], None] = lambda items: None,
                 on_skip: Callable[[], None] = lambda: None) -> None:
        self.settings = settings
        self.items: frozenset[str] = frozenset()  # as last handed on
        self._items: set[str] = set()  # as read
        self._changed = False  # since it was handed on
        self._handed_at = -math.inf  # monotonic
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
        """Records (``key``, ``value``) in topic order: each item's last record decides. The
        set is handed on (``items``, ``on_change``) when it changed, but for the pauses of a
        long first read (:data:`QUIET_COPY_ITEMS`)."""
        for record in records:
            change = self._change_of(record)
            if change is not None and (change[0] in self._items) != change[1]:
                item, withdrawn = change
                if withdrawn:
                    self._items.add(item)
                else:
                    self._items.discard(item)
                self._changed = True
        quiet = (not self.caught_up.is_set() and len(self._items) > QUIET_COPY_ITEMS
                 and time.monotonic() - self._handed_at < CATCH_UP_COPY_S)
        if not quiet:
            self._hand_on()

    def _hand_on(self) -> None:
        """Hand the set read on, if a record changed it since it was handed on last."""
        changed, self._changed = self._changed, False
        if changed and self._items != self.items:  # a withdrawal and its restoration: not
            self.items = frozenset(self._items)
            self._handed_at = time.monotonic()
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
        """Whether every partition is read to the end it had when the first reader started:
        its position, not its last record's offset (the last offset of a topic written in
        transactions is a marker no consumer is handed, and a log that retention emptied
        has none; it was never caught up, and each rebalance held answers 30 s)."""
        if self._catch_up is None or self.caught_up.is_set():
            return
        if all(self._next.get(partition, 0) >= end for partition, end in self._catch_up.items()):
            self._hand_on()
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
                records = [record for batch in batches.values() for record in batch]
                if records:  # none: nothing to compare, a fetch costs no pass over the set
                    self.take(records)
                for tp in consumer.assignment():
                    self._next[tp.partition] = await consumer.position(tp)
                if guard is not None:
                    check_aiokafka(guard, consumer, time.monotonic())
        finally:
            await consumer.stop()
