"""The learning path the stream uses (Engine.ingest -> Engine.learn -> Engine.answer), on planted
clusters where the right answer is known."""

from __future__ import annotations

import time

import numpy as np
import pytest

from state.history import History
from stream_app.engine import Engine
from stream_app.settings import Settings
from stream_app.wire import Event, RecRequest

CLUSTERS, ITEMS_PER_CLUSTER, USERS, PER_USER = 6, 30, 240, 12


def planted_stream(seed: int = 0) -> list[Event]:
    """Users of cluster c take only items of cluster c; users are interleaved in the stream."""
    rng = np.random.default_rng(seed)
    per_user = []
    for user in range(USERS):
        cluster = user % CLUSTERS
        picks = rng.choice(ITEMS_PER_CLUSTER, PER_USER, replace=False)
        per_user.append([f"c{cluster}-i{p}" for p in picks])
    order = rng.permutation(np.repeat(np.arange(USERS), PER_USER))
    cursor = [0] * USERS
    events = []
    for n, user in enumerate(order):
        events.append(Event(user_id=f"u{user}", item_id=per_user[user][cursor[user]],
                            kind="click", ts=1e9 + n, event_id=f"e{n}"))
        cursor[user] += 1
    return events


def run_stream(engine: Engine, events: list[Event], batch: int = 64,
               histories: dict[str, History] | None = None) -> dict[str, History]:
    histories = {} if histories is None else histories
    pending = []
    for event in events:
        taken = engine.ingest(event, histories.get(event.user_id, History()))
        histories[event.user_id], example = taken
        pending.append(example)
        if len(pending) == batch:
            engine.learn(pending)
            pending = []
    engine.learn(pending)
    return histories


def own_cluster_precision(engine: Engine, histories, sources=None) -> float:
    hits = total = 0
    for user, history in histories.items():
        cluster = f"c{int(user[1:]) % CLUSTERS}-"
        answer = engine.answer(RecRequest(request_id="r", user_id=user, k=10, sources=sources),
                               history, time.perf_counter())
        hits += sum(item.item_id.startswith(cluster) for item in answer.items)
        total += len(answer.items)
    return hits / total


@pytest.fixture(params=["mean", "ials"])
def engine(request, tmp_path) -> Engine:
    return Engine(Settings(data_dir=tmp_path, encoder=request.param, popularity_refresh_s=0,
                           model_dim=16))


def test_one_streaming_pass_retrieves_the_users_own_cluster(engine):
    histories = run_stream(engine, planted_stream())
    model = own_cluster_precision(engine, histories)
    popular = own_cluster_precision(engine, histories, sources=["popular"])
    assert model >= 0.9, model
    assert popular <= 0.35, popular  # about 1/6 by construction
    assert engine.model_version > 0 and engine.learned == USERS * PER_USER


def test_a_popularity_answer_encodes_no_user(engine, monkeypatch):
    """Popularity ranks without the user's vector: a request for it alone does not encode
    the history (for iALS a solve of d unknowns per answer), and answers as before."""
    histories = run_stream(engine, planted_stream()[:600])
    user, history = next(iter(histories.items()))
    request = RecRequest(request_id="r", user_id=user, k=5, sources=["popular"])
    expected = engine.popularity.top(5, exclude=set(history.items))
    encoded = []
    encode = engine._encode_rows
    monkeypatch.setattr(engine, "_encode_rows", lambda *args: encoded.append(1) or encode(*args))
    answer = engine.answer(request, history, time.perf_counter())
    assert [(item.item_id, item.score) for item in answer.items] == expected
    assert encoded == []
    engine.answer(request.model_copy(update={"sources": ["ann", "popular"]}), history,
                  time.perf_counter())
    assert encoded == [1]


