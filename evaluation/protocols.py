"""Run models through the protocols and collect one record per model.

- :func:`run_offline` (``loo`` and ``heldout`` splits): batch models fit once per candidate
  parameter set, the best by a validation metric is scored on the test fold; the streaming model
  learns the same training events in stream order.
- :func:`run_prequential`: replay the stream; every event is first ranked for its user (given
  the history so far, seen items excluded) and only then learned from. Batch models, which cannot
  learn one event at a time, are refitted on everything before each of ``windows`` equal slices.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp
from tqdm import tqdm

from models import metrics

from .baselines import ScoringRecommender, mask_excluded
from .data import Dataset, Events, interaction_matrix
from .splits import Fold, Split, latest_by_cell


@dataclass(frozen=True)
class ModelSpec:
    """How to build one model: ``build(**params)`` for each candidate in ``grid``; the first
    candidate is the default (used where there is no validation data, e.g. prequential)."""

    name: str
    build: Callable[..., object]
    grid: tuple[dict, ...] = ({},)
    streaming: bool = False


@dataclass(frozen=True)
class RunConfig:
    ks: tuple[int, ...] = (5, 10, 20)
    select_metric: str = "NDCG@10"
    batch_size: int = 1024
    progress: bool | None = None  # None: bars only on a terminal (tqdm's rule)

    @property
    def max_k(self) -> int:
        return max(self.ks)


def _bar(config: RunConfig, **kwargs) -> tqdm:
    return tqdm(disable=False if config.progress else None if config.progress is None else True,
                file=sys.stderr, leave=False, dynamic_ncols=True, **kwargs)


# -- scoring one fold ------------------------------------------------------------------------------


class FoldScores(NamedTuple):
    """Mean of every metric over a fold's rows, its standard error, and metric-vs-K curves."""

    means: dict
    errors: dict  # standard error of each mean: sample sd / sqrt(rows)
    curves: dict


def evaluate_fold(model, fold: Fold, config: RunConfig, desc: str = "") -> FoldScores:
    """Mean metrics over the fold's rows, with standard errors, and curves for K = 1..max(ks).

    Top-K metrics come from the model's ranking; MRR and AUC (full ranking over all items but
    the history) are added when the model exposes ``score``.
    """
    sums: dict[str, float] = {}
    squares: dict[str, float] = {}
    curve_sums = np.zeros((4, config.max_k))
    with _bar(config, total=len(fold), desc=desc, unit="user") as bar:
        for start in range(0, len(fold), config.batch_size):
            rows = slice(start, start + config.batch_size)
            times = None if fold.times is None else fold.times[rows]
            values, curves = _score_batch(model, fold.history[rows], fold.targets[rows], config,
                                          times)
            for name, per_row in values.items():
                sums[name] = sums.get(name, 0.0) + float(per_row.sum())
                squares[name] = squares.get(name, 0.0) + float(np.square(per_row).sum())
            curve_sums += curves
            bar.update(fold.history[rows].shape[0])
    n = max(len(fold), 1)
    means = {name: total / n for name, total in sums.items()}
    errors = {name: _standard_error(means[name], squares[name] / n, n) for name in means}
    curves = {"K": list(range(1, config.max_k + 1))}
    for name, row in zip(("HR", "Recall", "RecallMin", "NDCG"), curve_sums / n):
        curves[name] = row.tolist()
    return FoldScores(means, errors, curves)


def _standard_error(mean: float, mean_square: float, n: int) -> float:
    """sd(ddof=1) / sqrt(n) from the first two moments; 0 for a single row."""
    if n < 2:
        return 0.0
    variance = max(mean_square - mean * mean, 0.0) * n / (n - 1)
    return float(np.sqrt(variance / n))


