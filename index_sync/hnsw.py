"""Query-only HNSW indices over the augmented item rows ψ̃ = [v_i, b_i].

A user is the query φ̃ = [φ(u), 1], so ⟨φ̃, ψ̃_i⟩ = ⟨φ(u), v_i⟩ + b_i is the model's score and
maximum inner product search in hnswlib's space ``'ip'`` retrieves the model's top items
directly (LED §5.2: the bias as an extra dimension). hnswlib reports ``1 − ⟨q, x⟩`` as the
distance; :meth:`ItemIndex.search` turns it back into the score.

The graph holds the rows as they are (``space="ip"``, the default). The other choice,
``"sphere"``, first puts them on one sphere with the MIPS-to-NN reduction of Bachrach et al.
(2014), x ↦ [x, √(R² − ‖x‖²)] with R the largest norm and the query q ↦ [q, 0], which turns
the largest inner product into the nearest neighbour. It was the default, chosen on rows of
similar norms; learned rows are not like that (Toys after one pass: norms from 0.03 to 1.6,
median 0.53, popular items long, the many rarely seen ones short, so most rows crowd the pole
[0, R] of the sphere, far from every query). Recall@10 against exact search of the
responder's top 10 (64 graph candidates reranked; ef 128, M 16):

=============================================  =====  ======
rows                                           ip     sphere
=============================================  =====  ======
Toys, the model after one pass (11,924)        0.998  0.680
low-rank, 5,000, lengths spread by e^N(0,1)    0.998  0.890
low-rank, 100,000 (the serving benchmark's)    1.000  0.972
=============================================  =====  ======

Toys test NDCG@10 with those candidates: 0.0424 with ``ip``, as exact search, against 0.0390
on the sphere (0.0410 at ef 512), at 0.18 against 0.14 ms a query; through the responder,
``Engine.answer`` on a fresh version: 0.0424 against 0.0385 (docs/results.md).
``tests/test_index_sync.py`` holds the synthetic case.

An :class:`ItemIndex` is never changed while it serves: hnswlib's ``add_items`` must not
overlap ``knn_query`` on the same index, so new vectors go into a *new* index made aside, and the
serving reference is swapped (:mod:`index_sync.swap`). The new index is built from scratch, or,
when few rows moved, is a private copy of the serving one with those rows updated in place
(:meth:`ItemIndex.updated`): at a million items a build takes minutes, an update of a few
thousand rows seconds. Any row can be updated in an ``ip`` graph; on the sphere a build
puts the rows on a sphere ``SPHERE_HEADROOM`` wider than its longest row, so a row may grow a
little and still fit, and a longer one needs a build.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

import hnswlib
import numpy as np

#: 2: ``Manifest.space`` names the graph's form; every version of format 1 is on the sphere
INDEX_FORMAT = 2
#: sphere radius of a build over its longest row: rows that grow by up to this factor can be
#: updated in place. Recall@10 at ef 128 on 20,000 low-rank rows: 0.895 at 1.0, 0.883 at 1.1;
#: the responder's at 100,000 items (benchmarks/index_serving.py): 0.954 at 1.0, 0.953 at 1.05.
SPHERE_HEADROOM = 1.05


@dataclass(frozen=True)
class Manifest:
    """What a version folder holds; written as ``manifest.json`` beside the files."""

    version: int
    dim: int  # length of the augmented rows (d + 1); on the sphere the graph has one more
    count: int
    model_version: int
    build_seconds: float
    created_at: float
    clusters: int = 0  # 0: one index; K: one index per k-means cluster
    radius: float = 0.0  # of the sphere the rows were put on (0: not recorded, no updates)
    updated_rows: int = 0  # rows updated in place since the last build from scratch
    space: Literal["ip", "sphere"] = "ip"  # the rows as they are, or on the sphere
    format: int = INDEX_FORMAT
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Manifest:
        """The manifest as written; one of format 1 (its space said "ip" for the sphere's
        graph) is read as the sphere's, so versions written before format 2 still serve."""
        if not isinstance(data, dict):
            raise ValueError(f"a manifest is a JSON object, not {type(data).__name__}")
        if data.get("format") == 1:
            data = {**data, "space": "sphere", "format": INDEX_FORMAT}
        manifest = cls(**data)
        _check_manifest_types(manifest)
        return manifest

    @property
    def graph_dim(self) -> int:
        """Length of the graph's rows: the sphere adds a coordinate."""
        return self.dim + 1 if self.space == "sphere" else self.dim


