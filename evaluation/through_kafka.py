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

Requests are anonymous (``user_id`` null) and carry the row's history items, oldest first when
the harness passes their times, so the worker encodes exactly the history the in-process model
reads. A request carries at most ``max_request_history`` items, the newest; when a history is
longer (a few MovieLens users), the rest is still excluded from the answer, on the client side.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from stream_app.client import RecClient, replay
from stream_app.processes import Child, free_port, worker_argv
from stream_app.settings import Settings
from stream_app.supervisor import System, scrape, settings_env
from stream_app.wire import RecRequest

from .data import Dataset, Events
from .streaming import newest_in_time_order

log = logging.getLogger(__name__)


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


class KafkaStreaming:
    """Implements the harness's streaming-model contract against a running worker.

    ``learn`` produces the events and returns once the worker has learned all of them, so the
    harness's training time is the end-to-end time through the broker and the worker.
    """

    name = "streaming-kafka"
    reads_times = True

    def __init__(self, dataset: Dataset, settings: Settings, *, timeout_s: float = 60.0,
                 workers: int = 1) -> None:
        self.user_ids = dataset.user_ids.astype(str)
        self.item_ids = dataset.item_ids.astype(str)
        self.item_index = {item: index for index, item in enumerate(self.item_ids.tolist())}
        self.timeout_s = timeout_s
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
        self._shared = True  # no rows still on their way to another worker

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
    def _metric(settings: Settings, name: str) -> float:
        """A worker's metric; 0 while its metrics endpoint is not up yet."""
        try:
            return scrape(settings).get(name, 0.0)
        except OSError:
            return 0.0

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
            self.produced += replay(self.settings, (
                {"v": 1, "user_id": self.user_ids[user], "item_id": self.item_ids[item],
                 "kind": self._kinds[weight], "ts": ts}
                for user, item, weight, ts in zip(events.users.tolist(), events.items.tolist(),
                                                  events.weights.tolist(), events.ts.tolist())))
            self._wait_learned(self.produced)
            self._shared = not self._others

    def _total(self, name: str) -> float:
        return sum(self._metric(settings, name) for settings in self.workers)

    def _wait_learned(self, count: int) -> None:
        """Until the workers' ``streamrec_learned_events_total`` sum to ``count``; a stalled
        worker (no progress for ``timeout_s``) is an error, not a hang."""
        last, last_change = -1.0, time.monotonic()
        while True:
            self._check_alive()
            learned = self._total("streamrec_learned_events_total")
            if learned >= count:
                return
            if learned != last:
                last, last_change = learned, time.monotonic()
            elif time.monotonic() - last_change > self.timeout_s:
                raise TimeoutError(f"the worker learned {learned:.0f} of {count} events and "
                                   f"made no progress for {self.timeout_s:.0f} s")
            time.sleep(0.05)

    def _wait_shared(self) -> None:
        """Until every worker holds the same items and no count of the sharing has moved for
        three publish intervals (the last rows published and installed everywhere, the last
        offset steps added by their owners and published in turn)."""
        names = ("streamrec_model_items", "streamrec_item_rows_published",
                 "streamrec_item_rows_installed", "streamrec_item_steps_sent",
                 "streamrec_item_steps_added")
        settle_s = 3 * self.settings.share_items_s
        last: list[list[float]] = []
        since = time.monotonic()
        deadline = since + self.timeout_s
        while True:
            self._check_alive()
            counts = [[self._metric(settings, name) for settings in self.workers]
                      for name in names]
            held = counts[0]
            if counts != last:
                last, since = counts, time.monotonic()
            elif len(set(held)) == 1 and time.monotonic() - since >= settle_s:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the workers' items did not settle in {self.timeout_s:.0f} s"
                                   f" (items held: {held})")
            time.sleep(0.1)

    def chosen_params(self) -> dict:
        """The serving pair the worker answered with, read from its metrics as an operator
        reads them (``streamrec_serving_*``): the in-process row reports its own pick, and
        the two rows can differ by the pick alone. Also how many examples it was chosen on,
        how often it moved and the lead of the best other pair, in standard errors."""
        metrics = scrape(self.settings)

        def gauge(key: str) -> float:
            return metrics[f"streamrec_serving_{key}"]

        half_life, lead = gauge("half_life_events"), gauge("lead")
        chosen = {"serve_half_life_events": None if math.isinf(half_life) else half_life,
                  "serve_bias_weight": gauge("bias_weight"),
                  "serving_samples": int(gauge("samples")), "serving_moves": int(gauge("moves")),
                  "serving_lead": lead if math.isfinite(lead) else None}
        if self._others:  # each worker picks its own pair; the above are the first one's
            chosen["workers"] = len(self.workers)
            chosen["items_per_worker"] = [
                int(self._metric(settings, "streamrec_model_items")) for settings in self.workers]
            chosen["learned_per_worker"] = [
                int(self._metric(settings, "streamrec_learned_events_total"))
                for settings in self.workers]
        return chosen

    # -- ranking --------------------------------------------------------------------------
    def recommend(self, history: sp.csr_matrix, k: int, exclude: sp.csr_matrix | None = None,
                  times: sp.csr_matrix | None = None) -> np.ndarray:
        """Top-``k`` item indices per history row from the worker's answers, ``-1`` padded."""
        with self._logs_kept_on_failure():
            if not self._shared:
                self._wait_shared()
                self._shared = True
            return self._recommend(history, k, exclude, times)

    def _recommend(self, history: sp.csr_matrix, k: int, exclude: sp.csr_matrix | None,
                   times: sp.csr_matrix | None) -> np.ndarray:
        exclude = history if exclude is None else exclude
        limit = self.settings.max_request_history
        requests = []
        for row in range(history.shape[0]):
            newest, _ = newest_in_time_order(history, times, row, limit)
            items = self.item_ids[history.indices[history.indptr[row]:][newest]]
            hidden = int(exclude.indptr[row + 1] - exclude.indptr[row]) - len(items)
            requests.append(RecRequest(request_id=f"{row}-{uuid.uuid4().hex[:12]}",
                                       history=items.tolist(),
                                       k=min(k + max(hidden, 0), 1000), exclude_seen=True))
        answers = self._client.ask_many(requests, timeout_s=self.timeout_s)
        ranked = np.full((history.shape[0], k), -1, dtype=np.int64)
        for row, request in enumerate(requests):
            response = answers[request.request_id]
            if response.error:
                raise RuntimeError(f"the worker answered an evaluation request with an error: "
                                   f"{response.error}")
            excluded = set(exclude.indices[exclude.indptr[row]:exclude.indptr[row + 1]].tolist())
            picked = [index for index in (self.item_index.get(item.item_id, -1)
                                          for item in response.items)
                      if index >= 0 and index not in excluded][:k]
            ranked[row, :len(picked)] = picked
        return ranked

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
