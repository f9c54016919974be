"""The responder on a serving index: same answers as exact search, new items retrievable at
once, the index version reported, rebuilds aside, and the newest version loaded on restart."""

from __future__ import annotations

import time
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

from state.history import History
from stream_app import engine as engine_module
from stream_app.engine import Engine
from stream_app.settings import Settings
from stream_app.wire import RecRequest

from .test_engine_model import planted_stream, run_stream


def engine_with_index(tmp_path, **changes) -> Engine:
    settings = Settings(**{"data_dir": tmp_path, "popularity_refresh_s": 0, "model_dim": 16,
                           "index_min_items": 10, "index_changed_items": 50,
                           "index_interval_s": 3600, **changes})
    return Engine(settings)


def build_now(engine: Engine) -> None:
    engine.index.rebuilder.last_snapshot_at = 0.0  # due by age
    engine.index.rebuilder.resting_until = 0.0  # and not resting after a previous build
    assert engine.maybe_rebuild_index()
    engine.index.rebuilder._running.result(60)


def answer(engine, user, history, k=10, **fields):
    return engine.answer(RecRequest(request_id="r", user_id=user, k=k, **fields), history,
                         time.perf_counter())


def test_index_answers_equal_exact_search_and_name_their_version(tmp_path):
    engine = engine_with_index(tmp_path)
    histories = run_stream(engine, planted_stream())
    exact = {user: answer(engine, user, histories[user]) for user in ("u1", "u2", "u9")}
    assert all(a.index_version is None for a in exact.values())
    build_now(engine)
    assert engine.index.version == 1 and (tmp_path / "index" / "v1" / "manifest.json").exists()
    for user, before in exact.items():
        after = answer(engine, user, histories[user])
        assert after.index_version == 1
        assert [i.item_id for i in after.items] == [i.item_id for i in before.items]
        assert [i.score for i in after.items] == pytest.approx([i.score for i in before.items])


def test_an_item_learned_after_the_build_is_retrievable_at_once(tmp_path):
    engine = engine_with_index(tmp_path)
    histories = run_stream(engine, planted_stream())
    build_now(engine)
    phi = engine.user_vector(RecRequest(request_id="r", user_id="u1"), histories["u1"])
    row = np.append(3 * phi / np.linalg.norm(phi), 2.0)  # the best match for u1 by far
    engine.learner.assign(["new-star"], row[None, :])
    assert "new-star" not in engine.index.current
    reply = answer(engine, "u1", histories["u1"])
    assert reply.index_version == 1
    assert reply.items[0].item_id == "new-star" and reply.items[0].source == "ann"


def test_an_item_that_moved_after_the_build_is_retrieved_with_its_new_vector(tmp_path):
    """The snapshot holds the item's old vector (far from u1); learning moves it to u1's best
    match. The graph search alone would not find it; the exact scoring of moved rows does,
    and once a newer index holds the move, the moved rows are forgotten."""
    engine = engine_with_index(tmp_path)
    histories = run_stream(engine, planted_stream())
    build_now(engine)
    phi = engine.user_vector(RecRequest(request_id="r", user_id="u1"), histories["u1"])
    scores = engine.learner.scores(phi)
    scores[engine.learner.rows_of(histories["u1"].items)] = np.inf
    row = int(np.argmin(scores))  # u1's worst item: far outside the graph's 64 candidates
    mover = engine.learner.item_ids_at([row])[0]
    before = answer(engine, "u1", histories["u1"], k=5)
    assert mover not in [item.item_id for item in before.items]
    engine.learner._psi[row] = np.append(3 * phi / np.linalg.norm(phi), 2.0)
    engine.learner.steps += 1  # a learning step moved it, and Engine.learn reports:
    engine.index.learned([mover], [row])
    reply = answer(engine, "u1", histories["u1"], k=5)
    assert reply.index_version == 1 and reply.items[0].item_id == mover
    engine.learner.steps += 1
    engine.index.learned([], np.arange(len(engine.learner)))  # every row moved
    rows, _ = engine.index.retrieve(np.append(phi, 1.0), 64, np.empty(0, dtype=np.int64))
    assert len(rows) == len(set(rows.tolist())) >= 64  # found by the graph and exactly: once
    build_now(engine)
    assert engine.index.version == 2 and len(engine.index._rows_moved_since(
        engine.index._snapshot_mark(engine.index.current))) == 0
    assert answer(engine, "u1", histories["u1"], k=5).items[0].item_id == mover


def worst_item_of(engine: Engine, history) -> tuple[int, np.ndarray]:
    """The row of u1's worst item (far outside what the graph returns for u1) and u1's φ."""
    phi = engine.user_vector(RecRequest(request_id="r", user_id="u1"), history)
    scores = engine.learner.scores(phi)
    scores[engine.learner.rows_of(history.items)] = np.inf
    return int(np.argmin(scores)), phi


