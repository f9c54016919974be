"""BatchedTable: the store and the changelog get the bytes Faust's own write would give, one
record batch per partition, and reads give what Faust's own read gives. The real broker path is
covered by tests/test_broker_integration.py (a fresh worker recovers every history from these
records); here the batching itself, and reads against a real rocksdb store."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
from types import SimpleNamespace

import faust
from aiokafka.producer.message_accumulator import BatchBuilder
from faust.serializers.registry import Registry
from faust.streams import current_event
from faust.types import TP

from stream_app.changelog import BatchedTable, GenerationPassed, acting_for


class RecordingStore:
    """Keeps what a rocksdb store's ``_set`` would put, per partition of the current event."""

    def __init__(self) -> None:
        self.by_partition: dict[int, dict[bytes, bytes]] = {}
        self.persisted: dict[tuple[str, int], int] = {}

    def _set(self, key: bytes, value: bytes) -> None:
        partition = current_event().message.partition
        self.by_partition.setdefault(partition, {})[key] = value

    def set_persisted_offset(self, tp, offset: int) -> None:
        self.persisted[(tp.topic, tp.partition)] = offset


class RecordingProducer:
    """aiokafka's create_batch/send_batch; every batch is delivered at the next offsets."""

    def __init__(self, batch_bytes: int) -> None:
        self.batch_bytes = batch_bytes
        self.sent: list[tuple[str, int, list[tuple[bytes, bytes]]]] = []
        self.end: dict[int, int] = {}

    def create_batch(self) -> BatchBuilder:
        return BatchBuilder(self.batch_bytes, compression_type=0, is_transactional=False)

    async def send_batch(self, batch, topic, *, partition):
        records = [(r.key, r.value) for r in _records_of(batch)]
        self.sent.append((topic, partition, records))
        base = self.end.get(partition, 0)
        self.end[partition] = base + len(records)
        delivery = asyncio.get_running_loop().create_future()
        delivery.set_result(SimpleNamespace(offset=base))
        return delivery


def _records_of(batch: BatchBuilder):
    from aiokafka.record.default_records import DefaultRecordBatch

    return list(DefaultRecordBatch(bytes(batch._build())))  # as the sender does


def make_table(batch_bytes: int):
    producer = RecordingProducer(batch_bytes)
    app = SimpleNamespace(serializers=Registry(),
                          producer=SimpleNamespace(_ensure_producer=lambda: producer))
    table = SimpleNamespace(app=app, data=RecordingStore(), key_type=None, value_type=None,
                            key_serializer="json", value_serializer="json", sent_alone=[],
                            changelog_topic=SimpleNamespace(get_topic_name=lambda: "h-changelog"))
    table.send_changelog = lambda partition, key, value, **codecs: table.sent_alone.append(
        (partition, key, value, codecs))
    return table, producer


class FakeEvent:  # weak-referenceable, as Faust's events are
    def __init__(self, partition: int) -> None:
        self.message = SimpleNamespace(partition=partition)


def event_on(partition: int) -> FakeEvent:
    return FakeEvent(partition)


def write_all(table, values: dict[str, tuple[dict, int]], queued: int | None = None) -> int:
    """Set every value, check that ``queued`` records (default: all) wait for the flush, flush;
    returns how many records the flush handed to the producer (one :class:`Sent`, delivered,
    for each record batch) or, without a batching producer, to the table's own path."""
    writer = BatchedTable(table)

    async def run() -> list:
        for key, (value, partition) in values.items():
            writer.set(key, value, event_on(partition))
        assert writer.pending == (len(values) if queued is None else queued)
        return await writer.flush()

    sent = asyncio.run(run())
    assert writer.pending == 0
    ensure = getattr(table.app.producer, "_ensure_producer", None)
    batches = ensure().sent if ensure is not None else []
    assert len(sent) == len(batches)
    assert all(record.record == "changelog" and record.delivery.result() for record in sent)
    return sum(len(records) for _, _, records in batches) + len(table.sent_alone)


def histories(n_users: int, partitions: int) -> dict[str, tuple[dict, int]]:
    return {f"u{u}": ({"items": [f"i{k}" for k in range(u % 7 + 1)], "phi": "AAAA"},
                      u % partitions) for u in range(n_users)}


