"""The streaming model measured through Kafka: ``streamrec eval --through-kafka``.

The in-process ``streaming`` model runs the engine's learning steps directly. This one runs the
real thing: a broker (embedded unless ``STREAMREC_BROKER`` is set) and a worker process; the
training events are produced to the events topic as wire-format JSON, keyed by user, and every
ranking is a request on the requests topic answered by the worker. The two rows of one run can
then be compared: the only intended differences are how the worker partitions and batches the
learning, and Kafka itself.

Each run is a deployment of its own (app id, topic names and data dir carry a fresh tag), so it
never reads or disturbs anything else on the broker.

With ``workers`` above 1 (``--kafka-workers``) the deployment is several workers of one app
sharing the item model (``STREAMREC_SHARE_ITEMS``): each takes in and answers its share of the
partitions and learns the items of its training partitions. Learning is done when the workers
together learned every event; before the first ranking after it, the harness also waits until
all hold the same items and the counts no longer change (the last rows published and
installed everywhere), once, outside the learning time: the harness learns in chunks, and a
wait of three publish intervals after each would measure the wait.

Before the first ranking after learning, the harness also waits until every worker answers
from an index version built after the model's last change (``wait_index_rebuilt``), and the
record names that version (``index_version``): a version swapped in whenever the worker's
rebuild timer came round would make the score depend on the run's timing.

Requests are anonymous (``user_id`` null) and carry the row's history items, oldest first when
the harness passes their times, so the worker encodes exactly the history the in-process model
reads. A request carries at most ``max_request_history`` items, the newest; when a history is
longer (a few MovieLens users), the older items go in the request's ``exclude``, so the worker
leaves them out itself and still answers k. What even ``exclude`` cannot hold (as many items
again, and the request's bytes) is asked for on top of k, at most 1,000 answers, and dropped
here; the rows still short of k are counted in the record (``short_rows``).
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from pydantic_core import to_json

from stream_app.client import RecClient, replay
from stream_app.processes import Child, free_port, worker_argv
from stream_app.settings import Settings
from stream_app.supervisor import System, scrape, settings_env
from stream_app.wire import RecRequest, RecResponse

from .data import Dataset, Events
from .streaming import newest_in_time_order

log = logging.getLogger(__name__)

#: most answers a request may ask for (``RecRequest.k``)
MOST_ANSWERS = 1000


def isolated_settings(settings: Settings, data_dir: Path) -> Settings:
    """A private deployment on the configured (or a fresh embedded) broker."""
    tag = uuid.uuid4().hex[:8]
    changes: dict[str, object] = {
        "app_id": f"{settings.app_id}-eval-{tag}", "data_dir": data_dir,
        "metrics_host": "127.0.0.1", "metrics_port": free_port(),
        **{name: f"{getattr(settings, name)}-eval-{tag}"
           for name in ("topic_events", "topic_dead_letters", "topic_requests",
                        "topic_responses")},
    }
    if settings.embedded:
        changes["embedded_port"] = free_port(settings.embedded_host)
    return settings.replace(**changes)


def kind_of_weight(kind_weights: dict[str, float]) -> dict[float, str]:
    """The event kind to send for each confidence weight (datasets carry weights, the wire
    carries kinds; kinds of equal weight are interchangeable for the model)."""
    return {weight: kind for kind, weight in kind_weights.items()}


@dataclass(frozen=True)
class ModelChange:
    """When the workers' model last changed, as the harness saw it, in wall-clock seconds (the
    clock of the workers' gauges): after ``after``, when a scrape began that did not show the
    change yet, and by ``before``, when a scrape that showed it ended."""

    after: float
    before: float


@dataclass(frozen=True)
class IndexReading:
    """A worker's serving index as one scrape of its ``streamrec_index_*`` gauges shows it."""

    version: int  # 0: none (exact search)
    began: float  # when its build began: the scrape's time less the index's age and build time
    build_s: float
    failures: int

    @classmethod
    def of(cls, gauges: dict[str, float], at: float) -> IndexReading:
        build_s = gauges.get("streamrec_index_build_seconds", 0.0)
        return cls(int(gauges.get("streamrec_index_version", 0.0)),
                   at - gauges.get("streamrec_index_age_seconds", 0.0) - build_s, build_s,
                   int(gauges.get("streamrec_index_failures", 0.0)))


def answers_exactly(settings: Settings, gauges: dict[str, float]) -> bool:
    """Whether a worker whose learning is over answers by exact search for good: it holds
    fewer items than an index is built for (``index_min_items``). Not known from a scrape
    that did not answer (no gauges)."""
    return bool(gauges) and gauges.get("streamrec_model_items", 0.0) < settings.index_min_items


