"""Index versions on disk: self-describing folders, written aside and renamed into place.

``<root>/v<N>/`` holds the hnswlib file(s), the item ids (JSON), for a clustered index the
centroids (``.npy``, read with ``allow_pickle=False``), and ``manifest.json`` with the version,
dimension, count, model version, build seconds and the SHA-256 of every file. A version is
written into ``<root>/.tmp-v<N>-<random>/`` and renamed to ``v<N>`` in one step, so a reader
sees a complete folder or none; a build killed midway leaves only a temp folder, which
:func:`load_newest` ignores and :func:`prune` removes.

:func:`load_newest` verifies before it trusts: a folder with a missing, extra-short or altered
file, or a manifest that does not match what it describes, is skipped with the reason logged,
and the next older version is tried.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import struct
import time
from pathlib import Path

import hnswlib
import numpy as np

from state.gramian import sync_folder, write_through

from .clusters import ClusteredIndex
from .hnsw import INDEX_FORMAT, HnswParams, ItemIndex, Manifest

log = logging.getLogger(__name__)
VERSION_DIR = re.compile(r"^v(\d+)$")
TEMP_PREFIX = ".tmp-"
ServedIndex = ItemIndex | ClusteredIndex


class CorruptVersion(ValueError):
    """A version folder that must not be loaded; the message says why."""


def version_dirs(root: Path) -> list[tuple[int, Path]]:
    """Complete-looking version folders, newest first."""
    if not root.exists():
        return []
    found = [(int(m[1]), path) for path in root.iterdir()
             if path.is_dir() and (m := VERSION_DIR.match(path.name))]
    return sorted(found, reverse=True)


def next_version(root: Path) -> int:
    versions = version_dirs(root)
    return versions[0][0] + 1 if versions else 1


# -- writing ---------------------------------------------------------------------------------


def write_version(root: Path, index: ServedIndex) -> Path:
    """Write ``index`` as ``root/v<version>`` atomically; returns the folder."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"v{index.version}"
    if final.exists():
        raise FileExistsError(f"{final} exists: versions are never overwritten")
    tmp = root / f"{TEMP_PREFIX}v{index.version}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        parts = index.parts if isinstance(index, ClusteredIndex) else [index]
        for k, part in enumerate(parts):
            part.graph.save_index(str(tmp / f"index-{k}.bin"))
            _write_text(tmp / f"ids-{k}.json", json.dumps(part.ids))
        if isinstance(index, ClusteredIndex):
            np.save(tmp / "centroids.npy", index.centroids, allow_pickle=False)
        # hnswlib and numpy write the graphs and centroids: on the disk before the rename
        files = {path.name: _sha256(path, sync=True) for path in sorted(tmp.iterdir())}
        manifest = {**index.manifest.to_json(), "files": files, "format": INDEX_FORMAT}
        _write_text(tmp / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True))
        sync_folder(tmp)
        os.rename(tmp, final)
        sync_folder(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _write_text(path: Path, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)
        write_through(handle)


def _sha256(path: Path, sync: bool = False) -> str:
    """The file's SHA-256; with ``sync``, its bytes are put on the disk too (a version renamed
    into place after a power loss must not hold a graph cut short)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
        if sync:
            os.fsync(handle.fileno())
    return digest.hexdigest()


# -- reading ---------------------------------------------------------------------------------


def load_version(folder: Path, params: HnswParams = HnswParams(),
                 capacity: int = 0) -> ServedIndex:
    """Load one version folder after verifying it; raises :class:`CorruptVersion`. A single
    index gets room for ``capacity`` items (an update in place adds the new ones)."""
    manifest = _verified_manifest(folder)
    parts = []
    for k in range(max(manifest.clusters, 1)):
        ids = json.loads((folder / f"ids-{k}.json").read_text())
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise CorruptVersion(f"ids-{k}.json is not a list of item ids")
        _check_graph_dim(folder / f"index-{k}.bin", manifest.graph_dim)
        graph = hnswlib.Index(space="ip", dim=manifest.graph_dim)
        graph.load_index(str(folder / f"index-{k}.bin"),
                         max_elements=max(len(ids), capacity, 1))
        if graph.get_current_count() != len(ids):
            raise CorruptVersion(f"index-{k}.bin holds {graph.get_current_count()} items, "
                                 f"ids-{k}.json {len(ids)}")
        parts.append(ItemIndex(graph, ids, manifest, params.ef))
    if sum(len(part) for part in parts) != manifest.count:
        raise CorruptVersion(f"the manifest says {manifest.count} items, the files hold "
                             f"{sum(len(part) for part in parts)}")
    if manifest.clusters == 0:
        return parts[0]
    centroids = np.load(folder / "centroids.npy", allow_pickle=False)
    if centroids.shape != (manifest.clusters, manifest.dim):
        raise CorruptVersion(f"centroids have shape {centroids.shape}")
    return ClusteredIndex(parts, centroids, manifest)


def _check_graph_dim(path: Path, dim: int) -> None:
    """Raise :class:`CorruptVersion` unless the graph at ``path`` holds vectors of ``dim``
    floats. hnswlib loads a graph with the dimension it is told and reads each vector with
    that length, past its end or short of it (dropping the bias), so the manifest's word is
    checked against the graph's header: six little-endian size_t, of which the fifth
    (where a vector's label is) less the sixth (where its data is) is the vector's bytes."""
    with open(path, "rb") as handle:
        header = handle.read(48)
    if len(header) < 48:
        raise CorruptVersion(f"{path.name} is too short for an index")
    label_offset, data_offset = struct.unpack("<6Q", header)[4:]
    if label_offset - data_offset != 4 * dim:
        raise CorruptVersion(f"{path.name} holds vectors of {(label_offset - data_offset) / 4:g} "
                             f"floats, the manifest says {dim}")


def _verified_manifest(folder: Path) -> Manifest:
    try:
        manifest = Manifest.from_json(json.loads((folder / "manifest.json").read_text()))
    except (OSError, ValueError, TypeError) as error:
        raise CorruptVersion(f"unreadable manifest: {error}") from error
    if manifest.format != INDEX_FORMAT:
        raise CorruptVersion(f"format {manifest.format}, this build reads {INDEX_FORMAT}")
    if f"v{manifest.version}" != folder.name:
        raise CorruptVersion(f"manifest version {manifest.version} in folder {folder.name}")
    # every file the load reads (a manifest that left out the ids had them read unchecked)
    expected = {f"{name}-{k}.{kind}" for k in range(max(manifest.clusters, 1))
                for name, kind in (("index", "bin"), ("ids", "json"))}
    if manifest.clusters:
        expected.add("centroids.npy")
    missing = expected - set(manifest.files)
    if missing:
        raise CorruptVersion(f"manifest lists no checksum for {sorted(missing)}")
    for name, checksum in manifest.files.items():
        path = folder / name
        if not path.is_file():
            raise CorruptVersion(f"{name} is missing")
        if _sha256(path) != checksum:
            raise CorruptVersion(f"{name} does not match its checksum")
    return manifest


def load_newest(root: Path, params: HnswParams = HnswParams(),
                dim: int | None = None) -> ServedIndex | None:
    """The newest version that verifies (of rows of length ``dim``, when given: an index of
    another model dimension cannot answer this one's queries); the others are skipped with
    the reason logged."""
    for version, folder in version_dirs(root):
        try:
            index = load_version(folder, params)
        except (CorruptVersion, OSError, RuntimeError, ValueError) as error:
            log.warning("skipping index version %d at %s: %s", version, folder, error)
            continue
        if dim is None or index.manifest.dim == dim:
            return index
        log.warning("skipping index version %d at %s: rows of length %d, the model's are %d",
                    version, folder, index.manifest.dim, dim)
    return None


# -- pruning ---------------------------------------------------------------------------------


def prune(root: Path, keep: int = 2, grace_s: float = 300.0,
          now: float | None = None) -> list[Path]:
    """Remove versions beyond the newest ``keep`` once they are older than ``grace_s`` (a
    reader that picked one just before a swap may still be loading it), and temp folders of
    builds that died, once they are older than the grace period too. Returns what went."""
    now = time.time() if now is None else now
    removed = []
    for _, folder in version_dirs(root)[keep:]:
        if now - folder.stat().st_mtime >= grace_s:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    for folder in root.glob(f"{TEMP_PREFIX}*") if root.exists() else ():
        if now - folder.stat().st_mtime >= grace_s:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed
