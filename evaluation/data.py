"""Integer-coded interaction logs for evaluation, built on the loaders of stream_app.datasets.

The loaders give string ids in stream order; evaluation needs dense indices (rows of a user×item
matrix) but must keep the stream order and each user's own order, which the protocols split on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from stream_app.datasets import InteractionLog, load

#: short dataset names -> folder under the data root (../shared/data)
NAMED_DATASETS = {
    "beauty": "amazon-beauty",
    "toys": "amazon-toys",
    "video-games": "amazon-video-games",
    "movielens": "ml-latest-small",
}


@dataclass(frozen=True)
class Events:
    """Parallel arrays in stream order; ``order`` is the event's position within its user."""

    users: np.ndarray  # int64 user index
    items: np.ndarray  # int64 item index
    weights: np.ndarray  # float64 confidence of the event's kind
    ts: np.ndarray  # float64 event time, non-decreasing
    order: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.users)

    def take(self, index) -> Events:
        """The events at ``index`` (a bool mask or positions), stream order kept if sorted."""
        return Events(self.users[index], self.items[index], self.weights[index], self.ts[index],
                      self.order[index])


@dataclass(frozen=True)
class Dataset:
    """An integer-coded log and the string ids that the indices stand for."""

    name: str
    events: Events
    user_ids: np.ndarray
    item_ids: np.ndarray

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)


def data_root(configured: Path | None = None) -> Path:
    """Where the named datasets lie: ``configured`` (``--data-root`` or the
    ``STREAMREC_DATASETS_DIR`` setting, default ``../shared/data``). A relative path that does
    not exist from the working directory is taken from the repository checkout instead, so the
    command works from the checkout (as the README shows) and from anywhere else."""
    root = Path(configured) if configured is not None else Path("../shared/data")
    if root.exists() or root.is_absolute():
        return root
    return Path(__file__).resolve().parents[1] / root


def resolve_dataset(spec: str, root: Path | None = None) -> tuple[str, Path]:
    """A dataset name (``beauty``, ``toys``, ``video-games``, ``movielens``) or a path, as
    (name for reports, path for the loader)."""
    if spec in NAMED_DATASETS:
        path = data_root(root) / NAMED_DATASETS[spec]
        if not path.exists():
            raise FileNotFoundError(f"dataset {spec!r} not found at {path}; set --data-root")
        return spec, path
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(
            f"{spec!r} is neither a named dataset ({', '.join(NAMED_DATASETS)}) nor a path")
    return path.stem, path


def load_dataset(spec: str, fmt: str | None, kind_weights: Mapping[str, float], *,
                 seed: int = 0, root: Path | None = None) -> Dataset:
    """Load and encode a dataset; ``seed`` fixes the interleaving of files without timestamps."""
    name, path = resolve_dataset(spec, root)
    return encode(load(path, fmt, seed=seed), kind_weights, name)


def encode(log: InteractionLog, kind_weights: Mapping[str, float], name: str = "") -> Dataset:
    """Dense indices for users and items (sorted ids), kind weights as event confidences."""
    user_ids, users = np.unique(log.users, return_inverse=True)
    item_ids, items = np.unique(log.items, return_inverse=True)
    unknown = set(np.unique(log.kinds).tolist()) - set(kind_weights)
    if unknown:
        raise ValueError(f"event kinds without a weight: {sorted(unknown)}")
    kinds, kind_index = np.unique(log.kinds, return_inverse=True)
    weights = np.array([kind_weights[k] for k in kinds.tolist()], dtype=np.float64)[kind_index]
    events = Events(users.astype(np.int64), items.astype(np.int64), weights,
                    np.asarray(log.ts, dtype=np.float64), np.asarray(log.order, dtype=np.int64))
    return Dataset(name, events, user_ids, item_ids)


def sample_users(dataset: Dataset, n_users: int, seed: int) -> Dataset:
    """A seeded sample of ``n_users`` users with all their events; items nobody in the sample
    touched are dropped, so the catalog (and the cost of item×item models) shrinks with it."""
    if n_users >= dataset.n_users:
        return dataset
    rng = np.random.default_rng(seed)
    chosen = np.zeros(dataset.n_users, dtype=bool)
    chosen[rng.choice(dataset.n_users, size=n_users, replace=False)] = True
    return restrict(dataset, chosen[dataset.events.users])


def restrict(dataset: Dataset, keep: np.ndarray) -> Dataset:
    """Keep the events where ``keep`` is true and re-index users and items to those left.

    Positions within each user are recomputed, so a user whose first events were dropped still
    starts at 0: the protocols rely on ``order`` being 0..n-1 per user."""
    events = dataset.events.take(keep)
    user_map, users = np.unique(events.users, return_inverse=True)
    item_map, items = np.unique(events.items, return_inverse=True)
    order = positions_within_user(users)
    events = Events(users.astype(np.int64), items.astype(np.int64), events.weights, events.ts,
                    order)
    return Dataset(dataset.name, events, dataset.user_ids[user_map], dataset.item_ids[item_map])


def positions_within_user(users: np.ndarray) -> np.ndarray:
    """0, 1, 2, ... for each user's events, in array (stream) order."""
    grouped = np.argsort(users, kind="stable")
    counts = np.bincount(users)
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    order = np.empty(len(users), dtype=np.int64)
    order[grouped] = np.arange(len(users)) - np.repeat(starts, counts)
    return order


def interaction_matrix(users: np.ndarray, items: np.ndarray, n_users: int,
                       n_items: int) -> sp.csr_matrix:
    """Binary user×item CSR (float32): repeated interactions count once, as in the published
    protocols, and every baseline sees the same matrix."""
    matrix = sp.csr_matrix((np.ones(len(users), dtype=np.float32), (users, items)),
                           shape=(n_users, n_items))
    matrix.sum_duplicates()
    matrix.data[:] = 1.0
    return matrix
