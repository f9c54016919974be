"""The one settings object: frozen, typed, read from ``STREAMREC_*`` environment variables.

Nothing else in streamrec reads the environment. Components receive this object (or plain
values taken from it) from the factory that builds them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .wire import MAX_REQUEST_HISTORY

DEFAULT_KIND_WEIGHTS = {"view": 1.0, "click": 4.0, "cart": 6.0, "sale": 10.0}
#: longest wait or interval a setting may give, in seconds (about 11 days): the system's
#: waits take no more (a pipe's poll counts milliseconds in a C int), and `1e300` overflowed
#: one far from where it was set
MAX_WAIT_S = 1_000_000.0
#: the settings that are waits or intervals (not ages or half-lives, which may be long)
WAIT_SETTINGS = ("share_items_s", "hand_over_wait_s", "session_timeout_s", "history_sweep_s",
                 "popularity_refresh_s", "checkpoint_interval_s", "shutdown_timeout_s",
                 "input_follow_s", "ingest_batch_wait_s", "learn_batch_wait_s",
                 "learner_start_timeout_s", "index_interval_s", "index_backlog_wait_s",
                 "index_grace_s", "index_check_s", "dr_m_step_interval_s", "dr_follow_model_s")

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]


def unknown_settings(environ: Mapping[str, str]) -> list[str]:
    """The ``STREAMREC_*`` names of ``environ`` that name no setting: a typo there (or a
    setting a newer version has) would otherwise be ignored without a word."""
    known = {f"STREAMREC_{name}".upper() for name in Settings.model_fields}
    return sorted(name for name in environ
                  if name.upper().startswith("STREAMREC_") and name.upper() not in known)


def broker_servers(broker: str) -> list[str]:
    """``host:port`` strings of a ``broker`` setting: servers split at ``,`` or ``;``, each
    with or without ``kafka://``, spaces around them left out."""
    servers = (part.strip().removeprefix("kafka://").strip()
               for part in broker.replace(",", ";").split(";"))
    return [server for server in servers if server]


