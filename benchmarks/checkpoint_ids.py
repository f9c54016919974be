"""Popularity checkpoints of a million items: size, save and load time, with short ids and
with one long id among them (docs/throughput.md, "Catalogue scale"); and the part of a save
that a worker's event loop still does (the snapshot; the write goes to a thread).

    python benchmarks/checkpoint_ids.py            # 1,000,000 items
    python benchmarks/checkpoint_ids.py --quick    # 50,000
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from state.popularity import DecayedPopularity  # noqa: E402


def measure(ids: list[str], path: Path) -> dict:
    popularity = DecayedPopularity(3600.0, refresh_s=0)
    popularity.add_many(ids, np.full(len(ids), 1e5), np.ones(len(ids)))
    saves, snapshots = [], []
    for _ in range(3):
        started = time.perf_counter()
        popularity.save(path)
        saves.append(time.perf_counter() - started)
        started = time.perf_counter()
        popularity.snapshot()
        snapshots.append(time.perf_counter() - started)
    started = time.perf_counter()
    DecayedPopularity(3600.0).load(path)
    return {"MB": os.path.getsize(path) / 1e6, "save_s": min(saves),
            "snapshot_s": min(snapshots), "load_s": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="50,000 items")
    args = parser.parse_args()
    items = 50_000 if args.quick else 1_000_000
    ids = [f"item-{n:05d}" for n in range(items)]
    with tempfile.TemporaryDirectory() as folder:
        for label, these in (("short ids", ids), ("one of 227 characters", ids + ["u" * 227])):
            result = measure(these, Path(folder) / "popularity.npz")
            print(f"{items:,} items, {label}: {result['MB']:.1f} MB, save {result['save_s']:.3f} s"
                  f" (its snapshot on the loop {result['snapshot_s']:.3f} s), load "
                  f"{result['load_s']:.3f} s")


if __name__ == "__main__":
    main()
