"""Wire formats: what is accepted, what is rejected, and with which reason."""

from __future__ import annotations

import base64
import json

import numpy as np
import orjson
import pytest

from stream_app import wire as wire_module
from stream_app.wire import (DEAD_LETTER_PAYLOAD_BYTES, HEADER_OVERHEAD_BYTES, KEPT_HEADER_BYTES,
                             MAX_REQUEST_HISTORY, DeadLetter, InvalidMessage, RecRequest,
                             RecResponse, decode_event, decode_item_row, decode_request,
                             encode_item_row, headers_kept, salvage_request)

KINDS = frozenset({"view", "click", "sale"})


def encode(**fields) -> bytes:
    return json.dumps({"v": 1, **fields}).encode()


def good_event(**changes) -> dict:
    return {"user_id": "u1", "item_id": "i1", "kind": "view", "ts": 1_700_000_000, **changes}


def reason_of_event(raw: bytes, max_bytes: int = 4096) -> str:
    with pytest.raises(InvalidMessage) as caught:
        decode_event(raw, kinds=KINDS, max_bytes=max_bytes)
    return caught.value.reason


def test_a_good_event_round_trips():
    event = decode_event(encode(**good_event(event_id="e1", extra="ignored")), kinds=KINDS,
                         max_bytes=4096)
    assert (event.user_id, event.item_id, event.kind, event.ts, event.event_id) == (
        "u1", "i1", "view", 1_700_000_000.0, "e1")
    assert decode_event(event.to_bytes(), kinds=KINDS, max_bytes=4096) == event


def test_a_missing_version_means_the_current_one():
    raw = json.dumps(good_event()).encode()
    assert decode_event(raw, kinds=KINDS, max_bytes=4096).v == 1


@pytest.mark.parametrize("raw, reason", [
    (b"{oops", "bad_json"),
    (b"\xff\xfe", "bad_json"),
    (b"[1, 2]", "bad_json"),
    (b"", "bad_json"),
    (encode(user_id="u1", kind="view", ts=1.0), "schema"),  # no item_id
    (encode(**good_event(user_id=7)), "schema"),  # number, not a string
    (encode(**good_event(ts="yesterday")), "schema"),
    (encode(**good_event(ts=True)), "schema"),
    (encode(**good_event(ts=-1)), "schema"),
    (encode(**good_event(user_id="")), "schema"),
    (encode(**good_event(item_id="sku\u0000")), "schema"),  # a restart would read "sku"
    (encode(**good_event(event_id="e\u00001")), "schema"),
    (encode(**good_event(kind="teleport")), "unknown_kind"),
    (json.dumps({"v": 2, **good_event()}).encode(), "bad_version"),
    (json.dumps({"v": True, **good_event()}).encode(), "bad_version"),
    (json.dumps({"v": 1.0, **good_event()}).encode(), "bad_version"),
    (json.dumps({"v": "1", **good_event()}).encode(), "bad_version"),
])
def test_bad_events_are_rejected_with_a_reason(raw, reason):
    assert reason_of_event(raw) == reason


def test_an_event_past_the_latest_time_accepted_is_rejected_and_one_at_it_is_not():
    """A ts in milliseconds (or from the far future) would lead every event-time clock."""
    raw = encode(**good_event(ts=1.7e12))
    with pytest.raises(InvalidMessage) as caught:
        decode_event(raw, kinds=KINDS, max_bytes=4096, latest_ts=1.8e9)
    assert caught.value.reason == "ts_future" and "milliseconds" in caught.value.detail
    assert decode_event(raw, kinds=KINDS, max_bytes=4096, latest_ts=1.7e12).ts == 1.7e12
    assert decode_event(raw, kinds=KINDS, max_bytes=4096).ts == 1.7e12  # no limit


def test_oversized_events_are_rejected_before_parsing():
    assert reason_of_event(encode(**good_event(pad="x" * 5000)), max_bytes=4096) == "oversized"
    with pytest.raises(InvalidMessage, match="empty"):
        decode_event(None, kinds=KINDS, max_bytes=4096)


