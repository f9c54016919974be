"""The agents' logic without a broker: histories, ingest, answers."""

from __future__ import annotations

import time

import numpy as np
import pytest

from state.history import DamagedHistory, History
from stream_app.engine import Engine
from stream_app.settings import Settings
from stream_app.wire import Event, ForgetUser, InvalidMessage, RecRequest


@pytest.fixture
def engine(tmp_path) -> Engine:
    return Engine(Settings(data_dir=tmp_path, history_length=3, popularity_refresh_s=0))


def ev(user, item, kind="view", ts=100.0, event_id=None) -> Event:
    return Event(user_id=user, item_id=item, kind=kind, ts=ts, event_id=event_id)


def feed(engine: Engine, events: list[Event]) -> dict[str, History]:
    histories: dict[str, History] = {}
    for event in events:
        taken = engine.ingest(event, histories.get(event.user_id, History()))
        if taken is not None:
            histories[event.user_id] = taken[0]
            engine.learn([taken[1]])
    return histories


def test_history_keeps_the_last_t_events_in_arrival_order():
    history = History()
    for n in range(5):
        history = history.appended(f"i{n}", "view", float(n), f"e{n}", limit=3)
    assert history.items == ("i2", "i3", "i4") and history.ts == (2.0, 3.0, 4.0)
    assert History.from_json(history.to_json()) == history
    assert history.has_event("e4") and not history.has_event("e0") and not history.has_event(None)


def test_a_history_fits_its_record_by_its_newest_events_and_the_worst_event_is_bounded():
    """Oracle: :meth:`History.fitting` is the history where its record fits, else the
    longest suffix whose record fits; and no event takes more than ``WORST_EVENT_BYTES``
    (ids and a kind of the most characters JSON escapes to six bytes each)."""
    from state.history import WORST_EVENT_BYTES

    rng = np.random.default_rng(7)
    for _ in range(30):
        history = History()
        for n in range(int(rng.integers(0, 40))):
            length = int(rng.integers(1, 200))
            history = history.appended("\x01" * length, "view", float(n), f"e{n}" * length,
                                       limit=100, at=(0, n))
        limit = int(rng.integers(30, 20_000))
        fitting = history.fitting(limit)
        if history.stored_bytes() <= limit:
            assert fitting is history
            continue
        kept = len(fitting)
        assert fitting == history.newest(kept) and fitting.at == history.at
        assert fitting.stored_bytes() <= limit < history.newest(kept + 1).stored_bytes()
    worst = History()
    for n in range(20):
        worst = worst.appended("\x1f" * 256, "\x02" * 64, 1.7e9 + n / 3, "\x03" * 256,
                               limit=100)
    assert worst.stored_bytes() - History().stored_bytes() <= 20 * WORST_EVENT_BYTES


def test_histories_too_long_for_a_record_keep_their_newest_events_that_fit(tmp_path):
    """A ``history_length`` of 400 and ids of 256 characters that JSON escapes six times
    over made a record of 1.1 MB that the broker refuses: the worker sent it again for
    ever and never committed the batch. A history about to pass the limit keeps its newest
    events that fit in nine tenths of it, the same event by event as in a batch, and every
    event still makes its example, from the history cut alike."""
    from state.history import MAX_STORED_BYTES
    from stream_app.engine import HISTORY_CUT_TO, encode_phi

    settings = Settings(data_dir=tmp_path, history_length=400, popularity_refresh_s=0,
                        kind_weights={"view": 1.0, "\x02" * 64: 2.0})
    events = [Event(user_id="u", item_id=f"{n:04d}" + "\x01" * 252, kind="\x02" * 64,
                    ts=1.7e9 + n, event_id=f"{n:04d}" + "\x03" * 252) for n in range(400)]
    batched = Engine(settings)
    taken = batched.ingest_many(events, {})
    history = taken.updated["u"]
    assert len(taken.examples) == 400 and all(taken.examples)
    assert 200 < len(history) < 400 and batched.histories_cut > 0
    assert history.items == tuple(event.item_id for event in events[-len(history):])
    assert len(history.items) == len(history.event_ids) == len(history.ts)
    assert HISTORY_CUT_TO * MAX_STORED_BYTES - 8000 < history.stored_bytes() <= MAX_STORED_BYTES
    assert max(len(example.history) for example in taken.examples) < 300
    assert batched.histories_cut < 20  # cut with room to grow, not at every event
    one_by_one = Engine(settings)
    stored, examples = History(), []
    for event in events:
        stored, example = one_by_one.ingest(event, stored)
        examples.append(example)
    assert stored.items == history.items and stored.phi_b64 == history.phi_b64
    assert examples == taken.examples
    phi = batched._encode_history(history)
    assert history.phi_b64 == encode_phi(phi)  # the vector of the events kept


