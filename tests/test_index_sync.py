"""index_sync: recall against exact MIPS, versions on disk, hot swap under load, quotas."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from index_sync.clusters import ClusteredIndex, quotas
from index_sync.hnsw import SPHERE_HEADROOM, HnswParams, ItemIndex, exact_top_k, on_sphere
from index_sync.swap import IndexHolder, IndexRebuilder, RebuildPolicy, Snapshot
from index_sync.versions import load_newest, prune, version_dirs, write_version


def model_like(n: int, dim: int = 32, rank: int = 8, seed: int = 0) -> np.ndarray:
    """Low-rank vectors with a bias column, like learned item rows [v, b]."""
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(n, rank)) @ rng.normal(size=(rank, dim)) / np.sqrt(rank)
    v += 0.1 * rng.normal(size=(n, dim))
    bias = rng.normal(0.0, 0.5, size=(n, 1))
    return np.hstack([v, bias])


def queries(m: int, dim: int = 32, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.hstack([rng.normal(size=(m, dim)) / np.sqrt(dim), np.ones((m, 1))])


def ids_of(n: int, prefix: str = "i") -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


def test_recall_against_exact_mips_at_the_configured_ef():
    vectors, ids = model_like(5000), ids_of(5000)
    index = ItemIndex.build(ids, vectors, version=1, model_version=0, params=HnswParams())
    recalls = []
    for q in queries(200):
        exact = {ids[i] for i in exact_top_k(vectors, q, 10)}
        found = [item for item, _ in index.search(q, 10)]
        recalls.append(len(exact & set(found)) / 10)
    assert np.mean(recalls) >= 0.95, np.mean(recalls)


def test_recall_on_rows_of_very_different_norms_as_learned_rows_have():
    """Learned rows differ in length by tens of times (popular items long, rarely seen ones
    short). Put on one sphere, most crowd its pole and the graph search lost them: recall@10
    of the responder's form (64 candidates reranked) was 0.89 here, 0.68 on the model learned
    from Toys (index_sync/hnsw.py); the rows as they are: 0.998 and 0.998."""
    rng = np.random.default_rng(0)
    vectors = model_like(5000, seed=0) * np.exp(rng.normal(size=(5000, 1)))
    index = ItemIndex.build(ids_of(5000), vectors, version=1, model_version=0)
    users = np.hstack([vectors[rng.integers(0, 5000, (200, 20)), :-1].mean(axis=1),
                       np.ones((200, 1))])
    recalls = []
    for q in users:
        labels, _ = index.search_labels(q, 64)
        top = labels[np.argsort(-(vectors[labels] @ q), kind="stable")[:10]]
        recalls.append(len(set(top.tolist()) & set(exact_top_k(vectors, q, 10).tolist())) / 10)
    assert np.mean(recalls) >= 0.97, np.mean(recalls)


def test_scores_are_the_model_scores_and_exclusion_keeps_k():
    vectors, ids = model_like(500, seed=3), ids_of(500)
    index = ItemIndex.build(ids, vectors, version=1, model_version=0)
    q = queries(1, seed=4)[0]
    top = index.search(q, 10)
    for item, score in top:
        assert score == pytest.approx(float(vectors[int(item[1:])] @ q), rel=1e-4, abs=1e-4)
    excluded = {item for item, _ in top[:5]}
    again = index.search(q, 10, exclude=excluded)
    assert len(again) == 10 and not excluded & {item for item, _ in again}
    assert index.search(q, 1000)[-1][0] in ids and len(index.search(q, 1000)) == 500


def test_versions_round_trip_and_the_newest_valid_one_loads(tmp_path):
    vectors, ids = model_like(300), ids_of(300)
    for version in (1, 2):
        write_version(tmp_path, ItemIndex.build(ids, vectors, version=version, model_version=7))
    loaded = load_newest(tmp_path)
    assert loaded.version == 2 and loaded.ids == ids and loaded.manifest.model_version == 7
    manifest = json.loads((tmp_path / "v2" / "manifest.json").read_text())
    assert {"version", "dim", "count", "model_version", "build_seconds", "files"} <= set(manifest)
    q = queries(1)[0]
    original = ItemIndex.build(ids, vectors, version=3, model_version=7)
    assert [i for i, _ in loaded.search(q, 10)] == [i for i, _ in original.search(q, 10)]
    with pytest.raises(FileExistsError):
        write_version(tmp_path, ItemIndex.build(ids, vectors, version=2, model_version=7))


def test_every_file_of_a_version_is_on_the_disk_before_it_is_renamed_into_place(
        tmp_path, monkeypatch):
    """The graphs (written by hnswlib) and centroids are synced as the ids and manifest are:
    after a power loss a renamed version could otherwise hold a graph cut short."""
    import index_sync.versions as versions

    synced: list[str] = []
    fsync = os.fsync

    def recording(descriptor: int) -> None:
        synced.append(os.path.basename(os.readlink(f"/proc/self/fd/{descriptor}")))
        fsync(descriptor)

    monkeypatch.setattr(versions.os, "fsync", recording)
    clustered = ClusteredIndex.build(ids_of(300), model_like(300), 2, version=1,
                                     model_version=1)
    final = write_version(tmp_path, clustered)
    assert {path.name for path in final.iterdir()} <= set(synced)


@pytest.mark.parametrize("damage", ["truncated index", "changed checksum", "missing ids",
                                    "bad manifest", "manifest not an object",
                                    "clusters null", "files a list", "temp folder only",
                                    "dim wider than the graph", "dim narrower than the graph",
                                    "ids without a checksum"])
def test_a_damaged_or_partial_version_is_never_loaded(tmp_path, damage, caplog):
    vectors, ids = model_like(200), ids_of(200)
    write_version(tmp_path, ItemIndex.build(ids, vectors, version=1, model_version=1))
    newer = write_version(tmp_path, ItemIndex.build(ids[:100], vectors[:100], version=2,
                                                    model_version=2))
    if damage == "truncated index":
        data = (newer / "index-0.bin").read_bytes()
        (newer / "index-0.bin").write_bytes(data[: len(data) // 2])
    elif damage == "changed checksum":
        manifest = json.loads((newer / "manifest.json").read_text())
        manifest["files"]["ids-0.json"] = "0" * 64
        (newer / "manifest.json").write_text(json.dumps(manifest))
    elif damage == "missing ids":
        (newer / "ids-0.json").unlink()
    elif damage == "bad manifest":
        (newer / "manifest.json").write_text("{not json")
    elif damage == "manifest not an object":
        (newer / "manifest.json").write_text("[2]")
    elif damage in ("clusters null", "files a list"):
        manifest = json.loads((newer / "manifest.json").read_text())
        manifest["clusters" if damage == "clusters null" else "files"] = (
            None if damage == "clusters null" else list(manifest["files"]))
        (newer / "manifest.json").write_text(json.dumps(manifest))
    elif damage.startswith("dim") or damage == "ids without a checksum":
        # hnswlib reads each vector with the length it is told: past its end, or short of it
        # (the bias dropped); ids left out of the files were read unchecked
        manifest = json.loads((newer / "manifest.json").read_text())
        if damage == "ids without a checksum":
            del manifest["files"]["ids-0.json"]
        else:
            manifest["dim"] += 3 if "wider" in damage else -3
        (newer / "manifest.json").write_text(json.dumps(manifest))
    else:  # a build that died before its rename: only the temp folder exists
        newer.rename(tmp_path / ".tmp-v2-deadbeef")
    loaded = load_newest(tmp_path)
    assert loaded is not None and loaded.version == 1 and len(loaded) == 200
    if damage != "temp folder only":
        assert "skipping index version 2" in caplog.text


def test_a_build_killed_midway_leaves_the_previous_version(tmp_path):
    """A real process killed (SIGKILL) while it writes a version: what it leaves behind is a
    temp folder, which is never loaded; the previous version keeps being the newest."""
    vectors, ids = model_like(200), ids_of(200)
    write_version(tmp_path, ItemIndex.build(ids, vectors, version=1, model_version=1))
    script = (
        "import sys, numpy as np\n"
        "from pathlib import Path\n"
        "from index_sync.hnsw import ItemIndex\n"
        "from index_sync.versions import write_version\n"
        "v = np.random.default_rng(0).normal(size=(40000, 33))\n"
        "index = ItemIndex.build([str(i) for i in range(len(v))], v, version=2, "
        "model_version=2)\n"
        "print('writing', flush=True)\n"
        "n = 0\n"
        "while True:\n"
        "    n += 1\n"
        "    write_version(Path(sys.argv[1]) / f'scratch-{n}', index)\n"
    )
    writer = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)],
                              stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
    assert writer.stdout.readline().strip() == "writing"
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob("scratch-*/.tmp-*")) and time.monotonic() < deadline:
        time.sleep(0.001)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    partial = list(tmp_path.glob("scratch-*/.tmp-*"))
    assert partial, "the writer was never caught mid-write"
    for folder in partial:  # what the dead build left, beside the good version
        folder.rename(tmp_path / folder.name)
    assert load_newest(tmp_path).version == 1
    assert [v for v, _ in version_dirs(tmp_path)] == [1]


def test_prune_keeps_the_newest_and_respects_the_grace_period(tmp_path):
    vectors, ids = model_like(50), ids_of(50)
    for version in range(1, 5):
        write_version(tmp_path, ItemIndex.build(ids, vectors, version=version, model_version=0))
    (tmp_path / ".tmp-v9-dead").mkdir()
    assert prune(tmp_path, keep=2, grace_s=3600) == []  # all too young
    removed = prune(tmp_path, keep=2, grace_s=0.0, now=time.time() + 1)
    assert sorted(p.name for p in removed) == [".tmp-v9-dead", "v1", "v2"]
    assert [v for v, _ in version_dirs(tmp_path)] == [4, 3]


def test_hot_swap_under_load_answers_from_exactly_one_complete_version():
    """Each version's items carry its number in their ids; 4 threads query during 25 swaps:
    no query fails, no answer mixes versions, versions seen never go backwards."""
    n, dim = 400, 16
    vectors = model_like(n, dim=dim, seed=5)
    holder = IndexHolder()
    holder.swap(ItemIndex.build(ids_of(n, "v1-"), vectors, version=1, model_version=1))
    stop = threading.Event()
    errors: list[str] = []
    seen_versions: list[list[int]] = [[] for _ in range(4)]

    def query(worker: int) -> None:
        q = queries(1, dim=dim, seed=worker)[0]
        while not stop.is_set():
            try:
                index = holder.current
                answer = index.search(q, 10)
                versions = {item.split("-")[0] for item, _ in answer}
                if len(answer) != 10 or versions != {f"v{index.version}"}:
                    errors.append(f"bad answer {answer}")
                seen_versions[worker].append(index.version)
            except Exception as error:  # noqa: BLE001
                errors.append(repr(error))

    threads = [threading.Thread(target=query, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for version in range(2, 27):
        built = ItemIndex.build(ids_of(n, f"v{version}-"), vectors, version=version,
                                model_version=version)
        assert holder.swap(built)
    assert not holder.swap(ItemIndex.build(ids_of(n, "v3-"), vectors, version=3,
                                           model_version=3))  # never backwards
    time.sleep(0.05)
    stop.set()
    for thread in threads:
        thread.join()
    assert not errors, errors[:3]
    assert holder.swaps == 26 and holder.version == 26
    for versions in seen_versions:
        assert versions and versions == sorted(versions)


def test_rebuilder_builds_aside_swaps_and_survives_a_failed_build(tmp_path):
    holder = IndexHolder()
    rebuilder = IndexRebuilder(tmp_path, holder, RebuildPolicy(interval_s=3600,
                                                                changed_items=10))
    vectors, ids = model_like(300), ids_of(300)
    assert not rebuilder.due(changed_items=5, n_items=300)
    assert rebuilder.due(changed_items=10, n_items=300)
    rebuilder.submit(Snapshot(ids, vectors, model_version=3)).result(60)
    assert holder.version == 1 and holder.current.manifest.model_version == 3
    broken = Snapshot(ids, vectors[:, :5][:10], model_version=4)  # ids and rows disagree
    assert rebuilder.submit(broken).result(60) is None
    assert holder.version == 1 and rebuilder.failures == 1 and rebuilder.last_error
    rebuilder.submit(Snapshot(ids, vectors, model_version=5)).result(60)
    assert holder.version == 2
    restarted = IndexHolder()
    assert IndexRebuilder(tmp_path, restarted).load_existing()
    assert restarted.version == 2 and restarted.current.manifest.model_version == 5
    rebuilder.close()


@settings(max_examples=200, deadline=None)
@given(p=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=12),
       alpha=st.floats(0.0, 200.0), total=st.integers(0, 500))
def test_quotas_always_sum_to_the_total(p, alpha, total):
    counts = quotas(np.array(p), alpha, total)
    assert counts.sum() == total and (counts >= 0).all()


def test_quota_extremes():
    p = np.array([0.1, 0.6, 0.3, 0.0])
    assert quotas(p, 0.0, 40).tolist() == [10, 10, 10, 10]  # absolute fairness
    assert quotas(p, 1000.0, 40).tolist() == [0, 40, 0, 0]  # the top cluster only
    assert quotas(p, 1.0, 10).tolist() == [1, 6, 3, 0]


def test_clustered_index_follows_the_users_cluster_with_large_alpha():
    rng = np.random.default_rng(7)
    centers = rng.normal(size=(4, 16)) * 3
    labels = np.repeat(np.arange(4), 150)
    vectors = np.hstack([centers[labels] + rng.normal(size=(600, 16)), np.zeros((600, 1))])
    ids = [f"c{label}-{i}" for i, label in enumerate(labels)]
    index = ClusteredIndex.build(ids, vectors, 4, version=1, model_version=0)
    assert len(index) == 600 and index.manifest.clusters == 4
    q = np.append(rng.normal(size=16), 1.0)
    history = [i for i in ids if i.startswith("c2-")][:5]
    focused = index.search(q, 20, diversity=100.0, history=history)
    assert len(focused) == 20 and all(i.startswith("c2-") for i, _ in focused)
    fair = index.search(q, 20, diversity=0.0, history=history)
    assert {i.split("-")[0] for i, _ in fair} == {"c0", "c1", "c2", "c3"}
    # with α = 1 and no history, it still finds most of the exact top items
    exact = {ids[i] for i in exact_top_k(vectors, q, 20)}
    found = {i for i, _ in index.search(q, 20)}
    assert len(exact & found) >= 10


def test_fewer_distinct_rows_than_clusters_leave_no_empty_cluster():
    """k-means over fewer distinct rows than clusters leaves some empty; kept, an empty one
    had a NaN centroid, and the quotas it made gave the worst items."""
    import warnings

    vectors = np.array([[1.0, 0.0, 0.0]] * 5 + [[0.0, 1.0, 0.0]] * 5)
    vectors[:5, 2] = 1.0  # the first five score 1 + 1 for the query below, the rest 0
    ids = [f"i{n}" for n in range(10)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn says it found fewer clusters than asked
        index = ClusteredIndex.build(ids, vectors, 4, version=1, model_version=0)
    assert index.manifest.clusters == 2 and np.isfinite(index.centroids).all()
    found = index.search(np.array([1.0, 0.0, 1.0]), 5, diversity=100.0)  # its best cluster
    assert {item for item, _ in found} == {f"i{n}" for n in range(5)}


def test_items_scored_outside_the_graphs_compete_within_their_clusters_quota():
    """Two well-apart groups: an item new since the build goes to the group whose centroid is
    nearest, an indexed one stays where it was built; with equal quotas (α = 0) a fresh item
    of top score takes a place of its own cluster, not of the other."""
    rng = np.random.default_rng(3)
    left = np.c_[rng.normal(-5.0, 0.1, (20, 2)), np.zeros(20)]
    right = np.c_[rng.normal(5.0, 0.1, (20, 2)), np.zeros(20)]
    ids = [f"l{n}" for n in range(20)] + [f"r{n}" for n in range(20)]
    index = ClusteredIndex.build(ids, np.vstack([left, right]), 2, version=1, model_version=0)
    near_left = np.array([[-4.0, -4.0, 0.0]])
    left_cluster = index.cluster_of["l0"]
    assert index.clusters_for(["new"], near_left).tolist() == [left_cluster]
    assert index.clusters_for(["r3"], near_left).tolist() == [index.cluster_of["r3"]]
    query = np.array([1.0, 1.0, 0.0])  # the right group scores higher
    fresh = [("new", 100.0, left_cluster)]
    found = index.search(query, 6, diversity=0.0, fresh=fresh)
    assert [item for item, _ in found][0] == "new"
    assert sum(item.startswith("r") for item, _ in found) == 3  # its quota kept
    assert sum(item.startswith("l") or item == "new" for item, _ in found) == 3


def test_a_clustered_version_round_trips(tmp_path):
    vectors, ids = model_like(400), ids_of(400)
    index = ClusteredIndex.build(ids, vectors, 3, version=1, model_version=2)
    write_version(tmp_path, index)
    loaded = load_newest(tmp_path)
    assert isinstance(loaded, ClusteredIndex) and sorted(loaded.ids) == sorted(ids)
    q = queries(1)[0]
    before, after = index.search(q, 10), loaded.search(q, 10)
    assert [i for i, _ in after] == [i for i, _ in before]
    assert [s for _, s in after] == pytest.approx([s for _, s in before])


def test_rebuilder_rests_so_builds_take_at_most_their_share_of_the_time(tmp_path):
    holder = IndexHolder()
    rebuilder = IndexRebuilder(tmp_path, holder, RebuildPolicy(interval_s=3600, changed_items=1,
                                                                build_share=0.25))
    vectors, ids = model_like(2000), ids_of(2000)
    assert rebuilder.due(changed_items=1, n_items=2000)
    began = time.time()
    rebuilder.submit(Snapshot(ids, vectors, model_version=1)).result(60)
    ended = time.time()
    spent = holder.current.manifest.build_seconds
    assert spent > 0
    # rests three times the build (share 1/4) counted from the build's start
    assert began + 4 * spent - 0.05 <= rebuilder.resting_until <= ended + 3 * (ended - began)
    assert not rebuilder.due(changed_items=10**6, n_items=2000, now=rebuilder.resting_until - 0.01)
    assert rebuilder.due(changed_items=1, n_items=2000, now=rebuilder.resting_until)
    broken = Snapshot(ids, vectors[:, :5][:10], model_version=2)  # a failed build rests too
    failed_at = time.time()
    assert rebuilder.submit(broken).result(60) is None
    assert failed_at <= rebuilder.resting_until <= time.time() + 3 * (time.time() - failed_at)
    rebuilder.close()


def test_a_due_build_waits_for_a_backlog_at_most_its_wait(tmp_path):
    rebuilder = IndexRebuilder(tmp_path, IndexHolder(), RebuildPolicy(
        interval_s=3600, changed_items=10, backlog_events=1000, backlog_wait_s=30))
    t0 = 1_000_000.0
    assert not rebuilder.due(changed_items=10, n_items=300, now=t0, behind=1001)
    assert rebuilder.waiting_seconds(t0 + 5) == 5
    assert not rebuilder.due(changed_items=10**6, n_items=300, now=t0 + 29.9, behind=10**6)
    assert rebuilder.due(changed_items=10, n_items=300, now=t0 + 30, behind=10**6)  # waited
    assert not rebuilder.due(changed_items=9, n_items=300, now=t0 + 31, behind=10**6)  # not due
    assert rebuilder.waiting_seconds(t0 + 31) == 31  # the wait goes on until a build starts
    rebuilder.submit(Snapshot(ids_of(300), model_like(300), model_version=1)).result(60)
    assert rebuilder.waiting_seconds(time.time()) == 0
    later = rebuilder.resting_until + 1
    assert not rebuilder.due(changed_items=10, n_items=300, now=later, behind=5000)  # a new wait
    assert rebuilder.due(changed_items=10, n_items=300, now=later + 1, behind=1000)  # caught up
    assert rebuilder.waiting_seconds(later + 1) == 0
    rebuilder.close()


def test_a_version_that_overflows_its_stale_limit_is_due_before_its_interval(tmp_path):
    """Overflowing (more rows moved than answers score exactly) makes a build due as enough
    changed items would; the rest, the backlog wait and the building guard still apply."""
    rebuilder = IndexRebuilder(tmp_path, IndexHolder(), RebuildPolicy(
        interval_s=3600, changed_items=10**6, backlog_events=1000, backlog_wait_s=30))
    rebuilder.submit(Snapshot(ids_of(300), model_like(300), model_version=1)).result(60)
    now = rebuilder.resting_until + 1
    assert not rebuilder.due(changed_items=5, n_items=300, now=now)
    assert rebuilder.due(changed_items=5, n_items=300, now=now, overflowing=True)
    assert not rebuilder.due(changed_items=5, n_items=300, now=rebuilder.resting_until - 0.01,
                             overflowing=True)
    assert not rebuilder.due(changed_items=5, n_items=300, now=now, behind=5000,
                             overflowing=True)
    assert not rebuilder.due(changed_items=0, n_items=300, now=now, overflowing=True)
    rebuilder.close()


def test_a_build_never_waits_without_a_backlog_threshold(tmp_path):
    rebuilder = IndexRebuilder(tmp_path, IndexHolder(), RebuildPolicy(
        interval_s=3600, changed_items=10, backlog_events=0))
    assert rebuilder.due(changed_items=10, n_items=300, behind=10**9)
    rebuilder.close()


def test_rebuilder_with_the_whole_share_builds_back_to_back(tmp_path):
    rebuilder = IndexRebuilder(tmp_path, IndexHolder(), RebuildPolicy(changed_items=1,
                                                                       build_share=1.0))
    rebuilder.submit(Snapshot(ids_of(300), model_like(300), model_version=1)).result(60)
    assert rebuilder.due(changed_items=1, n_items=300)
    rebuilder.close()


@pytest.mark.parametrize("share", [0.0, -0.5, 1.5])
def test_rebuild_policy_refuses_a_share_outside_zero_to_one(share):
    with pytest.raises(ValueError, match="build_share"):
        RebuildPolicy(build_share=share)


def moved_rows_within(vectors: np.ndarray, radius: float, rows: np.ndarray,
                      seed: int = 5) -> np.ndarray:
    """Other vectors for ``rows``, no longer than ``radius``: what a few learning steps do."""
    rng = np.random.default_rng(seed)
    moved = vectors[rows] + 0.5 * rng.normal(size=(len(rows), vectors.shape[1]))
    norms = np.linalg.norm(moved, axis=1, keepdims=True)
    return moved * np.minimum(1.0, 0.99 * radius / norms)


def graph_form(vectors: np.ndarray, space: str, radius: float) -> np.ndarray:
    """The oracle of what a graph holds: the rows themselves, or the rows on the sphere."""
    return on_sphere(vectors, radius) if space == "sphere" else vectors


@pytest.mark.parametrize("space", ["ip", "sphere"])
def test_an_update_in_place_holds_the_new_rows_and_leaves_the_served_version_alone(
        tmp_path, space):
    """Version 2 is version 1 read back from disk with 200 moved rows and 50 new ones updated
    in place: the graph then holds exactly the rows a build from scratch would hold (on the
    same sphere, for that space), searches as well as a fresh build, and round-trips;
    version 1, which was serving meanwhile, still holds its own rows."""
    holder = IndexHolder()
    params = HnswParams(space=space)
    rebuilder = IndexRebuilder(tmp_path, holder, RebuildPolicy(update_share=0.2), params)
    vectors, ids = model_like(3000), ids_of(3000)
    rebuilder.submit(Snapshot(ids, vectors, model_version=1)).result(60)
    first = holder.current
    radius = first.manifest.radius
    longest = np.linalg.norm(vectors, axis=1).max()
    assert radius == (pytest.approx(SPHERE_HEADROOM * longest) if space == "sphere" else 0.0)

    rng = np.random.default_rng(4)
    moved = np.sort(rng.choice(3000, 200, replace=False))
    after = np.vstack([vectors, model_like(50, seed=9)])
    after[moved] = moved_rows_within(vectors, SPHERE_HEADROOM * longest, moved)
    after[3000:] = moved_rows_within(after, SPHERE_HEADROOM * longest, np.arange(3000, 3050))
    rows = np.concatenate([moved, np.arange(3000, 3050)])
    update = Snapshot(ids_of(3050), after, model_version=2, update_rows=rows, base_version=1)
    rebuilder.submit(update).result(60)
    second = holder.current
    assert second.version == 2 and rebuilder.updates == 1 and len(second) == 3050
    assert second.manifest.updated_rows == 250 and second.manifest.radius == radius
    assert second.manifest.model_version == 2 and second.manifest.space == space

    stored = second.graph.get_items(np.arange(3050), return_type="numpy")
    np.testing.assert_allclose(stored, graph_form(after, space, radius), rtol=1e-5, atol=1e-5)
    served = first.graph.get_items(moved, return_type="numpy")
    np.testing.assert_allclose(served, graph_form(vectors, space, radius)[moved],
                               rtol=1e-5, atol=1e-5)

    def recall(index):
        hits = [len({ids_of(3050)[i] for i in exact_top_k(after, q, 10)}
                    & {item for item, _ in index.search(q, 10)}) / 10 for q in queries(300)]
        return np.mean(hits)
    fresh = ItemIndex.build(ids_of(3050), after, version=9, model_version=2, params=params,
                            headroom=SPHERE_HEADROOM)
    # measured over three seeds on the sphere: updated 0.92-0.93, fresh 0.93-0.94, the stale
    # version 0.77-0.80
    assert recall(second) >= recall(fresh) - 0.04, (recall(second), recall(fresh))
    assert recall(second) >= recall(first) + 0.05, (recall(second), recall(first))

    loaded = load_newest(tmp_path)
    assert loaded.version == 2 and replace(loaded.manifest, files={}) == second.manifest
    q = queries(1, seed=11)[0]
    assert loaded.search(q, 10) == second.search(q, 10)
    rebuilder.close()


def test_a_row_that_outgrew_the_build_is_updated_in_place_in_an_ip_graph(tmp_path):
    """Only the sphere bounds a row's length; an ``ip`` graph takes any row in place."""
    holder = IndexHolder()
    rebuilder = IndexRebuilder(tmp_path, holder, RebuildPolicy(update_share=0.1))
    vectors, ids = model_like(1000), ids_of(1000)
    rebuilder.submit(Snapshot(ids, vectors, model_version=1)).result(60)
    after = vectors.copy()
    after[7] *= 3.0 * np.linalg.norm(vectors, axis=1).max() / np.linalg.norm(after[7])
    rebuilder.submit(Snapshot(ids, after, model_version=2, update_rows=np.array([7]),
                              base_version=1)).result(60)
    assert rebuilder.updates == 1 and holder.current.manifest.updated_rows == 1
    np.testing.assert_allclose(holder.current.graph.get_items([7], return_type="numpy")[0],
                               after[7], rtol=1e-5)
    assert holder.current.search(after[7], 1)[0][0] == "i7"
    rebuilder.close()