def test_schema_errors_name_the_field():
    with pytest.raises(InvalidMessage, match="ts"):
        decode_event(encode(**good_event(ts="soon")), kinds=KINDS, max_bytes=4096)


def decode(raw: bytes) -> RecRequest:
    return decode_request(raw, max_bytes=4096, max_history=3)


def test_a_request_names_the_version_as_the_integer_1_or_not_at_all():
    """JSON's true and 1.0 read as 1 while the version was a lax literal: a client's typo
    passed for the version this worker speaks."""
    assert decode(json.dumps({"request_id": "r", "user_id": "u"}).encode()).v == 1
    for version in (True, 1.0, "1", 2, None):
        with pytest.raises(InvalidMessage) as caught:
            decode(json.dumps({"v": version, "request_id": "r", "user_id": "u"}).encode())
        assert caught.value.reason == "bad_version"


def test_a_good_request_and_its_defaults():
    request = decode(encode(request_id="r1", user_id="u1"))
    assert (request.k, request.exclude_seen, request.sources, request.reply_to) == (
        10, True, None, None)
    full = decode(encode(request_id="r", history=["a", "b"], k=1000, sources=["ann", "popular"],
                         diversity=0.5, reply_to="rec-responses.mine"))
    assert full.history == ["a", "b"] and full.sources == ["ann", "popular"]
    assert decode(encode(request_id="r", exclude=["a", "b"])).exclude == ["a", "b"]


@pytest.mark.parametrize("fields, fragment", [
    ({"user_id": "u1"}, "request_id"),
    ({"request_id": "r", "k": 0}, "k"),
    ({"request_id": "r", "k": 1001}, "k"),
    ({"request_id": "r", "k": "10"}, "k"),
    ({"request_id": "r", "sources": ["magic"]}, "sources"),
    ({"request_id": "r", "sources": []}, "sources"),
    ({"request_id": "r", "reply_to": "no spaces allowed"}, "reply_to"),
    ({"request_id": "r", "history": ["a", "b", "c", "d"]}, "history"),
    ({"request_id": "r", "exclude_seen": "yes"}, "exclude_seen"),
    ({"request_id": "r", "exclude": ["ok", ""]}, "exclude"),
    ({"request_id": "r", "exclude": "sku-1"}, "exclude"),
    ({"request_id": "r", "exclude": ["a", "b", "c", "d"]}, "exclude"),
    ({"request_id": "r", "diversity": True}, "diversity"),  # a number, as k is
    ({"request_id": "r", "diversity": "0.5"}, "diversity"),
])
def test_bad_requests_say_what_is_wrong(fields, fragment):
    with pytest.raises(InvalidMessage) as caught:
        decode(encode(**fields))
    assert fragment in str(caught.value)


def test_salvage_finds_what_can_route_an_error():
    assert salvage_request(encode(request_id="r9", user_id="u", k=0, reply_to="rec-responses-x")
                           ) == {"request_id": "r9", "user_id": "u", "reply_to": "rec-responses-x"}
    assert salvage_request(b"garbage") == {"request_id": None, "user_id": None, "reply_to": None}
    assert salvage_request(encode(request_id=5, reply_to="bad topic"))["reply_to"] is None


def test_salvage_keeps_only_what_an_error_response_can_carry():
    """Input that fails validation must still get its error response: a nesting too deep for
    the json module, a lone surrogate escape (no UTF-8 for it), a topic name with a newline
    (a regex "$" matches before it)."""
    deep = b'{"request_id": "r2", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    assert salvage_request(deep) == {"request_id": "r2", "user_id": None, "reply_to": None}
    lone = salvage_request(b'{"request_id": "r1", "user_id": "\\ud800"}')
    assert lone == {"request_id": "r1", "user_id": None, "reply_to": None}
    RecResponse(request_id=lone["request_id"], user_id=lone["user_id"], error="e").to_bytes()
    assert salvage_request(encode(request_id="r3", reply_to="rec-responses\n"))["reply_to"] is None


