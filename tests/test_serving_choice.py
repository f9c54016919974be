"""The serving choice: ranks, NDCG and the weighted means against direct recomputation."""

from __future__ import annotations

import numpy as np
import pytest

from models.serving_choice import (ServingCandidate, ServingChoice, candidate_grid,
                                   ndcg_of_ranks, pool_positions, target_ranks)


@pytest.mark.parametrize("seed", range(5))
def test_target_ranks_equal_a_full_sort(seed):
    """Each example's rank is its item's place in a stable descending sort of the pool rows
    it counts (its excluded positions left out) when ties are put before the item, under the
    query [φ, w] of each pair (encoding, weight)."""
    rng = np.random.default_rng(seed)
    pool = rng.integers(-2, 3, size=(60, 4)).astype(float)  # integer scores: many ties
    phis = rng.integers(-2, 3, size=(3, 2, 3)).astype(float)
    pairs = [(0, 1.0), (1, 0.5), (0, 0.0), (1, 1.0), (1, 0.25)]
    own = rng.integers(60, size=3)  # each example's item is a pool row, as it is unsampled
    excluded = [np.append(rng.choice(60, 7, replace=False), target) for target in own]
    ranks = target_ranks(phis, pairs, np.vstack([pool, pool[own]]), excluded)
    assert ranks.shape == (3, 5)
    for j in range(3):
        kept = np.setdiff1d(np.arange(60), excluded[j])
        for (encoding, weight), rank in zip(pairs, ranks[j]):
            query = np.append(phis[j, encoding], weight)
            order = sorted([(row, False) for row in kept] + [(own[j], True)],
                           key=lambda entry: (-(pool[entry[0]] @ query), entry[1]))
            assert rank == order.index((own[j], True))


def test_a_query_that_scores_everything_alike_ranks_the_target_last():
    items = np.ones((11, 3))  # ten pool rows, then the example's item
    ranks = target_ranks(np.zeros((1, 1, 2)), [(0, 0.0)], items, [np.array([0, 1, 4])])
    assert ranks[0, 0] == 7


@pytest.mark.parametrize("seed", range(3))
def test_pool_positions_are_every_position_holding_the_rows(seed):
    rng = np.random.default_rng(seed)
    pool = np.sort(rng.integers(0, 30, 50))
    rows = np.unique(rng.integers(0, 35, 8))
    np.testing.assert_array_equal(pool_positions(pool, rows),
                                  np.flatnonzero(np.isin(pool, rows)))


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


def test_the_margins_equal_a_paired_standard_error_recomputed_from_the_samples():
    """Incremental = batch: each candidate's margin over another is its weighted mean paired
    difference over the difference's standard error, computed from all samples at once."""
    rng = np.random.default_rng(3)
    gains = (rng.random((60, 4)) < 0.2) * rng.random((60, 4))  # mostly zero, as NDCG is
    choice = ServingChoice([ServingCandidate(1.0, w) for w in (1.0, 0.5, 0.25, 0.0)],
                           half_life_samples=7.0, min_samples=1)
    for part in np.split(gains, [5, 6, 31]):
        choice.observe(part)
    weights = 2.0 ** (-np.arange(59, -1, -1) / 7.0)
    for against in range(4):
        diff = gains - gains[:, [against]]
        mean = weights @ diff / weights.sum()
        variance = weights @ (diff - mean) ** 2 / weights.sum()
        error = np.sqrt(variance * (weights ** 2).sum()) / weights.sum()
        expected = np.divide(mean, error, out=np.zeros(4), where=error > 0)
        np.testing.assert_allclose(choice.margins(against), expected, atol=1e-9)


def test_with_a_margin_the_pick_moves_only_for_a_clear_winner():
    """Two candidates that trade places sample by sample keep the incumbent; one that wins
    on most samples takes over; without a margin the noise moves the pick."""
    rng = np.random.default_rng(0)
    candidates = [ServingCandidate(1.0, 1.0), ServingCandidate(3.0, 0.0)]
    noise = (rng.random((400, 1)) < 0.1) * np.array([[1.0, 1.0]])
    noise[rng.random(400) < 0.05, 1] = 0.0  # the challenger loses a few events ...
    noise[rng.random(400) < 0.06, 0] = 0.0  # ... and the incumbent a few more
    steady = ServingChoice(candidates, half_life_samples=200.0, min_samples=10, margin_z=2.0)
    eager = ServingChoice(candidates, half_life_samples=200.0, min_samples=10)
    for choice in (steady, eager):
        choice.observe(noise)
    assert steady.means[1] > steady.means[0] and steady.margins(0)[1] < 2.0
    assert steady.best == candidates[0] and eager.best == candidates[1]
    clear = np.tile([0.0, 0.5], (40, 1))
    steady.observe(clear)
    assert steady.best == candidates[1]


def test_a_margin_below_zero_is_refused():
    with pytest.raises(ValueError, match="margin_z"):
        ServingChoice([ServingCandidate(1.0, 1.0)], margin_z=-1.0)


def test_the_pick_round_trips_with_the_spread_and_an_older_state_starts_over():
    """A pick held by the margin is restored as it was, not recomputed from the means; a
    state saved without the spread (before the margin) is measured again."""
    candidates = [ServingCandidate(1.0, 1.0), ServingCandidate(3.0, 0.0)]
    choice = ServingChoice(candidates, min_samples=1, margin_z=50.0)
    choice.observe(np.tile([0.2, 0.2], (20, 1)))
    choice.observe(np.array([[0.0, 1.0]]))  # ahead on the mean, far from the margin
    assert choice.best == candidates[0] and choice.means[1] > choice.means[0]
    again = ServingChoice(candidates, min_samples=1, margin_z=50.0)
    assert again.restore(choice.state())
    assert again.best == candidates[0]
    np.testing.assert_array_equal(again.margins(0), choice.margins(0))
    older = {key: value for key, value in choice.state().items()
             if key not in ("products", "weight_squares", "pick")}
    fresh = ServingChoice(candidates, min_samples=1)
    assert not fresh.restore(older) and fresh.samples == 0


def test_moves_count_every_change_of_the_answering_pair_also_when_taken_from_a_report():
    candidates = [ServingCandidate(1.0, 1.0), ServingCandidate(3.0, 0.0)]
    learner = ServingChoice(candidates, min_samples=1)
    follower = ServingChoice(candidates, min_samples=1)
    learner.observe(np.array([[0.1, 0.3]]))
    assert learner.moves == 1 and learner.lead == -np.inf  # no spread: the other is behind
    assert follower.restore(learner.state()) and follower.moves == 1
    assert follower.restore(learner.state()) and follower.moves == 1  # same pick: no move
    assert np.isnan(ServingChoice(candidates[:1]).lead)
