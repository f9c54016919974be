"""The request reader on a real broker: it hands over exactly the partitions it follows, in
order, commits what it answered, and loses nothing when partitions move between readers."""

from __future__ import annotations

import asyncio
import time

import pytest

from stream_app.client import producer
from stream_app.kafka import ensure_topics
from stream_app.request_reader import RequestReader

pytestmark = pytest.mark.integration


def send(settings, partition: int, *values: str) -> None:
    sink = producer(settings)
    for value in values:
        sink.send(settings.topic_requests, key=value.encode(), value=value.encode(),
                  partition=partition)
    sink.flush()
    sink.close()


class Running:
    """A reader run as a task, recording what it was handed: (partition, offset, value)."""

    def __init__(self, settings, fail_on: str | None = None) -> None:
        self.handed: list[tuple[int, int, str]] = []
        self.malformed: list = []  # records without their timestamp or key (checked at stop)
        self.fail_on = fail_on
        self.reader = RequestReader(settings, self.answer, commit_every_s=0.1)
        self.task = asyncio.ensure_future(self.reader.run())

    async def answer(self, record) -> None:
        self.handed.append((record.partition, record.offset, record.value.decode()))
        if not (record.timestamp > 0 and record.key == record.value):
            self.malformed.append(record)  # an assert here would only be logged by the reader
        if record.value.decode() == self.fail_on:
            raise RuntimeError("a failing answer")

    def values(self) -> list[str]:
        return [value for _, _, value in self.handed]

    async def until(self, count: int, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.handed) < count:
            assert time.monotonic() < deadline, f"{self.handed} after {timeout_s} s"
            assert not self.task.done(), self.task
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        assert not self.malformed, self.malformed


async def read_exactly(settings, partitions: list[int], count: int) -> list[str]:
    """What a new reader of ``partitions`` is handed: ``count`` requests, then nothing more
    for half a second."""
    running = Running(settings)
    await running.reader.follow(partitions)
    await running.until(count)
    await asyncio.sleep(0.5)
    await running.stop()
    return running.values()


@pytest.fixture
def request_settings(settings):
    ensure_topics(settings, [settings.topic_requests])
    return settings


def test_hands_over_only_the_partitions_it_follows_in_order(request_settings):
    async def scenario() -> list[tuple[int, int, str]]:
        send(request_settings, 0, "a0", "b0", "c0")
        send(request_settings, 1, "a1", "b1")
        running = Running(request_settings, fail_on="a0")
        await running.reader.follow([0])
        await running.until(3)
        await asyncio.sleep(0.5)  # nothing of partition 1 comes
        await running.stop()
        return running.handed

    assert asyncio.run(scenario()) == [(0, 0, "a0"), (0, 1, "b0"), (0, 2, "c0")]


def test_commits_what_it_answered_and_a_moved_partition_loses_nothing(request_settings):
    """Reader A reads both partitions, then gives partition 0 up; requests sent after that
    go to reader B (which follows it), none twice, none lost; a restarted A resumes after
    what it answered."""
    async def scenario() -> tuple[list[str], list[str], list[str]]:
        first = Running(request_settings)
        await first.reader.follow([0, 1])
        send(request_settings, 0, "p0-1")
        send(request_settings, 1, "p1-1")
        await first.until(2)
        await first.reader.follow([1])
        send(request_settings, 0, "p0-2", "p0-3")
        send(request_settings, 1, "p1-2")
        await first.until(3)
        second = Running(request_settings)
        await second.reader.follow([0])
        await second.until(2)
        await asyncio.sleep(0.5)  # nothing more comes to either
        await first.stop()
        await second.stop()
        send(request_settings, 1, "p1-3")
        again = await read_exactly(request_settings, [0, 1], 1)
        return first.values(), second.values(), again

    first, second, again = asyncio.run(scenario())
    assert sorted(first) == ["p0-1", "p1-1", "p1-2"]
    assert second == ["p0-2", "p0-3"]
    assert again == ["p1-3"]


