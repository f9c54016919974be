"""User encoders against direct formulas and a least-squares oracle."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.embedding import augment_items, augment_users, all_pairs_loss
from models.encoders import (history_gradient, history_weights, ials_fold_in, mean_encoder,
                             mean_encoder_batch, pack_histories, position_weights,
                             recency_weights)


def test_mean_encoder_is_the_weighted_mean_with_recency_decay():
    """Σ w_t v_t / Σ w_t: weights mix directions, they do not scale φ."""
    rng = np.random.default_rng(0)
    V, w, ts = rng.normal(size=(5, 3)), rng.uniform(1, 4, 5), np.array([0., 3., 7., 7., 10.])
    decayed = [w[t] * 0.5 ** ((10.0 - ts[t]) / 4.0) for t in range(5)]
    expected = sum(decayed[t] * V[t] for t in range(5)) / sum(decayed)
    np.testing.assert_allclose(mean_encoder(V, w, ts, half_life=4.0), expected)
    np.testing.assert_allclose(mean_encoder(V), V.mean(axis=0))
    np.testing.assert_allclose(mean_encoder(V, ts=ts), V.mean(axis=0))  # no half-life: no decay


def test_mean_encoder_weighs_recent_events_by_their_place_in_the_history():
    """The j-th event before the newest weighs 2^(−j/h), on top of its own weight and of the
    decay in time; the newest of one event alone is the event itself."""
    rng = np.random.default_rng(2)
    V, w, ts = rng.normal(size=(4, 3)), rng.uniform(1, 4, 4), np.array([0., 1., 5., 9.])
    factor = [w[t] * 2.0 ** (-(3 - t) / 1.5) * 2.0 ** (-(9.0 - ts[t]) / 6.0) for t in range(4)]
    expected = sum(factor[t] * V[t] for t in range(4)) / sum(factor)
    np.testing.assert_allclose(mean_encoder(V, w, ts, half_life=6.0, half_life_events=1.5),
                               expected)
    assert not np.allclose(mean_encoder(V, w, ts, half_life_events=1.5), mean_encoder(V, w))
    np.testing.assert_allclose(mean_encoder(V[:1], half_life_events=0.1), V[0])
    np.testing.assert_allclose(position_weights(3, 2.0), [0.5, 2 ** -0.5, 1.0])


def test_empty_history_encodes_to_zero():
    assert mean_encoder(np.empty((0, 4))).tolist() == [0.0] * 4
    assert ials_fold_in(np.empty((0, 5)), np.empty(0), np.eye(5), 0.1, 0.1).tolist() == [0.0] * 4


def test_a_history_whose_weights_all_underflow_encodes_to_zero_not_nan():
    """The known events of a history can all weigh 0 in floats: 2^(-j/h) underflows for
    events far before the newest (the newest being an item not learned yet). Such a history
    weighs nothing, as an empty one; 0/0 gave NaN, which one step spreads to the whole
    model."""
    V = np.eye(3)
    assert 2.0 ** (-2 / 0.001) == 0.0
    weights = history_weights(np.array([0, 2, 3]), np.array([0.0, 0.0, 1.0]))
    assert np.isfinite(weights).all() and weights.tolist() == [0.0, 0.0, 1.0]
    assert mean_encoder(V, np.array([0.0, 0.0, 0.0])).tolist() == [0.0, 0.0, 0.0]
    phi = mean_encoder_batch(V, np.array([0, 2, 3]), np.array([0, 1, 2]),
                             weights=np.array([0.0, 0.0, 1.0]))
    assert phi.tolist() == [[0.0, 0.0, 0.0], [0.0, 0.0, 1.0]]


def test_recency_weight_halves_per_half_life():
    np.testing.assert_allclose(recency_weights(np.array([0.0, 5.0, 10.0]), 5.0), [0.25, 0.5, 1])


@pytest.mark.parametrize("decay,half_life_events", [(False, None), (True, None), (True, 2.0),
                                                    (False, 0.5)])
def test_batched_mean_encoder_equals_one_call_per_user(decay, half_life_events):
    rng = np.random.default_rng(1)
    V = rng.normal(size=(30, 6))
    histories = [rng.integers(0, 30, rng.integers(0, 9)).tolist() for _ in range(40)]
    assert any(len(h) == 0 for h in histories)
    indptr, rows = pack_histories(histories)
    weights, ts = rng.uniform(1, 10, len(rows)), rng.uniform(0, 100, len(rows))
    half_life = 25.0 if decay else None
    batched = mean_encoder_batch(V, indptr, rows, weights, ts, half_life, half_life_events)
    for b, history in enumerate(histories):
        part = slice(indptr[b], indptr[b + 1])
        single = mean_encoder(V[history], weights[part], ts[part], half_life, half_life_events)
        np.testing.assert_allclose(batched[b], single, atol=1e-12)
    # the vector columns of the augmented item matrix: as a strided view (rows gathered) and
    # as the engine passes them, the whole contiguous matrix with ``columns``
    augmented = np.c_[V, rng.normal(size=len(V))]
    assert not augmented[:, :-1].flags.c_contiguous and augmented.flags.c_contiguous
    np.testing.assert_allclose(mean_encoder_batch(augmented[:, :-1], indptr, rows, weights, ts,
                                                  half_life, half_life_events), batched,
                               atol=1e-12)
    np.testing.assert_allclose(mean_encoder_batch(augmented, indptr, rows, weights, ts,
                                                  half_life, half_life_events, columns=6),
                               batched, atol=1e-12)


@pytest.mark.parametrize("decay", [False, True])
def test_input_offsets_add_to_the_rows_the_encoder_averages(decay):
    rng = np.random.default_rng(5)
    V, offsets = rng.normal(size=(30, 6)), rng.normal(size=(30, 6))
    indptr, rows = pack_histories([rng.integers(0, 30, rng.integers(0, 9)).tolist()
                                   for _ in range(20)])
    weights, ts = rng.uniform(1, 10, len(rows)), rng.uniform(0, 100, len(rows))
    half_life = 25.0 if decay else None
    augmented = np.c_[V, rng.normal(size=len(V))]
    np.testing.assert_allclose(
        mean_encoder_batch(augmented, indptr, rows, weights, ts, half_life, 2.0, columns=6,
                           offsets=offsets),
        mean_encoder_batch(V + offsets, indptr, rows, weights, ts, half_life, 2.0), atol=1e-12)


@pytest.mark.parametrize("decay,half_life_events", [(False, None), (True, 2.0)])
def test_history_gradient_is_the_autograd_gradient_through_the_mean_encoder(decay,
                                                                            half_life_events):
    """Oracle: for any loss of the user vectors, Σ_b ⟨g_b, φ_b⟩ with g_b = ∂loss/∂φ_b, the
    gradient with respect to the averaged rows is :func:`history_gradient` on the rows the
    histories hold (repeats included) and zero elsewhere."""
    rng = np.random.default_rng(6)
    n, d = 25, 4
    histories = [rng.integers(0, n, rng.integers(0, 7)).tolist() for _ in range(15)]
    indptr, rows = pack_histories(histories)
    weights, ts = rng.uniform(1, 5, len(rows)), rng.uniform(0, 50, len(rows))
    half_life = 10.0 if decay else None
    h = history_weights(indptr, weights, ts, half_life, half_life_events)
    Q = torch.tensor(rng.normal(size=(n, d)), requires_grad=True)
    owner = np.repeat(np.arange(len(histories)), np.diff(indptr))
    H = torch.zeros(len(histories), n, dtype=Q.dtype)
    H.index_put_((torch.tensor(owner), torch.tensor(rows)), torch.tensor(h), accumulate=True)
    phi = H @ Q
    np.testing.assert_allclose(phi.detach().numpy(), mean_encoder_batch(
        Q.detach().numpy(), indptr, rows, weights, ts, half_life, half_life_events), atol=1e-12)
    target = torch.tensor(rng.normal(size=(len(histories), d)))
    loss = ((phi - target) ** 4).sum()  # any loss of the user vectors
    loss.backward()
    g_phi = (4 * (phi - target) ** 3).detach().numpy()
    touched, grads = history_gradient(indptr, rows, h, g_phi)
    assert touched.tolist() == sorted(set(rows.tolist()))
    expected = Q.grad.numpy()
    np.testing.assert_allclose(grads, expected[touched], rtol=1e-10, atol=1e-12)
    untouched = np.setdiff1d(np.arange(n), touched)
    assert len(untouched) and not expected[untouched].any()


def fold_in_problem(seed: int, n: int = 40, d: int = 5, T: int = 8):
    rng = np.random.default_rng(seed)
    Psi = augment_items(rng.normal(size=(n, d)), rng.normal(size=n))
    history = rng.integers(0, n, T)  # repeats allowed
    return Psi, history, rng.uniform(0.5, 10.0, T)


def lstsq_oracle(Psi, history, alpha, alpha0, lam):
    """The user's loss as one stacked least-squares problem over ALL items (positives included
    in the α0 rows too, as in the loss), solved by lstsq."""
    d = Psi.shape[1] - 1
    V, b = Psi[:, :d], Psi[:, d]
    s0, sa = np.sqrt(alpha0), np.sqrt(alpha)[:, None]
    A = np.vstack([s0 * V, sa * V[history], np.sqrt(lam) * np.eye(d)])
    y = np.concatenate([-s0 * b, sa[:, 0] * (1.0 - b[history]), np.zeros(d)])
    return np.linalg.lstsq(A, y, rcond=None)[0]


@pytest.mark.parametrize("seed", range(5))
def test_ials_fold_in_equals_the_least_squares_oracle(seed):
    Psi, history, alpha = fold_in_problem(seed)
    phi = ials_fold_in(Psi[history], alpha, Psi.T @ Psi, alpha0=0.2, lam=0.7)
    np.testing.assert_allclose(phi, lstsq_oracle(Psi, history, alpha, 0.2, 0.7), atol=1e-10)


def test_ials_fold_in_is_a_stationary_point_of_the_all_pairs_loss():
    Psi, history, alpha = fold_in_problem(7)
    phi = ials_fold_in(Psi[history], alpha, Psi.T @ Psi, alpha0=0.2, lam=0.7)
    phi_t = torch.tensor(augment_users(phi[None, :]), requires_grad=True)
    loss = all_pairs_loss(phi_t, torch.tensor(Psi), torch.zeros(len(history), dtype=torch.long),
                          torch.tensor(history), torch.tensor(alpha), 0.2, 0.0)
    loss = loss + 0.7 * (phi_t[0, :-1] ** 2).sum()  # the user's own penalty λ‖φ‖²
    loss.backward()
    np.testing.assert_allclose(phi_t.grad.numpy()[0, :-1], 0.0, atol=1e-9)
