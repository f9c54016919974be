"""Baselines: one contract for every model, closed forms against direct solves, and planted data
where the right scores are known before running anything."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import scipy.sparse as sp
from evaluation.baselines import BPR, EASE, IALS, Popularity, Recommender, bpr_fold_in, ease_weights
from evaluation.data import Events
from evaluation.planted import ClusterOracle, cluster_of, planted_loo, popularity_loo
from evaluation.protocols import ModelSpec, RunConfig, run_offline
from evaluation.splits import leave_one_out
from evaluation.streaming import OnlinePopularity, StreamingModel

SIZES, M = (40, 25, 15, 10), 5


def random_matrix(seed=0, users=60, items=25, density=0.2) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    return sp.csr_matrix((rng.random((users, items)) < density).astype(np.float32))


BATCH_MODELS = {
    "popularity": lambda: Popularity(),
    "ease": lambda: EASE(l2=5.0),
    "ials": lambda: IALS(factors=8, iterations=5, seed=1),
    "bpr": lambda: BPR(factors=8, iterations=20, seed=1, fold_in_steps=30),
}


# -- the contract, checked on every model --------------------------------------------------------


@pytest.fixture(params=sorted(BATCH_MODELS))
def fitted(request):
    train = random_matrix()
    model = BATCH_MODELS[request.param]()
    model.fit(train)
    return model, train


def test_models_follow_the_protocol(fitted):
    assert isinstance(fitted[0], Recommender)
    assert isinstance(OnlinePopularity(3, 10.0), StreamingModel)


def test_recommend_excludes_and_returns_distinct_items(fitted):
    model, train = fitted
    history = train[:20]
    ranked = model.recommend(history, 10, exclude=history)
    assert ranked.shape == (20, 10)
    for r in range(20):
        row = ranked[r][ranked[r] >= 0].tolist()
        assert len(row) == len(set(row))
        assert not set(row) & set(history[r].indices.tolist())
        # padding only once every non-excluded item is ranked
        assert len(row) == min(10, train.shape[1] - history[r].nnz)


def test_recommend_pads_when_everything_is_excluded(fitted):
    model, train = fitted
    everything = sp.csr_matrix(np.ones((1, train.shape[1]), dtype=np.float32))
    assert model.recommend(train[:1], 5, exclude=everything).tolist() == [[-1] * 5]


def test_recommend_is_read_only(fitted):
    """Scoring any rows (even unseen ones) changes nothing: same answers, same parameters."""
    model, train = fitted
    before = copy.deepcopy(_state(model))
    first = model.recommend(train[:10], 5, exclude=train[:10])
    model.recommend(random_matrix(seed=9, users=30, items=train.shape[1]), 5)
    assert _equal_state(before, _state(model))
    np.testing.assert_array_equal(first, model.recommend(train[:10], 5, exclude=train[:10]))


def test_empty_history_gets_training_popularity(fitted):
    model, train = fitted
    empty = sp.csr_matrix((2, train.shape[1]), dtype=np.float32)
    popularity = Popularity()
    popularity.fit(train)
    np.testing.assert_array_equal(model.recommend(empty, 5), popularity.recommend(empty, 5))


@pytest.mark.parametrize("name", ["ials", "bpr"])
def test_seeded_models_reproduce(name):
    train = random_matrix(seed=4)
    a, b = BATCH_MODELS[name](), BATCH_MODELS[name]()
    a.fit(train)
    b.fit(train)
    np.testing.assert_array_equal(a.recommend(train, 8, exclude=train),
                                  b.recommend(train, 8, exclude=train))


def _state(model) -> dict:
    """Every array a model (and the implicit model inside it) holds."""
    state = {k: v for k, v in vars(model).items() if isinstance(v, np.ndarray)}
    inner = getattr(model, "model", None)
    if inner is not None:
        state.update({f"inner.{k}": v for k, v in vars(inner).items()
                      if isinstance(v, np.ndarray)})
    return state


def _equal_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# -- closed forms ----------------------------------------------------------------------------------


def test_ease_matches_the_direct_formula():
    x = random_matrix(seed=2).toarray().astype(np.float64)
    l2 = 3.0
    p = np.linalg.inv(x.T @ x + l2 * np.eye(x.shape[1]))
    expected = np.eye(x.shape[1]) - p @ np.diag(1.0 / np.diag(p))
    got = ease_weights(x.T @ x, l2)
    np.testing.assert_allclose(got, expected, atol=1e-12)
    assert np.all(np.diag(got) == 0.0)
    model = EASE(l2=l2)
    model.fit(sp.csr_matrix(x))
    np.testing.assert_allclose(model.score(sp.csr_matrix(x[:5])), x[:5] @ expected, atol=1e-5)


@pytest.mark.parametrize("alpha", [1.0, 6.0])
def test_ials_fold_in_is_the_least_squares_user_step(alpha):
    """x_u = argmin Σ_i c_ui (p_ui − x·y_i)² + λ‖x‖², with implicit's confidences: alpha on
    observed items, 1 elsewhere."""
    train = random_matrix(seed=5)
    model = IALS(factors=6, regularization=0.4, alpha=alpha, iterations=4, seed=0)
    model.fit(train)
    history = random_matrix(seed=6, users=4, items=train.shape[1], density=0.3)
    got = model.fold_in(history)
    y = model.model.item_factors.astype(np.float64)
    for r in range(history.shape[0]):
        p = history[r].toarray().ravel()
        c = np.where(p > 0, alpha, 1.0)
        expected = np.linalg.solve(y.T @ (c[:, None] * y) + 0.4 * np.eye(6), y.T @ (c * p))
        np.testing.assert_allclose(got[r], expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(model.score(history), got @ y.T, rtol=1e-5, atol=1e-6)


def test_bpr_fold_in_improves_its_objective():
    """The fold-in climbs the BPR objective it claims to maximize (checked on all pairs)."""
    rng = np.random.default_rng(0)
    factors = rng.normal(size=(40, 6))
    history = random_matrix(seed=7, users=5, items=40, density=0.15)
    start = np.zeros((5, 6))
    start[:, -1] = 1.0
    folded = bpr_fold_in(factors, history, regularization=0.01, learning_rate=0.5, steps=200,
                         negatives=8, seed=0)
    assert np.all(folded[:, -1] == 1.0)
    assert np.all(_bpr_objective(folded, factors, history) >
                  _bpr_objective(start, factors, history))


def _bpr_objective(users, factors, history, regularization=0.01):
    values = []
    for r in range(history.shape[0]):
        positive = history[r].indices
        scores = factors @ users[r]
        gaps = scores[positive][:, None] - scores[None, :]
        values.append(np.mean(-np.logaddexp(0.0, -gaps)) - regularization / 2 * users[r] @ users[r])
    return np.array(values)


# -- planted structure ------------------------------------------------------------------------------


def planted_records(specs, ks=(1, 5, 10, 20)):
    dataset = planted_loo(SIZES, M)
    split = leave_one_out(dataset)
    config = RunConfig(ks=ks, select_metric="NDCG@5", progress=False)
    return {r["model"]: r for r in run_offline(split, specs, config)}, dataset


def test_planted_oracle_is_perfect_and_popularity_scores_its_closed_form():
    dataset = planted_loo(SIZES, M)
    clusters = cluster_of(dataset, M)
    records, _ = planted_records([
        ModelSpec("oracle", lambda: ClusterOracle(clusters)),
        ModelSpec("popularity", Popularity),
        ModelSpec("streaming", lambda: OnlinePopularity(dataset.n_items, 1e12), streaming=True),
    ])
    assert records["oracle"]["metrics"]["HR@1"] == 1.0
    assert records["oracle"]["metrics"]["NDCG@1"] == 1.0
    n = sum(SIZES)
    for k in (1, 5, 10, 20):
        hr, ndcg = popularity_loo(SIZES, M, k)
        for name in ("popularity", "streaming"):
            assert records[name]["metrics"][f"HR@{k}"] == pytest.approx(hr)
            assert records[name]["metrics"][f"NDCG@{k}"] == pytest.approx(ndcg)
            # a 0/1 hit per user: the standard error of the mean is sqrt(p(1-p)/(n-1))
            assert records[name]["metrics_se"][f"HR@{k}"] == pytest.approx(
                np.sqrt(hr * (1 - hr) / (n - 1)), abs=1e-12)
    # and the closed form is not trivially 0 or 1 at the cutoffs checked
    assert 0 < popularity_loo(SIZES, M, 5)[0] < popularity_loo(SIZES, M, 10)[0] < 1


def test_planted_clusters_are_found_by_the_collaborative_baselines():
    records, _ = planted_records([
        ModelSpec("ease", EASE, ({"l2": 10.0},)),
        ModelSpec("ials", lambda: IALS(factors=8, iterations=10, seed=0)),
        ModelSpec("bpr", lambda: BPR(factors=8, iterations=100, seed=0)),
        ModelSpec("popularity", Popularity),
    ])
    # EASE's weights are block diagonal here: the one unseen cluster item is the only positive
    assert records["ease"]["metrics"]["HR@1"] == 1.0
    assert records["ials"]["metrics"]["HR@5"] >= 0.95
    assert records["bpr"]["metrics"]["HR@5"] >= 0.9
    pop = records["popularity"]["metrics"]["HR@5"]
    assert all(records[m]["metrics"]["HR@5"] > pop for m in ("ease", "ials", "bpr"))


def test_grid_search_picks_the_best_validation_candidate():
    """Candidates of known quality (the oracle beats popularity); the default comes first, so
    picking it would mean the search did nothing."""
    clusters = cluster_of(planted_loo(SIZES, M), M)

    def build(oracle: bool):
        return ClusterOracle(clusters) if oracle else Popularity()

    records, _ = planted_records([ModelSpec("pick", build, ({"oracle": False},
                                                            {"oracle": True}))])
    record = records["pick"]
    assert record["params"] == {"oracle": True}
    assert record["metrics"]["HR@1"] == 1.0
    tried = [c["NDCG@5"] for c in record["selection"]]
    assert tried[1] > tried[0]


def test_online_popularity_learns_in_stream_order_with_decay():
    """A recent event outweighs older ones once the half-life has passed: order matters."""
    model = OnlinePopularity(3, half_life_s=10.0)
    model.learn(Events(np.zeros(3, np.int64), np.array([0, 0, 1]), np.ones(3),
                       np.array([0.0, 1.0, 100.0]), np.arange(3)))
    empty = sp.csr_matrix((1, 3), dtype=np.float32)
    # item 2 never occurred: popularity has nothing to say about it, so it pads instead
    assert model.recommend(empty, 3).tolist() == [[1, 0, -1]]
    assert model.score(empty)[0, 1] == pytest.approx(1.0)


def test_online_popularity_excludes_and_reads_without_writing():
    model = OnlinePopularity(5, half_life_s=1e9)
    model.learn(Events(np.arange(6) % 2, np.array([0, 1, 1, 2, 2, 2]), np.ones(6),
                       np.arange(6.0), np.arange(6) // 2))
    masses = model.popularity._log_mass[: len(model.popularity)].copy()
    exclude = sp.csr_matrix(np.array([[0, 0, 1, 0, 0], [0, 1, 1, 0, 0]], dtype=np.float32))
    assert model.recommend(exclude, 2, exclude=exclude).tolist() == [[1, 0], [0, -1]]
    np.testing.assert_array_equal(masses, model.popularity._log_mass[: len(model.popularity)])
    assert len(model.popularity) == 3