def test_recommendations_change_as_a_history_grows(engine):
    run_stream(engine, planted_stream())
    request = RecRequest(request_id="r", user_id="newcomer", k=10)
    cold = engine.answer(request, History(), time.perf_counter())
    assert {item.source for item in cold.items} == {"popular"}
    history = History()
    for n, item in enumerate(["c2-i0", "c2-i1", "c2-i2"]):
        taken = engine.ingest(Event(user_id="newcomer", item_id=item, kind="sale", ts=2e9 + n),
                              history)
        history = taken[0]
    warm = engine.answer(request, history, time.perf_counter())
    assert warm.items != cold.items
    assert sum(item.item_id.startswith("c2-") for item in warm.items) >= 8
    assert {item.source for item in warm.items} == {"ann"}


def test_checkpoint_restores_identical_scores(engine):
    histories = run_stream(engine, planted_stream())
    engine.save()
    restored = Engine(engine.settings)
    assert restored.load()
    assert engine.serving_choice.samples > 0  # and the serving pick with its measurements
    np.testing.assert_array_equal(restored.serving_choice.means, engine.serving_choice.means)
    assert restored.serving == engine.serving
    for user in ("u1", "u2", "u77"):
        request = RecRequest(request_id="r", user_id=user, k=20)
        before = engine.answer(request, histories[user], time.perf_counter()).items
        after = restored.answer(request, histories[user], time.perf_counter()).items
        assert before == after


@pytest.mark.parametrize("half_life_events", [3.0, None])
def test_the_user_vector_weighs_the_newest_events_most(tmp_path, half_life_events):
    """φ = Σ w_t 2^(−j_t/h) v_t / Σ …, j_t the place of event t before the newest, counted over
    the whole history (an item the model does not know still takes its place); the items of
    a request's ``history`` are the newest events, oldest first."""
    engine = Engine(Settings(data_dir=tmp_path, popularity_refresh_s=0, model_dim=16,
                             encoder_half_life_events=half_life_events,
                             serve_half_life_events=half_life_events))
    run_stream(engine, planted_stream())
    items, kinds = ["c0-i1", "c3-i2", "never-seen", "c1-i4"], ["sale", "view", "view", "click"]
    weights = np.array([10.0, 1.0, 1.0, 4.0])
    if half_life_events is not None:
        weights = weights * 2.0 ** (-np.array([3, 2, 1, 0]) / half_life_events)
    known = [0, 1, 3]
    V = engine.learner.input_rows(engine.learner.rows_of([items[t] for t in known]))
    expected = (weights[known] @ V) / weights[known].sum()
    np.testing.assert_allclose(engine.encode(items, kinds, [0.0] * 4), expected)
    if half_life_events is not None:  # order matters, and a request's items come last
        assert not np.allclose(engine.encode(items[::-1], kinds[::-1], [0.0] * 4), expected)
    stored = History().appended(items[0], kinds[0], 0.0, "e0", 50) \
        .appended(items[1], kinds[1], 0.0, "e1", 50)
    request = RecRequest(request_id="r", user_id="u", history=items[2:], k=5)
    phi, _ = engine._user_vector_and_rows(request, stored)
    extra_kinds = kinds[:2] + ["view", "view"]
    np.testing.assert_allclose(phi, engine.encode(items, extra_kinds, [0.0] * 4))


def test_requests_are_answered_with_the_serving_recency_and_bias_weight(tmp_path):
    """Learning reads a history with ``encoder_half_life_events``, answers with
    ``serve_half_life_events``, and scores with ``serve_bias_weight`` on the bias: φ from
    2^(−j/h_serve) weights, and every answered score ⟨φ, v_i⟩ + w·b_i."""
    settings = Settings(data_dir=tmp_path, popularity_refresh_s=0, model_dim=16,
                        encoder_half_life_events=3.0, serve_half_life_events=1.0,
                        serve_bias_weight=0.25, index_enabled=False, serve_tuning_every=0)
    engine = Engine(settings)
    run_stream(engine, planted_stream())
    items = ["c0-i1", "c3-i2", "c1-i4"]
    stored = History()
    for n, item in enumerate(items):
        stored = stored.appended(item, "view", float(n), f"e{n}", 50)
    phi = engine.user_vector(RecRequest(request_id="r", user_id="u", k=5), stored)
    inputs = engine.learner.input_rows(engine.learner.rows_of(items))
    weights = 2.0 ** -np.array([2.0, 1.0, 0.0])
    np.testing.assert_allclose(phi, weights @ inputs / weights.sum())
    assert not np.allclose(phi, engine.encode(items, ["view"] * 3, [0.0, 1.0, 2.0]))
    answer = engine.answer(RecRequest(request_id="r", user_id="u", k=5), stored,
                           time.perf_counter()).items
    rows = engine.learner.rows_of([item.item_id for item in answer])
    psi = engine.learner.item_matrix[rows]
    np.testing.assert_allclose([item.score for item in answer],
                               psi[:, :-1] @ phi + 0.25 * psi[:, -1], rtol=1e-6)
    everything = engine.learner.item_matrix[:len(engine.learner)]
    unseen = np.setdiff1d(np.arange(len(engine.learner)), engine.learner.rows_of(items))
    best = np.sort(everything[unseen, :-1] @ phi + 0.25 * everything[unseen, -1])[::-1]
    np.testing.assert_allclose([item.score for item in answer], best[:5], rtol=1e-6)


