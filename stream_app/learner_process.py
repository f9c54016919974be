"""Learning in a process of its own, beside the worker's event loop.

A worker's event loop takes events in (validation, histories, popularity, user vectors),
answers requests and runs Faust; on one loop, the item learner and the Deep Retrieval E-step
took a third of its time, and a learning step held up every answer behind it. Python threads
do not help: both sides hold the interpreter lock for most of their work (measured: a learning
thread made intake faster and learning no faster). So the worker starts one child process that
owns the model:

- the learn agent hands the raw training messages to the child, at most ``in_flight`` batches
  ahead of it (then the agent waits and the train topic's backlog stays in Kafka);
- the child decodes them, learns (item rows, Gramians, Deep Retrieval), and reports each batch
  as a :class:`~stream_app.engine.LearnedReport`: the rows it moved or created with their new
  values, which the loop applies to its replica of the item model
  (:meth:`~stream_app.engine.Engine.follow`), so user vectors, the index and answers use the
  rows the child has learned, a few milliseconds later;
- the child runs the Deep Retrieval M-steps, saves the paths when one is installed and says
  so, and the loop loads them for retrieval; it writes the model checkpoint when asked.

The worker sends the child frames of its own (a length, a kind, the raw Kafka values), which
the child validates as it decodes them. The child's reports come back pickled by a
:mod:`multiprocessing` connection: both ends are this program, the child spawned from this
module, and nothing from Kafka or disk is unpickled. The worker closing the pipe (its stop, or
its death) tells the child to checkpoint (when it learned since its last) and exit.

If the child dies, the worker stops (and its supervisor or container restarts it from the last
checkpoint): a worker that takes events in but cannot learn would look healthy while its model
froze. Nothing learned is lost (with the batch intake, the default): the worker acknowledges a
training message only once a checkpoint holds it (with item sharing, a publish of its rows:
:mod:`stream_app.checkpoint_acks`; the child says which batches a checkpoint holds), so Kafka
delivers again what the dead child had not saved, and each learn frame carries its messages'
training-topic positions, which the child saves with the model and which let it skip what it
holds (:mod:`state.stream_positions`). A worker that stops on its own waits for the child to
learn everything handed over (:meth:`LearnerProcess.settle`) and to checkpoint it
(:meth:`LearnerProcess.checkpoint`) before Faust's last commit; a worker that dies alone closes
the pipe, and the child checkpoints what it was handed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import logging
import multiprocessing
import os
import signal
import struct
import sys
import time
from collections.abc import Callable, Collection
from multiprocessing.connection import Connection

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from .engine import CheckpointWritten, Engine, LearnedReport
from .item_sharing import install_records
from .processes import LEARNER_LOCK, LEARNER_LOCK_WAIT_S, lock_data_dir
from .settings import Settings

log = logging.getLogger(__name__)

#: training batches handed to the child ahead of its learning
IN_FLIGHT = 2
#: bytes of other frames (item rows) the worker holds for the child before their
#: sender waits (:meth:`LearnerProcess.drained`)
FRAME_BUFFER = 32 * 1024 * 1024
#: most of its time the learner spends in the checkpoints the worker's timer asks for: a
#: save of a large model (11.7 KB a learned item, 9 s at 100,000 on a slow disk) is asked
#: again only (1/share − 1) times its duration after it was written, and never while one is
#: asked and not yet written (the timer's requests queued behind a long save, and the learner
#: did little but save)
SAVE_SHARE = 0.25


class _PipeToChild(asyncio.Protocol):
    """The write side's flow control, which a plain protocol ignores: ``room`` is clear
    while the transport holds more than its high-water mark for the child."""

    def __init__(self) -> None:
        self.room = asyncio.Event()
        self.room.set()

    def pause_writing(self) -> None:
        self.room.clear()

    def resume_writing(self) -> None:
        self.room.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.room.set()  # nothing will drain now; senders must not wait forever


class LearnerProcess:
    """The parent's side: start the child, feed it, apply its reports on the event loop."""

    def __init__(self, settings: Settings, *, in_flight: int = IN_FLIGHT,
                 frame_buffer: int = FRAME_BUFFER) -> None:
        self.settings = settings
        self.in_flight = in_flight
        self.frame_buffer = frame_buffer
        self.died = False
        self._process: multiprocessing.process.BaseProcess | None = None
        self._to_child: Connection | None = None
        self._from_child: Connection | None = None
        self._writer: asyncio.WriteTransport | None = None
        self._pipe: _PipeToChild | None = None
        # frames asked for before :meth:`attach` (a rebalance, rows read or a checkpoint
        # asked while the tables recover, before the app's tasks start), written first there
        self._before_attach: list[bytes] = []
        self._attached = asyncio.Event()
        self._slots: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_report: Callable[[LearnedReport], None] | None = None
        self._on_paths: Callable[[dict], None] | None = None
        self._on_saved: Callable[[int], None] | None = None
        self._on_death: Callable[[], None] | None = None
        self._settles: collections.deque[asyncio.Future] = collections.deque()  # in frame order
        # per SAVE frame, in frame order: the last batch it holds, who waits for it, and when
        # it was asked (monotonic)
        self._saves: collections.deque[tuple[int, asyncio.Future | None, float]] = \
            collections.deque()
        self._last_save: tuple[float, float] | None = None  # asked, written (monotonic)
        #: what the checkpoint the learner last reported wrote (None: it had nothing to write)
        self.last_written: CheckpointWritten | None = None
        self._batches_written = 0  # learn frames
        self._batches_learned = 0  # their reports, in order
        #: the batches whose learning the follower holds whole (input offsets included)
        self.batches_followed = 0

    # -- life -------------------------------------------------------------------------------
    def start(self, timeout_s: float | None = None) -> LearnerProcess:
        """Spawn the child and wait until it has loaded the checkpoint, at most ``timeout_s``
        (``learner_start_timeout_s``: a fixed 120 s was less than the lock's wait plus the
        load of a model of millions of items, and such a worker failed every start); a child
        that dies meanwhile is told at once."""
        timeout_s = self.settings.learner_start_timeout_s if timeout_s is None else timeout_s
        context = multiprocessing.get_context("spawn")  # no forked copy of Faust's state
        child_in, self._to_child = context.Pipe(duplex=False)
        self._from_child, child_out = context.Pipe(duplex=False)
        self._process = context.Process(target=child_main, name="streamrec-learner",
                                        args=(self.settings, child_in, child_out), daemon=True)
        self._process.start()
        child_in.close()
        child_out.close()
        try:
            kind, items, steps = self._wait_ready(timeout_s)
        except BaseException:  # a Ctrl-C too: the child ignores it, and would hold the exit
            self._process.kill()
            self._process.join()
            self._to_child.close()
            raise
        if kind == "failed":
            self._process.join(5.0)
            raise RuntimeError(f"the learner process could not load the checkpoint: {items}")
        log.info("learner process %d ready: %d items, %d steps", self._process.pid, items, steps)
        return self

    def _wait_ready(self, timeout_s: float) -> tuple:
        """The child's first message: ready (with its items and steps) or failed (why)."""
        if not self._from_child.poll(timeout_s):
            raise RuntimeError(f"the learner process did not start within {timeout_s:.0f} s")
        try:
            return self._from_child.recv()
        except EOFError:
            return "failed", "it exited before it said why (see its log above)", 0

    async def attach(self, *, on_report: Callable[[LearnedReport], None],
                     on_paths: Callable[[dict], None], on_saved: Callable[[int], None],
                     on_death: Callable[[], None]) -> None:
        """Feed the child and apply its messages on the running loop from now on.

        Frames to the child go through an asyncio pipe transport: it writes what the pipe
        takes and buffers the rest, so a child busy learning never blocks the loop (and no
        thread competes with the loop for the interpreter lock)."""
        self._loop = asyncio.get_running_loop()
        self._slots = asyncio.Semaphore(self.in_flight)
        self._on_report, self._on_paths = on_report, on_paths
        self._on_saved, self._on_death = on_saved, on_death
        self._writer, self._pipe = await self._loop.connect_write_pipe(_PipeToChild,
                                                                        self._to_child)
        self._writer.set_write_buffer_limits(high=self.frame_buffer)
        for data in self._before_attach:
            self._writer.write(data)
        self._before_attach.clear()
        self._attached.set()
        self._loop.add_reader(self._from_child.fileno(), self._receive)

    def _send(self, data: bytes) -> None:
        """A frame to the child, or held for :meth:`attach`."""
        if self._writer is None:
            self._before_attach.append(data)
        else:
            self._writer.write(data)

    def _write_held(self) -> None:
        """The frames held for an :meth:`attach` that never came (a stop during the first
        recovery), written now, blocking: the child reads its input to the end (a forget of
        partitions lost must precede its last checkpoint)."""
        held, self._before_attach = self._before_attach, []
        with contextlib.suppress(OSError):  # a child gone: what it had not saved is gone too
            for data in held:
                view = memoryview(data)
                while view:
                    view = view[os.write(self._to_child.fileno(), view):]

    def stop(self, timeout_s: float = 30.0) -> bool:
        """Close the child's input: it checkpoints and exits. Waits for it, taking (and
        dropping) its last reports so that it never blocks on a full pipe; True when it
        exited cleanly, i.e. after writing the checkpoint."""
        if self._process is None:
            return False
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(ValueError, OSError, RuntimeError):
                self._loop.remove_reader(self._from_child.fileno())
        self._write_held()
        self._to_child.close()  # a frame cut short reads as the end too
        deadline = time.monotonic() + timeout_s
        with contextlib.suppress(EOFError, OSError):
            while self._process.is_alive() and time.monotonic() < deadline:
                if self._from_child.poll(0.1):
                    self._from_child.recv()
        self._process.join(max(0.0, deadline - time.monotonic()))
        if self._process.is_alive():
            log.error("the learner process did not stop; killing it")
            self._process.kill()
            self._process.join(5)
        return self._process.exitcode == 0

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    # -- feeding ----------------------------------------------------------------------------
    async def learn(self, values: list[bytes], users: int,
                    positions: list[tuple[int, int]] | None = None) -> int:
        """Hand raw training messages (with their training-topic positions, when known) to
        the child; waits while ``in_flight`` batches are still being learned. Returns the
        batch's number: a checkpoint requested after it holds it."""
        await self._attached.wait()
        await self._slots.acquire()
        self._batches_written += 1
        self._writer.write(learn_frame(values, users, positions))
        return self._batches_written

    async def settle(self, timeout_s: float) -> bool:
        """Wait until the child has learned every frame handed to it and reported all it
        learned, input offsets a report held back included (:meth:`Engine.learn_reported`
        holds them while frames queue), and those reports are applied here; at most
        ``timeout_s``. True when it has. A worker handing its items over publishes what they
        learned after this, and a stopping worker waits for it before its last commit.

        A SETTLE frame goes behind the others and the child answers it once it has sent
        everything: the pipe keeps the order both ways, so every report comes before the
        answer. A batch handed over meanwhile (the learn agent takes the slot a report frees)
        goes behind it, so the round trip is repeated until none was."""
        if self._writer is None:  # not attached: nothing handed over
            return True
        if self.died:  # what it had not saved is gone
            return False
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    answer = self._loop.create_future()
                    self._settles.append(answer)
                    self._writer.write(frame(SETTLE))
                    written = self._batches_written
                    await asyncio.shield(answer)  # a later answer still finds it, done or not
                    if self.died:
                        return False
                    if self._batches_written == written:
                        return True
        except TimeoutError:
            return False

    async def drained(self) -> None:
        """Wait while the frames for the child held here are over ``frame_buffer`` bytes. Learn
        frames are bounded by their slots; a sender of item rows (a catch-up reads
        the whole item-rows topic, faster than the child may install it) waits here, so the
        worker's memory does not grow with the topic. Before :meth:`attach`, what is held
        here for it waits for the pipe, so a sender waits too."""
        await self._attached.wait()  # what is held for it is not bounded by the pipe
        await self._pipe.room.wait()

    def request_save(self) -> int:
        """Ask the child for a checkpoint; it holds every batch handed over so far, whose
        last number this returns and ``on_saved`` receives once it is written."""
        return self._request_save(None)

    def _request_save(self, waiting: asyncio.Future | None) -> int:
        self._send(frame(SAVE))
        self._saves.append((self._batches_written, waiting, time.monotonic()))
        return self._batches_written

    def save_due(self, share: float = SAVE_SHARE, *, waiting: bool = False) -> bool:
        """Whether the timer should ask for a checkpoint now (:data:`SAVE_SHARE`): none is
        asked and unwritten, and the last one was written at least (1/share − 1) times the
        time it took (from asking, so its wait behind learning counts too) ago. ``waiting``:
        intake waits for the checkpoint (too many messages unacknowledged), so only the
        first condition holds it back."""
        if self._saves:
            return False
        if self._last_save is None or waiting:
            return True
        asked, written = self._last_save
        return time.monotonic() - written >= (written - asked) * (1.0 / share - 1.0)

    async def checkpoint(self, timeout_s: float | None) -> bool:
        """A checkpoint of everything handed over so far, written; at most ``timeout_s``
        (None: as long as the write takes; a learner that dies meanwhile answers at once).
        False when it was not (a dead learner has none to write)."""
        if self._writer is None or self.died:
            return False
        written = self._loop.create_future()
        self._request_save(written)
        try:
            return await asyncio.wait_for(asyncio.shield(written), timeout_s)
        except TimeoutError:
            return False

    def install_rows(self, records: list[tuple[bytes, bytes]], *,
                     keep_statistics: bool = False) -> None:
        """Hand other workers' item rows (item-rows topic records: key, value) to the child,
        which installs them and reports them like a learning step (``keep_statistics``: see
        :meth:`Engine.install_rows`)."""
        self._send(rows_frame(records, keep_statistics))

    def forget_partitions(self, partitions: Collection[int]) -> None:
        """Tell the child to forget the statistics of the items of ``partitions``."""
        self._send(forget_frame(partitions))

    def _receive(self) -> None:
        try:
            while self._from_child.poll():
                self._dispatch(self._from_child.recv())
        except (EOFError, OSError):
            self._loop.remove_reader(self._from_child.fileno())
            self.died = True
            self._answer_waiting()
            log.critical("the learner process %s exited (code %s); stopping the worker",
                         self.pid, self._process.exitcode if self._process else None)
            self._on_death()

    def _answer_waiting(self) -> None:
        """A dead child answers nothing: whoever waits for a settle or a checkpoint is told
        now, not at its timeout."""
        for answer in self._settles:
            if not answer.done():
                answer.set_result(None)
        for _, waiting, _ in self._saves:
            if waiting is not None and not waiting.done():
                waiting.set_result(False)
        self._settles.clear()
        self._saves.clear()

    def _dispatch(self, message: tuple) -> None:
        kind = message[0]
        if kind in ("learned", "inputs"):  # inputs: offsets alone, no batch behind them
            if kind == "learned":
                self._slots.release()
                self._batches_learned += 1
            try:
                self._on_report(message[1])
                if message[1].complete:
                    self.batches_followed = self._batches_learned
            except Exception:  # noqa: BLE001 - a replica out of step is fatal below
                log.exception("could not apply the learner's report")
                raise EOFError("replica out of step") from None
        elif kind == "paths":
            self._on_paths(message[1])
        elif kind == "saved":
            through, waiting, asked = self._saves.popleft()
            self._last_save = (asked, time.monotonic())
            self.last_written = None if message[2] is None else CheckpointWritten(*message[2])
            if message[1]:
                self._on_saved(through)
            if waiting is not None and not waiting.done():
                waiting.set_result(message[1])
        elif kind == "settled":
            answer = self._settles.popleft()
            if not answer.done():
                answer.set_result(None)


