"""Polls shared among partitions (``stream_app/fair_fetch.py``), run against aiokafka's own
``Fetcher.fetched_records`` and ``FetchResult`` over partitions held in memory."""

from __future__ import annotations

import asyncio
from collections import OrderedDict

import faust
import pytest
from aiokafka.consumer.fetcher import FetchError, Fetcher, FetchResult
from aiokafka.errors import KafkaError
from aiokafka.structs import TopicPartition

from stream_app.fair_fetch import fair_records, install_active_only_polls, install_fair_fetch

EVENTS_0, EVENTS_1 = TopicPartition("events", 0), TopicPartition("events", 1)
TRAIN = TopicPartition("train", 0)


class Records:
    """What aiokafka's partition records are to a FetchResult: an iterator with a position."""

    def __init__(self, first: int, count: int) -> None:
        self._offsets = iter(range(first, first + count))
        self.next_fetch_offset = first

    def __iter__(self):
        return self

    def __next__(self) -> int:
        offset = next(self._offsets)
        self.next_fetch_offset = offset + 1
        return offset


class State:
    paused = False

    def __init__(self, position: int) -> None:
        self.position = position

    def consumed_to(self, offset: int) -> None:
        self.position = offset


class Assignment:
    active = True

    def __init__(self) -> None:
        self.states: dict = {}

    def state_value(self, tp):
        return self.states[tp]


class Subscriptions:
    reassignment_in_progress = False

    @staticmethod
    def is_assigned(tp) -> bool:
        return True


class BufferedFetcher:
    """aiokafka's fetcher methods over buffered results (no network)."""

    fetched_records = Fetcher.fetched_records
    _notify = Fetcher._notify

    def __init__(self, buffered: dict[TopicPartition, int]) -> None:
        self._subscriptions = Subscriptions()
        self._wait_consume_future = None
        self._records: OrderedDict = OrderedDict()
        assignment = Assignment()
        for tp, count in buffered.items():
            assignment.states[tp] = State(0)
            self._records[tp] = FetchResult(tp, assignment=assignment,
                                            partition_records=Records(0, count), backoff=0)


def poll(fetcher, max_records=500, partitions=None) -> dict:
    return asyncio.run(fair_records(fetcher, partitions, max_records))


def test_a_partition_with_a_few_records_is_not_starved_by_large_ones():
    """The event partitions come first and hold thousands each: aiokafka's own poll is all
    events, the fair one takes the training records at once and fills the rest with events,
    in order, without losing or repeating a record."""
    buffered = {EVENTS_0: 3000, TRAIN: 5, EVENTS_1: 3000}
    stock = asyncio.run(BufferedFetcher(buffered).fetched_records(None, 0, 500))
    assert {tp: len(records) for tp, records in stock.items()} == {EVENTS_0: 500}

    fetcher = BufferedFetcher(buffered)
    first = poll(fetcher)
    share = 500 // 3
    assert first[TRAIN] == [0, 1, 2, 3, 4]
    assert first[EVENTS_1] == list(range(share))
    assert first[EVENTS_0] == list(range(500 - 5 - share))  # its share, then what was left
    seen = {tp: list(records) for tp, records in first.items()}
    while fetcher._records:
        for tp, records in poll(fetcher).items():
            assert 0 < len(records) <= 500
            seen[tp].extend(records)
    assert seen == {tp: list(range(count)) for tp, count in buffered.items()}


def test_each_partition_gets_a_share_when_there_are_more_than_the_poll_holds():
    buffered = {TopicPartition("t", n): 10 for n in range(8)}
    records = poll(BufferedFetcher(buffered), max_records=4)
    assert sum(map(len, records.values())) == 4
    assert all(len(part) == 1 for part in records.values())


def test_only_the_asked_partitions_are_taken_and_an_error_is_left_to_aiokafka_first():
    """A buffered fetch error of an asked partition is not raised here (the records taken
    from the other partitions would be lost), and nothing is taken while it waits: aiokafka's
    own poll then raises it, after the records buffered before it, where the fair poll went
    on taking the other partitions' records for as long as they came. An error of a
    partition not asked for holds nothing back."""
    fetcher = BufferedFetcher({EVENTS_0: 10, EVENTS_1: 10})
    fetcher._records[TRAIN] = FetchError(error=KafkaError("broken"), backoff=0)
    assert set(poll(fetcher, partitions={EVENTS_1})) == {EVENTS_1}
    assert poll(fetcher) == {}
    assert poll(fetcher, partitions={TRAIN, EVENTS_0}) == {}
    assert asyncio.run(fetcher.fetched_records(None, 0, 500)) == {EVENTS_0: list(range(10))}
    with pytest.raises(KafkaError):
        asyncio.run(fetcher.fetched_records(None, 0, 500))