def test_a_version_of_format_1_is_read_as_the_sphere_it_was_built_on(tmp_path):
    """Versions written before the graph's space was recorded (format 1, space "ip" though
    the graph is on the sphere) load and answer as they did."""
    holder = IndexHolder()
    rebuilder = IndexRebuilder(tmp_path, holder, RebuildPolicy(), HnswParams(space="sphere"))
    vectors, ids = model_like(500), ids_of(500)
    rebuilder.submit(Snapshot(ids, vectors, model_version=1)).result(60)
    rebuilder.close()
    written = tmp_path / "v1" / "manifest.json"
    manifest = json.loads(written.read_text())
    written.write_text(json.dumps({**manifest, "space": "ip", "format": 1}))
    loaded = load_newest(tmp_path)
    assert loaded.version == 1 and loaded.manifest.space == "sphere"
    for q in queries(5, seed=12):
        assert loaded.search(q, 10) == holder.current.search(q, 10)


@pytest.mark.parametrize("case", ["too_many_rows", "outgrown", "updates_off", "other_base",
                                  "mostly_updated"])
def test_a_version_is_built_from_scratch_when_an_update_does_not_pay_or_fit(tmp_path, case):
    share = 0.0 if case == "updates_off" else 0.1
    holder = IndexHolder()
    rebuilder = IndexRebuilder(tmp_path, holder, RebuildPolicy(update_share=share),
                               HnswParams(space="sphere"))
    vectors, ids = model_like(1000), ids_of(1000)
    rebuilder.submit(Snapshot(ids, vectors, model_version=1)).result(60)
    radius = holder.current.manifest.radius
    assert radius == pytest.approx(np.linalg.norm(vectors, axis=1).max()
                                   * (1.0 if case == "updates_off" else SPHERE_HEADROOM))
    rows = np.arange(0, 1000, 20)  # 50 rows: within a share of 0.1
    if case == "too_many_rows":
        rows = np.arange(0, 1000, 5)  # 200
    if case == "mostly_updated":  # more rows updated since the last build than the index holds
        first = holder.current
        holder.current = ItemIndex(first.graph, first.ids,
                                   replace(first.manifest, updated_rows=990), first.ef)
    after = vectors.copy()
    after[rows] = moved_rows_within(vectors, radius, rows)
    if case == "outgrown":
        after[rows[0]] *= 1.2 * radius / np.linalg.norm(after[rows[0]])
    base = 7 if case == "other_base" else 1
    rebuilder.submit(Snapshot(ids, after, model_version=2, update_rows=rows,
                              base_version=base)).result(60)
    second = holder.current
    assert second.version == 2 and rebuilder.updates == 0 and second.manifest.updated_rows == 0
    stored = second.graph.get_items(np.arange(1000), return_type="numpy")
    longest = np.linalg.norm(after, axis=1).max() * (1.0 if share == 0 else SPHERE_HEADROOM)
    np.testing.assert_allclose(stored, on_sphere(after, longest), rtol=1e-5, atol=1e-5)
    rebuilder.close()