# -- frames to the child: a length, a kind, the raw Kafka values (no pickle) ---------------------
LEARN, SAVE, ROWS, SETTLE, FORGET = b"L", b"S", b"R", b"W", b"F"
_LENGTH = struct.Struct("!I")
_LEARN_HEAD = struct.Struct("!QI")  # users, number of values
_COUNT = struct.Struct("!i")  # positions in a learn frame; -1: none


def frame(kind: bytes, body: bytes = b"") -> bytes:
    return _LENGTH.pack(len(kind) + len(body)) + kind + body


def _values_body(values: list[bytes], users: int) -> bytes:
    parts = [_LEARN_HEAD.pack(users, len(values))]
    for value in values:
        parts += [_LENGTH.pack(len(value)), value]
    return b"".join(parts)


def learn_frame(values: list[bytes], users: int,
                positions: list[tuple[int, int]] | None = None) -> bytes:
    """Training messages, with their (partition, offset) in the training topic when known:
    the learner skips those its model already holds (:mod:`state.stream_positions`)."""
    if positions is None:
        head = _COUNT.pack(-1)
    else:
        head = _COUNT.pack(len(positions)) + np.asarray(positions, dtype=">i8").tobytes()
    return frame(LEARN, head + _values_body(values, users))


def rows_frame(records: list[tuple[bytes, bytes]], keep_statistics: bool = False) -> bytes:
    """Item-rows records, laid out as a learn frame's values: key, value, key, value, …; the
    frame's count of users says whether their items keep their statistics (1) or not (0)."""
    return frame(ROWS, _values_body([part for record in records for part in record],
                                    int(keep_statistics)))


