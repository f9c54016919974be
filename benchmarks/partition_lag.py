"""One-pass quality when the learner takes the item partitions out of step, in process.

A worker's learner reads the training topic's item partitions; behind ingest (a backlog, an
M-step) the consumer can hand it one partition's examples far ahead of another's. This replays
a dataset's training stream as the worker would learn it (examples built as the harness
builds them, item partitions by the worker's own hash), but with partition p's examples held
back by ``p × lag`` examples (order within a partition kept), then scores the test fold by
exact search, so only the learning order differs between the rows.

    python benchmarks/partition_lag.py --quick                 # toys, lags 0 and 20,000
    python benchmarks/partition_lag.py --dataset beauty --lags 0,5000,20000
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from evaluation.data import load_dataset
from evaluation.protocols import RunConfig, evaluate_fold
from evaluation.splits import leave_one_out
from evaluation.streaming import OnlineEmbedding, training_examples
from stream_app.engine import item_partition
from stream_app.settings import Settings
from stream_app.wire import TrainExample


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="toys")
    parser.add_argument("--lags", default="0,5000,20000",
                        help="examples each partition is held back behind the one before")
    parser.add_argument("--partitions", type=int, default=4,
                        help="item partitions the examples are spread over (by the worker's "
                        "hash); the learner's own settings are read from the environment")
    parser.add_argument("--quick", action="store_true", help="lags 0 and 20,000")
    parser.add_argument("--out")
    return parser.parse_args()


def examples_of(events, n_items: int, history_length: int
                ) -> tuple[list[TrainExample], np.ndarray]:
    """Per event, its example (the harness's :func:`training_examples`, as a worker writes
    it) and how many users had been seen by then (the count its training message carries)."""
    examples, users_seen, histories = [], [], {}
    keys = [str(item) for item in range(n_items)]
    for example, _ in training_examples(events, keys, histories, history_length):
        examples.append(example)
        users_seen.append(len(histories))
    return examples, np.array(users_seen)


def lagged_order(examples: list[TrainExample], partitions: int, lag: int) -> np.ndarray:
    """Positions in the order a learner takes them when partition p runs p × lag behind."""
    part = np.array([item_partition(e.item_id, partitions) for e in examples])
    return np.argsort(np.arange(len(examples)) + lag * part, kind="stable")


def learning_batches(examples: list[TrainExample], users_seen: np.ndarray, order: np.ndarray,
                     size: int):
    """The micro-batches a learner takes in ``order``, each with the users seen by its last
    example (the count its training messages carry)."""
    for start in range(0, len(order), size):
        taken = order[start:start + size]
        yield [examples[k] for k in taken], int(users_seen[taken].max())


def run(settings: Settings, split, examples, users_seen, lag: int, partitions: int) -> dict:
    model = OnlineEmbedding(split.n_items, settings)
    started = time.perf_counter()
    order = lagged_order(examples, partitions, lag)
    for batch, users in learning_batches(examples, users_seen, order, settings.learn_batch):
        model.engine.learn(batch, users=users)
    learn_s = time.perf_counter() - started
    scores = evaluate_fold(model, split.test, RunConfig(ks=(10,), select_metric="NDCG@10"))
    return {"lag": lag, "ndcg_at_10": scores.means["NDCG@10"],
            "ndcg_at_10_se": scores.errors["NDCG@10"], "learn_s": learn_s}


def main() -> list[dict]:
    args = parse_args()
    settings = Settings()
    lags = [0, 20_000] if args.quick else [int(lag) for lag in args.lags.split(",")]
    split = leave_one_out(load_dataset(args.dataset, None, settings.kind_weights))
    examples, users_seen = examples_of(split.train_events, split.n_items,
                                       settings.history_length)
    results = []
    for lag in lags:
        results.append(run(settings, split, examples, users_seen, lag, args.partitions))
        print(json.dumps(results[-1]), flush=True)
    if args.out:
        with open(args.out, "w") as out:
            json.dump({"dataset": args.dataset, "partitions": args.partitions,
                       "positives_half_life": settings.positives_half_life,
                       "positives_by_partition": settings.positives_by_partition,
                       "serving": [settings.serve_tuning_every, settings.serve_half_life_events,
                                   settings.serve_bias_weight],
                       "results": results}, out, indent=2)
    return results


if __name__ == "__main__":
    main()