def test_an_update_in_place_refuses_rows_it_cannot_hold():
    vectors, ids = model_like(200), ids_of(200)
    sphere = HnswParams(space="sphere")
    index = ItemIndex.build(ids, vectors, version=1, model_version=0, params=sphere,
                            headroom=SPHERE_HEADROOM)
    with pytest.raises(ValueError, match="new label"):
        index.updated(ids_of(201), np.array([3]), vectors[[3]], version=2, model_version=1)
    longest = int(np.argmax(np.linalg.norm(vectors, axis=1)))
    with pytest.raises(ValueError, match="sphere"):
        index.updated(ids, np.array([longest]), vectors[[longest]] * SPHERE_HEADROOM * 1.01,
                      version=2, model_version=1)
    with pytest.raises(ValueError, match="rows outside"):
        index.updated(ids, np.array([200]), vectors[[3]], version=2, model_version=1)
    assert index.fits(vectors[[longest]] * SPHERE_HEADROOM * 0.99)
    assert RebuildPolicy(update_share=0.1).updates(index, 0)
    assert not RebuildPolicy(update_share=0.0).updates(index, 0)  # 0: never, not even 0 rows
    tight = ItemIndex.build(ids, vectors, version=1, model_version=0, params=sphere)
    assert not tight.fits(vectors[[longest]] * 1.01)  # no headroom
    as_they_are = ItemIndex.build(ids, vectors, version=1, model_version=0)
    assert as_they_are.updatable and as_they_are.fits(vectors[[longest]] * 100)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
