"""End to end on a real broker: kafka-python clients on one side, a real worker on the other."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from kafka import KafkaConsumer, KafkaProducer
from prometheus_client.parser import text_string_to_metric_families

from stream_app.client import RecClient, forget_users, withdraw_items
from stream_app.kafka import client_config, ensure_topics, key_partition
from stream_app.wire import DeadLetter, RecRequest, RecResponse

from .conftest import event

pytestmark = pytest.mark.integration

# Popularity with equal timestamps is the plain weighted count: c = 10 (one sale),
# b = 2 clicks x 4 = 8, a = 3 views, d = 1 view.
STREAM = [
    ("u1", "b", "click"), ("u2", "b", "click"), ("u2", "a", "view"), ("u3", "a", "view"),
    ("u3", "c", "sale"), ("u4", "a", "view"), ("u4", "d", "view"),
]


def produce(settings, messages: list[tuple[bytes | None, bytes]], headers=None) -> None:
    producer = KafkaProducer(**client_config(settings), acks=1, enable_idempotence=False)
    for key, value in messages:
        producer.send(settings.topic_events, key=key, value=value, headers=headers)
    producer.flush()
    producer.close()


def produce_stream(settings) -> None:
    produce(settings, [(user.encode(), event(user, item, kind, event_id=f"{user}-{i}"))
                       for i, (user, item, kind) in enumerate(STREAM)])


def read_topic(settings, topic: str, count: int, timeout_s: float = 20.0) -> list:
    consumer = KafkaConsumer(topic, **client_config(settings), auto_offset_reset="earliest",
                             enable_auto_commit=False, fetch_max_wait_ms=20)
    records: list = []
    deadline = time.monotonic() + timeout_s
    while len(records) < count and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=200).values():
            records.extend(batch)
    consumer.close()
    return records


def labelled(settings, name: str, **labels: str) -> float:
    """The sum of a metric's samples that carry ``labels``, from the worker's /metrics page."""
    url = f"http://{settings.metrics_host}:{settings.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as page:
        families = text_string_to_metric_families(page.read().decode())
    return sum(sample.value for family in families for sample in family.samples
               if sample.name == name and labels.items() <= sample.labels.items())


def ids(response: RecResponse) -> list[str]:
    return [item.item_id for item in response.items]


POPULAR = {"sources": ["popular"]}
CLUSTERS_ITEMS = 6 * 30  # items of tests/test_engine_model.planted_stream


def test_events_reach_the_worker_and_requests_get_popularity_minus_seen(settings, start_worker):
    worker = start_worker(settings)
    produce_stream(settings)
    worker.wait_metric("streamrec_events_total", len(STREAM))
    with RecClient(settings) as client:
        assert ids(client.recommend("u1", k=3, **POPULAR)) == ["c", "a", "d"]  # b seen
        assert ids(client.recommend("u3", k=2, **POPULAR)) == ["b", "d"]  # a, c seen
        unknown = client.recommend("nobody", k=4, **POPULAR)
        assert ids(unknown) == ["c", "b", "a", "d"]
        assert [round(item.score, 6) for item in unknown.items] == [10.0, 8.0, 3.0, 1.0]
        assert {item.source for item in unknown.items} == {"popular"}
        with_history = client.recommend("nobody", history=["c"], k=2, **POPULAR)
        assert ids(with_history) == ["b", "a"]
        assert ids(client.recommend("u1", k=2, exclude_seen=False, **POPULAR)) == ["c", "b"]
    metrics = worker.metrics()
    assert metrics["streamrec_users"] == 4
    assert metrics["streamrec_items"] == 4
    assert "objects made at start kept out of garbage collection" in worker.log_path.read_text()
    assert metrics["streamrec_requests_total"] >= 5
    assert metrics["streamrec_request_latency_seconds_count"] >= 5


def test_redelivered_and_wrongly_keyed_events(settings, start_worker):
    worker = start_worker(settings)
    produce(settings, [
        (b"u1", event("u1", "x", "sale", event_id="e1")),
        (b"u1", event("u1", "x", "sale", event_id="e1")),  # redelivery: ignored
        (b"someone-else", event("u2", "y", "view", event_id="e2")),  # re-keyed to u2
        (None, event("u3", "y", "view", event_id="e3")),  # no key: re-keyed to u3
    ])
    worker.wait_metric("streamrec_events_total", 6)  # 2 accepted + 1 duplicate + 2x(rekeyed+accepted)
    with RecClient(settings) as client:
        assert ids(client.recommend("u2", k=5, **POPULAR)) == ["x"]  # y is in u2's history
        assert ids(client.recommend("u3", k=5, **POPULAR)) == ["x"]
        scores = {item.item_id: item.score for item in client.recommend("new", k=5, **POPULAR).items}
    assert scores == pytest.approx({"x": 10.0, "y": 2.0})



def test_events_and_requests_on_another_partition_than_their_users_are_moved_there(
        settings, start_worker):
    """A client whose partitioner is not Kafka's default (librdkafka's CRC32) puts a user's
    messages on another partition than the worker's own sends do: the event is moved to its
    user's partition (one history per user), and so is the request, which is then answered
    with that history."""
    worker = start_worker(settings)
    home = key_partition(b"u1", settings.partitions)
    elsewhere = (home + 1) % settings.partitions
    producer = KafkaProducer(**client_config(settings), acks=1, enable_idempotence=False)
    producer.send(settings.topic_events, key=b"u1", partition=elsewhere,
                  value=event("u1", "x", "sale", event_id="e1"))
    producer.send(settings.topic_events, key=b"u1", partition=home,
                  value=event("u1", "y", "view", event_id="e2"))
    producer.send(settings.topic_events, key=b"u2", value=event("u2", "z", "view"))
    producer.flush()
    producer.close()
    worker.wait_metric("streamrec_events_total", 4)  # 3 accepted + 1 rerouted
    assert labelled(settings, "streamrec_events_total", outcome="rerouted") == 1
    assert worker.metrics()["streamrec_users"] == 2  # u1: one history, not one per partition
    with RecClient(settings) as client:
        assert ids(client.recommend("u1", k=5, **POPULAR)) == ["z"]  # x and y seen
        request = RecRequest(request_id="misrouted", user_id="u1", k=5, **POPULAR)
        client._producer.send(settings.topic_requests, key=b"u1", partition=elsewhere,
                              value=request.to_bytes())
        client._producer.flush()
        assert ids(client.wait("misrouted", timeout_s=10)) == ["z"]
    assert labelled(settings, "streamrec_requests_total", status="rerouted") == 1

def test_a_moved_event_without_an_id_is_named_by_its_origin_so_a_second_move_is_a_duplicate(
        settings, start_worker):
    """An event without an ``event_id`` on another partition than its user's is re-sent there
    with an id naming its partition, offset and time. Read again after a crash (before its
    commit), the same message is re-sent again, as the same bytes at a later offset: the
    history knows that copy by its id, where it took in two events and learned both."""
    from kafka import KafkaConsumer, TopicPartition

    worker = start_worker(settings)
    home = key_partition(b"u1", settings.partitions)
    elsewhere = (home + 1) % settings.partitions
    producer = KafkaProducer(**client_config(settings), acks=1, enable_idempotence=False)
    original = json.loads(event("u1", "x", "sale"))
    sent = producer.send(settings.topic_events, key=b"u1", partition=elsewhere,
                         value=json.dumps({**original, "campaign": "c-7"}).encode(),
                         headers=[("trace", b"t-7")]).get(10)
    producer.flush()
    worker.wait_metric("streamrec_learned_events_total", 1)
    consumer = KafkaConsumer(**client_config(settings), auto_offset_reset="earliest",
                             enable_auto_commit=False, consumer_timeout_ms=5000)
    consumer.assign([TopicPartition(settings.topic_events, home)])
    moved = [record for record in consumer if record.value is not None]
    consumer.close()
    assert len(moved) == 1
    copy = json.loads(moved[0].value)
    assert copy.pop("event_id") == f"moved:{elsewhere}:{sent.offset}:{sent.timestamp / 1000.0!r}"
    assert copy == {**original, "campaign": "c-7"}  # a field the worker does not read, kept
    assert moved[0].headers == [("trace", b"t-7")]  # and the client's headers
    producer.send(settings.topic_events, key=b"u1", partition=home, value=moved[0].value)
    producer.flush()
    producer.close()
    worker.wait_metric("streamrec_events_total", 3)  # rerouted, accepted, duplicate
    assert labelled(settings, "streamrec_events_total", outcome="duplicate") == 1
    time.sleep(1.0)
    assert worker.metrics()["streamrec_learned_events_total"] == 1


MALFORMED = {
    "bad_json": b"{not json",
    "schema": json.dumps({"v": 1, "user_id": "u1", "kind": "view", "ts": 1.0}).encode(),
    "wrong_type": json.dumps({"v": 1, "user_id": 7, "item_id": "i", "kind": "view",
                              "ts": "yesterday"}).encode(),
    "unknown_kind": event("u1", "i", kind="teleport"),
    "oversized": json.dumps({"v": 1, "user_id": "u1", "item_id": "i", "kind": "view", "ts": 1.0,
                             "pad": "x" * 20_000}).encode(),
    "in_milliseconds": event("u1", "i", ts=1.7e12),
}
EXPECTED_REASON = {"bad_json": "bad_json", "schema": "schema", "wrong_type": "schema",
                   "unknown_kind": "unknown_kind", "oversized": "oversized",
                   "in_milliseconds": "ts_future"}


def test_malformed_events_go_to_the_dead_letter_topic(settings, start_worker):
    worker = start_worker(settings)
    produce(settings, [(b"u1", payload) for payload in MALFORMED.values()]
            + [(b"u1", event("u1", "good"))], headers=[("trace", b"t-1"), ("empty", b"")])
    records = read_topic(settings, settings.topic_dead_letters, len(MALFORMED))
    assert all(record.headers == [("trace", b"t-1"), ("empty", b"")] for record in records)
    letters = [DeadLetter.model_validate_json(record.value) for record in records]
    by_payload = {letter.payload(): letter for letter in letters}
    assert len(letters) == len(MALFORMED)
    for name, payload in MALFORMED.items():
        letter = by_payload[payload]  # the original bytes are kept exactly
        assert letter.reason == EXPECTED_REASON[name], (name, letter)
        assert letter.detail and letter.topic == settings.topic_events
        assert base64.b64decode(letter.key_b64) == b"u1"
    assert "user_id" in by_payload[MALFORMED["wrong_type"]].detail
    worker.wait_metric("streamrec_events_total", len(MALFORMED) + 1)
    metrics = worker.metrics()
    assert metrics["streamrec_dead_letters_total"] == len(MALFORMED)
    with RecClient(settings) as client:  # the agent survived and still learns
        assert ids(client.recommend("other", k=1, **POPULAR)) == ["good"]


def test_a_user_whose_stored_history_is_damaged_starts_again(settings, start_worker):
    """A changelog record that is not a history (written before the worker starts, so it
    recovers it) failed every event of its user, each to the dead-letter topic as
    ``internal_error``, for good. The user now starts again from an empty history: its event
    is taken in and stored over the record, the damage counted; the batch's others as ever."""
    from stream_app.app import HISTORY_TABLE

    changelog = f"{settings.app_id}-{HISTORY_TABLE}-changelog"
    ensure_topics(settings, [changelog])
    producer = KafkaProducer(**client_config(settings), acks=1, enable_idempotence=False)
    producer.send(changelog, key=json.dumps("user1").encode(), value=b'{"not": "a history"}',
                  partition=0)  # user1's events are on partition 0 (BY_PARTITION)
    producer.flush()
    producer.close()
    worker = start_worker(settings)
    produce(settings, [(b"user5", event("user5", "y", "view", event_id="before")),
                       (b"user1", event("user1", "x", "sale", event_id="damaged")),
                       (b"user5", event("user5", "z", "view", event_id="after")),
                       (b"user0", event("user0", "w", "click", event_id="other"))])
    worker.wait_metric("streamrec_events_total", 4)
    time.sleep(0.5)
    metrics = worker.metrics()
    assert metrics["streamrec_events_total"] == 4 and not metrics.get(
        "streamrec_dead_letters_total")
    assert metrics["streamrec_damaged_histories_total"] == 1
    with RecClient(settings) as client:  # user1's history now holds its event: x is seen
        assert "x" not in ids(client.recommend("user1", k=3, **POPULAR))
        assert ids(client.recommend("user5", k=3, **POPULAR)) == ["x", "w"]


