"""models.metrics against slow, loop-based definitions written straight from Rendle §2.3.

Scores are drawn from a few integer levels so ties are common: tie handling is where vectorized
ranking code usually goes wrong.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models import metrics

# -- slow reference definitions -----------------------------------------------------------------


def slow_top_k(row, k):
    """Best first, ties to the lower index, excluded (-inf) items never, padded with -1."""
    ranked = sorted((i for i in range(len(row)) if row[i] != -math.inf),
                    key=lambda i: (-row[i], i))[:k]
    return ranked + [-1] * (min(k, len(row)) - len(ranked))


def slow_ranks(ranked, relevant):
    """1-based positions in ``ranked`` that hold a relevant item (the set R of Rendle §2.3)."""
    return [pos + 1 for pos, item in enumerate(ranked) if item in relevant]


def slow_recall(ranked, relevant, k):
    return len([r for r in slow_ranks(ranked, relevant) if r <= k]) / len(relevant)


def slow_recall_capped(ranked, relevant, k):
    return len([r for r in slow_ranks(ranked, relevant) if r <= k]) / min(k, len(relevant))


def slow_ndcg(ranked, relevant, k):
    dcg = sum(1 / math.log2(r + 1) for r in slow_ranks(ranked, relevant) if r <= k)
    ideal = sum(1 / math.log2(i + 1) for i in range(1, min(len(relevant), k) + 1))
    return dcg / ideal


def slow_hit(ranked, relevant, k):
    return float(any(r <= k for r in slow_ranks(ranked, relevant)))


def slow_rr_at(ranked, relevant, k):
    ranks = [r for r in slow_ranks(ranked, relevant) if r <= k]
    return 1 / min(ranks) if ranks else 0.0


def slow_auc(row, relevant, candidates):
    pairs, wins = 0, 0.0
    for r in relevant:
        for j in candidates:
            if j in relevant:
                continue
            pairs += 1
            if r in candidates:
                wins += 1.0 if row[r] > row[j] else 0.5 if row[r] == row[j] else 0.0
    return wins / pairs


def slow_rr(row, relevant, candidates):
    rankable = [r for r in relevant if r in candidates]
    if not rankable:
        return 0.0
    best = max(row[r] for r in rankable)
    negatives = [j for j in candidates if j not in relevant]
    rank = 1 + sum(row[j] > best for j in negatives) + 0.5 * sum(row[j] == best for j in negatives)
    return 1 / rank


# -- random cases ----------------------------------------------------------------------------------


def random_case(seed, n_users=7, n_items=12, levels=4, excluded=0.2):
    """Tied integer scores, some excluded items, 1..4 relevant items per user."""
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, levels, size=(n_users, n_items)).astype(float)
    exclude = rng.random((n_users, n_items)) < excluded
    relevant = []
    for u in range(n_users):
        size = int(rng.integers(1, min(5, n_items)))
        relevant.append(sorted(rng.choice(n_items, size=size, replace=False).tolist()))
    return scores, exclude, relevant


cases = given(seed=st.integers(0, 2**32 - 1), n_items=st.integers(4, 30),
              levels=st.integers(1, 6), k=st.integers(1, 12))


@settings(max_examples=150, deadline=None)
@cases
def test_top_k_matches_sort(seed, n_items, levels, k):
    scores, exclude, _ = random_case(seed, n_items=n_items, levels=levels, excluded=0.3)
    masked = np.where(exclude, -np.inf, scores)
    got = metrics.top_k(masked, k)
    assert got.tolist() == [slow_top_k(row.tolist(), k) for row in masked]


@settings(max_examples=150, deadline=None)
@cases
def test_top_k_metrics_match_definitions(seed, n_items, levels, k):
    scores, exclude, relevant = random_case(seed, n_items=n_items, levels=levels)
    masked = np.where(exclude, -np.inf, scores)
    ranked = metrics.top_k(masked, k)
    hits = metrics.hit_matrix(ranked, metrics.Ragged.from_lists(relevant))
    n_rel = np.array([len(r) for r in relevant])
    for u, rel in enumerate(relevant):
        row = ranked[u].tolist()
        rel = set(rel)
        assert metrics.hit_rate(hits, k)[u] == slow_hit(row, rel, k)
        assert metrics.recall(hits, n_rel, k)[u] == pytest.approx(slow_recall(row, rel, k))
        assert metrics.recall_capped(hits, n_rel, k)[u] == pytest.approx(
            slow_recall_capped(row, rel, k))
        assert metrics.ndcg(hits, n_rel, k)[u] == pytest.approx(slow_ndcg(row, rel, k))
        assert metrics.reciprocal_rank_at(hits, k)[u] == pytest.approx(slow_rr_at(row, rel, k))


@settings(max_examples=100, deadline=None)
@cases
def test_smaller_k_reads_a_prefix_of_the_same_hits(seed, n_items, levels, k):
    """Metrics at K' < K computed from a top-K hit matrix equal those from a top-K' ranking."""
    scores, _, relevant = random_case(seed, n_items=n_items, levels=levels)
    targets = metrics.Ragged.from_lists(relevant)
    n_rel = np.array([len(r) for r in relevant])
    wide = metrics.hit_matrix(metrics.top_k(scores, k + 3), targets)
    narrow = metrics.hit_matrix(metrics.top_k(scores, k), targets)
    np.testing.assert_allclose(metrics.ndcg(wide, n_rel, k), metrics.ndcg(narrow, n_rel, k))
    np.testing.assert_allclose(metrics.recall(wide, n_rel, k), metrics.recall(narrow, n_rel, k))


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n_items=st.integers(3, 25), levels=st.integers(1, 6))
def test_full_ranking_metrics_match_definitions(seed, n_items, levels):
    scores, exclude, relevant = random_case(seed, n_items=n_items, levels=levels)
    relevant_mask = np.zeros(scores.shape, dtype=bool)
    for u, rel in enumerate(relevant):
        relevant_mask[u, rel] = True
    candidates = ~exclude
    keep = (candidates & ~relevant_mask).any(axis=1)  # AUC needs a negative per user
    scores, relevant_mask, candidates = scores[keep], relevant_mask[keep], candidates[keep]
    relevant = [r for r, kept in zip(relevant, keep) if kept]
    got_auc = metrics.auc(scores, relevant_mask, candidates)
    got_rr = metrics.reciprocal_rank(scores, relevant_mask, candidates)
    for u, rel in enumerate(relevant):
        cand = set(np.flatnonzero(candidates[u]).tolist())
        assert got_auc[u] == pytest.approx(slow_auc(scores[u].tolist(), set(rel), cand))
        assert got_rr[u] == pytest.approx(slow_rr(scores[u].tolist(), set(rel), cand))


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n_items=st.integers(3, 25), levels=st.integers(1, 6))
def test_auc_single_target_path_equals_sorted_path(seed, n_items, levels):
    """The O(n) one-target shortcut and the sort-based general path agree."""
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, levels, size=(6, n_items)).astype(float)
    target = rng.integers(0, n_items, size=6)
    relevant = np.zeros(scores.shape, dtype=bool)
    relevant[np.arange(6), target] = True
    candidates = rng.random(scores.shape) < 0.8
    candidates[np.arange(6), target] = True
    candidates[np.arange(6), (target + 1) % n_items] = True
    fast = metrics._single_relevant_wins(scores, relevant, candidates & ~relevant)
    slow = metrics._sorted_wins(scores, relevant, candidates & ~relevant)
    np.testing.assert_allclose(fast, slow)


def test_single_target_hits_equal_ragged_hits():
    rng = np.random.default_rng(3)
    ranked = metrics.top_k(rng.random((50, 40)), 10)
    target = rng.integers(0, 40, size=50)
    as_rows = metrics.Ragged.from_lists([[t] for t in target])
    np.testing.assert_array_equal(metrics.hit_matrix(ranked, target),
                                  metrics.hit_matrix(ranked, as_rows))


def test_padding_is_never_a_hit():
    ranked = np.array([[3, -1, -1]])
    assert not metrics.hit_matrix(ranked, np.array([-1])).any()
    assert not metrics.hit_matrix(ranked, metrics.Ragged.from_lists([[0]])).any()


def test_perfect_and_worst_rankings():
    scores = np.array([[3.0, 2.0, 1.0, 0.0]])
    best = np.array([[True, True, False, False]])
    everything = np.ones_like(best)
    assert metrics.auc(scores, best, everything)[0] == 1.0
    assert metrics.auc(-scores, best, everything)[0] == 0.0
    assert metrics.auc(np.zeros_like(scores), best, everything)[0] == 0.5
    hits = metrics.hit_matrix(metrics.top_k(scores, 2), metrics.Ragged.from_lists([[0, 1]]))
    assert metrics.ndcg(hits, np.array([2]), 2)[0] == 1.0


def test_users_without_relevant_items_are_refused():
    with pytest.raises(ValueError):
        metrics.recall(np.zeros((1, 3), bool), np.array([0]), 3)
    with pytest.raises(ValueError):
        metrics.auc(np.zeros((1, 3)), np.ones((1, 3), bool), np.ones((1, 3), bool))
