"""Exponentially decayed item popularity, kept in the log domain.

The decayed count of item i at time t is c_i(t) = Σ_e w_e · 2^(−(t − t_e)/h) over its events e
(weight w_e, event time t_e, half-life h). Writing λ = ln 2 / h,

    log c_i(t) = logsumexp_e(log w_e + λ t_e) − λ t,

so we store only the time-free part ``a_i = logsumexp_e(log w_e + λ t_e)``. Adding an event is one
``logaddexp``; items rank by ``a_i`` at every t (decay never reorders them), and the count at any
time is ``exp(a_i − λ t)``. Nothing has to be rescanned when time moves, and nothing overflows.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Container, Iterable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import orjson

from .gramian import ids_from_arrays, ids_to_arrays, load_npz, save_npz
from .stream_positions import StreamPositions, written_before_renewal

log = logging.getLogger(__name__)

#: the fewest items a ranking keeps: a request that needs more (k + its exclusions) ranks again
RANKED_AT_LEAST = 1024
#: an item whose count has decayed below this (20 half-lives after one event of weight 1) is
#: forgotten at a save: kept, every item ever named, junk ids included, stayed in the memory,
#: the file saved every 30 s and every full ranking
FORGET_BELOW = 2.0 ** -20


def top_rows(values: np.ndarray, depth: int) -> np.ndarray:
    """``np.argsort(-values, kind="stable")[:depth]`` (ties in row order) without sorting
    everything: a partition finds the ``depth`` largest, only those are sorted. At a million
    items that is 4 ms instead of the full sort's 100 ms, which ran on the event loop.

    >>> top_rows(np.array([1.0, 3.0, 2.0, 3.0]), 2).tolist()
    [1, 3]
    """
    if depth >= len(values):
        return np.argsort(-values, kind="stable")
    if depth <= 0:
        return np.empty(0, dtype=np.int64)
    cut = values[np.argpartition(-values, depth - 1)[depth - 1]]  # the depth-th largest value
    above = np.flatnonzero(values > cut)
    at_cut = np.flatnonzero(values == cut)[: depth - len(above)]  # lowest rows first
    rows = np.concatenate([above, at_cut])
    return rows[np.argsort(-values[rows], kind="stable")]


class PopularitySnapshot(NamedTuple):
    """The counts as of one moment (:meth:`DecayedPopularity.snapshot`), to be written away
    from the loop that keeps counting (:meth:`DecayedPopularity.write`)."""

    ids: list[str]
    log_mass: np.ndarray
    rate: float
    now: float
    number: int  # the snapshots of one instance in the order taken
    places: dict[str, np.ndarray]  # where the counts stand in the events topic
    journal: int  # the counts hold the journal files up to this number (0: none kept)


class CountJournal:
    """The events counted since the last snapshot, appended beside the saved counts so that
    a process that dies loses none of them: one JSON line per counted batch (items, times,
    weights, and the events' partitions and offsets), in numbered files
    ``<counts file>.journal.N``. A snapshot starts the next file; once it is written, the
    files it holds go. Loading the counts replays the files through the places, which skip
    what the counts hold already (:meth:`DecayedPopularity.load`).

    Written through the page cache, without a sync: a worker process that is killed loses
    nothing, a machine that loses power may lose the last lines (as it may lose Kafka's
    unsynced records). A line cut short by the death of its writer is skipped at the replay."""

    def __init__(self, counts_path: Path, topic: str, held: int = 0) -> None:
        """``held``: the last file number the saved counts hold; numbers go on above it and
        above every file there, so that no new file passes for one they hold."""
        self.directory, self.prefix = counts_path.parent, counts_path.name + ".journal."
        self.topic = topic
        self.number = max([held, *(number for number, _ in journal_files(counts_path))]) + 1
        self._handle = None

    def append(self, item_ids: Sequence[str], ts: Sequence[float], weights: Sequence[float],
               places: Sequence[tuple[int, int]]) -> None:
        """One counted batch, on the disk (its write handed to the system) when it returns."""
        if self._handle is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._handle = open(self.directory / f"{self.prefix}{self.number:06d}", "ab")
        self._handle.write(orjson.dumps({
            "topic": self.topic, "items": list(item_ids), "ts": list(ts),
            "weights": list(weights), "places": [list(place) for place in places]}) + b"\n")
        self._handle.flush()

    def next_file(self) -> int:
        """Start the next file (a snapshot, or a write that failed: a line left half
        written ends its file); returns the number of the last one the counts now hold."""
        self.close()
        self.number += 1
        return self.number - 1

    def drop_through(self, counts_path: Path, number: int) -> None:
        """Remove the files up to ``number``: saved counts hold them."""
        for held, path in journal_files(counts_path):
            if held <= number:
                path.unlink(missing_ok=True)

    def close(self) -> None:
        """Close the file being appended to. A close that fails (the buffered rest of a line
        a full disk refused) leaves it closed all the same: that line is lost, the counts
        hold its events and the next save keeps them."""
        handle, self._handle = self._handle, None
        if handle is not None:
            try:
                handle.close()
            except OSError as error:
                log.warning("the popularity journal's file did not close cleanly: %s", error)


def journal_files(counts_path: Path) -> list[tuple[int, Path]]:
    """The journal files of the counts at ``counts_path``, by number."""
    prefix = counts_path.name + ".journal."
    found = []
    for path in counts_path.parent.glob(prefix + "*"):
        suffix = path.name[len(prefix):]
        if suffix.isdigit():
            found.append((int(suffix), path))
    return sorted(found)


def journal_batches(path: Path) -> Iterator[dict]:
    """The counted batches of one journal file; a line that does not read as one (cut short
    by the death of its writer) is skipped."""
    with open(path, "rb") as handle:
        for line in handle:
            try:
                batch = orjson.loads(line)
                if not isinstance(batch, dict):
                    raise ValueError("not a batch")
                columns = [batch[name] for name in ("items", "ts", "weights", "places")]
                if len({len(column) for column in columns}) != 1:
                    raise ValueError("columns of unequal lengths")
                if not all(isinstance(item, str) for item in batch["items"]):
                    raise ValueError("an item id that is not a string")
                batch["places"] = [(int(partition), int(offset))
                                   for partition, offset in batch["places"]]
            except (ValueError, KeyError, TypeError) as error:
                log.warning("a line of the popularity journal %s does not read (%s): "
                            "skipped", path.name, error)
                continue
            yield batch


class DecayedPopularity:
    """Decayed, weighted event counts per item with a cached ranking.

    Reads (``count``, ``top``) never create state: an unknown item reads as zero.
    """

    def __init__(self, half_life_s: float, *, refresh_s: float = 0.5,
                 clock=time.monotonic, events_topic: str = "") -> None:
        if not half_life_s > 0:
            raise ValueError("half_life_s must be > 0")
        # the next offset to count per partition of the events topic, saved with the counts:
        # an event read again after a crash is counted if the saved counts lack it, once
        self.places = StreamPositions(events_topic)
        self.rate = math.log(2.0) / half_life_s
        self.refresh_s = refresh_s
        self._clock = clock
        self._index: dict[str, int] = {}
        self._ids: list[str | None] = []  # None: a free row (log mass −inf), reused first
        self._free: list[int] = []
        self._log_mass = np.empty(1024, dtype=np.float64)
        self.now = 0.0  # latest event time seen (event-time clock)
        self._order: np.ndarray = np.empty(0, dtype=np.int64)
        self._order_at = -math.inf
        self._order_complete = False  # the cached ranking holds every item (as of then)
        # how deep rankings go: the deepest asked for so far, in powers of two (requests a
        # little deeper each would otherwise each rank the whole catalogue again)
        self._depth = RANKED_AT_LEAST
        self._dirty = False
        self._snapshots = 0  # taken
        self._written = 0  # the number of the newest snapshot written
        self._write_lock = threading.Lock()
        self.journal: CountJournal | None = None  # kept by the process that saves the counts
        self._journal_held = 0  # the last journal file the loaded counts hold
        self._journal_failing = False  # warned of a failed append, none has worked since

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._index

    def add(self, item_id: str, ts: float, weight: float = 1.0) -> None:
        """Count one event of ``item_id`` at event time ``ts`` with confidence ``weight``."""
        term = math.log(weight) + self.rate * ts
        row = self._index.get(item_id)
        if row is None:
            row = self._append(item_id)
            self._log_mass[row] = term
        else:
            self._log_mass[row] = np.logaddexp(self._log_mass[row], term)
        self.now = max(self.now, ts)
        self._dirty = True

    def add_many(self, item_ids: Sequence[str], ts: Sequence[float],
                 weights: Sequence[float]) -> None:
        """:meth:`add` of each event in order, in one vectorized step: the same floats as the
        loop (``logaddexp.at`` applies the terms row by row in the order given). The ingest
        agent counts a batch of events at once; one call per event was a tenth of its work."""
        if not item_ids:
            return
        # read before any row is made: a time or weight that is not a number (a damaged
        # journal line) left rows of its new items at no mass, never forgotten
        times = np.asarray(ts, dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # told below
            terms = np.log(np.asarray(weights, dtype=np.float64)) + self.rate * times
        if not np.isfinite(terms).all():  # a null time, a weight of 0 or below: no count
            raise ValueError("popularity counts finite times and positive weights")
        rows = np.empty(len(item_ids), dtype=np.int64)
        for position, item_id in enumerate(item_ids):
            row = self._index.get(item_id)
            if row is None:
                row = self._append(item_id)
                self._log_mass[row] = -np.inf  # logaddexp(−inf, term) is term, exactly
            rows[position] = row
        np.logaddexp.at(self._log_mass, rows, terms)
        self.now = max(self.now, float(times.max()))
        self._dirty = True

    def add_unheld(self, item_ids: Sequence[str], ts: Sequence[float],
                   weights: Sequence[float], places: Sequence[tuple[int, int]]) -> list[bool]:
        """:meth:`add_many` of the events the counts do not hold, by their ``places``
        ((partition, offset) in the events topic, each partition's in the order read): those
        at or past their partition's place in :attr:`places`, which then moves past them.
        Returns which were added. Read again after a crash, an event is counted where the
        saved counts lack it, and only there: whether or not it has an id, and whether or
        not an erasure took it from its user's history since."""
        before = self.places.next_offsets()  # a copy
        held = self.places.admit([partition for partition, _ in places],
                                 [offset for _, offset in places])
        added = [n for n, new in enumerate(held) if new]
        columns = ([item_ids[n] for n in added], [ts[n] for n in added],
                   [weights[n] for n in added])
        try:
            self.add_many(*columns)
        except BaseException:
            self.places.restore(before)  # not counted: counted when taken again
            raise
        if self.journal is not None and added:
            self._journal(*columns, [places[n] for n in added])
        return held

    def keep_journal(self, counts_path: Path) -> None:
        """From now on, append the events :meth:`add_unheld` counts to a
        :class:`CountJournal` beside the counts saved at ``counts_path`` (the worker's, not
        a process that only reads the counts)."""
        self.journal = CountJournal(counts_path, self.places.topic, self._journal_held)

    def _journal(self, item_ids: list[str], ts: list[float], weights: list[float],
                 places: list[tuple[int, int]]) -> None:
        try:
            self.journal.append(item_ids, ts, weights, places)
        except (OSError, ValueError) as error:  # a full disk: the counts go on, the next
            self.journal.next_file()  # save holds them; no line after one cut short
            if not self._journal_failing:
                log.warning("could not append to the popularity journal (%s): the counts "
                            "since the last save are lost if the worker dies", error)
            self._journal_failing = True
        else:
            self._journal_failing = False

    def _append(self, item_id: str) -> int:
        if self._free:
            row = self._free.pop()
            self._ids[row] = item_id
        else:
            row = len(self._ids)
            if row == len(self._log_mass):
                self._log_mass = np.resize(self._log_mass, 2 * row)
            self._ids.append(item_id)
        self._index[item_id] = row
        return row

    def count(self, item_id: str, at: float | None = None) -> float:
        """Decayed count at event time ``at`` (default: the latest event time seen)."""
        row = self._index.get(item_id)
        if row is None:
            return 0.0
        return math.exp(self._log_mass[row] - self.rate * (self.now if at is None else at))

    def _ranking(self, depth: int) -> np.ndarray:
        """The rows of the ``depth`` (at least) most popular items, best first. Cached for
        ``refresh_s`` seconds; ranked again sooner only when a deeper ranking is asked for."""
        stale = self._clock() - self._order_at >= self.refresh_s
        shallow = depth > len(self._order) and not self._order_complete
        if (self._dirty and stale) or shallow:
            mass = self._log_mass[: len(self._ids)]
            self._depth = max(self._depth, 1 << (depth - 1).bit_length())
            self._order = top_rows(mass, self._depth)
            self._order_complete = len(self._order) == len(mass)
            self._order_at = self._clock()
            self._dirty = False
        return self._order

    def top(self, k: int, exclude: Iterable[str] = (),
            skip: Container[str] = frozenset()) -> list[tuple[str, float]]:
        """The ``k`` most popular items not in ``exclude`` nor in ``skip``, with their decayed
        counts. ``skip`` is tested item by item, never copied, and the ranking is made deeper
        only when its items used up the depth asked for: a set every request shares (the
        withdrawn items), thousands of which would cost each answer a copy and a ranking of
        that depth.

        The ranking is cached for ``refresh_s`` seconds, so answers may lag the stream by that
        much; the counts themselves are always current.
        """
        excluded = set(exclude)
        depth = k + len(excluded)
        while True:
            ranking = self._ranking(depth)
            picked: list[tuple[str, float]] = []
            for row in ranking:
                item_id = self._ids[row]
                if item_id is None or item_id in excluded or item_id in skip:
                    continue  # None: a forgotten item's row
                picked.append((item_id, self.count(item_id)))
                if len(picked) == k:
                    return picked
            if self._order_complete or not len(ranking):
                return picked
            depth = 2 * len(ranking)

    # -- persistence (npz, no pickle) -----------------------------------------------------
    def forget_faded(self) -> int:
        """Forget the items whose count is below ``FORGET_BELOW`` now; returns how many. Their
        counts read 0 from then on, and their rows (log mass −inf, ranked last and skipped)
        go to the next new items: nothing is renumbered, so the cost is one pass of numpy
        over the masses and a step per item forgotten."""
        mass = self._log_mass[: len(self._ids)]
        faded = np.flatnonzero((mass - self.rate * self.now < math.log(FORGET_BELOW))
                               & np.isfinite(mass))  # −inf: a row free already
        for row in faded.tolist():
            del self._index[self._ids[row]]
            self._ids[row] = None
        mass[faded] = -np.inf
        self._free.extend(faded.tolist())
        if len(faded):
            self._dirty = True
        return len(faded)

    def save(self, path: Path) -> None:
        """Write atomically: a reader sees the old file or the new one, never half of one.
        Items faded below notice are forgotten first (:meth:`forget_faded`)."""
        self.write(self.snapshot(), path)

    def snapshot(self) -> PopularitySnapshot:
        """The counts as of now, copied, for :meth:`write` on another thread: a million items
        took 130–240 ms to write on the event loop that counts and answers, their copy
        14–25 ms. Items faded below notice are forgotten first (:meth:`forget_faded`)."""
        self.forget_faded()
        rows = np.flatnonzero(np.isfinite(self._log_mass[: len(self._ids)]))  # not free rows
        ids = (list(self._ids) if len(rows) == len(self._ids)
               else [self._ids[r] for r in rows.tolist()])
        self._snapshots += 1
        journal = self.journal.next_file() if self.journal is not None else 0
        return PopularitySnapshot(ids, self._log_mass[rows], self.rate, self.now,
                                  self._snapshots, self.places.to_arrays(), journal)

    def write(self, snapshot: PopularitySnapshot, path: Path) -> bool:
        """Write ``snapshot`` to ``path`` atomically, from any thread; False (nothing
        written) when a newer snapshot was written already: a write that started late, or
        ran long, must not put older counts over newer ones (the last save at a stop)."""
        with self._write_lock:  # one at a time: they share the file's temporary name
            if snapshot.number <= self._written:
                return False
            save_npz(path, {**ids_to_arrays(snapshot.ids), "log_mass": snapshot.log_mass,
                            "rate": snapshot.rate, "now": snapshot.now, **snapshot.places,
                            "journal": snapshot.journal})
            self._written = snapshot.number
            if self.journal is not None and snapshot.journal:
                self.journal.drop_through(path, snapshot.journal)
            return True

    def load(self, path: Path, *, renewed_at: float | None = None,
             journal: bool = True) -> bool:
        """Replace the counts, and where they stand in the events topic, with those saved
        at ``path``, then count the events of its journal files (:class:`CountJournal`;
        without ``journal``, not: a process that only reads the counts) that they do not
        hold; False if there is neither.

        ``renewed_at``: when the events topic was last made anew (its offsets start again):
        places saved before it are void, so the counts are kept and every event is counted;
        a journal file written before it is counted whole, without places (its events were
        counted before the crash, in the old topic), one written after it by its places,
        from none. A file from before the places were saved has none: likewise."""
        data = load_npz(path)
        journals = journal_files(path) if journal else []
        if data is None and not journals:
            return False
        if data is not None:
            self._load_counts(data, path, written_before_renewal(path, renewed_at))
        for number, file in journals:
            if number > self._journal_held:  # else the saved counts hold it
                self._replay(file, by_places=not written_before_renewal(file, renewed_at))
        return True

    def _load_counts(self, data: dict, path: Path, places_void: bool) -> None:
        self.places.set_arrays({} if places_void else data)
        self._journal_held = int(data["journal"]) if "journal" in data else 0
        ids = ids_from_arrays(data, where=path)
        self._index = {item_id: row for row, item_id in enumerate(ids)}
        self._ids, self._free = ids, []
        self._log_mass = np.array(data["log_mass"], dtype=np.float64)
        if len(self._log_mass) == 0:
            self._log_mass = np.empty(1024, dtype=np.float64)
        self.now = float(data["now"])
        saved_rate = float(data["rate"])
        if not math.isclose(saved_rate, self.rate):
            # saved with another half-life: the counts as they stand now, decaying from now
            # at this one (a_i = log c_i(now) + λ now)
            self._log_mass[: len(ids)] += (self.rate - saved_rate) * self.now
        self._dirty = True
        self._order_at = -math.inf

    def _replay(self, journal: Path, by_places: bool) -> None:
        """Count the batches of a journal file that the counts do not hold, by their places;
        all of them where ``by_places`` is False (written before the topics were made anew)
        or they are of another events topic than this one's (their places mean nothing
        here)."""
        kept, self.journal = self.journal, None  # not appended again while replayed
        try:
            for batch in journal_batches(journal):
                columns = (batch["items"], batch["ts"], batch["weights"])
                try:
                    if by_places and batch.get("topic") == self.places.topic:
                        self.add_unheld(*columns, batch["places"])
                    else:
                        self.add_many(*columns)
                except (ValueError, TypeError) as error:  # not numbers, or not ids
                    log.warning("a batch of the popularity journal %s does not count (%s): "
                                "skipped", journal.name, error)
        finally:
            self.journal = kept
