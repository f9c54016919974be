"""A seek to the committed offsets puts a partition without one back at its start
(``stream_app/fair_fetch.py``, :func:`rewind_uncommitted`): on a real broker, where aiokafka's
own seek leaves it past records a dropped poll took, and through ``create_app``'s consumer."""

from __future__ import annotations

import asyncio
import uuid
from types import SimpleNamespace

from aiokafka import AIOKafkaConsumer
from aiokafka.consumer.fetcher import OffsetResetStrategy
from aiokafka.errors import IllegalStateError, KafkaError
from aiokafka.structs import TopicPartition
from kafka import KafkaProducer

from stream_app.fair_fetch import rewind_uncommitted
from stream_app.kafka import aiokafka_config, client_config, ensure_topics


def test_a_partition_never_committed_goes_back_to_its_first_record(settings):
    """Five records on each of two partitions, all taken by a poll (as Faust's dropped poll
    takes them); partition 0 committed at 2, partition 1 never. aiokafka's seek to the
    committed offsets moves partition 0 back and leaves partition 1 past its records; the
    rewind puts partition 1 back at 0, and the same records are read again. Where the
    streams were given some of them, only the rest is read again."""
    topic = f"seeks-{uuid.uuid4().hex[:8]}"
    ensure_topics(settings, [topic])
    producer = KafkaProducer(**client_config(settings))
    for partition in (0, 1):
        for n in range(5):
            producer.send(topic, value=b"%d" % n, partition=partition)
    producer.flush()
    producer.close()
    first, second = TopicPartition(topic, 0), TopicPartition(topic, 1)

    async def run() -> tuple[dict, dict, list, dict, list, list]:
        consumer = AIOKafkaConsumer(group_id=f"g-{topic}", enable_auto_commit=False,
                                    auto_offset_reset="earliest", **aiokafka_config(settings))
        await consumer.start()
        try:
            consumer.assign([first, second])
            taken = 0
            for _ in range(50):
                batches = await consumer.getmany(timeout_ms=500)
                taken += sum(map(len, batches.values()))
                if taken == 10:
                    break
            assert taken == 10, f"the broker gave {taken} of the 10 records"
            await consumer.commit({first: 2})
            committed = await consumer.seek_to_committed()
            after_seek = {tp: await consumer.position(tp) for tp in (first, second)}
            rewound = await rewind_uncommitted(consumer, committed)
            after_rewind = {tp: await consumer.position(tp) for tp in (first, second)}
            again = await consumer.getmany(second, timeout_ms=2000)
            # the streams were given offsets 0-2 of the five: the rest is read again, not all
            await rewind_uncommitted(consumer, {second: None}, delivered={second: 2})
            rest = await consumer.getmany(second, timeout_ms=2000)
            return (committed, after_seek, rewound, after_rewind, [r.value for r in again[second]],
                    [r.value for r in rest[second]])
        finally:
            await consumer.stop()

    committed, after_seek, rewound, after_rewind, again, rest = asyncio.run(run())
    assert committed == {first: 2, second: None}
    assert after_seek == {first: 2, second: 5}  # aiokafka's own seek: the gap this closes
    assert rewound == [second]
    assert after_rewind == {first: 2, second: 0}
    assert again == [b"0", b"1", b"2", b"3", b"4"]
    assert rest == [b"3", b"4"]


class Recorded:
    """An aiokafka consumer as :func:`rewind_uncommitted` sees it: its reset policy, and the
    partitions it was asked to seek to their start."""

    def __init__(self, policy: int = OffsetResetStrategy.EARLIEST,
                 refuse: Exception | None = None):
        self._fetcher = type("Fetcher", (), {"_default_reset_strategy": policy})()
        self.refuse = refuse
        self.sought: list = []
        self.placed: dict = {}

    committed = {TopicPartition("t", 0): None, TopicPartition("t", 1): 7,
                 TopicPartition("t", 2): 0}

    async def seek_to_committed(self) -> dict:
        return dict(self.committed)

    def seek(self, partition, offset: int) -> None:
        self.placed[partition] = offset

    async def seek_to_beginning(self, *partitions) -> None:
        if self.refuse is not None:
            raise self.refuse
        self.sought.extend(partitions)


def test_only_the_earliest_policy_rewinds_and_a_failed_seek_is_left_as_it_was():
    """Another reset policy is not rewound; a partition lost to a rebalance meanwhile, or any
    error of the seek, leaves the positions as aiokafka's seek left them, without raising."""
    committed = {TopicPartition("t", 0): None, TopicPartition("t", 1): 3}
    latest = Recorded(OffsetResetStrategy.LATEST)
    assert asyncio.run(rewind_uncommitted(latest, committed)) == [] and latest.sought == []
    for error in (IllegalStateError("not assigned"), KafkaError("coordinator moved")):
        assert asyncio.run(rewind_uncommitted(Recorded(refuse=error), committed)) == []


