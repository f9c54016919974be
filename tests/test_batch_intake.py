"""BatchIntake: a topic's messages reach the ingest task in batches, in order, with Faust's
flow control, fetch back-pressure and acknowledgement kept. Run against the parts of a Faust
app the intake touches, with mode's real FlowControlEvent and Faust's real ConsumerMessage; a
worker on a real broker (tests/test_broker_integration.py) takes its events this way, and its
committed offsets are checked there."""

from __future__ import annotations

import asyncio
import contextlib
from types import SimpleNamespace

from faust.types import TP
from faust.types.tuples import ConsumerMessage
from mode.utils.queues import FlowControlEvent

from stream_app.batch_intake import BatchIntake

TOPIC = "events"


class Consumer:
    """The consumer's side of the intake: in-flight messages, acks, fetch back-pressure."""

    def __init__(self) -> None:
        self.unacked: set = set()
        self.acked: list = []
        self.held: list = []
        self.resumed: list = []

    def ack(self, message) -> None:
        self.unacked.discard(message)
        self.acked.append(message.offset)

    def on_buffer_full(self, tp) -> None:
        self.held.append(tp)

    def on_buffer_drop(self, tp) -> None:
        self.resumed.append(tp)


class Conductor:
    def __init__(self) -> None:
        self.topics: list = []

    def _build_handler(self, tp, channels):
        return ("stock", tp)

    def add(self, topic) -> None:
        self.topics.append(topic)


async def _ebb() -> None:
    return None


def fake_app():
    flow = FlowControlEvent(initially_suspended=False)
    return SimpleNamespace(topics=Conductor(), flow_control=flow, consumer=Consumer(),
                           producer=SimpleNamespace(buffer=SimpleNamespace(wait_until_ebb=_ebb)),
                           consumer_generation_id=1,
                           monitor=SimpleNamespace(stream_inbound_time={}))


def message(offset: int, partition: int = 0, generation: int = 1) -> ConsumerMessage:
    return ConsumerMessage(TOPIC, partition, offset, 0.0, 0, [], b"k", b"v", None,
                           generation_id=generation)


def installed(batch_size=4, wait_s=10.0, capacity=None):
    app = fake_app()
    intake = BatchIntake(app, SimpleNamespace(topics=[TOPIC]), batch_size, wait_s, capacity)
    intake.install()
    return app, intake, app.topics._build_handler(TP(TOPIC, 0), set())


def test_the_topic_is_subscribed_and_only_its_partitions_come_here():
    app, intake, handler = installed()
    assert handler == intake._deliver
    assert app.topics._build_handler(TP("other", 0), set()) == ("stock", TP("other", 0))
    assert app.topics.topics == [intake.topic]


def test_a_faust_app_has_what_the_intake_needs_and_a_lack_is_named():
    import faust

    assert BatchIntake.missing(faust.App("intake-check", autodiscover=False)) == []
    app = fake_app()
    del app.flow_control
    assert BatchIntake.missing(app) == ["app.flow_control"]


def test_full_batches_come_at_once_in_order_and_the_rest_after_the_wait():
    async def scenario():
        app, intake, deliver = installed(batch_size=4, wait_s=0.05)
        for offset in range(10):
            await deliver(message(offset))
        first = await asyncio.wait_for(intake.take(), 1.0)  # full: no wait
        second = await intake.take()
        started = asyncio.get_running_loop().time()
        third = await intake.take()  # two left: handed out once the wait ran out
        waited = asyncio.get_running_loop().time() - started
        return [[m.offset for m in batch] for batch in (first, second, third)], waited

    batches, waited = asyncio.run(scenario())
    assert batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert waited >= 0.04


def test_a_take_waits_for_the_first_message():
    async def scenario():
        app, intake, deliver = installed(batch_size=2, wait_s=0.01)
        taking = asyncio.ensure_future(intake.take())
        await asyncio.sleep(0.05)
        assert not taking.done()
        await deliver(message(0))
        return [m.offset for m in await asyncio.wait_for(taking, 1.0)]

    assert asyncio.run(scenario()) == [0]


