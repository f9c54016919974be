"""The item index as the responder sees it.

HNSW over the snapshot of the item vectors taken at the last rebuild, plus exact search over
the items that snapshot lacks (items first learned since) and over the items whose vectors
moved since it (the most recent ``stale_limit`` of them), so a new item is retrievable from
its first training example and a moved one with its new vector, not only after the next
rebuild. The responder scores every candidate once with the *current* vectors. Measured:
answered from an index up to a minute old without the moved items, the worker's NDCG@10 on
Beauty was 0.0291; by exact search over everything, 0.0334 (docs/results.md).

Until the learner holds ``min_items`` items (and before the first build), retrieval is exact
search over all items: on a small catalog that is as fast and never wrong.
"""

from __future__ import annotations

import heapq
import itertools
import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from models.learner import ItemLearner
from models.metrics import top_k

from .clusters import ClusteredIndex
from .hnsw import HnswParams, ItemIndex
from .swap import IndexHolder, IndexRebuilder, RebuildPolicy, Snapshot
from .versions import ServedIndex

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Coverage:
    """Where an index's labels lie among the learner's rows.

    ``label_rows`` maps a label to its learner row (−1: an item the learner lacks), or is
    None when label = row: the index was built from a snapshot of this learner, whose rows
    are only ever appended. ``missing`` are learner rows below ``covered`` the index lacks;
    every row from ``covered`` on is missing too. ``unknown``: labels of items the learner
    lacks (a search asks for that many more, as it drops them).
    """

    label_rows: np.ndarray | None
    missing: np.ndarray
    covered: int
    unknown: int = 0

    @classmethod
    def of(cls, index: ServedIndex, learner: ItemLearner) -> _Coverage:
        ids = learner.item_ids
        single = isinstance(index, ItemIndex)
        source = index.ids if single else index.source_ids
        if source is not None and ids[:len(source)] == source:
            # built from a snapshot of this learner (a clustered one holds every id of it;
            # its answers come as ids, so it needs no label rows)
            return cls(None, np.empty(0, dtype=np.int64), len(source))
        # loaded from disk, or another learner's: one lookup per id (once per version)
        held = learner.rows_of(index.ids)
        present = np.zeros(len(ids), dtype=bool)
        present[held[held >= 0]] = True
        return cls(held if single else None, np.flatnonzero(~present), len(ids),
                   int((held < 0).sum()))


class _ExactBlock(NamedTuple):
    """The rows an index lacks or holds with moved vectors, and those vectors, as of ``key``
    (index version, learner step, learner size)."""

    key: tuple
    rows: np.ndarray
    vectors: np.ndarray


def _first_not_in(rows: np.ndarray, excluded: set[int], n: int) -> np.ndarray:
    """The first ``n`` of ``rows`` that are neither in ``excluded`` nor −1, in order."""
    kept = [row for row in rows.tolist() if row not in excluded and row >= 0]
    return np.array(kept[:n], dtype=np.int64)


@dataclass(frozen=True)
class IndexConfig:
    root: Path
    policy: RebuildPolicy = RebuildPolicy()
    params: HnswParams = HnswParams()
    enabled: bool = True
    seed: int = 0
    #: most moved items scored exactly beside the graph search (the most recently moved);
    #: their rows are gathered once per learner step, and the product with the query costs
    #: an answer about 0.1 ms at 4,096 (``stale`` in ``benchmarks/index_serving.py``)
    stale_limit: int = 4096


