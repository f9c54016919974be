"""Read interaction files into one time-ordered log, and turn a log into timeline events.

Formats (the three of the shared datasets, plus our own wire format):

- ``movielens``: CSV ``userId,movieId,rating,timestamp`` with a header. Ratings >= 4 become
  ``click`` events (a strong positive), lower ratings ``view`` events.
- ``sequences``: one line per user, ``user item item ...`` in time order, no timestamps.
- ``pairs``: one line per interaction, ``user item``, each user's lines in time order.
- ``jsonl``: one wire-format event (JSON object) per line.

Every event gets an id (what makes a redelivery harmless): a JSONL event keeps its own; the
others are named by the file's content and the event's place in its user's order, so the same
file replayed twice repeats its ids (and the second replay is ignored), while another file's
events, of the same users, never take them.

Files without timestamps become a stream that interleaves users while keeping each user's own
order: every user's events get sorted uniform random times (seeded), and the log is sorted by
them. This is a uniformly random merge of the per-user sequences, so the stream never replays
"user after user". Synthetic timestamps are then one second apart.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .wire import MAX_ID_CHARS

FORMATS = ("movielens", "sequences", "pairs", "jsonl")
SYNTHETIC_EPOCH = 1_600_000_000.0


@dataclass
class InteractionLog:
    """Parallel arrays in stream order. ``order`` is the user's own position (0, 1, ...)."""

    users: np.ndarray  # str
    items: np.ndarray  # str
    kinds: np.ndarray  # str
    ts: np.ndarray  # float64, non-decreasing
    order: np.ndarray  # int64
    source: str = ""  # names the file's content in the event ids made for it
    event_ids: np.ndarray | None = None  # str, the file's own ("" where an event had none)

    def __len__(self) -> int:
        return len(self.users)

    def events(self) -> Iterator[dict]:
        prefix = f"{self.source}:" if self.source else ""
        for i in range(len(self)):
            own = str(self.event_ids[i]) if self.event_ids is not None else ""
            yield {"v": 1, "event_id": own or made_event_id(prefix, str(self.users[i]),
                                                            int(self.order[i])),
                   "user_id": str(self.users[i]), "item_id": str(self.items[i]),
                   "kind": str(self.kinds[i]), "ts": float(self.ts[i])}


def made_event_id(prefix: str, user: str, order: int) -> str:
    """``PREFIX USER:ORDER``, within an id's ``MAX_ID_CHARS``: a user id too long for it is
    replaced by its digest (the user's events stay told apart)."""
    made = f"{prefix}{user}:{order}"
    if len(made) <= MAX_ID_CHARS:
        return made
    digest = hashlib.blake2b(user.encode(), digest_size=16).hexdigest()
    return f"{prefix}{digest}:{order}"


GUESS_LINES = 100


def guess_format(path: Path) -> str:
    """By the suffix, else by the first lines: ``pairs`` when each has two columns (a
    ``sequences`` file whose first user has one item reads as pairs by its first line)."""
    if path.suffix == ".jsonl":
        return "jsonl"
    if path.suffix == ".csv":
        return "movielens"
    with open(path) as handle:
        widths = {len(line.split()) for _, line in zip(range(GUESS_LINES), handle)
                  if line.strip()}
    return "pairs" if widths == {2} else "sequences"


def load(path: Path, fmt: str | None = None, *, seed: int = 0) -> InteractionLog:
    """Load ``path`` (a file, or a dataset folder holding exactly one known file)."""
    path = _resolve(Path(path))
    fmt = fmt or guess_format(path)
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    log = {"movielens": _movielens, "sequences": _sequences, "pairs": _pairs,
           "jsonl": _jsonl}[fmt](path, seed)
    log.source = content_tag(path)
    return log


