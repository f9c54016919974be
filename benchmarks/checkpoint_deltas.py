"""What a model checkpoint writes: a base (the whole item model) against a delta (the rows
changed in one checkpoint interval), in bytes and seconds (docs/throughput.md, "Checkpoints
of the rows changed"); the same for Deep Retrieval's state.

Every item of the catalogue is learned first (each holds solve statistics, 8.6 KB at
d = 64; and tracked path scores), then ``--events`` training examples of Zipf-drawn items are
learned in batches of a worker's size, with the sweep's re-solves, as in a checkpoint interval
(100,000 events: about 30 s of a worker's intake), and the state is saved: first as a delta,
then whole.

    python benchmarks/checkpoint_deltas.py --quick     # 20,000 items
    python benchmarks/checkpoint_deltas.py             # 200,000 items
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from models.deep_retrieval import DeepRetrieval
from stream_app.engine import Engine
from stream_app.learner_process import limit_threads
from stream_app.settings import Settings


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--events", type=int, default=100_000,
                        help="examples learned between the two saves")
    parser.add_argument("--quick", action="store_true", help="20,000 items, 20,000 events")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def learn(learner, ids: list[str], rng: np.random.Generator, batch: int) -> None:
    dim = learner.config.dim
    for start in range(0, len(ids), batch):
        chunk = ids[start: start + batch]
        learner.learn(rng.normal(0.0, 0.1, (len(chunk), dim)), chunk, np.ones(len(chunk)),
                      n_users=10_000)


def learn_paths(dr: DeepRetrieval, ids: list[str], rng: np.random.Generator,
                batch: int) -> None:
    for start in range(0, len(ids), batch):
        chunk = ids[start: start + batch]
        dr.learn(rng.normal(0.0, 1.0, (len(chunk), dr.config.input_dim)), chunk)


def timed_save(state, save) -> tuple[str, float, float]:
    started = time.perf_counter()
    save()
    seconds = time.perf_counter() - started
    return state._checkpoints.last_kind, seconds, state._checkpoints.last_bytes / 1e6


def report(label: str, saves: tuple) -> None:
    base, delta, whole = saves
    print(label)
    for name, (kind, seconds, megabytes) in (("first save", base), ("after the events", delta),
                                             ("the same state whole", whole)):
        print(f"  {name}: a {kind} of {megabytes:,.1f} MB in {seconds:.2f} s")
    print(f"  delta / whole: {delta[2] / whole[2]:.3f} of the bytes, "
          f"{delta[1] / whole[1]:.3f} of the time")


def main() -> None:
    args = parse_args()
    if args.quick:
        args.items, args.events = 20_000, 20_000
    limit_threads()
    rng = np.random.default_rng(args.seed)
    catalogue = [f"i{k}" for k in range(args.items)]
    drawn = [f"i{k}" for k in np.minimum(rng.zipf(1.2, args.events), args.items) - 1]
    with tempfile.TemporaryDirectory() as folder:
        settings = Settings(data_dir=folder, index_enabled=False, dr_enabled=True)
        engine, batch = Engine(settings), settings.learn_batch
        learner, dr = engine.learner, engine.paths.model
        for state in (learner, dr):
            state._checkpoints.compact_share = float("inf")  # the delta, however large
        learn(learner, catalogue, rng, 1024)
        path = Path(folder) / "model.npz"
        saves = [timed_save(learner, lambda: learner.save(path))]
        learn(learner, drawn, rng, batch)
        changed = int(learner._rows_changed.sum())
        saves.append(timed_save(learner, lambda: learner.save(path)))
        learner._checkpoints.reset()  # the same state, whole
        saves.append(timed_save(learner, lambda: learner.save(path)))
        report(f"item model: {args.items:,} items learned (d = {settings.model_dim}); then "
               f"{args.events:,} examples in batches of {batch}: {changed:,} item rows changed",
               tuple(saves))
        learn_paths(dr, catalogue, rng, 1024)
        folder_dr = Path(folder) / "dr"
        saves = [timed_save(dr, lambda: dr.save(folder_dr))]
        learn_paths(dr, drawn, rng, batch)
        changed = int(dr._rows_changed.sum())
        saves.append(timed_save(dr, lambda: dr.save(folder_dr)))
        dr._checkpoints.reset()
        saves.append(timed_save(dr, lambda: dr.save(folder_dr)))
        report(f"Deep Retrieval: the same items and examples: {changed:,} items changed",
               tuple(saves))


if __name__ == "__main__":
    main()