def test_a_row_installed_after_the_build_at_the_same_step_is_retrieved_with_its_new_vector(
        tmp_path):
    """Another worker's row (item sharing) is installed without a learning step, so at the
    step of the serving version's snapshot: it still counts as moved since, is scored exactly
    beside the graph, stays so through the next step, and an update in place takes it."""
    engine = engine_with_index(tmp_path, index_update_share=1.0)
    stream = planted_stream()
    histories = run_stream(engine, stream[:-40])
    build_now(engine)
    assert engine.index.current.manifest.model_version == engine.learner.steps
    row, phi = worst_item_of(engine, histories["u1"])
    mover = engine.learner.item_ids_at([row])[0]
    assert mover not in [item.item_id for item in answer(engine, "u1", histories["u1"]).items]
    engine.install_rows([mover], np.append(3 * phi / np.linalg.norm(phi), 2.0)[None, :],
                        np.zeros((1, engine.settings.model_dim)))
    assert answer(engine, "u1", histories["u1"], k=5).items[0].item_id == mover
    histories = run_stream(engine, stream[-40:], histories=histories)  # a step, other rows
    assert mover in [item.item_id for item in answer(engine, "u1", histories["u1"]).items]
    build_now(engine)
    index = engine.index.current
    assert index.version == 2 and engine.index.rebuilder.updates == 1
    np.testing.assert_allclose(index.graph.get_items([row], return_type="numpy")[0],
                               engine.learner.item_matrix[row], rtol=1e-5, atol=1e-5)


def test_a_build_after_rows_were_installed_holds_them_though_no_step_came_between(tmp_path):
    """Installs alone (a start's catch-up of other workers' rows, or partitions that learn
    nothing): the next build holds the installed rows, so they stop being scored beside it
    and no longer make builds due again and again."""
    engine = engine_with_index(tmp_path, index_stale_limit=20)
    run_stream(engine, planted_stream())
    build_now(engine)
    ids = engine.learner.item_ids[:30]
    rows = engine.learner.item_matrix[engine.learner.rows_of(ids)]
    engine.install_rows(list(ids), rows + 0.01, np.zeros((30, engine.settings.model_dim)))
    assert engine.index._overflowing()  # 30 moved rows, 20 scored exactly
    build_now(engine)
    index = engine.index.current
    assert index.version == 2 and index.manifest.model_version == engine.learner.steps
    assert not engine.index._overflowing()
    assert sum(len(rows) for rows, _ in engine.index._scored_exactly(index)) == 0


def test_a_version_newer_than_the_checkpoint_scores_the_rows_moved_since_the_restart(tmp_path):
    """A crash after a version was written but before the checkpoint caught up: the learner
    restarts at an older step than the version's snapshot. A row its first step moves is
    scored exactly beside the graph, though that step is below the version's."""
    engine = engine_with_index(tmp_path)
    stream = planted_stream()
    histories = run_stream(engine, stream[:-600])
    engine.save()
    histories = run_stream(engine, stream[-600:], histories=histories)
    build_now(engine)
    engine.index.close()
    restarted = engine_with_index(tmp_path)
    assert restarted.load() and restarted.index.version == 1
    assert restarted.learner.steps < restarted.index.current.manifest.model_version
    row, phi = worst_item_of(restarted, histories["u1"])
    mover = restarted.learner.item_ids_at([row])[0]
    restarted.learner._psi[row] = np.append(3 * phi / np.linalg.norm(phi), 2.0)
    restarted.learner.steps += 1  # a learning step moved it, and Engine.learn reports:
    restarted.index.learned([mover], [row])
    assert answer(restarted, "u1", histories["u1"], k=5).items[0].item_id == mover


def test_the_rows_scored_beside_the_graph_are_ranked_by_their_vectors_after_each_step(
        tmp_path):
    """Oracle for the block of moved and new rows that answers score exactly (gathered once
    per learner step): after every further step, the exact part of a retrieval is the brute
    force top n of those rows by their current vectors, ties to the lower row, excluded rows
    left out; their count is the ``streamrec_index_exact_rows`` gauge."""
    engine = engine_with_index(tmp_path)
    stream = planted_stream()
    histories = run_stream(engine, stream[:-60])
    build_now(engine)
    index = engine.index.current
    query = np.append(engine.user_vector(RecRequest(request_id="r", user_id="u1"),
                                         histories["u1"]), 1.0)
    for start in range(-60, 0, 20):
        histories = run_stream(engine, stream[start:start + 20 or None], histories=histories)
        moved = engine.index._moved_after(engine.index._snapshot_mark(index))
        stale = np.union1d(np.fromiter(moved, dtype=np.int64),
                           np.arange(len(index), len(engine.learner)))
        assert len(stale) > 12
        excluded = set(stale[:3].tolist())
        scores = engine.learner.item_matrix[stale] @ query
        order = stale[np.lexsort((stale, -scores))]
        expected = [row for row in order.tolist() if row not in excluded][:5]
        assert engine.index._fresh(index, query, 5, excluded).tolist() == expected
        assert engine.index.stats(time.time())["exact_rows"] == len(stale)  # the gauge