def test_one_batch_per_partition_with_the_bytes_faust_would_write():
    table, producer = make_table(batch_bytes=1 << 20)
    values = histories(60, partitions=3)
    assert write_all(table, values) == 60
    assert sorted(partition for _, partition, _ in producer.sent) == [0, 1, 2]
    registry = Registry()
    for topic, partition, records in producer.sent:
        assert topic == "h-changelog"
        expected = {registry.dumps_key(None, key, serializer="json"):
                    registry.dumps_value(None, value, serializer="json")
                    for key, (value, p) in values.items() if p == partition}
        assert dict(records) == expected == table.data.by_partition[partition]
        assert all(json.loads(k) in values for k, _ in records)  # JSON keys, as Faust's
    # each partition's persisted offset: the base offset of its (only) batch
    assert table.data.persisted == {("h-changelog", p): 0 for p in range(3)}


def test_a_full_batch_starts_another_and_nothing_is_dropped():
    table, producer = make_table(batch_bytes=400)
    values = histories(50, partitions=2)
    assert write_all(table, values) == 50
    assert len(producer.sent) > 2  # split
    delivered = [key for _, _, records in producer.sent for key, _ in records]
    assert sorted(json.loads(k) for k in delivered) == sorted(values)
    # the last batch of each partition sets its persisted offset
    for partition in (0, 1):
        last_base = producer.end[partition] - len(
            [r for _, p, r in producer.sent if p == partition][-1])
        assert table.data.persisted[("h-changelog", partition)] == last_base


def test_a_record_larger_than_a_batch_goes_in_a_batch_of_its_own():
    table, producer = make_table(batch_bytes=200)
    values = {"u-a": ({"items": ["a"]}, 1), "u-big": ({"items": ["x" * 500]}, 1),
              "u-b": ({"items": ["b"]}, 1)}
    assert write_all(table, values) == 3
    assert [[json.loads(k) for k, _ in records] for _, _, records in producer.sent] == [
        ["u-a"], ["u-big"], ["u-b"]]
    assert len(table.data.by_partition[1]) == 3  # all stored


def test_without_a_batching_producer_records_take_fausts_own_path():
    """A Faust whose producer exposes no aiokafka client still gets every record, sent one
    by one through the table's own changelog path with the bytes already serialized."""
    table, producer = make_table(batch_bytes=1 << 20)
    table.app.producer = SimpleNamespace()  # no _ensure_producer
    values = histories(10, partitions=2)
    assert write_all(table, values) == 10
    assert producer.sent == []
    registry = Registry()
    assert sorted(table.sent_alone, key=lambda r: r[1]) == sorted(
        [(p, registry.dumps_key(None, key, serializer="json"),
          registry.dumps_value(None, value, serializer="json"),
          {"key_serializer": "raw", "value_serializer": "raw"})
         for key, (value, p) in values.items()], key=lambda r: r[1])


class PlainStore:
    """A store without ``_set`` or ``_db_for_partition``: Faust's own reads and writes."""


def test_without_a_bytes_store_writes_are_fausts_own():
    table, producer = make_table(batch_bytes=1 << 20)
    written = []

    class Table(SimpleNamespace):
        def __setitem__(self, key, value):
            written.append((key, value, current_event().message.partition))

    table = Table(**vars(table))
    table.data = PlainStore()
    values = histories(6, partitions=3)
    assert write_all(table, values, queued=0) == 0  # Faust sent each record itself
    assert written == [(key, value, p) for key, (value, p) in values.items()]
    assert producer.sent == []


def rocksdb_table(tmp_path, partitions: int = 4) -> faust.Table:
    """A Faust table on a real rocksdb store (no broker needed to read and write it)."""
    app = faust.App("changelog-test", store="rocksdb://", datadir=str(tmp_path),
                    autodiscover=False)
    return app.Table("histories", partitions=partitions,
                     schema=faust.Schema(key_serializer="raw", value_serializer="json"))


