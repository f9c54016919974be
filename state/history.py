"""A user's recent timeline: the last T events, stored as a JSON-safe value in a Faust table.

Kept as parallel lists (not a list of objects) so the stored JSON stays small and the lists can
become numpy arrays without a Python loop per event when the learners need them.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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

    def __len__(self) -> int:
        return len(self.items)

    def seen(self) -> frozenset[str]:
        return frozenset(self.items)

    def has_event(self, event_id: str | None) -> bool:
        """True if an event with this id is already in the window (a redelivery)."""
        return bool(event_id) and event_id in self.event_ids

    def read_before(self, at: tuple[int, int] | None) -> bool:
        """True if the message at ``at`` (partition, offset) was taken into this history
        already: a user's messages are taken in the order of its partition."""
        return at is not None and self.at is not None and at[0] == self.at[0] \
            and at[1] <= self.at[1]

    def appended(self, item_id: str, kind: str, ts: float, event_id: str | None,
                 limit: int, at: tuple[int, int] | None = None) -> History:
        """A new history with the event (from ``at`` in the events topic, where known)
        added and only the last ``limit`` events kept.

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
            at=self._last_taken(at),
        )

    def _last_taken(self, at: tuple[int, int] | None) -> tuple[int, int] | None:
        """Where the history stands once the message at ``at`` is taken in: never back (an
        event added again while its partition is read again, one without an id, is below)."""
        return self.at if at is None or self.read_before(at) else at

    def with_phi(self, phi_b64: str) -> History:
        # the constructor, not dataclasses.replace, which took twice as long: the ingest agent
        # calls this for every user of every batch
        return History(self.items, self.kinds, self.ts, self.event_ids, phi_b64, self.at)

    def to_json(self) -> dict:
        stored = {"items": list(self.items), "kinds": list(self.kinds), "ts": list(self.ts),
                  "ids": list(self.event_ids), "phi": self.phi_b64}
        if self.at is not None:
            stored["at"] = list(self.at)
        return stored

    @classmethod
    def from_json(cls, value: dict | None) -> History:
        if not value:
            return cls()
        at = value.get("at")
        return cls(items=tuple(value["items"]), kinds=tuple(value["kinds"]),
                   ts=tuple(value["ts"]), event_ids=tuple(value.get("ids", ())),
                   phi_b64=value.get("phi", ""), at=None if at is None else tuple(at))