def test_the_worker_apps_seek_to_committed_rewinds_the_uncommitted(tmp_path):
    """``create_app`` installs it: its consumer thread's seek to the committed offsets seeks
    the partitions without a committed offset (none, or 0) to their start, in the same
    thread call, and answers the committed offsets as before; one whose records Faust gave
    its streams up to an offset in this consumer generation, past that offset. A table's
    changelog, which the group never commits, is left where the recovery put it.

    An offset given in an older generation counts for nothing, whatever Faust's read offsets
    say: a revocation clears a partition's read offset while the drain loop waits on a
    delivery, and the loop writes that message's offset back; a rewind past it skipped what
    the old generation fetched and the intake dropped unacknowledged."""
    from stream_app.app import create_app
    from stream_app.engine import Engine
    from stream_app.settings import Settings
    from stream_app.worker import build_metrics

    settings = Settings(data_dir=tmp_path, broker="127.0.0.1:1", embedded_compat=True)
    engine = Engine(settings)
    app = create_app(settings, engine, build_metrics(engine))
    thread = app.consumer._thread
    kafka_consumer = Recorded()
    changelog = TopicPartition(next(iter(app.tables.changelog_topics)), 0)
    read = TopicPartition("t", 3)
    kafka_consumer.committed = {**Recorded.committed, changelog: None, read: None}
    app.consumer_generation_id = 2
    for tp, offset, generation in ((TopicPartition("t", 2), 7, 1), (read, 4, 2)):
        app.consumer.callback(SimpleNamespace(tp=tp, offset=offset,
                                              generation_id=generation)).close()
        app.consumer._read_offset[tp] = offset  # as the drain loop leaves it, stale or not
    thread._ensure_consumer = lambda: kafka_consumer
    calls = []

    async def call_thread(fun, *args, **kwargs):
        calls.append(fun)
        return await fun(*args, **kwargs)

    thread.call_thread = call_thread
    assert asyncio.run(thread.seek_to_committed()) == kafka_consumer.committed
    assert kafka_consumer.sought == [TopicPartition("t", 0), TopicPartition("t", 2)]
    assert kafka_consumer.placed == {read: 5}
    assert len(calls) == 1


def test_a_revocation_during_a_delivery_does_not_move_the_rewind_past_dropped_messages(tmp_path):
    """Faust's own drain loop, delivering a partition never committed, meets a revocation in
    the middle of a delivery: the loop writes that message's offset back as its read offset.
    The seek of the next generation still goes back to the partition's start, since the
    intake drops the messages the old generation fetched, unacknowledged."""
    from faust.types import TP

    from stream_app.app import create_app
    from stream_app.engine import Engine
    from stream_app.settings import Settings
    from stream_app.worker import build_metrics

    settings = Settings(data_dir=tmp_path, broker="127.0.0.1:1", embedded_compat=True,
                        learner_process=False)
    engine = Engine(settings)
    app = create_app(settings, engine, build_metrics(engine))
    consumer, tp = app.consumer, TP(settings.train_topic, 0)
    fetcher = SimpleNamespace(_stopped=asyncio.Event())
    given = consumer.callback  # the worker's, as the drain loop reads it

    async def deliver(message):  # the intake takes it; the rebalance begins at offset 3
        if message.offset == 3:
            asyncio.get_running_loop().create_task(consumer.on_partitions_revoked({tp}))

    async def revoked(partitions):  # the app's first steps of a revocation
        consumer.stop_flow()
        app.flow_control.suspend()

    async def getmany(timeout):
        for offset in range(6):
            if not consumer.flow_active:
                break
            yield tp, SimpleNamespace(tp=tp, topic=tp.topic, partition=0, offset=offset,
                                      generation_id=1)
        fetcher._stopped.set()

    consumer.callback = lambda message: (given(message).close(), deliver(message))[1]
    consumer._on_partitions_revoked = revoked
    consumer.getmany = getmany
    app.consumer_generation_id = 1
    asyncio.run(consumer._drain_messages(fetcher))
    assert consumer._read_offset[tp] == 3  # written back after the revocation cleared it
    app.consumer_generation_id = 2
    kafka_consumer = Recorded()
    kafka_consumer.committed = {TopicPartition(tp.topic, 0): None}
    consumer._thread._ensure_consumer = lambda: kafka_consumer

    async def call_thread(fun, *args, **kwargs):
        return await fun(*args, **kwargs)

    consumer._thread.call_thread = call_thread
    asyncio.run(consumer._thread.seek_to_committed())
    assert kafka_consumer.placed == {}
    assert kafka_consumer.sought == [TopicPartition(tp.topic, 0)]