GOOD = {"items": ["a", "b"], "kinds": ["view", "sale"], "ts": [1.0, 2], "ids": ["x", ""],
        "phi": "", "at": [0, 7]}


def test_a_stored_history_without_ids_takes_events_and_reads_again():
    """Ids are optional in a stored record: one without them was read, and the first event
    appended one id to none, so the next read called the history damaged (the user's
    events lost)."""
    without_ids = {key: value for key, value in GOOD.items() if key != "ids"}
    history = History.from_json(without_ids)
    assert history.event_ids == ("", "")
    grown = history.appended("c", "view", 3.0, "e-c", 50)
    again = History.from_json(grown.to_json())
    assert again.items == ("a", "b", "c") and again.event_ids == ("", "", "e-c")


@pytest.mark.parametrize("damage", [
    {"items": None}, {"items": "ab"}, {"items": ["a", 5]}, {"items": ["a"]},
    {"kinds": ["view", None]}, {"ts": [1.0, None]}, {"ts": [1.0, float("nan")]},
    {"ts": [1.0, "2"]}, {"ids": ["x"]}, {"ids": [1, 2]}, {"phi": 3}, {"at": [0]},
    {"at": [0, -1]}, {"at": [0, "7"]}, {"at": [True, 7]}, {"at": 7},
])
def test_a_stored_value_that_is_not_a_history_is_damage(damage):
    """Values a damaged changelog record could hold: each failed every later event of its
    user (a KeyError, an IndexError in ``read_before``), or was taken in as it was and
    failed the learner's check of the training message that carried it, for many users."""
    from state.history import DamagedHistory, Unreadable

    assert History.from_json(GOOD).at == (0, 7)
    with pytest.raises(DamagedHistory):
        History.from_json({**GOOD, **damage})
    for value in (["a"], "x", Unreadable("does not decode"), {"kinds": ["view"]}):
        with pytest.raises(DamagedHistory):
            History.from_json(value)
    told = []
    assert History.from_stored({**GOOD, **damage}, told.append) == History()
    assert len(told) == 1 and isinstance(told[0], DamagedHistory)
    huge = {**GOOD, "ts": [1.7e308, 1.7e308]}  # a sum past 1e308, each time finite
    assert History.from_json(huge).ts == (1.7e308, 1.7e308)
    older = {key: value for key, value in GOOD.items() if key not in ("ids", "at", "phi")}
    assert History.from_stored(older, told.append).items == ("a", "b") and len(told) == 1


def test_ingest_counts_users_weights_kinds_and_ignores_redeliveries(engine):
    histories = feed(engine, [ev("u1", "a", "sale", event_id="x"), ev("u1", "a", "sale", event_id="x"),
                              ev("u2", "b", "click"), ev("u2", "a")])
    assert engine.users == 2
    assert len(histories["u1"]) == 1  # the redelivery changed nothing
    assert engine.popularity.count("a") == pytest.approx(10.0 + 1.0)
    assert engine.popularity.count("b") == pytest.approx(4.0)


def request(**fields) -> RecRequest:
    return RecRequest(request_id="r", **{"sources": ["popular"], **fields})