def test_builds_and_m_steps_run_below_the_callers_cpu_priority(tmp_path):
    """The index build thread and the M-step thread run ``niceness`` below the process's
    priority, threads they start inherit it, and the calling thread keeps its own; 0 leaves
    the priority as it is."""
    from index_sync.background import background_executor
    from index_sync.paths import MStepPolicy, PathRetrieval
    from models.deep_retrieval import DRConfig

    def priority() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    def priority_of_a_thread_it_starts() -> int:
        seen = []
        started = threading.Thread(target=lambda: seen.append(priority()))
        started.start()
        started.join()
        return seen[0]

    own = priority()
    rebuilder = IndexRebuilder(tmp_path, IndexHolder(), RebuildPolicy(niceness=5), HnswParams())
    assert rebuilder._executor.submit(priority).result() == min(19, own + 5)
    assert rebuilder._executor.submit(priority_of_a_thread_it_starts).result() == min(19, own + 5)
    paths = PathRetrieval(DRConfig(input_dim=4, width=3, depth=2), MStepPolicy(niceness=3))
    assert paths._executor.submit(priority).result() == min(19, own + 3)
    assert background_executor("equal", 0).submit(priority).result() == own
    assert priority() == own


def test_a_search_for_most_of_a_graph_answers_where_hnswlib_reaches_too_few(monkeypatch):
    """Rows of very different norms in the ip space leave items out of every search, and
    hnswlib raises when asked for more than it reaches: the index then scores every row (the
    exact top k, best first), or, for a graph too large for that, answers with fewer."""
    import index_sync.hnsw as hnsw

    rng = np.random.default_rng(0)
    n, dim = 1200, 17
    rows = (rng.normal(size=(n, 4)) @ rng.normal(size=(4, dim))
            * np.exp(rng.normal(size=(n, 1))))
    index = ItemIndex.build(ids_of(n), rows, version=1, model_version=1, params=HnswParams(),
                            seed=0)
    query = rng.normal(size=dim)
    with pytest.raises(RuntimeError):
        index.graph.knn_query(query.astype(np.float32), k=1150)
    labels, scores = index.search_labels(query, 1150)
    np.testing.assert_array_equal(labels, exact_top_k(rows, query, 1150))
    np.testing.assert_allclose(scores, rows[labels] @ query, rtol=1e-4, atol=1e-3)
    assert len(index.search(query, 1100, exclude={"i0", "i1"})) == 1100
    monkeypatch.setattr(hnsw, "EXACT_FALLBACK_ROWS", 1000)
    labels, _ = index.search_labels(query, 1150)
    assert 0 < len(labels) < 1150 and len(set(labels.tolist())) == len(labels)

    def fails(*args, **kwargs):
        raise RuntimeError("another error")

    monkeypatch.setattr(index, "graph", SimpleNamespace(knn_query=fails))
    with pytest.raises(RuntimeError, match="another"):  # not taken for too few reached
        index.search_labels(query, 10)


