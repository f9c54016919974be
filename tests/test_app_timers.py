"""The worker's timers without a broker: what one tick does when the disk fails."""

from __future__ import annotations

import asyncio
import inspect
from types import SimpleNamespace

import numpy as np

from stream_app.app import create_app
from stream_app.engine import Engine
from stream_app.settings import Settings
from stream_app.worker import build_metrics


def timer(app, name: str):
    """The function behind one of the app's timers (Faust wraps it twice)."""
    return next(inspect.unwrap(task) for task in app._app_tasks
                if inspect.unwrap(task).__name__ == name)


def offline_app(data_dir, learner=None, **changes):
    """A worker's app, made and not started: it reaches no broker."""
    settings = Settings(data_dir=data_dir, broker="127.0.0.1:1", metrics_port=0, **changes)
    engine = Engine(settings)
    return create_app(settings, engine, build_metrics(engine), learner)


def test_a_popularity_checkpoint_the_disk_refuses_does_not_stop_the_worker(tmp_path, caplog):
    """With a learner process, the checkpoint timer writes popularity here and asks the
    learner for the model's checkpoint: a full disk is logged, the learner is still asked
    (learning and commits go on as the model's checkpoints allow), and the timer's task does
    not raise (Faust would crash the worker)."""
    settings = Settings(data_dir=tmp_path, broker="127.0.0.1:1", metrics_port=0)
    engine = Engine(settings)
    saves = []
    learner = SimpleNamespace(request_save=lambda: saves.append(1), save_due=lambda **kwargs: True)
    app = create_app(settings, engine, build_metrics(engine), learner)

    engine.popularity.add("an item", 1.0)
    asyncio.run(timer(app, "checkpoint")())  # written in a thread
    assert engine.popularity_path.exists() and saves == [1]

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    engine.popularity.write = full_disk
    with caplog.at_level("ERROR"):
        asyncio.run(timer(app, "checkpoint")())
    assert saves == [1, 1]
    assert "could not write the popularity checkpoint" in caplog.text


def test_the_last_checkpoint_leaves_the_model_alone_while_item_sharing_catches_up(tmp_path):
    """Without a learner process the worker saves the model at exit, except during item
    sharing's catch-up: its time would then pass own rows published before the last stop and
    not installed yet, which the next start's catch-up would leave out."""
    from stream_app.worker import save_on_exit

    saved = []
    engine = SimpleNamespace(save=lambda model: saved.append(model), checkpoint_dir=tmp_path)
    def app_of(**changes):
        return offline_app(tmp_path, learner_process=False, **changes)

    app = app_of(share_items=True)
    save_on_exit(engine, app, learner=None)
    app.streamrec_sharing.caught_up.set()
    save_on_exit(engine, app, learner=None)
    save_on_exit(engine, app, learner=object())  # the learner saved its own
    save_on_exit(engine, app_of(), learner=None)
    assert saved == [False, True, False, True]


def test_with_item_sharing_a_checkpoint_does_not_commit_training_messages(tmp_path):
    """A checkpoint holds this worker's rows for this worker; after a crash its items may go
    to another worker, which starts them from the item-rows topic. With sharing, training
    messages are acknowledged once a publish holds their learning, not at a checkpoint (a
    crash between the two, then a move of the partitions, lost that learning)."""
    def acked_at_checkpoint(share_items: bool) -> list:
        hooks = {}

        async def attach(**callbacks):
            hooks.update(callbacks)

        learner = SimpleNamespace(attach=attach, drained=None, last_written=None)
        app = offline_app(tmp_path / str(share_items), learner, share_items=share_items)
        asyncio.run(timer(app, "follow_learner")())
        acked = []
        acks = app.streamrec_train_acks
        acks.intake = SimpleNamespace(ack=acked.extend)
        acks.handed(1, [SimpleNamespace(value=b"an example")])
        hooks["on_saved"](1)  # the learner process's checkpoint holds batch 1
        assert acks.waiting == 1 - len(acked)
        return acked

    assert acked_at_checkpoint(share_items=True) == []
    assert len(acked_at_checkpoint(share_items=False)) == 1


def test_with_item_sharing_a_full_intake_asks_for_no_checkpoint(tmp_path):
    """At ``UNCOMMITTED_LIMIT`` the learn task waits for room. Without sharing a checkpoint
    makes it, and is asked for; with sharing only the next publish does, so a checkpoint
    would be a save of the model for nothing."""
    def saves_asked(share_items: bool) -> list:
        saves = []
        learner = SimpleNamespace(request_save=lambda: saves.append(1), drained=None,
                                  save_due=lambda **kwargs: True)
        app = offline_app(tmp_path / str(share_items), learner, share_items=share_items)
        acks = app.streamrec_train_acks
        acks.limit = 2
        acks.handed(1, [SimpleNamespace(value=b"an example")] * 2)
        assert not acks.room.is_set()
        return saves

    assert saves_asked(share_items=True) == []
    assert saves_asked(share_items=False) == [1]


