"""Protocol runners: prequential ranks before it learns, batch models refit only on the past,
and the numbers equal a slow event-by-event replay."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from evaluation.data import Dataset, Events, encode, interaction_matrix
from evaluation.protocols import (ModelSpec, RunConfig, evaluate_fold, prepare_stream,
                                  run_prequential)
from evaluation.splits import leave_one_out
from evaluation.streaming import OnlineEmbedding, OnlinePopularity
from state.popularity import DecayedPopularity
from stream_app.datasets import interleave

CONFIG = RunConfig(ks=(1, 3), select_metric="NDCG@3", progress=False, batch_size=7)


def echo_pairs(n_pairs: int) -> Dataset:
    """Pairs of consecutive events (user a_i, item x_i), (user b_i, item x_i); every user has
    one event and every item one pair, so only the pair's first event can reveal its second."""
    n = 2 * n_pairs
    users = np.arange(n, dtype=np.int64)
    items = np.repeat(np.arange(n_pairs, dtype=np.int64), 2)
    events = Events(users, items, np.ones(n), np.arange(n, dtype=np.float64),
                    np.zeros(n, dtype=np.int64))
    return Dataset("echo", events, np.array([f"u{i:03d}" for i in range(n)]),
                   np.array([f"i{i:03d}" for i in range(n_pairs)]))


class Echo:
    """A streaming model that recommends whatever it learned last."""

    name = "echo"

    def __init__(self) -> None:
        self.recent: list[int] = []

    def learn(self, events: Events) -> None:
        self.recent.extend(events.items.tolist())

    def recommend(self, history, k, exclude=None):
        ranked = np.full((history.shape[0], k), -1, dtype=np.int64)
        latest = list(dict.fromkeys(reversed(self.recent)))[:k]
        ranked[:, :len(latest)] = latest
        return ranked


def test_prequential_ranks_each_event_before_learning_it():
    """With one event per step the pair's second event is a hit (its first was learned), the
    first never is (it would be only if the harness learned an event before ranking it)."""
    stream = prepare_stream(echo_pairs(20), windows=2, history_length=50)
    record, = run_prequential(stream, [ModelSpec("echo", Echo, streaming=True)], CONFIG,
                              learn_batch=1)
    assert record["metrics"]["HR@1"] == 0.5
    assert record["scored"] == 20


def test_prequential_batches_rank_the_whole_batch_first():
    stream = prepare_stream(echo_pairs(20), windows=2, history_length=50)
    record, = run_prequential(stream, [ModelSpec("echo", Echo, streaming=True)], CONFIG,
                              learn_batch=2)
    assert record["metrics"]["HR@1"] == 0.0


class Spy:
    """A batch model that remembers what it was trained on and recommends nothing."""

    name = "spy"
    fits: list[sp.csr_matrix] = []

    def fit(self, train):
        Spy.fits.append(train.copy())

    def recommend(self, history, k, exclude=None):
        return np.full((history.shape[0], k), -1, dtype=np.int64)


def small_stream_dataset(seed=0) -> Dataset:
    rng = np.random.default_rng(seed)
    users = np.array([f"u{u}" for u in rng.integers(0, 15, size=300)])
    items = np.array([f"i{i:02d}" for i in rng.zipf(1.6, size=300) % 40])
    return encode(interleave(users, items, seed), {"view": 1.0}, "small")


def test_batch_models_refit_on_exactly_the_past():
    dataset = small_stream_dataset()
    stream = prepare_stream(dataset, windows=4, history_length=50)
    Spy.fits = []
    run_prequential(stream, [ModelSpec("spy", Spy)], CONFIG)
    ev = dataset.events
    assert len(Spy.fits) == 3
    for fitted, edge in zip(Spy.fits, stream.bounds[1:-1]):
        expected = interaction_matrix(ev.users[:edge], ev.items[:edge], dataset.n_users,
                                      dataset.n_items)
        assert (fitted != expected).nnz == 0


def test_streaming_popularity_equals_a_slow_replay():
    """Event by event: rank with the popularity learned so far (seen items excluded), then
    add the event; totals and the over-time curve come out of the same hits."""
    dataset = small_stream_dataset(seed=3)
    stream = prepare_stream(dataset, windows=3, history_length=5)
    half_life = 40.0
    record, = run_prequential(stream, [ModelSpec(
        "streaming", lambda: OnlinePopularity(dataset.n_items, half_life), streaming=True)],
        CONFIG)
    ev = dataset.events
    popularity = DecayedPopularity(half_life, refresh_s=0.0)
    seen: dict[int, set[str]] = {}
    hits = []
    for e in range(len(ev)):
        user, item = int(ev.users[e]), str(int(ev.items[e]))
        mine = seen.setdefault(user, set())
        if e >= stream.bounds[1] and item not in mine:
            top = [i for i, _ in popularity.top(3, exclude=mine)]
            hits.append(item in top)
        popularity.add(item, float(ev.ts[e]), float(ev.weights[e]))
        mine.add(item)
    assert record["metrics"]["HR@3"] == pytest.approx(np.mean(hits))
    assert record["metrics_se"]["HR@3"] == pytest.approx(np.std(hits, ddof=1) / np.sqrt(len(hits)))
    assert record["scored"] == len(hits)
    curve = record["over_time"]
    sizes = np.diff(np.linspace(0, len(hits), len(curve["HR@3"]) + 1).astype(int))
    assert np.average(curve["HR@3"], weights=sizes) == pytest.approx(np.mean(hits))
    assert curve["event"][-1] == stream.scored[-1] + 1