BAD_REQUESTS = {
    b"not json at all": "bad_json",
    json.dumps({"v": 1, "user_id": "u1", "k": 5}).encode(): "request_id",
    json.dumps({"v": 1, "request_id": "r-k0", "k": 0}).encode(): "k",
    json.dumps({"v": 1, "request_id": "r-k", "k": 1001}).encode(): "k",
    json.dumps({"v": 1, "request_id": "r-src", "sources": ["crystal-ball"]}).encode(): "sources",
    json.dumps({"v": 1, "request_id": "r-reply", "reply_to": "timeline-events"}).encode():
        "reply_to",
    json.dumps({"v": 9, "request_id": "r-v"}).encode(): "version",
}


def test_bad_requests_get_error_responses(settings, start_worker):
    start_worker(settings)
    with RecClient(settings) as client:
        producer = KafkaProducer(**client_config(settings), acks=1, enable_idempotence=False)
        for payload in BAD_REQUESTS:
            producer.send(settings.topic_requests, key=b"u1", value=payload)
        producer.flush()
        producer.close()
        errors = []
        deadline = time.monotonic() + 20
        while len(errors) < len(BAD_REQUESTS) and time.monotonic() < deadline:
            for batch in client._consumer.poll(timeout_ms=200).values():
                errors.extend(RecResponse.model_validate_json(r.value) for r in batch)
            # the readiness probe's answer may be read too (the embedded broker reports a
            # slightly early end offset), so keep only answers that carry an error
            errors = [response for response in errors if response.error]
        ok = client.recommend("u1", k=1, **POPULAR)  # still answering
    assert len(errors) == len(BAD_REQUESTS)
    assert not any(response.items for response in errors)
    texts = " | ".join(sorted(response.error for response in errors))
    for fragment in BAD_REQUESTS.values():
        assert fragment in texts, (fragment, texts)
    matched = {r.request_id for r in errors}
    assert {"r-k0", "r-k", "r-src", "r-reply", "r-v"} <= matched
    assert ok.error is None


def test_reply_to_topic_is_honoured(settings, start_worker):
    """Up to ``max_reply_topics`` of them; a request naming one more is answered with an
    error on the responses topic."""
    start_worker(settings.replace(max_reply_topics=2))
    for name in ("-mine", "-also-mine"):
        with RecClient(settings, reply_to=settings.topic_responses + name) as client:
            response = client.recommend(None, history=["a"], k=3)
        assert response.error is None and response.request_id
    with RecClient(settings) as client:
        client.send(RecRequest(request_id="third", history=["a"], k=3,
                               reply_to=settings.topic_responses + "-one-more"))
        refused = client.wait("third", timeout_s=10)
    assert "STREAMREC_MAX_REPLY_TOPICS" in refused.error and not refused.items


def test_restarted_worker_keeps_histories(settings, start_worker):
    from stream_app.processes import EMBEDDED_MARK, LEARNER_LOCK, DataDirInUse, lock_data_dir

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    (settings.data_dir / EMBEDDED_MARK).touch()  # an embedded run's data dir, now on a broker
    worker = start_worker(settings)
    assert not (settings.data_dir / EMBEDDED_MARK).exists()
    for lock in ("worker.lock", LEARNER_LOCK):  # the worker and its learner hold the data dir
        with pytest.raises(DataDirInUse):
            lock_data_dir(settings.data_dir, lock)
    produce_stream(settings)
    worker.wait_metric("streamrec_events_total", len(STREAM))
    time.sleep(1.5)  # let a checkpoint and the changelog flush happen
    assert worker.stop() == 0

    again = start_worker(settings)  # same broker, same data dir
    assert again.metrics()["streamrec_users"] == 4
    with RecClient(settings) as client:
        assert ids(client.recommend("u3", k=2, **POPULAR)) == ["b", "d"]  # history survived
        assert ids(client.recommend("nobody", k=4, **POPULAR)) == ["c", "b", "a", "d"]  # counts too


def test_events_read_again_add_nothing_to_the_saved_popularity(settings, start_worker):
    """The popularity is saved with its place in each events partition. Events read again
    from before it (a crash after a checkpoint and before the commit that would have covered
    them; here the group's offsets are moved back while the worker is stopped) add nothing
    to it. Before, those without an id were counted again, and so were those an erasure had
    taken from their user's history."""
    worker = start_worker(settings)
    produce(settings, [(user.encode(), event(user, item, kind)) for user, item, kind in STREAM]
            + [(b"u3", b'{"v": 1, "user_id": "u3", "forget": true}')])
    worker.wait_metric("streamrec_events_total", len(STREAM))
    wait_until(lambda: metric(worker, "streamrec_users") == 3, 10)
    with RecClient(settings) as client:
        before = client.recommend("nobody", k=4, **POPULAR).items
    assert [item.item_id for item in before] == ["c", "b", "a", "d"]
    assert worker.stop() == 0
    forget_group_offsets(settings)
    again = start_worker(settings)
    again.wait_metric("streamrec_events_total", len(STREAM))
    wait_until(lambda: metric(again, "streamrec_users") == 3, 10)
    with RecClient(settings) as client:
        after = client.recommend("nobody", k=4, **POPULAR).items
    assert [(item.item_id, round(item.score, 6)) for item in after] == \
        [(item.item_id, round(item.score, 6)) for item in before]