def test_reads_equal_fausts_own_read_for_the_events_partition(tmp_path):
    """get_many = Faust's ``table.get`` while it processes the key's event: values written on
    that partition (the bytes Faust's own write gives, see above), None for a key never written
    and for one stored on another partition."""
    table = rocksdb_table(tmp_path)
    batched = BatchedTable(table)
    rng = random.Random(7)
    for u in range(40):
        value = {"items": [f"i{rng.randrange(9)}" for _ in range(u % 5 + 1)], "phi": "AA"}
        batched.set(f"u{u}", value, event_on(u % 4))
    asked = {f"u{u}": event_on(u % 4) for u in range(0, 50, 2)}  # u40.. never written
    asked["u1"] = event_on(2)  # stored on partition 1
    oracle = {}
    for key, event in asked.items():
        with acting_for(event):
            oracle[key] = table.get(key)
    read = batched.get_many(asked)
    assert read == oracle
    assert read["u1"] is None and read["u42"] is None
    assert sum(value is not None for value in read.values()) == 20


def test_a_read_on_a_partition_equals_fausts_read_outside_an_event(tmp_path):
    """get_on = Faust's ``table.get`` with no event (a request): the value where it is stored,
    on the partition asked or, through Faust's own read, on another; None for a key never
    written; and Faust's own read for a partition this store does not hold."""
    table = rocksdb_table(tmp_path)
    batched = BatchedTable(table)
    for u in range(12):
        batched.set(f"u{u}", {"items": [f"i{u}"], "ts": [u / 3]}, event_on(u % 3))
    reader = BatchedTable(table)
    for u in range(14):
        for partition in (u % 3, (u + 1) % 3, 7):
            assert reader.get_on(f"u{u}", partition) == table.get(f"u{u}")
    assert reader.get_on("u4", 1) == {"items": ["i4"], "ts": [4 / 3]}
    assert reader.get_on("u13", 1) is None
    assert 7 not in table.data._dbs  # a read never opens a partition


def test_a_read_on_its_partition_takes_one_store_lookup(tmp_path):
    """The history found on the request's partition costs one ``get`` on that partition's
    database and nothing on the others (Faust's read checks ``key_may_exist`` first)."""
    table = rocksdb_table(tmp_path)
    BatchedTable(table).set("u1", {"items": ["i1"]}, event_on(1))
    calls = []

    class Counting:
        def __init__(self, database, partition):
            self.database, self.partition = database, partition

        def get(self, key):
            calls.append((self.partition, "get"))
            return self.database.get(key)

        def key_may_exist(self, key):
            calls.append((self.partition, "key_may_exist"))
            return self.database.key_may_exist(key)

    table.data._dbs = {p: Counting(db, p) for p, db in table.data._dbs.items()}
    assert BatchedTable(table).get_on("u1", 1) == {"items": ["i1"]}
    assert calls == [(1, "get")]


def test_without_a_partitioned_store_reads_are_fausts_own():
    table, _ = make_table(batch_bytes=1 << 20)
    asked = []

    class Table(SimpleNamespace):
        def get(self, key):
            asked.append(key)
            return {"items": [key]}

    table = Table(**vars(table))
    table.data = PlainStore()
    events = {"u1": event_on(0), "u2": event_on(1)}
    assert BatchedTable(table).get_many(events) == {"u1": {"items": ["u1"]},
                                                    "u2": {"items": ["u2"]}}
    assert asked == ["u1", "u2"]
    assert BatchedTable(table).get_on("u3", 0) == {"items": ["u3"]} and asked[-1] == "u3"


def test_set_many_stores_what_set_stores_in_one_batch_per_partition(tmp_path):
    """Same bytes on the same partitions as one ``set`` per key (Faust's ``_set``), the same
    changelog records queued, and Faust's own reads find the values (with and without the
    event's context, the latter through the store's key index)."""
    one_by_one = BatchedTable(rocksdb_table(tmp_path / "one"))
    batched = BatchedTable(rocksdb_table(tmp_path / "many"))
    rng = random.Random(11)
    writes = [(f"u{u}", {"items": [f"i{rng.randrange(9)}" for _ in range(u % 5 + 1)],
                         "ts": [1.5 * u], "phi": "AAé"}, event_on(u % 4)) for u in range(40)]
    for key, value, event in writes:
        one_by_one.set(key, value, event)
    batched.set_many(writes)
    assert batched._pending == one_by_one._pending
    for partition in range(4):
        expected = dict(one_by_one.table.data._db_for_partition(partition).items())
        assert dict(batched.table.data._db_for_partition(partition).items()) == expected
        assert len(expected) == 10
    for key, value, event in writes:
        with acting_for(event):
            assert batched.table.get(key) == value
        assert batched.table.get(key) == value  # no event: found through the key index
    assert batched.get_many({key: event for key, _, event in writes}) == {
        key: value for key, value, _ in writes}