def test_a_rebuild_falls_due_once_more_rows_moved_than_answers_score_exactly(tmp_path):
    """Neither the learned items (``index_changed_items``) nor the interval make a build due
    here; the rows that moved since the serving snapshot do, from the first step after which
    they outnumber the stale limit (counted by comparing every row with its snapshot), since
    answers find the rest only by their snapshot vectors."""
    limit = 100
    engine = engine_with_index(tmp_path, index_changed_items=10**6, index_stale_limit=limit,
                               index_build_share=1.0)
    stream = planted_stream()
    histories = run_stream(engine, stream[:-60])
    build_now(engine)
    snapshot = engine.learner.item_matrix.copy()
    due = []
    for start in range(-60, 0, 5):
        histories = run_stream(engine, stream[start:start + 5 or None], histories=histories)
        current = engine.learner.item_matrix
        moved = (np.any(current[:len(snapshot)] != snapshot, axis=1).sum()
                 + len(current) - len(snapshot))
        due.append((moved > limit, engine.maybe_rebuild_index()))
        if due[-1][1]:
            break
    assert due[0] == (False, False) and due[-1] == (True, True)
    assert all(expected == built for expected, built in due)
    engine.index.rebuilder._running.result(60)
    assert engine.index.version == 2


def test_a_rebuild_falls_due_once_more_rows_are_missing_than_the_stale_limit(tmp_path):
    """Rows new since the build are scored by every answer, all of them: past the stale
    limit a build falls due, as for moved rows (a cold replay at a million items added
    hundreds of thousands between builds, each answer gathering them again)."""
    limit = 100
    engine = engine_with_index(tmp_path, index_changed_items=10**6, index_stale_limit=limit,
                               index_build_share=1.0)
    run_stream(engine, planted_stream())
    build_now(engine)
    rng = np.random.default_rng(0)

    def new_items(ids):  # met without a learning step that moves other rows
        engine.learner.assign(ids, rng.normal(size=(len(ids), engine.settings.model_dim + 1)))
        engine.index.learned(ids)

    new_items([f"new-{n}" for n in range(limit)])
    assert not engine.maybe_rebuild_index()  # as many as the limit: scored beside the graph
    new_items(["one-more"])
    assert engine.maybe_rebuild_index()
    engine.index.rebuilder._running.result(60)
    assert engine.index.version == 2


def test_rows_appended_since_the_build_are_scored_from_the_learners_own_rows(tmp_path):
    """New rows are not gathered into the block of moved rows at every step (0.3 s of the
    first answer after each step at 500,000 new rows): answers score them from a view of the
    learner's rows, so with their vectors as they are now, noted or not."""
    engine = engine_with_index(tmp_path)
    run_stream(engine, planted_stream())
    build_now(engine)
    index = engine.index.current
    dim = engine.settings.model_dim + 1
    ids = [f"new-{n}" for n in range(50)]
    engine.learner.assign(ids, np.random.default_rng(0).normal(0.0, 0.01, (50, dim)))
    engine.index.learned(ids, engine.learner.rows_of(ids))
    (moved, _), (appended, vectors) = engine.index._scored_exactly(index)
    assert set(appended.tolist()) == set(engine.learner.rows_of(ids).tolist())
    assert not set(moved.tolist()) & set(appended.tolist())
    assert np.shares_memory(vectors, engine.learner.item_matrix)  # not a copy
    query = np.r_[1.0, np.zeros(dim - 1)]
    engine.learner.assign(["new-7"], -100.0 * query[None, :])
    engine.index.learned(["new-7"], engine.learner.rows_of(["new-7"]))
    nothing = np.empty(0, dtype=np.int64)
    row = engine.learner.rows_of(["new-7"])[0]
    assert row not in engine.index.retrieve(query, 5, nothing)[0]
    engine.learner.assign(["new-7"], 100.0 * query[None, :])  # moved without a note
    rows, version = engine.index.retrieve(query, 5, nothing)
    assert version == index.version and row in rows
    assert engine.index.stats(time.time())["exact_rows"] >= 50


