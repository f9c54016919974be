"""The Faust application: topics, the user-history table and thin agents.

Built by :func:`create_app` from a settings object, an :class:`~stream_app.engine.Engine` and a
:class:`~stream_app.metrics.Metrics` bundle; nothing is created at import time.

Partitioning: ``timeline-events`` and ``rec-requests`` are keyed by ``user_id`` and have the same
number of partitions, so a request lands on the partition (and the worker) that holds the user's
history. A message whose key is not its ``user_id`` is re-sent once with the right key instead
of being processed on the wrong partition. Requests are read by a consumer of their own that
follows the event partitions Faust assigns (:mod:`stream_app.request_reader`).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator

import faust
from faust.types import Message

from state.history import DamagedHistory, History, inactive_before

from .batch_intake import BatchIntake
from .changelog import BatchedTable
from .checkpoint_acks import AcksAfterCheckpoint
from .compat import guard_fetch_wait
from .confirmed_acks import AcksAfterDelivery, Sent, held_size, sent, until_delivered
from .delivery import install_direct_delivery, patch_consumer
from .engine import Engine, LearnedReport, item_partition
from .fair_fetch import install_active_only_polls, install_fair_fetch, install_full_seeks
from .intake import IntakeLag
from .kafka import faust_credentials, key_partition
from .item_sharing import (PUBLISHER, ItemSharing, PublishBusy, Records, StepMessages,
                           forget_rows_shared, install_records, own_publishers,
                           rows_shared_mark)
from .learner_process import LearnerProcess
from .metrics import Metrics
from .request_reader import RequestReader
from .responder import Responder
from .settings import Settings
from .withdrawals import Withdrawals
from .wire import (DeadLetter, Event, ForgetUser, InvalidMessage, TrainBatch, TrainExample,
                   chunks_by_size, decode_event, headers_kept)

log = logging.getLogger(__name__)
HISTORY_TABLE = "user-histories"
#: largest training message (bytes); Kafka's default message limit is 1 MiB
TRAIN_MESSAGE_BYTES = 512 * 1024
#: largest record batch of the producer (Faust's default is 16 KiB, about 4 histories)
CHANGELOG_BATCH_BYTES = 256 * 1024
#: longest a stopping worker waits for the broker to confirm its last event batches' records
#: (the stop's other waits share STREAMREC_SHUTDOWN_TIMEOUT_S with it)
STOP_DELIVERY_WAIT_S = 2.0
#: a valid event with the message it came in
Taken = tuple[Message, Event | ForgetUser]


def training_messages(examples: list[TrainExample], partitions: int, compression_level: int,
                      users: int | None, events_topic: str | None = None
                      ) -> Iterator[tuple[int, bytes]]:
    """(train-topic partition, message value) for a batch's examples: one message per item
    partition (and per ``TRAIN_MESSAGE_BYTES``), the partition chosen by a stable hash of the
    item id so each item is always learned by the same owner; each message says how many
    users the ingesting worker holds (``users``), as of its examples, which partition it is
    for, and the id of the events topic their places are in (``events_topic``). The
    examples keep their order, which their events' offsets follow."""
    by_partition: dict[int, list[bytes]] = {}
    for example in examples:
        partition = item_partition(example.item_id, partitions)
        by_partition.setdefault(partition, []).append(example.to_bytes())
    for partition, parts in by_partition.items():
        for chunk in chunks_by_size(parts, TRAIN_MESSAGE_BYTES):
            yield partition, TrainBatch.encode_parts(chunk, compression_level, users, partition,
                                                     events_topic)


def moved_event_id(message) -> str:
    """The ``event_id`` of an event without one, re-sent from ``message`` to its user's
    partition: the message's partition, offset and time. Read again after a crash (before its
    commit), the message is re-sent again, to another offset of that partition; the history
    knows the second copy by this id, where two copies without one were two events, each
    learned."""
    return f"moved:{message.partition}:{message.offset}:{message.timestamp!r}"


def with_moved_id(message, max_bytes: int) -> bytes:
    """The value of ``message``, an event without an ``event_id`` (valid JSON), with the one
    :func:`moved_event_id` gives it; its other fields as they were. The value unchanged
    where the id would make it larger than ``max_bytes`` (its user's partition would refuse
    it): such an event, read again after a crash, is taken in twice, as before."""
    try:  # the standard library's JSON: what pydantic let through (NaN, long integers)
        body = json.loads(message.value)
        body["event_id"] = moved_event_id(message)
        value = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    except ValueError:  # a lone surrogate in a field the worker does not read
        return message.value
    return value if len(value) <= max_bytes else message.value


def histories_to_write(events: list[Event | ForgetUser], repeated: list[bool],
                       updated: dict[str, History],
                       stored: dict[str, History]) -> dict[str, History]:
    """The histories a batch writes: those its events changed, and the stored history of a
    user whose events were all found there already (``repeated``: redelivered). Written
    again, that history's changelog record is sent again: its first one may not have reached
    the broker before the events were read again (a crash, or a rebalance that gave up its
    resend, ``stream_app/confirmed_acks.py``), and no later event of the user may come to
    write it. An empty history (a user erased) is to be deleted, not written."""
    again = {event.user_id for event, seen in zip(events, repeated) if seen}
    return {**{user: stored[user] for user in again - updated.keys() if user in stored},
            **updated}


