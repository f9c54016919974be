"""The serving choice: ranks, NDCG and the weighted means against direct recomputation."""

from __future__ import annotations

import numpy as np
import pytest

from models.serving_choice import (ServingCandidate, ServingChoice, candidate_grid,
                                   ndcg_of_ranks, target_ranks)


@pytest.mark.parametrize("seed", range(5))
def test_target_ranks_equal_a_full_sort(seed):
    """The rank is the target's place in a stable descending sort of every non-excluded item
    when ties are put before it."""
    rng = np.random.default_rng(seed)
    items = rng.integers(-2, 3, size=(60, 4)).astype(float)  # integer scores: many ties
    queries = rng.integers(-2, 3, size=(5, 4)).astype(float)
    target = int(rng.integers(60))
    excluded = rng.choice(np.delete(np.arange(60), target), 7, replace=False)
    ranks = target_ranks(queries, items, target, excluded)
    for query, rank in zip(queries, ranks):
        kept = np.setdiff1d(np.arange(60), np.append(excluded, target))
        order = sorted(kept.tolist() + [target],
                       key=lambda row: (-(items[row] @ query), row == target))
        assert rank == order.index(target)


def test_a_query_that_scores_everything_alike_ranks_the_target_last():
    items = np.ones((10, 3))
    assert target_ranks(np.zeros((1, 3)), items, 4, np.array([0, 1]))[0] == 7


def test_ndcg_of_ranks():
    np.testing.assert_allclose(ndcg_of_ranks(np.array([0, 3, 9, 10, 500]), k=10),
                               [1.0, 1 / np.log2(5), 1 / np.log2(11), 0.0, 0.0])


def test_the_weighted_means_equal_their_definition_whatever_the_batches():
    """Incremental = batch: after any split of the samples into batches, each mean is
    Σ_s 2^(−(t−s)/h) g_s / Σ_s 2^(−(t−s)/h)."""
    rng = np.random.default_rng(0)
    gains = rng.random((37, 3))
    choice = ServingChoice([ServingCandidate(1.0, w) for w in (1.0, 0.5, 0.0)],
                           half_life_samples=5.0, min_samples=1)
    for part in np.split(gains, [1, 2, 10, 11, 30]):
        choice.observe(part)
    ages = np.arange(36, -1, -1)
    weights = 2.0 ** (-ages / 5.0)
    np.testing.assert_allclose(choice.means, weights @ gains / weights.sum())
    assert choice.samples == 37


def test_the_pick_waits_for_enough_samples_then_follows_the_best():
    candidates = [ServingCandidate(1.0, 1.0), ServingCandidate(3.0, 0.0)]
    choice = ServingChoice(candidates, half_life_samples=50.0, min_samples=10)
    choice.observe(np.tile([0.1, 0.3], (9, 1)))
    assert choice.best == candidates[0]  # 9 < 10 samples: the configured pair
    choice.observe(np.array([[0.1, 0.3]]))
    assert choice.best == candidates[1]
    choice.observe(np.tile([0.5, 0.0], (200, 1)))  # the stream changed: so does the pick
    assert choice.best == candidates[0]


def test_the_state_round_trips_for_the_same_candidates_only():
    grid = candidate_grid(ServingCandidate(None, 1.0), (1.0, None), (1.0, 0.0))
    assert grid[0] == ServingCandidate(None, 1.0) and len(grid) == len(set(grid)) == 4
    choice = ServingChoice(grid, min_samples=1)
    choice.observe(np.random.default_rng(1).random((5, 4)))
    again = ServingChoice(grid, min_samples=1)
    assert again.restore(choice.state())
    np.testing.assert_array_equal(again.means, choice.means)
    assert again.samples == 5 and again.best == choice.best
    other = ServingChoice(grid[:3])
    assert not other.restore(choice.state()) and other.samples == 0
