"""The request reader commits a partition only up to its first request whose answer has not
settled (without a broker: a consumer that records its commits)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from aiokafka import TopicPartition

from stream_app import request_reader as reader_module
from stream_app.request_reader import RequestReader
from stream_app.settings import Settings


class Pausing:
    """aiokafka's pause and resume of partitions, as a fake consumer's."""

    paused_now: frozenset = frozenset()

    def paused(self) -> set:
        return set(self.paused_now)

    def pause(self, *partitions) -> None:
        self.paused_now = self.paused_now | set(partitions)

    def resume(self, *partitions) -> None:
        self.paused_now = self.paused_now - set(partitions)


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


async def periodic_commit(reader: RequestReader) -> None:
    """The reader's periodic commit, which runs beside the answering, waited for."""
    await reader._commit(due_only=True)
    if reader._committing is not None:
        await reader._committing


def test_a_partition_is_committed_up_to_its_first_answer_not_settled():
    zero, one = TopicPartition("requests", 0), TopicPartition("requests", 1)

    async def scenario() -> list[dict]:
        loop = asyncio.get_running_loop()
        slow, fast, failing = loop.create_future(), loop.create_future(), loop.create_future()
        reader = reader_answering({0: None, 1: slow, 2: fast, 3: None, 10: failing})
        fast.set_result(None)
        await reader._handle({**records(zero, 0, 1, 2, 3), **records(one, 10)})
        await periodic_commit(reader)
        failing.set_exception(RuntimeError("refused, and its error response too"))
        await asyncio.sleep(0)
        await periodic_commit(reader)
        slow.set_result(None)
        await asyncio.sleep(0)
        await periodic_commit(reader)
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
        app.streamrec_withdrawals.caught_up.set()  # no withdrawals to wait for
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


def test_requests_are_read_once_the_withdrawals_before_the_start_are_read(tmp_path):
    """A worker's first assignment: its request partitions are read only once the withdrawn
    items written before its start are (a task waits for them, so the rebalance goes on);
    then at once at every assignment."""
    from stream_app.app import create_app
    from stream_app.engine import Engine
    from stream_app.worker import build_metrics

    settings = Settings(data_dir=tmp_path, broker="127.0.0.1:1", metrics_port=0)
    engine = Engine(settings)
    metrics = build_metrics(engine)
    app = create_app(settings, engine, metrics)
    held = {TopicPartition(settings.topic_events, p) for p in (0, 1, 2)}
    app.consumer.assignment = lambda: held

    def partitions_read() -> float:
        return metrics.registry.get_sample_value("streamrec_request_partitions")

    async def scenario() -> list[float]:
        read = []
        app.rebalancing_count = 1
        await app.on_partitions_assigned.send(held)
        await asyncio.wait_for(app.on_rebalance_complete.send(), 1.0)  # does not wait
        for _ in range(5):
            await asyncio.sleep(0.01)
        read.append(partitions_read())
        app.streamrec_withdrawals.caught_up.set()
        for _ in range(5):
            await asyncio.sleep(0.01)
        read.append(partitions_read())
        return read

    assert asyncio.run(scenario()) == [0.0, 3.0]