def test_a_killed_worker_loses_no_popularity_and_counts_none_twice(settings, start_worker):
    """The counts since the popularity's last save are in its journal beside it: a worker
    killed before any save (its events committed) restarts with every count, once. Before,
    they were lost with the process."""
    crashy = settings.replace(checkpoint_interval_s=3600.0)
    worker = start_worker(crashy)
    produce_stream(settings)
    worker.wait_metric("streamrec_events_total", len(STREAM))
    time.sleep(4.0)  # Faust's commits of the acknowledged offsets (every 2.8 s)
    worker.child.kill()
    again = start_worker(crashy)
    again.wait_metric("streamrec_users", 4)
    with RecClient(settings) as client:
        unknown = client.recommend("nobody", k=4, **POPULAR)
    assert [(item.item_id, round(item.score, 6)) for item in unknown.items] == [
        ("c", 10.0), ("b", 8.0), ("a", 3.0), ("d", 1.0)]


def forget_group_offsets(settings) -> None:
    """Delete the app's consumer group (no member alive), and with it every offset it
    committed: a worker started next reads every topic from its beginning."""
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(**client_config(settings))
    try:
        admin.delete_groups([settings.app_id])
    finally:
        admin.close()
    assert set(committed_event_offsets(settings).values()) == {0}


def committed_event_offsets(settings, topic: str | None = None) -> dict[int, int]:
    """The app group's committed offset of each events (or ``topic``) partition (0 where
    none)."""
    from kafka import KafkaAdminClient, TopicPartition

    admin = KafkaAdminClient(**client_config(settings))
    try:
        wanted = [TopicPartition(topic or settings.topic_events, partition)
                  for partition in range(settings.partitions)]
        offsets = admin.list_group_offsets({settings.app_id: wanted})[settings.app_id]
    finally:
        admin.close()
    return {tp.partition: max(offsets[tp].offset, 0) if tp in offsets else 0 for tp in wanted}


def end_offsets(settings, count: int, topic: str | None = None,
                timeout_s: float = 20.0) -> dict[int, int]:
    """Each events (or ``topic``) partition's offset after its last record, read from the
    records (the embedded broker's ListOffsets can report less, README, "The embedded broker
    is for development")."""
    ends = dict.fromkeys(range(settings.partitions), 0)
    for record in read_topic(settings, topic or settings.topic_events, count, timeout_s):
        ends[record.partition] = max(ends[record.partition], record.offset + 1)
    return ends


@pytest.mark.parametrize("batch_intake", [True, False], ids=["batch-intake", "faust-stream"])
def test_a_stopped_worker_committed_every_event_it_took_in(settings, start_worker,
                                                           batch_intake):
    """Acks become commits: after a clean stop the group is at the end of every events
    partition, and a restarted worker takes in only what came after (none twice)."""
    settings = settings.replace(batch_intake=batch_intake)
    worker = start_worker(settings)
    stream = [(user.encode(), event(user, item, kind, event_id=f"{user}-{partition}-{i}"))
              for partition, rows in BY_PARTITION.items()
              for i, (user, item, kind) in enumerate(rows)]
    produce(settings, stream)
    worker.wait_metric("streamrec_events_total", len(stream))
    assert worker.stop() == 0
    ends = end_offsets(settings, len(stream))
    assert ends == {0: 4, 1: 3}
    assert committed_event_offsets(settings) == ends

    again = start_worker(settings)
    produce(settings, [(b"u9", event("u9", "a", "view", event_id="late"))])
    again.wait_metric("streamrec_events_total", 1)
    time.sleep(1.0)  # anything taken in twice would have come with it
    assert again.metrics()["streamrec_events_total"] == 1
    with RecClient(settings) as client:  # user5 saw y and z on partition 0
        assert ids(client.recommend("user5", k=1, **POPULAR)) == ["x"]


# Users named by the partition (of 2) their key hashes to; per partition, popularity with
# distinct scores: partition 0 sees x = 10 (a sale), y = 2 (two views), z = 1; partition 1
# sees z = 10, y = 4 (a click), w = 1.
BY_PARTITION = {
    0: [("user1", "x", "sale"), ("user5", "y", "view"), ("user5", "y", "view"),
        ("user5", "z", "view")],
    1: [("user0", "z", "sale"), ("user2", "y", "click"), ("user3", "w", "view")],
}
POPULAR_ON = {0: ["x", "y", "z"], 1: ["z", "y", "w"]}


def test_each_worker_answers_the_users_whose_histories_it_holds(settings, start_worker):
    """Two workers split the partitions; a request is answered where its user's history is
    (the user's seen items are left out of the popular ones that worker counted), and after
    one worker stops, the other answers its users from the recovered histories."""
    from stream_app.processes import free_port

    first = start_worker(settings)
    second = start_worker(settings.replace(data_dir=settings.data_dir.parent / "second",
                                           metrics_port=free_port()))
    workers = (first, second)
    # the second start returns once any worker answers: the first one may, before the second
    # serves its metrics
    wait_until(lambda: [metric(w, "streamrec_request_partitions") for w in workers] == [1, 1])
    produce(settings, [(user.encode(), event(user, item, kind, event_id=f"{user}-{i}"))
                       for events in BY_PARTITION.values()
                       for i, (user, item, kind) in enumerate(events)])
    wait_until(lambda: sum(metric(w, "streamrec_events_total") for w in workers) == 7)

    def answers() -> dict[str, list[str]]:
        with RecClient(settings) as client:
            return {user: ids(client.recommend(user, k=5, **POPULAR))
                    for user in ("user5", "user1", "user2", "user3")}

    assert answers() == {"user5": ["x"], "user1": ["y", "z"],
                         "user2": ["z", "w"], "user3": ["z", "y"]}
    second_held = 0 if second.metrics()["streamrec_events_total"] == 4 else 1
    time.sleep(1.5)  # the changelog flushed
    assert second.stop() == 0
    wait_until(lambda: first.metrics().get("streamrec_request_partitions") == 2.0, 60.0)
    seen = {"user5": {"y", "z"}, "user1": {"x"}, "user2": {"y"}, "user3": {"w"}}
    popular = POPULAR_ON[1 - second_held]  # the first worker's own counts
    assert answers() == {user: [item for item in popular if item not in seen[user]]
                         for user in seen}


def metric(worker, name: str) -> float:
    """A worker's metric; 0 when it has not counted any yet or does not serve metrics yet."""
    try:
        return worker.metrics().get(name, 0.0)
    except OSError:
        return 0.0


def wait_until(condition, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.2)


def test_fresh_worker_recovers_histories_from_the_changelog(settings, start_worker):
    worker = start_worker(settings)
    many = [(f"u{i % 50}".encode(), event(f"u{i % 50}", f"i{i}", event_id=f"e{i}"))
            for i in range(500)]
    produce(settings, many)  # batches of many records: the end-offset bug's trigger
    worker.wait_metric("streamrec_events_total", len(many))
    time.sleep(1.0)
    worker.stop()

    fresh = settings.replace(data_dir=settings.data_dir.parent / "fresh")
    shutil.copytree(settings.data_dir / "checkpoints", fresh.data_dir / "checkpoints")
    again = start_worker(fresh)  # no local table state: histories come from the changelog
    assert again.metrics()["streamrec_users"] == 50
    everything = {f"i{i}" for i in range(500)}
    with RecClient(fresh) as client:
        for user in (7, 48, 49):  # u49's last event is the changelog's very last record
            seen = {f"i{i}" for i in range(user, 500, 50)}
            assert set(ids(client.recommend(f"u{user}", k=1000, **POPULAR))) == everything - seen


def test_a_forgotten_users_history_is_deleted_and_a_fresh_worker_finds_it_deleted(
        settings, start_worker):
    """``streamrec forget``'s erasures, taken in the order of the users' events: u3's history
    is deleted (an answer leaves none of its items out), u4's starts again with the event
    sent after the erasure, an unknown user's changes nothing, and the user count falls by
    one. A fresh worker, whose histories come from the changelog (the deletes as its
    tombstones), answers the same."""
    worker = start_worker(settings)
    stream = [(f"u{i % 10}".encode(), event(f"u{i % 10}", f"i{i}", event_id=f"e{i}"))
              for i in range(100)]
    produce(settings, stream)
    worker.wait_metric("streamrec_events_total", len(stream))  # stored: the erasures come later
    assert forget_users(settings, ["u3", "u4", "nobody"]) == 3
    produce(settings, [(b"u4", event("u4", "late", event_id="late"))])
    worker.wait_metric("streamrec_events_total", len(stream) + 4)
    everything = {f"i{i}" for i in range(100)} | {"late"}
    expected_seen = {**{f"u{user}": {f"i{i}" for i in range(user, 100, 10)}
                        for user in range(10)}, "u3": set(), "u4": {"late"}, "nobody": set()}

    time.sleep(1.0)  # the changelog's records delivered
    assert worker.metrics()["streamrec_users"] == 9
    popular_answers_leave_out_the_seen(settings, everything, expected_seen)
    worker.stop()

    fresh, again = fresh_worker(settings, start_worker)
    assert again.metrics()["streamrec_users"] == 9
    popular_answers_leave_out_the_seen(fresh, everything, expected_seen)


