"""Splits and stream rows: nothing a model is scored on leaks into what it trains on or reads."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evaluation.data import Dataset, encode, interaction_matrix, restrict, sample_users
from evaluation.protocols import prepare_stream, stream_rows
from evaluation.splits import heldout_users, leave_one_out
from stream_app.datasets import interleave, load

WEIGHTS = {"view": 1.0, "click": 4.0}


def random_dataset(seed: int, n_users: int = 40, n_items: int = 30) -> Dataset:
    """Users with 1..15 events over a small catalog, repeats allowed, interleaved by seed."""
    rng = np.random.default_rng(seed)
    users, items = [], []
    for u in range(n_users):
        for _ in range(int(rng.integers(1, 16))):
            users.append(f"u{u:03d}")
            items.append(f"i{int(rng.integers(n_items)):03d}")
    return encode(interleave(np.array(users), np.array(items), seed), {"view": 1.0}, "random")


def rows(matrix, r):
    return set(matrix.indices[matrix.indptr[r]:matrix.indptr[r + 1]].tolist())


def time_order(fold, r):
    """The row's history items ordered by the time in ``fold.times`` (same pattern)."""
    span = slice(fold.times.indptr[r], fold.times.indptr[r + 1])
    assert rows(fold.times, r) == rows(fold.history, r)
    return fold.times.indices[span][np.argsort(fold.times.data[span], kind="stable")].tolist()


def by_last_occurrence(sequence):
    """Distinct items, ordered by the position of their last occurrence."""
    return sorted(set(sequence), key=lambda item: max(i for i, x in enumerate(sequence)
                                                      if x == item))


def user_sequence(dataset, user):
    ev = dataset.events
    mine = np.flatnonzero(ev.users == user)
    return ev.items[mine[np.argsort(ev.order[mine])]].tolist()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_leave_one_out_targets_never_leak(seed):
    dataset = random_dataset(seed)
    split = leave_one_out(dataset)
    train_events = set(zip(split.train_events.users.tolist(), split.train_events.items.tolist()))
    assert split.train.nnz == len(train_events)
    for fold, offset in ((split.validation, 2), (split.test, 1)):
        for r, user in enumerate(fold.users.tolist()):
            sequence = user_sequence(dataset, user)
            target = rows(fold.targets, r)
            assert target == {sequence[-offset]}
            assert not target & rows(fold.history, r)
            assert fold.history[r].nnz == len(set(sequence[:-offset]))
            assert time_order(fold, r) == by_last_occurrence(sequence[:-offset])
    for r, user in enumerate(split.test.users.tolist()):
        sequence = user_sequence(dataset, user)
        # the validation and test items are not training data for this user
        assert rows(split.train, user) == set(sequence[:-2])
        assert rows(split.test.history, r) == set(sequence[:-1])


def test_leave_one_out_uses_the_last_item_in_user_order_not_stream_order():
    log = interleave(np.array(["a"] * 4 + ["b"] * 3), np.array(["1", "2", "3", "4", "5", "6",
                                                               "7"]), seed=3)
    split = leave_one_out(encode(log, {"view": 1.0}))
    item = {i: int(v) for i, v in enumerate(encode(log, {"view": 1.0}).item_ids)}
    targets = [{item[i] for i in rows(split.test.targets, r)} for r in range(2)]
    assert targets == [{4}, {7}]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_heldout_users_never_train(seed):
    dataset = random_dataset(seed, n_users=60)
    split = heldout_users(dataset, seed, validation_fraction=0.15, test_fraction=0.2)
    held = set(split.validation.users.tolist()) | set(split.test.users.tolist())
    assert not set(split.validation.users.tolist()) & set(split.test.users.tolist())
    assert not held & set(split.train_events.users.tolist())
    assert all(split.train[u].nnz == 0 for u in held)
    trained_items = set(split.train.indices.tolist())
    kept = split.dataset
    for fold in (split.validation, split.test):
        for r, user in enumerate(fold.users.tolist()):
            sequence = user_sequence(kept, user)
            n_history = max(1, min(int(np.floor(0.8 * len(sequence))), len(sequence) - 1))
            assert rows(fold.history, r) == set(sequence[:n_history])
            assert time_order(fold, r) == by_last_occurrence(sequence[:n_history])
            assert rows(fold.targets, r) == set(sequence[n_history:]) - set(sequence[:n_history])
            assert rows(fold.targets, r) <= trained_items


