"""How steadily the serving pick lands on the pair that answers held-out users best, in process.

The worker picks the pair that answers requests (user-vector half-life, bias weight;
``models/serving_choice.py``) from every n-th training example, ranked under each candidate
before it is learned. The learning never reads those ranks, so one pass that ranks *every*
example gives what the pick would see at each of the n sampling phases a worker can be in.
This script makes that pass (the harness's examples, optionally with the item partitions out
of step as in ``partition_lag.py``), scores the test and validation folds with each candidate
pinned, then replays the recorded ranks through pick rules (sampling interval, half-life in
samples, margin in standard errors, the NDCG cutoff k the stream is scored with) for every
phase, and reports the held-out NDCG@10 of the pair each rule ends on: its mean and worst
over the phases, and how often it switched.

    python benchmarks/serving_pick.py --quick                     # toys, three rules
    python benchmarks/serving_pick.py --dataset movielens --protocol heldout
    python benchmarks/serving_pick.py --lag 20000                 # partitions out of step
    python benchmarks/serving_pick.py --record out/toys.npz       # keep the pass ...
    python benchmarks/serving_pick.py --replay out/toys.npz       # ... and replay rules on it
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from partition_lag import examples_of, lagged_order, learning_batches  # noqa: E402

from evaluation.data import load_dataset  # noqa: E402
from evaluation.protocols import RunConfig, evaluate_fold  # noqa: E402
from evaluation.splits import heldout_users, leave_one_out  # noqa: E402
from evaluation.streaming import OnlineEmbedding  # noqa: E402
from models.serving_choice import ServingChoice, candidates_of, ndcg_of_ranks  # noqa: E402
from stream_app.settings import Settings  # noqa: E402

# (every n-th example, half-life in samples, margin in standard errors, NDCG cutoff k of the
# stream's score); the first is the worker's rule before the margin, the second its default.
RULES = [(100, 1000.0, 0.0, 10), (25, 1000.0, 1.0, 100), (25, 1000.0, 1.0, 10),
         (25, 1000.0, 0.0, 100), (25, 1000.0, 1.0, 50), (25, 400.0, 1.0, 100),
         (25, 4000.0, 1.0, 100), (100, 1000.0, 1.0, 100), (10, 1000.0, 1.0, 100),
         (100, 1000.0, 2.0, 10)]
QUICK_RULES = [(100, 1000.0, 0.0, 10), (25, 1000.0, 1.0, 100), (25, 1000.0, 1.0, 10)]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="toys")
    parser.add_argument("--protocol", choices=("loo", "heldout"), default="loo")
    parser.add_argument("--lag", type=int, default=0,
                        help="examples each item partition is held back behind the one before")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--phases", type=int, default=100,
                        help="most sampling phases replayed per rule (spread evenly)")
    parser.add_argument("--quick", action="store_true",
                        help="three rules, 20 phases, no validation fold")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--record", help="write the pass (ranks, fold scores) to this .npz")
    parser.add_argument("--replay", help="replay the rules on a recorded pass instead")
    parser.add_argument("--out")
    return parser.parse_args()


def learn_and_record(settings: Settings, split, lag: int, partitions: int
                     ) -> tuple[OnlineEmbedding, np.ndarray, np.ndarray]:
    """One pass in the (possibly lagged) learning order, every example ranked under every
    candidate just before its batch is learned. Returns the model, the learning position of
    each ranked example and its ranks (rows; examples with nothing to rank are left out)."""
    model = OnlineEmbedding(split.n_items, settings)
    engine = model.engine
    examples, users_seen = examples_of(split.train_events, split.n_items,
                                       settings.history_length)
    order = lagged_order(examples, partitions, lag)
    positions, ranks = [], []
    batches = learning_batches(examples, users_seen, order, settings.learn_batch)
    for start, (batch, users) in zip(range(0, len(order), settings.learn_batch), batches):
        kept, batch_ranks = engine.candidate_ranks(batch)
        positions.append(start + kept)
        ranks.append(batch_ranks)
        engine.learn(batch, users=users)
    return model, np.concatenate(positions), np.concatenate(ranks)


def fold_ndcg(model: OnlineEmbedding, fold) -> list[float]:
    """NDCG@10 of ``fold`` answered with each serving candidate in turn."""
    choice, config = model.engine.serving_choice, RunConfig(ks=(10,), select_metric="NDCG@10")
    scores = []
    for index in range(len(choice.candidates)):
        choice.pin(index)
        scores.append(evaluate_fold(model, fold, config).means["NDCG@10"])
    return scores


def replay(candidates, positions, ranks, rule, phase: int, batch: int, min_samples: int
           ) -> tuple[int, int]:
    """The candidate a rule ends on when it samples the positions ≡ ``phase`` (mod every),
    fed per learning batch as the engine feeds it, and how many times its pick moved."""
    every, half_life, margin_z, k = rule
    choice = ServingChoice(candidates, half_life_samples=half_life, min_samples=min_samples,
                           margin_z=margin_z, k=k)
    taken = (positions % every) == phase
    sampled, rows = positions[taken], ndcg_of_ranks(ranks[taken], k)
    for group in np.split(np.arange(len(sampled)),
                          np.flatnonzero(np.diff(sampled // batch)) + 1):
        choice.observe(rows[group])
    return choice.candidates.index(choice.best), choice.moves


def summarize(rule, picks, switches, test, validation) -> dict:
    """A rule's outcome over the phases: held-out NDCG of its final picks."""
    on_test = np.array([test[p] for p in picks])
    return {"every": rule[0], "half_life_samples": rule[1], "margin_z": rule[2], "k": rule[3],
            "test_mean": float(on_test.mean()), "test_worst": float(on_test.min()),
            "validation_mean": float(np.mean([validation[p] for p in picks])),
            "on_test_best": float(np.mean(np.array(picks) == int(np.argmax(test)))),
            "switches_mean": float(np.mean(switches)),
            "picks": {str(p): int(n) for p, n in zip(*np.unique(picks, return_counts=True))}}