class Settings(BaseSettings):
    """streamrec configuration. Every field maps to ``STREAMREC_<FIELD>`` (case-insensitive)."""

    # A variable set to nothing (``STREAMREC_BROKER=`` in an env file) is read as unset: the
    # default, where pydantic-settings would read "" (no broker servers at all, Path("."))
    # hide_input_in_errors: a refused configuration printed the values it was given, the
    # tail of STREAMREC_SASL_PASSWORD among them
    # allow_inf_nan: no number here means anything at inf or nan ('none' turns a limit or a
    # decay off); they passed, then failed far from here (`inf` seconds overflow a wait)
    model_config = SettingsConfigDict(env_prefix="STREAMREC_", frozen=True, extra="ignore",
                                      env_ignore_empty=True, hide_input_in_errors=True,
                                      allow_inf_nan=False)

    # -- broker --------------------------------------------------------------------------
    broker: str | None = Field(
        None,
        description="Kafka bootstrap servers, e.g. 'kafka:9092' or 'kafka://a:9092;b:9092'. "
        "Unset: `streamrec up` starts the embedded broker.",
    )
    embedded_host: str = Field("127.0.0.1", min_length=1,
                               description="Listen address of the embedded broker.")
    embedded_port: int = Field(9092, ge=1, le=65535, description="Port of the embedded broker.")
    embedded_compat: bool | None = Field(
        None,
        description="Apply the embedded-broker compatibility fixes (short fetch waits, exact "
        "end offsets). Default: on exactly when the embedded broker is used.",
    )
    security_protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None

    # -- application -----------------------------------------------------------------------
    app_id: str = Field("streamrec", description="Consumer group and changelog prefix.")
    data_dir: Path = Field(Path(".streamrec"), description="Local state: tables, checkpoints.")
    datasets_dir: Path = Field(Path("../shared/data"),
                               description="Where the sample datasets (demo, eval, tests) lie.")
    topic_events: str = "timeline-events"
    topic_dead_letters: str = "timeline-events-dlq"
    topic_requests: str = "rec-requests"
    topic_responses: str = "rec-responses"
    topic_train: str | None = Field(
        None, description="Training examples, a message per item partition per ingest batch. "
        "Default '<app_id>-train-examples': the topic is internal to one app, like its "
        "changelogs (two apps on one cluster must not learn each other's examples).")
    partitions: int = Field(4, ge=1, le=1024, description="Partitions of every topic but "
                            "the withdrawn items' (one).")
    # Several workers of one app: each learns the items of its training partitions; with
    # share_items each publishes the rows it owns and installs the others' (README, "Several
    # workers"), so every worker encodes users and answers with the whole catalogue.
    share_items: bool = Field(
        False, description="Publish the item rows this worker learns to the item-rows topic and "
        "take the other workers' from it (for several workers of one app).")
    share_items_s: float = Field(
        2.0, gt=0, description="How often a worker publishes the rows it learned since.")
    hand_over_wait_s: float = Field(
        5.0, ge=0, description="Longest a worker losing partitions or stopping waits for its "
        "learner's batches in flight and, with sharing, a checkpoint being written: before it "
        "publishes the rows they moved (sharing), before its last commit (stopping).")
    topic_items: str | None = Field(
        None, description="Item rows keyed by item (compacted). Default '<app_id>-item-rows'.")
    topic_withdrawn: str | None = Field(
        None, description="Items withdrawn from the catalogue, keyed by item (compacted; every "
        "worker reads all of it). Default '<app_id>-withdrawn-items'.")
    replication_factor: int = Field(1, ge=1)
    session_timeout_s: float = Field(
        10.0, gt=0, description="Consumer group session timeout; joins wait about half of it."
    )
    fetch_max_wait_ms: int | None = Field(
        None, ge=1, le=int(MAX_WAIT_S * 1000),
        description="Worker fetch wait. Default: 10 on the embedded broker, else 1500."
    )

    # -- events and requests ---------------------------------------------------------------------
    kind_weights: dict[str, float] = Field(
        default_factory=lambda: dict(DEFAULT_KIND_WEIGHTS),
        description="Event kinds and their confidence weights (JSON object).",
    )
    history_length: int = Field(50, ge=1, le=10_000, description="Events kept per user (T).")
    history_ttl_s: float | None = Field(
        None, gt=0, description="A user's history is deleted (from the store and, as a "
        "tombstone, from the changelog) once its newest event is this much older than the "
        "newest event the worker has taken in from its partition (event time, at most the "
        "worker's clock): a "
        "product whose users come and go holds the histories of those who come back, not of "
        "everyone ever seen. 'none' = kept for ever.")
    history_sweep_s: float = Field(
        3600.0, gt=0, description="How often a worker looks for expired histories: a read of "
        "every history it holds, 256 between turns of its event loop (about 25 s of CPU at a "
        "million histories of 50 events: under 1 % of a core hourly).")
    max_event_bytes: int = Field(16_384, ge=256, description="Larger events go to the DLQ.")
    max_event_ahead_s: float | None = Field(
        86_400.0, gt=0, description="Events whose ts is further ahead of the worker's clock go "
        "to the DLQ (ts_future): one event from the far future (a ts in milliseconds) would "
        "lead the event-time clocks of popularity and decay, and every other item would read "
        "as forgotten. 'none' = no limit.")
    max_request_bytes: int = Field(65_536, ge=256, description="Larger requests get an error.")
    max_request_history: int = Field(1000, ge=0, le=MAX_REQUEST_HISTORY,
                                     description="Items a request's history may carry, and "
                                     "its exclude.")
    max_reply_topics: int = Field(
        64, ge=1, description="Most reply topics (a request's reply_to other than the "
        "responses topic) a worker sends to at once; a request naming one more takes the "
        "place of the one used longest ago if that one is idle (10 minutes), else gets its "
        "error on the responses topic. Each is a topic the worker may create and keeps open: "
        "requests must not make it open them without bound.")
    popularity_half_life_s: float = Field(
        7 * 86400.0, gt=0, description="Half-life of item popularity, in event time."
    )
    popularity_refresh_s: float = Field(
        0.5, ge=0, description="How stale the cached popularity order may get."
    )
    checkpoint_interval_s: float = Field(30.0, gt=0)
    checkpoint_delta_share: float = Field(
        0.5, ge=0, description="A model checkpoint writes the rows changed since the last one "
        "(a delta) until the deltas since the last whole write weigh this share of it, then "
        "the whole model (a base): the files on the disk stay under 1 + this share times the "
        "model between checkpoints, and a load reads no more. 0: every checkpoint whole.")
    shutdown_timeout_s: float = Field(
        20.0, gt=0, description="Longest graceful stop of a worker before it exits anyway.")

    # -- model (README "Status"; docs/results.md) ----------------------------------------------
    model_dim: int = Field(64, ge=2, le=1024, description="Embedding dimension d.")
    encoder: Literal["mean", "ials"] = Field("mean", description="User encoder.")
    encoder_half_life_s: float | None = Field(
        None, gt=0, description="Recency decay of the mean encoder (event time); unset = none.")
    # Chosen on the validation folds (docs/results.md): with d = 64, NDCG@10 on Beauty
    # 0.0391 -> 0.0420 at 1 to 3 events (0.0404 at 12), Toys 0.0352 -> 0.0374 at 2 (0.0363 at
    # 5), MovieLens 0.1145 -> 0.1325 at 2 and 0.1380 at 5.
    encoder_half_life_events: float | None = Field(
        3.0, gt=0, description="Recency decay of the user encoder in the user's own events: "
        "the event j places before the newest weighs 2^(-j/h); 'none' = no decay.")
    # Serving reads the same history with its own recency and bias weight: the item vectors
    # learn best from a smooth context (3 events above), while the next event follows the last
    # one or two most closely. Validation NDCG@10 (d = 64, one pass, bias weight 1): Beauty
    # 0.0430 -> 0.0458 at 1 event (0.0462 at 0.75), Toys 0.0379 -> 0.0401; the pair that
    # answers is measured on the stream (below; docs/results.md "serving settings chosen on
    # the stream").
    serve_half_life_events: float | None = Field(
        1.0, gt=0, description="Recency decay of the user vector that answers requests, in the "
        "user's own events; 'none' = no decay. Learning uses encoder_half_life_events.")
    serve_bias_weight: float = Field(
        1.0, ge=0, description="Weight of the item bias (popularity) in the score that answers "
        "requests: <phi, v_i> + w * b_i; 1 = the learned score, lower = more personal.")
    # Every serve_tuning_every-th training example is ranked, before it is learned, under
    # each pair of serve_tuning_half_lives x serve_tuning_bias_weights (and the two settings
    # above, which answer until serve_tuning_min_samples are in); answers then use the pair
    # with the best weighted NDCG@k (serve_tuning_k) once it beats the answering pair by
    # serve_tuning_margin_z standard errors (models/serving_choice.py). Every 25th, NDCG@100,
    # a margin of 1 (was every 100th, NDCG@10, no margin): the held-out NDCG@10 of the final
    # pick over all sampling phases, mean/worst, Toys 0.0412/0.0341 -> 0.0413/0.0410, Beauty
    # 0.0416/0.0397 -> 0.0417/0.0400, MovieLens 0.1156/0.0940 -> 0.1269/0.1217, the pick
    # moving 2 times a pass instead of 5-7 (benchmarks/serving_pick.py; docs/results.md).
    serve_tuning_every: int = Field(
        25, ge=0, description="Rank every n-th training example under each serving candidate "
        "and answer with the best; 0: always answer with the two settings above.")
    serve_tuning_half_lives: list[float | None] = Field(
        [1.0, 3.0], description="Serving half-lives (events) tried; null: no decay.")
    serve_tuning_bias_weights: list[float] = Field(
        [1.0, 0.5, 0.25, 0.0], description="Serving bias weights tried.")
    serve_tuning_half_life_samples: float = Field(
        1000.0, gt=0, description="Half-life, in ranked examples, of each candidate's NDCG.")
    serve_tuning_margin_z: float = Field(
        1.0, ge=0, description="Standard errors of the paired difference by which another "
        "pair's weighted NDCG must beat the answering pair's before it answers instead.")
    serve_tuning_k: int = Field(
        100, ge=1, description="Cutoff k of the NDCG@k each serving pair is measured with on "
        "the stream. Deeper than the 10 a request asks for: fewer samples are 0, so the pick "
        "needs fewer of them to tell pairs apart.")
    serve_tuning_min_samples: int = Field(
        200, ge=1, description="Ranked examples before a candidate other than the settings "
        "above may answer.")
    serve_tuning_pool: int = Field(
        5_000, ge=100, description="Most items a sampled example is ranked among (a larger "
        "catalog: a uniform sample of this many, the rank scaled up).")
    # Relative (docs/results.md): 40 of 3-100 gave the best worst-dataset gain on the validation
    # folds of Beauty, Toys and MovieLens. Per pair, 0.05 was best on MovieLens and
    # 0.002-0.0125 on the Amazon sets, which is why it became relative.
    alpha0: float = Field(40.0, ge=0, description="Weight of the all-pairs (implicit zero) term: "
                          "relative, the all-pairs mass on an item as a multiple of the mean "
                          "item's positives; otherwise the weight of each (user, item) pair.")
    alpha0_relative: bool = Field(True, description="Read alpha0 relative to the positives' "
                                  "density (one value fits sparse and dense products).")
    user_gramian_weighting: Literal["events", "users"] = Field(
        "events", description="How the user Gramian G_C weighs the stream's user vectors: "
        "'events', each event once (a user of n events weighs n); 'users', each event by "
        "1/(its user's events so far, as its history holds them), Rendle's 1/|I_c| (eq. 41) "
        "as a stream knows it (a user weighs about ln n + 0.6; docs/results.md, 'The user "
        "Gramian by users').")
    l2: float = Field(0.01, ge=0, description="L2 regularization λ.")
    learning_rate: float = Field(0.2, gt=0, description="Adagrad learning rate of item vectors.")
    item_solver: Literal["solve", "adagrad"] = Field(
        "solve", description="Item step: closed-form per-item solve, or Adagrad (O(d) memory).")
    prior_weight: float = Field(
        0.5, ge=0, description="Pull of a solved item towards its starting row (μ).")
    item_cg_steps: int = Field(
        3, ge=0, le=1024, description="Conjugate-gradient steps of an item's solve, from its "
        "current row; 0: an exact solve.")
    positives_half_life: float | None = Field(
        30_000.0, gt=0, description="Half-life, in learned events, of an item's "
        "accumulated positives (solve) and of the input offsets' Adagrad accumulators; "
        "unset: they count forever.")
    positives_by_partition: bool = Field(
        True, description="Count the positives' discount on one clock per item partition, so "
        "that a learner that reads its partitions out of step weighs them as in step "
        "(models/learner.py, LearnerConfig.positive_lanes; off: one clock of learned events).")
    # docs/results.md "items get an input side": input offsets (q = v + delta) learned from
    # the user side of the loss; 0 is the tied model of earlier rounds. 0.03 of 0.01-0.3: the
    # Amazon sets' validation NDCG@10 rises with it up to 0.05-0.15 (+12 % / +13 % at 0.03);
    # MovieLens's held-out users (the later 20 % of their ratings, not the next one) keep
    # their number at 0.03 when answers read 3 events (0.1317 against 0.1300 tied) and lose
    # 18 % when they read 1 (the stream cannot tell the two apart), and fall from 0.05 on.
    input_lr: float = Field(0.03, ge=0, description="Adagrad step size of the items' input "
                            "offsets (the vectors user encodings average are v + delta); 0: "
                            "inputs tied to the item vectors. The mean encoder only.")
    input_follow_s: float = Field(
        1.0, ge=0, description="While batches queue in the learner process, how often it "
        "hands the input offsets it moved to the worker's loop (seconds; 0: after every "
        "batch; a learner that has caught up sends them at once). A batch moves the inputs "
        "of every item in its histories, so sent with every batch they were most of a "
        "report's bytes; user vectors read them at most this late.")
    ingest_batch: int = Field(256, ge=1, description="Events the ingest agent takes at once.")
    ingest_batch_wait_s: float = Field(
        0.05, gt=0, description="Longest wait to fill an ingest batch (adds to event latency). "
        "In a backlog a batch fills only as fast as the consumer delivers, on the same loop: "
        "with 0.01 the worker's batches held 60-80 events, with 0.05 they are full, and every "
        "batch's fixed costs (a changelog write, a training message per item partition, a "
        "learner step's share) are paid a third as often (docs/throughput.md).")
    learn_batch: int = Field(
        256, ge=1, description="Largest micro-batch of training examples (a learning step). "
        "A step's fixed costs (the structure model's Adam step, the item solve's setup, the "
        "serving pick's pool) are shared by its examples: a step cost about a sixth less an "
        "example at 512, and NDCG@10 was not better at either on all three datasets, but "
        "each touched item is solved once a step, and a short stream (a few thousand events) "
        "learned less well in half as many steps; the default stays 256 "
        "(docs/throughput.md, 'Learning steps of 512 examples').")
    learn_take_messages: int = Field(
        256, ge=1, description="Most training messages the learn task takes at once (one "
        "frame to the learner, learned in steps of learn_batch examples, then one report to "
        "the loop that answers). A message holds tens of examples in a backlog (an ingest "
        "batch's share of one item partition), so this bounds the memory a frame takes and "
        "how long the answering replica waits for the rows it moved.")
    learn_batch_wait_s: float = Field(0.05, gt=0, description="Longest wait to fill a batch.")
    learner_process: bool = Field(
        True, description="Learn in a child process of the worker (the event loop keeps a "
        "replica of the item rows); false: learn on the worker's event loop.")
    learner_start_timeout_s: float = Field(
        600.0, gt=0, description="Longest wait for the learner process to start: to take the "
        "data dir's learner lock (up to 60 s, while a previous learner stops) and load the "
        "checkpoint (11 KB an item at d = 64: minutes for millions of items on a slow disk).")
    direct_delivery: bool = Field(
        True, description="Hand each consumed message to its streams in place, without the "
        "four asyncio tasks Faust makes per message (stream_app/delivery.py); false: Faust's "
        "own path.")
    batch_intake: bool = Field(
        True, description="Hand the events and training topics' messages to the ingest and "
        "learn tasks in batches, without Faust's per-message event, stream and take_events "
        "layers (stream_app/batch_intake.py), training messages acknowledged once a checkpoint "
        "(with share_items, a publish) holds them (stream_app/checkpoint_acks.py); false: "
        "agents on Faust's stream.")
    # The worker's one consumer reads events, training examples and requests. Faust hands an
    # agent every record of a poll before it polls again, and aiokafka returns a partition's
    # buffered records before those of partitions fetched later; with the client defaults
    # (1 MiB per partition, no limit per poll) a backlog of events was taken in whole before
    # the learn agent saw its first training example (measured: nothing learned for 13 s of a
    # 20,000-event backlog, then everything). Small fetches and polls interleave the topics,
    # so learning keeps up within seconds; intake speed did not change.
    fetch_partition_bytes: int = Field(
        16384, ge=1024, description="Most bytes fetched per partition at once (the first "
        "record batch always comes, however large).")
    fair_polls: bool = Field(
        True, description="Share each consumer poll equally among the partitions with records "
        "waiting (false: the client's order, where a backlog of events starves the training "
        "partitions; stream_app/fair_fetch.py).")
    train_compression_level: int = Field(
        1, ge=0, le=9, description="zlib level of the training messages (0: plain JSON); "
        "4-5 times fewer bytes to write, store and fetch (docs/throughput.md).")
    poll_records: int = Field(500, ge=1, description="Most records one consumer poll returns.")
    model_seed: int = 0

    # -- serving index (README "Ask for recommendations") -------------------------------------
    index_enabled: bool = Field(True, description="Serve from HNSW indices rebuilt aside.")
    index_interval_s: float = Field(60.0, gt=0, description="Rebuild at least this often.")
    index_changed_items: int = Field(
        10_000, ge=1, description="Rebuild sooner once this many items have been learned "
        "(or once more rows moved than index_stale_limit).")
    index_build_share: float = Field(
        0.5, gt=0, le=1, description="Most of the wall time index builds may take: a build of "
        "b seconds is followed by b·(1/share − 1) seconds without one (1: back to back).")
    index_update_share: float = Field(
        0.1, ge=0, le=1, description="Update the serving index in place when the rows that "
        "moved or are new are at most this share of it, instead of building from scratch "
        "(0: always build; index_sync.swap.RebuildPolicy).")
    index_backlog_events: int = Field(
        2_000, ge=0, description="A due index build waits while the worker is more than this "
        "many events behind its input (a replay, a burst), so intake and learning keep the CPU; "
        "0: never wait.")
    index_backlog_wait_s: float = Field(
        60.0, ge=0, description="Longest a due index build waits for a backlog.")
    index_min_items: int = Field(
        1000, ge=1, description="Below this many items, exact search serves (it is as fast).")
    index_clusters: int = Field(0, ge=0, description="k-means clusters (0: one index).")
    index_stale_limit: int = Field(
        4096, ge=0, description="Most items moved since the index's snapshot that an answer "
        "scores exactly beside the graph search (the most recently moved); more moved than "
        "this makes a rebuild due (index_sync.swap.RebuildPolicy).")
    index_ef: int = Field(128, ge=1, description="HNSW search breadth (a query uses ef >= k).")
    index_m: int = Field(16, ge=2, description="HNSW graph degree.")
    index_space: Literal["ip", "sphere"] = Field(
        "ip", description="HNSW over the item rows as they are ('ip'), or put on one sphere "
        "first ('sphere', the MIPS-to-NN reduction; lost recall on learned rows, "
        "index_sync/hnsw.py).")
    index_build_threads: int = Field(1, ge=1, description="Threads of an index build.")
    index_keep: int = Field(2, ge=1, description="Index versions kept on disk.")
    background_niceness: int = Field(
        10, ge=0, le=19, description="How much lower the CPU priority of index builds and "
        "Deep Retrieval M-steps is than intake's and learning's (Linux; 0: the same).")
    index_grace_s: float = Field(300.0, ge=0, description="Age before an old version is pruned.")
    index_check_s: float = Field(1.0, gt=0, description="How often a rebuild is considered.")
    # 64: on a fresh index, recall@10 against exact search was the same with 50, 64 and 100
    # candidates (0.978 at 100k items, 0.916 at 1M; benchmarks/index_serving.py), and 100 cost
    # 10 % of the answers per second; the margin over 50 is for vectors that moved since the
    # build (the rerank uses the current ones).
    rerank_candidates: int = Field(
        64, ge=1, description="Candidates a model source retrieves before the one rerank.")

    # -- Deep Retrieval (README "Ask for recommendations", source dr) -------------------------
    dr_enabled: bool = Field(
        True, description="Learn Deep Retrieval paths on the stream (E-step, M-step, source dr).")
    dr_width: int = Field(100, ge=2, le=100_000, description="Nodes per layer (K).")
    dr_depth: int = Field(3, ge=1, le=8, description="Layers (D); K^D paths.")
    dr_paths_per_item: int = Field(3, ge=1, le=32, description="Paths per item (J).")
    dr_beam: int = Field(25, ge=1, le=10_000, description="Beam of a request's path search (B).")
    dr_top_s: int = Field(16, ge=1, le=1000, description="Paths tracked per item (S).")
    dr_decay: float = Field(0.999, gt=0, le=1, description="Decay of tracked path scores (η).")
    dr_track_every: int = Field(
        4, ge=1, le=1000, description="Track path scores from every n-th learned pair (their "
        "beam search is most of an E-step; the structure model still learns from every pair).")
    dr_penalty: float = Field(1e-6, ge=0, description="Path size penalty α of f(|c|)=|c|^4/4.")
    dr_learning_rate: float = Field(0.03, gt=0, description="Adam step of the structure model.")
    dr_hidden: int = Field(0, ge=0, le=4096,
                           description="Hidden ReLU units per layer (0: one softmax layer).")
    dr_m_step_interval_s: float = Field(
        300.0, gt=0, description="Run an M-step at least this often (when events arrived).")
    dr_m_step_events: int = Field(
        200_000, ge=1, description="Run an M-step sooner once this many pairs were learned.")
    dr_max_candidates: int = Field(
        1000, ge=1, description="Most items a dr retrieval hands to the rerank.")
    dr_follow_model_s: float = Field(
        1.0, ge=0, description="How often the learner process hands its Deep Retrieval "
        "structure model to the worker's loop, which serves dr with it (seconds; 0: after "
        "every batch).")
    default_sources: list[Literal["ann", "dr", "popular"]] = Field(
        default_factory=lambda: ["ann", "popular"],
        description="Sources of a request that names none (JSON list). dr costs a beam search "
                    "per request, so it is opt-in: per request, or here.")

    # -- observability ---------------------------------------------------------------------------
    # not "": a child process reads a blank variable as unset (127.0.0.1); 0.0.0.0 listens on
    # every interface
    metrics_host: str = Field("127.0.0.1", min_length=1)
    metrics_port: int = Field(9464, ge=0, le=65535, description="0 disables the endpoint.")
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("broker")
    @classmethod
    def _names_servers(cls, broker: str | None) -> str | None:
        if broker is not None and not broker_servers(broker):
            raise ValueError(f"broker {broker!r} names no server (unset it for the embedded "
                             "broker)")
        return broker

    @field_validator("default_sources")
    @classmethod
    def _some_source(cls, sources: list[str]) -> list[str]:
        if not sources:
            raise ValueError("at least one default source is required")
        return list(dict.fromkeys(sources))

    @model_validator(mode="after")
    def _security_settings_agree(self) -> Settings:
        """Settings a client would drop without a word, or that fail only at each client's
        handshake, are refused at start (every mechanism here needs a user and a password)."""
        protocol = self.security_protocol
        password = self.sasl_password.get_secret_value() if self.sasl_password else ""
        if protocol.startswith("SASL") and not (self.sasl_username and password):
            raise ValueError(f"security_protocol {protocol} needs sasl_username and "
                             "sasl_password")
        if not protocol.startswith("SASL") and (self.sasl_username or password):
            # else the credentials were dropped, and every client connected unauthenticated
            raise ValueError("sasl_username and sasl_password are sent only with "
                             f"security_protocol SASL_PLAINTEXT or SASL_SSL, not {protocol}")
        files = [name for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile")
                 if getattr(self, name) is not None]
        if files and not protocol.endswith("SSL"):
            raise ValueError(f"{', '.join(files)} are read only with security_protocol SSL or "
                             f"SASL_SSL, not {protocol}")
        if self.ssl_keyfile is not None and self.ssl_certfile is None:
            raise ValueError("ssl_keyfile needs ssl_certfile (the key's certificate)")
        return self

    @model_validator(mode="after")
    def _ials_fold_in_is_regularized(self) -> Settings:
        if self.encoder == "ials" and self.l2 <= 0:
            raise ValueError("encoder ials needs l2 > 0: its fold-in solves (α0 G + λI), "
                             "which is singular while the catalogue has fewer items than "
                             "model_dim, and every answer and event would fail")
        return self

    @model_validator(mode="after")
    def _top_s_holds_the_paths(self) -> Settings:
        if self.dr_enabled and self.dr_top_s < self.dr_paths_per_item:
            raise ValueError(f"dr_top_s ({self.dr_top_s}) must be >= dr_paths_per_item "
                             f"({self.dr_paths_per_item}): an M-step picks each item's paths "
                             "among those it tracks")
        return self

    @model_validator(mode="after")
    def _default_sources_run_here(self) -> Settings:
        if "dr" in self.default_sources and not self.dr_enabled:
            raise ValueError("default_sources names dr, but dr_enabled is false")
        return self

    @model_validator(mode="after")
    def _waits_fit_a_timer(self) -> Settings:
        for name in WAIT_SETTINGS:
            if getattr(self, name) > MAX_WAIT_S:
                raise ValueError(f"{name} is {getattr(self, name):g} s: waits and intervals "
                                 f"are at most {MAX_WAIT_S:g} s")
        return self

    @model_validator(mode="after")
    def _topics_have_one_role_each(self) -> Settings:
        """One topic for two roles loops or mixes messages: a dead letter written to the
        events topic was read back, refused and written again for ever."""
        setting_of: dict[str, str] = {}
        for setting, topic in self.topics_by_setting().items():
            if getattr(self, setting) is None:  # an internal topic's name made from app_id
                setting = f"{setting} (its default)"
            if topic in setting_of:
                raise ValueError(f"{setting_of[topic]} and {setting} are both {topic!r}: each "
                                 "of the app's topics needs a name of its own")
            setting_of[topic] = setting
        return self

    @field_validator("positives_half_life", "encoder_half_life_events",
                     "encoder_half_life_s", "serve_half_life_events", "max_event_ahead_s",
                     "history_ttl_s", "fetch_max_wait_ms", mode="before")
    @classmethod
    def _none_word(cls, value):
        """``none`` in the environment: no value, which turns a decay or a limit with a
        default off (the fetch wait: its own default). A blank variable is unset, as every
        setting's: the default."""
        if isinstance(value, str) and value.strip().lower() in ("", "none"):
            return None
        return value

    @field_validator("serve_tuning_half_lives", "serve_tuning_bias_weights")
    @classmethod
    def _serving_grid(cls, values: list, info):
        """A grid needs values, and each must mean something: half-lives above 0 (or none),
        bias weights of 0 or more."""
        if not values:
            raise ValueError("at least one value is required")
        floor_ok = (lambda v: v is None or v > 0) if info.field_name.endswith("half_lives") \
            else (lambda v: v >= 0)
        if not all(map(floor_ok, values)):
            raise ValueError(f"{info.field_name}: half-lives must be > 0, bias weights >= 0")
        return values

    @field_validator("kind_weights")
    @classmethod
    def _weights_positive(cls, weights: dict[str, float]) -> dict[str, float]:
        if not weights:
            raise ValueError("at least one event kind is required")
        bad = {kind: w for kind, w in weights.items() if not (math.isfinite(w) and w > 0)}
        if bad:  # a weight is every event's α: training examples refuse any other
            raise ValueError(f"kind weights must be finite and > 0: {bad}")
        return weights

    # -- derived -----------------------------------------------------------------------------------
    @property
    def embedded(self) -> bool:
        """True when no external broker is configured: streamrec runs its own."""
        return self.broker is None

    @property
    def compat_fixes(self) -> bool:
        return self.embedded if self.embedded_compat is None else self.embedded_compat

    @property
    def bootstrap_servers(self) -> list[str]:
        """``host:port`` strings for kafka-python, whatever form ``broker`` was given in."""
        if self.broker is None:
            return [f"{self.embedded_host}:{self.embedded_port}"]
        return broker_servers(self.broker)

    @property
    def faust_broker_url(self) -> str:
        return ";".join(f"kafka://{server}" for server in self.bootstrap_servers)

    @property
    def worker_fetch_max_wait_ms(self) -> int:
        if self.fetch_max_wait_ms is not None:
            return self.fetch_max_wait_ms
        return 10 if self.compat_fixes else 1500

    def learner_config(self):
        from models.learner import LearnerConfig

        return LearnerConfig(dim=self.model_dim, alpha0=self.alpha0, lam=self.l2,
                             alpha0_relative=self.alpha0_relative,
                             lr=self.learning_rate, solver=self.item_solver,
                             prior_weight=self.prior_weight, cg_steps=self.item_cg_steps,
                             positives_half_life=self.positives_half_life,
                             positive_lanes=self.partitions if self.positives_by_partition
                             else 1,
                             input_lr=self.input_lr if self.encoder == "mean" else 0.0,
                             seed=self.model_seed)

    def dr_config(self):
        from models.deep_retrieval import DRConfig

        return DRConfig(input_dim=self.model_dim, width=self.dr_width, depth=self.dr_depth,
                        paths_per_item=self.dr_paths_per_item, beam=self.dr_beam,
                        top_s=self.dr_top_s, decay=self.dr_decay, penalty=self.dr_penalty,
                        hidden=self.dr_hidden, lr=self.dr_learning_rate,
                        track_every=self.dr_track_every, seed=self.model_seed)

    def m_step_policy(self):
        from index_sync.paths import MStepPolicy

        return MStepPolicy(interval_s=self.dr_m_step_interval_s, events=self.dr_m_step_events,
                           niceness=self.background_niceness)

    def serving_choice(self):
        """The serving candidates (these settings' own pair first) and their tracker."""
        from models.serving_choice import ServingCandidate, ServingChoice, candidate_grid

        own = ServingCandidate(self.serve_half_life_events, self.serve_bias_weight)
        candidates = candidate_grid(own, self.serve_tuning_half_lives,
                                    self.serve_tuning_bias_weights)
        return ServingChoice(candidates, half_life_samples=self.serve_tuning_half_life_samples,
                             min_samples=self.serve_tuning_min_samples,
                             margin_z=self.serve_tuning_margin_z, k=self.serve_tuning_k)

    def index_config(self):
        from index_sync.hnsw import HnswParams
        from index_sync.serving import IndexConfig
        from index_sync.swap import RebuildPolicy

        return IndexConfig(
            root=self.data_dir / "index", enabled=self.index_enabled, seed=self.model_seed,
            stale_limit=self.index_stale_limit,
            policy=RebuildPolicy(interval_s=self.index_interval_s,
                                 changed_items=self.index_changed_items,
                                 build_share=self.index_build_share,
                                 update_share=self.index_update_share,
                                 niceness=self.background_niceness,
                                 backlog_events=self.index_backlog_events,
                                 backlog_wait_s=self.index_backlog_wait_s,
                                 min_items=self.index_min_items, clusters=self.index_clusters,
                                 keep=self.index_keep, grace_s=self.index_grace_s),
            params=HnswParams(M=self.index_m, ef=self.index_ef,
                              threads=self.index_build_threads, space=self.index_space))

    @property
    def event_kinds(self) -> frozenset[str]:
        return frozenset(self.kind_weights)

    @property
    def train_topic(self) -> str:
        return self.topic_train or f"{self.app_id}-train-examples"

    @property
    def items_topic(self) -> str:
        return self.topic_items or f"{self.app_id}-item-rows"

    @property
    def withdrawn_topic(self) -> str:
        return self.topic_withdrawn or f"{self.app_id}-withdrawn-items"

    def topics_by_setting(self) -> dict[str, str]:
        """The app's topics by the setting that names them (its default where unset)."""
        return {"topic_events": self.topic_events,
                "topic_dead_letters": self.topic_dead_letters,
                "topic_requests": self.topic_requests, "topic_responses": self.topic_responses,
                "topic_train": self.train_topic, "topic_items": self.items_topic,
                "topic_withdrawn": self.withdrawn_topic}

    def reply_topic_refusal(self, name: str) -> str | None:
        """Why a request may not name ``name`` as its reply topic; None when it may. Only
        response topics: a client must not make the worker write into its events or any
        other topic, its own internal ones (``<app_id>-…``: changelogs, training examples,
        item rows) included, also where the responses prefix is a prefix of them."""
        prefix = self.topic_responses
        if not name.startswith(prefix):
            return f"reply_to must start with {prefix!r}"
        own = {self.topic_events, self.topic_dead_letters, self.topic_requests,
               self.train_topic, self.items_topic, self.withdrawn_topic}
        internal = f"{self.app_id}-"
        if name in own or name.startswith(internal) and not prefix.startswith(internal):
            return f"reply_to {name!r} is one of this app's own topics"
        return None

    def replace(self, **changes: object) -> Settings:
        """A copy with some fields changed (validated again)."""
        return type(self).model_validate({**self.model_dump(), **changes})
