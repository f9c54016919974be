"""Run one worker process: the Faust app, its state and its metrics endpoint."""

from __future__ import annotations

import logging
import math
import os
import threading
import time

import faust

from state.stream_positions import note_topic_ids

from .app import create_app
from .compat import install_embedded_broker_fixes
from .engine import Engine
from .kafka import Topics, ensure_topics
from .learner_process import LearnerProcess, freeze_startup_objects, limit_threads
from .metrics import Metrics
from .processes import EMBEDDED_MARK, LEARNER_LOCK, LEARNER_LOCK_WAIT_S, lock_data_dir
from .settings import Settings

log = logging.getLogger(__name__)


def build_metrics(engine: Engine) -> Metrics:
    metrics = Metrics()
    metrics.gauge("streamrec_users", "Users whose history this worker holds.",
                  lambda: engine.users)
    metrics.gauge("streamrec_items", "Distinct items this worker has seen.",
                  lambda: len(engine.popularity))
    metrics.gauge("streamrec_ingest_lag_events",
                  "Events this worker has yet to take in (high watermarks of its partitions "
                  "minus the last offsets taken).", lambda: engine.behind)
    metrics.gauge("streamrec_withdrawn_items",
                  "Items withdrawn from the catalogue (the withdrawn-items topic): never "
                  "answered.", lambda: len(engine.withdrawn))
    metrics.gauge("streamrec_model_version", "Version of the model serving requests.",
                  lambda: engine.model_version)
    metrics.gauge("streamrec_model_items", "Items with a learned vector.",
                  lambda: len(engine.learner))
    metrics.gauge("streamrec_train_loss", "Exponentially weighted mean of the batch loss.",
                  lambda: engine.loss.get())
    metrics.gauge("streamrec_gramian_drift",
                  "Relative distance of the incremental item Gramian from its last recompute.",
                  lambda: engine.learner.last_drift)
    metrics.gauge("streamrec_alpha0",
                  "All-pairs weight per (user, item) pair now (relative: it follows the "
                  "density of the positives).", lambda: engine.learner.alpha0)
    metrics.gauge("streamrec_checkpoint_age_seconds", "Seconds since the last checkpoint.",
                  lambda: time.time() - engine.checkpointed_at)
    metrics.gauge("streamrec_checkpoint_bytes",
                  "Bytes the last model checkpoint wrote (the item model's and Deep "
                  "Retrieval's files; 0 before one).",
                  lambda: engine.last_checkpoint.bytes if engine.last_checkpoint else 0)
    metrics.gauge("streamrec_checkpoint_seconds",
                  "Seconds the last model checkpoint took to write (0 before one).",
                  lambda: engine.last_checkpoint.seconds if engine.last_checkpoint else 0)
    metrics.gauge("streamrec_train_redelivered_messages",
                  "Training messages skipped since the worker started: the model held them "
                  "already (delivered again after a crash or a rebalance).",
                  lambda: engine.redelivered)
    metrics.gauge("streamrec_train_repeated_examples",
                  "Training examples skipped since the worker started: made again for events "
                  "read again after a crash, whose examples the model had learned.",
                  lambda: engine.repeated_examples)
    serving_gauges = {
        "ndcg": ("Weighted NDCG@k (STREAMREC_SERVE_TUNING_K) of the serving pick on training "
                 "examples ranked before they were learned (prequential).",
                 lambda: engine.serving_choice.best_mean),
        "ndcg_configured": ("The same for the configured serving settings.",
                            lambda: engine.serving_choice.means[0]),
        "half_life_events": ("Recency half-life (events) of the user vector that answers; "
                             "+Inf: no decay.", lambda: engine.serving.half_life_events
                             if engine.serving.half_life_events is not None else math.inf),
        "bias_weight": ("Weight of the item bias (popularity) in the answering score.",
                        lambda: engine.serving.bias_weight),
        "samples": ("Training examples ranked to choose the serving settings.",
                    lambda: engine.serving_choice.samples),
        "moves": ("Times the answering serving settings changed since the worker started.",
                  lambda: engine.serving_choice.moves),
        "lead": ("Standard errors by which the best other serving settings lead the answering "
                 "ones on the stream (they take over past STREAMREC_SERVE_TUNING_MARGIN_Z).",
                 lambda: engine.serving_choice.lead),
    }
    for key, (doc, read) in serving_gauges.items():
        metrics.gauge(f"streamrec_serving_{key}", doc, read)
    index_gauges = {
        "version": "Version of the serving item index (0: exact search).",
        "items": "Items in the serving item index.",
        "build_seconds": "Seconds the last index build took.",
        "age_seconds": "Seconds since the serving index was built.",
        "swaps": "Index versions swapped in since the worker started.",
        "failures": "Index builds that failed (the previous version kept serving).",
        "updates": "Index versions made by updating the previous one in place.",
        "waiting_seconds": "Seconds a due index build has waited for a backlog (0: none).",
        "exact_rows": "Items scored exactly beside the serving index (moved since its "
                      "snapshot, or new), as of the last answer: what an answer adds to the "
                      "graph search.",
        "filled_answers": "Answers whose index search reached fewer candidates than asked for, "
                          "filled by exact search over every item (a product with every row).",
    }
    for key, doc in index_gauges.items():
        metrics.gauge(f"streamrec_index_{key}", doc,
                      lambda key=key: engine.index.stats(time.time())[key])
    dr_gauges = {
        "m_steps": "Deep Retrieval M-steps installed since the worker started.",
        "last_m_step_seconds": "Seconds the last Deep Retrieval M-step took.",
        "largest_path": "Items on the largest Deep Retrieval path.",
        "nonempty_paths": "Deep Retrieval paths holding at least one item.",
        "items": "Items with Deep Retrieval paths.",
        "m_step_failures": "Deep Retrieval M-steps that failed (the old paths kept serving).",
    }
    if engine.paths is not None:
        for key, doc in dr_gauges.items():
            metrics.gauge(f"streamrec_dr_{key}", doc,
                          lambda key=key: engine.dr_stats().get(key, 0.0))
        metrics.gauge("streamrec_dr_estep_loss",
                      "Exponentially weighted mean of the Deep Retrieval E-step loss.",
                      lambda: engine.dr_loss.get())
    engine.metrics = metrics
    return metrics