def test_a_version_after_a_few_steps_updates_the_served_one_and_answers_as_exact_search(
        tmp_path):
    """After more learning steps the next version is the served one with the rows moved since
    its snapshot (and the new items) updated in place; it answers as exact search does, and
    no moved row is left to score beside it."""
    engine = engine_with_index(tmp_path, index_update_share=1.0)
    stream = planted_stream()
    histories = run_stream(engine, stream[:-40])
    build_now(engine)
    base_rows = len(engine.index.current)
    histories = run_stream(engine, stream[-40:], histories=histories)
    moved = engine.index._moved_after(engine.index._snapshot_mark(engine.index.current))
    assert len(list(moved)) > 0
    build_now(engine)
    index = engine.index.current
    assert engine.index.rebuilder.updates == 1 and index.version == 2
    assert 0 < index.manifest.updated_rows and len(index) == len(engine.learner) >= base_rows
    assert len(engine.index._rows_moved_since(engine.index._snapshot_mark(index))) == 0
    stored = index.graph.get_items(np.arange(len(index)), return_type="numpy")  # as they are
    np.testing.assert_allclose(stored, engine.learner.item_matrix, rtol=1e-5, atol=1e-5)
    engine.index.config = replace(engine.index.config, enabled=False)
    exact = {user: answer(engine, user, histories[user]) for user in ("u1", "u2", "u9")}
    engine.index.config = replace(engine.index.config, enabled=True)
    for user, before in exact.items():
        after = answer(engine, user, histories[user])
        assert after.index_version == 2
        assert [i.item_id for i in after.items] == [i.item_id for i in before.items]


def test_a_build_reads_the_live_rows_and_a_row_moved_meanwhile_is_searched_exactly(tmp_path):
    """The snapshot is a view of the learner's rows, not a copy (a copy stalled the event loop
    for a second at a million items). A row that moves after the snapshot was taken is read
    by the build as it is then, and searched exactly beside that build all the same."""
    engine = engine_with_index(tmp_path)
    histories = run_stream(engine, planted_stream())
    held = []
    engine.index.rebuilder.submit = held.append  # take the snapshot, hold the build
    engine.index.rebuilder.last_snapshot_at = 0.0
    assert engine.maybe_rebuild_index()
    (snapshot,) = held
    assert np.shares_memory(snapshot.vectors, engine.learner._psi)
    assert len(snapshot.ids) == len(snapshot.vectors) == len(engine.learner)
    phi = engine.user_vector(RecRequest(request_id="r", user_id="u1"), histories["u1"])
    scores = engine.learner.scores(phi)
    scores[engine.learner.rows_of(histories["u1"].items)] = np.inf
    row = int(np.argmin(scores))
    mover = engine.learner.item_ids_at([row])[0]
    engine.learner._psi[row] = np.append(3 * phi / np.linalg.norm(phi), 2.0)  # a step moves it
    engine.learner.steps += 1
    engine.index.learned([mover], [row])
    del engine.index.rebuilder.submit  # the real one again
    engine.index.rebuilder.submit(snapshot).result(60)
    assert engine.index.version == 1
    assert row in engine.index._rows_moved_since(
        engine.index._snapshot_mark(engine.index.current))
    assert answer(engine, "u1", histories["u1"], k=5).items[0].item_id == mover


def test_the_learner_reports_every_row_a_step_moved(tmp_path):
    engine = engine_with_index(tmp_path)
    run_stream(engine, planted_stream()[:600])
    before = engine.learner.item_matrix.copy()
    examples = [taken[1] for taken in (engine.ingest(event, History())
                                       for event in planted_stream(1)[:40])]
    engine.learn(examples)
    after = engine.learner.item_matrix[:len(before)]
    moved = np.flatnonzero(np.any(after != before, axis=1))
    assert set(moved.tolist()) <= set(engine.learner.changed_rows.tolist())
    assert len(moved) > 40 // 4  # the batch's items and the sweep's


def test_an_index_in_another_order_than_the_learner_answers_the_same(tmp_path):
    """An index whose labels are not the learner's rows (a version another worker wrote, items
    in another order, one of them unknown here) maps its labels to rows and still answers as
    exact search does, items it lacks coming from the exact pass over the rest."""
    engine = engine_with_index(tmp_path)
    histories = run_stream(engine, planted_stream())
    exact = {user: answer(engine, user, histories[user]) for user in ("u1", "u2", "u9")}
    ids, rows = engine.learner.item_ids, engine.learner.item_matrix
    order = np.random.default_rng(0).permutation(len(ids))[: len(ids) - 3]  # 3 left out
    shuffled = [ids[i] for i in order] + ["only-in-the-index"]
    vectors = np.vstack([rows[order], np.zeros((1, rows.shape[1]))])
    engine.index.holder.swap(engine.index.rebuilder.build(shuffled, vectors, model_version=0))
    for user, before in exact.items():
        after = answer(engine, user, histories[user])
        assert after.index_version == engine.index.version
        assert [i.item_id for i in after.items] == [i.item_id for i in before.items]
        assert "only-in-the-index" not in {i.item_id for i in after.items}