def test_heldout_split_is_seeded():
    dataset = random_dataset(1, n_users=80)
    a, b = heldout_users(dataset, 5), heldout_users(dataset, 5)
    c = heldout_users(dataset, 6)
    assert a.test.users.tolist() == b.test.users.tolist()
    assert a.test.users.tolist() != c.test.users.tolist()


def test_restrict_renumbers_positions_within_user():
    dataset = random_dataset(2)
    keep = dataset.events.items % 2 == 0
    kept = restrict(dataset, keep)
    for user in range(kept.n_users):
        order = np.sort(kept.events.order[kept.events.users == user])
        assert order.tolist() == list(range(len(order)))


def test_sample_users_is_seeded_and_keeps_whole_users():
    dataset = random_dataset(3, n_users=50)
    a, b = sample_users(dataset, 10, seed=1), sample_users(dataset, 10, seed=1)
    assert a.user_ids.tolist() == b.user_ids.tolist() and a.n_users == 10
    for user_id in a.user_ids.tolist():
        original = int(np.flatnonzero(dataset.user_ids == user_id)[0])
        assert (a.events.users == np.flatnonzero(a.user_ids == user_id)[0]).sum() == \
            (dataset.events.users == original).sum()


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), limit=st.integers(1, 6))
def test_stream_rows_hold_only_the_past(seed, limit):
    """Each event's history is the user's last ``limit`` earlier items, seen is all of them."""
    dataset = random_dataset(seed, n_users=12)
    stream = prepare_stream(dataset, windows=3, history_length=limit)
    positions = np.arange(len(dataset.events))
    history, seen, times = stream_rows(stream, positions)
    ev = dataset.events
    for e in positions.tolist():
        earlier = [p for p in range(e) if ev.users[p] == ev.users[e]]
        items = [int(ev.items[p]) for p in earlier]
        assert rows(seen, e) == set(items)
        assert rows(history, e) == set(items[-limit:])
        latest = {int(ev.items[p]): float(ev.ts[p]) for p in earlier[-limit:]}  # last one wins
        span = slice(times.indptr[e], times.indptr[e + 1])
        assert dict(zip(times.indices[span].tolist(), times.data[span].tolist())) == latest


def test_prepared_stream_skips_repeats_and_warmup():
    dataset = random_dataset(4, n_users=30, n_items=8)  # a small catalog forces repeats
    stream = prepare_stream(dataset, windows=4, history_length=50)
    ev = dataset.events
    assert stream.scored.min() >= stream.bounds[1]
    _, seen, _ = stream_rows(stream, stream.scored)
    for r, e in enumerate(stream.scored.tolist()):
        assert int(ev.items[e]) not in rows(seen, r)
    assert stream.info["repeat_events_skipped"] > 0
    assert stream.info["scored_events"] + stream.info["repeat_events_skipped"] == \
        len(ev) - stream.bounds[1]


def test_interaction_matrix_is_binary():
    matrix = interaction_matrix(np.array([0, 0, 1]), np.array([2, 2, 0]), 2, 3)
    assert matrix.toarray().tolist() == [[0, 0, 1], [1, 0, 0]]


def test_sequence_files_load_as_view_events(tmp_path):
    """Regression: the loader used to truncate the kind of synthetic events to "v", which has
    no weight (and which workers reject)."""
    path = tmp_path / "seq.txt"
    path.write_text("1 10 11 12\n2 11 13\n")
    log = load(path, "sequences")
    assert set(log.kinds.tolist()) == {"view"}
    assert encode(log, WEIGHTS).events.weights.tolist() == [1.0] * 5


def test_unknown_kinds_are_refused():
    log = interleave(np.array(["a"]), np.array(["x"]), 0)
    with pytest.raises(ValueError, match="without a weight"):
        encode(log, {"click": 4.0})
