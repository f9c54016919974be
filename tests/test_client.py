"""The reply client on a real embedded broker, without a worker: answers are produced by hand."""

from __future__ import annotations

import threading
import time
import uuid
from types import SimpleNamespace

import pytest
from kafka.errors import KafkaTimeoutError, TopicAuthorizationFailedError

from stream_app import client as client_module
from stream_app.client import RecClient, ResponseTimeout
from stream_app.kafka import ensure_topics
from stream_app.settings import Settings
from stream_app.wire import RecRequest, RecResponse

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
        assert client._pending == {} and not client._awaited


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
        assert client._pending == {} and not client._awaited


def test_a_reply_topic_the_workers_would_refuse_is_refused_at_once(settings):
    """Workers answer only on topics that start with the responses topic's name; a client
    listening elsewhere would time out on every request, so it is not made."""
    with pytest.raises(ValueError, match="reply_to must start with"):
        RecClient(settings, reply_to="my-answers")


def test_a_missing_reply_topic_is_waited_for_no_longer_than_the_connect_timeout(settings):
    """``streamrec recommend --timeout 1`` against a broker without the responses topic (no
    worker ever started) ends after about its second, not after a fixed wait of ten."""
    started = time.monotonic()
    with pytest.raises(ResponseTimeout, match="does not exist"):
        RecClient(settings, connect_timeout_s=1.0)
    assert time.monotonic() - started < client_module.TOPIC_WAIT_S / 2


def test_requests_of_a_window_that_timed_out_are_forgotten_with_their_late_answers(settings):
    """``ask_many`` gives up a whole window when its time runs out: none of its requests is
    awaited any longer, so their late answers are skipped rather than kept for ever."""
    ensure_topics(settings, [settings.topic_responses, settings.topic_requests])
    with RecClient(settings) as client:
        window = [RecRequest(request_id=uuid.uuid4().hex, history=["a"]) for _ in range(3)]
        with pytest.raises(ResponseTimeout):
            client.ask_many(window, timeout_s=0.5)
        later = uuid.uuid4().hex
        answer(settings, *(request.request_id for request in window), later)
        assert client.wait(later, timeout_s=20.0).request_id == later
        assert client._pending == {} and not client._awaited


class Sending:
    """A send's future as kafka-python's: ``get`` waits (here: moves the clock) or raises."""

    def __init__(self, clock: list[float], error: Exception | None = None) -> None:
        self.clock, self.error = clock, error

    def get(self, timeout: float):
        if self.error is not None:
            raise self.error
        return None


def offline_client(clock: list[float], error: Exception | None = None) -> RecClient:
    """A client whose producer and consumer need no broker: its sends succeed (or fail with
    ``error``) and no answer ever comes; each poll takes its whole timeout on ``clock``."""
    client = object.__new__(RecClient)
    client.settings = Settings()
    client.reply_to = client.settings.topic_responses
    client._guard = None
    client._begin_waits()
    client._producer = SimpleNamespace(send=lambda *args, **kwargs: Sending(clock, error))

    def poll(timeout_ms: int) -> dict:
        clock[0] += max(timeout_ms, 1) / 1000  # a poll of 0 ms takes some time too
        return {}

    client._consumer = SimpleNamespace(poll=poll)
    return client


