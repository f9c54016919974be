"""Start a deployment's model from an event log instead of from nothing (LED §5.1).

``streamrec bootstrap LOG`` writes the checkpoint a worker loads at its start: every item of
the log with a vector from the randomized SVD of its PMI matrix (``models/bootstrap.py``), and
popularity counted from the log. The vectors become the items' priors (``ItemLearner.assign``):
the stream's learning moves each item from there as its events come, and users' vectors
average them from their first event, where a model started empty knows no item. The
checkpoint holds no place in any topic: the worker learns every training message of its
topics.

Only into a data dir without a model checkpoint (``force`` replaces one, and with it what
that model learned), and never while a worker holds it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from models.bootstrap import pmi_item_vectors

from .datasets import InteractionLog
from .engine import Engine
from .processes import LEARNER_LOCK, lock_data_dir
from .settings import Settings

log = logging.getLogger(__name__)


def write_bootstrap(settings: Settings, events: InteractionLog, *, window: int | None = None,
                    force: bool = False) -> Path:
    """Write the bootstrap checkpoint of ``events`` into ``settings.data_dir``; returns the
    model file. Raises FileExistsError where a model checkpoint exists (unless ``force``),
    :class:`~stream_app.processes.DataDirInUse` while a worker or its learner holds the data
    dir, ValueError for a log with fewer items than the model's dimension."""
    model = settings.data_dir / "checkpoints" / "model.npz"
    with lock_data_dir(settings.data_dir), lock_data_dir(settings.data_dir, LEARNER_LOCK):
        if model.exists() and not force:
            raise FileExistsError(f"{model} exists (a model learned, or bootstrapped, before):"
                                  " --force replaces it and what it learned")
        ids, vectors = pmi_item_vectors(events.users, events.items, settings.model_dim,
                                        window=window, seed=settings.model_seed)
        engine = Engine(settings.replace(index_enabled=False))
        engine.learner.assign(ids, np.hstack([vectors, np.zeros((len(ids), 1))]))
        weights = settings.kind_weights
        engine.popularity.add_many(events.items.tolist(), events.ts.tolist(),
                                   [weights.get(str(kind), 1.0) for kind in events.kinds])
        engine.save()
    log.info("bootstrapped %d items from %d events into %s", len(ids), len(events), model)
    return model
