"""The expiry sweep of user histories (``STREAMREC_HISTORY_TTL_S``): how long a sweep of N
stored histories takes on a real rocksdb store, and the longest the event loop waits for one
chunk of it (the sweep gives the loop a turn after each chunk of 256); docs/throughput.md,
"History expiry".

    python benchmarks/history_sweep.py             # 1,000,000 histories of 50 events
    python benchmarks/history_sweep.py --quick     # 50,000
    python benchmarks/history_sweep.py --turn-every 1024   # histories read between turns
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import faust  # noqa: E402
from faust.types import TP  # noqa: E402

from state.history import History, inactive_before  # noqa: E402
from stream_app.changelog import BatchedTable  # noqa: E402

PARTITIONS = 4
EXPIRED_SHARE = 0.1


class Partition:
    """What the table's writes read of an event: its partition."""

    def __init__(self, partition: int) -> None:
        self.message = type("Message", (), {"partition": partition})()


def fill(table: BatchedTable, users: int, events: int, rng: random.Random) -> None:
    """``users`` histories of ``events`` events, a tenth of them last active long ago."""
    chunk, partitions = [], [Partition(p) for p in range(PARTITIONS)]
    for user in range(users):
        start = 1.0e9 if rng.random() < EXPIRED_SHARE else 1.7e9
        history = History(items=tuple(f"item-{rng.randrange(100_000)}" for _ in range(events)),
                          kinds=("view",) * events,
                          ts=tuple(start + n for n in range(events)),
                          event_ids=tuple(f"e{user}-{n}" for n in range(events)),
                          phi_b64="A" * 344, at=(user % PARTITIONS, events))  # 64 floats
        chunk.append((f"user-{user}", history.to_json(), partitions[user % PARTITIONS]))
        if len(chunk) == 10_000:
            table.set_many(chunk)
            table._pending.clear()
            chunk = []
    table.set_many(chunk)
    table._pending.clear()


async def sweep(table: BatchedTable, turn_every: int | None) -> dict:
    waits, turn = [], [time.perf_counter()]

    async def between() -> bool:
        now = time.perf_counter()
        waits.append(now - turn[0])
        table._pending.clear()  # no producer here: the tombstones' sends are not measured
        turn[0] = time.perf_counter()
        return True

    before = {p: functools.partial(inactive_before, before=1.5e9)
              for p in range(PARTITIONS)}
    started = time.perf_counter()
    chunk = {} if turn_every is None else {"turn_every": turn_every}
    deleted = await table.delete_where(before, between, **chunk)
    return {"seconds": time.perf_counter() - started, "deleted": deleted,
            "longest_turn_ms": 1000 * max(waits), "chunks": len(waits)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="50,000 histories")
    parser.add_argument("--events", type=int, default=50, help="events a history holds")
    parser.add_argument("--turn-every", type=int, default=None,
                        help="histories a chunk reads (default: the sweep's own)")
    args = parser.parse_args()
    users = 50_000 if args.quick else 1_000_000
    with tempfile.TemporaryDirectory() as folder:
        app = faust.App("sweep-benchmark", store="rocksdb://", datadir=folder,
                        autodiscover=False)
        faust_table = app.Table("histories", partitions=PARTITIONS,
                                schema=faust.Schema(key_serializer="raw",
                                                    value_serializer="json"))
        table = BatchedTable(faust_table)
        topic = faust_table.changelog_topic.get_topic_name()
        app.assignor.assigned_actives = lambda: {TP(topic, p) for p in range(PARTITIONS)}
        started = time.perf_counter()
        fill(table, users, args.events, random.Random(0))
        print(f"{users:,} histories of {args.events} events stored in "
              f"{time.perf_counter() - started:.1f} s")
        result = asyncio.run(sweep(table, args.turn_every))
        print(json.dumps({"histories": users, **result,
                          "us_per_history": 1e6 * result["seconds"] / users}, indent=1))


if __name__ == "__main__":
    main()