@pytest.mark.parametrize("clusters", [0, 4])
def test_items_of_the_index_the_learner_lacks_do_not_shorten_what_the_graph_gives(tmp_path,
                                                                                clusters):
    """A version read from disk may hold items the learner does not (learned after its
    checkpoint, before a crash): the search asks for as many more as it drops (up to as
    many as the request's)."""
    engine = engine_with_index(tmp_path, index_clusters=clusters)
    histories = run_stream(engine, planted_stream())
    ids, rows = engine.learner.item_ids, engine.learner.item_matrix
    phi = engine.user_vector(RecRequest(request_id="r", user_id="u1"), histories["u1"])
    query = np.append(phi, 1.0)
    unknown = np.tile(np.append(5 * phi / np.linalg.norm(phi), 3.0), (8, 1))  # the best
    engine.index.holder.swap(engine.index.rebuilder.build(
        ids + [f"gone-{k}" for k in range(8)], np.vstack([rows, unknown]),
        model_version=engine.learner.steps))  # nothing moved since: the graph alone answers
    found, version = engine.index.retrieve(query, 10, np.empty(0, dtype=np.int64))
    assert version == engine.index.version and len(found) == 10
    if not clusters:  # a clustered index's quotas may pick others than the exact best
        np.testing.assert_array_equal(np.sort(found), np.sort(engine.learner.top_rows(
            phi, 10, np.empty(0, dtype=np.int64))[0]))


def test_a_graph_search_that_reaches_too_few_items_is_filled_by_exact_search(tmp_path,
                                                                            monkeypatch):
    """hnswlib raises where a search reaches fewer items than asked for, and a graph too
    large to score whole then answers with what it reached: the answer is filled from the
    exact search over every item, so it is the exact answer, k items long, and counted."""
    import index_sync.hnsw as hnsw

    engine = engine_with_index(tmp_path)
    histories = run_stream(engine, planted_stream())
    exact = answer(engine, "u1", histories["u1"], k=20)
    build_now(engine)
    monkeypatch.setattr(hnsw, "EXACT_FALLBACK_ROWS", 0)
    graph = engine.index.current.graph
    reached = 7  # what a search of this graph reaches

    def knn_query(query, k):
        if k > reached:
            raise RuntimeError("Cannot return the results in a contiguous 2D array. "
                               "Probably ef or M is too small")
        return graph.knn_query(query, k=k)

    monkeypatch.setattr(engine.index.current, "graph", SimpleNamespace(knn_query=knn_query))
    assert 0 < len(engine.index.current.search_labels(np.ones(17), 20)[0]) <= reached
    filled = answer(engine, "u1", histories["u1"], k=20)
    assert filled.index_version == 1 and len(filled.items) == 20
    assert [i.item_id for i in filled.items] == [i.item_id for i in exact.items]
    assert engine.index.stats(time.time())["filled_answers"] == 1


def test_rebuilds_happen_aside_when_enough_items_changed_and_load_after_restart(tmp_path):
    engine = engine_with_index(tmp_path)
    histories = run_stream(engine, planted_stream())
    assert engine.maybe_rebuild_index()  # 180 items changed >= 50
    assert not engine.maybe_rebuild_index() or engine.index.rebuilder.building is False
    engine.index.rebuilder._running.result(60)
    assert engine.index.version == 1
    assert not engine.maybe_rebuild_index()  # nothing changed since the snapshot
    before = answer(engine, "u4", histories["u4"])
    engine.save()
    engine.index.close()

    restarted = engine_with_index(tmp_path)
    assert restarted.load() and restarted.index.version == 1
    after = answer(restarted, "u4", histories["u4"])
    assert after.index_version == 1
    assert [i.item_id for i in after.items] == [i.item_id for i in before.items]


def test_after_a_restart_the_first_build_is_from_scratch_and_due_at_once(tmp_path):
    """The version on disk came from a snapshot of another moment than the checkpoint, and
    the rows that moved in between were not kept across the restart: updated in place, they
    would keep their old vectors in the graph. The first build after a restart is due at the
    first check, whatever changed since, and built from scratch, holding every row as the
    learner has it."""
    engine = engine_with_index(tmp_path, index_update_share=1.0)
    stream = planted_stream()
    histories = run_stream(engine, stream[:-200])
    build_now(engine)
    histories = run_stream(engine, stream[-200:], histories=histories)  # rows move
    engine.save()
    engine.index.close()

    restarted = engine_with_index(tmp_path, index_update_share=1.0)
    assert restarted.load() and restarted.index.version == 1
    assert restarted.maybe_rebuild_index()  # nothing learned since the restart
    restarted.index.rebuilder._running.result(60)
    index = restarted.index.current
    assert index.version == 2 and restarted.index.rebuilder.updates == 0
    stored = index.graph.get_items(np.arange(len(index)), return_type="numpy")
    order = np.argsort(index.ids)
    rows = restarted.learner.rows_of([index.ids[k] for k in order])
    np.testing.assert_allclose(stored[order], restarted.learner.item_matrix[rows],
                               rtol=1e-5, atol=1e-5)
    assert not restarted.maybe_rebuild_index()  # and then only when the policy says


