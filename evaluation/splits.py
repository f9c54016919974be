"""Train/validation/test splits for the offline protocols (leave-one-out, held-out users).

A split is data only. Every model of one run is fitted and scored on the same split object, so
baselines and the streaming model see exactly the same training events and the same targets.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from .data import Dataset, Events, interaction_matrix, restrict


@dataclass(frozen=True)
class Fold:
    """Rows to score: each row's history is the model input and is excluded from its ranking."""

    users: np.ndarray  # dataset user index of each row
    history: sp.csr_matrix  # (rows, n_items) items the model may read
    targets: sp.csr_matrix  # (rows, n_items) relevant items, never in history
    # (rows, n_items) time of the row's latest event on each history item, the same pattern as
    # ``history``: what a model that reads histories in time order (as a worker does) needs.
    times: sp.csr_matrix | None = None

    def __len__(self) -> int:
        return len(self.users)


@dataclass(frozen=True)
class Split:
    """One protocol's data: what the models train on and the two folds they are scored on."""

    protocol: str
    dataset: Dataset  # the (possibly item-restricted) dataset the indices refer to
    train: sp.csr_matrix  # (n_users, n_items); rows of users outside training are empty
    train_events: Events  # the same interactions in stream order, for streaming learners
    validation: Fold
    test: Fold
    info: dict = field(default_factory=dict)

    @property
    def n_items(self) -> int:
        return self.train.shape[1]


def leave_one_out(dataset: Dataset) -> Split:
    """SASRec/ICLRec leave-one-out: per user the last item is the test target and the one before
    it the validation target; models train on the rest.

    Validation rows read the training items; test rows read the training items plus the
    validation item (as the sequential models of the published numbers do), and both rank all
    items except the ones read. Users with fewer than 3 events cannot give a target that
    leaves a history, so all their events are training data and they are not scored.
    """
    ev = dataset.events
    length = np.bincount(ev.users, minlength=dataset.n_users)
    from_end = length[ev.users] - 1 - ev.order
    scored = length[ev.users] >= 3
    is_test = scored & (from_end == 0)
    is_val = scored & (from_end == 1)
    is_train = ~(is_test | is_val)
    shape = (dataset.n_users, dataset.n_items)
    train = interaction_matrix(ev.users[is_train], ev.items[is_train], *shape)
    val_target = _target_matrix(ev, is_val, shape)
    test_target = _target_matrix(ev, is_test, shape)
    users = np.flatnonzero(length >= 3)
    seen_before_test = (train + val_target).tocsr()
    seen_before_test.data[:] = 1.0
    train_times = latest_times(ev.take(is_train), shape)
    test_times = latest_times(ev.take(is_train | is_val), shape)
    validation = Fold(users, train[users], val_target[users], train_times[users])
    test = Fold(users, seen_before_test[users], test_target[users], test_times[users])
    info = {"users": int(dataset.n_users), "items": int(dataset.n_items), "events": len(ev),
            "scored_users": len(users), "train_events": int(is_train.sum()),
            "repeat_targets": _repeats(validation) + _repeats(test)}
    return Split("loo", dataset, train, ev.take(is_train), _without_history(validation),
                 _without_history(test), info)