@pytest.mark.parametrize("damage", [b'"note":"caf\xe9"', b'"n":' + b"7" * 5000])
def test_salvage_reads_past_what_made_the_request_fail(damage):
    """A byte that is not UTF-8, or an integer too long for the json module, elsewhere in the
    request: it fails validation, and its error still reaches the client's own reply topic."""
    raw = b'{"request_id":"r-42","reply_to":"rec-responses-client7","k":0,' + damage + b"}"
    with pytest.raises(InvalidMessage):
        decode(raw)
    assert salvage_request(raw) == {"request_id": "r-42", "user_id": None,
                                    "reply_to": "rec-responses-client7"}


def test_salvage_reads_the_top_level_past_bytes_after_it_and_nesting_too_deep():
    """A C client's NUL after the request (strlen + 1 bytes), two requests in one value, and a
    nesting deeper than the json module goes: each failed validation and lost its error
    response's id and reply topic. The top level is read, not what nests in it."""
    text = b'{"request_id":"r-7","reply_to":"rec-responses.app","k":0'
    expected = {"request_id": "r-7", "user_id": None, "reply_to": "rec-responses.app"}
    for raw in (text + b"}\x00", text + b'}{"request_id":"r-8"}', text + b"}\n garbage"):
        with pytest.raises(InvalidMessage):
            decode(raw)
        assert salvage_request(raw) == expected
    deep = (b'{"x": {"request_id": "nested", "y": ' + b"[" * 3000 + b'"\\"]"' + b"]" * 3000
            + b'}, "request_id": "r-\\"9", "n": 5, "reply_to": "a", "reply_to": "rec-x",'
            b' "u": ["user_id", "no"], "user_id": "caf\xc3\xa9"}')
    assert salvage_request(deep) == {"request_id": 'r-"9', "user_id": "caf\u00e9",
                                     "reply_to": "rec-x"}
    assert json.loads(deep.replace(b"[" * 3000, b"[").replace(b"]" * 3000, b"]"))[
        "request_id"] == 'r-"9'  # the same text, nested less, reads alike
    assert salvage_request(b"[" * 3000 + b'"request_id", "r"') == {
        "request_id": None, "user_id": None, "reply_to": None}
    nested = b'"x": ' + b"[" * 3000 + b"]" * 3000
    for raw, request_id in (  # the object's end ends the scan; the last of a key decides
            (b'{"request_id": "r-7", ' + nested + b'} {"request_id": "r-8"}', "r-7"),
            (b'{"request_id": "r-7", ' + nested + b'], "request_id": "r-8"}', "r-7"),
            (b'{"request_id": "r-7", "request_id": 5, ' + nested + b"}", None),
            (b'{"request_id": "r-7", "request_id": {"a": 1}, ' + nested + b"}", None)):
        assert salvage_request(raw)["request_id"] == request_id
    # a string not closed, of escaped quotes: each quote was a new start of a string that
    # failed at the text's end (18 s at 64 KiB); one pass now, and what came before it
    unclosed = b'{"request_id": "r-9", "x": ' + b"[" * 3000 + b'"' + b'\\"' * 30_000
    assert salvage_request(unclosed)["request_id"] == "r-9"


def test_salvage_reads_what_the_json_module_reads_a_bom_and_utf16_included():
    text = '{"request_id":"r1","reply_to":"rec-responses-x","k":0}'
    for raw in (b"\xef\xbb\xbf" + text.encode(), text.encode("utf-16")):
        assert salvage_request(raw)["request_id"] == "r1"
        assert salvage_request(raw)["reply_to"] == "rec-responses-x"


def test_a_reply_topic_ending_in_a_newline_is_refused():
    with pytest.raises(InvalidMessage, match="reply_to"):
        decode(encode(request_id="r", reply_to="rec-responses\n"))


def test_an_event_time_past_float_s_range_is_a_schema_error():
    raw = encode(**good_event()).replace(b"1700000000", b"1" + b"0" * 400)
    assert reason_of_event(raw) == "schema"


