"""Answer one recommendation request: on its reply topic, keyed by its ``request_id``.

Every request gets an answer, an error response when it cannot be served, and the request
reader commits a request only once its answer's fate is known: :meth:`Responder.answer`
returns the answer's delivery (:mod:`stream_app.request_reader` waits for it before it
commits), so a worker that dies with answers still in its producer's buffer answers those
requests again after its restart instead of never.

What can go wrong after validation, and what the client then gets:

- the reply topic cannot be made (a name Kafka refuses, no right to create topics, a create
  policy): an error response on the responses topic, the one place left to say so. The name
  is remembered for ``REPLY_TOPIC_RETRY_S``: the requests naming it meanwhile get that error
  at once, instead of each waiting for the broker to refuse it again;
- the broker does not take the answer (a non-retriable error, or its retries ran out): an
  error response on the responses topic (``streamrec_requests_total{status="undelivered"}``);
- moving a request to its user's partition fails: an error response on its reply topic;
- an answer that takes longer than ``ANSWER_TIMEOUT_S`` (a producer waiting for metadata of
  a topic that is gone) is given up with an error response, so that one request cannot hold
  the reader, and a rebalance waiting for it, for the producer's minutes; one the broker has
  not taken after ``DELIVERY_TIMEOUT_S`` too.

An error response the broker does not take is sent again to the responses topic (never
remembered as failing: every error goes there) until it does, so its request is committed
only then.

A client that reads its own ``reply_to`` does not see an error sent to the responses topic;
it times out, and the worker's log and metrics say why.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from state.history import History

from .engine import Engine
from .metrics import Metrics
from .settings import Settings
from .wire import (MAX_ANSWER_BYTES, MAX_ERROR_CHARS, InvalidMessage, RecResponse,
                   decode_request, headers_kept, salvage_request)

log = logging.getLogger(__name__)

#: longest one request may take to be answered (and, apart, its error response to be sent)
ANSWER_TIMEOUT_S = 10.0
#: how long a reply topic that could not be made is not tried again
REPLY_TOPIC_RETRY_S = 60.0
#: reply topic names that failed, remembered at most (the oldest is forgotten first)
FAILED_REPLY_TOPICS_KEPT = 1_000
#: a reply topic no answer went to for this long gives its place to a new one: the cap bounds
#: the topics in use (and new topics to at most the cap per this time), not those ever named
#: over a worker's life, which refused every new name once the cap had been reached once
REPLY_TOPIC_IDLE_S = 600.0
#: longest wait for the broker to take an answer before an error response goes instead
#: (the producer's own limit is Faust's, 20 minutes: the reader commits nothing past it)
DELIVERY_TIMEOUT_S = 30.0
#: pauses between sends of an error response the broker did not take
FIRST_RETRY_PAUSE_S, MAX_RETRY_PAUSE_S = 0.5, 30.0


class Responder:
    """Answers requests for one worker.

    ``make_topic(name)`` gives a (raw) Faust topic; ``requests`` is the request topic, where
    a request on another partition than its user's is moved; ``users_partition(message,
    key)`` says which partition that is (None: this one); ``stored_history(user_id,
    partition)`` reads the user's stored history (JSON) on this worker."""

    def __init__(self, settings: Settings, engine: Engine, metrics: Metrics,
                 make_topic: Callable[[str], Any], requests: Any,
                 users_partition: Callable[[Any, bytes], int | None],
                 stored_history: Callable[[str, int], dict | None]) -> None:
        self.settings = settings
        self.engine = engine
        self.metrics = metrics
        self._make_topic = make_topic
        self._requests = requests
        self._users_partition = users_partition
        self._stored_history = stored_history
        self.reply_topics: dict[str, Any] = {}  # least recently used first
        self._reply_used: dict[str, float] = {}  # name -> when an answer last went there
        self._failed_topics: dict[str, float] = {}  # name -> when making it failed
        self._deliveries: set[asyncio.Task] = set()

    async def answer(self, message: Any) -> Awaitable[None]:
        """Answer ``message``; errors are answers too. Returns what settles once the broker
        has the answer, or an error response in its place (sent again until the broker takes
        it); it never raises."""
        started = time.perf_counter()
        if message.timestamp is not None:  # set by the client's producer, or by the broker
            self.metrics.request_wait.observe(max(0.0, time.time() - message.timestamp / 1e3))
        try:
            async with asyncio.timeout(ANSWER_TIMEOUT_S):
                delivery, rerouted = await self._answer(message, started)
        except Exception as error:  # noqa: BLE001 - the responder never goes silent
            if not isinstance(error, InvalidMessage):
                log.exception("request at %s/%d/%d failed", message.topic, message.partition,
                              message.offset)
            sent = await self._send_error(error, message, started)
            return self._track(self._error_delivered(sent, error, message, started))
        return self._track(self._follow(delivery, message, started, rerouted))

    async def _answer(self, message: Any, started: float) -> tuple[Awaitable, bool]:
        """The answer's delivery, and whether the request was moved rather than answered."""
        settings = self.settings
        request = decode_request(message.value, max_bytes=settings.max_request_bytes,
                                 max_history=settings.max_request_history)
        self.engine.check_request(request)
        if not self.reply_allowed(request.reply_to):
            raise InvalidMessage("schema", f"reply_to: this worker answers on "
                                 f"{settings.max_reply_topics} reply topics already "
                                 "(STREAMREC_MAX_REPLY_TOPICS)")
        if request.user_id is not None:
            user_key = request.user_id.encode()
            home = self._users_partition(message, user_key)
            if home is not None:  # answered where the user's history is
                delivery = await self._requests.send(key=user_key, partition=home,
                                                     value=message.value,
                                                     headers=headers_kept(message.headers)[0])
                self.metrics.requests.labels("rerouted").inc()
                return delivery, True
        stored = (self._stored_history(request.user_id, message.partition)
                  if request.user_id is not None else None)
        history = History.from_stored(stored, self.metrics.history_damaged(
            "answer", request.user_id))
        response = self.engine.answer(request, history, started)
        return await self._respond(response, request.reply_to, started, message.headers), False

    def reply_allowed(self, name: str | None) -> bool:
        """The responses topic, a reply topic in use, or a new one while fewer than
        ``max_reply_topics`` others are, or once the one used longest ago has been idle for
        ``REPLY_TOPIC_IDLE_S`` (it is forgotten; a request may name any topic with the
        responses prefix)."""
        default = self.settings.topic_responses
        if name is None or name == default or name in self.reply_topics:
            return True
        others = sum(topic != default for topic in self.reply_topics)
        return others < self.settings.max_reply_topics or self._forget_idle_reply_topic()

    def _forget_idle_reply_topic(self) -> bool:
        """Forget the reply topic used longest ago if it is idle; True when one was."""
        default = self.settings.topic_responses
        oldest = next((name for name in self.reply_topics if name != default), None)
        if oldest is None or time.monotonic() - self._reply_used[oldest] < REPLY_TOPIC_IDLE_S:
            return False
        del self.reply_topics[oldest], self._reply_used[oldest]
        return True

    async def _reply_topic(self, name: str | None) -> Any:
        name = name or self.settings.topic_responses
        topic = self.reply_topics.pop(name, None)
        if topic is not None:  # to the end: the order is of last use
            self.reply_topics[name] = topic
            self._reply_used[name] = time.monotonic()
            return topic
        failed_at = self._failed_topics.get(name)  # never the responses topic's
        if failed_at is not None and time.monotonic() - failed_at < REPLY_TOPIC_RETRY_S:
            raise InvalidMessage("reply_to", f"the topic {name} could not be made (it is "
                                 f"tried again {REPLY_TOPIC_RETRY_S:g} s after it failed)")
        topic = self._make_topic(name)
        try:
            await topic.maybe_declare()
        except BaseException as error:  # a refusal, or a create that outlasted the answer's time
            if name != self.settings.topic_responses:  # where every error goes: tried always
                self._remember_failure(name)
            if not isinstance(error, Exception):
                raise
            # the broker's reason is the client's to read (an internal error's text is not)
            log.warning("the reply topic %s could not be made: %r", name, error)
            raise InvalidMessage("reply_to", f"the topic {name} could not be made: "
                                 f"{error!r}") from error
        self._failed_topics.pop(name, None)
        self.reply_topics[name] = topic
        self._reply_used[name] = time.monotonic()
        return topic

    def _remember_failure(self, name: str) -> None:
        failed = self._failed_topics
        failed.pop(name, None)
        failed[name] = time.monotonic()
        while len(failed) > FAILED_REPLY_TOPICS_KEPT:
            del failed[next(iter(failed))]

    async def _respond(self, response: RecResponse, reply_to: str | None, started: float,
                       headers) -> Awaitable:
        """Send ``response``, keyed by its request id, with the request's ``headers`` (a
        trace id set on a request comes back on its answer; :func:`headers_kept`)."""
        value = response.to_bytes()
        if len(value) > MAX_ANSWER_BYTES and response.error is None:  # errors are cut short
            raise InvalidMessage("oversized", f"the answer of {len(response.items)} items is "
                                 f"{len(value)} bytes, over the {MAX_ANSWER_BYTES} a worker "
                                 "sends: ask for fewer items (k)")
        topic = await self._reply_topic(reply_to)
        key = response.request_id.encode() if response.request_id else None
        delivery = await topic.send(key=key, value=value, headers=headers_kept(headers)[0])
        self.metrics.requests.labels("error" if response.error else "ok").inc()
        self.metrics.request_latency.observe(time.perf_counter() - started)
        return delivery

    async def _send_error(self, error: Exception, message: Any, started: float,
                          to_default: bool = False) -> Awaitable | None:
        """Send ``error`` as the answer to ``message``: on its reply topic (unless
        ``to_default``, or it is not allowed), on the responses topic when that fails.
        Returns the delivery; None when it could not be sent."""
        fields = salvage_request(message.value)
        reply_to = fields["reply_to"]
        if to_default or reply_to is not None and not (
                self.settings.reply_topic_refusal(reply_to) is None
                and self.reply_allowed(reply_to)):
            reply_to = None
        # an internal error's text stays in the log: it may hold paths or other users' ids
        text = (str(error) if isinstance(error, InvalidMessage) else
                f"internal error ({type(error).__name__}): the worker logs it with the "
                f"request's place, {message.topic}/{message.partition}/{message.offset}")
        if len(text) > MAX_ERROR_CHARS:  # an answer the producer refuses would be sent forever
            text = text[:MAX_ERROR_CHARS] + f"… ({len(text) - MAX_ERROR_CHARS} more characters)"
        response = RecResponse(request_id=fields["request_id"], user_id=fields["user_id"],
                               error=text, model_version=self.engine.model_version,
                               took_ms=(time.perf_counter() - started) * 1000.0)
        for topic in dict.fromkeys((reply_to, None)):
            try:
                async with asyncio.timeout(ANSWER_TIMEOUT_S):
                    return await self._respond(response, topic, started, message.headers)
            except InvalidMessage:  # a reply topic known to fail: said when it did
                continue
            except Exception as failure:  # noqa: BLE001 - try the responses topic next
                log.warning("could not send the error response of request %r to %s: %r",
                            fields["request_id"], topic or self.settings.topic_responses,
                            failure)
        return None

    def _track(self, settles) -> asyncio.Task:
        task = asyncio.ensure_future(settles)
        self._deliveries.add(task)  # held until done: the loop keeps only weak references
        task.add_done_callback(self._deliveries.discard)
        return task

    async def _follow(self, delivery: Awaitable, message: Any, started: float,
                      rerouted: bool) -> None:
        """Settles once ``delivery`` did. One that fails, or is not done in
        ``DELIVERY_TIMEOUT_S``, is answered with an error response (on the responses topic
        for a refused answer, whose reply topic may be what failed; on the reply topic for a
        request that could not be moved)."""
        try:
            async with asyncio.timeout(DELIVERY_TIMEOUT_S):
                await asyncio.shield(delivery)  # the producer settles it, not this wait
            return
        except Exception as error:  # noqa: BLE001 - answered below
            failure = error
        what = "move the request to its user's partition" if rerouted else "deliver the answer"
        log.warning("could not %s (request at %s/%d/%d): %r", what, message.topic,
                    message.partition, message.offset, failure)
        if not rerouted:
            self.metrics.requests.labels("undelivered").inc()
        error = InvalidMessage("undelivered", f"the worker could not {what}: {failure!r}")
        sent = await self._send_error(error, message, started, to_default=not rerouted)
        await self._error_delivered(sent, error, message, started)

    async def _error_delivered(self, sent: Awaitable | None, error: Exception, message: Any,
                               started: float) -> None:
        """Settles once the error response ``sent`` is on the broker: one not sent, refused
        or not done in ``DELIVERY_TIMEOUT_S`` is sent again to the responses topic, after a
        pause that doubles up to ``MAX_RETRY_PAUSE_S``, until the broker takes it."""
        pause = FIRST_RETRY_PAUSE_S
        while True:
            if sent is not None:
                try:
                    async with asyncio.timeout(DELIVERY_TIMEOUT_S):
                        await asyncio.shield(sent)  # the producer settles it, not this wait
                    return
                except Exception as failure:  # noqa: BLE001 - sent again below
                    log.warning("the error response of request at %s/%d/%d was not "
                                "delivered (%r); sending it again in %g s", message.topic,
                                message.partition, message.offset, failure, pause)
            await asyncio.sleep(pause)
            pause = min(2 * pause, MAX_RETRY_PAUSE_S)
            sent = await self._send_error(error, message, started, to_default=True)