def _score_batch(model, history: sp.csr_matrix, targets: sp.csr_matrix,
                 config: RunConfig, times: sp.csr_matrix | None = None) -> tuple[dict, np.ndarray]:
    """Per-row metric values for one batch, and the summed curves.

    A model with ``reads_times`` also gets ``times`` (when the fold has them): the history in
    time order, as a worker keeps it."""
    scores = None
    extra = {"times": times} if times is not None and getattr(model, "reads_times", False) \
        else {}
    if isinstance(model, ScoringRecommender):
        # recommend() is top_k of score(); score once and take both from it.
        scores = model.score(history)
        ranked = metrics.top_k(mask_excluded(scores.copy(), history), config.max_k)
    else:
        ranked = model.recommend(history, config.max_k, exclude=history, **extra)
        if hasattr(model, "score") and getattr(model, "full_ranking", True):
            scores = model.score(history, **extra)
    hits = metrics.hit_matrix(ranked, targets)
    n_relevant = np.diff(targets.indptr)
    values = {}
    for k in config.ks:
        values[f"HR@{k}"] = metrics.hit_rate(hits, k)
        values[f"Recall@{k}"] = metrics.recall(hits, n_relevant, k)
        values[f"RecallMin@{k}"] = metrics.recall_capped(hits, n_relevant, k)
        values[f"NDCG@{k}"] = metrics.ndcg(hits, n_relevant, k)
    values[f"MRR@{config.max_k}"] = metrics.reciprocal_rank_at(hits, config.max_k)
    if scores is not None:
        relevant = targets.toarray() > 0
        candidates = history.toarray() == 0
        values["MRR"] = metrics.reciprocal_rank(scores, relevant, candidates)
        values["AUC"] = metrics.auc(scores, relevant, candidates)
    curves = np.array([[f(hits, n_relevant, k).sum() for k in range(1, config.max_k + 1)]
                       for f in (lambda h, n, k: metrics.hit_rate(h, k), metrics.recall,
                                 metrics.recall_capped, metrics.ndcg)])
    return values, curves


# -- offline protocols (loo, heldout) -------------------------------------------------------------


def run_offline(split: Split, specs: Sequence[ModelSpec], config: RunConfig) -> list[dict]:
    """One record per model, all on ``split``."""
    return [_run_streaming(split, spec, config) if spec.streaming
            else _run_batch(split, spec, config) for spec in specs]


def _run_batch(split: Split, spec: ModelSpec, config: RunConfig) -> dict:
    """Fit every candidate, keep the best on validation, score it on test."""
    started = time.perf_counter()
    best, best_value, tried = None, -np.inf, []
    for params in spec.grid:
        model = spec.build(**params)
        fit_s = _timed(lambda: model.fit(split.train))
        validation = evaluate_fold(model, split.validation, config,
                                   desc=f"{spec.name} {params} validation").means
        value = validation[config.select_metric]
        tried.append({"params": params, config.select_metric: value, "fit_s": fit_s})
        if value > best_value:
            best, best_value = (model, params, validation, fit_s), value
        del model
    model, params, validation, fit_s = best
    test = evaluate_fold(model, split.test, config, desc=f"{spec.name} test")
    n_train = len(split.train_events)
    return _record(spec.name, params, test, validation, tried, fit_s, n_train,
                   time.perf_counter() - started, len(split.test))


def _run_streaming(split: Split, spec: ModelSpec, config: RunConfig) -> dict:
    """Learn the training events in stream order, then score both folds (no parameter search:
    the streaming model runs with the workers' settings)."""
    started = time.perf_counter()
    params = spec.grid[0]
    model = spec.build(**params)
    try:
        learn_s = _learn_all(model, split.train_events, config)
        validation = evaluate_fold(model, split.validation, config,
                                   desc=f"{spec.name} validation").means
        test = evaluate_fold(model, split.test, config, desc=f"{spec.name} test")
        if hasattr(model, "chosen_params"):  # what the model chose on the stream itself
            params = {**params, **model.chosen_params()}
        record = _record(spec.name, params, test, validation, [], learn_s,
                         len(split.train_events), time.perf_counter() - started, len(split.test))
        if hasattr(model, "retrieval_stats"):
            record["retrieval"] = model.retrieval_stats()
    finally:
        if hasattr(model, "close"):  # a model with processes behind it (--through-kafka)
            model.close()
    return record


