"""Streaming Gramians for the all-pairs loss (Rendle §5.1.1, §5.1.3).

- :class:`ExactGramian` holds G_I = Σ_i ψ̃ψ̃ᵀ over the item rows. The learner owns every item row,
  so it knows a row's old and new value and can keep G_I exact with a rank-k correction per
  micro-batch; :meth:`ExactGramian.recompute` bounds the floating-point drift of that recursion
  and measures it.
- :class:`DecayedGramian` estimates G_C = Σ_u φ̃φ̃ᵀ over users. User vectors are recomputed from
  moving item vectors and users come and go, so there is no old value to subtract; the estimate
  is an exponential moving average over the stream of user vectors instead (Rendle eq. 41,
  Krichene et al.'s SOGram).

Both persist to npz without pickle and write atomically (tmp file + ``os.replace``).
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np


class DamagedCheckpoint(ValueError):
    """A checkpoint file that exists but does not read (cut short, overwritten)."""


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` to an npz atomically: a reader sees the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda handle: np.savez(handle, **arrays))


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """``write(file)`` into a temp file beside ``path``, on the disk, then renamed over
    ``path`` (and the rename on the disk): a reader sees the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            write_through(handle)
        os.replace(tmp, path)
    except BaseException:  # a full disk: its part is not left to fill it further
        tmp.unlink(missing_ok=True)
        raise
    sync_folder(path.parent)


def write_through(handle) -> None:
    """The file's bytes on the disk before it is renamed into place: after a power loss a
    rename can otherwise survive without the data, an empty file where the last good one
    was."""
    handle.flush()
    os.fsync(handle.fileno())


