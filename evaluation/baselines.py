"""Batch baselines behind one contract: popularity, EASE, iALS and BPR (the last two from
``implicit``).

Every model reads a user only through a history row (a binary CSR row over the items), never
through a user id. That is what the protocols need: held-out users were never trained on, and a
leave-one-out test row holds one more item than the user's training row. iALS folds a history in
with the exact least-squares user step, BPR by maximizing its own objective with the item factors
fixed, EASE and popularity need nothing.

An empty history gets the training popularity ranking (LED §7.2, and what the serving engine
does for an unknown user), so first events in the prequential protocol are not scored on
arbitrary all-zero ties.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Protocol, runtime_checkable

import numpy as np
import scipy.sparse as sp
from scipy.linalg import lapack
from threadpoolctl import threadpool_limits

from models.metrics import top_k


@runtime_checkable
class Recommender(Protocol):
    """A batch model: fit once on a user×item matrix, then rank items for history rows.

    ``recommend`` is read-only: it never changes the model, whatever rows it is asked about.
    It returns ``(rows, k)`` item indices, best first, none of them in ``exclude``, ``-1`` where
    fewer than ``k`` items are left.
    """

    name: str

    def fit(self, train: sp.csr_matrix) -> None: ...

    def recommend(self, history: sp.csr_matrix, k: int,
                  exclude: sp.csr_matrix | None = None) -> np.ndarray: ...


def mask_excluded(scores: np.ndarray, exclude: sp.csr_matrix | None) -> np.ndarray:
    """Set the excluded (row, item) scores to -inf, in place, and return the scores."""
    if exclude is not None and exclude.nnz:
        rows = np.repeat(np.arange(exclude.shape[0]), np.diff(exclude.indptr))
        scores[rows, exclude.indices] = -np.inf
    return scores


def item_popularity(train: sp.csr_matrix) -> np.ndarray:
    """Users per item in the training matrix."""
    return np.asarray(train.sum(axis=0)).ravel().astype(np.float64)


class ScoringRecommender(ABC):
    """A model that scores every item for a history row; ``recommend`` is the top-k of the
    scores. Subclasses implement ``_fit`` and ``_score``."""

    name = "scoring"

    def __init__(self) -> None:
        self.popularity: np.ndarray | None = None

    def fit(self, train: sp.csr_matrix) -> None:
        self.popularity = item_popularity(train)
        self._fit(sp.csr_matrix(train, dtype=np.float32))

    def score(self, history: sp.csr_matrix) -> np.ndarray:
        """Dense ``(rows, n_items)`` float64 scores; empty rows get training popularity."""
        if self.popularity is None:
            raise RuntimeError(f"{self.name}: fit() first")
        history = sp.csr_matrix(history, dtype=np.float32)
        scores = np.asarray(self._score(history), dtype=np.float64)
        empty = np.diff(history.indptr) == 0
        scores[empty] = self.popularity
        return scores

    def recommend(self, history: sp.csr_matrix, k: int,
                  exclude: sp.csr_matrix | None = None) -> np.ndarray:
        return top_k(mask_excluded(self.score(history), exclude), k)

    @abstractmethod
    def _fit(self, train: sp.csr_matrix) -> None: ...

    @abstractmethod
    def _score(self, history: sp.csr_matrix) -> np.ndarray: ...


class Popularity(ScoringRecommender):
    """Items ranked by how many training users consumed them, the same for everyone."""

    name = "popularity"

    def _fit(self, train: sp.csr_matrix) -> None:
        pass

    def _score(self, history: sp.csr_matrix) -> np.ndarray:
        return np.broadcast_to(self.popularity, (history.shape[0], len(self.popularity))).copy()


# -- EASE ----------------------------------------------------------------------------------------


def ease_weights(gram: np.ndarray, l2: float) -> np.ndarray:
    """EASE item-item weights (Steck 2019): B = I − P·diag(1/diag(P)), P = (XᵀX + λI)⁻¹.

    The closed form of min ‖X − XB‖² + λ‖B‖² subject to diag(B) = 0. P is symmetric positive
    definite, so a Cholesky inverse (potrf/potri) does half the work of a general inverse.

    Parameters
    ----------
    gram : ndarray of shape (n_items, n_items)
        XᵀX of the binary training matrix.
    l2 : float
        λ > 0.

    Returns
    -------
    ndarray of shape (n_items, n_items), float64, zero diagonal

    Examples
    --------
    >>> x = np.array([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    >>> b = ease_weights(x.T @ x, 1.0)
    >>> bool(np.allclose(np.diag(b), 0.0)), bool(b[0, 1] > 0 and b[0, 2] < 1e-12)
    (True, True)
    """
    regularized = np.array(gram, dtype=np.float64, copy=True)
    regularized[np.diag_indices_from(regularized)] += l2
    factor, info = lapack.dpotrf(regularized, lower=1, overwrite_a=1)
    if info != 0:
        raise np.linalg.LinAlgError(f"XᵀX + λI is not positive definite (potrf info {info})")
    inverse, info = lapack.dpotri(factor, lower=1, overwrite_c=1)
    if info != 0:
        raise np.linalg.LinAlgError(f"potri failed (info {info})")
    lower = np.tril(inverse)
    precision = lower + np.tril(lower, -1).T
    weights = precision / -np.diag(precision)
    np.fill_diagonal(weights, 0.0)
    return weights


class EASE(ScoringRecommender):
    """Embarrassingly shallow autoencoder: score = history row · B."""

    name = "ease"

    def __init__(self, l2: float = 500.0) -> None:
        super().__init__()
        self.l2 = l2
        self.weights: np.ndarray | None = None

    def _fit(self, train: sp.csr_matrix) -> None:
        gram = (train.T @ train).toarray()
        # float32 halves the memory and time of scoring; the ranking does not need more.
        self.weights = ease_weights(gram, self.l2).astype(np.float32)

    def _score(self, history: sp.csr_matrix) -> np.ndarray:
        return history @ self.weights


# -- iALS ----------------------------------------------------------------------------------------


class IALS(ScoringRecommender):
    """implicit's CPU iALS (Hu, Koren, Volinsky). History rows are folded in with
    ``recalculate_user``: the exact least-squares user step given the item factors,
    x = (Yᵀ C Y + λI)⁻¹ Yᵀ C p, where implicit's confidence is ``alpha`` on a consumed item
    (not 1 + alpha) and 1 elsewhere."""

    name = "ials"

    def __init__(self, factors: int = 64, regularization: float = 0.05, alpha: float = 10.0,
                 iterations: int = 15, seed: int = 0) -> None:
        super().__init__()
        self.params = {"factors": factors, "regularization": regularization, "alpha": alpha,
                       "iterations": iterations}
        self.seed = seed
        self.model = None

    def _fit(self, train: sp.csr_matrix) -> None:
        from implicit.cpu.als import AlternatingLeastSquares

        # implicit parallelizes over users itself; a threaded BLAS underneath only contends.
        with threadpool_limits(1, "blas"):
            self.model = AlternatingLeastSquares(random_state=self.seed, **self.params)
            self.model.fit(train, show_progress=False)
            _ = self.model.YtY  # cache the Gramian now, so scoring never writes to the model

    def fold_in(self, history: sp.csr_matrix) -> np.ndarray:
        """User factors for history rows (read-only: returns them, stores nothing)."""
        with threadpool_limits(1, "blas"):
            return self.model.recalculate_user(np.arange(history.shape[0]), history)

    def _score(self, history: sp.csr_matrix) -> np.ndarray:
        return self.fold_in(history) @ self.model.item_factors.T


# -- BPR -----------------------------------------------------------------------------------------


def bpr_fold_in(item_factors: np.ndarray, history: sp.csr_matrix, *, regularization: float,
                learning_rate: float, steps: int, negatives: int, seed: int) -> np.ndarray:
    """User vectors that maximize BPR's objective for history rows with the item factors fixed.

    The objective per user, mean over (history item i, uniform item j) of log σ(x·(y_i − y_j))
    minus (λ/2)‖x‖², is concave in x, so plain gradient ascent on seeded samples converges; no
    user id or trained user vector is needed. implicit keeps each item's bias in the last
    factor column and pins the user's last coordinate to 1; so does this, which makes an empty
    history score items by their bias alone.

    Parameters
    ----------
    item_factors : ndarray of shape (n_items, d), bias in the last column
    history : csr_matrix of shape (rows, n_items)
    regularization, learning_rate : float
    steps, negatives : int
        Gradient steps, and uniform negatives drawn per row and step.
    seed : int

    Returns
    -------
    ndarray of shape (rows, d), last column 1

    Examples
    --------
    >>> y = np.array([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    >>> x = bpr_fold_in(y, sp.csr_matrix([[1.0, 0.0, 0.0]]), regularization=0.01,
    ...                 learning_rate=0.5, steps=50, negatives=4, seed=0)
    >>> bool((x @ y.T)[0, 0] > (x @ y.T)[0, 1]), float(x[0, -1])
    (True, 1.0)
    """
    rng = np.random.default_rng(seed)
    factors = np.asarray(item_factors, dtype=np.float64)
    rows, n_items = history.shape[0], factors.shape[0]
    users = np.zeros((rows, factors.shape[1]))
    users[:, -1] = 1.0
    lengths = np.diff(history.indptr)
    active = np.flatnonzero(lengths > 0)
    if len(active) == 0:
        return users
    starts, lengths = history.indptr[active], lengths[active]
    for _ in range(steps):
        positive = history.indices[starts + (rng.random(len(active)) * lengths).astype(np.int64)]
        negative = rng.integers(0, n_items, size=(len(active), negatives))
        gap = factors[positive][:, None, :] - factors[negative]  # (users, negatives, d)
        x = users[active]
        margin = np.einsum("ud,und->un", x, gap)
        weight = 0.5 * (1.0 - np.tanh(0.5 * margin))  # σ(−margin), overflow-free
        gradient = np.einsum("un,und->ud", weight, gap) / negatives - regularization * x
        gradient[:, -1] = 0.0
        users[active] = x + learning_rate * gradient
    return users


class BPR(ScoringRecommender):
    """implicit's CPU BPR (Rendle et al. 2009), fitted single-threaded so a seed reproduces it
    (its Hogwild SGD is not deterministic across threads). Histories fold in through
    :func:`bpr_fold_in`."""

    name = "bpr"

    def __init__(self, factors: int = 64, learning_rate: float = 0.05,
                 regularization: float = 0.01, iterations: int = 100, seed: int = 0,
                 fold_in_steps: int = 100, fold_in_rate: float = 0.5) -> None:
        super().__init__()
        self.params = {"factors": factors, "learning_rate": learning_rate,
                       "regularization": regularization, "iterations": iterations}
        self.seed = seed
        self.fold_in_steps = fold_in_steps
        self.fold_in_rate = fold_in_rate
        self.model = None

    def _fit(self, train: sp.csr_matrix) -> None:
        from implicit.cpu.bpr import BayesianPersonalizedRanking

        with threadpool_limits(1, "blas"):
            self.model = BayesianPersonalizedRanking(random_state=self.seed, num_threads=1,
                                                     **self.params)
            self.model.fit(train, show_progress=False)

    def fold_in(self, history: sp.csr_matrix) -> np.ndarray:
        """User vectors for history rows (read-only). The draws are seeded per call, so the same
        rows in the same batch always get the same vectors."""
        return bpr_fold_in(self.model.item_factors, history,
                           regularization=self.params["regularization"],
                           learning_rate=self.fold_in_rate, steps=self.fold_in_steps,
                           negatives=16, seed=self.seed)

    def _score(self, history: sp.csr_matrix) -> np.ndarray:
        return self.fold_in(history) @ self.model.item_factors.T.astype(np.float64)
