"""The responder without a broker: every request gets an answer somewhere, also when its
reply topic cannot be made, the broker refuses the answer, or moving the request fails; and
what it returns settles only once the answer's fate is known (the reader commits after it)."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

from stream_app import responder as responder_module
from stream_app.engine import Engine
from stream_app.metrics import Metrics
from stream_app.responder import Responder
from stream_app.settings import Settings


class FakeTopic:
    """A topic whose declaration may fail and whose deliveries settle when the test says."""

    def __init__(self, name: str, broker: FakeBroker) -> None:
        self.name = name
        self.broker = broker

    async def maybe_declare(self) -> None:
        self.broker.declared.append(self.name)
        if self.name in self.broker.undeclarable:
            raise RuntimeError(f"cannot create {self.name}")

    async def send(self, key=None, value=None, partition=None, **kwargs) -> asyncio.Future:
        delivery = asyncio.get_running_loop().create_future()
        self.broker.sent.append((self.name, key, value, partition, delivery))
        self.broker.headers.append(kwargs.get("headers"))
        return delivery


class FakeBroker:
    def __init__(self) -> None:
        self.declared: list[str] = []
        self.undeclarable: set[str] = set()
        self.sent: list = []
        self.headers: list = []  # of each record sent, in the same order

    def topic(self, name: str) -> FakeTopic:
        return FakeTopic(name, self)

    def answers(self, topic: str) -> list[dict]:
        return [json.loads(value) for name, _, value, _, _ in self.sent if name == topic]

    def settle(self, index: int, error: Exception | None = None) -> None:
        delivery = self.sent[index][4]
        if error is None:
            delivery.set_result(None)
        else:
            delivery.set_exception(error)


@pytest.fixture
def world(tmp_path):
    settings = Settings(data_dir=tmp_path, dr_enabled=False, index_enabled=False)
    broker = FakeBroker()
    metrics = Metrics()
    home = {"partition": None}  # where users_partition sends a request; None: here
    responder = Responder(settings, Engine(settings), metrics, broker.topic,
                          broker.topic(settings.topic_requests),
                          lambda message, key: home["partition"], lambda user, partition: None)
    return SimpleNamespace(settings=settings, broker=broker, metrics=metrics, home=home,
                           responder=responder)


def request(headers=(), **fields) -> SimpleNamespace:
    value = json.dumps({"v": 1, "request_id": "r-1", "user_id": "u1", "k": 3, **fields})
    return SimpleNamespace(value=value.encode(), key=b"u1", topic="rec-requests", partition=0,
                           offset=7, timestamp=None, headers=headers)


def requests_counted(metrics: Metrics, status: str) -> float:
    return metrics.registry.get_sample_value("streamrec_requests_total", {"status": status}) \
        or 0.0


def test_an_answer_settles_only_once_the_broker_has_it(world):
    async def scenario():
        settles = await world.responder.answer(request())
        await asyncio.sleep(0.01)
        waiting = not settles.done()
        world.broker.settle(0)
        await asyncio.wait_for(settles, 1)
        return waiting

    assert asyncio.run(scenario())
    (answer,) = world.broker.answers(world.settings.topic_responses)
    assert answer["request_id"] == "r-1" and answer["error"] is None


def test_an_answer_the_broker_refuses_is_followed_by_an_error_on_the_responses_topic(world):
    reply_to = world.settings.topic_responses + ".mine"

    async def scenario():
        settles = await world.responder.answer(request(reply_to=reply_to))
        world.broker.settle(0, RuntimeError("not leader"))
        await asyncio.sleep(0.01)
        waiting = not settles.done()  # until the error response is delivered
        world.broker.settle(1)
        await asyncio.wait_for(settles, 1)
        return waiting

    assert asyncio.run(scenario())
    assert [name for name, *_ in world.broker.sent] == [reply_to, world.settings.topic_responses]
    (error,) = world.broker.answers(world.settings.topic_responses)
    assert error["request_id"] == "r-1" and "not leader" in error["error"]
    assert requests_counted(world.metrics, "undelivered") == 1.0


def test_a_reply_topic_that_cannot_be_made_answers_on_the_responses_topic_and_is_not_retried(
        world):
    reply_to = world.settings.topic_responses + ".refused"
    world.broker.undeclarable.add(reply_to)

    async def scenario():
        for request_id in ("r-1", "r-2"):
            settles = await world.responder.answer(request(request_id=request_id,
                                                           reply_to=reply_to))
            world.broker.sent[-1][4].set_result(None)
            await asyncio.wait_for(settles, 1)

    asyncio.run(scenario())
    errors = world.broker.answers(world.settings.topic_responses)
    assert [error["request_id"] for error in errors] == ["r-1", "r-2"]
    assert f"cannot create {reply_to}" in errors[0]["error"]
    assert "could not be made" in errors[1]["error"]
    assert world.broker.declared.count(reply_to) == 1  # the second request did not wait for it
    assert not world.broker.answers(reply_to)


def test_a_reply_topic_that_failed_is_tried_again_later(world, monkeypatch):
    reply_to = world.settings.topic_responses + ".later"
    world.broker.undeclarable.add(reply_to)
    clock = [100.0]
    monkeypatch.setattr(responder_module.time, "monotonic", lambda: clock[0])

    async def scenario():
        await world.responder.answer(request(reply_to=reply_to))
        world.broker.undeclarable.clear()
        clock[0] += responder_module.REPLY_TOPIC_RETRY_S + 1
        await world.responder.answer(request(request_id="r-2", reply_to=reply_to))

    asyncio.run(scenario())
    assert [answer["request_id"] for answer in world.broker.answers(reply_to)] == ["r-2"]


def test_a_request_that_could_not_be_moved_gets_an_error_on_its_reply_topic(world):
    world.home["partition"] = 1

    async def scenario():
        settles = await world.responder.answer(request())
        world.broker.settle(0, RuntimeError("partition gone"))
        await asyncio.sleep(0.01)
        world.broker.settle(1)
        await asyncio.wait_for(settles, 1)

    asyncio.run(scenario())
    moved, error = world.broker.sent
    assert (moved[0], moved[3]) == (world.settings.topic_requests, 1)
    assert error[0] == world.settings.topic_responses
    assert "move the request" in json.loads(error[2])["error"]
    assert requests_counted(world.metrics, "undelivered") == 0.0


def test_an_answer_that_takes_too_long_is_given_up_with_an_error(world, monkeypatch):
    monkeypatch.setattr(responder_module, "ANSWER_TIMEOUT_S", 0.05)
    reply_to = world.settings.topic_responses + ".slow"
    stuck = asyncio.Event()

    async def never_declared(self) -> None:
        if self.name == reply_to:
            await stuck.wait()

    monkeypatch.setattr(FakeTopic, "maybe_declare", never_declared)

    async def scenario():
        settles = await asyncio.wait_for(world.responder.answer(request(reply_to=reply_to)), 2)
        world.broker.settle(0)
        await asyncio.wait_for(settles, 1)

    asyncio.run(scenario())
    (error,) = world.broker.answers(world.settings.topic_responses)
    assert "TimeoutError" in error["error"]


def test_an_invalid_request_is_answered_with_its_error(world):
    async def scenario():
        settles = await world.responder.answer(request(k=0))
        world.broker.settle(0)
        await asyncio.wait_for(settles, 1)

    asyncio.run(scenario())
    (error,) = world.broker.answers(world.settings.topic_responses)
    assert error["request_id"] == "r-1" and "k" in error["error"]


def test_a_responses_topic_that_fails_once_is_not_given_up(world, monkeypatch):
    """Every error goes to the responses topic, so a failure to make it is never remembered:
    the error response is sent again until the broker takes it (its request is committed
    only then), and the next request is answered as usual."""
    monkeypatch.setattr(responder_module, "FIRST_RETRY_PAUSE_S", 0.01)
    default = world.settings.topic_responses
    world.broker.undeclarable.add(default)

    async def scenario():
        settles = await world.responder.answer(request())
        await asyncio.sleep(0.1)
        waiting = not settles.done() and not world.broker.sent
        world.broker.undeclarable.clear()
        while not world.broker.sent:
            await asyncio.sleep(0.01)
        world.broker.settle(0)
        await asyncio.wait_for(settles, 1)
        following = await world.responder.answer(request(request_id="r-2"))
        world.broker.settle(1)
        await asyncio.wait_for(following, 1)
        return waiting

    assert asyncio.run(scenario())
    first, second = world.broker.answers(world.settings.topic_responses)
    assert first["request_id"] == "r-1" and f"cannot create {default}" in first["error"]
    assert second["request_id"] == "r-2" and second["error"] is None


def test_answers_errors_and_moved_requests_carry_the_requests_headers(world):
    """A trace id a client sets on its request comes back on the answer, on an error
    response, and travels with the request when it is moved to its user's partition."""
    trace = [("trace", b"t-42"), ("tenant", b"acme")]

    async def scenario():
        for made in (request(headers=trace), request(headers=trace, k=0)):
            settles = await world.responder.answer(made)
            world.broker.settle(len(world.broker.sent) - 1)
            await asyncio.wait_for(settles, 1)
        world.home["partition"] = 1
        settles = await world.responder.answer(request(headers=trace))
        world.broker.settle(len(world.broker.sent) - 1)
        await asyncio.wait_for(settles, 1)

    asyncio.run(scenario())
    answered, refused, moved = world.broker.sent
    assert answered[0] == refused[0] == world.settings.topic_responses
    assert json.loads(refused[2])["error"] and moved[0] == world.settings.topic_requests
    assert world.broker.headers == [trace, trace, trace]


