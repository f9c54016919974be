"""In-process serving speed: the responder's whole path (user vector from a 20-item history,
retrieval, one rerank with the current vectors, seen items excluded, popularity fill) on an
HNSW index, against exact search over the same vectors, at catalog sizes up to 1M items.

Reports per size: index build seconds, index bytes per million items, resident memory added
by the index, and p50/p99 latency and queries/s of ``Engine.answer`` for the index and for
exact search, beside LED's production figures (Table 4: p50 0.5 ms, p99 2 ms, 3,200 q/s per
instance). Item vectors are synthetic and low-rank like learned ones (d = 64 plus the bias).
Then 1 % of the rows move (``--moved-share``) and the next version updates the serving one in
place (``STREAMREC_INDEX_UPDATE_SHARE``): its seconds (read back, update, write, swap) against
the build's, and recall@10 against exact search on the moved rows. Last, answers as a worker
that learns gives them (``stale``): ``STREAMREC_INDEX_STALE_LIMIT`` rows moved since the
serving version and 1 % new items, all scored exactly beside the graph search.

    python benchmarks/index_serving.py --quick            # 100k items, about a minute
    python benchmarks/index_serving.py --sizes 100000,1000000 --out out/index.json
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from index_sync.versions import write_version
from state.history import History
from stream_app.engine import Engine
from stream_app.settings import Settings
from stream_app.wire import RecRequest

LED_TABLE_4 = {"p50_ms": 0.5, "p99_ms": 2.0, "queries_per_s": 3200}


def item_rows(n: int, dim: int, rank: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(n, rank)) @ rng.normal(size=(rank, dim)) / np.sqrt(rank * dim)
    v += 0.02 * rng.normal(size=(n, dim))
    return np.hstack([v, rng.normal(0.0, 0.3, size=(n, 1))])


def engine_for(n: int, dim: int, data_dir: Path, threads: int) -> tuple[Engine, float, dict]:
    settings = Settings(data_dir=data_dir, model_dim=dim, popularity_refresh_s=3600,
                        index_build_threads=threads)
    engine = Engine(settings)
    ids = [f"i{i}" for i in range(n)]
    rows = item_rows(n, dim)
    engine.learner.assign(ids, rows)
    for i in range(0, n, max(n // 1000, 1)):  # a popularity list to fill from
        engine.popularity.add(ids[i], 0.0, 1.0)
    before = rss_bytes()
    started = time.perf_counter()
    index = engine.index.rebuilder.build(ids, rows, model_version=0)
    build_s = time.perf_counter() - started
    folder = write_version(engine.index.config.root, index)
    engine.index.holder.swap(index)
    size = sum(path.stat().st_size for path in folder.iterdir())
    memory = {"index_bytes_per_million_items": size / n * 1e6,
              "rss_added_bytes_per_million_items": (rss_bytes() - before) / n * 1e6}
    return engine, build_s, memory


def rss_bytes() -> int:
    """Peak resident set size so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def time_answers(engine: Engine, n_items: int, queries: int, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    latencies = []
    versions = set()
    for _ in range(queries):
        picks = rng.integers(0, n_items, 20)
        history = History(items=tuple(f"i{i}" for i in picks), kinds=("view",) * 20,
                          ts=tuple(float(t) for t in range(20)))
        started = time.perf_counter()
        answer = engine.answer(RecRequest(request_id="b", user_id="u", k=10), history, started)
        latencies.append(time.perf_counter() - started)
        versions.add(answer.index_version)
    ms = np.array(latencies) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "queries_per_s": float(len(ms) / (ms.sum() / 1000)), "index_versions": sorted(
                v for v in versions if v is not None)}


def recall(engine: Engine, n_items: int, queries: int = 200, seed: int = 2) -> float:
    """Top-10 of the indexed path against exact search, same requests."""
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(queries):
        history = History(items=tuple(f"i{i}" for i in rng.integers(0, n_items, 20)),
                          kinds=("view",) * 20, ts=(0.0,) * 20)
        request = RecRequest(request_id="b", user_id="u", k=10)
        indexed = engine.answer(request, history, time.perf_counter()).items
        holder = engine.index.holder
        serving, holder.current = holder.current, None
        exact = engine.answer(request, history, time.perf_counter()).items
        holder.current = serving
        hits += len({i.item_id for i in indexed} & {i.item_id for i in exact})
    return hits / (10 * queries)