def forget_frame(partitions: Collection[int]) -> bytes:
    """Training partitions this worker no longer holds (:meth:`Engine.forget_partitions`)."""
    return frame(FORGET, b",".join(b"%d" % partition for partition in sorted(partitions)))


def parse_forget(body: memoryview) -> frozenset[int]:
    parts = bytes(body).split(b",")
    if not all(part.isdigit() for part in parts if part):
        raise EOFError("a forget frame that is not partition numbers")
    return frozenset(int(part) for part in parts if part)


def parse_rows(body: memoryview) -> tuple[list[tuple[bytes, bytes]], bool]:
    """A rows frame's records, and whether their items keep their statistics."""
    parts, keep = _parse_values(body)
    return list(zip(parts[::2], parts[1::2])), bool(keep)


def parse_learn(body: memoryview) -> tuple[list[bytes], int, list[tuple[int, int]] | None]:
    """A learn frame's values, users and positions (None where the worker had none)."""
    (count,) = _COUNT.unpack_from(body)
    at, positions = _COUNT.size, None
    if count < -1 or at + 16 * count > len(body):
        raise EOFError("a learn frame cut short")
    if count >= 0:
        pairs = np.frombuffer(body, dtype=">i8", count=2 * count, offset=at).reshape(count, 2)
        positions = [(int(p), int(o)) for p, o in pairs.tolist()]
        at += pairs.nbytes
    values, users = _parse_values(body[at:])
    if len(values) != len(positions if positions is not None else values):
        raise EOFError("a learn frame whose positions do not match its values")
    return values, users, positions