def popular_answers_leave_out_the_seen(on, everything: set[str],
                                       seen_by: dict[str, set[str]]) -> None:
    """Each user's answer from popularity is every item but those the user has seen."""
    with RecClient(on) as client:
        for user, seen in seen_by.items():
            answer = client.recommend(user, k=1000, **POPULAR)
            assert set(ids(answer)) == everything - seen, user


def fresh_worker(settings, start_worker):
    """Settings for a data dir with a copy of the checkpoints and no local table state, and
    a worker started on it: its histories come from the changelog."""
    fresh = settings.replace(data_dir=settings.data_dir.parent / "fresh")
    shutil.copytree(settings.data_dir / "checkpoints", fresh.data_dir / "checkpoints")
    return fresh, start_worker(fresh)


def test_histories_without_an_event_for_their_ttl_expire_here_and_in_the_changelog(
        settings, start_worker):
    """With STREAMREC_HISTORY_TTL_S, the sweep deletes the histories whose newest event is
    that much older than the newest event taken in from their partition (u0-u4, last seen
    2,000 s before u5-u9 and v0-v19, whose events reach every partition), keeps the others
    (u5's old event is followed by a new one), counts them, and a fresh worker, recovering
    from the changelog, holds only the histories kept."""
    ttl = settings.replace(history_ttl_s=1000.0, history_sweep_s=0.5)
    worker = start_worker(ttl)
    now = 1_700_000_000.0
    old = [(f"u{u}".encode(), event(f"u{u}", f"i{u}", ts=now - 2000 - u, event_id=f"old{u}"))
           for u in range(6)]
    produce(ttl, old)
    worker.wait_metric("streamrec_events_total", len(old))
    time.sleep(1.5)  # sweeps: none has expired against the newest event yet
    assert worker.metrics()["streamrec_users"] == 6
    newer = [f"u{u}" for u in range(5, 10)] + [f"v{v}" for v in range(20)]
    assert {key_partition(user.encode(), ttl.partitions) for user in newer} == set(
        range(ttl.partitions))
    new = [(user.encode(), event(user, f"j-{user}", ts=now, event_id=f"new-{user}"))
           for user in newer]
    produce(ttl, new)
    worker.wait_metric("streamrec_expired_histories_total", 5)
    everything = {f"i{u}" for u in range(6)} | {f"j-{user}" for user in newer}
    expected_seen = {**{f"u{u}": set() for u in range(5)}, "u5": {"i5", "j-u5"},
                     **{f"u{u}": {f"j-u{u}"} for u in range(6, 10)}}

    time.sleep(1.0)
    metrics = worker.metrics()
    assert metrics["streamrec_users"] == 25 and metrics["streamrec_expired_histories_total"] == 5
    popular_answers_leave_out_the_seen(ttl, everything, expected_seen)
    worker.stop()

    fresh, again = fresh_worker(ttl, start_worker)
    assert again.metrics()["streamrec_users"] == 25
    popular_answers_leave_out_the_seen(fresh, everything, expected_seen)


