"""The serving reference and the rebuild loop that replaces it.

Queries read :attr:`IndexHolder.current` once and use that object to the end: an index is never
modified while it serves, so a query sees one complete version whatever happens meanwhile.
A swap is one attribute assignment (atomic under the GIL) and only ever moves forward.

:class:`IndexRebuilder` makes a version in a background thread from a snapshot the caller takes
on its own thread, writes it to disk, swaps it in and prunes old versions. One build at a time;
a failed build is logged and the previous version keeps serving. A version is built from
scratch, or, when the snapshot names few rows to update (``RebuildPolicy.update_share``), it is
the serving version read back from its folder with those rows updated in place.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .background import background_executor
from .clusters import ClusteredIndex
from .hnsw import SPHERE_HEADROOM, BuildStopped, HnswParams, ItemIndex
from .versions import (CorruptVersion, ServedIndex, load_newest, load_version, next_version,
                       prune, write_version)

log = logging.getLogger(__name__)


class IndexHolder:
    """The index that answers queries now (None before the first one exists)."""

    def __init__(self) -> None:
        self.current: ServedIndex | None = None
        self.swaps = 0
        self.swapped_at = 0.0
        self._lock = threading.Lock()  # orders swaps; readers never take it

    def swap(self, index: ServedIndex) -> bool:
        """Serve ``index`` if it is newer than the current one; False (and no change) if not."""
        with self._lock:
            if self.current is not None and index.version <= self.current.version:
                return False
            self.current = index
            self.swaps += 1
            self.swapped_at = time.time()
            return True

    @property
    def version(self) -> int | None:
        index = self.current
        return None if index is None else index.version


@dataclass(frozen=True)
class Snapshot:
    """What a build needs, taken on the owner's thread."""

    ids: list[str]  # a copy
    vectors: np.ndarray  # (n, d+1) augmented rows: the live rows (see ServingIndex.maybe_rebuild)
    model_version: int
    #: the rows that differ from version ``base_version``: moved since its snapshot, or new
    #: (None: build from scratch)
    update_rows: np.ndarray | None = None
    base_version: int | None = None
    #: the owner's count of moved-row notes at the snapshot (``ServingIndex._snapshot_mark``),
    #: kept on the index built from it as ``snapshot_mark``
    mark: int | None = None


@dataclass(frozen=True)
class RebuildPolicy:
    """When to rebuild: every ``interval_s``, or sooner once ``changed_items`` item rows have
    changed since the last build's snapshot or once more rows have moved since the serving
    version's snapshot than answers score exactly beside it (the serving index's
    ``stale_limit``); never with fewer than ``min_items`` items.

    The second trigger keeps answers whole: a row that moved beyond the stale limit is found
    only by the graph, through its vector of the snapshot. The learner's round-robin sweep
    moves rows that no event named, so ``changed_items`` (the learned items) lags the rows
    that moved: seen through Kafka on Toys, the version built as a replay ended had over
    4,096 moved rows behind it before its first answer, and served them all for the next
    minute (``interval_s``). Raising the limit instead costs every answer (about 0.1 ms
    per thousand rows at 100k items, ``stale`` in ``benchmarks/index_serving.py``).

    ``build_share`` bounds the share of wall time spent building: a build that took b seconds
    is followed by at least b·(1/share − 1) seconds without one. A busy stream changes
    ``changed_items`` rows within seconds, and at a million items a build takes minutes
    (``benchmarks/index_serving.py``), so without the bound the builds would run back to back
    and hold a core for good; the items moved since the snapshot are still scored exactly by
    the serving index (``stale_limit``). It overrides ``interval_s`` when a build is longer.

    ``update_share``: a version is the serving one with the rows that differ updated in place
    when they are at most this share of its items, and fewer than it holds have been updated
    since its last build from scratch (so a graph made mostly by updates, or a sphere sized
    for old rows, is rebuilt); 0: always build from scratch. An updated row costs about six
    inserted ones (:meth:`~index_sync.hnsw.ItemIndex.updated`), so at a tenth of the items an
    update costs about half a build.

    ``niceness``: the build thread runs this much below the worker's CPU priority
    (:mod:`index_sync.background`), so a build takes the cores that intake and learning leave.

    ``backlog_events`` and ``backlog_wait_s``: a build that falls due while the worker is more
    than ``backlog_events`` events behind its input (a replay, a burst, a restart) waits until
    intake has caught up, at most ``backlog_wait_s``. During a backlog the rows move fastest,
    so a build is stale soonest, and it takes the CPU that intake and learning need: measured,
    the build thread took a sixth of the worker's busy samples while a backlog was being taken
    in, every 2 s (docs/throughput.md). Answers lose little meanwhile: the serving index
    scores the rows moved since its snapshot exactly (``stale_limit``). 0 events: never wait."""

    interval_s: float = 60.0
    changed_items: int = 10_000
    min_items: int = 1
    build_share: float = 0.5
    update_share: float = 0.1
    niceness: int = 10
    backlog_events: int = 2_000
    backlog_wait_s: float = 60.0
    clusters: int = 0
    keep: int = 2
    grace_s: float = 300.0

    def __post_init__(self) -> None:
        if not 0.0 < self.build_share <= 1.0:
            raise ValueError(f"build_share must be in (0, 1], not {self.build_share}")
        if not 0.0 <= self.update_share <= 1.0:
            raise ValueError(f"update_share must be in [0, 1], not {self.update_share}")

    def updates(self, base: ServedIndex | None, rows: int) -> bool:
        """Whether a version that differs from ``base`` in ``rows`` rows is made by updating
        it in place (else from scratch)."""
        return (self.update_share > 0 and isinstance(base, ItemIndex)
                and base.updatable and rows <= self.update_share * len(base)
                and base.manifest.updated_rows + rows <= len(base))


