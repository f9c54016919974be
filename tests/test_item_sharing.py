"""Item sharing without a broker: what a publish owes the item-rows topic."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest

from stream_app.engine import Engine, item_partition
from stream_app import item_sharing
from stream_app.item_sharing import ItemSharing, rows_shared_mark
from stream_app.settings import Settings


def delivery(error: Exception | None = None, after_s: float | None = None) -> asyncio.Future:
    """A send's delivery, as Faust's ``send`` returns it: taken (``error`` None) or refused
    with ``error``, at once or ``after_s`` later."""
    future = asyncio.get_running_loop().create_future()
    settle = ((future.set_result, None) if error is None else (future.set_exception, error))
    if after_s is None:
        settle[0](settle[1])
    else:
        asyncio.get_running_loop().call_later(after_s, *settle)
    return future


def test_a_worker_whose_rows_the_topic_may_lack_publishes_every_row_it_owns_once(tmp_path):
    """Without the mark the first publish sends every owned row (not only those that
    moved), once partitions are held: rows of items it does not own are never published.
    The mark is made only once the broker took them all; a refusal leaves them owed."""
    settings = Settings(data_dir=tmp_path, model_dim=4, partitions=2, share_items=True)
    engine = Engine(settings)
    ids = [f"item-{n}" for n in range(40)]
    engine.learner.assign(ids, np.ones((len(ids), 5)))
    held: set[int] = set()
    sent: list[str] = []
    refuse = [True]

    async def send_row(key: bytes, value: bytes) -> asyncio.Future:
        sent.append(key.decode())
        return delivery(RuntimeError("refused") if refuse[0] else None)

    async def send_steps(partition: int, value: bytes) -> None:
        pass

    def sharing_of() -> ItemSharing:
        return ItemSharing(settings, engine, lambda: frozenset(held), lambda records, keep: None,
                           owes_every_row=not rows_shared_mark(settings).exists())

    def publish(sharing: ItemSharing) -> None:
        asyncio.run(sharing.publish(lambda: (sharing.due(), sharing.steps_due()), send_row,
                                    send_steps))

    sharing = sharing_of()
    publish(sharing)  # nothing held yet: nothing owed can be sent
    assert sent == [] and not rows_shared_mark(settings).exists()
    held.add(0)
    with pytest.raises(RuntimeError, match="refused"):
        publish(sharing)
    owned = sorted(i for i in ids if item_partition(i, 2) == 0)
    assert sorted(sent) == owned and not rows_shared_mark(settings).exists()
    sent.clear()
    refuse[0] = False
    publish(sharing)
    assert sorted(sent) == owned and rows_shared_mark(settings).exists()
    sent.clear()
    publish(sharing)
    publish(sharing_of())  # a later start: the topic holds them
    assert sent == []


def test_a_checkpoint_between_publishes_is_written_before_a_publish_reads_or_after_it_sent(
        tmp_path):
    """A publish reads its rows, then sends them one by one; a record's time is its send's.
    A checkpoint written in between passed for older than rows read before it, and a
    restart's catch-up installed those over its later learning (whose messages it then
    skipped as learned). ``between_publishes`` waits for a publish's last send, and a
    publish waits to read until the checkpoint is written."""
    settings = Settings(data_dir=tmp_path, model_dim=4, partitions=1, share_items=True)
    engine = Engine(settings)
    engine.learner.assign([f"item-{n}" for n in range(5)], np.ones((5, 5)))
    sharing = ItemSharing(settings, engine, lambda: frozenset({0}), lambda records, keep: None,
                          owes_every_row=True)
    order: list[str] = []

    def take():
        order.append("read")
        return sharing.due(), []

    async def send_row(key: bytes, value: bytes) -> asyncio.Future:
        await asyncio.sleep(0.01)
        order.append("send")
        return delivery()

    async def send_steps(partition: int, value: bytes) -> None:
        pass

    async def checkpoint() -> None:
        async with sharing.between_publishes():
            order.append("checkpoint")
            await asyncio.sleep(0.03)  # a write the publish must not read in

    async def scenario() -> None:
        publish = asyncio.create_task(sharing.publish(take, send_row, send_steps))
        while "send" not in order:  # the publish has read and is sending
            await asyncio.sleep(0.001)
        await asyncio.gather(checkpoint(), publish)
        writing = asyncio.create_task(checkpoint())
        await asyncio.sleep(0.005)  # the checkpoint is being written
        sharing._owes_every_row = True
        await asyncio.gather(sharing.publish(take, send_row, send_steps), writing)

    async def hand_over_during_a_checkpoint() -> None:  # bounded: a rebalance waits for it
        writing = asyncio.create_task(checkpoint())
        await asyncio.sleep(0.005)
        with pytest.raises(item_sharing.PublishBusy):
            await sharing.publish(take, send_row, send_steps, wait_s=0.01)
        await writing

    async def both() -> None:  # one loop: the lock is bound to it
        await scenario()
        assert order == (["read"] + ["send"] * 5 + ["checkpoint", "checkpoint", "read"]
                         + ["send"] * 5)
        order.clear()
        await hand_over_during_a_checkpoint()
        assert order == ["checkpoint"]  # nothing read: the rows stay due

    asyncio.run(both())


def test_steps_go_out_in_messages_within_the_size_limit_and_only_finite_ones(tmp_path,
                                                                           monkeypatch):
    """Messages of offset steps are cut by their measured size (JSON escapes a non-ASCII id
    to several bytes a character), each to its items' partition; a step that is not finite
    as float32 is dropped rather than sent to stop its whole message at the owner."""
    from stream_app.wire import decode_offset_steps

    monkeypatch.setattr(item_sharing, "STEPS_MESSAGE_BYTES", 4_000)
    settings = Settings(data_dir=tmp_path, model_dim=4, partitions=2, share_items=True)
    engine = Engine(settings)
    ids = [f"{'é' * 200}-{n}" for n in range(12)] + ["huge"]
    engine.learner.assign(ids, np.ones((len(ids), 5)))
    steps = np.arange(4.0 * len(ids)).reshape(len(ids), 4)
    steps[-1, 0] = 1e39  # finite in float64, not in float32
    sharing = ItemSharing(settings, engine, frozenset, lambda records, keep: None)
    empty = np.empty(0, dtype=np.int64)
    sharing.note(SimpleNamespace(steps_added=0, installed=False,
                                 delta=SimpleNamespace(rows=empty, input_rows=empty),
                                 input_steps=(np.arange(len(ids)), steps)))
    messages = sharing.steps_due()
    assert len(messages) > 2 and all(len(value) <= 4_000 + 16 for _, value in messages)
    got = {}
    for partition, value in messages:
        items, values = decode_offset_steps(value, 4)
        assert {item_partition(item, 2) for item in items} == {partition}
        got.update(zip(items, values.tolist()))
    assert got == {item: steps[n].tolist() for n, item in enumerate(ids[:-1])}
    assert sharing.steps_sent == len(ids) - 1


def test_rows_and_steps_whose_delivery_the_broker_refuses_are_due_again(tmp_path):
    """A publish returns once every record it sent is delivered (the worker commits the
    training messages its rows hold after it): a refused row is due again, with its value
    read again, and refused steps are held again, added to those taken since; the publish
    raises, so nothing is committed on its word."""
    from stream_app.wire import decode_offset_steps

    settings = Settings(data_dir=tmp_path, model_dim=4, partitions=1, share_items=True)
    engine = Engine(settings)
    ids = ["a", "b", "c"]
    engine.learner.assign(ids, np.ones((3, 5)))
    rows_shared_mark(settings).parent.mkdir(parents=True, exist_ok=True)
    rows_shared_mark(settings).touch()
    sharing = ItemSharing(settings, engine, lambda: frozenset({0}), lambda records, keep: None)
    empty = np.empty(0, dtype=np.int64)

    def learned(rows, steps=None) -> None:
        sharing.note(SimpleNamespace(
            steps_added=0, installed=False,
            delta=SimpleNamespace(rows=np.array(rows), input_rows=empty),
            input_steps=None if steps is None else (np.array([2]), np.array([steps]))))

    refuse = {b"b"}
    sent_rows, sent_steps = [], []

    async def send_row(key: bytes, value: bytes) -> asyncio.Future:
        sent_rows.append(key)
        return delivery(RuntimeError("not leader") if key in refuse else None, after_s=0.01)

    async def send_steps(partition: int, value: bytes) -> asyncio.Future:
        sent_steps.append(decode_offset_steps(value, 4)[1].sum(axis=0).tolist())
        return delivery(RuntimeError("too large") if len(sent_steps) == 1 else None)

    def publish() -> None:
        asyncio.run(sharing.publish(lambda: (sharing.due(), sharing.steps_due(frozenset())),
                                    send_row, send_steps))

    learned([0, 1], steps=[1.0, 0, 0, 0])
    with pytest.raises(RuntimeError, match="refused 1 item rows and 1 messages"):
        publish()
    assert sorted(sent_rows) == [b"a", b"b"]
    learned([], steps=[2.0, 0, 0, 0])
    refuse.clear()
    sent_rows.clear()
    publish()
    assert sent_rows == [b"b"]  # a is on the topic; b again
    assert sent_steps == [[1.0, 0, 0, 0], [3.0, 0, 0, 0]]  # the refused step, added to


def test_a_publish_whose_send_fails_follows_what_it_sent_before_it(tmp_path):
    """A send that raises mid-publish (a metadata timeout while the broker moves): the rows
    sent before it whose delivery the broker refused are due again with those not sent, so
    the next publish, after which the worker commits, sends them."""
    settings = Settings(data_dir=tmp_path, model_dim=4, partitions=1, share_items=True)
    engine = Engine(settings)
    engine.learner.assign(["a", "b"], np.ones((2, 5)))
    rows_shared_mark(settings).parent.mkdir(parents=True, exist_ok=True)
    rows_shared_mark(settings).touch()
    sharing = ItemSharing(settings, engine, lambda: frozenset({0}), lambda records, keep: None)
    empty = np.empty(0, dtype=np.int64)
    sharing.note(SimpleNamespace(steps_added=0, installed=False, input_steps=None,
                                 delta=SimpleNamespace(rows=np.array([0, 1]), input_rows=empty)))
    sent: list[bytes] = []
    failing = [True]

    async def send_row(key: bytes, value: bytes) -> asyncio.Future:
        if failing[0] and sent:
            raise RuntimeError("metadata not updated")
        sent.append(key)
        return delivery(RuntimeError("not leader") if failing[0] else None)

    async def send_steps(partition: int, value: bytes) -> None:
        return None

    def publish() -> None:
        asyncio.run(sharing.publish(lambda: (sharing.due(), []), send_row, send_steps))

    with pytest.raises(RuntimeError, match="metadata"):
        publish()
    assert len(sent) == 1
    failing[0] = False
    sent.clear()
    publish()
    assert sorted(sent) == [b"a", b"b"]


def test_steps_sent_before_a_failed_send_and_refused_are_held_again(tmp_path):
    """Steps add up, so a step message is sent again only when the broker refused it: one
    refused before a later send raised is held again (with the unsent), one taken is not."""
    from stream_app.wire import encode_offset_steps

    settings = Settings(data_dir=tmp_path, model_dim=2, partitions=2, share_items=True)
    engine = Engine(settings)
    engine.learner.assign(["x", "y", "z"], np.ones((3, 3)))
    sharing = ItemSharing(settings, engine, frozenset, lambda records, keep: None)
    messages = [(0, encode_offset_steps(["x"], np.array([[1.0, 0.0]]))),
                (1, encode_offset_steps(["y"], np.array([[2.0, 0.0]]))),
                (0, encode_offset_steps(["z"], np.array([[3.0, 0.0]])))]
    outcomes = iter(["taken", "refused", "raise"])

    async def send_steps(partition: int, value: bytes) -> asyncio.Future:
        outcome = next(outcomes)
        if outcome == "raise":
            raise RuntimeError("metadata not updated")
        return delivery(None if outcome == "taken" else RuntimeError("not leader"), after_s=0.01)

    async def send_row(key: bytes, value: bytes) -> None:
        return None

    with pytest.raises(RuntimeError, match="metadata"):
        asyncio.run(sharing.publish(lambda: ([], list(messages)), send_row, send_steps))
    held = {engine.learner.item_ids_at([row])[0]: step.tolist()
            for row, step in sharing._steps.items()}
    assert held == {"y": [2.0, 0.0], "z": [3.0, 0.0]}


def test_a_worker_whose_training_partitions_move_away_forgets_their_items_statistics(tmp_path):
    """The worker's app, learning on its event loop: an assignment without a training
    partition it held before forgets the solve statistics of that partition's items (their
    next owner learns them); those of the partitions kept stay."""
    from aiokafka import TopicPartition

    from stream_app.app import create_app
    from stream_app.wire import TrainExample
    from stream_app.worker import build_metrics

    settings = Settings(data_dir=tmp_path, broker="127.0.0.1:1", metrics_port=0, model_dim=4,
                        partitions=2, share_items=True, learner_process=False,
                        dr_enabled=False)
    engine = Engine(settings)
    items = [f"item-{n}" for n in range(30)]
    engine.learn([TrainExample(user_id=f"u{n}", item_id=item, alpha=1.0, ts=1.0,
                               history=[items[n - 1]], weights=[1.0])
                  for n, item in enumerate(items)], users=30)
    app = create_app(settings, engine, build_metrics(engine))

    def statistics() -> set[int]:
        held = engine.learner.item_ids_at(engine.learner.rows_with_positives())
        return {item_partition(item, 2) for item in held}

    def train(*partitions: int) -> set:
        return {TopicPartition(settings.train_topic, p) for p in partitions}

    async def scenario() -> list[set[int]]:
        seen = []
        for assigned in (train(0, 1), train(0), train(0, 1)):
            await app.on_partitions_assigned.send(assigned)
            seen.append(statistics())
        return seen

    assert asyncio.run(scenario()) == [{0, 1}, {0}, {0}]


def test_item_rows_under_keys_no_event_could_name_are_skipped(tmp_path):
    """The key of an item-rows record is the item's id: an empty key or one with a NUL was
    installed as an item that no event can name, and answers could recommend it."""
    from stream_app.wire import encode_item_row

    settings = Settings(data_dir=tmp_path, dr_enabled=False, index_enabled=False,
                        model_dim=4)
    engine = Engine(settings)
    row = encode_item_row(np.ones(5), np.zeros(4))
    report = item_sharing.install_records(
        engine, [(b"", row), (b"a\x00", row), (b"x" * 257, row), (b"ok", row)])
    assert report is not None and engine.learner.item_ids == ["ok"]