def test_answers_exclude_seen_items_and_fall_back_to_popularity(engine):
    histories = feed(engine, [ev("u1", "a", "sale"), ev("u2", "b", "click"), ev("u3", "c")])
    answer = engine.answer(request(user_id="u1", k=5), histories["u1"], time.perf_counter())
    assert [i.item_id for i in answer.items] == ["b", "c"]
    unknown = engine.answer(request(user_id="new", k=2), History(), time.perf_counter())
    assert [i.item_id for i in unknown.items] == ["a", "b"]
    extra = engine.answer(request(user_id="u1", history=["b"]), histories["u1"], time.perf_counter())
    assert [i.item_id for i in extra.items] == ["c"]
    everything = engine.answer(request(user_id="u1", exclude_seen=False, k=1), histories["u1"],
                               time.perf_counter())
    assert [i.item_id for i in everything.items] == ["a"]
    assert answer.request_id == "r" and answer.took_ms >= 0 and answer.error is None


def test_reply_to_must_be_a_response_topic(engine):
    engine.check_request(request(reply_to="rec-responses-client-7"))
    with pytest.raises(InvalidMessage, match="reply_to"):
        engine.check_request(request(reply_to="timeline-events"))


def test_a_source_the_worker_does_not_run_is_an_error(tmp_path):
    engine = Engine(Settings(data_dir=tmp_path, dr_enabled=False))
    engine.check_request(request(sources=["ann", "popular"]))
    with pytest.raises(InvalidMessage, match="'dr' is off"):
        engine.check_request(request(sources=["ann", "dr"]))


def test_checkpoint_round_trip(engine, tmp_path):
    feed(engine, [ev("u1", "a", "sale"), ev("u2", "b")])
    engine.save()
    again = Engine(engine.settings)
    assert again.load()
    assert again.popularity.top(2) == engine.popularity.top(2)


@pytest.mark.parametrize("share, kinds", [(0.5, ["base", "delta"]), (0.0, ["base", "base"])])
def test_the_checkpoints_delta_share_is_the_settings(tmp_path, share, kinds):
    """STREAMREC_CHECKPOINT_DELTA_SHARE reaches the item model's and Deep Retrieval's
    checkpoints: 0 writes every checkpoint whole."""
    import numpy as np

    engine = Engine(Settings(data_dir=tmp_path, checkpoint_delta_share=share))
    learned = []
    for count in (400, 3):  # all of the items, then a few of them
        ids = [f"i{k}" for k in range(count)]
        engine.learner.learn(np.ones((count, engine.settings.model_dim)), ids, np.ones(count),
                             n_users=3)
        engine.paths.model.learn(np.ones((count, engine.settings.model_dim)), ids)
        engine.save()
        learned.append((engine.last_checkpoint.kind, engine.paths.model.checkpoints.last_kind))
    assert learned == list(zip(kinds, kinds))
    assert engine.last_checkpoint.bytes > 0


def test_training_examples_carry_event_times_only_for_an_encoder_that_reads_them(tmp_path):
    """The default encoder decays by events, so examples leave their history's times out
    (half the message); the decay in seconds needs them. An example without times, met by an
    encoder that reads them, is encoded as if all its events were as recent as itself."""
    events = [ev("u1", "a", ts=10.0), ev("u1", "b", ts=20.0), ev("u1", "c", ts=60.0)]
    plain = Engine(Settings(data_dir=tmp_path / "plain", popularity_refresh_s=0))
    timed = Engine(Settings(data_dir=tmp_path / "timed", popularity_refresh_s=0,
                            encoder_half_life_s=30.0))
    assert not plain.uses_event_times and timed.uses_event_times
    for engine in (plain, timed):
        feed(engine, events[:2])
    _, example = plain.ingest(events[2], History(items=("a", "b"), kinds=("view",) * 2,
                                                 ts=(10.0, 20.0)))
    assert example.history == ["a", "b"] and example.history_ts == []
    _, with_times = timed.ingest(events[2], History(items=("a", "b"), kinds=("view",) * 2,
                                                    ts=(10.0, 20.0)))
    assert with_times.history_ts == [10.0, 20.0]
    as_recent = timed.encode_weighted(["a", "b"], np.ones(2), [60.0, 60.0])
    assert not np.allclose(as_recent, timed.encode_weighted(["a", "b"], np.ones(2), [10.0, 20.0]))
    twin = Engine(timed.settings.replace(data_dir=tmp_path / "twin"))
    feed(twin, events[:2])
    np.testing.assert_array_equal(twin.learner.item_matrix, timed.learner.item_matrix)
    timed.learn([with_times.model_copy(update={"history_ts": []})])
    twin.learn([with_times.model_copy(update={"history_ts": [60.0, 60.0]})])
    np.testing.assert_array_equal(twin.learner.item_matrix, timed.learner.item_matrix)


