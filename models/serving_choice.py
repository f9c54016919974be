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
exponentially weighted NDCG@k is kept per candidate, and answers use the best one once it is
clearly ahead of the one answering.

- :func:`target_ranks`: the rank of each example's item under its queries, many at once.
- :func:`pool_positions`: where a sorted item pool holds given rows (to leave them out).
- :func:`ndcg_of_ranks`: NDCG@k of one relevant item at those ranks.
- :class:`ServingChoice`: the weighted means and the pick.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
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


def candidates_of(state: dict[str, np.ndarray]) -> list[ServingCandidate]:
    """The candidates a saved state (:meth:`ServingChoice.state`) was measured for."""
    return [ServingCandidate(None if np.isnan(h) else float(h), float(w))
            for h, w in zip(state["half_lives"], state["bias_weights"])]


def target_ranks(phis: np.ndarray, pairs: Sequence[tuple[int, float]], items: np.ndarray,
                 excluded: Sequence[np.ndarray]) -> np.ndarray:
    """For several examples at once, how many pool items score at least as high as each
    example's own item under each of its queries (0: the item is first).

    A query is a user vector and a bias weight, [φ, w] against the item rows [v, b]:
    ``phis`` is (m, h, d), example j's user vector under each of h encodings, and ``pairs``
    the c queries as (encoding, bias weight). ``items`` is the pool (P rows) followed by the
    m examples' own items, in example order. Each user vector meets the items in one product
    and each weight only adds its share of the bias: the candidates share h vectors (two
    recency half-lives for eight queries at the defaults), and a product per query was most
    of this function's time. ``excluded[j]`` are the pool positions that example j does not
    count (its history and copies of its own item, which answers leave out). Ties
    count against the target, so a query that scores everything alike ranks it last.

    Examples
    --------
    >>> pool = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [2.0, 0.0, 0.0]])
    >>> items = np.vstack([pool, pool[:1]])  # one example, its item pool row 0
    >>> phis = np.array([[[1.0, 0.0], [0.0, 1.0]]])  # its two user vectors
    >>> target_ranks(phis, [(0, 1.0), (1, 1.0)], items, [np.array([0, 2])]).tolist()
    [[0, 1]]
    """
    m, h, d = phis.shape
    pool = len(items) - m
    scores = phis.reshape(m * h, d) @ items[:, :d].T  # (m h, P + m): row j h + a
    bias = items[:, d]
    examples = np.arange(m)
    owner = np.repeat(examples, [len(rows) for rows in excluded])
    positions = np.concatenate(excluded).astype(np.int64) if len(owner) else owner
    ranks = np.empty((m, len(pairs)), dtype=np.int64)
    for column, (encoding, weight) in enumerate(pairs):
        rows = scores[examples * h + encoding]  # (m, P + m)
        pooled = rows[:, :pool] + weight * bias[:pool] if weight else rows[:, :pool]
        own = rows[examples, pool + examples] + weight * bias[pool:]
        above = pooled >= own[:, None]
        above[owner, positions] = False
        ranks[:, column] = np.count_nonzero(above, axis=1)
    return ranks