def test_a_request_with_thousands_of_errors_gets_a_short_error_response(world):
    """pydantic reported one problem per bad element of a list: a 64 KiB request of bad
    history entries made a 1.5 MB error response, which the producer refuses (1 MB), so it
    was sent again for ever and its partition's commits stopped. A list is now refused at its
    first bad element (``wire.RecRequest``); a response names at most the first problems and
    counts the rest (:func:`stream_app.wire._describe`)."""
    bad_history = [0] * 20_000
    assert len(json.dumps({"history": bad_history})) < world.settings.max_request_bytes

    async def scenario():
        settles = await world.responder.answer(request(history=bad_history))
        world.broker.settle(0)
        await asyncio.wait_for(settles, 1)

    asyncio.run(scenario())
    (error,) = world.broker.answers(world.settings.topic_responses)
    assert error["request_id"] == "r-1" and "history.0: " in error["error"]
    assert len(error["error"]) <= responder_module.MAX_ERROR_CHARS + 50


def test_an_error_text_of_any_length_is_cut_to_the_limit(world, monkeypatch):
    def fails(*args, **kwargs):
        raise RuntimeError("x" * 100_000)

    monkeypatch.setattr(world.responder.engine, "check_request", fails)

    async def scenario():
        settles = await world.responder.answer(request())
        world.broker.settle(0)
        await asyncio.wait_for(settles, 1)

    asyncio.run(scenario())
    (error,) = world.broker.answers(world.settings.topic_responses)
    # its text stays in the worker's log (it may hold paths, or other users' ids)
    assert error["error"].startswith("internal error (RuntimeError): the worker logs it")
    assert "xxx" not in error["error"] and "/0/" in error["error"]  # the request's place