def test_withdrawn_items_leave_every_answer_until_restored_also_after_a_restart(
        settings, start_worker):
    """``streamrec withdraw``: the items leave the answers (here popularity's) while the
    worker runs, one restored comes back, and a restarted worker, reading the topic from its
    beginning (30,000 records more) before it answers, leaves out those withdrawn from its
    first answer."""
    worker = start_worker(settings)
    stream = [(f"u{n % 7}".encode(), event(f"u{n % 7}", f"i{n % 5}", event_id=f"e{n}"))
              for n in range(40)]
    produce(settings, stream)
    worker.wait_metric("streamrec_events_total", len(stream))
    everything = {f"i{n}" for n in range(5)}

    def answered_until(expected: set[str], timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        with RecClient(settings) as client:
            while True:
                got = set(ids(client.recommend("new-user", k=10, **POPULAR)))
                if got == expected or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
        assert got == expected

    answered_until(everything)
    assert withdraw_items(settings, ["i1", "i3"]) == 2
    answered_until(everything - {"i1", "i3"})
    assert worker.metrics()["streamrec_withdrawn_items"] == 2
    assert withdraw_items(settings, ["i3"], withdrawn=False) == 1
    answered_until(everything - {"i1"})
    worker.stop()
    others = [f"x{n}" for n in range(15_000)]  # a topic that takes a while to read
    withdraw_items(settings, others)
    withdraw_items(settings, others, withdrawn=False)
    withdraw_items(settings, ["i2"])  # the topic's last record
    again = start_worker(settings)
    with RecClient(settings) as client:  # the first answer: after the withdrawals are read
        first = set(ids(client.recommend("new-user", k=10, **POPULAR)))
    assert first == everything - {"i1", "i2"}
    assert again.metrics()["streamrec_withdrawn_items"] == 2


def test_records_the_broker_refused_are_sent_again_before_their_events_commit(
        settings, start_worker):
    """A worker whose producer has the first delivery of a changelog batch and of a dead
    letter refused, and every delivery of training messages for 6 s from the first: each is
    sent again, and the events are not committed while a record of theirs is unconfirmed
    (longer than Faust's commit interval, 2.8 s). Once all
    are delivered, a fresh worker restores every user's only history from the changelog,
    every example is learned, the malformed event is in the dead-letter topic, and the events
    are committed to the end."""
    refusing = [sys.executable, str(Path(__file__).parent / "refusing_worker.py")]
    worker = start_worker(settings, refusing,
                          {"REFUSE_DELIVERIES": "-changelog:1,train-:6s,dlq-:1"})
    users = [f"u{i}" for i in range(40)]
    stream = [(user.encode(), event(user, f"i{n}", event_id=f"e{n}"))
              for n, user in enumerate(users)]
    produce(settings, [*stream, (b"u0", b"{not json")])
    worker.wait_metric("streamrec_events_total", len(stream) + 1)
    ends = end_offsets(settings, len(stream) + 1)
    time.sleep(3.5)  # a commit would have come by now
    assert worker.metrics()["streamrec_ingest_unconfirmed_batches"] > 0
    held = committed_event_offsets(settings)
    assert sum(held.values()) < sum(ends.values()), (held, ends)
    worker.wait_metric("streamrec_record_resends_total", 5)  # 3 of a training message
    worker.wait_metric("streamrec_learned_events_total", len(stream))
    [letter] = read_topic(settings, settings.topic_dead_letters, 1)
    assert DeadLetter.model_validate_json(letter.value).reason == "bad_json"
    time.sleep(1.0)
    assert worker.metrics()["streamrec_learned_events_total"] == len(stream)  # none twice
    assert worker.metrics()["streamrec_ingest_unconfirmed_batches"] == 0
    assert worker.stop() == 0
    assert committed_event_offsets(settings) == ends

    fresh = settings.replace(data_dir=settings.data_dir.parent / "fresh")
    again = start_worker(fresh)  # no local table state: histories come from the changelog
    assert again.metrics()["streamrec_users"] == len(users)
    with RecClient(fresh) as client:
        for n, user in enumerate(users):
            assert f"i{n}" not in ids(client.recommend(user, k=100, **POPULAR))


def test_records_a_dropped_poll_took_from_a_partition_never_committed_are_read_again(
        settings, start_worker):
    """A worker whose consumer has passed over the first 20 records of each events partition
    unseen when Faust first seeks to the committed offsets (as a poll that returned while a
    rebalance had stopped the flow leaves them: taken, dropped, never committed) still takes
    in and learns every event: that seek puts a partition without a committed offset back at
    its first record. Without it the records passed over were never taken in (the worker
    took in 40 of the 120 events, the topic holding four partitions)."""
    users = [f"u{i}" for i in range(40)]
    stream = [(user.encode(), event(user, f"i{n}", event_id=f"e{n}"))
              for n, user in enumerate(users * 3)]
    produce(settings, stream)
    dropping = [sys.executable, str(Path(__file__).parent / "refusing_worker.py")]
    worker = start_worker(settings, dropping, {"DROP_BEFORE_SEEK": "events-:20"})
    worker.wait_metric("streamrec_learned_events_total", len(stream))
    assert "dropped 20 records" in worker.log_path.read_text()
    time.sleep(1.0)
    assert worker.metrics()["streamrec_events_total"] == len(stream)  # none twice


def moved_to_cluster(answer: RecResponse, cluster: str) -> bool:
    """The answer's top half and a majority of it come from ``cluster``. A cluster holds 30
    of the 180 items, so by chance about 1.5 of 10 would; usually all ten do."""
    inside = [item.item_id.startswith(cluster) for item in answer.items]
    return len(inside) == 10 and all(inside[:5]) and sum(inside) >= 6


def listing(answer: RecResponse) -> str:
    """An answer short enough to survive pytest's truncation of failure messages."""
    items = ", ".join(f"{item.item_id} {item.score:.4f} {item.source}" for item in answer.items)
    return f"model {answer.model_version} index {answer.index_version}: {items}"


def test_a_worker_that_dies_before_its_training_messages_loses_no_event(settings,
                                                                        start_worker):
    """A worker dies (as if killed) at its third training message: its second batch's
    histories are stored, on disk and maybe on the changelog, and its training messages are
    not sent. The restarted worker reads the uncommitted events again, finds them in the
    histories, and makes their examples again; the model learns every event once. Before the
    examples were made again from the histories, the second batch's events were never
    learned."""
    from models.learner import ItemLearner
    from stream_app.processes import group_alive

    from .test_engine_model import planted_stream

    crashy = settings.replace(checkpoint_interval_s=3600.0)
    stream = planted_stream()
    dying = [sys.executable, str(Path(__file__).parent / "refusing_worker.py")]
    worker = start_worker(crashy, dying, {"DIE_AT_SEND": "train-:3"})
    produce(settings, [(e.user_id.encode(), e.to_bytes()) for e in stream])
    assert worker.child.process.wait(60) == 9
    wait_until(lambda: not group_alive(worker.child.process.pid), 60)  # its learner saved
    model = crashy.data_dir / "checkpoints" / "model.npz"
    before = ItemLearner(crashy.learner_config())
    learned_before = before.events if before.load(model) else 0
    again = start_worker(crashy)
    wait_until(lambda: metric(again, "streamrec_learned_events_total")
               == len(stream) - learned_before, 120)
    time.sleep(1.0)  # anything learned twice would have come by now
    assert metric(again, "streamrec_learned_events_total") == len(stream) - learned_before
    assert again.stop() == 0
    saved = ItemLearner(crashy.learner_config())
    assert saved.load(model)
    assert saved.events == len(stream)


def test_the_stream_learns_and_a_restart_continues_from_the_checkpoint(settings, start_worker):
    """... from a checkpoint of a base and the deltas after it (a checkpoint every second,
    and deltas however large)."""
    from state.delta_checkpoint import CHAIN_KEY, load_checkpoint

    from .test_engine_model import planted_stream

    settings = settings.replace(checkpoint_delta_share=1e6)
    worker = start_worker(settings)
    stream = planted_stream()
    # As a live stream comes: in ten slices, each learned before the next. Produced at once,
    # the learner may take hundreds of one training partition's examples before the other's
    # (the fetches decide), and on a stream this small that order can cost the newcomer below
    # its cluster. The same examples in-process, taken in runs of up to 1,000 from one
    # partition: two seeds of eight failed the check below (one with 3 of 10 from the
    # cluster); in ten slices, twelve seeds of twelve gave 10 of 10.
    tenth = len(stream) // 10
    for start in range(0, len(stream), tenth):
        produce(settings, [(e.user_id.encode(), e.to_bytes()) for e in stream[start:start + tenth]])
        worker.wait_metric("streamrec_learned_events_total", min(start + tenth, len(stream)),
                           timeout_s=120)
    assert worker.metrics()["streamrec_model_version"] > 0
    with RecClient(settings) as client:
        before = client.recommend("u3", k=10)  # u3 belongs to cluster 3
        assert sum(item.item_id.startswith("c3-") for item in before.items) >= 8
        assert {item.source for item in before.items} == {"ann"}
        cold = client.recommend("newcomer", k=10)
        produce(settings, [(b"newcomer", event("newcomer", f"c5-i{n}", "sale", event_id=f"n{n}"))
                           for n in range(3)])
        worker.wait_metric("streamrec_learned_events_total", len(stream) + 3)
        deadline = time.monotonic() + 15  # the answer follows the history within seconds
        while True:
            warm = client.recommend("newcomer", k=10)
            if moved_to_cluster(warm, "c5-") or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        # Every learning step may move any item (the item solves re-solve a sweep of items
        # against the current user Gramian): the answer to compare is the last one.
        last = client.recommend("u3", k=10)
    assert ids(warm) != ids(cold)  # the history changed the answer
    assert moved_to_cluster(warm, "c5-"), listing(warm)  # ... towards the newcomer's cluster
    assert worker.stop() == 0  # checkpoints on the way out
    for head in ("model.npz", "dr/dr_state.npz"):
        chain = load_checkpoint(settings.data_dir / "checkpoints" / head)[CHAIN_KEY]
        assert len(json.loads(str(chain))["parts"]) > 2, head  # a base and deltas

    again = start_worker(settings)
    with RecClient(settings) as client:
        after = client.recommend("u3", k=10)
    assert after.model_version >= last.model_version > before.model_version
    assert ids(after) == ids(last)
    assert [i.score for i in after.items] == pytest.approx([i.score for i in last.items],
                                                           rel=1e-6)
    assert again.metrics()["streamrec_model_items"] == CLUSTERS_ITEMS


def test_a_training_record_without_a_value_is_skipped_and_the_rest_learned(settings,
                                                                           start_worker):
    """A tombstone on the training topic (a record whose value is null) is a message that
    does not decode: counted and skipped. It crashed the worker at every start (and, learning
    on the loop, it lost the batch it came in)."""
    from .test_engine_model import planted_stream

    ensure_topics(settings)
    produce_to = KafkaProducer(**client_config(settings), acks=1, enable_idempotence=False)
    for partition in range(settings.partitions):
        produce_to.send(settings.train_topic, key=b"x", value=None, partition=partition)
    produce_to.flush()
    produce_to.close()
    worker = start_worker(settings)
    stream = planted_stream()[:300]
    produce(settings, [(e.user_id.encode(), e.to_bytes()) for e in stream])
    wait_until(lambda: metric(worker, "streamrec_learned_events_total") == len(stream), 120)
    assert worker.child.process.poll() is None


def test_a_worker_whose_start_fails_after_its_learner_started_exits(settings):
    """The metrics port taken (two workers on one host with one setting): the start fails
    after the learner process has started, and the worker stops it and exits with the error,
    where it waited for it forever (the learner ignores the signals, its pipe still open)."""
    import socket
    import subprocess

    from stream_app.processes import worker_argv
    from stream_app.supervisor import settings_env

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", settings.metrics_port))
        taken.listen()
        started = subprocess.run(worker_argv(), env=settings_env(settings), timeout=120,
                                 capture_output=True, text=True)
    assert started.returncode != 0
    assert "Address already in use" in started.stderr, started.stderr[-2000:]


def test_topics_made_again_are_learned_from_their_first_message(settings, start_worker):
    """The events and training topics are deleted while the worker is stopped, and made again
    by its next start: their offsets restart at 0, below the places the checkpoint holds. The
    worker finds them made again by their new ids and voids those places (the model is kept),
    so it learns the new topics' events at once; it skipped them as learned before."""
    from kafka.admin import KafkaAdminClient

    from .test_engine_model import planted_stream

    stream = planted_stream()
    worker = start_worker(settings)
    produce(settings, [(e.user_id.encode(), e.to_bytes()) for e in stream])
    wait_until(lambda: metric(worker, "streamrec_learned_events_total") == len(stream), 120)
    assert worker.stop() == 0
    admin = KafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    try:
        admin.delete_topics([settings.topic_events, settings.train_topic])
        wait_until(lambda: not {settings.topic_events, settings.train_topic}
                   & set(admin.list_topics()), 30)
    finally:
        admin.close()
    again = start_worker(settings)
    fresh = [e.model_copy(update={"user_id": f"new-{e.user_id}", "event_id": f"new-{e.event_id}"})
             for e in stream[:200]]
    produce(settings, [(e.user_id.encode(), e.to_bytes()) for e in fresh])
    wait_until(lambda: metric(again, "streamrec_learned_events_total") == len(fresh), 60)
    assert metric(again, "streamrec_train_redelivered_messages") == 0
    assert "made again since the last start" in again.log_path.read_text()


@pytest.mark.parametrize("fetch", ["small", "client defaults"])
def test_a_backlog_is_learned_while_it_is_taken_in(settings, start_worker, fetch):
    """Training examples must not queue behind a backlog of events: the model learns while
    the worker is still working through the backlog, not after it. With the Kafka clients'
    default fetch sizes it does not (the second case documents why the settings exist)."""
    # Long enough to be sampled several times while it is taken in: one CI run took 8,000
    # events in between two samples, before the learner had reported anything. The other case
    # keeps 8,000: one fetch of the clients' defaults brings them all.
    backlog = 24_000 if fetch == "small" else 8000
    if fetch == "client defaults":
        settings = settings.replace(fetch_partition_bytes=1024**2, poll_records=100_000)
    ensure_topics(settings)  # with the worker's partition count, before the backlog
    produce(settings, [(f"u{n % 400}".encode(),
                        event(f"u{n % 400}", f"i{(n * 7919) % 500}", event_id=f"b{n}"))
                       for n in range(backlog)])
    worker = start_worker(settings)
    learned_during_backlog = 0.0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        metrics = worker.metrics()
        if metrics.get("streamrec_events_total", 0.0) >= backlog:
            break
        learned_during_backlog = metrics.get("streamrec_learned_events_total", 0.0)
        time.sleep(0.05)
    worker.wait_metric("streamrec_learned_events_total", backlog, timeout_s=60)
    if fetch == "small":
        assert learned_during_backlog > 0  # about 60 % of the backlog on an idle machine
    else:
        # One fetch brings the whole backlog and the train topic waits behind it: nothing is
        # learned on an idle machine; a loaded one has let a message or two through (72 events).
        assert learned_during_backlog < backlog / 10


def test_index_builds_wait_while_a_backlog_is_taken_in(settings, start_worker):
    """The worker knows how far behind its input it is (``streamrec_ingest_lag_events``); a
    build that falls due meanwhile waits, and runs once the backlog is in. The ingest agent
    takes the backlog in full batches (``streamrec_ingest_batch_events``)."""
    backlog = 40_000  # seconds of intake even on a machine twice as fast as this one
    settings = settings.replace(index_interval_s=0.5, index_check_s=0.2, index_min_items=100,
                                index_backlog_events=500, index_backlog_wait_s=600)
    ensure_topics(settings)
    produce(settings, [(f"u{n % 400}".encode(),
                        event(f"u{n % 400}", f"i{(n * 7919) % 500}", event_id=f"b{n}"))
                       for n in range(backlog)])
    worker = start_worker(settings)
    most_behind = waited = 0.0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        metrics = worker.metrics()
        if metrics.get("streamrec_events_total", 0.0) >= backlog:
            break
        most_behind = max(most_behind, metrics["streamrec_ingest_lag_events"])
        if metrics["streamrec_index_waiting_seconds"] > 0:
            waited = max(waited, metrics["streamrec_index_waiting_seconds"])
            assert metrics["streamrec_index_swaps"] == 0  # no build yet: it waits
        time.sleep(0.1)
    assert most_behind > 1000 and waited > 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        metrics = worker.metrics()
        if metrics["streamrec_index_swaps"] >= 1 and metrics["streamrec_ingest_lag_events"] == 0:
            break
        time.sleep(0.2)
    assert metrics["streamrec_ingest_lag_events"] == 0
    assert metrics["streamrec_index_swaps"] >= 1 and metrics["streamrec_index_waiting_seconds"] == 0
    # every event went through one ingest batch, and in a backlog the batches fill up
    # (the default wait, 50 ms, against 10 ms: a mean of 250 against 60-80 in the benchmark)
    assert metrics["streamrec_ingest_batch_events_sum"] == backlog
    assert backlog / metrics["streamrec_ingest_batch_events_count"] >= 100


def test_batched_ingest_writes_each_history_to_its_users_partition(settings, start_worker):
    """Events are taken in batches; each user's table change must still go to the changelog
    partition of that user's events, or a rebalance would hand the history to the wrong
    worker. Also: every event yields exactly one training example, on its item's partition."""
    from stream_app.app import HISTORY_TABLE, item_partition
    from stream_app.wire import TrainBatch

    worker = start_worker(settings)
    many = [(f"u{i % 40}".encode(), event(f"u{i % 40}", f"i{i % 97}", event_id=f"e{i}"))
            for i in range(600)]
    produce(settings, many)  # one burst: the ingest agent takes it in large batches
    worker.wait_metric("streamrec_learned_events_total", len(many))
    events = read_topic(settings, settings.topic_events, len(many))
    user_partition = {record.key: record.partition for record in events}
    assert len(set(user_partition.values())) == settings.partitions  # users on every partition
    changelog = read_topic(settings, f"{settings.app_id}-{HISTORY_TABLE}-changelog", len(many))
    assert len(changelog) >= 40
    # the table's changelog keys are JSON strings
    assert all(record.partition == user_partition[json.loads(record.key).encode()]
               for record in changelog)
    last_stored = {json.loads(record.key): json.loads(record.value) for record in changelog}
    assert {user: stored["items"] for user, stored in last_stored.items()} == {
        f"u{u}": [f"i{i % 97}" for i in range(u, 600, 40)] for u in range(40)}
    messages = read_topic(settings, settings.train_topic, len(many), timeout_s=5.0)
    examples = []
    for record in messages:
        assert record.value[:1] != b"{"  # compressed (STREAMREC_TRAIN_COMPRESSION_LEVEL)
        batch = json.loads(TrainBatch.plain(record.value))["examples"]
        assert {item_partition(x["item_id"], settings.partitions) for x in batch} \
            == {record.partition}
        examples += batch
    assert len(examples) == len(many) > 4 * len(messages)  # batched, many examples a message


def test_requests_are_answered_while_the_index_is_rebuilt(settings, start_worker):
    """Rebuilds every half second while the stream flows: every request is answered, the
    index version in the answers only moves forward, and several versions are swapped in."""
    from .test_engine_model import planted_stream

    settings = settings.replace(index_min_items=10, index_changed_items=20,
                                index_interval_s=0.5, index_check_s=0.2, model_dim=16)
    worker = start_worker(settings)
    stream = planted_stream()
    produce(settings, [(e.user_id.encode(), e.to_bytes()) for e in stream[:1500]])
    versions = []
    with RecClient(settings) as client:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            response = client.recommend("u3", k=10, timeout_s=10)
            assert response.error is None and len(response.items) == 10
            versions.append(response.index_version or 0)
            if len(versions) == 5:
                produce(settings, [(e.user_id.encode(), e.to_bytes()) for e in stream[1500:]])
            if len(set(versions)) >= 3 and len(versions) > 20:
                break
    assert versions == sorted(versions), versions
    assert len(set(v for v in versions if v)) >= 2, versions
    metrics = worker.metrics()
    assert metrics["streamrec_index_swaps"] >= 2
    assert metrics["streamrec_index_version"] >= max(versions)
    assert metrics["streamrec_index_failures"] == 0
    assert metrics["streamrec_stage_seconds_count"] > 0


def test_dr_requests_get_deep_retrieval_candidates_after_an_m_step(settings, start_worker):
    """The worker learns DR paths from the stream, runs an M-step aside on its timer, and a
    request with sources=["dr"] is answered from the items on the user's beam paths."""
    from .test_engine_model import planted_stream

    settings = settings.replace(
        model_dim=16, dr_width=8, dr_depth=2, dr_paths_per_item=2, dr_beam=6, dr_top_s=6,
        dr_learning_rate=0.02, dr_m_step_events=1000, dr_m_step_interval_s=1.0,
        index_check_s=0.2)
    worker = start_worker(settings)
    stream = planted_stream()
    produce(settings, [(e.user_id.encode(), e.to_bytes()) for e in stream])
    worker.wait_metric("streamrec_learned_events_total", len(stream), timeout_s=120)
    worker.wait_metric("streamrec_dr_m_steps", 1, timeout_s=60)
    # The worker serves the paths of the learner process's last M-step; the first one may have
    # run on the first thousand pairs. Once every pair is learned, M-steps stop after the one
    # that saw them all: wait until no new one has come for three M-step intervals.
    settled, count = time.monotonic(), worker.metrics()["streamrec_dr_m_steps"]
    deadline = settled + 60
    while time.monotonic() - settled < 3.0 and time.monotonic() < deadline:
        time.sleep(0.2)
        now = worker.metrics()["streamrec_dr_m_steps"]
        if now != count:
            settled, count = time.monotonic(), now
    with RecClient(settings) as client:
        answer = client.recommend("u3", k=10, sources=["dr"])
        default = client.recommend("u3", k=10)
    assert answer.error is None and answer.items
    assert {item.source for item in answer.items} == {"dr"}
    assert sum(item.item_id.startswith("c3-") for item in answer.items) >= 0.7 * len(answer.items)
    assert "dr" not in {item.source for item in default.items}  # dr is opt-in per request
    metrics = worker.metrics()
    assert metrics["streamrec_dr_items"] == CLUSTERS_ITEMS
    assert 0 < metrics["streamrec_dr_largest_path"] < CLUSTERS_ITEMS
    assert metrics["streamrec_dr_m_step_failures"] == 0


def check_shared_answers(settings, users: int = 24) -> None:
    """The planted users' answers hold items of both item partitions, mostly of their own
    cluster."""
    from stream_app.engine import item_partition

    with RecClient(settings) as client:
        answers = [client.recommend(f"u{user}", k=10, sources=["ann"]) for user in range(users)]
    halves = {item_partition(item.item_id, settings.partitions)
              for answer in answers for item in answer.items}
    assert halves == {0, 1}
    hits = sum(item.item_id.startswith(f"c{user % 6}-")
               for user, answer in enumerate(answers) for item in answer.items)
    assert hits >= 0.7 * sum(len(answer.items) for answer in answers)


def sharing_settings(settings, **changes):
    return settings.replace(**{"share_items": True, "share_items_s": 0.5, "model_dim": 16,
                               "dr_enabled": False, **changes})


def test_workers_that_share_items_answer_from_the_whole_catalogue(settings, start_worker):
    """Two workers split the training partitions, so each learns half of the items. With
    STREAMREC_SHARE_ITEMS each installs the other's rows from the item-rows topic: both hold
    every item, and each answers its users with items of both halves."""
    from stream_app.processes import free_port

    from .test_engine_model import planted_stream

    shared = sharing_settings(settings)
    first = start_worker(shared)
    second = start_worker(shared.replace(data_dir=settings.data_dir.parent / "second",
                                         metrics_port=free_port()))
    workers = (first, second)
    wait_until(lambda: [metric(w, "streamrec_request_partitions") for w in workers] == [1, 1])
    stream = planted_stream()
    produce(settings, [(e.user_id.encode(), e.to_bytes()) for e in stream])
    wait_until(lambda: sum(metric(w, "streamrec_learned_events_total") for w in workers)
               == len(stream), 120)
    wait_until(lambda: [metric(w, "streamrec_model_items") for w in workers]
               == [CLUSTERS_ITEMS, CLUSTERS_ITEMS], 60)
    for worker in workers:  # each learned its half, and took the other's
        assert 0 < metric(worker, "streamrec_item_rows_published")
        assert 0 < metric(worker, "streamrec_item_rows_installed")
    check_shared_answers(settings)
    # learned on, with every item known to both: each takes steps on the input offsets of the
    # other's items (those in its examples' histories) and sends them, and the other adds them
    learned = sum(metric(w, "streamrec_learned_events_total") for w in workers)
    again = [e.model_copy(update={"event_id": f"more-{n}"})
             for n, e in enumerate(planted_stream(seed=2)[:300])]
    produce(settings, [(e.user_id.encode(), e.to_bytes()) for e in again])
    wait_until(lambda: sum(metric(w, "streamrec_learned_events_total") for w in workers)
               == learned + len(again), 60)
    for name in ("streamrec_item_steps_sent", "streamrec_item_steps_added"):
        wait_until(lambda: min(metric(w, name) for w in workers) > 0)
    # a hand-over: the first worker takes the second's partitions and learns on the items it
    # had installed, from their installed rows
    learned = metric(first, "streamrec_learned_events_total")
    assert second.stop() == 0
    wait_until(lambda: metric(first, "streamrec_request_partitions") == 2.0, 60)
    more = [e.model_copy(update={"event_id": f"again-{n}"})
            for n, e in enumerate(planted_stream(seed=1)[:300])]
    produce(settings, [(e.user_id.encode(), e.to_bytes()) for e in more])
    wait_until(lambda: metric(first, "streamrec_learned_events_total") >= learned + len(more),
               60)
    assert metric(first, "streamrec_model_items") == CLUSTERS_ITEMS
    check_shared_answers(settings)


def test_a_restarted_item_rows_reader_installs_the_hand_overs_published_while_it_was_down(
        settings):
    """A reader whose consumer failed goes on from where it stopped: a hand-over of one of
    this worker's items (another process published it) that came while it was down is
    installed, its own process's row is not, and the rows it installed before are not
    installed again (read again from the beginning, the hand-over passed for a record of the
    catch-up, which installs no row of its own items once it has ended). The catch-up waits
    for the worker's first assignment: before it, no item is its own, and its own rows from
    before its checkpoint would be installed over what the checkpoint learned since."""
    import asyncio

    from stream_app.engine import Engine, item_partition
    from stream_app.item_sharing import PUBLISHER, ItemSharing
    from stream_app.kafka import ensure_topics
    from stream_app.wire import encode_item_row

    shared = sharing_settings(settings)
    ensure_topics(shared)
    producer = KafkaProducer(**client_config(shared), acks=1, enable_idempotence=False)
    names = [f"item-{n}" for n in range(1000)]
    mine = [name for name in names if item_partition(name, shared.partitions) == 0][:3]
    theirs = [name for name in names if item_partition(name, shared.partitions) == 1][:1]
    installed: list[str] = []
    held: set[int] = set()  # no partition before the worker's first assignment
    sharing = ItemSharing(shared, Engine(shared), lambda: frozenset(held),
                          lambda records, keep: installed.extend(key.decode()
                                                                 for key, _ in records))

    def publish(name: str, publisher: bytes) -> None:
        row = encode_item_row(np.ones(shared.model_dim + 1), np.zeros(shared.model_dim))
        producer.send(shared.items_topic, key=name.encode(), value=row,
                      headers=[(PUBLISHER, publisher)])
        producer.flush()

    async def reader_until(done, timeout_s: float = 30.0) -> None:
        task = asyncio.ensure_future(sharing._read())
        deadline = time.monotonic() + timeout_s
        while not done() and time.monotonic() < deadline and not task.done():
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)  # nothing more comes
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    publish(theirs[0], b"other")  # before the start: the catch-up installs it
    publish(mine[0], b"other")  # one of its own, from before its checkpoint: not installed

    async def main() -> None:
        await reader_until(lambda: False, 3.0)  # the catch-up waits for the first assignment
        assert not sharing.caught_up.is_set() and installed == []
        held.add(0)
        sharing.assigned.set()
        await reader_until(sharing.caught_up.is_set)
        publish(mine[1], b"other")  # a hand-over, while the reader is down
        publish(mine[2], sharing.instance)  # its own row
        await reader_until(lambda: len(installed) >= 2)

    try:
        asyncio.run(main())
    finally:
        producer.close()
    assert installed == [theirs[0], mine[1]]


