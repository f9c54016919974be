"""What the popularity's journal costs the ingest: ``DecayedPopularity.add_unheld`` of batches
of events, with the journal (every counted batch appended beside the saved counts, so that a
killed worker loses no count) and without, alternating in one process; and the bytes it
writes an event, which stay on the disk until the next save removes them. docs/throughput.md,
"Popularity counted by its place".

    python benchmarks/popularity_journal.py            # 400 batches of 256, three rounds
    python benchmarks/popularity_journal.py --quick    # 50 batches, two rounds
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from state.popularity import DecayedPopularity, journal_files  # noqa: E402

PARTITIONS = 4


def count(batches: list[list[str]], journal: bool) -> tuple[float, float]:
    """Microseconds an event of counting ``batches``, and journal bytes an event."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "popularity.npz"
        popularity = DecayedPopularity(7 * 86_400.0, refresh_s=0, events_topic="events")
        if journal:
            popularity.keep_journal(path)
        events = sum(len(batch) for batch in batches)
        started = time.perf_counter()
        for number, batch in enumerate(batches):
            first = number * len(batch)
            popularity.add_unheld(batch, [1.7e9 + number] * len(batch), [1.0] * len(batch),
                                  [(number % PARTITIONS, first + n) for n in range(len(batch))])
        seconds = time.perf_counter() - started
        if popularity.journal is not None:
            popularity.journal.close()
        written = sum(file.stat().st_size for _, file in journal_files(path))
        return seconds / events * 1e6, written / events


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=400)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="50 batches, two rounds")
    args = parser.parse_args()
    if args.quick:
        args.batches, args.rounds = 50, 2
    rng = np.random.default_rng(0)
    batches = [[f"sku-{n}" for n in rng.integers(0, args.items, args.batch)]
               for _ in range(args.batches)]
    rounds = []
    for _ in range(args.rounds):
        without, _ = count(batches, journal=False)
        with_journal, bytes_per_event = count(batches, journal=True)
        rounds.append({"without_us_per_event": round(without, 2),
                       "with_journal_us_per_event": round(with_journal, 2),
                       "journal_bytes_per_event": round(bytes_per_event, 1)})
    print(json.dumps({"batches": args.batches, "batch": args.batch, "rounds": rounds},
                     indent=2))


if __name__ == "__main__":
    main()