@pytest.mark.parametrize("encoder", ["mean", "ials"])
def test_a_batch_of_events_is_taken_as_one_event_at_a_time(tmp_path, encoder):
    """ingest_many = ingest event by event: the same training examples (None for a
    redelivery; their weights follow histories longer than the window), the same final
    histories, the same popularity and, within float32, the same stored vectors."""
    from stream_app.engine import decode_phi

    def engine_after_warmup(path):
        engine = Engine(Settings(data_dir=path, encoder=encoder, popularity_refresh_s=0,
                                 model_dim=16, history_length=8))
        run_stream(engine, planted_stream()[:1500])
        return engine

    batched, one_by_one = engine_after_warmup(tmp_path / "a"), engine_after_warmup(tmp_path / "b")
    rng = np.random.default_rng(5)
    events = [Event(user_id=f"u{rng.integers(6)}",
                    item_id=str(rng.choice(["c1-i3", "c2-i7", "new-item", "c4-i0"])),
                    kind=str(rng.choice(["view", "sale"])), ts=3e9 + n, event_id=f"b{n}")
              for n in range(40)]
    events.insert(10, events[3])  # a redelivery inside the batch
    stored = {"u1": History().appended("c0-i0", "click", 1.0, "old", 50)}
    updated, examples, repeated = batched.ingest_many(events, stored)
    histories = dict(stored)
    expected = []
    for event in events:
        taken = one_by_one.ingest(event, histories.get(event.user_id, History()))
        expected.append(None if taken is None else taken[1])
        if taken is not None:
            histories[event.user_id] = taken[0]
    assert examples == expected and examples[10] is None
    assert repeated == [example is None for example in expected]
    assert set(updated) == {event.user_id for event in events}
    for user, history in updated.items():
        assert history.items == histories[user].items and history.ts == histories[user].ts
        np.testing.assert_allclose(decode_phi(history.phi_b64),
                                   decode_phi(histories[user].phi_b64), atol=1e-6)
    assert batched.users == one_by_one.users
    assert batched.popularity.now == one_by_one.popularity.now
    assert [id_ for id_, _ in batched.popularity.top(20)] == [
        id_ for id_, _ in one_by_one.popularity.top(20)]
    for item in ("c1-i3", "c2-i7", "new-item", "c4-i0", "c0-i0"):
        assert batched.popularity.count(item) == pytest.approx(
            one_by_one.popularity.count(item), rel=1e-12)
    assert batched.popularity.count("c2-i7") == one_by_one.popularity.count("c2-i7")


