"""Planted-structure data: clusters of users who consume only their cluster's items, so the
right answers (and popularity's exact leave-one-out score) are known before running anything.

The tests use it to make every assertion about a model or a protocol mean something; it is also
a quick way to sanity-check a new streaming learner (``ClusterOracle`` is the perfect score).
"""

from __future__ import annotations

import math

import numpy as np

from stream_app.datasets import interleave

from .data import Dataset, encode

KIND_WEIGHTS = {"view": 1.0}


def planted_loo(cluster_sizes=(40, 25, 15, 10), items_per_cluster=5, seed=0) -> Dataset:
    """Every user of cluster c consumes all of its M items, in a seeded random order except
    that user j's last two items are (j+1) mod M (validation) and j mod M (test).

    With cluster sizes multiples of M, every item of cluster c is a validation target for
    n_c/M users and a test target for n_c/M users, so its training count is exactly
    n_c·(1 − 2/M): popularity ranks every item of a bigger cluster above every item of a
    smaller one, and its leave-one-out scores have the closed form of :func:`popularity_loo`.
    """
    m = items_per_cluster
    assert all(size % m == 0 for size in cluster_sizes)
    rng = np.random.default_rng(seed)
    users, items = [], []
    for c, size in enumerate(cluster_sizes):
        for j in range(size):
            val, test = (j + 1) % m, j % m
            rest = [i for i in rng.permutation(m).tolist() if i not in (val, test)]
            for i in rest + [val, test]:
                users.append(f"c{c}u{j:04d}")
                items.append(f"i{c * m + i:04d}")  # zero-padded: index order = id order
    log = interleave(np.array(users), np.array(items), seed)
    return encode(log, KIND_WEIGHTS, "planted")


def popularity_loo(cluster_sizes, items_per_cluster, k) -> tuple[float, float]:
    """Exact test HR@k and NDCG@k of popularity on :func:`planted_loo`.

    A user of the c-th biggest cluster (0-based) has seen every item of their cluster but the
    test item; the unseen items of the c bigger clusters all rank above it, so it sits at rank
    c·M + 1."""
    total = sum(cluster_sizes)
    hr = ndcg = 0.0
    for c, size in enumerate(cluster_sizes):
        rank = c * items_per_cluster + 1
        if rank <= k:
            hr += size / total
            ndcg += size / total / math.log2(rank + 1)
    return hr, ndcg


def cluster_of(dataset: Dataset, items_per_cluster: int) -> np.ndarray:
    """Cluster of each item index, read back from the planted ids."""
    return np.array([int(item_id[1:]) // items_per_cluster for item_id in dataset.item_ids])


class ClusterOracle:
    """Knows the planted clusters: recommends the unseen items of the history's cluster.

    A perfect model for :func:`planted_loo`: exactly one item of the cluster is unseen at test
    time, and it is the target."""

    name = "oracle"

    def __init__(self, clusters: np.ndarray) -> None:
        self.clusters = clusters

    def fit(self, train) -> None:
        pass

    def recommend(self, history, k, exclude=None):
        ranked = np.full((history.shape[0], k), -1, dtype=np.int64)
        for row in range(history.shape[0]):
            seen = history.indices[history.indptr[row]:history.indptr[row + 1]]
            blocked = set() if exclude is None else \
                set(exclude.indices[exclude.indptr[row]:exclude.indptr[row + 1]].tolist())
            cluster = np.bincount(self.clusters[seen]).argmax()
            mine = [i for i in np.flatnonzero(self.clusters == cluster).tolist()
                    if i not in blocked][:k]
            ranked[row, :len(mine)] = mine
        return ranked
