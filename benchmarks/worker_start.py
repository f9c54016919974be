"""How long a worker takes from its start to its first event, and what its event loop holds then.

A worker that dies is restarted (``docker-compose.yml``, ``streamrec up``); until it has
started, its users' events wait and their requests go unanswered. Each round fills a fresh
events topic with a few synthetic events, starts a worker (its own consumer group and data
dir, so nothing is recovered: the start itself is measured), and scrapes its metrics until it
has taken an event in. Reported per round: the seconds to that first event, the event loop's
resident memory then, and the CPU seconds the event loop and its learner process had spent.
Most of the wall time is the consumer group's join, which the embedded broker makes wait
(``../shared/notes``: joins wait about half the session timeout).

    python benchmarks/worker_start.py --quick      # two rounds
    python benchmarks/worker_start.py --rounds 5
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from pathlib import Path

from stream_app.kafka import ensure_topics
from stream_app.processes import EmbeddedBroker, free_port, worker_argv
from stream_app.settings import Settings
from stream_app.supervisor import scrape
from stream_roundtrip import cpu_seconds, fill, start  # this folder's script


def resident_mb(pid: int) -> int:
    """A process's resident set (Linux /proc), in MB."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) // 1024


def first_event(settings: Settings, workdir: Path, name: str, timeout_s: float = 120.0) -> dict:
    """Start a worker and wait for its first event taken in; then stop it."""
    started = time.perf_counter()
    worker = start(name, settings, worker_argv(), workdir)
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                taken = scrape(settings).get("streamrec_events_total", 0.0)
            except OSError:  # the metrics endpoint is not up yet
                taken = 0.0
            if taken > 0:
                break
            time.sleep(0.05)
        else:
            raise TimeoutError(f"no event taken in within {timeout_s:.0f} s")
        seconds = time.perf_counter() - started
        loop_cpu, learner_cpu = cpu_seconds(worker.pid)
        return {"first_event_s": round(seconds, 2), "loop_rss_mb": resident_mb(worker.pid),
                "loop_cpu_s": round(loop_cpu, 2), "learner_cpu_s": round(learner_cpu, 2)}
    finally:
        worker.stop()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two rounds")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    rounds = 2 if args.quick else args.rounds
    workdir = Path(f"/tmp/streamrec-start-{uuid.uuid4().hex[:6]}")
    results = []
    with EmbeddedBroker("127.0.0.1", free_port(), log_path=workdir / "broker.log") as broker:
        for round_ in range(rounds):
            tag = uuid.uuid4().hex[:6]
            settings = Settings(broker=broker.bootstrap, embedded_compat=True,
                                data_dir=workdir / tag, topic_events=f"start-{tag}",
                                app_id=f"start-{tag}", metrics_port=free_port(),
                                session_timeout_s=6.0, log_level="warning")
            ensure_topics(settings)
            fill(settings, 2000)
            results.append(first_event(settings, workdir, f"worker-{round_}"))
            print(json.dumps(results[-1]), flush=True)
    return {"rounds": results}


if __name__ == "__main__":
    main()