def test_a_delivery_given_up_on_is_left_for_the_producer_to_settle(world, monkeypatch):
    """The wait for an answer's delivery times out without cancelling the delivery itself:
    the producer settles it later (Faust's callbacks then raised InvalidStateError)."""
    monkeypatch.setattr(responder_module, "DELIVERY_TIMEOUT_S", 0.05)
    monkeypatch.setattr(responder_module, "FIRST_RETRY_PAUSE_S", 0.01)

    async def scenario():
        settles = await world.responder.answer(request())
        while len(world.broker.sent) < 3:  # the answer, its error, that error again
            await asyncio.sleep(0.01)
        world.broker.settle(2)
        await asyncio.wait_for(settles, 1)
        return [delivery for *_, delivery in world.broker.sent[:2]]

    answer, error = asyncio.run(scenario())
    assert not answer.cancelled() and not error.cancelled()


def test_an_answer_too_large_to_send_is_an_error_on_its_own_reply_topic(world, monkeypatch):
    """k = 1000 items of long ids can make an answer the producer refuses (over 1 MB); the
    client, which reads its own reply topic, hears why there, not a timeout."""
    monkeypatch.setattr(responder_module, "MAX_ANSWER_BYTES", 50)  # any answer is larger
    reply_to = world.settings.topic_responses + ".mine"

    async def scenario():
        settles = await world.responder.answer(request(reply_to=reply_to))
        world.broker.settle(0)
        await asyncio.wait_for(settles, 1)

    asyncio.run(scenario())
    (error,) = world.broker.answers(reply_to)
    assert error["request_id"] == "r-1" and error["error"].startswith("oversized: the answer of ")
    assert not world.broker.answers(world.settings.topic_responses)