def test_responses_always_carry_every_key():
    body = json.loads(RecResponse(request_id=None, error="bad").to_bytes())
    assert {"request_id", "user_id", "items", "model_version", "index_version", "took_ms",
            "error", "v"} <= set(body)


def test_dead_letters_keep_the_original_bytes():
    raw = b"\x00\x01 not json"
    letter = DeadLetter.of(InvalidMessage("bad_json", "nope"), raw, b"k", topic="t",
                           partition=1, offset=42)
    again = DeadLetter.model_validate_json(letter.to_bytes())
    assert again.payload() == raw and again.offset == 42 and again.reason == "bad_json"


def test_a_dead_letter_of_a_huge_message_keeps_its_start_and_says_so():
    """A letter must fit the producer's request limit (Faust's 1,000,000 bytes), or it could
    not be sent: its value and key together, the key sent twice (the letter's and in it)."""
    raw = bytes(range(256)) * 6000  # 1.5 MB
    key = b"k" * 300_000
    letter = DeadLetter.of(InvalidMessage("oversized", "big"), raw, key, topic="t",
                           partition=0, offset=7)
    encoded = letter.to_bytes()
    assert len(encoded) + len(DeadLetter.key_kept(key)) < 1_000_000 - 1024
    again = DeadLetter.model_validate_json(encoded)
    assert again.truncated and again.size == len(raw)
    assert again.payload() == raw[:DEAD_LETTER_PAYLOAD_BYTES]
    assert again.key_size == len(key) and base64.b64decode(again.key_b64) == key[:16 * 1024]
    assert DeadLetter.of(InvalidMessage("x", "y"), b"{", b"u1", topic="t", partition=0,
                         offset=1).key_size is None
    small = DeadLetter.model_validate_json(DeadLetter.of(
        InvalidMessage("bad_json", "x"), b"{", None, topic="t", partition=0, offset=1).to_bytes())
    assert not small.truncated and small.size is None


def test_headers_are_kept_up_to_a_bound_in_their_order_and_a_letter_says_how_many_were_not():
    """A message's headers travel with its dead letter and its moved copy; headers near the
    broker's limit must not make a record that can never be sent."""
    small = [("trace", b"t-1"), ("tenant", b"acme"), ("empty", None)]
    assert headers_kept(small) == (small, 0)
    assert headers_kept(None) == ([], 0) and headers_kept(()) == ([], 0)
    assert headers_kept({"trace": b"t-1"}) == ([("trace", b"t-1")], 0)
    big = [("a", b"x" * (KEPT_HEADER_BYTES - 20)), ("b", b"y" * 20), ("c", b"z")]
    kept, left_out = headers_kept(big)
    assert kept == big[:1] and left_out == 2  # the first that fit; none after one that did not
    empty = [("", b"")] * 490_000  # under a client's 1 MiB limit on the wire: 2 bytes each
    kept, left_out = headers_kept(empty)
    assert len(kept) == KEPT_HEADER_BYTES // HEADER_OVERHEAD_BYTES
    assert left_out == len(empty) - len(kept)
    letter = DeadLetter.model_validate_json(DeadLetter.of(
        InvalidMessage("bad_json", "x"), b"{", b"u1", topic="t", partition=0, offset=1,
        headers=big).to_bytes())
    assert letter.headers_left_out == 2
    assert DeadLetter.of(InvalidMessage("bad_json", "x"), b"{", b"u1", topic="t", partition=0,
                         offset=1, headers=small).headers_left_out is None


