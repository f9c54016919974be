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

Messages between the two are pickled by :mod:`multiprocessing` connections: both ends are this
program (the child is spawned from this module), nothing from Kafka or disk is unpickled; the
Kafka bytes travel inside as bytes and are validated in the child.

If the child dies, the worker stops (and its supervisor or container restarts it from the last
checkpoint, redelivering what was not committed): a worker that takes events in but cannot
learn would look healthy while its model froze.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import queue
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection

from .engine import Engine, LearnedReport
from .settings import Settings
from .wire import TrainBatch

log = logging.getLogger(__name__)

#: training batches handed to the child ahead of its learning
IN_FLIGHT = 2


class LearnerProcess:
    """The parent's side: start the child, feed it, apply its reports on the event loop."""

    def __init__(self, settings: Settings, *, in_flight: int = IN_FLIGHT) -> None:
        self.settings = settings
        self.in_flight = in_flight
        self.died = False
        self._process: multiprocessing.process.BaseProcess | None = None
        self._to_child: Connection | None = None
        self._from_child: Connection | None = None
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sender: threading.Thread | None = None
        self._slots: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_report: Callable[[LearnedReport], None] | None = None
        self._on_paths: Callable[[], None] | None = None
        self._on_saved: Callable[[], None] | None = None
        self._on_death: Callable[[], None] | None = None

    # -- life -------------------------------------------------------------------------------
    def start(self, timeout_s: float = 120.0) -> LearnerProcess:
        """Spawn the child and wait until it has loaded the checkpoint."""
        context = multiprocessing.get_context("spawn")  # no forked copy of Faust's state
        child_in, self._to_child = context.Pipe(duplex=False)
        self._from_child, child_out = context.Pipe(duplex=False)
        self._process = context.Process(target=child_main, name="streamrec-learner",
                                        args=(self.settings, child_in, child_out), daemon=True)
        self._process.start()
        child_in.close()
        child_out.close()
        if not self._from_child.poll(timeout_s):
            self._process.kill()
            raise RuntimeError(f"the learner process did not start within {timeout_s:.0f} s")
        kind, items, steps = self._from_child.recv()
        log.info("learner process %d ready: %d items, %d steps", self._process.pid, items, steps)
        self._sender = threading.Thread(target=self._send_all, name="learner-sender",
                                        daemon=True)
        self._sender.start()
        return self

    def attach(self, loop: asyncio.AbstractEventLoop, *,
               on_report: Callable[[LearnedReport], None], on_paths: Callable[[], None],
               on_saved: Callable[[], None], on_death: Callable[[], None]) -> None:
        """Apply the child's messages on ``loop`` from now on (call it on that loop)."""
        self._loop = loop
        self._slots = asyncio.Semaphore(self.in_flight)
        self._on_report, self._on_paths = on_report, on_paths
        self._on_saved, self._on_death = on_saved, on_death
        loop.add_reader(self._from_child.fileno(), self._receive)

    def stop(self, timeout_s: float = 30.0) -> bool:
        """Ask the child to checkpoint and exit; wait for it. True when it saved."""
        if self._process is None:
            return False
        if self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.remove_reader(self._from_child.fileno())
            except (ValueError, OSError, RuntimeError):
                pass
        self._outbox.put(("stop",))
        saved = False
        deadline = time.monotonic() + timeout_s
        try:
            while not saved and self._from_child.poll(max(0.0, deadline - time.monotonic())):
                saved = self._from_child.recv()[0] == "stopped"
        except (EOFError, OSError):
            pass
        self._outbox.put(None)
        self._process.join(max(0.0, deadline - time.monotonic()))
        if self._process.is_alive():
            log.error("the learner process did not stop; killing it")
            self._process.kill()
            self._process.join(5)
        return saved

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    # -- feeding ----------------------------------------------------------------------------
    async def learn(self, values: list[bytes], users: int) -> None:
        """Hand raw training messages to the child; waits while ``in_flight`` batches are
        still being learned."""
        await self._slots.acquire()
        self._outbox.put(("learn", values, users))

    def request_save(self) -> None:
        self._outbox.put(("save",))

    def _send_all(self) -> None:
        """Writes to the pipe block while the child is busy: they happen here, not on the loop."""
        while (message := self._outbox.get()) is not None:
            try:
                self._to_child.send(message)
            except (OSError, ValueError):
                return  # the child is gone; _receive sees the end of its pipe

    def _receive(self) -> None:
        try:
            while self._from_child.poll():
                self._dispatch(self._from_child.recv())
        except (EOFError, OSError):
            self._loop.remove_reader(self._from_child.fileno())
            self.died = True
            log.critical("the learner process %s exited (code %s); stopping the worker",
                         self.pid, self._process.exitcode if self._process else None)
            self._on_death()

    def _dispatch(self, message: tuple) -> None:
        kind = message[0]
        if kind == "learned":
            self._slots.release()
            try:
                self._on_report(message[1])
            except Exception:  # noqa: BLE001 - a replica out of step is fatal below
                log.exception("could not apply the learner's report")
                raise EOFError("replica out of step") from None
        elif kind == "paths":
            self._on_paths()
        elif kind == "saved":
            self._on_saved()


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
    engine = Engine(settings.replace(index_enabled=False))  # the index lives with the answers
    engine.load()
    outbox.send(("ready", len(engine.learner), engine.learner.steps))
    LearnerLoop(engine, settings, outbox).run(inbox)


