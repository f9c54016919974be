"""`streamrec up`: the broker (embedded unless one is configured), topics and a worker, as one
unit that starts together and stops together on Ctrl-C or SIGTERM."""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import shutil
import signal
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from state.stream_positions import mark_topics_renewed

from .client import RecClient, ResponseTimeout
from .kafka import ensure_topics
from .processes import (EMBEDDED_MARK, LEARNER_LOCK, LEARNER_LOCK_WAIT_S, Child,
                        EmbeddedBroker, lock_data_dir, worker_argv)
from .settings import Settings

log = logging.getLogger(__name__)


def settings_env(settings: Settings) -> dict[str, str]:
    """``STREAMREC_*`` variables that reproduce ``settings`` in a child process."""
    import json
    import os

    env = {key: value for key, value in os.environ.items() if not key.startswith("STREAMREC_")}
    for name, value in settings.model_dump().items():
        if value is None:  # unset, unless the default is not (then the child reads "none")
            if Settings.model_fields[name].default is not None:
                env[f"STREAMREC_{name.upper()}"] = "none"
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        structured = isinstance(value, (dict, list))  # JSON, as pydantic-settings reads them
        env[f"STREAMREC_{name.upper()}"] = json.dumps(value) if structured else str(value)
    return env


#: the wait for a worker's first answer beyond its learner's start (the consumer group's
#: join, the first fetch)
READY_AFTER_LEARNER_S = 120.0


def ready_timeout(settings: Settings) -> float:
    """How long ``streamrec up`` waits for its worker's first answer: a fixed 120 s fell
    short of a learner allowed ``learner_start_timeout_s`` to load a large model (a worker
    that dies meanwhile is told at once, not at the timeout)."""
    learner = settings.learner_start_timeout_s if settings.learner_process else 0.0
    return READY_AFTER_LEARNER_S + learner