@pytest.mark.parametrize("encoder", ["mean", "ials"])
def test_the_learn_step_encodes_a_batch_as_one_history_at_a_time(tmp_path, encoder):
    """The batched encoding of training examples (one sparse product) = encode_weighted per
    example, with unknown items, empty histories and repeats."""
    engine = Engine(Settings(data_dir=tmp_path, encoder=encoder, popularity_refresh_s=0,
                             model_dim=16))
    run_stream(engine, planted_stream()[:1500])
    rng = np.random.default_rng(8)
    pool = ["c0-i1", "c3-i2", "never-seen", "c1-i4", "c5-i9"]
    items = [list(rng.choice(pool, int(rng.integers(1, 7)))) for _ in range(30)]
    items += [[], ["never-seen"], ["c0-i1", "c0-i1"]]
    weights = [rng.uniform(1, 10, len(h)).tolist() for h in items]
    ts = [sorted(rng.uniform(0, 100, len(h)).tolist()) for h in items]
    batched = engine._encode_many(items, weights, ts)
    for row, (i, w, t) in enumerate(zip(items, weights, ts)):
        np.testing.assert_allclose(batched[row], engine.encode_weighted(i, np.asarray(w), t),
                                   atol=1e-12)


def _manual_ranks(engine: Engine, example, pool: np.ndarray | None = None
                  ) -> np.ndarray | None:
    """The rank of the example's item under each serving candidate, written out: the
    weighted mean of the history's known item vectors with 2^(−j/h) recency, the query
    [φ, w], every item of ``pool`` (default: the catalog; repeats count each time) scored,
    the history and the item itself left out, ties put before the target, and the count
    scaled from what the pool kept to the catalog without them."""
    learner = engine.learner
    if example.item_id not in learner:
        return None
    rows = learner.rows_of(example.history)
    if not (rows >= 0).any():
        return None
    V = learner.item_matrix
    pool = np.arange(len(V)) if pool is None else pool
    d = engine.settings.model_dim
    target = int(learner.rows_of([example.item_id])[0])
    ranks = []
    for half_life, bias_weight in engine.serving_choice.candidates:
        w = np.asarray(example.weights, dtype=float)
        if half_life is not None:
            w = w * 2.0 ** (-np.arange(len(w) - 1, -1, -1) / half_life)
        w, known = w[rows >= 0], rows[rows >= 0]
        phi = w @ learner.input_rows(known) / w.sum()
        scores = V[:, :d] @ phi + bias_weight * V[:, d]
        left_out = np.append(known, target)
        others = pool[~np.isin(pool, left_out)]
        scale = (len(V) - len(np.unique(left_out))) / len(others)
        ranks.append((scores[others] >= scores[target]).sum() * scale)
    return np.array(ranks)


def _manual_gains(engine: Engine, example) -> np.ndarray | None:
    """NDCG@k of the example's item under each serving candidate, from its rank among the
    whole catalog."""
    ranks, k = _manual_ranks(engine, example), engine.serving_choice.k
    return None if ranks is None else np.where(ranks < k, 1 / np.log2(ranks + 2), 0.0)


def test_the_serving_pick_is_measured_on_examples_before_they_are_learned(tmp_path):
    """Oracle: the engine's weighted NDCG of each candidate equals the one computed by hand
    from the examples it sampled (every 7th learned, counted across batches), each ranked
    with the model as it was before that example's batch; answers use the best candidate."""
    settings = Settings(data_dir=tmp_path, popularity_refresh_s=0, model_dim=16,
                        serve_tuning_every=7, serve_tuning_min_samples=30, serve_tuning_margin_z=0,
                        serve_tuning_half_life_samples=40.0, index_enabled=False)
    engine = Engine(settings)
    histories: dict[str, History] = {}
    expected, learned = [], 0
    batch: list = []
    for event in planted_stream():
        histories[event.user_id], example = engine.ingest(
            event, histories.get(event.user_id, History()))
        batch.append(example)
        if len(batch) == 50:
            for offset, sampled in enumerate(batch):
                if (learned + offset) % 7 == 0:
                    gains = _manual_gains(engine, sampled)
                    if gains is not None:
                        expected.append(gains)
            engine.learn(batch)
            learned += len(batch)
            batch = []
    choice = engine.serving_choice
    assert choice.samples == len(expected) > 30
    weights = 2.0 ** (-np.arange(len(expected) - 1, -1, -1) / 40.0)
    np.testing.assert_allclose(choice.means, weights @ np.array(expected) / weights.sum())
    assert engine.serving == choice.candidates[int(np.argmax(choice.means))]