def _learn_all(model, events: Events, config: RunConfig, chunk: int = 4096) -> float:
    """Feed ``events`` to ``model.learn`` in stream order, after ``model.start_from`` (the
    whole of them) for a model that starts from a log; returns the seconds spent learning."""
    spent = _timed(lambda: model.start_from(events)) if hasattr(model, "start_from") else 0.0
    with _bar(config, total=len(events), desc=f"{model.name} learning", unit="ev") as bar:
        for start in range(0, len(events), chunk):
            part = events.take(slice(start, start + chunk))
            spent += _timed(lambda: model.learn(part))
            bar.update(len(part))
    return spent


def _record(name, params, test: FoldScores, validation, tried, fit_s, n_train, wall_s,
            scored) -> dict:
    return {"model": name, "params": params, "metrics": test.means,
            "metrics_se": test.errors, "validation": validation,
            "curves": test.curves, "selection": tried, "fit_s": fit_s, "wall_s": wall_s,
            "train_events": n_train,
            "train_events_per_s": n_train / fit_s if fit_s > 0 else None,
            "scored": scored}


def _timed(step: Callable[[], object]) -> float:
    started = time.perf_counter()
    step()
    return time.perf_counter() - started


# -- prequential ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stream:
    """What prequential scoring needs about every event, computed once for all models."""

    dataset: Dataset
    bounds: np.ndarray  # window edges in stream positions; scoring starts at bounds[1]
    scored: np.ndarray  # positions of the events that are scored
    by_user: np.ndarray  # items grouped by user, each user's in their own order
    by_user_ts: np.ndarray  # the times of those events
    user_start: np.ndarray  # offset of each user's first item in by_user
    history_length: int
    info: dict


def prepare_stream(dataset: Dataset, windows: int, history_length: int) -> Stream:
    """Window edges, the events to score, and each user's items in order.

    Events are scored from the end of the first window on (the warm-up every model learns
    from). An event whose item the user already had is not scored: seen items are excluded
    from every ranking, so it could never be a hit.
    """
    ev = dataset.events
    n = len(ev)
    if windows < 2 or n < windows:
        raise ValueError("prequential needs at least 2 windows and one event per window")
    bounds = np.linspace(0, n, windows + 1).astype(np.int64)
    key = ev.users * dataset.n_items + ev.items
    _, first = np.unique(key, return_index=True)
    repeat = np.ones(n, dtype=bool)
    repeat[first] = False
    _, item_first = np.unique(ev.items, return_index=True)
    cold_item = np.zeros(n, dtype=bool)
    cold_item[item_first] = True
    position = np.arange(n)
    scored = np.flatnonzero((position >= bounds[1]) & ~repeat)
    grouped = np.lexsort((ev.order, ev.users))
    counts = np.bincount(ev.users, minlength=dataset.n_users)
    info = {"users": dataset.n_users, "items": dataset.n_items, "events": n,
            "windows": windows, "warmup_events": int(bounds[1]),
            "scored_events": len(scored),
            "repeat_events_skipped": int(repeat[bounds[1]:].sum()),
            "cold_user_events": int((ev.order[scored] == 0).sum()),
            "cold_item_events": int(cold_item[scored].sum()),
            "history_length": history_length}
    return Stream(dataset, bounds, scored, ev.items[grouped], ev.ts[grouped],
                  np.r_[0, np.cumsum(counts)[:-1]], history_length, info)