def move_in_one_step(engine: Engine, rows: np.ndarray, vectors: np.ndarray) -> None:
    """Give learner ``rows`` new vectors as one learning step would, and tell the index."""
    learner = engine.index.learner
    ids = learner.item_ids_at(rows)
    learner.assign(ids, vectors)
    learner.steps += 1
    engine.index.learned(ids, rows)


def update_in_place(engine: Engine, moved_share: float, seed: int = 3) -> dict:
    """Move ``moved_share`` of the rows a little, as a few learning steps would (within the
    sphere, for ``STREAMREC_INDEX_SPACE=sphere``), and make the next version by updating the
    serving one; its seconds and recall after."""
    learner, index = engine.index.learner, engine.index.current
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(learner), int(moved_share * len(learner)), replace=False))
    moved = learner.item_matrix[rows]
    moved += 0.05 * rng.normal(size=moved.shape)
    if index.manifest.space == "sphere":
        norms = np.linalg.norm(moved, axis=1, keepdims=True)
        moved *= np.minimum(1.0, 0.99 * index.manifest.radius / norms)
    move_in_one_step(engine, rows, moved)
    rebuilder = engine.index.rebuilder
    rebuilder.last_snapshot_at = rebuilder.resting_until = 0.0
    started = time.perf_counter()
    assert engine.index.maybe_rebuild(learner.steps), "no version was due"
    rebuilder._running.result()
    total_s = time.perf_counter() - started
    updated = engine.index.current
    assert rebuilder.updates == 1 and updated.manifest.updated_rows == len(rows)
    return {"moved_rows": len(rows), "update_s": updated.manifest.build_seconds,
            "version_s": total_s, "recall_at_10_vs_exact": recall(engine, len(learner))}


def answers_while_stale(engine: Engine, n_items: int, queries: int, seed: int = 4) -> dict:
    """Answers of a worker that learns: ``stale_limit`` rows moved since the serving version
    and 1 % new items (scored exactly beside the graph search until the next version)."""
    learner, limit = engine.index.learner, engine.index.config.stale_limit
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(learner), min(limit, len(learner)), replace=False))
    moved = learner.item_matrix[rows]
    moved += 0.01 * rng.normal(size=moved.shape)
    new = max(n_items // 100, 1)
    learner.assign([f"new{i}" for i in range(new)],
                   learner.item_matrix[rng.integers(0, n_items, new)])
    move_in_one_step(engine, rows, moved)
    return {"moved_rows": len(rows), "new_items": new, **time_answers(engine, n_items, queries)}


def run_size(n: int, dim: int, queries: int, threads: int, moved_share: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="streamrec-index-bench-") as tmp:
        engine, build_s, memory = engine_for(n, dim, Path(tmp), threads)
        indexed = time_answers(engine, n, queries)
        holder = engine.index.holder
        serving, holder.current = holder.current, None
        exact = time_answers(engine, n, max(queries // 10, 50))
        holder.current = serving
        result = {"items": n, "dim": dim, "build_s": build_s, "build_threads": threads,
                  **memory, "index": indexed, "exact": exact,
                  "recall_at_10_vs_exact": recall(engine, n),
                  "speedup_p50": exact["p50_ms"] / indexed["p50_ms"]}
        update = update_in_place(engine, moved_share)
        result["update"] = {**update, "version_s_to_build_s": update["version_s"] / build_s}
        result["stale"] = answers_while_stale(engine, n, queries)
        engine.index.close()
        return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="100k items only")
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--queries", type=int, default=5000)
    parser.add_argument("--build-threads", type=int, default=2)
    parser.add_argument("--moved-share", type=float, default=0.01,
                        help="share of the rows that move before the update in place")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    sizes = [100_000] if args.quick else [int(s) for s in args.sizes.split(",")]
    queries = 2000 if args.quick else args.queries
    with threadpool_limits(1):  # as in the worker
        results = {"led_table_4": LED_TABLE_4,
                   "sizes": [run_size(n, args.dim, queries, args.build_threads,
                                      args.moved_share) for n in sizes]}
    print(json.dumps(results, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
