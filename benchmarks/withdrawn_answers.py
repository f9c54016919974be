"""What withdrawn items cost an answer: ``Engine.answer`` (``ann`` only, exact search) with a
share of the catalogue withdrawn at random, counting the searches each answer asks of the
serving index (a search is asked again while the withdrawn items leave an answer fewer than
k, or a plain request fewer than three quarters of its candidates) and timing the answers;
and hnswlib's ``knn_query`` for the k of the last search asked again, which excludes every
withdrawn item's row. docs/throughput.md, "Withdrawn items excluded whole at the last
search".

    python benchmarks/withdrawn_answers.py            # 20,000 items, 500 answers a share
    python benchmarks/withdrawn_answers.py --quick    # 5,000 items, 100 answers
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import hnswlib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from state.history import History  # noqa: E402
from stream_app.engine import Engine  # noqa: E402
from stream_app.settings import Settings  # noqa: E402
from stream_app.wire import RecRequest  # noqa: E402

SHARES = (0.01, 0.1, 0.2)


def answers(engine: Engine, rng: np.random.Generator, count: int) -> tuple[float, float]:
    """Searches an answer and microseconds an answer over ``count`` users of 20 events."""
    items = len(engine.learner)
    searches = [0]
    retrieve = engine.index.retrieve

    def counted(*args, **kwargs):
        searches[0] += 1
        return retrieve(*args, **kwargs)

    engine.index.retrieve = counted
    try:
        started = time.perf_counter()
        for n in range(count):
            picked = rng.choice(items, 20)
            history = History(items=tuple(f"i{k}" for k in picked), kinds=("view",) * 20,
                              ts=tuple(float(t) for t in range(20)))
            request = RecRequest(request_id=str(n), user_id=f"u{n}", k=10, sources=["ann"])
            engine.answer(request, history, time.perf_counter())
        elapsed = time.perf_counter() - started
    finally:
        engine.index.retrieve = retrieve
    return searches[0] / count, elapsed / count * 1e6


def search_ms(rows: int, ks: list[int], rng: np.random.Generator) -> dict[int, float]:
    """Median milliseconds of ``knn_query`` for each k over 20 queries, one thread, on a
    graph of ``rows`` random rows (d = 65, M = 16, ef 128: the worker's defaults)."""
    vectors = rng.normal(0.0, 0.1, (rows, 65)).astype(np.float32)
    graph = hnswlib.Index(space="ip", dim=65)
    graph.init_index(max_elements=rows, M=16, ef_construction=200, random_seed=0)
    graph.add_items(vectors, np.arange(rows))
    graph.set_ef(128)
    graph.set_num_threads(1)
    queries = rng.normal(0.0, 0.1, (20, 65)).astype(np.float32)
    timed = {}
    for k in ks:
        took = []
        for query in queries:
            started = time.perf_counter()
            graph.knn_query(query[None, :], k=k)
            took.append(time.perf_counter() - started)
        timed[k] = round(float(np.median(took)) * 1e3, 2)
    return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--answers", type=int, default=500)
    parser.add_argument("--graph-rows", type=int, default=100_000)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.quick:
        args.items, args.answers, args.graph_rows = 5_000, 100, 10_000
    rng = np.random.default_rng(args.seed)
    out: dict = {"items": args.items, "answers": args.answers, "withdrawn": {}}
    with tempfile.TemporaryDirectory() as data_dir:
        settings = Settings(data_dir=data_dir, index_enabled=False, dr_enabled=False,
                            serve_tuning_every=0)
        engine = Engine(settings)
        engine.learner.assign([f"i{k}" for k in range(args.items)],
                              rng.normal(0.0, 0.1, (args.items, settings.model_dim + 1)))
        for share in SHARES:
            picked = rng.choice(args.items, int(args.items * share), replace=False)
            engine.withdrawn = frozenset(f"i{k}" for k in picked)
            searches, micros = answers(engine, rng, args.answers)
            out["withdrawn"][f"{share:.0%}"] = {"searches_per_answer": round(searches, 3),
                                                "us_per_answer": round(micros)}
    out["knn_query_ms"] = search_ms(args.graph_rows, [74, 1_074, 5_074], rng)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
