"""What the agents do, without Faust: take an event into state, learn, answer a request.

The agents in :mod:`stream_app.app` only decode, call these methods, write the table and send.
Keeping the logic here means it is tested without a broker and reused by the evaluation harness.
"""

from __future__ import annotations

import base64
import logging
import math
import time
import zlib
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from itertools import chain
from pathlib import Path
from typing import NamedTuple

import numpy as np
from river import stats

from index_sync.clusters import ClusteredIndex
from index_sync.paths import PathRetrieval
from index_sync.serving import ServingIndex
from models.deep_retrieval import DeepRetrieval
from models.embedding import augment_users, user_gradient
from models.encoders import (history_gradient, history_weights, ials_fold_in, mean_encoder,
                             mean_encoder_batch, position_weights, ragged_position_weights)
from models.learner import ItemLearner, ItemReplica, RowDelta
from models.serving_choice import (ServingCandidate, ndcg_of_ranks, pool_positions,
                                   target_ranks)
from state.gramian import load_npz, save_npz
from state.history import MAX_STORED_BYTES, WORST_EVENT_BYTES, History
from state.popularity import DecayedPopularity
from state.stream_positions import (EventPositions, StreamPositions, noted_topic_id,
                                   positions_void, renewed_at)

from .settings import Settings
from .wire import (SOURCES, DecodedTraining, Event, ForgetUser, InvalidMessage, RecItem,
                   RecRequest, RecResponse, TrainBatch, TrainExample, decode_offset_steps,
                   is_offset_steps)

log = logging.getLogger(__name__)

# searches of the serving index asked again when the withdrawn items among the candidates
# leave fewer than k (Engine._index_rows): each excludes the withdrawn rows the last found,
# and the last of them every withdrawn row (of at most WITHDRAWN_EXCLUDED_AT_MOST withdrawn
# items: a search asks for as many more candidates as it excludes; past that many, an answer
# still short after the last search is made by exact search)
WITHDRAWN_RETRIES = 3
WITHDRAWN_EXCLUDED_AT_MOST = 5_000
# a history whose record would pass the producer's limit is cut to its newest events that
# fit in this share of it (Engine._fitted): the next events grow it back before another cut
HISTORY_CUT_TO = 0.9


def item_partition(item_id: str, partitions: int) -> int:
    """The train-topic partition (and so the learner) that owns an item: a stable hash, the
    same in every process and every run (Python's own ``hash`` of str is salted). It is also
    the item's lane for the positives' discount (``LearnerConfig.positive_lanes``)."""
    return zlib.crc32(item_id.encode()) % partitions


def encode_phi(phi: np.ndarray) -> str:
    return base64.b64encode(np.asarray(phi, dtype="<f4").tobytes()).decode()


def decode_phi(text: str) -> np.ndarray | None:
    if not text:
        return None
    return np.frombuffer(base64.b64decode(text), dtype="<f4").astype(np.float64)


@dataclass(frozen=True)
class _Histories:
    """B histories' events, flat (CSR): history b is ``[indptr[b], indptr[b+1])`` of ``rows``
    (learner rows, −1 for items not known), ``weights`` (confidence × recency in events) and
    ``ts`` (None unless the encoder decays by time); ``ids`` the events' item ids (the rows of
    items met since can be looked up again). :meth:`known` keeps the events of known items."""

    indptr: np.ndarray
    rows: np.ndarray
    weights: np.ndarray
    ts: np.ndarray | None
    ids: list[str]

    @property
    def lengths(self) -> np.ndarray:
        """Every event of each history, known item or not."""
        return np.diff(self.indptr)

    def known(self) -> _Histories:
        known = self.rows >= 0
        owner = np.repeat(np.arange(len(self.indptr) - 1), self.lengths)[known]
        indptr = np.r_[0, np.cumsum(np.bincount(owner, minlength=len(self.indptr) - 1))]
        return _Histories(indptr, self.rows[known], self.weights[known],
                          None if self.ts is None else self.ts[known], [])


class CheckpointWritten(NamedTuple):
    """What the last checkpoint of the model wrote (``Engine.save``), for the metrics."""

    kind: str  # "base" (the item model written whole) or "delta" (its rows changed since)
    bytes: int  # the item model's and Deep Retrieval's files written
    seconds: float


class Ingested(NamedTuple):
    """What :meth:`Engine.ingest_many` made of a batch of events."""

    # the new history of every user whose history changed; an empty one for a user erased by
    # a ForgetUser with no event of theirs after it, whose history is to be deleted
    updated: dict[str, History]
    # one training example per event; for an event its history holds already, the example
    # made again where the history took in its message before (a redelivery), else None
    examples: list[TrainExample | None]
    repeated: list[bool]  # per event: its history holds it already (nothing changes there)


@dataclass(frozen=True)
class LearnedReport:
    """What one learning call changed, for an engine that follows a learner elsewhere
    (:meth:`Engine.follow`): the item rows, the batch's items and what the metrics show."""

    delta: RowDelta
    items: list[str]  # distinct items of the learned examples (the index rebuild policy)
    step_seconds: list[float]
    losses: list[float]
    dr_losses: list[float]  # finite E-step losses only
    dr_stats: dict | None  # with the structure model only: a pass over the new items' paths
    dr_new_items: list[str]  # items Deep Retrieval met first in this call, with their paths
    dr_new_paths: np.ndarray | None
    dr_weights: dict | None  # the structure model, at most every dr_follow_model_s
    examples: int
    failed: int  # examples of steps that raised (logged where they ran)
    serving: dict  # the serving choice's state (ServingChoice.state)
    installed: bool = False  # rows taken from the item-rows topic (install_rows), not learned
    # (rows, summed steps) the input offsets took here since the last report, with share_items
    input_steps: tuple[np.ndarray, np.ndarray] | None = None
    redelivered: int = 0  # training messages skipped: the model held them already
    steps_added: int = 0  # other workers' offset steps added (sharing): on its items' offsets
    repeated_examples: int = 0  # examples skipped: made again for events the model learned
    # every input offset moved so far is in this report or an earlier one: a follower then
    # holds all the learning of the batches reported (what a publish of its rows may commit)
    complete: bool = False


def _users_of(users: Sequence[int | None] | None, start: int, step: int) -> int | None:
    """The active users a micro-batch is learned with: the most its examples' messages said
    (the latest of them), None where none said."""
    said = [count for count in (users or ())[start:start + step] if count is not None]
    return max(said) if said else None


def _take_dr(model: DeepRetrieval, items: list[str], paths: np.ndarray | None,
             weights: dict | None) -> None:
    """What a report brings a following Deep Retrieval: new items with their paths, and the
    structure model when it rides along."""
    if items:
        model.add_items(items, paths)
    if weights is not None:
        model.set_structure_weights(weights)


class _WeightOfKind(dict):
    """kind → confidence weight; a kind that is not configured (any more) weighs 1."""

    def __missing__(self, kind: str) -> float:
        return 1.0


