"""The fetch-wait guard (fix 3 of ``stream_app/compat.py``): its rule, and a reply client that
gets its answer on a real embedded broker where a client without it stands still for good."""

from __future__ import annotations

import asyncio
import time
import types
import uuid

import pytest
from aiokafka.structs import TopicPartition

from stream_app.client import RecClient, ResponseTimeout
from stream_app.compat import FetchWaitGuard, _fetch_states
from stream_app.kafka import ensure_topics

from .conftest import answer

TP = TopicPartition("responses", 0)
OTHER = TopicPartition("responses", 1)


def test_the_wait_doubles_once_a_partition_stands_still_below_its_watermark_for_the_stall_time():
    guard = FetchWaitGuard(5, stall_s=1.0)
    assert guard.check({TP: 100}, {TP: 150}, now=0.0) is None  # first sight: no verdict yet
    assert guard.check({TP: 100}, {TP: 150}, now=0.5) is None  # still since 0.5
    assert guard.check({TP: 100}, {TP: 150}, now=1.4) is None
    assert guard.check({TP: 100}, {TP: 150}, now=1.5) == 10
    assert guard.wait_ms == 10
    # the clock starts again at the new wait, from the next check
    assert guard.check({TP: 100}, {TP: 150}, now=2.0) is None
    assert guard.check({TP: 100}, {TP: 150}, now=2.9) is None
    assert guard.check({TP: 100}, {TP: 150}, now=3.0) == 20


def test_a_moving_caught_up_or_unfetched_partition_never_raises_the_wait():
    guard = FetchWaitGuard(5, stall_s=1.0)
    for step in range(10):  # moving, though behind
        assert guard.check({TP: 100 + step}, {TP: 500}, now=float(step)) is None
    for step in range(10, 20):  # standing still at the watermark: nothing to fetch
        assert guard.check({TP: 200}, {TP: 200}, now=float(step)) is None
    for step in range(20, 30):  # no fetch answered yet
        assert guard.check({TP: 200}, {TP: None}, now=float(step)) is None
    assert guard.wait_ms == 5


def test_one_stalled_partition_is_enough_and_the_wait_stops_at_its_cap():
    guard = FetchWaitGuard(400, cap_ms=1000, stall_s=1.0)
    raised = []
    for step in range(12):
        moving = {TP: 10 * step, OTHER: 7}
        raised.append(guard.check(moving, {TP: 10_000, OTHER: 9}, now=float(step)))
    assert [wait for wait in raised if wait is not None] == [800, 1000]
    assert guard.wait_ms == 1000


def test_a_zero_wait_rises_too():
    guard = FetchWaitGuard(0, stall_s=0.0)
    guard.check({TP: 1}, {TP: 5}, now=0.0)
    assert guard.check({TP: 1}, {TP: 5}, now=0.0) == 1


class _State:
    def __init__(self, position, highwater, paused=False, valid=True):
        self.position, self.highwater, self.paused = position, highwater, paused
        self.has_valid_position = valid


def _kafka_consumer(states: dict, *, buffered: dict | None = None, wait_ms: int = 10):
    """What the guard reads of an aiokafka consumer: its assignment's partition states and its
    fetcher (wait, buffered records)."""
    assignment = types.SimpleNamespace(tps=set(states), state_value=states.__getitem__)
    return types.SimpleNamespace(
        _fetcher=types.SimpleNamespace(_fetch_max_wait_ms=wait_ms, _records=buffered or {}),
        _subscription=types.SimpleNamespace(
            subscription=types.SimpleNamespace(assignment=assignment)))


def test_the_worker_guard_reads_only_partitions_that_fetch_now():
    """Paused partitions, partitions without a position and partitions with records buffered
    stand still on purpose and are left out of the guard's view."""
    kafka_consumer = _kafka_consumer(
        {TopicPartition("a", 0): _State(5, 9), TopicPartition("a", 1): _State(5, 9, paused=True),
         TopicPartition("a", 2): _State(5, 9, valid=False), TopicPartition("a", 3): _State(5, 9)},
        buffered={TopicPartition("a", 3): object()})
    positions, highwaters = _fetch_states(kafka_consumer, kafka_consumer._fetcher)
    assert positions == {TopicPartition("a", 0): 5}
    assert highwaters == {TopicPartition("a", 0): 9}