def stream_rows(stream: Stream, positions: np.ndarray
                ) -> tuple[sp.csr_matrix, sp.csr_matrix, sp.csr_matrix]:
    """(history, seen, times) rows for the events at ``positions``: what the user did before
    each.

    History is the last ``history_length`` items (what a worker keeps per user); seen is every
    earlier item, all of them excluded from the ranking; times holds, on the pattern of
    history, the time of each history item's latest event (the history's time order).
    """
    ev = stream.dataset.events
    n_items = stream.dataset.n_items
    before = ev.order[positions]
    base = stream.user_start[ev.users[positions]]
    seen = _ragged_rows(stream.by_user, base, np.zeros_like(before), before, n_items)
    start = np.maximum(before - stream.history_length, 0)
    history = _ragged_rows(stream.by_user, base, start, before, n_items)
    owner, at = _ragged_positions(base, start, before)
    times = latest_by_cell(owner, stream.by_user[at], stream.by_user_ts[at],
                           (len(base), n_items))
    return history, seen, times


def _ragged_positions(base, start, stop) -> tuple[np.ndarray, np.ndarray]:
    """(row, position in the flat array) of every element of the rows
    ``flat[base[r] + start[r] : base[r] + stop[r]]``, rows in order."""
    lengths = stop - start
    indptr = np.r_[0, np.cumsum(lengths)].astype(np.int64)
    offsets = np.arange(indptr[-1]) - np.repeat(indptr[:-1], lengths)
    return np.repeat(np.arange(len(base)), lengths), np.repeat(base + start, lengths) + offsets


def _ragged_rows(flat, base, start, stop, n_items) -> sp.csr_matrix:
    """Binary CSR whose row r holds ``flat[base[r] + start[r] : base[r] + stop[r]]``."""
    owner, at = _ragged_positions(base, start, stop)
    matrix = sp.csr_matrix((np.ones(len(at), dtype=np.float32), (owner, flat[at])),
                           shape=(len(base), n_items))
    matrix.sum_duplicates()
    matrix.data[:] = 1.0
    return matrix


def run_prequential(stream: Stream, specs: Sequence[ModelSpec],
                    config: RunConfig, learn_batch: int = 1) -> list[dict]:
    """One record per model with totals and the hit-rate curve over the stream."""
    records = []
    for spec in specs:
        started = time.perf_counter()
        if spec.streaming:
            ranks, fit_s, learned = _prequential_streaming(stream, spec, config, learn_batch)
        else:
            ranks, fit_s, learned = _prequential_batch(stream, spec, config)
        record = _record(spec.name, spec.grid[0], _rank_metrics(ranks, config), None, [],
                         fit_s, learned, time.perf_counter() - started, len(ranks))
        record["over_time"] = _over_time(stream, ranks, config)
        records.append(record)
    return records


def _prequential_streaming(stream: Stream, spec: ModelSpec, config: RunConfig,
                           learn_batch: int) -> tuple[np.ndarray, float, int]:
    """Test, then train: rank each batch of ``learn_batch`` events, then learn it.

    With ``learn_batch=1`` every event is ranked by a model that has learned exactly the
    events before it."""
    ev = stream.dataset.events
    model = spec.build(**spec.grid[0])
    reads_times = getattr(model, "reads_times", False)
    spent = _timed(lambda: model.learn(ev.take(slice(0, stream.bounds[1]))))
    ranks = np.full(len(stream.scored), -1, dtype=np.int64)
    is_scored = np.zeros(len(ev), dtype=bool)
    is_scored[stream.scored] = True
    slot = np.cumsum(is_scored) - 1  # stream position -> index into ranks
    start = int(stream.bounds[1])
    with _bar(config, total=len(ev) - start, desc=f"{spec.name} prequential",
              unit="ev") as bar:
        for block in range(start, len(ev), 8192):
            positions = np.arange(block, min(block + 8192, len(ev)))
            history, seen, times = stream_rows(stream, positions)
            for offset in range(0, len(positions), learn_batch):
                rows = slice(offset, offset + learn_batch)
                here = positions[rows]
                wanted = is_scored[here]
                if wanted.any():
                    extra = {"times": times[rows]} if reads_times else {}
                    ranked = model.recommend(history[rows], config.max_k, exclude=seen[rows],
                                             **extra)
                    ranks[slot[here[wanted]]] = _target_rank(ranked[wanted], ev.items[here[wanted]])
                part = ev.take(slice(here[0], here[-1] + 1))
                spent += _timed(lambda: model.learn(part))
                bar.update(len(here))
    return ranks, spent, len(ev)


