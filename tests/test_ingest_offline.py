"""A batch of events through the worker's intake without a broker: what it hands the
producer when a part of it fails."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from faust.types import TP

from stream_app.confirmed_acks import taken_by_broker
from stream_app.engine import item_partition

from .conftest import event
from .test_app_timers import offline_app


def message(offset: int, value: bytes, user: str = "u1"):
    """An events message on partition 0, where the app's offline consumer puts every user."""
    return SimpleNamespace(topic="events", partition=0, offset=offset, key=user.encode(),
                           value=value, headers=[], tp=TP("events", 0), generation_id=1)


@pytest.mark.timeout(60)
def test_a_flush_the_producer_refuses_holds_the_batch_and_sends_nothing_twice(tmp_path):
    """A stopping worker's producer raises on the histories' flush. The batch then holds a
    failed changelog delivery, whose resend flushes again (the batch is acknowledged only
    once the broker has its histories), and is not taken again event by event: that sent
    the malformed event's dead letter twice and dead-lettered the valid events for the
    flush's error."""
    app = offline_app(tmp_path, learner_process=False)
    app.consumer = SimpleNamespace(topic_partitions=lambda topic: None,
                                   highwater=lambda partition: None)
    app.consumer_generation_id = 1
    histories = app.streamrec_history_writes
    stored, flushes = {}, []
    histories.get_many = lambda last: {}
    histories.set_many = lambda writes: stored.update((user, value) for user, value, _ in writes)
    sent = []  # (topic, value) of every record the producer took

    async def send(topic, key, value, **kwargs) -> asyncio.Future:
        sent.append((topic, value))
        delivery = asyncio.get_running_loop().create_future()
        delivery.set_result(None)
        return delivery

    async def producer():
        return SimpleNamespace(send=send)

    app.maybe_start_producer = producer

    async def refused():
        flushes.append("refused")
        raise RuntimeError("Producer service not yet started")

    async def taken():
        flushes.append("taken")
        return []

    async def run():
        histories.flush = refused
        batch = [message(0, event("u1", "a")), message(1, b"{not json"),
                 message(2, event("u1", "b"))]
        records = await app.streamrec_take_in(batch)
        changelog = [record for record in records if record.record == "changelog"]
        assert len(changelog) == 1 and not taken_by_broker(changelog[0].delivery)
        histories.flush = taken
        delivery = await changelog[0].resend()
        await asyncio.wait_for(delivery, 5)
        return records, delivery

    records, delivery = asyncio.run(run())
    assert taken_by_broker(delivery) and flushes == ["refused", "taken"]
    assert [record.record for record in records].count("dead_letter") == 1
    letters = [value for topic, value in sent if topic == "timeline-events-dlq"]
    assert len(letters) == 1 and b"internal_error" not in letters[0]
    assert set(stored) == {"u1"}
    partitions = {item_partition(item, app.conf.topic_partitions) for item in ("a", "b")}
    assert sum(topic.endswith("-train-examples") for topic, _ in sent) == len(partitions)