def heldout_users(dataset: Dataset, seed: int, *, validation_fraction: float = 0.1,
                  test_fraction: float = 0.2, fold_in: float = 0.8,
                  min_events: int = 5) -> Split:
    """Mult-VAE's strong generalization: held-out users never train the models. Unlike
    Mult-VAE, which keeps ratings of 4 and over and draws each user's 80 % at random, every
    event of the dataset is kept (a rating below 4 is a ``view``) and the split is by time.

    A seeded ``test_fraction`` and ``validation_fraction`` of all users (drawn from those with at
    least ``min_events`` events) are held out; the models train on every event of the other
    users. Items never seen in training are dropped from the catalog (no model could rank
    them) along with the held-out events on them. Each held-out user's first ``fold_in`` share
    of events, in their own time order, is the history the model reads; the rest are the
    targets. Recall is then normalized by min(K, |targets|) (see ``models.metrics``).
    """
    rng = np.random.default_rng(seed)
    length = np.bincount(dataset.events.users, minlength=dataset.n_users)
    eligible = rng.permutation(np.flatnonzero(length >= min_events))
    n_test = min(int(round(test_fraction * dataset.n_users)), len(eligible) // 2)
    n_val = min(int(round(validation_fraction * dataset.n_users)), len(eligible) - n_test)
    role = np.zeros(dataset.n_users, dtype=np.int8)  # 0 train, 1 validation, 2 test
    role[eligible[:n_test]] = 2
    role[eligible[n_test:n_test + n_val]] = 1
    ev = dataset.events
    in_train = role[ev.users] == 0
    known_items = np.zeros(dataset.n_items, dtype=bool)
    known_items[ev.items[in_train]] = True
    kept = restrict(dataset, known_items[ev.items])
    # restrict() re-indexes users; carry each user's role over through the id arrays.
    role = role[np.searchsorted(dataset.user_ids, kept.user_ids)]
    ev = kept.events
    shape = (kept.n_users, kept.n_items)
    in_train = role[ev.users] == 0
    train = interaction_matrix(ev.users[in_train], ev.items[in_train], *shape)
    validation = _fold_in(kept, role == 1, fold_in)
    test = _fold_in(kept, role == 2, fold_in)
    info = {"users": int(dataset.n_users), "items": int(kept.n_items), "events": len(ev),
            "train_users": int((role == 0).sum()), "validation_users": len(validation),
            "test_users": len(test), "train_events": int(in_train.sum()),
            "dropped_events_unknown_items": int(len(dataset.events) - len(ev)),
            "fold_in": fold_in}
    return Split("heldout", kept, train, ev.take(in_train), validation, test, info)


def _fold_in(dataset: Dataset, chosen: np.ndarray, fold_in: float) -> Fold:
    """History = each chosen user's first ``fold_in`` share of events, targets = the rest."""
    ev = dataset.events
    length = np.bincount(ev.users, minlength=dataset.n_users)
    n_history = np.clip(np.floor(fold_in * length).astype(np.int64), 1, length - 1)
    users = np.flatnonzero(chosen & (length >= 2))
    mine = np.isin(ev.users, users)
    early = ev.order < n_history[ev.users]
    shape = (dataset.n_users, dataset.n_items)
    history = interaction_matrix(ev.users[mine & early], ev.items[mine & early], *shape)
    targets = interaction_matrix(ev.users[mine & ~early], ev.items[mine & ~early], *shape)
    times = latest_times(ev.take(mine & early), shape)
    return _without_history(Fold(users, history[users], targets[users], times[users]))


def latest_times(ev: Events, shape) -> sp.csr_matrix:
    """(users × items) time of each user's latest event on each item: the sparsity pattern of
    :func:`interaction_matrix` on the same events, with times instead of ones."""
    return latest_by_cell(ev.users, ev.items, ev.ts, shape)


def latest_by_cell(rows: np.ndarray, cols: np.ndarray, ts: np.ndarray, shape) -> sp.csr_matrix:
    """CSR holding, for every (row, col) that occurs, the largest of its ``ts``."""
    key = rows.astype(np.int64) * shape[1] + cols
    newest_first = np.lexsort((-ts, key))
    _, first = np.unique(key[newest_first], return_index=True)
    chosen = newest_first[first]
    matrix = sp.csr_matrix((np.asarray(ts, dtype=np.float64)[chosen],
                            (rows[chosen], cols[chosen])), shape=shape)
    matrix.sort_indices()
    return matrix


def _target_matrix(ev: Events, mask: np.ndarray, shape) -> sp.csr_matrix:
    return interaction_matrix(ev.users[mask], ev.items[mask], *shape)


def _repeats(fold: Fold) -> int:
    """Targets the user already had in their history (a repeat purchase or re-watch)."""
    return int(fold.history.multiply(fold.targets).nnz)


def _without_history(fold: Fold) -> Fold:
    """Drop targets that are also in the history: history items are excluded from every ranking,
    so such a target could never be hit and would only measure the exclusion rule. Rows left
    without a target are dropped."""
    targets = (fold.targets - fold.targets.multiply(fold.history)).tocsr()
    targets.eliminate_zeros()
    keep = np.diff(targets.indptr) > 0
    times = None if fold.times is None else fold.times[keep]
    return Fold(fold.users[keep], fold.history[keep], targets[keep], times)
