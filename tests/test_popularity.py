"""Decayed popularity against a direct recomputation from the event list."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from state.popularity import DecayedPopularity, journal_files

HALF_LIFE = 3600.0


def direct_count(events, item, at):
    return sum(w * 2 ** (-(at - ts) / HALF_LIFE) for i, ts, w in events if i == item)


events_strategy = st.lists(
    st.tuples(st.sampled_from("abcdef"), st.floats(1e9, 1e9 + 5e5), st.sampled_from([1.0, 4.0, 10.0])),
    min_size=1, max_size=60)


@settings(max_examples=60, deadline=None)
@given(events_strategy)
def test_decayed_counts_equal_the_direct_sum(events):
    popularity = DecayedPopularity(HALF_LIFE, refresh_s=0)
    for item, ts, weight in events:
        popularity.add(item, ts, weight)
    at = max(ts for _, ts, _ in events)
    for item in "abcdefg":
        assert popularity.count(item, at) == pytest.approx(direct_count(events, item, at),
                                                           rel=1e-9, abs=1e-300)
    ranked = [item for item, _ in popularity.top(10)]
    expected = sorted({i for i, _, _ in events}, key=lambda i: -direct_count(events, i, at))
    counts = [direct_count(events, i, at) for i in ranked]
    assert sorted(ranked) == sorted(expected)
    assert all(a >= b * (1 - 1e-9) for a, b in zip(counts, counts[1:]))


@settings(max_examples=60, deadline=None)
@given(events_strategy, st.integers(1, 60))
def test_a_batch_adds_as_its_events_one_by_one(events, cut):
    """add_many of consecutive slices = add of every event: the same items in the same rows,
    the same counts and the same event-time clock."""
    one_by_one = DecayedPopularity(HALF_LIFE, refresh_s=0)
    for item, ts, weight in events:
        one_by_one.add(item, ts, weight)
    batched = DecayedPopularity(HALF_LIFE, refresh_s=0)
    for start in range(0, len(events), cut):
        items, times, weights = zip(*events[start:start + cut])
        batched.add_many(items, times, weights)
    assert batched._ids == one_by_one._ids and batched.now == one_by_one.now
    for item in "abcdefg":
        assert batched.count(item) == pytest.approx(one_by_one.count(item), rel=1e-12,
                                                    abs=1e-300)


def test_top_excludes_and_reads_create_nothing():
    popularity = DecayedPopularity(HALF_LIFE, refresh_s=0)
    for item, weight in [("a", 1.0), ("b", 4.0), ("c", 10.0), ("a", 1.0)]:
        popularity.add(item, 0.0, weight)
    assert popularity.top(2) == [("c", pytest.approx(10.0)), ("b", pytest.approx(4.0))]
    assert [i for i, _ in popularity.top(5, exclude={"c"})] == ["b", "a"]
    assert popularity.count("zzz") == 0.0 and len(popularity) == 3 and "zzz" not in popularity


def test_decay_halves_per_half_life_and_never_overflows():
    popularity = DecayedPopularity(HALF_LIFE, refresh_s=0)
    popularity.add("old", 0.0, 8.0)
    popularity.add("new", 1.0e10, 1.0)  # λ·t ≈ 1.9e6: exp() of it would overflow
    assert popularity.count("new") == pytest.approx(1.0)
    assert popularity.count("old", at=3 * HALF_LIFE) == pytest.approx(1.0)
    assert [i for i, _ in popularity.top(2)] == ["new", "old"]


def test_ranking_cache_refreshes_after_refresh_s():
    now = [0.0]
    popularity = DecayedPopularity(HALF_LIFE, refresh_s=1.0, clock=lambda: now[0])
    popularity.add("a", 0.0)
    assert popularity.top(1)[0][0] == "a"
    popularity.add("b", 0.0, 5.0)
    assert popularity.top(1)[0][0] == "a"  # cached order, current counts
    now[0] = 1.5
    assert popularity.top(1)[0][0] == "b"


def test_save_and_load_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    popularity = DecayedPopularity(HALF_LIFE, refresh_s=0)
    for _ in range(3000):
        popularity.add(f"item-{rng.integers(500)}", float(rng.uniform(0, 1e5)),
                       float(rng.choice([1, 4, 10])))
    path = tmp_path / "p.npz"
    popularity.save(path)
    loaded = DecayedPopularity(HALF_LIFE, refresh_s=0)
    assert loaded.load(path)
    assert loaded.top(50) == popularity.top(50) and loaded.now == popularity.now
    loaded.add("brand-new", loaded.now, 1.0)
    assert loaded.count("brand-new") == pytest.approx(1.0)
    slower = DecayedPopularity(2 * HALF_LIFE, refresh_s=0)  # a half-life changed in between
    assert slower.load(path) and slower.top(50) == popularity.top(50)
    for item, _ in popularity.top(50):
        assert popularity.count(item) > 0
        assert slower.count(item) == pytest.approx(popularity.count(item), rel=1e-9)
        later = slower.now + 2 * HALF_LIFE  # one new half-life on: half the count
        assert slower.count(item, at=later) == pytest.approx(popularity.count(item) / 2,
                                                             rel=1e-9)
    assert not DecayedPopularity(HALF_LIFE).load(tmp_path / "missing.npz")


def test_half_life_must_be_positive():
    with pytest.raises(ValueError):
        DecayedPopularity(0.0)
    assert math.isfinite(DecayedPopularity(1.0).rate)


@pytest.mark.parametrize("seed", range(4))
def test_top_rows_equal_the_stable_full_sort(seed):
    """Oracle: the partial ranking = the first rows of a stable argsort, ties included."""
    from state.popularity import top_rows

    rng = np.random.default_rng(seed)
    values = rng.integers(0, 40, 3000).astype(float)  # many ties, across the cut too
    full = np.argsort(-values, kind="stable")
    for depth in (0, 1, 7, 100, 2999, 3000, 5000):
        np.testing.assert_array_equal(top_rows(values, depth), full[:depth])


def test_a_top_beyond_the_cached_ranking_ranks_deeper():
    """The cached ranking keeps RANKED_AT_LEAST items; a request that needs more (k plus its
    exclusions) gets a deeper ranking at once, not a short answer."""
    from state.popularity import RANKED_AT_LEAST

    popularity = DecayedPopularity(HALF_LIFE, refresh_s=3600.0)
    n = RANKED_AT_LEAST + 500
    for row in range(n):
        popularity.add(f"i{row}", 0.0, float(n - row))  # i0 most popular
    assert [i for i, _ in popularity.top(3)] == ["i0", "i1", "i2"]
    excluded = {f"i{row}" for row in range(RANKED_AT_LEAST)}
    assert [i for i, _ in popularity.top(5, exclude=excluded)] == [
        f"i{row}" for row in range(RANKED_AT_LEAST, RANKED_AT_LEAST + 5)]
    assert len(popularity.top(n)) == n


def test_requests_a_little_deeper_each_do_not_each_rank_the_catalogue_again(monkeypatch):
    """A ranking deeper than the cached one goes to the next power of two, and later rankings
    keep the deepest depth asked for: requests whose exclusions grow one by one ranked the
    whole catalogue each (31.7 ms at two million items, on the event loop)."""
    import state.popularity as module

    now = [0.0]
    popularity = DecayedPopularity(HALF_LIFE, refresh_s=1.0, clock=lambda: now[0])
    n = 5000
    for row in range(n):
        popularity.add(f"i{row}", 0.0, float(n - row))
    depths = []
    top_rows = module.top_rows
    monkeypatch.setattr(module, "top_rows",
                        lambda values, depth: depths.append(depth) or top_rows(values, depth))
    for extra in range(1, 200):  # k 10, and a few more exclusions each time
        excluded = {f"i{row}" for row in range(module.RANKED_AT_LEAST + extra)}
        top = popularity.top(10, exclude=excluded)
        assert top[0][0] == f"i{module.RANKED_AT_LEAST + extra}"
    assert depths == [2 * module.RANKED_AT_LEAST]  # once, not 199 times
    popularity.add("i4999", 0.0, 1e6)
    now[0] = 2.0  # a refresh: as deep as before
    assert popularity.top(10, exclude=excluded)[0][0] == "i4999"
    assert depths == [2 * module.RANKED_AT_LEAST] * 2


def test_the_checkpoints_that_hold_ids_do_not_widen_them_to_the_longest(tmp_path):
    """Popularity's and the learner's files hold ids at their own size: one id of 250
    characters among 20,000 short ones adds about its own bytes, not 250 × 4 bytes to each."""
    from models.learner import ItemLearner, LearnerConfig

    short = [f"sku-{n:06d}" for n in range(20_000)]
    sizes = {}
    for label, ids in (("short", short), ("one long", short + ["u" * 250])):
        popularity = DecayedPopularity(HALF_LIFE, refresh_s=0)
        popularity.add_many(ids, np.full(len(ids), 1e5), np.ones(len(ids)))
        popularity.save(tmp_path / f"popularity {label}.npz")
        learner = ItemLearner(LearnerConfig(dim=1))
        learner.assign(ids, np.zeros((len(ids), 2)))
        learner.save(tmp_path / f"model {label}.npz")
        sizes[label] = [(tmp_path / f"{kind} {label}.npz").stat().st_size
                        for kind in ("popularity", "model")]
        again = DecayedPopularity(HALF_LIFE, refresh_s=0)
        assert again.load(tmp_path / f"popularity {label}.npz")
        assert again._ids == ids
        learned = ItemLearner(LearnerConfig(dim=1))
        assert learned.load(tmp_path / f"model {label}.npz") and learned.item_ids == ids
    for short_size, long_size in zip(sizes["short"], sizes["one long"]):
        assert long_size < short_size + 2048, sizes


def test_items_faded_below_notice_are_forgotten_at_a_save(tmp_path):
    """Every item ever named stayed, junk ids included, in the memory, in the file saved every
    30 s and in every full ranking. Oracle: after a save, the items counted at least
    FORGET_BELOW keep their counts and their order, the others read 0 and are gone from the
    file; their rows go to new items."""
    from state.popularity import FORGET_BELOW

    popularity = DecayedPopularity(HALF_LIFE, refresh_s=0)
    events = [(f"old-{k}", 0.0, 1.0) for k in range(300)]  # 30 half-lives before the rest
    events += [(f"new-{k % 50}", 30 * HALF_LIFE + k, 1.0 + k % 3) for k in range(200)]
    events += [("edge", 10 * HALF_LIFE + 300, 1.0)]  # under 20 half-lives old: kept, just
    for item, ts, weight in events:
        popularity.add(item, ts, weight)
    before = {item: popularity.count(item) for item, *_ in events}
    ranked = popularity.top(60)
    popularity.save(tmp_path / "p.npz")
    kept = {item for item, count in before.items() if count >= FORGET_BELOW}
    assert "edge" in kept and not any(item.startswith("old") for item in kept)
    assert len(popularity) == len(kept) == 51
    for item, count in before.items():
        assert popularity.count(item) == (count if item in kept else 0.0)
    assert popularity.top(60) == [pair for pair in ranked if pair[0] in kept]
    loaded = DecayedPopularity(HALF_LIFE, refresh_s=0)
    assert loaded.load(tmp_path / "p.npz") and len(loaded) == 51
    rows = len(popularity._ids)
    popularity.add("fresh", popularity.now)
    popularity.add_many(["fresh-too", "old-3"], [popularity.now] * 2, [2.0, 3.0])
    assert popularity.count("fresh") == pytest.approx(1.0) and len(popularity) == 54
    assert len(popularity._ids) == rows  # forgotten rows taken again
    ranked = popularity.top(100)  # every item counted, the reused rows among them
    counts = [count for _, count in ranked]
    assert len(ranked) == 54 and counts == sorted(counts, reverse=True)
    assert dict(ranked)["old-3"] == pytest.approx(3.0)
    assert popularity.forget_faded() == 0  # free rows are not forgotten twice


def test_a_snapshot_is_written_as_taken_and_never_over_a_newer_one(tmp_path):
    """The worker writes popularity in a thread from a snapshot taken on its loop: counts
    added after the snapshot are not in that file, and a write of an older snapshot that
    comes after a newer one's (a timer's write outrun by the save at a stop) writes
    nothing."""
    popularity = DecayedPopularity(HALF_LIFE, refresh_s=0)
    popularity.add("a", 100.0)
    older = popularity.snapshot()
    popularity.add("b", 200.0, 3.0)
    popularity.add("a", 200.0)
    newer = popularity.snapshot()
    popularity.add("c", 300.0)  # after both: in neither
    path = tmp_path / "popularity.npz"
    assert popularity.write(newer, path)
    assert not popularity.write(older, path)
    read = DecayedPopularity(HALF_LIFE, refresh_s=0)
    assert read.load(path)
    assert sorted(read._index) == ["a", "b"] and read.now == 200.0
    assert read.top(2)[0][0] == "b"
    assert popularity.write(popularity.snapshot(), path)  # a later one is written
    assert read.load(path) and sorted(read._index) == ["a", "b", "c"]


def test_skipped_items_are_left_out_as_excluded_ones_with_the_ranking_deepened_as_needed():
    """Oracle: top(k, exclude, skip) is the first k of the whole ranking not in either, also
    when the skipped items use up every depth the ranking had (3,000 of the best 3,010)."""
    weights = np.random.default_rng(8).uniform(0.1, 100.0, 5000)

    def counted() -> DecayedPopularity:  # a ranking not deepened yet
        popularity = DecayedPopularity(3600.0, refresh_s=60.0)
        popularity.add_many([f"i{n}" for n in range(5000)], np.full(5000, 10.0), weights)
        return popularity

    whole = [item for item, _ in counted().top(5000)]
    for skipped, excluded, k in [(set(whole[:3000]), set(whole[3000:3005]), 10),
                                 (set(whole[::2]), set(), 50), (set(whole), set(), 5),
                                 (set(), set(whole[:7]), 3)]:
        got = [item for item, _ in counted().top(k, exclude=excluded, skip=skipped)]
        assert got == [item for item in whole if item not in skipped | excluded][:k]


def read_a_span(rng, popularity: DecayedPopularity, streams: dict, read_to: dict,
                longest: int) -> None:
    """Count a span of up to ``longest`` events of a random partition's stream, from
    anywhere it was read to before (a crash, a rebalance), as a worker reads them."""
    partition = int(rng.integers(len(streams)))
    start = int(rng.integers(0, read_to[partition] + 1))
    end = min(len(streams[partition]), start + int(rng.integers(1, longest + 1)))
    events = streams[partition][start:end]
    popularity.add_unheld([e[0] for e in events], [e[1] for e in events],
                          [e[2] for e in events],
                          [(partition, offset) for offset in range(start, end)])
    read_to[partition] = max(read_to[partition], end)


@pytest.mark.parametrize("seed", range(5))
def test_events_read_again_from_any_earlier_offset_are_counted_once(tmp_path, seed):
    """Oracle: a stream of partitions read in fetches that go back to any earlier offset
    (a crash, a rebalance), and counts saved and loaded between them, equals counting each
    event of the stream once; a load with its places void counts again what it reads."""
    rng = np.random.default_rng(seed)
    streams = {partition: [(f"i{rng.integers(6)}", float(1e9 + rng.uniform(0, 1e5)), 1.0)
                           for _ in range(40)] for partition in range(3)}
    popularity = DecayedPopularity(HALF_LIFE, refresh_s=0, events_topic="events")
    read_to = dict.fromkeys(streams, 0)
    for _ in range(30):
        read_a_span(rng, popularity, streams, read_to, longest=11)
        if rng.random() < 0.3:
            popularity.save(tmp_path / "p.npz")
            popularity = DecayedPopularity(HALF_LIFE, refresh_s=0, events_topic="events")
            assert popularity.load(tmp_path / "p.npz")
    once = [event for partition, events in streams.items()
            for event in events[:read_to[partition]]]
    at = 1e9 + 2e5
    for item in {event[0] for event in once}:
        assert popularity.count(item, at) == pytest.approx(direct_count(once, item, at))
    popularity.save(tmp_path / "p.npz")
    renewed = DecayedPopularity(HALF_LIFE, refresh_s=0, events_topic="events")
    assert renewed.load(tmp_path / "p.npz", renewed_at=time.time() + 10)
    item, ts, weight = streams[0][0]
    assert renewed.add_unheld([item], [ts], [weight], [(0, 0)]) == [True]
    other_topic = DecayedPopularity(HALF_LIFE, refresh_s=0, events_topic="other")
    assert other_topic.load(tmp_path / "p.npz") and other_topic.places.next_offsets() == {}


def test_events_whose_count_fails_are_not_taken_for_held(monkeypatch):
    """A count that raises leaves the places where they were: the events, taken again, are
    counted then."""
    popularity = DecayedPopularity(HALF_LIFE, refresh_s=0, events_topic="events")
    popularity.add_unheld(["a"], [1e9], [1.0], [(0, 0)])

    def failing(*args):
        raise MemoryError

    monkeypatch.setattr(popularity, "add_many", failing)
    with pytest.raises(MemoryError):
        popularity.add_unheld(["b"], [1e9], [1.0], [(0, 1)])
    monkeypatch.undo()
    assert popularity.add_unheld(["b"], [1e9], [1.0], [(0, 1)]) == [True]
    assert popularity.count("b", 1e9) == 1.0 and popularity.places.next_offsets() == {0: 2}


@pytest.mark.parametrize("seed", range(6))
def test_a_process_that_dies_loses_no_count_and_counts_none_twice(tmp_path, seed):
    """Oracle: events read (and read again from any earlier offset), the counts saved now
    and then, and the process killed at random moments (its instance dropped unsaved, a new
    one loading the counts and their journal): the counts equal counting each event read
    once, those since the last save too. The journal files a save holds are removed."""
    from state.popularity import journal_files

    rng = np.random.default_rng(seed)
    path = tmp_path / "popularity.npz"
    streams = {partition: [(f"i{rng.integers(8)}", float(1e9 + rng.uniform(0, 1e5)), 2.0)
                           for _ in range(60)] for partition in range(2)}

    def started() -> DecayedPopularity:
        popularity = DecayedPopularity(HALF_LIFE, refresh_s=0, events_topic="events")
        popularity.load(path)
        popularity.keep_journal(path)
        return popularity

    popularity, read_to = started(), dict.fromkeys(streams, 0)
    for _ in range(40):
        read_a_span(rng, popularity, streams, read_to, longest=9)
        if rng.random() < 0.25:
            popularity.save(path)
            assert [number for number, _ in journal_files(path)] in ([], [
                popularity.journal.number])
        if rng.random() < 0.25:  # killed: nothing saved
            popularity.journal.close()
            popularity = started()
    once = [event for partition, events in streams.items()
            for event in events[:read_to[partition]]]
    at = 1e9 + 2e5
    for item in {event[0] for event in once}:
        assert popularity.count(item, at) == pytest.approx(direct_count(once, item, at))


def test_a_journal_line_cut_short_or_not_a_batch_is_skipped(tmp_path, caplog):
    path = tmp_path / "popularity.npz"
    popularity = DecayedPopularity(HALF_LIFE, refresh_s=0, events_topic="events")
    popularity.keep_journal(path)
    popularity.add_unheld(["a", "b"], [1e9, 1e9], [1.0, 1.0], [(0, 0), (0, 1)])
    popularity.journal.close()
    (journal,) = path.parent.glob("popularity.npz.journal.*")
    with open(journal, "ab") as handle:
        handle.write(b'{"topic": "events", "items": ["c"], "ts": [1e9], "weights": [1.0], '
                     b'"places": [[0, 2]]}\n')
        handle.write(b'{"topic": "events", "items": [5], "ts": [1e9], "weights": [1.0], '
                     b'"places": [[0, 3]]}\n')
        handle.write(b'{"topic": "events", "items": ["d"], "ts": ["x"], "weights": [1.0], '
                     b'"places": [[0, 4]]}\n')
        handle.write(b'{"topic": "events", "items": ["e"], "ts": [1e9], "weights": [1.0], '
                     b'"places": [[0, 5]]}\n')
        handle.write(b'{"topic": "events", "items": ["g"], "ts": [null], "weights": [1.0], '
                     b'"places": [[0, 6]]}\n')  # NaN: a row of no count, served by top()
        handle.write(b'{"topic": "events", "items": ["h"], "ts": [1e9], "weights": [-1.0], '
                     b'"places": [[0, 7]]}\n')
        handle.write(b'{"topic": "events", "items": ["f"], "ts": [1e9], "wei')  # cut short
    loaded = DecayedPopularity(HALF_LIFE, refresh_s=0, events_topic="events")
    with caplog.at_level("WARNING"):
        assert loaded.load(path)
    assert {item: loaded.count(item, 1e9) for item in "abcdefgh"} == {
        "a": 1.0, "b": 1.0, "c": 1.0, "d": 0.0, "e": 1.0, "f": 0.0, "g": 0.0, "h": 0.0}
    assert not {"d", "g", "h"} & set(loaded._index) and len(loaded) == 4  # no row, no mass
    top = loaded.top(10)
    assert sorted(item for item, _ in top) == ["a", "b", "c", "e"]
    assert all(count > 0 for _, count in top)  # NaN counts were served
    assert loaded.places.next_offsets() == {0: 6}
    assert sum("does not" in record.getMessage() for record in caplog.records) == 5


def test_journals_from_before_the_topics_were_made_again_count_whole_later_ones_by_place(
        tmp_path):
    """Topics made anew restart their offsets. A journal file written before that counts
    whole (its events were counted in the old topic before the crash), one written after
    it by its places from none: the new topic's first events count, once, also after a
    second crash; the saved counts' places go."""
    from state.stream_positions import mark_topics_renewed, renewed_at

    path = tmp_path / "popularity.npz"

    def started() -> DecayedPopularity:
        popularity = DecayedPopularity(HALF_LIFE, refresh_s=0, events_topic="events")
        popularity.load(path, renewed_at=renewed_at(tmp_path))
        popularity.keep_journal(path)
        return popularity

    def count(popularity, item: str, offsets: range) -> None:
        popularity.add_unheld([item] * len(offsets), [1e9] * len(offsets),
                              [1.0] * len(offsets), [(0, offset) for offset in offsets])

    first = started()
    count(first, "a", range(0, 5))
    first.save(path)
    count(first, "b", range(5, 8))  # in the journal only
    first.journal.close()  # killed
    time.sleep(0.05)
    mark_topics_renewed(tmp_path)  # an embedded broker started anew
    time.sleep(0.05)
    second = started()
    assert [second.count(item, 1e9) for item in "ab"] == pytest.approx([5.0, 3.0])
    assert second.places.next_offsets() == {}
    count(second, "c", range(0, 10))  # the new topic's first events
    second.journal.close()  # killed again, before a save
    third = started()
    assert [third.count(item, 1e9) for item in "abc"] == pytest.approx([5, 3, 10])
    count(third, "c", range(0, 12))  # read again from the start, and two new
    assert third.count("c", 1e9) == pytest.approx(12.0)
    assert third.places.next_offsets() == {0: 12}


