"""What the ingest agent's work costs per event, without Kafka: the part of a worker's event
loop that is streamrec's own (the rest is Faust's consumer and producer).

Per batch of ``--batch`` events, as ``stream_app/app.py`` runs it: decode and validate each
event, read the batch's users' stored histories (JSON bytes, as the rocksdb table holds them),
``Engine.ingest_many`` (histories, popularity, user vectors, training examples), write the
histories back as JSON bytes, and encode the training messages (the worker's own
``training_messages``: one per item partition, compressed as sent). Each stage's median over the timed batches, in µs per event. The engine's
catalogue is filled first (``--items`` rows), as a worker's replica of its learner is; events
are drawn as ``benchmarks/stream_roundtrip.py`` draws them (Zipf items, uniform users), and the
first batches are a warm-up that fills the users' histories.

    python benchmarks/ingest_step.py --quick
    python benchmarks/ingest_step.py --events 200000
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np
import orjson

from state.history import History
from stream_app.app import training_messages
from stream_app.engine import Engine
from stream_app.settings import Settings
from stream_app.wire import decode_event
from stream_roundtrip import synthetic_events  # this folder's script

STAGES = ("decode", "read", "ingest", "write", "train")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--items", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=256, help="events per ingest batch")
    parser.add_argument("--quick", action="store_true", help="20,000 events")
    return parser.parse_args()


def ingest_batch(engine: Engine, settings: Settings, raw: list[bytes], first_offset: int,
                 stored: dict[str, bytes], seconds: dict[str, float]) -> None:
    """One batch through every stage, its events at offsets from ``first_offset`` of one
    partition; each stage's seconds added to ``seconds``."""
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[stage] += now - clock
        clock = now

    events = [decode_event(value, kinds=settings.event_kinds,
                           max_bytes=settings.max_event_bytes) for value in raw]
    lap("decode")
    users = {event.user_id for event in events}
    histories = {user: History.from_json(orjson.loads(stored[user]))
                 for user in users if user in stored}
    lap("read")
    updated, examples, _ = engine.ingest_many(
        events, histories, [(0, first_offset + n) for n in range(len(events))])
    lap("ingest")
    for user, history in updated.items():
        stored[user] = orjson.dumps(history.to_json())
    lap("write")
    list(training_messages([example for example in examples if example is not None],
                           settings.partitions, settings.train_compression_level, engine.users))
    lap("train")


def measure(args: argparse.Namespace) -> dict:
    rng = np.random.default_rng(0)
    raw = [value for _, value in synthetic_events(args.events, users=max(1000, args.events // 20),
                                                  items=args.items)]
    batches = [raw[start:start + args.batch] for start in range(0, len(raw), args.batch)]
    warmup = len(batches) // 2
    with tempfile.TemporaryDirectory() as data_dir:
        settings = Settings(data_dir=data_dir, index_enabled=False, dr_enabled=False)
        engine = Engine(settings)
        engine.learner.assign([f"i{k}" for k in range(args.items)],
                              rng.normal(0.0, 0.1, (args.items, settings.model_dim + 1)))
        stored: dict[str, bytes] = {}
        per_batch: dict[str, list[float]] = {stage: [] for stage in STAGES}
        for number, batch in enumerate(batches):
            seconds = dict.fromkeys(STAGES, 0.0)
            ingest_batch(engine, settings, batch, number * args.batch, stored, seconds)
            if number >= warmup and len(batch) == args.batch:
                for stage in STAGES:
                    per_batch[stage].append(seconds[stage] / len(batch))
    us = {stage: round(1e6 * float(np.median(values)), 1) for stage, values in per_batch.items()}
    return {"events": args.events, "batch": args.batch, "users": len(stored),
            "timed_batches": len(per_batch["decode"]), "us_per_event": us,
            "total_us_per_event": round(sum(us.values()), 1)}


def main() -> None:
    args = parse_args()
    if args.quick:
        args.events = 20_000
    print(json.dumps(measure(args), indent=2))


if __name__ == "__main__":
    main()