def test_the_app_consumer_polls_fairly_when_installed():
    """Installed on the app's consumer only: its thread's poll goes through the fair share
    while the flow runs, and another app's consumer keeps Faust's own."""
    app = faust.App("fair-test", broker="kafka://127.0.0.1:1", web_enabled=False,
                    autodiscover=False)
    other = faust.App("stock-test", broker="kafka://127.0.0.1:1", web_enabled=False,
                      autodiscover=False)
    install_fair_fetch(app)
    thread = app.consumer._thread
    assert thread._fetch_records.__func__ is not type(thread)._fetch_records
    assert other.consumer._thread._fetch_records.__func__ is type(thread)._fetch_records

    consumer = consumer_over(BufferedFetcher({EVENTS_0: 3000, TRAIN: 5}))
    thread.consumer.resume_flow()
    got = asyncio.run(thread._fetch_records(consumer, {EVENTS_0, TRAIN}, timeout=1.0,
                                            max_records=100))
    assert len(got[TRAIN]) == 5 and len(got[EVENTS_0]) == 95

    class OtherFetcher:  # a client whose fetcher keeps no ``_records``: aiokafka's own poll
        _closed = False

        async def fetched_records(self, partitions, timeout=0, max_records=None):
            return {"stock": max_records}

    OtherFetcher._subscriptions = consumer._fetcher._subscriptions
    consumer._fetcher = OtherFetcher()
    got = asyncio.run(thread._fetch_records(consumer, {EVENTS_0}, timeout=1.0,
                                            max_records=7))
    assert got == {"stock": 7}


def consumer_over(fetcher):
    """An aiokafka consumer as the consumer thread's poll sees it, over ``fetcher``."""
    fetcher._closed = False
    fetcher._subscriptions.fetch_context = _no_context

    class KafkaConsumer:
        _closed = False
        _fetcher = fetcher

    return KafkaConsumer()


def app_polling(name: str, *, fair: bool) -> faust.App:
    app = faust.App(name, broker="kafka://127.0.0.1:1", web_enabled=False, autodiscover=False)
    if fair:
        install_fair_fetch(app)
    install_active_only_polls(app)
    app.consumer._thread.consumer.resume_flow()
    return app


@pytest.mark.parametrize("fair", [True, False])
def test_a_poll_made_while_no_partition_is_active_takes_nothing(fair):
    """Faust pauses the changelog partitions at the end of a recovery before it resumes the
    others: a poll made then saw an empty set of active partitions, and aiokafka (the fair
    poll too) took every partition's records for it, which Faust then dropped with their
    positions moved past them. Now nothing is taken and nothing moves."""
    fetcher = BufferedFetcher({TRAIN: 12, EVENTS_0: 5})
    thread = app_polling(f"idle-{fair}", fair=fair).consumer._thread
    got = asyncio.run(thread._fetch_records(consumer_over(fetcher), set(), timeout=0.0,
                                            max_records=500))
    assert got == {}
    assert set(fetcher._records) == {TRAIN, EVENTS_0}
    assert all(result._partition_records.next_fetch_offset == 0
               for result in fetcher._records.values())


def test_a_partition_paused_while_a_poll_waits_is_not_taken():
    """aiokafka's own poll waits for records with the set it was given and reads it again at
    each wake-up; the event loop's thread changes Faust's live set meanwhile. A partition
    paused then (Faust drops its records) is not taken, one still active is, and the live set
    emptied is not read as every partition."""
    live = {EVENTS_0, TRAIN}

    class PausingFetcher(BufferedFetcher):
        async def fetched_records(self, partitions, timeout=0, max_records=None):
            live.discard(TRAIN)  # paused on the event loop while this poll waited
            return await Fetcher.fetched_records(self, partitions, timeout, max_records)

    fetcher = PausingFetcher({TRAIN: 12, EVENTS_0: 5})
    thread = app_polling("pausing", fair=False).consumer._thread
    got = asyncio.run(thread._fetch_records(consumer_over(fetcher), live, timeout=0.0,
                                            max_records=500))
    assert got == {EVENTS_0: list(range(5))}
    assert TRAIN in fetcher._records

    live.clear()
    live.add(TRAIN)  # the only partition active as the poll starts, paused once it waits
    emptied = PausingFetcher({TRAIN: 12, EVENTS_1: 3})
    got = asyncio.run(thread._fetch_records(consumer_over(emptied), live, timeout=0.0,
                                            max_records=500))
    assert got == {}
    assert set(emptied._records) == {TRAIN, EVENTS_1}


def test_the_worker_app_polls_only_active_partitions(tmp_path):
    """``create_app`` installs the fix around the fair poll and the fetch-wait guard: its
    consumer's poll takes nothing for an empty set of active partitions."""
    from stream_app.app import create_app
    from stream_app.engine import Engine
    from stream_app.settings import Settings
    from stream_app.worker import build_metrics

    settings = Settings(data_dir=tmp_path, broker="127.0.0.1:1", embedded_compat=True)
    engine = Engine(settings)
    app = create_app(settings, engine, build_metrics(engine))
    thread = app.consumer._thread
    thread.consumer.resume_flow()
    fetcher = BufferedFetcher({TRAIN: 12, EVENTS_0: 5})
    got = asyncio.run(thread._fetch_records(consumer_over(fetcher), set(), timeout=0.0,
                                            max_records=500))
    assert got == {}
    assert set(fetcher._records) == {TRAIN, EVENTS_0}


class _no_context:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
