"""Ranking metrics for item recommendation (Rendle §2.3), vectorized over users. Pure numpy.

Two inputs cover every protocol of the evaluation harness:

- ``hits``: an ``(n_users, K)`` bool matrix, ``hits[u, r]`` true when the item ranked ``r + 1``
  for user ``u`` is relevant. :func:`top_k` and :func:`hit_matrix` build it. The top-K metrics
  (HR, Recall, NDCG, reciprocal rank at K) read only this matrix, so any model that returns a
  ranked list can be scored, even one that never exposes a full score vector.
- dense ``scores`` with ``relevant`` and ``candidates`` masks, for the full-ranking metrics (MRR,
  AUC). Candidates are the items the model may rank (all items minus the user's history).

Every function returns one value per user rather than a mean, so callers average, cut the values
into windows of a stream, or bootstrap them. Relevant items may be given per user as one target
index (a 1-D int array, ``-1`` for none) or as ragged rows: anything with ``indptr`` and
``indices`` (a :class:`Ragged`, or a ``scipy.sparse.csr_matrix``).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Ragged(NamedTuple):
    """Variable-length integer rows in CSR layout: row ``u`` is ``indices[indptr[u]:indptr[u+1]]``.

    Examples
    --------
    >>> Ragged.from_lists([[3], [1, 4]]).indices.tolist()
    [3, 1, 4]
    """

    indptr: np.ndarray
    indices: np.ndarray

    @classmethod
    def from_lists(cls, rows) -> Ragged:
        lengths = np.array([len(row) for row in rows], dtype=np.int64)
        indptr = np.r_[0, np.cumsum(lengths)].astype(np.int64)
        indices = np.concatenate([np.asarray(row, dtype=np.int64) for row in rows]) \
            if len(rows) else np.empty(0, dtype=np.int64)
        return cls(indptr, indices.astype(np.int64))


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest scores per row, best first; ``-inf`` marks excluded items.

    Excluded items are never returned: a row with fewer than ``k`` finite-or-larger-than-``-inf``
    scores is padded with ``-1``. Ties are broken towards the lower item index, so the ranking
    is a function of the scores alone (reproducible across runs and machines).

    Parameters
    ----------
    scores : ndarray of shape (n_users, n_items)
    k : int

    Returns
    -------
    ndarray of int64, shape (n_users, min(k, n_items))

    Examples
    --------
    >>> top_k(np.array([[0.1, 0.9, -np.inf, 0.9]]), 3).tolist()
    [[1, 3, 0]]
    >>> top_k(np.array([[1.0, -np.inf]]), 2).tolist()
    [[0, -1]]
    """
    scores = np.asarray(scores)
    n_items = scores.shape[1]
    k = min(k, n_items)
    if k == 0:
        return np.empty((scores.shape[0], 0), dtype=np.int64)
    if k < n_items:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        # The partition may cut through a group of ties; take the whole tie group at the
        # boundary and let the stable sort below pick the lowest indices from it.
        kth = np.take_along_axis(scores, part, 1).min(axis=1, keepdims=True)
        candidates, picked = _rows_at_least(scores, kth, k)
    else:
        candidates = np.broadcast_to(np.arange(n_items), scores.shape)
        picked = scores
    order = np.lexsort((candidates, -picked), axis=1)[:, :k]
    ranked = np.take_along_axis(candidates, order, 1).astype(np.int64)
    ranked[np.take_along_axis(scores, ranked, 1) == -np.inf] = -1
    return ranked


def _rows_at_least(scores: np.ndarray, threshold: np.ndarray, k: int):
    """Per row, the indices and scores of items scoring >= threshold, padded to equal width.

    Every row has at least ``k`` such items (the partition found them). Padding gets index
    ``n_items`` and score ``-inf``, which sorts after every real item, so it is never ranked."""
    mask = scores >= threshold
    counts = mask.sum(axis=1)
    width = max(int(counts.max()), k)
    first = np.full((len(scores), width), scores.shape[1], dtype=np.int64)
    rows, cols = np.nonzero(mask)  # row-major: each row's items in ascending index order
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    first[rows, np.arange(len(rows)) - np.repeat(starts, counts)] = cols
    selected = first < scores.shape[1]
    picked = np.where(selected, np.take_along_axis(scores, np.where(selected, first, 0), 1),
                      -np.inf)
    return first, picked


