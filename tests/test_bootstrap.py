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