def test_with_item_sharing_a_publish_commits_the_training_messages_its_rows_hold(tmp_path):
    """The publish timer sends the due rows, then acknowledges the batches whose learning
    they hold (those the loop had followed when it began) and commits them after the
    producer's flush; later batches, and a publish that failed, commit nothing."""
    steps = []

    async def attach(**callbacks):
        pass

    learner = SimpleNamespace(attach=attach, drained=None, batches_followed=1)
    app = offline_app(tmp_path, learner, share_items=True)
    sharing, acks = app.streamrec_sharing, app.streamrec_train_acks
    sharing.caught_up.set()
    acks.intake = SimpleNamespace(ack=lambda batch: steps.append(("ack", len(batch))))

    async def publish(*args):
        steps.append(("publish",))
        learner.batches_followed = 2  # learned while the rows went out: not in them

    async def flush():
        steps.append(("flush",))

    async def commit_finished():
        return False

    async def commit():
        steps.append(("commit",))

    sharing.publish = publish
    app.producer = SimpleNamespace(flush=flush)
    app.consumer = SimpleNamespace(maybe_wait_for_commit_to_finish=commit_finished,
                                   commit=commit)
    for number in (1, 2):
        acks.handed(number, [SimpleNamespace(value=b"an example")] * number)
    asyncio.run(timer(app, "publish_item_rows")())
    assert steps == [("publish",), ("ack", 1), ("flush",), ("commit",)]
    assert acks.waiting == 2

    async def failing_publish(*args):
        raise RuntimeError("the broker refused 3 item rows")

    sharing.publish, steps[:] = failing_publish, []
    asyncio.run(timer(app, "publish_item_rows")())
    assert steps == [] and acks.waiting == 2


def test_the_learn_task_takes_its_own_count_of_messages_not_a_steps_examples(tmp_path):
    """A training message holds tens of examples: the learn task takes
    ``learn_take_messages`` of them at once, whatever the step (``learn_batch``) is."""
    app = offline_app(tmp_path, SimpleNamespace(attach=None, drained=None), learn_batch=512,
                      learn_take_messages=64)
    assert app.streamrec_train_acks.intake.batch_size == 64


def test_the_checkpoints_written_are_counted_by_kind_with_the_last_ones_size(tmp_path):
    """A learner process's report of a checkpoint says what it wrote: the worker counts it
    by kind and shows its bytes and seconds; one that had nothing to write counts nothing.
    A worker that learns on its loop counts its own."""
    from stream_app.engine import CheckpointWritten

    hooks = {}

    async def attach(**callbacks):
        hooks.update(callbacks)

    learner = SimpleNamespace(attach=attach, drained=None, last_written=None)
    settings = Settings(data_dir=tmp_path / "learner", broker="127.0.0.1:1", metrics_port=0)
    engine = Engine(settings)
    metrics = build_metrics(engine)
    app = create_app(settings, engine, metrics, learner)
    asyncio.run(timer(app, "follow_learner")())

    def count(kind: str) -> float:
        return metrics.registry.get_sample_value("streamrec_checkpoints_total", {"kind": kind})

    def gauge(name: str) -> float:
        return metrics.registry.get_sample_value(name)

    assert (count("base"), count("delta"), gauge("streamrec_checkpoint_bytes")) == (0, 0, 0)
    for written in (CheckpointWritten("base", 5000, 2.5), None,
                    CheckpointWritten("delta", 700, 0.25)):
        learner.last_written = written
        hooks["on_saved"](1)
    assert (count("base"), count("delta")) == (1, 1)
    assert (gauge("streamrec_checkpoint_bytes"), gauge("streamrec_checkpoint_seconds")) == (
        700, 0.25)

    settings = Settings(data_dir=tmp_path / "loop", broker="127.0.0.1:1", metrics_port=0)
    engine = Engine(settings)
    metrics = build_metrics(engine)
    app = create_app(settings, engine, metrics, None)
    engine.learner.learn(np.ones((2, settings.model_dim)), ["a", "b"], np.ones(2), n_users=2)
    asyncio.run(timer(app, "checkpoint")())
    assert (count("base"), count("delta")) == (1, 0)
    assert gauge("streamrec_checkpoint_bytes") == engine.last_checkpoint.bytes > 0


