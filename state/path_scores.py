"""Deep Retrieval state: decayed top-S path scores per item and the path → items inverted index.

Paths are int64 codes, ``code = Σ_d c_d · K^(D-1-d)`` (see
:func:`models.deep_retrieval.encode_paths`); ``-1`` marks an empty slot everywhere.

:class:`PathScoreTracker` estimates s[v, c] = Σ_{i: y_i = v} p(c | x_i) in one pass over the
stream (DR §3, "Remark on estimating s[v,c] with streaming training"), keeping only the S largest
paths per item, in the spirit of Metwally et al.'s space-saving counter. :class:`PathIndex` is the
immutable item ↔ path map the M-step produces; it is built aside and swapped in, never edited.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EMPTY = -1


def merge_top_s(old_codes: np.ndarray, old_scores: np.ndarray, new_codes: np.ndarray,
                new_scores: np.ndarray, eta: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One streaming update of an item's recorded path list (the paper's rules 1–4).

    ``old_codes``/``old_scores`` is the recorded list (``-1`` = empty slot), ``new_codes``/
    ``new_scores`` the list s'[v, c'] from one new training pair. With ``min_score`` the smallest
    recorded score: a path in both lists gets η s + s' (a), one only in the new list gets
    η · min_score + s' (b), one only in the old list gets η s (c); the ``size`` largest survive (4).

    ``min_score`` is 0 while the list has fewer than ``size`` recorded paths. Rule (b) credits a
    new path with ``min_score`` because a full list may have evicted it earlier with at most that
    score (space-saving's overestimate); a list that was never full has evicted nothing, so the
    path's true past score is 0. Ties keep the smaller code, so results are deterministic.
    Duplicate codes in ``new_codes`` are summed (beam search never produces any); ``-1`` in it
    is an empty slot and ignored.

    Returns the new ``(codes, scores)`` of length ``size``, best first, padded with ``-1``/0.

    >>> codes, scores = merge_top_s(np.array([5, 7]), np.array([2.0, 1.0]),
    ...                             np.array([7, 9]), np.array([0.5, 0.25]), 1.0, 2)
    >>> codes.tolist(), scores.tolist()
    ([5, 7], [2.0, 1.5])
    """
    keep = old_codes >= 0
    old_c, old_s = old_codes[keep], old_scores[keep]
    given = new_codes >= 0  # an empty slot in the new list is no path
    new_codes, new_scores = new_codes[given], new_scores[given]
    min_score = float(old_s.min()) if old_c.size >= size else 0.0
    fresh = ~np.isin(new_codes, old_c)
    new_vals = new_scores + np.where(fresh, eta * min_score, 0.0)
    union, inverse = np.unique(np.concatenate([old_c, new_codes]), return_inverse=True)
    summed = np.bincount(inverse, weights=np.concatenate([eta * old_s, new_vals]),
                         minlength=union.size)
    order = np.lexsort((union, -summed))[:size]
    codes = np.full(size, EMPTY, dtype=np.int64)
    scores = np.zeros(size, dtype=np.float64)
    codes[:order.size] = union[order]
    scores[:order.size] = summed[order]
    return codes, scores


def merge_rows(old_codes: np.ndarray, old_scores: np.ndarray, new_codes: np.ndarray,
               new_scores: np.ndarray, eta: float) -> tuple[np.ndarray, np.ndarray]:
    """:func:`merge_top_s` for many items at once: (R, S) old lists, (R, S') new lists without
    repeated codes, the same four rules and tie order; returns the (R, S) new lists."""
    size = old_codes.shape[1]
    valid_old = old_codes >= 0
    full = valid_old.all(axis=1)
    lowest = np.where(valid_old, old_scores, np.inf).min(axis=1)
    min_score = np.where(full, lowest, 0.0)
    valid_new = new_codes >= 0
    match = (new_codes[:, :, None] == old_codes[:, None, :]) & valid_new[:, :, None]
    in_old = match.any(axis=2)
    new_vals = new_scores + np.where(in_old, 0.0, eta * min_score[:, None])
    old_vals = eta * old_scores + np.einsum("rn,rno->ro", np.where(in_old, new_vals, 0.0), match)
    union_codes = np.concatenate([old_codes, new_codes], axis=1)
    union_vals = np.concatenate([np.where(valid_old, old_vals, -np.inf),
                                 np.where(valid_new & ~in_old, new_vals, -np.inf)], axis=1)
    row_ids = np.repeat(np.arange(len(union_codes)), union_codes.shape[1])
    order = np.lexsort((union_codes.ravel(), -union_vals.ravel(), row_ids))
    order = order.reshape(union_codes.shape)[:, :size] % union_codes.shape[1]
    codes = np.take_along_axis(union_codes, order, axis=1)
    scores = np.take_along_axis(union_vals, order, axis=1)
    empty = ~np.isfinite(scores)
    return np.where(empty, EMPTY, codes), np.where(empty, 0.0, scores)