class Worker(faust.Worker):
    """A Faust worker whose graceful stop has a deadline.

    Faust's stop commits offsets and flushes producers; with the broker gone (killed with the
    same Ctrl-C, or lost) it retries forever and the process never exits, which leaves an
    orphan holding the data dir's locks. After ``shutdown_timeout_s`` the process exits anyway;
    the model checkpoint of the last ``checkpoint_interval_s`` stands and events after the last
    commit are delivered again (at least once).

    No terminal spinner: Faust's sets the root logger to DEBUG whenever the configured level is
    WARNING or above (to spin on every record), so every debug call of every library built a
    record that was then dropped: a send of a training message built one with the message's
    bytes in it. A worker runs as a service; the level configured is the level logged.
    """

    def __init__(self, *args, shutdown_timeout_s: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.shutdown_timeout_s = shutdown_timeout_s
        self.spinner = None

    def _schedule_shutdown(self, signal) -> None:
        if not self._signal_stop_time:
            deadline = threading.Timer(self.shutdown_timeout_s, _exit_after_deadline,
                                       args=(self.shutdown_timeout_s,))
            deadline.daemon = True
            deadline.start()
        super()._schedule_shutdown(signal)


def _exit_after_deadline(timeout_s: float) -> None:
    log.error("graceful stop took longer than %.0f s; exiting now", timeout_s)
    logging.shutdown()
    os._exit(EXIT_DEADLINE)


#: exit status of a worker whose graceful stop overran its deadline
EXIT_DEADLINE = 75
#: exit status of a worker stopped because its learner process died
EXIT_LEARNER_DIED = 76


def note_topics(settings: Settings, topics: Topics) -> list[str]:
    """Void the checkpoint's places in the topics that were made again since the last start
    (:func:`~state.stream_positions.note_topic_ids`; the model is kept), and return those
    topics. Only the topics whose offsets the checkpoint holds, or whose rows it marks as
    published: another topic made again changes nothing here. Under the learner's lock: a
    learner process that outlived its killed worker may still write a checkpoint, whose
    places would be taken for new ones if it came after the mark."""
    kept = {settings.topic_events, settings.train_topic, settings.items_topic}
    ids = {topic: topic_id for topic, topic_id in topics.ids.items() if topic in kept}
    with lock_data_dir(settings.data_dir, LEARNER_LOCK, wait_s=LEARNER_LOCK_WAIT_S):
        renewed = note_topic_ids(settings.data_dir / "checkpoints", ids,
                                 [topic for topic in topics.created if topic in kept],
                                 rows_topic=settings.items_topic)
    if renewed:
        log.warning("topics %s were made again since the last start: the checkpoint's places "
                    "in them are void, the model is kept", renewed)
    return renewed


def _start_serving(settings: Settings, engine: Engine, learner: LearnerProcess | None):
    """The checkpoint loaded, the metrics served, the Faust app and its worker made: the
    metrics server (None when off) and the worker."""
    if engine.load():
        log.info("loaded checkpoint: %d items", len(engine.popularity))
    engine.popularity.keep_journal(engine.popularity_path)  # this process saves the counts
    metrics = build_metrics(engine)
    server = None
    if settings.metrics_port:
        server, _ = metrics.serve(settings.metrics_host, settings.metrics_port)
        log.info("metrics on http://%s:%d/metrics", settings.metrics_host, settings.metrics_port)
    app = create_app(settings, engine, metrics, learner)
    worker = Worker(app, loglevel=settings.log_level, quiet=True, redirect_stdouts=False,
                    shutdown_timeout_s=settings.shutdown_timeout_s)
    log.info("%d objects made at start kept out of garbage collection",
             freeze_startup_objects())
    return server, worker


def save_on_exit(engine: Engine, app, learner: LearnerProcess | None) -> None:
    """The worker's last checkpoint. The model is the engine's to save only without a
    learner process (which saved its own), and not while item sharing still catches up:
    the file's time would then pass this worker's own rows published before the last stop
    and not installed yet, and the next start's catch-up would leave them out."""
    catching_up = app.streamrec_restoring()  # the app's own test (create_app's restoring)
    engine.save(model=learner is None and not catching_up)
    log.info("checkpoint written to %s%s", engine.checkpoint_dir,
             " (not the model: item sharing had not caught up)" if catching_up else "")


def run_worker(settings: Settings) -> int:
    """Block until SIGTERM/SIGINT; checkpoint the model state on the way out."""
    held = lock_data_dir(settings.data_dir)  # for the life of the process
    if not settings.embedded:  # its state is another broker's now: an embedded run keeps off
        (settings.data_dir / EMBEDDED_MARK).unlink(missing_ok=True)
    if settings.compat_fixes:
        install_embedded_broker_fixes(settings.worker_fetch_max_wait_ms)
    limit_threads()  # here too: user vectors, answers, and learning when it runs on the loop
    note_topics(settings, ensure_topics(settings))
    (settings.data_dir / "faust").mkdir(parents=True, exist_ok=True)  # Faust makes one level only
    engine = Engine(settings, replica=settings.learner_process)
    learner = LearnerProcess(settings).start() if settings.learner_process else None
    try:
        server, worker = _start_serving(settings, engine, learner)
    except BaseException:  # a busy metrics port: the learner must not outlive the start
        if learner is not None:  # (multiprocessing's exit would wait for it forever)
            learner.stop(settings.shutdown_timeout_s)
        engine.index.close()
        raise
    code = 0
    try:
        worker.execute_from_commandline()
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    finally:
        engine.index.close()
        if engine.paths is not None:
            engine.paths.close()
        if learner is not None:  # also after a death: joined here, not in multiprocessing's atexit
            learner.stop(settings.shutdown_timeout_s)
        save_on_exit(engine, worker.app, learner)
        if server is not None:
            server.shutdown()
        held.close()  # the data dir is free for the next worker
    return EXIT_LEARNER_DIED if learner is not None and learner.died else code