class Engine:
    """The worker's model state and the decisions made on it."""

    #: "ann" retrieves from the serving HNSW index (exact search while the catalog is small or
    #: before the first build); "dr" from the items on the Deep Retrieval paths a beam search
    #: finds for the user. Their candidates are scored once, together, and each returned item
    #: names the source that produced it ("ann" where both did); "popular" fills up.
    available_sources = ("ann", "dr", "popular")
    #: the sources that rank with the user's vector
    model_sources = frozenset({"ann", "dr"})

    def __init__(self, settings: Settings, metrics=None, *, replica: bool = False) -> None:
        """``replica``: the item model is learned elsewhere (a learner process) and this engine
        follows it (:meth:`follow`): its learner is an :class:`ItemReplica`."""
        self.settings = settings
        self.metrics = metrics  # a stream_app.metrics.Metrics, or None (tools, the harness)
        self.popularity = DecayedPopularity(settings.popularity_half_life_s,
                                            refresh_s=settings.popularity_refresh_s,
                                            events_topic=settings.topic_events)
        self.learner = (ItemReplica if replica else ItemLearner)(settings.learner_config())
        self.learner.log_input_steps = settings.share_items and not replica
        self.learner.checkpoints.compact_share = settings.checkpoint_delta_share
        self.index = ServingIndex(self.learner, settings.index_config())
        self.paths: PathRetrieval | None = None
        if settings.dr_enabled:
            self.paths = PathRetrieval(settings.dr_config(), settings.m_step_policy(),
                                       settings.dr_max_candidates, track_scores=not replica)
            self.paths.model.checkpoints.compact_share = settings.checkpoint_delta_share
        self.dr_loss = stats.EWMean(fading_factor=0.05)
        self.last_dr_loss = float("nan")
        self.loss = stats.EWMean(fading_factor=0.05)
        self.reported_dr_stats: dict | None = None  # a followed learner's, see follow()
        self._weights_sent_at = -math.inf  # when a report last carried the DR structure model
        self._inputs_sent_at = -math.inf  # when a report last carried the moved input offsets
        self._inputs_moved: list[np.ndarray] = []  # input rows moved since
        # (items, paths, weights) of reports followed while saved paths are read aside
        # what reports brought Deep Retrieval since each read of the paths under way began
        self._followed_during_reads: list[list[tuple]] = []
        self._weight_of_kind = _WeightOfKind(settings.kind_weights)
        # a stored history's bytes but its events': the user vector (base64 of d + 1 floats,
        # reserved whole: a new user's comes after the check) and the record's keys
        self._stored_bytes_for_events = MAX_STORED_BYTES - 8 * (settings.model_dim + 1) - 256
        # histories of at most this many events fit whatever their ids: not measured
        self._events_always_fit = self._stored_bytes_for_events // WORST_EVENT_BYTES
        self.histories_cut = 0  # histories cut to their newest events to fit (History.fitting)
        self.users = 0  # users whose history this worker holds
        # per events partition, the newest event time taken in from it since this start: the
        # clocks of history expiry (one partition's backlog must not expire another's users)
        self.newest_event_ts: dict[int, float] = {}
        # items withdrawn from the catalogue (stream_app.withdrawals): never answered
        self.withdrawn: frozenset[str] = frozenset()
        # (the withdrawn set, the items learned then, their rows): Engine._withdrawn_rows
        self._withdrawn_rows_cache: tuple[frozenset[str], int, np.ndarray] | None = None
        self.behind = 0  # events the worker has yet to take in (stream_app.intake.IntakeLag)
        self.learned = 0  # training examples applied
        # the training topic's offsets the model holds, saved with it (a replica's stay empty)
        self.positions = StreamPositions(settings.train_topic)
        self.redelivered = 0  # training messages skipped: the model held them already
        # the events topic's offsets whose examples the model holds, saved with it
        self.event_positions = EventPositions(settings.topic_events)
        # the broker's id of the events topic, as noted at this worker's start (load): the
        # training messages name it, and a learner takes the places of those that name
        # another (an events topic since made anew) for none (_sources_here)
        self.events_topic_id: str | None = None
        self.repeated_examples = 0  # examples skipped: made again for events it learned
        self.checkpointed_at = time.time()
        self.last_checkpoint: CheckpointWritten | None = None  # none yet by this process
        # How requests are answered: the settings' pair, then the best measured on the
        # stream (models/serving_choice.py); a replica takes the learner's from its reports.
        self.serving_choice = settings.serving_choice()
        self._tuning_rng = np.random.default_rng(settings.model_seed)

    @property
    def serving(self) -> ServingCandidate:
        """The serving pair that answers now: the choice's pick (models/serving_choice.py)."""
        return self.serving_choice.best

    @property
    def model_version(self) -> int:
        """Learning steps applied so far: it moves forward with every micro-batch."""
        return self.learner.steps

    # -- user vectors -----------------------------------------------------------------------
    def encode(self, items: Sequence[str], kinds: Sequence[str],
               ts: Sequence[float]) -> np.ndarray:
        """φ(u) from a history with the current item vectors; zeros if no item is known yet
        (whose ranking is the bias ranking, LED §7.2)."""
        return self.encode_weighted(items, self._kind_weights(kinds), ts)

    def _kind_weights(self, kinds: Sequence[str]) -> np.ndarray:
        return np.array(self._kind_weight_list(kinds))

    def _kind_weight_list(self, kinds: Sequence[str]) -> list[float]:
        """Confidence of each event kind (1 for a kind no longer configured); runs over a
        whole history (once per user of an ingest batch), so it maps instead of looping."""
        return list(map(self._weight_of_kind.__getitem__, kinds))

    def encode_weighted(self, items: Sequence[str], weights: np.ndarray,
                        ts: Sequence[float], *, serving: bool = False) -> np.ndarray:
        """:meth:`encode` with the confidence weight of each event given directly; with
        ``serving``, the vector that answers requests (the recency of :attr:`serving`)."""
        half_life = (self.serving.half_life_events if serving
                     else self.settings.encoder_half_life_events)
        return self._encode_rows(self.learner.rows_of(items), weights, ts, half_life)

    def _encode_rows(self, rows: np.ndarray, weights: np.ndarray, ts: Sequence[float],
                     half_life: float | None) -> np.ndarray:
        """:meth:`encode_weighted` from the learner rows of the items (−1: unknown), with the
        recency ``half_life`` in events (None: none)."""
        known = rows >= 0
        if not known.any():
            return np.zeros(self.settings.model_dim)
        weights = np.asarray(weights, dtype=np.float64)
        if half_life is not None:  # places among all events
            weights = weights * position_weights(len(weights), half_life)
        weights = weights[known]
        if self.settings.encoder == "ials":
            return ials_fold_in(self.learner.item_matrix[rows[known]], weights,
                                self.learner.item_gramian.matrix, self.learner.alpha0,
                                self.settings.l2)
        return mean_encoder(self.learner.input_rows(rows[known]), weights,
                            np.asarray(ts, dtype=np.float64)[known],
                            self.settings.encoder_half_life_s)

    def _encode_history(self, history: History) -> np.ndarray:
        return self.encode(history.items, history.kinds, history.ts)

    @property
    def uses_event_times(self) -> bool:
        """Whether user vectors depend on event times (the mean encoder's decay in seconds);
        training examples carry their history's times only then."""
        return self.settings.encoder == "mean" and self.settings.encoder_half_life_s is not None

    def _encode_many(self, items: Sequence[Sequence[str]], weights: Sequence[Sequence[float]],
                     ts: Sequence[Sequence[float]]) -> np.ndarray:
        """:meth:`encode_weighted` of B histories at once: (B, d). The mean encoder runs as
        one sparse product over the batch (no Python loop per event); ``ials`` solves per
        user. ``ts`` is read only where :attr:`uses_event_times`."""
        if self.settings.encoder == "ials" or not items:
            return np.array([self.encode_weighted(i, np.asarray(w), t)
                             for i, w, t in zip(items, weights, ts)]).reshape(
                len(items), self.settings.model_dim)
        return self._mean_encode(self._flat_histories(items, weights, ts).known())

    def _flat_histories(self, items: Sequence[Sequence[str]],
                        weights: Sequence[Sequence[float]],
                        ts: Sequence[Sequence[float]]) -> _Histories:
        """B histories flattened for the mean encoder: each event with its learner row and
        its confidence times recency among all the history's events."""
        lengths = np.fromiter(map(len, items), dtype=np.int64, count=len(items))
        indptr = np.r_[0, np.cumsum(lengths)]
        events = int(indptr[-1])
        ids = list(chain.from_iterable(items))
        flat_weights = np.fromiter(chain.from_iterable(weights), dtype=np.float64, count=events)
        flat_ts = (np.fromiter(chain.from_iterable(ts), dtype=np.float64, count=events)
                   if self.uses_event_times else None)
        if self.settings.encoder_half_life_events is not None:  # places among all events
            flat_weights = flat_weights * ragged_position_weights(
                indptr, self.settings.encoder_half_life_events)
        return _Histories(indptr, self.learner.rows_of(ids), flat_weights, flat_ts, ids)

    def _mean_encode(self, histories: _Histories) -> np.ndarray:
        """φ of histories of known items (:meth:`_Histories.known`)."""
        return mean_encoder_batch(self.learner.item_matrix, histories.indptr, histories.rows,
                                  histories.weights, histories.ts,
                                  self.settings.encoder_half_life_s,
                                  columns=self.settings.model_dim,
                                  offsets=self.learner.offsets)

    # -- events ---------------------------------------------------------------------------
    def ingest_many(self, events: Sequence[Event | ForgetUser],
                    histories: Mapping[str, History],
                    sources: Sequence[tuple[int, int]] | None = None) -> Ingested:
        """:meth:`ingest` of a batch of valid events in stream order, against the users' stored
        histories (a user missing from ``histories`` has none). A :class:`ForgetUser` erases
        its user's history as of its place in the batch (no example; ``repeated`` False).

        ``sources``: each event's (partition, offset) in the events topic, carried by its
        training example and kept by the history as where it stands. With them, an event that
        its history holds already (its ``event_id``) and whose message the history has taken
        in (a redelivery, not a client's duplicate) gets its example made again, from the
        history as it stood before the event: the worker that read it first may have died
        before its training message reached the broker, and the learner takes an example at
        most once by its source (``state.stream_positions.EventPositions``). The history
        keeps its last offset, not one per event: a client's duplicate read again with the
        rest after a crash passes for a redelivery too, and its example is learned if no
        later example of its training partition was. The popularity counts each event whose
        place it does not hold (a redelivery too, where a crash lost its count), once.

        Without ``sources``, equal to calling :meth:`ingest` event by event (tested), but each
        user's vector is encoded once, after the user's last event of the batch, and all of
        them in one product: the stored vector is only ever read after the batch. Each user's
        confidence weights are looked up once and then follow the history event by event,
        and the batch's events are counted in the popularity at once."""
        current: dict[str, tuple[History, list[float]]] = {}
        examples: list[TrainExample | None] = []
        repeated: list[bool] = []
        countable: list[TrainExample] = []  # into the popularity, where it lacks them
        redelivered: set[tuple[str, str]] = set()  # (user, event id) of redeliveries
        for n, event in enumerate(events):
            if isinstance(event, ForgetUser):
                self._forget(event.user_id, current, histories)
                examples.append(None)
                repeated.append(False)
                continue
            taken = current.get(event.user_id)
            if taken is None:
                history = histories.get(event.user_id) or History()
                taken = (history, self._kind_weight_list(history.kinds))
            source = None if sources is None else sources[n]
            if self._taken_and_gone(event, taken[0], source):
                examples.append(None)
                repeated.append(True)
                if self._first_redelivery(event, redelivered):  # counted if it was lost
                    countable.append(self._example(event, self._weight_of_kind[event.kind],
                                                   (), [], (), source))
                continue
            step = self._append(event, *taken, source)
            repeated.append(step is None)
            if step is None:  # not a client's duplicate: read again
                read_before = taken[0].read_before(source, self._events_topic)
                examples.append(self._remade(event, *taken, source) if read_before else None)
                if read_before and self._first_redelivery(event, redelivered):
                    countable.append(examples[-1])  # counted if the popularity lost it
                continue
            history, weights, example = step
            if len(history) > self._events_always_fit:  # never at the default length
                fitting = self._fitted(event.user_id, history)
                history, weights = fitting, weights[len(weights) - len(fitting):]
            current[event.user_id] = (history, weights)
            examples.append(example)
            countable.append(example)
        if sources is not None:
            self._note_event_times(events, sources)
        kept = [(user, taken) for user, taken in current.items() if taken[0]]
        phis = self._encode_many([history.items for _, (history, _) in kept],
                                 [weights for _, (_, weights) in kept],
                                 [history.ts for _, (history, _) in kept])
        updated = {user: history for user, (history, _) in current.items() if not history}
        updated.update((user, history.with_phi(encode_phi(phi)))
                       for (user, (history, _)), phi in zip(kept, phis))
        self._count(countable)
        return Ingested(updated, examples, repeated)

    def _fitted(self, user: str, history: History) -> History:
        """``user``'s history, or, where its stored record would pass the producer's limit,
        its newest events that fit in :data:`HISTORY_CUT_TO` of it (:meth:`History.fitting`),
        counted and logged. A ``history_length`` of hundreds and ids of hundreds of
        characters make records the broker refuses: the batch that wrote one was sent again
        for ever and never committed. Cut below the limit, a history at it is not cut (and
        measured by halves) again at each event. Only histories longer than any that always
        fit are measured (one JSON encoding each)."""
        if (len(history) <= self._events_always_fit
                or history.stored_bytes() <= self._stored_bytes_for_events):
            return history
        fitting = history.fitting(int(self._stored_bytes_for_events * HISTORY_CUT_TO))
        self.histories_cut += 1
        (log.warning if self.histories_cut == 1 else log.debug)(
            "the history of user %r is cut to its newest %d events of %d: its record would "
            "pass %d bytes (STREAMREC_HISTORY_LENGTH %d, long ids)", user, len(fitting),
            len(history), MAX_STORED_BYTES, self.settings.history_length)
        return fitting

    @property
    def _events_topic(self) -> str:
        """The broker's id of the events topic, as the histories note it ("": not known)."""
        return self.events_topic_id or ""

    def _taken_and_gone(self, event: Event, history: History,
                        source: tuple[int, int] | None) -> bool:
        """Whether ``event``, read again (its place is at or below the history's, in the
        same events topic), is no longer in the window: erased since (the history is a later
        one), left it, or an event without an id, which the window cannot tell. It is not
        taken in again: appended, it came after the events that followed it, and its
        example from them. Only where the topic's id is known: an events topic made anew
        under the same name starts its offsets again, and a history of the old one would
        take its new messages for old ones."""
        return (source is not None and bool(self._events_topic)
                and history.read_before(source, self._events_topic)
                and not history.has_event(event.event_id))

    @staticmethod
    def _first_redelivery(event: Event, redelivered: set[tuple[str, str]]) -> bool:
        """Whether ``event``, read again, is the first of its id for its user in the batch:
        the history keeps the offset of its last event, not one per event, so a client's
        duplicate (the same id at a later offset) read again with the rest after a crash
        passes for a redelivery too. Within a batch it is told apart here; read again in
        another batch than its original, it is counted as one more event."""
        if event.event_id is None:
            return True
        key = (event.user_id, event.event_id)
        if key in redelivered:
            return False
        redelivered.add(key)
        return True

    def _count(self, examples: list[TrainExample]) -> None:
        """The events of ``examples`` into the popularity: by their places in the events
        topic, those it does not hold (:meth:`DecayedPopularity.add_unheld`), all of them
        where they have none (an offline ingest, which never reads an event twice). Done
        last in a batch, so a batch that fails before it counts nothing, and one that fails
        after it (its writes) counts its events once though it is taken again event by
        event."""
        if examples and examples[0].source is not None:
            self.popularity.add_unheld([example.item_id for example in examples],
                                       [example.ts for example in examples],
                                       [example.alpha for example in examples],
                                       [example.source for example in examples])
            return
        self.popularity.add_many([example.item_id for example in examples],
                                 [example.ts for example in examples],
                                 [example.alpha for example in examples])

    def _note_event_times(self, events: Sequence[Event | ForgetUser],
                          sources: Sequence[tuple[int, int]]) -> None:
        newest = self.newest_event_ts
        for event, (partition, _) in zip(events, sources):
            if isinstance(event, Event) and event.ts > newest.get(partition, -math.inf):
                newest[partition] = event.ts

    def _forget(self, user: str, current: dict[str, tuple[History, list[float]]],
                histories: Mapping[str, History]) -> None:
        """Erase ``user``'s history in ``current`` (the batch's histories so far): an empty
        one, which the user's next event starts again and :meth:`ingest_many` reports as it
        is if none comes. The user no longer counts among :attr:`users`."""
        taken = current.get(user)
        if (taken[0] if taken is not None else histories.get(user)):
            self.users -= 1
        current[user] = (History(), [])

    def _append(self, event: Event, history: History, weights: list[float],
                source: tuple[int, int] | None = None
                ) -> tuple[History, list[float], TrainExample] | None:
        """The event appended to a history whose events weigh ``weights``: the new history
        (its stored user vector not refreshed), its weights and the training example; None
        for a redelivery. The caller counts the event in the popularity."""
        if history.has_event(event.event_id):
            return None
        if not history:
            self.users += 1
        weight = self._weight_of_kind[event.kind]
        limit = self.settings.history_length
        updated = history.appended(event.item_id, event.kind, event.ts, event.event_id, limit,
                                   source, self._events_topic)
        example = self._example(event, weight, history.items, weights, history.ts, source)
        return updated, (weights + [weight])[-limit:], example

    def _example(self, event: Event, weight: float, items: Sequence[str], weights: list[float],
                 ts: Sequence[float], source: tuple[int, int] | None) -> TrainExample:
        """The training example of ``event`` (of confidence ``weight``) after a history of
        ``items`` (weighing ``weights``, at times ``ts``)."""
        return TrainExample.trusted(
            user_id=event.user_id, item_id=event.item_id, alpha=weight, ts=float(event.ts),
            history=list(items), weights=weights,
            history_ts=list(ts) if self.uses_event_times else [], source=source)

    def _remade(self, event: Event, history: History, weights: list[float],
                source: tuple[int, int]) -> TrainExample:
        """The example of an event that ``history`` holds already, made again from the
        events before its last occurrence there: the example it had, unless events have left
        the window since (then its history is shorter)."""
        place = len(history.event_ids) - 1 - history.event_ids[::-1].index(event.event_id)
        return self._example(event, self._weight_of_kind[event.kind], history.items[:place],
                             weights[:place], history.ts[:place], source)

    def ingest(self, event: Event, history: History) -> tuple[History, TrainExample] | None:
        """Take one valid event: the new history (with the refreshed user vector) and the
        training example for the learn agent; None for a redelivery (same ``event_id``
        already in the user's window), which changes nothing."""
        step = self._append(event, history, self._kind_weight_list(history.kinds))
        if step is None:
            return None
        updated, _, example = step
        self.popularity.add(event.item_id, event.ts, example.alpha)
        updated = self._fitted(event.user_id, updated)
        return updated.with_phi(encode_phi(self._encode_history(updated))), example

    def learn(self, examples: Sequence[TrainExample], users: int | None = None) -> float:
        """One micro-batch step of the item learner; returns the batch loss. ``users``: the
        active users as of these examples (|C|; their training messages carry it), else
        :attr:`users`, this worker's count now.

        Each example's user vector is encoded here, from the history it carries and the item
        vectors as they are now (see :class:`~stream_app.wire.TrainExample` for why)."""
        if not examples:
            return 0.0
        histories = None  # kept for the inputs' step (the mean encoder's)
        if self.settings.encoder == "mean":
            histories = self._flat_histories([e.history for e in examples],
                                             [e.weights for e in examples],
                                             self._history_times(examples))
            phis = self._mean_encode(histories.known())
        else:
            phis = self._encode_many([e.history for e in examples],
                                     [e.weights for e in examples], self._history_times(examples))
        items = [example.item_id for example in examples]
        self._rank_before_learning(examples)
        self._cold_start(items, phis)
        alphas = np.array([e.alpha for e in examples])
        lanes = None  # one clock for the positives' discount, unless a lane per partition
        if self.learner.config.positive_lanes > 1:
            lanes = np.fromiter((item_partition(item, self.settings.partitions)
                                 for item in items), dtype=np.int64, count=len(items))
        loss = self.learner.learn(phis, items, alphas,
                                  n_users=max(self.users if users is None else users, 1),
                                  user_weights=self._user_weights(examples), lanes=lanes)
        if histories is not None and self.learner.config.input_lr > 0:
            self._learn_inputs(histories, items, alphas)
        self.index.learned(items, self.learner.changed_rows)
        if self.paths is not None:
            dr_loss = self.last_dr_loss = self.paths.learn(phis, items)
            if np.isfinite(dr_loss):  # nan: no pair of the batch had a known user vector
                self.dr_loss.update(dr_loss)
        self.loss.update(loss)
        self.learned += len(examples)
        return loss

    def _user_weights(self, examples: Sequence[TrainExample]) -> np.ndarray | None:
        """The user Gramian's weight of each example's user vector: None (each once), or
        1/(the user's events so far) with ``user_gramian_weighting = users``: Rendle's
        1/|I_c| (eq. 41), with |I_c| as a stream knows it at the event. Unweighted, a user of
        n events weighs n; so weighted, 1 + 1/2 + … + 1/n ≈ ln n + 0.6 (and n/T past the
        ``history_length`` T a history holds)."""
        if self.settings.user_gramian_weighting == "events":
            return None
        return 1.0 / np.fromiter((len(e.history) + 1 for e in examples), dtype=np.float64,
                                 count=len(examples))

    def _learn_inputs(self, histories: _Histories, items: list[str],
                      alphas: np.ndarray) -> None:
        """The input offsets' step (``LearnerConfig.input_lr``): each example's user vector
        is encoded again with the items as they are after the batch's item step (items the
        step created included), the user side of its loss differentiated
        (:func:`models.embedding.user_gradient`, the user's all-pairs term spread over the
        events its vector is made of) and carried back to the inputs of its history
        (:func:`models.encoders.history_gradient`)."""
        unknown = np.flatnonzero(histories.rows < 0)
        if len(unknown):  # in place: the vectors of the learning step were encoded already
            histories.rows[unknown] = self.learner.rows_of(histories.ids[k] for k in unknown)
        known = histories.known()
        if len(known.rows) == 0:
            return
        g_phi = user_gradient(self._mean_encode(known),
                              self.learner.item_matrix[self.learner.rows_of(items)],
                              alphas, self.learner.item_gramian.matrix, self.learner.alpha0,
                              np.maximum(histories.lengths, 1))
        h = history_weights(known.indptr, known.weights, known.ts,
                            self.settings.encoder_half_life_s)
        self.learner.learn_inputs(*history_gradient(known.indptr, known.rows, h, g_phi))

    def _rank_before_learning(self, examples: Sequence[TrainExample]) -> None:
        """Every ``serve_tuning_every``-th example (counted over all learned) ranked under each
        serving candidate before it is learned; answers then follow the best."""
        every = self.settings.serve_tuning_every
        if not every:
            return
        _, ranks = self.candidate_ranks(examples[(-self.learned) % every::every])
        if len(ranks):
            self.serving_choice.observe(ndcg_of_ranks(ranks, self.serving_choice.k))

    def candidate_ranks(self, examples: Sequence[TrainExample]
                        ) -> tuple[np.ndarray, np.ndarray]:
        """The rank of each example's item (0: first) under each serving candidate, its
        history excluded as answers exclude it. Returns the positions of the examples ranked
        (those whose item and at least one history item are learned: the others have nothing
        to rank) and their ranks (a row each, a column per candidate). All are ranked in one
        product against one pool (:meth:`_ranking_pool`)."""
        targets = self.learner.rows_of([example.item_id for example in examples])
        half_lives = list(dict.fromkeys(half_life for half_life, _ in
                                        self.serving_choice.candidates))
        kept, phis, excluded = [], [], []
        for position, (example, target) in enumerate(zip(examples, targets)):
            rows = self.learner.rows_of(example.history)
            if target < 0 or not (rows >= 0).any():
                continue
            kept.append(position)
            phis.append(self._candidate_phis(example, rows, half_lives))
            excluded.append(np.unique(np.append(rows[rows >= 0], target)))
        if not kept:
            return np.empty(0, dtype=np.int64), np.empty((0, len(self.serving_choice.candidates)))
        pool = self._ranking_pool()
        positions = [pool_positions(pool, rows) for rows in excluded]
        items = self.learner.item_matrix[np.append(pool, targets[kept])]
        pairs = [(half_lives.index(half_life), weight)
                 for half_life, weight in self.serving_choice.candidates]
        ranks = target_ranks(np.stack(phis), pairs, items, positions)
        left = len(pool) - np.array([len(p) for p in positions])  # pool items counted
        others = len(self.learner.item_matrix) - np.array([len(rows) for rows in excluded])
        return np.array(kept), ranks * (others / np.maximum(left, 1))[:, None]

    def _candidate_phis(self, example: TrainExample, rows: np.ndarray,
                        half_lives: Sequence[float | None]) -> np.ndarray:
        """The example's user vector under each serving half-life (one row each)."""
        times = self._example_times(example)
        return np.array([self._encode_rows(rows, example.weights, times, half_life)
                         for half_life in half_lives])

    def _ranking_pool(self) -> np.ndarray:
        """The item rows, sorted, that examples are ranked among: all of them, or beyond
        ``serve_tuning_pool`` one uniform sample for the whole batch (with replacement: a
        permutation of a large catalog would cost more than the ranking); a rank among it is
        scaled to the catalog by the share of the catalog it holds."""
        n, pool = len(self.learner.item_matrix), self.settings.serve_tuning_pool
        if n <= pool:
            return np.arange(n)
        return np.sort(self._tuning_rng.integers(0, n, pool))

    def _history_times(self, examples: Sequence[TrainExample]) -> list[list[float]]:
        """Each example's history times for :meth:`_encode_many`: where the encoder reads them,
        an example sent without them has all its events at its own ``ts``; otherwise the lists
        as they came (unread, usually empty), so no list is built per example for nothing."""
        if not self.uses_event_times:
            return [e.history_ts for e in examples]
        return list(map(self._example_times, examples))

    @staticmethod
    def _example_times(example: TrainExample) -> list[float]:
        """An example's history times; one sent without them has its events at its ``ts``."""
        return example.history_ts or [example.ts] * len(example.history)

    def learn_reported(self, examples: Sequence[TrainExample], step: int, *,
                       caught_up: bool = True,
                       users: Sequence[int | None] | None = None,
                       after_learning: Callable[[], None] | None = None) -> LearnedReport:
        """:meth:`learn` in micro-batches of ``step``, and the :class:`LearnedReport` that lets
        another engine follow. A step that raises is logged and skipped (learning goes on);
        its rows may have moved part way, so the report then carries every row.
        ``caught_up``: nothing else waits to be learned, so the input offsets moved so far go
        with this report (:meth:`_inputs_due`). ``users``: each example's active users as
        its message said (None: not said), a micro-batch learned with the largest.
        ``after_learning``: called once the examples are learned, before the report is made
        (what it moves goes with it)."""
        first_row, moved, failed = len(self.learner), [], 0
        first_dr_row = len(self.paths.model) if self.paths is not None else 0
        seconds, losses, dr_losses = [], [], []
        for start in range(0, len(examples), step):
            chunk = examples[start:start + step]
            started = time.perf_counter()
            try:
                losses.append(self.learn(chunk, _users_of(users, start, step)))
            except Exception:  # noqa: BLE001 - a bad batch must not stop learning
                log.exception("learning step failed on %d examples", len(chunk))
                failed += len(chunk)
                moved.append(np.arange(len(self.learner)))
                self._inputs_moved.append(np.arange(len(self.learner)))
                continue
            seconds.append(time.perf_counter() - started)
            moved.append(self.learner.changed_rows)
            if len(self.learner.changed_input_rows):
                self._inputs_moved.append(self.learner.changed_input_rows)
            if self.paths is not None and np.isfinite(self.last_dr_loss):
                dr_losses.append(self.last_dr_loss)
        if after_learning is not None:
            after_learning()
        rows = np.concatenate(moved) if moved else np.empty(0, dtype=np.int64)
        new_items, new_paths = (self.paths.model.items_since(first_dr_row)
                                if self.paths is not None else ([], None))
        dr_weights = self._weights_due()
        delta = self.learner.delta(first_row, rows, self._inputs_due(caught_up))
        return LearnedReport(
            delta=delta, complete=not self._inputs_moved,
            items=list(dict.fromkeys(example.item_id for example in examples)),
            step_seconds=seconds, losses=losses, dr_losses=dr_losses,
            dr_stats=self.paths.stats() if dr_weights is not None else None,
            dr_new_items=new_items, dr_new_paths=new_paths, dr_weights=dr_weights,
            examples=len(examples) - failed, failed=failed,
            serving=self.serving_choice.state(), input_steps=self.learner.take_input_steps())

    def forget_partitions(self, partitions: Collection[int]) -> int:
        """Forget the solve statistics of the items of the training ``partitions``, which this
        worker no longer holds; returns how many items held some. Kept, the background
        re-solve went on moving this worker's copies of rows another worker now learns, from
        statistics that no longer grow, until that worker's rows replaced them; and their
        positives' mass stayed in this worker's α0."""
        rows = self.learner.rows_with_positives()
        partitions = frozenset(partitions)
        lost = np.fromiter((item_partition(item, self.settings.partitions) in partitions
                            for item in self.learner.item_ids_at(rows)),
                           dtype=bool, count=len(rows))
        self.learner.forget_positives(rows[lost])
        return int(lost.sum())

    def install_rows(self, item_ids: list[str], rows: np.ndarray, offsets: np.ndarray, *,
                     keep_statistics: bool = False) -> LearnedReport:
        """Item rows another worker learns (their training partitions are its): each set
        here, created where unknown, with its input offset, the item Gramian kept exact; and
        the report that lets a follower (the worker's replica) take them as a learning step's.
        They are not learned here: they move when their owner publishes them again, or once a
        rebalance gives this worker their partition and it learns them itself.

        Their items' solve statistics are forgotten (another learner's positives made these
        rows), unless ``keep_statistics``: rows of this worker's own items that it published
        after its checkpoint and before a crash, installed by the catch-up at its restart.
        Those statistics are its own learning; forgotten, every item learned since the
        checkpoint started again from one batch's positives, and α0 with them."""
        first_row = len(self.learner)
        self.learner.assign(item_ids, rows)
        at = self.learner.rows_of(item_ids)
        self.learner.set_offsets(at, offsets)
        if not keep_statistics:
            self.learner.forget_positives(at)
        self.index.learned(item_ids, at)
        return self._rows_report(self.learner.delta(first_row, at[at < first_row], at),
                                 list(item_ids), installed=True)

    def _rows_report(self, delta: RowDelta, items: list[str], *, installed: bool = False
                     ) -> LearnedReport:
        """The report of rows set from another worker's records, no learning step behind it:
        what a follower takes in (the rows, the offsets) and nothing a step would bring."""
        return LearnedReport(
            delta=delta, items=items, step_seconds=[], losses=[], dr_losses=[], dr_stats=None,
            dr_new_items=[], dr_new_paths=None, dr_weights=None, examples=0, failed=0,
            serving=self.serving_choice.state(), installed=installed)

    def rows_to_share(self, rows: np.ndarray) -> tuple[list[str], np.ndarray, np.ndarray]:
        """The ids, augmented rows and input offsets of learner ``rows``, as they are now."""
        rows = np.asarray(rows, dtype=np.int64)
        offsets = self.learner.offsets
        inputs = (offsets[rows] if offsets is not None
                  else np.zeros((len(rows), self.settings.model_dim)))
        return self.learner.item_ids_at(rows.tolist()), self.learner.item_matrix[rows], inputs

    @property
    def inputs_waiting(self) -> bool:
        """Input offsets moved since the last report that carried them."""
        return bool(self._inputs_moved)

    def _inputs_due(self, caught_up: bool) -> np.ndarray | None:
        """The input rows moved since the last report that carried them, when the learner
        has caught up with its input or ``input_follow_s`` has passed; None before (the rows
        wait for a later report while more batches queue behind this one)."""
        now = time.monotonic()
        if not self._inputs_moved or not (
                caught_up or now - self._inputs_sent_at >= self.settings.input_follow_s):
            return None
        self._inputs_sent_at = now
        rows, self._inputs_moved = np.concatenate(self._inputs_moved), []
        return rows

    def _weights_due(self) -> dict | None:
        """The structure model for a follower, when ``dr_follow_model_s`` has passed."""
        now = time.monotonic()
        if self.paths is None or now - self._weights_sent_at < self.settings.dr_follow_model_s:
            return None
        self._weights_sent_at = now
        return self.paths.model.structure_weights()

    def learn_messages(self, values: Sequence[bytes], step: int, *, caught_up: bool = True,
                       positions: Sequence[tuple[int, int]] | None = None) -> LearnedReport:
        """:meth:`learn_reported` of the examples in training messages; a message that does
        not decode is skipped (logged). ``positions``: each message's (partition, offset) in
        the training topic; a message the model already holds (a redelivery, see
        :mod:`state.stream_positions`) is skipped and counted in ``redelivered``."""
        skipped = 0
        if positions:
            fresh = self.positions.admit(*zip(*positions))
            skipped = len(fresh) - sum(fresh)
            if skipped:
                log.info("skipped %d training messages the model already holds", skipped)
                values = [value for value, new in zip(values, fresh) if new]
        steps = [value for value in values if is_offset_steps(value)]
        if steps:
            values = [value for value in values if not is_offset_steps(value)]
        decoded = TrainBatch.decode_many(values)
        if decoded.bad:
            log.warning("skipped %d undecodable training messages", decoded.bad)
        examples, users, repeated = self._new_examples(decoded)
        added: list[int] = []

        def add_steps() -> None:  # after the examples, which may create their items
            added.append(self._add_offset_steps(steps))

        report = self.learn_reported(examples, step, caught_up=caught_up, users=users,
                                     after_learning=add_steps if steps else None)
        steps_added = sum(added)
        self.redelivered += skipped
        self.repeated_examples += repeated
        return replace(report, redelivered=skipped, repeated_examples=repeated,
                       steps_added=steps_added) if skipped or repeated or steps_added else report

    def _add_offset_steps(self, values: Sequence[bytes]) -> int:
        """Add the offset steps of ``values``, messages that carry other workers' steps on
        the input offsets of items learned here (``wire.encode_offset_steps``; those of items
        unknown here are dropped); they go to a follower with the next report that carries
        the moved offsets, and out with the rows at the next publish. Returns how many steps
        were added."""
        added = 0
        for value in values:
            try:
                item_ids, steps = decode_offset_steps(value, self.settings.model_dim)
            except ValueError as error:
                log.warning("skipped a message of offset steps: %s", error)
                continue
            known = [k for k, item in enumerate(item_ids) if item in self.learner]
            rows = self.learner.rows_of([item_ids[k] for k in known])
            self.learner.add_offsets(rows, steps[known])
            self._inputs_moved.append(np.unique(rows))
            added += len(known)
        return added

    def _new_examples(self, decoded: DecodedTraining
                      ) -> tuple[list[TrainExample], list[int | None], int]:
        """The examples (and their messages' user counts) whose events the model has not
        learned, and how many it has (examples made again after a crash)."""
        fresh = self.event_positions.admit(decoded.partitions, self._sources_here(decoded))
        repeated = len(fresh) - sum(fresh)
        if not repeated:
            return decoded.examples, decoded.users, 0
        log.info("skipped %d training examples of events the model has learned", repeated)
        kept = [n for n, new in enumerate(fresh) if new]
        return ([decoded.examples[n] for n in kept], [decoded.users[n] for n in kept],
                repeated)

    def _sources_here(self, decoded: DecodedTraining) -> list[tuple[int, int] | None]:
        """Each example's place in the events topic; none for an example whose message names
        another events topic than this worker's (one since made anew, whose offsets started
        again): learned by its place, it took the new topic's events below that place for
        learned ones. A message or a worker that names none keeps its places."""
        here = self.events_topic_id
        if here is None:
            return [example.source for example in decoded.examples]
        return [example.source if topic is None or topic == here else None
                for example, topic in zip(decoded.examples, decoded.events_topics)]

    def follow(self, report: LearnedReport) -> None:
        """Take in what a learner elsewhere learned (this engine's learner is its replica):
        item rows, the index's notes of moved rows, Deep Retrieval's new items with their
        paths (retrievable at once, as where the learner runs) and its structure model when
        the report carries it (the paths of known items change at the learner's M-steps,
        :meth:`reload_paths`), losses and counts."""
        self.learner.follow(report.delta)
        self.index.learned(report.items, report.delta.rows)
        if self.paths is not None:
            taken = (report.dr_new_items, report.dr_new_paths, report.dr_weights)
            _take_dr(self.paths.model, *taken)
            for followed in self._followed_during_reads:  # for the paths being read aside
                followed.append(taken)
        for loss in report.losses:
            self.loss.update(loss)
        for loss in report.dr_losses:
            self.dr_loss.update(loss)
        if report.dr_stats is not None:
            self.reported_dr_stats = report.dr_stats
        self.learned += report.examples
        self.redelivered += report.redelivered
        self.repeated_examples += report.repeated_examples
        self.serving_choice.restore(report.serving)

    def dr_stats(self) -> dict:
        """Deep Retrieval figures for the metrics: the followed learner's where there is one."""
        if self.reported_dr_stats is not None:
            return self.reported_dr_stats
        return self.paths.stats() if self.paths is not None else {}

    def _cold_start(self, items: list[str], phis: np.ndarray) -> None:
        """A new item starts at the mean vector of the users who took it: a weighted mean of
        the items it co-occurs with in their timelines (LED cannot do item cold start)."""
        new = [k for k, item in enumerate(items) if item not in self.learner]
        if not new:
            return
        by_item: dict[str, list[int]] = {}
        for k in new:
            by_item.setdefault(items[k], []).append(k)
        ids, rows = [], []
        for item, ks in by_item.items():
            mean = phis[ks].mean(axis=0)
            if np.linalg.norm(mean) > 0:
                ids.append(item)
                rows.append(np.append(mean, 0.0))
        if ids:
            self.learner.assign(ids, np.stack(rows))

    # -- requests -------------------------------------------------------------------------
    def check_request(self, request: RecRequest) -> None:
        """What the schema cannot check. Only response topics may be written by request: a
        client must not be able to make the worker produce into ``timeline-events`` or any
        other topic. A source this worker does not run (``dr`` with Deep Retrieval off) is an
        error, not an answer silently without it."""
        refusal = (self.settings.reply_topic_refusal(request.reply_to)
                   if request.reply_to is not None else None)
        if refusal is not None:
            raise InvalidMessage("schema", refusal)
        if "dr" in (request.sources or ()) and self.paths is None:
            raise InvalidMessage("schema", "source 'dr' is off on this worker "
                                 "(STREAMREC_DR_ENABLED=false)")
        if request.diversity is not None and (not self.settings.index_enabled
                                              or self.settings.index_clusters < 2):
            raise InvalidMessage("schema", "diversity needs a clustered index, which this "
                                 "worker does not build (STREAMREC_INDEX_CLUSTERS < 2)")

    def user_vector(self, request: RecRequest, history: History) -> np.ndarray | None:
        """φ(u) from the stored history plus the request's, with the *current* item vectors
        and the recency of the serving pick (:attr:`serving`); None when no item of it is
        known yet.

        The vector stored with the history was computed at the user's last event, with the item
        vectors of that moment; when learning lags ingest (a replay, a burst) it is stale. The
        history is at most T events, so encoding again costs O(T·d) (iALS: O(T·d² + d³)) and
        always answers with the model as it is now.
        """
        return self._user_vector_and_rows(request, history)[0]

    def _user_vector_and_rows(self, request: RecRequest,
                              history: History) -> tuple[np.ndarray | None, np.ndarray]:
        """:meth:`user_vector`, and the learner rows of the history it came from (−1:
        unknown), which the responder also excludes: one id lookup per history item."""
        extra = list(request.history or ())
        # the request's items are the newest events: as recent as the newest stored one (a
        # history keeps arrival order, and an event may arrive after a newer one)
        now = max(history.ts) if history.ts else 0.0
        rows = self.learner.rows_of(list(history.items) + extra)
        weights = self._kind_weights(list(history.kinds) + ["view"] * len(extra))
        phi = self._encode_rows(rows, weights, list(history.ts) + [now] * len(extra),
                                self.serving.half_life_events)
        return (phi if phi.any() else None), rows

    def serving_query(self, phi: np.ndarray) -> np.ndarray:
        """The augmented row that answers for φ: [φ, the bias weight of :attr:`serving`]."""
        return augment_users(phi, self.serving.bias_weight)

    def answer(self, request: RecRequest, history: History, started: float) -> RecResponse:
        """Top-k for the user: model candidates (the serving index, or exact search, and Deep
        Retrieval's paths) scored once with the current item vectors, then, when the sources
        name ``popular``, popularity to fill; seen items (stored history plus the request's)
        are excluded when ``exclude_seen``, the request's ``exclude`` always; an unknown user
        gets plain popularity (or nothing from sources without it)."""
        seen = set(request.exclude or ())  # the request's exclusions: never answered
        if request.exclude_seen:
            seen |= set(history.items) | set(request.history or ())
        sources = request.sources or self.settings.default_sources
        items: list[RecItem] = []
        index_version = None
        clock = time.perf_counter()
        phi = None  # popularity alone needs no user vector (iALS: a solve of d unknowns)
        if self.model_sources & set(sources):
            phi, history_rows = self._user_vector_and_rows(request, history)
            clock = self._stage("embed", clock)
        if phi is not None and len(self.learner):
            # quotas apply from the first clustered build on; until then a plain request
            diverse = (request.diversity is not None
                       and isinstance(self.index.current, ClusteredIndex))
            query = self.serving_query(phi)
            found: list[tuple[np.ndarray, str]] = []  # candidate rows, the source that found them
            if "ann" in sources:
                rows, index_version = self._index_rows(request, query, diverse, history,
                                                       history_rows)
                clock = self._stage("ann", clock)
                self._count_candidates("ann", len(rows))
                found.append((rows, "ann"))
            if "dr" in sources and self.paths is not None and self._dr_wanted(request, diverse):
                candidates = self.paths.retrieve(phi, seen, skip=self.withdrawn)
                clock = self._stage("dr", clock)
                self._count_candidates("dr", len(candidates))
                if self.metrics is not None:
                    self.metrics.dr_retrieved.observe(len(candidates))
                rows = self.learner.rows_of(candidates)
                found.append((rows[rows >= 0], "dr"))
            items = self._rerank(query, found, request.k)
        if len(items) < request.k and "popular" in sources:
            taken = seen | {item.item_id for item in items}
            popular = self.popularity.top(request.k - len(items), exclude=taken,
                                          skip=self.withdrawn)
            self._count_candidates("popular", len(popular))
            items += [RecItem(item_id, score, "popular") for item_id, score in popular]
        self._stage("merge", clock)
        return RecResponse(request_id=request.request_id, user_id=request.user_id, items=items,
                           model_version=self.model_version, index_version=index_version,
                           took_ms=(time.perf_counter() - started) * 1000.0)

    def _index_rows(self, request: RecRequest, query: np.ndarray, diverse: bool,
                    history: History, history_rows: np.ndarray
                    ) -> tuple[np.ndarray, int | None]:
        """The serving index's candidates (or exact search's) but the withdrawn items', and
        the index version. The candidates are ``rerank_candidates`` (at least k), so a few
        withdrawn among a user's best leave the answer its k. When the withdrawn items among
        them leave fewer than k (or than three quarters of the candidates asked for), the
        search is asked again with those rows excluded too (at
        most :data:`WITHDRAWN_RETRIES` times): a ``diversity`` request takes exactly k, and
        its cluster quotas are then filled as if the withdrawn items were not in the index.
        Only the withdrawn rows found are excluded, not the whole withdrawn set: a search
        asks for as many more as it excludes, and a catalogue may withdraw thousands. The
        last search excludes them all all the same (the rows of up to
        :data:`WITHDRAWN_EXCLUDED_AT_MOST` items): a user whose best items were withdrawn
        by the dozen, in every cluster, got a ``diversity`` answer without a single item
        from those excluded as found (k of them a search). Deep Retrieval leaves them out
        itself (``PathRetrieval.retrieve``'s ``skip``), popularity too (``top``'s ``skip``)."""
        asked = self._excluded_rows(request, history_rows)
        wanted = self._candidates_wanted(request, diverse)
        excluded = asked
        for retries_left in range(WITHDRAWN_RETRIES, -1, -1):
            rows, version = self.index.retrieve(
                query, wanted, excluded,
                # as decided by the caller: a clustered index that a build swaps in meanwhile
                # (on its own thread) is searched as for the plain request decided
                diversity=request.diversity if diverse else None,
                history=list(history.items) + list(request.history or ()))
            kept = self._kept(rows)
            # k at least, and three quarters of a plain request's pool: the candidates left
            # beside a dozen withdrawn among a user's best ranked worse than those a search
            # that excluded them found (in the tests' planted index, a tenth to a half of
            # the answer's summed score). A scattered few (a tenth of the catalogue) rarely
            # take a quarter of the pool (docs/throughput.md: 1.07 searches an answer at a fifth)
            if kept.all() or np.count_nonzero(kept) >= max(request.k, wanted - wanted // 4):
                break
            excluded = np.concatenate([excluded, rows[~kept]])
            if retries_left == 1 and len(self.withdrawn) <= WITHDRAWN_EXCLUDED_AT_MOST:
                excluded = np.concatenate([asked, self._withdrawn_rows()])
        if np.count_nonzero(kept) < request.k and len(self.withdrawn) > WITHDRAWN_EXCLUDED_AT_MOST:
            # more withdrawn than a search excludes, and still short: a user whose whole
            # corner of the catalogue was withdrawn got popular items alone, or nothing
            # (without a diversity's cluster quotas)
            return self.index.exact_rows(query, wanted, np.concatenate(
                [asked, self._withdrawn_rows()])), None
        return rows[kept], version

    def _withdrawn_rows(self) -> np.ndarray:
        """The learner rows of the withdrawn items (−1 for those not learned), looked up
        again only when the withdrawn set or the number of items learned changes (rows
        never move): one answer after another may need them all."""
        withdrawn, items = self.withdrawn, len(self.learner)
        cached = self._withdrawn_rows_cache
        if cached is None or cached[0] is not withdrawn or cached[1] != items:
            cached = self._withdrawn_rows_cache = (withdrawn, items,
                                                   self.learner.rows_of(withdrawn))
        return cached[2]

    def _kept(self, rows: np.ndarray) -> np.ndarray:
        """Which learner ``rows`` are of items not withdrawn (a boolean mask)."""
        withdrawn = self.withdrawn
        if not withdrawn:
            return np.ones(len(rows), dtype=bool)
        return np.fromiter((item not in withdrawn
                            for item in self.learner.item_ids_at(rows.tolist())),
                           dtype=bool, count=len(rows))

    def _excluded_rows(self, request: RecRequest, history_rows: np.ndarray) -> np.ndarray:
        """The learner rows an answer leaves out (−1: an item not learned): the history's
        (``history_rows``) when ``exclude_seen``, and the request's ``exclude``."""
        rows = history_rows if request.exclude_seen else history_rows[:0]
        if request.exclude:
            rows = np.concatenate([rows, self.learner.rows_of(request.exclude)])
        return rows

    def _candidates_wanted(self, request: RecRequest, diverse: bool) -> int:
        """``rerank_candidates`` to choose the top k from; exactly k when the request sets a
        ``diversity`` and a clustered index serves (``diverse``): then the quota merge of a
        clustered index decides which clusters the k answers come from (Kuaishou: the final
        list is the top M_k of each cluster), and a rerank of a wider pool would give them all
        back to the user's main cluster."""
        if diverse:
            return request.k
        return max(request.k, self.settings.rerank_candidates)

    @staticmethod
    def _dr_wanted(request: RecRequest, diverse: bool) -> bool:
        """A ``diversity`` request leaves the final list to the cluster quotas of the index;
        dr candidates would compete with them in the rerank, so they join only when the
        request names dr itself."""
        return not diverse or "dr" in (request.sources or ())

    def _rerank(self, query: np.ndarray, found: list[tuple[np.ndarray, str]],
                k: int) -> list[RecItem]:
        """One score per candidate row for the augmented user row ``query``, with the vectors
        as they are now; the best ``k``, each with the first source that found it."""
        if not found:
            return []
        rows = np.concatenate([candidates for candidates, _ in found])
        source_at = np.repeat(np.arange(len(found)), [len(candidates) for candidates, _ in found])
        if len(found) > 1:  # one source never repeats a row; several may share some
            rows, first = np.unique(rows, return_index=True)
            source_at = source_at[first]
        scores = self.learner.scores_at(query, rows)
        order = np.argsort(-scores, kind="stable")[:k]
        ids = self.learner.item_ids_at(rows[order].tolist())
        sources = [found[at][1] for at in source_at[order].tolist()]
        return [RecItem(item_id, score, source)
                for item_id, score, source in zip(ids, scores[order].tolist(), sources)
                if math.isfinite(score)]

    def _stage(self, stage: str, since: float) -> float:
        now = time.perf_counter()
        if self.metrics is not None:
            self.metrics.stage_latency.labels(stage).observe(now - since)
        return now

    def _count_candidates(self, source: str, count: int) -> None:
        if self.metrics is not None:
            self.metrics.candidates.labels(source).inc(count)

    def maybe_rebuild_index(self) -> bool:
        """Start an index build aside if one is due (call on the learning thread); a due
        build waits while the worker is :attr:`behind` (``RebuildPolicy.backlog_events``)."""
        return self.index.maybe_rebuild(self.model_version, self.behind)

    def maybe_m_step(self) -> bool:
        """Install a finished Deep Retrieval M-step, start one aside if due (learning thread)."""
        return self.paths is not None and self.paths.maybe_m_step()

    # -- persistence ----------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.settings.data_dir / "checkpoints"

    @property
    def paths_handoff_dir(self) -> Path:
        """Where a learner process leaves Deep Retrieval's state after an M-step for its
        worker to read (:meth:`read_paths`): apart from the checkpoint's, which would
        otherwise run ahead of the positions the checkpoint holds (the messages delivered
        again after a crash were then learned twice by Deep Retrieval)."""
        return self.checkpoint_dir / "dr-handoff"

    @property
    def popularity_path(self) -> Path:
        return self.checkpoint_dir / "popularity.npz"

    @property
    def model_path(self) -> Path:
        """The item model's checkpoint: the head file that names its parts."""
        return self.checkpoint_dir / "model.npz"

    def save(self, *, model: bool = True, popularity: bool = True) -> None:
        """Checkpoint ``popularity`` and (``model``) the item model and Deep Retrieval; an
        engine that follows a learner process leaves the model to it (its replica has no
        learning state to save), and the learner process leaves popularity to the worker,
        which counts the events (the learner's is the one it loaded at its start)."""
        if popularity:
            self.popularity.save(self.popularity_path)
        if model:
            started = time.perf_counter()
            if self.paths is not None:  # before the positions: a crash between the two can
                self.paths.save(self.checkpoint_dir / "dr")  # make it learn again, not miss
            kind = self.learner.save(self.model_path,
                                     also={**self.positions.to_arrays(),
                                           **self.event_positions.to_arrays()})
            save_npz(self.checkpoint_dir / "serving.npz", self.serving_choice.state())
            self.checkpointed_at = time.time()
            self.last_checkpoint = CheckpointWritten(kind, self._bytes_written(),
                                                     time.perf_counter() - started)

    def _bytes_written(self) -> int:
        """The bytes the last checkpoint wrote: the item model's part and head, and Deep
        Retrieval's."""
        dr = self.paths.model.checkpoints.last_save_bytes if self.paths is not None else 0
        return self.learner.checkpoints.last_save_bytes + dr

    def _restore_positions(self, data: dict[str, np.ndarray]) -> None:
        """The checkpoint's places in the training and events topics, each but where its
        topic started anew since (``state.stream_positions.positions_void``)."""
        for positions in (self.positions, self.event_positions):
            if positions_void(self.model_path, positions.topic):
                log.info("topic %s started anew since the checkpoint: the checkpoint's places "
                         "in it are void", positions.topic)
            else:
                positions.set_arrays(data)

    def model_saved_at(self) -> float:
        """When the item model's checkpoint in the data dir was written (epoch seconds; 0.0
        without one)."""
        try:
            return self.model_path.stat().st_mtime
        except FileNotFoundError:
            return 0.0

    def _load_serving(self, path: Path) -> None:
        """The serving choice's measurements from ``path``, where they exist and were made
        for the candidates configured now."""
        try:
            saved = load_npz(path)
            if saved is not None:
                self.serving_choice.restore(saved)
        except (ValueError, KeyError) as error:  # measured again from the stream
            log.warning("serving choice not restored from %s: %s", path, error)

    def reload_paths(self, reported_stats: dict) -> bool:
        """:meth:`read_paths` and :meth:`install_paths` in one call (tools and tests; a worker
        reads aside)."""
        followed = self.begin_paths_read()
        return self.install_paths(self.read_paths(), reported_stats, followed)

    def begin_paths_read(self) -> list[tuple]:
        """From now on, keep what reports bring Deep Retrieval, for the :meth:`install_paths`
        of paths the learner saved before (call it as its message arrives: what came before
        is in the file, what is followed after is not); returns what that install takes.
        Each read keeps its own: a second may begin before the first is installed."""
        followed: list[tuple] = []
        self._followed_during_reads.append(followed)
        return followed

    def read_paths(self) -> DeepRetrieval | None:
        """The Deep Retrieval state a learner process saved after its M-step, read into a new
        object; None if there is none. Any thread: at a million items it takes seconds, which
        the event loop must not wait for."""
        if self.paths is None:
            return None
        fresh = DeepRetrieval(self.paths.model.config,
                              track_scores=self.paths.model.tracker is not None)
        return fresh if fresh.load(self.paths_handoff_dir) else None

    def install_paths(self, fresh: DeepRetrieval | None, reported_stats: dict,
                      followed: list[tuple]) -> bool:
        """Serve ``fresh`` (from :meth:`read_paths`), with the new items and the newest
        structure model that reports brought since its read began (``followed``, from
        :meth:`begin_paths_read`), and take the learner's figures as of its M-step (one may
        finish after the last batch it reports on)."""
        self.reported_dr_stats = reported_stats
        self._followed_during_reads = [kept for kept in self._followed_during_reads
                                       if kept is not followed]
        if self.paths is None or fresh is None:
            return False
        for taken in followed:
            _take_dr(fresh, *taken)
        self.paths.model = fresh
        return True

    def load(self, *, popularity_journal: bool = True) -> bool:
        """The last checkpoint and the newest valid index version, where they exist (a
        replica takes the item rows only); without ``popularity_journal``, the popularity's
        counts as saved (a learner process, which answers nothing, skips the journal)."""
        self.events_topic_id = noted_topic_id(self.checkpoint_dir, self.settings.topic_events)
        found = self.popularity.load(
            self.popularity_path, journal=popularity_journal,
            renewed_at=renewed_at(self.checkpoint_dir, self.settings.topic_events))
        found = self.learner.load(self.model_path,
                                  restore=self._restore_positions) or found
        self._load_serving(self.checkpoint_dir / "serving.npz")
        if self.paths is not None:
            found = self.paths.load(self.checkpoint_dir / "dr") or found
        if self.index.load_existing():
            log.info("serving index version %s", self.index.version)
        return found


assert set(Engine.available_sources) <= set(SOURCES)
