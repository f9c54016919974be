"""The streaming model slot of the harness: anything that learns from batches of events in stream
order and ranks items for history rows.

``OnlinePopularity`` fills the slot for now with the engine's own state, the decayed popularity of
:mod:`state.popularity`, fed with the same kind weights and half-life the workers use. The
online embedding learner will drop in by implementing :class:`StreamingModel`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import scipy.sparse as sp

from state.popularity import DecayedPopularity

from .data import Events


@runtime_checkable
class StreamingModel(Protocol):
    """Learns online; ranks read-only.

    ``learn`` takes a batch of events in stream order (a batch of one is plain online
    learning). ``recommend`` has the batch baselines' signature: ``(rows, k)`` item indices for
    history rows, best first, nothing from ``exclude``, ``-1`` padding. A model may also offer
    ``score(history) -> (rows, n_items)``; the harness then reports the full-ranking metrics
    (MRR, AUC) for it as well.
    """

    name: str

    def learn(self, events: Events) -> None: ...

    def recommend(self, history: sp.csr_matrix, k: int,
                  exclude: sp.csr_matrix | None = None) -> np.ndarray: ...


class OnlinePopularity:
    """Decayed item popularity (the serving engine's model), learned event by event.

    The popularity ranking cache is refreshed on every read (``refresh_s=0``) and keyed on event
    time, so a replay is deterministic instead of depending on wall-clock timing.
    """

    name = "streaming"

    def __init__(self, n_items: int, half_life_s: float) -> None:
        self.n_items = n_items
        self.popularity = DecayedPopularity(half_life_s, refresh_s=0.0)
        self._keys = [str(item) for item in range(n_items)]
        self._learned = 0
        self._scores_at = -1
        self._scores = np.zeros(n_items)

    def learn(self, events: Events) -> None:
        for item, ts, weight in zip(events.items.tolist(), events.ts.tolist(),
                                    events.weights.tolist()):
            self.popularity.add(self._keys[item], ts, weight)
        self._learned += len(events)

    def recommend(self, history: sp.csr_matrix, k: int,
                  exclude: sp.csr_matrix | None = None) -> np.ndarray:
        ranked = np.full((history.shape[0], min(k, self.n_items)), -1, dtype=np.int64)
        for row in range(history.shape[0]):
            seen = () if exclude is None else \
                [self._keys[i] for i in exclude.indices[exclude.indptr[row]:exclude.indptr[row + 1]]]
            top = [int(item) for item, _ in self.popularity.top(k, exclude=seen)]
            ranked[row, :len(top)] = top
        return ranked

    def score(self, history: sp.csr_matrix) -> np.ndarray:
        """Current decayed counts, the same for every row (popularity reads no history)."""
        if self._scores_at != self._learned:
            self._scores = np.array([self.popularity.count(key) for key in self._keys])
            self._scores_at = self._learned
        return np.broadcast_to(self._scores, (history.shape[0], self.n_items)).copy()
