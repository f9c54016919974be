"""A batch of events through the worker's intake without a broker: what it stores and hands
the producer when a part of it fails, or a rebalance comes while it is taken in."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from faust.types import TP

from stream_app.app import create_app
from stream_app.confirmed_acks import AcksAfterDelivery
from stream_app.engine import Engine, item_partition
from stream_app.settings import Settings
from stream_app.worker import build_metrics

from .conftest import event

DEAD_LETTERS = "timeline-events-dlq"


def message(offset: int, value: bytes, user: str = "u1"):
    """An events message on partition 0, where the offline consumer puts every user."""
    return SimpleNamespace(topic="events", partition=0, offset=offset, key=user.encode(),
                           value=value, headers=[], tp=TP("events", 0), generation_id=1)


class OfflineIntake:
    """A worker's app whose consumer, history table and producer are stand-ins: the table
    stores in ``stored``, the producer takes every record at once into ``sent``, and
    ``on_send`` runs before each send (a rebalance that comes meanwhile)."""

    def __init__(self, tmp_path) -> None:
        settings = Settings(data_dir=tmp_path, broker="127.0.0.1:1", metrics_port=0,
                            learner_process=False)
        self.engine = Engine(settings)
        self.app = app = create_app(settings, self.engine, build_metrics(self.engine))
        app.consumer = SimpleNamespace(topic_partitions=lambda topic: None,
                                       highwater=lambda partition: None)
        app.consumer_generation_id = 1
        self.histories = histories = app.streamrec_history_writes
        self.stored: dict = {}
        self.sent: list[tuple[str, bytes]] = []
        self.on_send = lambda topic: None
        histories.get_many = lambda last: {}

        def set_many(writes):  # stored, and queued for the changelog as the table's own
            for user, value, _ in writes:
                self.stored[user] = value
                histories._queue(0).append(
                    (histories._key_bytes(user), histories._value_bytes(value)))

        def delete_many(deletes):
            for user, _ in deletes:
                del self.stored[user]
                histories._queue(0).append((histories._key_bytes(user), None))

        histories.set_many, histories.delete_many = set_many, delete_many

        async def flushed():
            return []

        async def count_keys(turn_every: int = 65_536):
            return len(self.stored)

        histories.count_keys = count_keys

        async def producer():
            return SimpleNamespace(send=self._send)

        histories.flush = flushed
        app.maybe_start_producer = producer

    async def _send(self, topic, key, value, **kwargs) -> asyncio.Future:
        self.on_send(topic)
        self.sent.append((topic, value))
        delivery = asyncio.get_running_loop().create_future()
        delivery.set_result(None)
        return delivery

    def sent_to(self, suffix: str) -> list[bytes]:
        return [value for topic, value in self.sent if topic.endswith(suffix)]


@pytest.mark.timeout(60)
def test_a_flush_without_a_producer_holds_the_batch_and_sends_nothing_twice(tmp_path):
    """A stopping worker's producer is gone when the histories are flushed. The batch then
    holds a failed changelog delivery, and is acknowledged only once its resend is
    delivered; it is not taken again event by event, which sent the malformed event's dead
    letter twice and dead-lettered the valid events for the flush's error."""
    intake = OfflineIntake(tmp_path)
    histories, resent = intake.histories, []

    def gone():
        raise RuntimeError("Producer service not yet started")

    async def resend(partition, generation, keys):  # the store's, once a producer is back
        resent.append((partition, keys))
        delivery = asyncio.get_running_loop().create_future()
        delivery.set_result(None)
        return delivery

    del histories.flush  # the table's own, with no producer to hand out
    histories._client, histories.resend = gone, resend
    acked = []
    delivered = AcksAfterDelivery(acked.append, first_pause_s=0.05)
    batch = [message(0, event("u1", "a")), message(1, b"{not json"),
             message(2, event("u1", "b"))]

    async def run():
        records = await intake.app.streamrec_take_in(batch)
        delivered.hold(batch, records)
        assert acked == [] and resent == []
        await asyncio.wait_for(delivered.settled(None), 5)
        return records

    records = asyncio.run(run())
    assert acked == [batch] and resent == [(0, [b'"u1"'])]
    assert [record.record for record in records].count("changelog") == 1
    letters = intake.sent_to(DEAD_LETTERS)
    assert len(letters) == 1 and b"internal_error" not in letters[0]
    assert set(intake.stored) == {"u1"}
    partitions = {item_partition(item, intake.app.conf.topic_partitions) for item in "ab"}
    assert len(intake.sent_to("-train-examples")) == len(partitions)  # the two learn


