"""The streaming model slot of the harness: anything that learns from batches of events in stream
order and ranks items for history rows.

Three fill it: ``OnlinePopularity`` (the engine's decayed popularity of :mod:`state.popularity`,
with the workers' kind weights and half-life), ``OnlineEmbedding`` (the workers' online model,
through the engine's own learning code) and ``OnlineDeepRetrieval`` (the same model ranking only
the items on its Deep Retrieval paths, measured against brute force as it goes).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
import scipy.sparse as sp

from state.popularity import DecayedPopularity

from .data import Events

if TYPE_CHECKING:
    from stream_app.wire import TrainExample


@runtime_checkable
class StreamingModel(Protocol):
    """Learns online; ranks read-only.

    ``learn`` takes a batch of events in stream order (a batch of one is plain online
    learning). ``recommend`` has the batch baselines' signature: ``(rows, k)`` item indices for
    history rows, best first, nothing from ``exclude``, ``-1`` padding. A model may also offer
    ``score(history) -> (rows, n_items)``; the harness then reports the full-ranking metrics
    (MRR, AUC) for it as well.
    """

    name: str

    def learn(self, events: Events) -> None: ...

    def recommend(self, history: sp.csr_matrix, k: int,
                  exclude: sp.csr_matrix | None = None) -> np.ndarray: ...


class OnlinePopularity:
    """Decayed item popularity (the serving engine's model), learned event by event.

    The popularity ranking cache is refreshed on every read (``refresh_s=0``) and keyed on event
    time, so a replay is deterministic instead of depending on wall-clock timing.
    """

    name = "streaming"

    def __init__(self, n_items: int, half_life_s: float) -> None:
        self.n_items = n_items
        self.popularity = DecayedPopularity(half_life_s, refresh_s=0.0)
        self._keys = [str(item) for item in range(n_items)]
        self._learned = 0
        self._scores_at = -1
        self._scores = np.zeros(n_items)

    def learn(self, events: Events) -> None:
        for item, ts, weight in zip(events.items.tolist(), events.ts.tolist(),
                                    events.weights.tolist()):
            self.popularity.add(self._keys[item], ts, weight)
        self._learned += len(events)

    def recommend(self, history: sp.csr_matrix, k: int,
                  exclude: sp.csr_matrix | None = None) -> np.ndarray:
        ranked = np.full((history.shape[0], min(k, self.n_items)), -1, dtype=np.int64)
        for row in range(history.shape[0]):
            seen = () if exclude is None else \
                [self._keys[i] for i in exclude.indices[exclude.indptr[row]:exclude.indptr[row + 1]]]
            top = [int(item) for item, _ in self.popularity.top(k, exclude=seen)]
            ranked[row, :len(top)] = top
        return ranked

    def score(self, history: sp.csr_matrix) -> np.ndarray:
        """Current decayed counts, the same for every row (popularity reads no history)."""
        if self._scores_at != self._learned:
            self._scores = np.array([self.popularity.count(key) for key in self._keys])
            self._scores_at = self._learned
        return np.broadcast_to(self._scores, (history.shape[0], self.n_items)).copy()


class OnlineEmbedding:
    """The workers' online model, run through the same code as the stream: per event, a
    training example carrying the user's history *before* the event, and micro-batches of
    :meth:`Engine.learn` (encode each example's user with the current item vectors, then the
    item step: closed-form per-item solves, or Adagrad, as the settings say). Ranking is exact
    MIPS over the learned items, with the history row the harness passes in as the user's
    history (its stored values as confidence weights: the splits store 1 for every item,
    as a worker weighs a request's ``history``, so a dataset of several kinds, MovieLens, is
    learned weighted by kind and scored unweighted). Given ``times`` (the row's items with
    the time of each), the history is read as a worker keeps it: in time order, the newest
    ``history_length`` items, with their times for the encoder's recency decay."""

    name = "streaming"
    reads_times = True

    def __init__(self, n_items: int, settings) -> None:
        from stream_app.engine import Engine

        self.n_items = n_items
        self.settings = settings
        self.engine = Engine(settings)
        self._keys = [str(item) for item in range(n_items)]
        self._histories: dict[int, tuple[list[str], list[float], list[float]]] = {}
        self._pending: list = []

    def learn(self, events: Events) -> None:
        for example, new_user in training_examples(events, self._keys, self._histories,
                                                   self.settings.history_length):
            self.engine.users += new_user
            self._pending.append(example)
            if len(self._pending) == self.settings.learn_batch:
                self._flush()
        self._flush()

    def _flush(self) -> None:
        self.engine.learn(self._pending)
        self._pending = []

    def user_vectors(self, history: sp.csr_matrix,
                     times: sp.csr_matrix | None = None) -> np.ndarray:
        """φ(u) of each history row with the current item vectors."""
        phis = np.zeros((history.shape[0], self.settings.model_dim))
        for row in range(history.shape[0]):
            span = slice(history.indptr[row], history.indptr[row + 1])
            newest, ts = newest_in_time_order(history, times, row,
                                              self.settings.history_length)
            cols, weights = history.indices[span][newest], history.data[span][newest]
            phis[row] = self.engine.encode_weighted([self._keys[c] for c in cols],
                                                    np.asarray(weights), ts, serving=True)
        return phis

    def chosen_params(self) -> dict:
        """How the model answers after its pass: the serving pair it picked on the stream
        (``Engine.serving``) and the weighted NDCG@10 each candidate had there."""
        choice = self.engine.serving_choice
        return {"serve_half_life_events": self.engine.serving.half_life_events,
                "serve_bias_weight": self.engine.serving.bias_weight,
                "serving_samples": choice.samples,
                "serving_ndcg": [{"half_life_events": c.half_life_events,
                                  "bias_weight": c.bias_weight, "ndcg": float(m)}
                                 for c, m in zip(choice.candidates, choice.means)]}

    def score(self, history: sp.csr_matrix, times: sp.csr_matrix | None = None) -> np.ndarray:
        """ŷ for every (history row, item); items never learned score −inf."""
        return self._scores(self.user_vectors(history, times))

    def _scores(self, phis: np.ndarray) -> np.ndarray:
        learner = self.engine.learner
        rows = learner.rows_of(self._keys)
        known = rows >= 0
        psi = learner.item_matrix[rows[known]]
        scores = np.full((len(phis), self.n_items), -np.inf)
        scores[:, known] = self.engine.serving_query(phis) @ psi.T
        return scores

    def recommend(self, history: sp.csr_matrix, k: int, exclude: sp.csr_matrix | None = None,
                  times: sp.csr_matrix | None = None) -> np.ndarray:
        return self._brute_force(self.user_vectors(history, times), k, exclude)

    def _brute_force(self, phis: np.ndarray, k: int,
                     exclude: sp.csr_matrix | None) -> np.ndarray:
        """Exact top ``k`` of each user vector, in blocks of 512 rows."""
        ranked = np.full((len(phis), min(k, self.n_items)), -1, dtype=np.int64)
        for start in range(0, len(phis), 512):
            block = slice(start, min(start + 512, len(phis)))
            scores = self._scores(phis[block])
            if exclude is not None:
                part = exclude[block].tocoo()
                scores[part.row, part.col] = -np.inf
            top = np.argsort(-scores, axis=1, kind="stable")[:, :ranked.shape[1]]
            valid = np.take_along_axis(scores, top, axis=1) > -np.inf
            ranked[block] = np.where(valid, top, -1)
        return ranked


def training_examples(events: Events, keys: Sequence[str],
                      histories: dict[int, tuple[list[str], list[float], list[float]]],
                      limit: int) -> Iterator[tuple[TrainExample, bool]]:
    """Per event in stream order, the training example a worker writes for it (the user's
    newest ``limit`` events before it, oldest first; ``keys``: item ids by index) and whether
    the user is new. ``histories`` (user → items, weights, times) goes on across calls."""
    from stream_app.wire import TrainExample

    for user, item, weight, ts in zip(events.users.tolist(), events.items.tolist(),
                                      events.weights.tolist(), events.ts.tolist()):
        items, weights, times = histories.setdefault(user, ([], [], []))
        yield TrainExample(user_id=str(user), item_id=keys[item], alpha=weight, ts=ts,
                           history=list(items), weights=list(weights),
                           history_ts=list(times)), not items
        for values, value in ((items, keys[item]), (weights, weight), (times, ts)):
            values.append(value)
            del values[:-limit]


def newest_in_time_order(history: sp.csr_matrix, times: sp.csr_matrix | None, row: int,
                         limit: int) -> tuple[np.ndarray, np.ndarray]:
    """The newest ``limit`` items of a history row as a worker keeps them, oldest first:
    their positions within the row's stored entries, and their times from ``times`` (which
    must hold every item of the row). Without ``times``, column order and times of 0."""
    span = slice(history.indptr[row], history.indptr[row + 1])
    cols = history.indices[span]
    if times is None:
        ts = np.zeros(len(cols))
    else:
        stored = times.indices[times.indptr[row]:times.indptr[row + 1]]
        at = np.searchsorted(stored, cols)
        if len(cols) and (at.max() >= len(stored) or (stored[at] != cols).any()):
            raise ValueError("times must hold every history item of the row")
        ts = np.asarray(times.data[times.indptr[row] + at], dtype=np.float64)
    newest = np.argsort(ts, kind="stable")[max(len(cols) - limit, 0):]
    return newest, ts[newest]


class BootstrappedEmbedding(OnlineEmbedding):
    """The online model started as ``streamrec bootstrap`` starts a deployment: before its
    first events, every item they hold gets a vector from the randomized SVD of their
    co-occurrence PMI (LED §5.1), as its prior; then the stream is learned as by
    :class:`OnlineEmbedding`. In a harness run the bootstrap reads the training events the
    stream then replays (a deployment reads its past log, then its new events), so it shows
    what the prior adds to one streaming pass, with one more pass over the log to build it."""

    name = "streaming-bootstrap"

    def start_from(self, events: Events) -> None:
        """The bootstrap, from the whole of the training events (the harness calls it before
        it feeds them to :meth:`learn` in chunks). The prequential protocol has no log before
        its stream and does not call it: there the row is ``streaming``."""
        from models.bootstrap import assign_log_priors

        # the learner's keys are the items' indices as strings, as the ids it is given here
        assign_log_priors(self.engine.learner, events.users, events.items,
                          seed=self.settings.model_seed)


class OnlineDeepRetrieval(OnlineEmbedding):
    """The same online model with Deep Retrieval learned beside it (as a worker with
    ``dr_enabled`` does), ranking only the items on the paths a beam search finds for the user
    (the ``dr`` source): the items there are scored by the model, the rest never are.

    M-steps run every ``dr_m_step_events`` learned pairs and once more before ranking, where
    a worker runs them on its timer. Ranking also measures, on the same rows and the same model,
    what brute force would return: ``retrieval_stats`` gives the overlap of the two top
    ``compare_at`` lists, the share of the catalogue scored per query and the in-process
    latency of the beam search plus the path union.
    """

    name = "streaming-dr"
    full_ranking = False  # MRR and AUC would be brute force's: the rows rank only candidates

    def __init__(self, n_items: int, settings, compare_at: int = 50) -> None:
        import torch

        torch.set_num_threads(1)  # as a worker runs it: the structure model's steps are tiny
        super().__init__(n_items, settings.replace(dr_enabled=True))
        self.compare_at = compare_at
        self._stale = False
        self._overlaps: list[float] = []
        self._scored: list[int] = []
        self._seconds: list[float] = []

    def learn(self, events: Events) -> None:
        super().learn(events)
        paths = self.engine.paths
        if paths.events_since_m_step >= paths.policy.events:
            paths.run_m_step_now()
        self._stale = paths.events_since_m_step > 0

    def recommend(self, history: sp.csr_matrix, k: int, exclude: sp.csr_matrix | None = None,
                  times: sp.csr_matrix | None = None) -> np.ndarray:
        import time

        if self._stale:
            self.engine.paths.run_m_step_now()
            self._stale = False
        phis = self.user_vectors(history, times)  # once, for brute force and for the beam
        brute = self._brute_force(phis, max(k, self.compare_at), exclude)
        ranked = np.full((history.shape[0], min(k, self.n_items)), -1, dtype=np.int64)
        for row, phi in enumerate(phis):
            banned = set() if exclude is None else {
                self._keys[i] for i in exclude.indices[exclude.indptr[row]:
                                                       exclude.indptr[row + 1]].tolist()}
            started = time.perf_counter()  # the history left out before the candidates' cut,
            found = [int(i) for i in self.engine.paths.retrieve(phi, banned)]  # as a worker's
            self._seconds.append(time.perf_counter() - started)
            self._scored.append(len(found))
            scores = self.engine.learner.scores_of(phi, [self._keys[i] for i in found],
                                                   self.engine.serving.bias_weight)
            order = np.argsort(-scores, kind="stable")
            top = [found[i] for i in order if np.isfinite(scores[i])]
            ranked[row, :min(len(top), ranked.shape[1])] = top[:ranked.shape[1]]
            wanted = set(brute[row, :self.compare_at].tolist()) - {-1}
            if wanted:
                self._overlaps.append(len(wanted & set(top[:self.compare_at])) / len(wanted))
        return ranked

    def retrieval_stats(self) -> dict:
        """Over every row ranked so far (validation and test folds)."""
        seconds = np.array(self._seconds or [np.nan])
        scored = np.array(self._scored or [0])
        return {
            f"overlap_with_brute_force@{self.compare_at}": float(np.mean(self._overlaps)),
            "items_scored_mean": float(scored.mean()),
            "fraction_scored": float(scored.mean() / self.n_items),
            "retrieve_ms_p50": float(np.median(seconds) * 1e3),
            "retrieve_ms_p99": float(np.quantile(seconds, 0.99) * 1e3),
            **{f"dr_{key}": value if np.isfinite(value) else None  # JSON has no NaN
               for key, value in self.engine.paths.stats().items()},
        }