class _MovedRows:
    """Rows moved since index snapshots, each with the note (:meth:`ServingIndex.learned`)
    of its last move, oldest first (a row that moves again goes to the end), so that the
    rows moved since a snapshot are a suffix.

    Kept in two parts: the rows under ``below`` (the serving index holds them) and the rest.
    Only the first need scoring beside the index, up to ``stale_limit``; the rest are scored
    as appended rows. In one list, a burst of new items (a replay, a cold start) took every
    place, and the rows that moved went unscored; filtered as they are read, every answer
    after a step walked past all of them."""

    def __init__(self) -> None:
        self.held: dict[int, int] = {}
        self.beyond: dict[int, int] = {}
        self.below = 0

    def note(self, rows: Sequence[int], stamp: int) -> None:
        for row in rows:
            part = self.held if row < self.below else self.beyond
            part.pop(row, None)
            part[row] = stamp

    def split_at(self, below: int) -> None:
        """Split anew at ``below`` (another index serves), the note order kept."""
        if below == self.below:
            return
        held: dict[int, int] = {}
        beyond: dict[int, int] = {}
        for row, stamp in heapq.merge(self.held.items(), self.beyond.items(),
                                      key=lambda move: move[1]):
            (held if row < below else beyond)[row] = stamp
        self.held, self.beyond, self.below = held, beyond, below

    def forget_until(self, mark: int) -> None:
        """Forget the moves of notes up to ``mark`` (a snapshot holds them)."""
        for part in (self.held, self.beyond):
            while part:
                oldest = next(iter(part))
                if part[oldest] > mark:
                    break
                del part[oldest]

    def held_after(self, mark: int) -> Iterator[int]:
        """Rows under ``below`` moved after the note ``mark``, newest move first."""
        moves = itertools.takewhile(lambda move: move[1] > mark, reversed(self.held.items()))
        return (row for row, _ in moves)