def test_after_a_restart_builds_stay_from_scratch_until_one_replaces_the_loaded_version(
        tmp_path, monkeypatch):
    """A first build that fails (a full disk) leaves the version read at start serving: the
    next build is from scratch too, not an update that would keep that version's old rows."""
    from index_sync import swap

    engine = engine_with_index(tmp_path, index_update_share=1.0)
    stream = planted_stream()
    histories = run_stream(engine, stream[:-200])
    build_now(engine)
    run_stream(engine, stream[-200:], histories=histories)  # rows move
    engine.save()
    engine.index.close()

    restarted = engine_with_index(tmp_path, index_update_share=1.0)
    assert restarted.load() and restarted.index.version == 1
    write_version = swap.write_version

    def full_disk(*args, **kwargs):
        monkeypatch.setattr(swap, "write_version", write_version)  # this once
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(swap, "write_version", full_disk)
    build_now(restarted)
    assert restarted.index.rebuilder.failures == 1 and restarted.index.version == 1
    build_now(restarted)
    index = restarted.index.current
    assert index.version > 1 and restarted.index.rebuilder.updates == 0
    stored = index.graph.get_items(np.arange(len(index)), return_type="numpy")
    rows = restarted.learner.rows_of(index.ids)
    np.testing.assert_allclose(stored, restarted.learner.item_matrix[rows], rtol=1e-5,
                               atol=1e-5)


def test_a_restart_without_an_index_on_disk_builds_one_without_waiting_for_learning(
        tmp_path):
    """A model that no index version holds (written by ``streamrec bootstrap``, or whose
    versions were lost) is indexed at the first check: answers scanned the whole catalogue
    until something was learned."""
    engine = engine_with_index(tmp_path, index_enabled=False)
    run_stream(engine, planted_stream())
    engine.save()
    restarted = engine_with_index(tmp_path, index_changed_items=10**6)  # more than it has
    assert restarted.load() and restarted.index.version is None
    assert restarted.maybe_rebuild_index()  # neither the interval nor the count needed
    restarted.index.rebuilder._running.result(60)
    assert restarted.index.version == 1
    assert not restarted.maybe_rebuild_index()  # then as the policy says


def test_a_version_of_another_model_dimension_is_not_served(tmp_path):
    """After the model dimension changed (and its checkpoints went), the versions on disk
    cannot answer the new queries: the worker answers by exact search and builds anew."""
    engine = engine_with_index(tmp_path)
    histories = run_stream(engine, planted_stream())
    build_now(engine)
    engine.index.close()

    wider = engine_with_index(tmp_path, model_dim=32)
    assert not wider.index.load_existing() and wider.index.version is None
    run_stream(wider, planted_stream())
    assert answer(wider, "u4", histories["u4"]).index_version is None  # exact search
    build_now(wider)
    assert wider.index.version == 2 and wider.index.current.manifest.dim == 33


@pytest.mark.parametrize("learned_after_the_build", [0, 200])
def test_clustered_index_with_diversity(tmp_path, learned_after_the_build):
    """Quotas per cluster decide a diversity request's answer, also while rows moved since
    the build are scored beside the graphs (they took the answer back to the user's own
    cluster: c3 only, in a worker that learns)."""
    engine = engine_with_index(tmp_path, index_clusters=6)
    stream = planted_stream()
    cut = len(stream) - learned_after_the_build
    histories = run_stream(engine, stream[:cut])
    build_now(engine)
    histories = run_stream(engine, stream[cut:], histories=histories)
    moved = engine.index._rows_moved_since(engine.index._snapshot_mark(engine.index.current))
    assert len(moved) >= learned_after_the_build // 2
    user = "u3"  # cluster 3
    focused = answer(engine, user, histories[user], k=10, diversity=100.0)
    assert sum(i.item_id.startswith("c3-") for i in focused.items) >= 9
    spread = answer(engine, user, histories[user], k=12, diversity=0.0)
    clusters = {i.item_id.split("-")[0] for i in spread.items if i.source == "ann"}
    assert len(clusters) >= 4  # equal quotas reach other clusters
    assert spread.index_version == 1 and len(spread.items) == 12
    assert len({i.item_id for i in spread.items}) == 12