def _parse_values(body: memoryview) -> tuple[list[bytes], int]:
    users, count = _LEARN_HEAD.unpack_from(body)
    at, values = _LEARN_HEAD.size, []
    for _ in range(count):
        (size,) = _LENGTH.unpack_from(body, at)
        at += _LENGTH.size
        if at + size > len(body):
            raise EOFError("a frame cut short")
        values.append(bytes(body[at:at + size]))
        at += size
    if at != len(body):  # a writer's bug: the frames after it cannot be trusted either
        raise EOFError("a frame with bytes after its values")
    return values, users


def read_frame(fd: int) -> tuple[bytes, memoryview]:
    """The next frame's kind and body; EOFError at the end of the pipe (or inside a frame)."""
    (size,) = _LENGTH.unpack(_read_exactly(fd, _LENGTH.size))
    data = memoryview(_read_exactly(fd, size))
    return bytes(data[:1]), data[1:]


def _read_exactly(fd: int, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise EOFError("the pipe ended")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


# -- the child ----------------------------------------------------------------------------------
def child_main(settings: Settings, inbox: Connection, outbox: Connection) -> None:
    """The learner process: load the checkpoint, then learn what arrives until told to stop
    (or until the parent is gone), checkpointing on the way out."""
    # Signals are the parent's business: a terminal's Ctrl-C reaches the whole process group,
    # and the parent's graceful stop still needs this process to write the checkpoint.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=settings.log_level.upper(),
                        format="[%(asctime)s] [learner %(process)d] %(levelname)s %(name)s: "
                               "%(message)s")
    limit_threads()
    # held until this process ends: a learner left by a killed worker checkpoints first
    held = lock_data_dir(settings.data_dir, LEARNER_LOCK, wait_s=LEARNER_LOCK_WAIT_S)
    engine = Engine(settings.replace(index_enabled=False))  # the index lives with the answers
    try:
        engine.load(popularity_journal=False)  # the worker counts and answers popularity
    except Exception as error:  # the worker says why it cannot start, not "pipe closed"
        outbox.send(("failed", f"{type(error).__name__}: {error}", 0))
        raise
    freeze_startup_objects()
    outbox.send(("ready", len(engine.learner), engine.learner.steps))
    LearnerLoop(engine, settings, outbox).run(inbox)  # checkpoints on the way out
    held.close()
    exit_now(outbox)


