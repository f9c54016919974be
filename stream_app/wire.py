"""Wire formats: JSON on Kafka, versioned by a ``"v"`` field, validated by pydantic. Never pickle.

Decoding never raises anything but :class:`InvalidMessage`, whose ``reason`` is a short,
bounded code (used as a metric label) and whose ``detail`` says what exactly is wrong.
"""

from __future__ import annotations

import base64
import json
import math
import re
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal, TypeVar

import numpy as np
import orjson

from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr,
                      ValidationError)
from pydantic import field_validator, model_validator

WIRE_VERSION = 1
SOURCES = ("ann", "dr", "popular")
TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")  # fullmatch: "$" would let a "\n" end it

#: longest id (of an event, a user, an item, a request) in characters
MAX_ID_CHARS = 256
#: no NUL: numpy's string arrays, in which checkpoints keep the ids, drop trailing NULs, so
#: "sku\0" would come back from a restart as "sku", another item's name
Id = Annotated[StrictStr, Field(min_length=1, max_length=MAX_ID_CHARS, pattern=r"^[^\x00]*$")]


def is_item_id(text: str) -> bool:
    """Whether ``text`` is an id an event may carry (:data:`Id`): for ids read from this
    app's own topics, which no schema checks."""
    return 0 < len(text) <= MAX_ID_CHARS and "\x00" not in text


#: most items a request's history may hold (``Settings.max_request_history`` is at most this):
#: a bound of the schema itself, so that a request of thousands of bad items is refused at the
#: first bad one or at this length, not after an error for each (a 64 KiB request of 32,000 bad
#: items took 0.3 s of the event loop to refuse, where an answer takes a few milliseconds)
MAX_REQUEST_HISTORY = 10_000

T = TypeVar("T")