def test_set_many_without_a_rocksdict_store_is_set_one_by_one():
    table, producer = make_table(batch_bytes=1 << 20)
    values = histories(12, partitions=3)
    writer = BatchedTable(table)
    writer.set_many((key, value, event_on(p)) for key, (value, p) in values.items())
    registry = Registry()
    for partition in range(3):
        assert table.data.by_partition[partition] == {
            registry.dumps_key(None, key, serializer="json"):
            registry.dumps_value(None, value, serializer="json")
            for key, (value, p) in values.items() if p == partition}
    assert writer.pending == 12


class Point(faust.Record, namespace="tests.changelog.Point"):
    x: int
    y: float


def test_codecs_called_directly_give_what_fausts_registry_gives(tmp_path):
    """Keys, values and decoded values equal the serializer registry's for a history table's
    schema, a Faust model's record included (it still goes through the registry)."""
    batched = BatchedTable(rocksdb_table(tmp_path))
    registry = Registry()
    for key in ["u1", "ünï-ç", ""]:
        assert batched._key_bytes(key) == registry.dumps_key(None, key, serializer="json")
    values = [{"items": ["a", "é"], "ts": [1.7e9, 0.1], "phi": ""}, {}, [1, 2], "s", 3.5,
              {"nested": {"k": [None, True]}}, Point(x=1, y=2.5).to_representation()]
    for value in values:
        stored = batched._value_bytes(value)
        assert stored == registry.dumps_value(None, value, serializer="json")
        assert batched._value_of(stored) == registry.loads_value(None, stored,
                                                                 serializer="json")
    point = batched._value_of(batched._value_bytes(Point(x=1, y=2.5).to_representation()))
    assert point == Point(x=1, y=2.5)


class RefusingProducer(RecordingProducer):
    """Refuses the deliveries (or, ``raising``, the sends) of the batches it is told to."""

    def __init__(self, refuse: set[int], raising: bool = False) -> None:
        super().__init__(1 << 20)
        self.refuse, self.raising, self.calls = refuse, raising, 0

    async def send_batch(self, batch, topic, *, partition):
        self.calls += 1
        if self.calls not in self.refuse:
            return await super().send_batch(batch, topic, partition=partition)
        if self.raising:
            raise BufferError("the producer's buffer is full")
        delivery = asyncio.get_running_loop().create_future()
        delivery.set_exception(TimeoutError("expired"))
        return delivery


def batched_on_rocksdb(tmp_path, producer) -> BatchedTable:
    batched = BatchedTable(rocksdb_table(tmp_path))
    batched._client = lambda: producer
    return batched


def test_a_refused_batch_is_sent_again_with_the_histories_as_stored_now(tmp_path):
    """The resend of a refused changelog batch carries each key's value as stored when it is
    sent again: a user written since then gets the newer history, so the changelog's last
    record of every key is the stored value, whichever record the broker took first."""
    producer = RefusingProducer(refuse={1})
    batched = batched_on_rocksdb(tmp_path, producer)

    async def run():
        for u in range(4):
            batched.set(f"u{u}", {"items": [f"i{u}"]}, event_on(0))
        [refused] = await batched.flush()
        assert isinstance(refused.delivery.exception(), TimeoutError)
        batched.set("u1", {"items": ["i1", "newer"]}, event_on(0))
        [newer] = await batched.flush()
        assert newer.delivery.result().offset == 0
        again = await refused.resend()
        await again
        return again

    again = asyncio.run(run())
    assert again.done() and not again.exception()
    stored = dict(batched.table.data._db_for_partition(0).items())
    # the resend's batch (at offset 1, after the newer record) is the persisted offset
    assert stored.pop(b"__faust\x00offset__") == b"1"
    last = {}
    for _, _, records in producer.sent:
        last.update(records)
    assert last == stored and len(stored) == 4
    assert json.loads(last[b'"u1"']) == {"items": ["i1", "newer"]}
    assert [len(records) for _, _, records in producer.sent] == [1, 4]