class ServingIndex:
    """Retrieval for one learner: the serving HNSW version, exact search for what it lacks."""

    def __init__(self, learner: ItemLearner, config: IndexConfig) -> None:
        self.learner = learner
        self.config = config
        self.holder = IndexHolder()
        self.rebuilder = IndexRebuilder(config.root, self.holder, config.policy, config.params,
                                        config.seed)
        self._changed: set[str] = set()
        # the build under way, and the items it took as changed: given back if it fails, or
        # a quiet stream would never make another due, though the index overflows
        self._building: tuple[Future, set[str]] | None = None
        self._coverage: dict[int, _Coverage] = {}
        self._moved = _MovedRows()
        self._moves = 0  # notes so far: the stamp of the last
        self._exact: _ExactBlock | None = None
        self._appended_scored = 0  # rows appended since the serving index, at the last answer
        self.filled_answers = 0  # answers whose search came back short, filled exactly
        # a version loaded at start: the moves since its snapshot were not kept, so builds
        # are from scratch (not updates of it), and due at the first check, until one of them
        # replaces it (one that fails leaves it serving)
        self._loaded_at_start: ServedIndex | None = None

    # -- keeping it fresh ------------------------------------------------------------------
    def learned(self, item_ids: Sequence[str], moved_rows: Sequence[int] = ()) -> None:
        """Note a learning step, or rows set without one (another worker's, installed): the
        items (for the rebuild policy) and every learner row whose vector moved, scored
        exactly until an index holds them. Moves are stamped with their note's number, not
        the learner's step: installs leave the step as it is, and a version loaded at start
        may come from steps a crash lost (written after the checkpoint the learner restarted
        from), which the learner reaches again with other rows."""
        if not self.config.enabled:
            return
        self._changed.update(item_ids)
        self._moves += 1
        self._moved.note(np.asarray(moved_rows, dtype=np.int64).tolist(), self._moves)

    def load_existing(self) -> bool:
        """Serve the newest version on disk that fits the learner's rows (at start). It was
        built from a snapshot of another moment than the checkpoint the learner loaded, and
        which rows moved in between was not kept: it serves until a build from scratch,
        which is due at once; every row moved since the load is scored exactly beside it."""
        if not (self.config.enabled
                and self.rebuilder.load_existing(self.learner.item_matrix.shape[1])):
            return False
        self._loaded_at_start = self.holder.current
        self.holder.current.snapshot_mark = self._moves  # every move from now on is newer
        return True

    @property
    def _rebuild_all(self) -> bool:
        """Whether the index serving is the version read at start (:meth:`load_existing`).
        Once another replaced it, the version read at start is let go (its graph, ids and
        positions: 100 MB at 200,000 items)."""
        if self._loaded_at_start is not None and self.holder.current is not self._loaded_at_start:
            self._loaded_at_start = None
        return self._loaded_at_start is not None

    def _snapshot_mark(self, index: ServedIndex) -> int:
        """The last note of moved rows that ``index``'s snapshot holds: the one a build of
        this engine's took its snapshot at (``Snapshot.mark``), the last before the load of a
        version read at start, else (one set in place by hand) the last before it was first
        asked for here."""
        if index.snapshot_mark is None:
            index.snapshot_mark = self._moves
        return index.snapshot_mark

    def maybe_rebuild(self, model_version: int, behind: int = 0) -> bool:
        """Start a build aside when the policy says so; call it on the thread that moves the
        learner's rows.

        The build reads the live rows (a read-only view, not a copy): a copy ran on the event
        loop and stalled it for a second at a million items (0.5 GB). A row that moves while
        the build reads it goes in as old, new or in between, which costs nothing: it moved
        after the snapshot's mark (:meth:`_snapshot_mark`), so it is searched exactly beside
        this build until a later one holds it. A view stays valid when the learner reallocates
        its rows (it keeps the old buffer), and ids are copied here, so the build never sees a
        row without its id.
        ``behind``: events the worker has yet to take in (``RebuildPolicy.backlog_events``)."""
        # with no index, or the one read at start, every item counts as changed and a build
        # is due at once, whatever the interval and the count (after ``streamrec bootstrap``
        # answers scanned the whole catalogue until a first item was learned, then the
        # interval passed); the moves since the version read at start were not kept
        self._after_build()
        unindexed = self.holder.current is None or self._rebuild_all
        changed = max(len(self._changed), len(self.learner)) if unindexed else len(self._changed)
        if not self.config.enabled or not self.rebuilder.due(
                changed, len(self.learner), behind=behind,
                overflowing=unindexed or self._overflowing()):
            return False
        plan = (None, None) if self._rebuild_all else self._update_plan()
        snapshot = Snapshot(self.learner.item_ids, self.learner.item_matrix, model_version,
                            *plan, mark=self._moves)
        self._building = (self.rebuilder.submit(snapshot), self._changed)
        self._changed = set()
        return True

    def _after_build(self) -> None:
        """Take the changed items of a build that ended without a version back."""
        if self._building is None or not self._building[0].done():
            return
        build, changed = self._building
        self._building = None
        if build.exception() is not None or build.result() is None:
            self._changed |= changed

    def _overflowing(self) -> bool:
        """More rows moved since the serving version's snapshot than answers score exactly
        beside it (``stale_limit``): the rest are found only by their snapshot vectors. Or
        more rows missing from it than that, new rows and moved ones together: every answer
        scores them all (a cold replay at a million items adds hundreds of thousands between
        builds). Counts at most ``stale_limit`` + 1 moves, so a check costs the same at any
        catalog size."""
        index = self.holder.current
        if index is None:
            return False
        coverage = self._coverage_of(index)
        room = self.config.stale_limit - len(coverage.missing) - (len(self.learner)
                                                                 - coverage.covered)
        if room < 0:
            return True
        moved = itertools.islice(self._moved_after(self._snapshot_mark(index), index), room + 1)
        return sum(1 for _ in moved) > room

    def _update_plan(self) -> tuple[np.ndarray | None, int | None]:
        """The rows in which the learner differs from the serving index (moved since its
        snapshot, or new) and its version, when the rebuilder may update that index in place:
        one graph whose labels are this learner's rows (whether it does is the policy's
        call, :meth:`RebuildPolicy.updates`). (None, None) otherwise."""
        index = self.holder.current
        if not isinstance(index, ItemIndex):
            return None, None
        coverage = self._coverage_of(index)
        if coverage.label_rows is not None or len(coverage.missing):
            return None, None
        moved = np.fromiter(self._moved_after(self._snapshot_mark(index), index),
                            dtype=np.int64)
        new = np.arange(coverage.covered, len(self.learner), dtype=np.int64)
        return np.union1d(moved, new), index.version

    @property
    def version(self) -> int | None:
        return self.holder.version

    @property
    def current(self) -> ServedIndex | None:
        index = self.holder.current
        return index if self.config.enabled else None

    # -- retrieval -------------------------------------------------------------------------
    def exact_rows(self, query: np.ndarray, n: int, exclude_rows: np.ndarray) -> np.ndarray:
        """The best ``n`` learner rows for the augmented ``query`` by exact search over every
        row (a product with each: 10 ms at 100,000 items, about 100 at a million), none of
        ``exclude_rows`` (−1 entries are ignored)."""
        return self.learner.top_rows(query[:-1], n, exclude_rows, bias_weight=query[-1])[0]

    def retrieve(self, query: np.ndarray, n: int, exclude_rows: np.ndarray, *,
                 diversity: float | None = None,
                 history: Sequence[str] = ()) -> tuple[np.ndarray, int | None]:
        """Up to ``n`` candidates for the augmented query as learner rows, none of
        ``exclude_rows`` (−1 entries are ignored), and the index version they came from
        (None: exact search).

        Rows, not item ids, because the responder scores the candidates with the learner's
        rows next: going through ids and back cost two dict lookups per candidate, most of
        the answer's time beside the graph search itself.
        """
        index = self.current
        if index is None:
            return self.exact_rows(query, n, exclude_rows), None
        excluded = set(exclude_rows.tolist())
        excluded.discard(-1)
        fresh = self._fresh(index, query, n, excluded)
        if isinstance(index, ClusteredIndex) and diversity is not None:
            # the rows scored outside the graphs (new or moved since the build) compete within
            # their clusters' quotas: appended after the merge, as other requests have them,
            # they took the answer back to the user's main cluster in the engine's rerank
            rows = self._cluster_rows(index, query, n, excluded, history, diversity, fresh)
            return self._filled(rows, query, n, excluded), index.version
        if isinstance(index, ClusteredIndex):
            rows = self._cluster_rows(index, query, n, excluded, history)
        else:
            rows = self._search_rows(index, query, n, excluded)
        rows = np.concatenate([rows, fresh])
        _, first = np.unique(rows, return_index=True)  # a moved row may come from both
        return self._filled(rows[np.sort(first)], query, n, excluded), index.version

    def _filled(self, rows: np.ndarray, query: np.ndarray, n: int,
                excluded: set[int]) -> np.ndarray:
        """``rows``, then, where they are fewer than ``n`` and the learner holds more items
        that may be answered, the best of those by exact search over the current rows.

        A graph search can reach fewer items than asked for: in the ``ip`` space rows of very
        different norms leave some out of every search, and a graph over
        :data:`~index_sync.hnsw.EXACT_FALLBACK_ROWS` rows then answers with what it reached
        (at worst half). An answer short of k while the catalogue holds more is not what a
        client asked for; the exact pass costs what the answers before the first build cost
        (a product with every row: 10 ms at 100,000 items, 86-112 ms at a million), and only
        such answers pay it. They are rare: on a graph of 100,000 rows whose norms spread
        over a factor of 50, none of 50 searches reached too few, for each k of 10, 64, 200,
        500 and 1,000. Before, such an answer was padded with popular items by the engine's
        merge."""
        short = n - len(rows)
        if short <= 0 or len(self.learner) - len(excluded) <= len(rows):
            return rows
        skipped = np.fromiter(itertools.chain(excluded, rows.tolist()), dtype=np.int64)
        more = self.exact_rows(query, short, skipped)
        self.filled_answers += 1
        return np.concatenate([rows, more])

    def _cluster_rows(self, index: ClusteredIndex, query: np.ndarray, n: int,
                      excluded: set[int], history: Sequence[str],
                      diversity: float | None = None,
                      fresh: np.ndarray | None = None) -> np.ndarray:
        """The quota merge's best ``n`` as learner rows, with the ``fresh`` rows (scored
        outside the graphs) each competing in its cluster."""
        fresh = np.empty(0, dtype=np.int64) if fresh is None else fresh
        ids = self.learner.item_ids_at(fresh.tolist())
        vectors = self.learner.item_matrix[fresh]
        scored = list(zip(ids, (vectors @ query).tolist(),
                          index.clusters_for(ids, vectors).tolist()))
        unknown = self._extra_for_unknown(index, n)  # dropped below: asked for on top
        found = index.search(query, n + unknown, set(self.learner.item_ids_at(excluded)),
                             diversity=diversity, history=history, fresh=scored)
        rows = self.learner.rows_of(item for item, _ in found)
        return rows[rows >= 0][:n]

    def _search_rows(self, index: ItemIndex, query: np.ndarray, n: int,
                     excluded: set[int]) -> np.ndarray:
        """The graph's best ``n`` as learner rows; asks for ``n`` plus the excluded count and
        the labels of items the learner lacks, so neither shortens the answer."""
        labels, _ = index.search_labels(
            query, n + len(excluded) + self._extra_for_unknown(index, n))
        label_rows = self._coverage_of(index).label_rows
        rows = labels if label_rows is None else label_rows[labels]
        return _first_not_in(rows, excluded, n)

    def _extra_for_unknown(self, index: ServedIndex, n: int) -> int:
        """How many more to ask a search for, as it drops the items the learner lacks: as
        many as the index holds, up to ``n`` (a search's cost grows with what it is asked
        for, and an index of mostly unknown items, a learner that lost its checkpoint, is
        rebuilt at once anyway)."""
        return min(self._coverage_of(index).unknown, n)

    def _fresh(self, index: ServedIndex, query: np.ndarray, n: int,
               excluded: set[int]) -> np.ndarray:
        """The best ``n``, exactly, of the learner's rows that ``index`` does not hold or
        holds with a vector that has moved since."""
        found, scores = [], []
        for rows, vectors in self._scored_exactly(index):
            if len(rows):
                row_scores = vectors @ query
                best = top_k(row_scores[None, :], n + len(excluded))[0]
                found.append(rows[best])
                scores.append(row_scores[best])
        if not found:
            return np.empty(0, dtype=np.int64)
        order = np.argsort(-np.concatenate(scores), kind="stable")
        return _first_not_in(np.concatenate(found)[order], excluded, n)

    def _scored_exactly(self, index: ServedIndex) -> list[tuple[np.ndarray, np.ndarray]]:
        """The rows answers score beside ``index``, with their vectors, in two parts: the
        rows appended since it (a view of the learner's own, current vectors: no copy, which
        at hundreds of thousands of new rows in a cold replay took 0.3 s of every first
        answer after a step), and a block of the other rows it lacks and the rows moved since
        its snapshot, gathered once per (index version, note of moved rows, learner size).

        Gathering up to ``stale_limit`` scattered rows at every answer, then sorting all their
        scores, tripled an answer's time in a worker that learns (p50 1.5–1.8 ms at the limit
        against 0.5 on a fresh version, 100k items, ``benchmarks/index_serving.py``); kept,
        an answer multiplies the block and sorts only its best (0.95–1.04 ms). A row changed
        without a note (:meth:`learned`; the bootstrap, a cold start) would pick candidates
        by its previous vector until the next note, as the graph picks them by the snapshot's;
        the answer's scores are the current vectors' either way (the rerank)."""
        coverage = self._coverage_of(index)
        key = (index.version, self._moves, len(self.learner))
        if self._exact is None or self._exact.key != key:
            moved = self._rows_moved_since(self._snapshot_mark(index), index)
            rows = np.unique(np.concatenate([coverage.missing, moved]))
            self._exact = _ExactBlock(key, rows, self.learner.item_matrix[rows])
        # rows are only ever appended: every row past those checked (once per version) is new
        appended = np.arange(coverage.covered, len(self.learner), dtype=np.int64)
        self._appended_scored = len(appended)
        return [(self._exact.rows, self._exact.vectors),
                (appended, self.learner.item_matrix[coverage.covered:])]

    def _rows_moved_since(self, mark: int, index: ServedIndex | None = None) -> np.ndarray:
        """:meth:`_moved_after` ``mark`` (the index's snapshot's), at most ``stale_limit``;
        older moves are forgotten."""
        self._moved.forget_until(mark)
        newest = itertools.islice(self._moved_after(mark, index), self.config.stale_limit)
        return np.fromiter(newest, dtype=np.int64)

    def _moved_after(self, mark: int, index: ServedIndex | None = None) -> Iterator[int]:
        """The rows ``index`` (by default the one serving) holds, those it covers, that moved
        after the note ``mark``, newest move first."""
        self._moved.split_at(self._coverage_of(index or self.holder.current).covered)
        return self._moved.held_after(mark)

    def _coverage_of(self, index: ServedIndex) -> _Coverage:
        """How ``index`` lines up with the learner's rows, worked out once per version."""
        coverage = self._coverage.get(index.version)
        if coverage is None:
            coverage = _Coverage.of(index, self.learner)
            self._coverage[index.version] = coverage
            for old in [v for v in self._coverage if v < index.version]:
                del self._coverage[old]
        return coverage

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
            "updates": float(self.rebuilder.updates),
            "waiting_seconds": self.rebuilder.waiting_seconds(now),
            # as of the last answer; read, not worked out, since scrapes come from a thread
            "exact_rows": float((len(self._exact.rows) if self._exact else 0)
                                + self._appended_scored),
            "filled_answers": float(self.filled_answers),
        }

    def close(self) -> None:
        """Stop building, and wait for a build under way to give up (a block of rows)."""
        self.rebuilder.close(wait=True)