def of_generation(taken: list, generation: int | None) -> list:
    """The (message, event) pairs of ``taken`` fetched in consumer generation ``generation``.

    A rebalance during the awaits between a batch's fetch and its apply (its dead letters and
    moved events are sent first) may have given a partition to another worker, which reads it
    again from the committed offset: stored here too, its events would reach that worker's
    histories twice (this worker's writes go to the same changelog partition). Nothing is
    lost: the intake acknowledges no message of an older generation."""
    return [(message, event) for message, event in taken if message.generation_id == generation]


def create_app(settings: Settings, engine: Engine, metrics: Metrics,
               learner: LearnerProcess | None = None) -> faust.App:
    """The app. With a ``learner`` process, the learn agent hands training messages to it and
    ``engine`` follows what it learns (a replica of its item model); without one, the learn
    agent learns here, on the event loop."""
    app = faust.App(
        settings.app_id,
        broker=settings.faust_broker_url,
        broker_credentials=faust_credentials(settings),
        store="rocksdb://",  # picks the rocksdict driver
        datadir=str(settings.data_dir / "faust"),
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=min(3.0, settings.session_timeout_s / 3),
        consumer_auto_offset_reset="earliest",
        web_enabled=False,
        autodiscover=False,
        stream_wait_empty=False,
        # training offsets are committed once per checkpoint, or with sharing per publish
        # (stream_app/checkpoint_acks.py)
        broker_commit_livelock_soft_timeout=max(300.0, 3 * settings.checkpoint_interval_s),
        consumer_max_fetch_size=settings.fetch_partition_bytes,
        broker_max_poll_records=settings.poll_records,
        # a changelog batch of BatchedTable holds ~60 histories of 50 events
        producer_max_batch_size=CHANGELOG_BATCH_BYTES,
    )
    if settings.direct_delivery:
        install_direct_delivery(app)
    if settings.fair_polls:
        install_fair_fetch(app)
    if settings.compat_fixes:
        patch_consumer(app, guard_fetch_wait)
    install_active_only_polls(app)  # last: around the patches above
    install_full_seeks(app)
    raw = {"key_serializer": "raw", "value_serializer": "raw"}
    events = app.topic(settings.topic_events, **raw)
    dead_letters = app.topic(settings.topic_dead_letters, **raw)
    requests = app.topic(settings.topic_requests, **raw)
    train = app.topic(settings.train_topic, **raw)
    sharing = None
    if settings.share_items:
        sharing = share_items(app, settings, engine, metrics, learner, train,
                              followed=lambda: batches_followed(),
                              published=lambda through: rows_published(through))
    else:
        forget_rows_shared(settings)  # what it learns now is not on the item-rows topic
    histories = app.Table(HISTORY_TABLE, partitions=settings.partitions,
                          schema=faust.Schema(key_serializer="raw", value_serializer="json"))
    history_table = BatchedTable(histories)
    # held by an event batch from its first write to its flush, and by the expiry sweep's
    # flush: the sweep's tombstones wait in the same queue as the batches' writes (a key's
    # records must reach the changelog in the order they were made), and its flush must not
    # take a batch's records, which that batch's acknowledgement waits for
    batch_writing = asyncio.Lock()
    history_reader = BatchedTable(histories)  # the responder's reads: one per task
    intake_lag = IntakeLag(lambda partition: app.consumer.highwater(partition))
    missing = BatchIntake.missing(app) if settings.batch_intake else []
    # the batch intake acknowledges no message of an older consumer generation, so apply may
    # leave them out; Faust's stream acknowledges every message handed to it
    stale_left_out = settings.batch_intake and not missing

    async def dead_letter(error: InvalidMessage, message) -> Sent:
        """The message to the DLQ with its reason. Never raises: a letter whose send fails
        is sent again until the broker has it, and its batch is acknowledged only then
        (:class:`AcksAfterDelivery`), so one bad message can neither stop the ingest nor be
        lost."""
        letter = DeadLetter.of(error, message.value or b"", message.key, topic=message.topic,
                               partition=message.partition, offset=message.offset,
                               headers=message.headers).to_bytes()
        record = await sent("dead_letter",
                            lambda: dead_letters.send(key=DeadLetter.key_kept(message.key),
                                                      value=letter,
                                                      headers=headers_kept(message.headers)[0]),
                            held_bytes=len(letter))
        metrics.dead_letters.labels(error.reason).inc()
        metrics.events.labels("invalid", "dead_letter").inc()
        return record

    event_kinds = settings.event_kinds  # a set made once, not per event
    ahead_s = settings.max_event_ahead_s

    def latest_event_ts() -> float | None:
        """The latest event time the ingest accepts now (None: any)."""
        return None if ahead_s is None else time.time() + ahead_s

    def users_partition(message, user_key: bytes) -> int | None:
        """The partition of the events topic (and of the requests topic, numbered alike)
        where messages keyed ``user_key`` belong, if ``message`` is elsewhere: its user's
        history lives on the first (the table is partitioned as the events), so a message
        keyed otherwise, or hashed by another partitioner than Kafka's default, is moved
        there. None when it is where it belongs (or while the topic's size is not known)."""
        partitions = app.consumer.topic_partitions(settings.topic_events)
        if not partitions:
            return None if message.key == user_key else key_partition(user_key,
                                                                       settings.partitions)
        home = key_partition(user_key, partitions)
        return None if message.key == user_key and message.partition == home else home

    async def decode_guarded(message, records: list[Sent]) -> Event | ForgetUser | None:
        """The valid event (or erasure) of a message; None when the message went to the DLQ
        (with a reason) or was re-sent to its user's partition, under its user's key, with its
        headers and, for an event, with an ``event_id`` that names where it came from when it
        had none (:func:`moved_event_id`); either send is added to ``records``."""
        try:
            event = decode_event(message.value, kinds=event_kinds,
                                 max_bytes=settings.max_event_bytes,
                                 latest_ts=latest_event_ts())
            user_key = event.user_id.encode()
            home = users_partition(message, user_key)
            if home is None:
                return event
            value = (message.value if isinstance(event, ForgetUser) or event.event_id
                     is not None else with_moved_id(message, settings.max_event_bytes))
            records.append(await sent("reroute", lambda: events.send(
                key=user_key, partition=home, value=value,
                headers=headers_kept(message.headers)[0]), held_bytes=len(value)))
            moved = "rekeyed" if message.key != user_key else "rerouted"
            metrics.events.labels(event.kind, moved).inc()
        except InvalidMessage as error:
            records.append(await dead_letter(error, message))
        except Exception as error:  # noqa: BLE001 - an agent must survive anything
            log.exception("event at %s/%d/%d failed", message.topic, message.partition,
                          message.offset)
            records.append(await dead_letter(InvalidMessage("internal_error", repr(error)),
                                             message))
        return None

    def apply(taken: list[Taken]) -> list[TrainExample]:
        """Valid events into the users' histories (one table read and one write per user of
        the batch, on the partition of that user's events, in one store batch per partition,
        the write's changelog record queued for the batch's flush) and training examples.
        Through the batch intake, only events fetched in the consumer's current generation
        (:func:`of_generation`; no await comes between that check and the writes)."""
        if stale_left_out:
            taken = of_generation(taken, app.consumer_generation_id)
        if not taken:
            return []
        users = engine.users
        try:
            return apply_taken(taken)
        except Exception:
            engine.users = users  # counted again when the events are taken one by one
            raise

    def apply_taken(taken: list[Taken]) -> list[TrainExample]:
        last_message = {event.user_id: message for message, event in taken}
        last = {user: faust.Event(app, message.key, message.value, message.headers, message)
                for user, message in last_message.items()}  # what the table's writes read
        stored = read_histories(last)
        events = [event for _, event in taken]
        updated, examples, repeated = engine.ingest_many(
            events, stored, [(message.partition, message.offset) for message, _ in taken])
        written = histories_to_write(events, repeated, updated, stored)
        history_table.set_many((user, history.to_json(), last[user])
                               for user, history in written.items() if history)
        history_table.delete_many((user, last[user])
                                  for user, history in written.items() if not history)
        outcomes = Counter((event.kind, "duplicate" if seen else "accepted")
                           for event, seen in zip(events, repeated))
        for (kind, outcome), count in outcomes.items():
            metrics.events.labels(kind, outcome).inc(count)
        return [example for example in examples if example is not None]

    def read_histories(last: dict[str, faust.Event]) -> dict[str, History]:
        """The stored histories of the batch's users. A damaged record reads as no history,
        and the user's next event counts the user anew, or an erasure deletes the record
        without lowering the count: so the user, counted among :attr:`Engine.users` while
        the record was stored, is taken off the count here."""
        stored = {}
        for user, value in history_table.get_many(last).items():
            try:
                stored[user] = History.from_json(value)
            except DamagedHistory as error:  # History.from_stored, with the count
                metrics.history_damaged("ingest", user)(error)
                engine.users -= 1
                stored[user] = History()
        return stored

    async def decode_batch(batch: list[Message], records: list[Sent]) -> list[Taken]:
        """The valid events of a batch of messages, each with its message; the others go to
        the DLQ or to their user's partition (those sends added to ``records``). Never
        raises, and runs once per batch: what it sends is never sent twice."""
        intake_lag.observe((message.tp, message.offset) for message in batch)
        metrics.ingest_batch.observe(len(batch))
        taken = []
        for message in batch:
            event = await decode_guarded(message, records)
            if event is not None:
                taken.append((message, event))
        return taken

    async def take_batch(taken: list[Taken], records: list[Sent]) -> list[TrainExample]:
        """:func:`apply` to the decoded events of a batch; if that fails, event by event, so
        a poison event goes to the DLQ alone (the popularity counts each event once, by its
        place: ``Engine._count``). What it sends is added to ``records``."""
        try:
            return apply(taken)
        except Exception:  # noqa: BLE001 - an agent must survive anything
            log.exception("a batch of %d events failed; taking them one at a time", len(taken))
        examples = []
        for message, event in taken:
            try:
                examples.extend(apply([(message, event)]))
            except Exception as error:  # noqa: BLE001
                log.exception("event at %s/%d/%d failed", message.topic, message.partition,
                              message.offset)
                records.append(await dead_letter(
                    InvalidMessage("internal_error", repr(error)), message))
        await recount_users()
        return examples

    async def recount_users() -> None:
        """The users counted again from the store, after a batch that failed: its writes
        may have failed partway, and the histories written before the failure were then
        found by the events taken one by one, as ones that held them, and not counted. In
        one step of the loop: an expiry sweep's chunk deleted during a turn would be taken
        off the count as well as missing from it. A failed batch is rare; a count of the
        raw keys is 0.1 s at 200,000 users."""
        try:
            engine.users = await history_table.count_keys(turn_every=sys.maxsize)
        except Exception:  # noqa: BLE001 - the count is a metric and a learning weight
            log.exception("the users could not be counted again after a failed batch")

    async def send_training(examples: list[TrainExample], records: list[Sent]) -> None:
        """The batch's :func:`training_messages`, each to its item partition (added to
        ``records``). A resend (its delivery failed) goes without the examples' event
        offsets: later messages of the partition may have been delivered before it, and the
        learner would take its examples for ones it has learned
        (``state.stream_positions.EventPositions``)."""
        for partition, value in training_messages(examples, settings.partitions,
                                                  settings.train_compression_level,
                                                  engine.users, engine.events_topic_id):
            send = functools.partial(train.send, key=str(partition).encode(),
                                     partition=partition)
            records.append(await sent("train", functools.partial(send, value=value),
                                      functools.partial(resend_training, send, value),
                                      held_bytes=len(value)))

    async def resend_training(send, value: bytes) -> asyncio.Future:
        return await send(value=TrainBatch.without_sources(
            value, settings.train_compression_level))

    async def ingest_decoded(taken: list[Taken], records: list[Sent]) -> None:
        """A batch's decoded events into the histories, and their training messages out.
        Adds what it hands to the producer (the histories' changelog records, the training
        messages, dead letters) to ``records``, also when it raises: the batch may be
        acknowledged once the broker has all of it (:class:`AcksAfterDelivery`)."""
        async with batch_writing:  # a batch taken one event at a time awaits between them
            try:
                examples = await take_batch(taken, records)
            finally:  # what was stored goes to the changelog before anything is acknowledged
                records.extend(await history_table.flush())
        try:
            await send_training(examples, records)
        except Exception:  # noqa: BLE001 - a message that would not encode; histories stored
            log.exception("could not make the training messages of %d examples",
                          len(examples))

    async def ingest_batch(batch: list[Message], records: list[Sent]) -> None:
        """Validate a batch of event messages; invalid ones go to the DLQ with a reason, valid
        ones into the histories and the training messages (:func:`ingest_decoded`)."""
        await ingest_decoded(await decode_batch(batch, records), records)

    if missing:
        log.warning("this Faust lacks %s: events are taken through Faust's stream", missing)
    if settings.batch_intake and not missing:
        intake = BatchIntake(app, events, settings.ingest_batch, settings.ingest_batch_wait_s)
        intake.install()
        delivered = AcksAfterDelivery(intake.ack, metrics)
        delivered.export(metrics)

        @app.task
        async def ingest() -> None:
            """Batches of events from :class:`BatchIntake`, each acknowledged once taken in
            and the broker has what it wrote."""
            while True:
                await delivered.room.wait()  # a broker that refuses what batches write
                batch = await intake.take()
                records = await take_in(batch)
                delivered.hold(batch, records, size=held_size(batch, records))

        async def take_in(batch: list[Message]) -> list[Sent]:
            """A batch of event messages taken in: what it handed to the producer."""
            records: list[Sent] = []
            taken = await decode_batch(batch, records)
            try:
                await ingest_decoded(taken, records)
            except Exception:  # noqa: BLE001 - the task must survive anything
                log.exception("a batch of %d events failed; taking them one at a time",
                              len(taken))
                await ingest_one_by_one(taken, records)
            return records

        @app.on_before_shutdown.connect
        async def acknowledge_what_was_delivered(app: faust.App, **kwargs) -> None:
            """Batches whose records are still on their way, acknowledged before Faust's last
            commit if the broker confirms them in time (read again at the next start if
            not)."""
            wait_s = min(STOP_DELIVERY_WAIT_S, settings.hand_over_wait_s)
            if not await delivered.settled(wait_s):
                log.warning("%d event batches were not confirmed by the broker in %.1f s: "
                            "they are read again at the next start", delivered.waiting,
                            wait_s)
            delivered.close()

        async def ingest_one_by_one(taken: list[Taken], records: list[Sent]) -> None:
            """Each decoded event as a batch of its own; one that still fails goes to the
            DLQ."""
            for message, event in taken:
                try:
                    await ingest_decoded([(message, event)], records)
                except Exception as error:  # noqa: BLE001
                    log.exception("event at %s/%d/%d failed", message.topic,
                                  message.partition, message.offset)
                    records.append(await dead_letter(
                        InvalidMessage("internal_error", repr(error)), message))
    else:
        @app.agent(events, name="ingest")
        async def ingest(stream):
            """The same batches through Faust's stream, which acknowledges a batch when the
            agent asks for the next."""
            async for batch in stream.take_events(settings.ingest_batch,
                                                  within=settings.ingest_batch_wait_s):
                records: list[Sent] = []
                await ingest_batch([item.message for item in batch], records)
                await until_delivered(records, metrics)  # Faust acknowledges as it goes on

    learned_here = 0  # batches learned on this loop (no learner process), numbered

    async def learn_batch(values: list[bytes], positions: list[tuple[int, int]] | None) -> int:
        """A micro-batch of training messages into the item learner (the learner process's,
        or the engine's here); the batch's number (a checkpoint after it holds it). A record
        without a value (a tombstone someone wrote) is a message that does not decode."""
        nonlocal learned_here
        values = [value or b"" for value in values]
        if learner is not None:
            return await learner.learn(values, engine.users, positions)
        try:
            report = engine.learn_messages(values, settings.learn_batch, positions=positions)
        except Exception:  # noqa: BLE001 - one batch lost, not the agent
            log.exception("could not learn a batch of %d training messages", len(values))
        else:
            record_learned(report)
            if sharing is not None:
                sharing.note(report)
        learned_here += 1
        return learned_here

    train_acks: AcksAfterCheckpoint | None = None
    if settings.batch_intake and not missing:
        train_intake = BatchIntake(app, train, settings.learn_take_messages,
                                   settings.learn_batch_wait_s)
        train_intake.install()
        # with sharing a publish acknowledges: room comes back with the next (share_items_s),
        # and a checkpoint asked for would free nothing
        train_acks = (AcksAfterCheckpoint(train_intake) if sharing is not None
                      else AcksAfterCheckpoint(train_intake,
                                              ask_checkpoint=lambda: save_model(waiting=True)))
        train_acks.export(metrics)

        @app.task
        async def learn() -> None:
            """Training messages in micro-batches, acknowledged once a checkpoint (with
            sharing, a publish) holds what they taught (:mod:`stream_app.checkpoint_acks`)."""
            await item_rows_restored()
            while True:
                await train_acks.room.wait()
                batch = await train_intake.take()
                number = await learn_batch([message.value for message in batch],
                                           [(message.partition, message.offset)
                                            for message in batch])
                train_acks.handed(number, batch)
    else:
        @app.agent(train, name="learn")
        async def learn(stream):
            """The same through Faust's stream, which acknowledges a batch when the agent asks
            for the next: a crash loses what was learned since the last checkpoint."""
            await item_rows_restored()
            async for values in stream.take(settings.learn_take_messages,
                                            within=settings.learn_batch_wait_s):
                await learn_batch(list(values), None)

    def restoring() -> bool:
        """Sharing, and the rows published before this start are not all installed yet: the
        model must not be checkpointed now (its file's time says which of its own rows the
        next start installs) and nothing is learned."""
        return sharing is not None and not sharing.caught_up.is_set()

    async def item_rows_restored() -> None:
        """With sharing, learning starts once the item-rows catch-up has handed its rows to
        the learner: rows this worker published after its checkpoint, installed after
        learning began, would overwrite what it learned since (and commit it lost)."""
        if restoring():
            log.info("learning waits for the item rows published before this start")
            await sharing.caught_up.wait()

    def checkpointed(through: int) -> None:
        """A checkpoint of the model holds the batches up to ``through``. With item sharing
        it does not acknowledge them: it holds this worker's rows for this worker, while after
        a crash the items may go to another worker, which starts them from the item-rows topic;
        only a publish of their rows (:func:`rows_published`) makes their learning durable for
        whoever learns them next."""
        engine.checkpointed_at = time.time()
        written = engine.last_checkpoint if learner is None else learner.last_written
        if written is not None:  # a checkpoint was written (not one with nothing new)
            engine.last_checkpoint = written  # for the gauges of a worker with a learner
            metrics.checkpoints.labels(written.kind).inc()
        if train_acks is not None and sharing is None:
            train_acks.checkpointed(through)

    def batches_followed() -> int:
        """The number of the last batch whose learning this loop's engine holds whole."""
        return learner.batches_followed if learner is not None else learned_here

    async def rows_published(through: int) -> None:
        """A publish of the item rows (sharing) holds the learning of the batches up to
        ``through``: whichever worker learns their items next gets those rows from the topic,
        so their training messages are committed now (the producer is flushed first)."""
        if train_acks is not None:
            train_acks.checkpointed(through)
            await app.producer.flush()  # the rows on the broker before the commit
            # a commit in progress makes commit() return without committing these acks
            while await app.consumer.maybe_wait_for_commit_to_finish():
                pass
            await app.consumer.commit()

    def record_learned(report: LearnedReport) -> None:
        for seconds in report.step_seconds:
            metrics.learn_seconds.observe(seconds)
        metrics.learned.inc(report.examples)
        if report.losses:
            metrics.batch_loss.set(report.losses[-1])

    def follow(report: LearnedReport) -> None:
        engine.follow(report)
        record_learned(report)
        if sharing is not None:
            sharing.note(report)

    paths_read = asyncio.Lock()
    paths_reads: set[asyncio.Task] = set()

    async def reload_paths_aside(stats: dict, followed: list) -> None:
        """Read the paths the learner saved in a thread (seconds at a million items), then
        serve them with what reports brought since (``followed``); one read at a time."""
        async with paths_read:
            try:
                fresh = await asyncio.get_running_loop().run_in_executor(None,
                                                                         engine.read_paths)
                if not engine.install_paths(fresh, stats, followed):
                    log.warning("the learner's Deep Retrieval paths were not there to load")
            except Exception:  # noqa: BLE001 - the paths in force keep serving
                engine.install_paths(None, stats, followed)
                log.exception("could not load the learner's Deep Retrieval paths")

    def reload_paths(stats: dict) -> None:
        """As the learner's message that it saved new paths arrives: the reports after it
        in the pipe, followed before the read's task runs, are kept for its install."""
        task = asyncio.ensure_future(reload_paths_aside(stats, engine.begin_paths_read()))
        paths_reads.add(task)  # held until done: the loop keeps only weak references
        task.add_done_callback(paths_reads.discard)

    if learner is not None:
        @app.task
        async def follow_learner() -> None:
            """Apply the learner process's reports on this loop; stop the worker if it dies."""
            await learner.attach(on_report=follow, on_paths=reload_paths, on_saved=checkpointed,
                                 on_death=lambda: os.kill(os.getpid(), signal.SIGTERM))

    @app.on_before_shutdown.connect
    async def checkpoint_what_was_handed_over(app: faust.App, **kwargs) -> None:
        """Everything handed to the learner learned and checkpointed before the worker stops,
        so that Faust's last commit takes the training messages too (frames still in the
        pipe's buffer would go with the event loop; the consumer has stopped taking by now).
        """
        if restoring():  # nothing learned yet; the next start installs the rows again
            return
        wait_s = settings.hand_over_wait_s
        if learner is None:
            if train_acks is not None:
                await checkpoint_between_publishes(wait_s)
            return
        if learner.died:  # what it had not saved is delivered again
            return
        if not await learner.settle(wait_s) or not await checkpoint_between_publishes(wait_s):
            log.warning("the learner did not learn and checkpoint what it was handed in "
                        "%.1f s: the training messages since its last checkpoint will be "
                        "delivered again", wait_s)

    async def checkpoint_between_publishes(wait_s: float) -> bool:
        """The last checkpoint (here, or the learner's), with sharing not written while a
        publish is under way (``ItemSharing.between_publishes``): none when that publish
        outlasts ``wait_s``, and then what the checkpoint lacks is delivered again."""
        if sharing is None:
            return await write_checkpoint(wait_s)
        try:
            async with asyncio.timeout(wait_s):
                async with sharing.between_publishes():
                    return await write_checkpoint(None)
        except TimeoutError:
            return False

    async def write_checkpoint(timeout_s: float | None) -> bool:
        """A checkpoint of the model written, here or by the learner process (at most
        ``timeout_s``; None: as long as it takes); whether it was."""
        if learner is None:
            save_here()
            return True
        return await learner.checkpoint(timeout_s)

    responder = Responder(settings, engine, metrics, lambda name: app.topic(name, **raw),
                          requests, users_partition, history_reader.get_on)
    reader = RequestReader(settings, responder.answer)
    metrics.gauge("streamrec_request_partitions",
                  "Request partitions this worker reads (those of its event partitions).",
                  lambda: len(reader.partitions))

    @app.task
    async def read_requests() -> None:
        """Requests come through a consumer of their own (:mod:`stream_app.request_reader`),
        not Faust's, so an answer does not wait for the events polled before it."""
        await reader.run()

    @app.on_partitions_revoked.connect
    async def stop_reading_requests(app: faust.App, revoked, **kwargs) -> None:
        await reader.follow(())

    assigned_in = [0]  # the rebalance (Faust's count) that last assigned partitions
    withdrawals = Withdrawals(settings, functools.partial(setattr, engine, "withdrawn"),
                              metrics.withdrawals_skipped.inc)
    waits_for_withdrawals: set[asyncio.Future] = set()

    @app.on_partitions_assigned.connect
    async def note_the_assignment(app: faust.App, assigned, **kwargs) -> None:
        assigned_in[0] = app.rebalancing_count

    @app.on_rebalance_complete.connect
    async def read_requests_of_held_partitions(app: faust.App, **kwargs) -> None:
        """The request partitions numbered as the event partitions this worker holds: their
        users' histories are here, recovered. Not when another rebalance has begun since the
        assignment whose recovery this completes (Faust says so before it checks): its
        revocation stopped the reading, and the partitions may be another worker's now. The
        first time, once the items withdrawn before this start are read (or after a bounded
        wait), by a task of its own: answers must not name them, and Faust starts the app's
        tasks, the withdrawals' reader among them, only after this returns."""
        if app.rebalancing_count != assigned_in[0]:
            return
        if withdrawals.caught_up.is_set():
            await follow_requests()
        else:  # kept until done: the loop holds a task weakly
            waiting = asyncio.ensure_future(follow_requests_once_withdrawals_read(assigned_in[0]))
            waits_for_withdrawals.add(waiting)
            waiting.add_done_callback(waits_for_withdrawals.discard)

    async def follow_requests() -> None:
        await reader.follow(tp.partition for tp in app.consumer.assignment()
                            if tp.topic == settings.topic_events)

    async def follow_requests_once_withdrawals_read(assignment: int) -> None:
        await withdrawals.wait_caught_up()
        if app.rebalancing_count == assignment:
            await follow_requests()

    @histories.on_recover
    async def count_users() -> None:
        engine.users = await history_table.count_keys()
        log.info("user histories recovered: %d users", engine.users)

    if settings.history_ttl_s is not None:
        @app.timer(settings.history_sweep_s)
        async def expire_histories() -> None:
            try:
                await sweep_expired_histories()
            except Exception:  # noqa: BLE001 - a timer's exception would stop the worker
                log.exception("the sweep of expired histories failed; the next one goes on")

    def sweep_may_run() -> bool:
        """Not while a rebalance or a recovery runs: a history recovered after its delete
        would be back here, though deleted in the changelog."""
        return not (app.rebalancing or getattr(app, "in_recovery", False))

    async def sweep_expired_histories() -> int:
        """Delete the histories whose newest event is ``history_ttl_s`` older than the newest
        event taken in from their partition since this start (at most the clock: one event
        from a day ahead must not expire a day of users; a partition taken over with an old
        backlog expires nobody before its backlog is read), and wait until the broker has
        their tombstones. Each chunk's tombstones are handed to the producer before the
        next chunk is read, and the sweep stops when a rebalance or a recovery begins."""
        if not sweep_may_run():
            return 0
        now = time.time()
        doomed = {partition: functools.partial(inactive_before,
                                               before=min(newest, now) - settings.history_ttl_s)
                  for partition, newest in engine.newest_event_ts.items()}
        records: list[Sent] = []

        async def between() -> bool:
            async with batch_writing:  # a batch's records are its own flush's to hold it by
                records.extend(await history_table.flush())
            return sweep_may_run()

        def took_off(count: int) -> None:
            """A chunk's deleted users off the count, in the step that deletes them: a
            count of the keys meanwhile (a failed batch's) agrees with the store."""
            engine.users -= count
            metrics.expired_histories.inc(count)

        deleted = await history_table.delete_where(doomed, between, deleted=took_off)
        if deleted:
            log.info("%d user histories expired", deleted)
        await until_delivered(records, metrics)
        return deleted

    @app.task
    async def read_withdrawals() -> None:
        """The withdrawn-items topic, all of it, into the items answers leave out."""
        await withdrawals.read()

    @app.timer(settings.checkpoint_interval_s)
    async def checkpoint() -> None:
        if learner is not None or restoring():
            try:  # popularity: the model is the learner's, or must wait. Written in a
                # thread: at a million items the write held the loop for 130-240 ms
                await asyncio.to_thread(engine.popularity.write, engine.popularity.snapshot(),
                                        engine.popularity_path)
            except Exception:  # noqa: BLE001 - a full disk must not stop the worker
                log.exception("could not write the popularity checkpoint")
        if restoring():
            return
        if sharing is None:
            save_model()
            return
        async with sharing.between_publishes():  # see there: not between a read and a send
            if learner is None or learner.save_due():  # written before a publish reads rows
                await write_checkpoint(None)  # a learner that dies answers at once

    def save_model(waiting: bool = False) -> None:
        """A checkpoint of the model: here, or by the learner process, which says when it is
        written (``waiting``: the intake waits for it, see ``LearnerProcess.save_due``)."""
        if learner is None:
            save_here()
        elif learner.save_due(waiting=waiting):  # not while one is asked, nor too often
            learner.request_save()

    def save_here() -> None:
        """Checkpoint the model this loop learns; what it holds may then be committed."""
        through = learned_here
        try:
            engine.save()
        except Exception:  # noqa: BLE001 - a full disk: learning goes on, commits wait
            log.exception("could not write the checkpoint")
        else:
            checkpointed(through)

    @app.timer(settings.index_check_s)
    async def rebuild_index() -> None:
        """Snapshot the item vectors (and the path scores) here, on the loop that learns;
        build the index (and run the M-step) in a thread."""
        # summed once per check, not per batch: the index reads it now, the gauge at scrapes
        engine.behind = intake_lag.events()
        try:
            engine.maybe_rebuild_index()
        except Exception:  # noqa: BLE001 - serving goes on with the current version
            log.exception("could not start an index build")
        if learner is not None:
            return  # the learner process runs the M-steps
        try:
            engine.maybe_m_step()
        except Exception:  # noqa: BLE001 - the paths in force keep serving
            log.exception("could not start a Deep Retrieval M-step")

    app.streamrec_histories = histories  # for tests and tools that inspect the table
    app.streamrec_history_writes = history_table  # the intake's reads, writes and flushes
    app.streamrec_sweep_expired = sweep_expired_histories
    app.streamrec_withdrawals = withdrawals
    app.streamrec_take_in = take_in if settings.batch_intake and not missing else None
    app.streamrec_sharing = sharing
    app.streamrec_train_acks = train_acks
    app.streamrec_restoring = restoring  # for the worker's last checkpoint
    return app


