"""Item vectors before any training: RSVD of the item-item PMI matrix (LED §5.1).

From an initial event log: item-item co-occurrence in user timelines → positive PMI with the
context distribution raised to 0.75 → randomized SVD → v_i = U_i·sqrt(S). The same co-occurrence
also gives a vector to an item that first appears on the stream (item cold start, which LED's
offline pre-training cannot do): the weighted mean of the vectors of the items it co-occurs with.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse
from sklearn.utils.extmath import randomized_svd


def cooccurrence(user_ids: np.ndarray, item_rows: np.ndarray, n_items: int,
                 window: int | None = None) -> scipy.sparse.csr_matrix:
    """Symmetric item × item co-occurrence counts in user timelines, zero diagonal.

    Events are given in time order as parallel arrays (any hashable user ids).

    - ``window=None``: C_ij = the number of users whose timeline contains both i and j. Each
      user counts once per pair, so a heavy user repeating an item does not dominate.
    - ``window=w``: C_ij = the number of event pairs (i, j) of one user at most w positions apart
      in that user's timeline, in either order: co-occurrence in a sliding context, as for text.

    The diagonal (an item with itself) carries no similarity information and is dropped.

    Examples
    --------
    >>> C = cooccurrence(np.array(["a", "a", "b", "b"]), np.array([0, 1, 0, 1]), 3)
    >>> C.toarray().tolist()
    [[0.0, 2.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    """
    _, users = np.unique(np.asarray(user_ids), return_inverse=True)
    items = np.asarray(item_rows, dtype=np.int64)
    if window is None:
        C = _user_cooccurrence(users.ravel(), items, n_items)
    else:
        C = _window_cooccurrence(users.ravel(), items, n_items, window)
    C = (C - scipy.sparse.diags(C.diagonal())).tocsr()
    C.eliminate_zeros()
    return C


def _user_cooccurrence(users: np.ndarray, items: np.ndarray,
                       n_items: int) -> scipy.sparse.csr_matrix:
    n_users = int(users.max()) + 1 if len(users) else 0
    X = scipy.sparse.csr_matrix((np.ones(len(items)), (users, items)), shape=(n_users, n_items))
    X.data[:] = 1.0  # duplicates were summed: binarize
    return (X.T @ X).tocsr()


def _window_cooccurrence(users: np.ndarray, items: np.ndarray, n_items: int,
                         window: int) -> scipy.sparse.csr_matrix:
    order = np.argsort(users, kind="stable")  # each user's events stay in time order
    users, items = users[order], items[order]
    left, right = [], []
    for offset in range(1, window + 1):
        same = users[offset:] == users[:-offset]
        left.append(items[:-offset][same])
        right.append(items[offset:][same])
    a = np.concatenate(left + right) if left else np.empty(0, dtype=np.int64)
    b = np.concatenate(right + left) if left else np.empty(0, dtype=np.int64)
    return scipy.sparse.csr_matrix((np.ones(len(a)), (a, b)), shape=(n_items, n_items))


def pmi(cooc: scipy.sparse.spmatrix, context_power: float = 0.75,
        shift: float = 1.0) -> scipy.sparse.csr_matrix:
    """Shifted positive PMI of a co-occurrence matrix, with a smoothed context distribution.

    With N = Σ C, p(i, j) = C_ij / N, p(i) = Σ_j C_ij / N (row marginal) and the context
    probability p_c(j) ∝ (Σ_i C_ij)^context_power (LED §5.1, Levy et al.: raising it to 0.75
    keeps rare contexts from getting huge PMI),

        M_ij = max(log(p(i, j) / (p(i) p_c(j))) − log(shift), 0).

    The marginals come from the co-occurrence table itself, so independent items get PMI 0. Pairs
    never seen together have PMI −∞, clipped to 0 like every negative value: the result stays as
    sparse as C (negative PMI is also the least reliable part, estimated from few counts).

    Examples
    --------
    >>> C = scipy.sparse.csr_matrix(np.array([[0.0, 2.0], [2.0, 0.0]]))
    >>> pmi(C, context_power=1.0).toarray().round(4).tolist()
    [[0.0, 0.6931], [0.6931, 0.0]]
    """
    C = scipy.sparse.coo_matrix(cooc, dtype=np.float64)
    C.sum_duplicates()
    total = C.sum()
    row_p = np.asarray(C.sum(axis=1)).ravel() / total
    context = np.asarray(C.sum(axis=0)).ravel() ** context_power
    context_p = context / context.sum()
    values = np.log(C.data / total / (row_p[C.row] * context_p[C.col])) - np.log(shift)
    M = scipy.sparse.csr_matrix((np.maximum(values, 0.0), (C.row, C.col)), shape=C.shape)
    M.eliminate_zeros()
    return M


def rsvd_item_vectors(pmi_matrix: scipy.sparse.spmatrix, dim: int, seed: int = 0,
                      n_iter: int = 7) -> np.ndarray:
    """Item vectors V = U·sqrt(S) from a rank-``dim`` randomized SVD of the PMI matrix.

    Splitting S evenly between the two factors (rather than V = U·S) is the usual choice for
    PMI embeddings (Levy et al.): inner products ⟨v_i, v_j⟩ then approximate the symmetric part
    of PMI without over-weighting the top directions. Signs of singular vectors are arbitrary;
    only inner products and distances are meaningful.

    Examples
    --------
    >>> M = scipy.sparse.csr_matrix(np.diag([4.0, 1.0]))
    >>> np.abs(rsvd_item_vectors(M, dim=1, seed=0)).round(6).tolist()
    [[2.0], [0.0]]
    """
    if dim > min(pmi_matrix.shape):
        raise ValueError(f"dim={dim} exceeds the matrix rank bound {min(pmi_matrix.shape)}")
    U, S, _ = randomized_svd(pmi_matrix, n_components=dim, n_iter=n_iter, random_state=seed)
    return U * np.sqrt(S)


def cold_start_vector(neighbor_vectors: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """A new item's vector: the weighted mean of the items it co-occurs with.

    Works on plain (k, d) or augmented (k, d+1) rows, so a new item inherits its neighbours'
    average bias too. No neighbours, or zero total weight, gives zeros: score 0 for every user.

    Examples
    --------
    >>> cold_start_vector(np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([3.0, 1.0])).tolist()
    [0.75, 0.25]
    """
    neighbor_vectors = np.asarray(neighbor_vectors, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    total = weights.sum()
    if len(weights) == 0 or total <= 0:
        return np.zeros(neighbor_vectors.shape[-1])
    return (weights @ neighbor_vectors) / total


def pmi_item_vectors(user_ids: np.ndarray, item_ids: np.ndarray, dim: int, *,
                     window: int | None = None, context_power: float = 0.75,
                     seed: int = 0) -> tuple[list[str], np.ndarray]:
    """Item ids and their vectors (n, ``dim``) from an event log in time order (parallel
    arrays of user and item ids): :func:`cooccurrence` → :func:`pmi` →
    :func:`rsvd_item_vectors`, the whole of LED §5.1's pre-training. Items are in the order
    they first appear."""
    item_ids = np.asarray(item_ids)
    ids, first, rows = np.unique(item_ids, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # first appearance
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    cooc = cooccurrence(np.asarray(user_ids), rank[rows.ravel()], len(ids), window=window)
    vectors = rsvd_item_vectors(pmi(cooc, context_power), dim, seed=seed)
    return [str(item) for item in ids[order]], vectors


def as_prior_rows(vectors: np.ndarray, norm: float) -> np.ndarray:
    """Augmented rows [v, b = 0] for a learner's priors: the vectors scaled to a mean row norm
    of ``norm`` (the learner's ``init_scale``, the norm of the random row a new item would get
    instead). PMI vectors come at the scale of the PMI values, tens of times longer than the
    rows the stream learns, and a prior that long outweighs an item's first events.

    Examples
    --------
    >>> as_prior_rows(np.array([[3.0, 4.0], [0.0, 5.0]]), 1.0).round(6).tolist()
    [[0.6, 0.8, 0.0], [0.0, 1.0, 0.0]]
    """
    vectors = np.asarray(vectors, dtype=np.float64)
    mean_norm = float(np.linalg.norm(vectors, axis=1).mean()) if len(vectors) else 0.0
    scaled = vectors * (norm / mean_norm) if mean_norm > 0 else vectors
    return np.hstack([scaled, np.zeros((len(vectors), 1))])


def assign_log_priors(learner, user_ids: np.ndarray, item_ids: np.ndarray, *,
                      window: int | None = None, seed: int = 0) -> list[str]:
    """Give the items of an event log their :func:`pmi_item_vectors`, scaled by
    :func:`as_prior_rows` to ``learner``'s ``init_scale``, as the priors of ``learner`` (a
    :class:`~models.learner.ItemLearner`, ``assign``); returns the items' ids."""
    ids, vectors = pmi_item_vectors(user_ids, item_ids, learner.config.dim, window=window,
                                    seed=seed)
    learner.assign(ids, as_prior_rows(vectors, learner.config.init_scale))
    return ids