def test_a_requests_items_count_as_recent_as_the_newest_stored_event(tmp_path):
    """With a decay by time, the items a request carries are the user's newest events: as
    recent as the newest stored one, also when an older event arrived last (a history keeps
    arrival order; they were decayed against that event's time)."""
    engine = Engine(Settings(data_dir=tmp_path, popularity_refresh_s=0,
                             encoder_half_life_s=10.0, serve_tuning_every=0,
                             serve_half_life_events=None))
    feed(engine, [ev("u1", "a", ts=10.0), ev("u1", "b", ts=20.0), ev("u2", "c", ts=30.0)])
    request = RecRequest(request_id="r", history=["c"])
    in_order = History(items=("b", "a"), kinds=("view",) * 2, ts=(0.0, 1000.0))
    late = History(items=("a", "b"), kinds=("view",) * 2, ts=(1000.0, 0.0))
    np.testing.assert_allclose(engine.user_vector(request, late),
                               engine.user_vector(request, in_order), rtol=1e-12)


def test_a_batch_writes_again_the_history_of_a_user_whose_events_were_all_there(engine):
    """Redelivered events add nothing, but their user's stored history is written again (its
    changelog record with it), unless another event of the batch changed it; a user with
    new events gets the changed history."""
    from stream_app.app import histories_to_write

    first = [Event(user_id=u, item_id=i, kind="view", ts=1.0, event_id=f"{u}-{i}")
             for u, i in [("a", "x"), ("b", "y"), ("c", "z")]]
    stored = engine.ingest_many(first, {}).updated
    again = [first[0], first[1], Event(user_id="b", item_id="w", kind="view", ts=2.0,
                                       event_id="b-w")]
    updated, examples, repeated = engine.ingest_many(again, stored)
    assert repeated == [True, True, False]
    assert examples[0] is None and examples[1] is None and examples[2] is not None
    written = histories_to_write(again, repeated, updated, stored)
    assert set(written) == {"a", "b"}
    assert written["a"] == stored["a"]  # written again as it was
    assert written["b"] == updated["b"] and written["b"].items == ("y", "w")
    assert histories_to_write(first[2:], [True], {}, stored) == {"c": stored["c"]}


def test_an_event_read_again_gets_its_example_again_and_a_clients_duplicate_none(engine):
    """With the events' offsets, an event its history holds whose message the history took in
    already (read again after a crash) gets the example it had, its place and all; the same
    event sent again by a client (a later offset), or held by a history stored without
    offsets, gets none. The history keeps where it stands through its JSON."""
    first = [Event(user_id="a", item_id=i, kind=k, ts=float(n), event_id=f"a{n}")
             for n, (i, k) in enumerate([("x", "view"), ("y", "sale"), ("z", "view")])]
    stored, examples, _ = engine.ingest_many(first, {}, [(1, 10), (1, 11), (1, 12)])
    assert [example.source for example in examples] == [(1, 10), (1, 11), (1, 12)]
    assert History.from_json(stored["a"].to_json()) == stored["a"]
    assert stored["a"].at == (1, 12)

    _, again, repeated = engine.ingest_many(first[1:], stored, [(1, 11), (1, 12)])
    assert repeated == [True, True] and again == examples[1:]
    _, duplicate, repeated = engine.ingest_many(first[1:2], stored, [(1, 13)])
    assert repeated == [True] and duplicate == [None]
    older = {"a": History.from_json({**stored["a"].to_json(), "at": None})}
    assert engine.ingest_many(first[1:2], older, [(1, 11)]).examples == [None]
    elsewhere = engine.ingest_many(first[1:2], stored, [(0, 11)])  # another partition
    assert elsewhere.examples == [None]


