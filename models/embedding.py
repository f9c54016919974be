"""The dot-product model and its all-pairs square loss (Rendle §5.1, LED §5.2).

Items are ψ̃(i) = [v_i, b_i] and user contexts φ̃(u) = [φ(u), 1], both in R^{d+1}, so the score
ŷ(u, i) = ⟨φ(u), v_i⟩ + b_i is one inner product and maximum inner product search serves it
unchanged. The loss over all user-item pairs,

    L = Σ_{(u,i)∈S} α_ui (ŷ − 1)² + α0 Σ_{u,i} ŷ² + λ‖Ψ̃‖²,

never needs negative sampling: Σ_{u,i} ŷ² = ⟨G_C, G_I⟩ with the (d+1)×(d+1) Gramians
G_C = Σ_u φ̃φ̃ᵀ and G_I = Σ_i ψ̃ψ̃ᵀ (Rendle eq. 22–25). Positives appear in both sums, as in
Rendle's simplified loss (eq. 21): α_ui here is the *extra* weight of a positive over α0.

Only item parameters are regularized: users are encoded from item vectors (nothing is learned
per user), so Ψ̃ holds every parameter of the model.

The loss functions use only ``@``, indexing, ``**`` and ``.sum``, so they run unchanged on torch
tensors; the tests differentiate them with autograd to check :func:`item_gradient`.
"""

from __future__ import annotations

import functools

import numpy as np


