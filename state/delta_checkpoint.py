"""Checkpoints of row tables written as a base and the rows changed since (deltas).

The item model's state is mostly tables with a row per item (its rows, priors, counts and
solve statistics: 11.7 KB an item at d = 64), of which a checkpoint interval changes few: the
items learned, and those the sweep re-solved. Written whole, a million items made an 11.7 GB
file at every save, and learning waited for it. Here a save writes only the rows changed since
the last save into a part file of their own (a delta); the head, the file the caller names,
holds the small arrays and lists the parts in order: first a base, whole, then its deltas.
When the deltas weigh more than ``compact_share`` of their base, or are ``max_deltas`` in
number, a save writes a new base instead: between saves the parts on the disk stay under
(1 + ``compact_share``) times the state, and a load reads no more than that. While a new base
is written the old parts are still there (they go once its head is): up to about
(2 + ``compact_share``) times the state for that while.

Crash safety: a part is on the disk (fsync, rename) before the head that names it replaces the
old head (:func:`state.gramian.save_npz`), so a reader sees the old checkpoint or the new one,
whole. Parts the head no longer names are removed after it is written (at the next save where
a crash came between). A reader that finds a named part gone (a writer began a new base while
it read) reads the head again.

Rows are only ever added to a table (ids are appended), so every row past those the last save
wrote goes into the next delta whether or not it was marked changed. A table whose arrays
change shape or type, or that loses rows, starts a new base.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from state.gramian import DamagedCheckpoint, load_npz, save_npz

log = logging.getLogger(__name__)

#: the head's entry that lists its parts and tables (JSON); a head without it is a whole
#: checkpoint, as every one was before deltas
CHAIN_KEY = "delta_chain"
#: a new base once the deltas since the last weigh this share of it
COMPACT_SHARE = 0.5
#: a new base once this many deltas follow the last (each is a file a load opens)
MAX_DELTAS = 32
#: bytes an array takes in an npz beside its data, at most: its header (128) and its zip
#: entries (two headers of its name)
ARRAY_OVERHEAD = 512


def mark_rows(marks: np.ndarray, rows: np.ndarray, capacity: int) -> np.ndarray:
    """``marks`` (a flag per row of a table: written since the last save), grown to
    ``capacity`` where the table grew, with ``rows`` set; the caller keeps what it returns
    and hands ``np.flatnonzero`` of it to its :class:`Table`."""
    if len(marks) < capacity:
        grown = np.zeros(capacity, dtype=bool)
        grown[: len(marks)] = marks
        marks = grown
    marks[rows] = True
    return marks


@dataclass(frozen=True)
class Table:
    """A table to save: its arrays, each of at least ``rows`` rows (rows ``[0, rows)`` are
    saved), and the rows changed since the last save (any order; repeats allowed)."""

    arrays: Mapping[str, np.ndarray]
    rows: int
    changed: np.ndarray


class ChainWriter:
    """Writes the checkpoints of one head file as a base and deltas (module docstring). It
    remembers what the head on the disk holds; :meth:`continue_from` takes that from a
    checkpoint read back, :meth:`reset` forgets it (the next save writes a base)."""

    def __init__(self, compact_share: float = COMPACT_SHARE,
                 max_deltas: int = MAX_DELTAS) -> None:
        self.compact_share = compact_share
        self.max_deltas = max_deltas
        self.reset()

    def reset(self) -> None:
        self._head: Path | None = None
        self._chain: dict | None = None
        #: "base" or "delta", the bytes of the part the last save wrote, and of its head
        self.last_kind, self.last_bytes, self.last_head_bytes = "", 0, 0

    @property
    def last_save_bytes(self) -> int:
        """The bytes the last save wrote: its part and its head."""
        return self.last_bytes + self.last_head_bytes

    def continue_from(self, head: Path, data: Mapping[str, np.ndarray]) -> None:
        """Go on with the chain of the checkpoint ``data`` that :func:`load_checkpoint` read
        from ``head`` (a whole checkpoint, as written before deltas, starts a base)."""
        self.reset()
        if CHAIN_KEY in data:
            self._head, self._chain = Path(head), json.loads(str(data[CHAIN_KEY]))

    def save(self, head: Path, tables: Mapping[str, Table],
             whole: Mapping[str, np.ndarray]) -> str:
        """Write the ``tables`` (their changed rows, or all of them as a new base) and the
        ``whole`` arrays as the checkpoint at ``head``; returns "base" or "delta". Array
        names must be distinct across tables and ``whole``."""
        head = Path(head)
        names = [name for table in tables.values() for name in table.arrays] + list(whole)
        if len(set(names)) != len(names) or CHAIN_KEY in names:
            raise ValueError(f"array names must be distinct: {sorted(names)}")
        layout = {name: _layout(table) for name, table in tables.items()}
        changed = self._delta_rows(head, tables, layout)
        kind = "base" if changed is None else "delta"
        arrays = (_base_arrays(tables) if changed is None
                  else _delta_arrays(tables, changed))
        part = _next_part(head)
        save_npz(part, arrays)
        size = part.stat().st_size
        parts = [] if changed is None else list(self._chain["parts"])
        sizes = [] if changed is None else list(self._chain["sizes"])
        chain = {"parts": parts + [part.name], "sizes": sizes + [size],
                 "tables": {name: {"rows": table.rows, "layout": layout[name]}
                            for name, table in tables.items()}}
        save_npz(head, {**whole, CHAIN_KEY: np.array(json.dumps(chain))})
        self._head, self._chain = head, chain
        self.last_kind, self.last_bytes, self.last_head_bytes = kind, size, head.stat().st_size
        _remove_parts_but(head, set(chain["parts"]))
        log.debug("checkpoint %s: a %s of %.1f MB", head, kind, size / 1e6)
        return kind

    def _delta_rows(self, head: Path, tables: Mapping[str, Table],
                    layout: dict) -> dict[str, np.ndarray] | None:
        """The rows each table's delta holds; None where the save must write a base."""
        chain = self._chain
        if (chain is None or head != self._head or not head.exists()
                or not all((head.parent / part).exists() for part in chain["parts"])):
            return None
        saved = chain["tables"]
        if set(saved) != set(tables) or any(saved[name]["layout"] != layout[name]
                                            or saved[name]["rows"] > tables[name].rows
                                            for name in tables):
            return None
        rows = {name: _rows_to_write(table, saved[name]["rows"])
                for name, table in tables.items()}
        delta_bytes = sum(_delta_bytes(table, len(rows[name])) for name, table in tables.items())
        written = sum(chain["sizes"][1:]) + delta_bytes
        if (len(chain["parts"]) - 1 >= self.max_deltas
                or written > self.compact_share * chain["sizes"][0]):
            return None
        return rows


