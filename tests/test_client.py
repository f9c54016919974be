"""The reply client on a real embedded broker, without a worker: answers are produced by hand."""

from __future__ import annotations

import uuid

import pytest

from stream_app.client import RecClient, ResponseTimeout
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


def test_an_answer_that_comes_after_its_wait_gave_up_is_not_kept(settings):
    """A request the client stopped waiting for (ResponseTimeout) is no longer awaited: its
    late answer is skipped, as another client's is."""
    ensure_topics(settings, [settings.topic_responses])
    with RecClient(settings) as client:
        late, later = uuid.uuid4().hex, uuid.uuid4().hex
        with pytest.raises(ResponseTimeout):
            client.wait(late, timeout_s=0.5)
        answer(settings, late, later)
        assert client.wait(later, timeout_s=20.0).request_id == later
        assert client._pending == {} and client._awaited == set()


def test_a_reply_topic_the_workers_would_refuse_is_refused_at_once(settings):
    """Workers answer only on topics that start with the responses topic's name; a client
    listening elsewhere would time out on every request, so it is not made."""
    with pytest.raises(ValueError, match="reply_to must start with"):
        RecClient(settings, reply_to="my-answers")
