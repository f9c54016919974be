"""A real Prometheus scrapes a real streamrec metrics endpoint and answers the dashboard's
queries.

Unit tests of prometheus_client cannot show that the exposition parses, that label names are
what the PromQL expects, or that ``histogram_quantile`` over our buckets yields a number: only
the server can. The Prometheus config is prometheus/prometheus.yml (the one compose mounts)
with the targets pointed at the test endpoint, so Prometheus also proves it loads that file.
Needs the ``prometheus`` binary (Debian: ``apt-get install -y prometheus``); without it the test
fails rather than skips, because a skipped check here looks exactly like a passing one in CI.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from grafana import dashboards
from stream_app.engine import Engine
from stream_app.item_sharing import ItemSharing
from stream_app.metrics import Metrics
from stream_app.processes import free_port
from stream_app.checkpoint_acks import AcksAfterCheckpoint
from stream_app.confirmed_acks import AcksAfterDelivery
from stream_app.settings import Settings
from stream_app.worker import build_metrics

ROOT = Path(__file__).resolve().parents[1]
INSTALL = "apt-get install -y prometheus"
DEADLINE_S = 30.0  # the whole warm-up; Prometheus starts in ~1 s and scrapes every second
LATENCY_S = 0.003  # inside the (0.0025, 0.005] bucket of LATENCY_BUCKETS
EVENTS = {("view", "accepted"): 5, ("click", "accepted"): 2, ("invalid", "dead_letter"): 1}

pytestmark = pytest.mark.timeout(60)


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` not found on PATH; this test needs a real Prometheus: {INSTALL}")
    return path


def query(base_url: str, expr: str) -> list[dict]:
    """The instant-query result vector (raises on an HTTP or PromQL error)."""
    url = f"{base_url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    with urllib.request.urlopen(url, timeout=5) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return body["data"]["result"]


def values(result: list[dict]) -> list[float]:
    return [float(series["value"][1]) for series in result]


# -- fixtures -----------------------------------------------------------------------------------
@dataclass
class Scraped:
    url: str
    metrics: Metrics
    log: Path

    def traffic(self) -> None:
        """One answered request and one ingest batch: keeps rate() over the histograms'
        buckets above zero."""
        self.metrics.requests.labels("ok").inc()
        self.metrics.request_latency.observe(LATENCY_S)
        self.metrics.request_wait.observe(LATENCY_S)  # its time in Kafka
        self.metrics.stage_latency.labels("ann").observe(LATENCY_S / 10)
        self.metrics.candidates.labels("ann").inc(10)
        self.metrics.dr_retrieved.observe(120)  # a dr request's items
        self.metrics.ingest_batch.observe(64)  # events of one ingest batch

    def log_tail(self) -> str:
        return self.log.read_text()[-3000:] if self.log.exists() else "(no log)"


def record_fixed_counts(metrics: Metrics) -> None:
    """Counts the queries check exactly: nothing else touches these series."""
    for (kind, outcome), count in EVENTS.items():
        metrics.events.labels(kind, outcome).inc(count)
    metrics.dead_letters.labels("schema").inc()
    metrics.resends.labels("train", "retried").inc()


@pytest.fixture(scope="module")
def endpoint():
    """A worker's metrics bundle with known scrape-time gauges, served on 127.0.0.1."""
    engine = Engine(Settings())
    engine.users, engine.learner.steps = 3, 2  # model_version counts learning steps
    for item in ("a", "b"):
        engine.popularity.add(item, 0.0, 1.0)
    metrics = build_metrics(engine)
    sharing = ItemSharing(engine.settings, engine, frozenset, print)
    sharing.export(metrics)  # the gauges a worker adds with STREAMREC_SHARE_ITEMS
    sharing.published, sharing.installed, sharing.steps_sent, sharing.steps_added = 4, 3, 2, 1
    sharing.handed_over_rows = 5
    AcksAfterCheckpoint(None).export(metrics)  # the training topic's batch intake adds it
    AcksAfterDelivery(print).export(metrics)  # the events' batch intake adds it
    record_fixed_counts(metrics)
    port = free_port()
    server, thread = metrics.serve("127.0.0.1", port)
    try:
        yield metrics, port
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def scrape_config(target: str) -> dict:
    """prometheus/prometheus.yml with 1 s scrapes of ``target`` instead of the workers."""
    config = yaml.safe_load((ROOT / "prometheus" / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s", scrape_timeout="1s")
    (job,) = config["scrape_configs"]
    del job["dns_sd_configs"]  # the names resolve in the compose network only
    job["static_configs"] = [{"targets": [target]}]
    return config


def start_prometheus(tmp: Path, target: str) -> tuple[subprocess.Popen, str, Path]:
    config, log = tmp / "prometheus.yml", tmp / "prometheus.log"
    config.write_text(yaml.safe_dump(scrape_config(target)))
    address = f"127.0.0.1:{free_port()}"
    with open(log, "wb") as sink:
        process = subprocess.Popen(
            [binary("prometheus"), f"--config.file={config}",
             f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address={address}"],
            stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return process, f"http://{address}", log


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def warmed_up(scraped: Scraped) -> bool:
    """True once the fixed counts are scraped and two scrapes saw latency traffic."""
    try:
        total = values(query(scraped.url, "sum(streamrec_events_total)"))
        p50 = values(query(scraped.url, "histogram_quantile(0.5, "
                                        "rate(streamrec_request_latency_seconds_bucket[10s]))"))
    except OSError:  # not listening yet
        return False
    return total == [sum(EVENTS.values())] and len(p50) == 1 and math.isfinite(p50[0])


@pytest.fixture(scope="module")
def scraped(endpoint, tmp_path_factory):
    """A running Prometheus that has scraped the endpoint enough for rate() queries."""
    metrics, port = endpoint
    process, url, log = start_prometheus(tmp_path_factory.mktemp("prometheus"),
                                         f"127.0.0.1:{port}")
    scraped = Scraped(url, metrics, log)
    try:
        deadline = time.monotonic() + DEADLINE_S
        while not warmed_up(scraped):
            assert process.poll() is None, f"prometheus exited:\n{scraped.log_tail()}"
            assert time.monotonic() < deadline, f"no data in {DEADLINE_S} s:\n{scraped.log_tail()}"
            scraped.traffic()
            time.sleep(0.25)
        yield scraped
    finally:
        stop(process)


# -- tests ------------------------------------------------------------------------------------
def test_compose_prometheus_config_is_valid():
    """promtool checks the file compose mounts exactly as it is (the scrape test rewrites
    its targets)."""
    config = ROOT / "prometheus" / "prometheus.yml"
    result = subprocess.run([binary("promtool"), "check", "config", str(config)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


def test_counters_arrive_with_their_labels(scraped):
    result = query(scraped.url, "sum by (kind, outcome) (streamrec_events_total)")
    got = {(s["metric"]["kind"], s["metric"]["outcome"]): float(s["value"][1]) for s in result}
    assert got == {key: float(count) for key, count in EVENTS.items()}
    assert values(query(scraped.url, 'streamrec_dead_letters_total{reason="schema"}')) == [1.0]


def test_latency_quantile_lands_in_the_observed_bucket(scraped):
    """Every observation is 3 ms, so p50 interpolates inside (2.5 ms, 5 ms]."""
    scraped.traffic()
    (p50,) = values(query(scraped.url, "histogram_quantile(0.5, sum by (le) "
                                       "(rate(streamrec_request_latency_seconds_bucket[1m])))"))
    assert 0.0025 < p50 <= 0.005


def test_scrape_time_gauges_read_the_engine(scraped):
    got = {name: values(query(scraped.url, name))
           for name in ("streamrec_users", "streamrec_items", "streamrec_model_version")}
    assert got == {"streamrec_users": [3.0], "streamrec_items": [2.0],
                   "streamrec_model_version": [2.0]}


@pytest.mark.parametrize("expr", sorted({e for build in dashboards.DASHBOARDS.values()
                                         for e in dashboards.expressions(build())}))
def test_every_dashboard_query_returns_numbers(scraped, expr):
    """A panel whose query is invalid, matches no series or yields NaN shows nothing useful."""
    result = query(scraped.url, expr)
    assert result, f"no series for {expr}"
    assert all(math.isfinite(v) for v in values(result)), (expr, result)


def test_a_slow_answer_lands_in_a_bucket_of_its_own_size_not_the_last():
    """An answer may take up to 10 s and a request wait longer through a rebalance: the
    dashboard's p99 reads the buckets, and one past the last finite bucket reads as it."""
    metrics = Metrics()
    metrics.request_latency.observe(7.0)
    metrics.request_wait.observe(20.0)
    sample = metrics.registry.get_sample_value
    assert sample("streamrec_request_latency_seconds_bucket", {"le": "5.0"}) == 0.0
    assert sample("streamrec_request_latency_seconds_bucket", {"le": "10.0"}) == 1.0
    assert sample("streamrec_request_wait_seconds_bucket", {"le": "30.0"}) == 1.0
