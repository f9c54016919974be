"""Streaming Gramians against their exact batch values."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from state.gramian import DecayedGramian, ExactGramian, atomic_write

DIM = 4
values = st.floats(-100, 100, allow_nan=False, allow_infinity=False)
rows_strategy = st.integers(0, 6).flatmap(
    lambda k: hnp.arrays(np.float64, (k, DIM), elements=values))
# one operation: rows to append, and (row picks, new values) for rows to change
operation = st.tuples(rows_strategy, st.lists(st.integers(0, 10 ** 6), max_size=6), rows_strategy)


def apply(V: np.ndarray, gramian: ExactGramian, op) -> np.ndarray:
    appended, picks, changed = op
    gramian.update(np.empty((0, DIM)), appended)
    V = np.vstack([V, appended])
    picks = [p % len(V) for p in picks] if len(V) else []
    targets = np.unique(np.array(picks, dtype=np.int64))[: len(changed)]
    gramian.update(V[targets], changed[: len(targets)])
    V[targets] = changed[: len(targets)]
    return V


@settings(max_examples=80, deadline=None)
@given(st.lists(operation, min_size=1, max_size=12))
def test_exact_gramian_equals_the_batch_gramian_after_any_updates(ops):
    gramian, V = ExactGramian(DIM), np.empty((0, DIM))
    for op in ops:
        V = apply(V, gramian, op)
    exact = V.T @ V
    scale = 1.0 + np.abs(exact).max()
    np.testing.assert_allclose(gramian.matrix, exact, rtol=1e-9, atol=1e-9 * scale)


def test_recompute_reports_the_relative_drift_and_restores_exactness():
    rng = np.random.default_rng(0)
    V = rng.normal(size=(50, DIM))
    gramian = ExactGramian(DIM)
    gramian.update(np.empty((0, DIM)), V)
    assert gramian.recompute(V) < 1e-12
    gramian.update(np.empty((0, DIM)), rng.normal(size=(5, DIM)))  # rows V does not have
    wrong = gramian.matrix.copy()
    drift = gramian.recompute(V)
    assert drift == pytest.approx(np.linalg.norm(wrong - V.T @ V) / np.linalg.norm(V.T @ V))
    assert drift > 0.01
    np.testing.assert_allclose(gramian.matrix, V.T @ V)
    with pytest.raises(ValueError):
        gramian.matrix[0, 0] = 1.0  # reads hand out no writable state


def user_rows(m: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.hstack([rng.normal(size=(m, DIM - 1)) + 0.5, np.ones((m, 1))])  # [φ, 1]


def stream(Phi, gramian, n_batches, rng, p=None, weights_of=None, batch=64):
    for _ in range(n_batches):
        users = rng.choice(len(Phi), batch, p=p)
        w = None if weights_of is None else weights_of[users]
        gramian.update(Phi[users], n_active=len(Phi), weights=w)


def test_decayed_gramian_converges_on_a_stationary_stream():
    Phi, rng = user_rows(300, 1), np.random.default_rng(2)
    gramian = DecayedGramian(DIM, beta=0.02 / 64)
    stream(Phi, gramian, 50, rng)
    early = gramian.distance_to(Phi.T @ Phi)
    stream(Phi, gramian, 1500, rng)
    assert gramian.distance_to(Phi.T @ Phi) < 0.05
    assert early < 0.15  # bias-corrected: no shrinkage towards the zero start


def test_the_past_fades_per_row_whatever_the_batching():
    """B rows in one batch or in B batches of one forget the past by the same (1 − β)^B."""
    rng = np.random.default_rng(6)
    past, row = rng.normal(size=(10, 3)), rng.normal(size=(1, 3))
    one_batch, singles = DecayedGramian(3, beta=0.05), DecayedGramian(3, beta=0.05)
    for gramian in (one_batch, singles):
        gramian.update(past, n_active=5)
    one_batch.update(np.repeat(row, 8, axis=0))
    for _ in range(8):
        singles.update(row)
    np.testing.assert_allclose(one_batch.value(), singles.value(), rtol=1e-12)
    mass = 1 - 0.95 ** 18
    expected = 5 * (0.95 ** 8 * (1 - 0.95 ** 10) * past.T @ past / 10
                    + (1 - 0.95 ** 8) * row.T @ row) / mass
    np.testing.assert_allclose(one_batch.value(), expected, rtol=1e-12)


def test_importance_weights_undo_activity_bias():
    """Active users appear more often in the stream; weights ∝ 1/activity recover Σ_u φ̃φ̃ᵀ."""
    Phi = user_rows(200, 3)
    Phi[:20, :-1] += 3.0  # the heavy users look different from the rest
    activity = np.where(np.arange(200) < 20, 20.0, 1.0)
    p = activity / activity.sum()
    plain, weighted = DecayedGramian(DIM, 0.02 / 64), DecayedGramian(DIM, 0.02 / 64)
    stream(Phi, plain, 1500, np.random.default_rng(5), p=p)
    stream(Phi, weighted, 1500, np.random.default_rng(5), p=p, weights_of=1.0 / activity)
    assert weighted.distance_to(Phi.T @ Phi) < 0.08
    assert plain.distance_to(Phi.T @ Phi) > 0.5


def test_importance_weights_work_in_batches_of_one_row():
    """A live worker's batches can hold one event: its weight must then set how far the
    estimate moves (Rendle eq. 41: a step of β/|I_c|), as normalizing within the batch
    alone cannot."""
    Phi = user_rows(200, 3)
    Phi[:20, :-1] += 3.0
    activity = np.where(np.arange(200) < 20, 20.0, 1.0)
    p = activity / activity.sum()
    weighted = DecayedGramian(DIM, 0.02 / 64)
    stream(Phi, weighted, 40_000, np.random.default_rng(5), p=p, weights_of=1.0 / activity,
           batch=1)
    assert weighted.distance_to(Phi.T @ Phi) < 0.1


def test_value_scales_with_the_active_user_count_at_once():
    gramian = DecayedGramian(2, beta=0.01)
    assert not gramian.value().any()  # nothing seen yet
    gramian.update(np.array([[2.0, 1.0]]), n_active=10)
    np.testing.assert_allclose(gramian.value(), 10 * np.array([[4.0, 2.0], [2.0, 1.0]]))
    gramian.update(np.empty((0, 2)), n_active=20)
    np.testing.assert_allclose(gramian.value(), 20 * np.array([[4.0, 2.0], [2.0, 1.0]]))
    gramian.update(np.ones((2, 2)), weights=np.zeros(2))  # weighs nothing: no 0/0
    np.testing.assert_allclose(gramian.value(), 20 * np.array([[4.0, 2.0], [2.0, 1.0]]))


def test_save_and_load_round_trip_without_pickle(tmp_path):
    exact, decayed = ExactGramian(3), DecayedGramian(3, beta=0.1)
    rows = np.random.default_rng(0).normal(size=(5, 3))
    exact.update(np.empty((0, 3)), rows)
    decayed.update(rows, n_active=7)
    exact.save(tmp_path / "exact.npz")
    decayed.save(tmp_path / "decayed.npz")
    exact_2, decayed_2 = ExactGramian(3), DecayedGramian(3, beta=0.1)
    assert exact_2.load(tmp_path / "exact.npz") and decayed_2.load(tmp_path / "decayed.npz")
    np.testing.assert_array_equal(exact_2.matrix, exact.matrix)
    np.testing.assert_array_equal(decayed_2.value(), decayed.value())
    assert not ExactGramian(3).load(tmp_path / "missing.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decayed.npz", "exact.npz"]
    with pytest.raises(ValueError):
        ExactGramian(4).load(tmp_path / "exact.npz")


@pytest.mark.parametrize("damage", ["cut short", "emptied", "one array"])
def test_a_damaged_checkpoint_file_is_named_not_misread(tmp_path, damage):
    """A checkpoint cut short (a crash, a full disk) or left empty (a rename that reached the
    disk before the data) raises DamagedCheckpoint naming the file, not a bare zip error; a
    good one reads back exactly, and a missing one is None."""
    from state.gramian import DamagedCheckpoint, load_npz, save_npz
    from state.popularity import DecayedPopularity

    path = tmp_path / "model.npz"
    arrays = {"rows": np.arange(12.0).reshape(3, 4), "ids": np.array(["a", "b", "c"])}
    save_npz(path, arrays)
    loaded = load_npz(path)
    assert loaded.keys() == arrays.keys()
    assert all(np.array_equal(loaded[key], arrays[key]) for key in arrays)
    assert load_npz(tmp_path / "none.npz") is None
    data = path.read_bytes()
    if damage == "one array":  # another file put in its place: np.save writes no archive
        with open(path, "wb") as handle:
            np.save(handle, arrays["rows"])
    else:
        path.write_bytes(data[: len(data) // 2] if damage == "cut short" else b"")
    with pytest.raises(DamagedCheckpoint, match="model.npz"):
        load_npz(path)
    popularity = tmp_path / "popularity.npz"
    popularity.write_bytes(path.read_bytes())
    with pytest.raises(DamagedCheckpoint, match="popularity.npz"):
        DecayedPopularity(3600.0).load(popularity)


def test_ids_round_trip_through_an_npz_at_the_size_of_their_bytes(tmp_path):
    """Ids are saved as their UTF-8 bytes and where each ends: one long id among many short
    ones does not widen every other (a numpy string array gives each the longest's width)."""
    from state.gramian import (DamagedCheckpoint, ids_from_arrays, ids_to_arrays, load_npz,
                               save_npz)

    odd = ["", "a", "é-ü", "日本", "x\U0001F600y", "\ud800 lone", " pad ", "tab\tnew\nline"]
    for ids in ([], odd):
        save_npz(tmp_path / "ids.npz", ids_to_arrays(ids, "item"))
        assert ids_from_arrays(load_npz(tmp_path / "ids.npz"), "item") == ids
    short = [f"sku-{n:06d}" for n in range(20_000)]
    sizes = {}
    for label, ids in (("short", short), ("one long", short + ["u" * 250])):
        save_npz(tmp_path / f"{label}.npz", ids_to_arrays(ids))
        sizes[label] = (tmp_path / f"{label}.npz").stat().st_size
        assert ids_from_arrays(load_npz(tmp_path / f"{label}.npz")) == ids
    assert sizes["one long"] < sizes["short"] + 1024
    old = {"ids": np.array(odd[1:], dtype=np.str_)}  # a checkpoint from before
    assert ids_from_arrays(old) == odd[1:]
    cut = ids_to_arrays(odd)
    cut["ids_utf8"] = cut["ids_utf8"][:-3]
    flipped = ids_to_arrays(["é"])
    flipped["ids_utf8"] = flipped["ids_utf8"][::-1].copy()  # a continuation byte first
    for damaged in (cut, flipped, {"ids_utf8": cut["ids_utf8"]}):
        with pytest.raises(DamagedCheckpoint):
            ids_from_arrays(damaged)


def test_a_write_that_fails_leaves_the_old_file_and_no_part_of_the_new_one(tmp_path):
    """A full disk or a failing writer: the file keeps its last complete content, and the temp
    file beside it goes (each attempt would otherwise leave one, and a checkpoint's can be
    gigabytes)."""
    target = tmp_path / "state.bin"
    atomic_write(target, lambda handle: handle.write(b"complete"))

    def fails(handle):
        handle.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write(target, fails)
    assert target.read_bytes() == b"complete"
    assert [p.name for p in tmp_path.iterdir()] == ["state.bin"]