def test_a_training_example_writes_the_json_pydantic_writes():
    """TrainExample.to_bytes (orjson over the fields) = pydantic's own dump, for a validated
    example, one built by model_construct and one built as the ingest agent builds it
    (``trusted``, the same object as model_construct's), and all decode back to the example;
    a batch of them decodes too."""
    from stream_app.wire import TrainBatch, TrainExample

    fields = dict(user_id="u1", item_id="i\u00e9\"2", alpha=2.5, ts=1.7e9 + 0.25,
                  history=["i1", "i0"], weights=[1.0, 3.0], history_ts=[1.0, 2.5],
                  source=(3, 2**40))
    trusted = TrainExample.trusted(**fields)
    constructed = TrainExample.model_construct(**fields)
    assert trusted == constructed and trusted.__dict__ == constructed.__dict__
    assert trusted.model_fields_set == constructed.model_fields_set
    assert (trusted.__pydantic_extra__, trusted.__pydantic_private__) == (
        constructed.__pydantic_extra__, constructed.__pydantic_private__)
    for example in (TrainExample(**fields), constructed, trusted):
        raw = example.to_bytes()
        assert json.loads(raw) == json.loads(example.model_dump_json(exclude_none=True))
        assert TrainExample.model_validate_json(raw) == TrainExample(**fields)
    batch = TrainBatch.encode_parts([TrainExample(**fields).to_bytes()] * 2)
    assert TrainBatch.examples_of([batch]) == ([TrainExample(**fields)] * 2, 0)
    placeless = TrainExample.trusted(**{**fields, "source": None})
    assert TrainExample.model_validate_json(placeless.to_bytes()).source is None
    for bad in ([-1, 4], [1, 2, 3], [1.5, 2], "x"):
        with pytest.raises(ValueError):
            TrainExample.model_validate_json(orjson.dumps({**fields, "source": bad}))


def test_a_resent_training_message_keeps_everything_but_the_event_offsets():
    """A resend goes without the examples' sources (learned whenever it comes), with the
    same examples otherwise, the same users count and partition, compressed alike."""
    from stream_app.wire import TrainBatch, TrainExample

    examples = [TrainExample(user_id=f"u{k}", item_id="i", alpha=1.0, ts=float(k),
                             history=["a"] * k, weights=[1.0] * k, source=(1, 10 + k))
                for k in range(3)]
    value = TrainBatch.encode_parts([e.to_bytes() for e in examples], 1, users=7, partition=4,
                                    events_topic='id-"1"')
    resent = TrainBatch.without_sources(value, 1)
    assert resent[:1] != b"{"  # compressed
    batch = TrainBatch.model_validate_json(TrainBatch.plain(resent))
    assert (batch.users, batch.partition, batch.events_topic) == (7, 4, 'id-"1"')
    assert batch.examples == [e.model_copy(update={"source": None}) for e in examples]
    decoded = TrainBatch.decode_many([value, TrainBatch.encode_parts([examples[0].to_bytes()])])
    assert decoded.partitions == [4] * 3 + [None]
    assert decoded.events_topics == ['id-"1"'] * 3 + [None]  # an older message names none


def test_training_messages_travel_compressed_and_damage_is_counted_not_raised():
    """A compressed message decodes to the same examples as the plain one and is several
    times smaller; a cut, corrupted or oversized (decompression bomb) value counts as one bad
    message beside the good ones, never an exception."""
    import zlib

    from stream_app.wire import TrainBatch, TrainExample

    examples = [TrainExample(user_id=f"u{k}", item_id=f"i{k % 7}", alpha=1.0, ts=float(k),
                             history=[f"i{j}" for j in range(k % 20)],
                             weights=[1.0] * (k % 20)) for k in range(50)]
    parts = [example.to_bytes() for example in examples]
    plain = TrainBatch.encode_parts(parts)
    packed = TrainBatch.encode_parts(parts, compression_level=1)
    assert plain[:1] == b"{" and len(packed) * 3 < len(plain)
    assert TrainBatch.examples_of([packed, plain]) == (examples * 2, 0)
    bomb = zlib.compress(b"{" + b" " * (TrainBatch.MAX_DECOMPRESSED + 10) + b"}", 9)
    damaged = [packed[:-5], packed[:10] + b"\x00" * 20 + packed[30:], b"\x78junk", bomb,
               packed + b"garbage",  # read as the message alone, before
               packed + packed,  # two messages as one: the second's examples were lost
               TrainBatch.encode_parts(parts, 1, users=10**30)]  # a count no worker holds
    for value in damaged:
        assert TrainBatch.examples_of([packed, value]) == (examples, 1)