class System:
    """A running broker + worker. Use as a context manager; ``stop()`` is idempotent."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.logs = settings.data_dir / "logs"
        self.broker: EmbeddedBroker | None = None
        self.worker: Child | None = None
        self.forgotten: list[str] = []  # what an earlier run left that an empty broker voids

    def start(self, ready_timeout_s: float | None = None) -> System:
        """Start the broker (embedded) and a worker, and wait until a request is answered:
        at most ``ready_timeout_s``, by default the learner's start
        (``learner_start_timeout_s``, a model of millions of items) and two minutes more."""
        s = self.settings
        if ready_timeout_s is None:
            ready_timeout_s = ready_timeout(s)
        if s.embedded:
            self.broker = EmbeddedBroker(s.embedded_host, s.embedded_port,
                                         log_path=self.logs / "broker.log").start()
            self.forgotten = forget_broker_state(s)  # the broker is ours: its port was free
        ensure_topics(s)
        self.worker = Child("worker", worker_argv(), env=settings_env(s),
                            log_path=self.logs / "worker.log").start()
        self.wait_ready(ready_timeout_s)
        return self

    def wait_ready(self, timeout_s: float) -> None:
        """Ready = a real request gets a real answer through the broker and the worker."""
        deadline = time.monotonic() + timeout_s
        with RecClient(self.settings) as client:
            while time.monotonic() < deadline:
                dead = dead_child(self)
                if dead is not None:
                    log_path = self.logs / f"{dead[0]}.log"
                    raise RuntimeError(f"the {dead[0]} exited; see {log_path}\n"
                                       + tail(log_path))
                try:
                    client.recommend(user_id=None, k=1, timeout_s=2.0)
                    return
                except ResponseTimeout:
                    continue
        raise TimeoutError(f"the worker did not answer within {timeout_s:.0f} s; see "
                           f"{self.logs / 'worker.log'}")

    def stop(self) -> None:
        """The worker first (it commits and checkpoints through the broker), then the broker;
        the broker is stopped even when stopping the worker is interrupted."""
        try:
            if self.worker is not None:
                self.worker.stop(self.settings.shutdown_timeout_s + 10.0)
        finally:
            if self.broker is not None:
                self.broker.stop(5.0)

    def __enter__(self) -> System:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def describe(self) -> str:
        s = self.settings
        broker = (f"{s.bootstrap_servers[0]} (embedded Tansu broker, memory storage)"
                  if s.embedded else ", ".join(s.bootstrap_servers))
        metrics = (f"http://{s.metrics_host}:{s.metrics_port}/metrics" if s.metrics_port
                   else "disabled")
        return "\n".join([
            "streamrec is up",
            f"  broker     {broker}",
            f"  events     {s.topic_events} (dead letters: {s.topic_dead_letters})",
            f"  requests   {s.topic_requests} -> {s.topic_responses}",
            f"  metrics    {metrics}",
            f"  state      {s.data_dir.resolve()}",
            f"  logs       {self.logs.resolve()}",
            *([f"  dropped    {'; '.join(self.forgotten)} (of an earlier run: the embedded "
               "broker starts empty)"] if self.forgotten else []),
        ])


def dump_stacks_on_request(signum: int = signal.SIGUSR1) -> None:
    """``kill -USR1`` prints every thread's stack to stderr: a supervisor whose stop hangs
    says where. Written from the signal handler in C (:mod:`faulthandler`), so it answers
    even when the interpreter's main thread is stuck. For the CLI's processes (``up``,
    ``demo``), whose stderr is a file: it replaces the signal's handler for good. (A worker's
    SIGUSR1 is Faust's: it logs the worker's asyncio tasks.) Not where stderr is no file (a
    caller that captures it in memory)."""
    try:
        faulthandler.register(signum, all_threads=True)
    except (AttributeError, ValueError, OSError, RuntimeError):  # io.UnsupportedOperation too
        log.debug("no stack dump on signal %d: stderr is not a file", signum)


@contextlib.contextmanager
def stop_signals_exit() -> Iterator[Callable[[], None]]:
    """SIGTERM and SIGHUP raise ``SystemExit(128 + N)`` in the block, as Ctrl-C raises
    KeyboardInterrupt: `up` and `demo` run their ``finally`` (the worker's stop, then the
    broker's) whenever the signal comes. With the default action, a service manager's stop
    or a closed terminal while the system started (which can take minutes) killed the
    supervisor alone, and the worker and the broker died together after it. Only the first
    signal raises: another one must not cut short the stop it started. :func:`wait_for_signal`
    takes SIGTERM over while it waits (a stop asked for then is a clean exit); the previous
    handlers are back once the block ends. A signal that is ignored stays so (``nohup``'s
    SIGHUP: the terminal's close must not stop the system)."""
    raised: list[int] = []  # a signal, or 0 once the stop has begun (``stopping()``)

    def leave(signum: int, _frame) -> None:  # no logging: it may hold the stream's lock
        if not raised:
            raised.append(signum)
            raise SystemExit(128 + signum)

    def stopping() -> None:
        """The stop begins: the signals that follow are let go (a first one taken by
        :func:`wait_for_signal`, or a Ctrl-C, left this handler armed for the stop)."""
        raised.append(0)

    defaults = [sig for sig in (signal.SIGTERM, signal.SIGHUP)
                if signal.getsignal(sig) == signal.SIG_DFL]
    previous = {sig: signal.signal(sig, leave) for sig in defaults}
    try:
        yield stopping
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def forget_broker_state(settings: Settings) -> list[str]:
    """What the data dir holds of an earlier run's topics, dropped once an embedded broker has
    started: it keeps nothing, so every topic starts anew. Faust's local table state (the
    users' histories) would be ahead of its empty changelog, and Faust stops the worker on
    that; the model checkpoint's positions in the training and events topics would skip the
    new topics' first messages (they are voided, :func:`mark_topics_renewed`). The model
    itself (items, popularity, index) is kept. Returns what was dropped, in words.

    Only in a data dir that an embedded run made (:data:`EMBEDDED_MARK`): one that holds the
    state of another broker's worker is refused, not voided (``STREAMREC_BROKER`` was left
    unset by mistake); and only while no worker, nor its learner process, holds it."""
    data = settings.data_dir
    tables, model = data / "faust", data / "checkpoints" / "model.npz"
    has_tables = tables.is_dir() and any(tables.iterdir())
    if (has_tables or model.exists()) and not (data / EMBEDDED_MARK).exists():
        raise RuntimeError(f"{data} holds the state of a worker of another broker (or of a "
                           "streamrec from before embedded runs were marked), which an embedded "
                           "broker, empty at every start, would void: set STREAMREC_BROKER to "
                           "that broker, or STREAMREC_DATA_DIR to another folder; or create "
                           f"{data / EMBEDDED_MARK} if an embedded run made it (its model is "
                           "kept), or remove the folder (`make clean`) to start afresh")
    if tables.is_symlink():
        raise RuntimeError(f"{tables} is a link: an embedded run would remove what it points "
                           "to; remove that yourself")
    # a learner process that outlived its killed worker may still write its checkpoint
    with lock_data_dir(data), lock_data_dir(data, LEARNER_LOCK, wait_s=LEARNER_LOCK_WAIT_S):
        (data / EMBEDDED_MARK).touch()
        dropped = []
        if has_tables:
            shutil.rmtree(tables)
            dropped.append("users' histories")
        if model.exists() or any(model.parent.glob("popularity.npz*")):  # its journal too
            mark_topics_renewed(model.parent)
            dropped.append("the model's places in the topics")
    for what in dropped:
        log.info("dropped %s of an earlier run: the embedded broker starts empty", what)
    return dropped


def dead_child(system: System) -> tuple[str, Child] | None:
    """The worker or the embedded broker (by name) when it is no longer running, else None."""
    for name, child in (("worker", system.worker), ("broker", getattr(system, "broker", None))):
        if child is not None and not child.alive():
            return name, child
    return None


def wait_for_signal(system: System) -> int:
    """Block until SIGINT/SIGTERM or until the worker or the embedded broker dies. Returns 0
    after a signal, and after a death the status to exit with: the process's own (the
    worker's 76: its learner process died; 75: it did not stop in time; 128 + N, as a shell
    says it, when signal N killed it), or 1 where it exited 0 unasked, so that a service
    manager or a script sees a system that stopped by itself as failed. The broker counts as
    the worker does: it keeps every topic in memory, and a worker whose broker is gone only
    retries it."""
    # a list, not a threading.Event: the handler runs on the main thread between two of its
    # steps, and Event.set takes a lock that the main thread may hold there (in Event.wait):
    # under CPU contention a Ctrl-C then hung `streamrec up` for good (seen, and reproduced
    # with a script: the handler waits in Event.set, its thread in Condition.wait)
    received: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, _: received.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not received:
            dead = dead_child(system)
            if dead is not None:
                name, child = dead
                status = child.process.poll()
                log.error("the %s exited (status %s):\n%s", name, status,
                          tail(system.logs / f"{name}.log"))
                return 128 - status if status < 0 else status or 1  # by signal N: 128+N
            time.sleep(0.1)
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def scrape_samples(settings: Settings) -> list:
    """Every sample (name, labels, value) on the worker's /metrics page."""
    url = f"http://{settings.metrics_host}:{settings.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as page:
        text = page.read().decode()
    return [sample for family in text_string_to_metric_families(text)
            for sample in family.samples]


def scrape(settings: Settings) -> dict[str, float]:
    """Sum of each metric's samples on the worker's /metrics page (by sample name)."""
    totals: dict[str, float] = {}
    for sample in scrape_samples(settings):
        totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def wait_ingested(settings: Settings, count: int, timeout_s: float = 300.0,
                  progress=None) -> float:
    """Wait until the worker has taken ``count`` events in (any outcome); returns the count.
    Gives up when no event was taken in for ``timeout_s``: a fixed bound from the start gave
    up on a large log the worker was still taking in."""
    deadline = time.monotonic() + timeout_s
    taken = 0.0
    while time.monotonic() < deadline:
        now = scrape(settings).get("streamrec_events_total", 0.0)
        if progress is not None:
            progress.n = int(min(now, count))
            progress.refresh()
        if now >= count:
            return now
        if now > taken:
            taken, deadline = now, time.monotonic() + timeout_s
        time.sleep(0.25)
    raise TimeoutError(f"the worker took {taken:.0f} of {count} events, and none in the last "
                       f"{timeout_s:.0f} s")


def wait_learned(settings: Settings, timeout_s: float = 120.0) -> float:
    """Wait until the worker has learned as many examples as it accepted events (each makes
    one; at most ``timeout_s``, then a warning); returns the count learned. The events are
    taken in before they are learned: answered at once, a busy machine's first answers came
    from popularity alone."""
    deadline = time.monotonic() + timeout_s
    while True:
        samples = scrape_samples(settings)
        learned = sum(sample.value for sample in samples
                      if sample.name == "streamrec_learned_events_total")
        accepted = sum(sample.value for sample in samples
                       if sample.name == "streamrec_events_total"
                       and sample.labels.get("outcome") == "accepted")
        if learned >= accepted:
            return learned
        if time.monotonic() >= deadline:
            log.warning("the worker learned %d of %d events in %.0f s; answering as it is",
                        learned, accepted, timeout_s)
            return learned
        time.sleep(0.1)


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
