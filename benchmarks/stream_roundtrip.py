"""Throughput and latency of a real worker on a real (embedded) broker, in one run.

1. Fill the events topic with N synthetic events (Zipf items, uniform users).
2. A bare Faust agent that only counts consumes them: its events/s is the yardstick. Then the
   same agent with the worker's direct delivery (``stream_app/delivery.py``): the ratio with
   Faust's per-message tasks removed from both sides; and a task that counts the batches of
   the worker's batch intake (``stream_app/batch_intake.py``): the floor of a worker's cost.
3. A streamrec worker consumes the same topic (own consumer group): events/s taken in and
   events/s learned (the training examples applied to the model), each with its ratio. With
   ``--in-loop-too``, first a worker that learns on its event loop
   (``STREAMREC_LEARNER_PROCESS=false``), for the same ratios in the same run. Each also
   reports the CPU microseconds per event of the process and of its children (the learner).
4. Requests through Kafka: sequential round trips, then C concurrent clients: p50/p99.
5. The same clients while a trickle of events keeps the index rebuilding (every 2 s): the
   worst latency near a swap against the p99 away from swaps (requests go on until three swaps
   were seen, at most 30 s).
6. The same clients while the worker takes in a backlog of N new events (``during_backlog``).

    python benchmarks/stream_roundtrip.py --quick          # about a minute
    python benchmarks/stream_roundtrip.py --quick --rounds 3   # bare agent and worker
                                                           # alternating: the median ratio
    python benchmarks/stream_roundtrip.py --events 200000 --requests 2000 --clients 8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np

from stream_app.client import RecClient, producer
from stream_app.kafka import ensure_topics
from stream_app.processes import Child, EmbeddedBroker, free_port, worker_argv
from stream_app.settings import Settings
from stream_app.supervisor import scrape, settings_env


def synthetic_events(n: int, users: int, items: int, seed: int = 0, id_prefix: str = "e"):
    rng = np.random.default_rng(seed)
    user_ids = rng.integers(0, users, n)
    item_ids = np.minimum(rng.zipf(1.2, n), items) - 1
    kinds = rng.choice(["view", "click", "sale"], n, p=[0.8, 0.15, 0.05])
    for i in range(n):
        yield (f"u{user_ids[i]}", json.dumps(
            {"v": 1, "event_id": f"{id_prefix}{i}", "user_id": f"u{user_ids[i]}",
             "item_id": f"i{item_ids[i]}", "kind": str(kinds[i]), "ts": 1.7e9 + i}).encode())


def fill(settings: Settings, n: int, seed: int = 0, id_prefix: str = "e") -> float:
    sink = producer(settings, linger_ms=20, batch_size=256 * 1024)
    started = time.perf_counter()
    for user, value in synthetic_events(n, users=max(1000, n // 20), items=50_000, seed=seed,
                                        id_prefix=id_prefix):
        sink.send(settings.topic_events, key=user.encode(), value=value)
    sink.flush()
    sink.close()
    return n / (time.perf_counter() - started)


#: share of the events taken in before the clock starts: a worker's first events meet cold
#: caches, a first rebalance and a first index build, which the steady rate should not carry
WARMUP = 0.05
#: seconds between scrapes: each scrape renders the whole metrics page on the measured process,
#: so polling it faster takes CPU from what is being measured (20 scrapes/s cost a worker ~10 %)
SCRAPE_EVERY_S = 0.2


def cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU seconds (user + system, all threads) of a process and of its child processes so far
    (Linux /proc; zeros elsewhere)."""
    def of(one: int) -> float:
        try:
            fields = Path(f"/proc/{one}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    return of(pid), sum(of(int(child)) for child in children)


def broker_cpu(pid: int | None) -> float:
    return cpu_seconds(pid)[0] if pid is not None else 0.0


def consume_rates(settings: Settings, child: Child, metrics: list[str], n: int,
                  cpu: dict | None = None, broker_pid: int | None = None,
                  timeline: list | None = None) -> list[float]:
    """Events/s of each metric, from the moment the *first* metric passed ``WARMUP``·n to the
    moment this metric reached n; both moments interpolated between scrapes. For the worker:
    events taken in and events learned end to end (learning lags intake, so timing it from
    its own start would flatter it). ``cpu``, when given, receives the CPU microseconds per
    event that the process and its child processes (the learner) spent over that window, and
    with ``broker_pid`` what the broker spent (it serves the worker's training messages and
    changelog besides the events). ``timeline``, when given, receives one row per scrape:
    seconds, each metric's count, and the CPU seconds of the process, its children and the
    broker (where a backlog leaves a core idle)."""
    last: dict[str, tuple[float, float]] = {}
    cpu_at: list[tuple[float, float]] = []
    crossed: dict[tuple[str, float], float] = {}
    marks = [(metrics[0], WARMUP * n)] + [(metric, float(n)) for metric in metrics]
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and len(crossed) < len(marks):
        if not child.alive():
            raise RuntimeError(f"{child.name} died; see {child.log_path}")
        try:
            counts = scrape(settings)
        except OSError:
            counts = {}
        now = time.perf_counter()
        if timeline is not None:
            timeline.append([now, *(counts.get(metric, 0.0) for metric in metrics),
                             *cpu_seconds(child.pid), broker_cpu(broker_pid)])
        if not cpu_at and counts.get(metrics[0], 0.0) >= WARMUP * n:
            cpu_at.append((*cpu_seconds(child.pid), broker_cpu(broker_pid)))
        for metric, level in marks:
            count = counts.get(metric)
            if count is None or (metric, level) in crossed or count < level:
                continue
            before_t, before = last.get(metric, (now, count))
            share = (level - before) / (count - before) if count > before else 1.0
            crossed[(metric, level)] = before_t + share * (now - before_t)
        for metric in metrics:
            if metric in counts:
                last[metric] = (now, counts[metric])
        time.sleep(SCRAPE_EVERY_S)
    missing = [mark for mark in marks if mark not in crossed]
    if missing:
        raise TimeoutError(f"{missing} not reached")
    started = crossed[(metrics[0], WARMUP * n)]
    if cpu is not None:
        (own0, kids0, broker0) = cpu_at[0]
        own1, kids1, broker1 = *cpu_seconds(child.pid), broker_cpu(broker_pid)
        per_event = 1e6 / ((1 - WARMUP) * n)
        cpu.update(process_us_per_event=per_event * (own1 - own0),
                   children_us_per_event=per_event * (kids1 - kids0))
        if broker_pid is not None:
            cpu["broker_us_per_event"] = per_event * (broker1 - broker0)
    return [(1 - WARMUP) * n / max(crossed[(metric, float(n))] - started, 1e-9)
            for metric in metrics]


def timeline_rows(timeline: list) -> list[dict]:
    """Per scrape: seconds since the first, counts taken in and learned, and the share of a
    core each process used since the scrape before."""
    rows = []
    for before, now in zip(timeline, timeline[1:]):
        span = max(now[0] - before[0], 1e-9)
        rows.append({"t": round(now[0] - timeline[0][0], 2), "taken": now[1], "learned": now[2],
                     "loop_cores": round((now[3] - before[3]) / span, 2),
                     "learner_cores": round((now[4] - before[4]) / span, 2),
                     "broker_cores": round((now[5] - before[5]) / span, 2)})
    return rows


def start(name: str, settings: Settings, argv: list[str], workdir: Path) -> Child:
    return Child(name, argv, env=settings_env(settings), log_path=workdir / f"{name}.log").start()


def percentiles(samples: list[float]) -> dict[str, float]:
    values = np.array(samples) * 1000
    return {"p50_ms": float(np.percentile(values, 50)), "p99_ms": float(np.percentile(values, 99)),
            "max_ms": float(values.max()), "n": len(values)}


def round_trips(settings: Settings, requests: int, clients: int, users: int) -> dict:
    return summarize(timed_requests(settings, requests, clients, users), clients)


def timed_requests(settings: Settings, requests: int, clients: int,
                   users: int) -> list[tuple[float, float, int]]:
    """(start, seconds, index version) of every request, from ``clients`` threads."""
    samples: list[tuple[float, float, int]] = []
    lock = threading.Lock()

    def run(count: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        with RecClient(settings) as client:
            mine = []
            for _ in range(count):
                started = time.perf_counter()
                response = client.recommend(f"u{rng.integers(users)}", k=10, timeout_s=10)
                assert response.error is None, response.error
                mine.append((started, time.perf_counter() - started,
                             response.index_version or 0))
        with lock:
            samples.extend(mine)

    threads = [threading.Thread(target=run, args=(requests // clients, s)) for s in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sorted(samples)


def summarize(samples: list[tuple[float, float, int]], clients: int) -> dict:
    elapsed = max(s + d for s, d, _ in samples) - samples[0][0]
    return {**percentiles([d for _, d, _ in samples]),
            "requests_per_s": len(samples) / elapsed, "clients": clients}


#: swaps the latency-near-swaps phase waits for (rounds of requests go on until it has seen
#: them, or for SWAP_PHASE_MAX_S): one round of requests may last less than one rebuild interval
SWAPS_WANTED = 3
SWAP_PHASE_MAX_S = 30.0


def swap_times(samples: list[tuple[float, float, int]]) -> list[float]:
    """When each new index version was first answered from."""
    swaps, seen = [], samples[0][2]
    for start, _, version in samples:
        if version > seen:
            swaps.append(start)
            seen = version
    return swaps


def during_swaps(settings: Settings, requests: int, clients: int, users: int,
                 build_s: float) -> dict:
    """Latency near index swaps against the rest. A swap is the first answer carrying a new
    index version; "near" is from one build time before it (the build runs aside in the same
    process) to 0.1 s after."""
    samples = timed_requests(settings, requests, clients, users)
    deadline = time.perf_counter() + SWAP_PHASE_MAX_S
    while len(swap_times(samples)) < SWAPS_WANTED and time.perf_counter() < deadline:
        samples += timed_requests(settings, requests, clients, users)
    swaps = swap_times(samples)
    near, far = [], []
    for start, seconds, _ in samples:
        close = any(t - build_s - 0.1 <= start <= t + 0.1 for t in swaps)
        (near if close else far).append(seconds)
    result = {"swaps_seen": len(swaps), "index_build_s": build_s,
              "outside": percentiles(far) if far else None,
              "near_swaps": percentiles(near) if near else None}
    if near and far:
        result["worst_near_swap_to_p99_outside"] = (result["near_swaps"]["max_ms"]
                                                    / result["outside"]["p99_ms"])
    return result


def trickle(settings: Settings, stop: threading.Event, rate: float = 200.0) -> None:
    """A slow stream of new events, so item vectors keep changing and rebuilds keep coming."""
    sink = producer(settings)
    events = synthetic_events(10**6, users=1000, items=50_000, seed=9, id_prefix="t")
    while not stop.is_set():
        user, value = next(events)
        sink.send(settings.topic_events, key=user.encode(), value=value)
        time.sleep(1.0 / rate)
    sink.flush()
    sink.close()


def during_backlog(settings: Settings, events: int, requests: int, clients: int,
                   users: int) -> dict:
    """Latency while the worker is behind its input: ``events`` new events are produced at once
    (faster than a worker takes them in), then the clients' requests run. The worker's ingest
    lag is read as the requests start and end: above zero at the end, every request met the
    backlog. From the worker's histograms over the phase: the mean wait of a request (from its
    timestamp to the worker taking it) and the mean time to answer it once taken."""
    fill(settings, events, seed=7, id_prefix="k")
    before = scrape(settings)
    result = round_trips(settings, requests, clients, users)
    after = scrape(settings)
    return {**result, "lag_at_start": before.get("streamrec_ingest_lag_events", 0.0),
            "lag_at_end": after.get("streamrec_ingest_lag_events", 0.0),
            "worker_wait_mean_ms": mean_ms(before, after, "streamrec_request_wait_seconds"),
            "worker_answer_mean_ms": mean_ms(before, after, "streamrec_request_latency_seconds")}


def mean_ms(before: dict, after: dict, histogram: str) -> float | None:
    """Mean of a worker histogram's observations between two scrapes, in ms."""
    count = after.get(f"{histogram}_count", 0.0) - before.get(f"{histogram}_count", 0.0)
    total = after.get(f"{histogram}_sum", 0.0) - before.get(f"{histogram}_sum", 0.0)
    return 1000.0 * total / count if count else None


def bare_rate(base: Settings, name: str, flags: list[str], round_: int, tag: str,
              workdir: Path, events: int, cpu: dict, broker_pid: int) -> float:
    """Events/s of the bare agent (``bare_agent.py``) in a consumer group of its own."""
    bare = base.replace(app_id=f"{name}-{tag}-{round_}", data_dir=workdir / f"{name}-{round_}")
    agent = start(name, bare, [sys.executable, str(Path(__file__).with_name("bare_agent.py")),
                               *flags], workdir)
    try:
        [rate] = consume_rates(bare, agent, ["bare_events_total"], events, cpu, broker_pid)
    finally:
        agent.stop()
    return rate


def worker_rates(settings: Settings, name: str, workdir: Path, events: int, broker_pid: int,
                 cpu: dict | None = None) -> tuple[float, float]:
    """Events/s taken in and learned by a worker started for this and stopped after."""
    worker = start(name, settings, worker_argv(), workdir)
    try:
        taken, learned = consume_rates(settings, worker, [
            "streamrec_events_total", "streamrec_learned_events_total"], events, cpu,
            broker_pid)
    finally:
        worker.stop()
    return taken, learned


def round_summary(bare: float, taken: float, learned: float) -> dict:
    return {"bare_agent_events_per_s": bare, "worker_events_per_s": taken,
            "worker_learned_events_per_s": learned, "worker_to_bare_ratio": taken / bare,
            "learned_to_bare_ratio": learned / bare}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes for CI")
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--in-loop-too", action="store_true",
                        help="also measure a worker that learns on its event loop")
    parser.add_argument("--rounds", type=int, default=1,
                        help="bare agent then worker this many times, alternating, each on "
                        "the whole topic; the ratio of each round and their median (the "
                        "bare agent's own speed drifts within the hour)")
    parser.add_argument("--timeline", action="store_true",
                        help="add the worker's counts and CPU at each scrape to the results")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.events, args.requests = 20_000, 200
    workdir = Path(f"/tmp/streamrec-bench-{uuid.uuid4().hex[:6]}")
    results: dict = {"events": args.events}
    with EmbeddedBroker("127.0.0.1", free_port(), log_path=workdir / "broker.log") as broker:
        tag = uuid.uuid4().hex[:6]
        # Rebuilds every 2 s (when items changed), so the request phases see swaps; while a
        # backlog is taken in, a due build waits (STREAMREC_INDEX_BACKLOG_EVENTS).
        base = Settings(broker=broker.bootstrap, embedded_compat=True, data_dir=workdir,
                        topic_events=f"bench-events-{tag}", metrics_port=free_port(),
                        session_timeout_s=6.0, log_level="warning", index_interval_s=2.0)
        ensure_topics(base)
        results["produce_events_per_s"] = fill(base, args.events)
        bare_rates = []
        for round_ in range(args.rounds):
            cpu: dict = {}
            rate = bare_rate(base, "bare_agent", [], round_, tag, workdir, args.events, cpu,
                             broker.process.pid)
            bare_rates.append(rate)
            if round_ == 0:
                results["bare_agent_events_per_s"], results["bare_agent_cpu"] = rate, cpu
                results["bare_direct_agent_cpu"] = {}
                results["bare_direct_agent_events_per_s"] = bare_rate(
                    base, "bare_direct_agent", ["--direct-delivery"], round_, tag, workdir,
                    args.events, results["bare_direct_agent_cpu"], broker.process.pid)
                results["bare_batch_agent_cpu"] = {}
                results["bare_batch_agent_events_per_s"] = bare_rate(
                    base, "bare_batch_agent", ["--batch-intake"], round_, tag, workdir,
                    args.events, results["bare_batch_agent_cpu"], broker.process.pid)
            if args.in_loop_too and round_ == 0:  # STREAMREC_LEARNER_PROCESS=false
                in_loop = base.replace(app_id=f"in-loop-{tag}", data_dir=workdir / "in-loop",
                                       learner_process=False)
                in_loop_cpu: dict = {}
                taken, learned = worker_rates(in_loop, "in-loop-worker", workdir, args.events,
                                              broker.process.pid, in_loop_cpu)
                results["in_loop"] = {**round_summary(rate, taken, learned), "cpu": in_loop_cpu}
            if round_ < args.rounds - 1:  # the last round's worker also answers requests
                worker_cpu: dict = {}
                results.setdefault("rounds", []).append({**round_summary(rate, *worker_rates(
                    base.replace(app_id=f"worker-{tag}-{round_}",
                                 data_dir=workdir / f"worker-{round_}"),
                    "worker", workdir, args.events, broker.process.pid, worker_cpu)),
                    "bare_agent_cpu": cpu, "worker_cpu": worker_cpu})
        served = base.replace(app_id=f"worker-{tag}", data_dir=workdir / "worker")
        worker = start("worker", served, worker_argv(), workdir)
        try:
            results["worker_cpu"], timeline = {}, [] if args.timeline else None
            results["worker_events_per_s"], results["worker_learned_events_per_s"] = \
                consume_rates(served, worker, ["streamrec_events_total",
                                               "streamrec_learned_events_total"], args.events,
                              results["worker_cpu"], broker.process.pid, timeline)
            if args.timeline:
                results["worker_timeline"] = timeline_rows(timeline)
            results["worker_to_bare_ratio"] = results["worker_events_per_s"] / bare_rates[-1]
            results["learned_to_bare_ratio"] = (results["worker_learned_events_per_s"]
                                                / bare_rates[-1])
            results["worker_to_bare_direct_ratio"] = (results["worker_events_per_s"]
                                                      / results["bare_direct_agent_events_per_s"])
            if args.rounds > 1:
                results.setdefault("rounds", []).append({**round_summary(
                    bare_rates[-1], results["worker_events_per_s"],
                    results["worker_learned_events_per_s"]),
                    "bare_agent_cpu": cpu, "worker_cpu": results["worker_cpu"]})
                results["learned_to_bare_ratio_median"] = float(np.median(
                    [r["learned_to_bare_ratio"] for r in results["rounds"]]))
            users = max(1000, args.events // 20)
            results["sequential"] = round_trips(served, args.requests // 4, 1, users)
            results["concurrent"] = round_trips(served, args.requests, args.clients, users)
            stop = threading.Event()
            feeder = threading.Thread(target=trickle, args=(served, stop))
            feeder.start()
            try:
                build_s = scrape(served).get("streamrec_index_build_seconds", 0.0)
                results["during_swaps"] = during_swaps(served, args.requests * 2, args.clients,
                                                       users, build_s)
                results["during_swaps"]["index_updates"] = scrape(served).get(
                    "streamrec_index_updates", 0.0)  # versions updated in place, not built
            finally:
                stop.set()
                feeder.join()
            results["during_backlog"] = during_backlog(served, args.events, args.requests,
                                                       args.clients, users)
        finally:
            worker.stop()
    print(json.dumps(results, indent=2))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