def test_a_training_message_says_its_users_and_an_older_one_says_none():
    """The count of users travels with a message, plain or compressed, for each of its
    examples; a message written without it (older workers) decodes with None."""
    from stream_app.wire import TrainBatch, TrainExample

    examples = [TrainExample(user_id=f"u{k}", item_id="i", alpha=1.0, ts=float(k), history=[],
                             weights=[]) for k in range(3)]
    parts = [example.to_bytes() for example in examples]
    values = [TrainBatch.encode_parts(parts[:2], 1, users=41),
              TrainBatch.encode_parts(parts[2:], 0, users=0), TrainBatch.encode_parts(parts),
              b"damaged"]
    decoded = TrainBatch.decode_many(values)
    assert decoded.examples == examples + examples
    assert decoded.users == [41, 41, 0, None, None, None]
    assert decoded.bad == 1
    assert TrainBatch.model_validate_json(TrainBatch.plain(values[0])).users == 41
    with pytest.raises(ValueError):
        TrainBatch.model_validate_json(b'{"v":1,"users":-1,"examples":[]}')


def test_a_training_example_may_leave_out_its_history_times_but_not_misalign_them():
    from stream_app.wire import TrainExample

    fields = dict(user_id="u1", item_id="i2", alpha=1.0, ts=5.0, history=["i1", "i0"],
                  weights=[1.0, 3.0])
    assert TrainExample(**fields, history_ts=[]).history_ts == []
    assert TrainExample(**fields).history_ts == []
    with pytest.raises(ValueError, match="history_ts"):
        TrainExample(**fields, history_ts=[1.0])
    with pytest.raises(ValueError, match="weights"):
        TrainExample(**{**fields, "weights": [1.0]}, history_ts=[])
    # left out, history_ts takes its default: the lengths are checked all the same
    for weights in ([1.0], [1.0, 3.0, 2.0]):
        with pytest.raises(ValueError, match="weights"):
            TrainExample(**{**fields, "weights": weights})
        with pytest.raises(ValueError, match="weights"):
            TrainExample.model_validate_json(orjson.dumps({**fields, "weights": weights}))


@pytest.mark.parametrize("field, value", [
    ("alpha", float("nan")), ("alpha", float("inf")), ("alpha", -1e6), ("alpha", 0.0),
    ("ts", float("nan")), ("weights", [1.0, float("nan")]), ("weights", [1.0, -2.0]),
    ("history_ts", [1.0, float("inf")])])
def test_a_training_example_refuses_numbers_that_would_poison_the_model(field, value):
    """Every number of an example reaches the item solve (α through α0 too): one NaN or
    negative weight there would make every row NaN, and every checkpoint after."""
    from stream_app.wire import TrainExample

    fields = dict(user_id="u1", item_id="i2", alpha=1.0, ts=5.0, history=["i1", "i0"],
                  weights=[1.0, 3.0], history_ts=[1.0, 2.0])
    TrainExample(**fields)
    with pytest.raises(ValueError, match=field):
        TrainExample(**{**fields, field: value})