def test_closing_the_rebuilder_stops_a_build_under_way_between_blocks_of_rows(tmp_path,
                                                                            monkeypatch,
                                                                            caplog):
    """hnswlib cannot be interrupted inside a call, so a build adds its rows in blocks and
    asks before each whether to go on: closing gives a build under way up at its next block,
    and waits for it, so that nothing writes the index folder once the worker lets its data
    dir go. No version is written, and giving up is not a failure."""
    import logging

    import index_sync.hnsw as hnsw

    monkeypatch.setattr(hnsw, "ADD_BLOCK_ROWS", 100)
    n = 40_000
    holder = IndexHolder()
    rebuilder = IndexRebuilder(tmp_path, holder, RebuildPolicy(interval_s=3600))
    caplog.set_level(logging.INFO, logger="index_sync.swap")
    running = rebuilder.submit(Snapshot(ids_of(n), model_like(n), model_version=1))
    time.sleep(0.5)
    assert rebuilder.building
    rebuilder.close()
    assert running.done() and running.result() is None
    assert holder.version is None and version_dirs(tmp_path) == []
    assert rebuilder.failures == 0
    stopped = [r.getMessage() for r in caplog.records if "given up" in r.getMessage()]
    done, total = map(int, stopped[0].split("stopped after ")[1].split(" rows")[0].split(" of "))
    assert 0 < done < total == n