def exit_now(outbox: Connection) -> None:
    """End the process once its checkpoint is written, without the interpreter's exit: that
    joins every thread, and an M-step under way (minutes at a million items) would hold the
    process, past the worker's stop deadline (then killed) or, when the worker was killed,
    beside the next worker's learner with a second copy of the model."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    outbox.close()
    os._exit(0)


def freeze_startup_objects() -> int:
    """Keep every object made so far out of the garbage collector's passes; returns how many.

    A process that has imported torch, Faust and the rest holds ~280,000 objects the collector
    tracks, nearly all of them modules, classes and functions that live as long as the process.
    Each full collection walked them all: 240–280 ms with the event loop stopped, every answer
    and event behind it (traced in a worker taking in a backlog, ``docs/throughput.md``). Frozen,
    they are never walked again; objects made later are collected as before."""
    gc.collect()  # what is garbage already goes now, not frozen with the rest
    gc.freeze()
    return gc.get_freeze_count()


def limit_threads() -> None:
    """One BLAS and one torch thread: a step's products are small, and threads on busy cores
    made steps ~30x slower (benchmarks/learner_step.py)."""
    threadpool_limits(1)
    torch.set_num_threads(1)


class LearnerLoop:
    """The child's loop: one message at a time, M-steps checked every ``index_check_s``."""

    def __init__(self, engine: Engine, settings: Settings, outbox: Connection) -> None:
        self.engine = engine
        self.settings = settings
        self.outbox = outbox
        # learned, or rows installed, since the last checkpoint written: else a SAVE writes
        # nothing (the checkpoint there holds it all; at a million items a model of gigabytes
        # was written again every 30 s by a learner with nothing to learn). Installs alone do
        # not make the checkpoint at the pipe's end (see run)
        self.learned_since_save = False
        self.installed_since_save = False
        # Deep Retrieval's M-steps whose paths were saved and handed to the worker
        self.m_steps_handed = engine.paths.stats()["m_steps"] if engine.paths else 0

    def run(self, inbox: Connection) -> None:
        """Until the worker closes the pipe (its stop, or its death): then checkpoint, when it
        learned since the last checkpoint (rows installed from the item-rows topic are
        installed again at the next start; with sharing, a start that stops before it has
        installed them all must leave the checkpoint's time as it was)."""
        next_check = time.monotonic() + self.settings.index_check_s
        try:
            while True:
                if inbox.poll(max(0.0, next_check - time.monotonic())):
                    frame_read = read_frame(inbox.fileno())
                    self.handle(*frame_read, caught_up=not inbox.poll(0))
                if time.monotonic() >= next_check:
                    self.m_step()
                    self.send_inputs()
                    next_check = time.monotonic() + self.settings.index_check_s
        except (EOFError, OSError, struct.error):  # BrokenPipeError: the worker is gone
            if self.learned_since_save:  # else the checkpoint there holds it all
                self.engine.save(popularity=False)  # the worker's to save
                log.info("learner stopped; checkpoint written")

    def handle(self, kind: bytes, body: memoryview, *, caught_up: bool = True) -> None:
        if kind == LEARN:
            self.learned_since_save = True
            self.outbox.send(("learned", self.learn(*parse_learn(body), caught_up=caught_up)))
        elif kind == SAVE:  # the worker commits what it holds only once it is written
            written = None  # nothing to write: the checkpoint there holds it all
            try:
                if self.learned_since_save or self.installed_since_save:
                    self.engine.save(popularity=False)  # the worker's to save
                    written = tuple(self.engine.last_checkpoint)
            except Exception:  # noqa: BLE001 - a full disk: learning goes on, commits wait
                log.exception("could not write the checkpoint")
                self.outbox.send(("saved", False, None))
            else:
                self.learned_since_save = self.installed_since_save = False
                self.outbox.send(("saved", True, written))
        elif kind == ROWS:
            self.installed_since_save = True
            records, keep_statistics = parse_rows(body)
            report = install_records(self.engine, records, keep_statistics=keep_statistics)
            if report is not None:
                self.outbox.send(("inputs", report))
        elif kind == FORGET:
            self.installed_since_save = True
            forgotten = self.engine.forget_partitions(parse_forget(body))
            log.info("forgot the statistics of %d items of partitions moved away", forgotten)
        elif kind == SETTLE:  # everything learned goes out, then the answer
            self.send_inputs()
            self.outbox.send(("settled",))
        else:
            raise EOFError(f"unknown frame {kind!r}")  # a damaged pipe: stop, checkpointed

    def learn(self, values: list[bytes], users: int,
              positions: list[tuple[int, int]] | None = None, *,
              caught_up: bool = True) -> LearnedReport:
        """``caught_up``: no other frame waits behind this one (the moved input offsets then
        go with its report, see :meth:`Engine.learn_reported`)."""
        self.engine.users = users
        return self.engine.learn_messages(values, self.settings.learn_batch,
                                          caught_up=caught_up, positions=positions)

    def send_inputs(self) -> None:
        """Input offsets moved by batches whose reports left them waiting (more batches were
        queued then), in a report of their own: a stream that stops while batches queue (or
        a checkpoint request behind the last one) must not leave the worker's user vectors
        with older offsets."""
        if self.engine.inputs_waiting:
            self.outbox.send(("inputs", self.engine.learn_reported([], self.settings.learn_batch)))

    def m_step(self) -> None:
        """Install a finished M-step (and start a due one); hand installed paths over."""
        paths = self.engine.paths
        if paths is None:
            return
        try:
            self.engine.maybe_m_step()
            installed = paths.stats()["m_steps"]
            if installed != self.m_steps_handed:  # also one whose save failed before
                paths.save(self.engine.paths_handoff_dir, scores=False)  # the worker serves
                self.outbox.send(("paths", paths.stats()))
                self.m_steps_handed = installed
        except Exception:  # noqa: BLE001 - the paths in force keep serving
            log.exception("Deep Retrieval M-step failed, or saving its paths did "
                          "(tried again at the next check)")