class IndexRebuilder:
    """Builds, writes, swaps and prunes index versions off the serving path."""

    def __init__(self, root: Path, holder: IndexHolder, policy: RebuildPolicy = RebuildPolicy(),
                 params: HnswParams = HnswParams(), seed: int = 0) -> None:
        self.root = root
        self.holder = holder
        self.policy = policy
        self.params = params
        self.seed = seed
        # The first build also waits for the interval or the changed items: until then the
        # engine answers by exact search, which is what a young, small catalog needs anyway.
        self.last_snapshot_at = time.time()
        self.builds = 0
        self.failures = 0
        self.last_error: str | None = None
        self.last_build_seconds = 0.0
        self.updates = 0  # versions made by updating the previous one in place
        self.resting_until = -math.inf  # no build before (time.time(), see build_share)
        self.waiting_since: float | None = None  # a due build waits for a backlog since then
        self._executor = background_executor("index-build", policy.niceness)
        self._running: Future | None = None
        self._stopping = threading.Event()  # a build running gives up (close)

    def load_existing(self, dim: int | None = None) -> bool:
        """Serve the newest valid version on disk of rows of length ``dim``, if any (at
        start)."""
        index = load_newest(self.root, self.params, dim)
        return index is not None and self.holder.swap(index)

    @property
    def building(self) -> bool:
        return self._running is not None and not self._running.done()

    def due(self, changed_items: int, n_items: int, now: float | None = None,
            behind: int = 0, overflowing: bool = False) -> bool:
        """Whether to build now; ``behind``: events the worker has yet to take in (see
        ``RebuildPolicy.backlog_events``); ``overflowing``: more rows moved since the serving
        version's snapshot than answers score exactly beside it (``IndexConfig.stale_limit``),
        due then as if ``changed_items`` had changed (see :class:`RebuildPolicy`)."""
        now = time.time() if now is None else now
        if (self.building or n_items < self.policy.min_items or changed_items == 0
                or now < self.resting_until):
            return False
        if (not overflowing and changed_items < self.policy.changed_items
                and now - self.last_snapshot_at < self.policy.interval_s):
            return False
        return not self._waits_for_backlog(behind, now)

    def _waits_for_backlog(self, behind: int, now: float) -> bool:
        if not 0 < self.policy.backlog_events < behind:
            self.waiting_since = None
            return False
        if self.waiting_since is None:
            self.waiting_since = now
        return now - self.waiting_since < self.policy.backlog_wait_s

    def waiting_seconds(self, now: float) -> float:
        """How long a due build has been waiting for a backlog (0: none is)."""
        return 0.0 if self.waiting_since is None else now - self.waiting_since

    def submit(self, snapshot: Snapshot) -> Future:
        """Start a build of ``snapshot`` in the background (the caller checked :meth:`due`)."""
        if self.building:
            raise RuntimeError("a build is already running")
        self.last_snapshot_at = time.time()
        self.waiting_since = None
        self._running = self._executor.submit(self._build_and_swap, snapshot)
        return self._running

    def _build_and_swap(self, snapshot: Snapshot) -> ServedIndex | None:
        started = time.time()
        try:
            return self._build_swap_prune(snapshot)
        finally:  # a failed build cost its time too
            self._rest_after(started, time.time())

    def _rest_after(self, started: float, ended: float) -> None:
        """No build before the time spent on this one is ``build_share`` of the time since
        it began."""
        self.resting_until = started + (ended - started) / self.policy.build_share

    def _build_swap_prune(self, snapshot: Snapshot) -> ServedIndex | None:
        try:
            updated = self.update(snapshot)
            index = updated or self.build(snapshot.ids, snapshot.vectors, snapshot.model_version)
            write_version(self.root, index)
            index.snapshot_mark = snapshot.mark
            self.holder.swap(index)
            self.builds += 1
            self.updates += updated is not None
            self.last_build_seconds = index.manifest.build_seconds
            self.last_error = None
            prune(self.root, self.policy.keep, self.policy.grace_s)
            log.info("index v%d: %d items, %s in %.1f s", index.version, len(index),
                     "built" if updated is None else f"{len(snapshot.update_rows)} rows updated",
                     index.manifest.build_seconds)
            return index
        except BuildStopped as stopped:
            log.info("index build given up as the worker stops: %s", stopped)
            return None
        except Exception as error:  # noqa: BLE001 - the previous version keeps serving
            self.failures += 1
            self.last_error = repr(error)
            log.exception("index build failed; version %s keeps serving", self.holder.version)
            return None

    def _next_version(self) -> int:
        return max(next_version(self.root), (self.holder.version or 0) + 1)

    def build(self, ids: Sequence[str], vectors: np.ndarray, model_version: int) -> ServedIndex:
        """A version built from scratch."""
        if self.policy.clusters > 1:
            return ClusteredIndex.build(ids, vectors, self.policy.clusters,
                                        version=self._next_version(),
                                        model_version=model_version, params=self.params,
                                        seed=self.seed, stop=self._stopping.is_set)
        headroom = SPHERE_HEADROOM if self.policy.update_share > 0 else 1.0
        return ItemIndex.build(ids, vectors, version=self._next_version(),
                               model_version=model_version, params=self.params, seed=self.seed,
                               headroom=headroom, stop=self._stopping.is_set)

    def update(self, snapshot: Snapshot) -> ItemIndex | None:
        """The serving version with the snapshot's ``update_rows`` updated in place, read
        back from its folder (the serving graph itself must not change); None when the policy
        says build (or a row outgrew the sphere, or the folder cannot be read)."""
        base, rows = self.holder.current, snapshot.update_rows
        if (rows is None or base is None or base.version != snapshot.base_version
                or not self.policy.updates(base, len(rows))):
            return None
        vectors = snapshot.vectors[rows]
        if not base.fits(vectors):
            return None
        try:
            private = load_version(self.root / f"v{base.version}", self.params,
                                   capacity=len(snapshot.ids))
        except (CorruptVersion, OSError, RuntimeError) as error:
            log.warning("cannot update index v%d in place (%s); building", base.version, error)
            return None
        return private.updated(snapshot.ids, rows, vectors, version=self._next_version(),
                               model_version=snapshot.model_version,
                               threads=self.params.threads, stop=self._stopping.is_set)

    def close(self, wait: bool = True) -> None:
        """Stop building: a build that has not started never does, and one running gives up
        at its next block of rows (:func:`~index_sync.hnsw.add_rows`; a k-means or a write
        under way ends first). ``wait``: until the build thread has ended, so that nothing
        writes the index folder once this returns (a worker lets its data dir go next)."""
        self._stopping.set()
        self._executor.shutdown(wait=wait, cancel_futures=True)