def test_a_send_that_raises_gives_a_failed_delivery_and_nothing_escapes(tmp_path):
    producer = RefusingProducer(refuse={1}, raising=True)
    batched = batched_on_rocksdb(tmp_path, producer)

    async def run():
        batched.set("u1", {"items": ["i1"]}, event_on(2))
        [refused] = await batched.flush()
        assert isinstance(refused.delivery.exception(), BufferError)
        await (await refused.resend())

    asyncio.run(run())
    assert producer.sent == [(producer.sent[0][0], 2, [(b'"u1"', b'{"items":["i1"]}')])]


def test_no_resend_once_the_generation_that_held_the_partition_has_passed(tmp_path):
    """After a rebalance the partition's next owner (maybe this worker again) restores it
    from the changelog and reads the uncommitted events again: a resend of this worker's
    values could land after that owner's newer ones."""
    producer = RefusingProducer(refuse={1})
    batched = batched_on_rocksdb(tmp_path, producer)

    async def run():
        batched.set("u1", {"items": ["i1"]}, event_on(3))
        [refused] = await batched.flush()
        batched.table.app.consumer_generation_id += 1  # a rebalance
        return await refused.resend()

    assert asyncio.run(run()) is None
    assert producer.sent == []


class RebalancingProducer(RefusingProducer):
    """Sends, and a rebalance comes while its first send waits (for the partition's batch
    before it to drain, as aiokafka's does)."""

    async def send_batch(self, batch, topic, *, partition):
        if not self.calls:
            self.table.app.consumer_generation_id += 1
        return await super().send_batch(batch, topic, partition=partition)


def test_a_flush_that_a_rebalance_interrupts_sends_no_partition_as_the_next_generation(
        tmp_path):
    """A flush sends one partition after another. Its later partitions' records, written
    in the generation before the rebalance, went out (or were sent again) as the next
    generation's: an older history could land after the new owner's record, and a failed
    send was never given up, every later batch waiting behind it. Now they are not sent,
    and their resend gives them up, as any record of a passed generation."""
    producer = RebalancingProducer(refuse=set())
    batched = batched_on_rocksdb(tmp_path, producer)
    producer.table = batched.table

    async def run():
        batched.set("u1", {"items": ["i1"]}, event_on(0))
        batched.set("u2", {"items": ["i2"]}, event_on(1))
        first, second = await batched.flush()
        assert first.delivery.result().offset == 0  # sent before the rebalance came
        assert "rebalance" in str(second.delivery.exception())
        return await second.resend()

    assert asyncio.run(run()) is None  # given up
    assert [partition for _, partition, _ in producer.sent] == [0]


def test_records_written_before_a_rebalance_and_flushed_after_it_are_not_sent(tmp_path):
    """A batch's writes and its flush may straddle a rebalance (a dead letter sent between
    two events of the one-at-a-time path, an expiry sweep waiting for the ingest's flush):
    bound to the flush's generation, its records went out as the next generation's. They
    are bound to the generation they were written in, and given up; those written after the
    rebalance go out."""
    producer = RefusingProducer(refuse=set())
    batched = batched_on_rocksdb(tmp_path, producer)

    async def run():
        batched.set("u1", {"items": ["old"]}, event_on(2))
        batched.table.app.consumer_generation_id += 1  # a rebalance before the flush
        batched.set("u2", {"items": ["new"]}, event_on(3))
        old, new = await batched.flush()
        assert isinstance(old.delivery.exception(), GenerationPassed)
        assert await old.resend() is None  # given up
        assert new.delivery.result().offset == 0

    asyncio.run(run())
    assert [partition for _, partition, _ in producer.sent] == [3]


def test_a_resend_while_the_store_is_closed_raises_to_be_tried_again(tmp_path):
    """Faust closes the partitions' stores when it stops (and when it revokes them, before
    the next generation): a resend then raises, so the batch stays unacknowledged (Faust's
    last commit stops before it; the next start reads its events again), and it goes out
    once the partition is open again in the same generation. The resend keeps no handle of
    its own: one kept alive would hold rocksdb's lock on the partition's files."""
    producer = RefusingProducer(refuse={1})
    batched = batched_on_rocksdb(tmp_path, producer)

    async def run():
        batched.set("u1", {"items": ["i1"]}, event_on(3))
        [refused] = await batched.flush()
        store = batched.table.data
        opened = store._dbs.pop(3)  # as the rocksdb store's revoke or stop does
        try:
            await refused.resend()
        except LookupError:
            pass
        else:
            raise AssertionError("a resend without the partition's store went out")
        store._dbs[3] = opened
        await (await refused.resend())

    asyncio.run(run())
    assert producer.sent == [(producer.sent[0][0], 3, [(b'"u1"', b'{"items":["i1"]}')])]