def test_a_sweep_of_expired_histories_that_fails_does_not_stop_the_worker(tmp_path, caplog):
    """The expiry timer's sweep raising (a store that cannot be read) is logged, and the
    timer's task does not raise (Faust would stop the worker); no sweep without a TTL."""
    assert not any(inspect.unwrap(task).__name__ == "expire_histories"
                   for task in offline_app(tmp_path / "off")._app_tasks)
    app = offline_app(tmp_path, history_ttl_s=60.0)
    app.rebalancing = False

    async def unreadable(*args, **kwargs):
        raise OSError("the store could not be read")

    app.streamrec_history_writes.delete_where = unreadable
    with caplog.at_level("ERROR"):
        asyncio.run(timer(app, "expire_histories")())
    assert any("sweep of expired histories failed" in r.getMessage() for r in caplog.records)


def before_shutdown(app, name: str):
    """One of the app's receivers of ``on_before_shutdown``, by name."""
    return next(receiver for receiver in app.on_before_shutdown.iter_receivers(app)
                if receiver.__name__ == name)


def sharing_learner(steps: list, settle_s: float = 0.0):
    """A learner process's stand-in that notes its checkpoints in ``steps``."""
    async def checkpoint(timeout_s):
        steps.append("checkpoint")
        return True

    async def settle(wait_s):
        await asyncio.sleep(settle_s)
        return True

    return SimpleNamespace(drained=None, died=False, checkpoint=checkpoint, settle=settle,
                           save_due=lambda **kwargs: True, batches_followed=0)


def test_with_item_sharing_the_checkpoint_timer_writes_between_publishes(tmp_path):
    """With sharing, the checkpoint timer's checkpoint waits for a publish under way (a
    record read before a checkpoint and sent after it went back on the checkpoint's later
    learning at the next start)."""
    steps = []
    app = offline_app(tmp_path, sharing_learner(steps), share_items=True)
    sharing = app.streamrec_sharing
    sharing.caught_up.set()

    async def tick_during_a_publish():
        async with sharing.between_publishes():  # as a publish holds it
            tick = asyncio.ensure_future(timer(app, "checkpoint")())
            await asyncio.sleep(0.2)
            steps.append("published")
        await tick

    asyncio.run(tick_during_a_publish())
    assert steps == ["published", "checkpoint"]


def test_the_last_checkpoint_is_not_written_during_a_publish_that_outlasts_the_wait(
        tmp_path, caplog):
    """At a stop the last checkpoint waits for a publish under way at most
    ``hand_over_wait_s``, then none is written (what it lacks is delivered again) and the
    stop goes on."""
    steps = []
    app = offline_app(tmp_path, sharing_learner(steps), share_items=True, hand_over_wait_s=0.2)
    sharing = app.streamrec_sharing
    sharing.caught_up.set()
    last_checkpoint = before_shutdown(app, "checkpoint_what_was_handed_over")

    async def stop_during_a_publish(publish_s: float) -> list:
        steps.clear()
        async with sharing.between_publishes():
            stop = asyncio.ensure_future(last_checkpoint(app))
            await asyncio.sleep(publish_s)
            steps.append("published")
        await stop
        return list(steps)

    async def stops() -> tuple[list, list]:
        return await stop_during_a_publish(1.0), await stop_during_a_publish(0.05)

    with caplog.at_level("WARNING"):
        outlasting, short = asyncio.run(stops())
    assert outlasting == ["published"]
    assert "will be delivered again" in caplog.text
    assert short == ["published", "checkpoint"]


def test_a_hand_over_waits_for_the_learner_and_the_publish_lock_within_one_deadline(tmp_path,
                                                                                   caplog):
    """A hand-over's settle of the learner and its wait for a checkpoint under way share
    ``hand_over_wait_s``: a rebalance is held at most that long, then the next owner starts
    from the last publish."""
    waits = []
    app = offline_app(tmp_path, sharing_learner([], settle_s=0.3), share_items=True,
                      hand_over_wait_s=0.5)
    sharing = app.streamrec_sharing
    sharing.caught_up.set()
    publish = sharing.publish

    async def noting_publish(*args, wait_s=None):
        waits.append(wait_s)
        return await publish(*args, wait_s=wait_s)

    sharing.publish = noting_publish
    hand_over = before_shutdown(app, "hand_over_at_stop")

    async def stop_during_a_checkpoint():
        async with sharing.between_publishes():  # a checkpoint's write that does not end
            await hand_over(app)

    with caplog.at_level("WARNING"):
        asyncio.run(stop_during_a_checkpoint())
    assert len(waits) == 1 and 0.0 <= waits[0] <= 0.5 - 0.3 + 0.05
    assert "were not handed over" in caplog.text