def share_items(app: faust.App, settings: Settings, engine: Engine, metrics: Metrics,
                learner: LearnerProcess | None, train: faust.TopicT,
                followed: Callable[[], int],
                published: Callable[[int], Awaitable[None]]) -> ItemSharing:
    """The item rows this worker owns published, the other workers' installed
    (:mod:`stream_app.item_sharing`): a task that reads the item-rows topic and a timer that
    publishes; offset steps go to the training topic ``train``. ``published(through)``
    follows each publish sent: it holds the learning of the batches up to ``through``, what
    ``followed()`` said before the publish took its rows (it may hold more, never less)."""
    topic = app.topic(settings.items_topic, key_serializer="raw", value_serializer="raw")

    def owned() -> frozenset[int]:
        """The training partitions this worker holds: the items it learns."""
        return frozenset(tp.partition for tp in app.consumer.assignment()
                         if tp.topic == settings.train_topic)

    def install(records: list[tuple[bytes, bytes]], keep_statistics: bool) -> None:
        if learner is not None:  # its report brings them to the replica
            learner.install_rows(records, keep_statistics=keep_statistics)
        else:  # the engine learns here: it is the model
            install_records(engine, records, keep_statistics=keep_statistics)

    # read before the learner process writes its next checkpoint: the one it started from
    sharing = ItemSharing(settings, engine, owned, install, engine.model_saved_at(),
                          taken=learner.drained if learner is not None else None,
                          owes_every_row=not rows_shared_mark(settings).exists())
    sharing.own_publishers = own_publishers(settings, sharing.instance)
    sharing.export(metrics)

    @app.task
    async def read_item_rows() -> None:
        await sharing.read()

    headers = {PUBLISHER: sharing.instance}  # whose they are: see ItemSharing.wanted

    async def send_row(key: bytes, value: bytes) -> asyncio.Future:
        return await topic.send(key=key, value=value, headers=headers)  # its delivery

    async def send_steps(partition: int, value: bytes) -> asyncio.Future:
        return await train.send(value=value, partition=partition)  # learned by their owner

    def due() -> tuple[Records, StepMessages]:
        return sharing.due(), sharing.steps_due()

    @app.timer(settings.share_items_s)
    async def publish_item_rows() -> None:
        if not sharing.caught_up.is_set():  # own rows still hold the checkpoint's values
            return
        try:
            through = followed()
            await sharing.publish(due, send_row, send_steps)
            await published(through)
        except Exception:  # noqa: BLE001 - a timer's exception would stop the worker
            log.exception("could not publish the item rows; they go with the next publish")

    @app.on_partitions_assigned.connect
    async def hold(app: faust.App, assigned, **kwargs) -> None:
        held = frozenset(tp.partition for tp in assigned if tp.topic == settings.train_topic)
        lost, sharing.held = sharing.held - held, held
        if lost:  # handed over at the revocation: their next owner learns them now
            if learner is not None:
                learner.forget_partitions(lost)
            else:
                engine.forget_partitions(lost)
        sharing.assigned.set()

    async def hand_over() -> None:
        """The rows learned since the last publish, out before the items move (a
        revocation) or the worker goes: the batches the learner holds first. Not before the
        catch-up has installed the rows published before this start: nothing was learned, and
        the checkpoint's rows would replace newer ones on the topic."""
        if not sharing.caught_up.is_set():
            return
        deadline = time.monotonic() + settings.hand_over_wait_s  # the settle's and publish's
        try:
            if learner is not None and not await learner.settle(settings.hand_over_wait_s):
                log.warning("the learner's batches in flight were not learned in %.1f s; "
                            "handing over without them", settings.hand_over_wait_s)
            through = followed()
            await sharing.publish(sharing.handed_over, send_row, send_steps,
                                  wait_s=max(deadline - time.monotonic(), 0.0))
            await app.producer.flush()
            await published(through)
        except PublishBusy as busy:  # a checkpoint's write (see ItemSharing.between_publishes)
            log.warning("the item rows were not handed over (%s): the next owner starts from "
                        "the last publish", busy)
        except Exception:  # noqa: BLE001 - the next owner starts from the last publish
            log.exception("could not hand the item rows over")

    @app.on_partitions_revoked.connect
    async def hand_over_revoked(app: faust.App, revoked, **kwargs) -> None:
        await hand_over()

    @app.on_before_shutdown.connect
    async def hand_over_at_stop(app: faust.App, **kwargs) -> None:
        await hand_over()

    return sharing