def wait_for_publishes(worker, settle_s: float = 2.0) -> None:
    """Until the worker's count of published rows has not moved for ``settle_s``."""
    count, settled = -1.0, time.monotonic()
    while time.monotonic() - settled < settle_s:
        now = metric(worker, "streamrec_item_rows_published")
        if now != count:
            count, settled = now, time.monotonic()
        time.sleep(0.2)


def test_a_worker_that_joins_starts_its_items_from_the_rows_published_before(settings,
                                                                              start_worker):
    """A second worker joins one that learned every item: before it learns anything it holds
    the whole catalogue, its own items' rows taken from the first worker's, and answers the
    users of its partition from them."""
    from stream_app.processes import free_port

    from .test_engine_model import planted_stream

    shared = sharing_settings(settings)
    first = start_worker(shared)
    stream = planted_stream()
    produce(settings, [(e.user_id.encode(), e.to_bytes()) for e in stream])
    wait_until(lambda: metric(first, "streamrec_learned_events_total") == len(stream), 120)
    wait_for_publishes(first)
    assert metric(first, "streamrec_item_rows_installed") == 0  # it owned every item
    second = start_worker(shared.replace(data_dir=settings.data_dir.parent / "second",
                                         metrics_port=free_port()))
    wait_until(lambda: [metric(w, "streamrec_request_partitions") for w in (first, second)]
               == [1, 1], 60)
    wait_until(lambda: metric(second, "streamrec_model_items") == CLUSTERS_ITEMS, 60)
    assert metric(second, "streamrec_learned_events_total") == 0
    assert metric(second, "streamrec_item_rows_installed") >= CLUSTERS_ITEMS
    assert metric(second, "streamrec_item_rows_published") == 0
    check_shared_answers(settings)  # half of these users are the second worker's


