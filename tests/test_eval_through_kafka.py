"""The through-Kafka row against a fake worker (no broker): what a request carries for a history
longer than a request holds, and when the first request after learning goes."""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.sparse as sp

from evaluation import through_kafka
from evaluation.data import Dataset, Events
from evaluation.through_kafka import KafkaStreaming
from stream_app.settings import Settings
from stream_app.wire import RecItem, RecResponse, decode_request

SERVING_GAUGES = {f"streamrec_serving_{key}": value for key, value in
                  {"half_life_events": 1.0, "bias_weight": 1.0, "samples": 10.0,
                   "moves": 0.0, "lead": 0.0}.items()}


def one_long_history(n_history: int, n_others: int = 100) -> Dataset:
    """User u0, whose events name h0000 (the oldest) to the newest history item, one each,
    after u1's, which name the ``n_others`` other items of the catalogue."""
    ids = [f"h{i:04d}" for i in range(n_history)] + [f"o{i:03d}" for i in range(n_others)]
    users = np.repeat([1, 0], [n_others, n_history])
    items = np.r_[np.arange(n_history, n_history + n_others), np.arange(n_history)]
    order = np.r_[np.arange(n_others), np.arange(n_history)]
    events = Events(users, items, np.ones(len(items)), np.arange(len(items), dtype=np.float64),
                    order)
    return Dataset("long", events, np.array(["u0", "u1"]), np.array(ids))


def history_rows(dataset: Dataset) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """u0's history and its times, as a fold holds them."""
    events = dataset.events.take(dataset.events.users == 0)
    shape = (1, dataset.n_items)
    history = sp.csr_matrix((np.ones(len(events)), (events.users, events.items)), shape=shape)
    times = sp.csr_matrix((events.ts + 1.0, (events.users, events.items)), shape=shape)
    return history, times


class FakeWorker:
    """Answers as a worker does (the best ``k`` of a fixed ranking, leaving out the request's
    history and ``exclude``, refusing a request a worker would refuse) and shows gauges: the
    events it learned, and its serving index as ``index`` (version, when built, build seconds)
    says at each scrape."""

    def __init__(self, settings: Settings, ranking: list[str], index=None) -> None:
        self.settings = settings
        self.ranking = ranking
        self.learned = 0
        self.index = index or (lambda scrapes: (0, 0.0, 0.0))
        self.scrapes = 0
        self.learned_at_scrape = 0  # scrapes when learning was done
        self.asked: list[tuple[int, int]] = []  # (scrapes, serving version) at each batch
        self.sent: list = []  # the requests

    def replay(self, settings, events) -> int:
        taken = sum(1 for _ in events)
        self.learned += taken
        self.learned_at_scrape = self.scrapes
        return taken

    def gauges(self, settings=None) -> dict[str, float]:
        self.scrapes += 1
        version, built_at, build_s = self.index(self.scrapes - self.learned_at_scrape)
        return {**SERVING_GAUGES, "streamrec_learned_events_total": float(self.learned),
                "streamrec_model_items": float(len(self.ranking)),
                "streamrec_index_version": float(version),
                "streamrec_index_age_seconds": time.time() - built_at if version else 0.0,
                "streamrec_index_build_seconds": build_s}

    def ask_many(self, requests, timeout_s: float) -> dict[str, RecResponse]:
        version = self.index(self.scrapes - self.learned_at_scrape)[0]
        self.asked.append((self.scrapes, version))
        self.sent += requests
        return {request.request_id: self.answer(request, version) for request in requests}

    def answer(self, request, version: int) -> RecResponse:
        request = decode_request(request.to_bytes(), max_bytes=self.settings.max_request_bytes,
                                 max_history=self.settings.max_request_history)
        left_out = set(request.history or ()) | set(request.exclude or ())
        items = [item for item in self.ranking if item not in left_out][:request.k]
        return RecResponse(request_id=request.request_id, index_version=version or None,
                           items=[RecItem(item, 1.0, "ann") for item in items])