def test_a_diversity_requests_withdrawn_items_leave_it_as_if_the_request_excluded_them(
        tmp_path):
    """A diversity request takes exactly k from the index's cluster quotas: withdrawn items
    among them left it short. The index is now asked again without them, and the answer is
    the one the request gets when it excludes those items itself (the oracle), k long."""
    engine = engine_with_index(tmp_path, index_clusters=6)
    histories = run_stream(engine, planted_stream())
    build_now(engine)

    def ask(**fields) -> list[str]:
        return [item.item_id for item in answer(engine, "u3", histories["u3"], k=12,
                                                diversity=0.0, sources=["ann"], **fields).items]

    before = ask()
    withdrawn = before[::3]
    excluded_by_the_request = ask(exclude=withdrawn)
    engine.withdrawn = frozenset(withdrawn)
    during = ask()
    assert len(during) == 12 and not set(during) & set(withdrawn)
    assert during == excluded_by_the_request


@pytest.mark.parametrize("diversity, withdrawn_best", [(0.0, 64), (1.0, 64), (None, 20)])
def test_a_users_best_items_withdrawn_by_the_dozen_leave_every_answer_its_k(
        tmp_path, diversity, withdrawn_best):
    """A user's best 64 items withdrawn, in every cluster: each search found k more of them
    (a ``diversity`` request takes exactly k), and the answer came back short, or empty,
    while the catalogue held 100 more. The last search excludes every withdrawn item: the
    answer is the one the request gets when it excludes them itself (the oracle), k long.
    A plain request with its best 20 withdrawn ranked the 44 candidates left of the first
    search, worse ones (4 of the oracle's 10): its searches now go on until its pool is
    three quarters full."""
    engine = engine_with_index(tmp_path, index_clusters=6)
    histories = run_stream(engine, planted_stream())
    build_now(engine)

    def ask(k: int, **fields) -> list[str]:
        return [item.item_id for item in answer(engine, "u1", histories["u1"], k=k,
                                                diversity=diversity, sources=["ann"],
                                                **fields).items]

    best = [item.item_id for item in answer(engine, "u1", histories["u1"], k=1000,
                                            sources=["ann"]).items]
    assert len(best) >= 64 + 10
    withdrawn = best[:withdrawn_best]
    excluded_by_the_request = ask(10, exclude=withdrawn)
    engine.withdrawn = frozenset(withdrawn)
    during = ask(10)
    assert len(during) == 10 and not set(during) & set(withdrawn)
    assert during == excluded_by_the_request
    if diversity is None:  # a plain request's pool: not left to what the first search kept
        engine.withdrawn = frozenset(best[::2])  # across the ranking: each search finds more
        rest = [item for item in best if item not in engine.withdrawn]
        assert sorted(ask(len(rest))) == sorted(rest)


@pytest.mark.parametrize("diversity, withdrawn_best", [(0.0, 64), (None, 100)])
def test_more_withdrawn_than_a_search_excludes_leave_the_answer_to_an_exact_search(
        tmp_path, monkeypatch, diversity, withdrawn_best):
    """Past WITHDRAWN_EXCLUDED_AT_MOST withdrawn items the last search excludes only those
    found; a user whose best items were all withdrawn (a whole category, for one) then got
    an empty ``ann`` answer, or popular items alone. An answer still short after the last
    search is now made by exact search without them: k long, the exact oracle's items."""
    monkeypatch.setattr(engine_module, "WITHDRAWN_EXCLUDED_AT_MOST", 30)
    # a plain request's pool of 20 (a diversity's: k) is short after three searches of it,
    # in a graph without clusters (a clustered index's plain search reaches other clusters)
    engine = engine_with_index(tmp_path, index_clusters=6 if diversity is not None else 0,
                               rerank_candidates=20)
    histories = run_stream(engine, planted_stream())
    build_now(engine)
    best = [item.item_id for item in answer(engine, "u1", histories["u1"], k=1000,
                                            sources=["ann"]).items]
    assert len(best) >= withdrawn_best + 10
    engine.withdrawn = frozenset(best[:withdrawn_best])
    during = answer(engine, "u1", histories["u1"], k=10, diversity=diversity, sources=["ann"])
    got = [item.item_id for item in during.items]
    assert len(got) == 10 and not set(got) & engine.withdrawn
    assert during.index_version is None  # exact search
    assert got == best[withdrawn_best:withdrawn_best + 10]  # the ranking after the withdrawn


