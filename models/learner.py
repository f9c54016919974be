"""The online item model: item vectors and biases learned from the event stream (Rendle Alg. 5).

One :meth:`ItemLearner.learn` call is one micro-batch of positives (user vector φ(u), item id,
confidence α). Each positive pulls its item towards the user, and — through the user Gramian
G_C — pushes it away from *all* users, which stands in for every unobserved pair without sampling
a single negative. Two solvers take that step:

- ``solve`` (default): each item keeps the sufficient statistics of its positives
  (A_i = Σ α φ̃φ̃ᵀ, s_i = Σ α φ̃) and is re-solved in closed form after every micro-batch that
  touches it (:func:`models.embedding.item_solve`, one-sided iALS). One streaming pass then
  reaches each item's optimum given the users as they were; on the full Beauty and Toys streams
  it raised validation NDCG@10 by 24 % and 40 % over Adagrad. It costs (d+1)(d+2)/2 floats per
  learned item (A_i is symmetric and stored by its upper triangle: 8.6 KB at d = 64 in float32).
- ``adagrad``: Rendle's Algorithm 5, a per-coordinate Adagrad step on the gradient of
  :func:`models.embedding.item_gradient`: O(d) memory per item, for catalogues whose statistics
  would not fit.

State is owned here and nowhere else: the augmented item matrix Ψ̃ (rows grow when new item ids
arrive), the item-id ↔ row map, per-item (optionally decayed) counts n_i, Adagrad accumulators,
the exact item Gramian G_I (kept by rank-k corrections, recomputed periodically) and the decayed
estimate of the user Gramian G_C. Reads (``scores``, ``top_k``, ``rows_of``) never create state.

Items also have an *input* side, q_i = v_i + δ_i, which user vectors average
(:meth:`ItemLearner.input_rows`); the offsets δ are learned by :meth:`ItemLearner.learn_inputs`
from the user side of the same loss (``LearnerConfig.input_lr``; see there for why).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from itertools import repeat
from pathlib import Path
from typing import Literal

import numpy as np

import scipy.sparse as sp

from models.embedding import (augment_users, item_gradient, item_solve, item_solve_cg,
                              pack_symmetric, packed_outer, packed_size, unpack_symmetric)
from state.delta_checkpoint import ChainWriter, Table, load_checkpoint, mark_rows
from state.gramian import (DamagedCheckpoint, DecayedGramian, ExactGramian, ids_from_arrays,
                          ids_to_arrays, read_only_view)

InitVector = Callable[[str], "np.ndarray | None"]

#: an item without a positive for this many ``positives_half_life`` is retired from the
#: statistics at its next sweep (what is left of its positives: 2⁻²⁰, under a millionth)
RETIRE_AFTER_HALF_LIVES = 20


@dataclass(frozen=True)
class RowDelta:
    """What learning changed in an :class:`ItemLearner`, for a read replica to follow.

    ``rows`` (sorted) are every row that moved or was created since the replica last followed;
    ``values`` their augmented rows now. Rows from ``first_row`` on are new, their ids in
    ``new_ids`` (in row order). ``steps`` and ``drift`` are the learner's clock and its last
    Gramian drift; ``alpha0`` its all-pairs weight now (which the ``ials`` encoder reads).
    ``input_rows`` (sorted) are the rows whose input offset δ moved, ``input_values`` their
    offsets now (a new row's offset is zero until it moves).
    """

    first_row: int
    new_ids: list[str]
    rows: np.ndarray
    values: np.ndarray
    steps: int
    drift: float
    alpha0: float
    input_rows: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    input_values: np.ndarray | None = None


@dataclass(frozen=True)
class LearnerConfig:
    """Hyperparameters of :class:`ItemLearner`.

    The defaults are tuned on the planted-cluster stream of ``tests/test_learner.py`` (8 clusters
    of 50 items with skewed popularity, 400 users, 20 % off-cluster noise, one pass, α = 1,
    |C| = users seen so far). There own-cluster precision@10 stays ≥ 0.99 for micro-batches of
    32 to 256 and init_scale 0.1 to 1. With lr ≤ 0.1 and this small init, one pass is too short
    for the item vectors to grow out of the noise (the model stays a popularity ranker). These
    are a starting point, not a universal choice:

    - ``alpha0``: weight of every (user, item) pair with label 0 (or relative to the density
      of the positives, ``alpha0_relative``, the workers' default). What matters is the implicit
      negative mass α0·|C| against the positives' α, with |C| passed to :meth:`ItemLearner.learn`
      as the number of active users. 0.1 was best on the validation folds of Beauty and Toys
      (``streamrec eval --quick``, 0.02 to 0.2 tried with ``solve``); the planted stream works
      with 0.01 to 0.2.
    - ``lam``: L2 penalty on item rows (spread over an item's positives, like α0).
    - ``alpha0_relative``: read ``alpha0`` as a multiple of the positives' density instead of
      a weight per pair: the weight per pair is then α0 · M / (I · |C|), with M the positives'
      Σ α discounted like A_i (``positives_half_life``), I the items with positives (every
      known item with ``adagrad``, which keeps no statistics; with a half-life, none whose
      last positive is ``RETIRE_AFTER_HALF_LIVES`` old) and |C| the active users, so the
      all-pairs mass on an item, α0_pair · |C|, is α0 times the mean item's positive mass
      M / I. A fixed weight per pair makes that mass grow with |C|: on
      MovieLens (610 users, 1.7 % of the user-item pairs consumed) 0.05 was best, on the
      Amazon sets (about 20,000 users, 0.07 %) 0.002–0.0125, and a long stream that keeps
      meeting new users drowns its windowed positives. The relative weight follows the
      product's density as the stream runs (docs/results.md for the sweep).
    - ``lr``: Adagrad step size; Adagrad divides by the root of the summed squared gradients, so
      this is roughly the first step's size per coordinate.
    - ``adagrad_init``: starting accumulator (TensorFlow's ``initial_accumulator_value``); it keeps
      a new item's first steps proportional to its gradient, where plain Adagrad would move every
      coordinate by ``lr`` whatever the gradient's size.
    - ``bias_adagrad_init``: the same for the bias coordinate, much larger. With 0.1, an item's
      first positive moved its bias by about ``lr`` whatever the item's popularity, and an
      item seen once never met the all-pairs push back (it is evaluated at the old, near-zero
      row), so the learned biases ranked worse than counting (MovieLens held-out NDCG@10 of
      the bias alone 0.053 against popularity's 0.088). Starting at 100 makes bias steps
      proportional to the evidence: the full model went from 0.021 to 0.032 on MovieLens and
      from 0.0108 to 0.0126 on Beauty (quick).
    - ``count_half_life``: half-life of n_i in learned events; None counts forever.
    - ``init_scale``: expected norm of a new item's random vector; small so a new item starts
      near the origin (score ≈ its bias) without being exactly symmetric with the others.
    - ``user_gramian_beta``: β of the decayed user Gramian, per event of weight 1 (memory ≈
      1/β events unweighted, whatever the micro-batch sizes; weighted by users, ≈ 1/β in
      weight, more events).
    - ``recompute_every``: learn calls between exact recomputations of G_I (bounds float drift).
    - ``solver``: ``solve`` (closed form per item, the default) or ``adagrad`` (see the module
      docstring). ``lr`` and the Adagrad settings only shape ``adagrad`` steps.
    - ``sweep_per_step``: items re-solved round-robin per learn call against the current G_C
      (:meth:`ItemLearner.resolve`); 0 turns the sweep off.
    - ``positives_half_life``: half-life, in learned events, of an item's accumulated positives
      (``solve``; None: they count forever). A positive carries the user vector of its moment,
      a mean of item vectors that have moved since; early in a stream those vectors were
      nearly random. Discounting positives by age lets an item's row follow what its users
      look like under today's model. One pass, NDCG@10 with none → 30,000: Beauty validation
      0.0348 → 0.0391 (test 0.0242 → 0.0303), Toys 0.0315 → 0.0352 (test 0.0235 → 0.0272),
      MovieLens held-out test 0.0595 → 0.0811; on Beauty 5,000 was too short (validation
      0.0265), 15,000 and 50,000 gave 0.0365 and 0.0388. It is counted in the events this
      learner learns (a worker: the item partitions it owns), so scale it with the stream; with
      ``positive_lanes`` > 1, on one clock per lane.
    - ``positive_lanes``: how many clocks the positives' discount runs on, one per item
      partition of the training topic (the caller passes each example's partition to
      :meth:`ItemLearner.learn`); each counts its own lane's events against a half-life of
      ``positives_half_life / positive_lanes``. A learner reads its partitions out of step when
      it runs behind ingest, and on one clock the items of a partition read late take their
      positives as the newest. On lane clocks an item's statistics do not depend on how the
      lanes interleave (tested). Toys with each partition held back 20,000 examples behind the
      one before (``benchmarks/partition_lag.py``, the serving pair fixed): NDCG@10 0.0424 →
      0.0378 on one clock, 0.0425 → 0.0393 on four lanes; the rest of the loss is the other
      order effects (user vectors encoded against items at another stage, the user Gramian).
      Workers run a lane per item partition (``STREAMREC_POSITIVES_BY_PARTITION``, on by
      default since the serving pick holds until beaten): in order the two give the same
      model (every positive's final weight within 0.02 on Toys; test NDCG@10 with the
      worker's pick Toys 0.0416 / 0.0417, Beauty 0.0400 / 0.0400, MovieLens 0.1317 / 0.1336),
      and with the pick, Toys at a lag of 20,000 gives 0.0378 on one clock, 0.0393 on lanes.
    - ``prior_weight``: μ of ``solve``, the pull towards an item's starting row. Without it
      (μ = 0) an item seen once is solved onto its single user and the held-out quality of the
      full Beauty stream fell well below Adagrad's; μ = 3 was too stiff (validation NDCG@10 of
      Beauty and Toys a third lower), 0.3 to 1 about equal: 0.5 is half a positive of weight 1.
      Swept again with the CG step and the recency encoder (validation NDCG@10, one pass):
      Toys 0 / 0.1 / 0.25 / 0.5 / 1: 0.0389 / 0.0390 / 0.0387 / 0.0379 / 0.0361; Beauty 0.1 /
      0.25 / 0.5: 0.0432 / 0.0434 / 0.0430; MovieLens 0.1 / 0.25 / 0.5: 0.1257 / 0.1221 /
      0.1104 (its test fold 0.0927 / 0.0905 / 0.0994, ± 0.013). Smaller is a little better on
      validation, by less than a standard error on the Amazon sets (± 0.001), and the test folds
      do not agree on MovieLens: the default stays 0.5, the value every figure in
      docs/results.md was measured with.
    - ``cg_steps``: 0 solves each touched item exactly (an LU factorization, O((d+1)³)); k > 0
      takes k conjugate-gradient steps from the item's current row instead
      (:func:`models.embedding.item_solve_cg`, O(k·(d+1)²), reading A_i in float32). With 3,
      one pass gave the exact solve's NDCG@10 (validation/test: Beauty 0.0430/0.0335 against
      0.0431/0.0334, Toys 0.0379/0.0290 against 0.0378/0.0293, MovieLens held-out
      0.1100/0.0994 against 0.1112/0.1034; 5 steps 0.1122/0.1022) and the learning step ran
      1.6× as fast at d = 64 and 2.0× at d = 256 (``benchmarks/learner_step.py``); 1 step
      was far too few (Toys 0.0137).
    - ``input_lr``: Adagrad step size of the items' *input offsets* (0: none, the tied model).
      The mean encoder averages q_j = v_j + δ_j, not v_j, so the score of item i after item j,
      ⟨q_j, v_i⟩, need not equal that of j after i (a console is followed by its games more
      often than the reverse); with δ = 0 the model is the tied one, whose item-to-item
      scores are symmetric. δ follows the gradient of the same all-pairs loss with respect to
      the user vectors (:func:`models.embedding.user_gradient`), carried back through the
      encoder to the inputs it averaged (:func:`models.encoders.history_gradient`):
      :meth:`learn_inputs`. It costs dim floats per item for δ (the worker's replica too) and
      as many for its accumulators, and one more sparse product per batch of user vectors;
      with 0 those pages are never written.
      ``input_adagrad_init`` is its accumulators' start. The accumulators forget as the
      positives do (half of them per ``positives_half_life`` learned events, none without
      one): summed for good, an item's step shrank as one over the root of every step it
      ever took, so on a stream of weeks the offsets of the items met most stopped moving
      while their vectors went on with their recent positives.
    """

    dim: int = 64
    alpha0: float = 0.1
    lam: float = 0.01
    lr: float = 0.2
    adagrad_init: float = 0.1
    bias_adagrad_init: float = 100.0
    count_half_life: float | None = None
    init_scale: float = 0.1
    user_gramian_beta: float = 1e-4
    recompute_every: int = 1000
    solver: Literal["solve", "adagrad"] = "solve"
    prior_weight: float = 0.5
    positives_half_life: float | None = 30_000.0
    positive_lanes: int = 1
    sweep_per_step: int = 64
    cg_steps: int = 3
    alpha0_relative: bool = False
    input_lr: float = 0.0
    input_adagrad_init: float = 0.01
    seed: int = 0


class ItemLearner:
    """Online item embeddings + biases with the all-pairs square loss and streaming Gramians.

    ``init_vector(item_id)`` may return an augmented row [v, b] (length dim + 1) for a new item,
    e.g. :func:`models.bootstrap.cold_start_vector` of its co-occurring items; ``None`` falls back
    to a small random vector seeded by (``seed``, item id), so every replica and every restart
    gives an item the same start whatever the arrival order.

    One owner at a time (an agent's partition): nothing here is locked. A step's matrix products
    are only (dim+1)×B×(dim+1), so run the owning process with one BLAS thread
    (``OPENBLAS_NUM_THREADS=1`` or threadpoolctl): on a busy 2-core machine a multi-threaded
    OpenBLAS made each step ~30× slower (``benchmarks/learner_step.py --blas-threads 0``).
    """

    def __init__(self, config: LearnerConfig = LearnerConfig(),
                 init_vector: InitVector | None = None) -> None:
        self.config = config
        self.init_vector = init_vector
        width = config.dim + 1
        self._index: dict[str, int] = {}
        self._ids: list[str] = []
        self._psi = np.zeros((1024, width))
        # Adagrad's accumulators, for the adagrad solver only (no columns for solve: filled
        # with their start, they took 520 bytes an item of memory and of every base)
        accumulated = width if config.solver == "adagrad" else 0
        self._accum_init = np.append(np.full(config.dim, config.adagrad_init),
                                     config.bias_adagrad_init)[:accumulated]
        self._accum = np.tile(self._accum_init, (1024, 1))
        self._count = np.zeros(1024)
        self._count_at = np.zeros(1024)
        self._prior = np.zeros((1024, width))  # ψ̃₀: the row each item started from
        self._slot = np.full(1024, -1, dtype=np.int64)  # row → its statistics (solve only)
        # δ, the input offsets (q = v + δ), and their Adagrad accumulators less their start:
        # both zero until learned, so a tied model (input_lr 0) never writes their pages
        self._offset = np.zeros((1024, config.dim))
        self._offset_squares = np.zeros((1024, config.dim))
        self._offset_at = np.zeros(1024)  # the learned events when each row's sum was made
        self._offsets_learned = False
        self._pos_gram, self._pos_target, self._pos_at = _no_statistics(width)
        self._pos_lane = np.zeros(0, dtype=np.int64)  # slot → the lane whose clock it reads
        self._lane_clock = np.zeros(max(config.positive_lanes, 1))  # events per lane
        self._slots_used = 0  # slots of the pool ever handed out
        self._free_slots: list[int] = []  # handed out, then forgotten: given out again first
        self._sweep_at = 0  # next row the background re-solve visits
        self.item_gramian = ExactGramian(width)
        self.user_gramian = DecayedGramian(width, config.user_gramian_beta)
        self.events = 0
        # Σ α of the positives, discounted like A_i: per lane, on its clock (positive_mass)
        self._lane_mass = np.zeros(len(self._lane_clock))
        self.steps = 0
        self.changed_rows = np.empty(0, dtype=np.int64)  # rows the last learn() call moved
        self.changed_input_rows = np.empty(0, dtype=np.int64)  # offsets the last call moved
        # (rows, steps) of learn_inputs since take_input_steps, kept only when asked for
        # (several workers share the model: the steps on other workers' items go to them)
        self.log_input_steps = False
        self._input_steps: list[tuple[np.ndarray, np.ndarray]] = []
        self.last_drift = 0.0
        #: how :meth:`save` writes: the rows written since the last save (a delta), noted in
        #: ``_changed``, or all of them (:mod:`state.delta_checkpoint`)
        self.checkpoints = ChainWriter()
        self._changed = _no_marks()

    # -- reads (never create state) -------------------------------------------------------
    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._index

    @property
    def item_ids(self) -> list[str]:
        return list(self._ids)

    @property
    def item_matrix(self) -> np.ndarray:
        """Ψ̃ (n, dim + 1): rows [v_i, b_i] in row order (a read-only view)."""
        return read_only_view(self._psi[: len(self._ids)])

    @property
    def offsets(self) -> np.ndarray | None:
        """Δ (n, dim): the input offsets δ_i, in row order (a read-only view); None while
        every offset is zero (nothing learned them), so encoders skip the product."""
        if not self._offsets_learned:
            return None
        return read_only_view(self._offset[: len(self._ids)])

    def input_rows(self, rows: np.ndarray) -> np.ndarray:
        """The inputs q_i = v_i + δ_i of the given rows, (len(rows), dim): what the mean
        encoder averages into a user vector (v_i alone while no offset was learned)."""
        inputs = self._psi[rows, : self.config.dim]
        return inputs + self._offset[rows] if self._offsets_learned else inputs

    def item_ids_at(self, rows: Iterable[int]) -> list[str]:
        """The ids of the given rows."""
        return [self._ids[row] for row in rows]

    def scores_of(self, phi: np.ndarray, item_ids: Sequence[str],
                  bias_weight: float = 1.0) -> np.ndarray:
        """ŷ(u, i) for the given items (−inf for ids never learned), in the given order;
        ``bias_weight`` as in :func:`~models.embedding.augment_users`."""
        rows = self.rows_of(item_ids)
        scores = np.full(len(rows), -np.inf)
        known = rows >= 0
        scores[known] = self.scores_at(augment_users(phi, bias_weight), rows[known])
        return scores

    def rows_of(self, item_ids: Iterable[str]) -> np.ndarray:
        """Row of each id, −1 for ids never learned."""
        return np.fromiter(map(self._index.get, item_ids, repeat(-1)), dtype=np.int64)

    def count(self, item_id: str) -> float:
        """n_i now (decayed to the current event clock when ``count_half_life`` is set)."""
        row = self._index.get(item_id)
        if row is None:
            return 0.0
        return float(self._decayed_counts(np.array([row]))[0])

    def scores(self, phi: np.ndarray, bias_weight: float = 1.0) -> np.ndarray:
        """ŷ(u, i) = ⟨φ, v_i⟩ + β·b_i for every item in row order: exact MIPS by brute force
        (β = ``bias_weight``, 1 for the model's own score)."""
        return self._psi[: len(self._ids)] @ augment_users(phi, bias_weight)

    def scores_at(self, query: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """ŷ(u, i) for the items at ``rows`` (valid rows only), in the given order; ``query``
        is the augmented user row [φ(u), β] (:func:`~models.embedding.augment_users`)."""
        return self._psi[rows] @ query

    def top_k(self, phi: np.ndarray, k: int,
              exclude: Iterable[str] = ()) -> list[tuple[str, float]]:
        """The ``k`` best (item id, score) pairs for φ, best first, skipping ``exclude``."""
        rows, scores = self.top_rows(phi, k, self.rows_of(exclude))
        return [(self._ids[row], score) for row, score in zip(rows.tolist(), scores.tolist())]

    def top_rows(self, phi: np.ndarray, k: int, exclude_rows: np.ndarray | None = None,
                 bias_weight: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """Rows and scores of the ``k`` best items for φ, best first, none of
        ``exclude_rows`` (−1 entries, unknown items, are ignored)."""
        scores = self.scores(phi, bias_weight)
        excluded = np.empty(0, dtype=np.int64) if exclude_rows is None else exclude_rows
        excluded = np.unique(excluded[excluded >= 0])
        scores[excluded] = -np.inf
        k = min(k, len(scores) - len(excluded))
        if k <= 0:
            return np.empty(0, dtype=np.int64), np.empty(0)
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        return top, scores[top]

    # -- replicas (ItemReplica) ------------------------------------------------------------
    def delta(self, first_row: int, moved_rows: np.ndarray,
              moved_inputs: np.ndarray | None = None) -> RowDelta:
        """The :class:`RowDelta` of ``moved_rows`` and of every row created from ``first_row``
        on (the replica's length when it last followed), and of the offsets of
        ``moved_inputs``."""
        rows = np.union1d(np.asarray(moved_rows, dtype=np.int64),
                          np.arange(first_row, len(self._ids), dtype=np.int64))
        inputs = np.unique(np.asarray([] if moved_inputs is None else moved_inputs,
                                      dtype=np.int64))
        return RowDelta(first_row=first_row, new_ids=self._ids[first_row:], rows=rows,
                        values=self._psi[rows], steps=self.steps,
                        drift=self.last_drift, alpha0=self.alpha0, input_rows=inputs,
                        input_values=self._offset[inputs])

    # -- learning ------------------------------------------------------------------------
    def learn(self, phi_batch: np.ndarray, item_ids: Sequence[str], alphas: np.ndarray, *,
              n_users: float | None = None, user_weights: np.ndarray | None = None,
              lanes: np.ndarray | None = None) -> float:
        """One Adagrad step on a micro-batch of positives; returns its mean loss before the step.

        Parameters
        ----------
        phi_batch : (B, dim)
            User vectors of the events (from an encoder over the histories before each event).
        item_ids : sequence of str, length B
            Items of the events; unknown ids become new rows (see ``init_vector``).
        alphas : (B,)
            Confidence weights α_ui.
        n_users : float, optional
            |C|, the number of active users, for the user Gramian (see
            :class:`state.gramian.DecayedGramian`); None keeps the last value given. It starts
            at 1, which makes α0 a weight per *average* user rather than per user.
        user_weights : (B,), optional
            Importance weights for the user Gramian, ∝ 1/activity of each event's user.
        lanes : (B,), optional
            Each event's lane, 0 ≤ lane < ``positive_lanes`` (its item's partition; an item
            keeps one lane): the clock its positives are discounted on. None: lane 0.

        The loss is the item side of Rendle's per-example loss (eq. 33), averaged over the batch:
        α(ŷ − 1)² + ψ̃ᵀ(α0 Ĝ_C + λI)ψ̃ / n_i, whose gradient is :func:`item_gradient` (× 2).
        """
        self.changed_input_rows = np.empty(0, dtype=np.int64)
        if len(item_ids) == 0:
            return 0.0
        lanes = self._checked_lanes(lanes, len(item_ids))  # before any state moves
        phi_aug = augment_users(np.asarray(phi_batch, dtype=np.float64).reshape(len(item_ids), -1))
        alphas = np.asarray(alphas, dtype=np.float64)
        rows = self._ensure_rows(item_ids)
        self._note(rows, "vectors", "items")  # before they are written: a step that fails
        # midway wrote some (swept rows: resolve and forget_positives note their own)
        self.user_gramian.update(phi_aug, n_users, user_weights)
        G_C = self.user_gramian.value()
        uniq, inverse = np.unique(rows, return_inverse=True)
        self._add_positive_mass(alphas, lanes)
        self.events += len(rows)
        self._lane_clock += np.bincount(lanes, minlength=len(self._lane_clock))
        n_i = self._add_counts(uniq, np.bincount(inverse))[inverse]
        before = self._psi[uniq]
        psi = before[inverse]
        loss = self._loss(phi_aug, psi, alphas, G_C, n_i)
        if self.config.solver == "solve":
            item_lanes = np.empty(len(uniq), dtype=np.int64)
            item_lanes[inverse] = lanes
            self._solve(uniq, inverse, phi_aug, alphas, G_C, item_lanes)
        else:
            grads = item_gradient(phi_aug, psi, alphas, G_C, n_i, self.alpha0,
                                  self.config.lam)
            summed = np.zeros_like(before)
            np.add.at(summed, inverse, grads)  # duplicates of an item in the batch add up
            self._adagrad(uniq, summed)
        self.item_gramian.update(before, self._psi[uniq])
        swept = self._sweep(G_C)
        self.changed_rows = np.union1d(uniq, swept)
        self._tick()
        return loss

    def learn_inputs(self, rows: np.ndarray, grads: np.ndarray) -> None:
        """One Adagrad step (``input_lr``) on the input offsets of ``rows`` (distinct), along
        ``grads`` (len(rows), dim): the gradient of the loss with respect to the inputs q_i,
        which reaches δ_i unchanged (q_i = v_i + δ_i); see
        :func:`models.encoders.history_gradient`. The rows' item vectors do not move."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0 or self.config.input_lr == 0:
            return
        grads = np.asarray(grads, dtype=np.float64)
        squares = self._offset_squares[rows] * self._inputs_discount(rows)[:, None] + grads ** 2
        self._offset_squares[rows] = squares
        self._offset_at[rows] = self.events
        steps = -self.config.input_lr * grads / np.sqrt(self.config.input_adagrad_init + squares)
        self._offset[rows] += steps
        self._note(rows, "offsets")
        if self.log_input_steps:
            self._input_steps.append((rows, steps))
        self._offsets_learned = True
        self.changed_input_rows = np.union1d(self.changed_input_rows, rows)

    def _inputs_discount(self, rows: np.ndarray) -> np.ndarray:
        """0.5 per ``positives_half_life`` learned events since each row's offset
        accumulators were last summed (1 without a half-life)."""
        return halved(self.events - self._offset_at[rows], self.config.positives_half_life)

    def forget_positives(self, rows: np.ndarray) -> None:
        """Leave ``rows`` with no positives learned here: another learner owns their items now
        (``Engine.install_rows``), and re-solving them from this one's old statistics, as the
        sweep would, would undo the rows it sends. A positive learned later starts them
        afresh, from the row then as the prior.

        Their mass leaves :attr:`positive_mass` and they leave the items the relative α0
        divides it by, and their statistics' slots are given to the next items met: kept, each
        rebalance that moved items away and back would have lowered α0 (stale items counted,
        and counted again when learned anew) and grown the pool by (d+1)(d+2)/2 floats an
        item."""
        rows = np.unique(np.asarray(rows, dtype=np.int64))
        rows = rows[self._slot[rows] >= 0]
        if not len(rows):
            return
        slots = self._slot[rows]
        self._lane_mass -= self._empty_slots(slots)
        np.maximum(self._lane_mass, 0.0, out=self._lane_mass)  # rounding, not positives
        self._slot[rows] = -1
        self._note(rows, "items")
        self._free_slots.extend(slots.tolist())

    def rows_with_positives(self) -> np.ndarray:
        """The rows whose items hold positives learned here (a statistics slot each)."""
        return np.flatnonzero(self._slot[: len(self._ids)] >= 0)

    @property
    def items_with_positives(self) -> int:
        """How many items hold positives learned here (a statistics slot each)."""
        return self._slots_used - len(self._free_slots)

    def set_offsets(self, rows: np.ndarray, offsets: np.ndarray) -> None:
        """Set the input offsets δ of ``rows`` (distinct) to ``offsets`` (len(rows), dim):
        another learner's, for items it learns (``Engine.install_rows``). Their Adagrad
        accumulators stay: this learner's own steps on them go on at the same size."""
        rows = np.asarray(rows, dtype=np.int64)
        offsets = np.asarray(offsets, dtype=np.float64).reshape(len(rows), self.config.dim)
        if len(rows) == 0 or (not self._offsets_learned and not offsets.any()):
            return
        self._offset[rows] = offsets
        self._note(rows, "offsets")
        self._offsets_learned = True

    def take_input_steps(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The steps :meth:`learn_inputs` took since the last call (``log_input_steps``), each
        row's summed: (rows (sorted), steps (len(rows), dim)); None when there were none."""
        if not self._input_steps:
            return None
        rows = np.concatenate([rows for rows, _ in self._input_steps])
        steps = np.concatenate([steps for _, steps in self._input_steps])
        self._input_steps = []
        distinct, at = np.unique(rows, return_inverse=True)
        summed = np.zeros((len(distinct), self.config.dim))
        np.add.at(summed, at, steps)
        return distinct, summed

    def add_offsets(self, rows: np.ndarray, steps: np.ndarray) -> None:
        """Add ``steps`` (len(rows), dim) to the input offsets δ of ``rows`` (repeats add up):
        the steps other learners took on the inputs of items this one learns (an item's
        offset moves with every example whose history holds it, and those examples are
        learned where their own items are; ``Engine.learn_messages``)."""
        rows = np.asarray(rows, dtype=np.int64)
        steps = np.asarray(steps, dtype=np.float64).reshape(len(rows), self.config.dim)
        if len(rows) == 0:
            return
        np.add.at(self._offset, rows, steps)
        self._note(rows, "offsets")
        self._offsets_learned = True

    def _checked_lanes(self, lanes: np.ndarray | None, size: int) -> np.ndarray:
        if lanes is None:
            return np.zeros(size, dtype=np.int64)
        lanes = np.asarray(lanes, dtype=np.int64)
        if lanes.shape != (size,) or (size and not 0 <= lanes.min() <= lanes.max()
                                      < len(self._lane_clock)):
            raise ValueError(f"lanes must be {size} values in 0..{len(self._lane_clock) - 1}")
        return lanes

    def _add_positive_mass(self, alphas: np.ndarray, lanes: np.ndarray) -> None:
        """The positives' mass, discounted per lane on the lane's clock as their statistics
        are. On one learner clock instead, a worker that learns 1/N of the partitions would
        discount its positives over N times the stream's events, the density its relative α0
        reads would come out about N times too high (its mass as large as one worker's, its
        items 1/N), and its all-pairs weight with it: Toys through Kafka, two workers, pinned
        serving pair: NDCG@10 0.0407, 0.0427 with α0 halved by hand, 0.0418 with the mass
        per lane, one worker 0.0433 (docs/results.md, "Two workers through Kafka")."""
        count = len(self._lane_clock)
        half_life = self.config.positives_half_life
        if half_life is not None:
            self._lane_mass *= halved(np.bincount(lanes, minlength=count), half_life / count)
        self._lane_mass += np.bincount(lanes, weights=alphas, minlength=count)

    @property
    def positive_mass(self) -> float:
        """Σ α of the positives, discounted like A_i (each lane on its own clock)."""
        return float(self._lane_mass.sum())

    @property
    def alpha0(self) -> float:
        """α0 of the loss as of now: ``config.alpha0`` itself or, relative, times the
        positives' density mass / (items × |C|)."""
        if not self.config.alpha0_relative:
            return self.config.alpha0
        items = max(self.items_with_positives or len(self._ids), 1)
        return self.config.alpha0 * self.positive_mass / (items * self.user_gramian.n_active)

    def _loss(self, phi_aug, psi, alphas, G_C, n_i) -> float:
        y_hat = np.einsum("bk,bk->b", phi_aug, psi)
        penalty = np.einsum("bk,bk->b", psi @ (self.alpha0 * G_C), psi)
        penalty += self.config.lam * np.einsum("bk,bk->b", psi, psi)
        return float(np.mean(alphas * (y_hat - 1.0) ** 2 + penalty / n_i))

    def _solve(self, rows: np.ndarray, inverse: np.ndarray, phi_aug: np.ndarray,
               alphas: np.ndarray, G_C: np.ndarray, lanes: np.ndarray) -> None:
        """Add the batch's positives to A_i, s_i of their items (``lanes``: each item's
        lane), then re-solve those items."""
        slots = self._slots_for(rows)
        batch = len(phi_aug)
        gram, target = self._statistics_now(slots)
        self._move_lanes(slots, gram, lanes)
        # One sparse product sums the positives of each item (no Python loop, no np.add.at),
        # in the precision A_i is held in (float32 for CG), on the upper triangles only.
        by_item = sp.csr_matrix((alphas.astype(gram.dtype), (inverse, np.arange(batch))),
                                shape=(len(rows), batch))
        gram += by_item @ packed_outer(phi_aug.astype(gram.dtype, copy=False))
        target += by_item @ phi_aug
        self._pos_gram[slots], self._pos_target[slots] = gram, target
        self._pos_lane[slots] = lanes
        self._pos_at[slots] = self._lane_clock[lanes]
        self._note(slots, "slots")
        self._psi[rows] = self._solved(rows, gram, target, G_C)

    def _move_lanes(self, slots: np.ndarray, gram_now: np.ndarray, lanes: np.ndarray) -> None:
        """Move the mass of each slot whose item now comes on another lane to that lane
        (after a checkpoint of another number of lanes, every slot is on lane 0 until its
        next positive). Left behind, it was discounted on the old lane's clock and a forget
        of the item took it from the new lane, which lacked it, so it stayed counted."""
        moved = np.flatnonzero(self._pos_lane[slots] != lanes)
        if len(moved) == 0:
            return
        mass = gram_now[moved, -1].astype(np.float64)  # A_i's corner: Σ α as of now
        count = len(self._lane_clock)
        self._lane_mass -= np.bincount(self._pos_lane[slots[moved]], weights=mass,
                                       minlength=count)
        self._lane_mass += np.bincount(lanes[moved], weights=mass, minlength=count)
        np.maximum(self._lane_mass, 0.0, out=self._lane_mass)  # rounding

    def _statistics_now(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A_i and s_i of ``slots`` as of now: stored as of each slot's last update and
        discounted lazily (a factor of 0.5 per ``positives_half_life`` events since). A_i
        comes packed (its upper triangle), in float64 for the exact solve and in its stored
        float32 for CG."""
        gram = self._pos_gram[slots]  # one gather (a copy)
        if not self.config.cg_steps:
            gram = gram.astype(np.float64)  # factorized in float64
        target = self._pos_target[slots].copy()
        if self.config.positives_half_life is not None:
            factor = self._discount_since_update(slots)
            gram *= factor[:, None]
            target *= factor[:, None]
        return gram, target

    def _discount_since_update(self, slots: np.ndarray) -> np.ndarray:
        """0.5 per ``positives_half_life`` events since each slot's last update, counted on
        its lane's clock (1 without a half-life)."""
        half_life = self.config.positives_half_life
        since = self._lane_clock[self._pos_lane[slots]] - self._pos_at[slots]
        return halved(since, None if half_life is None else half_life / len(self._lane_clock))

    def _solved(self, rows: np.ndarray, gram: np.ndarray, target: np.ndarray,
                G_C: np.ndarray) -> np.ndarray:
        """The closed-form rows of ``rows`` from their statistics (``gram`` packed) and priors
        (or ``cg_steps`` CG steps towards them from the current rows)."""
        config = self.config
        gram = unpack_symmetric(gram, config.dim + 1)
        if config.cg_steps:
            return item_solve_cg(gram, target, self._prior[rows], G_C, self.alpha0,
                                 config.lam, config.prior_weight, start=self._psi[rows],
                                 steps=config.cg_steps)
        return item_solve(gram, target, self._prior[rows], G_C, self.alpha0, config.lam,
                          config.prior_weight)

    def resolve(self, rows: np.ndarray, G_C: np.ndarray | None = None) -> None:
        """Re-solve learned ``rows`` against the current user Gramian (``solve`` only).

        An item is solved when its positives arrive, with G_C as it was then; early in a
        stream, when G_C is young, its push-back was weaker than it is now. Re-solving from
        the stored statistics puts items on the same footing; :meth:`learn` sweeps
        ``sweep_per_step`` items round-robin so that every item is refreshed without a pause.
        ``G_C`` defaults to the user Gramian's current estimate."""
        rows = np.asarray(rows, dtype=np.int64)
        rows = rows[self._slot[rows] >= 0]
        if self.config.solver != "solve" or not len(rows):
            return
        slots = self._slot[rows]
        before = self._psi[rows].copy()
        G_C = self.user_gramian.value() if G_C is None else G_C
        self._psi[rows] = self._solved(rows, *self._statistics_now(slots), G_C)
        self._note(rows, "vectors")
        self.item_gramian.update(before, self._psi[rows])

    def _sweep(self, G_C: np.ndarray) -> np.ndarray:
        """Re-solve the next ``sweep_per_step`` rows, first retiring those whose positives
        have all but vanished (:meth:`_retire_faded`); returns them."""
        n, size = len(self._ids), self.config.sweep_per_step
        if self.config.solver != "solve" or not n or not size:
            return np.empty(0, dtype=np.int64)
        rows = (self._sweep_at + np.arange(min(size, n))) % n
        self._sweep_at = int(rows[-1] + 1) % n
        self._retire_faded(rows)
        self.resolve(rows, G_C)
        return rows

    def _retire_faded(self, rows: np.ndarray) -> None:
        """Forget the positives of ``rows`` that had none for ``RETIRE_AFTER_HALF_LIVES``
        half-lives (what is left of them weighs under a millionth): their slots go to the
        next items met, and they leave the items the relative α0 divides the positives' mass
        by. Kept, a catalogue that turns over (items of a season, of a day's news) counted
        every item it ever had there, under a mass that counts only recent positives: the
        all-pairs weight fell as 1/(items ever learned), by half each time the stream's
        length doubled. The row stays as last solved (near its prior by then), and a later
        positive starts the item afresh, as after :meth:`forget_positives`."""
        if self.config.positives_half_life is None:
            return
        rows = rows[self._slot[rows] >= 0]
        faded = self._discount_since_update(self._slot[rows]) < 0.5 ** RETIRE_AFTER_HALF_LIVES
        if faded.any():
            self.forget_positives(rows[faded])

    def _slots_for(self, rows: np.ndarray) -> np.ndarray:
        """Statistics slots of ``rows``, allocated at an item's first positive (so items only
        assigned, e.g. by a bootstrap, cost nothing)."""
        fresh = rows[self._slot[rows] < 0]
        if len(fresh):
            self._slot[fresh] = self._new_slots(len(fresh))
        return self._slot[rows]

    def _new_slots(self, count: int) -> np.ndarray:
        """``count`` empty statistics slots: forgotten ones first (emptied as they were freed,
        :meth:`_empty_slots`), then new ones."""
        reused = np.array(self._free_slots[:count], dtype=np.int64)
        del self._free_slots[:count]
        needed = self._slots_used + count - len(reused)
        if needed > len(self._pos_gram):
            size = max(needed, 2 * len(self._pos_gram), 256)
            self._pos_gram = _grow(self._pos_gram, size, 0.0)
            self._pos_target = _grow(self._pos_target, size, 0.0)
            self._pos_at = _grow(self._pos_at, size, 0.0)
            self._pos_lane = _grow(self._pos_lane, size, 0)
        new = np.arange(self._slots_used, needed)
        self._slots_used = needed
        return np.concatenate([reused, new])

    def _adagrad(self, rows: np.ndarray, grad: np.ndarray) -> None:
        accum = self._accum[rows] + grad ** 2
        self._accum[rows] = accum
        self._psi[rows] -= self.config.lr * grad / np.sqrt(accum)

    def _tick(self) -> None:
        self.steps += 1
        if self.steps % self.config.recompute_every == 0:
            self.last_drift = self.item_gramian.recompute(self._psi[: len(self._ids)])

    # -- counts ---------------------------------------------------------------------------
    def _decay(self, rows: np.ndarray, now: float) -> np.ndarray:
        return halved(now - self._count_at[rows], self.config.count_half_life)

    def _decayed_counts(self, rows: np.ndarray) -> np.ndarray:
        return self._count[rows] * self._decay(rows, self.events)

    def _add_counts(self, rows: np.ndarray, added: np.ndarray) -> np.ndarray:
        """n_i including this batch (so n_i ≥ 1 in the gradient), stamped at the event clock."""
        counts = self._count[rows] * self._decay(rows, self.events) + added
        self._count[rows] = counts
        self._count_at[rows] = self.events
        return counts

    # -- rows -----------------------------------------------------------------------------
    def assign(self, item_ids: Sequence[str], rows: np.ndarray) -> None:
        """Set the augmented rows of ``item_ids`` (creating unknown ids), e.g. from a bootstrap.

        The item Gramian stays exact; counts, Adagrad state and the statistics of existing items
        are kept. A row assigned becomes the item's prior ψ̃₀ for ``solve``, so the next positive
        of an item already learned re-solves it from its statistics and the new prior.
        """
        if len(set(item_ids)) != len(item_ids):
            raise ValueError("assign() needs distinct item ids")
        new_rows = np.asarray(rows, dtype=np.float64).reshape(len(item_ids), self.config.dim + 1)
        fresh = np.array([i not in self._index for i in item_ids], dtype=bool)
        self._append([i for i, new in zip(item_ids, fresh) if new], new_rows[fresh])
        known = self.rows_of([i for i, new in zip(item_ids, fresh) if not new])
        self.item_gramian.update(self._psi[known], new_rows[~fresh])
        self._psi[known] = new_rows[~fresh]
        self._prior[known] = new_rows[~fresh]
        self._note(known, "vectors", "items")

    def _ensure_rows(self, item_ids: Sequence[str]) -> np.ndarray:
        index = self._index
        rows = [index.get(i, -1) for i in item_ids]
        missing = [k for k, row in enumerate(rows) if row < 0]
        if missing:
            fresh = list(dict.fromkeys(item_ids[k] for k in missing))
            self._append(fresh, np.stack([self._initial_row(i) for i in fresh]))
            for k in missing:
                rows[k] = index[item_ids[k]]
        return np.array(rows, dtype=np.int64)

    def _initial_row(self, item_id: str) -> np.ndarray:
        if self.init_vector is not None:
            row = self.init_vector(item_id)
            if row is not None:
                return np.asarray(row, dtype=np.float64).reshape(self.config.dim + 1)
        key = int.from_bytes(hashlib.blake2b(item_id.encode(), digest_size=8).digest(), "little")
        rng = np.random.default_rng([self.config.seed, key])
        scale = self.config.init_scale / math.sqrt(self.config.dim)
        return np.append(rng.normal(0.0, scale, self.config.dim), 0.0)

    def _append(self, item_ids: list[str], rows: np.ndarray) -> None:
        start = len(self._ids)
        self._append_rows(item_ids, rows)
        self._prior[start: start + len(item_ids)] = rows

    def _append_rows(self, item_ids: list[str], rows: np.ndarray) -> None:
        """New ids with their rows, in the item Gramian too."""
        if not item_ids:
            return
        start = len(self._ids)
        self._reserve(start + len(item_ids))
        self._psi[start: start + len(item_ids)] = rows
        self._ids.extend(item_ids)  # before the index: a row found by id is always readable
        self._index.update({item_id: start + k for k, item_id in enumerate(item_ids)})
        self.item_gramian.update(np.empty((0, self.config.dim + 1)), rows)

    def _reserve(self, size: int) -> None:
        capacity = len(self._psi)
        if size <= capacity:
            return
        grown = max(size, 2 * capacity)
        self._psi = _grow(self._psi, grown, 0.0)
        self._accum = _grow(self._accum, grown, self._accum_init)
        self._count = _grow(self._count, grown, 0.0)
        self._count_at = _grow(self._count_at, grown, 0.0)
        self._prior = _grow(self._prior, grown, 0.0)
        self._slot = _grow(self._slot, grown, -1)
        self._offset = _grow(self._offset, grown, 0.0)
        self._offset_squares = _grow(self._offset_squares, grown, 0.0)
        self._offset_at = _grow(self._offset_at, grown, 0.0)

    # -- persistence (npz, no pickle) -----------------------------------------------------
    def save(self, path: Path, also: dict[str, np.ndarray] | None = None) -> str:
        """Write the state to the checkpoint at ``path``: the rows changed since the last save
        to ``path`` (a delta), or all of them (a base), beside the small arrays in ``path``
        itself (:mod:`state.delta_checkpoint`); returns "delta" or "base". ``also``: arrays
        of the caller's that must stand or fall with the model's (the stream positions it
        learned up to), under names of their own."""
        tables, whole = self._checkpoint_arrays()
        clash = set(whole) & set(also or {})
        if clash:
            raise ValueError(f"arrays {sorted(clash)} would overwrite the model's")
        kind = self.checkpoints.save(path, tables, {**whole, **(also or {})})
        self._changed = _no_marks()
        return kind

    def _checkpoint_arrays(self) -> tuple[dict[str, Table], dict[str, np.ndarray]]:
        """The state as tables of a row per item (split by what changes together: the
        vectors the sweep re-solves, the input offsets every history's items move, the rest
        of an item's state) and per statistics slot, with the rows written since the last
        save, and the arrays saved whole. Views, not copies: nothing learns while a save runs
        (the learner's thread saves), and the statistics alone are 8.6 KB an item, a copy of
        which doubled a save's memory."""
        n, slots = len(self._ids), self._slots_used
        arrays = {
            "vectors": {"psi": self._psi},
            "offsets": {"offset": self._offset, "offset_squares": self._offset_squares,
                        "offset_at": self._offset_at},
            "items": {"accum": self._accum, "count": self._count, "count_at": self._count_at,
                      "prior": self._prior, "slot": self._slot},
            "slots": {"pos_gram_upper": self._pos_gram, "pos_target": self._pos_target,
                      "pos_at": self._pos_at, "pos_lane": self._pos_lane},
        }
        tables = {}
        for name, table in arrays.items():
            rows = slots if name == "slots" else n
            tables[name] = Table(table, rows, np.flatnonzero(self._changed[name][:rows]))
        whole = {
            **ids_to_arrays(self._ids), "lane_clock": self._lane_clock,
            "clock": np.array([self.events, self.steps, self._sweep_at], dtype=np.int64),
            "positive_mass": np.array([self.positive_mass]), "alpha0": np.array([self.alpha0]),
            "lane_mass": self._lane_mass, "config": np.array(json.dumps(asdict(self.config))),
            **self.item_gramian.to_arrays("item_"), **self.user_gramian.to_arrays("user_"),
        }
        return tables, whole

    def _note(self, rows: np.ndarray, *tables: str) -> None:
        """Rows of ``tables`` (:meth:`_checkpoint_arrays`) written: the next save writes them.
        Every write of the state notes its rows, or a checkpoint loses it."""
        for table in tables:
            capacity = len(self._pos_gram) if table == "slots" else len(self._psi)
            self._changed[table] = mark_rows(self._changed[table], rows, capacity)

    def load(self, path: Path, restore: Callable[[dict], None] | None = None) -> bool:
        """Replace all state with the one saved at ``path``; False if there is no file.
        ``restore`` is handed the file's arrays, for those a caller saved ``also``.

        Hyperparameters other than ``dim`` may differ from the saved run's (they shape future
        steps only); a different ``dim`` raises ValueError.
        """
        data = self._checkpoint(path)
        if data is None:
            return False
        with _named_damage(path):
            self._load_learning(path, data, restore)
        return True

    def _load_learning(self, path: Path, data, restore: Callable[[dict], None] | None) -> None:
        """:meth:`load`'s work, once the checkpoint has read."""
        if restore is not None:
            restore(data)
        self._changed = _no_marks()
        self.checkpoints.continue_from(path, data)  # its next save is a delta of this one
        self._load_rows(data)
        self._accum = self._loaded_accumulators(data)
        self._offset_squares = (data["offset_squares"] if "offset_squares" in data  # older
                                else np.zeros((len(self._ids), self.config.dim)))
        self._offset_at = (data["offset_at"] if "offset_at" in data  # older: summed as of now
                           else np.full(len(self._ids), float(self.events)))
        self._count, self._count_at = data["count"], data["count_at"]
        self._load_statistics(data)
        self._reserve(max(len(self._ids), 1024))
        self.user_gramian.set_arrays(data, "user_")

    def _loaded_accumulators(self, data) -> np.ndarray:
        """The checkpoint's Adagrad accumulators where this solver keeps them; a checkpoint
        of the other solver gives none (solve) or each item's start (adagrad)."""
        saved = data["accum"]
        if saved.shape[1:] == self._accum_init.shape:
            return saved
        return np.tile(self._accum_init, (len(self._ids), 1))

    def _checkpoint(self, path: Path, skip: Collection[str] = ()):
        data = load_checkpoint(path, skip=skip)
        if data is not None:
            with _named_damage(path):
                saved_dim = json.loads(str(data["config"]))["dim"]
            if saved_dim != self.config.dim:
                raise ValueError(f"{path} holds dim={saved_dim}, this learner has "
                                 f"{self.config.dim}")
        return data

    def _load_rows(self, data) -> None:
        """What a replica has too: ids, rows, the clock and the item Gramian."""
        self._ids = ids_from_arrays(data, where="the model's checkpoint (model.npz)")
        _check_item_rows(data, len(self._ids))
        self._index = {item_id: row for row, item_id in enumerate(self._ids)}
        self._psi = data["psi"]
        self._offset = (data["offset"] if "offset" in data  # older checkpoints: no offsets
                        else np.zeros((len(self._ids), self.config.dim)))
        self._offsets_learned = bool(np.any(self._offset))
        clock = [int(x) for x in data["clock"]] + [0]  # older checkpoints: no sweep position
        self.events, self.steps, self._sweep_at = clock[:3]
        self.item_gramian.set_arrays(data, "item_")

    def _load_statistics(self, data) -> None:
        """The ``solve`` state; a checkpoint from before it existed starts it empty
        (prior = Ψ̃)."""
        if "slot" in data:
            self._prior, self._slot = data["prior"], data["slot"].astype(np.int64)
            self._pos_gram = (data["pos_gram_upper"].astype(np.float32)
                              if "pos_gram_upper" in data  # older checkpoints: whole A_i
                              else pack_symmetric(data["pos_gram"]).astype(np.float32))
            self._pos_target = data["pos_target"]
            # older checkpoints: statistics as of now (discounted from here on)
            self._pos_at = (data["pos_at"] if "pos_at" in data
                            else np.full(len(self._pos_gram), float(self.events)))
        else:
            self._prior = self._psi.copy()
            self._slot = np.full(len(self._psi), -1, dtype=np.int64)
            self._pos_gram, self._pos_target, self._pos_at = _no_statistics(self.config.dim + 1)
        self._slots_used = len(self._pos_gram)
        held = np.zeros(self._slots_used, dtype=bool)
        held[self._held_slots()] = True
        self._free_slots = np.flatnonzero(~held).tolist()  # forgotten before the save
        self._load_lanes(data)
        lanes = len(self._lane_clock)
        # an earlier version's forget_positives kept the forgotten items' statistics and mass,
        # which the relative α0 must not count now that those items are not among its items
        orphaned = self._empty_slots(np.array(self._free_slots, dtype=np.int64))
        saved = data["lane_mass"] if "lane_mass" in data else np.zeros(0)
        if len(saved) == lanes:
            self._lane_mass = np.maximum(np.asarray(saved, dtype=np.float64) - orphaned, 0.0)
        else:  # older checkpoints or another number of lanes: the saved mass on the lanes
            # _load_lanes put the slots on, as their masses are, each discounted from now on
            # as its slots (spread evenly, a forget of lane 0's slots found its share short)
            held = self._held_slots()
            by_lane = np.bincount(self._pos_lane[held], weights=self._slot_masses(held),
                                  minlength=lanes)
            mass = max(float(data["positive_mass"][0]) - orphaned.sum()
                       if "positive_mass" in data else by_lane.sum(), 0.0)
            if by_lane.sum() > 0.0:
                self._lane_mass = by_lane * (mass / by_lane.sum())
            else:  # adagrad keeps no statistics, but α0 reads its mass all the same
                self._lane_mass = np.zeros(lanes)
                self._lane_mass[0] = mass

    def _empty_slots(self, slots: np.ndarray) -> np.ndarray:
        """Empty the statistics of ``slots`` and return their mass per lane (discounted to
        now), which leaves :attr:`positive_mass` with them: a free slot holds nothing, and
        its mass is counted out once."""
        mass = np.bincount(self._pos_lane[slots], weights=self._slot_masses(slots),
                           minlength=len(self._lane_clock))
        self._pos_gram[slots], self._pos_target[slots] = 0.0, 0.0
        self._note(slots, "slots")
        return mass

    def _held_slots(self) -> np.ndarray:
        """The slots of the items that hold positives learned here."""
        slots = self._slot[: len(self._ids)]
        return slots[slots >= 0]

    def _slot_masses(self, slots: np.ndarray) -> np.ndarray:
        """Each slot's Σ α as of now: the last coordinate of φ̃ is 1, so A_i's corner entry is
        item i's Σ α (as of its last update, discounted since). Reads that one column, not a
        copy of the whole pool."""
        return self._pos_gram[slots, -1].astype(np.float64) * self._discount_since_update(slots)

    def _load_lanes(self, data) -> None:
        """The lane clocks and each slot's lane. A checkpoint with another number of lanes
        (older ones: one clock, the learned events; or ``positive_lanes`` changed) is read as
        lanes that ran evenly: every clock at the saved events per new lane, every slot on
        lane 0 until its next positive, as old in half-lives as it was on its saved lane.

        The age is what is carried over, not the update time scaled: lanes run unevenly
        (skewed traffic, a partition's lag), and a slot of a lane that ran ahead was dated
        after the even clock, its discount above 1 and growing with the lag (2^133 at 4M
        events of it: float32's inf in the solve, then NaN rows)."""
        lanes = len(self._lane_clock)
        saved = (np.asarray(data["lane_clock"], dtype=np.float64) if "lane_clock" in data
                 else np.array([float(self.events)]))
        if len(saved) == lanes and "pos_lane" in data:
            self._lane_clock, self._pos_lane = saved, data["pos_lane"].astype(np.int64)
            return
        saved_lanes = (data["pos_lane"].astype(np.int64) if "pos_lane" in data
                       else np.zeros(len(self._pos_at), dtype=np.int64))
        # a lane's half-life is its share of positives_half_life: len(saved) / lanes of an age
        ages = np.maximum(saved[saved_lanes] - self._pos_at, 0.0) * (len(saved) / lanes)
        self._lane_clock = np.full(lanes, saved.sum() / lanes)
        self._pos_at = self._lane_clock[0] - ages
        self._pos_lane = np.zeros(len(self._pos_gram), dtype=np.int64)
        self._note(np.arange(len(self._pos_gram)), "slots")  # every slot differs from the file

    def _positive_mass_now(self) -> float:
        """Σ α of the positives as of now, read from the statistics (:meth:`_slot_masses`)."""
        return float(self._slot_masses(self._held_slots()).sum())


#: the arrays of a checkpoint that only learning reads (a replica leaves them on the disk:
#: about 10 of the 11.2 KB an item at d = 64)
LEARNING_STATE = frozenset({"accum", "count", "count_at", "prior", "slot", "offset_squares",
                            "offset_at", "pos_gram_upper", "pos_target", "pos_at", "pos_lane",
                            "pos_gram"})


class ItemReplica(ItemLearner):
    """A read replica of an :class:`ItemLearner` that learns elsewhere (the worker's copy of
    its learner process's model): the learner's reads, moved forward by :meth:`follow`.

    It holds the ids, the rows Ψ̃, the step clock and the item Gramian, and none of the
    learning state: no Adagrad accumulators, priors or counts (as a full learner these took
    twice the memory of the rows: 1 GB per million items at d = 64) and no solve statistics.
    Learning, assigning, saving and asking for counts raise TypeError.
    """

    def _reserve(self, size: int) -> None:
        if size > len(self._psi):
            grown = max(size, 2 * len(self._psi))
            self._psi = _grow(self._psi, grown, 0.0)
            self._offset = _grow(self._offset, grown, 0.0)

    _append = ItemLearner._append_rows  # no priors
    _followed_alpha0: float | None = None

    @property
    def alpha0(self) -> float:
        """The learner's α0 as of the last delta or checkpoint followed; before either, what
        a learner with nothing learned has (relative: 0, not the setting itself)."""
        return super().alpha0 if self._followed_alpha0 is None else self._followed_alpha0

    def follow(self, delta: RowDelta) -> None:
        """Apply a :class:`RowDelta` of the learner this one replicates: afterwards its ids,
        rows, step count and item Gramian are the learner's (the Gramian by the same rank-k
        corrections). Raises ValueError when the delta does not continue this replica."""
        if delta.first_row != len(self._ids):
            raise ValueError(f"a delta from row {delta.first_row} cannot follow a replica "
                             f"of {len(self._ids)} rows")
        fresh = delta.rows >= delta.first_row
        if int(fresh.sum()) != len(delta.new_ids):
            raise ValueError("a delta must carry every new row")
        self._append(list(delta.new_ids), delta.values[fresh])
        moved = delta.rows[~fresh]
        self.item_gramian.update(self._psi[moved], delta.values[~fresh])
        self._psi[moved] = delta.values[~fresh]
        if len(delta.input_rows):
            self._offset[delta.input_rows] = delta.input_values
            self._offsets_learned = True
        self.steps, self.last_drift = delta.steps, delta.drift
        self._followed_alpha0 = delta.alpha0

    def load(self, path: Path, restore: Callable[[dict], None] | None = None) -> bool:
        """The rows of the learner's checkpoint at ``path`` (False if there is none);
        ``restore`` as :meth:`ItemLearner.load`'s."""
        data = self._checkpoint(path, skip=LEARNING_STATE)
        if data is None:
            return False
        with _named_damage(path):
            if restore is not None:
                restore(data)
            self._load_rows(data)
        self._reserve(max(len(self._ids), 1024))
        if "alpha0" in data:
            self._followed_alpha0 = float(data["alpha0"][0])
        return True

    def _learning(self, *args, **kwargs):
        raise TypeError("an ItemReplica only follows the learner it replicates")

    learn = learn_inputs = assign = resolve = save = delta = count = _learning


#: the checkpoint's arrays of a row per item (those it holds: a replica skips some)
ITEM_ARRAYS = ("psi", "offset", "accum", "count", "count_at", "prior", "slot",
               "offset_squares", "offset_at")


def _check_item_rows(data, items: int) -> None:
    """Raise :class:`DamagedCheckpoint` unless each per-item array has a row per id: one id
    more than rows loaded an item of zeros, and every later row under another item's id."""
    for name in ITEM_ARRAYS:
        if name in data and len(data[name]) != items:
            raise DamagedCheckpoint(f"the model's checkpoint holds {items} item ids and "
                                    f"{len(data[name])} rows of {name}: restore it, or remove "
                                    "the head and its parts to start the model empty")


@contextmanager
def _named_damage(path: Path) -> Iterator[None]:
    """A checkpoint that lacks an array the load reads raises :class:`DamagedCheckpoint`
    naming the file, as any other damage does, not a bare KeyError."""
    try:
        yield
    except KeyError as missing:
        raise DamagedCheckpoint(f"{path} lacks {missing}: restore it, or remove the head and "
                                "its parts to start the model empty") from None


def halved(elapsed: np.ndarray, half_life: float | None) -> np.ndarray:
    """0.5 per ``half_life`` of ``elapsed`` (events, each entry its own): the one discount
    of the learner's decayed quantities (counts, positives, offset accumulators); ones
    without a half-life (kept for ever)."""
    elapsed = np.asarray(elapsed, dtype=np.float64)
    if half_life is None:
        return np.ones(elapsed.shape)
    return 0.5 ** (elapsed / half_life)


def _no_statistics(width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An empty pool of per-item statistics: A_i's upper triangle in float32 (the memory:
    (d+1)(d+2)/2 floats, 8.6 KB at d = 64), s_i in float64, and the event clock each was last
    updated at."""
    return (np.zeros((0, packed_size(width)), dtype=np.float32), np.zeros((0, width)),
            np.zeros(0))


def _no_marks() -> dict[str, np.ndarray]:
    """No row of any table written since the last save (flags grow as rows are noted)."""
    return {table: np.zeros(0, dtype=bool) for table in ("vectors", "offsets", "items", "slots")}


def _grow(array: np.ndarray, size: int, fill: float) -> np.ndarray:
    """``array`` in a larger one, the new rows ``fill``. A zero fill takes memory the system
    hands out zeroed, page by page as rows are first written: the statistics pool is
    (d+1)(d+2)/2 floats per item, and writing zeros into each new half (of whole matrices then)
    was a sixteenth of the learner's time while a catalogue filled."""
    shape = (size,) + array.shape[1:]
    grown = np.full(shape, fill, array.dtype) if np.any(fill) else np.zeros(shape, array.dtype)
    grown[: len(array)] = array
    return grown
