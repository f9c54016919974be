"""The item model shared by the workers of one app (``STREAMREC_SHARE_ITEMS``).

Training examples are partitioned by item, so each worker's learner learns the items of the
training partitions it holds, and alone it would encode users and answer with those items
only: about 1/N of the catalogue with N workers. Shared, every worker publishes the rows of
the items it owns to the item-rows topic (keyed by item, compacted: each item's last row)
whenever they moved, at most every ``share_items_s``, and reads the whole topic, from its
beginning at every start, installing the rows of the items it does not own in its learner
(:meth:`stream_app.engine.Engine.install_rows`). The answers' replica follows them from the
learner's reports as it follows learning, so the index holds the whole catalogue.

An item is owned by the worker that holds its training partition *now*: after a rebalance
its new owner learns it on from the last row the old owner published, and the old owner takes
the new owner's rows from then on. What is not shared: the items' solve statistics (a new
owner starts them afresh, from that row as its prior), the user Gramian (each learner
estimates it from the users of its own examples, a sample of all users) and Deep Retrieval
(each worker's paths hold its own items). A row is sent as raw float32 (``wire.py``), never
pickled.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .compat import FetchWaitGuard, check_aiokafka
from .engine import Engine, LearnedReport, item_partition
from .kafka import aiokafka_config
from .request_reader import keep_reading
from .settings import Settings
from .wire import decode_item_row, encode_item_row

log = logging.getLogger(__name__)

Records = list[tuple[bytes, bytes]]


def install_records(engine: Engine, records: Records) -> LearnedReport | None:
    """:meth:`Engine.install_rows` of item-rows records (the last of an item's, when it comes
    twice); a record that does not decode is skipped and logged (only workers of this app
    write the topic, so one is damage or another model dimension). None when none decoded."""
    latest: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    bad = 0
    for key, value in records:
        try:
            latest[key.decode()] = decode_item_row(value, engine.settings.model_dim)
        except (ValueError, UnicodeDecodeError, AttributeError):
            bad += 1
    if bad:
        log.warning("skipped %d item rows that do not decode", bad)
    if not latest:
        return None
    rows, offsets = zip(*latest.values())
    return engine.install_rows(list(latest), np.stack(rows), np.stack(offsets))


class ItemSharing:
    """Publishes the owned rows a worker's engine moved and installs the others' rows.

    ``owned()`` gives the training partitions this worker holds now; ``install(records)``
    hands item-rows records (key, value) of items it does not own to its learner."""

    def __init__(self, settings: Settings, engine: Engine,
                 owned: Callable[[], frozenset[int]], install: Callable[[Records], None]
                 ) -> None:
        self.settings = settings
        self.engine = engine
        self._owned = owned
        self._install = install
        self._moved: set[int] = set()  # learner rows moved since the last publish
        self.published = 0
        self.installed = 0

    def note(self, report: LearnedReport) -> None:
        """The rows a report moved, item rows and input offsets: due at the next publish."""
        self._moved.update(report.delta.rows.tolist())
        self._moved.update(report.delta.input_rows.tolist())

    def due(self) -> Records:
        """Records of the rows moved since the last call whose items this worker owns."""
        if not self._moved:
            return []
        rows = np.fromiter(self._moved, dtype=np.int64, count=len(self._moved))
        self._moved.clear()
        owned = self._owned()
        ids, values, offsets = self.engine.rows_to_share(rows)
        records = [(item.encode(), encode_item_row(row, offset))
                   for item, row, offset in zip(ids, values, offsets)
                   if item_partition(item, self.settings.partitions) in owned]
        self.published += len(records)
        return records

    def foreign(self, records: Records) -> Records:
        """The records of items this worker does not own."""
        owned = self._owned()
        return [(key, value) for key, value in records
                if key is not None and value is not None
                and item_partition(key.decode(errors="replace"), self.settings.partitions)
                not in owned]

    async def read(self, retry_after_s: float = 1.0) -> None:
        """Install the other workers' rows from the item-rows topic until cancelled; a failed
        consumer is logged and started again (from the beginning: installing a row twice
        changes nothing)."""
        await keep_reading(self._read, "the item-rows reader", retry_after_s)

    async def _read(self) -> None:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        topic = self.settings.items_topic
        consumer: Any = AIOKafkaConsumer(
            client_id=f"{self.settings.app_id}-item-rows", enable_auto_commit=False,
            auto_offset_reset="earliest", fetch_max_wait_ms=self.settings.worker_fetch_max_wait_ms,
            **aiokafka_config(self.settings))
        guard = (FetchWaitGuard(self.settings.worker_fetch_max_wait_ms)
                 if self.settings.compat_fixes else None)
        try:
            await consumer.start()
            await consumer.topics()
            partitions = consumer.partitions_for_topic(topic) or ()
            consumer.assign([TopicPartition(topic, partition) for partition in partitions])
            await consumer.seek_to_beginning()
            while True:
                batches = await consumer.getmany(timeout_ms=1000, max_records=10_000)
                records = self.foreign([(record.key, record.value)
                                        for batch in batches.values() for record in batch])
                if records:
                    self._install(records)
                    self.installed += len(records)
                if guard is not None:
                    check_aiokafka(guard, consumer, time.monotonic())
        finally:
            await consumer.stop()
