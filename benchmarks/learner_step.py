"""Throughput of ``ItemLearner.learn``: events per second on micro-batches, single process.

The item solvers run on the same batches in one run (``--solver`` picks one), so their ratios
are measured under the same machine load: ``solve`` (exact per-item solve), ``cg`` (the same
statistics, ``--cg-steps`` conjugate-gradient steps per touched item) and ``adagrad``.

    python benchmarks/learner_step.py            # d=64, 100k items, batches of 256
    python benchmarks/learner_step.py --quick    # the same in well under 20 s

Items are drawn Zipf-like (exponent 0.8, so batches repeat popular items, as a real stream
does); the catalogue is filled first with ``assign`` so every timed step touches known rows,
plus a share of brand-new ids per batch (``--new``) to include row growth and init. The
periodic exact recompute of G_I is timed separately and amortized into the total.

Each solver's result also times the user side of a micro-batch: encoding ``--batch`` users with
histories of ``--history`` items (the mean encoder over the item matrix, as the engine encodes a
batch at ingest and before each step). Its cost must not grow with the catalogue:

    python benchmarks/learner_step.py --quick --solver adagrad --items 1000000

BLAS runs on one thread by default (``--blas-threads``): a step's matrix products are only
(d+1)×B×(d+1), and a multi-threaded OpenBLAS that has to share busy cores made steps about 30×
slower here. Workers should do the same (``OPENBLAS_NUM_THREADS=1`` or threadpoolctl).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from threadpoolctl import threadpool_limits

from models.encoders import mean_encoder_batch
from models.learner import ItemLearner, LearnerConfig


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--batches", type=int, default=2000)
    parser.add_argument("--history", type=int, default=50, help="events per encoded history")
    parser.add_argument("--new", type=float, default=0.01, help="share of new item ids per batch")
    parser.add_argument("--quick", action="store_true", help="300 batches")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--solver", choices=["solve", "cg", "adagrad", "all"], default="all")
    parser.add_argument("--cg-steps", type=int, default=3, help="CG steps of the cg solver")
    parser.add_argument("--blas-threads", type=int, default=1,
                        help="BLAS threads; 0 leaves the library default")
    return parser.parse_args()


def item_odds(items: int) -> np.ndarray:
    """Zipf-like probabilities of the catalogue's rows (exponent 0.8)."""
    weights = 1.0 / np.arange(1, items + 1) ** 0.8
    return weights / weights.sum()


def make_batches(args: argparse.Namespace, rng: np.random.Generator):
    picks = rng.choice(args.items, size=(args.batches, args.batch), p=item_odds(args.items))
    batches = []
    for b, row in enumerate(picks):
        ids = [f"item-{i}" for i in row]
        for k in range(int(args.new * args.batch)):
            ids[k] = f"new-{b}-{k}"
        phi = rng.normal(0.0, 0.1, (args.batch, args.dim))
        batches.append((phi, ids, rng.uniform(1.0, 10.0, args.batch)))
    return batches


def build(args: argparse.Namespace, rng: np.random.Generator, solver: str) -> ItemLearner:
    learner = ItemLearner(LearnerConfig(
        dim=args.dim, recompute_every=10 ** 9, seed=args.seed,
        solver="adagrad" if solver == "adagrad" else "solve",
        cg_steps=args.cg_steps if solver == "cg" else 0))
    learner.assign([f"item-{i}" for i in range(args.items)],
                   rng.normal(0.0, 0.1 / np.sqrt(args.dim), (args.items, args.dim + 1)))
    return learner


def timed_steps(learner: ItemLearner, batches) -> np.ndarray:
    for phi, ids, alphas in batches[:20]:  # warm-up (caches, allocator)
        learner.learn(phi, ids, alphas, n_users=50_000)
    step_s = []
    for phi, ids, alphas in batches[20:]:
        start = time.perf_counter()
        learner.learn(phi, ids, alphas, n_users=50_000)
        step_s.append(time.perf_counter() - start)
    return np.array(step_s)


def timed_encodes(learner: ItemLearner, args: argparse.Namespace,
                  rng: np.random.Generator, repeats: int = 20) -> np.ndarray:
    """Seconds per encode of ``args.batch`` histories, drawn like the batches' items."""
    odds = item_odds(args.items)
    lengths = np.full(args.batch, args.history)
    indptr = np.r_[0, np.cumsum(lengths)]
    seconds = []
    for _ in range(repeats + 2):
        rows = rng.choice(args.items, size=int(indptr[-1]), p=odds)
        start = time.perf_counter()  # as the engine calls it: the whole Ψ̃, its d columns used
        mean_encoder_batch(learner.item_matrix, indptr, rows, np.ones(len(rows)),
                           columns=args.dim)
        seconds.append(time.perf_counter() - start)
    return np.array(seconds[2:])


def main() -> None:
    args = parse_args()
    if args.quick:
        args.batches = 300
    if args.blas_threads > 0:
        threadpool_limits(limits=args.blas_threads, user_api="blas")
    solvers = ["solve", "cg", "adagrad"] if args.solver == "all" else [args.solver]
    results = {solver: measure(args, solver) for solver in solvers}
    for fast, slow in (("cg", "solve"), ("solve", "adagrad")):
        if fast in results and slow in results:
            results[f"{fast}_over_{slow}"] = round(results[fast]["events_per_s"]
                                                   / results[slow]["events_per_s"], 3)
    print(json.dumps(results, indent=2))


def measure(args: argparse.Namespace, solver: str) -> dict:
    rng = np.random.default_rng(args.seed)
    learner = build(args, rng, solver)
    step_s = timed_steps(learner, make_batches(args, rng))
    encode_s = timed_encodes(learner, args, rng)
    start = time.perf_counter()
    drift = learner.item_gramian.recompute(learner.item_matrix)
    recompute_s = time.perf_counter() - start
    per_batch = step_s.mean() + recompute_s / LearnerConfig().recompute_every
    return {
        "items": len(learner), "dim": args.dim, "blas_threads": args.blas_threads,
        "batch": args.batch, "timed_batches": len(step_s),
        "events_per_s": round(args.batch / step_s.mean()),
        "events_per_s_with_recompute": round(args.batch / per_batch),
        "step_ms_p50": round(1e3 * float(np.median(step_s)), 3),
        "step_ms_p99": round(1e3 * float(np.quantile(step_s, 0.99)), 3),
        "recompute_ms": round(1e3 * recompute_s, 2),
        "encode_users_ms_p50": round(1e3 * float(np.median(encode_s)), 3),
        "gramian_drift_before_recompute": drift,
    }

if __name__ == "__main__":
    main()
