"""Item sharing without a broker: what a publish owes the item-rows topic."""

from __future__ import annotations

import numpy as np

from stream_app.engine import Engine, item_partition
from stream_app.item_sharing import ItemSharing, rows_shared_mark
from stream_app.settings import Settings


def test_a_worker_whose_rows_the_topic_may_lack_owes_every_row_it_owns_once(tmp_path):
    """Without the mark every owned row is due at the next publish (not only those that
    moved), once partitions are held: rows of items it does not own are never published."""
    settings = Settings(data_dir=tmp_path, model_dim=4, partitions=2, share_items=True)
    engine = Engine(settings)
    ids = [f"item-{n}" for n in range(40)]
    engine.learner.assign(ids, np.ones((len(ids), 5)))
    held: set[int] = set()
    sharing = ItemSharing(settings, engine, lambda: frozenset(held), lambda records: None,
                          lambda records: None)
    assert not sharing.owe_every_row() and sharing.due() == []  # nothing held yet
    held.add(0)
    assert sharing.owe_every_row()
    published = sorted(key.decode() for key, _ in sharing.due())
    assert published == sorted(i for i in ids if item_partition(i, 2) == 0)
    sharing.every_row_published()
    assert rows_shared_mark(settings).exists()
    assert not sharing.owe_every_row() and sharing.due() == []