def test_a_flush_without_a_producer_is_a_failed_delivery_per_partition_sent_again_later(
        tmp_path):
    """A stopping worker's producer is gone (Faust raises where it would hand it out): the
    flush takes the records off the queue all the same and gives each partition's a failed
    delivery, whose resend sends the values as stored then once a producer is there. A later
    flush sends only what was written since."""
    producer = RecordingProducer(1 << 20)
    batched = batched_on_rocksdb(tmp_path, producer)

    def gone():
        raise RuntimeError("Producer service not yet started")

    async def run():
        batched.set("u1", {"items": ["i1"]}, event_on(0))
        batched.set("u2", {"items": ["i2"]}, event_on(1))
        batched._client = gone
        refused = await batched.flush()
        assert [type(each.delivery.exception()) for each in refused] == [RuntimeError] * 2
        assert batched.pending == 0
        batched._client = lambda: producer
        batched.set("u1", {"items": ["i1", "newer"]}, event_on(0))
        await (await refused[0].resend())
        [later] = await batched.flush()
        await later.delivery

    asyncio.run(run())
    assert [(partition, records) for _, partition, records in producer.sent] == [
        (0, [(b'"u1"', b'{"items":["i1","newer"]}')]),
        (0, [(b'"u1"', b'{"items":["i1","newer"]}')])]


class SlowProducer(RefusingProducer):
    """Its second send (the resend) yields to the loop before the batch joins the queue, as
    aiokafka's ``send_batch`` does while an earlier batch of the partition is queued."""

    entered = 0

    async def send_batch(self, batch, topic, *, partition):
        self.entered += 1
        if self.entered == 2:  # the resend
            await asyncio.sleep(0.01)
        return await super().send_batch(batch, topic, partition=partition)


def test_a_flush_during_a_resend_lands_after_it(tmp_path):
    """A newer value flushed while a resend of the key is on its way to the queue comes
    after the resend's (older) value: the changelog's last record is the newest."""
    producer = SlowProducer(refuse={1})
    batched = batched_on_rocksdb(tmp_path, producer)

    async def run():
        batched.set("u1", {"items": ["old"]}, event_on(0))
        [refused] = await batched.flush()
        resending = asyncio.ensure_future(refused.resend())
        await asyncio.sleep(0)  # the resend has read the store and waits to be queued
        batched.set("u1", {"items": ["new"]}, event_on(0))
        await batched.flush()
        await (await resending)

    asyncio.run(run())
    assert [json.loads(value) for _, _, records in producer.sent for _, value in records] == [
        {"items": ["old"]}, {"items": ["new"]}]


def test_a_stored_value_that_does_not_decode_reads_as_unreadable(tmp_path):
    """Bytes that are not the codec's (a damaged record) raised out of ``get_many``, failing
    the reads of a whole batch each time their key was read; they now read as
    :class:`~state.history.Unreadable`, with the reason, beside the others' values."""
    from state.history import Unreadable

    table = rocksdb_table(tmp_path)
    batched = BatchedTable(table)
    batched.set("good", {"items": ["a"]}, event_on(1))
    batched.set("bad", {"items": ["b"]}, event_on(1))
    table.data._db_for_partition(1)[batched._key_bytes("bad")] = b"{not json"
    read = batched.get_many({"good": event_on(1), "bad": event_on(1)})
    assert read["good"] == {"items": ["a"]}
    assert isinstance(read["bad"], Unreadable) and "decode" in read["bad"].reason
    assert isinstance(BatchedTable(table).get_on("bad", 1), Unreadable)