def sync_folder(folder: Path) -> None:
    """The folder's entries (a rename into it) on the disk."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def load_npz(path: Path, skip: Collection[str] = ()) -> dict[str, np.ndarray] | None:
    """The arrays of an npz but those named in ``skip`` (never unpickling anything); None if
    there is no file; a file that does not read raises :class:`DamagedCheckpoint`, naming
    it."""
    path = Path(path)
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):  # one array (.npy), not an npz
            raise ValueError(f"one array of shape {np.shape(data)}, not an npz archive")
        with data:
            return {key: data[key] for key in data.files if key not in skip}
    except FileNotFoundError:
        return None
    except (ValueError, EOFError, OSError, zipfile.BadZipFile) as error:
        raise DamagedCheckpoint(f"{path} does not read ({error!r}): restore it, or remove it "
                                "to start that part of the model empty") from error


def ids_to_arrays(ids: Sequence[str], name: str = "ids") -> dict[str, np.ndarray]:
    """Ids for an npz, as two arrays: their UTF-8 bytes end to end (``NAME_utf8``) and where
    each ends (``NAME_ends``). Not one numpy string array: that gives every id the width of
    the longest, at 4 bytes a character, so one id of 227 characters among a million of 10
    made a checkpoint of 916 MB instead of 48 MB, written on the event loop every 30 s."""
    blob = "".join(ids).encode("utf-8", "surrogatepass")
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    if len(blob) != lengths.sum():  # not all ASCII: a character may take 2 to 4 bytes
        lengths = np.fromiter((len(item.encode("utf-8", "surrogatepass")) for item in ids),
                              dtype=np.int64, count=len(ids))
    return {f"{name}_utf8": np.frombuffer(blob, dtype=np.uint8),
            f"{name}_ends": np.cumsum(lengths, dtype=np.int64)}


def ids_from_arrays(data: Mapping[str, np.ndarray], name: str = "ids",
                    where: object = "a checkpoint") -> list[str]:
    """The ids :func:`ids_to_arrays` wrote, or those of a checkpoint written before it (one
    string array under ``name``); ``where`` names the file in the error of ones that do not
    read."""
    try:
        if f"{name}_utf8" not in data:
            return [str(item) for item in data[name]]
        raw = data[f"{name}_utf8"].tobytes()
        ends = data[f"{name}_ends"].tolist()
        if ends and (ends[-1] != len(raw) or min(np.diff(ends, prepend=0)) < 0):
            raise ValueError(f"{len(ends)} ids end at {ends[-1]} of {len(raw)} bytes")
        return [raw[start:end].decode("utf-8", "surrogatepass")
                for start, end in zip([0, *ends[:-1]], ends)]
    except (KeyError, ValueError) as error:  # UnicodeDecodeError too
        raise DamagedCheckpoint(f"the ids ({name}) of {where} do not read ({error!r}): "
                                "restore it, or remove it to start that part of the model "
                                "empty") from error


def read_only_view(array: np.ndarray) -> np.ndarray:
    """Hand out state without a copy and without letting the reader write into it."""
    view = array.view()
    view.flags.writeable = False
    return view


class ExactGramian:
    """G = Σ_i ψ̃_i ψ̃_iᵀ kept exact while rows change, by rank-k corrections.

    Examples
    --------
    >>> g = ExactGramian(2)
    >>> g.update(np.empty((0, 2)), np.array([[1.0, 2.0]]))
    >>> g.update(np.array([[1.0, 2.0]]), np.array([[0.0, 1.0]]))
    >>> g.matrix.tolist()
    [[0.0, 0.0], [0.0, 1.0]]
    """

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._G = np.zeros((dim, dim))
        self.updates_since_recompute = 0

    @property
    def matrix(self) -> np.ndarray:
        """The current Gramian (a read-only view: copy it to keep a snapshot)."""
        return read_only_view(self._G)

    def update(self, old_rows: np.ndarray, new_rows: np.ndarray) -> None:
        """G += NᵀN − OᵀO for rows that changed from O to N (one batch, distinct rows).

        A new row has no old value: pass it in ``new_rows`` only (``old_rows`` may be shorter or
        empty; the two sums are independent). A row changed twice within one batch must be given
        once, with its value before and after the batch.
        """
        new_rows = np.asarray(new_rows, dtype=np.float64).reshape(-1, self.dim)
        old_rows = np.asarray(old_rows, dtype=np.float64).reshape(-1, self.dim)
        self._G += new_rows.T @ new_rows
        self._G -= old_rows.T @ old_rows
        self.updates_since_recompute += 1

    def recompute(self, all_rows: np.ndarray) -> float:
        """Replace G by the exact Σ ψ̃ψ̃ᵀ; return ‖G_old − G_exact‖_F / ‖G_exact‖_F."""
        all_rows = np.asarray(all_rows, dtype=np.float64).reshape(-1, self.dim)
        exact = all_rows.T @ all_rows
        drift = _relative_distance(self._G, exact)
        self._G = exact
        self.updates_since_recompute = 0
        return drift

    def to_arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
        return {f"{prefix}G": self._G.copy()}

    def set_arrays(self, arrays: dict[str, np.ndarray], prefix: str = "") -> None:
        G = np.array(arrays[f"{prefix}G"], dtype=np.float64)
        if G.shape != (self.dim, self.dim):
            raise ValueError(f"saved Gramian has shape {G.shape}, expected {(self.dim,) * 2}")
        self._G = G
        self.updates_since_recompute = 0

    def save(self, path: Path) -> None:
        save_npz(path, self.to_arrays())

    def load(self, path: Path) -> bool:
        """Replace G with the one saved at ``path``; False if there is no file."""
        arrays = load_npz(path)
        if arrays is None:
            return False
        self.set_arrays(arrays)
        return True


class DecayedGramian:
    """Estimate of G_C = Σ_u φ̃(u)φ̃(u)ᵀ from a stream of user vectors (Rendle eq. 41).

    Per micro-batch of B rows, with weights w_b (default 1), W = Σ_b w_b and κ = (1 − β)^W,

        M̂ ← κ M̂ + (1 − κ) · Σ_b w_b φ̃_b φ̃_bᵀ / W,      Ĝ_C = |C| · M̂ / (1 − (1 − β)^t),

    t the weight seen so far. With a constant |C| and B = 1 this is eq. 41: Ĝ ← (1 − βw)Ĝ +
    βw·|C|·φ̃φ̃ᵀ to first order, w = 1/|I_c|. β is a rate *per unit of weight* (per row,
    unweighted), so the memory is about 1/β user vectors however the stream is cut into
    micro-batches: a live worker's batches are as small as the traffic of the last few
    milliseconds, and a rate per batch would let a batch of three events from one user weigh
    as much as a batch of 256 from everyone (and a batch's weights, normalized within it only,
    would do nothing in a batch of one). Two more deliberate differences:

    - |C|, the number of active users, is passed in by the caller (``n_active``) and multiplies
      the average on read. The learner is partitioned by item and sees no user ids; the ingest
      side owns the user table and knows |C|. Keeping the average and the count apart makes a
      change of |C| (e.g. the fast growth at the start of a stream) take effect at once instead
      of with the 1/β lag of the recursion.
    - The average is bias-corrected by 1 − (1 − β)^t (as in Adam), so early estimates are not
      shrunk towards the zero start.

    The stream samples users in proportion to their activity, while G_C weighs users equally.
    Rendle's 1/|I_c| factor corrects that; here pass ``weights`` ∝ 1/activity of each row's user
    to get the same correction (a self-normalized importance weight). Without weights the
    estimate is the activity-weighted one, exact when users are equally active.

    Examples
    --------
    >>> g = DecayedGramian(2, beta=0.5)
    >>> g.update(np.array([[1.0, 1.0], [3.0, 1.0]]), n_active=2)
    >>> g.value().tolist()
    [[10.0, 4.0], [4.0, 2.0]]
    """

    def __init__(self, dim: int, beta: float = 1e-4, n_active: float = 1.0) -> None:
        if not 0.0 < beta <= 1.0:
            raise ValueError("beta must be in (0, 1]")
        self.dim = dim
        self.beta = beta
        self.n_active = float(n_active)
        self._moment = np.zeros((dim, dim))
        self._mass = 0.0  # 1 − (1 − β)^t: what the moving average has accumulated

    def update(self, rows: np.ndarray, n_active: float | None = None,
               weights: np.ndarray | None = None) -> None:
        """Fold one micro-batch of augmented user rows φ̃ (B, dim) into the estimate."""
        rows = np.asarray(rows, dtype=np.float64).reshape(-1, self.dim)
        if n_active is not None:
            self.n_active = float(n_active)
        w = np.ones(len(rows)) if weights is None else np.asarray(weights, dtype=np.float64)
        total = w.sum()
        if not total > 0.0:  # no rows, or weights of nothing: 0/0 would hold NaN for good
            return
        batch = (rows.T * w) @ rows / total
        keep = (1.0 - self.beta) ** total
        self._moment = keep * self._moment + (1.0 - keep) * batch
        self._mass = keep * self._mass + (1.0 - keep)

    def value(self) -> np.ndarray:
        """Ĝ_C (a new array); zeros before the first update."""
        if self._mass == 0.0:
            return np.zeros((self.dim, self.dim))
        return (self.n_active / self._mass) * self._moment

    def distance_to(self, exact: np.ndarray) -> float:
        """‖Ĝ_C − G_C‖_F / ‖G_C‖_F against an exact Gramian."""
        return _relative_distance(self.value(), exact)

    def to_arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
        return {f"{prefix}moment": self._moment.copy(),
                f"{prefix}scalars": np.array([self.beta, self.n_active, self._mass])}

    def set_arrays(self, arrays: dict[str, np.ndarray], prefix: str = "") -> None:
        moment = np.array(arrays[f"{prefix}moment"], dtype=np.float64)
        if moment.shape != (self.dim, self.dim):
            raise ValueError(f"saved Gramian has shape {moment.shape}, expected "
                             f"{(self.dim,) * 2}")
        # The saved beta is informational: the average stays valid under another beta, which
        # only changes how fast it forgets from now on.
        _, n_active, mass = (float(x) for x in arrays[f"{prefix}scalars"])
        self._moment, self.n_active, self._mass = moment, n_active, mass

    def save(self, path: Path) -> None:
        save_npz(path, self.to_arrays())

    def load(self, path: Path) -> bool:
        """Replace the estimate with the one saved at ``path``; False if there is no file."""
        arrays = load_npz(path)
        if arrays is None:
            return False
        self.set_arrays(arrays)
        return True


def _relative_distance(estimate: np.ndarray, exact: np.ndarray) -> float:
    scale = np.linalg.norm(exact)
    gap = np.linalg.norm(estimate - exact)
    return float(gap / scale) if scale > 0 else float(gap)
