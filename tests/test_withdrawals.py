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
