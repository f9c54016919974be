"""Deep Retrieval inside the engine: learned on the stream's micro-batches, M-steps run aside and
installed on the learning thread, and the ``dr`` source answering requests."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest

from state.history import History
from stream_app.engine import Engine
from stream_app.settings import Settings
from stream_app.wire import Event, RecRequest
from tests.test_engine_model import CLUSTERS, planted_stream, run_stream

DR = dict(dr_width=8, dr_depth=2, dr_paths_per_item=2, dr_beam=6, dr_top_s=6,
          dr_learning_rate=0.02, dr_m_step_events=10 ** 9, dr_m_step_interval_s=10 ** 6)


def make_engine(tmp_path, **changes) -> Engine:
    settings = Settings(data_dir=tmp_path, popularity_refresh_s=0, model_dim=16, model_seed=1,
                        **{**DR, **changes})
    return Engine(settings)


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    engine = make_engine(tmp_path_factory.mktemp("dr"))
    histories = run_stream(engine, planted_stream())
    histories = run_stream(engine, planted_stream(seed=1)) | histories  # a second pass
    assert engine.paths.run_m_step_now(timeout=60) is not None
    return engine, histories


def ask(engine: Engine, user: str, history: History, sources, k: int = 10):
    return engine.answer(RecRequest(request_id="r", user_id=user, k=k, sources=sources),
                         history, time.perf_counter())


def test_the_dr_source_answers_from_the_users_own_cluster(learned):
    engine, histories = learned
    hits = total = 0
    for user, history in list(histories.items())[:60]:
        answer = ask(engine, user, history, ["dr"])
        assert answer.items and {item.source for item in answer.items} == {"dr"}
        assert not {item.item_id for item in answer.items} & set(history.items)
        cluster = f"c{int(user[1:]) % CLUSTERS}-"
        hits += sum(item.item_id.startswith(cluster) for item in answer.items)
        total += len(answer.items)
    assert hits / total >= 0.8, hits / total  # random: 1/6


def test_dr_scores_only_a_part_of_the_catalogue(learned):
    engine, histories = learned
    sizes = [len(engine.paths.retrieve(engine.user_vector(RecRequest(request_id="r", k=1),
                                                          history), set()))
             for history in list(histories.values())[:40]]
    assert 0 < np.mean(sizes) < 0.5 * len(engine.learner)


def test_a_request_without_sources_uses_the_default_sources(learned):
    engine, histories = learned
    user, history = next(iter(histories.items()))
    default = ask(engine, user, history, None)
    assert default.items and "dr" not in {item.source for item in default.items}
    both = ask(engine, user, history, ["ann", "dr"], k=50)
    assert {item.source for item in both.items} <= {"ann", "dr"}


def test_popularity_fills_an_answer_only_when_the_request_names_it(learned):
    """An answer holds what its sources found: ``popular`` fills it up to k (and answers a
    user without history) only when named."""
    engine, histories = learned
    user, history = next(iter(histories.items()))
    assert ask(engine, "nobody", History(), ["ann", "dr"]).items == []
    assert {item.source for item in ask(engine, "nobody", History(), ["ann", "popular"]).items
            } == {"popular"}
    short = ask(engine, user, history, ["dr"], k=1000)  # fewer on its paths than k
    assert short.items and {item.source for item in short.items} == {"dr"}
    filled = ask(engine, user, history, ["dr", "popular"], k=1000)
    assert filled.items[:len(short.items)] == short.items
    assert {item.source for item in filled.items[len(short.items):]} == {"popular"}


def test_an_m_step_runs_aside_and_items_met_meanwhile_stay_retrievable(tmp_path):
    engine = make_engine(tmp_path, dr_m_step_events=500)
    histories = run_stream(engine, planted_stream())
    assert engine.maybe_m_step()  # due: more than 500 pairs since the start
    assert not engine.maybe_m_step()  # one at a time
    # A brand-new item arrives while the M-step may still be running.
    event = Event(user_id="u0", item_id="fresh-item", kind="click", ts=2e9, event_id="new")
    history, example = engine.ingest(event, histories["u0"])
    engine.learn([example])
    deadline = time.time() + 60
    while engine.paths.stats()["m_steps"] == 0 and time.time() < deadline:
        engine.maybe_m_step()
        time.sleep(0.05)
    assert engine.paths.stats()["m_steps"] == 1
    rows = engine.paths.model.rows_of(["fresh-item"])
    assert rows[0] >= 0
    fresh_paths = engine.paths.model.assignment[rows[0]]
    assert "fresh-item" in engine.paths.model.items_on_paths(np.unique(fresh_paths))


def test_checkpoint_restores_the_same_dr_answers(learned, tmp_path):
    engine, histories = learned
    engine.settings = engine.settings.replace(data_dir=tmp_path)
    engine.save()
    restored = Engine(engine.settings)
    assert restored.load()
    for user, history in list(histories.items())[:10]:
        before = ask(engine, user, history, ["dr"])
        after = ask(restored, user, history, ["dr"])
        assert [i.item_id for i in before.items] == [i.item_id for i in after.items]
        np.testing.assert_allclose([i.score for i in before.items],
                                   [i.score for i in after.items])


def test_closing_the_paths_stops_an_m_step_under_way(tmp_path, monkeypatch):
    """The interpreter's exit joins the M-step's thread: a worker that learns on its event
    loop waited there for the descent (minutes at a million items), past its stop deadline."""
    import threading

    from models.deep_retrieval import MStepStopped

    engine = make_engine(tmp_path)
    run_stream(engine, planted_stream()[:300])
    started = threading.Event()

    def descent(snapshot, stop=lambda: False):  # as m_step asks between its chunks
        started.set()
        ends = time.monotonic() + 5.0
        while time.monotonic() < ends:
            if stop():
                raise MStepStopped("stopped")
            time.sleep(0.01)
        return None

    monkeypatch.setattr(engine.paths.model, "compute_m_step", descent)
    engine.paths._start(time.time())
    assert started.wait(10)
    engine.paths.close()
    assert engine.paths._running.done()


def test_a_failed_m_step_keeps_the_paths_in_force(tmp_path, monkeypatch):
    engine = make_engine(tmp_path)
    run_stream(engine, planted_stream()[:600])
    before = engine.paths.model.assignment.copy()

    def broken(snapshot, stop=None):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(engine.paths.model, "compute_m_step", broken)
    assert engine.paths.run_m_step_now(timeout=30) is None
    stats = engine.paths.stats()
    assert stats["m_step_failures"] == 1 and stats["m_steps"] == 0
    np.testing.assert_array_equal(engine.paths.model.assignment, before)
    assert "disk on fire" in engine.paths.last_error


def test_an_engine_that_follows_a_learner_never_loads_torchs_compiler(tmp_path):
    """A replica's Deep Retrieval only serves, so it holds no optimizer: torch's first one
    imports its compiler (about 1 s and 70 MB), which a worker's event loop would pay for at
    every start. The learning engine holds one. In a fresh interpreter, where nothing else
    imported it first."""
    code = ("import sys; from stream_app.engine import Engine; "
            "from stream_app.settings import Settings; "
            f"s = Settings(data_dir={str(tmp_path)!r}, dr_enabled=True); "
            "Engine(s, replica=True); print('torch._dynamo' in sys.modules); "
            "Engine(s); print('torch._dynamo' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True)
    assert done.stdout.split() == ["False", "True"]


def test_a_requests_exclusions_are_never_answered_from_any_source(learned):
    """Oracle: the items of ``exclude`` (and an id never seen) are left out of every source's
    candidates, whatever ``exclude_seen`` says; from exact search and popularity the answer is
    the longer answer without them, so nothing else moves."""
    engine, histories = learned
    assert engine.index.current is None  # exact search: the oracle holds exactly
    for user, history in list(histories.items())[:8]:
        for sources in (["ann"], ["popular"], ["ann", "dr", "popular"], ["dr"]):
            for exclude_seen in (True, False):
                fields = dict(request_id="r", user_id=user, sources=sources,
                              exclude_seen=exclude_seen)
                first = engine.answer(RecRequest(**fields, k=10), history, time.perf_counter())
                shown = [item.item_id for item in first.items]
                exclude = shown[::2] + [history.items[0], "never-seen"]
                longer = engine.answer(RecRequest(**fields, k=10 + len(exclude)), history,
                                       time.perf_counter())
                answer = engine.answer(RecRequest(**fields, k=10, exclude=exclude), history,
                                       time.perf_counter())
                got = [item.item_id for item in answer.items]
                assert got and not set(got) & set(exclude), (sources, exclude_seen)
                if sources != ["ann", "dr", "popular"] and sources != ["dr"]:
                    assert got == [item.item_id for item in longer.items
                                   if item.item_id not in exclude][:10], sources


def test_withdrawn_items_are_answered_by_no_source_until_restored(learned):
    """With items withdrawn, no source answers with them; from exact search and popularity
    the answer is the longer answer before without them (the oracle), from Deep Retrieval
    and the three sources together an answer without them; restored, the answers are those
    before."""
    engine, histories = learned
    assert engine.index.current is None
    user, history = next(iter(histories.items()))
    for sources in (["ann"], ["popular"], ["dr"], ["ann", "dr", "popular"]):
        def answer(k: int) -> list[str]:
            request = RecRequest(request_id="r", user_id=user, k=k, sources=sources)
            return [item.item_id for item in engine.answer(request, history,
                                                           time.perf_counter()).items]

        before = answer(40)
        engine.withdrawn = frozenset(before[1:20:3]) | {"never-seen"}
        try:
            during = answer(10)
            assert during and not set(during) & engine.withdrawn, sources
            if sources in (["ann"], ["popular"]):
                assert during == [item for item in before if item not in engine.withdrawn][:10]
        finally:
            engine.withdrawn = frozenset()
        assert answer(40) == before


def test_dr_leaves_out_withdrawn_items_before_it_cuts_its_candidates(learned):
    """Oracle: the dr candidates are the items on the beam's paths without the seen and the
    withdrawn ones, then cut to ``max_candidates``; withdrawn ones cut first left the rerank
    fewer, and an answer of as many items as the cut came back short."""
    from index_sync.paths import unit_rows

    engine, histories = learned
    paths, cut = engine.paths, engine.paths.max_candidates
    user, history = next(iter(histories.items()))
    phi = engine.user_vector(RecRequest(request_id="r", k=1), history)
    on_paths = [item for item in paths.model.retrieve(unit_rows(phi)[0])
                if item not in history.items]
    assert len(on_paths) >= 8
    withdrawn = frozenset(on_paths[:4:2])
    try:
        paths.max_candidates = 4
        got = paths.retrieve(phi, set(history.items), skip=withdrawn)
        engine.withdrawn = withdrawn
        answered = ask(engine, user, history, ["dr"], k=4)
    finally:
        paths.max_candidates, engine.withdrawn = cut, frozenset()
    assert got == [item for item in on_paths if item not in withdrawn][:4]
    assert sorted(item.item_id for item in answered.items) == sorted(got)
