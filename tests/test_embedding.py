"""The dot-product model's loss and item gradient against direct computations and autograd."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.embedding import (all_pairs_loss, augment_items, augment_users, gramian_loss,
                              item_gradient, item_solve, item_solve_cg, pack_symmetric,
                              packed_outer, packed_size, unpack_symmetric, user_gradient)

ALPHA0, LAM = 0.3, 0.05


def random_problem(seed: int, m: int = 7, n: int = 11, d: int = 4, positives: int = 25):
    rng = np.random.default_rng(seed)
    Phi = augment_users(rng.normal(size=(m, d)))
    Psi = augment_items(rng.normal(size=(n, d)), rng.normal(size=n))
    users = rng.integers(0, m, positives)
    items = rng.integers(0, n, positives)  # repeats allowed: a pair can be a positive twice
    alpha = rng.uniform(0.5, 5.0, positives)
    return Phi, Psi, users, items, alpha


def test_augmented_inner_product_is_dot_plus_bias():
    rng = np.random.default_rng(0)
    V, b, Phi = rng.normal(size=(5, 3)), rng.normal(size=5), rng.normal(size=(4, 3))
    np.testing.assert_allclose(augment_users(Phi) @ augment_items(V, b).T, Phi @ V.T + b)
    np.testing.assert_array_equal(augment_users(np.zeros(3)), [0.0, 0.0, 0.0, 1.0])


def test_all_pairs_loss_matches_an_explicit_double_loop():
    Phi, Psi, users, items, alpha = random_problem(1, m=3, n=4, positives=5)
    expected = sum(a * (Phi[u] @ Psi[i] - 1) ** 2 for u, i, a in zip(users, items, alpha))
    expected += ALPHA0 * sum((Phi[u] @ Psi[i]) ** 2 for u in range(3) for i in range(4))
    expected += LAM * (Psi ** 2).sum()
    assert all_pairs_loss(Phi, Psi, users, items, alpha, ALPHA0, LAM) == pytest.approx(expected)


@pytest.mark.parametrize("seed", range(5))
def test_gramian_trick_equals_the_all_pairs_loss(seed):
    problem = random_problem(seed)
    direct = all_pairs_loss(*problem, ALPHA0, LAM)
    assert gramian_loss(*problem, ALPHA0, LAM) == pytest.approx(direct, rel=1e-12)


def test_gramian_loss_uses_given_gramian_estimates():
    Phi, Psi, users, items, alpha = random_problem(3)
    G_C = 2.0 * Phi.T @ Phi  # a (wrong) estimate must change the result by α0⟨ΔG_C, G_I⟩
    exact = gramian_loss(Phi, Psi, users, items, alpha, ALPHA0, LAM)
    skewed = gramian_loss(Phi, Psi, users, items, alpha, ALPHA0, LAM, G_C=G_C)
    extra = ALPHA0 * np.sum((Phi.T @ Phi) * (Psi.T @ Psi))
    assert skewed - exact == pytest.approx(extra)


@pytest.mark.parametrize("seed", range(5))
def test_per_positive_item_gradients_sum_to_half_the_autograd_gradient(seed):
    Phi, Psi, users, items, alpha = random_problem(seed)
    Psi_t = torch.tensor(Psi, requires_grad=True)
    loss = all_pairs_loss(torch.tensor(Phi), Psi_t, torch.tensor(users), torch.tensor(items),
                          torch.tensor(alpha), ALPHA0, LAM)
    loss.backward()
    n_items = np.bincount(items, minlength=len(Psi)).astype(float)
    per_positive = item_gradient(Phi[users], Psi[items], alpha, Phi.T @ Phi, n_items[items],
                                 ALPHA0, LAM)
    summed = np.zeros_like(Psi)
    np.add.at(summed, items, per_positive)
    has_positives = n_items > 0
    assert has_positives.sum() >= 5
    np.testing.assert_allclose(summed[has_positives],
                               0.5 * Psi_t.grad.numpy()[has_positives], rtol=1e-10, atol=1e-12)
    assert not summed[~has_positives].any()  # no positive, no update (Rendle Alg. 5)


def random_item_systems(seed: int, items: int = 30, width: int = 9):
    """A_i of a few positives each (float32, as the learner stores them), targets, priors and
    a user Gramian: the systems item_solve solves."""
    rng = np.random.default_rng(seed)
    users = rng.normal(0.0, 0.5, (items, 4, width))
    gram = np.einsum("ubi,ubj->uij", users, users).astype(np.float32)
    target = users.sum(axis=1)
    prior = rng.normal(0.0, 0.1, (items, width))
    context = rng.normal(size=(40, width))
    return gram, target, prior, context.T @ context


@pytest.mark.parametrize("seed", [0, 1])
def test_cg_with_as_many_steps_as_coordinates_is_the_exact_solve(seed):
    gram, target, prior, G_C = random_item_systems(seed)
    exact = item_solve(gram.astype(np.float64), target, prior, G_C, 0.05, 0.01, 0.5)
    cg = item_solve_cg(gram, target, prior, G_C, 0.05, 0.01, 0.5, start=prior, steps=9)
    np.testing.assert_allclose(cg, exact, rtol=1e-4, atol=1e-5)


def test_cg_error_shrinks_with_each_step_and_a_solved_start_stays_put():
    """CG minimizes the error in the system's norm over a growing subspace: it can only fall."""
    gram, target, prior, G_C = random_item_systems(2)
    params = (0.05, 0.01, 0.5)
    exact = item_solve(gram.astype(np.float64), target, prior, G_C, *params)
    system = gram.astype(np.float64) + 0.05 * G_C + 0.51 * np.eye(9)

    def energy_error(x):
        gap = x - exact
        return np.einsum("ui,uij,uj->u", gap, system, gap)

    errors = [energy_error(item_solve_cg(gram, target, prior, G_C, *params, start=prior,
                                         steps=steps)) for steps in range(6)]
    for fewer, more in zip(errors, errors[1:]):
        assert np.all(more <= fewer * (1 + 1e-6) + 1e-12)
    assert errors[3].sum() < 0.1 * errors[0].sum()
    settled = item_solve_cg(gram, target, prior, G_C, *params, start=exact, steps=3)
    assert np.all(np.isfinite(settled))  # a zero residual must not divide by zero
    np.testing.assert_allclose(settled, exact, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("width", [1, 2, 5, 65])
def test_symmetric_matrices_packed_by_their_upper_triangle_round_trip(width):
    rng = np.random.default_rng(width)
    half = rng.normal(size=(3, width, width))
    full = half + half.transpose(0, 2, 1)
    packed = pack_symmetric(full)
    assert packed.shape == (3, packed_size(width)) == (3, width * (width + 1) // 2)
    np.testing.assert_array_equal(unpack_symmetric(packed, width), full)
    np.testing.assert_array_equal(pack_symmetric(full[0]), packed[0])  # no leading axis too
    x = rng.normal(size=(4, width)).astype(np.float32)
    np.testing.assert_array_equal(packed_outer(x), pack_symmetric(x[:, :, None] * x[:, None, :]))


def test_user_gradient_is_half_the_autograd_gradient_of_the_user_side_loss():
    """Oracle: Σ over positives of α(ŷ − 1)² + (α0 / n_u) φ̃ᵀ G_I φ̃, differentiated by autograd
    with respect to each positive's user vector, is twice :func:`user_gradient`."""
    rng = np.random.default_rng(3)
    B, d = 9, 5
    Psi = augment_items(rng.normal(size=(12, d)), rng.normal(size=12))
    G_I = Psi.T @ Psi
    items, alpha = rng.integers(0, 12, B), rng.uniform(0.5, 3.0, B)
    n_events = rng.integers(1, 8, B).astype(float)
    phi = torch.tensor(rng.normal(size=(B, d)), requires_grad=True)
    phi_aug = torch.cat([phi, torch.ones(B, 1, dtype=phi.dtype)], dim=1)
    psi = torch.tensor(Psi[items])
    y_hat = (phi_aug * psi).sum(dim=1)
    all_pairs = ((phi_aug @ torch.tensor(G_I)) * phi_aug).sum(dim=1)
    loss = (torch.tensor(alpha) * (y_hat - 1) ** 2 + ALPHA0 * all_pairs
            / torch.tensor(n_events)).sum()
    loss.backward()
    ours = user_gradient(phi.detach().numpy(), Psi[items], alpha, G_I, ALPHA0, n_events)
    np.testing.assert_allclose(2 * ours, phi.grad.numpy(), rtol=1e-10, atol=1e-12)
