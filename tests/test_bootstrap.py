"""Bootstrap (LED §5.1): co-occurrence, PMI and RSVD against direct loops and a dense SVD."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pytest
import scipy.sparse

from models.bootstrap import cold_start_vector, cooccurrence, pmi, rsvd_item_vectors


def random_log(seed: int, n_users: int = 30, n_items: int = 12, n_events: int = 200):
    rng = np.random.default_rng(seed)
    return rng.integers(0, n_users, n_events), rng.integers(0, n_items, n_events), n_items


def timelines(users, items):
    per_user = defaultdict(list)
    for user, item in zip(users, items):
        per_user[user].append(item)
    return per_user.values()


def test_user_cooccurrence_counts_users_holding_both_items():
    users, items, n = random_log(0)
    expected = np.zeros((n, n))
    for timeline in timelines(users, items):
        for i in set(timeline):
            for j in set(timeline) - {i}:
                expected[i, j] += 1
    np.testing.assert_array_equal(cooccurrence(users, items, n).toarray(), expected)


@pytest.mark.parametrize("window", [1, 3])
def test_window_cooccurrence_counts_nearby_event_pairs(window):
    users, items, n = random_log(1)
    expected = np.zeros((n, n))
    for timeline in timelines(users, items):
        for a in range(len(timeline)):
            for b in range(a + 1, min(a + window + 1, len(timeline))):
                if timeline[a] != timeline[b]:
                    expected[timeline[a], timeline[b]] += 1
                    expected[timeline[b], timeline[a]] += 1
    np.testing.assert_array_equal(cooccurrence(users, items, n, window=window).toarray(), expected)


@pytest.mark.parametrize("context_power, shift", [(0.75, 1.0), (1.0, 1.0), (0.75, 2.0)])
def test_pmi_matches_the_loop_formula(context_power, shift):
    C = cooccurrence(*random_log(2)).toarray()
    total, rows, cols = C.sum(), C.sum(axis=1), C.sum(axis=0)
    context_total = sum(c ** context_power for c in cols)
    expected = np.zeros_like(C)
    for i in range(len(C)):
        for j in range(len(C)):
            if C[i, j] > 0:
                p_ij, p_i = C[i, j] / total, rows[i] / total
                p_j = cols[j] ** context_power / context_total
                expected[i, j] = max(math.log(p_ij / (p_i * p_j)) - math.log(shift), 0.0)
    result = pmi(scipy.sparse.csr_matrix(C), context_power, shift)
    np.testing.assert_allclose(result.toarray(), expected, rtol=1e-12, atol=1e-12)
    assert (result.data > 0).all()  # clipped values are not stored


def test_rsvd_matches_a_dense_svd():
    M = pmi(cooccurrence(*random_log(3, n_users=80, n_items=40, n_events=900)))
    dim = 6
    V = rsvd_item_vectors(M, dim, seed=0, n_iter=20)
    U, S, _ = np.linalg.svd(M.toarray())
    # V = U·sqrt(S), signs arbitrary: compare Gram matrices V Vᵀ = U S Uᵀ and the spectrum
    np.testing.assert_allclose(np.linalg.norm(V, axis=0) ** 2, S[:dim], rtol=1e-6)
    dense = (U[:, :dim] * S[:dim]) @ U[:, :dim].T
    assert np.linalg.norm(V @ V.T - dense) / np.linalg.norm(dense) < 1e-4
    np.testing.assert_array_equal(V, rsvd_item_vectors(M, dim, seed=0, n_iter=20))  # seeded


def test_bootstrap_vectors_recover_planted_clusters():
    rng = np.random.default_rng(4)
    n_clusters, per_cluster = 4, 10
    users = np.repeat(np.arange(200), 6)
    clusters = np.repeat(np.arange(200) % n_clusters, 6)
    items = clusters * per_cluster + rng.integers(0, per_cluster, len(users))
    V = rsvd_item_vectors(pmi(cooccurrence(users, items, n_clusters * per_cluster)), 4, seed=0)
    unit = V / np.linalg.norm(V, axis=1, keepdims=True)
    cosine = unit @ unit.T
    label = np.arange(n_clusters * per_cluster) // per_cluster
    same = label[:, None] == label[None, :]
    assert cosine[same].mean() > 0.9 and abs(cosine[~same].mean()) < 0.2


def test_cold_start_vector_is_the_weighted_neighbour_mean():
    rows = np.array([[1.0, 2.0, 0.5], [3.0, 0.0, -0.5]])
    np.testing.assert_allclose(cold_start_vector(rows, np.array([1.0, 3.0])), [2.5, 0.5, -0.25])
    assert cold_start_vector(np.empty((0, 3)), np.empty(0)).tolist() == [0.0] * 3
    assert cold_start_vector(rows, np.zeros(2)).tolist() == [0.0] * 3


def test_rsvd_rejects_a_dim_above_the_rank_bound():
    with pytest.raises(ValueError):
        rsvd_item_vectors(scipy.sparse.csr_matrix(np.eye(3)), 4)


def test_streamrec_bootstrap_starts_a_model_whose_items_and_answers_follow_the_log(
        tmp_path, monkeypatch, capsys):
    """`streamrec bootstrap LOG`: a checkpoint whose item vectors come from the log's PMI
    (items used by the same users lie together), with the log's popularity; a worker's engine
    loads it and answers a user it never saw from the items of the user's cluster. It refuses
    to replace a model (unless --force) and a data dir a worker holds."""
    import json

    from state.history import History
    from state.popularity import CountJournal
    from stream_app.cli import main
    from stream_app.engine import Engine
    from stream_app.processes import lock_data_dir
    from stream_app.settings import Settings
    from stream_app.wire import RecRequest

    from .test_engine_model import planted_stream

    log = tmp_path / "log.jsonl"
    refused = [{"v": 1, "user_id": "u0", "item_id": "teleported", "kind": "teleport",
                "ts": 1e9}, {"v": 1, "user_id": "u0", "item_id": "future", "kind": "view",
                             "ts": 1.7e12}]  # a kind not configured, a time in milliseconds
    log.write_text("".join(json.dumps(event) + "\n" for event in [
        *(json.loads(e.to_bytes()) for e in planted_stream()), *refused]))
    monkeypatch.setenv("STREAMREC_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("STREAMREC_MODEL_DIM", "16")
    monkeypatch.delenv("STREAMREC_BROKER", raising=False)
    assert main(["bootstrap", str(log)]) == 0
    events = len(planted_stream())
    assert (f"of 180 items from {events} events (2 left out"
            in capsys.readouterr().out)  # what was used, not the whole log
    assert (tmp_path / "data" / "embedded-broker").exists()  # `streamrec up` takes it
    engine = Engine(Settings(index_enabled=False))
    assert engine.load()
    ids = engine.learner.item_ids
    assert len(ids) == len(engine.popularity) == 180 and engine.learner.events == 0
    assert engine.popularity.now < 2e9
    vectors = engine.learner.item_matrix[:, :-1]
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    similar = unit @ unit.T
    np.fill_diagonal(similar, -np.inf)
    cluster = np.array([item.split("-")[0] for item in ids])
    nearest = np.argsort(-similar, axis=1)[:, :5]
    assert (cluster[nearest] == cluster[:, None]).mean() > 0.95
    seen = [item for item in ids if item.startswith("c3-")][:3]
    answer = engine.answer(RecRequest(request_id="r", user_id="someone", k=10, history=seen,
                                      sources=["ann"]), History(), 0.0)
    assert sum(item.item_id.startswith("c3-") for item in answer.items) >= 8

    assert main(["bootstrap", str(log)]) == 1  # a model is there
    assert "--force" in capsys.readouterr().err
    with lock_data_dir(tmp_path / "data"):
        assert main(["bootstrap", str(log), "--force"]) == 1  # a worker holds the data dir
    shared = tmp_path / "data" / "checkpoints" / "rows-shared"
    shared.touch()  # the replaced model's rows were on the item-rows topic; these are not
    journal = tmp_path / "data" / "checkpoints" / "popularity.npz.journal.000009"
    journal.write_text(json.dumps({"topic": "", "items": ["c3-0"], "places": [[0, 0]],
                                   "ts": [engine.popularity.now], "weights": [1000.0]})
                       + "\n")  # the replaced run's counts since its save
    with monkeypatch.context() as dying:  # the bootstrap dies once the counts are saved
        dying.setattr(CountJournal, "drop_through", lambda *args: None)
        assert main(["bootstrap", str(log), "--force"]) == 0
    assert journal.exists()
    settings = Settings(index_enabled=False)
    stale = Engine(settings)
    stale.load()  # the new counts hold the replaced run's journal: not replayed on top
    assert main(["bootstrap", str(log), "--force"]) == 0
    assert not shared.exists() and not journal.exists()
    fresh = Engine(settings)
    fresh.load()
    assert stale.popularity.top(50) == fresh.popularity.top(50)
    assert len(stale.popularity.top(50)) > 3


def test_prior_rows_keep_the_directions_at_the_norm_of_a_new_items_random_row():
    from models.bootstrap import as_prior_rows

    vectors = np.random.default_rng(0).normal(0.0, 7.0, (50, 8))
    rows = as_prior_rows(vectors, 0.1)
    assert rows.shape == (50, 9) and (rows[:, -1] == 0).all()
    assert np.linalg.norm(rows[:, :-1], axis=1).mean() == pytest.approx(0.1)
    np.testing.assert_allclose(rows[:, :-1] / np.linalg.norm(rows[:, :-1], axis=1)[:, None],
                               vectors / np.linalg.norm(vectors, axis=1)[:, None])


def test_a_bootstrap_takes_the_events_a_worker_would_take():
    """Times that are not finite, or below 0, are refused by the wire: a bootstrap took them,
    and its popularity then failed (or, before, counted NaN) after the whole SVD."""
    from types import SimpleNamespace

    from stream_app.bootstrap import _as_a_worker_takes
    from stream_app.settings import Settings

    events = SimpleNamespace(kinds=np.array(["view", "view", "view", "view", "teleport"]),
                             ts=np.array([1e9, np.nan, np.inf, -1.0, 1e9]))
    taken = _as_a_worker_takes(Settings(max_event_ahead_s=None), events)
    assert taken.tolist() == [True, False, False, False, False]