def test_a_reply_topic_idle_for_long_gives_its_place_to_a_new_one(tmp_path, monkeypatch):
    """The cap counted every reply topic named over the worker's life: once clients had named
    ``max_reply_topics`` of them (one per client instance, say), every new one was refused
    until a restart. Now the one used longest ago gives way once idle, and only then."""
    settings = Settings(data_dir=tmp_path, dr_enabled=False, index_enabled=False,
                        max_reply_topics=2)
    broker = FakeBroker()
    responder = Responder(settings, Engine(settings), Metrics(), broker.topic,
                          broker.topic(settings.topic_requests), lambda message, key: None,
                          lambda user, partition: None)
    clock = [100.0]
    monkeypatch.setattr(responder_module.time, "monotonic", lambda: clock[0])
    first, second, third = (settings.topic_responses + name for name in (".a", ".b", ".c"))

    async def ask(reply_to: str, request_id: str) -> None:
        await responder.answer(request(request_id=request_id, reply_to=reply_to))

    async def scenario():
        await ask(first, "r-1")
        await ask(second, "r-2")
        clock[0] += responder_module.REPLY_TOPIC_IDLE_S - 1
        await ask(first, "r-3")  # first used again: second is now the one used longest ago
        await ask(third, "r-4")  # refused: second is not idle yet
        clock[0] += 2
        await ask(third, "r-5")  # second has been idle long enough: third takes its place
        await ask(settings.topic_responses, "r-6")  # the responses topic is never counted

    asyncio.run(scenario())
    assert [a["request_id"] for a in broker.answers(third)] == ["r-5"]
    refused = [a for a in broker.answers(settings.topic_responses) if a["request_id"] == "r-4"]
    assert refused and "STREAMREC_MAX_REPLY_TOPICS" in refused[0]["error"]
    assert list(responder.reply_topics) == [first, third, settings.topic_responses]


def test_a_user_whose_stored_history_is_damaged_is_answered_as_a_new_one(tmp_path):
    """A damaged record answered every request of its user with an internal error."""
    settings = Settings(data_dir=tmp_path, dr_enabled=False, index_enabled=False)
    broker, metrics = FakeBroker(), Metrics()
    responder = Responder(settings, Engine(settings), metrics, broker.topic,
                          broker.topic(settings.topic_requests), lambda message, key: None,
                          lambda user, partition: {"kinds": ["view"]})

    async def scenario():
        await responder.answer(request(sources=["popular"]))

    asyncio.run(scenario())
    (answer,) = broker.answers(settings.topic_responses)
    assert answer["error"] is None
    assert metrics.registry.get_sample_value("streamrec_damaged_histories_total",
                                             {"read_by": "answer"}) == 1.0
