"""Divide and conquer (Kuaishou §2.2): one index per k-means cluster of items, merged by quotas.

A single nearest-neighbour search returns the items of the user's dominant taste; with one
index per cluster, each cluster contributes M_k = M · p_uk^α / Σ_k' p_uk'^α candidates, where
p_uk is the user's affinity to cluster k. α = 0 gives every cluster the same share ("absolute
fairness"), α → ∞ only the most relevant cluster; α is the request's ``diversity``.

Clusters are k-means over the item vectors v_i (not the bias: the bias says how popular an item
is, not what it is about), recomputed at every rebuild.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

import numpy as np
from sklearn.cluster import KMeans

from .hnsw import HnswParams, ItemIndex, Manifest

#: softmax temperature of the user-vector affinity, relative to the spread of the scores
AFFINITY_TEMPERATURE = 1.0


def quotas(p: np.ndarray, alpha: float, total: int) -> np.ndarray:
    """M_k = M · p_k^α / Σ p^α, rounded to integers that sum to exactly ``total``
    (largest remainders get the leftover units; ties to the more likely cluster).

    With α = 0 every cluster gets an equal share, clusters of zero probability included
    (p^0 = 1, as in the paper's "absolute fairness"). Large α (≥ 50 is treated as ∞) gives
    everything to the most likely cluster.

    Examples
    --------
    >>> quotas(np.array([0.5, 0.3, 0.2]), 0.0, 9).tolist()
    [3, 3, 3]
    >>> quotas(np.array([0.5, 0.3, 0.2]), 1.0, 10).tolist()
    [5, 3, 2]
    >>> quotas(np.array([0.5, 0.3, 0.2]), 100.0, 10).tolist()
    [10, 0, 0]
    """
    p = np.asarray(p, dtype=np.float64)
    if total <= 0 or len(p) == 0:
        return np.zeros(len(p), dtype=np.int64)
    if alpha == 0:
        weights = np.ones_like(p)
    elif alpha >= 50 or not (p > 0).any():
        weights = (np.arange(len(p)) == np.argmax(p)).astype(np.float64)
    else:
        with np.errstate(divide="ignore"):
            logs = alpha * np.log(p)  # p^α in log space: no underflow for large α
        weights = np.exp(logs - logs.max())
    shares = total * weights / weights.sum()
    counts = np.floor(shares).astype(np.int64)
    leftover = total - counts.sum()
    order = np.lexsort((-p, -(shares - counts)))  # largest remainder, then likelier cluster
    counts[order[:leftover]] += 1
    return counts


def affinity_from_history(history_clusters: Sequence[int], n_clusters: int,
                          smoothing: float = 0.0) -> np.ndarray:
    """p_uk as the share of the user's history in each cluster (plus ``smoothing`` per
    cluster, so a cluster the user never touched can still get a share for α > 0)."""
    counts = np.bincount(np.asarray(history_clusters, dtype=np.int64),
                         minlength=n_clusters).astype(np.float64) + smoothing
    return counts / counts.sum() if counts.sum() > 0 else np.full(n_clusters, 1.0 / n_clusters)


def affinity_from_vector(query: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """p_uk as a softmax of the query's scores against the cluster centroids (each centroid an
    augmented row, so its bias counts as for an item), scaled by their standard deviation so
    the distribution does not depend on the norm of φ."""
    scores = centroids @ np.asarray(query, dtype=np.float64)
    spread = scores.std() or 1.0
    z = (scores - scores.max()) / (spread * AFFINITY_TEMPERATURE)
    weights = np.exp(z)
    return weights / weights.sum()


class ClusteredIndex:
    """K item indices, one per k-means cluster, answered by quota merge."""

    def __init__(self, parts: list[ItemIndex], centroids: np.ndarray, manifest: Manifest,
                 source_ids: list[str] | None = None) -> None:
        self.parts = parts
        self.centroids = centroids
        self.manifest = manifest
        self.cluster_of = {item: k for k, part in enumerate(parts) for item in part.ids}
        #: the ids it was built from, in their order (every one is in a cluster); None for a
        #: version read from disk. The server compares them with its learner's rows, cheaply,
        #: instead of looking up every id (a second at a million items, on the event loop)
        self.source_ids = source_ids
        self.snapshot_mark: int | None = None  # as ItemIndex.snapshot_mark

    @property
    def version(self) -> int:
        return self.manifest.version

    @property
    def ids(self) -> list[str]:
        return [item for part in self.parts for item in part.ids]

    def __len__(self) -> int:
        return len(self.cluster_of)

    def __contains__(self, item_id: str) -> bool:
        return item_id in self.cluster_of

    @classmethod
    def build(cls, ids: Sequence[str], vectors: np.ndarray, n_clusters: int, *, version: int,
              model_version: int, params: HnswParams = HnswParams(),
              seed: int = 0, stop: Callable[[], bool] | None = None) -> ClusteredIndex:
        import time

        started = time.perf_counter()
        vectors = np.asarray(vectors, dtype=np.float64)
        source_ids = list(ids)
        n_clusters = max(1, min(n_clusters, len(ids)))
        labels = KMeans(n_clusters, n_init=1, random_state=seed).fit_predict(vectors[:, :-1])
        # fewer distinct rows than clusters leave some empty (a NaN centroid): renumber the
        # clusters that hold items and keep only those
        held, labels = np.unique(labels, return_inverse=True)
        n_clusters = len(held)
        ids = np.asarray(ids, dtype=object)
        parts, centroids = [], []
        for k in range(n_clusters):
            members = np.flatnonzero(labels == k)
            parts.append(ItemIndex.build(ids[members].tolist(), vectors[members],
                                         version=version, model_version=model_version,
                                         params=params, seed=seed, stop=stop))
            centroids.append(vectors[members].mean(axis=0))
        manifest = Manifest(version=version, dim=vectors.shape[1], count=len(ids),
                            model_version=model_version,
                            build_seconds=time.perf_counter() - started,
                            created_at=time.time(), clusters=n_clusters, space=params.space)
        return cls(parts, np.stack(centroids), manifest, source_ids)

    def affinity(self, query: np.ndarray, history: Sequence[str] = ()) -> np.ndarray:
        """p_uk from the user's history when it touches indexed items, else from the vector."""
        known = [self.cluster_of[item] for item in history if item in self.cluster_of]
        if known:
            return affinity_from_history(known, len(self.parts))
        return affinity_from_vector(query, self.centroids)

    def search(self, query: np.ndarray, k: int, exclude: Collection[str] = (), *,
               diversity: float | None = None, history: Sequence[str] = (),
               fresh: Sequence[tuple[str, float, int]] = ()) -> list[tuple[str, float]]:
        """Top ``k`` by quota merge: cluster c contributes its best M_c (α = ``diversity``,
        default 1), the union is ordered by score. Clusters with fewer items than their quota
        hand the rest to the others, so the answer has k items whenever the index holds them.

        ``fresh``: (item, score, cluster) of items scored outside the graphs (new since the
        build, or moved: the graphs hold them with old vectors, and are not asked for them),
        each competing for its cluster's quota (:meth:`clusters_for`); those its quota left
        out compete again, by score, in the last pass, which fills what the clusters could
        not (a cluster that runs short before the last hands the rest to the next one)."""
        alpha = 1.0 if diversity is None else diversity
        counts = quotas(self.affinity(query, history), alpha, k)
        by_cluster: dict[int, list[tuple[str, float]]] = {}
        for item, score, cluster in fresh:
            by_cluster.setdefault(cluster, []).append((item, score))
        fresh_ids = {item for item, _, _ in fresh}
        exclude = set(exclude) | fresh_ids
        found: list[tuple[str, float]] = []
        fresh_left: list[tuple[str, float]] = []  # cut by their cluster's quota
        spare = 0
        for cluster in np.argsort(-counts, kind="stable").tolist():
            want = int(counts[cluster]) + spare
            got = self.parts[cluster].search(query, want, exclude) if want else []
            ranked = sorted(got + by_cluster.pop(cluster, []), key=lambda pair: -pair[1])
            fresh_left += [pair for pair in ranked[want:] if pair[0] in fresh_ids]
            spare = want - len(ranked[:want])
            found += ranked[:want]
        if spare:  # the last clusters ran dry too: the best of what any cluster still has
            taken = {item for item, _ in found} | exclude
            extra, needed = list(fresh_left), spare
            for part in self.parts:  # graphs searched until they could fill it alone
                got = part.search(query, needed, taken)
                extra += got
                needed -= len(got)
                if needed <= 0:
                    break
            found += sorted(extra, key=lambda pair: -pair[1])[:spare]
        found.sort(key=lambda pair: -pair[1])  # an item lies in one cluster: no duplicates
        return found[:k]

    def clusters_for(self, item_ids: Sequence[str], vectors: np.ndarray) -> np.ndarray:
        """The cluster of each item: the one it was built into, else (an item new since the
        build) the nearest centroid, k-means's own rule (on the vectors without their bias)."""
        if not len(item_ids):
            return np.empty(0, dtype=np.int64)
        vectors = np.asarray(vectors, dtype=np.float64).reshape(len(item_ids), -1)[:, :-1]
        centroids = self.centroids[:, :-1]
        distances = (np.einsum("ij,ij->i", centroids, centroids)[None, :]
                     - 2.0 * vectors @ centroids.T)  # ‖v − c‖² less ‖v‖², the same order
        nearest = np.argmin(distances, axis=1)
        return np.array([self.cluster_of.get(item, int(near))
                         for item, near in zip(item_ids, nearest)], dtype=np.int64)