def limit_threads() -> None:
    """One BLAS and one torch thread: a step's products are small, and threads on busy cores
    made steps ~30x slower (benchmarks/learner_step.py)."""
    import torch
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
    torch.set_num_threads(1)


class LearnerLoop:
    """The child's loop: one message at a time, M-steps checked every ``index_check_s``."""

    def __init__(self, engine: Engine, settings: Settings, outbox: Connection) -> None:
        self.engine = engine
        self.settings = settings
        self.outbox = outbox

    def run(self, inbox: Connection) -> None:
        next_check = time.monotonic() + self.settings.index_check_s
        while True:
            try:
                message = inbox.recv() if inbox.poll(
                    max(0.0, next_check - time.monotonic())) else None
            except (EOFError, OSError):
                log.warning("the worker is gone; checkpointing and exiting")
                self.engine.save()
                return
            try:
                if message is not None and not self.handle(message):
                    return
            except (BrokenPipeError, EOFError):
                log.warning("the worker is gone; checkpointing and exiting")
                self.engine.save()
                return
            if time.monotonic() >= next_check:
                self.m_step()
                next_check = time.monotonic() + self.settings.index_check_s

    def handle(self, message: tuple) -> bool:
        """Act on one message; False after ``stop``."""
        kind = message[0]
        if kind == "learn":
            self.outbox.send(("learned", self.learn(message[1], message[2])))
        elif kind == "save":
            self.engine.save()
            self.outbox.send(("saved",))
        elif kind == "stop":
            self.engine.save()
            self.outbox.send(("stopped",))
            return False
        return True

    def learn(self, values: list[bytes], users: int) -> LearnedReport:
        examples, bad = TrainBatch.examples_of(values)
        if bad:
            log.warning("skipped %d undecodable training messages", bad)
        self.engine.users = users
        return self.engine.learn_reported(examples, self.settings.learn_batch)

    def m_step(self) -> None:
        """Install a finished M-step (and start a due one); hand installed paths over."""
        paths = self.engine.paths
        if paths is None:
            return
        before = paths.stats()["m_steps"]
        try:
            self.engine.maybe_m_step()
            if paths.stats()["m_steps"] != before:
                paths.save(self.engine.checkpoint_dir / "dr")
                self.outbox.send(("paths",))
        except Exception:  # noqa: BLE001 - the paths in force keep serving
            log.exception("Deep Retrieval M-step failed")