def test_a_death_between_a_save_and_its_journals_removal_counts_them_once(tmp_path):
    """The saved counts name the last journal file they hold: a file a save covered, left
    on the disk by a death before its removal, is not counted again, also where the places
    cannot tell (the topics made anew since); files numbered after it are, and a new
    process numbers its files above it."""
    from state.stream_positions import mark_topics_renewed, renewed_at

    path = tmp_path / "popularity.npz"
    popularity = DecayedPopularity(HALF_LIFE, refresh_s=0, events_topic="")
    popularity.keep_journal(path)
    popularity.add_unheld(["a"], [1e9], [1.0], [(0, 0)])
    (covered,) = [file for _, file in journal_files(path)]
    kept = covered.read_bytes()
    popularity.save(path)
    covered.write_bytes(kept)  # as if the save's removal had not come
    popularity.add_unheld(["b"], [1e9], [1.0], [(1, 0)])  # the next file
    popularity.journal.close()
    time.sleep(0.05)
    mark_topics_renewed(tmp_path)
    loaded = DecayedPopularity(HALF_LIFE, refresh_s=0, events_topic="")
    assert loaded.load(path, renewed_at=renewed_at(tmp_path))
    assert [loaded.count(item, 1e9) for item in "ab"] == pytest.approx([1.0, 1.0])
    for _, file in journal_files(path):
        file.unlink()
    again = DecayedPopularity(HALF_LIFE, refresh_s=0, events_topic="")
    again.load(path)
    again.keep_journal(path)
    assert again.journal.number > 1  # above the file the saved counts hold