def augment_items(V: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Item rows ψ̃(i) = [v_i, b_i]: the bias becomes one more coordinate (LED §5.2).

    Examples
    --------
    >>> augment_items(np.array([[1.0, 2.0]]), np.array([0.5])).tolist()
    [[1.0, 2.0, 0.5]]
    """
    V = np.asarray(V, dtype=np.float64)
    return np.hstack([V, np.asarray(b, dtype=np.float64).reshape(len(V), 1)])


def augment_users(Phi: np.ndarray, bias_weight: float = 1.0) -> np.ndarray:
    """User rows φ̃(u) = [φ(u), β], so ⟨φ̃(u), ψ̃(i)⟩ = ⟨φ(u), v_i⟩ + β·b_i.

    β = 1 (the default) is the model's own score, the one learning fits. Serving may weigh the
    bias (the item's popularity) less: the query stays one inner product, so an index built on
    the augmented item rows answers it unchanged.

    Accepts one vector (d,) or a batch (m, d) and keeps that shape (plus one column).

    Examples
    --------
    >>> augment_users(np.array([[1.0, 2.0]])).tolist()
    [[1.0, 2.0, 1.0]]
    >>> augment_users(np.zeros(2)).tolist()
    [0.0, 0.0, 1.0]
    >>> augment_users(np.array([1.0, 2.0]), bias_weight=0.5).tolist()
    [1.0, 2.0, 0.5]
    """
    Phi = np.asarray(Phi, dtype=np.float64)
    bias = np.full(Phi.shape[:-1] + (1,), float(bias_weight))
    return np.concatenate([Phi, bias], axis=-1)


def all_pairs_loss(Phi_aug, Psi_aug, pos_users, pos_items, alpha, alpha0: float, lam: float):
    """The loss L evaluated directly over all m·n pairs: the O(m·n·d) reference.

    Parameters
    ----------
    Phi_aug : array (m, d+1)
        Augmented user rows [φ(u), 1].
    Psi_aug : array (n, d+1)
        Augmented item rows [v_i, b_i].
    pos_users, pos_items : int arrays (P,)
        The positives S as (row of Phi_aug, row of Psi_aug); repeated pairs count repeatedly.
    alpha : array (P,)
        Confidence weight α_ui of each positive.
    alpha0, lam : float
        Weight of every pair (label 0) and of the L2 penalty on Psi_aug.

    Returns
    -------
    A 0-d value of the inputs' array type (numpy scalar, or a torch tensor that autograd can
    differentiate).

    Examples
    --------
    >>> Phi, Psi = np.array([[1.0, 1.0]]), np.array([[0.5, 0.0], [0.0, 1.0]])
    >>> float(all_pairs_loss(Phi, Psi, np.array([0]), np.array([0]), np.array([1.0]), 0.1, 0.0))
    0.375
    """
    scores = Phi_aug @ Psi_aug.T
    positive = (alpha * (scores[pos_users, pos_items] - 1.0) ** 2).sum()
    return positive + alpha0 * (scores ** 2).sum() + lam * (Psi_aug ** 2).sum()


def gramian_loss(Phi_aug, Psi_aug, pos_users, pos_items, alpha, alpha0: float, lam: float, *,
                 G_C=None, G_I=None):
    """The same loss as :func:`all_pairs_loss` in O((m + n)·d² + |S|·d) via ⟨G_C, G_I⟩.

    ``G_C`` and ``G_I`` default to the exact Gramians of ``Phi_aug`` and ``Psi_aug``; pass
    streaming estimates instead to get the loss the online learner actually sees.

    Examples
    --------
    >>> Phi, Psi = np.array([[1.0, 1.0]]), np.array([[0.5, 0.0], [0.0, 1.0]])
    >>> float(gramian_loss(Phi, Psi, np.array([0]), np.array([0]), np.array([1.0]), 0.1, 0.0))
    0.375
    """
    G_C = Phi_aug.T @ Phi_aug if G_C is None else G_C
    G_I = Psi_aug.T @ Psi_aug if G_I is None else G_I
    pos_scores = (Phi_aug[pos_users] * Psi_aug[pos_items]).sum(1)
    positive = (alpha * (pos_scores - 1.0) ** 2).sum()
    return positive + alpha0 * (G_C * G_I).sum() + lam * (Psi_aug ** 2).sum()


def item_gradient(phi_aug: np.ndarray, psi_aug: np.ndarray, alpha: np.ndarray, G_C: np.ndarray,
                  n_items: np.ndarray, alpha0: float, lam: float) -> np.ndarray:
    """Per-positive gradient of L with respect to the item row ψ̃(i), halved (Rendle eq. 34).

    For the positive (u, i) with n_i positives of item i in total,

        g = α (ŷ − 1) φ̃(u) + (α0 / n_i) G_C ψ̃(i) + (λ / n_i) ψ̃(i).

    Summed over the n_i positives of item i this is exactly ½ ∂L/∂ψ̃(i) (users held fixed): the
    all-pairs and penalty terms are spread evenly over the item's positives, which is what lets
    SGD visit positives only. The factor 2 of the square is dropped everywhere (it folds into the
    learning rate). Items without positives get no gradient, as in Rendle's Algorithm 5.

    Parameters
    ----------
    phi_aug, psi_aug : (B, d+1)
        The user and item rows of each positive.
    alpha : (B,)
        Confidence weights.
    G_C : (d+1, d+1)
        User Gramian (exact or a streaming estimate).
    n_items : (B,)
        Positive count n_i of each positive's item (decayed counts work the same way).

    Returns
    -------
    ndarray (B, d+1)

    Examples
    --------
    >>> g = item_gradient(np.array([[1.0, 1.0]]), np.array([[0.5, 0.0]]), np.array([1.0]),
    ...                   np.eye(2), np.array([1.0]), 0.1, 0.0)
    >>> g.round(3).tolist()
    [[-0.45, -0.5]]
    """
    y_hat = np.einsum("bk,bk->b", phi_aug, psi_aug)
    shrink = (alpha0 * (psi_aug @ G_C) + lam * psi_aug) / np.asarray(n_items)[:, None]
    return (alpha * (y_hat - 1.0))[:, None] * phi_aug + shrink


def user_gradient(phi: np.ndarray, psi_aug: np.ndarray, alpha: np.ndarray, G_I: np.ndarray,
                  alpha0: float, n_events: np.ndarray) -> np.ndarray:
    """Per-positive gradient of L with respect to the user vector φ(u), halved: the user side
    of Rendle's per-example loss (eq. 33), items held fixed.

    For the positive (u, i), with n_u the events the user's vector is made of,

        g = α (ŷ − 1) v_i + (α0 / n_u) [G_I φ̃(u)]_{1..d}.

    Summed over the user's n_u positives this is ½ ∂L/∂φ(u): the user's all-pairs term
    α0 Σ_i ŷ(u, i)² = α0 φ̃ᵀ G_I φ̃ is spread evenly over its positives, as
    :func:`item_gradient` spreads an item's. Nothing is learned per user; the gradient flows on
    to the item *inputs* the encoder averages (:func:`models.encoders.history_gradient`).

    Parameters
    ----------
    phi : (B, d)
        The user vector of each positive.
    psi_aug : (B, d+1)
        The positive item's row [v_i, b_i].
    alpha : (B,)
        Confidence weights.
    G_I : (d+1, d+1)
        Item Gramian.
    n_events : (B,)
        n_u of each positive's user (≥ 1).

    Returns
    -------
    ndarray (B, d)

    Examples
    --------
    >>> user_gradient(np.array([[1.0]]), np.array([[0.5, 0.0]]), np.array([1.0]),
    ...               np.eye(2), 0.1, np.array([1.0])).round(3).tolist()
    [[-0.15]]
    """
    phi = np.asarray(phi, dtype=np.float64)
    d = phi.shape[1]
    phi_aug = augment_users(phi)
    y_hat = np.einsum("bk,bk->b", phi_aug, psi_aug)
    all_pairs = alpha0 * (phi_aug @ G_I[:, :d]) / np.asarray(n_events, dtype=np.float64)[:, None]
    return (alpha * (y_hat - 1.0))[:, None] * psi_aug[:, :d] + all_pairs


def item_solve(pos_gram: np.ndarray, pos_target: np.ndarray, prior: np.ndarray,
               G_C: np.ndarray, alpha0: float, lam: float, prior_weight: float) -> np.ndarray:
    """Rows ψ̃(i) minimizing each item's whole loss in closed form (one-sided iALS, Rendle §5.1.2).

    With the users of item i's positives held at the vectors they had when they were learned,
    item i's part of L plus a pull of weight μ towards its starting row ψ̃₀(i),

        Σ_u α_ui (⟨φ̃(u), ψ̃⟩ − 1)² + α0 ψ̃ᵀ G_C ψ̃ + λ‖ψ̃‖² + μ‖ψ̃ − ψ̃₀‖²,

    is a quadratic whose minimizer solves (A_i + α0 G_C + (λ + μ) I) ψ̃ = s_i + μ ψ̃₀ with the
    sufficient statistics A_i = Σ α φ̃φ̃ᵀ and s_i = Σ α φ̃. An online learner only has to add each
    positive to them, so one pass reaches what an SGD step only approaches; the prior keeps an
    item seen once near its (bootstrap or co-occurrence) start instead of jumping onto its only
    user.

    Parameters
    ----------
    pos_gram : (U, d+1, d+1)
        A_i of each item to solve.
    pos_target : (U, d+1)
        s_i of each item.
    prior : (U, d+1)
        ψ̃₀(i), the rows the items started from.
    G_C : (d+1, d+1)
        User Gramian (a streaming estimate in the learner).

    Examples
    --------
    >>> A, s = np.array([[[1.0, 1.0], [1.0, 1.0]]]), np.array([[1.0, 1.0]])
    >>> item_solve(A, s, np.zeros((1, 2)), np.zeros((2, 2)), 0.0, 1.0, 0.0).round(3).tolist()
    [[0.333, 0.333]]
    """
    width = pos_target.shape[-1]
    system = pos_gram + (alpha0 * G_C + (lam + prior_weight) * np.eye(width))
    rhs = pos_target + prior_weight * prior
    return np.linalg.solve(system, rhs[..., None])[..., 0]


def item_solve_cg(pos_gram: np.ndarray, pos_target: np.ndarray, prior: np.ndarray,
                  G_C: np.ndarray, alpha0: float, lam: float, prior_weight: float,
                  start: np.ndarray, steps: int) -> np.ndarray:
    """:func:`item_solve` approximately: ``steps`` conjugate-gradient steps from ``start``.

    An online learner re-solves an item after a few more positives, so the system moved little
    since the item's current row solved it; a few CG steps from that row (implicit's iALS does
    3 per sweep) get close for O(steps·(d+1)²) per item, against O((d+1)³) for a factorization,
    and they read A_i in its stored precision (float32) instead of converting it. With
    ``steps`` ≥ d + 1 CG is exact up to rounding.

    Parameters
    ----------
    pos_gram : (U, d+1, d+1)
        A_i of each item (any float dtype; multiplied, never copied).
    start : (U, d+1)
        Rows to start from (the items' current rows).

    Examples
    --------
    >>> A, s = np.array([[[1.0, 1.0], [1.0, 1.0]]]), np.array([[1.0, 1.0]])
    >>> item_solve_cg(A, s, np.zeros((1, 2)), np.zeros((2, 2)), 0.0, 1.0, 0.0,
    ...               start=np.zeros((1, 2)), steps=2).round(3).tolist()
    [[0.333, 0.333]]
    """
    shift = lam + prior_weight
    weighted_G_C = alpha0 * G_C

    def system_times(x: np.ndarray) -> np.ndarray:
        products = np.matmul(pos_gram, x[..., None].astype(pos_gram.dtype))[..., 0]
        return products + x @ weighted_G_C + shift * x

    x = np.array(start, dtype=np.float64)
    residual = pos_target + prior_weight * prior - system_times(x)
    direction = residual.copy()
    power = np.einsum("uk,uk->u", residual, residual)
    for _ in range(steps):
        moved = system_times(direction)
        curvature = np.einsum("uk,uk->u", direction, moved)
        step = np.divide(power, curvature, out=np.zeros_like(power), where=curvature > 0)
        x += step[:, None] * direction
        residual -= step[:, None] * moved
        new_power = np.einsum("uk,uk->u", residual, residual)
        ratio = np.divide(new_power, power, out=np.zeros_like(power), where=power > 0)
        direction = residual + ratio[:, None] * direction
        power = new_power
    return x


# -- symmetric statistics stored by their upper triangle ------------------------------------


@functools.lru_cache(maxsize=8)
def _triangle(width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row and column of each packed entry (the upper triangle, row by row), and for each of
    the width² entries of the full matrix the packed entry that holds it."""
    upper_rows, upper_cols = np.triu_indices(width)
    position = np.empty((width, width), dtype=np.int64)
    position[upper_rows, upper_cols] = np.arange(len(upper_rows))
    position[upper_cols, upper_rows] = position[upper_rows, upper_cols]
    for array in (upper_rows, upper_cols, position):
        array.flags.writeable = False
    return upper_rows, upper_cols, position.reshape(-1)


def packed_size(width: int) -> int:
    """Entries of a packed symmetric ``width`` × ``width`` matrix: width·(width+1)/2."""
    return width * (width + 1) // 2


def pack_symmetric(full: np.ndarray) -> np.ndarray:
    """(…, w, w) symmetric → (…, w(w+1)/2): the upper triangle, row by row (about half the
    memory; an item learner holds one such A_i per learned item).

    >>> pack_symmetric(np.array([[1.0, 2.0], [2.0, 3.0]])).tolist()
    [1.0, 2.0, 3.0]
    """
    width = full.shape[-1]
    upper_rows, upper_cols, _ = _triangle(width)
    flat = full.reshape(*full.shape[:-2], width * width)
    return np.take(flat, upper_rows * width + upper_cols, axis=-1)


def unpack_symmetric(packed: np.ndarray, width: int) -> np.ndarray:
    """Inverse of :func:`pack_symmetric`: (…, w(w+1)/2) → (…, w, w), one gather.

    >>> unpack_symmetric(np.array([1.0, 2.0, 3.0]), 2).tolist()
    [[1.0, 2.0], [2.0, 3.0]]
    """
    _, _, position = _triangle(width)
    # np.take keeps the result C-ordered; an index array on the last axis made it column-major,
    # and a batched matmul over that was 10 times slower
    return np.take(packed, position, axis=-1).reshape(*packed.shape[:-1], width, width)


def packed_outer(x: np.ndarray) -> np.ndarray:
    """``pack_symmetric`` of each row's outer product x xᵀ, without forming it: (…, w) →
    (…, w(w+1)/2).

    Row r of the triangle is x_r · x[r:], written in place: one product per row, no gather
    (two gathers of the triangle's indices took 2.5 ms for 256 float32 rows at w = 65, the
    row products 0.9 ms).

    >>> packed_outer(np.array([1.0, 2.0])).tolist()
    [1.0, 2.0, 4.0]
    """
    width = x.shape[-1]
    out = np.empty((*x.shape[:-1], packed_size(width)), dtype=x.dtype)
    start = 0
    for r in range(width):
        np.multiply(x[..., r:r + 1], x[..., r:], out=out[..., start:start + width - r])
        start += width - r
    return out