@pytest.fixture
def run(monkeypatch):
    """A KafkaStreaming on ``dataset`` whose system, client, event replay and metrics are
    ``worker``'s; closed after the test."""
    models = []

    def start(dataset: Dataset, worker: FakeWorker) -> KafkaStreaming:
        system = SimpleNamespace(start=lambda: None, stop=lambda: None,
                                 worker=SimpleNamespace(alive=lambda: True))
        client = SimpleNamespace(ask_many=worker.ask_many, close=lambda: None,
                                 reply_to=f"{worker.settings.topic_responses}-reply")
        monkeypatch.setattr(through_kafka, "System", lambda settings: system)
        monkeypatch.setattr(through_kafka, "RecClient", lambda settings: client)
        monkeypatch.setattr(through_kafka, "replay", worker.replay)
        monkeypatch.setattr(through_kafka, "scrape", worker.gauges)
        model = KafkaStreaming(dataset, worker.settings, timeout_s=5.0)
        system.logs = model.settings.data_dir / "logs"
        models.append(model)
        return model

    yield start
    for model in models:
        model.close()


def test_a_history_longer_than_a_request_holds_still_gets_k_answers(run):
    """2,000 history items, of which a request carries the newest 1,000, and a worker that
    ranks the oldest best: a request that asks for k answers more than the 1,000 older items
    (1,000 at most) and leaves the client to drop those gets no other item back; the request's
    exclude leaves them out at the worker, and the answer holds k."""
    dataset = one_long_history(2000)
    settings = Settings(index_enabled=False)
    model = run(dataset, FakeWorker(settings, dataset.item_ids.tolist()))
    model.learn(dataset.events)
    history, times = history_rows(dataset)
    ranked = model.recommend(history, 50, exclude=history, times=times)
    assert ranked.tolist() == [list(range(2000, 2050))]  # the best 50 outside the history
    assert model.chosen_params()["short_rows"] == 0


def test_a_row_left_short_by_more_than_a_request_holds_is_counted(run):
    """A request holds 10 history items and 10 excluded; with 1,020 the other 1,000 go on top
    of k, where the 1,000 answers a request may ask for are all of them: the row comes back
    empty though the worker learned more items, and the record says so."""
    dataset = one_long_history(1020)
    settings = Settings(index_enabled=False, max_request_history=10)
    model = run(dataset, FakeWorker(settings, dataset.item_ids.tolist()))
    model.learn(dataset.events)
    history, times = history_rows(dataset)
    assert (model.recommend(history, 5, exclude=history, times=times) == -1).all()
    assert model.chosen_params()["short_rows"] == 1


def test_exclude_is_cut_to_what_fits_in_a_request(run):
    """Ids this long fill a request's bytes before its 1,000 exclusions: it carries as many as
    fit, and asks for the rest on top of k."""
    dataset = one_long_history(2000)
    long_ids = np.array([f"{item}-{'x' * 34}" for item in dataset.item_ids])
    dataset = Dataset("long-ids", dataset.events, dataset.user_ids, long_ids)
    settings = Settings(index_enabled=False)
    worker = FakeWorker(settings, dataset.item_ids.tolist())
    model = run(dataset, worker)
    model.learn(dataset.events)
    history, times = history_rows(dataset)
    ranked = model.recommend(history, 10, exclude=history, times=times)
    request = worker.sent[0]
    assert 0 < len(request.exclude) < 1000
    assert len(request.to_bytes()) <= settings.max_request_bytes
    assert request.k == 10 + 1000 - len(request.exclude)
    assert ranked.tolist() == [list(range(2000, 2010))]


def rebuilt_after(scrapes_after_learning: int, *, old_version: int = 1):
    """A worker's index as ``FakeWorker.index``: version ``old_version`` built well before
    learning ended, then, from the given scrape after learning on, the next version, built just
    then (0.05 s of build)."""
    built: dict[int, float] = {}

    def index(scrape: int) -> tuple[int, float, float]:
        if scrape < scrapes_after_learning:
            return old_version, time.time() - 30.0, 0.5
        return old_version + 1, built.setdefault(old_version + 1, time.time()), 0.05
    return index


