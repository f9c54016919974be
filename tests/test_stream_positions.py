"""Each training message is learned once: the positions the model saves with it skip what it
holds when Kafka delivers it again, and the learn agent commits a message only once a
checkpoint holds it."""

from __future__ import annotations

import json
import os
import time
from types import SimpleNamespace

import numpy as np

from state.stream_positions import EventPositions, StreamPositions
from stream_app.app import histories_to_write, training_messages
from stream_app.checkpoint_acks import AcksAfterCheckpoint
from stream_app.engine import Engine
from stream_app.settings import Settings
from stream_app.wire import TrainBatch
from tests.test_learner_process import examples_and_histories


def deliveries(seed: int, partitions: int = 3, length: int = 40) -> list[tuple[int, int]]:
    """Each partition's offsets in order, delivered again from an earlier offset at random
    points (a crash or a rebalance before the commit), partitions interleaved."""
    rng = np.random.default_rng(seed)
    per_partition = []
    for partition in range(partitions):
        delivered, offset = [], 0
        while offset < length:
            delivered.append((partition, offset))
            offset += 1
            if rng.random() < 0.1:  # back to an uncommitted offset
                offset = int(rng.integers(0, offset + 1))
        per_partition.append(delivered)
    out = []
    while any(per_partition):
        queue = per_partition[int(rng.choice([i for i, q in enumerate(per_partition) if q]))]
        out.append(queue.pop(0))
    return out


def test_each_offset_is_admitted_once_in_order_whatever_is_delivered_again():
    for seed in range(20):
        delivered = deliveries(seed)
        positions = StreamPositions("train")
        admitted = []
        for start in range(0, len(delivered), 7):  # in batches, as the learner takes them
            batch = delivered[start:start + 7]
            fresh = positions.admit([p for p, _ in batch], [o for _, o in batch])
            admitted += [message for message, new in zip(batch, fresh) if new]
        # the oracle: the first delivery of each offset, each partition's in order
        first = sorted(set(delivered), key=delivered.index)
        assert admitted == first
        assert positions.next_offsets() == {p: 40 for p in range(3)}


def test_positions_are_restored_from_their_arrays_for_their_topic_only():
    positions = StreamPositions("train")
    positions.admit([0, 2, 2], [5, 9, 10])
    saved = positions.to_arrays()
    again = StreamPositions("train")
    again.set_arrays(saved)
    assert again.next_offsets() == {0: 6, 2: 11}
    assert again.admit([2, 2, 0], [10, 11, 5]) == [False, True, False]
    other = StreamPositions("another-train")
    other.set_arrays(saved)
    assert other.next_offsets() == {}
    older = StreamPositions("train")
    older.set_arrays({})  # a checkpoint from before positions were saved
    assert older.next_offsets() == {}


def settings_for(tmp_path) -> Settings:
    return Settings(data_dir=tmp_path, model_dim=16, model_seed=1, learn_batch=32,
                    popularity_refresh_s=0, dr_enabled=False)