class InvalidMessage(ValueError):
    """A message that cannot be accepted; ``reason`` is one of a few fixed codes."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    # strict: JSON's true and 1.0 are not the version 1 (lax pydantic read both as 1, so a
    # client's typo passed for the version this worker speaks)
    v: Annotated[StrictInt, Field(ge=WIRE_VERSION, le=WIRE_VERSION)] = WIRE_VERSION

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()


class Event(_Wire):
    """One user timeline event (key: ``user_id``)."""

    event_id: Id | None = None
    user_id: Id
    item_id: Id
    kind: StrictStr = Field(min_length=1, max_length=64)
    ts: float
    # an erasure's field (ForgetUser), read only so that decode_event refuses a message that
    # is both; never written (a key written with escapes is read as pydantic reads any key)
    forget: StrictBool | None = Field(None, exclude=True)

    @field_validator("ts", mode="before")
    @classmethod
    def _finite_number(cls, value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError("ts must be a number (seconds since the epoch)")
        try:
            seconds = float(value)  # an integer past float's range overflows
        except OverflowError:
            seconds = math.inf
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError("ts must be finite and >= 0")
        return seconds


class ForgetUser(_Wire):
    """Erase a user's history (key: ``user_id``): ``{"v": 1, "user_id": "u1", "forget": true}``.

    Sent on the events topic, so that it is taken in the order of the user's events: those
    before it are learned and then erased with the history, those after it start a new one.
    The item model, Deep Retrieval and popularity keep what they learned from the user's
    events, as aggregates over every user; nothing in them is kept per user."""

    user_id: Id
    forget: StrictBool  # true itself, not 1

    @field_validator("forget")
    @classmethod
    def _true(cls, value: bool) -> bool:
        if not value:
            raise ValueError("forget must be true (an event has item_id, kind and ts instead)")
        return value

    kind: ClassVar[str] = "forget"  # its label among the events' kinds in the metrics


class ItemWithdrawal(_Wire):
    """An item withdrawn from the catalogue, or restored (key: ``item_id``), on the withdrawn
    items topic: ``{"v": 1, "item_id": "sku-9", "withdrawn": true}``."""

    item_id: Id
    withdrawn: StrictBool


class RecRequest(_Wire):
    """A request for recommendations (key: ``user_id`` so it meets the user's history)."""

    request_id: Id
    user_id: Id | None = None
    # items just seen, oldest first: the newest events
    history: list[Id] | None = Field(None, max_length=MAX_REQUEST_HISTORY, fail_fast=True)
    k: StrictInt = Field(10, ge=1, le=1000)
    exclude_seen: StrictBool = True
    # items never to answer with, whatever exclude_seen says (in the cart, out of stock here,
    # shown on this page already): the client knows what the stream does not
    exclude: list[Id] | None = Field(None, max_length=MAX_REQUEST_HISTORY, fail_fast=True)
    # at least one: an empty list would ask for nothing (None, or leaving it out, asks for
    # the worker's default sources)
    sources: list[Literal["ann", "dr", "popular"]] | None = Field(
        None, min_length=1, max_length=len(SOURCES), fail_fast=True)
    diversity: StrictFloat | None = Field(None, ge=0, le=100)  # an int is a float too
    reply_to: StrictStr | None = None

    @field_validator("reply_to")
    @classmethod
    def _topic_name(cls, value: str | None) -> str | None:
        if value is not None and not TOPIC_NAME.fullmatch(value):
            raise ValueError("reply_to must be a Kafka topic name ([A-Za-z0-9._-], 1..249)")
        return value


@dataclass(frozen=True, slots=True)
class RecItem:
    """One recommended item. A plain dataclass (pydantic still validates it inside a
    :class:`RecResponse` read from the wire): the responder builds k of them per answer, and a
    pydantic model cost a few microseconds each, validated or not."""

    item_id: str
    score: float
    source: str


class RecResponse(_Wire):
    """The answer to one request, sent to its ``reply_to`` topic keyed by ``request_id``."""

    request_id: str | None = None
    user_id: str | None = None
    items: list[RecItem] = Field(default_factory=list)
    model_version: int = 0
    index_version: int | None = None
    took_ms: float = 0.0
    error: str | None = None

    def to_bytes(self) -> bytes:
        """Every field, nulls included: clients can rely on the keys being there."""
        return self.model_dump_json().encode()


class TrainExample(_Wire):
    """One positive (user, item) for the learn agent (key: ``item_id``), with the user's
    history *before* this event: item ids, confidence weights and times, oldest first.

    The history, not a user vector, travels: the learn agent encodes it with the item vectors
    of the moment it learns. A vector computed at ingest would be as old as the lag between
    ingest and learning, and in a burst (a replay, a backlog after a restart) ingest runs far
    ahead: every user of the burst would be encoded against a model that had learned nothing
    yet, and the items would learn their biases only.

    ``history_ts`` is empty when the worker's user encoder does not read event times (the
    default: its decay counts events, not seconds), which halves the message; a learner whose
    encoder does read them takes an example without them as if every event were as recent as
    the example's own ``ts`` (no decay by time for that example).

    ``source``: the event's (partition, offset) in the events topic, by which the learner
    learns an example made again (after a crash) only once (``state.stream_positions``); None
    for an example with no such place, learned whenever it comes.
    """

    user_id: str
    item_id: str
    # Every number reaches the item solve, α through α0 too: one NaN or negative weight would
    # make every row NaN, and every checkpoint after. Checked by pydantic's core, not in Python
    # (a validator per field cost a third more decoding time).
    alpha: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    ts: Annotated[float, Field(allow_inf_nan=False)]
    history: list[str] = Field(default_factory=list)
    weights: list[Annotated[float, Field(ge=0, allow_inf_nan=False)]] = Field(
        default_factory=list)
    history_ts: list[Annotated[float, Field(allow_inf_nan=False)]] = Field(default_factory=list)
    # bounded as Kafka's are: a place past int64 would stop every checkpoint that saves it
    source: tuple[Annotated[StrictInt, Field(ge=0, le=2**31 - 1)],
                  Annotated[StrictInt, Field(ge=0, le=2**62)]] | None = None

    def to_bytes(self) -> bytes:
        """The same JSON as the pydantic dump (no field is optional), written by orjson from
        the fields as they are: the ingest agent writes one of these per event, and the dump
        took twice as long."""
        return orjson.dumps(self.__dict__)

    @classmethod
    def trusted(cls, user_id: str, item_id: str, alpha: float, ts: float, history: list[str],
                weights: list[float], history_ts: list[float],
                source: tuple[int, int] | None = None) -> TrainExample:
        """An example of fields that are valid already (a validated event, a stored history),
        built without validation: what ``model_construct`` builds (tested), in a third of its
        time, which spent most of it looking for defaults of fields that are all given. The
        ingest agent builds one per event; the learn agent validates what it reads anyway."""
        fields = {"user_id": user_id, "item_id": item_id, "alpha": alpha, "ts": ts,
                  "history": history, "weights": weights, "history_ts": history_ts,
                  "source": source}
        example = cls.__new__(cls)
        set_attribute = object.__setattr__  # the model is frozen
        set_attribute(example, "__dict__", {"v": WIRE_VERSION, **fields})
        set_attribute(example, "__pydantic_fields_set__", set(fields))  # all but the default
        set_attribute(example, "__pydantic_extra__", None)
        set_attribute(example, "__pydantic_private__", None)
        return example

    @model_validator(mode="after")
    def _aligned(self) -> TrainExample:
        # after the fields, not on one of them: a field left out takes its default unchecked,
        # and weights longer than the history would be read as the next example's
        history = len(self.history)
        if len(self.weights) != history or len(self.history_ts) not in (0, history):
            raise ValueError("history and weights must have equal lengths, and history_ts "
                             "too unless it is empty")
        return self


class TrainBatch(_Wire):
    """Training examples of one item partition, sent as one message (key: the partition).

    One message per partition per ingest batch instead of one per event: the learn agent's
    cost per message (consume, decode, dispatch) is paid once for tens of examples.

    The JSON travels zlib-compressed (level ``Settings.train_compression_level``, 1 by
    default): a message 4–5 times smaller for about 2 µs an example, so fewer bytes for the
    producer, the broker and the worker's fetches (the broker's CPU per event fell by a
    fifth, ``docs/throughput.md``). Plain JSON (a value that starts with ``{``) is read too.

    ``users``: how many users the ingesting worker held when it wrote the message (|C| of the
    user Gramian, and the all-pairs weight relative to it, as of these examples). A learner
    runs behind ingest, by minutes in a backlog; told the count of the moment it learns, it
    weighed every example of the backlog against the users of its end (a tenth of NDCG@10 on
    Toys, docs/results.md). None in older messages: the learner's count stands.

    ``partition``: the training partition the ingest sent it to, where the examples' event
    offsets rise (``state.stream_positions.EventPositions``); None in older messages.

    ``events_topic``: the broker's id of the events topic the examples' places are in, as
    the ingesting worker noted it at its start (None where it had none). An events topic
    made anew starts its offsets again: a learner that learned a message of the old one
    by its places took the new topic's first events for learned ones.
    """

    examples: list[TrainExample]
    users: int | None = Field(None, ge=0, le=2**53)  # past it, |C| is not a float exactly
    partition: int | None = Field(None, ge=0, le=2**31 - 1)  # a Kafka partition number
    events_topic: str | None = Field(None, max_length=64)

    #: largest decompressed message accepted (a worker writes at most 512 KiB of examples)
    MAX_DECOMPRESSED: ClassVar[int] = 8 * 1024 * 1024

    @classmethod
    def examples_of(cls, values) -> tuple[list[TrainExample], int]:
        """The examples of several messages, and how many messages did not decode (skipped:
        only this worker's own ingest writes them, so one that fails is damage, not data)."""
        decoded = cls.decode_many(values)
        return decoded.examples, decoded.bad

    @classmethod
    def decode_many(cls, values) -> DecodedTraining:
        """:meth:`examples_of`, with each example's message's ``users``, ``partition`` and
        ``events_topic``."""
        decoded = DecodedTraining([], [], [], 0, [])
        for value in values:
            try:
                batch = cls.model_validate_json(cls.plain(value))
            except ValueError:
                decoded.bad += 1
                continue
            decoded.examples.extend(batch.examples)
            decoded.users.extend([batch.users] * len(batch.examples))
            decoded.partitions.extend([batch.partition] * len(batch.examples))
            decoded.events_topics.extend([batch.events_topic] * len(batch.examples))
        return decoded

    @classmethod
    def plain(cls, value: bytes) -> bytes:
        """The JSON of a message, decompressed if it is compressed (at most
        ``MAX_DECOMPRESSED`` bytes: a damaged or hostile value cannot fill the memory)."""
        if value[:1] == b"{":
            return value
        try:
            inflater = zlib.decompressobj()
            data = inflater.decompress(value, cls.MAX_DECOMPRESSED)
        except zlib.error as error:
            raise ValueError(f"not a training message: {error}") from None
        if inflater.unconsumed_tail or not inflater.eof:
            raise ValueError("a training message that is cut short or too large")
        if inflater.unused_data:  # a second message after the first, or bytes of none
            raise ValueError("bytes after the end of a training message")
        return data

    @staticmethod
    def encode_parts(parts: list[bytes], compression_level: int = 0,
                     users: int | None = None, partition: int | None = None,
                     events_topic: str | None = None) -> bytes:
        """The message for already serialized examples (each serialized once, when it is
        measured for the size limit), zlib-compressed at ``compression_level`` (0: plain)."""
        head = b'{"v":1,' + (b'"users":%d,' % users if users is not None else b"") \
            + (b'"partition":%d,' % partition if partition is not None else b"") \
            + (b'"events_topic":%s,' % orjson.dumps(events_topic) if events_topic else b"")
        data = head + b'"examples":[' + b",".join(parts) + b"]}"
        return zlib.compress(data, compression_level) if compression_level else data

    @classmethod
    def without_sources(cls, value: bytes, compression_level: int = 0) -> bytes:
        """The message again with its examples' ``source`` taken out, so that the learner
        learns them whenever they come: for a resend of a message whose delivery failed, which
        can land after later messages of its partition (``state.stream_positions``)."""
        batch = cls.model_validate_json(cls.plain(value))
        parts = [example.model_copy(update={"source": None}).to_bytes()
                 for example in batch.examples]
        return cls.encode_parts(parts, compression_level, batch.users, batch.partition,
                                batch.events_topic)


@dataclass
class DecodedTraining:
    """Training messages decoded (:meth:`TrainBatch.decode_many`): their examples, for each
    example its message's ``users``, ``partition`` and ``events_topic``, and how many
    messages did not decode."""

    examples: list[TrainExample]
    users: list[int | None]
    partitions: list[int | None]
    bad: int
    events_topics: list[str | None]


#: most original bytes a dead letter carries of the message's value, and of its key (sent
#: twice: as the letter's key and in it): base64 makes them 4/3 as many, and a letter must stay
#: under the producer's request limit (Faust's ``producer_max_request_size``, 1,000,000 bytes),
#: or it could never be sent, and the events behind it would never be committed
DEAD_LETTER_PAYLOAD_BYTES = 512 * 1024
DEAD_LETTER_KEY_BYTES = 16 * 1024
#: largest answer a worker sends (under the producer's request limit with the key and the
#: headers kept): k = 1000 items of long ids, JSON-escaped, can make 1.6 MB, which the
#: producer would refuse, and the client would only hear of it on the responses topic
MAX_ANSWER_BYTES = 900_000
#: longest error text a dead letter or an error response carries (one over the producer's
#: request size would be refused, sent again, refused, and hold its partition for ever)
MAX_ERROR_CHARS = 2_000
#: most bytes (names, values and their lengths) of a message's headers that its dead letter,
#: its copy moved to its user's partition, or its answer carries: the first headers that fit,
#: in their order
KEPT_HEADER_BYTES = 16 * 1024
#: what a header takes in a record beside its name and value: two lengths, each a varint of
#: at most 5 bytes. Not counted, empty headers passed the bound in any number: 490,000 of them
#: made a dead letter over the producer's limit, refused and sent again for ever
HEADER_OVERHEAD_BYTES = 10


def headers_kept(headers) -> tuple[list[tuple[str, bytes | None]], int]:
    """The first of a message's ``headers`` (pairs, or a mapping, or None) that fit in
    :data:`KEPT_HEADER_BYTES`, and how many were left out. Headers a client set (a trace id,
    a tenant) travel with its event when the worker sends it on; a bound keeps a message with
    headers near the broker's limit from making a record that can never be sent, as the
    payload's and the key's bounds do."""
    pairs = list(headers.items() if hasattr(headers, "items") else headers or ())
    kept, size = [], 0
    for name, value in pairs:
        size += len(name.encode("utf-8", "replace")) + len(value or b"") + HEADER_OVERHEAD_BYTES
        if size > KEPT_HEADER_BYTES:
            break
        kept.append((name, value))
    return kept, len(pairs) - len(kept)


class DeadLetter(_Wire):
    """What the DLQ holds: the original bytes (base64), where they came from, and why. A
    message larger than :data:`DEAD_LETTER_PAYLOAD_BYTES` keeps its first bytes, with
    ``truncated`` and its size, and a key longer than :data:`DEAD_LETTER_KEY_BYTES` its first
    bytes, with ``key_size``: the whole of it stays at its topic, partition and offset. The
    message's headers are the letter's headers (:func:`headers_kept`), with the number left
    out in ``headers_left_out``."""

    reason: str
    detail: str
    topic: str
    partition: int
    offset: int
    key_b64: str | None = None  # None: the message had no key (left out of the JSON)
    payload_b64: str
    truncated: bool = False
    size: int | None = None
    key_size: int | None = None  # the key's size where the letter keeps its first bytes only
    headers_left_out: int | None = None  # headers the letter's own headers lack

    @classmethod
    def of(cls, error: InvalidMessage, raw: bytes, key: bytes | None, *, topic: str,
           partition: int, offset: int, headers=None,
           max_payload_bytes: int = DEAD_LETTER_PAYLOAD_BYTES) -> DeadLetter:
        truncated = len(raw) > max_payload_bytes
        left_out = headers_kept(headers)[1]
        return cls(
            reason=error.reason, detail=error.detail[:MAX_ERROR_CHARS], topic=topic,
            partition=partition, offset=offset,
            key_b64=None if key is None else base64.b64encode(cls.key_kept(key)).decode(),
            payload_b64=base64.b64encode(raw[:max_payload_bytes]).decode(),
            truncated=truncated, size=len(raw) if truncated else None,
            key_size=len(key) if key is not None and len(key) > DEAD_LETTER_KEY_BYTES else None,
            headers_left_out=left_out or None,
        )

    @staticmethod
    def key_kept(key: bytes | None) -> bytes | None:
        """What a letter keeps of a message's key, in it and as its own key."""
        return None if key is None else key[:DEAD_LETTER_KEY_BYTES]

    def payload(self) -> bytes:
        return base64.b64decode(self.payload_b64)


#: most validation problems a description names: pydantic reports one per bad element of a
#: list, and a request's error response must stay far below the producer's request size
MAX_PROBLEMS_NAMED = 10


def _too_long(where: str, length: int, limit: int) -> str:
    """The error of a list over the limit in force: the schema's check and the worker's."""
    return f"{where} has {length} items > {limit}"


def _describe(problems: list, limits: dict[str, int] | None = None) -> str:
    """The first problems, each with where it is; a list over one of ``limits`` (field:
    the limit in force, which a schema's own larger bound would misstate) says that limit."""
    parts = []
    for problem in problems[:MAX_PROBLEMS_NAMED]:
        where = ".".join(str(p) for p in problem["loc"]) or "message"
        limit = (limits or {}).get(where)
        if problem["type"] == "too_long" and limit is not None:
            parts.append(_too_long(where, problem["ctx"]["actual_length"], limit))
        else:
            parts.append(f"{where}: {problem['msg']}")
    if len(problems) > MAX_PROBLEMS_NAMED:
        parts.append(f"and {len(problems) - MAX_PROBLEMS_NAMED} more")
    return "; ".join(parts)


def _decode(raw: bytes | None, model: type[_Wire], max_bytes: int,
            limits: dict[str, int] | None = None) -> _Wire:
    if raw is None:
        raise InvalidMessage("empty", "message has no value")
    if len(raw) > max_bytes:
        raise InvalidMessage("oversized", f"{len(raw)} bytes > limit {max_bytes}")
    try:
        return model.model_validate_json(raw)
    except ValidationError as error:
        problems = error.errors(include_url=False)  # made once: one dict per problem
        if any(p["type"] == "json_invalid" for p in problems):
            raise InvalidMessage("bad_json", _describe(problems)) from None
        if any(p["type"] == "model_type" for p in problems):
            raise InvalidMessage("bad_json", "the message must be a JSON object") from None
        if any(p["loc"] == ("v",) for p in problems):
            raise InvalidMessage("bad_version", f"supported wire version: {WIRE_VERSION}") from None
        raise InvalidMessage("schema", _describe(problems, limits)) from None


def decode_event(raw: bytes | None, *, kinds: frozenset[str], max_bytes: int,
                 latest_ts: float | None = None) -> Event | ForgetUser:
    """Parse and validate one event, or a :class:`ForgetUser`; unknown kinds are rejected
    (their weight is undefined), and so is a ``ts`` past ``latest_ts`` (a time in the future,
    or in milliseconds)."""
    try:
        event = _decode(raw, Event, max_bytes)
    except InvalidMessage as error:
        if error.reason != "schema":
            raise
        return _forget_user(raw, error)
    assert isinstance(event, Event)
    if event.forget is not False and "forget" in event.model_fields_set:
        # taken as an event, it once lost the erasure without a word
        raise InvalidMessage("schema", "forget: an erasure names its user_id alone, and this "
                             "message has an event's item_id, kind and ts too; send the event "
                             "and the erasure apart")
    if event.kind not in kinds:
        raise InvalidMessage("unknown_kind", f"kind {event.kind!r} is not one of {sorted(kinds)}")
    if latest_ts is not None and event.ts > latest_ts:
        raise InvalidMessage("ts_future", f"ts {event.ts!r} is {event.ts - latest_ts:.0f} s past "
                             f"the latest time accepted now ({latest_ts:.0f}); ts is in "
                             "seconds since the epoch (one in milliseconds is 1000 times it)")
    return event


def _forget_user(raw: bytes, not_an_event: InvalidMessage) -> ForgetUser:
    """The :class:`ForgetUser` of a message that is not an event (tried second: events are
    nearly all the messages); for a message with neither schema, the error of the one it
    names: a ``forget`` field asks for an erasure, and its error says what is wrong with it."""
    try:
        erasure = ForgetUser.model_validate_json(raw)
    except ValidationError as error:
        if not _names_forget(raw):
            raise not_an_event from None
        raise InvalidMessage("schema", _describe(error.errors(include_url=False))) from None
    named = _EVENT_FIELDS & _top_level_names(raw)
    if named:  # an event's, one of whose fields did not validate: not an erasure, which
        # cannot be undone (a valid event with forget is refused in decode_event)
        raise InvalidMessage("schema", f"forget: an erasure names its user_id alone, and this "
                             f"message has {', '.join(sorted(named))} too ({not_an_event.detail})")
    return erasure


_EVENT_FIELDS = frozenset({"item_id", "kind", "ts"})


def _top_level_names(raw: bytes) -> frozenset[str]:
    """The field names of a JSON object (valid: pydantic has read it). The standard
    library's parser, which reads numbers past float's range, as pydantic does."""
    try:
        fields = json.loads(raw)
    except (ValueError, RecursionError):
        return frozenset()
    return frozenset(fields) if isinstance(fields, dict) else frozenset()


def _names_forget(raw: bytes) -> bool:
    """Whether a JSON object (valid: pydantic has read it) has a ``forget`` field."""
    return "forget" in _top_level_names(raw)


def decode_request(raw: bytes | None, *, max_bytes: int, max_history: int) -> RecRequest:
    """A request; its ``history`` and its ``exclude`` hold at most ``max_history`` items each
    (a search asks for as many more candidates as it excludes)."""
    request = _decode(raw, RecRequest, max_bytes, {"history": max_history,
                                                   "exclude": max_history})
    assert isinstance(request, RecRequest)
    for name in ("history", "exclude"):
        items = getattr(request, name)
        if items is not None and len(items) > max_history:
            raise InvalidMessage("schema", _too_long(name, len(items), max_history))
    return request


def salvage_request(raw: bytes | None) -> dict[str, str | None]:
    """Best-effort ``request_id``, ``user_id`` and ``reply_to`` of a request that failed
    validation, so that its error response can still be matched and routed: only strings an
    error response can carry (UTF-8: a lone surrogate escape is not).

    Read leniently, as what failed validation often is: bytes that are not UTF-8 elsewhere in
    the value are replaced, and integers are not converted (one of more than 4,300 digits
    raises); strictly, either lost the request's id and its reply topic, and the client that
    waits there never heard of its error."""
    value = None
    for text in _lenient_texts(raw):
        try:  # bytes after the value (a C client's NUL, a second request) are left unread
            value = _SALVAGE_DECODER.raw_decode(text.lstrip())[0]
            break
        except ValueError:
            continue
        except RecursionError:  # nested deeper than the json module goes: the top level
            value = _top_level_strings(text[:SALVAGE_SCAN_CHARS])
            break
    fields: dict[str, str | None] = {"request_id": None, "user_id": None, "reply_to": None}
    if isinstance(value, dict):
        for name in fields:
            if isinstance(value.get(name), str) and 0 < len(value[name]) <= MAX_ID_CHARS \
                    and _utf8(value[name]):
                fields[name] = value[name]
    if fields["reply_to"] is not None and not TOPIC_NAME.fullmatch(fields["reply_to"]):
        fields["reply_to"] = None
    return fields


_SALVAGE_DECODER = json.JSONDecoder(parse_int=lambda digits: 0)
#: how much of a request nested too deep is scanned for its fields: 25 ms at most (a
#: megabyte of brackets took half a second, a stall of the request reader per message)
SALVAGE_SCAN_CHARS = 65_536
#: a JSON string (one not closed runs to the text's end: a string that failed to match was
#: tried again from each quote in it, a time that grew with the square of its length, 18 s
#: at 64 KiB), or one of the characters that nest or separate values
_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*(?:"|\\?\Z)|[\[\]{}:,]', re.DOTALL)


def _lenient_texts(raw: bytes | None) -> Iterator[str]:
    """The value as text: decoded as the json module decodes bytes (a BOM, UTF-16), then as
    UTF-8 with the bytes that are not replaced."""
    if not raw:
        return
    try:
        yield raw.decode(json.detect_encoding(raw), "surrogatepass")
    except UnicodeDecodeError:
        pass
    yield raw.decode("utf-8", "replace")


def _top_level_strings(text: str) -> dict[str, str]:
    """The string fields of a JSON object's top level, read without descending into its
    values, however deeply they nest (the regular expression skips from token to token), up
    to the object's end: as the json module reads them, a key given twice has its last value
    (none here when that is not a string), and what follows the object is not read."""
    fields: dict[str, str] = {}
    if not text.lstrip().startswith("{"):
        return fields
    depth, key, after_colon = 0, None, False
    for match in _JSON_TOKEN.finditer(text):
        token = match.group()
        if after_colon and not token.startswith('"'):  # a number, a literal, an array or
            fields.pop(key, None)  # an object: the key's value is no string
            key, after_colon = None, False
        if token in ("[", "{"):
            depth += 1
        elif token in ("]", "}"):
            depth -= 1
            if depth <= 0:  # the object's end
                return fields
        elif depth != 1:
            continue
        elif token == ":":
            after_colon = key is not None
        elif token == ",":
            key = None
        else:  # a string: a key, or the value of the key before the colon
            try:
                string = json.loads(token)
            except ValueError:  # not closed (the text's end) or not JSON: nothing more
                return fields
            if after_colon:
                fields[key] = string
                key, after_colon = None, False
            else:
                key = string
    return fields


def _utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


#: first byte of an item row on the item-rows topic (its layout's version)
ITEM_ROW_VERSION = b"\x01"


def encode_item_row(row: np.ndarray, offset: np.ndarray) -> bytes:
    """An item's augmented row [v, b] (d + 1) and its input offset δ (d) as one value of the
    item-rows topic: a version byte, then 2d + 1 little-endian float32 (the key is the item
    id). Raw numbers, never pickle: every worker of the app reads them."""
    values = np.concatenate([np.asarray(row, dtype="<f4"), np.asarray(offset, dtype="<f4")])
    return ITEM_ROW_VERSION + values.tobytes()


def decode_item_row(raw: bytes | None, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """``(row (d + 1,), offset (d,))`` of an item-rows value; ValueError for one of another
    version or size (another dimension d) or with numbers that are not finite."""
    values = _versioned_floats(raw, ITEM_ROW_VERSION, 2 * dim + 1, f"an item row of d = {dim}")
    return values[:dim + 1], values[dim + 1:]


def _versioned_floats(raw: bytes | None, version: bytes, count: int, what: str) -> np.ndarray:
    """The ``count`` little-endian float32 after a ``version`` byte, as float64; ValueError
    naming ``what`` for another version or size, or numbers that are not finite."""
    size = 1 + 4 * count
    if raw is None or len(raw) != size or raw[:1] != version:
        raise ValueError(f"not {what} ({0 if raw is None else len(raw)} bytes, {size} "
                         f"expected)")
    values = np.frombuffer(raw, dtype="<f4", offset=1).astype(np.float64)
    _check_shared_numbers(values, what)
    return values


#: largest magnitude a number of a shared row or offset step may have: a learned row is of
#: order 1, and one damaged row of 3e38 was first in every answer, and made every score of a
#: user whose history held it 3e38
MAX_SHARED_VALUE = 1e6


def _check_shared_numbers(values: np.ndarray, what: str) -> None:
    if not np.isfinite(values).all():
        raise ValueError(f"{what} with numbers that are not finite")
    if values.size and np.abs(values).max() > MAX_SHARED_VALUE:
        raise ValueError(f"{what} with numbers beyond ±{MAX_SHARED_VALUE:g}")


def chunks_by_size(parts: Sequence[T], limit: int,
                   size: Callable[[T], int] = len) -> Iterator[list[T]]:
    """``parts`` in order, in runs whose sizes (``size`` of each part, plus a byte between
    parts) stay within ``limit`` bytes; a part larger than ``limit`` makes a run alone."""
    chunk: list[T] = []
    total = 0
    for part in parts:
        cost = size(part)
        if chunk and total + cost > limit:
            yield chunk
            chunk, total = [], 0
        chunk.append(part)
        total += cost + 1
    if chunk:
        yield chunk


#: first byte of a message of input-offset steps on the training topic: no training message
#: starts so (JSON starts with "{", zlib's streams with 0x78)
OFFSET_STEPS_MESSAGE = b"\x02"


def offset_steps_size(item_id: str, dim: int) -> int:
    """The bytes one item's step takes in a message of offset steps (about: the list's
    brackets and the 5 bytes before it aside)."""
    return len(json.dumps(item_id)) + 1 + 4 * dim


def encode_offset_steps(item_ids: Sequence[str], steps: np.ndarray) -> bytes:
    """The steps a worker took on the input offsets δ of items another worker owns, since it
    last sent them, as one message of the training topic for the items' partition: their
    owner learns it, and commits it, as it does the training messages (so a step is added
    once, by whichever worker holds the partition when it is read). The marker byte, the
    byte length of the JSON list of the item ids (4 bytes, little-endian), that list, then
    the steps (n, d) as little-endian float32. Raw numbers, never pickle."""
    ids = json.dumps(list(item_ids), separators=(",", ":")).encode()
    return (OFFSET_STEPS_MESSAGE + len(ids).to_bytes(4, "little") + ids
            + np.asarray(steps, dtype="<f4").tobytes())


def is_offset_steps(value: bytes) -> bool:
    return value[:1] == OFFSET_STEPS_MESSAGE


def decode_offset_steps(raw: bytes, dim: int) -> tuple[list[str], np.ndarray]:
    """The item ids and steps (n, d) of an offset-steps message; ValueError for one that is
    cut short, of another dimension d, or with numbers that are not finite."""
    if not is_offset_steps(raw) or len(raw) < 5:
        raise ValueError("not an offset-steps message")
    size = int.from_bytes(raw[1:5], "little")
    try:
        ids = json.loads(raw[5:5 + size])
    except (ValueError, UnicodeDecodeError, RecursionError) as error:  # deep nesting: the last
        raise ValueError(f"an offset-steps message with damaged item ids: {error}") from None
    if not isinstance(ids, list) or not all(isinstance(item, str) and is_item_id(item)
                                            for item in ids):
        raise ValueError("an offset-steps message whose item ids are not a list of ids")
    floats = raw[5 + size:]
    if len(floats) != 4 * dim * len(ids):
        raise ValueError(f"an offset-steps message of {len(floats)} bytes of steps, "
                         f"{4 * dim * len(ids)} expected for {len(ids)} items of d = {dim}")
    steps = np.frombuffer(floats, dtype="<f4").astype(np.float64).reshape(len(ids), dim)
    _check_shared_numbers(steps, "an offset-steps message")
    return ids, steps