def test_a_history_read_again_keeps_where_it_stands(tmp_path):
    """An event without an id is added again when its partition is read again; the history
    stays at the last offset it took in, so a later event with an id read again still gets
    its example made again (with the offset moved back, it passed for a client's duplicate
    and its example was lost)."""
    engine = Engine(Settings(data_dir=tmp_path, history_length=10, popularity_refresh_s=0))
    first = [Event(user_id="a", item_id="x", kind="view", ts=1.0, event_id="a1"),
             Event(user_id="a", item_id="y", kind="view", ts=2.0),
             Event(user_id="a", item_id="z", kind="view", ts=3.0, event_id="a3")]
    stored, examples, _ = engine.ingest_many(first, {}, [(0, 10), (0, 15), (0, 20)])
    updated, again, repeated = engine.ingest_many(first, stored, [(0, 10), (0, 15), (0, 20)])
    assert repeated == [True, False, True]
    assert again[0] == examples[0] and again[2] == examples[2]
    assert updated["a"].at == (0, 20)
    moved = History().appended("x", "view", 1.0, None, 5, (1, 30)).appended(
        "y", "view", 2.0, None, 5, (0, 3))  # the topic's partitions changed
    assert moved.at == (0, 3)


def forget(user: str) -> ForgetUser:
    return ForgetUser(user_id=user, forget=True)


def stored_after(engine: Engine, batches: list[list], stored: dict[str, History]) -> list:
    """Each batch through ``ingest_many`` as the ingest does (an empty history deleted);
    the examples of every batch."""
    examples = []
    for batch in batches:
        updated, made, _ = engine.ingest_many(batch, stored)
        stored.update(updated)
        for user in [user for user, history in updated.items() if not history]:
            del stored[user]
        examples.extend(made)
    return examples


def test_a_forget_erases_the_history_where_it_stands_among_the_users_events(tmp_path):
    """Oracle: whatever the batches, a user's history after a stream of events and erasures
    is the history of their events after their last erasure alone (the window of 4 included),
    a user erased last is deleted, the user count is the users with a history, every event
    gets its example and is counted in the popularity, and an erasure gets no example."""
    def run(split: int) -> tuple:
        engine = Engine(Settings(data_dir=tmp_path / str(split), history_length=4,
                                 popularity_refresh_s=0))
        stream = [ev("a", "x1", event_id="a1"), ev("b", "y1", event_id="b1"), forget("a"),
                  ev("a", "x2", event_id="a2"), ev("c", "z1", event_id="c1"), forget("b"),
                  forget("nobody"), ev("a", "x3", event_id="a3"), forget("c"),
                  ev("c", "z2", event_id="c2"), ev("c", "z3", event_id="c3"), forget("c"),
                  ev("d", "w1", event_id="d1"), ev("a", "x4", event_id="a4"),
                  ev("a", "x5", event_id="a5"), ev("a", "x6", event_id="a6")]
        stored = {"b": History().appended("y0", "view", 1.0, "b0", 4)}
        engine.users = 1
        batches = [stream[start:start + split] for start in range(0, len(stream), split)]
        examples = stored_after(engine, batches, stored)
        assert [example is None for example in examples] == [
            isinstance(message, ForgetUser) for message in stream]
        return engine, stored

    for split in (1, 3, 5, 16):
        engine, stored = run(split)
        assert set(stored) == {"a", "d"}, split
        assert stored["a"].items == ("x3", "x4", "x5", "x6") and stored["d"].items == ("w1",)
        alone = Engine(Settings(data_dir=tmp_path / "alone", history_length=4))
        fresh = {}
        stored_after(alone, [[ev("a", f"x{n}", event_id=f"a{n}") for n in range(2, 7)]], fresh)
        assert stored["a"] == fresh["a"], split  # its user vector too
        assert engine.users == 2, split
        assert engine.popularity.count("z3", 100.0) == pytest.approx(1.0)
        assert len(engine.popularity) == 11, split