def test_a_large_catalog_is_ranked_among_a_sample_with_the_rank_scaled(tmp_path):
    """Beyond ``serve_tuning_pool`` items the examples of a batch are ranked among one
    uniform sample (with replacement) without each one's history and item, the rank scaled to
    the catalog; examples with nothing learned to rank are left out."""
    engine = Engine(Settings(data_dir=tmp_path, popularity_refresh_s=0, model_dim=16,
                             serve_tuning_pool=100, index_enabled=False))
    histories: dict[str, History] = {}
    examples = []
    for event in planted_stream():
        histories[event.user_id], example = engine.ingest(
            event, histories.get(event.user_id, History()))
        examples.append(example)
    for start in range(0, len(examples), 64):
        engine.learn(examples[start:start + 64])
    n = len(engine.learner)
    assert n > 100
    batch = examples[-40:] + [examples[0].model_copy(update={"item_id": "never-seen"})]
    drawn = np.random.Generator(np.random.PCG64())
    drawn.bit_generator.state = engine._tuning_rng.bit_generator.state
    kept, ranks = engine.candidate_ranks(batch)
    pool = drawn.integers(0, n, 100)
    expected = [_manual_ranks(engine, example, pool) for example in batch]
    assert kept.tolist() == [i for i, e in enumerate(expected) if e is not None]
    assert len(kept) >= 30 and 40 not in kept.tolist()
    np.testing.assert_allclose(ranks, np.array([expected[i] for i in kept]), rtol=1e-12)
    assert (ranks > 0).any() and not np.allclose(ranks, np.round(ranks))  # scaled counts


def test_an_unreadable_serving_checkpoint_is_measured_again(tmp_path):
    """A damaged serving.npz costs only the serving measurements: the model loads and the
    configured pair answers until the stream has been measured again."""
    engine = Engine(Settings(data_dir=tmp_path, popularity_refresh_s=0, model_dim=16))
    run_stream(engine, planted_stream())
    engine.save()
    (engine.checkpoint_dir / "serving.npz").write_bytes(b"not an npz")
    restored = Engine(engine.settings)
    assert restored.load()
    assert restored.serving_choice.samples == 0
    assert restored.serving == restored.serving_choice.candidates[0]


def cycle_stream(triples: int, users: int, seed: int = 0) -> list[Event]:
    """Three items per triple, a → b → c → a: some users take a then b, others b then c, others
    c then a; nobody takes a pair the other way round. First events of all users, then
    second ones, in a random order."""
    rng = np.random.default_rng(seed)
    pairs = [(f"t{t}-{first}", f"t{t}-{second}")
             for t in range(triples) for first, second in (("a", "b"), ("b", "c"), ("c", "a"))]
    users_of = [(f"{first}>{second}-{u}", (first, second)) for first, second in pairs
                for u in range(users)]
    events = []
    for step in range(2):
        for k in rng.permutation(len(users_of)):
            user, items = users_of[k]
            events.append(Event(user_id=user, item_id=items[step], kind="view",
                                ts=float(len(events)), event_id=f"e{len(events)}"))
    return events


def successors_ranked_first(engine: Engine, triples: int) -> float:
    """Share of (triple, item) where the item's successor in the cycle outscores the item's
    predecessor for a user whose history is that item alone."""
    right = []
    for t in range(triples):
        for item, successor, predecessor in (("a", "b", "c"), ("b", "c", "a"), ("c", "a", "b")):
            history = History().appended(f"t{t}-{item}", "view", 0.0, "q", 50)
            phi = engine.user_vector(RecRequest(request_id="r", user_id="q", k=5), history)
            scores = engine.learner.scores_of(phi, [f"t{t}-{successor}", f"t{t}-{predecessor}"],
                                              engine.serving.bias_weight)
            right.append(scores[0] > scores[1])
    return float(np.mean(right))