def _check_manifest_types(manifest: Manifest) -> None:
    """Raise ValueError where a field of a manifest read from disk has the wrong type (a
    damaged file: a count of null would fail far from its cause)."""
    for name in ("version", "dim", "count", "model_version", "clusters", "updated_rows",
                 "format"):
        value = getattr(manifest, name)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"manifest field {name} is {value!r}, not an integer")
    for name in ("build_seconds", "created_at", "radius"):
        value = getattr(manifest, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ValueError(f"manifest field {name} is {value!r}, not a number")
    if manifest.space not in ("ip", "sphere"):
        raise ValueError(f"manifest space {manifest.space!r} is not ip or sphere")
    if not isinstance(manifest.files, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in manifest.files.items()):
        raise ValueError("manifest files is not an object of checksums")


@dataclass(frozen=True)
class HnswParams:
    """hnswlib parameters. ``ef`` is the search breadth; a query for k items searches with
    max(ef, k) (hnswlib's own rule), so ef >= k always holds."""

    M: int = 16
    ef_construction: int = 200
    ef: int = 128
    threads: int = 1
    space: Literal["ip", "sphere"] = "ip"  # see the module docstring


class ItemIndex:
    """One HNSW graph and the item ids of its labels (label = position in ``ids``)."""

    def __init__(self, graph: hnswlib.Index, ids: Sequence[str], manifest: Manifest,
                 ef: int) -> None:
        self.graph = graph
        self.ids = list(ids)
        self.manifest = manifest
        self.ef = ef
        self._position = {item: label for label, item in enumerate(self.ids)}
        graph.set_ef(ef)
        #: the server's note of moved rows at the snapshot it was built from (set by the
        #: build, ``swap.Snapshot.mark``, or by the server, ``ServingIndex._snapshot_mark``);
        #: None until then
        self.snapshot_mark: int | None = None

    @property
    def version(self) -> int:
        return self.manifest.version

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._position

    @classmethod
    def build(cls, ids: Sequence[str], vectors: np.ndarray, *, version: int,
              model_version: int, params: HnswParams = HnswParams(), seed: int = 0,
              clusters: int = 0, headroom: float = 1.0,
              stop: Callable[[], bool] | None = None) -> ItemIndex:
        """Build from rows ψ̃ (n, d+1); blocks for the whole build (run it aside). On the
        sphere (``params.space``) the rows go on one ``headroom`` times wider than the longest
        (see :meth:`updated`). ``stop``: asked between blocks of rows (:func:`add_rows`)."""
        vectors = _checked_rows(ids, vectors)
        started = time.perf_counter()
        radius = 0.0
        if params.space == "sphere":
            radius = headroom * float(np.sqrt(squared_norms(vectors).max(initial=0.0)))
        graph = new_graph(vectors, params, seed, radius=radius, stop=stop)
        manifest = Manifest(version=version, dim=vectors.shape[1], count=len(ids),
                            model_version=model_version,
                            build_seconds=time.perf_counter() - started,
                            created_at=time.time(), clusters=clusters, radius=radius,
                            space=params.space)
        return cls(graph, ids, manifest, params.ef)

    @property
    def updatable(self) -> bool:
        """Whether rows can be updated in place at all: an ``ip`` graph, or a sphere whose
        radius was recorded."""
        return self.manifest.space == "ip" or self.manifest.radius > 0

    def fits(self, vectors: np.ndarray) -> bool:
        """Whether rows this long can be updated in place: any in an ``ip`` graph, on the
        sphere those not longer than its radius."""
        if self.manifest.space == "ip":
            return True
        radius = self.manifest.radius
        return radius > 0 and bool((squared_norms(vectors) <= radius * radius).all())

    def updated(self, ids: Sequence[str], rows: np.ndarray, vectors: np.ndarray, *,
                version: int, model_version: int, threads: int = 1,
                stop: Callable[[], bool] | None = None) -> ItemIndex:
        """The index of ``ids`` whose labels ``rows`` now hold ``vectors``; rows from this
        index's count on are new labels and must all be among ``rows``.

        It changes this index's graph and hands it to the new index, so call it on a private
        copy (:func:`~index_sync.versions.load_version`), never on the serving index. hnswlib
        repairs the neighbourhood of every updated row, which costs about six inserts
        (``benchmarks/index_serving.py``, two threads: 1,000 of 100,000 rows in 0.74 s against
        8.7 s for the build, 10,000 of a million in 9.3 s against 186 s), so it pays only for
        few rows (:class:`~index_sync.swap.RebuildPolicy`)."""
        rows = np.asarray(rows, dtype=np.int64)
        vectors = _checked_rows(rows, vectors)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(ids)):
            raise ValueError(f"rows outside 0..{len(ids) - 1}")
        if not np.isin(np.arange(len(self), len(ids)), rows).all():
            raise ValueError("every new label must be among the updated rows")
        if not self.fits(vectors):
            raise ValueError(f"rows longer than the sphere (radius {self.manifest.radius})")
        started = time.perf_counter()
        if len(ids) > self.graph.get_max_elements():
            self.graph.resize_index(len(ids))
        add_rows(self.graph, graph_rows(vectors, self.manifest.space, self.manifest.radius),
                 rows, threads, stop)
        manifest = replace(self.manifest, version=version, count=len(ids),
                           model_version=model_version,
                           build_seconds=time.perf_counter() - started, created_at=time.time(),
                           updated_rows=self.manifest.updated_rows + len(rows),
                           files={})  # this copy's are the version it was read from
        return ItemIndex(self.graph, ids, manifest, self.ef)

    def search(self, query: np.ndarray, k: int, exclude: Collection[str] = (), *,
               diversity: float | None = None,
               history: Sequence[str] = ()) -> list[tuple[str, float]]:
        """The ``k`` best (item id, score) pairs for the augmented query, best first, none of
        ``exclude``. Asks the graph for k plus the excluded items it holds, then filters, so
        exclusion never shortens the answer. ``diversity`` and ``history`` steer the quota
        merge of :class:`~index_sync.clusters.ClusteredIndex`; one index ignores them."""
        held = sum(1 for item in exclude if item in self._position) if exclude else 0
        labels, scores = self.search_labels(query, k + held)
        ids = self.ids
        found = [(ids[label], score) for label, score in zip(labels.tolist(), scores.tolist())]
        return [pair for pair in found if pair[0] not in exclude][:k]

    def search_labels(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Labels (positions in ``ids``) and scores of the ``k`` best items, best first: the
        serving path's form, which never touches an item id."""
        k = min(k, len(self.ids))
        if k <= 0:
            return np.empty(0, dtype=np.int64), np.empty(0)
        # No set_ef here: hnswlib searches with max(ef, k) by itself, and changing ef would
        # race with queries on other threads.
        padded = np.zeros(self.manifest.graph_dim, dtype=np.float32)  # the sphere's: 0
        padded[:len(query)] = query
        while True:
            try:
                labels, distances = self.graph.knn_query(padded, k=k)
                return labels[0].astype(np.int64), 1.0 - distances[0]
            except RuntimeError as error:  # the search reached fewer than k items
                if "contiguous" not in str(error):  # hnswlib's words for that, and no other
                    raise
                if len(self.ids) <= EXACT_FALLBACK_ROWS:
                    return self._exact_labels(padded, k)
                # a graph too large to score whole: the best it can reach (the serving
                # path fills the rest by exact search, ServingIndex._filled)
                k //= 2
                if k == 0:
                    return np.empty(0, dtype=np.int64), np.empty(0)

    def _exact_labels(self, padded: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`search_labels` by scoring every row the graph holds. hnswlib raises where
        its search reaches fewer than ``k`` items, which a request for most of a small graph
        meets (a cluster of a clustered index, a first index): in the ``ip`` space, rows of
        very different norms leave some items out of every search."""
        rows = self.graph.get_items(np.arange(len(self.ids)), return_type="numpy")
        top = exact_top_k(rows, padded, k)
        return top.astype(np.int64), rows[top].astype(np.float64) @ padded.astype(np.float64)


#: the largest graph that a search reaching too few items scores whole (a few MB of rows)
EXACT_FALLBACK_ROWS = 50_000


def _checked_rows(labels: Sequence, vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float64)
    if vectors.ndim != 2 or len(vectors) != len(labels):
        raise ValueError(f"{len(labels)} ids for rows of shape {vectors.shape}")
    if not np.isfinite(vectors).all():
        raise ValueError("item rows hold NaN or infinite values")
    return vectors


def squared_norms(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float64)
    return np.einsum("ij,ij->i", vectors, vectors)


def on_sphere(vectors: np.ndarray, radius: float | None = None) -> np.ndarray:
    """[x, √(R² − ‖x‖²)] for every row x (R the given radius, by default the largest row
    norm): every row gets norm R and inner products with [q, 0] are those with q. A row longer
    than R keeps its own norm (its extra coordinate is 0).

    Examples
    --------
    >>> on_sphere(np.array([[3.0, 4.0], [0.0, 1.0]])).round(6).tolist()
    [[3.0, 4.0, 0.0], [0.0, 1.0, 4.898979]]
    >>> on_sphere(np.array([[3.0, 4.0]]), radius=13.0).round(6).tolist()
    [[3.0, 4.0, 12.0]]
    """
    vectors = np.asarray(vectors, dtype=np.float64)
    norms = squared_norms(vectors)
    top = norms.max(initial=0.0) if radius is None else radius * radius
    extra = np.sqrt(np.maximum(top - norms, 0.0))
    return np.hstack([vectors, extra[:, None]])


def graph_rows(vectors: np.ndarray, space: str, radius: float | None = None) -> np.ndarray:
    """The rows as the graph holds them (float32): as they are for ``ip``, put
    :func:`on_sphere` (of ``radius``, by default the longest row's) for ``sphere``."""
    if space == "sphere":
        vectors = on_sphere(vectors, radius)
    return np.ascontiguousarray(vectors, dtype=np.float32)


def new_graph(vectors: np.ndarray, params: HnswParams, seed: int = 0,
              radius: float | None = None,
              stop: Callable[[], bool] | None = None) -> hnswlib.Index:
    """An hnswlib index (its space 'ip') of ``vectors`` in the form ``params.space`` names
    (:func:`graph_rows`), labels 0..n-1."""
    vectors = graph_rows(vectors, params.space, radius)
    graph = hnswlib.Index(space="ip", dim=vectors.shape[1])
    graph.init_index(max_elements=max(len(vectors), 1), M=params.M,
                     ef_construction=params.ef_construction, random_seed=seed)
    add_rows(graph, vectors, np.arange(len(vectors)), params.threads, stop)
    return graph


class BuildStopped(Exception):
    """A build given up between two blocks of rows, as its worker stops."""


#: rows added to a graph per hnswlib call: a stop waits for one block at most (a few seconds
#: at a million items), and a single call is no faster
ADD_BLOCK_ROWS = 20_000


def add_rows(graph: hnswlib.Index, rows: np.ndarray, labels: np.ndarray, threads: int,
             stop: Callable[[], bool] | None = None) -> None:
    """``graph.add_items`` in blocks of :data:`ADD_BLOCK_ROWS`, asking ``stop`` before each:
    raises :class:`BuildStopped` when it says so. hnswlib cannot be interrupted inside a
    call, and a worker that stops would otherwise wait minutes for a large build to end."""
    for start in range(0, len(rows), ADD_BLOCK_ROWS):
        if stop is not None and stop():
            raise BuildStopped(f"stopped after {start} of {len(rows)} rows")
        graph.add_items(rows[start:start + ADD_BLOCK_ROWS], labels[start:start + ADD_BLOCK_ROWS],
                        num_threads=threads)


def exact_top_k(vectors: np.ndarray, query: np.ndarray, k: int) -> np.ndarray:
    """Row indices of the ``k`` largest inner products, best first: the brute-force reference
    that recall is measured against."""
    scores = np.asarray(vectors, dtype=np.float64) @ np.asarray(query, dtype=np.float64)
    k = min(k, len(scores))
    top = np.argpartition(-scores, k - 1)[:k]
    return top[np.argsort(-scores[top], kind="stable")]