def test_taken_messages_are_in_flight_until_acked_and_then_acked_in_order():
    async def scenario():
        app, intake, deliver = installed(batch_size=3)
        for offset in range(3):
            await deliver(message(offset))
        assert app.consumer.unacked == set()  # waiting is not in flight
        batch = await intake.take()
        assert app.consumer.unacked == set(batch)
        assert app.consumer.acked == []
        intake.ack(batch)
        return app.consumer

    consumer = asyncio.run(scenario())
    assert consumer.acked == [0, 1, 2]
    assert consumer.unacked == set()


def test_a_partition_over_capacity_stops_fetching_until_half_is_taken():
    async def scenario():
        app, intake, deliver = installed(batch_size=2, capacity=6)
        for offset in range(8):
            await deliver(message(offset))
        held_after_delivery = list(app.consumer.held)
        await intake.take()  # 6 left: still over half
        resumed_early = list(app.consumer.resumed)
        await intake.take()  # 4 left
        await intake.take()  # 2 left: half or less
        return held_after_delivery, resumed_early, app.consumer.resumed

    held, resumed_early, resumed = asyncio.run(scenario())
    assert held == [TP(TOPIC, 0)]  # once, however many more came
    assert resumed_early == []
    assert resumed == [TP(TOPIC, 0)]


class FaustBookkeeping(Consumer):
    """The fake consumer, also keeping Faust's own set of fetchable partitions (its methods,
    unbound), which asserts that it holds Faust's partition type only."""
    from faust.transport.consumer import Consumer as _Faust

    _get_active_partitions = _Faust._get_active_partitions

    def __init__(self) -> None:
        super().__init__()
        self.app = SimpleNamespace(in_recovery=False)
        self._active_partitions = {TP(TOPIC, 0)}
        self._buffered_partitions: set = set()

    def on_buffer_full(self, tp) -> None:
        super().on_buffer_full(tp)
        self._Faust.on_buffer_full(self, tp)

    def on_buffer_drop(self, tp) -> None:
        super().on_buffer_drop(tp)
        self._Faust.on_buffer_drop(self, tp)


def test_a_message_fetched_by_the_fair_poll_is_held_back_and_resumed_as_faust_s_partition():
    """The fair poll (stream_app/fair_fetch.py) hands out messages whose partition is
    aiokafka's TopicPartition; resumed as such, it went into Faust's fetchable set, whose next
    read (every fetch) failed an assertion and crashed the worker during a backlog."""
    from aiokafka.structs import TopicPartition

    async def scenario():
        app, intake, deliver = installed(batch_size=2, capacity=6)
        app.consumer = FaustBookkeeping()
        for offset in range(8):
            await deliver(ConsumerMessage(TOPIC, 0, offset, 0.0, 0, [], b"k", b"v", None,
                                          tp=TopicPartition(TOPIC, 0), generation_id=1))
        for _ in range(3):
            await intake.take()
        return app.consumer

    consumer = asyncio.run(scenario())
    assert consumer.held == consumer.resumed == [TP(TOPIC, 0)]
    assert consumer._get_active_partitions() == {TP(TOPIC, 0)}  # Faust's check passes
    assert all(type(tp) is TP for tp in consumer.held + consumer.resumed)


def test_after_a_rebalance_a_partition_over_capacity_is_held_back_again():
    """A new assignment makes every partition fetch again (Faust resets them), so the
    intake must not think one is still held back."""
    async def scenario():
        app, intake, deliver = installed(batch_size=2, capacity=3)
        for offset in range(3):
            await deliver(message(offset, generation=1))
        app.consumer_generation_id = 2
        for offset in range(2):  # 5 waiting: over capacity, under twice it
            await deliver(message(offset, generation=2))
        return app.consumer.held

    assert asyncio.run(scenario()) == [TP(TOPIC, 0), TP(TOPIC, 0)]


def test_a_partition_held_back_before_a_rebalance_is_not_resumed_after_it():
    """The rebalance set every partition's fetching anew (a table recovery may keep one
    paused, or it may be another worker's now): draining the messages fetched before it must
    not resume the partition the intake held back then."""
    async def scenario():
        app, intake, deliver = installed(batch_size=2, wait_s=0.01, capacity=4)
        for offset in range(4):  # at capacity: held back
            await deliver(message(offset, generation=1))
        app.consumer_generation_id = 2
        with contextlib.suppress(asyncio.TimeoutError):  # drops them all, then waits
            await asyncio.wait_for(intake.take(), 0.2)
        assert not intake._waiting
        return app.consumer

    consumer = asyncio.run(scenario())
    assert consumer.held == [TP(TOPIC, 0)] and consumer.resumed == []


