"""The withdrawn-items topic read into the set of items answers leave out; the broker path is in
tests/test_broker_integration.py."""

from __future__ import annotations

import random
from types import SimpleNamespace

from stream_app.settings import Settings
from stream_app.wire import ItemWithdrawal
from stream_app.withdrawals import Withdrawals


def record(item: str, withdrawn: bool | None, offset: int = 0) -> SimpleNamespace:
    value = None if withdrawn is None else ItemWithdrawal(item_id=item,
                                                          withdrawn=withdrawn).to_bytes()
    return SimpleNamespace(key=item.encode(), value=value, topic="w", partition=0,
                           offset=offset)


def test_each_items_last_record_decides_and_a_tombstone_restores(tmp_path):
    """Oracle: after any sequence of withdrawals, restorations (false or a tombstone) and
    junk, read in fetches of any size, the set is the items whose last valid record
    withdrew them; junk is counted and skipped, and the new set is handed on only when it
    changed."""
    rng = random.Random(4)
    items = [f"sku-{n}" for n in range(12)]
    for _ in range(30):
        records, last = [], {}
        for offset in range(rng.randrange(1, 60)):
            item, word = rng.choice(items), rng.choice([True, False, None, "junk"])
            if word == "junk":
                records.append(SimpleNamespace(key=item.encode(), value=b'{"item_id": 5}',
                                               topic="w", partition=0, offset=offset))
                continue
            records.append(record(item, word, offset))
            last[item] = word is True
        handed, skipped = [], []
        withdrawals = Withdrawals(Settings(data_dir=tmp_path), handed.append,
                                  lambda: skipped.append(1))
        start = 0
        while start < len(records):
            size = rng.randrange(1, 8)
            withdrawals.take(records[start:start + size])
            start += size
        expected = frozenset(item for item, withdrawn in last.items() if withdrawn)
        assert withdrawals.items == expected
        assert len(skipped) == withdrawals.skipped == sum(r.value == b'{"item_id": 5}'
                                                          for r in records)
        assert all(a != b for a, b in zip([frozenset()] + handed, handed))
        assert (handed[-1] if handed else frozenset()) == expected


def test_a_tombstone_whose_key_is_not_an_item_is_skipped(tmp_path):
    withdrawals = Withdrawals(Settings(data_dir=tmp_path))
    withdrawals.take([record("a", True),
                      SimpleNamespace(key=b"\xff", value=None, topic="w", partition=0, offset=1),
                      SimpleNamespace(key=None, value=None, topic="w", partition=0, offset=2)])
    assert withdrawals.items == {"a"} and withdrawals.skipped == 2


class FakeConsumer:
    """aiokafka's consumer as the reader uses it, over a topic of ``records`` on one
    partition, fetched ``per_fetch`` at a time; ``fetched`` counts the fetches."""

    def __init__(self, records: list, per_fetch: int, *, end: int | None = None,
                 first: int = 0) -> None:
        """``end``: the topic's end offset when it is not its last record's (a transaction's
        marker after it); ``first``: its first offset (retention removed those before)."""
        self.records, self.per_fetch, self.at, self.fetched = records, per_fetch, first, 0
        self.end, self.first = end, first
        self._client = SimpleNamespace(fetch_all_metadata=self._metadata)

    async def _metadata(self):
        return SimpleNamespace(partitions_for_topic=lambda topic: {0})

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def assign(self, partitions) -> None:
        self.partitions = partitions

    def assignment(self) -> set:
        return set(self.partitions)

    async def position(self, tp) -> int:
        return self.at

    async def seek_to_beginning(self, tp) -> None:
        self.at = self.first

    async def end_offsets(self, partitions) -> dict:
        return {tp: self.end or len(self.records) for tp in partitions}

    async def getmany(self, timeout_ms: int, max_records: int) -> dict:
        import asyncio

        self.fetched += 1
        start = self.at - self.first
        batch = self.records[start:start + min(self.per_fetch, max_records)]
        self.at += len(batch)
        if self.end is not None and self.at - self.first >= len(self.records):
            self.at = max(self.at, self.end)  # past a marker no consumer is handed
        await asyncio.sleep(0 if batch else 0.01)
        return {self.partitions[0]: batch} if batch else {}