# -- on the embedded broker --------------------------------------------------------------------
async def _fill(bootstrap: list[str], topic: str, records: int) -> None:
    """``records`` small records in batches of two: many batches, as a reply topic gets."""
    from aiokafka import AIOKafkaProducer

    sink = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
    await sink.start()
    try:
        for _ in range(records // 2):
            sent = [await sink.send(topic, value=b"{}" + b" " * 600) for _ in range(2)]
            await asyncio.gather(*sent)
    finally:
        await sink.stop()


def test_a_reply_client_on_a_long_reply_topic_gets_its_answer(settings):
    """The reply topic is filled until a client with a 1 ms fetch wait and no guard stands
    still: its fetches come back empty while the high watermark is above its position. The
    guarded client, same wait, gets its answer and says how far it raised the wait."""
    settings = settings.replace(partitions=1, topic_responses=f"replies-{uuid.uuid4().hex[:8]}")
    ensure_topics(settings, [settings.topic_responses])
    unguarded = settings.replace(embedded_compat=False)  # the same broker, the guard off
    filled, stalled = 0, False
    while not stalled and filled < 60_000:
        asyncio.run(_fill(settings.bootstrap_servers, settings.topic_responses, 6_000))
        filled += 6_000
        with RecClient(unguarded, fetch_wait_ms=1) as plain:
            request_id = uuid.uuid4().hex
            answer(settings, request_id)
            try:
                plain.wait(request_id, timeout_s=3.0)
            except ResponseTimeout:
                stalled = True
    assert stalled, f"a 1 ms fetch wait still got answers after {filled} records"
    with RecClient(settings, fetch_wait_ms=1) as guarded:
        request_id = uuid.uuid4().hex
        started = time.monotonic()
        answer(settings, request_id)
        assert guarded.wait(request_id, timeout_s=30.0).request_id == request_id
        assert guarded.fetch_wait_ms > 1
        print(f"stalled after {filled} records; answer after {time.monotonic() - started:.1f} s "
              f"at a {guarded.fetch_wait_ms} ms wait")


@pytest.mark.parametrize("compat", [True, False])
def test_the_guard_comes_with_the_embedded_broker_only(settings, compat):
    ensure_topics(settings, [settings.topic_responses])
    with RecClient(settings.replace(embedded_compat=compat)) as client:
        assert (client._guard is not None) is compat


def test_the_worker_consumer_raises_its_fetcher_wait_after_standing_still(tmp_path):
    """``guard_fetch_wait`` on a Faust consumer: after each poll (here every one), the guard
    reads the aiokafka consumer's partitions and raises its fetcher's wait in place."""
    import faust

    from stream_app.compat import guard_fetch_wait

    app = faust.App(f"guard-{uuid.uuid4().hex[:6]}", broker="kafka://127.0.0.1:1",
                    datadir=str(tmp_path), web_enabled=False, autodiscover=False)
    consumer = app.consumer
    polls = []

    async def poll(kafka_consumer, active_partitions, timeout=None, max_records=None):
        polls.append(max_records)
        return {}

    consumer._thread._fetch_records = poll  # the stock poll, standing in for Faust's
    guard_fetch_wait(consumer, check_every_s=0.0)

    states = {TP: _State(5, 9)}
    kafka_consumer = _kafka_consumer(states, wait_ms=10)

    async def polls_over(seconds: float, count: int) -> None:
        for _ in range(count):
            assert await consumer._thread._fetch_records(kafka_consumer, set(),
                                                        max_records=7) == {}
            await asyncio.sleep(seconds / count)

    asyncio.run(polls_over(0.5, 3))
    assert kafka_consumer._fetcher._fetch_max_wait_ms == 10  # standing still for less than a second
    asyncio.run(polls_over(1.2, 3))
    assert kafka_consumer._fetcher._fetch_max_wait_ms == 20
    states[TP].position = 9  # caught up: nothing to raise for
    asyncio.run(polls_over(2.0, 5))
    assert kafka_consumer._fetcher._fetch_max_wait_ms == 20
    assert polls == [7] * 11
