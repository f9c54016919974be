"""Choosing how requests are answered, from the stream itself.

Two serving settings shape an answer without changing what was learned: how fast the user
vector forgets older events (``half_life_events``) and how much the item bias, the
popularity part of the score, counts (``bias_weight``, the query [φ, w]). Which values answer
best depends on the product: measured on validation folds (docs/results.md), the Amazon sets
rank their next item best from the last event or two with the bias nearly off, MovieLens's
held-out users need the bias at full weight. A worker cannot be handed validation folds, but
its stream is one: every training example is a user's history *before* an event together with
the item the user then took, learned only after it has been ranked. So a sample of the
examples is ranked under every candidate setting before learning (prequential evaluation), an
exponentially weighted NDCG@k is kept per candidate, and answers use the best one.

- :func:`target_ranks`: the rank of the taken item under several queries at once.
- :func:`ndcg_of_ranks`: NDCG@k of one relevant item at those ranks.
- :class:`ServingChoice`: the weighted means and the pick.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import numpy as np


class ServingCandidate(NamedTuple):
    half_life_events: float | None  # None: every event of the history counts the same
    bias_weight: float


def candidate_grid(own: ServingCandidate, half_lives, bias_weights) -> list[ServingCandidate]:
    """``own`` first (the pick until enough is measured), then every other pair.

    Examples
    --------
    >>> candidate_grid(ServingCandidate(1.0, 1.0), (1.0, 3.0), (1.0, 0.0))
    [ServingCandidate(half_life_events=1.0, bias_weight=1.0), \
ServingCandidate(half_life_events=1.0, bias_weight=0.0), \
ServingCandidate(half_life_events=3.0, bias_weight=1.0), \
ServingCandidate(half_life_events=3.0, bias_weight=0.0)]
    """
    others = (ServingCandidate(h, w) for h, w in itertools.product(half_lives, bias_weights))
    return [own, *dict.fromkeys(c for c in others if c != own)]


def target_ranks(queries: np.ndarray, items: np.ndarray, target: int,
                 excluded: np.ndarray) -> np.ndarray:
    """For each query row, how many items score at least as high as row ``target`` of
    ``items`` (0: the target is first), not counting the ``excluded`` rows (the user's
    history, which answers leave out) or the target itself. Ties count against the target,
    so a query that scores everything alike ranks it last, never first.

    Examples
    --------
    >>> items = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]])
    >>> target_ranks(np.array([[1.0, 0.0], [0.0, 1.0]]), items, 0, np.array([2])).tolist()
    [0, 1]
    """
    scores = items @ np.asarray(queries).T  # (n, C)
    target_scores = scores[target].copy()
    scores[np.asarray(excluded, dtype=np.int64)] = -np.inf
    scores[target] = -np.inf
    return (scores >= target_scores).sum(axis=0)


def ndcg_of_ranks(ranks: np.ndarray, k: int) -> np.ndarray:
    """NDCG@k with one relevant item at 0-based ``ranks``: 1/log2(rank + 2) inside the top k.

    Examples
    --------
    >>> ndcg_of_ranks(np.array([0, 1, 10]), k=10).tolist()
    [1.0, 0.6309297535714575, 0.0]
    """
    ranks = np.asarray(ranks)
    return np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)


class ServingChoice:
    """Exponentially weighted NDCG@k of each candidate over the sampled events, and the pick.

    The weighted mean of candidate c after samples g_1 … g_t is
    Σ_s 2^(−(t−s)/h) g_s[c] / Σ_s 2^(−(t−s)/h), h = ``half_life_samples``: recent events
    count most, so the pick follows a product that changes. Until ``min_samples`` events are
    in, the first candidate (the configured setting) is the pick; after, the best mean (the
    first of equals)."""

    def __init__(self, candidates: list[ServingCandidate], *, half_life_samples: float = 1000.0,
                 min_samples: int = 200, k: int = 10) -> None:
        if not candidates:
            raise ValueError("at least one serving candidate is needed")
        self.candidates = list(candidates)
        self.decay = 2.0 ** (-1.0 / half_life_samples)
        self.min_samples = min_samples
        self.k = k
        self.sums = np.zeros(len(self.candidates))
        self.weight = 0.0
        self.samples = 0
        self._pick = 0  # index of the answering candidate; moves only with the means

    def observe(self, gains: np.ndarray) -> None:
        """Take in the NDCG of each candidate (columns) for a batch of sampled events (rows,
        oldest first)."""
        gains = np.asarray(gains, dtype=np.float64).reshape(-1, len(self.candidates))
        n = len(gains)
        ages = self.decay ** np.arange(n - 1, -1, -1, dtype=np.float64)
        self.sums = self.sums * self.decay ** n + ages @ gains
        self.weight = self.weight * self.decay ** n + ages.sum()
        self.samples += n
        self._choose()

    @property
    def means(self) -> np.ndarray:
        """The weighted NDCG@k of each candidate (zeros before any sample)."""
        return self.sums / self.weight if self.weight > 0 else np.zeros(len(self.candidates))

    @property
    def best(self) -> ServingCandidate:
        """The candidate that answers: read on every request, so kept, not recomputed."""
        return self.candidates[self._pick]

    @property
    def best_mean(self) -> float:
        """The weighted NDCG@k of :attr:`best` (0 before any sample)."""
        return float(self.means[self._pick])

    def _choose(self) -> None:
        self._pick = 0 if self.samples < self.min_samples else int(np.argmax(self.means))

    # -- checkpoints (plain arrays: no pickle) -------------------------------------------------
    def state(self) -> dict[str, np.ndarray]:
        half_lives = [np.nan if c.half_life_events is None else c.half_life_events
                      for c in self.candidates]
        return {"half_lives": np.array(half_lives), "bias_weights":
                np.array([c.bias_weight for c in self.candidates]),
                "sums": self.sums, "weight": np.array(self.weight),
                "samples": np.array(self.samples)}

    def restore(self, state: dict[str, np.ndarray]) -> bool:
        """Take saved means back when they were measured for the same candidates (a changed
        grid starts over); returns whether it did."""
        saved = [ServingCandidate(None if np.isnan(h) else float(h), float(w))
                 for h, w in zip(state["half_lives"], state["bias_weights"])]
        if saved != self.candidates:
            return False
        sums, weight = np.array(state["sums"], dtype=np.float64), float(state["weight"])
        self.sums, self.weight, self.samples = sums, weight, int(state["samples"])
        self._choose()
        return True