def pool_positions(pool: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Every position of ``pool`` (sorted, repeats allowed) that holds one of ``rows``
    (distinct).

    Examples
    --------
    >>> pool_positions(np.array([0, 2, 2, 5, 7]), np.array([2, 7, 3])).tolist()
    [1, 2, 4]
    """
    start = np.searchsorted(pool, rows, side="left")
    counts = np.searchsorted(pool, rows, side="right") - start
    offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    return np.repeat(start, counts) + offsets


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
    in, the first candidate (the configured setting) is the pick.

    After, the answering candidate changes only for one whose mean beats it by more than
    ``margin_z`` standard errors of their paired difference (both are measured on the same
    events, so the difference's spread is far below either's). Why: an NDCG sample is 0 for
    most events, and near candidates trade places with every few samples; which of them the
    pick landed on then decided a tenth of the held-out NDCG on Toys (docs/results.md, "the
    serving pick holds until beaten"). ``margin_z = 0`` follows the best mean at every step.
    """

    def __init__(self, candidates: list[ServingCandidate], *, half_life_samples: float = 1000.0,
                 min_samples: int = 200, k: int = 10, margin_z: float = 0.0) -> None:
        if not candidates:
            raise ValueError("at least one serving candidate is needed")
        if margin_z < 0:
            raise ValueError(f"margin_z must be >= 0, got {margin_z}")
        self.candidates = list(candidates)
        self.decay = 2.0 ** (-1.0 / half_life_samples)
        self.min_samples = min_samples
        self.k = k
        self.margin_z = margin_z
        size = len(self.candidates)
        self.sums = np.zeros(size)
        self.products = np.zeros((size, size))  # Σ w g gᵀ: the paired differences' spread
        self.weight = 0.0
        self.weight_squares = 0.0  # Σ w²: the weighted mean's effective sample count
        self.samples = 0
        self.moves = 0  # times the answering candidate changed (since this object was made)
        self._pick = 0  # index of the answering candidate; moves only with the means

    def observe(self, gains: np.ndarray) -> None:
        """Take in the NDCG of each candidate (columns) for a batch of sampled events (rows,
        oldest first)."""
        gains = np.asarray(gains, dtype=np.float64).reshape(-1, len(self.candidates))
        n = len(gains)
        ages = self.decay ** np.arange(n - 1, -1, -1, dtype=np.float64)
        self.sums = self.sums * self.decay ** n + ages @ gains
        self.products = self.products * self.decay ** n + (gains.T * ages) @ gains
        self.weight = self.weight * self.decay ** n + ages.sum()
        self.weight_squares = self.weight_squares * self.decay ** (2 * n) + ages @ ages
        self.samples += n
        self._choose()

    @property
    def means(self) -> np.ndarray:
        """The weighted NDCG@k of each candidate (zeros before any sample)."""
        return self.sums / self.weight if self.weight > 0 else np.zeros(len(self.candidates))

    def margins(self, against: int) -> np.ndarray:
        """How many standard errors each candidate's mean lies above candidate ``against``'s
        (0 for itself; +inf for a higher mean measured with no spread at all).

        The paired difference d_s = g_s[c] − g_s[a] has weighted mean m and weighted
        variance v = Σ w d² / Σ w − m²; the weighted mean's standard error is
        √(v Σ w² / (Σ w)²)."""
        if self.weight <= 0:
            return np.zeros(len(self.candidates))
        second = self.products / self.weight
        diff = self.means - self.means[against]
        scale = np.diag(second) + second[against, against]
        spread = scale - 2.0 * second[:, against] - diff ** 2
        spread[spread <= 1e-12 * scale] = 0.0  # rounding of equal samples, not a spread
        error = np.sqrt(spread * self.weight_squares) / self.weight
        unbounded = np.where(diff > 0, np.inf, np.where(diff < 0, -np.inf, 0.0))
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(error > 0, diff / error, unbounded)

    @property
    def best(self) -> ServingCandidate:
        """The candidate that answers: read on every request, so kept, not recomputed."""
        return self.candidates[self._pick]

    @property
    def best_mean(self) -> float:
        """The weighted NDCG@k of :attr:`best` (0 before any sample)."""
        return float(self.means[self._pick])

    def pin(self, index: int) -> None:
        """Answer with candidate ``index`` until the next sample (benchmarks score each
        candidate's answers this way)."""
        self._pick = int(index)

    @property
    def lead(self) -> float:
        """Standard errors by which the best other candidate's mean lies above the answering
        one's (negative: below); it takes over past ``margin_z``. NaN with one candidate."""
        if len(self.candidates) < 2:
            return float("nan")
        margins = self.margins(self._pick)
        return float(np.max(np.delete(margins, self._pick)))

    def _choose(self) -> None:
        self._answer_with(self._chosen())

    def _chosen(self) -> int:
        if self.samples < self.min_samples:
            return 0
        means = self.means
        beaten_by = means[self._pick] < means
        if self.margin_z > 0:
            beaten_by &= self.margins(self._pick) > self.margin_z
        if beaten_by.any():  # the best of those that beat it, the first of equals
            return int(np.argmax(np.where(beaten_by, means, -np.inf)))
        return self._pick

    def _answer_with(self, index: int) -> None:
        self.moves += index != self._pick
        self._pick = index

    # -- checkpoints (plain arrays: no pickle) -------------------------------------------------
    def state(self) -> dict[str, np.ndarray]:
        half_lives = [np.nan if c.half_life_events is None else c.half_life_events
                      for c in self.candidates]
        return {"half_lives": np.array(half_lives), "bias_weights":
                np.array([c.bias_weight for c in self.candidates]),
                "sums": self.sums, "products": self.products, "weight": np.array(self.weight),
                "weight_squares": np.array(self.weight_squares),
                "samples": np.array(self.samples), "pick": np.array(self._pick)}

    def restore(self, state: dict[str, np.ndarray]) -> bool:
        """Take saved means and pick back when they were measured for the same candidates (a
        changed grid starts over, and so does a state saved before the pick kept the spread
        of its samples); returns whether it did."""
        if candidates_of(state) != self.candidates or "products" not in state:
            return False
        self.sums = np.array(state["sums"], dtype=np.float64)
        self.products = np.array(state["products"], dtype=np.float64)
        self.weight, self.weight_squares = float(state["weight"]), float(state["weight_squares"])
        self.samples = int(state["samples"])
        self._answer_with(int(state["pick"]))
        self._choose()
        return True
