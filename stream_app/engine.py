"""What the agents do, without Faust: take an event into state, answer a request.

The agents in :mod:`stream_app.app` only decode, call these methods, write the table and send.
Keeping the logic here means it is tested without a broker and reused by the evaluation harness.
"""

from __future__ import annotations

import time
from pathlib import Path

from state.history import History
from state.popularity import DecayedPopularity

from .settings import Settings
from .wire import SOURCES, Event, InvalidMessage, RecItem, RecRequest, RecResponse


class Engine:
    """The worker's model state and the decisions made on it."""

    #: sources this worker can serve; others named in a request fall back to popularity
    available_sources = ("popular",)

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.popularity = DecayedPopularity(settings.popularity_half_life_s,
                                            refresh_s=settings.popularity_refresh_s)
        self.users = 0  # users whose history this worker holds
        self.model_version = 0

    # -- events ---------------------------------------------------------------------------
    def ingest(self, event: Event, history: History) -> History | None:
        """Learn from one valid event; returns the new history, or None for a redelivery
        (same ``event_id`` already in the user's window), which changes nothing."""
        if history.has_event(event.event_id):
            return None
        if not history:
            self.users += 1
        weight = self.settings.kind_weights[event.kind]
        self.popularity.add(event.item_id, event.ts, weight)
        return history.appended(event.item_id, event.kind, event.ts, event.event_id,
                                self.settings.history_length)

    # -- requests -------------------------------------------------------------------------
    def check_reply_to(self, request: RecRequest) -> None:
        """Only response topics may be written by request: a client must not be able to make
        the worker produce into ``timeline-events`` or any other topic."""
        prefix = self.settings.topic_responses
        if request.reply_to is not None and not request.reply_to.startswith(prefix):
            raise InvalidMessage("schema", f"reply_to must start with {prefix!r}")

    def answer(self, request: RecRequest, history: History, started: float) -> RecResponse:
        """Top-k for the user: seen items (stored history plus the request's) are excluded
        when ``exclude_seen``; an unknown user gets plain popularity."""
        seen: set[str] = set()
        if request.exclude_seen:
            seen = set(history.items) | set(request.history or ())
        ranked = self.popularity.top(request.k, exclude=seen)
        items = [RecItem(item_id=item_id, score=score, source="popular")
                 for item_id, score in ranked]
        return RecResponse(request_id=request.request_id, user_id=request.user_id, items=items,
                           model_version=self.model_version, index_version=None,
                           took_ms=(time.perf_counter() - started) * 1000.0)

    # -- persistence ----------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.settings.data_dir / "checkpoints"

    def save(self) -> None:
        self.popularity.save(self.checkpoint_dir / "popularity.npz")

    def load(self) -> bool:
        return self.popularity.load(self.checkpoint_dir / "popularity.npz")


assert set(Engine.available_sources) <= set(SOURCES)