def test_fresh_items_their_quota_left_out_fill_what_other_clusters_lack():
    """Equal quotas (α = 0) over a large and a small group, and many items new since the build,
    all nearest the large one: its quota takes the best of them; the small group runs dry,
    and what it hands on goes to the best items left anywhere, those fresh ones included
    (before, only the graphs were searched again: the answer came back short)."""
    rng = np.random.default_rng(4)
    big = np.c_[rng.normal(-5.0, 0.1, (20, 2)), np.zeros(20)]
    small = np.c_[rng.normal(5.0, 0.1, (4, 2)), np.zeros(4)]
    ids = [f"b{n}" for n in range(20)] + [f"s{n}" for n in range(4)]
    index = ClusteredIndex.build(ids, np.vstack([big, small]), 2, version=1, model_version=0)
    big_cluster = index.cluster_of["b0"]
    fresh = [(f"new{n}", 50.0 - n, big_cluster) for n in range(30)]
    query = np.array([-1.0, -1.0, 0.0])
    found = index.search(query, 40, diversity=0.0, fresh=fresh)
    items = [item for item, _ in found]
    assert len(items) == len(set(items)) == 40
    assert {f"new{n}" for n in range(30)} <= set(items)  # they outscore every indexed item
    assert [score for _, score in found] == sorted((score for _, score in found), reverse=True)
    assert len(index.search(query, 60, diversity=0.0, fresh=fresh)) == 54  # all there is