def messages_at(count: int = 12):
    examples, _ = examples_and_histories()
    size = len(examples) // count
    values = [TrainBatch(examples=examples[start:start + size]).to_bytes()
              for start in range(0, size * count, size)]
    return values, [(n % 2, n // 2) for n in range(count)]  # two partitions, interleaved


def test_a_restarted_engine_skips_the_messages_its_checkpoint_holds(tmp_path):
    """Messages learned, checkpointed, then all delivered again after a crash: the restarted
    engine learns only those after the checkpoint, and ends as an engine that learned each
    message once. Without positions it learns the first ones twice."""
    values, positions = messages_at()
    once = Engine(settings_for(tmp_path / "once"))
    once.users = 240
    once.learn_messages(values[:8], 32, positions=positions[:8])
    once.learn_messages(values[8:], 32, positions=positions[8:])

    crashed = Engine(settings_for(tmp_path / "crashed"))
    crashed.users = 240
    crashed.learn_messages(values[:8], 32, positions=positions[:8])
    crashed.save()
    crashed.learn_messages(values[8:10], 32, positions=positions[8:10])  # lost in the crash
    restarted = Engine(settings_for(tmp_path / "crashed"))
    assert restarted.load()
    restarted.users = 240
    for start in range(0, 12, 4):  # everything again: nothing was committed
        restarted.learn_messages(values[start:start + 4], 32,
                                 positions=positions[start:start + 4])
    assert restarted.redelivered == 8
    assert restarted.learner.events == once.learner.events == len(examples_and_histories()[0])
    np.testing.assert_allclose(restarted.learner.item_matrix, once.learner.item_matrix,
                               rtol=1e-9, atol=1e-12)

    blind = Engine(settings_for(tmp_path / "crashed"))  # the same without positions
    assert blind.load()
    blind.users = 240
    blind.learn_messages(values, 32)
    assert blind.learner.events > once.learner.events


class Intake:
    def __init__(self) -> None:
        self.acked: list = []

    def ack(self, batch: list) -> None:
        self.acked += [message.offset for message in batch]


def test_batches_are_acknowledged_when_a_checkpoint_holds_them():
    intake = Intake()
    acks = AcksAfterCheckpoint(intake)
    batches = [[SimpleNamespace(offset=3 * n + i, value=b"x") for i in range(3)]
               for n in range(4)]
    for number, batch in enumerate(batches, start=1):
        acks.handed(number, batch)
    assert all(message.value is None for batch in batches for message in batch)
    assert intake.acked == [] and acks.waiting == 12
    acks.checkpointed(0)  # a checkpoint requested before any batch
    assert intake.acked == []
    acks.checkpointed(2)
    assert intake.acked == list(range(6)) and acks.waiting == 6
    acks.checkpointed(2)  # nothing twice
    acks.checkpointed(4)
    assert intake.acked == list(range(12)) and acks.waiting == 0


def test_past_the_limit_the_intake_waits_for_an_early_checkpoint():
    """Saves that fail (a full disk) must not let unacknowledged messages fill the memory:
    past ``limit`` the learn task's room closes and one early checkpoint is asked for; the
    room opens again once a checkpoint has let the messages go."""
    asked = []
    acks = AcksAfterCheckpoint(Intake(), ask_checkpoint=lambda: asked.append(1), limit=5)
    batch = [SimpleNamespace(offset=n, value=b"x") for n in range(3)]
    acks.handed(1, batch)
    assert acks.room.is_set() and asked == []
    acks.handed(2, [SimpleNamespace(offset=n, value=b"x") for n in range(3, 6)])
    acks.handed(3, [SimpleNamespace(offset=6, value=b"x")])
    assert not acks.room.is_set() and asked == [1]  # asked once
    acks.checkpointed(0)  # a checkpoint asked for before them
    assert not acks.room.is_set()
    acks.checkpointed(1)
    assert acks.room.is_set() and acks.waiting == 4


def emissions(seed: int, events: int = 60, trains: int = 3, sources: int = 2):
    """What ingest sends, per training partition in order: each event of each events
    partition as (events partition, offset), to its item's training partition. A crash at
    random cuts a pass short (what it had not sent is lost) and the next pass starts again
    at an earlier offset (the last commit), until a pass reaches the end."""
    rng = np.random.default_rng(seed)
    item_partition = rng.integers(0, trains, (sources, events))
    queues: list[list[tuple[int, int]]] = [[] for _ in range(trains)]
    for source in range(sources):
        committed = 0
        while True:
            stop = events if rng.random() < 0.4 else int(rng.integers(committed, events + 1))
            for offset in range(committed, stop):
                queues[int(item_partition[source, offset])].append((source, offset))
            if stop == events:
                break
            committed = int(rng.integers(committed, stop + 1))
    return queues


def test_each_event_is_learned_once_whatever_is_sent_again():
    """Oracle: examples sent again by passes restarted from earlier offsets, taken from the
    training partitions interleaved at random, in batches: every event is admitted exactly
    once (nothing lost, nothing twice), at its first sending."""
    for seed in range(30):
        rng = np.random.default_rng(100 + seed)
        queues = emissions(seed)
        first = {(train, sent) for train, queue in enumerate(queues) for sent in set(queue)}
        positions = EventPositions("events")
        admitted = []
        while any(queues):
            batch = []
            for _ in range(int(rng.integers(1, 9))):
                live = [t for t, queue in enumerate(queues) if queue]
                if not live:
                    break
                train = int(rng.choice(live))
                batch.append((train, queues[train].pop(0)))
            fresh = positions.admit([t for t, _ in batch], [s for _, s in batch])
            admitted += [taken for taken, new in zip(batch, fresh) if new]
        assert sorted(admitted) == sorted(first)  # each (partition, event) once
        assert len(admitted) == 2 * 60


def test_examples_made_from_an_events_topic_since_made_anew_keep_no_place(tmp_path):
    """Training messages name the id of the events topic their places are in. A learner
    whose noted events topic is another (made anew since: its offsets start again) learns
    the older messages' examples without their places: by them, it took the new topic's
    first events for learned ones. A message that names none keeps its places."""
    from stream_app.wire import TrainExample

    def message(offsets, events_topic):
        examples = [TrainExample(user_id=f"u{n}", item_id=f"i{n % 5}", alpha=1.0, ts=1.0,
                                 history=["i0"], weights=[1.0], source=(0, n))
                    for n in offsets]
        return TrainBatch.encode_parts([e.to_bytes() for e in examples], 1, users=10,
                                       partition=0, events_topic=events_topic)

    engine = Engine(settings_for(tmp_path))
    engine.events_topic_id = "new"
    engine.users = 10
    engine.learn_messages([message(range(1000, 1010), "old"), message(range(10), "new")], 1)
    assert engine.learner.events == 20 and engine.repeated_examples == 0
    assert engine.event_positions.next_offsets() == {(0, 0): 10}
    engine.learn_messages([message(range(5, 15), "new")], 2)  # read again: five new
    assert engine.learner.events == 25 and engine.repeated_examples == 5
    engine.learn_messages([message(range(12, 16), None)], 3)  # an older message: by place
    assert engine.learner.events == 26 and engine.event_positions.next_offsets() == {(0, 0): 16}


def test_event_positions_are_restored_for_their_topic_and_leave_placeless_examples_alone():
    positions = EventPositions("events")
    assert positions.admit([0, 0, 1, None, 1], [(2, 5), (2, 3), (2, 3), (2, 1), None]) == [
        True, False, True, True, True]
    again = EventPositions("events")
    again.set_arrays(positions.to_arrays())
    assert again.next_offsets() == {(0, 2): 6, (1, 2): 4}
    assert again.admit([0, 0], [(2, 5), (2, 6)]) == [False, True]
    other = EventPositions("other-events")
    other.set_arrays(positions.to_arrays())
    assert other.next_offsets() == {}
    older = EventPositions("events")
    older.set_arrays({})  # a checkpoint from before event positions were saved
    assert older.next_offsets() == {}


def ingest_batches(engine: Engine, events, first: int, stored: dict, *, placed: bool,
                   size: int = 40):
    """The worker's ingest from offset ``first`` of events partition 0: per batch, the
    histories it stores and its training messages (as ``stream_app/app.py`` makes them), with
    the events' offsets where ``placed``."""
    for start in range(first, len(events), size):
        batch = events[start:start + size]
        updated, examples, repeated = engine.ingest_many(
            batch, stored, [(0, start + n) for n in range(len(batch))] if placed else None)
        stored.update(histories_to_write(batch, repeated, updated, stored))
        yield start, dict(training_messages([e for e in examples if e is not None], 2, 1,
                                            engine.users))


def test_a_worker_that_dies_before_its_training_messages_loses_no_event(tmp_path):
    """The ingest stores a batch's histories, then dies before its training message to one
    partition is sent; its events are read again from the last commit. Their examples are
    made again from the histories (equal to the lost ones), those the model learned are
    skipped, and the model learns every event once. Without the events' offsets the lost
    examples are never learned."""
    from tests.test_engine_model import planted_stream

    events = planted_stream()[:400]
    learned = {}
    for blind in (False, True):
        ingest = Engine(settings_for(tmp_path / f"ingest{blind}"))
        learner = Engine(settings_for(tmp_path / f"learn{blind}"))
        stored: dict = {}
        offsets = [0, 0]  # next offset of each training partition
        lost = []

        def deliver(messages: dict[int, bytes]) -> None:
            for partition, value in sorted(messages.items()):
                learner.learn_messages([value], 32, positions=[(partition, offsets[partition])])
                offsets[partition] += 1

        for start, messages in ingest_batches(ingest, events, 0, stored, placed=not blind):
            if start == 160:  # dies here: the histories stored, partition 1's message lost
                lost = TrainBatch.decode_many([messages.pop(1)]).examples
                deliver(messages)
                break
            deliver(messages)
        remade = []
        for start, messages in ingest_batches(ingest, events, 80, stored,  # committed: 80
                                              placed=not blind):
            if start == 160 and not blind:
                remade = TrainBatch.decode_many([messages[1]]).examples
            deliver(messages)
        learned[blind] = learner.learner.events
        if not blind:
            assert remade == lost and lost
            assert learner.repeated_examples == 160 - 80 + 40 - len(lost)
    assert learned[False] == len(events)
    assert learned[True] < len(events)


def test_positions_saved_before_the_topics_were_renewed_are_void(tmp_path):
    """After the mark, a checkpoint loads with no positions and its model whole; one written
    since holds its positions again."""
    from state.stream_positions import mark_topics_renewed

    values, positions = messages_at()
    engine = Engine(settings_for(tmp_path))
    engine.users = 240
    engine.learn_messages(values[:6], 32, positions=positions[:6])
    engine.event_positions.admit([0], [(1, 5)])
    assert engine.positions.next_offsets() and engine.event_positions.next_offsets()
    engine.save()
    mark_topics_renewed(tmp_path / "checkpoints")
    now = time.time()  # apart by seconds, as a run's start and its checkpoints are
    os.utime(tmp_path / "checkpoints" / "model.npz", (now - 20, now - 20))
    os.utime(tmp_path / "checkpoints" / "topics-renewed", (now - 10, now - 10))
    again = Engine(settings_for(tmp_path))
    assert again.load()
    assert again.positions.next_offsets() == {} and again.event_positions.next_offsets() == {}
    assert again.learner.events == engine.learner.events
    np.testing.assert_array_equal(again.learner.item_matrix, engine.learner.item_matrix)
    again.users = 240
    again.learn_messages(values[6:], 32, positions=[(0, 0), (1, 0), (0, 1), (1, 1), (0, 2),
                                                   (1, 2)])  # the new topic's offsets
    assert again.learner.events == len(examples_and_histories()[0])
    again.save()
    third = Engine(settings_for(tmp_path))
    assert third.load()
    assert third.positions.next_offsets() == {0: 3, 1: 3}


def test_one_topic_made_again_voids_the_places_in_it_alone(tmp_path):
    """A mark of the training topic alone voids the checkpoint's positions in it and keeps
    its places in the events topic, the popularity's too (events read again are not counted
    twice); a mark of the events topic voids those and keeps the training positions."""
    from state.stream_positions import RENEWED, mark_topics_renewed

    values, positions = messages_at()
    settings = settings_for(tmp_path)
    engine = Engine(settings)
    engine.users = 240
    engine.learn_messages(values[:6], 32, positions=positions[:6])
    engine.event_positions.admit([0], [(1, 5)])
    engine.popularity.add_unheld(["a"], [1e9], [1.0], [(1, 5)])
    engine.save()
    saved = {"train": engine.positions.next_offsets(),
             "events": engine.event_positions.next_offsets(),
             "popularity": engine.popularity.places.next_offsets()}
    assert all(saved.values())
    checkpoints = tmp_path / "checkpoints"
    past = time.time() - 20  # the checkpoint, written before the topic was made again
    for file in checkpoints.iterdir():
        os.utime(file, (past, past))
    for topic, void in ((settings.train_topic, {"train"}),
                        (settings.topic_events, {"events", "popularity"})):
        for mark in checkpoints.glob(f"{RENEWED}*"):
            mark.unlink()
        mark_topics_renewed(checkpoints, [topic])
        again = Engine(settings)
        assert again.load()
        assert {"train": again.positions.next_offsets(),
                "events": again.event_positions.next_offsets(),
                "popularity": again.popularity.places.next_offsets()} == {
                    name: ({} if name in void else places) for name, places in saved.items()}
        assert again.popularity.count("a", 1e9) == 1.0


def test_the_item_rows_topic_made_again_owes_every_row_and_another_topic_does_not(tmp_path):
    """At a start that finds the item-rows topic made again, the mark that it holds every row
    of the worker's items goes (the next publish sends them all); another topic made again
    leaves it."""
    from state.stream_positions import ROWS_SHARED
    from stream_app.kafka import Topics
    from stream_app.worker import note_topics

    settings = Settings(data_dir=tmp_path, broker="127.0.0.1:1", share_items=True)
    ids = {settings.topic_events: "a", settings.train_topic: "b", settings.items_topic: "c"}
    assert note_topics(settings, Topics(ids, [])) == []
    mark = tmp_path / "checkpoints" / ROWS_SHARED
    mark.touch()
    ids[settings.train_topic] = "b2"
    assert note_topics(settings, Topics(ids, [])) == [settings.train_topic]
    assert mark.exists()
    ids[settings.items_topic] = "c2"
    assert note_topics(settings, Topics(ids, [])) == [settings.items_topic]
    assert not mark.exists()


def test_topics_renewed_and_a_worker_without_sharing_owe_the_item_rows_topic_every_row(tmp_path):
    """The mark that the item-rows topic holds every row of the worker's items goes when the
    topics start anew, and when a worker runs without sharing (what it learns is not
    published): the next start with sharing publishes them all."""
    from state.stream_positions import ROWS_SHARED, mark_topics_renewed
    from stream_app.app import create_app
    from stream_app.settings import Settings
    from stream_app.worker import build_metrics

    mark = tmp_path / "checkpoints" / ROWS_SHARED
    mark.parent.mkdir(parents=True)
    mark.touch()
    mark_topics_renewed(mark.parent)
    assert not mark.exists()
    mark.touch()
    settings = Settings(data_dir=tmp_path, broker="127.0.0.1:1", metrics_port=0)
    engine = Engine(settings)
    create_app(settings.replace(share_items=True), engine, build_metrics(engine))
    assert mark.exists()
    create_app(settings, engine, build_metrics(engine))
    assert not mark.exists()


def test_a_topic_made_again_voids_the_positions_in_it_and_others_do_not(tmp_path):
    """The ids noted at one start against those of the next: the same ids, or a topic never
    noted, keep the positions; a changed id, or a topic made by this start that was noted
    before, voids those in that topic alone. A note that is not a JSON object of ids is not
    trusted."""
    from state.stream_positions import RENEWED, TOPIC_IDS, note_topic_ids, positions_void

    checkpoints = tmp_path / "checkpoints"
    model = checkpoints / "model.npz"

    def start(ids, created=()):
        checkpoints.mkdir(exist_ok=True)
        for mark in checkpoints.glob(f"{RENEWED}*"):  # the marks of this start's only
            mark.unlink()
        model.write_bytes(b"a checkpoint")
        past = time.time() - 20
        os.utime(model, (past, past))
        renewed = note_topic_ids(checkpoints, ids, created)
        return renewed, {topic for topic in ("events", "train", "rows")
                         if positions_void(model, topic)}

    assert start({"events": "a", "train": "b"}) == ([], set())  # the first start notes them
    assert start({"events": "a", "train": "b", "rows": "c"}) == ([], set())
    assert start({"events": "a"}) == ([], set())  # one not described keeps its note
    assert start({"events": "a", "train": "b2"}) == (["train"], {"train"})
    assert positions_void(model)  # a topic was made again
    assert json.loads((checkpoints / TOPIC_IDS).read_text()) == {
        "events": "a", "train": "b2", "rows": "c"}
    assert start({"events": "a", "train": "b2"}) == ([], set())
    assert not positions_void(model)
    assert start({"train": "b2"}, created=["events"]) == (["events"], {"events"})  # no id
    assert start({"events": "a3"}, created=["events"]) == ([], set())  # noted since: no id
    assert start({"events": "a4", "rows": "c2"}) == (["events", "rows"], {"events", "rows"})
    (checkpoints / TOPIC_IDS).write_text('["events", "a5"]')
    assert start({"events": "a5"}) == ([], set())
    (checkpoints / TOPIC_IDS).write_bytes(b"\xff")
    assert start({"events": "a6"}) == ([], set())
    assert start({"events": "a6"}) == ([], set())