def test_the_newest_event_time_read_from_stored_bytes_is_the_historys():
    """Oracle: last_active of a history's JSON is the largest of its times as History reads
    them (arrival order is not time order); None for bytes that are not a history with
    events, so a sweep leaves a damaged record alone."""
    import json

    from state.history import inactive_before, last_active

    rng = np.random.default_rng(3)
    for _ in range(50):
        history = History()
        for n in range(int(rng.integers(1, 9))):
            history = history.appended(f"i{n}", "view", float(rng.uniform(0, 2e9)), f"e{n}", 5)
        stored = json.dumps(history.to_json()).encode()
        assert last_active(stored) == max(History.from_json(json.loads(stored)).ts)
        assert inactive_before(stored, max(history.ts) + 1e-3)
        assert not inactive_before(stored, max(history.ts))
    for damaged in (b"", b"{", b"[]", b"{}", b'{"ts": []}', b'{"ts": "1"}', b'{"ts": ["a"]}',
                    b'{"ts": [1e999]}'):
        assert last_active(damaged) is None and not inactive_before(damaged, 1e18), damaged


def test_each_event_is_counted_once_in_the_popularity_by_its_place(engine, tmp_path):
    """The popularity counts an event by its place in the events topic, once. Read again
    (after a crash), a batch adds nothing: neither an event after an erasure, whose id the
    history started again does not hold, nor one the erasure took away with the history,
    which were counted again before, nor an event without an id. The same id in a later
    message (a client's duplicate) is not counted. After a restart from saved counts, the
    events they lack are counted once, redeliveries too (a crash lost their counts); after
    the topic was made again (its offsets start anew), events at old offsets count."""
    from state.stream_positions import mark_topics_renewed

    first = [ev("u", "x", event_id="x1"), forget("u"), ev("u", "y", event_id="y1"),
             ev("u", "z", event_id="z1"), ev("v", "w")]
    sources = [(0, 10), (0, 11), (0, 12), (0, 13), (1, 3)]
    stored = dict(engine.ingest_many(first, {}, sources).updated)

    def counts() -> dict[str, float]:
        return {item: engine.popularity.count(item, 100.0) for item in "xyzw"}

    assert counts() == dict.fromkeys("xyzw", 1.0)
    again = engine.ingest_many(first, stored, sources)
    assert counts() == dict.fromkeys("xyzw", 1.0)
    assert again.updated["u"].items == stored["u"].items == ("y", "z")
    engine.ingest_many([ev("u", "z", event_id="z1")], stored, [(0, 14)])  # a duplicate
    assert counts()["z"] == 1.0

    engine.save(model=False)
    later = [ev("u", "x", event_id="x2"), ev("v", "w")]
    stored.update(engine.ingest_many(later, stored, [(0, 15), (1, 4)]).updated)
    assert counts() == {**dict.fromkeys("yz", 1.0), "x": 2.0, "w": 2.0}
    engine.popularity = Engine(engine.settings).popularity  # a crash: the saved counts
    assert engine.popularity.load(engine.popularity_path)
    assert counts() == dict.fromkeys("xyzw", 1.0)
    engine.ingest_many(first[2:] + later, stored, sources[2:] + [(0, 15), (1, 4)])
    assert counts() == {**dict.fromkeys("yz", 1.0), "x": 2.0, "w": 2.0}

    mark_topics_renewed(engine.checkpoint_dir)
    assert engine.load()
    engine.ingest_many([ev("u", "y", event_id="y9")], stored, [(0, 2)])
    assert counts()["y"] == 2.0


def test_a_clients_duplicate_read_again_with_its_original_is_counted_once(engine):
    """After a crash that lost their counts, an event and a client's duplicate of it (the
    same id at a later offset) read again in one batch count once: the history keeps its
    last offset only, so the duplicate passes for a redelivery too."""
    batch = [ev("d", "x", event_id="e5"), ev("d", "x", event_id="e5"),
             ev("d", "y", event_id="e6")]
    sources = [(0, 20), (0, 21), (0, 22)]
    engine.save(model=False)  # the counts before the batch
    stored = dict(engine.ingest_many(batch, {}, sources).updated)
    assert [engine.popularity.count(item, 100.0) for item in "xy"] == [1.0, 1.0]
    engine.popularity = Engine(engine.settings).popularity  # a crash: the saved counts
    assert engine.popularity.load(engine.popularity_path)
    engine.ingest_many(batch, stored, sources)
    assert [engine.popularity.count(item, 100.0) for item in "xy"] == [1.0, 1.0]