def test_new_rows_leave_the_places_of_moved_rows_to_them(tmp_path):
    """The rows scored beside the graph, at most ``stale_limit``, are the rows moved since the
    snapshot among those the index holds: new rows, scored apart as appended, took every
    place once as many had come (a replay, a cold start), and an item that moved to be the
    query's best was no longer found."""
    from models.learner import ItemLearner, LearnerConfig
    from index_sync.serving import IndexConfig, ServingIndex

    dim, rng = 8, np.random.default_rng(0)
    learner = ItemLearner(LearnerConfig(dim=dim))

    def add(ids):
        learner.assign(ids, np.hstack([0.1 * rng.normal(size=(len(ids), dim)),
                                       np.zeros((len(ids), 1))]))

    ids = ids_of(2000)
    add(ids)
    serving = ServingIndex(learner, IndexConfig(
        root=tmp_path, stale_limit=5,
        policy=RebuildPolicy(interval_s=1e9, min_items=1, backlog_events=0,
                             changed_items=10**9)))
    serving.learned(ids, learner.rows_of(ids))
    assert serving.maybe_rebuild(0)
    serving.rebuilder._running.result(60)
    query = np.append(np.eye(dim)[0], 1.0)
    learner.assign(["i7"], np.append(5 * np.eye(dim)[0], 0.0)[None, :])  # the best, by far
    serving.learned(["i7"], [7])
    new = ids_of(5, prefix="new")
    add(new)
    serving.learned(new, learner.rows_of(new))
    rows, version = serving.retrieve(query, 10, np.empty(0, dtype=np.int64))
    assert version == 1 and 7 in rows.tolist()
    assert serving._overflowing()  # 5 new rows and 1 moved: one more than the limit