def test_learned_inputs_rank_what_follows_an_item_not_what_precedes_it(tmp_path):
    """A cycle a → b → c → a is out of reach of a symmetric score: ranking each item's
    successor above its predecessor needs s(a,b) > s(a,c), s(b,c) > s(b,a) and s(c,a) >
    s(c,b), which with s(i,j) = ⟨v_i, v_j⟩ + b_j add up to 0 > 0. So the tied model gets at
    most 2 of each triple's 3 right; with learned inputs (⟨q_i, v_j⟩) one pass gets most."""
    triples = 20
    events = cycle_stream(triples, users=20)
    shares = {}
    for input_lr in (0.0, 0.15):
        engine = Engine(Settings(data_dir=tmp_path / str(input_lr), popularity_refresh_s=0,
                                 model_dim=16, input_lr=input_lr, index_enabled=False,
                                 serve_tuning_every=0))
        run_stream(engine, events)
        shares[input_lr] = successors_ranked_first(engine, triples)
    assert shares[0.0] <= 2 / 3
    assert shares[0.15] >= 0.8


def test_the_inputs_step_is_adagrad_on_the_autograd_gradient_of_the_examples_loss(tmp_path):
    """Oracle for the wiring of Engine.learn's inputs step: the offsets move by one Adagrad step
    along the autograd gradient, with respect to the history items' inputs, of
    ½ Σ_b [α_b (ŷ_b − 1)² + (α0 / T_b) φ̃_bᵀ G_I φ̃_b] (φ_b the recency-weighted mean of the
    inputs, the item rows as after the batch's item step); the inputs of items in no history
    stay where they were."""
    import torch

    from stream_app.wire import TrainExample

    engine = Engine(Settings(data_dir=tmp_path, popularity_refresh_s=0, model_dim=8,
                             input_lr=0.1, index_enabled=False, serve_tuning_every=0,
                             dr_enabled=False))
    run_stream(engine, planted_stream())
    learner, d = engine.learner, 8
    known = learner.item_ids
    rng = np.random.default_rng(3)
    examples = [TrainExample(user_id=f"x{b}", item_id=known[int(rng.integers(len(known)))],
                             alpha=float(rng.uniform(1, 3)), ts=0.0,
                             history=[known[int(k)] for k in rng.choice(len(known), length,
                                                                          replace=False)],
                             weights=rng.uniform(1, 4, length).tolist())
                for b, length in enumerate([40, 3, 1, 12])]
    offsets_before = learner.offsets.copy()
    squares_before = learner._offset_squares[:len(learner)].copy()
    summed_at = learner._offset_at[:len(learner)].copy()
    engine.learn(examples)
    # the accumulators forget half of themselves per positives' half-life of learned events
    forgotten = 0.5 ** ((learner.events - summed_at) / learner.config.positives_half_life)
    accum_before = learner.config.input_adagrad_init + squares_before * forgotten[:, None]
    inputs = torch.tensor(learner.item_matrix[:, :d] + offsets_before, requires_grad=True)
    G_I = torch.tensor(learner.item_gramian.matrix)
    loss, used = 0.0, set()
    for example in examples:
        rows = learner.rows_of(example.history)
        w = np.asarray(example.weights) * 2.0 ** (-np.arange(len(rows) - 1, -1, -1) / 3.0)
        h = torch.tensor(w / w.sum())
        phi = torch.cat([(h[:, None] * inputs[rows]).sum(dim=0),
                         torch.ones(1, dtype=inputs.dtype)])
        psi = torch.tensor(learner.item_matrix[learner.rows_of([example.item_id])[0]])
        loss = loss + 0.5 * (example.alpha * (phi @ psi - 1) ** 2
                             + learner.alpha0 / len(rows) * (phi @ G_I @ phi))
        used |= set(rows.tolist())
    loss.backward()
    moved = np.array(sorted(used))
    assert learner.changed_input_rows.tolist() == moved.tolist()
    grad = inputs.grad.numpy()[moved]
    accum = accum_before[moved] + grad ** 2
    np.testing.assert_allclose(learner.offsets[moved],
                               offsets_before[moved] - 0.1 * grad / np.sqrt(accum),
                               rtol=1e-6, atol=1e-10)
    others = np.setdiff1d(np.arange(len(learner)), moved)
    np.testing.assert_array_equal(learner.offsets[others], offsets_before[others])


