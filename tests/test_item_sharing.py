"""Item sharing without a broker: what a publish owes the item-rows topic."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from stream_app.engine import Engine, item_partition
from stream_app.item_sharing import ItemSharing, rows_shared_mark
from stream_app.settings import Settings


def test_a_worker_whose_rows_the_topic_may_lack_publishes_every_row_it_owns_once(tmp_path):
    """Without the mark the first publish sends every owned row (not only those that
    moved), once partitions are held: rows of items it does not own are never published.
    The mark is made only once the broker took them all; a refusal leaves them owed."""
    settings = Settings(data_dir=tmp_path, model_dim=4, partitions=2, share_items=True)
    engine = Engine(settings)
    ids = [f"item-{n}" for n in range(40)]
    engine.learner.assign(ids, np.ones((len(ids), 5)))
    held: set[int] = set()
    sent: list[str] = []
    refuse = [True]

    async def send_row(key: bytes, value: bytes) -> asyncio.Future:
        sent.append(key.decode())
        delivery = asyncio.get_running_loop().create_future()
        if refuse[0]:
            delivery.set_exception(RuntimeError("refused"))
        else:
            delivery.set_result(None)
        return delivery

    async def send_steps(partition: int, value: bytes) -> None:
        pass

    def sharing_of() -> ItemSharing:
        return ItemSharing(settings, engine, lambda: frozenset(held), lambda records: None,
                           owes_every_row=not rows_shared_mark(settings).exists())

    def publish(sharing: ItemSharing) -> None:
        asyncio.run(sharing.publish(lambda: (sharing.due(), sharing.steps_due()), send_row,
                                    send_steps))

    sharing = sharing_of()
    publish(sharing)  # nothing held yet: nothing owed can be sent
    assert sent == [] and not rows_shared_mark(settings).exists()
    held.add(0)
    with pytest.raises(RuntimeError, match="refused"):
        publish(sharing)
    owned = sorted(i for i in ids if item_partition(i, 2) == 0)
    assert sorted(sent) == owned and not rows_shared_mark(settings).exists()
    sent.clear()
    refuse[0] = False
    publish(sharing)
    assert sorted(sent) == owned and rows_shared_mark(settings).exists()
    sent.clear()
    publish(sharing)
    publish(sharing_of())  # a later start: the topic holds them
    assert sent == []