def test_a_window_of_requests_is_bounded_by_one_timeout_not_one_per_request(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(client_module.time, "monotonic", lambda: clock[0])
    client = offline_client(clock)
    window = [RecRequest(request_id=f"r{n}", history=["a"]) for n in range(5)]
    with pytest.raises(ResponseTimeout):
        client.ask_many(window, timeout_s=1.0)
    assert clock[0] == pytest.approx(1.0, abs=0.21)  # not five seconds
    assert not client._awaited


@pytest.mark.parametrize("error, raised", [
    (TopicAuthorizationFailedError(), TopicAuthorizationFailedError),
    (KafkaTimeoutError(), ResponseTimeout),  # not sent in time: a broker not there yet
])
def test_a_request_that_was_not_sent_raises_at_once(monkeypatch, error, raised):
    """No answer can come to a request the broker refused: the caller hears why, now."""
    clock = [0.0]
    monkeypatch.setattr(client_module.time, "monotonic", lambda: clock[0])
    client = offline_client(clock, error)
    with pytest.raises(raised):
        client.recommend("u1", timeout_s=5.0)
    with pytest.raises(raised):
        client.ask_many([RecRequest(request_id="r", history=["a"])], timeout_s=5.0)
    assert clock[0] == 0.0 and not client._awaited


def test_a_request_the_producer_could_not_take_is_not_awaited(monkeypatch):
    """kafka-python's send raises itself when it waited too long for metadata or room in
    its buffer: a ResponseTimeout, and neither that request nor the window's earlier ones
    stay awaited."""
    clock = [0.0]
    client = offline_client(clock)
    sends = []

    def send(*args, **kwargs):
        sends.append(args)
        if len(sends) % 2 == 0:
            raise KafkaTimeoutError("metadata not updated after 60000 ms")
        return Sending(clock)

    client._producer = SimpleNamespace(send=send)
    with pytest.raises(ResponseTimeout):
        client.ask_many([RecRequest(request_id=f"r{n}", history=["a"]) for n in range(3)])
    assert not client._awaited
    sends.clear()
    sends.append(None)  # the next send raises
    with pytest.raises(ResponseTimeout):
        client.recommend("u1")
    assert not client._awaited


def test_requests_are_answered_on_the_topic_the_client_reads():
    """A client on its own reply topic sets it on every request it sends that names none
    (``send`` and ``ask_many`` too, not only ``recommend``); a request naming another topic
    is sent as it is."""
    import json

    clock = [0.0]
    client = offline_client(clock)
    client.reply_to = client.settings.topic_responses + ".checkout"
    sent = []
    client._producer = SimpleNamespace(
        send=lambda topic, key, value: sent.append(json.loads(value)) or Sending(clock))
    client.send(RecRequest(request_id="a", user_id="u1"))
    with pytest.raises(ResponseTimeout):
        client.ask_many([RecRequest(request_id="b", user_id="u1")], timeout_s=0.5)
    with pytest.raises(ResponseTimeout):
        client.recommend("u1", timeout_s=0.5, request_id="mine")
    elsewhere = client.settings.topic_responses + ".elsewhere"
    client.send(RecRequest(request_id="c", user_id="u1", reply_to=elsewhere))
    assert [(request["request_id"], request["reply_to"]) for request in sent] == [
        ("a", client.reply_to), ("b", client.reply_to), ("mine", client.reply_to),
        ("c", elsewhere)]


def test_a_replay_whose_events_the_broker_refused_raises_not_reports_them_sent(monkeypatch):
    """kafka-python's flush does not raise a failed delivery: the replay follows each one,
    and says how many the broker did not take."""
    from kafka.errors import MessageSizeTooLargeError

    class Delivery:
        def __init__(self, error) -> None:
            self.error = error

        def add_errback(self, errback) -> None:
            if self.error is not None:
                errback(self.error)

    sends = []
    sink = SimpleNamespace(
        send=lambda topic, key, value: sends.append(key) or Delivery(
            MessageSizeTooLargeError() if len(sends) == 2 else None),
        flush=lambda: None, close=lambda timeout=None: None)
    monkeypatch.setattr(client_module, "producer", lambda settings, **options: sink)
    events = [{"v": 1, "user_id": f"u{n}", "item_id": "i", "kind": "view", "ts": 1.0}
              for n in range(3)]
    with pytest.raises(RuntimeError, match="did not take 1 of the 3 records"):
        client_module.replay(Settings(), events)
    assert len(sends) == 3


def test_one_client_serves_many_threads(settings):
    """A web server's threads share one client: each waits for its own answer at the same
    time as the others, and gets it (kafka-python's consumer is not thread-safe: one thread
    at a time polls, for all)."""
    ensure_topics(settings, [settings.topic_responses])
    ids = [uuid.uuid4().hex for _ in range(16)]
    got: dict[str, str] = {}
    failed: list[BaseException] = []
    with RecClient(settings) as client:
        polling, most = [0], [0]  # threads in the consumer's poll: now, at most
        poll = client._consumer.poll

        def counted_poll(**kwargs):
            polling[0] += 1
            most[0] = max(most[0], polling[0])
            try:
                return poll(**kwargs)
            finally:
                polling[0] -= 1

        client._consumer.poll = counted_poll

        def wait(request_id: str) -> None:
            try:
                got[request_id] = client.wait(request_id, timeout_s=30.0).request_id
            except BaseException as error:  # noqa: BLE001 - reported below
                failed.append(error)

        threads = [threading.Thread(target=wait, args=(request_id,)) for request_id in ids]
        for thread in threads:
            thread.start()
        while len(client._awaited) < len(ids):  # an answer before its wait is not kept
            time.sleep(0.01)
        for request_id in reversed(ids):
            answer(settings, request_id)
        for thread in threads:
            thread.join(60)
        assert not failed, failed
        assert got == {request_id: request_id for request_id in ids}
        assert client._pending == {} and not client._awaited
        assert most == [1]


def test_a_wait_whose_poll_fails_forgets_its_request():
    """A poll that raises (a broker error, an interrupt) ends the wait with that error; the
    request is no longer awaited, so its late answer is not kept for ever."""
    client = offline_client([0.0])

    def failing_poll(timeout_ms: int) -> dict:
        raise KeyboardInterrupt

    client._consumer = SimpleNamespace(poll=failing_poll)
    with pytest.raises(KeyboardInterrupt):
        client.wait("r1", timeout_s=5.0)
    assert not client._awaited and not client._polling
    client._take(RecResponse(request_id="r1", items=[]).to_bytes())
    assert client._pending == {}


def test_the_first_of_two_answers_to_a_request_is_the_one_kept(monkeypatch):
    """Two answers to one id taken before its wait (delivery is at least once; a worker
    sends an "undelivered" error for an answer the broker took late after all): the first
    is returned, as the request reader's docstring promises; the later one replaced it."""
    clock = [0.0]
    monkeypatch.setattr(client_module.time, "monotonic", lambda: clock[0])
    client = offline_client(clock)
    client.send(RecRequest(request_id="r1", history=["a"]))
    client._take(RecResponse(request_id="r1", items=[]).to_bytes())
    client._take(RecResponse(request_id="r1", error="undelivered: late").to_bytes())
    assert client.wait("r1", timeout_s=1.0).error is None


def test_a_request_sent_without_a_wait_is_forgotten_with_its_answer_after_a_while(
        monkeypatch):
    """A caller may send requests it never waits for: their answers are kept for a later
    wait only ``UNWAITED_KEEP_S``, then forgotten by a poll, so a long-lived client does not
    grow by each of them. A wait keeps its request however long after the send it began."""
    clock = [0.0]
    monkeypatch.setattr(client_module.time, "monotonic", lambda: clock[0])
    client = offline_client(clock)
    for request_id in ("never-waited", "waited-late", "waited-long"):
        client.send(RecRequest(request_id=request_id, history=["a"]))
    client._take(RecResponse(request_id="never-waited").to_bytes())
    clock[0] = client_module.UNWAITED_KEEP_S - 1
    client._take(RecResponse(request_id="waited-late").to_bytes())
    assert client.wait("waited-late", timeout_s=1.0).request_id == "waited-late"
    with pytest.raises(ResponseTimeout):  # polls past the moment of the two others
        client.wait("waited-long", timeout_s=client_module.FORGET_EVERY_S + 5)
    assert not client._awaited and client._pending == {}

    client.send(RecRequest(request_id="waited-for-a-long-time", history=["a"]))
    waited = []

    def poll(timeout_ms: int) -> dict:  # answers once the request is far past its moment
        clock[0] += max(timeout_ms, 1) / 1000  # a poll of 0 ms takes some time too
        if clock[0] > 2 * client_module.UNWAITED_KEEP_S + 100 and not waited:
            waited.append(1)
            client._take(RecResponse(request_id="waited-for-a-long-time").to_bytes())
        return {}

    client._consumer.poll = poll
    late = client.wait("waited-for-a-long-time", timeout_s=client_module.UNWAITED_KEEP_S + 200)
    assert late.request_id == "waited-for-a-long-time" and not client._awaited


def test_a_caller_that_only_sends_does_not_grow_the_client(monkeypatch):
    """Without any wait no poll runs: the sends themselves forget the requests past their
    moment."""
    clock = [0.0]
    monkeypatch.setattr(client_module.time, "monotonic", lambda: clock[0])
    client = offline_client(clock)
    for n in range(100):
        client.send(RecRequest(request_id=f"r{n}", history=["a"]))
        clock[0] += client_module.UNWAITED_KEEP_S / 20
    assert 0 < len(client._awaited) <= 21


def test_a_window_longer_than_the_keep_of_a_send_keeps_the_answers_that_came_early(
        monkeypatch):
    """``ask_many`` sends a window, then waits for its requests one after the other: the
    answers of later requests that come while an earlier one is waited for are kept for
    the window's whole timeout, also one longer than ``UNWAITED_KEEP_S``."""
    clock = [0.0]
    monkeypatch.setattr(client_module.time, "monotonic", lambda: clock[0])
    client = offline_client(clock)
    late = client_module.UNWAITED_KEEP_S + 100

    def poll(timeout_ms: int) -> dict:  # r1 and r2 answered at once, r0 after `late` s
        clock[0] += max(timeout_ms, 1) / 1000  # a poll of 0 ms takes some time too
        for request_id in ("r1", "r2") if clock[0] < 1 else ("r0",) if clock[0] > late else ():
            client._take(RecResponse(request_id=request_id).to_bytes())
        return {}

    client._consumer.poll = poll
    window = [RecRequest(request_id=f"r{n}", history=["a"]) for n in range(3)]
    answers = client.ask_many(window, timeout_s=late + 200)
    assert sorted(answers) == ["r0", "r1", "r2"] and not client._awaited


def test_the_clients_producers_keep_a_users_order_and_a_timeout_bounds_their_sends(
        monkeypatch):
    """One request in flight per connection: with several, a batch retried after a leader's
    change could land after a later one, and a user's events reached the worker out of order.
    A client with a connect timeout waits no longer for a topic's metadata at a send (60 s by
    default)."""
    import kafka

    from stream_app.client import producer

    made = []
    monkeypatch.setattr(kafka, "KafkaProducer", lambda **options: made.append(options))
    producer(Settings())
    assert made[-1]["max_in_flight_requests_per_connection"] == 1
    with pytest.raises(Exception):  # noqa: B017 - stops at the consumer, the producer made
        RecClient(Settings(broker="127.0.0.1:1"), connect_timeout_s=2.5)
    assert made[-1]["max_block_ms"] == 2500
