"""Read interaction files into one time-ordered log, and turn a log into timeline events.

Formats (the three of the shared datasets, plus our own wire format):

- ``movielens``: CSV ``userId,movieId,rating,timestamp`` with a header. Ratings >= 4 become
  ``click`` events (a strong positive), lower ratings ``view`` events.
- ``sequences``: one line per user, ``user item item ...`` in time order, no timestamps.
- ``pairs``: one line per interaction, ``user item``, each user's lines in time order.
- ``jsonl``: one wire-format event (JSON object) per line, validated as a worker validates
  it, except that any kind passes (a worker takes the kinds it is configured for, and a
  bootstrap leaves out the others, as a worker would). A line a worker would refuse is not
  repaired: the file is refused, at its first such line. So is an erasure line
  (``{"user_id": "u1", "forget": true}``): the log is sorted by time and an erasure has none,
  so a replay could not place it among the user's events (send it with ``streamrec forget``).

Every file is read as UTF-8 (a byte-order mark, as Excel writes one, is skipped). A malformed
file is refused with a ValueError that names the file, the line and what is wrong with it. The
format, when not given, is guessed by the suffix and then by the first lines, and a file that
they do not tell for sure is refused rather than misread (see :func:`guess_format`).

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
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .wire import MAX_ID_CHARS, Event, ForgetUser, InvalidMessage, decode_event

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
    ``sequences`` file whose first users have one item each reads as pairs: the same events),
    ``sequences`` when their lengths vary. Anything else is refused with a ValueError that asks
    for ``--format``: a file misread as sequences gave events of ratings and times as items
    (MovieLens' ``u.data``), or no events at all, and its replay said it had succeeded."""
    if path.suffix == ".jsonl":
        return "jsonl"
    if path.suffix == ".csv":
        return "movielens"
    with open(path, encoding="utf-8-sig") as handle:
        lines = [(number, line) for number, line in zip(range(1, GUESS_LINES + 1), handle)
                 if line.strip()]
    doubt = _doubt(lines)
    if doubt:
        raise ValueError(f"{path}: {doubt}; its format is not guessed: name it with "
                         f"--format {'|'.join(FORMATS)}")
    return "pairs" if {len(line.split()) for _, line in lines} == {2} else "sequences"


def _doubt(lines: list[tuple[int, str]]) -> str | None:
    """Why the first lines (number, text) may be neither pairs nor sequences, or None."""
    if not lines:
        return "it has no lines with data"
    for number, line in lines:
        if line.lstrip().startswith(("{", "[", '"')):
            return f"line {number} starts as JSON does (events: --format jsonl)"
        if "::" in line:
            return f"line {number} has '::' (MovieLens' ratings.dat?)"
        if "," in line:
            return f"line {number} has ',' (a CSV file?)"
    widths = {len(line.split()) for _, line in lines}
    if widths == {1}:
        return "no line has an item after its user"
    if len(widths) == 1 and widths != {2}:
        return (f"each of its first {len(lines)} lines has {widths.pop()} fields: a table "
                "(user, item, rating, time, as MovieLens' u.data?) rather than sequences, "
                "whose lengths vary")
    return None


def load(path: Path, fmt: str | None = None, *, seed: int = 0) -> InteractionLog:
    """Load ``path`` (a file, or a dataset folder holding exactly one known file); ValueError
    for a malformed file, and for one whose format, guessed, gives no events."""
    path = _resolve(Path(path))
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    try:
        read_as = fmt or guess_format(path)
        log = {"movielens": _movielens, "sequences": _sequences, "pairs": _pairs,
               "jsonl": _jsonl}[read_as](path, seed)
    except UnicodeDecodeError as error:  # a ValueError that would not name the file
        raise ValueError(f"{path}: not UTF-8 text ({error.reason})") from None
    if fmt is None and not len(log):
        raise ValueError(f"{path}: no events when read as {read_as} (guessed); name its "
                         f"format with --format {'|'.join(FORMATS)}")
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


MOVIELENS_COLUMNS = ("userId", "movieId", "rating", "timestamp")