@pytest.mark.timeout(60)
def test_events_fetched_before_a_rebalance_that_came_while_the_batch_was_decoded_are_left(
        tmp_path):
    """A batch's dead letters are sent before its events are stored: a rebalance during
    that send may have given the partition to another worker, which reads the events again
    from the committed offset. Stored here too they would reach that worker's histories
    twice; they are left out (and never acknowledged here: read again). Events fetched after
    the rebalance are stored."""
    intake = OfflineIntake(tmp_path)

    def rebalance(topic):
        if topic == DEAD_LETTERS:
            intake.app.consumer_generation_id = 2

    intake.on_send = rebalance
    fetched_after = message(3, event("u3", "c"), user="u3")
    fetched_after.generation_id = 2
    batch = [message(0, event("u1", "a")), message(1, b"{not json"),
             message(2, event("u2", "b"), user="u2"), fetched_after]
    asyncio.run(intake.app.streamrec_take_in(batch))
    assert len(intake.sent_to(DEAD_LETTERS)) == 1
    assert set(intake.stored) == {"u3"}
    assert len(intake.sent_to("-train-examples")) == 1


def test_a_damaged_stored_history_starts_its_user_again(tmp_path, caplog):
    """A changelog record that is not a history (wrong fields, or bytes that do not decode)
    failed the batch, then each of the user's events alone: every event of that user went
    to the dead-letter topic as an internal error, for good, since the record was never
    written over. Now the user starts again from an empty history, which is stored."""
    from state.history import Unreadable

    intake = OfflineIntake(tmp_path)
    intake.histories.get_many = lambda last: {
        "u1": {"kinds": ["view"]}, "u2": Unreadable("stored value does not decode")}
    intake.engine.users = 2  # the records, as counted from the store at the start
    batch = [message(0, event("u1", "a")), message(1, event("u2", "b"), user="u2"),
             message(2, event("u1", "c"))]
    with caplog.at_level("WARNING"):
        asyncio.run(intake.app.streamrec_take_in(batch))
    assert not intake.sent_to(DEAD_LETTERS)
    assert intake.stored["u1"]["items"] == ["a", "c"] and intake.stored["u2"]["items"] == ["b"]
    assert intake.engine.users == 2  # each counted once: the record's count taken off
    damaged = [r.getMessage() for r in caplog.records if "does not read" in r.getMessage()]
    assert len(damaged) == 2 and "'u1'" in damaged[0] and "KeyError" in damaged[0]
    assert "does not decode" in damaged[1]
    assert len(intake.sent_to("-train-examples")) >= 1  # their events are learned


def test_an_event_whose_ingest_fails_goes_to_the_dead_letter_topic_alone(tmp_path):
    """A batch whose ingest raises is taken again event by event: the event that fails goes
    to the dead-letter topic as ``internal_error``, the others of its batch are taken in once.
    The failure here: the store's read of one user's history raises."""
    import json

    intake = OfflineIntake(tmp_path)

    def get_many(last):
        if "u2" in last:
            raise OSError("the store could not be read")
        return {user: intake.stored[user] for user in last if user in intake.stored}

    intake.histories.get_many = get_many
    batch = [message(0, event("u1", "a")), message(1, event("u2", "b"), user="u2"),
             message(2, event("u1", "c"))]
    asyncio.run(intake.app.streamrec_take_in(batch))
    (letter,) = intake.sent_to(DEAD_LETTERS)
    assert json.loads(letter)["reason"] == "internal_error"
    assert json.loads(letter)["offset"] == 1
    assert intake.stored["u1"]["items"] == ["a", "c"] and "u2" not in intake.stored


def forget(user: str) -> bytes:
    return f'{{"v": 1, "user_id": "{user}", "forget": true}}'.encode()