def test_the_withdrawn_items_rows_are_looked_up_again_when_the_set_or_the_items_change(engine):
    """The rows the last search asked again excludes are kept between answers, and looked up
    again for another withdrawn set, or once more items are learned (one withdrawn may be
    among them)."""
    feed(engine, [ev("u", "a"), ev("u", "b")])
    engine.withdrawn = frozenset({"a", "c"})
    first = engine._withdrawn_rows()
    assert sorted(first.tolist()) == sorted(engine.learner.rows_of(["a", "c"]).tolist())
    assert -1 in first.tolist() and engine._withdrawn_rows() is first
    feed(engine, [ev("u", "c")])
    assert sorted(engine._withdrawn_rows().tolist()) == sorted(
        engine.learner.rows_of(["a", "c"]).tolist()) and -1 not in engine._withdrawn_rows()
    engine.withdrawn = frozenset({"b"})
    assert engine._withdrawn_rows().tolist() == engine.learner.rows_of(["b"]).tolist()


def test_events_read_again_that_the_window_no_longer_holds_are_not_taken_again(tmp_path):
    """With the events topic's id known, an event read again (its place at or below the
    history's, in the same topic) that the window does not hold is not taken in again: an
    event without an id (added twice before, its example from the wrong history), or the
    events before an erasure (appended to the history begun after it, their examples from
    events that came later). A client's duplicate still gets none, an event in the window
    its example again, and each event is counted in the popularity once."""
    engine = Engine(Settings(data_dir=tmp_path, history_length=10, popularity_refresh_s=0))
    engine.events_topic_id = "topic-1"
    batch = [Event(user_id="a", item_id="x", kind="view", ts=1.0, event_id="a1"),
             Event(user_id="a", item_id="y", kind="view", ts=2.0),
             forget("a"),
             Event(user_id="a", item_id="z", kind="view", ts=3.0, event_id="a3"),
             Event(user_id="b", item_id="w", kind="view", ts=4.0)]
    places = [(0, 10), (0, 11), (0, 12), (0, 13), (0, 14)]
    stored, examples, _ = engine.ingest_many(batch, {}, places)
    assert stored["a"].items == ("z",) and stored["a"].topic == "topic-1"
    counts = {item: engine.popularity.count(item) for item in "xyzw"}
    updated, again, repeated = engine.ingest_many(batch, stored, places)  # after a crash
    assert updated["a"] == stored["a"] and "b" not in updated  # nothing added twice
    assert again == [None, None, None, examples[3], None]  # e3 after the erasure, again
    assert repeated == [True, True, False, False, True]
    assert {item: engine.popularity.count(item) for item in "xyzw"} == counts
    new = Event(user_id="b", item_id="v", kind="view", ts=5.0)
    assert engine.ingest_many([new], stored, [(0, 15)]).examples[0].history == ["w"]


def test_a_history_of_another_events_topic_takes_the_new_topics_events(tmp_path):
    """An events topic made anew starts its offsets again: a history whose place is in the
    old topic (its id noted) takes the new topic's messages as new; and without the topic's
    id (a broker that gives none) an event read again is taken as it was before."""
    engine = Engine(Settings(data_dir=tmp_path, history_length=10, popularity_refresh_s=0))
    engine.events_topic_id = "topic-2"
    old = History().appended("x", "view", 1.0, None, 10, (0, 500), "topic-1")
    assert History.from_json(old.to_json()) == old
    with pytest.raises(DamagedHistory):
        History.from_json({**old.to_json(), "topic": 7})
    taken = engine.ingest_many([Event(user_id="a", item_id="y", kind="view", ts=2.0)],
                               {"a": old}, [(0, 3)])
    assert taken.updated["a"].items == ("x", "y") and taken.examples[0].history == ["x"]
    assert (taken.updated["a"].at, taken.updated["a"].topic) == ((0, 3), "topic-2")
    engine.events_topic_id = None
    unnamed = History().appended("x", "view", 1.0, None, 10, (0, 500))
    again = engine.ingest_many([Event(user_id="a", item_id="x", kind="view", ts=1.0)],
                               {"a": unnamed}, [(0, 500)])
    assert again.updated["a"].items == ("x", "x")  # as before: the window cannot tell