def _movielens(path: Path, seed: int) -> InteractionLog:
    users, items, ratings, ts = [], [], [], []
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = next(reader, [])
        columns = _movielens_columns(path, header)
        for row in reader:
            if row:  # a blank line
                user, item, rating, time = _movielens_row(path, reader.line_num, row, header,
                                                          columns)
                users.append(user)
                items.append(item)
                ratings.append(rating)
                ts.append(time)
    users_arr, items_arr = np.array(users, dtype=np.str_), np.array(items, dtype=np.str_)
    ts_arr = np.array(ts, dtype=np.float64)
    kinds = np.where(np.array(ratings) >= 4.0, "click", "view")
    by_time = np.lexsort((np.arange(len(ts_arr)), ts_arr))  # stable: file order breaks ties
    return _with_order(users_arr[by_time], items_arr[by_time], kinds[by_time], ts_arr[by_time])


def _movielens_columns(path: Path, header: list[str]) -> list[int]:
    """Where each of ``MOVIELENS_COLUMNS`` is in the header (any order, more columns allowed)."""
    missing = [name for name in MOVIELENS_COLUMNS if name not in header]
    if missing:
        raise ValueError(f"{path}:1: a movielens file starts with the header "
                         f"{','.join(MOVIELENS_COLUMNS)}; this one's lacks {', '.join(missing)} "
                         f"(its first line: {','.join(header)[:100]!r})")
    return [header.index(name) for name in MOVIELENS_COLUMNS]


def _movielens_row(path: Path, number: int, row: list[str], header: list[str],
                   columns: list[int]) -> tuple[str, str, float, float]:
    """``(user, item, rating, ts)`` of a row; ValueError for one that a worker would refuse
    the event of (an empty id, a time that is not a number of seconds) or that is cut short."""
    if len(row) != len(header):
        raise ValueError(f"{path}:{number}: {len(row)} fields, where the header has "
                         f"{len(header)}")
    user, item, rating, time = (row[column] for column in columns)
    if not user or not item:
        raise ValueError(f"{path}:{number}: an empty userId or movieId")
    try:
        numbers = float(rating), float(time)
    except ValueError:
        numbers = (math.nan, math.nan)
    if not all(math.isfinite(value) for value in numbers) or numbers[1] < 0:
        raise ValueError(f"{path}:{number}: rating {rating!r} and timestamp {time!r} are not "
                         "both numbers (the timestamp in seconds, >= 0)")
    return user, item, numbers[0], numbers[1]


def _sequences(path: Path, seed: int) -> InteractionLog:
    users, items = [], []
    with open(path, encoding="utf-8-sig") as handle:
        for line in handle:
            if line.strip():
                user, *sequence = line.split()
                users.extend([user] * len(sequence))
                items.extend(sequence)
    return interleave(np.array(users, dtype=np.str_), np.array(items, dtype=np.str_), seed)


def _pairs(path: Path, seed: int) -> InteractionLog:
    users, items = [], []
    with open(path, encoding="utf-8-sig") as handle:
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
    with open(path, encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                event = _logged_event(path, number, line)
                users.append(event.user_id)
                items.append(event.item_id)
                kinds.append(event.kind)
                ts.append(event.ts)
                ids.append(event.event_id or "")
    ts_arr = np.array(ts, dtype=np.float64)
    by_time = np.argsort(ts_arr, kind="stable")
    log = _with_order(np.array(users, dtype=np.str_)[by_time],
                      np.array(items, dtype=np.str_)[by_time],
                      np.array(kinds, dtype=np.str_)[by_time], ts_arr[by_time])
    log.event_ids = np.array(ids, dtype=object)[by_time]
    return log


class _EveryKind(frozenset):
    """The kinds a log's line may have: any. They are checked where they are used: a worker
    takes the kinds it is configured for, a bootstrap leaves out the others."""

    def __contains__(self, kind: object) -> bool:
        return True


EVERY_KIND = _EveryKind()


def _logged_event(path: Path, number: int, line: str) -> Event:
    """Line ``number`` of a JSONL log, read as a worker reads an event; ValueError for a line
    the worker would refuse (repaired here, a null user_id was sent as "None"), and for an
    erasure, which has no time to be sorted by among the user's events."""
    raw = line.encode()
    try:  # any size: what is sent is the event's fields alone
        event = decode_event(raw, kinds=EVERY_KIND, max_bytes=len(raw))
    except InvalidMessage as error:
        raise ValueError(f"{path}:{number}: not an event a worker takes ({error})") from None
    if isinstance(event, ForgetUser):
        raise ValueError(f"{path}:{number}: an erasure of user {event.user_id!r}, which a "
                         "replay of a log sorted by time cannot place among the user's events; "
                         "leave it out of the file (and the user's events before it), and send "
                         "it with `streamrec forget`")
    return event


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