def rebuild_window(settings: Settings, build_s: float, slack_s: float) -> float:
    """Seconds from the start of a build within which a worker whose model changed after
    that build's snapshot swaps in a newer version: the rebuild interval (or the rest after a
    build as long, ``index_build_share``), the next check, the build itself, and ``slack_s``
    for a longer build or a busy machine."""
    return (max(settings.index_interval_s, build_s / settings.index_build_share)
            + settings.index_check_s + build_s + slack_s)


def holds_change(reading: IndexReading, earlier: IndexReading | None, change: ModelChange,
                 window_s: float, now: float) -> bool:
    """Whether the version ``reading`` shows was built from a snapshot of the model after
    ``change``: its build began once the change was seen; or it began while the change was
    being seen (after ``change.after``) and no rebuild followed within ``window_s``, as one
    would have had its snapshot missed the change (its items count as changed then). Judged
    only on a version the scrape before (``earlier``) showed too: a scrape reads the gauges
    one by one, and a swap between two of them mixes two versions."""
    if reading.version == 0 or earlier is None or earlier.version != reading.version:
        return False
    if reading.began > change.before:
        return True
    return reading.began > change.after and now - reading.began > window_s


def wait_index_rebuilt(read: Callable[[], list[dict[str, float]]], settings: Settings,
                       change: ModelChange, slack_s: float, *,
                       clock: Callable[[], float] = time.time,
                       sleep: Callable[[float], None] = time.sleep,
                       poll_s: float = 0.1) -> list[int]:
    """Until every worker answers from an index that holds the model as it was after
    ``change`` (:func:`holds_change`); returns their versions, 0 for a worker that answers by
    exact search (:func:`answers_exactly`). ``read`` scrapes every worker's gauges.

    A worker whose serving version was built before the change has items changed since its
    snapshot, which makes a rebuild due; one that swaps in none within
    :func:`rebuild_window` of the change raises :class:`TimeoutError`."""
    def window(reading: IndexReading) -> float:
        return rebuild_window(settings, reading.build_s, slack_s)

    earlier: list[IndexReading | None] = []
    while True:
        gauges = read()
        now = clock()
        readings = [IndexReading.of(worker, now) for worker in gauges]
        earlier = earlier or [None] * len(readings)
        waiting = [n for n, reading in enumerate(readings)
                   if not answers_exactly(settings, gauges[n])
                   and not holds_change(reading, earlier[n], change, window(reading), now)]
        if not waiting:
            return [0 if answers_exactly(settings, worker) else reading.version
                    for worker, reading in zip(gauges, readings)]
        for n in waiting:
            _check_rebuilt_in_time(n, readings[n], change, window(readings[n]), now)
        earlier = readings
        sleep(poll_s)


def _check_rebuilt_in_time(worker: int, reading: IndexReading, change: ModelChange,
                           window_s: float, now: float) -> None:
    if now - change.before <= window_s:
        return
    serving = (f"version {reading.version}, whose build began "
               f"{change.before - reading.began:.1f} s before learning was seen to end"
               if reading.version else "no index version yet")
    raise TimeoutError(f"worker {worker + 1} swapped in no index built after learning ended "
                       f"within {window_s:.0f} s: it serves {serving} (index builds failed: "
                       f"{reading.failures}; see streamrec_index_* in its metrics)")


