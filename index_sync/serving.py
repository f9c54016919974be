"""The item index as the responder sees it.

HNSW over the snapshot of the item vectors taken at the last rebuild, plus exact search over
the items that snapshot lacks (items first learned since), so a new item is retrievable from
its first training example, not only after the next rebuild. Candidates are ids only: the
responder scores every candidate once with the *current* vectors, so an index that is a
minute old still ranks by today's model; it can only miss an item whose vector moved into the
user's top since the snapshot.

Until the learner holds ``min_items`` items (and before the first build), retrieval is exact
search over all items: on a small catalog that is as fast and never wrong.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.learner import ItemLearner

from .hnsw import HnswParams
from .swap import IndexHolder, IndexRebuilder, RebuildPolicy, Snapshot
from .versions import ServedIndex

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IndexConfig:
    root: Path
    policy: RebuildPolicy = RebuildPolicy()
    params: HnswParams = HnswParams()
    enabled: bool = True
    seed: int = 0


class ServingIndex:
    """Retrieval for one learner: the serving HNSW version, exact search for what it lacks."""

    def __init__(self, learner: ItemLearner, config: IndexConfig) -> None:
        self.learner = learner
        self.config = config
        self.holder = IndexHolder()
        self.rebuilder = IndexRebuilder(config.root, self.holder, config.policy, config.params,
                                        config.seed)
        self._changed: set[str] = set()
        self._coverage: dict[int, tuple[np.ndarray, int]] = {}

    # -- keeping it fresh ------------------------------------------------------------------
    def learned(self, item_ids: Sequence[str]) -> None:
        """Note items whose vectors changed (a learning step)."""
        if self.config.enabled:
            self._changed.update(item_ids)

    def load_existing(self) -> bool:
        return self.config.enabled and self.rebuilder.load_existing()

    def maybe_rebuild(self, model_version: int) -> bool:
        """Start a build aside when the policy says so; call it on the learner's own thread
        (the snapshot is a copy taken here, the build never touches the live learner)."""
        if not self.config.enabled or not self.rebuilder.due(len(self._changed),
                                                             len(self.learner)):
            return False
        snapshot = Snapshot(self.learner.item_ids, self.learner.item_matrix.copy(),
                            model_version)
        self._changed.clear()
        self.rebuilder.submit(snapshot)
        return True

    @property
    def version(self) -> int | None:
        return self.holder.version

    @property
    def current(self) -> ServedIndex | None:
        index = self.holder.current
        return index if self.config.enabled else None

    # -- retrieval -------------------------------------------------------------------------
    def retrieve(self, query: np.ndarray, n: int, exclude: Collection[str] = (), *,
                 diversity: float | None = None,
                 history: Sequence[str] = ()) -> tuple[list[str], int | None]:
        """Up to ``n`` candidate item ids for the augmented query, none of ``exclude``, and
        the index version they came from (None: exact search)."""
        index = self.current
        if index is None:
            return [item for item, _ in self.learner.top_k(query[:-1], n, exclude)], None
        found = [item for item, _ in index.search(query, n, exclude, diversity=diversity,
                                                   history=history)]
        return found + self._fresh(index, query, n, exclude), index.version

    def _fresh(self, index: ServedIndex, query: np.ndarray, n: int,
               exclude: Collection[str]) -> list[str]:
        """The best ``n`` of the learner's items that ``index`` does not hold, exactly."""
        rows = self._rows_missing_from(index)
        if len(rows) == 0:
            return []
        scores = self.learner.item_matrix[rows] @ query
        order = rows[np.argsort(-scores, kind="stable")]
        ids = self.learner.item_ids_at(order[: n + len(exclude)])
        return [item for item in ids if item not in exclude][:n]

    def _rows_missing_from(self, index: ServedIndex) -> np.ndarray:
        """Learner rows the index lacks. Rows are only ever appended, so once the rows up to
        ``covered`` are checked (once per index version), every later row is missing too."""
        known = self._coverage.get(index.version)
        if known is None:
            ids = self.learner.item_ids
            count = len(index)
            if ids[:count] == index.ids:  # built from a snapshot of this learner
                known = (np.empty(0, dtype=np.int64), count)
            else:  # loaded from disk, or clustered (ids in cluster order)
                known = (np.array([row for row, item in enumerate(ids) if item not in index],
                                  dtype=np.int64), len(ids))
            self._coverage[index.version] = known
            for old in [v for v in self._coverage if v < index.version]:
                del self._coverage[old]
        missing, covered = known
        return np.concatenate([missing, np.arange(covered, len(self.learner), dtype=np.int64)])

    # -- scrape-time statistics ------------------------------------------------------------
    def stats(self, now: float) -> dict[str, float]:
        index = self.holder.current
        return {
            "version": float(index.version) if index else 0.0,
            "items": float(len(index)) if index else 0.0,
            "build_seconds": self.rebuilder.last_build_seconds,
            "age_seconds": now - index.manifest.created_at if index else 0.0,
            "swaps": float(self.holder.swaps),
            "failures": float(self.rebuilder.failures),
        }

    def close(self) -> None:
        self.rebuilder.close(wait=False)
