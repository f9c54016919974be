"""Each training message is learned once: the positions the model saves with it skip what it
holds when Kafka delivers it again, and the learn agent commits a message only once a
checkpoint holds it."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from state.stream_positions import StreamPositions
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