def merge_list(old_codes: list, old_scores: list, new_codes: list, new_scores: list,
               eta: float, size: int) -> tuple[list, list]:
    """:func:`merge_top_s` on Python lists, for one short list at a time: the same rules, tie
    order and float operations (so the same bits), without numpy's per-call cost.

    >>> merge_list([5, 7], [2.0, 1.0], [7, 9], [0.5, 0.25], 1.0, 2)
    ([5, 7], [2.0, 1.5])
    """
    kept = [(c, s) for c, s in zip(old_codes, old_scores) if c >= 0]
    credit = eta * min(s for _, s in kept) if len(kept) >= size else 0.0
    merged = {c: eta * s for c, s in kept}
    for c, s in zip(new_codes, new_scores):
        if c < 0:
            continue
        merged[c] = merged[c] + s if c in merged else s + credit
    best = sorted(merged.items(), key=lambda item: (-item[1], item[0]))[:size]
    pad = size - len(best)
    return [c for c, _ in best] + [EMPTY] * pad, [s for _, s in best] + [0.0] * pad


def _rounds(rows: np.ndarray) -> list[np.ndarray]:
    """Positions of ``rows`` grouped so that round k holds each row's k-th occurrence."""
    order = np.argsort(rows, kind="stable")
    sorted_rows = rows[order]
    starts = np.r_[0, np.flatnonzero(sorted_rows[1:] != sorted_rows[:-1]) + 1]
    occurrence = np.arange(len(rows)) - np.repeat(starts, np.diff(np.r_[starts, len(rows)]))
    rank = np.empty(len(rows), dtype=np.int64)
    rank[order] = occurrence
    return [np.flatnonzero(rank == k) for k in range(int(rank.max(initial=-1)) + 1)]


class PathScoreTracker:
    """Per-item top-S path lists as two growing arrays, rows = items.

    ``codes`` is (n, S) int64 with ``-1`` for empty slots and ``scores`` (n, S) float64, each row
    sorted best first. The arrays handed out are views of the first ``n`` rows; an update writes
    whole rows, so a reader sees either the old or the new list of an item.
    """

    #: A round of :meth:`update_many` with fewer rows than this, and every later round (they
    #: only get smaller), is merged pair by pair in Python: numpy's fixed cost per call is
    #: most of a small round's merge, and a popular item repeated in a batch makes one round
    #: per repetition.
    vector_round_min = 8

    def __init__(self, top_s: int, decay: float, capacity: int = 1024) -> None:
        if top_s < 1:
            raise ValueError("top_s must be >= 1")
        if not 0.0 < decay <= 1.0:
            raise ValueError("decay must be in (0, 1]")
        self.top_s = top_s
        self.decay = decay
        self._n = 0
        self._codes = np.full((max(capacity, 1), top_s), EMPTY, dtype=np.int64)
        self._scores = np.zeros((max(capacity, 1), top_s), dtype=np.float64)

    @property
    def n(self) -> int:
        return self._n

    @property
    def codes(self) -> np.ndarray:
        return self._codes[:self._n]

    @property
    def scores(self) -> np.ndarray:
        return self._scores[:self._n]

    def grow(self, n: int) -> None:
        """Make rows ``0..n-1`` exist (new rows empty); doubling keeps appends amortized O(1)."""
        if n <= self._n:
            return
        if n > len(self._codes):
            cap = max(n, 2 * len(self._codes))
            codes = np.full((cap, self.top_s), EMPTY, dtype=np.int64)
            scores = np.zeros((cap, self.top_s), dtype=np.float64)
            codes[:self._n] = self._codes[:self._n]
            scores[:self._n] = self._scores[:self._n]
            self._codes, self._scores = codes, scores
        self._n = n

    def update(self, row: int, new_codes: np.ndarray, new_scores: np.ndarray) -> None:
        """Merge the list s'[v, c'] of one training pair of item ``row`` (:func:`merge_top_s`)."""
        if not 0 <= row < self._n:
            raise IndexError(f"row {row} outside 0..{self._n - 1}")
        codes, scores = merge_top_s(self._codes[row], self._scores[row],
                                    np.asarray(new_codes, dtype=np.int64),
                                    np.asarray(new_scores, dtype=np.float64),
                                    self.decay, self.top_s)
        self._codes[row], self._scores[row] = codes, scores

    def update_many(self, rows: np.ndarray, codes: np.ndarray, scores: np.ndarray) -> None:
        """:meth:`update` for each pair in order; a row repeated in a batch sees both pairs.

        Vectorized: the pairs are taken in rounds (each row's first pair, then each row's
        second, …) and a round merges all its rows at once (:func:`merge_rows`), which is the
        same as the pairs one by one because a round never holds a row twice. Lists with a
        repeated code (never from a beam search) take the one-by-one path."""
        rows = np.asarray(rows, dtype=np.int64)
        if not len(rows):
            return
        codes = np.asarray(codes, dtype=np.int64).reshape(len(rows), -1)
        scores = np.asarray(scores, dtype=np.float64).reshape(len(rows), -1)
        if rows.min() < 0 or rows.max() >= self._n:
            raise IndexError(f"rows outside 0..{self._n - 1}")
        ordered = np.sort(codes, axis=1)
        if ((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)).any():
            for row, c, s in zip(rows.tolist(), codes, scores):
                self.update(row, c, s)
            return
        rounds = _rounds(rows)
        for k, round_ in enumerate(rounds):
            if len(round_) < self.vector_round_min:
                self._merge_in_python(rows, codes, scores, np.concatenate(rounds[k:]))
                return
            r = rows[round_]
            self._codes[r], self._scores[r] = merge_rows(
                self._codes[r], self._scores[r], codes[round_], scores[round_], self.decay)

    def _merge_in_python(self, rows: np.ndarray, codes: np.ndarray, scores: np.ndarray,
                         positions: np.ndarray) -> None:
        """Merge the pairs at ``positions`` in their order, one row at a time (:func:`merge_list`)."""
        positions = np.sort(positions)
        positions = positions[np.argsort(rows[positions], kind="stable")]
        pairs = zip(rows[positions].tolist(), codes[positions].tolist(), scores[positions].tolist())
        row_now, list_codes, list_scores = -1, [], []
        for row, new_codes, new_scores in pairs:
            if row != row_now:
                if row_now >= 0:
                    self._codes[row_now], self._scores[row_now] = list_codes, list_scores
                row_now = row
                list_codes, list_scores = self._codes[row].tolist(), self._scores[row].tolist()
            list_codes, list_scores = merge_list(list_codes, list_scores, new_codes, new_scores,
                                                 self.decay, self.top_s)
        if row_now >= 0:
            self._codes[row_now], self._scores[row_now] = list_codes, list_scores

    def load_arrays(self, codes: np.ndarray, scores: np.ndarray) -> None:
        """Replace the whole state (used by checkpoint loading)."""
        if codes.shape != scores.shape or codes.ndim != 2 or codes.shape[1] != self.top_s:
            raise ValueError("codes and scores must both be (n, top_s)")
        self._n = 0
        self.grow(len(codes))
        self._codes[:self._n] = codes
        self._scores[:self._n] = scores
        # rows past the loaded ones are the next items' and must start empty (grow keeps
        # the arrays it has: a load onto a longer state left another item's scores there)
        self._codes[self._n:] = EMPTY
        self._scores[self._n:] = 0.0