def test_following_the_same_partitions_again_changes_nothing(request_settings, caplog):
    async def scenario() -> list[str]:
        running = Running(request_settings)
        await running.reader.follow([0, 1])
        send(request_settings, 0, "x")
        await running.until(1)
        await running.reader.follow([1, 0])  # no re-read from the last commit
        send(request_settings, 1, "y")
        await running.until(2)
        await asyncio.sleep(0.5)
        await running.stop()
        return running.values()

    with caplog.at_level("ERROR", logger="stream_app.request_reader"):
        assert asyncio.run(scenario()) == ["x", "y"]
    assert "partitions and the events topic" not in caplog.text  # equal counts: no error


def test_a_partition_never_committed_starts_where_the_apps_group_left_it(request_settings):
    """Requests read (and committed) by the app's own group before this reader existed, as
    the Faust agent of an earlier version did, are not answered again."""
    from kafka import KafkaConsumer, TopicPartition
    from kafka.structs import OffsetAndMetadata

    from stream_app.kafka import client_config

    send(request_settings, 0, "old-1", "old-2")
    send(request_settings, 1, "p1")
    legacy = KafkaConsumer(group_id=request_settings.app_id, enable_auto_commit=False,
                           **client_config(request_settings))
    legacy.assign([TopicPartition(request_settings.topic_requests, 0)])
    legacy.commit({TopicPartition(request_settings.topic_requests, 0):
                   OffsetAndMetadata(2, "", -1)})
    legacy.close()

    send(request_settings, 0, "new")
    assert sorted(asyncio.run(read_exactly(request_settings, [0, 1], 2))) == ["new", "p1"]


def test_a_reader_whose_broker_is_not_there_yet_keeps_trying(settings, tmp_path):
    """A failed consumer does not end the reader (a worker would go on taking events in and
    answer nothing): once a broker listens, the same reader answers."""
    from stream_app.processes import EmbeddedBroker, free_port

    port = free_port()
    later = settings.replace(broker=f"127.0.0.1:{port}")

    async def scenario() -> list[str]:
        running = Running(later)
        await running.reader.follow([0])
        await asyncio.sleep(1.5)  # its consumer fails to start, again and again
        assert not running.task.done()
        with EmbeddedBroker("127.0.0.1", port, log_path=tmp_path / "broker.log"):
            ensure_topics(later, [later.topic_requests])
            send(later, 0, "after")
            await running.until(1, timeout_s=30)
            await running.stop()
        return running.values()

    assert asyncio.run(scenario()) == ["after"]


def errors_of_a_reader(settings, caplog) -> str:
    """The errors a reader of partition 0 logs while it answers one request."""
    async def scenario() -> None:
        running = Running(settings)
        await running.reader.follow([0])
        send(settings, 0, "x")
        await running.until(1)
        await running.stop()

    with caplog.at_level("ERROR", logger="stream_app.request_reader"):
        asyncio.run(scenario())
    return caplog.text


def test_a_request_topic_with_other_partitions_than_the_events_is_an_error(settings, caplog):
    """Partitions numbered past the events' would never be read: the reader says so."""
    mismatched = settings.replace(topic_requests=settings.topic_requests + "-three")
    ensure_topics(mismatched.replace(partitions=3), [mismatched.topic_requests])
    assert f"has 3 partitions and the events topic {settings.topic_events} 2" in \
        errors_of_a_reader(mismatched, caplog)


def test_an_events_topic_made_with_other_partitions_than_the_requests_is_an_error(settings,
                                                                                  caplog):
    """The events topic as the cluster has it counts, not the configured partition count: a
    hand-made events topic of 3 partitions beside a request topic of 2 is an error too."""
    mismatched = settings.replace(topic_events=settings.topic_events + "-three")
    ensure_topics(mismatched.replace(partitions=3), [mismatched.topic_events])
    ensure_topics(mismatched, [mismatched.topic_requests])
    assert f"has 2 partitions and the events topic {mismatched.topic_events} 3" in \
        errors_of_a_reader(mismatched, caplog)
