"""Start a deployment's model from an event log instead of from nothing (LED §5.1).

``streamrec bootstrap LOG`` writes the checkpoint a worker loads at its start: every item of
the log with a vector from the randomized SVD of its PMI matrix (``models/bootstrap.py``),
scaled to the norm of the random vector a new item gets otherwise, and popularity counted from
the log. The vectors become the items' priors (``ItemLearner.assign``):
the stream's learning moves each item from there as its events come, and users' vectors
average them from their first event, where a model started empty knows no item. The
checkpoint holds no place in any topic: the worker learns every training message of its
topics.

Only into a data dir without a model checkpoint (``force`` replaces one, and with it what
that model learned), and never while a worker holds it. The log's events are read as a worker
would take them: those of a kind not configured, or timed further ahead than
``max_event_ahead_s``, are left out. Popularity decays by event time, so a log whose times are
synthetic (a file without them) counts for little once live events come.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from models.bootstrap import assign_log_priors

from .datasets import InteractionLog
from .engine import Engine
from .item_sharing import forget_rows_shared
from .processes import EMBEDDED_MARK, LEARNER_LOCK, lock_data_dir
from .settings import Settings

log = logging.getLogger(__name__)


class Bootstrapped(NamedTuple):
    model: Path  # the model checkpoint written
    items: int  # items given a vector
    events: int  # events of the log taken (as a worker takes them)
    left_out: int  # events of the log a worker would leave out


def write_bootstrap(settings: Settings, events: InteractionLog, *, window: int | None = None,
                    force: bool = False) -> Bootstrapped:
    """Write the bootstrap checkpoint of ``events`` into ``settings.data_dir``; returns what
    it wrote. Raises FileExistsError where a model checkpoint exists (unless ``force``),
    :class:`~stream_app.processes.DataDirInUse` while a worker or its learner holds the data
    dir, ValueError for a log with fewer items than the model's dimension."""
    model = settings.data_dir / "checkpoints" / "model.npz"
    with lock_data_dir(settings.data_dir), lock_data_dir(settings.data_dir, LEARNER_LOCK):
        if model.exists() and not force:
            raise FileExistsError(f"{model} exists (a model learned, or bootstrapped, before):"
                                  " --force replaces it and what it learned")
        taken = _as_a_worker_takes(settings, events)
        engine = Engine(settings.replace(index_enabled=False))
        ids = assign_log_priors(engine.learner, events.users[taken], events.items[taken],
                                window=window, seed=settings.model_seed)
        weights = settings.kind_weights
        engine.popularity.add_many(events.items[taken].tolist(), events.ts[taken].tolist(),
                                   [weights[str(kind)] for kind in events.kinds[taken]])
        # a replaced run's journal files: the new counts are saved as holding them (a start
        # skips them), and the save removes them; unlinked before the save, a death in
        # between left the old model with its counts short of them
        engine.popularity.keep_journal(engine.popularity_path)
        engine.save()
        engine.popularity.journal.close()
        forget_rows_shared(settings)  # none of these rows is on the item-rows topic
        if settings.embedded:  # an embedded run may take this data dir (nothing to drop)
            (settings.data_dir / EMBEDDED_MARK).touch()
    used = int(taken.sum())
    log.info("bootstrapped %d items from %d events into %s", len(ids), used, model)
    return Bootstrapped(model, len(ids), used, len(events) - used)


def _as_a_worker_takes(settings: Settings, events: InteractionLog) -> np.ndarray:
    """Which events a worker would take in (a mask): a configured kind, a time that is a
    finite number of seconds, 0 or more (the wire refuses others), and not further ahead of
    now than ``max_event_ahead_s``."""
    taken = np.isin(events.kinds.astype(str), list(settings.kind_weights))
    taken &= np.isfinite(events.ts) & (events.ts >= 0)
    if settings.max_event_ahead_s is not None:
        taken &= events.ts <= time.time() + settings.max_event_ahead_s
    return taken