@dataclass(frozen=True)
class PathIndex:
    """Immutable item → paths (n, J) map and its path → items inverted index (CSR over codes).

    ``paths`` are the distinct nonempty path codes, sorted; items on ``paths[k]`` are
    ``items[offsets[k]:offsets[k + 1]]`` (item rows, ascending). An item listed twice on one path
    in ``assignment`` is on it once.
    """

    assignment: np.ndarray
    paths: np.ndarray
    offsets: np.ndarray
    items: np.ndarray

    @classmethod
    def build(cls, assignment: np.ndarray) -> PathIndex:
        """Index an (n, J) int64 assignment (``-1`` = no path) in O(nJ log nJ)."""
        assignment = np.array(assignment, dtype=np.int64, copy=True)
        if assignment.ndim != 2:
            raise ValueError("assignment must be (n, J)")
        rows = np.repeat(np.arange(len(assignment), dtype=np.int64), assignment.shape[1])
        codes = assignment.ravel()
        keep = codes >= 0
        rows, codes = rows[keep], codes[keep]
        order = np.lexsort((rows, codes))
        rows, codes = rows[order], codes[order]
        first = np.ones(codes.size, dtype=bool)
        first[1:] = (codes[1:] != codes[:-1]) | (rows[1:] != rows[:-1])
        rows, codes = rows[first], codes[first]
        paths, counts = np.unique(codes, return_counts=True)
        offsets = np.zeros(paths.size + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        for array in (assignment, paths, offsets, rows):
            array.setflags(write=False)
        return cls(assignment, paths, offsets, rows)

    @property
    def sizes(self) -> np.ndarray:
        """Items per nonempty path, aligned with ``paths``."""
        return np.diff(self.offsets)

    @property
    def largest_path(self) -> int:
        return int(self.sizes.max()) if self.paths.size else 0

    @property
    def nonempty_paths(self) -> int:
        return int(self.paths.size)

    def spans(self, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Start in ``items`` and size of each of ``codes``; unknown codes (and ``-1``) have
        size 0. One searchsorted."""
        codes = np.asarray(codes, dtype=np.int64).ravel()
        if self.paths.size == 0:
            return np.zeros(codes.size, dtype=np.int64), np.zeros(codes.size, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self.paths, codes), self.paths.size - 1)
        found = self.paths[pos] == codes
        starts = np.where(found, self.offsets[pos], 0)
        return starts, np.where(found, self.offsets[pos + 1] - starts, 0)

    def items_on(self, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Item rows on each of ``codes`` (concatenated in the order of ``codes``) and sizes.

        Unknown codes (and ``-1``) have size 0. Fully vectorized: a searchsorted and one gather.
        """
        starts, sizes = self.spans(codes)
        ends = np.cumsum(sizes)
        gather = np.arange(int(ends[-1]) if ends.size else 0, dtype=np.int64) \
            - np.repeat(ends - sizes, sizes) + np.repeat(starts, sizes)
        return self.items[gather], sizes