def test_the_first_request_waits_for_an_index_rebuilt_after_learning(run):
    """The serving index when learning ends was built before it: the first request waits for
    the version built after it, which the record names."""
    dataset = one_long_history(1200)
    worker = FakeWorker(Settings(), dataset.item_ids.tolist(), index=rebuilt_after(6))
    model = run(dataset, worker)
    model.learn(dataset.events)
    history, times = history_rows(dataset)
    model.recommend(history, 10, exclude=history, times=times)
    model.recommend(history, 10, exclude=history, times=times)
    assert [version for _, version in worker.asked] == [2, 2]
    params = model.chosen_params()
    assert params["index_version"] == 2 and params["answered_from_index_versions"] == [2]


def test_no_wait_for_an_index_when_the_worker_has_none(run):
    """Index disabled, or fewer items than an index is built for: every answer is an exact
    search, and the first request goes at once."""
    dataset = one_long_history(1200)
    for settings in (Settings(index_enabled=False), Settings(index_min_items=5000)):
        worker = FakeWorker(settings, dataset.item_ids.tolist(), index=rebuilt_after(10**6))
        model = run(dataset, worker)
        model.learn(dataset.events)
        history, times = history_rows(dataset)
        model.recommend(history, 10, exclude=history, times=times)
        assert worker.asked[0][0] - worker.learned_at_scrape <= 2  # the learned count only
        assert model.chosen_params()["index_version"] == 0


# -- the waiting itself, on fake gauge readings and a fake clock ---------------------------------


class Clock:
    """Wall-clock seconds that move only when the waiting sleeps."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def index_gauges(clock: Clock, version: int, began: float, build_s: float = 1.0,
                 items: int = 5000) -> dict[str, float]:
    """A worker's gauges at ``clock``'s time: ``version`` serving, its build begun at
    ``began`` and ``build_s`` long."""
    return {"streamrec_model_items": float(items), "streamrec_index_version": float(version),
            "streamrec_index_age_seconds": clock.now - began - build_s,
            "streamrec_index_build_seconds": build_s}


SETTINGS = Settings(index_interval_s=60.0, index_check_s=1.0, index_build_share=0.5)


def wait(readings, clock: Clock, slack_s: float = 10.0) -> list[int]:
    """The wait after learning seen unfinished at 990 and finished at 1000."""
    change = through_kafka.ModelChange(after=990.0, before=1000.0)
    return through_kafka.wait_index_rebuilt(readings, SETTINGS, change, slack_s, clock=clock,
                                            sleep=clock.sleep, poll_s=1.0)


def test_a_version_built_before_learning_ended_is_waited_past():
    clock = Clock()

    def readings():
        if clock.now < 1020.0:  # version 3 began at 985, before the last learned example
            return [index_gauges(clock, 3, 985.0)]
        return [index_gauges(clock, 4, 1015.0)]
    assert wait(readings, clock) == [4]
    assert 1021.0 <= clock.now < 1023.0  # read twice, the same version each time


def test_a_version_begun_while_learning_ended_serves_once_no_rebuild_follows():
    """Began between the last scrape that saw learning unfinished and the one that saw it
    done: it may or may not hold the last example; it does if no rebuild follows within the
    rebuild interval, a check, its build and the slack (72 s)."""
    clock = Clock()
    assert wait(lambda: [index_gauges(clock, 5, 995.0)], clock) == [5]
    assert 995.0 + 72.0 < clock.now < 995.0 + 74.0


def test_no_rebuild_after_learning_fails_loudly():
    clock = Clock()
    with pytest.raises(TimeoutError, match="version 3"):
        wait(lambda: [index_gauges(clock, 3, 985.0), index_gauges(clock, 2, 1010.0)], clock)
    assert clock.now < 1000.0 + 75.0


def test_a_worker_below_the_index_size_answers_exactly_and_is_not_waited_for():
    clock = Clock()
    readings = [index_gauges(clock, 0, clock.now, 0.0, items=SETTINGS.index_min_items - 1),
                index_gauges(clock, 7, 1001.0)]
    assert wait(lambda: readings, clock) == [0, 7]
