"""The item model shared by the workers of one app (``STREAMREC_SHARE_ITEMS``).

Training examples are partitioned by item, so each worker's learner learns the items of the
training partitions it holds, and alone it would encode users and answer with those items
only: about 1/N of the catalogue with N workers. Shared, every worker publishes the rows of
the items it owns to the item-rows topic (keyed by item, compacted: each item's last row)
whenever they moved, at most every ``share_items_s``, and reads the whole topic, from its
beginning at every start, installing the rows of the items it does not own in its learner
(:meth:`stream_app.engine.Engine.install_rows`). The answers' replica follows them from the
learner's reports as it follows learning, so the index holds the whole catalogue.

An item is owned by the worker that holds its training partition *now*: after a rebalance
its new owner learns it on from the last row the old owner published, and the old owner takes
the new owner's rows from then on. A worker that loses partitions, or stops, first waits for
its learner's batches in flight and publishes every row moved since its last publish (its
hand-over), so the next owner starts from all of its learning, not from up to a publish
interval before (Faust revokes every partition at a rebalance, so a worker hands over at each;
one that keeps its partitions has only published early). One publish goes out at a time: a
hand-over's newer row of an item never lands before the older one a periodic publish holds.
Each record names the worker process that published it (a header), and a worker installs a
row of an item it owns when another process published it after this reader started: only a
previous owner does, handing the item over (its records may come after the new owner's
assignment: a stopping worker's Faust leaves the group before they are sent).

While a starting worker reads the records the topic held when it started (its catch-up), it
also installs the rows of items it owns that were published after its own checkpoint was
written: a worker that joins a running app starts its items from the rows their last owner
published, whether its partitions are assigned before or after the reader gets to those
records (at a million items the catch-up outlasts the rebalance), and a worker that restarts
after a crash gets back the learning its checkpoint missed, up to its last publish (record
times against the checkpoint file's: the workers' clocks are taken to agree to well within a
publish interval). Until that first catch-up ends (``caught_up``), the worker learns nothing,
publishes nothing and writes no model checkpoint: a row installed after learning began would
overwrite what was learned, the worker's own rows still hold the checkpoint's values (a publish
would put them over newer ones on the topic), and a checkpoint would move the file time that
says which of its own rows a next start installs. Steps other workers send meanwhile are
added once the catch-up has installed the rows they apply to (they are training messages).

An item's input offset δ is the exception to ownership: it moves with every example whose
history holds the item, and those examples are learned where *their* items are, on every
worker. So each worker also sends the steps it took on the offsets of items it does not own,
at the same interval, as messages of the training topic on those items' partitions: whichever
worker holds a partition when a message is read adds them to its offsets (which go out with
its next publish), and commits the message as it commits training messages, so a step moves
with its item through rebalances and crashes as an example does (read from a topic of its
own by every worker, kept by the one that owned the item when it read it, a step was lost
when the item changed owners meanwhile). Without them an offset would learn from 1/N of the
examples (Toys through Kafka, two workers answering with one pinned pair: NDCG@10 0.0396,
against 0.0407 with the steps, 0.0433 for one worker and 0.0363 with no offsets at all;
docs/results.md).

What is not shared: the items' solve statistics (a new owner starts them afresh, from that
row as its prior), the user Gramian (each learner estimates it from the users of its own
examples, a sample of all users) and Deep Retrieval (each worker's paths hold its own items).
Rows and steps are sent as raw float32 (``wire.py``), never pickled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from state.gramian import atomic_write
from state.stream_positions import ROWS_SHARED

from .compat import FetchWaitGuard, check_aiokafka
from .confirmed_acks import taken_by_broker
from .engine import Engine, LearnedReport, item_partition
from .kafka import aiokafka_config, assign_whole_topic
from .request_reader import keep_reading
from .settings import Settings
from .wire import (chunks_by_size, decode_item_row, decode_offset_steps, encode_item_row,
                   encode_offset_steps, is_item_id, offset_steps_size)

log = logging.getLogger(__name__)

Records = list[tuple[bytes, bytes]]
StepMessages = list[tuple[int, bytes]]  # (training partition, message of offset steps)
#: most bytes of one message of offset steps (Kafka's default message limit is 1 MiB)
STEPS_MESSAGE_BYTES = 512 * 1024
FLOAT32_MAX = float(np.finfo(np.float32).max)

#: the record header naming the worker process that published an item row
PUBLISHER = "streamrec-publisher"


def _drop_outcomes(deliveries: Iterable[Any]) -> None:
    """Deliveries no one will await: their errors read, not logged as never retrieved."""
    for delivery in deliveries:
        if delivery is not None:
            delivery.add_done_callback(lambda done: done.cancelled() or done.exception())


async def _refused(sent: list[tuple[Any, Any]]) -> list[tuple[Any, BaseException]]:
    """The records of ``sent`` (delivery or None, record) whose delivery failed, with the
    error, once every delivery is settled."""
    outcomes = await asyncio.gather(*(delivery for delivery, _ in sent if delivery is not None),
                                    return_exceptions=True)
    records = [record for delivery, record in sent if delivery is not None]
    return [(record, outcome) for record, outcome in zip(records, outcomes)
            if isinstance(outcome, BaseException)]


def rows_shared_mark(settings: Settings) -> Path:
    """A file that says the item-rows topic holds every row this worker owned, as of a
    publish of all of them. Without it (a model learned unshared, or topics made anew) the
    first publish sends every owned row, not only those that moved: a worker that joins
    later would otherwise lack the items that never moved again."""
    return settings.data_dir / "checkpoints" / ROWS_SHARED


def forget_rows_shared(settings: Settings) -> None:
    """The rows this worker learns from now on are not published (it runs without sharing):
    its next start with sharing publishes all of them once."""
    rows_shared_mark(settings).unlink(missing_ok=True)


def _decoded(records: Records, decode: Callable[[bytes], Any], what: str
             ) -> list[tuple[str, Any]]:
    """(item id, decoded value) of each record; one that does not decode is skipped and
    logged (only workers of this app write these topics, so one is damage or another model
    dimension)."""
    decoded, bad = [], 0
    for key, value in records:
        try:
            item = key.decode()
            if not is_item_id(item):  # no event could name it: an empty key, a NUL
                raise ValueError(f"not an item id: {item[:40]!r}")
            decoded.append((item, decode(value)))
        except (ValueError, UnicodeDecodeError, AttributeError):
            bad += 1
    if bad:
        log.warning("skipped %d %s that do not decode", bad, what)
    return decoded


def install_records(engine: Engine, records: Records, *,
                    keep_statistics: bool = False) -> LearnedReport | None:
    """:meth:`Engine.install_rows` of item-rows records that decode (the last of an item's,
    when it comes twice); None when none did."""
    dim = engine.settings.model_dim
    latest = dict(_decoded(records, lambda value: decode_item_row(value, dim), "item rows"))
    if not latest:
        return None
    rows, offsets = zip(*latest.values())
    return engine.install_rows(list(latest), np.stack(rows), np.stack(offsets),
                               keep_statistics=keep_statistics)


class PublishBusy(TimeoutError):
    """A publish not made: the one (or the checkpoint) under way outlasted its wait."""


class ItemSharing:
    """Publishes the owned rows a worker's engine moved and installs the others' rows; sends
    the steps it took on the others' items' input offsets to the training topic (their
    owners learn them as training messages: :meth:`Engine.learn_messages`).

    ``owned()`` gives the training partitions this worker holds now; ``install(records,
    keep_statistics)`` hands item-rows records (key, value) to its learner
    (:meth:`Engine.install_rows`); ``own_rows_after`` is when the
    learner's checkpoint was written
    (epoch seconds, 0 without one): the catch-up installs the worker's own items' rows
    published after it. ``taken()``, when given, is awaited after handing records on, until
    the learner has room for more (:meth:`LearnerProcess.drained`). ``owes_every_row``: the
    topic may lack rows of its items (no :func:`rows_shared_mark`), so its first publish
    that owns some sends them all."""

    def __init__(self, settings: Settings, engine: Engine,
                 owned: Callable[[], frozenset[int]],
                 install: Callable[[Records, bool], None],
                 own_rows_after: float = math.inf,
                 taken: Callable[[], Awaitable[None]] | None = None,
                 owes_every_row: bool = False) -> None:
        self.settings = settings
        self.engine = engine
        self._owned = owned
        self._install = install
        self._taken = taken  # waits while what install handed on is not taken
        self.own_rows_after = own_rows_after  # infinity once a catch-up has ended
        # set once the first catch-up has handed its rows on: the learner learns after it,
        # or a row of its own items published before a crash would overwrite newer learning
        self.caught_up = asyncio.Event()
        self.instance = uuid.uuid4().hex.encode()  # this process, in its records' headers
        # earlier processes of this data dir (:func:`own_publishers`): rows they published
        # after the checkpoint are this worker's own learning, kept with its statistics
        self.own_publishers: frozenset[bytes] = frozenset()
        self.held: frozenset[int] = frozenset()  # training partitions as last assigned
        # set at the worker's first assignment: the catch-up waits for it, since before it
        # no item is this worker's and every row of its own items would be installed, those
        # published before its checkpoint over the newer learning the checkpoint holds
        self.assigned = asyncio.Event()
        # item-rows partition: its next offset to read, past the records handed on. A
        # restarted reader goes on from there, as one that never failed: read again from the
        # beginning, its hand-overs (records of this worker's items another process
        # published) would pass for the catch-up's, which installs only rows published after
        # the checkpoint, and older rows would be installed over newer ones meanwhile
        self._rows_next: dict[int, int] = {}
        # the first reader's catch-up: rows partition -> its end offset then, while unread
        self._catch_up: dict | None = None
        self._moved: set[int] = set()  # learner rows moved since the last publish
        # the topic may lack rows of this worker's items: the next publish sends them all
        self._owes_every_row = owes_every_row
        self._took_every_row = False  # the publish under way takes them all
        self._steps: dict[int, np.ndarray] = {}  # learner row: offset steps not sent yet
        self._publishing = asyncio.Lock()
        self.published = 0
        self.handed_over_rows = 0  # of the published: at hand-overs
        self.installed = 0
        self.steps_sent = 0
        self.steps_added = 0

    def note(self, report: LearnedReport) -> None:
        """The rows a report moved, item rows and input offsets: due at the next publish;
        none of an install's (its rows are on the topic already, a catch-up's own ones too)."""
        self.steps_added += report.steps_added
        if report.installed:
            return
        self._moved.update(report.delta.rows.tolist())
        self._moved.update(report.delta.input_rows.tolist())
        if report.input_steps is not None:
            self._hold_steps(report.input_steps[0].tolist(), report.input_steps[1])

    def _hold_steps(self, rows: list[int], steps: Sequence[np.ndarray]) -> None:
        """Offset steps on learner ``rows`` (−1: skipped), summed with those not sent yet."""
        for row, step in zip(rows, steps):
            if row >= 0:
                held = self._steps.get(row)
                self._steps[row] = step if held is None else held + step

    def due(self, owned: frozenset[int] | None = None) -> Records:
        """Records of the rows moved since the last call whose items this worker owns (the
        items of the training partitions ``owned``, by default those it holds now). While
        the topic may lack some of its rows (:func:`rows_shared_mark`), every row it owns,
        once it owns some."""
        owned = self._owned() if owned is None else owned
        if self._owes_every_row and owned:
            self._moved.update(range(len(self.engine.learner)))
            self._took_every_row = True
        if not self._moved:
            return []
        rows = np.fromiter(self._moved, dtype=np.int64, count=len(self._moved))
        self._moved.clear()
        ids, values, offsets = self.engine.rows_to_share(rows)
        records = [(item.encode(), encode_item_row(row, offset))
                   for item, row, offset in zip(ids, values, offsets) if self._owns(item, owned)]
        self.published += len(records)
        return records

    def steps_due(self, owned: frozenset[int] | None = None) -> StepMessages:
        """Training messages (partition, value) of the offset steps taken since the last call
        on items this worker does not own (its own items' steps are in the rows it
        publishes), for their items' training partitions; ``owned`` as in :meth:`due`."""
        if not self._steps:
            return []
        steps, self._steps = self._steps, {}
        owned = self._owned() if owned is None else owned
        by_partition: dict[int, list[tuple[str, np.ndarray]]] = {}
        infinite = 0
        for item, step in zip(self.engine.learner.item_ids_at(steps), steps.values()):
            partition = item_partition(item, self.settings.partitions)
            if partition in owned:
                continue
            if not (np.abs(step) <= FLOAT32_MAX).all():  # finite as the message carries it
                infinite += 1
                continue
            by_partition.setdefault(partition, []).append((item, step))
        if infinite:
            log.warning("dropped the offset steps of %d items: not finite", infinite)
        dim = self.settings.model_dim
        messages = []
        for partition, taken in sorted(by_partition.items()):
            for chunk in chunks_by_size(taken, STEPS_MESSAGE_BYTES,
                                        lambda pair: offset_steps_size(pair[0], dim)):
                items, values = zip(*chunk)
                messages.append((partition, encode_offset_steps(items, np.stack(values))))
            self.steps_sent += len(taken)
        return messages

    @contextlib.asynccontextmanager
    async def between_publishes(self) -> AsyncIterator[None]:
        """Hold publishes off while the caller writes a checkpoint of the model. A record's
        time is when it was sent, and a restart's catch-up installs this worker's own rows
        sent after its checkpoint over it: rows read before a checkpoint was written and sent
        after it went back on the checkpoint's later learning, whose training messages the
        checkpoint's places then skipped as learned when they were delivered again (the
        publish had not acknowledged them). Between publishes, a record sent after a
        checkpoint was also read after it."""
        async with self._held():
            yield

    @contextlib.asynccontextmanager
    async def _held(self, wait_s: float | None = None) -> AsyncIterator[None]:
        """The publishing lock, waited for at most ``wait_s`` (:class:`PublishBusy` after)."""
        try:
            async with asyncio.timeout(wait_s):
                await self._publishing.acquire()
        except TimeoutError:
            raise PublishBusy(f"a publish or checkpoint under way outlasted {wait_s:.1f} s"
                              ) from None
        try:
            yield
        finally:
            self._publishing.release()

    async def publish(self, take: Callable[[], tuple[Records, StepMessages]],
                      send_row: Callable[[bytes, bytes], Awaitable[Any]],
                      send_steps: Callable[[int, bytes], Awaitable[Any]], *,
                      wait_s: float | None = None) -> None:
        """Send the records ``take`` gives (rows, steps: :meth:`due` and :meth:`steps_due`, or
        :meth:`handed_over`), one publish at a time: ``take`` runs once the one before has
        sent all of its records, so a hand-over's newer row of an item never goes out before
        the older row a periodic publish in progress holds (the topic keeps the last).
        ``send_steps(partition, value)`` sends a message of steps to the training topic.
        Either send may return its record's delivery, and the publish returns once every
        delivery did: the caller commits the training messages whose learning the rows hold
        after it. The records the broker refused are due again (:meth:`retake`), and when
        a send fails those not sent too, once the deliveries of those sent are settled; then
        it raises. A publish of every owned row marks the topic as holding them
        (:func:`rows_shared_mark`) only once the broker took them all. ``wait_s``: the
        longest wait for the publish (or checkpoint) under way, then PublishBusy, nothing
        taken (a hand-over must not hold a rebalance for a whole checkpoint's write)."""
        async with self._held(wait_s):
            self._took_every_row = False
            rows, steps = take()
            every_row, self._took_every_row = self._took_every_row, False
            sent_rows, sent_steps = [], []  # (delivery, record) of each record sent
            failure = None
            try:
                for key, value in rows:
                    sent_rows.append((await send_row(key, value), (key, value)))
                for partition, value in steps:
                    sent_steps.append((await send_steps(partition, value), (partition, value)))
            except Exception as error:  # what was sent is followed below all the same
                failure = error
            except BaseException:  # a stop: the rows sent not known delivered again (a row
                unsure = [record for delivery, record in sent_rows  # is a value; steps add
                          if delivery is not None and not taken_by_broker(delivery)]  # up: not)
                self.retake(unsure + rows[len(sent_rows):], steps[len(sent_steps):])
                _drop_outcomes(delivery for delivery, _ in sent_rows + sent_steps)
                raise
            refused = await self._settle(sent_rows, sent_steps, rows[len(sent_rows):],
                                         steps[len(sent_steps):])
            if failure is not None:
                raise failure
            if refused:  # an every-row publish stays owed
                raise RuntimeError(f"the broker refused {refused[0]} item rows and "
                                   f"{refused[1]} messages of offset steps ({refused[2]!r}); "
                                   "they are due again") from refused[2]
            if every_row:
                self._owes_every_row = False
                mark = rows_shared_mark(self.settings)
                mark.parent.mkdir(parents=True, exist_ok=True)
                mark.touch()

    async def _settle(self, sent_rows: list, sent_steps: list, rows_left: Records,
                      steps_left: StepMessages) -> tuple[int, int, BaseException] | None:
        """Once every delivery of ``sent_rows`` and ``sent_steps`` ((delivery or None,
        record) pairs) is settled, the records the broker refused are due again, with those
        left unsent; returns how many rows and step messages it refused and the first
        error, None when it took them all. A stop while waiting makes every row sent due
        again (a row is a value) but no step sent (steps add up)."""
        try:
            refused_rows = await _refused(sent_rows)
            refused_steps = await _refused(sent_steps)
        except BaseException:
            self.retake([record for _, record in sent_rows] + rows_left, steps_left)
            _drop_outcomes(delivery for delivery, _ in sent_rows + sent_steps)
            raise
        self.retake([record for record, _ in refused_rows] + rows_left,
                    [record for record, _ in refused_steps] + steps_left)
        if not refused_rows and not refused_steps:
            return None
        return len(refused_rows), len(refused_steps), (refused_rows or refused_steps)[0][1]

    def retake(self, rows: Records, steps: StepMessages) -> None:
        """Records of :meth:`due` and messages of :meth:`steps_due` that were not sent, due
        again: the rows' items moved (their values are read again at the next publish), the
        steps added back to those taken since."""
        learner = self.engine.learner
        moved = learner.rows_of([key.decode() for key, _ in rows])
        self._moved.update(moved[moved >= 0].tolist())
        self.published -= len(rows)
        for _, value in steps:
            item_ids, values = decode_offset_steps(value, self.settings.model_dim)
            self._hold_steps(learner.rows_of(item_ids).tolist(), list(values))
            self.steps_sent -= len(item_ids)

    def handed_over(self) -> tuple[Records, StepMessages]:
        """:meth:`due` and :meth:`steps_due` as owner of the partitions held before a
        revocation or a stop (:attr:`held`) and of those held now: the rows the next owners
        start from."""
        owned = self._owned() | self.held
        rows = self.due(owned)
        self.handed_over_rows += len(rows)
        return rows, self.steps_due(owned)

    def export(self, metrics: Any) -> None:
        """Its counts as gauges of a :class:`stream_app.metrics.Metrics`."""
        metrics.gauge("streamrec_item_rows_published", "Item rows this worker published (owned).",
                      lambda: self.published)
        metrics.gauge("streamrec_item_rows_handed_over",
                      "Of the rows published, those sent at rebalances (Faust revokes every "
                      "partition at each) or as this worker stopped (its hand-overs).",
                      lambda: self.handed_over_rows)
        metrics.gauge("streamrec_item_rows_installed",
                      "Item rows of other workers this worker installed.",
                      lambda: self.installed)
        metrics.gauge("streamrec_item_steps_sent",
                      "Input-offset steps this worker sent to the owners of their items.",
                      lambda: self.steps_sent)
        metrics.gauge("streamrec_item_steps_added",
                      "Input-offset steps of other workers this worker added to its items.",
                      lambda: self.steps_added)
        metrics.gauge("streamrec_item_rows_caught_up",
                      "1 once this worker has installed the item rows published before it "
                      "started; until then it neither learns, publishes nor checkpoints.",
                      lambda: float(self.caught_up.is_set()))

    def wanted(self, records: Records, published_at: Sequence[float] | None = None,
               publishers: Sequence[bytes | None] | None = None) -> Records:
        """The records to install: those of items this worker does not own; for records of
        the catch-up (``published_at``: their times, epoch seconds), those of its own items
        published after ``own_rows_after``; for the others, those of its own items that
        another worker process published (``publishers``: each record's, None when it names
        none): a hand-over."""
        owned = self._owned()
        catch_up = published_at is not None
        after = self.own_rows_after if catch_up else math.inf
        times = published_at if catch_up else [0.0] * len(records)
        by = [None] * len(records) if publishers is None or catch_up else publishers
        return [(key, value)
                for (key, value), at, publisher in zip(records, times, by, strict=True)
                if value is not None and key is not None
                and (at > after or publisher not in (None, self.instance)
                     or not self._owns(key.decode(errors="replace"), owned))]

    def _owns(self, item_id: str, owned: frozenset[int]) -> bool:
        """Whether ``item_id`` is in the training partitions ``owned``: this worker's to learn
        and publish."""
        return item_partition(item_id, self.settings.partitions) in owned

    async def read(self, retry_after_s: float = 1.0) -> None:
        """Install the other workers' rows from the item-rows topic until cancelled; a failed
        consumer is logged and started again, from where the failed one left the topic (the
        first one reads it from its beginning), its catch-up from where that one's
        stopped."""
        await keep_reading(self._read, "the item-rows reader", retry_after_s)

    async def _read(self) -> None:
        from aiokafka import AIOKafkaConsumer

        consumer: Any = AIOKafkaConsumer(
            client_id=f"{self.settings.app_id}-item-rows", enable_auto_commit=False,
            auto_offset_reset="earliest", fetch_max_wait_ms=self.settings.worker_fetch_max_wait_ms,
            **aiokafka_config(self.settings))
        guard = (FetchWaitGuard(self.settings.worker_fetch_max_wait_ms)
                 if self.settings.compat_fixes else None)
        if not self.caught_up.is_set() and self._catch_up is not None:
            log.warning("the item-rows catch-up goes on with a new consumer: learning waits "
                        "for it")
        try:
            if not self.caught_up.is_set():
                await self.assigned.wait()  # which items are this worker's
            await consumer.start()
            catch_up = await self._assign(consumer)
            while True:
                batches = await consumer.getmany(timeout_ms=1000, max_records=10_000)
                others, own = self._to_install(batches, catch_up)
                records = own + others
                for part, keep_statistics in ((own, True), (others, False)):  # in topic order
                    if part:
                        self._install(part, keep_statistics)
                self.installed += len(records)
                self._rows_taken(batches)
                if self._taken is not None and records:
                    await self._taken()  # the learner's pace, not the topic's
                for tp, end in list(catch_up.items()):
                    if await consumer.position(tp) >= end:
                        del catch_up[tp]
                if not catch_up and self.own_rows_after < math.inf:
                    log.info("item rows caught up: %d installed", self.installed)
                    self.own_rows_after = math.inf
                if not catch_up:
                    self.caught_up.set()
                if guard is not None:
                    check_aiokafka(guard, consumer, time.monotonic())
        finally:
            await consumer.stop()

    async def _assign(self, consumer: Any) -> dict:
        """Assign ``consumer`` every partition of the item-rows topic, each from where the
        last reader left it (at the first start, from its beginning). Returns the catch-up's
        partitions still unread and their end offsets (at the first start, the ends now).
        Raises while the cluster reports no partition of the topic."""
        ends = await assign_whole_topic(consumer, self.settings.items_topic, self._rows_next,
                                        self.settings)
        if self._catch_up is None:
            self._catch_up = {tp: end for tp, end in ends.items() if end > 0}
        return self._catch_up

    def _rows_taken(self, batches: dict) -> None:
        """Item-rows records fetched and handed on: a restarted reader starts after them."""
        for tp, batch in batches.items():
            if batch:
                self._rows_next[tp.partition] = batch[-1].offset + 1

    def _to_install(self, batches: dict, catch_up: dict) -> tuple[Records, Records]:
        """:meth:`wanted` of fetched ``batches``, the records before ``catch_up``'s end offsets
        (the topic's ends when this reader started) as the catch-up's: the records whose
        items' statistics go, and those of the catch-up that are this worker's own items,
        whose statistics stay (:meth:`Engine.install_rows`): those an earlier process of this
        data dir published last (:attr:`own_publishers`), not another worker that held the
        items meanwhile. An item's records all go to one part, and every record of the
        second comes before any of the first of the same item (an item's records share a
        partition, and the catch-up's come first in it)."""
        others: Records = []
        own: Records = []
        owned = self._owned()
        for tp, batch in batches.items():
            end = catch_up.get(tp, 0)
            early = [record for record in batch if record.offset < end]
            last_publisher = {record.key: publisher_of(record) for record in early}
            for key, value in self.wanted([(record.key, record.value) for record in early],
                                          [record.timestamp / 1000 for record in early]):
                mine = (last_publisher[key] in self.own_publishers
                        and self._owns(key.decode(errors="replace"), owned))
                (own if mine else others).append((key, value))
            live = batch[len(early):]
            others += self.wanted([(record.key, record.value) for record in live],
                                  publishers=[publisher_of(record) for record in live])
        return others, own


#: the file in a data dir naming the processes that published item rows from it, newest last
PUBLISHERS_FILE = "item-rows-publishers"
#: how many of them it keeps (a worker that restarts in a loop)
PUBLISHERS_KEPT = 16


def own_publishers(settings: Settings, instance: bytes) -> frozenset[bytes]:
    """The publishers of the earlier processes of this data dir, and ``instance`` noted
    among them for the next start (written atomically: a crash leaves the old list)."""
    path = settings.data_dir / PUBLISHERS_FILE
    try:
        earlier = path.read_bytes().split()
    except FileNotFoundError:
        earlier = []
    path.parent.mkdir(parents=True, exist_ok=True)
    noted = b"\n".join((earlier + [instance])[-PUBLISHERS_KEPT:]) + b"\n"
    atomic_write(path, lambda handle: handle.write(noted))
    return frozenset(earlier)


def publisher_of(record: Any) -> bytes | None:
    """The publisher named in an item-rows record's headers; None when it names none."""
    for name, value in record.headers or ():
        if name == PUBLISHER:
            return value
    return None
