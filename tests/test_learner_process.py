"""Learning in a child process: an engine that follows the learner's reports answers as the
learning engine does, and the real child process learns what the worker hands it."""

from __future__ import annotations

import asyncio
import math
import os
import re
import signal
import time
from types import SimpleNamespace

import numpy as np
import pytest

from models.learner import ItemLearner
from state.gramian import DamagedCheckpoint
from state.history import History
from stream_app.engine import Engine, item_partition
from stream_app.item_sharing import ItemSharing, install_records
from stream_app.learner_process import (LEARN, SAVE, LearnerProcess, frame, learn_frame,
                                        parse_learn, read_frame)
from stream_app.settings import Settings
from stream_app.wire import RecRequest, TrainBatch, decode_offset_steps, encode_item_row
from tests.test_engine_dr import DR
from tests.test_engine_model import planted_stream

SOURCES = ("ann", "dr", "popular")


def settings_for(tmp_path, **changes) -> Settings:
    return Settings(data_dir=tmp_path, popularity_refresh_s=0, model_dim=16, model_seed=1,
                    learn_batch=32, **{**DR, "input_follow_s": 0.0, **changes})


def examples_and_histories(count: int | None = None):
    """Training examples of the planted stream, as the ingest agent makes them."""
    ingest = Engine(Settings(model_dim=16))
    histories: dict[str, History] = {}
    examples = []
    for event in planted_stream()[:count]:
        histories[event.user_id], example = ingest.ingest(
            event, histories.get(event.user_id, History()))
        examples.append(example)
    return examples, histories


def answers(engine: Engine, histories: dict[str, History], sources=SOURCES, users: int = 40):
    out = []
    for user, history in list(histories.items())[:users]:
        answer = engine.answer(RecRequest(request_id="r", user_id=user, k=10, sources=sources),
                               history, time.perf_counter())
        out.append([(item.item_id, round(item.score, 9), item.source) for item in answer.items])
    return out


