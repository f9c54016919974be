"""What a model checkpoint writes: a base (the whole item model) against a delta (the rows
changed in one checkpoint interval), in bytes and seconds (docs/throughput.md, "Checkpoints
of the rows changed"); the same for Deep Retrieval's state.

Every item of the catalogue is learned first (each holds solve statistics, 8.6 KB at
d = 64; and tracked path scores), then ``--events`` training examples of Zipf-drawn items,
each with a history of 50 Zipf-drawn items (whose input offsets learn), go through the
engine's learning step in batches of a worker's size, as in a checkpoint interval (100,000
events: about 30 s of a worker's intake), and the state is saved: first as a delta, then
whole.

    python benchmarks/checkpoint_deltas.py --quick     # 20,000 items
    python benchmarks/checkpoint_deltas.py             # 200,000 items
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from stream_app.engine import Engine
from stream_app.learner_process import limit_threads
from stream_app.settings import Settings
from stream_app.wire import TrainExample


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--events", type=int, default=100_000,
                        help="examples learned between the two saves")
    parser.add_argument("--quick", action="store_true", help="20,000 items, 20,000 events")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def learn(engine: Engine, items: np.ndarray, rng: np.random.Generator, batch: int,
          catalogue: int) -> None:
    """Training examples of ``items`` as a worker sends them, through the learning step."""
    def drawn(count: int) -> list[str]:
        return [f"i{k}" for k in np.minimum(rng.zipf(1.2, count), catalogue) - 1]

    for start in range(0, len(items), batch):
        examples = [TrainExample(user_id=f"u{start + k}", item_id=f"i{item}", alpha=1.0,
                                 ts=1.7e9, history=drawn(50), weights=[1.0] * 50)
                    for k, item in enumerate(items[start: start + batch])]
        engine.learn_reported(examples, batch)


def timed_save(state, save) -> tuple[str, float, float]:
    started = time.perf_counter()
    save()
    seconds = time.perf_counter() - started
    return state.checkpoints.last_kind, seconds, state.checkpoints.last_bytes / 1e6


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
    with tempfile.TemporaryDirectory() as folder:
        settings = Settings(data_dir=folder, index_enabled=False, dr_enabled=True)
        engine, batch = Engine(settings), settings.learn_batch
        engine.users = 10_000
        learner, dr = engine.learner, engine.paths.model
        for state in (learner, dr):
            state.checkpoints.compact_share = float("inf")  # the delta, however large
        learn(engine, rng.permutation(args.items), rng, batch, args.items)
        model, paths = Path(folder) / "model.npz", Path(folder) / "dr"
        item_saves = [timed_save(learner, lambda: learner.save(model))]
        dr_saves = [timed_save(dr, lambda: dr.save(paths))]
        learn(engine, np.minimum(rng.zipf(1.2, args.events), args.items) - 1, rng, batch,
              args.items)
        changed = {name: int(marks.sum()) for name, marks in learner._changed.items()}
        dr_changed = int(dr._rows_changed.sum())
        item_saves.append(timed_save(learner, lambda: learner.save(model)))
        dr_saves.append(timed_save(dr, lambda: dr.save(paths)))
        for state in (learner, dr):
            state.checkpoints.reset()  # the same state, whole
        item_saves.append(timed_save(learner, lambda: learner.save(model)))
        dr_saves.append(timed_save(dr, lambda: dr.save(paths)))
    report(f"item model: {args.items:,} items learned (d = {settings.model_dim}); then "
           f"{args.events:,} examples in batches of {batch}, rows changed: {changed}",
           tuple(item_saves))
    report(f"Deep Retrieval: {dr_changed:,} items changed", tuple(dr_saves))


if __name__ == "__main__":
    main()
