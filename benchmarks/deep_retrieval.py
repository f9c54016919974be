"""Deep Retrieval costs: the M-step on a large catalogue, beam search and retrieval per query,
the E-step's learning throughput, and writing and reading the state a worker loads after each
M-step of its learner process (the catalogue's ids and paths; the path-score tracker empty; a
worker reads it without the scores), in process.

    python benchmarks/deep_retrieval.py            # 1M items (the issue's M-step size)
    python benchmarks/deep_retrieval.py --quick    # 100k items, well under a minute

The path scores are synthetic but shaped like the stream's: items belong to clusters, each
cluster favours a set of paths, and every item tracks S of its cluster's paths with scores that
decay down its list; N_v is Zipf-like. K, D, J, S, B and the penalty are the worker defaults
(``stream_app.settings``). One thread for torch and BLAS, as in a worker.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np

from models.deep_retrieval import DeepRetrieval, DRConfig, beam_search, m_step
from state.path_scores import PathIndex
from stream_app.learner_process import limit_threads
from stream_app.settings import Settings


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--clusters", type=int, default=2000)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--quick", action="store_true", help="100k items, 500 queries")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def synthetic_scores(config: DRConfig, items: int, clusters: int, rng: np.random.Generator):
    """Codes (n, S), scores (n, S), counts (n,) and a random start assignment (n, J)."""
    n_paths = config.width ** config.depth
    favoured = rng.integers(0, n_paths, size=(clusters, 4 * config.top_s))
    cluster = rng.integers(0, clusters, size=items)
    picks = np.argsort(rng.random((items, favoured.shape[1])), axis=1)[:, :config.top_s]
    codes = np.take_along_axis(favoured[cluster], picks, axis=1)
    scores = rng.exponential(1.0, size=(items, config.top_s)) / np.arange(1, config.top_s + 1)
    counts = np.ceil(1000.0 / np.arange(1, items + 1) ** 0.8 + rng.integers(1, 5, items))
    start = rng.integers(0, n_paths, size=(items, config.paths_per_item))
    return codes, scores, counts, start


def quantiles_ms(seconds: list[float]) -> dict:
    values = np.array(seconds) * 1e3
    return {"p50_ms": round(float(np.median(values)), 3),
            "p99_ms": round(float(np.quantile(values, 0.99)), 3)}


def measure_m_step(config: DRConfig, args, rng) -> tuple[dict, np.ndarray]:
    codes, scores, counts, start = synthetic_scores(config, args.items, args.clusters, rng)
    result = m_step(codes, scores, counts, start, config.paths_per_item, config.penalty,
                    config.mstep_passes)
    return {"items": args.items, "passes": config.mstep_passes,
            "seconds": round(result.seconds, 2),
            "seconds_per_pass": round(result.seconds / config.mstep_passes, 2),
            "largest_path": int(result.largest_path),
            "nonempty_paths": int(result.nonempty_paths)}, result.assignment


def measure_queries(config: DRConfig, assignment: np.ndarray, args, rng) -> dict:
    model = DeepRetrieval(config)
    index = PathIndex.build(assignment)
    xs = rng.normal(size=(args.queries, config.input_dim)).astype(np.float32)
    xs /= np.linalg.norm(xs, axis=1, keepdims=True)
    beam_s, retrieve_s, found = [], [], []
    for x in xs:
        started = time.perf_counter()
        codes, _ = beam_search(model.model, x[None], config.beam)
        beam_s.append(time.perf_counter() - started)
        rows, _ = index.items_on(codes[0])
        retrieve_s.append(time.perf_counter() - started)
        found.append(len(np.unique(rows)))
    started = time.perf_counter()
    beam_search(model.model, xs, config.beam)
    batched = time.perf_counter() - started
    return {"beam": config.beam, "beam_search": quantiles_ms(beam_s),
            "beam_plus_items": quantiles_ms(retrieve_s),
            "items_per_query_mean": round(float(np.mean(found)), 1),
            "batched_beam_queries_per_s": round(len(xs) / batched)}


def measure_e_step(config: DRConfig, rng, batches: int = 40, batch: int = 256) -> dict:
    model = DeepRetrieval(config)
    ids = [f"item-{i}" for i in range(20_000)]
    steps = []
    for _ in range(batches):
        x = rng.normal(size=(batch, config.input_dim)).astype(np.float32)
        picked = [ids[i] for i in rng.integers(0, len(ids), batch)]
        started = time.perf_counter()
        model.learn(x, picked)
        steps.append(time.perf_counter() - started)
    per_batch = float(np.median(steps[5:]))
    return {"batch": batch, "step": quantiles_ms(steps[5:]),
            "pairs_per_s": round(batch / per_batch)}


def measure_checkpoint(config: DRConfig, assignment: np.ndarray) -> dict:
    model = DeepRetrieval(config)
    model.add_items([f"item-{i}" for i in range(len(assignment))], assignment)
    with tempfile.TemporaryDirectory() as directory:
        started = time.perf_counter()
        model.save(directory)
        saved = time.perf_counter() - started
        started = time.perf_counter()
        assert DeepRetrieval(config).load(directory)
        loaded = time.perf_counter() - started
        started = time.perf_counter()
        assert DeepRetrieval(config, track_scores=False).load(directory)
        serving = time.perf_counter() - started
    return {"items": len(assignment), "save_s": round(saved, 2), "load_s": round(loaded, 2),
            "load_serving_only_s": round(serving, 2)}


def main() -> None:
    args = parse_args()
    if args.quick:
        args.items, args.queries, args.clusters = 100_000, 500, 200
    limit_threads()
    config = Settings().dr_config()
    rng = np.random.default_rng(args.seed)
    m_step_result, assignment = measure_m_step(config, args, rng)
    report = {
        "config": {"K": config.width, "D": config.depth, "J": config.paths_per_item,
                   "S": config.top_s, "B": config.beam, "penalty": config.penalty},
        "m_step": m_step_result,
        "queries": measure_queries(config, assignment, args, rng),
        "e_step": measure_e_step(config, rng),
        "checkpoint": measure_checkpoint(config, assignment),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