def load_checkpoint(head: Path, skip: Collection[str] = ()) -> dict[str, np.ndarray] | None:
    """Every array of the checkpoint at ``head`` but those named in ``skip``, its tables
    assembled from their base and deltas (and its :data:`CHAIN_KEY`, for
    :meth:`ChainWriter.continue_from`); None if there is no head. A whole checkpoint reads as
    it is. Raises :class:`DamagedCheckpoint` for a file that does not read, or a part named
    that is gone."""
    head = Path(head)
    for attempt in range(2):
        data = load_npz(head, skip)
        if data is None or CHAIN_KEY not in data:
            return data
        try:
            chain = json.loads(str(data[CHAIN_KEY]))
            return {**data, **_assembled(head, chain, skip)}
        except _PartGone as gone:
            if attempt:  # the head named it twice: not a new base under way
                raise DamagedCheckpoint(f"{head} names {gone}, which is not there: restore it, "
                                        "or remove the head and its parts to start the model "
                                        "empty") from None
        except DamagedCheckpoint:
            raise
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as error:
            raise DamagedCheckpoint(f"{head} and its parts do not add up ({error!r}): restore "
                                    "them, or remove the head and its parts to start the model "
                                    "empty") from error
    raise AssertionError("unreachable")


class _PartGone(Exception):
    pass


