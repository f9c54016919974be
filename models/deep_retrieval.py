"""Deep Retrieval (DR): a learnable K × D path structure for candidate retrieval (DR §2–3).

A user vector x is mapped to a distribution over K^D paths, p(c | x) = Π_d p(c_d | x, c_<d), by D
small softmax layers (:class:`StructureModel`); every item lives on J paths. Retrieval is a beam
search for the B most probable paths and the union of their items (:func:`beam_search`). The
item → path map is learned by EM: the E-step trains the layers on −log Σ_j p(π_j(v) | x)
(:func:`multi_path_loss`), decayed top-S path scores s[v, c] are tracked on the stream
(:class:`state.path_scores.PathScoreTracker`), and the M-step reassigns paths by penalized
coordinate descent (:func:`m_step`). :class:`DeepRetrieval` owns the state of one learn partition.

Paths are int64 codes, ``code = Σ_d c_d · K^(D-1-d)`` (:func:`encode_paths`), so one path is one
integer in every array, index and checkpoint; ``-1`` is "no path".
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from state.delta_checkpoint import ChainWriter, Table, load_checkpoint, mark_rows
from state.gramian import DamagedCheckpoint, ids_from_arrays, ids_to_arrays, save_npz
from state.path_scores import EMPTY, PathIndex, PathScoreTracker

NearFn = Callable[[str], "str | None"]

#: Floor of the partial score sum Σ_prev before an item's first pick (see :func:`m_step`).
FIRST_PICK_EPS = 1e-12
#: prefix of the structure model's weights among a checkpoint's arrays
WEIGHTS_PREFIX = "weights."


@dataclass(frozen=True)
class DRConfig:
    """Hyperparameters of :class:`DeepRetrieval` (symbols of the DR paper in brackets).

    - ``width`` (K), ``depth`` (D): K^D paths; the defaults give 10^6 paths, a few per item for
      catalogues of 10^5–10^6 items.
    - ``paths_per_item`` (J), ``beam`` (B, retrieval), ``top_s`` (S, paths tracked per item and
      the beam used to score a training pair), ``decay`` (η of the streaming score update).
    - ``penalty`` (α of f(|c|) = |c|⁴/4): adding an item to a path of size n costs
      α·((n+1)⁴ − n⁴)/4 ≈ α n³, traded against N_v·log(1 + s/Σ_prev), whose typical size is
      N_v (an item's pairs, decayed as its scores: at most 1/(1 − η), 1,000 at η = 0.999)
      times a log-ratio of order 1. The paper used 3·10⁻⁵ on MovieLens-20M
      (20k items, N_v ≈ 500) and 3·10⁻⁷ on Amazon books (1.5M items, N_v ≈ 6): in both the
      penalty matches the likelihood gain at |c| ≈ 250. With 10⁻⁶ and N_v of 10–100, the balance
      is at |c| ≈ 200–450: for 10⁴–10⁶ items on 10⁶ paths (mean size ≤ 3) it leaves ordinary paths
      alone and only stops collapse into a few paths of thousands of items, which would make the
      reranker score a large share of the catalogue.
    - ``node_dim``: size of the embedding e(c_d) of a chosen node fed to the later layers.
    - ``hidden``: 0 = one linear softmax layer per level; > 0 = one hidden ReLU layer of that size.
    - ``lr`` (Adam), ``mstep_passes`` (the paper: 3–5 are enough), ``seed`` (model init and
      random paths).
    - ``new_item_paths``: where an item met for the first time goes. ``random`` (J paths seeded
      by its id, the paper's initialization) lets the E-step teach the layers to route that
      item's users to its paths, which spreads the catalogue. ``beam`` (the J best paths of the
      first user's x) is retrievable at once for similar users, but while the layers are
      untrained every x gives the same beam: on a planted stream all items landed on the same
      two paths and no M-step moved them (each item's tracked scores favour those paths too).
    - ``track_every``: the path scores s[v, c] are tracked from every n-th learned pair of the
      stream, and from every pair of an item that has no tracked score yet (the E-step's
      gradient and N_v still take every pair). Scoring a pair needs a beam search of S paths,
      about two thirds of an E-step. s[v, c] then sums over a sample of v's pairs; the M-step
      reads it only through ratios (log(Σ_prev + s) − log Σ_prev) next to the full N_v, so the
      sample changes its noise, not its aim. The tracker decays by η^n per tracked pair, so the
      decay's horizon in pairs stays what η says. Without the rule for unscored items, an item
      whose few pairs all fell between the samples kept its random first paths through every
      M-step, out of reach of its users' beams (Toys: 8,600 non-empty paths against 290).
    """

    input_dim: int = 64
    width: int = 100
    depth: int = 3
    paths_per_item: int = 3
    beam: int = 25
    top_s: int = 16
    decay: float = 0.999
    penalty: float = 1e-6
    node_dim: int = 16
    hidden: int = 0
    lr: float = 1e-3
    mstep_passes: int = 3
    new_item_paths: Literal["random", "beam"] = "random"
    track_every: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.width < 2 or self.depth < 1:
            raise ValueError("width must be >= 2 and depth >= 1")
        if self.width ** self.depth >= 2 ** 62:
            raise ValueError("K^D paths must fit an int64 code")
        if min(self.paths_per_item, self.beam, self.top_s, self.input_dim, self.track_every) < 1:
            raise ValueError("paths_per_item, beam, top_s, input_dim and track_every must be >= 1")
        if not 0.0 < self.decay <= 1.0 or self.penalty < 0.0:
            raise ValueError("decay must be in (0, 1] and penalty >= 0")
        if self.top_s < self.paths_per_item:
            raise ValueError(f"top_s ({self.top_s}) must be >= paths_per_item "
                             f"({self.paths_per_item}): an M-step picks each item's paths among "
                             "its tracked ones, and fewer would repeat paths")


def encode_paths(paths: np.ndarray, width: int) -> np.ndarray:
    """Path node indices (..., D) → int64 codes (...); a row with any negative node gives -1.

    >>> encode_paths(np.array([[1, 2, 3]]), 10).tolist()
    [123]
    """
    paths = np.asarray(paths, dtype=np.int64)
    weights = width ** np.arange(paths.shape[-1] - 1, -1, -1, dtype=np.int64)
    codes = paths @ weights
    return np.where((paths < 0).any(axis=-1), EMPTY, codes)


def decode_paths(codes: np.ndarray, width: int, depth: int) -> np.ndarray:
    """int64 codes (...) → node indices (..., D); code -1 decodes to all -1.

    >>> decode_paths(np.array([123, -1]), 10, 3).tolist()
    [[1, 2, 3], [-1, -1, -1]]
    """
    codes = np.asarray(codes, dtype=np.int64)
    weights = width ** np.arange(depth - 1, -1, -1, dtype=np.int64)
    paths = (codes[..., None] // weights) % width
    return np.where(codes[..., None] < 0, EMPTY, paths)


def _layer(in_dim: int, width: int, hidden: int) -> nn.Module:
    if hidden <= 0:
        return nn.Linear(in_dim, width)
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, width))


class StructureModel(nn.Module):
    """D softmax layers; layer d sees [x, e_1(c_1), …, e_{d-1}(c_{d-1})] (DR §2.1, Fig. 1b).

    Each layer has its own node embeddings: node k of layer 1 and node k of layer 2 are different
    nodes. Parameters are Θ(K D²), far fewer than the K^D paths. Initialization is seeded without
    touching the global torch RNG.
    """

    def __init__(self, input_dim: int, width: int, depth: int, node_dim: int = 16,
                 hidden: int = 0, seed: int = 0) -> None:
        super().__init__()
        self.input_dim, self.width, self.depth = input_dim, width, depth
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.node_emb = nn.ModuleList(nn.Embedding(width, node_dim) for _ in range(depth - 1))
            self.layers = nn.ModuleList(_layer(input_dim + d * node_dim, width, hidden)
                                        for d in range(depth))

    def layer_log_probs(self, x: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        """log p(c_d = · | x, c_<d) for d = prefix.shape[1]; x (N, input_dim), prefix (N, d)."""
        d = prefix.shape[1]
        parts = [x] + [self.node_emb[i](prefix[:, i]) for i in range(d)]
        return torch.log_softmax(self.layers[d](torch.cat(parts, dim=1)), dim=1)

    def beam_layers(self) -> list[BeamLayer]:
        """The layers as numpy arrays for :func:`beam_search` (a copy of about 0.1 MB).

        The first linear map of layer d is split as W_x x + Σ_i W_i e_i(c_i) + b: the x part is
        computed once per user and shared by the whole beam, and the node part of each earlier
        level is a K × K' table (node c → W_i e_i(c)), so expanding a prefix is a row lookup."""
        layers = []
        with torch.no_grad():
            for d, layer in enumerate(self.layers):
                linear = layer if isinstance(layer, nn.Linear) else layer[0]
                weight = linear.weight.numpy()
                node_dim = self.node_emb[0].embedding_dim if d else 0
                tables = tuple(
                    self.node_emb[i].weight.numpy()
                    @ weight[:, self.input_dim + i * node_dim:self.input_dim + (i + 1) * node_dim].T
                    for i in range(d))
                out = None if isinstance(layer, nn.Linear) else (
                    np.ascontiguousarray(layer[2].weight.numpy().T), layer[2].bias.numpy().copy())
                layers.append(BeamLayer(np.ascontiguousarray(weight[:, :self.input_dim].T),
                                        linear.bias.numpy().copy(), tables, out))
        return layers

    def prefix_log_probs(self, x: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        """:meth:`layer_log_probs` for several prefixes of each user: x (N, input_dim), prefix
        (N, kept, d) → (N, kept, K). The first linear map is split as W_x x + Σ_i W_i e_i(c_i)
        + b, so the x part (most of the input) is computed once per user, not once per prefix."""
        n, kept, d = prefix.shape
        layer = self.layers[d]
        linear = layer if isinstance(layer, nn.Linear) else layer[0]
        weight = linear.weight
        pre = (x @ weight[:, :self.input_dim].T + linear.bias)[:, None, :]
        node_dim = self.node_emb[0].embedding_dim if d else 0
        for i in range(d):
            cols = slice(self.input_dim + i * node_dim, self.input_dim + (i + 1) * node_dim)
            pre = pre + self.node_emb[i](prefix[:, :, i]) @ weight[:, cols].T
        if not isinstance(layer, nn.Linear):
            pre = layer[2](layer[1](pre))
        return torch.log_softmax(pre, dim=-1).expand(n, kept, self.width)  # d = 0: one row

    def log_prob(self, x: torch.Tensor, paths: torch.Tensor) -> torch.Tensor:
        """log p(c | x) = Σ_d log p(c_d | x, c_<d); x (B, input_dim), paths (B, …, D) → (B, …)."""
        x = torch.as_tensor(x, dtype=torch.float32)
        paths = torch.as_tensor(paths, dtype=torch.long)
        batch, depth = paths.shape[0], paths.shape[-1]
        flat = paths.reshape(batch, -1, depth)
        total = torch.zeros(flat.shape[:2], dtype=x.dtype)
        for d in range(depth):
            logp = self.prefix_log_probs(x, flat[:, :, :d])
            total = total + logp.gather(2, flat[:, :, d:d + 1]).squeeze(2)
        return total.reshape(paths.shape[:-1])


@dataclass(frozen=True)
class BeamLayer:
    """One level of a :class:`StructureModel` as arrays (:meth:`StructureModel.beam_layers`):
    logits = x @ x_weight + bias + Σ_i node_tables[i][c_i], then, with a hidden layer,
    relu(·) @ out[0] + out[1]."""

    x_weight: np.ndarray
    bias: np.ndarray
    node_tables: tuple[np.ndarray, ...]
    out: tuple[np.ndarray, np.ndarray] | None

    def log_probs(self, x: np.ndarray, prefix: np.ndarray) -> np.ndarray:
        """log p(c_d = · | x, prefix) for every kept prefix: x (n, in), prefix (n, kept, d) →
        (n, kept, K), float32 like the torch model."""
        pre = (x @ self.x_weight + self.bias)[:, None, :]
        if self.node_tables:
            pre = pre + self.node_tables[0][prefix[:, :, 0]]
        for i, table in enumerate(self.node_tables[1:], 1):
            pre += table[prefix[:, :, i]]
        if self.out is not None:
            pre = np.maximum(pre, 0.0) @ self.out[0] + self.out[1]
        # torch's fused log-softmax, on the same memory: a third of numpy's max, exp, sum, log
        return torch.log_softmax(torch.from_numpy(pre), dim=-1).numpy()


def beam_search(model: StructureModel, x: np.ndarray, beam: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``beam`` most probable paths for each row of x, best first (DR Alg. 1).

    Each layer expands every kept prefix by its K children and keeps the best ``beam`` of the
    K·beam candidates, for all users at once. Scores accumulate in float64 so ties from float32
    rounding do not reorder paths across layers; equal scores keep the better parent prefix,
    then the smaller node. Runs in numpy on the model's arrays (:meth:`StructureModel.beam_layers`):
    it is a quarter of a learning step, and torch's broadcast adds and top-k over the K·beam
    candidates cost about twice numpy's here.

    Selecting the best ``beam`` of the K·beam candidates sorts only the few above the
    ``beam``-th best (:func:`_top_candidates`).

    Returns ``(codes (n, b) int64, log_probs (n, b) float64)`` with b = min(beam, K^D): with
    ``beam >= K^D`` nothing is ever pruned, so the result is the exhaustive ranking of all paths.

    >>> model = StructureModel(input_dim=2, width=3, depth=2)
    >>> codes, logp = beam_search(model, np.zeros((1, 2)), beam=9)
    >>> sorted(codes[0].tolist()) == list(range(9)), bool(np.isclose(np.exp(logp).sum(), 1.0))
    (True, True)
    """
    width = model.width
    x = np.asarray(x, dtype=np.float32).reshape(-1, model.input_dim)
    n = len(x)
    if n == 0:
        b = min(beam, width ** model.depth)
        return np.zeros((0, b), dtype=np.int64), np.zeros((0, b))
    scores = np.zeros((n, 1))
    prefix = np.zeros((n, 1, 0), dtype=np.int64)
    users = np.arange(n)[:, None]
    for layer in model.beam_layers():
        logp = layer.log_probs(x, prefix)
        idx, scores = _top_candidates(scores, logp, beam)
        prefix = np.concatenate([prefix[users, idx // width], (idx % width)[:, :, None]], axis=2)
    return encode_paths(prefix, width), scores


def _top_candidates(scores: np.ndarray, logp: np.ndarray, beam: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """The best ``beam`` of the candidates scores[u, p] + logp[u, p, c] of each user, as flat
    indices p·K + c (n, b) and float64 scores (n, b), best first; ties by smaller index.

    The ``beam``-th best score is found in float32 by a partition (no sort) and lowered by a
    margin far above float32 rounding (a relative 10⁻⁵ against about 10⁻⁷); only the
    candidates above it, ``beam`` and the rare near ties, are scored in float64 and sorted."""
    n, kept, width = logp.shape
    total = kept * width
    b = min(beam, total)
    approx = (scores.astype(np.float32)[:, :, None] + logp).reshape(n, total)
    flat = None
    if b < total:
        floor = np.partition(approx, total - b, axis=1)[:, total - b]
        floor = floor - 1e-5 * (1.0 + np.abs(floor))
        flat = np.flatnonzero(approx >= floor[:, None])
        if np.bincount(flat // total, minlength=n).min(initial=b) < b:  # NaN: take them all
            flat = None
    if flat is None:
        flat = np.arange(n * total)
    user, index = np.divmod(flat, total)
    value = scores[user, index // width] + logp.reshape(-1)[flat].astype(np.float64)
    counts = np.bincount(user, minlength=n)
    slot = np.arange(flat.size) - np.repeat(np.cumsum(counts) - counts, counts)
    values = np.full((n, int(counts.max(initial=0))), -np.inf)
    indices = np.zeros(values.shape, dtype=np.int64)
    values[user, slot], indices[user, slot] = value, index
    order = np.argsort(-values, axis=1, kind="stable")[:, :b]  # flat is index-ordered
    return np.take_along_axis(indices, order, axis=1), np.take_along_axis(values, order, axis=1)


def multi_path_loss(model: StructureModel, x: torch.Tensor | np.ndarray,
                    item_paths: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Mean over the batch of −log Σ_j p(π_j | x), the E-step objective (DR §2.1, multi-path).

    ``item_paths`` is (B, J, D) node indices, or (B, J) int64 codes. A path listed twice for one
    item counts once and ``-1`` paths are ignored, so padding never inflates p. x is detached:
    the structure model must not train the user embedding.
    """
    x = torch.as_tensor(x, dtype=torch.float32).detach()
    paths = torch.as_tensor(item_paths, dtype=torch.long)
    if paths.dim() == 2:
        paths = torch.as_tensor(decode_paths(paths.numpy(), model.width, model.depth))
    same = (paths[:, :, None, :] == paths[:, None, :, :]).all(dim=-1)
    earlier = torch.tril(torch.ones(paths.shape[1], paths.shape[1], dtype=torch.bool), -1)
    skip = (same & earlier).any(dim=-1) | (paths < 0).any(dim=-1)
    logp = model.log_prob(x, paths.clamp(min=0)).masked_fill(skip, -math.inf)
    return -torch.logsumexp(logp, dim=1).mean()


@dataclass(frozen=True)
class MStepResult:
    """New (n, J) assignment and the path-size statistics it produces."""

    assignment: np.ndarray
    largest_path: int
    nonempty_paths: int
    seconds: float
    items_updated: int = 0


def _path_sizes(assignment: np.ndarray) -> dict[int, int]:
    """|c| for every nonempty path; an item on a path twice counts once."""
    pairs = np.unique(np.stack([np.repeat(np.arange(len(assignment)), assignment.shape[1]),
                                assignment.ravel()], axis=1), axis=0)
    codes, counts = np.unique(pairs[pairs[:, 1] >= 0, 1], return_counts=True)
    return dict(zip(codes.tolist(), counts.tolist()))


def _pick_paths(codes: list, scores: list, n_v: float, j_paths: int, alpha: float,
                sizes: dict) -> list:
    """Greedy J picks for one item by the paper's incremental gain (DR §3, Alg. 2).

    f(n+1) − f(n) = ((n+1)⁴ − n⁴)/4 = n³ + 1.5n² + n + 0.25, written out to stay in floats.
    """
    picked: list = []
    total = FIRST_PICK_EPS
    log1p, get = math.log1p, sizes.get
    for _ in range(j_paths):
        best, best_gain, best_s = -1, -math.inf, 0.0
        for c, s in zip(codes, scores):
            if c < 0 or c in picked:
                continue
            n = get(c, 0)
            gain = n_v * log1p(s / total) - alpha * (((n + 1.5) * n + 1.0) * n + 0.25)
            if gain > best_gain:
                best, best_gain, best_s = c, gain, s
        if best < 0:
            break
        picked.append(best)
        sizes[best] = get(best, 0) + 1
        total += best_s
    return picked


def _decayed_count(pairs: np.ndarray, eta: float) -> np.ndarray:
    """N_v of ``pairs`` unit pairs, each decayed by η per later one: Σ_{k<N} η^k."""
    return pairs if eta == 1.0 else (1.0 - eta ** pairs) / (1.0 - eta)


def m_step(path_codes: np.ndarray, path_scores: np.ndarray, counts: np.ndarray,
           current: np.ndarray, J: int, penalty: float, passes: int = 3,
           chunk: int = 8192, stop: Callable[[], bool] | None = None) -> MStepResult:
    """Penalized coordinate descent over item → path assignments (DR §3, Alg. 2).

    For each pass and each item with a positive score: its old paths leave the size counts, then
    J paths are picked one by one among its S candidates by the gain
    N_v [log(Σ_prev + s[v, c]) − log Σ_prev] − α [f(|c|+1) − f(|c|)], f(x) = x⁴/4, each pick
    entering the size counts at once (so later items see it).

    Σ_prev starts at ε = ``FIRST_PICK_EPS`` instead of 0 so that the first gain is finite. The
    ε term is then N_v log((ε + s)/ε) = N_v log(ε + s) − N_v log ε, and the constant −N_v log ε
    is the same for every candidate, so the first pick maximizes N_v log s − α Δf exactly as the
    single-path objective does; ε only floors log s for vanishing scores.

    An item whose candidates run out before J picks keeps its first pick in the empty slots (the
    duplicate is one path: it counts once in |c| and in the loss). Items without a positive score
    keep their paths. The per-item work is a short Python loop over S candidates; rows are turned
    into Python lists a ``chunk`` at a time to bound memory. ``stop`` is asked before each
    chunk (a few tenths of a second): true, the descent ends with :class:`MStepStopped`, so a
    worker that stops does not wait minutes for it.

    >>> codes = np.array([[4, 7, -1], [4, 7, -1]]); scores = np.array([[2., 1., 0.], [2., 1., 0.]])
    >>> m_step(codes, scores, np.ones(2), np.zeros((2, 1), np.int64), 1, 10.0).assignment.ravel()
    array([4, 7])
    """
    start = time.perf_counter()
    assignment = np.array(current, dtype=np.int64, copy=True)
    sizes = _path_sizes(assignment)
    rows = np.flatnonzero((np.asarray(path_scores) > 0).any(axis=1))
    counts = np.asarray(counts, dtype=np.float64)
    for _ in range(passes):
        for lo in range(0, rows.size, chunk):
            if stop is not None and stop():
                raise MStepStopped(f"stopped after {lo} of {rows.size} items of a pass")
            block = rows[lo:lo + chunk]
            _descend_block(block, path_codes[block].tolist(), path_scores[block].tolist(),
                           counts[block].tolist(), assignment, J, penalty, sizes)
    nonempty = {c: n for c, n in sizes.items() if n > 0}
    return MStepResult(assignment, max(nonempty.values(), default=0), len(nonempty),
                       time.perf_counter() - start, int(rows.size))


class MStepStopped(Exception):
    """An M-step given up because its process stops (:func:`m_step`'s ``stop``)."""


def _descend_block(block: np.ndarray, codes: list, scores: list, counts: list,
                   assignment: np.ndarray, J: int, penalty: float, sizes: dict) -> None:
    """Coordinate steps for one chunk of items, in row order, updating ``sizes`` in place."""
    old_rows = assignment[block].tolist()
    new_rows = []
    for old, c_row, s_row, n_v in zip(old_rows, codes, scores, counts):
        for c in set(old):
            if c >= 0:
                sizes[c] -= 1
        picked = _pick_paths(c_row, s_row, n_v, J, penalty, sizes)
        if not picked:
            picked = old
            for c in set(old):
                if c >= 0:
                    sizes[c] += 1
        new_rows.append(picked + [picked[0]] * (J - len(picked)))
    assignment[block] = np.asarray(new_rows, dtype=np.int64).reshape(len(block), J)


@dataclass(frozen=True)
class MStepSnapshot:
    """The M-step's inputs for the first ``n`` items, copied on the learn thread."""

    n: int
    codes: np.ndarray
    scores: np.ndarray
    counts: np.ndarray
    assignment: np.ndarray
    # the stream's pairs and the time at the snapshot: the marks of the last M-step once it
    # is installed (or failed), not before (a checkpoint of one under way keeps the earlier)
    pairs: int = 0
    at: float = 0.0


@dataclass(frozen=True)
class _Serving:
    """What retrieval reads, swapped as one reference: the last built index, the items assigned
    since (path code → rows, for new items only) and the id list."""

    index: PathIndex
    pending: dict
    ids: list


class DeepRetrieval:
    """Structure model, path scores, assignment and inverted index of one learn partition.

    Writes (``learn``, ``assign_new``, ``run_m_step``, ``load``) come from one thread. Reads
    (``retrieve``) may run concurrently: they read the serving snapshot once, and a rebuilt index
    replaces it in one assignment. They never create state (an unknown x just finds paths).
    A read during an optimizer step may see partly updated weights, which only perturbs scores.
    """

    STATE_FILE = "dr_state.npz"

    def __init__(self, config: DRConfig, *, track_scores: bool = True) -> None:
        """``track_scores=False``: an instance that only serves (a worker following a learner
        process): no path scores (S codes and scores per item, 256 MB per million items at
        the defaults), so it neither learns nor runs M-steps nor saves."""
        self.config = config
        self.model = StructureModel(config.input_dim, config.width, config.depth,
                                    config.node_dim, config.hidden, config.seed)
        self.tracker = (PathScoreTracker(config.top_s, config.decay ** config.track_every)
                        if track_scores else None)
        self.optimizer = self._adam()
        self._pairs_learned = 0  # the stream position that picks the tracked pairs
        # the pairs learned and the time when the last M-step took its snapshot: saved, so a
        # worker restarted more often than the M-step interval still runs M-steps
        self.m_step_pairs, self.m_step_at = 0, time.time()
        self._row: dict[str, int] = {}
        self._ids: list[str] = []
        self._counts = np.zeros(1024, dtype=np.float64)
        self._assign = np.full((1024, config.paths_per_item), EMPTY, dtype=np.int64)
        self._serving = _Serving(PathIndex.build(self._assign[:0]), {}, self._ids)
        self._m_steps = 0
        self._last_m_step_seconds = 0.0
        self._last_loss = math.nan
        #: how :meth:`save` writes: the items whose counts, paths or scores moved since the last
        #: save (a delta), noted in ``_rows_changed``, or all of them
        self.checkpoints = ChainWriter()
        self._rows_changed = np.zeros(0, dtype=bool)

    # ---- state access -------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._ids)

    @property
    def assignment(self) -> np.ndarray:
        """Current (n, J) path codes of every item (a read-only view)."""
        view = self._assign[:len(self._ids)]
        view = view.view()
        view.setflags(write=False)
        return view

    @property
    def counts(self) -> np.ndarray:
        return self._counts[:len(self._ids)].copy()

    def rows_of(self, item_ids: Sequence[str]) -> np.ndarray:
        """Rows of known ids (-1 for unknown ones); creates nothing."""
        return np.array([self._row.get(i, -1) for i in item_ids], dtype=np.int64)

    @property
    def stats(self) -> dict:
        """Read at every metrics scrape: the sizes come from the built index plus the few items
        pending beside it (rows appended since are on no indexed row), never from a pass over
        the whole assignment."""
        serving = self._serving
        pending = list(serving.pending.items())  # one C-level copy: the learn thread appends
        codes = np.array([code for code, _ in pending], dtype=np.int64)
        added = np.array([len(rows) for _, rows in pending], dtype=np.int64)
        _, indexed = serving.index.spans(codes)
        return {
            "items": len(self._ids),
            "nonempty_paths": serving.index.nonempty_paths + int((indexed == 0).sum()),
            "largest_path": max(serving.index.largest_path,
                                int((indexed + added).max(initial=0))),
            "m_steps": self._m_steps,
            "last_m_step_seconds": self._last_m_step_seconds,
            "last_loss": self._last_loss,
        }

    # ---- learning -----------------------------------------------------------------------
    def learn(self, x: np.ndarray, item_ids: Sequence[str], counts_weight=None) -> float:
        """One E-step micro-batch of (x_u, item) pairs; returns the loss before the step.

        New items get paths first (:meth:`assign_new`), one Adam step lowers
        −log Σ_j p(π_j(v) | x) on the items' current paths, then each pair's top-S beam paths
        with probabilities p(c | x) (not logs: s[v, c] is a sum of probabilities) are merged into
        the item's tracked scores (the pairs :meth:`_tracked_pairs` picks: all of them with
        ``track_every`` 1), and N_v takes the pair's weight (default 1), decayed as the scores
        are (:meth:`_count_pairs`).
        """
        self._tracking()
        x = np.asarray(x, dtype=np.float32).reshape(len(item_ids), self.config.input_dim)
        if not len(x):
            return float("nan")
        if not np.isfinite(x).all():  # one such row turns every weight to NaN for good
            raise ValueError("user vectors must be finite")
        cfg = self.config
        rows = self.assign_new(item_ids, x=x if cfg.new_item_paths == "beam" else None)
        self._note_rows(rows)
        paths = decode_paths(self._assign[rows], cfg.width, cfg.depth)
        self.optimizer.zero_grad()
        loss = multi_path_loss(self.model, torch.from_numpy(x), paths)
        loss.backward()
        self.optimizer.step()
        tracked = self._tracked_pairs(rows)
        if len(tracked):
            codes, logp = beam_search(self.model, x[tracked], cfg.top_s)
            self.tracker.update_many(rows[tracked], codes, np.exp(logp))
        weight = np.ones(len(rows)) if counts_weight is None else np.asarray(counts_weight, float)
        self._count_pairs(rows, np.broadcast_to(weight, rows.shape))
        self._last_loss = float(loss.detach())
        return self._last_loss

    def _count_pairs(self, rows: np.ndarray, weights: np.ndarray) -> None:
        """Add the pairs of ``rows`` (in stream order) to N_v, each earlier pair of the item
        decayed by η per later one: N_v = Σ_k w_k η^(the item's pairs since k), the pairs the
        tracked scores s[v, c] still hold (they decay by η^track_every per tracked pair, η
        per pair on average). The M-step weighs N_v·log(1 + s/Σ_prev) against the penalty
        of a path's size; a lifetime count grew without bound on a long stream while the
        scores kept a horizon of 1/(1 − η) pairs, and the size at which the penalty stops a
        popular item's paths from growing rose as N_v^(1/3) week after week."""
        eta = self.config.decay
        order = np.argsort(rows, kind="stable")
        items, first, pairs = np.unique(rows[order], return_index=True, return_counts=True)
        # each pair's place in its item's run of the batch: how many of the item's come after
        later = np.repeat(first + pairs, pairs) - 1 - np.arange(len(rows))
        added = np.add.reduceat(weights[order] * eta ** later, first) if len(rows) else 0.0
        self._counts[items] = self._counts[items] * eta ** pairs + added

    def _tracked_pairs(self, rows: np.ndarray) -> np.ndarray:
        """Positions in a batch of pairs (their items' ``rows``) to track: those whose stream
        position is a multiple of ``track_every``, and those whose item had no tracked score
        before the batch. The stream position advances by the batch."""
        every, first = self.config.track_every, self._pairs_learned
        self._pairs_learned += len(rows)
        if every == 1:
            return np.arange(len(rows))
        sampled = (first + np.arange(len(rows))) % every == 0
        unscored = self.tracker.codes[rows, 0] == EMPTY
        return np.flatnonzero(sampled | unscored)

    def assign_new(self, item_ids: Sequence[str], x: np.ndarray | None = None,
                   near: NearFn | None = None) -> np.ndarray:
        """Give J paths to every id not seen before and return the rows of all ``item_ids``.

        A new item copies the paths of ``near(item_id)`` when that returns a known id (e.g. its
        nearest neighbour by embedding); otherwise it takes the J most probable paths of the first
        x it is met with (``x`` row-aligned with ``item_ids``); without either, J distinct seeded
        random paths. Its paths enter the serving index at once, so the item is retrievable by
        users like the one it was met with before the next M-step ever scores it.
        """
        fresh = self._unknown(item_ids)
        if fresh:
            self._append(list(fresh), self._initial_paths(fresh, x, near))
        return np.array([self._row[i] for i in item_ids], dtype=np.int64)

    def structure_weights(self) -> dict[str, np.ndarray]:
        """A copy of the structure model's parameters (about 0.1 MB at the defaults), for a
        follower that serves with them (:meth:`set_structure_weights`)."""
        return {name: value.detach().numpy().copy()
                for name, value in self.model.state_dict().items()}

    def set_structure_weights(self, weights: dict[str, np.ndarray]) -> None:
        self.model.load_state_dict({name: torch.from_numpy(np.asarray(value))
                                    for name, value in weights.items()})

    def items_since(self, first_row: int) -> tuple[list[str], np.ndarray]:
        """The ids of rows ``first_row`` on and their paths (n, J): the items a follower has
        not been given yet (:meth:`add_items`)."""
        return self._ids[first_row:], self._assign[first_row:len(self._ids)].copy()

    def add_items(self, item_ids: Sequence[str], paths: np.ndarray) -> None:
        """Give ids not seen before the paths another instance gave them (a follower taking
        the items its learner met); known ids keep their own. Retrievable at once, like
        :meth:`assign_new`'s."""
        fresh = self._unknown(item_ids)
        if fresh:
            self._append(list(fresh), np.asarray(paths, dtype=np.int64)[list(fresh.values())])

    def _unknown(self, item_ids: Sequence[str]) -> dict[str, int]:
        """Ids not seen before → their first position in ``item_ids``."""
        fresh: dict[str, int] = {}
        for pos, item in enumerate(item_ids):
            if item not in self._row and item not in fresh:
                fresh[item] = pos
        return fresh

    def _tracking(self) -> None:
        if self.tracker is None:
            raise TypeError("this DeepRetrieval only serves (track_scores=False)")

    def _initial_paths(self, fresh: dict[str, int], x: np.ndarray | None,
                       near: NearFn | None) -> np.ndarray:
        cfg = self.config
        J = cfg.paths_per_item
        paths = np.full((len(fresh), J), EMPTY, dtype=np.int64)
        todo = np.ones(len(fresh), dtype=bool)
        if near is not None:
            for k, item in enumerate(fresh):
                other = near(item)
                if other is not None and other in self._row:
                    paths[k] = self._assign[self._row[other]]
                    todo[k] = False
        if x is not None and todo.any():
            where = np.array(list(fresh.values()))[todo]
            codes, _ = beam_search(self.model, np.asarray(x)[where], J)
            paths[todo, :codes.shape[1]] = codes
            paths[todo, codes.shape[1]:] = codes[:, :1]
            todo[:] = False
        n_paths = cfg.width ** cfg.depth
        for k, item in enumerate(fresh):
            if todo[k]:  # seeded by the id: the same paths whatever the arrival order
                key = int.from_bytes(hashlib.blake2b(item.encode(), digest_size=8).digest(),
                                     "little")
                rng = np.random.default_rng([cfg.seed, key])
                paths[k] = rng.choice(n_paths, size=J, replace=J > n_paths)
        return paths

    def _append(self, ids: list[str], paths: np.ndarray) -> None:
        start, end = len(self._ids), len(self._ids) + len(ids)
        if end > len(self._assign):
            cap = max(end, 2 * len(self._assign))
            assign = np.full((cap, self.config.paths_per_item), EMPTY, dtype=np.int64)
            assign[:start] = self._assign[:start]
            self._assign = assign
            self._counts = np.concatenate([self._counts, np.zeros(cap - len(self._counts))])
        self._assign[start:end] = paths
        self._counts[start:end] = 0.0
        if self.tracker is not None:
            self.tracker.grow(end)
        self._ids.extend(ids)  # before the pending rows that name them: readers index ids
        serving = self._serving
        for row, item in enumerate(ids, start):
            self._row[item] = row
            for code in set(paths[row - start].tolist()):
                serving.pending.setdefault(code, []).append(row)
        if end - serving.index.assignment.shape[0] > max(256, end // 8):
            self._rebuild_index()

    def _rebuild_index(self) -> None:
        """Fold the pending items into a fresh index, built aside and swapped in one step."""
        index = PathIndex.build(self._assign[:len(self._ids)])
        self._serving = _Serving(index, {}, self._ids)

    def run_m_step(self) -> MStepResult:
        """Reassign every scored item's paths (:func:`m_step`), then swap in the new index."""
        snapshot = self.m_step_snapshot()
        result = self.compute_m_step(snapshot)
        self.install_m_step(snapshot, result)
        return result

    def m_step_snapshot(self, now: float | None = None) -> MStepSnapshot:
        """Copies of what the M-step reads, so it can run on another thread while learning goes
        on (learn thread; O(n·S) copies). ``now``: the M-step's start (default: the clock)."""
        self._tracking()
        n = len(self._ids)
        return MStepSnapshot(n, self.tracker.codes.copy(), self.tracker.scores.copy(),
                             self._counts[:n].copy(), self._assign[:n].copy(),
                             self._pairs_learned, time.time() if now is None else now)

    def m_step_ended(self, snapshot: MStepSnapshot) -> None:
        """Count the M-step of ``snapshot`` as the last one (installed, or failed: the next
        waits for the policy as after one that ran). One stopped before its end is not
        counted: a checkpoint then keeps the marks of the one before, and a restarted worker
        runs it again when due, rather than an interval after a reassignment it never made."""
        self.m_step_pairs, self.m_step_at = snapshot.pairs, snapshot.at

    @property
    def pairs_since_m_step(self) -> int:
        """Pairs learned since the snapshot of the last M-step that ended."""
        return self._pairs_learned - self.m_step_pairs

    def compute_m_step(self, snapshot: MStepSnapshot,
                       stop: Callable[[], bool] | None = None) -> MStepResult:
        """The coordinate descent on a snapshot; touches no state, so any thread may run it
        (``stop``: see :func:`m_step`)."""
        cfg = self.config
        return m_step(snapshot.codes, snapshot.scores, snapshot.counts, snapshot.assignment,
                      cfg.paths_per_item, cfg.penalty, cfg.mstep_passes, stop=stop)

    def install_m_step(self, snapshot: MStepSnapshot, result: MStepResult) -> None:
        """Take the new paths of the snapshot's items and swap in a rebuilt index (learn thread).

        Items added after the snapshot keep the paths they were given on arrival; only an M-step
        changes an existing item's paths, so nothing else can have moved meanwhile.
        """
        assign = self._assign.copy()
        assign[:snapshot.n] = result.assignment
        self._note_rows(np.flatnonzero((assign[:snapshot.n] != self._assign[:snapshot.n])
                                       .any(axis=1)))
        index = PathIndex.build(assign[:len(self._ids)])
        self._assign, self._serving = assign, _Serving(index, {}, self._ids)
        self.m_step_ended(snapshot)
        self._m_steps += 1
        self._last_m_step_seconds = result.seconds

    # ---- retrieval ----------------------------------------------------------------------
    def retrieve(self, x: np.ndarray, beam: int | None = None) -> list[str]:
        """Items on the beam's paths for one user vector, deduplicated, best path first."""
        return self.retrieve_many(np.asarray(x).reshape(1, -1), beam)[0]

    def retrieve_many(self, X: np.ndarray, beam: int | None = None) -> list[list[str]]:
        """:meth:`retrieve` for a batch of user vectors, with one batched beam search."""
        serving = self._serving
        if not serving.ids:
            return [[] for _ in range(len(X))]
        codes, _ = beam_search(self.model, np.asarray(X), beam or self.config.beam)
        return [self._items_of(serving, row) for row in codes]

    def items_on_paths(self, codes: np.ndarray) -> list[str]:
        """The items the serving structure holds on ``codes`` (the pending new items included),
        deduplicated, in the order of the codes."""
        return self._items_of(self._serving, np.asarray(codes, dtype=np.int64))

    @staticmethod
    def _items_of(serving: _Serving, codes: np.ndarray) -> list[str]:
        rows, sizes = serving.index.items_on(codes)
        if serving.pending:
            parts = np.split(rows, np.cumsum(sizes)[:-1])
            ordered: list[int] = []
            for code, part in zip(codes.tolist(), parts):
                ordered.extend(part.tolist())
                ordered.extend(serving.pending.get(code, ()))
        else:
            ordered = rows.tolist()
        ids = serving.ids
        return [ids[r] for r in dict.fromkeys(ordered)]

    # ---- checkpoints --------------------------------------------------------------------
    def save(self, directory: Path, *, scores: bool = True) -> None:
        """Write the structure model's weights and the arrays as the checkpoint in
        ``directory``: the items whose counts, paths or scores moved since the last save there
        (a delta), or all of them (a base), beside the weights and the ids in the head file,
        replaced last (:mod:`state.delta_checkpoint`). A reader (a worker reading the paths
        its learner saved, for seconds at a million items) has the weights of the arrays it
        read. The Adam moments are not saved: after a reload the optimizer restarts cold,
        which only changes the size of the first steps.

        Checkpoints written before kept the weights in a file of their own that the npz named
        (``dr_model.<generation>.pt``); a save removes those, and :meth:`load` still reads
        them. Without ``scores``, the tracked path scores are left out (a quarter of a GB at a
        million items) and the file is written whole: for a reader that only serves, which
        does not read them.
        """
        self._tracking()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        n = len(self._ids)
        items = {"counts": self._counts, "assignment": self._assign,
                 **({"codes": self.tracker.codes, "scores": self.tracker.scores} if scores
                    else {})}
        whole = {
            **ids_to_arrays(self._ids),
            **{WEIGHTS_PREFIX + name: value
               for name, value in self.structure_weights().items()},
            "meta": np.array(json.dumps({"config": asdict(self.config), "m_steps": self._m_steps,
                                         "counts": "decayed",
                                         "pairs_learned": self._pairs_learned,
                                         "m_step_pairs": self.m_step_pairs,
                                         "m_step_at": self.m_step_at}),
                             dtype=np.str_),
        }
        if scores:
            changed = np.flatnonzero(self._rows_changed[:n])
            self.checkpoints.save(directory / self.STATE_FILE,
                                   {"items": Table(items, n, changed)}, whole)
            self._rows_changed[:] = False
        else:
            save_npz(directory / self.STATE_FILE,
                     {**{name: array[:n] for name, array in items.items()}, **whole})
        for old in directory.glob("dr_model.*.pt*"):  # older checkpoints' weights
            old.unlink(missing_ok=True)

    def _note_rows(self, rows: np.ndarray) -> None:
        """Items whose counts, paths or scores are written: the next save writes them."""
        self._rows_changed = mark_rows(self._rows_changed, rows, len(self._assign))

    def load(self, directory: Path) -> bool:
        """Restore a checkpoint written by :meth:`save`; False when there is none.

        Raises ValueError when the checkpoint was written with a different shape of model.
        """
        state_path = Path(directory) / self.STATE_FILE
        skipped = () if self.tracker is not None else ("codes", "scores")
        arrays = load_checkpoint(state_path, skip=skipped)
        if arrays is None:
            return False
        meta = json.loads(str(arrays["meta"]))
        shape_keys = ("input_dim", "width", "depth", "paths_per_item", "top_s", "node_dim",
                      "hidden")
        mine = asdict(self.config)
        if any(meta["config"][k] != mine[k] for k in shape_keys):
            raise ValueError(f"checkpoint config {meta['config']} does not fit {mine}")
        weights = self._saved_weights(Path(directory), arrays, meta)
        if weights is None:
            return False
        ids = ids_from_arrays(arrays, where=f"Deep Retrieval's {self.STATE_FILE}")
        if self.tracker is not None and not {"codes", "scores"} <= arrays.keys():
            raise DamagedCheckpoint(f"Deep Retrieval's {state_path} holds no path scores (it "
                                    "was written for serving), which learning needs")
        expected = {name: tuple(value.shape) for name, value in self.model.state_dict().items()}
        if {name: tuple(value.shape) for name, value in weights.items()} != expected:
            raise DamagedCheckpoint(f"Deep Retrieval's {state_path} does not hold this "
                                    f"structure model's weights")  # checked before any change
        self.model.load_state_dict(weights)
        self.optimizer = self._adam()  # cold moments (see save)
        self._install(ids, arrays, meta)
        self._rows_changed = np.zeros(0, dtype=bool)
        self.checkpoints.continue_from(state_path, arrays)  # its next save: a delta of it
        return True

    @staticmethod
    def _saved_weights(directory: Path, arrays: dict, meta: dict) -> dict | None:
        """The structure model's weights a checkpoint holds, or those of the file an older
        checkpoint names (None where that file is gone: saves since removed it)."""
        weights = {key[len(WEIGHTS_PREFIX):]: torch.from_numpy(value)
                   for key, value in arrays.items() if key.startswith(WEIGHTS_PREFIX)}
        if weights or "model_file" not in meta:
            return weights
        try:
            return torch.load(directory / meta["model_file"], weights_only=True)
        except FileNotFoundError:
            return None

    def _adam(self) -> torch.optim.Adam | None:
        """Adam over the structure model, fused: one kernel for all parameters (0.24 ms a step
        against 0.85 ms for torch's default per-tensor loop on this model; the same update up to
        float32 rounding, 2e-7 after 100 steps). None for an instance that only serves: torch's
        first optimizer imports its compiler (about 1 s and 70 MB), which a worker's event loop
        and each path read aside would otherwise pay for an optimizer they never step."""
        if self.tracker is None:
            return None
        return torch.optim.Adam(self.model.parameters(), lr=self.config.lr, fused=True)

    def _install(self, ids: list[str], arrays: dict, meta: dict) -> None:
        n = len(ids)
        self._assign = np.full((max(n, 1024), self.config.paths_per_item), EMPTY, np.int64)
        self._assign[:n] = arrays["assignment"]
        self._counts = np.zeros(max(n, 1024))
        self._counts[:n] = arrays["counts"]
        if meta.get("counts") != "decayed":  # older checkpoints: lifetime counts of unit pairs
            self._counts[:n] = _decayed_count(self._counts[:n], self.config.decay)
        if self.tracker is not None:
            self.tracker.load_arrays(arrays["codes"], arrays["scores"])
        self._ids = ids
        self._row = {item: row for row, item in enumerate(ids)}
        self._m_steps = int(meta["m_steps"])
        self._pairs_learned = int(meta.get("pairs_learned", 0))  # older checkpoints: restart
        self.m_step_pairs = int(meta.get("m_step_pairs", self._pairs_learned))  # older: now
        self.m_step_at = float(meta.get("m_step_at", time.time()))
        self._serving = _Serving(PathIndex.build(self._assign[:n]), {}, self._ids)