class FakeRequestLog:
    """A request topic without a broker, read as aiokafka reads it: ``ends[p]`` requests on
    partition p, the commits of the reader's group and of the app's, and a consumer whose
    ``assign`` sets every assigned partition's position anew when the fetcher next looks (from
    the group's commit, else the oldest request) unless it was sought before; ``getmany``
    hands over what lies past the positions. ``lookup``: a future the admin client's start
    waits on (the network's round trips)."""

    def __init__(self, ends: dict[int, int], app_offsets: dict[int, int] | None = None):
        self.ends, self.app_offsets = ends, app_offsets or {}
        self.committed: dict[int, int] = {}
        self.seeks: list[tuple[int, int]] = []
        self.lookup: asyncio.Future | None = None
        log = self

        class Consumer(Pausing):
            def __init__(self, **kwargs) -> None:
                self.positions: dict = {}

            async def start(self) -> None: ...

            async def stop(self) -> None: ...

            async def commit(self, offsets) -> None:
                log.committed.update({tp.partition: offset for tp, offset in offsets.items()})

            def assign(self, partitions) -> None:
                self.positions = {tp: None for tp in partitions}
                self.paused_now = frozenset()

            def assignment(self) -> set:
                return set(self.positions)

            async def committed(self, tp):
                return log.committed.get(tp.partition)

            def seek(self, tp, offset: int) -> None:
                log.seeks.append((tp.partition, offset))
                self.positions[tp] = offset

            async def getmany(self, timeout_ms: int, max_records: int) -> dict:
                for _ in range(max(1, timeout_ms // 10)):
                    await asyncio.sleep(0.01)
                    batches = {}
                    for tp, position in self.positions.items():
                        if tp in self.paused_now:
                            continue
                        if position is None:  # the fetcher's reset
                            position = log.committed.get(tp.partition, 0)
                        end = log.ends.get(tp.partition, 0)
                        if position < end:
                            batches.update(records(tp, *range(position, end)))
                            self.positions[tp] = end
                    if batches:
                        return batches
                return {}

        class Admin:
            def __init__(self, **kwargs) -> None: ...

            async def start(self) -> None:
                if log.lookup is not None:
                    await log.lookup

            async def close(self) -> None: ...

            async def list_consumer_group_offsets(self, group, partitions):
                return {tp: SimpleNamespace(offset=log.app_offsets[tp.partition])
                        for tp in partitions if tp.partition in log.app_offsets}

        self.Consumer, self.Admin = Consumer, Admin

    def install(self, monkeypatch) -> None:
        import aiokafka
        import aiokafka.admin

        async def partitions(consumer, topic):
            return frozenset(self.ends)

        monkeypatch.setattr(aiokafka, "AIOKafkaConsumer", self.Consumer)
        monkeypatch.setattr(aiokafka.admin, "AIOKafkaAdminClient", self.Admin)
        monkeypatch.setattr(reader_module, "topic_partitions", partitions)


def reading(tmp_path, answer) -> tuple[RequestReader, asyncio.Task]:
    reader = RequestReader(Settings(data_dir=tmp_path, partitions=2, compat_fixes=False),
                           answer, commit_every_s=0.0)
    reader._guard = None
    return reader, asyncio.ensure_future(reader.run())


async def stopped(task: asyncio.Task) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def test_a_partition_started_where_the_apps_group_left_it_is_never_read_from_the_oldest(
        monkeypatch, tmp_path):
    """A reader assigned a partition its group never committed looks up where the app's own
    group left it before assigning: assigned first, the fetcher read from the oldest request
    while the lookup went on, and a getmany waiting then handed those old requests over."""
    log = FakeRequestLog({0: 103}, app_offsets={0: 100})
    log.install(monkeypatch)
    answered = []

    async def answer(record):
        answered.append(record.offset)

    async def scenario():
        log.lookup = asyncio.get_running_loop().create_future()
        reader, task = reading(tmp_path, answer)
        await asyncio.sleep(0.05)  # reading nothing yet, a getmany waiting
        follow = asyncio.ensure_future(reader.follow([0]))
        await asyncio.sleep(0.05)
        log.lookup.set_result(None)
        await asyncio.wait_for(follow, 2)
        await asyncio.sleep(0.1)
        await stopped(task)

    asyncio.run(scenario())
    assert log.seeks == [(0, 100)]
    assert answered == [100, 101, 102]


def test_a_partition_kept_through_a_change_of_partitions_is_not_read_again(monkeypatch,
                                                                         tmp_path):
    """An answer still unsettled holds its partition's commit back; when the reader is given
    another partition besides, the one it keeps goes on after the last request it handed
    rather than from that commit (aiokafka's assign sets every position anew), so the
    requests after the unsettled answer are not answered twice."""
    monkeypatch.setattr(reader_module, "SETTLE_WAIT_S", 0.05)
    log = FakeRequestLog({0: 5, 1: 2})
    log.install(monkeypatch)
    answered = []
    never = None

    async def answer(record):
        answered.append((record.partition, record.offset))
        return never if record.offset == 1 and record.partition == 0 else None

    async def scenario():
        nonlocal never
        never = asyncio.get_running_loop().create_future()
        reader, task = reading(tmp_path, answer)
        await reader.follow([0])
        while len(answered) < 5:
            await asyncio.sleep(0.01)
        await reader.follow([0, 1])
        while len(answered) < 7:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        await stopped(task)

    asyncio.run(scenario())
    assert sorted(answered) == [(0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (1, 0), (1, 1)]
    assert log.committed[0] == 1  # held at the unsettled answer


def test_requests_fetched_while_a_change_of_partitions_looks_up_offsets_are_answered_once(
        monkeypatch, tmp_path):
    """A change that adds a partition new to the reader's group looks up the app's offsets
    (awaits) before it assigns: requests of a kept partition fetched meanwhile belong to the
    old assignment, and are read again after the seek to the last one handed (answered once,
    not once from each fetch)."""
    log = FakeRequestLog({0: 5, 1: 0})
    log.install(monkeypatch)
    answered = []

    async def answer(record):
        answered.append((record.partition, record.offset))

    async def scenario():
        reader, task = reading(tmp_path, answer)
        await reader.follow([0])
        while len(answered) < 5:
            await asyncio.sleep(0.01)
        log.lookup = asyncio.get_running_loop().create_future()
        follow = asyncio.ensure_future(reader.follow([0, 1]))
        await asyncio.sleep(0.02)
        log.ends[0] = 8  # requests keep arriving on the kept partition
        await asyncio.sleep(0.1)  # a getmany returns them while the lookup goes on
        log.lookup.set_result(None)
        await asyncio.wait_for(follow, 2)
        await asyncio.sleep(0.3)
        await stopped(task)

    asyncio.run(scenario())
    assert sorted(answered) == [(0, offset) for offset in range(8)]


def test_a_partition_taken_away_between_two_consumers_leaves_the_others_commits(monkeypatch):
    """A change of partitions while the reader has no consumer (it starts a new one after a
    failure) cannot commit; the partitions it keeps are committed by the next consumer, and
    the one it lost is left out: named in a commit, the consumer would refuse them all."""
    zero, one = TopicPartition("requests", 0), TopicPartition("requests", 1)

    async def scenario() -> list[dict]:
        reader = reader_answering({5: None, 9: None})
        await reader._handle({**records(zero, 5), **records(one, 9)})
        reader._consumer = None  # between two consumers
        await reader.follow([1])
        reader._consumer = RecordingConsumer()
        await reader._commit()
        return reader._consumer.commits

    assert asyncio.run(scenario()) == [{one: 10}]


def test_a_commit_that_failed_goes_with_the_next_one(caplog):
    """The offsets of a refused commit are kept: a partition with no request after them
    would keep its old commit, and its requests would be answered again at the next
    rebalance."""
    zero, one = TopicPartition("requests", 0), TopicPartition("requests", 1)
    reader = reader_answering({0: None, 1: None, 5: None})
    refusals = [RuntimeError("the coordinator refused the commit")]
    commit = reader._consumer.commit

    async def refusing_once(offsets):
        if refusals:
            raise refusals.pop()
        await commit(offsets)

    reader._consumer.commit = refusing_once

    async def scenario() -> None:
        await reader._handle({**records(zero, 0, 1), **records(one, 5)})
        await periodic_commit(reader)  # refused
        await reader.follow([0, 1, 2])  # commits what was answered, the refused offsets too

    with caplog.at_level("WARNING"):
        asyncio.run(scenario())
    assert "could not commit request offsets" in caplog.text
    assert reader._consumer.commits == [{zero: 2, one: 6}]


def test_a_coordinator_out_of_reach_holds_neither_a_change_of_partitions_nor_the_answers(
        monkeypatch):
    """aiokafka retries a commit for as long as the group's coordinator is out of reach: the
    periodic commit runs beside the answering, and a change of partitions (inside Faust's
    rebalance) waits for it at most ``COORDINATOR_WAIT_S``."""
    zero = TopicPartition("requests", 0)
    monkeypatch.setattr(reader_module, "COORDINATOR_WAIT_S", 0.2)
    reader = reader_answering({0: None, 1: None})
    attempts = []

    async def never(offsets):
        attempts.append(dict(offsets))
        await asyncio.Event().wait()

    reader._consumer.commit = never

    async def scenario() -> bool:
        await reader._handle(records(zero, 0))
        await reader._commit(due_only=True)  # returns at once: the commit waits aside
        answering_went_on = not reader._committing.done()
        await reader._handle(records(zero, 1))
        started = asyncio.get_running_loop().time()
        await reader.follow([1])  # the commits given up within one deadline
        return answering_went_on and asyncio.get_running_loop().time() - started < 2.0

    assert asyncio.run(scenario())
    # the change's commit, if any time was left for it, carried the first's offsets too
    assert attempts[0] == {zero: 1} and all(later == {zero: 2} for later in attempts[1:])


def test_a_change_of_partitions_looks_up_offsets_within_the_same_deadline(monkeypatch,
                                                                         caplog):
    """The lookups of the group's committed offsets wait for the coordinator within the
    change's one deadline; past it the reader starts a new consumer (which looks again)
    instead of holding Faust's rebalance, or reading from the oldest request."""
    monkeypatch.setattr(reader_module, "COORDINATOR_WAIT_S", 0.2)
    reader = reader_answering({})

    async def unanswered(tp):
        await asyncio.Event().wait()

    reader._consumer.committed = unanswered

    async def scenario() -> float:
        started = asyncio.get_running_loop().time()
        await reader.follow([0, 1, 2])
        return asyncio.get_running_loop().time() - started

    with caplog.at_level("ERROR"):
        assert asyncio.run(scenario()) < 2.0
    assert reader._consumer_failed and reader._consumer.assigned == []
    assert "could not assign the request partitions" in caplog.text


def test_a_partition_whose_answers_do_not_settle_is_paused_until_they_do(monkeypatch):
    """Past ``MAX_UNSETTLED`` answers behind one that has not settled (a broker refusing the
    responses), the partition is paused instead of holding an entry and a task for every
    request; it is resumed once they settle."""
    zero, one = TopicPartition("requests", 0), TopicPartition("requests", 1)
    monkeypatch.setattr(reader_module, "MAX_UNSETTLED", 3)

    class PausingConsumer(Pausing, RecordingConsumer):
        def assignment(self) -> set:
            return {zero, one}

    async def scenario() -> list[set]:
        stuck = asyncio.get_running_loop().create_future()
        reader = reader_answering({0: stuck, 1: None, 2: None, 7: None})
        consumer = reader._consumer = PausingConsumer()
        seen = []
        await reader._handle({**records(zero, 0, 1), **records(one, 7)})
        reader._pause_unsettled(consumer)
        seen.append(consumer.paused())
        await reader._handle(records(zero, 2))
        reader._pause_unsettled(consumer)
        seen.append(consumer.paused())
        stuck.set_result(None)
        await asyncio.sleep(0)
        reader._pause_unsettled(consumer)
        seen.append(consumer.paused())
        return seen

    assert asyncio.run(scenario()) == [set(), {zero}, set()]


def test_a_poll_gives_each_request_partition_its_share_of_the_buffered_requests():
    """aiokafka hands out one partition's buffered fetch (thousands of requests) before the
    next partition's first: one user's flood held every other partition's answers."""
    import contextlib

    from .test_fair_fetch import BufferedFetcher

    flooded, quiet = TopicPartition("requests", 0), TopicPartition("requests", 1)
    fetcher = BufferedFetcher({flooded: 5000, quiet: 10})
    fetcher._closed = False
    consumer = SimpleNamespace(_fetcher=fetcher,
                               _subscription=SimpleNamespace(fetch_context=contextlib.nullcontext))

    async def getmany(timeout_ms: int, max_records: int) -> dict:
        return await fetcher.fetched_records(None, timeout_ms / 1000, max_records)

    consumer.getmany = getmany
    first = asyncio.run(RequestReader._poll(consumer, fair=True))
    assert first[quiet] == list(range(10))
    assert len(first[flooded]) == reader_module.MAX_BATCH - 10
