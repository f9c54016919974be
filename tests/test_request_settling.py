"""The request reader commits a partition only up to its first request whose answer has not
settled (without a broker: a consumer that records its commits)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from aiokafka import TopicPartition

from stream_app import request_reader as reader_module
from stream_app.request_reader import RequestReader
from stream_app.settings import Settings


class RecordingConsumer:
    def __init__(self) -> None:
        self.commits: list[dict] = []
        self.assigned: list = []

    async def commit(self, offsets: dict) -> None:
        self.commits.append(dict(offsets))

    def assign(self, partitions: list) -> None:
        self.assigned = partitions

    async def committed(self, tp) -> int:
        return 0


def records(tp: TopicPartition, *offsets: int) -> dict:
    return {tp: [SimpleNamespace(topic=tp.topic, partition=tp.partition, offset=offset)
                 for offset in offsets]}


def reader_answering(deliveries: dict[int, asyncio.Future | None]) -> RequestReader:
    """A reader whose answer to the request at each offset settles with ``deliveries``."""
    async def answer(record):
        return deliveries[record.offset]

    reader = RequestReader(Settings(topic_requests="requests"), answer, commit_every_s=0.0)
    reader._consumer = RecordingConsumer()
    reader._partitions = frozenset({0, 1})
    return reader


def test_a_partition_is_committed_up_to_its_first_answer_not_settled():
    zero, one = TopicPartition("requests", 0), TopicPartition("requests", 1)

    async def scenario() -> list[dict]:
        loop = asyncio.get_running_loop()
        slow, fast, failing = loop.create_future(), loop.create_future(), loop.create_future()
        reader = reader_answering({0: None, 1: slow, 2: fast, 3: None, 10: failing})
        fast.set_result(None)
        await reader._handle({**records(zero, 0, 1, 2, 3), **records(one, 10)})
        await reader._commit(due_only=True)
        failing.set_exception(RuntimeError("refused, and its error response too"))
        await asyncio.sleep(0)
        await reader._commit(due_only=True)
        slow.set_result(None)
        await asyncio.sleep(0)
        await reader._commit(due_only=True)
        return reader._consumer.commits

    first, second, third = asyncio.run(scenario())
    assert first == {zero: 1}  # offset 1's answer is still in flight: 2 and 3 wait behind it
    assert second == {one: 11}  # a failed answer is settled (its error was answered, logged)
    assert third == {zero: 4}


def test_a_change_of_partitions_waits_for_the_answers_in_flight_then_commits(monkeypatch):
    zero = TopicPartition("requests", 0)
    monkeypatch.setattr(reader_module, "SETTLE_WAIT_S", 0.2)

    async def scenario() -> tuple[list[dict], list[dict]]:
        loop = asyncio.get_running_loop()
        late, never = loop.create_future(), loop.create_future()
        reader = reader_answering({0: late, 1: never})
        await reader._handle(records(zero, 0))
        loop.call_later(0.05, late.set_result, None)
        await reader.follow([0, 1, 2])  # waits for the answer in flight
        settled = list(reader._consumer.commits)
        await reader._handle(records(zero, 1))
        await reader.follow([1])  # the answer never settles: partition 0 is left to the next
        return settled, reader._consumer.commits

    settled, commits = asyncio.run(scenario())
    assert settled == [{zero: 1}]
    assert commits == [{zero: 1}]


def test_a_recovery_completed_after_a_newer_rebalance_began_does_not_move_the_reader(tmp_path):
    """Faust says a recovery completed before it checks whether a newer rebalance began; the
    worker then reads no request partitions until that one's recovery completes (the old
    ones may be another worker's by then)."""
    from stream_app.app import create_app
    from stream_app.engine import Engine
    from stream_app.worker import build_metrics

    settings = Settings(data_dir=tmp_path, broker="127.0.0.1:1", metrics_port=0)
    engine = Engine(settings)
    metrics = build_metrics(engine)
    app = create_app(settings, engine, metrics)
    held = {TopicPartition(settings.topic_events, p) for p in (0, 1)}
    app.consumer.assignment = lambda: held

    def partitions_read() -> float:
        return metrics.registry.get_sample_value("streamrec_request_partitions")

    async def scenario() -> list[float]:
        read = []
        app.rebalancing_count = 1
        await app.on_partitions_assigned.send(held)
        app.rebalancing_count = 2  # the next rebalance began: its revocation came first
        await app.on_partitions_revoked.send(held)
        await app.on_rebalance_complete.send()  # of the first assignment
        read.append(partitions_read())
        await app.on_partitions_assigned.send(held)
        await app.on_rebalance_complete.send()
        read.append(partitions_read())
        return read

    assert asyncio.run(scenario()) == [0.0, 2.0]
