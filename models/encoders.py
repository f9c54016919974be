"""Amortized user encoders: φ(u) is a function of the user's history and the item vectors.

Nothing is learned per user (LED §5.2 "amortized inference"), so a new user is served from its
first event and the memory of the model does not grow with the number of users. An empty history
encodes to φ = 0: the scores are then the item biases alone, i.e. the popularity ranking that
LED §7.2 falls back to.

- :func:`mean_encoder` / :func:`mean_encoder_batch`: LED's average of item vectors, optionally
  weighted (event kind) and decayed by recency; :func:`history_gradient` is its adjoint, which
  carries a gradient from the user vectors back to the item inputs they average.
- :func:`ials_fold_in`: the least-squares user vector of the all-pairs loss with items fixed
  (Rendle §5.1.2 applied to one user, §6.3), using the item Gramian so it costs O(T·d² + d³).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import scipy.linalg
import scipy.sparse


def recency_weights(ts: np.ndarray, half_life: float, t_max: float | None = None) -> np.ndarray:
    """2^(−(t_max − t)/half_life): an event one half-life older counts half as much.

    Examples
    --------
    >>> recency_weights(np.array([0.0, 10.0]), half_life=10.0).tolist()
    [0.5, 1.0]
    """
    ts = np.asarray(ts, dtype=np.float64)
    t_max = ts.max() if t_max is None else t_max
    return np.exp2(-(t_max - ts) / half_life)


def position_weights(n_events: int, half_life_events: float) -> np.ndarray:
    """2^(−j/half_life) for the event j places before the newest of a time-ordered history.

    Recency counted in the user's own events rather than in time: what a user did last says
    most about what they do next however long ago it was, and the unit means the same on
    every dataset (a dataset without real timestamps has no meaningful time half-life).

    Examples
    --------
    >>> position_weights(3, half_life_events=1.0).tolist()
    [0.25, 0.5, 1.0]
    """
    return np.exp2(-np.arange(n_events - 1, -1, -1, dtype=np.float64) / half_life_events)


def ragged_position_weights(indptr: np.ndarray, half_life_events: float) -> np.ndarray:
    """:func:`position_weights` of consecutive histories, flat: history b is
    ``[indptr[b], indptr[b+1])``.

    Examples
    --------
    >>> ragged_position_weights(np.array([0, 2, 3]), half_life_events=1.0).tolist()
    [0.5, 1.0, 1.0]
    """
    indptr = np.asarray(indptr, dtype=np.int64)
    lengths = np.diff(indptr)
    from_newest = np.repeat(indptr[1:], lengths) - 1 - np.arange(indptr[-1])
    return np.exp2(-from_newest / half_life_events)


def mean_encoder(V_hist: np.ndarray, weights: np.ndarray | None = None,
                 ts: np.ndarray | None = None, half_life: float | None = None,
                 half_life_events: float | None = None) -> np.ndarray:
    """LED's user vector, the weighted mean φ = Σ_t w_t v_t / Σ_t w_t over a history.

    With equal weights this is LED's (1/T) Σ_t v_t (§5.2). With kind weights the divisor is
    Σ w_t, not T: weights then mix directions (a sale counts more than a view) without scaling
    φ. Dividing by T was tried first and measured worse: a user whose only event is a sale
    (weight 10) got φ = 10·v, scores far above the target 1 on that user's next items, and the
    square loss then pushed those items *away* from the user's own cluster. On the planted
    stream of ``tests/test_engine_model.py`` (clicks, weight 4), one pass, micro-batches of 16,
    64 and 256, d = 16 and 64: own-cluster precision@10 was 0.83–0.98 with 1/T and 1.0 with Σw;
    a newcomer's three sales put ≥ 8 of their cluster's items in their top 10 in 11 of 18 runs
    with 1/T and 18 of 18 with Σw (d = 16, 6 clusters × 3 batch sizes).

    Parameters
    ----------
    V_hist : (T, d)
        Item vectors of the history, one row per event (repeats allowed).
    weights : (T,), optional
        Per-event weights (e.g. the kind's confidence); default 1.
    ts, half_life : optional
        Event times and a half-life in the same unit; when both are given, w_t is multiplied by
        2^(−(t_max − t_t)/half_life), t_max the newest event of the history.
    half_life_events : optional
        Recency in events (:func:`position_weights`): the rows of ``V_hist`` are in time
        order, and the j-th before the last is weighted by 2^(−j/half_life_events).

    Returns
    -------
    ndarray (d,); zeros for an empty history, or one whose weights all underflow.

    Examples
    --------
    >>> mean_encoder(np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([1.0, 3.0])).tolist()
    [0.25, 0.75]
    >>> mean_encoder(np.array([[2.0], [4.0]]), ts=np.array([0.0, 1.0]), half_life=1.0).tolist()
    [3.3333333333333335]
    """
    V_hist = np.asarray(V_hist, dtype=np.float64)
    T = len(V_hist)
    if T == 0:
        return np.zeros(V_hist.shape[1])
    w = np.ones(T) if weights is None else np.asarray(weights, dtype=np.float64)
    if ts is not None and half_life is not None:
        w = w * recency_weights(ts, half_life)
    if half_life_events is not None:
        w = w * position_weights(T, half_life_events)
    total = w.sum()
    if not total > 0:  # every weight underflowed (events far older than the half-life)
        return np.zeros(V_hist.shape[1])
    return (w @ V_hist) / total


def pack_histories(histories: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Ragged item-row histories → CSR layout (indptr (B+1,), item_rows (nnz,)).

    Examples
    --------
    >>> [a.tolist() for a in pack_histories([[3, 1], [], [2]])]
    [[0, 2, 2, 3], [3, 1, 2]]
    """
    lengths = np.fromiter((len(h) for h in histories), dtype=np.int64, count=len(histories))
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    rows = np.fromiter(itertools.chain.from_iterable(histories), dtype=np.int64,
                       count=int(indptr[-1]))
    return indptr, rows


def history_weights(indptr: np.ndarray, weights: np.ndarray | None = None,
                    ts: np.ndarray | None = None, half_life: float | None = None,
                    half_life_events: float | None = None) -> np.ndarray:
    """The weight h_bt of each event of B consecutive histories in its user's vector, flat:
    confidence × recency, normalized to sum to 1 per history (:func:`mean_encoder`'s weights).

    History b is ``[indptr[b], indptr[b+1])``; ``ts`` and ``half_life`` decay by time (t_max
    taken per history), ``half_life_events`` by the place before the history's newest event.

    Examples
    --------
    >>> history_weights(np.array([0, 2, 3]), np.array([1.0, 3.0, 2.0])).tolist()
    [0.25, 0.75, 1.0]
    """
    indptr = np.asarray(indptr, dtype=np.int64)
    lengths = np.diff(indptr)
    owner = np.repeat(np.arange(len(lengths)), lengths)
    w = np.ones(len(owner)) if weights is None else np.asarray(weights, dtype=np.float64)
    if ts is not None and half_life is not None:
        ts = np.asarray(ts, dtype=np.float64)
        t_max = np.full(len(lengths), -np.inf)
        np.maximum.at(t_max, owner, ts)
        w = w * recency_weights(ts, half_life, t_max[owner])
    if half_life_events is not None:
        w = w * ragged_position_weights(indptr, half_life_events)
    totals = np.bincount(owner, weights=w, minlength=len(lengths))
    # a history whose weights all underflowed (its events far older than the half-life)
    # weighs nothing, as an empty one: 0/0 would put NaN in every Gramian and solve after
    return w / np.where(totals > 0, totals, 1.0)[owner]


def mean_encoder_batch(V: np.ndarray, indptr: np.ndarray, item_rows: np.ndarray,
                       weights: np.ndarray | None = None, ts: np.ndarray | None = None,
                       half_life: float | None = None,
                       half_life_events: float | None = None,
                       columns: int | None = None,
                       offsets: np.ndarray | None = None) -> np.ndarray:
    """:func:`mean_encoder` for B histories at once: one sparse (B × n) · (n × d) product.

    History b is ``item_rows[indptr[b]:indptr[b+1]]`` (rows of ``V``), with the matching slices
    of ``weights`` and ``ts``; t_max is taken per history. No Python loop runs per event, so a
    micro-batch of the stream costs one sparse matmul.

    ``columns``: average only the first ``columns`` columns of V (the item vectors of the
    augmented rows [v_i, b_i], passed whole): scipy multiplies a C-contiguous dense operand as
    it is but copies any other, so the product runs on the whole contiguous matrix and the
    result is cut, which costs one extra column instead of a copy or a gather of the rows.

    ``offsets`` (n, d): added to the rows averaged, so the encoder averages the item *inputs*
    q_j = v_j + δ_j (:class:`models.learner.ItemLearner`'s input offsets); one more product
    of the same sparse matrix.

    Returns
    -------
    ndarray (B, d) (d = ``columns`` when given); the row of an empty history is zero.

    Examples
    --------
    >>> V = np.array([[1.0, 0.0], [0.0, 1.0]])
    >>> mean_encoder_batch(V, np.array([0, 2, 2]), np.array([0, 1])).tolist()
    [[0.5, 0.5], [0.0, 0.0]]
    >>> mean_encoder_batch(V, np.array([0, 1]), np.array([0]), offsets=V[::-1]).tolist()
    [[1.0, 1.0]]
    """
    V = np.asarray(V, dtype=np.float64)
    indptr = np.asarray(indptr, dtype=np.int64)
    w = history_weights(indptr, weights, ts, half_life, half_life_events)
    item_rows = np.asarray(item_rows).reshape(-1)
    if offsets is None and not V.flags.c_contiguous:  # multiply the used rows, not a copy of V
        used, item_rows = np.unique(item_rows, return_inverse=True)
        V = V[used]
    H = scipy.sparse.csr_matrix((w, item_rows, indptr), shape=(len(indptr) - 1, len(V)))
    phi = np.asarray(H @ V).reshape(len(indptr) - 1, V.shape[1])[:, :columns]
    if offsets is not None:
        phi = phi + H @ np.asarray(offsets, dtype=np.float64)
    return phi


def history_gradient(indptr: np.ndarray, item_rows: np.ndarray, h: np.ndarray,
                     g_phi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The gradient reaching each item input q_j through the mean encoder: φ_b = Σ_t h_bt
    q_{r_bt} is linear, so ∂/∂q_j Σ_b ⟨g_b, φ_b⟩ = Σ_{b,t: r_bt = j} h_bt g_b (the adjoint of
    :func:`mean_encoder_batch`), summed per distinct row with one sparse product.

    Returns
    -------
    (rows, grads): the distinct item rows of the histories, sorted, and (len(rows), d).

    Examples
    --------
    >>> rows, grads = history_gradient(np.array([0, 2, 3]), np.array([4, 7, 4]),
    ...                                np.array([0.5, 0.5, 1.0]), np.array([[2.0], [1.0]]))
    >>> rows.tolist(), grads.tolist()
    ([4, 7], [[2.0], [1.0]])
    """
    indptr = np.asarray(indptr, dtype=np.int64)
    owner = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    rows, local = np.unique(np.asarray(item_rows, dtype=np.int64), return_inverse=True)
    adjoint = scipy.sparse.csr_matrix((np.asarray(h, dtype=np.float64), (local, owner)),
                                      shape=(len(rows), len(indptr) - 1))
    return rows, np.asarray(adjoint @ np.asarray(g_phi, dtype=np.float64))


def ials_fold_in(Psi_hist: np.ndarray, alpha: np.ndarray, G_I: np.ndarray, alpha0: float,
                 lam: float) -> np.ndarray:
    """The user vector that minimizes the all-pairs loss with the items fixed (iALS fold-in).

    Minimizes over φ ∈ R^d, with the user's augmented coordinate fixed at 1,

        Σ_t α_t (⟨φ, v_t⟩ + b_t − 1)² + α0 Σ_i (⟨φ, v_i⟩ + b_i)² + λ‖φ‖².

    Splitting G_I = Σ_i ψ̃ψ̃ᵀ into blocks G_vv (d×d) and G_vb (d,), the normal equations are

        (Σ_t α_t v_t v_tᵀ + α0 G_vv + λI) φ = Σ_t α_t (1 − b_t) v_t − α0 G_vb,

    a d×d positive definite solve: O(T·d² + d³), independent of the number of items.

    An empty history returns zeros, not the minimizer −(α0 G_vv + λI)⁻¹ α0 G_vb: that vector only
    pushes every score towards 0 (it knows nothing about the user), while φ = 0 ranks by the
    biases, i.e. by popularity, which is the fallback we want for users we know nothing about.

    Parameters
    ----------
    Psi_hist : (T, d+1)
        Augmented rows [v_t, b_t] of the history's items (repeats allowed: they add up).
    alpha : (T,)
        Extra confidence weight of each event (positives are also in the α0 sum).
    G_I : (d+1, d+1)
        Item Gramian over all items.

    Returns
    -------
    ndarray (d,)

    Examples
    --------
    >>> Psi = np.array([[1.0, 0.0], [-1.0, 0.0]])
    >>> ials_fold_in(Psi[:1], np.array([1.0]), Psi.T @ Psi, alpha0=0.5, lam=0.0).tolist()
    [0.5]
    """
    Psi_hist = np.asarray(Psi_hist, dtype=np.float64)
    d = G_I.shape[0] - 1
    if len(Psi_hist) == 0:
        return np.zeros(d)
    alpha = np.asarray(alpha, dtype=np.float64)
    V, b = Psi_hist[:, :d], Psi_hist[:, d]
    lhs = (V.T * alpha) @ V + alpha0 * G_I[:d, :d] + lam * np.eye(d)
    rhs = (alpha * (1.0 - b)) @ V - alpha0 * G_I[:d, d]
    return scipy.linalg.solve(lhs, rhs, assume_a="pos")
