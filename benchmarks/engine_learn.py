"""What one learning step of a worker costs: ``Engine.learn_reported`` on micro-batches of
training examples, as the learner process runs it, with and without Deep Retrieval.

A step encodes each example's user from the history it carries, moves the item rows (the item
solve) and, with DR, runs its E-step (a structure-model step, a beam search per user and the
path-score update). The catalogue is filled first (``--items`` rows, assigned), so the figures
show whether a step's cost grows with it; histories and items are drawn Zipf-like. One thread
for BLAS and torch, as in the learner process.

    python benchmarks/engine_learn.py --quick
    python benchmarks/engine_learn.py --items 1000000
"""

from __future__ import annotations

import argparse
import json
import pickle
import tempfile
import time

import numpy as np

from stream_app.engine import Engine
from stream_app.learner_process import limit_threads
from stream_app.settings import Settings
from stream_app.wire import TrainExample


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=Settings.model_fields["learn_batch"].default,
                        help="examples per step (default: a worker's default)")
    parser.add_argument("--batches", type=int, default=40, help="timed batches per variant")
    parser.add_argument("--history", type=int, default=50, help="events per example's history")
    parser.add_argument("--quick", action="store_true", help="10,000 items, 10 batches")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def examples(args: argparse.Namespace, rng: np.random.Generator) -> list[TrainExample]:
    def item() -> str:
        return f"i{min(int(rng.zipf(1.2)), args.items) - 1}"

    # as a worker sends them with the default encoder, which decays by events: no event times
    return [TrainExample(user_id=f"u{k}", item_id=item(), alpha=1.0, ts=1.7e9,
                         history=[item() for _ in range(args.history)],
                         weights=[1.0] * args.history)
            for k in range(args.batch)]


def measure(args: argparse.Namespace, dr: bool) -> dict:
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory() as data_dir:
        settings = Settings(data_dir=data_dir, index_enabled=False, dr_enabled=dr,
                            learn_batch=args.batch)
        engine = Engine(settings)
        engine.learner.assign([f"i{k}" for k in range(args.items)],
                              rng.normal(0.0, 0.1, (args.items, settings.model_dim + 1)))
        engine.users = 10 * args.batch
        batches = [examples(args, rng) for _ in range(args.batches + 3)]
        for batch in batches[:3]:  # warm-up
            engine.learn_reported(batch, args.batch)
        seconds, sizes = [], []
        for batch in batches[3:]:
            started = time.perf_counter()
            report = engine.learn_reported(batch, args.batch)
            seconds.append(time.perf_counter() - started)
            sizes.append(len(pickle.dumps(report, protocol=pickle.HIGHEST_PROTOCOL)))
    per_batch = float(np.median(seconds))
    return {"batch_ms_p50": round(1e3 * per_batch, 2),
            "us_per_example": round(1e6 * per_batch / args.batch, 1),
            "examples_per_s": round(args.batch / per_batch),
            # what the learner process sends its worker per batch (pickled by the pipe)
            "report_kb_p50": round(float(np.median(sizes)) / 1024, 1)}


def main() -> None:
    args = parse_args()
    if args.quick:
        args.items, args.batches = 10_000, 10
    limit_threads()
    results = {"items": args.items, "batch": args.batch,
               "with_dr": measure(args, dr=True), "without_dr": measure(args, dr=False)}
    results["dr_share"] = round(1 - results["without_dr"]["batch_ms_p50"]
                                / results["with_dr"]["batch_ms_p50"], 3)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