def _assembled(head: Path, chain: dict, skip: Collection[str]) -> dict[str, np.ndarray]:
    """The tables of ``chain``: its base's rows, grown to the rows saved last, then each
    delta's rows written over them in order. Every row must come from some part."""
    parts = chain["parts"]
    base = _read_part(head, parts[0], skip)
    arrays, covered = {}, {}
    for table, meta in chain["tables"].items():
        rows = int(meta["rows"])
        based = int(base[f"based.{table}"])
        if based > rows:
            raise ValueError(f"{parts[0]} holds {based} rows of {table}, not {rows}")
        for name in (name for name in meta["layout"] if name not in skip):
            saved = base.pop(name)  # not held beside its grown copy
            if len(saved) != based:
                raise ValueError(f"{parts[0]} holds {len(saved)} rows of {name}, not {based}")
            arrays[name] = saved if based == rows else _grown(saved, rows)
        covered[table] = np.zeros(rows, dtype=bool)
        covered[table][:based] = True
    for part in parts[1:]:
        delta = _read_part(head, part, skip)
        for table, meta in chain["tables"].items():
            rows = delta[f"rows.{table}"]
            for name in (name for name in meta["layout"] if name not in skip):
                arrays[name][rows] = delta[name]
            covered[table][rows] = True
    for table, done in covered.items():
        if not done.all():
            raise ValueError(f"{int((~done).sum())} rows of {table} are in no part")
    return arrays


def _read_part(head: Path, name: str, skip: Collection[str]) -> dict[str, np.ndarray]:
    if Path(name).name != name:
        raise ValueError(f"a part named {name!r} outside the head's folder")
    try:
        data = load_npz(head.parent / name, skip)
    except DamagedCheckpoint as error:
        raise DamagedCheckpoint(f"{name}, a part of the checkpoint {head}, does not read "
                                f"({error.__cause__!r}): restore it, or remove the head and "
                                "its parts to start the model empty") from error
    if data is None:
        raise _PartGone(name)
    return data


def _grown(array: np.ndarray, rows: int) -> np.ndarray:
    grown = np.zeros((rows,) + array.shape[1:], dtype=array.dtype)
    grown[: len(array)] = array
    return grown


def _layout(table: Table) -> dict[str, list]:
    """Each array's type and the shape of its rows: a delta can only follow a base of the
    same layout."""
    return {name: [array.dtype.str, list(array.shape[1:])]
            for name, array in table.arrays.items()}


def _delta_bytes(table: Table, rows: int) -> int:
    """At most the bytes of a delta of ``rows`` rows of ``table`` (its row numbers and
    each array's header in the file included): a new base is written before the deltas
    pass their share, not after."""
    row = 8 + sum(array.itemsize * int(np.prod(array.shape[1:]))
                  for array in table.arrays.values())
    return rows * row + ARRAY_OVERHEAD * (len(table.arrays) + 1)


def _rows_to_write(table: Table, saved_rows: int) -> np.ndarray:
    """The changed rows, and every row added since the last save."""
    changed = np.asarray(table.changed, dtype=np.int64)
    changed = changed[changed < saved_rows]
    return np.union1d(changed, np.arange(saved_rows, table.rows, dtype=np.int64))


def _base_arrays(tables: Mapping[str, Table]) -> dict[str, np.ndarray]:
    # views, not copies: a base is the whole state, and a copy would double a save's memory
    arrays = {f"based.{name}": np.array(table.rows) for name, table in tables.items()}
    arrays.update({name: array[: table.rows] for table in tables.values()
                   for name, array in table.arrays.items()})
    return arrays


def _delta_arrays(tables: Mapping[str, Table],
                  rows: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    arrays = {}
    for table_name, table in tables.items():
        arrays[f"rows.{table_name}"] = rows[table_name]
        arrays.update({name: array[rows[table_name]] for name, array in table.arrays.items()})
    return arrays


def _part_pattern(head: Path) -> re.Pattern:
    return re.compile(re.escape(head.name) + r"\.part(\d+)")


def _next_part(head: Path) -> Path:
    """A part's name that no file beside the head has (parts a crashed save left included):
    a save never writes over a part the head on the disk may name."""
    pattern = _part_pattern(head)
    numbers = [int(found.group(1)) for found in map(pattern.fullmatch, _names_beside(head))
               if found]
    return head.with_name(f"{head.name}.part{max(numbers, default=0) + 1:06d}")


def _remove_parts_but(head: Path, kept: set[str]) -> None:
    pattern = _part_pattern(head)
    for name in _names_beside(head):
        if pattern.fullmatch(name) and name not in kept:
            (head.parent / name).unlink(missing_ok=True)


def _names_beside(head: Path) -> list[str]:
    return [entry.name for entry in head.parent.iterdir()] if head.parent.is_dir() else []