class KafkaStreaming:
    """Implements the harness's streaming-model contract against a running worker.

    ``learn`` produces the events and returns once the worker has learned all of them, so the
    harness's training time is the end-to-end time through the broker and the worker. The
    waits after it (items shared, index rebuilt) come with the first ranking, outside it.
    """

    name = "streaming-kafka"
    reads_times = True

    def __init__(self, dataset: Dataset, settings: Settings, *, timeout_s: float = 60.0,
                 workers: int = 1) -> None:
        self.user_ids = dataset.user_ids.astype(str)
        self.item_ids = dataset.item_ids.astype(str)
        self.item_index = {item: index for index, item in enumerate(self.item_ids.tolist())}
        self.timeout_s = timeout_s
        self._learned = np.zeros(len(self.item_ids), dtype=bool)  # items the events named
        self._change: ModelChange | None = None  # the model's last change, once it learned
        self._settled = True  # nothing learned since the last wait before ranking
        self.index_versions: list[int] = []  # each worker's, as the first ranking began
        self.answered_from: set[int] = set()  # index versions the answers came from
        self.short_rows = 0  # answers short of k while the worker had learned more items
        self._data_dir = tempfile.TemporaryDirectory(prefix="streamrec-eval-")
        self.settings = isolated_settings(
            settings.replace(share_items=True) if workers > 1 else settings,
            Path(self._data_dir.name))
        self._kinds = kind_of_weight(self.settings.kind_weights)
        self.system = System(self.settings)
        # the workers' settings: the system's first, then one data dir and metrics port each
        self.workers = [self.settings] + [
            self.settings.replace(data_dir=self.settings.data_dir / f"worker-{n}",
                                  metrics_port=free_port())
            for n in range(2, workers + 1)]
        self._others: list[Child] = []
        self._kept_logs: Path | None = None
        try:
            self.system.start()
            self._start_others()
            self._client = RecClient(self.settings)
        except BaseException:
            self.close()
            raise
        self.produced = 0

    def _start_others(self, timeout_s: float = 120.0) -> None:
        """The workers after the system's first, until every worker reads its share of the
        request partitions (the group has rebalanced over all of them)."""
        for n, settings in enumerate(self.workers[1:], start=2):
            self._others.append(Child(f"worker-{n}", worker_argv(), env=settings_env(settings),
                                      log_path=self.system.logs / f"worker-{n}.log").start())
        if not self._others:
            return
        deadline = time.monotonic() + timeout_s
        while True:
            self._check_alive()
            held = [self._metric(settings, "streamrec_request_partitions")
                    for settings in self.workers]
            if min(held) >= 1 and sum(held) == self.settings.partitions:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the workers did not split the partitions in {timeout_s:.0f}"
                                   f" s (request partitions held: {held})")
            time.sleep(0.2)

    @staticmethod
    def _scraped(settings: Settings) -> dict[str, float]:
        """A worker's metrics; none while its metrics endpoint is not up yet."""
        try:
            return scrape(settings)
        except OSError:
            return {}

    @classmethod
    def _metric(cls, settings: Settings, name: str) -> float:
        """A worker's metric; 0 while its metrics endpoint is not up yet."""
        return cls._scraped(settings).get(name, 0.0)

    def _check_alive(self) -> None:
        for child in [self.system.worker, *self._others]:
            if not child.alive():
                raise RuntimeError(f"the worker exited; see {self.system.logs / 'worker.log'}"
                                   + ("" if child is self.system.worker else
                                      f" and {self.system.logs / (child.name + '.log')}"))

    @contextmanager
    def _logs_kept_on_failure(self):
        """A failed step keeps the broker's and the worker's logs past :meth:`close` (which
        otherwise deletes the run's data dir with them) and names the folder on the error."""
        try:
            yield
        except Exception as error:
            if self._kept_logs is None:
                self._kept_logs = Path(tempfile.mkdtemp(prefix="streamrec-eval-logs-"))
                error.add_note(f"the broker's and the worker's logs are kept in "
                               f"{self._kept_logs} (copied there when the run stops)")
            raise

    # -- learning -------------------------------------------------------------------------
    def learn(self, events: Events) -> None:
        with self._logs_kept_on_failure():
            sending = time.time()
            self.produced += replay(self.settings, (
                {"v": 1, "user_id": self.user_ids[user], "item_id": self.item_ids[item],
                 "kind": self._kinds[weight], "ts": ts}
                for user, item, weight, ts in zip(events.users.tolist(), events.items.tolist(),
                                                  events.weights.tolist(), events.ts.tolist())))
            self._learned[events.items] = True
            self._change = self._wait_learned(self.produced, sending)
            self._settled = False

    def _total(self, name: str) -> float:
        return sum(self._metric(settings, name) for settings in self.workers)

    def _wait_learned(self, count: int, sending: float) -> ModelChange:
        """Until the workers' ``streamrec_learned_events_total`` sum to ``count``; a stalled
        worker (no progress for ``timeout_s``) is an error, not a hang. Returns when the last
        example was learned, as the scrapes bound it (after ``sending``, when its events were
        sent). A worker counts an example as its rows move, on the loop that also takes the
        index's snapshots: a snapshot taken after the count holds the rows."""
        last, last_change = -1.0, time.monotonic()
        after = sending
        while True:
            self._check_alive()
            scraping = time.time()
            learned = self._total("streamrec_learned_events_total")
            if learned >= count:
                return ModelChange(after, time.time())
            after = scraping
            if learned != last:
                last, last_change = learned, time.monotonic()
            elif time.monotonic() - last_change > self.timeout_s:
                raise TimeoutError(f"the worker learned {learned:.0f} of {count} events and "
                                   f"made no progress for {self.timeout_s:.0f} s")
            time.sleep(0.05)

    def _wait_shared(self) -> None:
        """Until every worker holds the same items and no count of the sharing has moved for
        three publish intervals (the last rows published and installed everywhere, the last
        offset steps added by their owners and published in turn). Rows installed move the
        model too: its last change is then between the scrapes that saw the counts last move."""
        names = ("streamrec_model_items", "streamrec_item_rows_published",
                 "streamrec_item_rows_installed", "streamrec_item_steps_sent",
                 "streamrec_item_steps_added")
        settle_s = 3 * self.settings.share_items_s
        last: list[list[float]] = []
        since = time.monotonic()
        deadline = since + self.timeout_s
        scraped = self._change.after  # when the scrape before began
        while True:
            self._check_alive()
            scraping = time.time()
            counts = [[self._metric(settings, name) for settings in self.workers]
                      for name in names]
            held = counts[0]
            if counts != last:  # the rows moved since the scrape before, or may have
                self._change = ModelChange(scraped if last else self._change.after, time.time())
                last, since = counts, time.monotonic()
            elif len(set(held)) == 1 and time.monotonic() - since >= settle_s:
                return
            scraped = scraping
            if time.monotonic() > deadline:
                raise TimeoutError(f"the workers' items did not settle in {self.timeout_s:.0f} s"
                                   f" (items held: {held})")
            time.sleep(0.1)

    def chosen_params(self) -> dict:
        """The serving pair the worker answered with, read from its metrics as an operator
        reads them (``streamrec_serving_*``): the in-process row reports its own pick, and
        the two rows can differ by the pick alone. Also how many examples it was chosen on,
        how often it moved and the lead of the best other pair, in standard errors, and what
        the answers came from (:meth:`_answers_made`)."""
        metrics = scrape(self.settings)

        def gauge(key: str) -> float:
            return metrics[f"streamrec_serving_{key}"]

        half_life, lead = gauge("half_life_events"), gauge("lead")
        chosen = {"serve_half_life_events": None if math.isinf(half_life) else half_life,
                  "serve_bias_weight": gauge("bias_weight"),
                  "serving_samples": int(gauge("samples")), "serving_moves": int(gauge("moves")),
                  "serving_lead": lead if math.isfinite(lead) else None,
                  **self._answers_made()}
        if self._others:  # each worker picks its own pair; the above are the first one's
            chosen["workers"] = len(self.workers)
            chosen["index_version_per_worker"] = self.index_versions
            chosen["items_per_worker"] = [
                int(self._metric(settings, "streamrec_model_items")) for settings in self.workers]
            chosen["learned_per_worker"] = [
                int(self._metric(settings, "streamrec_learned_events_total"))
                for settings in self.workers]
        return chosen

    def _answers_made(self) -> dict:
        """What the answers came from: the index version the worker served as the first
        ranking began (0: exact search; the first worker's, when several), the versions the
        answers name, and the rows of both folds that came back short of k though the worker
        had learned more items they could name (counted as misses)."""
        return {"index_version": self.index_versions[0] if self.index_versions else None,
                "answered_from_index_versions": sorted(self.answered_from),
                "short_rows": self.short_rows}

    # -- ranking --------------------------------------------------------------------------
    def recommend(self, history: sp.csr_matrix, k: int, exclude: sp.csr_matrix | None = None,
                  times: sp.csr_matrix | None = None) -> np.ndarray:
        """Top-``k`` item indices per history row from the worker's answers, ``-1`` padded."""
        with self._logs_kept_on_failure():
            if not self._settled:
                self._settle()
            return self._recommend(history, k, exclude, times)

    def _settle(self) -> None:
        """Before the first ranking after learning: the item rows shared (several workers),
        then every worker answering from an index of the final model."""
        if self._others:
            self._wait_shared()
        self.index_versions = self._wait_index()
        self._settled = True

    def _wait_index(self) -> list[int]:
        """Every worker's index version once it holds the model after its last change
        (:func:`wait_index_rebuilt`); none to wait for when the index is disabled (every
        answer is an exact search)."""
        if not self.settings.index_enabled:
            return [0] * len(self.workers)
        return wait_index_rebuilt(self._gauges, self.settings, self._change, self.timeout_s)

    def _gauges(self) -> list[dict[str, float]]:
        self._check_alive()
        return [self._scraped(settings) for settings in self.workers]

    def _recommend(self, history: sp.csr_matrix, k: int, exclude: sp.csr_matrix | None,
                   times: sp.csr_matrix | None) -> np.ndarray:
        exclude = history if exclude is None else exclude
        requests = [self._request(history, exclude, times, row, k)
                    for row in range(history.shape[0])]
        answers = self._client.ask_many(requests, timeout_s=self.timeout_s)
        ranked = np.full((history.shape[0], k), -1, dtype=np.int64)
        short = 0
        for row, request in enumerate(requests):
            response = answers[request.request_id]
            if response.error:
                raise RuntimeError(f"the worker answered an evaluation request with an error: "
                                   f"{response.error}")
            if response.index_version is not None:
                self.answered_from.add(response.index_version)
            excluded = exclude.indices[exclude.indptr[row]:exclude.indptr[row + 1]]
            picked = self._picked(response, set(excluded.tolist()), k)
            ranked[row, :len(picked)] = picked
            short += len(picked) < k and len(picked) < self._answerable(excluded)
        self._note_short(short, len(requests), k)
        return ranked

    def _request(self, history: sp.csr_matrix, exclude: sp.csr_matrix,
                 times: sp.csr_matrix | None, row: int, k: int) -> RecRequest:
        """A row's request: the newest ``max_request_history`` history items, oldest first,
        and in ``exclude`` the rest of what the answer must leave out, the older history items
        newest first, as many as fit (:meth:`_exclude_room`). What does not fit is asked for
        on top of k, at most :data:`MOST_ANSWERS`, and dropped from the answer here."""
        span = slice(history.indptr[row], history.indptr[row + 1])
        length = span.stop - span.start
        order, _ = newest_in_time_order(history, times, row, length)
        items = history.indices[span][order]
        older = max(length - self.settings.max_request_history, 0)
        hidden = self._hidden(items[:older][::-1], items,
                              exclude.indices[exclude.indptr[row]:exclude.indptr[row + 1]])
        request = RecRequest(request_id=f"{row}-{uuid.uuid4().hex[:12]}",
                             history=self.item_ids[items[older:]].tolist(), k=k,
                             exclude_seen=True)
        held = self._exclude_room(request, hidden)
        return request.model_copy(update={"exclude": hidden[:held] or None,
                                          "k": min(k + len(hidden) - held, MOST_ANSWERS)})

    def _hidden(self, older: np.ndarray, history: np.ndarray,
                excluded: np.ndarray) -> list[str]:
        """The ids the answer must leave out that the request's history does not carry: the
        ``older`` history items (in their order) the row excludes, then its exclusions from
        outside the history."""
        kept = older[np.isin(older, excluded)]
        return self.item_ids[np.concatenate([kept, np.setdiff1d(excluded, history)])].tolist()

    def _exclude_room(self, request: RecRequest, hidden: list[str]) -> int:
        """How many of ``hidden`` the request's ``exclude`` holds: at most
        ``max_request_history`` items (as many as its history), within
        ``max_request_bytes`` as the client sends it (with a reply topic, and k at its widest),
        or the worker answers with an error."""
        if not hidden:
            return 0
        widest = request.model_copy(update={"exclude": [], "k": MOST_ANSWERS,
                                            "reply_to": self._client.reply_to})
        room = self.settings.max_request_bytes - len(widest.to_bytes())
        # each id after the first comes after a comma
        ends = np.cumsum([len(to_json(item)) + 1 for item in hidden]) - 1
        fits = int(np.searchsorted(ends, room, side="right"))
        return min(fits, self.settings.max_request_history)

    def _picked(self, response: RecResponse, excluded: set[int], k: int) -> list[int]:
        """The answer's first ``k`` catalogue indices, none of ``excluded``."""
        return [index for index in (self.item_index.get(item.item_id, -1)
                                    for item in response.items)
                if index >= 0 and index not in excluded][:k]

    def _answerable(self, excluded: np.ndarray) -> int:
        """How many items learned from the events an answer not naming ``excluded`` may name."""
        return int(np.count_nonzero(self._learned)) - int(np.count_nonzero(self._learned[excluded]))

    def _note_short(self, short: int, rows: int, k: int) -> None:
        if not short:
            return
        self.short_rows += short
        log.warning("%d of %d answers held fewer than %d items though the worker learned "
                    "more that they could name; they count as misses (short_rows in the record)",
                    short, rows, k)

    # -- lifecycle ------------------------------------------------------------------------
    def close(self) -> None:
        if hasattr(self, "_client"):
            self._client.close()
        for child in getattr(self, "_others", ()):  # before the broker goes
            child.stop(self.settings.shutdown_timeout_s + 10.0)
        self.system.stop()
        if self._kept_logs is not None and self.system.logs.exists():
            shutil.copytree(self.system.logs, self._kept_logs, dirs_exist_ok=True)
            log.error("the broker's and the worker's logs are in %s", self._kept_logs)
        self._data_dir.cleanup()