def test_an_erasure_deletes_and_a_batch_that_fails_counts_its_users_once(tmp_path):
    """A user's erasure deletes the history its events before it made, and one after it
    starts a new history; a batch whose writes fail is taken again event by event, and the
    user count is that of the histories stored (the failed attempt's counts undone; the
    count from the store that follows fails here, and is logged)."""
    intake = OfflineIntake(tmp_path)
    intake.histories.get_many = lambda last: {user: intake.stored[user] for user in last
                                              if user in intake.stored}

    async def uncountable(turn_every: int = 65_536) -> int:
        raise OSError("the store could not be read")

    intake.histories.count_keys = uncountable
    table_set_many, failures = intake.histories.set_many, [1]

    def set_many_failing_once(writes):
        if failures:
            failures.pop()
            raise OSError("the store could not be written")
        table_set_many(writes)

    intake.histories.set_many = set_many_failing_once
    batch = [message(0, event("u1", "a")), message(1, event("u2", "b"), user="u2"),
             message(2, forget("u1")), message(3, event("u3", "c"), user="u3"),
             message(4, forget("u3"), user="u3"), message(5, event("u3", "d"), user="u3")]
    asyncio.run(intake.app.streamrec_take_in(batch))
    assert not intake.sent_to(DEAD_LETTERS)
    assert set(intake.stored) == {"u2", "u3"} and intake.stored["u3"]["items"] == ["d"]
    assert intake.engine.users == 2
    assert intake.engine.popularity.count("c") > 0  # learned before its erasure


def test_an_erased_damaged_history_is_deleted_and_its_user_no_longer_counted(tmp_path):
    """A damaged record reads as no history, so its erasure lowered no count: the user stayed
    among ``streamrec_users`` for good."""
    from state.history import Unreadable

    intake = OfflineIntake(tmp_path)
    intake.stored["u2"] = "damaged"
    intake.histories.get_many = lambda last: {"u2": Unreadable("stored value does not decode")}
    intake.engine.users = 1
    asyncio.run(intake.app.streamrec_take_in([message(0, forget("u2"), user="u2")]))
    assert "u2" not in intake.stored and intake.engine.users == 0


def test_a_batch_whose_writes_fail_partway_counts_the_histories_stored(tmp_path):
    """The writes of a batch reach the store partition by partition: those before a failure
    stay. Taken again one by one, their events find histories that hold them and count no
    new user; the users are counted again from the store after a failed batch."""
    intake = OfflineIntake(tmp_path)
    intake.histories.get_many = lambda last: {user: intake.stored[user] for user in last
                                              if user in intake.stored}
    table_set_many, failures = intake.histories.set_many, [1]

    def set_many_failing_partway(writes):
        writes = list(writes)
        table_set_many(writes[:1])
        if failures:
            failures.pop()
            raise OSError("the store could not be written")
        table_set_many(writes[1:])

    intake.histories.set_many = set_many_failing_partway
    batch = [message(0, event("u1", "a", event_id="e1")),
             message(1, event("u2", "b", event_id="e2"), user="u2"),
             message(2, event("u3", "c", event_id="e3"), user="u3")]
    asyncio.run(intake.app.streamrec_take_in(batch))
    assert not intake.sent_to(DEAD_LETTERS)
    assert set(intake.stored) == {"u1", "u2", "u3"}
    assert intake.engine.users == 3


@pytest.mark.timeout(60)
def test_training_messages_name_the_events_topic_noted_at_the_start(tmp_path):
    """The id of the events topic noted at the worker's start (loaded with the checkpoint)
    goes with each training message: a learner tells by it the places of an events topic
    since made anew from those of its own."""
    from state.stream_positions import note_topic_ids
    from stream_app.wire import TrainBatch

    intake = OfflineIntake(tmp_path)
    engine = intake.engine
    note_topic_ids(engine.checkpoint_dir, {engine.settings.topic_events: "events-id-1"})
    engine.load()
    assert engine.events_topic_id == "events-id-1"
    asyncio.run(intake.app.streamrec_take_in([message(0, event("u1", "a")),
                                              message(1, event("u2", "b"), user="u2")]))
    sent = intake.sent_to("-train-examples")
    decoded = TrainBatch.decode_many(sent)
    assert decoded.events_topics == ["events-id-1"] * 2