@pytest.mark.parametrize("by_partition", [False, True])
def test_the_positives_clock_runs_per_item_partition_when_asked(tmp_path, by_partition):
    """``STREAMREC_POSITIVES_BY_PARTITION``: each learned example advances the clock of its
    item's partition (the worker's own hash); off, one clock counts every example."""
    from stream_app.engine import item_partition

    engine = Engine(Settings(data_dir=tmp_path, model_dim=8, partitions=3,
                             positives_by_partition=by_partition))
    stream = planted_stream()[:200]
    run_stream(engine, stream)
    expected = np.bincount([item_partition(e.item_id, 3) for e in stream], minlength=3)
    clocks = engine.learner._lane_clock
    if by_partition:
        assert engine.learner.config.positive_lanes == 3
        np.testing.assert_array_equal(clocks, expected)
    else:
        np.testing.assert_array_equal(clocks, [len(stream)])


def test_the_worker_exports_how_often_the_serving_pair_moved_and_the_next_ones_lead(tmp_path):
    """``streamrec_serving_moves`` counts the pick's changes and ``streamrec_serving_lead`` is
    the best other pair's margin over the answering one, as the choice computes them."""
    from stream_app.worker import build_metrics

    engine = Engine(Settings(data_dir=tmp_path, popularity_refresh_s=0, model_dim=16,
                             serve_tuning_min_samples=1, index_enabled=False))
    registry = build_metrics(engine).registry
    choice = engine.serving_choice
    width = len(choice.candidates)
    gains = np.random.default_rng(0).random((60, width)) * 0.2
    choice.observe(gains + np.eye(width)[1] * 0.5)  # pair 1 clearly ahead
    assert registry.get_sample_value("streamrec_serving_moves") == choice.moves == 1
    lead = registry.get_sample_value("streamrec_serving_lead")
    assert lead == choice.lead == np.delete(choice.margins(1), 1).max() and lead < -3
    choice.observe(np.tile(np.eye(width)[2] * 0.5, (400, 1)))
    assert registry.get_sample_value("streamrec_serving_moves") == 2
    assert engine.serving == choice.candidates[2]


@pytest.mark.parametrize("weighting", ["events", "users"])
def test_the_user_gramian_weighs_each_event_by_its_users_events_so_far_when_asked(tmp_path,
                                                                                  weighting):
    """``STREAMREC_USER_GRAMIAN_WEIGHTING=users``: an event's user vector enters G_C with
    weight 1/(the user's events so far), Rendle's 1/|I_c| (eq. 41); ``events``: each once.
    Oracle: the weighted mean of the batch's augmented user rows, times |C|."""
    engine = Engine(Settings(data_dir=tmp_path, model_dim=8, popularity_refresh_s=0,
                             user_gramian_weighting=weighting))
    stream = planted_stream()
    histories: dict[str, History] = {}
    examples = []
    for event in stream[:600]:
        histories[event.user_id], example = engine.ingest(
            event, histories.get(event.user_id, History()))
        examples.append(example)
    engine.learn(examples[:500])  # items known, histories of many lengths
    seen = {}
    update = engine.learner.user_gramian.update

    def recorded(rows, n_active=None, weights=None):
        seen.update(rows=np.array(rows), weights=weights)
        update(rows, n_active, weights)

    engine.learner.user_gramian = type(engine.learner.user_gramian)(
        engine.learner.user_gramian.dim, beta=1.0)  # holds the last batch alone
    update = engine.learner.user_gramian.update
    engine.learner.user_gramian.update = recorded
    batch = examples[500:]
    engine.learn(batch, users=37)
    lengths = np.array([len(example.history) for example in batch])
    assert len(set(lengths)) > 3
    if weighting == "events":
        assert seen["weights"] is None
        w = np.ones(len(batch))
    else:
        w = 1.0 / (lengths + 1)
        np.testing.assert_allclose(seen["weights"], w)
    rows = seen["rows"]
    expected = 37 * (rows.T * w) @ rows / w.sum()
    np.testing.assert_allclose(engine.learner.user_gramian.value(), expected, rtol=1e-10)