def test_a_model_learned_unshared_is_published_whole_when_sharing_is_turned_on(settings,
                                                                              start_worker):
    """A worker that learned without sharing, started again with it, publishes every row
    of its items once, not only those that move from then on: a worker that joins then
    holds the whole catalogue although nothing was learned since. Started once more, it
    does not publish them all again."""
    from stream_app.processes import free_port

    from .test_engine_model import planted_stream

    shared = sharing_settings(settings)
    alone = start_worker(shared.replace(share_items=False))
    stream = planted_stream()
    produce(settings, [(e.user_id.encode(), e.to_bytes()) for e in stream])
    wait_until(lambda: metric(alone, "streamrec_learned_events_total") == len(stream), 120)
    assert alone.stop() == 0
    first = start_worker(shared)
    wait_until(lambda: metric(first, "streamrec_item_rows_published") == CLUSTERS_ITEMS, 60)
    second = start_worker(shared.replace(data_dir=settings.data_dir.parent / "second",
                                         metrics_port=free_port()))
    wait_until(lambda: metric(second, "streamrec_model_items") == CLUSTERS_ITEMS, 60)
    assert metric(second, "streamrec_learned_events_total") == 0
    # each leaves only once the group settled without it: the embedded broker keeps a leader
    # that leaves a group still forming, and no later member can join (README)
    wait_until(lambda: [metric(w, "streamrec_request_partitions") for w in (first, second)]
               == [1.0, 1.0], 60)
    assert second.stop() == 0
    wait_until(lambda: metric(first, "streamrec_request_partitions") == 2.0, 60)
    assert first.stop() == 0
    again = start_worker(shared)
    wait_until(lambda: metric(again, "streamrec_item_rows_caught_up") == 1.0, 60)
    time.sleep(3 * shared.share_items_s)
    assert metric(again, "streamrec_item_rows_published") == 0