def _prequential_batch(stream: Stream, spec: ModelSpec,
                       config: RunConfig) -> tuple[np.ndarray, float, int]:
    """Refit on every event before each window, rank the window's events with that model."""
    ev = stream.dataset.events
    ranks = np.full(len(stream.scored), -1, dtype=np.int64)
    spent, learned = 0.0, 0
    with _bar(config, total=len(stream.scored), desc=f"{spec.name} prequential",
              unit="ev") as bar:
        for lo, hi in zip(stream.bounds[1:-1], stream.bounds[2:]):
            model = spec.build(**spec.grid[0])
            train = interaction_matrix(ev.users[:lo], ev.items[:lo], stream.dataset.n_users,
                                       stream.dataset.n_items)
            spent += _timed(partial(model.fit, train))
            learned += int(lo)
            slots = np.flatnonzero((stream.scored >= lo) & (stream.scored < hi))
            for part in np.array_split(slots, max(1, -(-len(slots) // config.batch_size))):
                if len(part) == 0:
                    continue
                positions = stream.scored[part]
                history, seen, _ = stream_rows(stream, positions)
                ranked = model.recommend(history, config.max_k, exclude=seen)
                ranks[part] = _target_rank(ranked, ev.items[positions])
                bar.update(len(part))
            del model
    return ranks, spent, learned


def _target_rank(ranked: np.ndarray, target: np.ndarray) -> np.ndarray:
    """0-based position of each row's target in its ranking, -1 when absent."""
    hits = metrics.hit_matrix(ranked, target)
    return np.where(hits.any(axis=1), hits.argmax(axis=1), -1)


def _rank_hits(ranks: np.ndarray, width: int) -> np.ndarray:
    """The (events, width) hit matrix of single-target events from their target ranks."""
    return (ranks[:, None] == np.arange(width)[None, :]) & (ranks[:, None] >= 0)


def _rank_metrics(ranks: np.ndarray, config: RunConfig) -> FoldScores:
    """Totals over the scored events, with standard errors (no curves vs K: prequential
    reports the curve over time instead)."""
    hits = _rank_hits(ranks, config.max_k)
    one = np.ones(len(ranks), dtype=np.int64)
    values = {}
    for k in config.ks:
        values[f"HR@{k}"] = metrics.hit_rate(hits, k)
        values[f"NDCG@{k}"] = metrics.ndcg(hits, one, k)
    values[f"MRR@{config.max_k}"] = metrics.reciprocal_rank_at(hits, config.max_k)
    n = len(ranks)
    means = {name: float(v.mean()) if n else 0.0 for name, v in values.items()}
    errors = {name: float(v.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0
              for name, v in values.items()}
    return FoldScores(means, errors, None)


def _over_time(stream: Stream, ranks: np.ndarray, config: RunConfig) -> dict:
    """HR@k per bin of consecutive scored events (the running curve), with the stream position
    where each bin ends. Bins hold about 1000 events or more (5 to 50 bins): fewer events per
    point and the curve shows mostly sampling noise."""
    hits = _rank_hits(ranks, config.max_k)
    bins = min(int(np.clip(len(ranks) // 1000, 5, 50)), max(len(ranks), 1))
    edges = np.linspace(0, len(ranks), bins + 1).astype(np.int64)
    curve = {"event": [int(stream.scored[e - 1]) + 1 for e in edges[1:] if e > 0]}
    for k in config.ks:
        hit = metrics.hit_rate(hits, k)
        curve[f"HR@{k}"] = [float(hit[a:b].mean()) for a, b in zip(edges[:-1], edges[1:])
                            if b > a]
    return curve
