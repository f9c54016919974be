"""A user's recent timeline: the last T events, stored as a JSON-safe value in a Faust table.

Kept as parallel lists (not a list of objects) so the stored JSON stays small and the lists can
become numpy arrays without a Python loop per event when the learners need them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import orjson

_SEQUENCES = (list, tuple)

#: most bytes of a stored history (its JSON): its changelog record, with its key, must stay
#: under the producer's request limit (Faust's ``producer_max_request_size``, 1,000,000
#: bytes), or the broker refuses it, it is sent again for ever, and its batch of events is
#: never committed
MAX_STORED_BYTES = 900_000
#: most bytes one event takes in a stored history: an item id and an event id of 256
#: characters that JSON escapes to 6 bytes each (a control character), a kind of 64, a time
WORST_EVENT_BYTES = (256 + 256 + 64) * 6 + 40


def last_active(stored: bytes) -> float | None:
    """The newest event time of a history as stored (its JSON), read without building the
    history: a sweep for expired histories reads every one a worker holds. None for bytes
    that do not read as a history with events (a damaged record is left to the reads that
    report it)."""
    try:
        times = orjson.loads(stored)["ts"]
        newest = max(times)
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None
    return float(newest) if isinstance(newest, int | float) and math.isfinite(newest) else None


def inactive_before(stored: bytes, before: float) -> bool:
    """Whether a stored history's newest event is older than ``before`` (never for one that
    does not read as a history: :func:`last_active`)."""
    newest = last_active(stored)
    return newest is not None and newest < before


class DamagedHistory(ValueError):
    """A stored value that is not a history this code wrote (a damaged changelog record)."""


@dataclass(frozen=True)
class Unreadable:
    """Stands for a stored value that could not be decoded at all, with the reason."""

    reason: str


@dataclass(frozen=True)
class History:
    items: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ()
    ts: tuple[float, ...] = ()
    event_ids: tuple[str, ...] = field(default=())  # "" where the event had no id
    phi_b64: str = ""  # the user's vector after the last event (float32, base64); "" = none
    # (partition, offset) in the events topic of the last event taken in, where known: a
    # message of the user at or below it was taken in already (read again after a crash)
    at: tuple[int, int] | None = None
    # the broker's id of the events topic ``at`` is in ("": not known): an events topic made
    # anew starts its offsets again, and its messages were never taken in
    topic: str = ""

    def __len__(self) -> int:
        return len(self.items)

    def seen(self) -> frozenset[str]:
        return frozenset(self.items)

    def has_event(self, event_id: str | None) -> bool:
        """True if an event with this id is already in the window (a redelivery)."""
        return bool(event_id) and event_id in self.event_ids

    def read_before(self, at: tuple[int, int] | None, topic: str = "") -> bool:
        """True if the message at ``at`` (partition, offset) of the events topic ``topic``
        (its id) was taken into this history already: a user's messages are taken in the
        order of its partition."""
        return at is not None and self.at is not None and at[0] == self.at[0] \
            and at[1] <= self.at[1] and topic == self.topic

    def appended(self, item_id: str, kind: str, ts: float, event_id: str | None,
                 limit: int, at: tuple[int, int] | None = None, topic: str = "") -> History:
        """A new history with the event (from ``at`` in the events topic of id ``topic``,
        where known) added and only the last ``limit`` events kept.

        Events are kept in arrival order; out-of-order timestamps are kept as they came,
        because arrival order is what the stream learns from.
        """
        keep = slice(-limit, None)
        return History(
            items=(self.items + (item_id,))[keep],
            kinds=(self.kinds + (kind,))[keep],
            ts=(self.ts + (float(ts),))[keep],
            event_ids=(self.event_ids + (event_id or "",))[keep],
            phi_b64=self.phi_b64,
            **self._last_taken(at, topic),
        )

    def _last_taken(self, at: tuple[int, int] | None, topic: str) -> dict:
        """Where the history stands once the message at ``at`` of ``topic`` is taken in
        (``at`` and ``topic``): never back within a topic."""
        if at is None or self.read_before(at, topic):
            return {"at": self.at, "topic": self.topic}
        return {"at": at, "topic": topic}

    def with_phi(self, phi_b64: str) -> History:
        # the constructor, not dataclasses.replace, which took twice as long: the ingest agent
        # calls this for every user of every batch
        return History(self.items, self.kinds, self.ts, self.event_ids, phi_b64, self.at,
                       self.topic)

    def fitting(self, max_bytes: int = MAX_STORED_BYTES) -> History:
        """The history, or, where its stored JSON is over ``max_bytes``, its newest events
        whose JSON is not (the longest such suffix). Only a long history with long ids comes
        near: a ``history_length`` of 300 events of the longest ids the wire takes."""
        if self.stored_bytes() <= max_bytes:
            return self
        fits, over = 0, len(self)  # events kept: the newest ``fits`` fit, ``over`` do not
        while over - fits > 1:
            middle = (fits + over) // 2
            if self.newest(middle).stored_bytes() <= max_bytes:
                fits = middle
            else:
                over = middle
        return self.newest(fits)

    def newest(self, count: int) -> History:
        """The history of the newest ``count`` events (its vector and place kept)."""
        keep = slice(len(self) - count, None)
        return History(self.items[keep], self.kinds[keep], self.ts[keep],
                       self.event_ids[keep], self.phi_b64, self.at, self.topic)

    def stored_bytes(self) -> int:
        """The bytes of the JSON it is stored as (the table's codec is orjson's)."""
        return len(orjson.dumps(self.to_json()))

    def to_json(self) -> dict:
        stored = {"items": list(self.items), "kinds": list(self.kinds), "ts": list(self.ts),
                  "ids": list(self.event_ids), "phi": self.phi_b64}
        if self.at is not None:
            stored["at"] = list(self.at)
        if self.topic:
            stored["topic"] = self.topic
        return stored

    @classmethod
    def from_json(cls, value: dict | None) -> History:
        """The history of a stored value; raises :class:`DamagedHistory` for one that is not
        a history (wrong fields, types or lengths), which every later event of the user
        would otherwise fail on, or take in as it is and pass on to the learner."""
        if not value:
            return cls()
        if isinstance(value, Unreadable):
            raise DamagedHistory(value.reason)
        if not isinstance(value, dict):
            raise DamagedHistory(f"a stored history is a JSON object, not {type(value).__name__}")
        try:
            return cls._checked(value)
        except (KeyError, TypeError, ValueError) as error:
            raise DamagedHistory(f"{type(error).__name__}: {error}") from None

    @classmethod
    def _checked(cls, value: dict) -> History:
        items, kinds, ts = value["items"], value["kinds"], value["ts"]
        ids, phi, at = value.get("ids", ()), value.get("phi", ""), value.get("at")
        topic = value.get("topic", "")
        if not all(isinstance(part, _SEQUENCES) for part in (items, kinds, ts, ids)):
            raise TypeError("items, kinds, ts and ids are lists")
        if not len(items) == len(kinds) == len(ts) or len(ids) not in (0, len(items)):
            raise ValueError("items, kinds, ts and ids differ in length")
        "".join(items), "".join(kinds), "".join(ids)  # TypeError unless all are strings
        # sum: TypeError unless all are numbers; not finite if one is not, or if the sum
        # passes 1e308 (then each is looked at)
        if not (math.isfinite(sum(ts)) or all(map(math.isfinite, ts))) \
                or not isinstance(phi, str):
            raise ValueError("times are finite numbers, the vector a string")
        if at is not None and not (isinstance(at, _SEQUENCES) and len(at) == 2 and all(
                type(n) is int and n >= 0 for n in at)):
            raise ValueError("at is a partition and an offset")
        if not isinstance(topic, str):
            raise TypeError("topic is a string")
        # no ids (a record written without them): an empty one each, so the lists stay in
        # step as events are appended (one appended to none made a history read as damaged)
        return cls(items=tuple(items), kinds=tuple(kinds), ts=tuple(ts),
                   event_ids=tuple(ids) if ids else ("",) * len(items), phi_b64=phi,
                   at=None if at is None else tuple(at), topic=topic)

    @classmethod
    def from_stored(cls, value: dict | None,
                    damaged: Callable[[DamagedHistory], None]) -> History:
        """:meth:`from_json`, or an empty history for a damaged value (after ``damaged`` is
        told): the user starts again, and the next write replaces the record, where a
        damaged one failed every event and answer of the user for good."""
        try:
            return cls.from_json(value)
        except DamagedHistory as error:
            damaged(error)
            return cls()