def test_the_reader_is_caught_up_once_it_has_read_to_the_end_it_saw_at_its_start(
        tmp_path, monkeypatch):
    """caught_up is set once every record written before the reader started is read, and
    not before (the worker answers only then); a record written after it is read too."""
    import asyncio

    import aiokafka

    records = [record(f"x{n}", n % 2 == 0, offset=n) for n in range(2500)]
    records.append(record("last", True, offset=2500))
    consumer = FakeConsumer(records, per_fetch=400)
    monkeypatch.setattr(aiokafka, "AIOKafkaConsumer", lambda **options: consumer)
    withdrawals = Withdrawals(Settings(data_dir=tmp_path, embedded_compat=False))
    seen_when_caught_up = []

    async def run() -> None:
        reading = asyncio.ensure_future(withdrawals.read())
        assert await withdrawals.wait_caught_up(5.0)
        seen_when_caught_up.extend([consumer.at, "last" in withdrawals.items])
        consumer.records.append(record("later", True, offset=2501))
        for _ in range(100):
            await asyncio.sleep(0.01)
            if "later" in withdrawals.items:
                break
        reading.cancel()

    asyncio.run(run())
    assert seen_when_caught_up == [2501, True] and consumer.fetched >= 7
    assert "later" in withdrawals.items and len(withdrawals.items) == 1250 + 2


def caught_up_within(withdrawals: Withdrawals, seconds: float) -> bool:
    import asyncio

    async def run() -> bool:
        reading = asyncio.ensure_future(withdrawals.read())
        try:
            return await withdrawals.wait_caught_up(seconds)
        finally:
            reading.cancel()

    return asyncio.run(run())


def test_the_reader_is_caught_up_where_the_topic_ends_past_its_last_record(tmp_path,
                                                                         monkeypatch):
    """Read to the end by its position: a topic written in transactions ends with a marker
    that no consumer is handed, and one that retention emptied has no record left; either
    was never caught up by its last record's offset, and each rebalance held answers 30 s."""
    import aiokafka

    settings = Settings(data_dir=tmp_path, embedded_compat=False)
    records = [record(f"x{n}", True, offset=n) for n in range(5)]
    marked = FakeConsumer(records, per_fetch=2, end=6)
    monkeypatch.setattr(aiokafka, "AIOKafkaConsumer", lambda **options: marked)
    withdrawals = Withdrawals(settings)
    assert caught_up_within(withdrawals, 5.0) and len(withdrawals.items) == 5
    emptied = FakeConsumer([], per_fetch=2, end=7, first=7)
    monkeypatch.setattr(aiokafka, "AIOKafkaConsumer", lambda **options: emptied)
    assert caught_up_within(Withdrawals(settings), 5.0)


def test_a_long_first_read_hands_the_set_on_in_pauses_and_whole_at_its_end(tmp_path,
                                                                           monkeypatch):
    """A copy of the set per fetch made a first read of a million withdrawals quadratic:
    past ``QUIET_COPY_ITEMS`` it is handed on at most every ``CATCH_UP_COPY_S`` until the
    topic is read to its end, then whole; afterwards every change is handed on."""
    import asyncio

    import aiokafka

    from stream_app import withdrawals as module

    monkeypatch.setattr(module, "QUIET_COPY_ITEMS", 10)
    monkeypatch.setattr(module, "CATCH_UP_COPY_S", 60.0)
    records = [record(f"x{n}", n % 3 != 0, offset=n) for n in range(3000)]
    consumer = FakeConsumer(records, per_fetch=100)
    monkeypatch.setattr(aiokafka, "AIOKafkaConsumer", lambda **options: consumer)
    handed = []
    withdrawals = Withdrawals(Settings(data_dir=tmp_path, embedded_compat=False),
                              handed.append)

    async def run() -> None:
        reading = asyncio.ensure_future(withdrawals.read())
        assert await withdrawals.wait_caught_up(5.0)
        consumer.records.append(record("x0", True, offset=3000))
        for _ in range(200):
            await asyncio.sleep(0.01)
            if "x0" in withdrawals.items:
                break
        reading.cancel()

    asyncio.run(run())
    expected = frozenset(f"x{n}" for n in range(3000) if n % 3 != 0)
    assert len(handed) == 3 and handed[1] == expected and handed[2] == expected | {"x0"}