def test_moved_rows_split_anew_keep_each_rows_last_move_in_note_order():
    """Oracle: after any notes and splits, the rows under the split, newest move first,
    are those of one list of last moves filtered, as a single dict kept them (in any order
    among the rows of one note)."""
    from index_sync.serving import _MovedRows

    rng = np.random.default_rng(3)
    moved, oracle = _MovedRows(), {}
    for stamp in range(1, 200):
        rows = rng.integers(0, 50, size=int(rng.integers(0, 6))).tolist()
        moved.note(rows, stamp)
        for row in rows:
            oracle.pop(row, None)
            oracle[row] = stamp
        if rng.random() < 0.3:
            moved.split_at(int(rng.integers(0, 60)))
        mark = int(rng.integers(0, stamp + 1))
        if rng.random() < 0.1:
            moved.forget_until(mark)
            oracle = {row: s for row, s in oracle.items() if s > mark}
        expected = [row for row, s in reversed(oracle.items()) if s > mark and row < moved.below]
        held = list(moved.held_after(mark))
        assert sorted(held) == sorted(expected)
        assert [oracle[row] for row in held] == [oracle[row] for row in expected]


def serving_over(tmp_path, items: int, **policy):
    """A ``ServingIndex`` over a learner of ``items`` random rows (dimension 4), every row
    noted as learned."""
    from models.learner import ItemLearner, LearnerConfig
    from index_sync.serving import IndexConfig, ServingIndex

    learner = ItemLearner(LearnerConfig(dim=4))
    ids = ids_of(items)
    learner.assign(ids, np.random.default_rng(0).normal(size=(items, 5)))
    serving = ServingIndex(learner, IndexConfig(root=tmp_path, stale_limit=10, policy=RebuildPolicy(
        min_items=1, backlog_events=0, build_share=1.0, **policy)))
    serving.learned(ids, np.arange(items))
    return learner, serving


def test_a_failed_build_gives_its_changed_items_back_and_a_quiet_stream_still_rebuilds(
        tmp_path, monkeypatch):
    """A build that fails (a full disk) took the changed items with it: with no event after
    it, no build fell due again, though more rows had moved than answers score exactly."""
    from index_sync import swap

    learner, serving = serving_over(tmp_path, 300, interval_s=60, changed_items=10_000)
    assert serving.maybe_rebuild(0)
    serving.rebuilder._running.result(60)
    moved = np.arange(50)
    learner.assign(learner.item_ids_at(moved), np.ones((50, 5)))
    serving.learned(learner.item_ids_at(moved), moved)
    real = swap.write_version

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(swap, "write_version", full_disk)
    assert serving.maybe_rebuild(1)
    serving.rebuilder._running.result(60)
    assert serving.rebuilder.failures == 1 and serving.version == 1
    monkeypatch.setattr(swap, "write_version", real)
    serving.rebuilder.resting_until = 0
    assert serving.maybe_rebuild(2)
    serving.rebuilder._running.result(60)
    assert serving.version == 2


def test_the_version_read_at_start_is_let_go_once_another_serves(tmp_path):
    """Kept for its identity, it held its graph, ids and positions for the life of the
    worker (about 100 MB at 200,000 items)."""
    import gc
    import weakref

    _, first = serving_over(tmp_path, 500, interval_s=0)
    assert first.maybe_rebuild(0)
    first.rebuilder._running.result(60)
    first.close()
    learner, serving = serving_over(tmp_path, 500, interval_s=0)
    assert serving.load_existing()
    loaded = weakref.ref(serving.holder.current)
    for step in range(2):
        learner.assign(["i1"], np.ones((1, 5)))
        serving.learned(["i1"], [1])
        serving.rebuilder.resting_until = 0
        assert serving.maybe_rebuild(step + 1)
        serving.rebuilder._running.result(60)
    assert serving.version == 3
    gc.collect()
    assert loaded() is None