def test_the_keys_counted_raw_are_fausts_own_count_of_the_active_partitions(tmp_path):
    """The users a worker holds are counted at every recovery: Faust's ``keys()`` decoded
    each key (14 s a million, the event loop held); the raw count must equal it."""
    import asyncio

    from faust.types import TP

    table = rocksdb_table(tmp_path)
    batched = BatchedTable(table)
    for u in range(50):
        batched.set(f"u{u}", {"items": [f"i{u}"]}, event_on(u % 4))
    actives = {TP(table.changelog_topic_name, partition) for partition in (0, 1, 3)}
    table.app.assignor.assigned_actives = lambda: actives
    faust_count = sum(1 for _ in table.keys())
    assert faust_count == 50 - len(range(2, 50, 4))  # partition 2 is not active here
    assert asyncio.run(batched.count_keys(turn_every=7)) == faust_count

    async def rebalanced_meanwhile() -> int:  # a partition revoked during a turn of the loop
        async def revoke() -> None:
            await asyncio.sleep(0)
            table.data._dbs.pop(3)

        revoking = asyncio.create_task(revoke())
        count = await batched.count_keys(turn_every=1)
        await revoking
        return count

    assert asyncio.run(rebalanced_meanwhile()) == faust_count  # what it had taken to count


def test_a_delete_leaves_nothing_to_read_and_its_tombstone_is_sent_again_too(tmp_path):
    """delete_many removes each key from its partition's store (Faust's reads, with and
    without the event, and get_many find nothing) and queues a record without a value; a
    refused batch of tombstones is sent again as tombstones, so that the changelog's last
    record of every key is what the store holds (nothing for a key deleted)."""
    producer = RefusingProducer(refuse={3})
    batched = batched_on_rocksdb(tmp_path, producer)
    users = {f"u{u}": event_on(u % 2) for u in range(4)}

    async def run():
        batched.set_many((user, {"items": [user]}, event) for user, event in users.items())
        assert all(sent.delivery.result() for sent in await batched.flush())
        batched.delete_many([("u0", users["u0"]), ("u1", users["u1"]), ("never", event_on(1))])
        generation = batched._generation()  # the records' keys: (generation, partition)
        assert batched._pending == {(generation, 0): [(b'"u0"', None)],
                                    (generation, 1): [(b'"u1"', None), (b'"never"', None)]}
        refused, delivered = await batched.flush()  # partition 0's tombstone is refused
        assert isinstance(refused.delivery.exception(), TimeoutError) and delivered.delivery
        await (await refused.resend())

    asyncio.run(run())
    for user, event in users.items():
        with acting_for(event):
            assert (batched.table.get(user) is None) == (user in ("u0", "u1"))
        assert (batched.table.get(user) is None) == (user in ("u0", "u1"))
    assert batched.get_many(users) == {"u0": None, "u1": None, "u2": {"items": ["u2"]},
                                       "u3": {"items": ["u3"]}}
    for partition in (0, 1):
        last = {}
        for _, sent_to, records in producer.sent:
            if sent_to == partition:
                last.update(records)
        stored = dict(batched.table.data._db_for_partition(partition).items())
        stored.pop(b"__faust\x00offset__", None)
        assert {key: value for key, value in last.items() if value is not None} == stored
        assert {key for key, value in last.items() if value is None} == (
            {b'"u0"'} if partition == 0 else {b'"u1"', b'"never"'})
    assert [partition for _, partition, _ in producer.sent] == [0, 1, 1, 0]


def test_delete_many_without_a_rocksdict_store_is_fausts_own_delete():
    table, producer = make_table(batch_bytes=1 << 20)
    removed = []

    class Table(SimpleNamespace):
        def pop(self, key, default):
            removed.append((key, current_event().message.partition))

    table = Table(**vars(table))
    table.data = PlainStore()
    writer = BatchedTable(table)
    writer.delete_many([("a", event_on(2)), ("b", event_on(0))])
    assert removed == [("a", 2), ("b", 0)] and writer.pending == 0


