"""Shared fixtures. Broker tests start a real Tansu broker on a free 127.0.0.1 port; every test
gets its own app id, topic names and data dir, so tests never see each other's messages."""

from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path

import pytest

from stream_app.processes import Child, EmbeddedBroker, free_port, worker_argv
from stream_app.settings import Settings
from stream_app.supervisor import scrape, settings_env, tail as file_tail

#: lines of each worker's log shown with a failed test's report
FAILED_LOG_LINES = 60


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test's report shows the end of the logs of the workers it started (they still
    run then): a CI run keeps nothing else of a worker's side of a failure."""
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        for path in getattr(item, "worker_logs", []):
            report.sections.append((f"end of {path.name}", log_tail(path)))


def log_tail(path: Path, lines: int = FAILED_LOG_LINES) -> str:
    return "\n".join(line[:300] for line in file_tail(path, lines).splitlines())


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The sample datasets (STREAMREC_DATASETS_DIR, default ../shared/data from the checkout)."""
    configured = Settings().datasets_dir
    root = configured if configured.is_absolute() else Path(__file__).parents[1] / configured
    if not root.exists():
        pytest.fail(f"the sample datasets are expected at {root} (STREAMREC_DATASETS_DIR)")
    return root.resolve()


@pytest.fixture(scope="session")
def broker(tmp_path_factory):
    log_path = tmp_path_factory.mktemp("broker") / "broker.log"
    with EmbeddedBroker("127.0.0.1", free_port(), log_path=log_path) as running:
        yield running


@pytest.fixture
def settings(broker, tmp_path) -> Settings:
    """Settings of one isolated streamrec deployment on the shared test broker."""
    tag = uuid.uuid4().hex[:8]
    return Settings(
        broker=broker.bootstrap, embedded_compat=True, app_id=f"streamrec-{tag}",
        data_dir=tmp_path / "data", topic_events=f"events-{tag}", topic_dead_letters=f"dlq-{tag}",
        topic_requests=f"requests-{tag}", topic_responses=f"responses-{tag}", topic_train=f"train-{tag}", partitions=2,
        session_timeout_s=6.0, metrics_port=free_port(), checkpoint_interval_s=1.0,
        popularity_refresh_s=0.0,
    )


class WorkerProcess:
    """One ``streamrec worker`` subprocess, started and waited for like `streamrec up` does."""

    def __init__(self, settings: Settings, argv: list[str] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.settings = settings
        self.log_path = settings.data_dir / "logs" / f"worker-{uuid.uuid4().hex[:6]}.log"
        self.child = Child("worker", argv or worker_argv(),
                           env={**settings_env(settings), **(env or {})},
                           log_path=self.log_path)

    def start(self, timeout_s: float = 60.0) -> WorkerProcess:
        from stream_app.supervisor import System

        self.child.start()
        system = System(self.settings)
        system.worker = self.child
        system.logs = self.log_path.parent
        system.wait_ready(timeout_s)  # a failure shows the log's end (pytest_runtest_makereport)
        return self

    def stop(self) -> int | None:
        return self.child.stop(30.0)

    def metrics(self) -> dict[str, float]:
        return scrape(self.settings)

    def wait_metric(self, name: str, at_least: float, timeout_s: float = 30.0) -> float:
        deadline = time.monotonic() + timeout_s
        value = 0.0
        while time.monotonic() < deadline:
            value = self.metrics().get(name, 0.0)
            if value >= at_least:
                return value
            time.sleep(0.1)
        raise AssertionError(f"{name} = {value} < {at_least} after {timeout_s} s")


@pytest.fixture
def start_worker(request):
    """Start workers, stopped after the test; their logs go with a failed test's report."""
    workers: list[WorkerProcess] = []
    request.node.worker_logs = []

    def start(settings: Settings, argv: list[str] | None = None,
              env: dict[str, str] | None = None) -> WorkerProcess:
        worker = WorkerProcess(settings, argv, env)
        workers.append(worker)
        request.node.worker_logs.append(worker.log_path)
        return worker.start()

    yield start
    for worker in workers:
        worker.stop()


def event(user: str, item: str, kind: str = "view", ts: float = 1_700_000_000.0,
          event_id: str | None = None) -> bytes:
    body = {"v": 1, "user_id": user, "item_id": item, "kind": kind, "ts": ts}
    if event_id:
        body["event_id"] = event_id
    return json.dumps(body).encode()


def answer(settings: Settings, *request_ids: str) -> None:
    """Empty answers to ``request_ids`` on the response topic, as a worker would send them."""
    from stream_app.client import producer
    from stream_app.wire import RecResponse

    sink = producer(settings)
    try:
        for request_id in request_ids:
            sink.send(settings.topic_responses, key=request_id.encode(),
                      value=RecResponse(request_id=request_id).to_bytes())
        sink.flush()
    finally:
        sink.close()


def readme_table_names(name: str, suffix: str) -> set[str]:
    """The names the README's table rows document: every name in backticks (regex ``name``,
    labels in braces allowed) of a row that starts with one, and every ``suffix`` in
    backticks beside it, read as the row's first name with some tail replaced by it
    (`STREAMREC_DR_BEAM` / `_TOP_S` names STREAMREC_DR_TOP_S)."""
    documented: set[str] = set()
    for line in (Path(__file__).parents[1] / "README.md").read_text().splitlines():
        names = re.findall(rf"`({name})(?:\{{[^}}]*\}})?`", line)
        if not re.match(rf"\| `{name}", line) or not names:
            continue
        words = names[0].split("_")
        documented |= set(names)
        for tail in re.findall(rf"`({suffix})`", line):
            documented |= {"_".join(words[:i]) + tail for i in range(1, len(words) + 1)}
    return documented
