"""The reply client on a real embedded broker, without a worker: answers are produced by hand."""

from __future__ import annotations

import uuid

from stream_app.client import RecClient
from stream_app.kafka import ensure_topics

from .conftest import answer


def test_a_client_keeps_only_answers_it_waits_for(settings):
    """Other clients' answers and a second copy of its own (delivery is at least once) are
    skipped: a long-lived client on a shared response topic holds nothing it will not return."""
    ensure_topics(settings, [settings.topic_responses])
    with RecClient(settings) as client:
        mine, theirs = uuid.uuid4().hex, uuid.uuid4().hex
        answer(settings, theirs, mine)
        assert client.wait(mine, timeout_s=20.0).request_id == mine
        later = uuid.uuid4().hex
        answer(settings, mine, theirs, later)  # a duplicate of mine, theirs again, then later
        assert client.wait(later, timeout_s=20.0).request_id == later
        assert client._pending == {} and client._awaited == set()