def hit_matrix(topk: np.ndarray, targets) -> np.ndarray:
    """``hits[u, r]``: is ``topk[u, r]`` one of user ``u``'s relevant items?

    Parameters
    ----------
    topk : ndarray of int, shape (n_users, K)
        Ranked item indices, ``-1`` for padding (never a hit).
    targets : ndarray of int, shape (n_users,), or ragged rows (``indptr``, ``indices``)
        One target item per user, or a set of relevant items per user.

    Returns
    -------
    ndarray of bool, shape (n_users, K)

    Examples
    --------
    >>> hit_matrix(np.array([[4, 2], [0, 1]]), np.array([2, 3])).tolist()
    [[False, True], [False, False]]
    >>> hit_matrix(np.array([[4, 2], [0, 1]]), Ragged.from_lists([[4], [1, 0]])).tolist()
    [[True, False], [True, True]]
    """
    topk = np.asarray(topk)
    if hasattr(targets, "indptr"):
        return _ragged_hits(topk, np.asarray(targets.indptr), np.asarray(targets.indices))
    targets = np.asarray(targets)
    return (topk == targets[:, None]) & (topk >= 0)


def _ragged_hits(topk: np.ndarray, indptr: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Membership of each ranked item in its row's set, via one sorted key lookup for all rows."""
    n_users = topk.shape[0]
    width = int(max(topk.max(initial=-1), indices.max(initial=-1))) + 2
    rows = np.repeat(np.arange(n_users, dtype=np.int64), np.diff(indptr))
    relevant_keys = np.sort(rows * width + indices)
    ranked_keys = np.arange(n_users, dtype=np.int64)[:, None] * width + topk
    found = np.searchsorted(relevant_keys, ranked_keys)
    found = np.minimum(found, max(len(relevant_keys) - 1, 0))
    if len(relevant_keys) == 0:
        return np.zeros(topk.shape, dtype=bool)
    return (relevant_keys[found] == ranked_keys) & (topk >= 0)


def hit_rate(hits: np.ndarray, k: int) -> np.ndarray:
    """HR@K: 1.0 when any relevant item is in the top ``k``, else 0.0.

    Examples
    --------
    >>> hit_rate(np.array([[False, True], [False, False]]), 2).tolist()
    [1.0, 0.0]
    >>> hit_rate(np.array([[False, True]]), 1).tolist()
    [0.0]
    """
    return np.asarray(hits)[:, :k].any(axis=1).astype(np.float64)


def recall(hits: np.ndarray, n_relevant: np.ndarray, k: int) -> np.ndarray:
    """Recall@K (Rendle eq. 5): relevant items in the top ``k`` over all relevant items.

    Examples
    --------
    >>> recall(np.array([[True, False, True]]), np.array([4]), 3).tolist()
    [0.5]
    """
    n_relevant = _positive(n_relevant)
    return np.asarray(hits)[:, :k].sum(axis=1) / n_relevant


def recall_capped(hits: np.ndarray, n_relevant: np.ndarray, k: int) -> np.ndarray:
    """Recall@K normalized by ``min(k, |relevant|)`` (Liang et al., Mult-VAE).

    Unlike :func:`recall` it reaches 1.0 whenever the top ``k`` is all relevant, so users with
    many held-out items are not capped below 1.

    Examples
    --------
    >>> recall_capped(np.array([[True, True]]), np.array([4]), 2).tolist()
    [1.0]
    >>> recall_capped(np.array([[True, False, False]]), np.array([2]), 3).tolist()
    [0.5]
    """
    n_relevant = _positive(n_relevant)
    return np.asarray(hits)[:, :k].sum(axis=1) / np.minimum(k, n_relevant)


def ndcg(hits: np.ndarray, n_relevant: np.ndarray, k: int) -> np.ndarray:
    """NDCG@K (Rendle eq. 7) with binary gains and a 1/log2(rank + 1) discount.

    Examples
    --------
    >>> ndcg(np.array([[True, False]]), np.array([1]), 2).tolist()
    [1.0]
    >>> round(float(ndcg(np.array([[False, True]]), np.array([1]), 2)[0]), 4)
    0.6309
    """
    hits = np.asarray(hits)[:, :k]
    n_relevant = _positive(n_relevant)
    discounts = 1.0 / np.log2(np.arange(2, hits.shape[1] + 2))
    dcg = hits @ discounts
    ideal = np.r_[0.0, np.cumsum(discounts)][np.minimum(n_relevant, hits.shape[1])]
    return dcg / ideal


def reciprocal_rank_at(hits: np.ndarray, k: int) -> np.ndarray:
    """1 / rank of the first relevant item within the top ``k``; 0.0 when there is none (MRR@K).

    Examples
    --------
    >>> reciprocal_rank_at(np.array([[False, False, True], [False, False, False]]), 3).tolist()
    [0.3333333333333333, 0.0]
    """
    hits = np.asarray(hits)[:, :k]
    first = hits.argmax(axis=1)
    return np.where(hits.any(axis=1), 1.0 / (first + 1.0), 0.0)


def reciprocal_rank(scores: np.ndarray, relevant: np.ndarray,
                    candidates: np.ndarray) -> np.ndarray:
    """1 / full-ranking rank of the best relevant item among the candidates (MRR term).

    The rank is 1 + the number of non-relevant candidates scored higher + half of those scored
    equal (ties counted at their expected position, so constant scores are not rewarded).
    Relevant items outside ``candidates`` cannot be recommended: a user with none inside gets 0.

    Parameters
    ----------
    scores : ndarray of shape (n_users, n_items)
    relevant, candidates : ndarray of bool, shape (n_users, n_items)

    Examples
    --------
    >>> s = np.array([[0.9, 0.5, 0.7, 0.1]])
    >>> reciprocal_rank(s, np.array([[False, True, False, False]]), np.ones((1, 4), bool)).tolist()
    [0.3333333333333333]
    """
    scores, relevant, candidates = _score_inputs(scores, relevant, candidates)
    relevant = relevant & candidates
    negatives = candidates & ~relevant
    best = np.where(relevant, scores, -np.inf).max(axis=1, keepdims=True)
    above = (negatives & (scores > best)).sum(axis=1)
    tied = (negatives & (scores == best)).sum(axis=1)
    rank = 1.0 + above + 0.5 * tied
    return np.where(relevant.any(axis=1), 1.0 / rank, 0.0)


def auc(scores: np.ndarray, relevant: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """AUC (Rendle eq. 8): the chance a relevant item outranks a non-relevant candidate.

    Pairs are (relevant item, non-relevant candidate); a tie counts 1/2, and a relevant item
    that is not a candidate (it was excluded, so it can never be shown) wins no pair.

    Parameters
    ----------
    scores : ndarray of shape (n_users, n_items)
    relevant, candidates : ndarray of bool, shape (n_users, n_items)
        Every user needs at least one relevant item and one non-relevant candidate.

    Examples
    --------
    >>> s = np.array([[0.9, 0.5, 0.7, 0.1]])
    >>> auc(s, np.array([[False, True, False, False]]), np.ones((1, 4), bool)).tolist()
    [0.3333333333333333]
    >>> auc(s, np.array([[True, True, False, False]]), np.ones((1, 4), bool)).tolist()
    [0.75]
    """
    scores, relevant, candidates = _score_inputs(scores, relevant, candidates)
    n_relevant = _positive(relevant.sum(axis=1))
    negatives = candidates & ~relevant
    n_negatives = negatives.sum(axis=1)
    if np.any(n_negatives == 0):
        raise ValueError("every user needs a non-relevant candidate for AUC")
    winners = relevant & candidates
    if winners.sum(axis=1).max(initial=0) <= 1:
        wins = _single_relevant_wins(scores, winners, negatives)
    else:
        wins = _sorted_wins(scores, winners, negatives)
    return wins / (n_relevant * n_negatives)


def _single_relevant_wins(scores, winners, negatives) -> np.ndarray:
    """Won pairs when each user has at most one rankable relevant item: O(n_items) per user."""
    target = np.where(winners, scores, -np.inf).max(axis=1, keepdims=True)
    below = (negatives & (scores < target)).sum(axis=1)
    tied = (negatives & (scores == target)).sum(axis=1)
    return np.where(winners.any(axis=1), below + 0.5 * tied, 0.0)


def _sorted_wins(scores, winners, negatives) -> np.ndarray:
    """Won pairs for any number of relevant items: sort each row once, count negatives below
    every tie group with a cumulative sum (Mann–Whitney U), O(n_items log n_items) per user."""
    order = np.argsort(scores, axis=1, kind="stable")
    ordered = np.take_along_axis(scores, order, 1)
    neg = np.take_along_axis(negatives, order, 1).astype(np.int64)
    win = np.take_along_axis(winners, order, 1)
    n_items = scores.shape[1]
    position = np.arange(n_items)
    starts = np.ones(ordered.shape, dtype=bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    ends = np.ones(ordered.shape, dtype=bool)
    ends[:, :-1] = starts[:, 1:]
    group_start = np.maximum.accumulate(np.where(starts, position, 0), axis=1)
    group_end = np.minimum.accumulate(np.where(ends, position, n_items - 1)[:, ::-1],
                                      axis=1)[:, ::-1]
    cumulative = np.cumsum(neg, axis=1)
    below = np.take_along_axis(cumulative - neg, group_start, 1)
    tied = np.take_along_axis(cumulative, group_end, 1) - below
    return np.where(win, below + 0.5 * tied, 0.0).sum(axis=1)


def _score_inputs(scores, relevant, candidates):
    scores = np.asarray(scores, dtype=np.float64)
    relevant = np.asarray(relevant, dtype=bool)
    candidates = np.asarray(candidates, dtype=bool)
    if not scores.shape == relevant.shape == candidates.shape:
        raise ValueError("scores, relevant and candidates must have the same shape")
    return scores, relevant, candidates


def _positive(n_relevant) -> np.ndarray:
    """Per-user relevant counts; a user with none has no defined recall or NDCG, so refuse."""
    n_relevant = np.asarray(n_relevant)
    if np.any(n_relevant < 1):
        raise ValueError("every user needs at least one relevant item")
    return n_relevant
