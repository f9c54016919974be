"""Plain Kafka clients (kafka-python): replay events, ask for recommendations.

These are what any application does to talk to streamrec; nothing here needs Faust.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterable

from .compat import FetchWaitGuard
from .kafka import client_config, ensure_topics
from .settings import Settings
from .wire import ForgetUser, ItemWithdrawal, RecRequest, RecResponse


class ResponseTimeout(TimeoutError):
    pass


#: longest a client's close waits for what its producer still holds
CLOSE_TIMEOUT_S = 10.0
#: longest a client waits for its reply topic to show, unless its connection has a timeout
#: (``connect_timeout_s``), which bounds this wait too
TOPIC_WAIT_S = 10.0
#: how long the answer to a request sent without a wait (``send``) is awaited and kept for a
#: later ``wait``: a caller that never waits for some requests would otherwise grow the
#: client by each of their answers, for as long as it lives
UNWAITED_KEEP_S = 600.0
#: how often a poll or a send forgets the requests sent without a wait that are past
#: UNWAITED_KEEP_S
FORGET_EVERY_S = 10.0


def bootstrap_within(timeout_s: float | None) -> dict:
    """Options that bound a kafka-python client's first connection to ``timeout_s`` (its
    own default is 30 s, which a short request timeout should not wait behind); none where
    this kafka-python has no such option (before 3.0) or no bound is asked."""
    from kafka import KafkaConsumer

    if timeout_s is None or "bootstrap_timeout_ms" not in KafkaConsumer.DEFAULT_CONFIG:
        return {}
    return {"bootstrap_timeout_ms": max(1, int(timeout_s * 1000))}


def producer(settings: Settings, **overrides):
    """A kafka-python producer for the app's clients. One request in flight per connection:
    with retries and several in flight, a batch retried after a leader's change or a timeout
    could land after a later one, and a user's events reach the worker out of order (the
    same rate here on the embedded broker: 23,010-24,627 events/s with five in flight,
    19,912-25,819 with one, alternating)."""
    from kafka import KafkaProducer

    options = {"linger_ms": 5, "acks": 1, "enable_idempotence": False,
               "max_in_flight_requests_per_connection": 1, **overrides}
    return KafkaProducer(client_id=f"{settings.app_id}-client", **client_config(settings),
                         **options)


def replay(settings: Settings, events: Iterable[dict], *, rate: float | None = None,
           progress=None) -> int:
    """Send events (wire-format dicts) keyed by ``user_id``; ``rate`` caps events per second.
    Returns how many were sent after all are acknowledged."""
    records = ((event["user_id"].encode(), json.dumps(event, separators=(",", ":")).encode())
               for event in events)
    return send_all(settings, settings.topic_events, records, rate=rate, progress=progress)


def send_all(settings: Settings, topic: str, records: Iterable[tuple[bytes, bytes]], *,
             rate: float | None = None, progress=None, acks: int | str = 1) -> int:
    """Send ``(key, value)`` records to ``topic``; ``rate`` caps records per second. Returns
    how many were sent once all are acknowledged (by the leader, or with ``acks="all"`` by
    every in-sync replica); raises if the broker refused any."""
    sink = producer(settings, acks=acks)
    sent = 0
    refused: list[BaseException] = []  # deliveries that failed (flush() does not raise them)
    started = time.monotonic()
    try:
        for key, value in records:
            sink.send(topic, key=key, value=value).add_errback(refused.append)
            sent += 1
            if progress is not None:
                progress.update(1)
            if rate:
                ahead = sent / rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
        sink.flush()
    finally:
        sink.close(timeout=CLOSE_TIMEOUT_S)
    if refused:
        raise RuntimeError(f"the broker did not take {len(refused)} of the {sent} records "
                           f"sent to {topic} (the first: {refused[0]!r})")
    return sent


def forget_users(settings: Settings, user_ids: Iterable[str]) -> int:
    """Erase each user's history: a :class:`~stream_app.wire.ForgetUser` on the events topic,
    keyed by the user, so the worker takes it after the user's events sent before it. Raises
    ``ValueError`` (pydantic's) for an id no event could carry, before anything is sent."""
    erasures = [(user.encode(), ForgetUser(user_id=user, forget=True).to_bytes())
                for user in user_ids]
    return send_all(settings, settings.topic_events, erasures, acks="all")  # none to lose


def withdraw_items(settings: Settings, item_ids: Iterable[str], *,
                   withdrawn: bool = True) -> int:
    """Withdraw items from the catalogue (``withdrawn=False``: restore them): an
    :class:`~stream_app.wire.ItemWithdrawal` each on the withdrawn-items topic, which every
    worker reads (:mod:`stream_app.withdrawals`). Raises ``ValueError`` (pydantic's) for an id
    no event could carry, before anything is sent."""
    records = [(item.encode(), ItemWithdrawal(item_id=item, withdrawn=withdrawn).to_bytes())
               for item in item_ids]
    ensure_topics(settings, [settings.withdrawn_topic])  # compacted, if no worker made it
    return send_all(settings, settings.withdrawn_topic, records, acks="all")


class RecClient:
    """Sends requests to ``rec-requests`` and waits for the answer on a response topic.

    The consumer is positioned at the end of the response topic before the first request is
    sent, and answers are matched by ``request_id``; answers to requests this client did not
    send (or is not waiting for) are skipped, so a long-lived client on a shared response topic
    keeps only its own. A request sent with :meth:`send` that no :meth:`wait` follows is
    awaited for :data:`UNWAITED_KEEP_S`, then forgotten with its answer. Threads may share
    one client (a web server's): one polls at a time, for all of them; close it once none
    waits.

    The fetch wait is short (``fetch_wait_ms``): the embedded broker parks a fetch that finds
    nothing for the whole wait, and every answer is one fetch away. On the embedded broker a
    :class:`~stream_app.compat.FetchWaitGuard` raises it while the consumer stands still below
    the high watermark (a fetch that outlasts its wait comes back empty there, and a reply topic
    grows by a batch per answer).
    """

    def __init__(self, settings: Settings, reply_to: str | None = None, *,
                 fetch_wait_ms: int = 5, connect_timeout_s: float | None = None) -> None:
        from kafka import KafkaConsumer

        self.settings = settings
        self.reply_to = reply_to or settings.topic_responses
        if not self.reply_to.startswith(settings.topic_responses):  # workers refuse it
            raise ValueError(f"reply_to must start with {settings.topic_responses!r}: a worker "
                             f"answers only there, so {self.reply_to!r} would wait in vain")
        bounded = bootstrap_within(connect_timeout_s)  # None: kafka-python's 30 s
        self._topic_wait_s = TOPIC_WAIT_S if connect_timeout_s is None else connect_timeout_s
        # a send waits for the request topic's metadata up to max_block_ms (60 s by
        # default): a topic misnamed held `recommend --timeout 2` a minute
        blocking = ({} if connect_timeout_s is None
                    else {"max_block_ms": max(1, int(connect_timeout_s * 1000))})
        self._producer = producer(settings, linger_ms=0, **bounded, **blocking)
        try:
            self._consumer = KafkaConsumer(
                client_id=f"{settings.app_id}-client", enable_auto_commit=False,
                fetch_max_wait_ms=fetch_wait_ms, **client_config(settings), **bounded)
        except BaseException:
            self._producer.close(timeout=CLOSE_TIMEOUT_S)
            raise
        self._guard = FetchWaitGuard(fetch_wait_ms) if settings.compat_fixes else None
        try:
            self._read_replies()
        except BaseException:  # no client to close: its sockets and threads go now
            self.close()
            raise
        self._begin_waits()

    def _begin_waits(self) -> None:
        """What the waits for answers share, empty."""
        # sent or waited for, not yet answered: the moment it may be forgotten (monotonic)
        self._awaited: dict[str, float] = {}
        self._next_forget = time.monotonic() + FORGET_EVERY_S
        self._pending: dict[str, RecResponse] = {}
        self._turn = threading.Condition()  # over _polling: whose turn it is to poll
        self._polling = False
        self._book = threading.Lock()  # over _awaited and _pending: an answer kept or forgotten

    def _read_replies(self) -> None:
        """Read the reply topic from its end (made first where it is not the responses
        topic)."""
        from kafka import TopicPartition

        if self.reply_to != self.settings.topic_responses:
            ensure_topics(self.settings, [self.reply_to])
        partitions = self._wait_for_partitions(self.reply_to, self._topic_wait_s)
        self._consumer.assign([TopicPartition(self.reply_to, p) for p in partitions])
        self._consumer.seek_to_end()
        for tp in self._consumer.assignment():  # resolved now, before any request is sent
            self._consumer.position(tp, timeout_ms=int(self._topic_wait_s * 1000))

    def _wait_for_partitions(self, topic: str, timeout_s: float) -> set[int]:
        """The topic's partitions, asked again until ``timeout_s`` (a topic just made can take
        a moment to show in the broker's metadata)."""
        deadline = time.monotonic() + timeout_s
        while True:
            partitions = self._consumer.partitions_for_topic(topic)
            if partitions or time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        if not partitions:
            where = self.settings.broker or "the embedded broker"
            raise ResponseTimeout(f"topic {topic!r} does not exist on {where}")
        return partitions

    def send(self, request: RecRequest, flush: bool = True, timeout_s: float = 10.0):
        """Send ``request``; with ``flush``, wait (at most ``timeout_s``) until the broker has
        it, and raise the producer's error when it refused it: no answer can come then, and
        the caller learns it at once rather than after its wait. Returns the send's future."""
        from kafka.errors import KafkaTimeoutError

        request = self._replied_here(request)
        self._keep([request.request_id], time.monotonic() + UNWAITED_KEEP_S)
        if time.monotonic() >= self._next_forget:  # also for a caller that never waits
            self._forget_unwaited()
        key = (request.user_id or request.request_id).encode()
        try:  # kafka-python waits up to max_block_ms here for metadata or buffer room
            sending = self._producer.send(self.settings.topic_requests, key=key,
                                          value=request.to_bytes())
        except Exception as error:
            self._forget([request.request_id])
            if isinstance(error, KafkaTimeoutError):
                raise ResponseTimeout(f"request {request.request_id} was not sent: "
                                      f"{error}") from error
            raise
        if flush:
            self._check_sent({request.request_id: sending}, time.monotonic() + timeout_s)
        return sending

    def _replied_here(self, request: RecRequest) -> RecRequest:
        """``request`` answered on the topic this client reads when it names none (a request
        that names another is sent as it is: its answer goes there, and only an error the
        worker sends to the responses topic comes back to a client reading that)."""
        if request.reply_to is not None or self.reply_to == self.settings.topic_responses:
            return request
        return request.model_copy(update={"reply_to": self.reply_to})

    def _check_sent(self, sending: dict, deadline: float) -> None:
        """Wait until the broker has each request of ``sending`` (request id: future), at
        most until ``deadline``; on a refusal or a timeout forget them all, then raise (a
        :class:`ResponseTimeout` for the timeout: a broker not there yet, as at a start)."""
        from kafka.errors import KafkaTimeoutError

        try:
            for request_id, future in sending.items():
                try:
                    future.get(timeout=max(0.0, deadline - time.monotonic()))
                except KafkaTimeoutError as error:
                    raise ResponseTimeout(f"request {request_id} was not sent in time: "
                                          f"{error}") from error
        except Exception:
            self._forget(sending)
            raise

    def _forget(self, request_ids: Iterable[str]) -> None:
        """No longer wait for these requests, nor keep their answers (a long-lived client
        would grow with every answer that comes after its wait gave up)."""
        with self._book:
            for request_id in request_ids:
                self._awaited.pop(request_id, None)
                self._pending.pop(request_id, None)

    def wait(self, request_id: str, timeout_s: float) -> RecResponse:
        return self._wait_until(request_id, time.monotonic() + timeout_s, timeout_s)

    def _wait_until(self, request_id: str, deadline: float, timeout_s: float) -> RecResponse:
        """Poll until ``request_id`` is answered. Threads that share the client wait at the
        same time: one polls at once (kafka-python's consumer is not thread-safe), for all,
        and the others find their answers among what it took. A wait that ends without its
        answer (a timeout, a poll's error, an interrupt) forgets the request: its late answer
        is not kept (a long-lived client would grow)."""
        self._keep([request_id], deadline)  # not forgotten while waited for
        try:
            while request_id not in self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ResponseTimeout(f"no response to {request_id} within {timeout_s:g} s")
                if not self._take_turn(min(left, 0.2)):
                    continue  # another thread polled: its answers may hold this one
                try:
                    if request_id not in self._pending:  # not taken by the poll before
                        self._poll(min(left, 0.2))
                finally:
                    self._end_turn()
        except BaseException:
            self._forget([request_id])
            raise
        with self._book:
            self._awaited.pop(request_id, None)
            answer = self._pending.pop(request_id, None)
        if answer is None:  # forgotten meanwhile by another thread: past its deadline
            raise ResponseTimeout(f"no response to {request_id} within {timeout_s:g} s")
        return answer

    def _take_turn(self, timeout_s: float) -> bool:
        """True: this thread polls now. False once the thread that polled has ended its poll
        (woken at once: what it took may be this thread's answer), or after ``timeout_s``."""
        with self._turn:
            if self._polling:
                self._turn.wait(timeout_s)
                return False
            self._polling = True
            return True

    def _end_turn(self) -> None:
        with self._turn:
            self._polling = False
            self._turn.notify_all()

    def _poll(self, timeout_s: float) -> None:
        batches = self._consumer.poll(timeout_ms=int(timeout_s * 1000))
        for records in batches.values():
            for record in records:
                self._take(record.value)
        if self._guard is not None:
            self._guard_fetch_wait()
        if time.monotonic() >= self._next_forget:
            self._forget_unwaited()

    def _keep(self, request_ids: Iterable[str], until: float) -> None:
        """Await these requests (and keep their answers) at least until ``until``."""
        with self._book:
            for request_id in request_ids:
                self._awaited[request_id] = max(self._awaited.get(request_id, until), until)

    def _forget_unwaited(self) -> None:
        """Forget the requests past their moment (:data:`UNWAITED_KEEP_S` after a send
        that no wait followed), and their answers: a scan every :data:`FORGET_EVERY_S`, by
        a poll or a send."""
        with self._book:
            now = time.monotonic()
            self._next_forget = now + FORGET_EVERY_S
            for request_id in [request_id for request_id, until in self._awaited.items()
                               if until < now]:
                del self._awaited[request_id]
                self._pending.pop(request_id, None)

    @property
    def fetch_wait_ms(self) -> int:
        """The consumer's fetch wait now (raised by the guard on the embedded broker)."""
        return self._consumer._fetcher.config["fetch_max_wait_ms"]

    def _guard_fetch_wait(self) -> None:
        assigned = self._consumer.assignment()
        raised = self._guard.check({tp: self._consumer.position(tp) for tp in assigned},
                                   {tp: self._consumer.highwater(tp) for tp in assigned},
                                   time.monotonic())
        if raised is not None:
            self._consumer._fetcher.config["fetch_max_wait_ms"] = raised  # read per fetch

    def _take(self, raw: bytes) -> None:
        try:
            response = RecResponse.model_validate_json(raw)
        except ValueError:
            return
        with self._book:  # not kept for a wait that has just given up
            if response.request_id in self._awaited:  # the first answer to an id is kept:
                # a second is a redelivery, or the worker's "undelivered" error for an answer
                # the broker took late after all
                self._pending.setdefault(response.request_id, response)

    def ask_many(self, requests: Iterable[RecRequest], timeout_s: float = 30.0,
                 in_flight: int = 256) -> dict[str, RecResponse]:
        """Answers to many requests, keeping up to ``in_flight`` of them outstanding at once
        (a pipelined client: round trips overlap instead of adding up). ``timeout_s`` bounds
        each window of requests, from sending them to their last answer; when it runs out
        (or the broker refuses one) the window's requests are forgotten and it raises."""
        answers: dict[str, RecResponse] = {}
        window: dict = {}
        for request in requests:
            try:
                window[request.request_id] = self.send(request, flush=False)
            except Exception:
                self._forget(window)
                raise
            if len(window) >= in_flight:
                self._collect(window, answers, timeout_s)
                window = {}
        self._collect(window, answers, timeout_s)
        return answers

    def _collect(self, window: dict, answers: dict, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        self._keep(window, deadline)  # answers that come while an earlier one is waited for
        self._check_sent(window, deadline)
        try:
            for request_id in window:
                answers[request_id] = self._wait_until(request_id, deadline, timeout_s)
        except Exception:
            self._forget(window)
            raise

    def recommend(self, user_id: str | None = None, *, history: list[str] | None = None,
                  k: int = 10, timeout_s: float = 10.0, **fields) -> RecResponse:
        """The answer to one request; ``timeout_s`` bounds sending it and its answer."""
        deadline = time.monotonic() + timeout_s
        request = RecRequest(**{"request_id": uuid.uuid4().hex, **fields}, user_id=user_id,
                             history=history, k=k)
        self.send(request, timeout_s=timeout_s)
        return self._wait_until(request.request_id, deadline, timeout_s)

    def close(self) -> None:
        """Close the producer (waiting at most ``CLOSE_TIMEOUT_S`` for what it holds: a
        request that timed out may still be buffered) and the consumer."""
        try:
            self._producer.close(timeout=CLOSE_TIMEOUT_S)
        finally:
            self._consumer.close()

    def __enter__(self) -> RecClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