def record_pass(args, settings: Settings) -> dict:
    """The pass and the fold scores of each candidate, as arrays (``--record`` keeps them)."""
    dataset = load_dataset(args.dataset, None, settings.kind_weights, seed=args.seed)
    split = (leave_one_out(dataset) if args.protocol == "loo"
             else heldout_users(dataset, args.seed))
    started = time.perf_counter()
    model, positions, ranks = learn_and_record(settings, split, args.lag, args.partitions)
    learned_s = time.perf_counter() - started
    choice = model.engine.serving_choice
    candidates = choice.candidates
    grid = {key: value for key, value in choice.state().items()
            if key in ("half_lives", "bias_weights")}
    recorded = {**grid, "positions": positions, "ranks": ranks,
                "test": np.array(fold_ndcg(model, split.test)),
                "validation": np.array(fold_ndcg(model, split.validation) if not args.quick
                                       else [np.nan] * len(candidates))}
    print(json.dumps({"test": recorded["test"].tolist(),
                      "validation": recorded["validation"].tolist(),
                      "ranked": len(positions), "pass_s": round(learned_s, 1)}), flush=True)
    if args.record:
        np.savez(args.record, **recorded)
    return recorded


def main() -> dict:
    args = parse_args()
    settings = Settings().model_copy(update={"serve_tuning_every": 0})
    if args.replay:
        with np.load(args.replay, allow_pickle=False) as saved:
            recorded = dict(saved)
    else:
        recorded = record_pass(args, settings)
    candidates = candidates_of(recorded)
    test, validation = recorded["test"].tolist(), recorded["validation"].tolist()
    rules, phases = (QUICK_RULES, 20) if args.quick else (RULES, args.phases)
    results = []
    for rule in rules:
        chosen = np.unique(np.linspace(0, rule[0] - 1, min(phases, rule[0])).astype(int))
        outcomes = [replay(candidates, recorded["positions"], recorded["ranks"], rule,
                           int(phase), settings.learn_batch, settings.serve_tuning_min_samples)
                    for phase in chosen]
        results.append(summarize(rule, *zip(*outcomes), test, validation))
        print(json.dumps(results[-1]), flush=True)
    report = {"dataset": args.dataset, "protocol": args.protocol, "lag": args.lag,
              "positives_by_partition": settings.positives_by_partition,
              "candidates": [list(c) for c in candidates], "test": test,
              "validation": validation, "rules": results}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