def shared_answers(settings, users: int = 24) -> list[dict[str, float]]:
    with RecClient(settings) as client:
        return [{item.item_id: item.score for item in
                 client.recommend(f"u{user}", k=10, sources=["ann"]).items}
                for user in range(users)]


def same_answers(was: list[dict[str, float]], now: list[dict[str, float]]) -> bool:
    """The same items with the same scores, up to the float32 of item-rows records."""
    return all(one.keys() == other.keys()
               and [other[item] for item in one] == pytest.approx(list(one.values()), abs=1e-5)
               for one, other in zip(was, now, strict=True))


@pytest.mark.parametrize("leaving", [False, True], ids=["joins", "stops"])
def test_a_hand_over_gives_the_next_owner_all_the_learning_of_the_last(settings, start_worker,
                                                                       leaving):
    """With a publish interval far longer than the test, a worker publishes its rows only
    when it hands its items over: to a worker that joins (the rebalance revokes its
    partitions: the newcomer then answers its users exactly as the old owner did, before it
    learned anything), or to the one that stays when it stops (which then holds and answers
    from the items it never learned)."""
    from stream_app.processes import free_port

    from .test_engine_model import planted_stream

    shared = sharing_settings(settings, share_items_s=3600.0, serve_tuning_every=0)
    other = shared.replace(data_dir=settings.data_dir.parent / "second", metrics_port=free_port())
    first = start_worker(shared)
    workers = (first, start_worker(other)) if leaving else (first,)
    wait_until(lambda: [metric(w, "streamrec_request_partitions") for w in workers]
               == [2 / len(workers)] * len(workers), 60)
    stream = planted_stream()
    produce(settings, [(e.user_id.encode(), e.to_bytes()) for e in stream])
    wait_until(lambda: sum(metric(w, "streamrec_learned_events_total") for w in workers)
               == len(stream), 120)
    assert sum(metric(w, "streamrec_item_rows_published") for w in workers) == 0
    if leaving:
        assert metric(first, "streamrec_model_items") < CLUSTERS_ITEMS  # its own half
        assert workers[1].stop() == 0
        wait_until(lambda: metric(first, "streamrec_request_partitions") == 2.0, 60)
        wait_until(lambda: metric(first, "streamrec_model_items") == CLUSTERS_ITEMS, 30)
        assert metric(first, "streamrec_learned_events_total") < len(stream)
    else:
        before = shared_answers(settings)
        second = start_worker(other)
        wait_until(lambda: [metric(w, "streamrec_request_partitions") for w in (first, second)]
                   == [1, 1], 60)
        wait_until(lambda: metric(second, "streamrec_model_items") == CLUSTERS_ITEMS, 30)
        assert metric(first, "streamrec_item_rows_handed_over") >= CLUSTERS_ITEMS
        wait_until(lambda: same_answers(before, shared_answers(settings)), 30)
        assert metric(second, "streamrec_learned_events_total") == 0
    check_shared_answers(settings)


def test_a_crashed_worker_gets_back_the_rows_it_published_after_its_checkpoint(settings,
                                                                               start_worker):
    """A worker killed long after its checkpoint restarts with the rows it last published
    (its answers as before the crash, up to the float32 of the records), not with the
    checkpoint's, and does not send them back."""
    from .test_engine_model import planted_stream

    shared = sharing_settings(settings, checkpoint_interval_s=3600.0, serve_tuning_every=0)
    stream = planted_stream()
    half = len(stream) // 2
    worker = start_worker(shared)
    produce(settings, [(e.user_id.encode(), e.to_bytes()) for e in stream[:half]])
    wait_until(lambda: metric(worker, "streamrec_learned_events_total") == half, 120)
    assert worker.stop() == 0  # the checkpoint
    worker = start_worker(shared)
    produce(settings, [(e.user_id.encode(), e.to_bytes()) for e in stream[half:]])
    wait_until(lambda: metric(worker, "streamrec_learned_events_total") == len(stream) - half,
               120)
    wait_for_publishes(worker)
    before = shared_answers(settings, users=12)
    worker.child.kill()  # no checkpoint since the first stop
    restarted = start_worker(shared)
    wait_until(lambda: same_answers(before, shared_answers(settings, users=12)), 60)
    assert metric(restarted, "streamrec_learned_events_total") == 0
    assert metric(restarted, "streamrec_item_rows_published") == 0  # installs are not sent back


def test_a_worker_that_takes_over_a_crashed_ones_items_learns_what_it_never_published(
        settings, start_worker):
    """With sharing, the worker that takes the items of a crashed one over starts them from
    the item-rows topic, not from the crashed one's checkpoint: the training messages whose
    learning no publish holds are delivered to it again. A checkpoint that committed them
    lost that learning (here: every item, since nothing was published)."""
    from stream_app.processes import free_port

    from .test_engine_model import planted_stream

    shared = sharing_settings(settings, share_items_s=3600.0, checkpoint_interval_s=1.0)
    stream = planted_stream()
    crashing = start_worker(shared)
    produce(settings, [(e.user_id.encode(), e.to_bytes()) for e in stream])
    wait_until(lambda: metric(crashing, "streamrec_learned_events_total") == len(stream), 120)
    time.sleep(4.0)  # checkpoints, and Faust's commits of what they acknowledge (every 2.8 s)
    assert metric(crashing, "streamrec_item_rows_published") == 0
    crashing.child.kill()
    taking_over = start_worker(shared.replace(data_dir=settings.data_dir.parent / "second",
                                              metrics_port=free_port()))
    wait_until(lambda: metric(taking_over, "streamrec_model_items") == CLUSTERS_ITEMS, 120)
    assert metric(taking_over, "streamrec_learned_events_total") == len(stream)


def learner_pid(worker) -> int:
    """The pid of the worker's learner process: its child that multiprocessing spawned."""
    parent = worker.child.process.pid
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and b"spawn_main" in command:
            return int(entry.name)
    raise AssertionError("the worker has no learner process")


@pytest.mark.parametrize("killed", ["learner", "worker", "worker learning on its loop"])
def test_a_crash_loses_no_training_message_and_learns_none_twice(settings, start_worker,
                                                                 killed):
    """Training messages are committed once a checkpoint holds them, and the checkpoint says
    which it holds. With no periodic checkpoint, after everything is learned (and Faust's
    commits of acknowledged offsets, every 2.8 s, have had their time):

    - ``learner``: the learner process is killed; the worker stops (its supervisor restarts
      it), and the restarted one learns every message again, from the empty model it starts
      with. Committed at the hand-over to the learner, they were lost;
    - ``worker``: the worker is killed alone; its learner checkpoints what it was handed when
      the pipe closes, and the restarted worker skips every message delivered again;
    - ``worker learning on its loop`` (no learner process): the worker is killed, and the
      restarted one learns every message again.

    Either way the model has learned each example once, and a graceful stop commits the
    training topic to its end."""
    from models.learner import ItemLearner
    from stream_app.processes import group_alive
    from stream_app.worker import EXIT_LEARNER_DIED

    from .test_engine_model import planted_stream

    crashy = settings.replace(checkpoint_interval_s=3600.0,
                              learner_process=killed != "worker learning on its loop")
    relearns = killed != "worker"
    stream = planted_stream()
    worker = start_worker(crashy)
    produce(settings, [(e.user_id.encode(), e.to_bytes()) for e in stream])
    wait_until(lambda: metric(worker, "streamrec_learned_events_total") == len(stream), 120)
    time.sleep(4.0)
    if killed == "learner":
        os.kill(learner_pid(worker), signal.SIGKILL)
        assert worker.child.process.wait(60) == EXIT_LEARNER_DIED
    elif killed == "worker":
        os.kill(worker.child.process.pid, signal.SIGKILL)
        worker.child.process.wait(10)
        wait_until(lambda: not group_alive(worker.child.process.pid), 60)
    else:
        worker.child.kill()
    trained = end_offsets(settings, 10**9, settings.train_topic, timeout_s=5.0)
    again = start_worker(crashy)
    if relearns:
        wait_until(lambda: metric(again, "streamrec_learned_events_total") == len(stream), 120)
    else:  # at least: records a poll took as recovery sought back come twice (skipped twice)
        wait_until(lambda: metric(again, "streamrec_train_redelivered_messages")
                   >= sum(trained.values()), 120)
    time.sleep(1.0)  # anything learned twice would have come by now
    assert metric(again, "streamrec_learned_events_total") == (len(stream) if relearns else 0)
    assert again.stop() == 0
    saved = ItemLearner(crashy.learner_config())
    assert saved.load(crashy.data_dir / "checkpoints" / "model.npz")
    assert saved.events == len(stream)
    assert committed_event_offsets(settings, settings.train_topic) == trained