def test_offset_steps_round_trip_as_float32_and_refuse_other_shapes():
    """A message of offset steps on the training topic: told from training messages by its
    first byte, item ids and float32 steps back as sent; damage is a ValueError."""
    from stream_app.wire import (TrainBatch, decode_offset_steps, encode_offset_steps,
                                 is_offset_steps)

    steps = np.random.default_rng(1).normal(size=(3, 4))
    raw = encode_offset_steps(["a", "bé", "c"], steps)
    assert is_offset_steps(raw)
    assert not is_offset_steps(TrainBatch.encode_parts([b"{}"]))
    assert not is_offset_steps(TrainBatch.encode_parts([b"{}"], compression_level=1))
    ids, back = decode_offset_steps(raw, dim=4)
    assert ids == ["a", "bé", "c"]
    np.testing.assert_array_equal(back, steps.astype(np.float32))
    infinite = encode_offset_steps(["a"], np.array([[1.0, np.inf, 0.0, 0.0]]))
    nested = b"[" * 100_000  # the JSON reader's recursion, not a ValueError: it ended a learner
    deep = b"\x02" + len(nested).to_bytes(4, "little") + nested
    huge = encode_offset_steps(["a"], np.array([[1.0, 3e38, 0.0, 0.0]]))
    no_ids = [encode_offset_steps([item], steps[:1]) for item in ("", "a\x00", "x" * 257)]
    for bad in (raw[:-4], raw + b"\0" * 4, raw[:3], b"\x02" + b"\xff" * 8, infinite,
                encode_offset_steps(["a", "b", "c"], steps[:, :3]), deep, huge, *no_ids):
        with pytest.raises(ValueError):
            decode_offset_steps(bad, dim=4)


def test_an_item_row_round_trips_as_float32_and_refuses_other_shapes():
    rng = np.random.default_rng(0)
    row, offset = rng.normal(size=5), rng.normal(size=4)
    raw = encode_item_row(row, offset)
    assert len(raw) == 1 + 4 * 9 and b"pickle" not in raw
    got_row, got_offset = decode_item_row(raw, dim=4)
    np.testing.assert_array_equal(got_row, row.astype(np.float32))
    np.testing.assert_array_equal(got_offset, offset.astype(np.float32))
    for bad in (raw[:-4], raw + b"\0" * 4, b"\x02" + raw[1:], None,
                encode_item_row(np.append(row[:4], np.nan), offset),
                encode_item_row(np.append(row[:4], 3e38), offset)):  # first in every answer
        with pytest.raises(ValueError):
            decode_item_row(bad, dim=4)
    with pytest.raises(ValueError):
        decode_item_row(raw, dim=5)


def test_a_moved_event_gets_an_id_naming_its_origin_unless_that_makes_it_too_large():
    """Fields the worker does not read stay; an id that would take the event past the size
    limit is left out (the event moves as it came)."""
    from types import SimpleNamespace

    from stream_app.app import with_moved_id

    value = encode(**good_event(extra="kept", big=2**70, odd=float("nan")))
    message = SimpleNamespace(value=value, partition=3, offset=41, timestamp=1.7e9)
    moved = with_moved_id(message, 4096)
    assert b'"big":1180591620717411303424' in moved and b'"odd":NaN' in moved
    assert json.loads(moved)["event_id"] == "moved:3:41:1700000000.0"
    assert json.loads(moved)["extra"] == "kept"
    assert decode_event(moved, kinds=KINDS, max_bytes=4096).event_id == "moved:3:41:1700000000.0"
    assert with_moved_id(message, len(value) + 10) == value
    surrogate = value[:-1] + b', "x": "\\ud800"}'
    assert with_moved_id(SimpleNamespace(value=surrogate, partition=3, offset=41,
                                         timestamp=1.7e9), 4096) == surrogate


@pytest.mark.parametrize("body", [
    b'"history": [' + b",".join([b"0"] * 30_000) + b"]",  # 30,000 bad items
    b'"history": [' + b",".join([b'""'] * 20_000) + b"]",
    b'"history": [' + b",".join([b'"a"'] * 12_000) + b"]",  # good items past the bound
    b'"sources": [' + b",".join([b'"ann"'] * 12_000) + b"]",
])
def test_a_request_of_thousands_of_bad_list_items_is_refused_at_the_first(body):
    """A request's lists are bounded by the schema and refused at their first bad item: a
    64 KiB request of 30,000 bad history items made one error each (0.3 s of the event loop,
    which answers and ingests too); now one error names it."""
    raw = b'{"request_id": "r1", ' + body + b"}"
    with pytest.raises(InvalidMessage) as caught:
        decode_request(raw, max_bytes=len(raw), max_history=MAX_REQUEST_HISTORY)
    assert caught.value.reason == "schema" and "more" not in str(caught.value)