def test_diversity_is_refused_without_clusters_and_plain_until_the_first_clustered_build(
        tmp_path):
    """A worker that builds no clustered index cannot honour a ``diversity``: the request
    gets an error, not an answer from a k-wide pool without Deep Retrieval. One that builds
    them answers it as a plain request until the first is built."""
    from stream_app.wire import InvalidMessage

    plain = engine_with_index(tmp_path / "plain")
    with pytest.raises(InvalidMessage, match="clustered index"):
        plain.check_request(RecRequest(request_id="r", user_id="u3", diversity=0.0))
    engine = engine_with_index(tmp_path / "clustered", index_clusters=6)
    histories = run_stream(engine, planted_stream())
    engine.check_request(RecRequest(request_id="r", user_id="u3", diversity=0.0))
    assert engine.index.current is None
    diverse = answer(engine, "u3", histories["u3"], k=12, diversity=0.0)
    assert diverse.items == answer(engine, "u3", histories["u3"], k=12).items


def test_a_diversity_request_decided_plain_stays_plain_when_the_first_clustered_index_swaps_in(
        tmp_path, monkeypatch):
    """Builds swap in on their own thread: one may land between the answer's look at the
    serving index (none clustered yet: a plain request, ``rerank_candidates`` wide) and the
    retrieval. The retrieval then searches the clustered index as for a plain request, not
    by the quotas with a pool sized for a plain one."""
    engine = engine_with_index(tmp_path, index_clusters=6)
    histories = run_stream(engine, planted_stream())
    learner = engine.learner
    built = engine.index.rebuilder.build(learner.item_ids, learner.item_matrix,
                                         model_version=learner.steps)
    wanted = engine._candidates_wanted

    def swapped_meanwhile(request, diverse):
        engine.index.holder.swap(built)
        return wanted(request, diverse)

    monkeypatch.setattr(engine, "_candidates_wanted", swapped_meanwhile)
    raced = answer(engine, "u3", histories["u3"], k=12, diversity=0.0)
    monkeypatch.undo()
    assert raced.index_version == engine.index.version == built.version
    assert raced.items == answer(engine, "u3", histories["u3"], k=12).items


def test_a_clustered_version_built_here_is_placed_among_the_rows_without_a_lookup_per_item(
        tmp_path, monkeypatch):
    """Its ids are compared with the learner's first rows, as a single index's are: looking
    every id up took about a second at a million items, on the event loop, at the first
    answer after each swap. One read from disk (or another learner's) is looked up, and its
    missing rows equal a check of every row."""
    from index_sync.clusters import ClusteredIndex
    from index_sync.serving import _Coverage

    engine = engine_with_index(tmp_path, index_clusters=6)
    run_stream(engine, planted_stream())
    build_now(engine)
    index, learner = engine.index.current, engine.learner
    engine.learner.assign(["learned-since"], np.ones((1, learner.item_matrix.shape[1])))
    with monkeypatch.context() as patched:
        patched.setattr(learner, "rows_of", lambda ids: pytest.fail("looked up every id"))
        patched.setattr(ClusteredIndex, "__contains__",
                        lambda self, item: pytest.fail("looked up every row"))
        coverage = _Coverage.of(index, learner)
    assert coverage.covered == len(index) == len(learner) - 1 and len(coverage.missing) == 0

    ids, rows = learner.item_ids, learner.item_matrix
    kept = np.random.default_rng(1).permutation(len(ids))[: len(ids) - 4]
    read = ClusteredIndex.build([ids[i] for i in kept], rows[kept], 3, version=9,
                                model_version=0)
    read.source_ids = None  # as a version read from disk
    coverage = _Coverage.of(read, learner)
    assert coverage.missing.tolist() == [row for row, item in enumerate(ids) if item not in read]
    assert coverage.covered == len(ids)


def test_index_can_be_switched_off(tmp_path):
    engine = engine_with_index(tmp_path, index_enabled=False)
    histories = run_stream(engine, planted_stream())
    assert not engine.maybe_rebuild_index()
    assert answer(engine, "u1", histories["u1"]).index_version is None
    assert not np.any([p.name.startswith("v") for p in (tmp_path / "index").glob("*")])


def test_stage_latency_and_candidates_per_source_are_recorded(tmp_path):
    from stream_app.metrics import Metrics

    engine = engine_with_index(tmp_path)
    engine.metrics = Metrics()
    histories = run_stream(engine, planted_stream())
    build_now(engine)
    answer(engine, "u1", histories["u1"], k=10)
    answer(engine, "nobody", History(), k=4)  # popularity only
    value = engine.metrics.registry.get_sample_value
    assert value("streamrec_candidates_total", {"source": "ann"}) == \
        engine.settings.rerank_candidates
    assert value("streamrec_candidates_total", {"source": "popular"}) == 4
    for stage in ("embed", "ann", "merge"):
        assert value("streamrec_stage_seconds_count", {"stage": stage}) >= 1
    assert value("streamrec_stage_seconds_count", {"stage": "embed"}) == 2