def test_a_delivery_waits_when_twice_the_capacity_waits_until_a_take():
    """The consumer ignores ``on_buffer_full`` during a table recovery; the intake still
    holds at most twice its capacity."""
    async def scenario():
        app, intake, deliver = installed(batch_size=2, capacity=3)
        for offset in range(5):
            await deliver(message(offset))
        sixth = asyncio.ensure_future(deliver(message(5)))
        await asyncio.sleep(0.05)
        waited = not sixth.done()
        await intake.take()
        await asyncio.wait_for(sixth, 1.0)
        return waited, len(intake._waiting)

    assert asyncio.run(scenario()) == (True, 4)


def test_taking_a_batch_marks_its_partitions_as_processed_for_faust():
    """Faust's consumer logs a slow-processing error for a partition whose stream never
    took an event; the intake's batches count as taking them."""
    async def scenario():
        app, intake, deliver = installed(batch_size=2)
        await deliver(message(0, partition=0))
        await deliver(message(0, partition=1))
        assert app.monitor.stream_inbound_time == {}
        await intake.take()
        return app.monitor.stream_inbound_time

    assert set(asyncio.run(scenario())) == {TP(TOPIC, 0), TP(TOPIC, 1)}


def test_messages_of_an_older_generation_are_dropped_unacked():
    async def scenario():
        app, intake, deliver = installed(batch_size=4)
        await deliver(message(0, generation=1))
        await deliver(message(1, generation=1))
        app.consumer_generation_id = 2  # a rebalance: those two will be read again
        await deliver(message(0, generation=2))
        await deliver(message(1, generation=2))
        await deliver(message(2, generation=2))
        await deliver(message(3, generation=2))
        batch = await intake.take()
        current = await intake.take()
        return app, batch, current

    app, batch, current = asyncio.run(scenario())
    assert [(m.offset, m.generation_id) for m in batch] == [(0, 2), (1, 2)]
    assert [(m.offset, m.generation_id) for m in current] == [(2, 2), (3, 2)]
    assert app.consumer.acked == []


def test_a_batch_of_a_generation_that_ended_while_it_was_processed_is_not_acked():
    async def scenario():
        app, intake, deliver = installed(batch_size=2)
        await deliver(message(0))
        await deliver(message(1))
        batch = await intake.take()
        app.consumer_generation_id = 2
        intake.ack(batch)
        return app.consumer

    consumer = asyncio.run(scenario())
    assert consumer.acked == []
    assert consumer.unacked == set()  # no longer in flight: shutdown does not wait for it


def test_nothing_is_delivered_or_taken_while_the_flow_is_suspended():
    async def scenario():
        app, intake, deliver = installed(batch_size=1, wait_s=0.01)
        await deliver(message(0))
        app.flow_control.suspend()
        delivering = asyncio.ensure_future(deliver(message(1)))
        taking = asyncio.ensure_future(intake.take())
        await asyncio.sleep(0.05)
        blocked = (not delivering.done(), not taking.done())
        app.flow_control.resume()
        taken = await asyncio.wait_for(taking, 1.0)
        await asyncio.wait_for(delivering, 1.0)
        return blocked, [m.offset for m in taken], [m.offset for m in await intake.take()]

    blocked, first, second = asyncio.run(scenario())
    assert blocked == (True, True)
    assert (first, second) == ([0], [1])


def test_events_of_an_older_generation_are_left_out_of_the_histories():
    """A rebalance during a batch's sends (dead letters, moved events) may give its partition
    to another worker: the batch's events of the older generation are not stored here (that
    worker reads them again, as the intake acknowledges none of them)."""
    from stream_app.app import of_generation

    old = SimpleNamespace(generation_id=1, offset=5)
    current = SimpleNamespace(generation_id=2, offset=6)
    taken = [(old, "event-5"), (current, "event-6")]
    assert of_generation(taken, 2) == [(current, "event-6")]
    assert of_generation(taken, 1) == [(old, "event-5")]
    assert of_generation(taken, 3) == []