def content_tag(path: Path) -> str:
    """A short digest of the file's bytes, for the event ids made for its events."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, lambda: hashlib.blake2b(digest_size=6)).hexdigest()


def _resolve(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_file():
        return path
    for name in ("ratings.csv", "Beauty.txt", "Toys_and_Games.txt", "Video.txt", "events.jsonl"):
        if (path / name).exists():
            return path / name
    raise FileNotFoundError(f"no known data file in {path}")


def _movielens(path: Path, seed: int) -> InteractionLog:
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    users = np.array([row["userId"] for row in rows], dtype=np.str_)
    items = np.array([row["movieId"] for row in rows], dtype=np.str_)
    ratings = np.array([float(row["rating"]) for row in rows])
    ts = np.array([float(row["timestamp"]) for row in rows])
    kinds = np.where(ratings >= 4.0, "click", "view")
    by_time = np.lexsort((np.arange(len(ts)), ts))  # stable: file order breaks ties
    return _with_order(users[by_time], items[by_time], kinds[by_time], ts[by_time])


def _sequences(path: Path, seed: int) -> InteractionLog:
    users, items = [], []
    with open(path) as handle:
        for line in handle:
            user, *sequence = line.split()
            users.extend([user] * len(sequence))
            items.extend(sequence)
    return interleave(np.array(users, dtype=np.str_), np.array(items, dtype=np.str_), seed)


def _pairs(path: Path, seed: int) -> InteractionLog:
    users, items = [], []
    with open(path) as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                fields = line.split()
                if len(fields) != 2:
                    raise ValueError(f"{path}:{number}: a pairs line is 'user item', this one "
                                     f"has {len(fields)} fields (--format sequences?)")
                users.append(fields[0])
                items.append(fields[1])
    return interleave(np.array(users, dtype=np.str_), np.array(items, dtype=np.str_), seed)


def _jsonl(path: Path, seed: int) -> InteractionLog:
    users, items, kinds, ts, ids = [], [], [], [], []
    with open(path) as handle:
        for line in handle:
            if line.strip():
                event = json.loads(line)
                users.append(event["user_id"])
                items.append(event["item_id"])
                kinds.append(event.get("kind", "view"))
                ts.append(float(event["ts"]))
                ids.append(event.get("event_id") or "")
    ts_arr = np.array(ts, dtype=np.float64)
    by_time = np.argsort(ts_arr, kind="stable")
    log = _with_order(np.array(users, dtype=np.str_)[by_time],
                      np.array(items, dtype=np.str_)[by_time],
                      np.array(kinds, dtype=np.str_)[by_time], ts_arr[by_time])
    log.event_ids = np.array(ids, dtype=object)[by_time]
    return log


def interleave(users: np.ndarray, items: np.ndarray, seed: int) -> InteractionLog:
    """Uniformly random merge of per-user sequences, each user's order kept (seeded).

    ``users``/``items`` list each user's events in that user's order (users may be grouped).
    """
    rng = np.random.default_rng(seed)
    n = len(users)
    order = _position_within_user(users)
    keys = rng.random(n)
    # Sort each user's random keys and hand them out in the user's own order.
    by_user_then_key = np.lexsort((keys, users))
    by_user_then_pos = np.lexsort((order, users))
    sorted_keys = np.empty(n)
    sorted_keys[by_user_then_pos] = keys[by_user_then_key]
    stream = np.argsort(sorted_keys, kind="stable")
    ts = SYNTHETIC_EPOCH + np.arange(n, dtype=np.float64)
    kinds = np.full(n, "view")  # dtype=np.str_ here would truncate every kind to "v"
    return InteractionLog(users[stream], items[stream], kinds, ts, order[stream])


def _position_within_user(users: np.ndarray) -> np.ndarray:
    """0, 1, 2, ... within each user, in array order."""
    grouped = np.argsort(users, kind="stable")
    sorted_users = users[grouped]
    starts = np.r_[0, np.flatnonzero(sorted_users[1:] != sorted_users[:-1]) + 1]
    lengths = np.diff(np.r_[starts, len(users)])
    positions = np.arange(len(users)) - np.repeat(starts, lengths)
    order = np.empty(len(users), dtype=np.int64)
    order[grouped] = positions
    return order


def _with_order(users, items, kinds, ts) -> InteractionLog:
    return InteractionLog(users, items, kinds, ts, _position_within_user(users))
