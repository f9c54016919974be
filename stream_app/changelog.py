"""Table reads in one store lookup per partition, writes whose changelog records leave in one
produce batch per partition.

A Faust table write (``table[key] = value``) stores the value and sends one changelog record
through Faust's producer path: a pending message, a future, a delivery callback per record. At
one write per user per ingest batch that path was the largest single cost of a worker (a
sampling profile put Faust's producer buffer, aiokafka's sender and the callbacks at 28 % of the
event loop). :class:`BatchedTable` stores the same values in the table's local store and
appends the same records (same key, same JSON value, same partition) to one aiokafka record
batch per changelog partition. The values are serialized once, with the table's own
serializers, for the store and the record alike.

Reads have the same story: ``table.get(key)`` outside of Faust's per-event context looks the
key up in the store, then reads it (two rocksdb lookups, each through four layers of Faust's
mappings), and it was a quarter of the ingest agent's time. :meth:`BatchedTable.get_many` reads
all the users of a batch with one multi-get per partition, on the partition each user's event
came from: where Faust's own write puts the value, and where :meth:`BatchedTable.set` puts it.

Three Faust internals make this possible: the rocksdb store's ``_set`` (bytes onto the current
event's partition) and ``_db_for_partition`` (the partition's rocksdict), and the aiokafka
producer behind Faust's (``_ensure_producer``). Where a Faust version lacks one, reads and
writes take Faust's own path, one lookup or one changelog send per key: slower, never wrong.

Durability: the batches go into the producer Faust owns, and :meth:`BatchedTable.flush`
returns each one's delivery; the ingest acknowledges its events once they are all delivered
(:mod:`stream_app.confirmed_acks`), so an event's offset is committed only after the history
it changed is on the broker. A batch whose delivery failed is sent again with its keys' values
as stored then (:meth:`BatchedTable.resend`). Recovery reads these records like any other
changelog record. After a batch is delivered, its base offset becomes the partition's
persisted offset (what a restart with local state resumes recovery from): replaying the rest
of that batch again is harmless, a key's last record wins.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import faust
import rocksdict
from faust.streams import _current_event  # see acting_for()
from faust.types import TP
from faust.utils import json as faust_json
from mode.utils.compat import want_bytes

from state.history import Unreadable

from .confirmed_acks import NotToBeSent, Sent, failed

log = logging.getLogger(__name__)
#: the key by which Faust's JSON marks a serialized model (``faust.models.base``)
FAUST_MODEL_KEY = "__faust"


class GenerationPassed(NotToBeSent):
    """A changelog record not sent: the consumer generation it was written in has passed
    (given up, as a resend gives up any record of a passed generation)."""


@contextlib.contextmanager
def acting_for(event: faust.EventT):
    """Make ``event`` Faust's current event while a batch member is processed.

    Faust stores a table value (and writes a changelog record) on the partition of the
    *current* event. Inside ``take_events`` the current event is the last one buffered, so
    without this every user of a batch would be stored on that event's partition, and after a
    rebalance the owner of a user's partition would not find the user's history.
    """
    token = _current_event.set(weakref.ref(event))
    try:
        yield
    finally:
        _current_event.reset(token)


class BatchedTable:
    """Reads and writes of one Faust table; the changelog records are sent in batches by
    :meth:`flush`.

    ``set`` stores at once (reads see the new value); ``flush`` must follow before the events
    that caused the writes are acknowledged, which an agent gets by flushing before it takes
    its next batch. One per table and agent; not shared between tasks.
    """

    def __init__(self, table: faust.Table) -> None:
        self.table = table
        # (consumer generation, partition): records written then (a value of None: a tombstone)
        self._pending: dict[tuple[int | None, int], list[tuple[bytes, bytes | None]]] = {}
        # per partition: a flush's sends, or a resend's read and sends
        self._sending: collections.defaultdict[int, asyncio.Lock] = collections.defaultdict(
            asyncio.Lock)
        # Faust's JSON codec called directly for what a history table has (untyped JSON keys
        # and values): the serializer registry around it was a tenth of the ingest agent's
        # time. Same bytes and values (tested); other schemas take the registry.
        self._plain_json = table.value_type is None and table.value_serializer == "json"
        self._plain_json_keys = table.key_type is None and table.key_serializer == "json"

    def _key_bytes(self, key: str) -> bytes:
        if self._plain_json_keys:
            return want_bytes(faust_json.dumps(key))
        table = self.table
        return table.app.serializers.dumps_key(table.key_type, key,
                                               serializer=table.key_serializer)

    def _value_bytes(self, value: Any) -> bytes:
        if self._plain_json:
            return want_bytes(faust_json.dumps(value))
        table = self.table
        return table.app.serializers.dumps_value(table.value_type, value,
                                                 serializer=table.value_serializer)

    def _value_of(self, stored: bytes) -> Any:
        """The value of stored bytes, or :class:`~state.history.Unreadable` with the reason
        for bytes that do not decode (a damaged record): one such value must not fail the
        reads of a whole batch, every time the key is read."""
        try:
            return self._decoded(stored)
        except Exception as error:  # noqa: BLE001 - the codec's errors vary by serializer
            return Unreadable(f"stored value does not decode: {error!r}"[:500])

    def _decoded(self, stored: bytes) -> Any:
        if self._plain_json:
            value = faust_json.loads(stored)
            if not (isinstance(value, dict) and FAUST_MODEL_KEY in value):
                return value  # a Faust model's record needs the registry to rebuild it
        table = self.table
        return table.app.serializers.loads_value(table.value_type, stored,
                                                 serializer=table.value_serializer)

    def get_many(self, events_by_key: dict[str, faust.EventT]) -> dict[str, Any]:
        """``table.get(key)`` of every key, each read on the partition of its event (where
        :meth:`set` and Faust's own writes put it); None for a key not stored there, as for
        Faust's own read while it processes an event of that partition."""
        table = self.table
        partition_db = getattr(table.data, "_db_for_partition", None)
        if partition_db is None:  # not the rocksdb store: Faust's own reads
            return {key: table.get(key) for key in events_by_key}
        by_partition: dict[int, list[str]] = {}
        for key, event in events_by_key.items():
            by_partition.setdefault(event.message.partition, []).append(key)
        found: dict[str, Any] = {}
        for partition, keys in by_partition.items():
            stored = partition_db(partition).get([self._key_bytes(key) for key in keys])
            for key, value in zip(keys, stored):
                found[key] = None if value is None else self._value_of(value)
        return found

    def get_on(self, key: str, partition: int) -> Any:
        """``table.get(key)`` outside any event (a request), read first on ``partition``: the
        history of a user whose requests are keyed like its events lives there. One store
        lookup and Faust's JSON codec, where Faust's own read outside an event checks the key
        with ``key_may_exist`` first, or every partition for a key it has not indexed, and
        decodes through the serializer registry (together about 7 % of an answer). A key not
        found there is read Faust's way, so a request sent to another partition still finds
        its history."""
        table = self.table
        database = getattr(table.data, "_dbs", {}).get(partition)  # only partitions held
        stored = None if database is None else database.get(self._key_bytes(key))
        return table.get(key) if stored is None else self._value_of(stored)

    async def count_keys(self, turn_every: int = 65_536) -> int:
        """How many keys the table holds on the partitions this worker has active: Faust's
        own count (``len(table.keys())``), read as raw keys of the rocksdb store. Faust's
        ``keys()`` decodes every key, on the event loop at every recovery: 0.65–0.94 s for
        200,000 here, against 0.08–0.10 s for the raw keys, which also give the loop a turn
        every ``turn_every`` keys. Faust's own count without the rocksdb store."""
        store = self.table.data
        actives = getattr(store, "_dbs_for_actives", None)
        visible = getattr(store, "_visible_keys", None)
        if actives is None or visible is None:
            return sum(1 for _ in self.table.keys())
        count = 0
        for db in list(actives()):  # a rebalance during a turn of the loop changes the map
            for _ in visible(db):
                count += 1
                if count % turn_every == 0:
                    await asyncio.sleep(0)
        return count

    def set(self, key: str, value: Any, event: faust.EventT) -> None:
        """Store ``table[key] = value`` on the partition of ``event`` (the key's partition) and
        queue its changelog record."""
        table = self.table
        if not hasattr(table.data, "_set"):  # not the rocksdb store: Faust's own write
            with acting_for(event):
                table[key] = value
            return
        key_bytes, value_bytes = self._key_bytes(key), self._value_bytes(value)
        with acting_for(event):  # the (rocksdb) store puts the bytes on the event's partition
            table.data._set(key_bytes, value_bytes)
        self._queue(event.message.partition).append((key_bytes, value_bytes))

    def set_many(self, writes: Iterable[tuple[str, Any, faust.EventT]]) -> None:
        """:meth:`set` of every ``(key, value, event)``, stored with one rocksdb write batch
        per partition (a put per key was a twentieth of the ingest agent's time); as
        :meth:`set` one by one where the store is not Faust's rocksdict store."""
        store = self.table.data
        if not self._rocksdict_store():
            for key, value, event in writes:
                self.set(key, value, event)
            return
        batches: dict[int, rocksdict.WriteBatch] = {}
        for key, value, event in writes:
            key_bytes, value_bytes = self._key_bytes(key), self._value_bytes(value)
            partition = event.message.partition
            if partition not in batches:
                batches[partition] = rocksdict.WriteBatch(raw_mode=True)  # as Faust's store
            batches[partition].put(key_bytes, value_bytes)
            store._key_index[key_bytes] = partition  # where Faust's _set records it
            self._queue(partition).append((key_bytes, value_bytes))
        for partition, batch in batches.items():
            store._db_for_partition(partition).write(batch)

    def delete_many(self, deletes: Iterable[tuple[str, faust.EventT]]) -> None:
        """Delete every ``(key, event)``'s key from the store of its event's partition, in one
        rocksdb write batch per partition, and queue its tombstone: a changelog record
        without a value, which Faust's recovery applies as a delete (and a compacted topic
        drops in time). Faust's own delete, one by one, where the store is not Faust's
        rocksdict store."""
        if not self._rocksdict_store():
            for key, event in deletes:
                with acting_for(event):
                    self.table.pop(key, None)
            return
        by_partition: dict[int, list[bytes]] = {}
        for key, event in deletes:
            by_partition.setdefault(event.message.partition, []).append(self._key_bytes(key))
        for partition, keys in by_partition.items():
            self._delete_keys(partition, keys)

    async def delete_where(self, doomed: Mapping[int, Callable[[bytes], bool]],
                           between: Callable[[], Awaitable[bool]],
                           turn_every: int = 256, turn_bytes: int = 1 << 20,
                           deleted: Callable[[int], None] = lambda count: None) -> int:
        """Delete every key of the partitions in ``doomed`` that this worker has active whose
        stored bytes the partition's ``doomed`` picks, and queue its tombstone; returns how many,
        and tells ``deleted`` each chunk's count in the step that deletes it (a count of the keys
        taken in a turn of the loop sees the store and the count agree). Reads ``turn_every``
        records at a time, fewer where they pass ``turn_bytes`` (a million histories take seconds;
        256 of 50 events hold the loop about 4 ms, 1,024 about 18: benchmarks/history_sweep.py; 256
        of 10,000 events held it over a second) and awaits ``between()`` after each chunk: the
        caller's turn, to flush the tombstones before anything else is written (a key's records
        must reach its changelog partition while this worker holds it, in the order they were
        made), and to say whether to go on (False: stop, a rebalance has begun). A chunk is read
        and deleted with no turn between: an event taken in during a turn is stored before the next
        chunk reads its user. The store's iterator is made again after each turn, from the last key
        read, never held across one: a revocation may close the partition meanwhile, and then its
        sweep stops. Nothing where the store is not Faust's rocksdict store."""
        store = self.table.data
        if not self._rocksdict_store():
            return 0
        total = 0
        for partition in self._active_partitions():
            after: bytes | None = None
            while partition in doomed and partition in self._active_partitions():
                records, more = self._records_after(store._dbs[partition], after, turn_every,
                                                    turn_bytes)
                chosen = [key for key, value in records
                          if key != store.offset_key and doomed[partition](value)]
                self._delete_keys(partition, chosen)
                deleted(len(chosen))
                total += len(chosen)
                if not await between():
                    return total
                if not more:
                    break
                after = records[-1][0]
                await asyncio.sleep(0)  # a turn of the loop, also when nothing was deleted
        return total

    @staticmethod
    def _records_after(database, after: bytes | None, count: int, max_bytes: int
                       ) -> tuple[list[tuple[bytes, bytes]], bool]:
        """The first ``count`` records of ``database`` past the key ``after`` (from the first
        where None, which may have been deleted since), fewer where their values pass
        ``max_bytes`` (at least one); and whether more follow."""
        records, size = [], 0
        for key, value in database.items(from_key=after):
            if key == after:
                continue
            if len(records) == count or (records and size >= max_bytes):
                return records, True
            records.append((key, value))
            size += len(value)
        return records, False

    def _active_partitions(self) -> list[int]:
        """The partitions of the table whose store is open here as an active (not a standby)."""
        topic = self.table.changelog_topic_name
        actives = self.table.app.assignor.assigned_actives()
        return [partition for partition in self.table.data._dbs
                if TP(topic, partition) in actives]

    def _rocksdict_store(self) -> bool:
        """Whether the table's store is Faust's rocksdict store, whose databases per
        partition and key index the batched writes, deletes and sweeps use; other stores
        (memory, or a Faust without them) take Faust's own one-by-one path."""
        store = self.table.data
        return (getattr(store, "use_rocksdict", False) and hasattr(store, "_key_index")
                and hasattr(store, "_db_for_partition") and hasattr(store, "_dbs"))

    def _delete_keys(self, partition: int, keys: list[bytes]) -> None:
        if not keys:
            return
        store, batch = self.table.data, rocksdict.WriteBatch(raw_mode=True)
        for key in keys:
            batch.delete(key)
            store._key_index.pop(key, None)
        store._db_for_partition(partition).write(batch)
        self._queue(partition).extend((key, None) for key in keys)

    def _client(self):
        """The aiokafka producer Faust flushes on commit; None if this Faust has none to
        give (the records then take Faust's own path, one send each)."""
        ensure = getattr(self.table.app.producer, "_ensure_producer", None)
        client = ensure() if ensure is not None else None
        return client if hasattr(client, "create_batch") else None

    @property
    def pending(self) -> int:
        return sum(map(len, self._pending.values()))

    async def flush(self) -> list[Sent]:
        """Hand every queued record to the producer, one record batch per partition (more
        when a batch fills up); returns each batch's :class:`Sent`, whose resend sends its
        keys' histories as stored then (:meth:`resend`). Empty where this Faust has no
        batching producer: the records then take Faust's own path, one send each, whose
        deliveries Faust follows. Where the producer is not there (a worker that stops), each
        partition's records are a failed delivery all the same, sent again by their resend
        while the consumer generation holds: a batch that wrote them is not acknowledged
        before the broker has them."""
        pending, self._pending = self._pending, {}
        try:
            client = self._client()
        except Exception as error:  # noqa: BLE001 - no producer (a stop): sent again later
            return [Sent("changelog", failed(error), functools.partial(
                self.resend, partition, generation, [key for key, _ in records]))
                for (generation, partition), records in pending.items()]
        if client is None:
            for (_, partition), records in pending.items():
                for key, value in records:
                    self.table.send_changelog(partition, key, value, key_serializer="raw",
                                              value_serializer="raw")
            return []
        sent = []
        # each partition's records bound to the consumer generation they were written in:
        # bound to the one of the flush, records a rebalance passed (written before it, or
        # sent after an earlier partition's wait) went out, or were sent again, as the next
        # generation's (an older history could land after the new owner's record, and a
        # failed send was never given up: every later batch waited behind it)
        for (generation, partition), records in pending.items():
            async with self._sending[partition]:
                try:
                    sent.extend(await self._send_records(client, partition, records,
                                                         generation))
                except Exception as error:  # noqa: BLE001 - held and sent again by its Sent
                    sent.append(Sent("changelog", failed(error), functools.partial(
                        self.resend, partition, generation, [key for key, _ in records])))
        return sent

    def _queue(self, partition: int) -> list[tuple[bytes, bytes | None]]:
        """The records waiting for the flush of ``partition`` written in this generation."""
        return self._pending.setdefault((self._generation(), partition), [])

    def _generation(self) -> int | None:
        return getattr(self.table.app, "consumer_generation_id", None)

    async def _send_records(self, client, partition: int,
                            records: list[tuple[bytes, bytes | None]],
                            generation: int | None) -> list[Sent]:
        """The records in record batches, each sent while ``generation`` (the consumer
        generation the records belong to, which their resends are bound to) holds."""
        topic = self.table.changelog_topic.get_topic_name()
        sent, keys = [], []
        batch = client.create_batch()
        for key, value in records:
            if batch.append(key=key, value=value, timestamp=None) is None:  # full
                sent.append(await self._send(client, batch, topic, partition, keys,
                                             generation))
                batch, keys = client.create_batch(), []  # an empty batch takes any one record
                batch.append(key=key, value=value, timestamp=None)
            keys.append(key)
        if batch.record_count():
            sent.append(await self._send(client, batch, topic, partition, keys, generation))
        return sent

    async def _send(self, client, batch, topic: str, partition: int, keys: list[bytes],
                    generation: int | None) -> Sent:
        batch.close()
        again = functools.partial(self.resend, partition, generation, keys)
        if self._generation() != generation:  # a rebalance since: its resend gives it up
            return Sent("changelog", failed(GenerationPassed(
                f"changelog partition {partition}: a rebalance came before the send")), again)
        try:
            delivery = await client.send_batch(batch, topic, partition=partition)
        except Exception as error:  # noqa: BLE001 - held and sent again by its Sent
            return Sent("changelog", failed(error), again)
        delivery.add_done_callback(lambda done: self._persisted(done, topic, partition))
        return Sent("changelog", delivery, again)

    async def resend(self, partition: int, generation: int | None,
                     keys: list[bytes]) -> asyncio.Future | None:
        """The changelog records of ``keys`` again, with their values as stored now in the
        partition's store (a tombstone for a key deleted); one delivery for them all. Sent
        while no flush of the partition is: a flush of a newer value then comes after it,
        and one of an older value before it or with a value no newer than this one.

        None, nothing sent, once the consumer generation that held the partition has passed:
        the batch's acknowledgement no longer counts, and the partition's owner (maybe this
        worker again) reads the uncommitted events again, writing their histories anew
        (:func:`stream_app.app.histories_to_write`). Raises, to be tried again later, while
        the store does not have the partition open (a stop, or a revocation before the
        next generation), or where this Faust has no batching producer."""
        async with self._sending[partition]:
            if generation != self._generation():
                return None
            database = getattr(self.table.data, "_dbs", {}).get(partition)
            client = self._client()
            if database is None or client is None:
                raise LookupError(f"the store of changelog partition {partition} is not open")
            # a key no longer stored was deleted since: its tombstone
            records = list(zip(keys, database.get(keys)))
            sent = await self._send_records(client, partition, records, generation)
        return asyncio.gather(*(each.delivery for each in sent))

    def _persisted(self, done, topic: str, partition: int) -> None:
        if done.cancelled() or done.exception() is not None:
            log.error("changelog batch to %s[%d] failed: %r", topic, partition,
                      None if done.cancelled() else done.exception())
        elif done.result() is not None:  # None: acks=0, no offset known
            held = getattr(self.table.data, "_dbs", None)
            if held is not None and partition not in held:
                return  # revoked: setting it would open the partition's store again
            self.table.data.set_persisted_offset(TP(topic, partition), done.result().offset)