def test_a_sweep_deletes_what_it_picks_on_the_active_partitions_a_chunk_at_a_time(tmp_path):
    """delete_where: every key of an active partition whose stored bytes its partition's
    predicate picks is deleted and its tombstone queued, the others, the partition without a
    predicate and the inactive partition untouched, the store's offset key never offered;
    ``between`` is awaited after each chunk (here it flushes) and the loop gets a turn
    there; the active partitions are those Faust's assignor gives this worker."""
    table = rocksdb_table(tmp_path)
    batched = BatchedTable(table)
    producer = RecordingProducer(1 << 20)
    batched._client = lambda: producer
    rng = random.Random(5)
    ages = {f"u{u}": rng.randrange(100) for u in range(1600)}
    batched.set_many((user, {"ts": [age]}, event_on(n % 4))
                     for n, (user, age) in enumerate(ages.items()))
    batched._pending.clear()
    changelog = table.changelog_topic.get_topic_name()
    table.data.set_persisted_offset(TP(changelog, 1), 7)
    table.app.assignor.assigned_actives = lambda: {TP(changelog, p) for p in (0, 1, 2)}
    offered, turns, betweens, chunks, told = [], [0], [0], [], []

    def older_than(limit: int):
        def old(stored: bytes) -> bool:
            offered.append(stored)
            return json.loads(stored)["ts"][0] < limit
        return old

    async def between() -> bool:
        betweens[0] += 1
        told.append(sum(chunks))  # each chunk told before its turn
        await batched.flush()
        return True

    async def other_task():
        while True:
            turns[0] += 1
            await asyncio.sleep(0)

    async def run() -> int:
        beside = asyncio.ensure_future(other_task())
        try:  # partition 2 active but no predicate (no event taken from it): not read
            return await batched.delete_where({0: older_than(30), 1: older_than(60),
                                               3: older_than(100)}, between, turn_every=50,
                                              deleted=chunks.append)
        finally:
            beside.cancel()

    deleted = asyncio.run(run())
    limits = {0: 30, 1: 60}
    doomed = {user for n, (user, age) in enumerate(ages.items())
              if n % 4 in limits and age < limits[n % 4]}
    assert deleted == len(doomed) and len(offered) == 800
    assert betweens[0] == 2 * 9 and turns[0] >= 2 * 8 - 2  # 400 a partition: 8 full chunks
    assert told == list(itertools.accumulate(chunks)) and sum(chunks) == deleted
    for n, user in enumerate(ages):
        with acting_for(event_on(n % 4)):
            assert (table.get(user) is None) == (user in doomed), user
    assert batched.pending == 0
    sent = {key for _, _, records in producer.sent for key, value in records if value is None}
    assert sent == {json.dumps(user).encode() for user in doomed}
    assert sum(map(len, (records for _, _, records in producer.sent))) == len(doomed)


def test_a_sweep_stops_when_its_caller_says_so_or_the_partition_is_revoked(tmp_path):
    users = [f"u{u}" for u in range(1200)]
    stores = iter(range(3))

    def sweep(between_answers: list[bool], revoke_after: int | None) -> int:
        batched = BatchedTable(rocksdb_table(tmp_path / str(next(stores))))
        batched.set_many((user, {"ts": [0]}, event_on(0)) for user in users)
        batched._pending.clear()
        calls = [0]
        batched._active_partitions = lambda: [] if revoke_after is not None and \
            calls[0] >= revoke_after else [0]

        async def between() -> bool:
            calls[0] += 1
            return between_answers[min(calls[0], len(between_answers)) - 1]

        return asyncio.run(batched.delete_where({0: lambda stored: True}, between,
                                                turn_every=100))

    assert sweep([True, True, False], None) == 300  # three chunks, then told to stop
    assert sweep([True], 2) == 200  # revoked after two chunks
    assert sweep([True], None) == 1200


def test_a_sweeps_chunk_ends_where_its_histories_pass_its_bytes(tmp_path):
    """A chunk of ``turn_every`` histories of 10,000 events each held the loop over a
    second: it also ends once the values read pass ``turn_bytes``."""
    batched = BatchedTable(rocksdb_table(tmp_path))
    batched.set_many((f"u{u}", {"ts": [0], "items": ["x" * 1000]}, event_on(0))
                     for u in range(100))
    batched._pending.clear()
    batched._active_partitions = lambda: [0]
    chunks = []

    async def between() -> bool:
        return True

    deleted = asyncio.run(batched.delete_where({0: lambda stored: True}, between,
                                               turn_every=100, turn_bytes=10_000,
                                               deleted=chunks.append))
    assert deleted == 100 and sum(chunks) == 100
    assert len(chunks) >= 9 and max(chunks) <= 10