def test_a_journal_that_cannot_be_written_warns_once_and_starts_a_new_file(tmp_path, caplog,
                                                                             monkeypatch):
    """A full disk: the counts go on; one warning until an append works again, and no line
    after one the failure may have cut short."""
    path = tmp_path / "popularity.npz"
    popularity = DecayedPopularity(HALF_LIFE, refresh_s=0, events_topic="events")
    popularity.keep_journal(path)
    append = popularity.journal.append
    failing = [2]

    def full(*args):
        if failing[0]:
            failing[0] -= 1
            raise OSError(28, "No space left on device")
        append(*args)

    monkeypatch.setattr(popularity.journal, "append", full)
    with caplog.at_level("WARNING"):
        for offset in range(3):
            popularity.add_unheld(["a"], [1e9], [1.0], [(0, offset)])
    assert popularity.count("a", 1e9) == pytest.approx(3.0)
    assert sum("could not append" in r.getMessage() for r in caplog.records) == 1
    assert [number for number, _ in journal_files(path)] == [3]


def test_a_journal_whose_buffered_line_the_disk_refuses_goes_on_in_a_new_file(tmp_path):
    """A short line stays in the file's buffer and fails at its flush, and again at the
    close that ends the file: the close must still leave the file for a new one, or every
    later batch failed on the closed file (an error per batch until the next save)."""

    class FullDisk:
        closed = False

        def write(self, data):
            return len(data)

        def flush(self):
            raise OSError(28, "No space left on device")

        def close(self):
            self.closed = True
            raise OSError(28, "No space left on device")

    path = tmp_path / "popularity.npz"
    popularity = DecayedPopularity(HALF_LIFE, refresh_s=0, events_topic="events")
    popularity.keep_journal(path)
    full = FullDisk()
    popularity.journal._handle = full
    popularity.add_unheld(["a"], [1e9], [1.0], [(0, 0)])
    assert full.closed and popularity.journal._handle is None
    popularity.add_unheld(["b"], [1e9], [1.0], [(0, 1)])  # the disk has room again
    popularity.journal.close()
    assert [popularity.count(item, 1e9) for item in "ab"] == pytest.approx([1.0, 1.0])
    (written,) = [file for _, file in journal_files(path)]
    assert b'"b"' in written.read_bytes()
