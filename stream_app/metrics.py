"""Prometheus metrics as an injected bundle on its own registry (no global registry state).

Values that are only known at scrape time (users, items) come from callbacks read by a custom
collector, so the hot path never updates a gauge it does not have to.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger(__name__)

#: up to 30 s: an answer may take up to 10 s, and a request may wait longer in Kafka through a
#: rebalance or a restart; a p99 past the last bucket reads as that bucket on the dashboard
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0, 30.0)
STAGE_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1)


class _ScrapeTimeGauges:
    """Collects gauges whose values are computed by callbacks when Prometheus scrapes."""

    def __init__(self) -> None:
        self.sources: dict[str, tuple[str, Callable[[], float]]] = {}

    def describe(self):
        return [GaugeMetricFamily(name, doc) for name, (doc, _) in self.sources.items()]

    def collect(self):
        for name, (doc, read) in self.sources.items():
            yield GaugeMetricFamily(name, doc, value=float(read()))


class Metrics:
    """Every metric a streamrec worker exports. Names follow Prometheus conventions."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.events = Counter("streamrec_events_total", "Timeline events by kind and outcome.",
                              ["kind", "outcome"], registry=r)
        self.dead_letters = Counter("streamrec_dead_letters_total",
                                    "Events sent to the dead-letter topic, by reason.",
                                    ["reason"], registry=r)
        self.resends = Counter("streamrec_record_resends_total",
                               "Records an event batch wrote (changelog, train, dead_letter, "
                               "reroute) whose delivery failed: sent again (retried), or not "
                               "(given_up: their partition moved to another worker).",
                               ["record", "outcome"], registry=r)
        self.withdrawals_skipped = Counter(
            "streamrec_withdrawals_skipped_total",
            "Records of the withdrawn-items topic that are not a withdrawal (logged, skipped).",
            registry=r)
        self.expired_histories = Counter(
            "streamrec_expired_histories_total",
            "User histories deleted for having no event for STREAMREC_HISTORY_TTL_S.",
            registry=r)
        self.damaged_histories = Counter(
            "streamrec_damaged_histories_total",
            "Stored histories that did not read as one (a damaged changelog record), by where "
            "they were read (ingest, answer): the user started again from an empty history.",
            ["read_by"], registry=r)
        for read_by in ("ingest", "answer"):  # exported at 0: a dashboard reads a rate of them
            self.damaged_histories.labels(read_by)
        self.requests = Counter("streamrec_requests_total", "Recommendation requests by status.",
                                ["status"], registry=r)
        self.request_latency = Histogram("streamrec_request_latency_seconds",
                                         "Time from taking a request to sending its response.",
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.request_wait = Histogram("streamrec_request_wait_seconds",
                                      "Time from a request's timestamp (its producer's clock, or "
                                      "the broker's) to taking it: time in Kafka and in reaching "
                                      "the worker.", buckets=LATENCY_BUCKETS, registry=r)
        self.ingest_batch = Histogram("streamrec_ingest_batch_events",
                                      "Events the ingest agent took in one batch: full batches "
                                      "(STREAMREC_INGEST_BATCH) in a backlog, fewer when the "
                                      "batch wait ran out first.",
                                      buckets=(1, 4, 16, 64, 128, 256, 512, 1024, 4096),
                                      registry=r)
        self.checkpoints = Counter("streamrec_checkpoints_total",
                                   "Model checkpoints written, by kind: base (the item model "
                                   "whole) or delta (its rows changed since the last).",
                                   ["kind"], registry=r)
        for kind in ("base", "delta"):  # exported at 0: a dashboard reads their increase
            self.checkpoints.labels(kind)
        self.learned = Counter("streamrec_learned_events_total",
                               "Training examples applied to the item model.", registry=r)
        self.learn_seconds = Histogram("streamrec_learn_step_seconds",
                                       "Time of one micro-batch learning step.",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.batch_loss = Gauge("streamrec_learn_batch_loss",
                                "Loss of the last micro-batch before its step.", registry=r)
        self.stage_latency = Histogram("streamrec_stage_seconds",
                                       "Time of one stage of answering a request.", ["stage"],
                                       buckets=STAGE_BUCKETS, registry=r)
        self.candidates = Counter("streamrec_candidates_total",
                                  "Candidates retrieved, by source (before the rerank).",
                                  ["source"], registry=r)
        self.dr_retrieved = Histogram("streamrec_dr_retrieved_items",
                                      "Items on the paths one Deep Retrieval beam found.",
                                      buckets=(1, 10, 30, 100, 300, 1000, 3000, 10000),
                                      registry=r)
        self._gauges = _ScrapeTimeGauges()
        r.register(self._gauges)

    def history_damaged(self, read_by: str, user_id: str | None) -> Callable[[Exception], None]:
        """What reports a damaged stored history of ``user_id`` read by ``read_by``
        (``History.from_stored``): the count, and a line with the user and the reason."""
        def report(error: Exception) -> None:
            self.damaged_histories.labels(read_by).inc()
            log.warning("the stored history of user %r does not read (%s); the user starts "
                        "again from an empty history", user_id, error)
        return report

    def gauge(self, name: str, doc: str, read: Callable[[], float]) -> None:
        """Export ``name`` whose value is ``read()`` at scrape time."""
        self._gauges.sources[name] = (doc, read)

    def serve(self, host: str, port: int):
        """Serve /metrics over HTTP; returns the server so it can be shut down."""
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        return server, thread