def test_an_engine_that_follows_the_reports_answers_like_the_learning_engine(tmp_path):
    examples, histories = examples_and_histories()
    settings = settings_for(tmp_path / "learner", dr_follow_model_s=0,  # weights every batch
                            serve_tuning_every=3, serve_tuning_min_samples=20)
    learning = Engine(settings)
    following = Engine(settings, replica=True)  # same checkpoint dir: DR hand-over
    assert following.load() is False  # nothing saved yet: both start empty
    for start in range(0, len(examples), 100):
        learning.users = 240
        chunk = examples[start:start + 100]
        report = learning.learn_reported(chunk, step=32)
        assert len(report.losses) == len(report.step_seconds) == -(-len(chunk) // 32)
        following.follow(report)
    assert following.learned == learning.learned == len(examples)
    assert following.model_version == learning.model_version
    assert following.loss.get() == learning.loss.get()
    assert following.dr_loss.get() == learning.dr_loss.get()
    assert learning.serving_choice.samples > 20  # answers follow the learner's serving pick
    np.testing.assert_array_equal(following.serving_choice.means, learning.serving_choice.means)
    assert following.serving == learning.serving
    # before any M-step: every item on the paths it was given when the learner met it, and
    # the beam searched with the learner's structure model as of its last step
    assert len(following.paths.model) == len(learning.paths.model) > 0
    early = answers(following, histories, sources=["dr"])
    assert early == answers(learning, histories, sources=["dr"]) and all(early)
    assert learning.paths.run_m_step_now(timeout=60) is not None
    learning.paths.save(learning.paths_handoff_dir)
    assert following.reload_paths(learning.paths.stats())
    assert following.dr_stats()["m_steps"] == 1  # an M-step after the last report counts
    np.testing.assert_array_equal(following.learner.item_matrix, learning.learner.item_matrix)
    assert learning.learner.offsets is not None  # the inputs user vectors average, too
    np.testing.assert_array_equal(following.learner.offsets, learning.learner.offsets)
    assert answers(following, histories) == answers(learning, histories)
    from_paths = answers(following, histories, sources=["dr"])
    assert from_paths == answers(learning, histories, sources=["dr"])
    assert all(answer for answer in from_paths)


def test_reports_carry_dr_figures_with_the_structure_model_only(tmp_path):
    """The figures are a pass over the paths of every item met since the last M-step, so
    they go at most every ``dr_follow_model_s``, as the structure model does; a follower
    shows the last ones it was sent."""
    examples, _ = examples_and_histories(300)
    settings = settings_for(tmp_path, dr_follow_model_s=3600)
    learning = Engine(settings)
    following = Engine(settings, replica=True)
    learning.users = 240
    first = learning.learn_reported(examples[:100], step=32)
    assert first.dr_weights is not None and first.dr_stats == learning.paths.stats()
    following.follow(first)
    second = learning.learn_reported(examples[100:], step=32)
    assert second.dr_weights is None and second.dr_stats is None
    following.follow(second)
    assert following.dr_stats() == first.dr_stats != learning.paths.stats()


def test_paths_read_aside_are_served_with_what_reports_brought_meanwhile(tmp_path):
    """The worker reads the learner's saved paths in a thread; reports it follows meanwhile
    (new items, a newer structure model) must not be lost when the read paths take over."""
    examples, histories = examples_and_histories()
    settings = settings_for(tmp_path / "learner", dr_follow_model_s=0)
    learning = Engine(settings)
    following = Engine(settings, replica=True)
    learning.users = 240
    following.follow(learning.learn_reported(examples[:150], step=32))
    assert learning.paths.run_m_step_now(timeout=60) is not None
    learning.paths.save(learning.paths_handoff_dir)
    saved_items = len(learning.paths.model)
    followed = following.begin_paths_read()
    fresh = following.read_paths()  # as in the worker's thread
    for start in range(150, len(examples), 100):  # reports followed while it reads
        following.follow(learning.learn_reported(examples[start:start + 100], step=32))
    assert len(learning.paths.model) > saved_items == len(fresh)  # items the file lacks
    assert following.install_paths(fresh, learning.paths.stats(), followed)
    assert following.paths.model is fresh and len(fresh) == len(learning.paths.model)
    assert fresh.tracker is None  # a follower reads no path scores
    assert following.install_paths(None, {}, []) is False  # nothing read: the paths stay
    assert answers(following, histories, sources=["dr"]) == answers(learning, histories,
                                                                     sources=["dr"])


def test_new_paths_whose_save_failed_are_saved_and_handed_over_at_the_next_check(
        tmp_path, monkeypatch):
    """The M-step is installed in the learner before its paths are saved: a save that fails
    (a full disk) must not leave the worker serving the old paths until the next M-step."""
    from stream_app.learner_process import LearnerLoop

    examples, _ = examples_and_histories(300)
    settings = settings_for(tmp_path)
    learning = Engine(settings)
    learning.users = 240
    learning.learn_reported(examples, step=32)
    said = []
    loop = LearnerLoop(learning, settings, SimpleNamespace(send=said.append))
    learning.paths.model.m_step_at = 0.0  # due
    loop.m_step()  # starts it aside
    learning.paths._running.result(60)
    save = learning.paths.save

    def full_disk(directory, **kwargs):
        monkeypatch.setattr(learning.paths, "save", save)  # this once
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(learning.paths, "save", full_disk)
    loop.m_step()
    assert said == [] and learning.paths.stats()["m_steps"] == 1
    loop.m_step()
    assert [kind for kind, _ in said] == ["paths"]
    reread = Engine(settings, replica=True).read_paths()
    np.testing.assert_array_equal(reread.assignment, learning.paths.model.assignment)
    loop.m_step()
    assert len(said) == 1  # handed once
    # handed over apart: the checkpoint's Deep Retrieval stays with its positions
    assert not (learning.checkpoint_dir / "dr").exists()
    with np.load(learning.paths_handoff_dir / "dr_state.npz") as handed:
        assert "scores" not in handed.files  # the worker serves: no path scores
    with pytest.raises(DamagedCheckpoint, match="no path scores"):
        Engine(settings).paths.load(learning.paths_handoff_dir)  # not to learn from


def test_deep_retrieval_is_checkpointed_before_the_positions(tmp_path, monkeypatch):
    """A checkpoint whose Deep Retrieval write fails (or a crash between the two) leaves the
    previous positions in force: the messages since are delivered again and learned again,
    where the positions written first made Deep Retrieval miss them for good."""
    examples, _ = examples_and_histories(300)
    learning = Engine(settings_for(tmp_path))
    learning.users = 240
    learning.learn_reported(examples[:150], step=32)
    learning.save()
    saved_at = learning.model_saved_at()
    learning.learn_reported(examples[150:], step=32)

    def full_disk(directory, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(learning.paths, "save", full_disk)
    with pytest.raises(OSError):
        learning.save()
    assert learning.model_saved_at() == saved_at


def test_reports_in_the_pipe_behind_the_learners_new_paths_are_kept_for_their_install(
        tmp_path):
    """The learner saves new paths, says so, and goes on learning: its reports stand in the
    pipe behind that message and are followed at once, before the worker's read of the paths
    begins. The read starts keeping them as the message arrives, so the items they bring
    stay retrievable once the paths read take over; a second read that begins before the
    first is installed keeps its own."""
    from stream_app.app import create_app
    from stream_app.worker import build_metrics

    examples, _ = examples_and_histories()
    settings = settings_for(tmp_path / "learner", dr_follow_model_s=0)
    learning, following = Engine(settings), Engine(settings, replica=True)
    learning.users = 240
    following.follow(learning.learn_reported(examples[:150], step=32))
    assert learning.paths.run_m_step_now(timeout=60) is not None
    learning.paths.save(learning.paths_handoff_dir)
    pipe = SimpleNamespace()

    async def attach(on_report, on_paths, on_saved, on_death) -> None:
        pipe.report, pipe.paths = on_report, on_paths

    app = create_app(settings.replace(broker="127.0.0.1:1", metrics_port=0), following,
                     build_metrics(following), SimpleNamespace(attach=attach))
    follow_learner = next(task for task in app._app_tasks
                          if task.__name__ == "follow_learner")

    async def scenario() -> None:
        await follow_learner()
        pipe.paths(learning.paths.stats())  # as the pipe's messages are dispatched, in order
        pipe.report(learning.learn_reported(examples[150:250], step=32))
        learning.paths.save(learning.paths_handoff_dir)  # the next M-step's, say
        pipe.paths(learning.paths.stats())  # a second read, begun before the first is in
        pipe.report(learning.learn_reported(examples[250:], step=32))
        await asyncio.sleep(0.5)  # the reads: in threads, milliseconds at this size
        for _ in range(100):
            if len(following.paths.model) == len(learning.paths.model):
                break
            await asyncio.sleep(0.05)

    asyncio.run(scenario())
    assert len(following.paths.model) == len(learning.paths.model)
    assert (following.paths.model.rows_of(learning.paths.model._ids) >= 0).all()


def test_a_learner_with_nothing_new_answers_a_checkpoint_request_without_writing_one(tmp_path):
    """A SAVE after nothing was learned or installed writes nothing (the checkpoint there
    holds it all) and still says saved; learning, or rows installed, make the next one
    write. Rows installed alone do not make the checkpoint at the pipe's end: a start that
    stops during its item-rows catch-up leaves the checkpoint's time as it was (the next
    catch-up installs the worker's own rows published after it)."""
    from stream_app.learner_process import LearnerLoop, rows_frame

    settings = settings_for(tmp_path, dr_enabled=False)
    said = []
    loop = LearnerLoop(Engine(settings), settings, SimpleNamespace(send=said.append))
    model = tmp_path / "checkpoints" / "model.npz"

    def written() -> int:
        return model.stat().st_mtime_ns if model.exists() else 0

    def handle(frame_bytes: bytes) -> None:
        loop.handle(frame_bytes[4:5], memoryview(frame_bytes)[5:])

    examples, _ = examples_and_histories(40)
    handle(learn_frame([TrainBatch.encode_parts([e.to_bytes() for e in examples])], 10))
    handle(frame(SAVE))
    first = written()
    assert first
    time.sleep(0.01)
    handle(frame(SAVE))
    assert written() == first  # nothing new: not written again
    row = encode_item_row(np.ones(settings.model_dim + 1), np.zeros(settings.model_dim))
    handle(rows_frame([(b"installed-item", row)]))
    handle(frame(SAVE))
    second = written()
    assert second > first
    saves = [message for message in said if message[0] == "saved"]
    assert [message[:2] for message in saves] == [("saved", True)] * 3
    kinds = [None if message[2] is None else message[2][0] for message in saves]
    assert kinds == ["base", None, "delta"]  # what each wrote, for the worker's metrics
    assert saves[0][2][1] > saves[2][2][1] > 0  # bytes: the whole model, then a few rows
    time.sleep(0.01)
    handle(rows_frame([(b"installed-later", row)]))
    loop.run(SimpleNamespace(poll=lambda timeout: (_ for _ in ()).throw(EOFError)))
    assert written() == second  # the pipe's end after installs alone: not written


def test_the_learners_checkpoints_leave_popularity_to_the_worker_that_counts_it(tmp_path):
    """The learner process loads popularity at its start and counts nothing after: its saves
    (at the worker's request, and as the pipe closes) write the model, never popularity,
    which the worker saves from what it counted."""
    from stream_app.learner_process import LearnerLoop

    settings = settings_for(tmp_path, dr_enabled=False)
    worker, learning = Engine(settings, replica=True), Engine(settings)
    for n, item in enumerate(["a", "b", "c"]):
        worker.popularity.add(item, 1.7e9 + n)
    worker.save(model=False)
    loop = LearnerLoop(learning, settings, SimpleNamespace(send=lambda message: None))
    loop.learned_since_save = True
    loop.handle(SAVE, memoryview(b""))
    loop.learned_since_save = True
    loop.run(SimpleNamespace(poll=lambda timeout: (_ for _ in ()).throw(EOFError)))
    again = Engine(settings, replica=True)
    again.load()
    assert len(again.popularity) == 3 and (tmp_path / "checkpoints" / "model.npz").exists()


def test_a_failed_step_is_skipped_and_its_report_carries_every_row(tmp_path, monkeypatch):
    examples, _ = examples_and_histories(300)
    learning = Engine(settings_for(tmp_path))
    following = Engine(settings_for(tmp_path), replica=True)
    following.follow(learning.learn_reported(examples[:200], step=32))
    real_learn, calls = learning.paths.learn, []

    def fails_once(phis, items):  # the DR step fails after the item rows have moved
        calls.append(len(items))
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real_learn(phis, items)

    monkeypatch.setattr(learning.paths, "learn", fails_once)
    report = learning.learn_reported(examples[200:], step=32)
    assert report.failed == 32 and report.examples == 100 - 32
    assert set(report.delta.rows.tolist()) == set(range(len(learning.learner)))
    following.follow(report)
    np.testing.assert_array_equal(following.learner.item_matrix, learning.learner.item_matrix)


def run_with_learner(learner: LearnerProcess, engine: Engine, batches: list[list[bytes]],
                     users: int) -> dict:
    """Hand ``batches`` to the learner process on an event loop; wait for every report and
    for a checkpoint; what the callbacks saw."""
    seen = {"reports": [], "saved": 0, "died": False}

    async def main() -> None:
        done = asyncio.Event()

        def on_report(report):
            engine.follow(report)
            seen["reports"].append(report)

        def on_saved(through):
            seen["saved"] += 1
            done.set()

        def on_death():
            seen["died"] = True
            done.set()

        await learner.attach(on_report=on_report, on_paths=lambda stats: None, on_saved=on_saved,
                             on_death=on_death)
        for values in batches:
            await learner.learn(values, users)
        learner.request_save()  # answered after every batch before it
        await asyncio.wait_for(done.wait(), 120)

    asyncio.run(main())
    return seen


def test_the_learner_process_learns_what_the_worker_hands_it(tmp_path):
    examples, histories = examples_and_histories()
    settings = settings_for(tmp_path)
    messages = [TrainBatch(examples=examples[start:start + 50]).to_bytes()
                for start in range(0, len(examples), 50)]
    batches = [messages[start:start + 5] for start in range(0, len(messages), 5)]
    batches[1] = batches[1] + [b"not a training message"]  # skipped, logged
    learner = LearnerProcess(settings).start()
    follower = Engine(settings, replica=True)
    try:
        seen = run_with_learner(learner, follower, batches, users=240)
    finally:
        assert learner.stop(60)
    assert not seen["died"] and seen["saved"] == 1 and len(seen["reports"]) == len(batches)
    assert follower.learned == len(examples)
    # the same batches learned here, by the engine's own steps
    oracle = Engine(settings_for(tmp_path / "oracle"))
    oracle.users = 240
    for values in batches:
        oracle.learn_reported(TrainBatch.examples_of(values)[0], settings.learn_batch)
    assert follower.learner.item_ids == oracle.learner.item_ids
    np.testing.assert_allclose(follower.learner.item_matrix, oracle.learner.item_matrix,
                               rtol=1e-6, atol=1e-9)
    assert oracle.learner.offsets is not None  # the inputs learned too, and were followed
    np.testing.assert_allclose(follower.learner.offsets, oracle.learner.offsets,
                               rtol=1e-6, atol=1e-9)
    saved = ItemLearner(settings.learner_config())  # the child's checkpoint, written on stop
    assert saved.load(settings.data_dir / "checkpoints" / "model.npz")
    np.testing.assert_array_equal(saved.item_matrix, follower.learner.item_matrix)
    np.testing.assert_array_equal(saved.offsets, follower.learner.offsets)
    assert saved.steps == follower.model_version == oracle.model_version


def test_a_learner_behind_ingest_learns_with_the_users_its_messages_say(tmp_path):
    """Training messages say how many users their worker held when it wrote them; a learner
    far behind (its engine's count already at the end of a backlog) learns each micro-batch
    with the count of its examples' messages, as a learner in step with ingest does, and the
    ingest count is left as it is. Told the count of the moment instead, it learns something
    else (a tenth of NDCG@10 on Toys, docs/results.md)."""
    examples, _ = examples_and_histories(600)
    settings = settings_for(tmp_path)
    said = [20 + 10 * (start // 50) for start in range(0, len(examples), 50)]
    messages = [TrainBatch.encode_parts([e.to_bytes() for e in examples[start:start + 50]],
                                        1, users)
                for start, users in zip(range(0, len(examples), 50), said)]
    behind = Engine(settings_for(tmp_path / "behind"))
    behind.users = 10_000
    behind.learn_messages(messages, settings.learn_batch)
    assert behind.users == 10_000
    in_step = Engine(settings_for(tmp_path / "in-step"))
    per_example = np.repeat(said, 50)[: len(examples)]
    for start in range(0, len(examples), settings.learn_batch):
        in_step.users = int(per_example[start:start + settings.learn_batch].max())
        in_step.learn(examples[start:start + settings.learn_batch])
    assert in_step.learner.user_gramian.n_active == said[-1]
    assert behind.learner.user_gramian.n_active == said[-1]
    np.testing.assert_allclose(behind.learner.item_matrix, in_step.learner.item_matrix,
                               rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(behind.learner.offsets, in_step.learner.offsets,
                               rtol=1e-9, atol=1e-12)
    unsaid = Engine(settings_for(tmp_path / "unsaid"))  # older messages: the count of now
    unsaid.users = 10_000
    unsaid.learn_messages([TrainBatch.encode_parts([e.to_bytes() for e in examples])],
                          settings.learn_batch)
    assert unsaid.learner.user_gramian.n_active == 10_000
    assert not np.allclose(unsaid.learner.offsets, in_step.learner.offsets, atol=1e-6)


def test_a_learner_that_cannot_load_its_checkpoint_says_why_at_the_workers_start(tmp_path):
    """The worker's start fails with the learner's own error (a damaged file, named), not with
    the pipe's EOFError."""
    settings = settings_for(tmp_path)
    damaged = settings.data_dir / "checkpoints" / "popularity.npz"
    damaged.parent.mkdir(parents=True, exist_ok=True)
    damaged.write_bytes(b"not an npz")
    with pytest.raises(RuntimeError, match="DamagedCheckpoint: .*popularity.npz"):
        LearnerProcess(settings).start()


def test_a_learner_start_waits_as_long_as_its_setting_and_no_longer(tmp_path):
    """The start waits for the child's lock on the data dir and its load of the checkpoint
    up to ``learner_start_timeout_s`` (a fixed 120 s fell short of a lock's wait and a model
    of millions of items), then kills the child and says so."""
    from stream_app.processes import LEARNER_LOCK, lock_data_dir

    settings = settings_for(tmp_path, learner_start_timeout_s=1.5)
    held = lock_data_dir(settings.data_dir, LEARNER_LOCK)  # a previous learner, stopping
    try:
        started = time.monotonic()
        with pytest.raises(RuntimeError, match="did not start within 2 s"):
            LearnerProcess(settings).start()
        assert 1.5 <= time.monotonic() - started < 30
    finally:
        held.close()


def test_the_worker_hears_when_its_learner_process_dies(tmp_path):
    learner = LearnerProcess(settings_for(tmp_path)).start()
    os.kill(learner.pid, signal.SIGKILL)
    seen = run_with_learner(learner, Engine(settings_for(tmp_path), replica=True), [], users=1)
    assert seen["died"] and learner.died
    assert not learner.stop(5)  # nothing to stop, and no checkpoint


@pytest.mark.parametrize("values, bad", [([b"{}", b"[", b'{"v":1,"examples":[]}'], 2)])
def test_training_messages_that_do_not_decode_are_counted(values, bad):
    examples, failed = TrainBatch.examples_of(values)
    assert examples == [] and failed == bad


@pytest.mark.parametrize("damage", [b'"alpha":NaN', b'"alpha":-1000000.0'])
def test_a_message_with_a_poisonous_weight_is_skipped_and_the_model_stays_finite(tmp_path,
                                                                               damage):
    """One NaN or negative α took α0 with it, and so every row the next batches solved."""
    examples, _ = examples_and_histories(60)
    engine = Engine(settings_for(tmp_path, dr_enabled=False))
    engine.users = 100
    engine.learn_messages([TrainBatch(examples=examples[:30]).to_bytes()], 32)
    poisoned = re.sub(rb'"alpha":[0-9.e+-]+', damage,
                      TrainBatch(examples=examples[30:40]).to_bytes(), count=1)
    assert poisoned.count(damage) == 1
    report = engine.learn_messages([poisoned, TrainBatch(examples=examples[40:]).to_bytes()], 32)
    assert report.examples == 20
    assert np.isfinite(engine.learner.item_matrix).all() and engine.learner.alpha0 > 0


def test_an_event_place_past_kafkas_range_does_not_decode_and_a_checkpoint_goes_on(tmp_path):
    """An example whose event offset passes int64, or a message whose training partition
    does, would be held as a position no checkpoint can save: every save failed, and no
    training message was committed again."""
    examples, _ = examples_and_histories(40)
    far = [example.model_copy(update={"source": (0, 2**63 - 1)}) for example in examples[:20]]
    partition = TrainBatch(examples=examples[20:30]).model_copy(update={"partition": 2**63})
    values = [TrainBatch(examples=far).to_bytes(), partition.to_bytes(),
              TrainBatch(examples=examples[30:]).to_bytes()]
    engine = Engine(settings_for(tmp_path, dr_enabled=False))
    engine.users = 240
    report = engine.learn_messages(values, 32, positions=[(0, 0), (0, 1), (0, 2)])
    assert report.examples == 10
    engine.save()  # raised OverflowError
    assert (tmp_path / "checkpoints" / "model.npz").exists()


def test_frames_carry_the_values_unchanged_and_a_cut_frame_reads_as_the_end():
    read, write = os.pipe()
    values = [b"", b"x" * 30_000, b'{"v":1}']  # all of it fits in the pipe
    positions = [(0, 7), (1, 2**40), (0, 8)]
    os.write(write, learn_frame(values, 12) + learn_frame(values, 5, positions) + frame(SAVE))
    kind, body = read_frame(read)
    assert kind == LEARN and parse_learn(body) == (values, 12, None)
    kind, body = read_frame(read)
    assert kind == LEARN and parse_learn(body) == (values, 5, positions)
    assert read_frame(read)[0] == SAVE
    os.write(write, learn_frame(values, 3)[:-5])  # the worker died mid-frame
    os.close(write)
    with pytest.raises(EOFError):
        read_frame(read)
    os.close(read)


def test_a_frame_whose_body_does_not_add_up_reads_as_the_end():
    """A body cut short or with bytes left over (a writer's bug) raised a ValueError, or read
    as fewer values, where the learner's loop stops, checkpointed, only at an EOFError."""
    from stream_app.learner_process import parse_forget, parse_rows, rows_frame

    values, positions = [b"abcdef", b"xyz"], [(0, 1), (0, 2)]
    body = learn_frame(values, 7, positions)[5:]  # past the length and the kind
    assert parse_learn(memoryview(body)) == (values, 7, positions)
    rows = rows_frame([(b"k", b"v")])[5:]
    for damaged in (body[:-2], body + b"\0", b"\x00\x00\x00\x02" + b"\x00" * 25,
                    b"\xff\xff\xff\xf9" + body[4:]):  # cut, a byte more, no room, count -7
        with pytest.raises(EOFError):
            parse_learn(memoryview(damaged))
    for damaged in (rows[:-1], rows + b"x"):
        with pytest.raises(EOFError):
            parse_rows(memoryview(damaged))
    assert parse_forget(memoryview(b"1,3")) == {1, 3}
    with pytest.raises(EOFError):
        parse_forget(memoryview(b"x"))


def test_input_offsets_reach_a_follower_at_most_input_follow_s_late(tmp_path, monkeypatch):
    """While batches queue behind one another, the moved inputs travel in the first report and
    then in the first report after each ``input_follow_s``, all rows moved since in one go:
    reports in between carry none and the follower's user vectors read offsets at most that
    old. A report of a learner that has caught up carries them at once, so a stream that goes
    quiet leaves the follower equal to the learner."""
    import stream_app.engine as engine_module

    examples, _ = examples_and_histories()
    settings = settings_for(tmp_path, input_follow_s=5.0, dr_enabled=False)
    learning, following = Engine(settings), Engine(settings, replica=True)
    learning.users = following.users = 240
    clock = [1000.0]
    monkeypatch.setattr(engine_module.time, "monotonic", lambda: clock[0])
    carried = []
    for start in range(0, 320, 32):
        report = learning.learn_reported(examples[start:start + 32], step=32, caught_up=False)
        following.follow(report)
        carried.append(len(report.delta.input_rows))
        clock[0] += 1.0
    assert carried[0] > 0 and carried[5] > 0  # the first, then 5 s later
    assert not any(carried[1:5]) and not any(carried[6:])
    assert not np.array_equal(following.learner.offsets, learning.learner.offsets)
    report = learning.learn_reported(examples[320:352], step=32, caught_up=True)
    following.follow(report)
    assert len(report.delta.input_rows) > max(carried)  # everything moved since, in one go
    np.testing.assert_array_equal(following.learner.offsets, learning.learner.offsets)
    np.testing.assert_array_equal(following.learner.item_matrix, learning.learner.item_matrix)
    clock[0] += 0.5
    report = learning.learn_reported(examples[352:384], step=32, caught_up=False)
    assert len(report.delta.input_rows) == 0  # within 5 s of the last: the rows wait



def test_offsets_left_waiting_go_in_a_report_of_their_own(tmp_path):
    """The learner loop's periodic check sends the offsets that batches left waiting (their
    reports had more queued behind them) as an ``inputs`` report, which the worker applies
    without counting a batch as learned; nothing is sent when nothing waits."""
    from stream_app.learner_process import LearnerLoop

    examples, _ = examples_and_histories()
    settings = settings_for(tmp_path, input_follow_s=3600.0, dr_enabled=False)
    learning, following = Engine(settings), Engine(settings, replica=True)
    learning.users = 240
    sent = []
    loop = LearnerLoop(learning, settings, SimpleNamespace(send=sent.append))
    loop.send_inputs()
    assert sent == []  # nothing moved yet
    for start in range(0, 96, 32):
        following.follow(learning.learn_reported(examples[start:start + 32], step=32,
                                                 caught_up=False))
    assert learning.inputs_waiting
    loop.send_inputs()
    [(kind, report)] = sent
    assert kind == "inputs" and report.examples == 0 and len(report.delta.input_rows) > 0
    following.follow(report)
    np.testing.assert_array_equal(following.learner.offsets, learning.learner.offsets)
    assert not learning.inputs_waiting
    loop.send_inputs()
    assert len(sent) == 1


def test_objects_made_at_start_are_kept_out_of_the_collectors_passes():
    """In a fresh interpreter that imported what a worker imports: after the freeze, a full
    collection walks a small fraction of the objects it walked before (each walk of all of
    them stopped a worker's loop for a quarter of a second)."""
    import subprocess
    import sys

    script = ("import gc, stream_app.worker as w\n"
              "tracked = len(gc.get_objects())\n"
              "frozen = w.freeze_startup_objects()\n"
              "print(tracked, frozen, len(gc.get_objects()))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    tracked, frozen, walked = map(int, out.split())
    assert tracked > 100_000 and frozen >= 0.9 * tracked
    assert walked < 0.01 * tracked


def test_rows_another_worker_learns_are_installed_and_followed(tmp_path):
    """Two learners each learn part of the stream (as two workers' learner processes learn
    their training partitions). Installing one's rows in the other (``install_records`` of
    item-rows records, as the child does) creates the missing items and sets the rest, keeps
    the item Gramian exact, and reports them so that a replica ends up equal to its learner."""
    examples, _ = examples_and_histories(300)
    learning = Engine(settings_for(tmp_path / "mine", dr_follow_model_s=0))
    following = Engine(settings_for(tmp_path / "mine", dr_follow_model_s=0), replica=True)
    other = Engine(settings_for(tmp_path / "other"))
    learning.users = other.users = 240
    following.follow(learning.learn_reported(examples[:150], step=32))
    learned_here = set(learning.learner.item_ids)
    other.learn_reported(examples[150:], step=32)
    ids, rows, offsets = other.rows_to_share(np.arange(len(other.learner)))
    records = [(item.encode(), encode_item_row(row, offset))
               for item, row, offset in zip(ids, rows, offsets)]
    before = len(learning.learner)
    report = install_records(learning, records + [(b"broken", b"\x01\x02")])
    assert report.examples == 0 and set(report.items) == set(ids)
    assert len(learning.learner) > before and set(ids) <= set(learning.learner.item_ids)
    at = learning.learner.rows_of(ids)
    np.testing.assert_allclose(learning.learner.item_matrix[at], rows, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(learning.learner.offsets[at], offsets, rtol=1e-6, atol=1e-7)
    matrix = learning.learner.item_matrix
    np.testing.assert_allclose(learning.learner.item_gramian.matrix, matrix.T @ matrix,
                               atol=1e-9)
    following.follow(report)
    np.testing.assert_array_equal(following.learner.item_matrix, learning.learner.item_matrix)
    np.testing.assert_array_equal(following.learner.offsets, learning.learner.offsets)
    assert install_records(learning, [(b"broken", b"")]) is None
    # items both learned are the sender's now: re-solving (the sweep) leaves its rows be
    both = learning.learner.rows_of([item for item in ids if item in learned_here])
    assert len(both)
    installed = learning.learner.item_matrix[both].copy()
    learning.learner.resolve(both)
    np.testing.assert_array_equal(learning.learner.item_matrix[both], installed)


def test_a_worker_publishes_the_rows_it_owns_and_installs_the_others():
    """:class:`ItemSharing`'s choices, with the partitions a worker holds given: the moved
    rows of its own items go out once, records of other items come in."""
    examples, _ = examples_and_histories(200)
    engine = Engine(Settings(model_dim=16, partitions=2, dr_enabled=False))
    engine.users = 240
    owned = frozenset({0})
    sharing = ItemSharing(engine.settings, engine, lambda: owned, lambda records, keep: None)
    sharing.note(engine.learn_reported(examples, step=32))
    records = sharing.due()
    mine = {item for item in engine.learner.item_ids if item_partition(item, 2) == 0}
    assert mine and {key.decode() for key, _ in records} == mine
    assert sharing.due() == [] and sharing.published == len(mine)
    theirs = [item for item in engine.learner.item_ids if item not in mine]
    incoming = [(item.encode(), b"row") for item in engine.learner.item_ids] + [(None, b"x")]
    assert sharing.wanted(incoming) == [(item.encode(), b"row") for item in theirs]


def test_steps_on_other_workers_items_go_to_their_owner_who_adds_them():
    """Item sharing's offset steps, from one learning engine to another: the reports carry
    the steps taken (summed over reports until sent); only those on items the worker does
    not own are sent, as training messages of their items' partition; the owner learns them
    with its training messages: its offsets then equal its own plus the other's steps (those
    of an item it does not know, and a damaged message, are skipped), they go out with its
    next publish, and the messages delivered again are skipped."""
    from stream_app.wire import encode_offset_steps

    examples, _ = examples_and_histories(300)
    settings = Settings(model_dim=16, partitions=2, dr_enabled=False, share_items=True)
    sender, owner = Engine(settings), Engine(settings)
    sender.users = owner.users = 240
    sender.learn_reported(examples[:100], step=32)
    owner.learn_reported(examples, step=32)  # the owner knows every item
    start = np.zeros((len(owner.learner), 16))  # zero for rows to come
    start[:len(sender.learner)] = sender.learner.offsets
    sharing = ItemSharing(settings, sender, lambda: frozenset({0}), lambda records, keep: None)
    for part in (examples[100:200], examples[200:]):
        sharing.note(sender.learn_reported(part, step=32))
    messages = sharing.steps_due()
    assert messages and sharing.steps_due() == []
    assert {partition for partition, _ in messages} == {1}
    items = [item for _, value in messages for item in decode_offset_steps(value, 16)[0]]
    assert sharing.steps_sent == len(items) == len(set(items))
    start = start[:len(sender.learner)]
    moved = np.flatnonzero(np.abs(sender.learner.offsets - start).sum(axis=1) > 0)
    foreign = {item for item in sender.learner.item_ids_at(moved) if item_partition(item, 2)}
    assert set(items) == foreign

    own_before = np.array(owner.learner.offsets)
    values = [value for _, value in messages] + [
        encode_offset_steps(["never-seen"], np.ones((1, 16))), b"\x02damaged"]
    positions = [(1, offset) for offset in range(len(values))]
    report = owner.learn_messages(values, 32, positions=positions)
    at = owner.learner.rows_of(items)
    sent_rows = sender.learner.rows_of(items)
    np.testing.assert_allclose(owner.learner.offsets[at] - own_before[at],
                               (sender.learner.offsets - start)[sent_rows], atol=1e-6)
    assert report.steps_added == len(items) and report.examples == 0
    assert sorted(report.delta.input_rows.tolist()) == sorted(at.tolist())
    assert "never-seen" not in owner.learner
    owning = ItemSharing(settings, owner, lambda: frozenset({1}), lambda records, keep: None)
    owning.note(report)
    assert owning.steps_added == len(items)
    assert {key.decode() for key, _ in owning.due()} == set(items)
    added = np.array(owner.learner.offsets)
    again = owner.learn_messages(values, 32, positions=positions)  # delivered again
    assert again.steps_added == 0 and again.redelivered == len(values)
    np.testing.assert_array_equal(owner.learner.offsets, added)


def test_steps_on_an_item_that_an_earlier_message_of_the_same_batch_creates_are_added():
    """A new item's first example and another worker's steps on its offsets often come in
    one batch of the owner's (the steps follow the example, which made the item known to
    the other worker's histories): the steps are added after the batch's examples, so the
    item exists; the owner's offsets are then a twin's that learned the examples alone, plus
    the steps."""
    from stream_app.wire import encode_offset_steps

    examples, _ = examples_and_histories(120)
    new_item = examples[-1].item_id  # the owner starts empty: the batch creates every item
    settings = Settings(model_dim=16, partitions=2, dr_enabled=False, share_items=True)
    owner, twin = Engine(settings), Engine(settings)
    owner.users = twin.users = 240
    step = np.linspace(-1.0, 1.0, 16)
    values = [TrainBatch(examples=examples).to_bytes(),
              encode_offset_steps([new_item], step[None, :])]
    report = owner.learn_messages(values, 32, positions=[(0, 0), (0, 1)])
    twin.learn_messages(values[:1], 32, positions=[(0, 0)])
    assert report.steps_added == 1
    row = owner.learner.rows_of([new_item])[0]
    assert row in report.delta.input_rows.tolist()
    np.testing.assert_allclose(owner.learner.offsets[row] - twin.learner.offsets[row], step,
                               atol=1e-6)


def test_a_publish_that_fails_leaves_what_it_did_not_send_due_for_the_next():
    """A send that raises (a broker outage) costs nothing: the rows and steps not sent are
    due at the next publish, the rows as they are then, the steps summed with those taken
    since; the counts hold what was sent."""
    examples, _ = examples_and_histories(300)
    settings = Settings(model_dim=16, partitions=2, dr_enabled=False, share_items=True)
    engine = Engine(settings)
    engine.users = 240
    sharing = ItemSharing(settings, engine, lambda: frozenset({0}), lambda records, keep: None)
    sharing.note(engine.learn_reported(examples[:200], step=32))
    rows_before, steps_before = sharing.due(), sharing.steps_due()
    sharing.retake(rows_before, steps_before)  # as if none had been sent
    assert (sharing.published, sharing.steps_sent) == (0, 0)
    sent: list = []

    async def send(key: bytes, value: bytes) -> None:
        if len(sent) == 3:
            raise ConnectionError("broker down")
        sent.append((key, value))

    async def send_steps(partition: int, value: bytes) -> None:
        sent.append((partition, value))

    def take():
        return sharing.due(), sharing.steps_due()

    with pytest.raises(ConnectionError):
        asyncio.run(sharing.publish(take, send, send_steps))
    assert sent == rows_before[:3] and sharing.published == 3
    report = engine.learn_reported(examples[200:], step=32)
    sharing.note(report)
    rows, steps = take()
    unsent = {key for key, _ in rows_before[3:]}
    assert unsent <= {key for key, _ in rows}  # due again, with the rows as they are now
    assert {key for key, _ in sent} & {key for key, _ in rows} <= {
        item.encode() for item in engine.learner.item_ids_at(report.delta.rows.tolist())}
    held = steps_of(steps_before)
    new = np.zeros((len(engine.learner), 16))  # the steps the later report took
    for row, step in zip(*report.input_steps):
        new[row] += step
    for item, step in steps_of(steps).items():  # the unsent steps, summed with the later ones
        row = engine.learner.rows_of([item])[0]
        expected = new[row] + held.get(item, 0.0)
        np.testing.assert_allclose(step, expected, atol=1e-6)
    assert set(held) <= set(steps_of(steps))


def steps_of(messages: list[tuple[int, bytes]]) -> dict[str, np.ndarray]:
    """Item id: its step, of messages of offset steps."""
    return {item: step for _, value in messages
            for item, step in zip(*decode_offset_steps(value, 16))}


def test_publishes_go_out_one_at_a_time():
    """A hand-over that starts while a periodic publish is sending takes its rows after the
    publish has sent all of its records: an item's newer row is sent last."""
    engine = Engine(Settings(model_dim=16, partitions=2, dr_enabled=False))
    sharing = ItemSharing(engine.settings, engine, lambda: frozenset({0, 1}),
                          lambda records, keep: None)
    order: list[str] = []

    async def send(key: bytes, value: bytes) -> None:
        await asyncio.sleep(0)  # a send that waits, as a full batch does
        order.append(f"{key.decode()}={value.decode()}")

    def take(value: str):
        def taken():
            order.append(f"take {value}")
            return [(b"x", value.encode()), (b"y", value.encode())], []
        return taken

    async def both() -> None:
        periodic = asyncio.create_task(sharing.publish(take("old"), send, send))
        await asyncio.sleep(0)  # the periodic publish is sending
        await asyncio.gather(periodic, sharing.publish(take("new"), send, send))

    asyncio.run(both())
    assert order == ["take old", "x=old", "y=old", "take new", "x=new", "y=new"]


def fetched_rows(items: list[str], first_offset: int, published_at: float,
                 headers: tuple = ()) -> list:
    """Item-rows records of ``items`` as the reader fetches them, from ``first_offset`` on."""
    return [SimpleNamespace(offset=first_offset + n, key=item.encode(), value=b"row",
                            timestamp=published_at * 1000, headers=headers)
            for n, item in enumerate(items)]


def keys(records) -> set[str]:
    """The items of records, or of the two parts of ``ItemSharing._to_install``'s answer."""
    if isinstance(records, tuple):
        records = records[0] + records[1]
    return {key.decode() for key, _ in records}


def test_the_catch_up_installs_own_rows_published_after_the_checkpoint():
    """While a starting worker reads what the topic held when it started, the rows of its own
    items published after its checkpoint come in too (a joining worker's items start from
    their last owner's rows, a crashed one's from its last publish), whenever its partitions
    are assigned; older ones, and any own row after the catch-up, stay out. Those an earlier
    process of its data dir published keep their statistics; those of another worker that
    held the items meanwhile do not."""
    from aiokafka import TopicPartition

    from stream_app.item_sharing import PUBLISHER

    engine = Engine(Settings(model_dim=16, partitions=2, dr_enabled=False))
    items = [f"i{n}" for n in range(40)]
    mine = [item for item in items if item_partition(item, 2) == 0]
    sharing = ItemSharing(engine.settings, engine, lambda: frozenset({0}),
                          lambda records, keep: None,
                          own_rows_after=1_000.0)
    tp = TopicPartition(engine.settings.items_topic, 0)

    def fetched(first_offset: int, published_at: float) -> dict:
        return {tp: fetched_rows(items, first_offset, published_at)}

    catch_up = {tp: 2 * len(items)}  # the topic's end when the reader started
    assert keys(sharing._to_install(fetched(0, 999.0), catch_up)) == set(items) - set(mine)
    others, own = sharing._to_install(fetched(len(items), 1_001.0), catch_up)
    assert keys(others) == set(items) and own == []  # by no earlier process of this data dir
    sharing.own_publishers = frozenset({b"earlier"})
    by = {tp: fetched_rows(items, len(items), 1_001.0, ((PUBLISHER, b"earlier"),))}
    others, own = sharing._to_install(by, catch_up)
    assert keys(others) == set(items) - set(mine) and keys(own) == set(mine)  # theirs kept
    by = {tp: fetched_rows(items, len(items), 1_001.0, ((PUBLISHER, b"another-worker"),))}
    assert sharing._to_install(by, catch_up)[1] == []  # it held them meanwhile: theirs go
    assert keys(sharing._to_install(fetched(2 * len(items), 1_002.0), catch_up)) \
        == set(items) - set(mine)  # published after the reader started: live records
    own = [(mine[0].encode(), b"row")]
    assert sharing.wanted(own, [5_000.0]) == own and sharing.wanted(own) == []
    sharing.own_rows_after = math.inf  # what the reader sets once the catch-up is over
    assert keys(sharing._to_install(fetched(0, 1_001.0), catch_up)) == set(items) - set(mine)


def test_a_hand_over_publishes_the_rows_of_the_partitions_held_and_their_next_owner_installs_them():
    """A worker losing its partitions (none held by then) publishes the rows it moved since
    its last publish as owner of those it held; the next owner installs the live records of
    its own items that another worker process published, not its own nor unnamed ones, and
    in the catch-up the checkpoint rule alone decides."""
    from aiokafka import TopicPartition

    from stream_app.item_sharing import PUBLISHER

    examples, _ = examples_and_histories(200)
    engine = Engine(Settings(model_dim=16, partitions=2, dr_enabled=False))
    engine.users = 240
    old_owner = ItemSharing(engine.settings, engine, frozenset, lambda records, keep: None)
    old_owner.held = frozenset({0, 1})  # as last assigned; the revocation took them
    old_owner.note(engine.learn_reported(examples, step=32))
    rows, steps = old_owner.handed_over()
    assert {key.decode() for key, _ in rows} == set(engine.learner.item_ids) and steps == []
    assert old_owner.handed_over() == ([], [])
    assert old_owner.handed_over_rows == old_owner.published == len(rows)

    new_owner = ItemSharing(engine.settings, engine, lambda: frozenset({0}),
                            lambda records, keep: None, own_rows_after=1_000.0)
    mine = [item for item in engine.learner.item_ids if item_partition(item, 2) == 0]
    theirs = [item for item in engine.learner.item_ids if item_partition(item, 2) == 1]
    tp = TopicPartition(engine.settings.items_topic, 0)

    def fetched(first: int, by: bytes | None, at: float = 500.0) -> dict:
        headers = () if by is None else ((PUBLISHER, by),)
        return {tp: fetched_rows(mine + theirs, first, at, headers)}

    everything, catch_up = set(mine + theirs), {tp: 1_000}
    assert keys(new_owner._to_install(fetched(1_000, old_owner.instance), {})) == everything
    for by in (new_owner.instance, None):
        assert keys(new_owner._to_install(fetched(1_000, by), {})) == set(theirs)
    assert keys(new_owner._to_install(fetched(0, old_owner.instance), catch_up)) == set(theirs)
    assert keys(new_owner._to_install(fetched(0, None, at=2_000.0), catch_up)) == everything


def test_settle_waits_for_the_batches_in_flight(tmp_path):
    """:meth:`LearnerProcess.settle` returns once every batch handed over is learned and all
    it learned is reported and applied: the input offsets too, which a report holds back
    while another frame waits behind its batch (here a checkpoint request); with no time to
    wait it says that it is not."""
    examples, _ = examples_and_histories()
    # offsets held back stay held: no time-based report, no periodic one
    settings = settings_for(tmp_path, input_follow_s=3600.0, index_check_s=3600.0)
    messages = [TrainBatch(examples=examples[start:start + 50]).to_bytes()
                for start in range(0, len(examples), 50)]
    learner = LearnerProcess(settings).start()
    follower = Engine(settings, replica=True)
    seen = {}

    async def main() -> None:
        await learner.attach(on_report=follower.follow, on_paths=lambda stats: None,
                             on_saved=lambda through: None, on_death=lambda: None)
        assert await learner.settle(60.0)  # nothing handed over: answered at once
        await learner.learn(messages[:2], 240)
        await learner.learn(messages[2:], 240)
        learner.request_save()
        seen["at_once"] = await learner.settle(0.0)
        seen["settled"] = await learner.settle(60.0)
        seen["learned"] = follower.learned
        seen["offsets"] = follower.learner.offsets

    try:
        asyncio.run(main())
    finally:
        assert learner.stop()
    offsets = seen.pop("offsets")
    assert seen == {"at_once": False, "settled": True, "learned": len(examples)}
    reference = Engine(settings_for(tmp_path / "reference"))  # the same batches, here
    reference.users = 240
    for batch in (messages[:2], messages[2:]):
        reference.learn_messages(batch, settings.learn_batch)
    assert offsets is not None and np.abs(reference.learner.offsets).max() > 0
    np.testing.assert_allclose(offsets, reference.learner.offsets, rtol=1e-6, atol=1e-9)


def test_item_rows_for_the_learner_wait_while_its_pipe_holds_too_much(tmp_path):
    """A catch-up hands the learner process the whole item-rows topic, faster than it may
    install it; :meth:`LearnerProcess.drained` holds the sender while the frames waiting for
    the child pass ``frame_buffer``, and lets it go once the child has read them."""
    settings = settings_for(tmp_path)
    records = [(f"r{n}".encode(), encode_item_row(np.full(17, n / 1e4), np.zeros(16)))
               for n in range(30_000)]  # about 4 MB
    learner = LearnerProcess(settings, frame_buffer=1 << 20).start()
    follower = Engine(settings, replica=True)
    seen = {}

    async def main() -> None:
        await learner.attach(on_report=follower.follow, on_paths=lambda stats: None,
                             on_saved=lambda through: None, on_death=lambda: None)
        await asyncio.wait_for(learner.drained(), 1.0)  # nothing held
        learner.install_rows(records)
        waiting = asyncio.ensure_future(learner.drained())
        await asyncio.sleep(0)
        seen["held"] = not waiting.done()
        await asyncio.wait_for(waiting, 60.0)

    seen.update(run_settled(learner, main, follower))
    assert seen == {"held": True, "items": len(records)}


def run_settled(learner: LearnerProcess, main, follower: Engine) -> dict:
    """``main()`` on an event loop, then the learner settled and stopped: the items its
    follower then holds."""
    seen = {}

    async def settled() -> None:
        await main()
        assert await learner.settle(60.0)
        seen["items"] = len(follower.learner)

    try:
        asyncio.run(settled())
    finally:
        assert learner.stop()
    return seen


@pytest.mark.parametrize("died", [False, True])
def test_a_stopping_worker_waits_for_its_learner_before_its_last_commit(tmp_path, died):
    """Faust commits the training messages a checkpoint holds when the worker stops; the
    app's shutdown signal first settles the learner process (frames left in the pipe's buffer
    would go with the event loop) and has it checkpoint, unless it died (nothing to wait
    for)."""
    from stream_app.app import create_app
    from stream_app.worker import build_metrics

    settings = Settings(data_dir=tmp_path, metrics_port=0, hand_over_wait_s=7.0)
    engine = Engine(settings, replica=True)
    waits: list[tuple[str, float]] = []

    async def settle(timeout_s: float) -> bool:
        waits.append(("settle", timeout_s))
        return True

    async def checkpoint(timeout_s: float) -> bool:
        waits.append(("checkpoint", timeout_s))
        return True

    learner = SimpleNamespace(died=died, settle=settle, checkpoint=checkpoint)
    app = create_app(settings, engine, build_metrics(engine), learner)
    asyncio.run(app.on_before_shutdown.send())
    assert waits == ([] if died else [("settle", 7.0), ("checkpoint", 7.0)])


def test_each_process_of_a_data_dir_is_noted_among_its_publishers(tmp_path):
    from stream_app.item_sharing import PUBLISHERS_KEPT, own_publishers

    settings = settings_for(tmp_path)
    assert own_publishers(settings, b"first") == frozenset()
    assert own_publishers(settings, b"second") == {b"first"}
    for n in range(2 * PUBLISHERS_KEPT):
        own_publishers(settings, b"p%d" % n)
    newest = range(PUBLISHERS_KEPT, 2 * PUBLISHERS_KEPT)
    assert own_publishers(settings, b"last") == {b"p%d" % n for n in newest}


def test_the_learner_process_installs_rows_that_come_in_a_frame(tmp_path):
    """The worker hands item-rows records to its learner process in a ROWS frame; the child
    installs them and reports them as ``inputs`` (no batch behind it, so no slot to free)."""
    from stream_app.learner_process import ROWS, LearnerLoop, parse_rows, rows_frame

    records = [(b"a", encode_item_row(np.full(17, 0.5), np.zeros(16))), (b"b", b"bad")]
    read, write = os.pipe()
    os.write(write, rows_frame(records))
    kind, body = read_frame(read)
    assert kind == ROWS and parse_rows(body) == (records, False)
    sent: list = []
    engine = Engine(settings_for(tmp_path))
    LearnerLoop(engine, engine.settings, SimpleNamespace(send=sent.append)).handle(kind, body)
    [(message, report)] = sent
    assert message == "inputs" and report.delta.new_ids == ["a"]
    np.testing.assert_array_equal(engine.learner.item_matrix, np.full((1, 17), 0.5))


@pytest.mark.parametrize("keep", [True, False])
def test_own_rows_of_the_catch_up_keep_their_statistics_and_others_lose_them(tmp_path, keep):
    """After a crash, the catch-up installs the rows of the worker's own items that it
    published after its checkpoint: their statistics are its own learning, and forgotten,
    every item learned since the checkpoint started again from one batch's positives (α0
    with them). Rows another learner made leave the statistics of their items behind."""
    from stream_app.learner_process import ROWS, LearnerLoop, parse_rows, rows_frame

    examples, _ = examples_and_histories(200)
    engine = Engine(settings_for(tmp_path, dr_enabled=False))
    engine.users = 240
    engine.learn_reported(examples, step=32)
    learned, alpha0 = engine.learner.items_with_positives, engine.learner.alpha0
    ids = engine.learner.item_ids
    rows = engine.learner.item_matrix + 0.01
    records = [(item.encode(), encode_item_row(row, np.zeros(16)))
               for item, row in zip(ids, rows)]
    read, write = os.pipe()
    os.write(write, rows_frame(records, keep))  # a few KB: the pipe holds it
    kind, body = read_frame(read)
    os.close(write)
    os.close(read)
    assert kind == ROWS and parse_rows(body) == (records, keep)
    LearnerLoop(engine, engine.settings, SimpleNamespace(send=lambda _: None)).handle(kind, body)
    np.testing.assert_allclose(engine.learner.item_matrix, rows.astype(np.float32), rtol=1e-6)
    if keep:
        assert engine.learner.items_with_positives == learned > 0
        assert engine.learner.alpha0 == pytest.approx(alpha0)
    else:
        assert engine.learner.items_with_positives == 0


def test_the_learner_process_skips_what_its_model_holds_and_says_what_a_checkpoint_holds(
        tmp_path):
    """Frames carry their messages' training-topic positions: messages delivered again (all
    of them, as after a rebalance before any commit) are skipped by the child and counted in
    its reports (a child restarted from a checkpoint: tests/test_stream_positions.py and the
    broker test of crashes). A checkpoint request returns the number of the last batch it
    holds, which ``on_saved`` receives once it is written; :meth:`LearnerProcess.checkpoint`
    waits for one."""
    examples, _ = examples_and_histories()
    settings = settings_for(tmp_path)
    messages = [TrainBatch(examples=examples[start:start + 50]).to_bytes()
                for start in range(0, len(examples), 50)]
    positions = [(n % 2, n // 2) for n in range(len(messages))]
    learner = LearnerProcess(settings).start()
    follower = Engine(settings, replica=True)
    seen = {"saved": []}

    async def main() -> None:
        await learner.attach(on_report=follower.follow, on_paths=lambda stats: None,
                             on_saved=seen["saved"].append, on_death=lambda: None)
        await learner.learn(messages[:3], 240, positions[:3])
        seen["requested"] = learner.request_save()
        await learner.learn(messages[3:], 240, positions[3:])
        seen["checkpoint"] = await learner.checkpoint(60.0)
        await learner.learn(messages, 240, positions)  # delivered again
        assert await learner.settle(60.0)

    try:
        asyncio.run(main())
    finally:
        assert learner.stop()
    assert seen == {"saved": [1, 2], "requested": 1, "checkpoint": True}
    assert follower.learned == len(examples) and follower.redelivered == len(messages)
    oracle = Engine(settings_for(tmp_path / "oracle"))  # each message once, here
    oracle.users = 240
    for start, end in ((0, 3), (3, len(messages))):
        oracle.learn_messages(messages[start:end], settings.learn_batch)
    np.testing.assert_allclose(follower.learner.item_matrix, oracle.learner.item_matrix,
                               rtol=1e-6, atol=1e-9)


def test_a_learner_that_dies_answers_those_waiting_for_it(tmp_path):
    """A checkpoint or a settle waiting for a child that dies is told at once (False), not
    at its timeout: a stopping worker must not wait out its deadline for a dead learner."""
    learner = LearnerProcess(settings_for(tmp_path)).start()
    seen = {}

    async def main() -> None:
        await learner.attach(on_report=lambda report: None, on_paths=lambda stats: None,
                             on_saved=lambda through: None, on_death=lambda: None)
        await learner.learn([b"not a training message"], 1)
        os.kill(learner.pid, signal.SIGKILL)
        waits = [learner.checkpoint(600.0), learner.settle(600.0)]
        seen["answers"] = await asyncio.wait_for(asyncio.gather(*waits), 60.0)
        seen["died"] = learner.died

    asyncio.run(main())
    learner.stop(5)
    assert seen == {"answers": [False, False], "died": True}


def test_a_learner_that_learned_nothing_leaves_the_checkpoint_as_it_was(tmp_path):
    """The child checkpoints as the pipe closes only when it learned since its last
    checkpoint: with sharing, the checkpoint file's time says which of its own rows the next
    start installs, and rows a start installed from the topic (here: all it did) would
    otherwise move it past rows it never installed."""
    settings = settings_for(tmp_path)
    records = [(f"r{n}".encode(), encode_item_row(np.full(17, n / 1e3), np.zeros(16)))
               for n in range(50)]
    model = settings.data_dir / "checkpoints" / "model.npz"

    async def hand(values: list[bytes] | None) -> None:
        await learner.attach(on_report=lambda report: None, on_paths=lambda stats: None,
                             on_saved=lambda through: None, on_death=lambda: None)
        learner.install_rows(records)
        if values:
            await learner.learn(values, 240)
        assert await learner.settle(60.0)

    learner = LearnerProcess(settings).start()
    asyncio.run(hand(None))
    assert learner.stop()
    assert not model.exists()
    examples, _ = examples_and_histories(100)
    learner = LearnerProcess(settings).start()
    asyncio.run(hand([TrainBatch(examples=examples).to_bytes()]))
    assert learner.stop()
    saved = ItemLearner(settings.learner_config())
    assert saved.load(model) and saved.events == len(examples)


@pytest.mark.parametrize("caught_up", [False, True])
def test_before_the_item_rows_catch_up_a_worker_hands_nothing_over(tmp_path, caught_up):
    """With sharing, a worker whose start has not yet installed the rows published before it
    neither hands rows over (they hold the checkpoint's values, older than the topic's) nor
    checkpoints as it stops; once caught up, it does both."""
    from stream_app.app import create_app
    from stream_app.worker import build_metrics

    settings = Settings(data_dir=tmp_path, metrics_port=0, share_items=True)
    engine = Engine(settings, replica=True)
    calls: list[str] = []

    async def settle(timeout_s: float) -> bool:
        calls.append("settle")
        return True

    async def checkpoint(timeout_s: float) -> bool:
        calls.append("checkpoint")
        return True

    learner = SimpleNamespace(died=False, settle=settle, checkpoint=checkpoint,
                              batches_followed=0, drained=None)
    app = create_app(settings, engine, build_metrics(engine), learner)
    if caught_up:
        app.streamrec_sharing.caught_up.set()
    asyncio.run(app.on_before_shutdown.send())
    # caught up: the hand-over settles, and the stop settles and checkpoints
    assert sorted(calls) == (["checkpoint", "settle", "settle"] if caught_up else [])



def child_with_a_slow_m_step(settings, inbox, outbox):
    """The learner process whose M-steps take a minute, as at a large catalogue."""
    from models.deep_retrieval import DeepRetrieval
    from stream_app.learner_process import child_main

    compute = DeepRetrieval.compute_m_step

    def slow(self, snapshot):
        time.sleep(60)
        return compute(self, snapshot)

    DeepRetrieval.compute_m_step = slow
    child_main(settings, inbox, outbox)


def test_a_learner_stops_once_checkpointed_while_an_m_step_runs_aside(tmp_path, monkeypatch):
    """Its interpreter's exit joined the M-step thread: the worker's stop ran out of time and
    killed it, and a learner left by a killed worker held a copy of the model for minutes."""
    import stream_app.learner_process as module

    monkeypatch.setattr(module, "child_main", child_with_a_slow_m_step)
    examples, _ = examples_and_histories(200)
    settings = settings_for(tmp_path, dr_m_step_interval_s=0.2, index_check_s=0.1)
    learner = LearnerProcess(settings).start()

    async def main():
        await learner.attach(on_report=lambda report: None, on_paths=lambda stats: None,
                             on_saved=lambda through: None, on_death=lambda: None)
        await learner.learn([TrainBatch(examples=examples).to_bytes()], 240)
        assert await learner.settle(30)
        await asyncio.sleep(1.0)  # an M-step is under way aside

    asyncio.run(main())
    started = time.monotonic()
    assert learner.stop(30)
    assert time.monotonic() - started < 15 and learner._process.exitcode == 0
    assert (tmp_path / "checkpoints" / "model.npz").exists()


def test_a_worker_forgets_the_statistics_of_the_partitions_it_no_longer_holds(tmp_path):
    """Items moved to another worker keep no statistics here: the background re-solve moved
    this worker's copies of their rows from statistics that no longer grow, and their mass
    stayed in α0. The child is told by a frame; the items of the partitions kept keep theirs."""
    from stream_app.learner_process import FORGET, LearnerLoop, forget_frame, parse_forget

    examples, _ = examples_and_histories(200)
    engine = Engine(settings_for(tmp_path, dr_enabled=False, partitions=2))
    engine.users = 240
    engine.learn_reported(examples, step=32)
    rows = engine.learner.rows_with_positives()
    ids = engine.learner.item_ids_at(rows)
    kept = {item for item in ids if item_partition(item, 2) == 0}
    assert kept and len(kept) < len(ids)
    read, write = os.pipe()
    os.write(write, forget_frame({1}))
    kind, body = read_frame(read)
    os.close(write)
    os.close(read)
    assert kind == FORGET and parse_forget(body) == {1}
    LearnerLoop(engine, engine.settings, SimpleNamespace(send=lambda _: None)).handle(kind, body)
    left = engine.learner.item_ids_at(engine.learner.rows_with_positives())
    assert set(left) == kept
    assert engine.learner.positive_mass > 0


def test_the_timer_asks_for_no_checkpoint_while_one_is_unwritten_or_soon_after_a_long_one(
        tmp_path, monkeypatch):
    """A save of a large model outlasted the timer: its requests queued behind it, and the
    learner did little but save. Now none is asked while one is unwritten, nor before
    (1/SAVE_SHARE − 1) times the last one's duration has passed since it was written."""
    from types import SimpleNamespace

    from stream_app import learner_process as module
    from stream_app.learner_process import SAVE_SHARE, LearnerProcess

    clock = [1000.0]
    monkeypatch.setattr(module.time, "monotonic", lambda: clock[0])
    learner = LearnerProcess(settings_for(tmp_path))
    learner._writer = SimpleNamespace(write=lambda data: None)
    learner._on_saved = lambda through: None
    assert learner.save_due()
    learner.request_save()
    assert not learner.save_due() and not learner.save_due(waiting=True)  # asked, unwritten
    clock[0] += 40.0  # a save of 40 s
    learner._dispatch(("saved", True, None))
    wait = 40.0 * (1 / SAVE_SHARE - 1)
    clock[0] += wait - 1
    assert not learner.save_due()
    assert learner.save_due(waiting=True)  # intake waits for it: asked at once
    clock[0] += 1
    assert learner.save_due()
    learner.request_save()
    clock[0] += 1.0
    learner._dispatch(("saved", False, None))  # a failed write counts as one that took its time
    clock[0] += 1 / SAVE_SHARE - 1
    assert learner.save_due()


def test_what_is_asked_of_the_learner_before_it_is_attached_reaches_it_in_order(tmp_path):
    """A rebalance (with item sharing: forget the partitions lost) and item rows read can
    come while the tables recover, before the app's tasks start and attach the learner:
    they are held and written, in order, once it is attached (they raised before, and Faust
    crashed the worker)."""
    settings = settings_for(tmp_path)
    records = [(f"r{n}".encode(), encode_item_row(np.full(17, n / 1e4), np.zeros(16)))
               for n in range(50)]
    learner = LearnerProcess(settings).start()
    follower = Engine(settings, replica=True)
    seen = {}

    async def main() -> None:
        learner.forget_partitions([0, 1])
        learner.install_rows(records)
        waiting = asyncio.ensure_future(learner.drained())  # held here: waits for the pipe
        await asyncio.sleep(0.05)
        seen["drained before attach"] = waiting.done()
        await learner.attach(on_report=follower.follow, on_paths=lambda stats: None,
                             on_saved=lambda through: None, on_death=lambda: None)
        await asyncio.wait_for(waiting, 60.0)

    seen.update(run_settled(learner, main, follower))
    assert seen == {"drained before attach": False, "items": len(records)}


def test_an_interrupted_learner_start_leaves_no_child_behind(tmp_path, monkeypatch):
    """A Ctrl-C reaches the whole process group; the child ignores it (its parent stops it),
    so a start interrupted while it waits for the child kills it: left, it held the worker's
    exit for good (the exit joins its children, and the child never saw its pipe close)."""
    def interrupted(self, timeout_s):
        raise KeyboardInterrupt

    monkeypatch.setattr(LearnerProcess, "_wait_ready", interrupted)
    learner = LearnerProcess(settings_for(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        learner.start()
    assert not learner._process.is_alive()


def test_what_is_held_for_a_learner_never_attached_reaches_it_at_its_stop(tmp_path):
    """A worker stopped during its first recovery (before its tasks attach the learner)
    writes what it held for the learner at the stop, in order: the checkpoint it asked for
    holds the rows it was handed before."""
    settings = settings_for(tmp_path)
    records = [(f"r{n}".encode(), encode_item_row(np.full(17, n / 1e4), np.zeros(16)))
               for n in range(40)]
    learner = LearnerProcess(settings).start()
    learner.install_rows(records)
    learner.request_save()  # held too, and written behind the rows
    assert learner.stop()
    engine = Engine(settings)
    assert engine.load() and len(engine.learner) == len(records)