@pytest.mark.parametrize("items", [1_001, MAX_REQUEST_HISTORY + 1])
def test_a_history_too_long_is_refused_with_the_limit_in_force(items):
    """Over the schema's own bound too, the error names the worker's limit (1,000 here)."""
    raw = encode(request_id="r", history=["a"] * items)
    with pytest.raises(InvalidMessage, match=f"history has {items} items > 1000"):
        decode_request(raw, max_bytes=len(raw), max_history=1_000)


def test_an_error_names_its_first_problems_and_counts_the_rest():
    problems = [{"type": "string_type", "loc": ("history", n), "msg": "Input should be a string"}
                for n in range(25)]
    text = wire_module._describe(problems)
    assert text.count("history.") == wire_module.MAX_PROBLEMS_NAMED
    assert text.endswith(f"and {25 - wire_module.MAX_PROBLEMS_NAMED} more")


def test_an_erasure_decodes_and_its_errors_name_its_own_fields():
    """``{"user_id", "forget": true}`` is a ForgetUser; a message with a ``forget`` field gets
    the erasure's error, one without it the event's; true is only true; a message with an
    event's fields and ``forget`` (but false) is neither: taken as an event, it lost the
    erasure without a word."""
    from stream_app.wire import ForgetUser

    erasure = decode_event(encode(user_id="u1", forget=True), kinds=KINDS, max_bytes=4096)
    assert erasure == ForgetUser(user_id="u1", forget=True) and erasure.kind == "forget"
    assert decode_event(erasure.to_bytes(), kinds=KINDS, max_bytes=4096) == erasure
    for wrong, named in [({"forget": 1}, "forget"), ({"forget": False}, "forget"),
                         ({"forget": "true"}, "forget"), ({"user_id": ""}, "user_id")]:
        with pytest.raises(InvalidMessage) as caught:
            decode_event(encode(**{"user_id": "u1", "forget": True, **wrong}), kinds=KINDS,
                         max_bytes=4096)
        assert caught.value.reason == "schema" and caught.value.detail.startswith(named)
    with pytest.raises(InvalidMessage) as caught:
        decode_event(encode(user_id="u1"), kinds=KINDS, max_bytes=4096)
    assert "item_id" in caught.value.detail and "forget" not in caught.value.detail
    assert reason_of_event(encode(forget=True, user_id="u1", v=2)) == "bad_version"
    assert reason_of_event(encode(forget=True, user_id="u1", v=True)) == "bad_version"
    for both in (encode(**good_event(forget=True)), encode(**good_event(forget=1)),
                 encode(**good_event(forget=None)),
                 encode(**good_event()).replace(b"{", b'{"\\u0066orget": true, ', 1)):
        with pytest.raises(InvalidMessage) as caught:
            decode_event(both, kinds=KINDS, max_bytes=4096)
        assert caught.value.reason == "schema" and caught.value.detail.startswith("forget")
    assert decode_event(encode(**good_event(forget=False)), kinds=KINDS,
                        max_bytes=4096).item_id == "i1"
    # an event with forget one of whose fields is wrong: not an erasure either (it cannot be
    # undone, and it was one when the event's fields failed to validate)
    for wrong in ({"ts": -1}, {"ts": "1700000000"}, {"ts": None}, {"item_id": ""},
                  {"item_id": 12}, {"kind": ""}):
        with pytest.raises(InvalidMessage) as caught:
            decode_event(encode(**good_event(forget=True, **wrong)), kinds=KINDS,
                         max_bytes=4096)
        assert caught.value.reason == "schema" and caught.value.detail.startswith("forget")
    with pytest.raises(InvalidMessage) as caught:
        decode_event(encode(user_id="u1", forget=True, ts=1.7e9), kinds=KINDS, max_bytes=4096)
    assert "ts" in caught.value.detail
    assert decode_event(encode(**good_event(item_id="\u00e9\\u")), kinds=KINDS,
                        max_bytes=4096).item_id == "\u00e9\\u"