class TimesRecorder(Echo):
    """Echo that also keeps the ``times`` rows the harness hands it."""

    reads_times = True

    def __init__(self) -> None:
        super().__init__()
        self.seen_times: list[sp.csr_matrix] = []

    def recommend(self, history, k, exclude=None, times=None):
        assert times is not None and times.shape == history.shape
        self.seen_times.append(times)
        return super().recommend(history, k, exclude)


def small_log(seed: int = 3) -> Dataset:
    rng = np.random.default_rng(seed)
    users = np.repeat([f"u{u}" for u in range(30)], 8)
    items = np.array([f"i{int(i)}" for i in rng.integers(0, 25, len(users))])
    return encode(interleave(users, items, seed), {"view": 1.0}, "small")


def test_a_model_that_reads_times_gets_each_folds_history_times():
    split = leave_one_out(small_log())
    model = TimesRecorder()
    evaluate_fold(model, split.test, CONFIG)
    handed = sp.vstack(model.seen_times).tocsr()
    assert (handed != split.test.times).nnz == 0 and handed.nnz == split.test.history.nnz


def test_the_streaming_model_reads_a_history_in_time_order(tmp_path):
    """The newest ``history_length`` items, oldest first, with their times, read as a worker
    answers requests (the serving encoder); without times the row would be read in column order, which is not the same."""
    from stream_app.settings import Settings

    dataset = small_log()
    settings = Settings(data_dir=tmp_path, model_dim=8, history_length=4, popularity_refresh_s=0)
    model = OnlineEmbedding(dataset.n_items, settings)
    model.learn(dataset.events)
    fold = leave_one_out(dataset).test
    phis = model.user_vectors(fold.history, fold.times)
    for r in range(len(fold)):
        span = slice(fold.times.indptr[r], fold.times.indptr[r + 1])
        order = np.argsort(fold.times.data[span], kind="stable")[-4:]
        cols, ts = fold.times.indices[span][order], fold.times.data[span][order]
        expected = model.engine.encode_weighted([str(c) for c in cols], np.ones(len(cols)), ts,
                                                serving=True)
        np.testing.assert_allclose(phis[r], expected)
    assert not np.allclose(phis, model.user_vectors(fold.history))


def test_prequential_hands_times_to_a_model_that_reads_them():
    recorder = TimesRecorder()
    stream = prepare_stream(small_log(), windows=3, history_length=50)
    run_prequential(stream, [ModelSpec("rec", lambda: recorder, streaming=True)], CONFIG,
                    learn_batch=1)
    assert sum(times.shape[0] for times in recorder.seen_times) == len(stream.scored)
    assert sum(times.nnz for times in recorder.seen_times) > 0


def test_streaming_dr_leaves_the_history_out_before_the_candidates_cut(tmp_path):
    """As a worker's answer: the items of the user's history leave room for the next
    candidates on the beam's paths (``dr_max_candidates``), instead of taking part of it."""
    from evaluation.streaming import OnlineDeepRetrieval
    from index_sync.paths import unit_rows
    from stream_app.settings import Settings

    dataset = small_log()
    settings = Settings(data_dir=tmp_path, model_dim=8, dr_width=4, dr_depth=2, dr_beam=3,
                        dr_max_candidates=6, popularity_refresh_s=0)
    model = OnlineDeepRetrieval(dataset.n_items, settings)
    model.learn(dataset.events)
    fold = leave_one_out(dataset).test
    model.recommend(fold.history, 5, exclude=fold.history, times=fold.times)
    expected = []
    for row, phi in enumerate(model.user_vectors(fold.history, fold.times)):
        seen = {str(i) for i in fold.history.indices[fold.history.indptr[row]:
                                                      fold.history.indptr[row + 1]]}
        on_paths = model.engine.paths.model.retrieve(unit_rows(phi)[0], None)
        expected.append(min(len([item for item in on_paths if item not in seen]), 6))
    assert model._scored == expected
    assert sum(expected) > 0
