"""The online item learner: one Adagrad step against a hand computation, the closed-form solve
against a least-squares oracle, exact Gramians, reads that create nothing, persistence, and
planted clusters learned in a single streaming pass by both solvers."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import numpy as np
import pytest

from models.embedding import augment_users, item_gradient, packed_size, unpack_symmetric
from models.encoders import mean_encoder, mean_encoder_batch, pack_histories
from models.learner import ItemLearner, ItemReplica, LearnerConfig
from state.delta_checkpoint import CHAIN_KEY, ChainWriter, load_checkpoint
from state.gramian import DamagedCheckpoint, ids_to_arrays

N_CLUSTERS, PER_CLUSTER, N_USERS = 8, 50, 400


def planted_stream(seed: int):
    """Users of one cluster each: 12 items of their cluster (skewed popularity inside it) plus 3
    uniformly random items as noise, all interleaved at random into one stream."""
    rng = np.random.default_rng(seed)
    user_cluster = np.arange(N_USERS) % N_CLUSTERS
    popularity = 1.0 / np.arange(1, PER_CLUSTER + 1) ** 0.8
    popularity /= popularity.sum()
    users, items = [], []
    for user, cluster in enumerate(user_cluster):
        own = rng.choice(PER_CLUSTER, 12, replace=False, p=popularity) + cluster * PER_CLUSTER
        noise = rng.choice(N_CLUSTERS * PER_CLUSTER, 3, replace=False)
        picked = rng.permutation(np.unique(np.r_[own, noise]))
        users += [user] * len(picked)
        items += picked.tolist()
    order = rng.permutation(len(users))
    return np.array(users)[order], np.array(items)[order], user_cluster


def item_id(item: int) -> str:
    return f"item-{item}"


def encode(learner: ItemLearner, histories: list[list[int]]) -> np.ndarray:
    """Mean encoder of each history over the learner's current item vectors (unknown skipped)."""
    rows = [learner.rows_of(map(item_id, history)) for history in histories]
    indptr, flat = pack_histories([r[r >= 0] for r in rows])
    return mean_encoder_batch(learner.item_matrix[:, :-1], indptr, flat)


def stream_pass(learner: ItemLearner, users, items, batch: int = 64):
    """One prequential pass: each event's φ(u) encodes the user's history before that event."""
    seen: dict[int, list[int]] = {}
    losses = []
    for start in range(0, len(users), batch):
        histories = []
        for user, item in zip(users[start: start + batch], items[start: start + batch]):
            history = seen.setdefault(user, [])
            histories.append(list(history))
            history.append(item)
        phi = encode(learner, histories)
        ids = [item_id(i) for i in items[start: start + batch]]
        losses.append(learner.learn(phi, ids, np.ones(len(ids)), n_users=len(seen)))
    return seen, np.array(losses)


def as_whole(path) -> dict[str, np.ndarray]:
    """The arrays of the checkpoint at ``path`` as one whole checkpoint, as every one was
    written before deltas (tests of older checkpoints take out what those lacked)."""
    data = load_checkpoint(path)
    data.pop(CHAIN_KEY)
    return data


def state_of(learner: ItemLearner) -> dict[str, np.ndarray]:
    """Every array a checkpoint of ``learner`` holds, from memory."""
    tables, whole = learner._checkpoint_arrays()
    rows = {name: array[: table.rows] for table in tables.values()
            for name, array in table.arrays.items()}
    return {**rows, **whole}


def own_cluster_precision(ranked: list[list[int]], user_cluster) -> float:
    return float(np.mean([[item // PER_CLUSTER == user_cluster[u] for item in items]
                          for u, items in enumerate(ranked)]))


@pytest.fixture(scope="module", params=["solve", "adagrad"])
def planted_run(request):
    users, items, user_cluster = planted_stream(seed=0)
    learner = ItemLearner(LearnerConfig(solver=request.param))
    seen, losses = stream_pass(learner, users, items)
    return learner, seen, losses, user_cluster, items


def test_one_streaming_pass_learns_the_planted_clusters(planted_run):
    learner, seen, _, user_cluster, items = planted_run
    model_top, popular_top = [], []
    counts = np.bincount(items, minlength=N_CLUSTERS * PER_CLUSTER)
    for user in range(N_USERS):
        phi = encode(learner, [seen[user]])[0]
        top = learner.top_k(phi, 10, exclude={item_id(i) for i in seen[user]})
        model_top.append([int(i.split("-")[1]) for i, _ in top])
        popular = np.argsort(-counts, kind="stable")
        popular_top.append([i for i in popular if i not in set(seen[user])][:10])
    # Random is 1/8 own-cluster; popularity is worse (the user has seen their cluster's hits).
    assert own_cluster_precision(model_top, user_cluster) >= 0.9
    assert own_cluster_precision(popular_top, user_cluster) <= 0.2


def test_loss_decreases_over_the_pass(planted_run):
    losses = planted_run[2]
    assert losses[-10:].mean() < 0.5 * losses[:10].mean()


def test_item_gramian_stays_exact_while_learning(planted_run):
    learner = planted_run[0]
    Psi = learner.item_matrix
    np.testing.assert_allclose(learner.item_gramian.matrix, Psi.T @ Psi, rtol=1e-9, atol=1e-9)


def test_learn_steps_are_adagrad_steps_of_the_summed_item_gradients():
    config = LearnerConfig(dim=3, alpha0=0.2, lam=0.1, lr=0.5, solver="adagrad")
    rng = np.random.default_rng(0)
    start = rng.normal(size=(4, 4))  # rows of a, b, c, and of d, which arrives on the stream
    learner = ItemLearner(config, init_vector=lambda i: start[3] if i == "d" else None)
    learner.assign(["a", "b", "c"], start[:3])
    phi, alphas = augment_users(rng.normal(size=(5, 3))), rng.uniform(1, 3, 5)
    G_C = 10 * phi.T @ phi / 5  # |C| times the batch mean: the bias-corrected first estimate
    rows = np.array([1, 0, 1, 3, 1])  # b, a, b, d, b
    expected = start.copy()
    accum = np.tile([config.adagrad_init] * 3 + [config.bias_adagrad_init], (4, 1))
    for step in (1, 2):  # the same batch twice: G_C stays, counts and accumulators grow
        n_i = step * np.array([3.0, 1.0, 3.0, 1.0, 3.0])
        grads = item_gradient(phi, expected[rows], alphas, G_C, n_i, 0.2, 0.1)
        learner.learn(phi[:, :-1], ["b", "a", "b", "d", "b"], alphas, n_users=10)
        for row in (0, 1, 3):
            g = grads[rows == row].sum(axis=0)
            accum[row] += g ** 2
            expected[row] -= 0.5 * g / np.sqrt(accum[row])
        np.testing.assert_allclose(learner.item_matrix, expected, rtol=1e-12, atol=1e-12)
    assert learner.count("b") == 6.0 and learner.count("c") == 0.0


def lane_of(item: str, lanes: int) -> int:
    """Items a, b on lane 0, c, d on lane 1, … (all on lane 0 with one lane)."""
    return "abcdef".index(item) // 2 % lanes


def solve_stream(sweep: int, half_life: float | None = None, cg_steps: int = 0,
                 relative: bool = False, lanes: int = 1):
    """Six batches of random positives of items a–f; ``seen`` holds each item's positives
    (φ̃, α, its lane's clock after the batch) and ``clock`` every lane's clock at the end."""
    config = LearnerConfig(dim=3, alpha0=0.3, lam=0.05, prior_weight=0.7, sweep_per_step=sweep,
                           positives_half_life=half_life, cg_steps=cg_steps,
                           alpha0_relative=relative, positive_lanes=lanes)
    rng = np.random.default_rng(5)
    start = {i: rng.normal(size=4) for i in "abcdef"}
    learner = ItemLearner(config, init_vector=start.get)
    seen: dict[str, list[tuple[np.ndarray, float, int]]] = {i: [] for i in "abcdef"}
    clock = np.zeros(lanes)
    for _ in range(6):
        ids = list(rng.choice(list("abcdef"), 7))
        phi, alphas = rng.normal(size=(7, 3)), rng.uniform(0.5, 4.0, 7)
        batch_lanes = np.array([lane_of(i, lanes) for i in ids])
        learner.learn(phi, ids, alphas, n_users=20, lanes=batch_lanes)
        clock += np.bincount(batch_lanes, minlength=lanes)
        for item, p, a in zip(ids, augment_users(phi), alphas):
            seen[item].append((p, a, clock[lane_of(item, lanes)]))
    return learner, config, start, seen, set(ids), clock


def discounted_alphas(config, positives, now: float) -> list[float]:
    """α of each positive times 0.5^(age / half-life) (1 without a half-life); ``now`` and
    the ages on the positives' lane clock, whose half-life is the lanes' share of it."""
    half_life = config.positives_half_life
    if half_life:
        half_life /= config.positive_lanes
    return [a * (0.5 ** ((now - t) / half_life) if half_life else 1.0) for _, a, t in positives]


def least_squares_row(config, G_C, prior, positives, now: int,
                      alpha0: float | None = None) -> np.ndarray:
    """argmin Σ w α (⟨φ̃, ψ̃⟩ − 1)² + α0 ψ̃ᵀ G_C ψ̃ + λ‖ψ̃‖² + μ‖ψ̃ − ψ̃₀‖² as one stacked
    least-squares problem, w = 0.5^(age / half-life) of each positive (1 without one); α0 is
    ``config.alpha0`` unless given."""
    weights = discounted_alphas(config, positives, now)
    alpha0 = config.alpha0 if alpha0 is None else alpha0
    chol = np.linalg.cholesky(alpha0 * G_C + config.lam * np.eye(4))
    design = np.vstack([np.sqrt(w) * p for (p, _, _), w in zip(positives, weights)]
                       + [chol.T, np.sqrt(config.prior_weight) * np.eye(4)])
    target = np.r_[np.sqrt(weights), np.zeros(4), np.sqrt(config.prior_weight) * prior]
    return np.linalg.lstsq(design, target, rcond=None)[0]


@pytest.mark.parametrize("sweep", [0, 6])
@pytest.mark.parametrize("half_life", [None, 10.0])
@pytest.mark.parametrize("cg_steps", [0, 4])
@pytest.mark.parametrize("lanes", [1, 3])
def test_solved_rows_are_least_squares_solutions_of_each_items_whole_loss(sweep, half_life,
                                                                          cg_steps, lanes):
    """Every item touched by the last batch — and with a sweep covering the catalogue, every
    item — sits at the minimizer of its whole loss over all its positives so far, each
    discounted by its age on its lane's clock when a half-life is set, against the current
    user Gramian. The exact solve and CG with as many steps as the row has coordinates (exact
    for CG) alike."""
    learner, config, start, seen, last_batch, clock = solve_stream(sweep, half_life, cg_steps,
                                                                   lanes=lanes)
    G_C = learner.user_gramian.value()
    checked = set(seen) if sweep else last_batch
    for item in checked:
        now = clock[lane_of(item, lanes)]
        expected = least_squares_row(config, G_C, start[item], seen[item], now)
        row = learner.rows_of([item])[0]
        np.testing.assert_allclose(learner.item_matrix[row], expected, rtol=1e-5, atol=1e-6)
    stale = set(seen) - last_batch
    if not sweep and stale:  # without the sweep, older items keep their older G_C
        item = sorted(stale)[0]
        now = clock[lane_of(item, lanes)]
        expected = least_squares_row(config, G_C, start[item], seen[item], now)
        assert not np.allclose(learner.item_matrix[learner.rows_of([item])[0]], expected)
    if half_life:  # the discount matters: undiscounted positives give other rows
        undiscounted = LearnerConfig(**{**asdict(config), "positives_half_life": None})
        item = sorted(checked)[0]
        now = clock[lane_of(item, lanes)]
        assert not np.allclose(
            learner.item_matrix[learner.rows_of([item])[0]],
            least_squares_row(undiscounted, G_C, start[item], seen[item], now), atol=1e-4)
    Psi = learner.item_matrix
    np.testing.assert_allclose(learner.item_gramian.matrix, Psi.T @ Psi, atol=1e-9)


def lane_statistics(order, phi, items, alphas, lanes, positive_lanes: int):
    """A_i, s_i of every item (by id), discounted to the end, after learning the positives
    one at a time in ``order``; one clock when ``positive_lanes`` is 1."""
    learner = ItemLearner(LearnerConfig(dim=3, positives_half_life=30.0,
                                        positive_lanes=positive_lanes))
    for k in order:
        learner.learn(phi[[k]], [items[k]], alphas[[k]], n_users=10,
                      lanes=lanes[[k]] if positive_lanes > 1 else None)
    return learner._statistics_now(learner._slot[learner.rows_of(sorted(set(items)))])


def test_how_the_lanes_interleave_leaves_every_items_discounted_positives_alone():
    """Oracle for a learner that takes its item partitions out of step (behind ingest): with
    a clock per lane, every item's statistics discounted to the end are those of the stream
    taken in step, when lane 1 runs 200 positives behind lane 0 and lane 2 400 behind (the
    order inside each lane kept). On one clock the late lanes' positives count as the newest,
    and the statistics differ."""
    rng = np.random.default_rng(8)
    n = 150
    items = [f"i{k}" for k in rng.integers(0, 12, n)]
    lanes = np.array([int(item[1:]) % 3 for item in items])
    phi, alphas = rng.normal(size=(n, 3)), rng.uniform(0.5, 2.0, n)
    in_step, behind = np.arange(n), np.argsort(np.arange(n) + 200 * lanes, kind="stable")
    assert not np.array_equal(in_step, behind)
    for got, expected in zip(lane_statistics(behind, phi, items, alphas, lanes, 3),
                             lane_statistics(in_step, phi, items, alphas, lanes, 3)):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-9)
    one_clock = [lane_statistics(order, phi, items, alphas, lanes, 1)[1]
                 for order in (behind, in_step)]
    assert not np.allclose(*one_clock, rtol=1e-2)


def test_lane_clocks_round_trip_and_an_older_checkpoint_reads_as_even_lanes(tmp_path):
    """Saved and loaded, the lanes go on as they were (the same rows after another batch).
    A checkpoint of one clock (before lanes) loads into four lanes with every positive
    discounted as it was at the save."""
    learner, config, *_ = solve_stream(0, 10.0, lanes=3)
    learner.save(tmp_path / "lanes.npz")
    restored = ItemLearner(config)
    assert restored.load(tmp_path / "lanes.npz")
    np.testing.assert_array_equal(restored._lane_clock, learner._lane_clock)
    phi, ids = np.random.default_rng(6).normal(size=(4, 3)), ["a", "c", "e", "f"]
    lanes = np.array([lane_of(i, 3) for i in ids])
    for model in (learner, restored):
        model.learn(phi, ids, np.ones(4), n_users=20, lanes=lanes)
    np.testing.assert_array_equal(restored.item_matrix, learner.item_matrix)

    one_clock, config, *_ = solve_stream(0, 10.0)
    one_clock.save(tmp_path / "one.npz")
    arrays = {k: v for k, v in as_whole(tmp_path / "one.npz").items()
              if k not in ("lane_clock", "pos_lane")}
    np.savez(tmp_path / "before-lanes.npz", **arrays)
    four = ItemLearner(replace(config, positive_lanes=4))
    assert four.load(tmp_path / "before-lanes.npz")
    slots = np.arange(one_clock._slots_used)
    np.testing.assert_allclose(four._discount_since_update(slots),
                               one_clock._discount_since_update(slots), rtol=1e-12)
    np.testing.assert_allclose(four._lane_clock, np.full(4, one_clock.events / 4))


def test_a_checkpoint_whose_ids_and_rows_disagree_or_that_lacks_an_array_is_damaged(
        tmp_path):
    """One item id more than rows loaded an item of zeros and every later row under another
    item's id; an array missing stopped the worker with a bare KeyError. Both now raise
    DamagedCheckpoint, which names what is wrong, for the learner and for its replica."""
    learner, config, *_ = solve_stream(0)
    learner.save(tmp_path / "model.npz")
    arrays = as_whole(tmp_path / "model.npz")
    items = len(learner.item_ids)
    np.savez(tmp_path / "more-ids.npz",
             **{**arrays, **ids_to_arrays(list(learner.item_ids) + ["x"])})
    for model in (ItemLearner(config), ItemReplica(config)):
        with pytest.raises(DamagedCheckpoint, match=f"{items + 1} item ids and {items} rows"):
            model.load(tmp_path / "more-ids.npz")
    for missing, replica_reads in (("config", True), ("psi", True), ("clock", True),
                                   ("count", False), ("pos_target", False)):
        path = tmp_path / f"without-{missing}.npz"
        np.savez(path, **{name: value for name, value in arrays.items() if name != missing})
        with pytest.raises(DamagedCheckpoint, match=f"{path} lacks '{missing}'"):
            ItemLearner(config).load(path)
        if replica_reads:
            with pytest.raises(DamagedCheckpoint, match=f"lacks '{missing}'"):
                ItemReplica(config).load(path)
        else:
            assert ItemReplica(config).load(path)  # what only learning reads


@pytest.mark.parametrize("lanes_now", [1, 3])
def test_an_adagrad_learners_positive_mass_survives_a_load_into_other_lanes(tmp_path,
                                                                          lanes_now):
    """Adagrad keeps no per-item statistics, but a relative α0 reads the positives' mass:
    read from the statistics alone, a load into another number of lanes (or of a checkpoint
    from before the lanes' masses) set it, and α0 with it, to 0."""
    config = LearnerConfig(dim=3, solver="adagrad", alpha0_relative=True,
                           positives_half_life=50.0, positive_lanes=2)
    learner = ItemLearner(config)
    rng = np.random.default_rng(9)
    ids = list(rng.choice(list("abcdef"), 60))
    learner.learn(rng.normal(size=(60, 3)), ids, rng.uniform(0.5, 2.0, 60), n_users=20,
                  lanes=np.array([lane_of(item, 2) for item in ids]))
    assert learner.positive_mass > 0 and learner.alpha0 > 0
    learner.save(tmp_path / "adagrad.npz")
    arrays = {k: v for k, v in as_whole(tmp_path / "adagrad.npz").items() if k != "lane_mass"}
    np.savez(tmp_path / "before-lane-mass.npz", **arrays)
    for path in ("adagrad.npz", "before-lane-mass.npz"):
        loaded = ItemLearner(replace(config, positive_lanes=lanes_now))
        assert loaded.load(tmp_path / path)
        assert loaded.positive_mass == pytest.approx(learner.positive_mass, rel=1e-12)
        assert loaded.alpha0 == pytest.approx(learner.alpha0, rel=1e-12)


@pytest.mark.parametrize("lanes_now", [1, 2, 5])
def test_uneven_lanes_loaded_into_another_number_keep_each_positives_discount(tmp_path,
                                                                            lanes_now):
    """Lanes that ran unevenly (one far ahead: a lagging partition) saved and loaded into
    another number of lanes (``positives_by_partition`` turned off, partitions changed):
    every slot keeps its discount as of the save, and the mass its lane holds. Before, the
    update times were scaled to the even clock: a slot of the lane ahead was dated after it,
    its discount 2^(lag / half-life) (inf in the float32 solve at 4M events of lag, NaN
    rows), one of the lane behind was discounted away."""
    config = LearnerConfig(dim=3, positives_half_life=30.0, positive_lanes=2)
    learner = ItemLearner(config)
    rng = np.random.default_rng(8)
    for items, lane, count in ((["a", "b"], 0, 400), (["c", "d"], 1, 20), (["a", "c"], 0, 30)):
        ids = list(rng.choice(items, count))
        learner.learn(rng.normal(size=(count, 3)), ids, rng.uniform(0.5, 2.0, count),
                      n_users=20, lanes=np.full(count, lane))
    assert learner._lane_clock[0] > learner._lane_clock[1] + 300  # the lane ahead
    learner.save(tmp_path / "uneven.npz")
    loaded = ItemLearner(replace(config, positive_lanes=lanes_now))
    assert loaded.load(tmp_path / "uneven.npz")
    slots = learner._slot[learner.rows_of(list("abcd"))]
    np.testing.assert_allclose(loaded._discount_since_update(slots),
                               learner._discount_since_update(slots), rtol=1e-9)
    assert (loaded._discount_since_update(slots) <= 1.0).all()
    np.testing.assert_allclose(loaded._lane_mass.sum(), learner.positive_mass, rtol=1e-5)
    np.testing.assert_allclose(loaded._lane_mass.sum(), loaded._positive_mass_now(), rtol=1e-6)
    more = ["a", "c", "e"] * 4  # on lanes of their own, as items of partitions are
    loaded.learn(rng.normal(size=(12, 3)), more, np.ones(12), n_users=20,
                 lanes=np.array([lane_of(item, lanes_now) for item in more]))
    assert np.isfinite(loaded.item_matrix).all() and np.isfinite(loaded.item_gramian.matrix).all()
    mass = loaded.positive_mass
    np.testing.assert_allclose(mass, loaded._positive_mass_now(), rtol=1e-6)
    loaded.forget_positives(loaded.rows_of(list("abcde")))  # each lane gives back what it holds
    assert loaded.positive_mass <= 1e-6 * mass


@pytest.mark.parametrize("half_life, lanes", [(None, 1), (10.0, 1), (10.0, 3)])
def test_a_relative_alpha0_scales_with_the_density_of_the_positives(half_life, lanes):
    """Oracle: the positives' mass kept by the learner equals the sum over every positive so
    far of its α discounted on its lane's clock (and the mass read back from the statistics);
    α0 relative is config.alpha0 × mass / (items × |C|); and every touched item sits at the
    minimizer of its whole loss with that α0."""
    learner, config, start, seen, _, clock = solve_stream(6, half_life, relative=True,
                                                          lanes=lanes)
    now = {item: clock[lane_of(item, lanes)] for item in seen}
    mass = sum(sum(discounted_alphas(config, positives, now[item]))
               for item, positives in seen.items())
    assert learner.positive_mass == pytest.approx(mass, rel=1e-12)
    assert learner._positive_mass_now() == pytest.approx(mass, rel=1e-6)  # float32 stats
    items = sum(1 for positives in seen.values() if positives)
    assert learner.alpha0 == pytest.approx(config.alpha0 * mass / (items * 20), rel=1e-12)
    assert learner.alpha0 != pytest.approx(config.alpha0)
    G_C = learner.user_gramian.value()
    for item in seen:
        expected = least_squares_row(config, G_C, start[item], seen[item], now[item],
                                     learner.alpha0)
        np.testing.assert_allclose(learner.item_matrix[learner.rows_of([item])[0]], expected,
                                   rtol=1e-5, atol=1e-6)


def test_assign_moves_the_prior_of_a_solved_item_and_keeps_its_positives():
    learner = ItemLearner(LearnerConfig(dim=2, alpha0=0.0, lam=0.0, prior_weight=1.0))
    learner.learn(np.array([[1.0, 0.0]]), ["a"], np.array([1.0]))
    learner.assign(["a"], np.array([[0.0, 4.0, 0.0]]))
    learner.learn(np.array([[1.0, 0.0]]), ["a"], np.array([1.0]))
    # Two positives at φ̃ = [1, 0, 1] with target 1, prior [0, 4, 0] of weight 1.
    design = np.vstack([[1.0, 0.0, 1.0], [1.0, 0.0, 1.0], np.eye(3)])
    expected = np.linalg.lstsq(design, np.r_[1.0, 1.0, 0.0, 4.0, 0.0], rcond=None)[0]
    np.testing.assert_allclose(learner.item_matrix[0], expected, atol=1e-6)


def test_reads_create_no_state():
    learner = ItemLearner(LearnerConfig(dim=4))
    learner.learn(np.ones((2, 4)), ["x", "y"], np.ones(2), n_users=2)
    snapshot = learner.item_matrix.copy()
    assert len(learner.scores(np.ones(4))) == 2
    assert [i for i, _ in learner.top_k(np.ones(4), 5, exclude={"x", "never-seen"})] == ["y"]
    assert learner.rows_of(["never-seen"]).tolist() == [-1]
    assert learner.count("never-seen") == 0.0
    assert len(learner) == 2 and "never-seen" not in learner
    np.testing.assert_array_equal(learner.item_matrix, snapshot)
    with pytest.raises(ValueError):
        learner.item_matrix[0, 0] = 1.0


def test_top_k_equals_a_brute_force_sort():
    learner = ItemLearner(LearnerConfig(dim=8))
    rng = np.random.default_rng(1)
    ids = [f"i{k}" for k in range(300)]
    learner.assign(ids, rng.normal(size=(300, 9)))
    phi = rng.normal(size=8)
    exclude = set(rng.choice(ids, 40, replace=False))
    scores = learner.item_matrix @ np.append(phi, 1.0)
    expected = [ids[r] for r in np.argsort(-scores) if ids[r] not in exclude][:25]
    top = learner.top_k(phi, 25, exclude=exclude)
    assert [i for i, _ in top] == expected
    assert [s for _, s in top] == pytest.approx(sorted(scores[learner.rows_of(expected)])[::-1])
    assert len(learner.top_k(phi, 1000, exclude=exclude)) == 260


def test_new_items_start_from_the_hook_or_a_seeded_id_hash():
    config = LearnerConfig(seed=3, alpha0=0.0, lam=0.0)  # α = 0 below: learn() moves nothing
    one, two = ItemLearner(config), ItemLearner(config)
    one.learn(np.zeros((2, 64)), ["p", "q"], np.zeros(2))
    two.learn(np.zeros((2, 64)), ["q", "p"], np.zeros(2))  # other arrival order, same start
    start = one.item_matrix[one.rows_of(["p"])[0]]
    np.testing.assert_array_equal(start, two.item_matrix[two.rows_of(["p"])[0]])
    assert 0.08 < np.linalg.norm(start) < 0.12 and start[-1] == 0.0  # ‖v‖ ≈ init_scale, b = 0
    assert not np.array_equal(start, two.item_matrix[two.rows_of(["q"])[0]])
    other_seed = ItemLearner(LearnerConfig(seed=4, alpha0=0.0, lam=0.0))
    other_seed.learn(np.zeros((1, 64)), ["p"], np.zeros(1))
    assert not np.array_equal(start, other_seed.item_matrix[0])
    hooked = ItemLearner(config, init_vector=lambda i: np.full(65, 2.0) if i == "p" else None)
    hooked.learn(np.zeros((2, 64)), ["q", "p"], np.zeros(2))
    np.testing.assert_array_equal(hooked.item_matrix[1], np.full(65, 2.0))
    np.testing.assert_array_equal(hooked.item_matrix[0], one.item_matrix[1])


def test_assign_keeps_the_item_gramian_exact():
    learner = ItemLearner(LearnerConfig(dim=3))
    rng = np.random.default_rng(2)
    learner.assign(["a", "b"], rng.normal(size=(2, 4)))
    learner.assign(["b", "c"], rng.normal(size=(2, 4)))
    Psi = learner.item_matrix
    np.testing.assert_allclose(learner.item_gramian.matrix, Psi.T @ Psi, atol=1e-12)
    assert learner.item_ids == ["a", "b", "c"]
    with pytest.raises(ValueError):
        learner.assign(["a", "a"], np.zeros((2, 4)))


def test_counts_decay_with_the_half_life_in_events():
    learner = ItemLearner(LearnerConfig(dim=2, count_half_life=4.0))
    learner.learn(np.zeros((4, 2)), ["a", "a", "b", "b"], np.ones(4))
    learner.learn(np.zeros((4, 2)), ["b", "b", "b", "b"], np.ones(4))
    assert learner.count("a") == pytest.approx(1.0)  # 2 counts, one half-life ago
    assert learner.count("b") == pytest.approx(5.0)


@pytest.mark.parametrize("relative", [False, True])
def test_save_and_load_resume_the_same_stream(tmp_path, relative):
    users, items, _ = planted_stream(seed=1)
    half = len(users) // 2
    config = LearnerConfig(dim=8, recompute_every=7, positives_half_life=50.0,
                           alpha0_relative=relative, input_lr=0.1)
    original = ItemLearner(config)
    stream_pass(original, users[:half], items[:half])
    offset_rows = np.array([0, 3, 5])
    original.learn_inputs(offset_rows, np.ones((3, 8)))
    original.save(tmp_path / "learner.npz")
    restored = ItemLearner(config)
    assert restored.load(tmp_path / "learner.npz")
    # no temporary file is left: the head and its one part, the base
    assert sorted(p.name for p in tmp_path.iterdir()) == ["learner.npz", "learner.npz.part000001"]
    phi = np.random.default_rng(0).normal(size=(6, 8))
    ids = ["item-1", "item-2", "item-1", "brand-new", "item-399", "item-7"]
    assert restored.learn(phi, ids, np.ones(6)) == original.learn(phi, ids, np.ones(6))
    for learner in (restored, original):  # the offsets' accumulators came back too
        learner.learn_inputs(offset_rows, np.full((3, 8), -2.0))
    np.testing.assert_array_equal(restored.offsets, original.offsets)
    np.testing.assert_array_equal(restored.item_matrix, original.item_matrix)
    np.testing.assert_array_equal(restored.item_gramian.matrix, original.item_gramian.matrix)
    np.testing.assert_array_equal(restored.user_gramian.value(), original.user_gramian.value())
    assert restored.item_ids == original.item_ids and restored.events == original.events
    assert restored.positive_mass == original.positive_mass
    assert not ItemLearner(config).load(tmp_path / "missing.npz")
    with pytest.raises(ValueError):
        ItemLearner(LearnerConfig(dim=4)).load(tmp_path / "learner.npz")


@pytest.mark.parametrize("half_life, lanes", [(None, 1), (10.0, 3)])
def test_forgotten_positives_leave_the_mass_and_the_items_of_the_relative_alpha0(
        half_life, lanes, tmp_path):
    """Oracle: after items move to another learner (``forget_positives``), the mass and the
    item count of the relative α0 are those of the positives of the items kept, as a
    recomputation over them gives; learned again, an item counts once and takes a freed slot
    (the pool does not grow), also after a checkpoint round trip."""
    learner, config, _, seen, _, clock = solve_stream(0, half_life, relative=True,
                                                      lanes=lanes)
    gone = ["a", "d"]
    learner.forget_positives(learner.rows_of(gone + ["a"]))  # a repeat changes nothing more
    kept = [item for item, positives in seen.items() if positives and item not in gone]
    mass = sum(sum(discounted_alphas(config, seen[item], clock[lane_of(item, lanes)]))
               for item in kept)
    # the forgotten mass is read from the float32 statistics
    assert learner.positive_mass == pytest.approx(mass, rel=1e-6)
    assert learner._positive_mass_now() == pytest.approx(mass, rel=1e-6)
    assert learner.items_with_positives == len(kept)
    assert learner.alpha0 == pytest.approx(config.alpha0 * mass / (len(kept) * 20), rel=1e-6)

    learner.save(tmp_path / "learner.npz")
    restored = ItemLearner(config)
    assert restored.load(tmp_path / "learner.npz")
    for model in (learner, restored):
        pool = model._slots_used
        model.learn(np.ones((2, 3)), gone, np.ones(2), n_users=20,
                    lanes=np.array([lane_of(item, lanes) for item in gone]))
        assert model.items_with_positives == len(kept) + 2 and model._slots_used == pool
    statistics = restored._statistics_now(restored._slot[restored.rows_of(gone)])
    np.testing.assert_allclose(statistics[1], augment_users(np.ones((2, 3))))  # afresh
    np.testing.assert_array_equal(restored.item_matrix, learner.item_matrix)


def test_positives_forgotten_by_an_earlier_version_leave_the_relative_alpha0_at_load(
        tmp_path):
    """An earlier version's forget_positives unlinked the items' slots but kept their mass:
    loaded now, the slots are free and their mass leaves the positives' mass too (else α0 came
    out 1.37 times too high on this stream, and for good without a half-life)."""
    learner, config, _, seen, _, clock = solve_stream(0, None, relative=True)
    gone = ["a", "d"]
    learner._slot[learner.rows_of(gone)] = -1  # what the earlier version did
    learner.save(tmp_path / "earlier.npz")
    loaded = ItemLearner(config)
    assert loaded.load(tmp_path / "earlier.npz")
    kept = [item for item, positives in seen.items() if positives and item not in gone]
    mass = sum(sum(discounted_alphas(config, seen[item], clock[0])) for item in kept)
    assert loaded.positive_mass == pytest.approx(mass, rel=1e-6)
    assert loaded.items_with_positives == len(kept)
    loaded.save(tmp_path / "again.npz")  # counted out once: not again at the next load
    again = ItemLearner(config)
    assert again.load(tmp_path / "again.npz")
    assert again.positive_mass == pytest.approx(mass, rel=1e-6)


def test_a_checkpoint_holding_whole_statistics_loads_into_the_packed_pool(tmp_path):
    """A_i is stored by its upper triangle; checkpoints written before hold it whole
    (``pos_gram``, (n, d+1, d+1)). They load and resume the stream exactly as the packed one."""
    users, items, _ = planted_stream(seed=2)
    config = LearnerConfig(dim=8, positives_half_life=50.0)
    original = ItemLearner(config)
    stream_pass(original, users, items)
    assert original._pos_gram.shape[1:] == (packed_size(9),)  # 45 floats an item, not 81
    original.save(tmp_path / "packed.npz")
    arrays = as_whole(tmp_path / "packed.npz")
    arrays["pos_gram"] = unpack_symmetric(arrays.pop("pos_gram_upper"), 9)
    np.savez(tmp_path / "whole.npz", **arrays)
    restored = ItemLearner(config)
    assert restored.load(tmp_path / "whole.npz")
    np.testing.assert_array_equal(restored._pos_gram[: restored._slots_used],
                                  original._pos_gram[: original._slots_used])
    phi = np.random.default_rng(5).normal(size=(6, 8))
    ids = ["item-1", "item-2", "item-1", "brand-new", "item-399", "item-7"]
    assert restored.learn(phi, ids, np.ones(6)) == original.learn(phi, ids, np.ones(6))
    np.testing.assert_array_equal(restored.item_matrix, original.item_matrix)


def test_a_checkpoint_without_the_positives_mass_reads_it_from_the_statistics(tmp_path):
    """Checkpoints written before the relative α0 hold no ``positive_mass``: it is read from
    the corner entries of the A_i (Σ of discounted α), the value the running sum has."""
    users, items, _ = planted_stream(seed=3)
    config = LearnerConfig(dim=8, positives_half_life=40.0, alpha0_relative=True)
    original = ItemLearner(config)
    stream_pass(original, users, items)
    original.save(tmp_path / "new.npz")
    arrays = {k: v for k, v in as_whole(tmp_path / "new.npz").items()
              if k not in ("positive_mass", "alpha0")}
    np.savez(tmp_path / "old.npz", **arrays)
    restored = ItemLearner(config)
    assert restored.load(tmp_path / "old.npz")
    assert original.positive_mass > 0
    assert restored.positive_mass == pytest.approx(original.positive_mass, rel=1e-5)  # float32
    assert restored.alpha0 == pytest.approx(original.alpha0, rel=1e-5)


def test_periodic_recompute_reports_a_tiny_drift():
    learner = ItemLearner(LearnerConfig(dim=4, recompute_every=5))
    rng = np.random.default_rng(3)
    for _ in range(5):
        learner.learn(rng.normal(size=(16, 4)), [f"i{k}" for k in rng.integers(0, 30, 16)],
                      np.ones(16), n_users=50)
    assert learner.item_gramian.updates_since_recompute == 0
    assert 0.0 <= learner.last_drift < 1e-12


def test_mean_encoder_of_a_learned_history_matches_the_batched_one(planted_run):
    learner, seen = planted_run[0], planted_run[1]
    rows = learner.rows_of(map(item_id, seen[0]))
    np.testing.assert_allclose(encode(learner, [seen[0]])[0],
                               mean_encoder(learner.item_matrix[rows, :-1]))


def test_biases_follow_the_evidence_not_the_first_step():
    """An item seen once must not get the bias of an item seen a hundred times."""
    learner = ItemLearner(LearnerConfig(dim=4, seed=1))
    rng = np.random.default_rng(3)
    for _ in range(100):
        learner.learn(rng.normal(0, 0.1, (1, 4)), ["hit"], np.ones(1), n_users=100)
    learner.learn(rng.normal(0, 0.1, (1, 4)), ["once"], np.ones(1), n_users=100)
    bias = dict(zip(learner.item_ids, learner.item_matrix[:, -1]))
    assert bias["hit"] > 5 * bias["once"] > 0


def test_input_offsets_take_adagrad_steps_and_add_to_the_inputs():
    """q_i = v_i + δ_i; each :meth:`learn_inputs` call is a per-coordinate Adagrad step
    (accumulators from ``input_adagrad_init``), moves no item row, and names its rows."""
    config = LearnerConfig(dim=3, input_lr=0.5, input_adagrad_init=0.25)
    learner = ItemLearner(config)
    learner.learn(np.ones((4, 3)), ["a", "b", "c", "d"], np.ones(4), n_users=4)
    rows = learner.rows_of(["b", "d"])
    assert learner.offsets is None  # nothing learned: encoders skip the offsets
    np.testing.assert_array_equal(learner.input_rows(rows), learner.item_matrix[rows, :3])
    psi = learner.item_matrix.copy()
    g1, g2 = np.array([[1.0, -2.0, 0.0], [0.5, 0.0, 3.0]]), np.array([[2.0, 1.0, 1.0],
                                                                      [0.0, 0.0, -1.0]])
    learner.learn_inputs(rows, g1)
    learner.learn_inputs(rows, g2)
    accum = 0.25 + g1 ** 2
    expected = -0.5 * g1 / np.sqrt(accum)
    expected -= 0.5 * g2 / np.sqrt(accum + g2 ** 2)
    np.testing.assert_allclose(learner.offsets[rows], expected)
    assert not np.delete(learner.offsets, rows, axis=0).any()
    np.testing.assert_array_equal(learner.item_matrix, psi)
    np.testing.assert_allclose(learner.input_rows(rows), psi[rows, :3] + expected)
    assert learner.changed_input_rows.tolist() == sorted(rows.tolist())
    learner.learn(np.ones((1, 3)), ["a"], np.ones(1))
    assert len(learner.changed_input_rows) == 0  # per call, as changed_rows
    tied = ItemLearner(LearnerConfig(dim=3))  # input_lr 0: the tied model
    tied.learn(np.ones((1, 3)), ["a"], np.ones(1))
    tied.learn_inputs(np.array([0]), np.ones((1, 3)))
    assert tied.offsets is None


def test_the_input_steps_taken_add_up_to_the_offsets_moved_and_add_to_another_learner():
    """With ``log_input_steps``, :meth:`take_input_steps` gives each row's steps since the last
    call, summed: incremental (the log) equals batch (the offsets' difference). Another
    learner that adds them (:meth:`add_offsets`, repeats summed) moves its offsets alike."""
    config = LearnerConfig(dim=3, input_lr=0.5)
    learner = ItemLearner(config)
    learner.learn(np.ones((4, 3)), ["a", "b", "c", "d"], np.ones(4), n_users=4)
    rng = np.random.default_rng(5)
    learner.learn_inputs(np.array([0, 1]), rng.normal(size=(2, 3)))
    assert learner.take_input_steps() is None  # not asked for
    learner.log_input_steps = True
    before = np.zeros((4, 3)) + learner.offsets
    for rows in ([1, 3], [3], [0, 1, 3]):
        learner.learn_inputs(np.array(rows), rng.normal(size=(len(rows), 3)))
    rows, steps = learner.take_input_steps()
    assert rows.tolist() == [0, 1, 3] and learner.take_input_steps() is None
    np.testing.assert_allclose(steps, (learner.offsets - before)[rows])
    other = ItemLearner(config)
    other.learn(np.ones((4, 3)), ["a", "b", "c", "d"], np.ones(4), n_users=4)
    other.add_offsets(np.r_[rows, rows[:1]], np.vstack([steps / 2, steps[:1] / 2]))
    other.add_offsets(rows[1:], steps[1:] / 2)
    expected = np.zeros((4, 3))
    expected[rows] = steps
    np.testing.assert_allclose(other.offsets, expected)


def test_a_checkpoint_without_offsets_loads_the_tied_model(tmp_path):
    config = LearnerConfig(dim=4, input_lr=0.1)
    learner = ItemLearner(config)
    learner.learn(np.ones((3, 4)), ["a", "b", "c"], np.ones(3), n_users=3)
    learner.save(tmp_path / "model.npz")
    older = {key: value for key, value in as_whole(tmp_path / "model.npz").items()
             if not key.startswith("offset")}  # as written before offsets existed
    np.savez(tmp_path / "older.npz", **older)
    for restored in (ItemLearner(config), ItemReplica(config)):
        assert restored.load(tmp_path / "older.npz")
        assert restored.offsets is None
        np.testing.assert_array_equal(restored.input_rows(np.arange(3)),
                                      learner.item_matrix[:, :4])
    restored = ItemLearner(config)
    restored.load(tmp_path / "older.npz")
    restored.learn_inputs(np.array([1]), np.ones((1, 4)))  # from init accumulators
    np.testing.assert_allclose(restored.offsets[1], -0.1 / np.sqrt(0.01 + 1.0))


def test_a_replica_that_follows_the_deltas_equals_the_learner(tmp_path):
    """Oracle for the worker's replica: after any sequence of learning steps (new items, cold
    starts by assign, sweeps, Gramian recomputes), following each step's delta gives the
    learner's ids, rows, step count, item Gramian and α0 (relative here, so it moves)."""
    users, items, _ = planted_stream(seed=2)
    config = LearnerConfig(dim=8, recompute_every=3, sweep_per_step=16, alpha0_relative=True,
                           input_lr=0.1)
    learner = ItemLearner(config)
    assert ItemReplica(config).alpha0 == learner.alpha0 == 0.0  # nothing learned or followed
    stream_pass(learner, users[:200], items[:200])
    learner.save(tmp_path / "start.npz")
    replica = ItemReplica(config)
    assert replica.load(tmp_path / "start.npz")
    assert replica.alpha0 == learner.alpha0 != config.alpha0
    assert replica._slots_used == 0 and len(replica._pos_gram) == 0  # no (d+1)² per item
    rng = np.random.default_rng(4)
    for step in range(12):
        first_row, moved, moved_inputs = len(learner), [], []
        if step % 4 == 3:  # cold starts: assign new rows between learning steps
            learner.assign([f"cold-{step}-{k}" for k in range(400)], rng.normal(size=(400, 9)))
        for _ in range(step % 3):  # zero to two learning calls per delta
            ids = [item_id(i) for i in rng.integers(0, 500, 24)]  # some unseen ids
            learner.learn(rng.normal(size=(24, 8)), ids, np.ones(24), n_users=100)
            moved.append(learner.changed_rows)
            inputs = np.unique(rng.integers(0, len(learner), 10))  # new rows' too
            learner.learn_inputs(inputs, rng.normal(size=(len(inputs), 8)))
            moved_inputs.append(learner.changed_input_rows)
        delta = learner.delta(first_row, np.concatenate(moved) if moved else [],
                              np.concatenate(moved_inputs) if moved_inputs else None)
        replica.follow(delta)
        assert replica.item_ids == learner.item_ids
        np.testing.assert_array_equal(replica.item_matrix, learner.item_matrix)
        if learner.offsets is not None:
            np.testing.assert_array_equal(replica.offsets, learner.offsets)
        assert replica.steps == learner.steps and replica.last_drift == learner.last_drift
        assert replica.alpha0 == learner.alpha0
        np.testing.assert_allclose(replica.item_gramian.matrix, learner.item_gramian.matrix,
                                   rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="cannot follow"):
        replica.follow(learner.delta(0, []))  # a delta from before the last one
    # only the rows: no Adagrad state, priors or counts grew with the catalogue
    assert len(replica._psi) >= len(replica) > 1024
    assert max(len(replica._accum), len(replica._prior), len(replica._count)) == 1024
    assert replica.offsets is not None
    with pytest.raises(TypeError, match="only follows"):
        replica.learn(np.zeros((1, 8)), ["x"], np.ones(1))
    with pytest.raises(TypeError, match="only follows"):
        replica.learn_inputs(np.array([0]), np.zeros((1, 8)))


def test_lanes_out_of_range_are_refused_before_anything_is_learned():
    learner = ItemLearner(LearnerConfig(dim=3, positive_lanes=2))
    with pytest.raises(ValueError, match="lanes"):
        learner.learn(np.ones((2, 3)), ["a", "b"], np.ones(2), lanes=np.array([0, 2]))
    assert len(learner) == 0 and learner.events == 0 and learner.steps == 0


@pytest.mark.parametrize("sweep", [10_000, 7])
def test_items_without_positives_for_long_are_retired_and_alpha0_holds_on_a_turning_catalogue(
        sweep):
    """A catalogue that turns over (five new items a "day"): the relative α0 divides the
    positives' recent mass by the items holding positives, which counted every item ever
    learned, so α0 fell as 1/(items so far). Oracle: once swept, an item whose last positive
    is more than ``RETIRE_AFTER_HALF_LIVES`` half-lives old holds no slot (every item is swept
    each step with a large sweep; with a small one, an item is retired within a sweep cycle
    of that age, never before it); the mass left is that of the slots held."""
    from models.learner import RETIRE_AFTER_HALF_LIVES

    half_life = 100.0
    config = LearnerConfig(dim=4, alpha0=0.1, alpha0_relative=True, sweep_per_step=sweep,
                           positives_half_life=half_life)
    learner = ItemLearner(config)
    rng = np.random.default_rng(0)
    last: dict[str, float] = {}
    alpha0_by_day = []
    for day in range(60):
        items = [f"d{day}-{k}" for k in range(5)]
        for _ in range(10):
            batch = [items[k] for k in rng.integers(0, 5, 50)]
            learner.learn(rng.normal(size=(50, 4)), batch, np.ones(50), n_users=100)
            for item in batch:
                last[item] = learner.events
        alpha0_by_day.append(learner.alpha0)
    horizon = RETIRE_AFTER_HALF_LIVES * half_life
    recent = {item for item, at in last.items() if learner.events - at <= horizon}
    held = set(learner.item_ids_at(learner.rows_with_positives()))
    assert recent <= held
    if sweep >= len(last):
        assert held == recent
    else:  # a sweep cycle of len(last) / sweep steps, each of 50 events
        cycle = -(-len(last) // sweep) * 50
        assert all(learner.events - last[item] <= horizon + cycle for item in held)
    assert learner.items_with_positives == len(held) < len(last) / 4
    assert learner.positive_mass == pytest.approx(learner._positive_mass_now(), rel=1e-5)
    assert alpha0_by_day[-1] > 0.5 * alpha0_by_day[20]  # held: it had fallen to a third


@pytest.mark.parametrize("solver", ["solve", "adagrad"])
def test_a_checkpoint_of_deltas_reads_back_the_whole_state_after_any_writes(tmp_path, solver):
    """Oracle of the incremental checkpoint: whatever wrote the state (learning, the sweep
    and its retirements, forgetting, assignments, the input offsets' steps, set and added),
    the base and deltas on the disk read back every array the learner holds, the whole
    state. A loaded learner goes on with the same chain."""
    config = LearnerConfig(dim=6, solver=solver, positives_half_life=6.0, sweep_per_step=5,
                           positive_lanes=2, input_lr=0.1, recompute_every=3)
    learner, path = ItemLearner(config), tmp_path / "model.npz"
    rng, kinds = np.random.default_rng(7), []
    for turn in range(40):
        learner.checkpoints = ChainWriter(compact_share=1.5, max_deltas=6)
        if turn:  # a learner that loaded the chain goes on with it
            learner.checkpoints.continue_from(path, load_checkpoint(path))
        ids = [item_id(i) for i in rng.integers(0, 60 + 3 * turn, 12)]
        learner.learn(rng.normal(size=(12, 6)), ids, rng.uniform(0.5, 2, 12), n_users=30,
                      lanes=rng.integers(0, 2, 12))
        rows = rng.choice(len(learner), 4, replace=False)
        match turn % 5:
            case 0:
                learner.learn_inputs(rows, rng.normal(size=(4, 6)))
            case 1:
                learner.forget_positives(rows)
            case 2:
                learner.set_offsets(rows, rng.normal(size=(4, 6)))
                learner.add_offsets(rng.integers(0, len(learner), 3), rng.normal(size=(3, 6)))
            case 3:
                learner.assign([item_id(0), f"assigned-{turn}"], rng.normal(size=(2, 7)))
            case 4:
                learner.resolve(rows)
        kinds.append(learner.save(path))
        restored = ItemLearner(config)
        assert restored.load(path)
        expected, read = state_of(learner), state_of(restored)
        assert sorted(read) == sorted(expected)
        for name, array in expected.items():
            np.testing.assert_array_equal(read[name], array, err_msg=f"{name}, turn {turn}")
        if turn % 7 == 6:
            learner = restored
    assert kinds.count("delta") > 20 and kinds.count("base") > 2, kinds
    parts = sorted(p.name for p in tmp_path.iterdir() if p.name != "model.npz")
    assert len(parts) == len(as_chain(path)["parts"])  # the parts of earlier chains are gone


def as_chain(path) -> dict:
    return json.loads(str(load_checkpoint(path)[CHAIN_KEY]))


def test_a_delta_holds_the_rows_written_since_the_last_save_and_the_new_ones(tmp_path):
    config = LearnerConfig(dim=4, sweep_per_step=0)
    learner, path = ItemLearner(config), tmp_path / "model.npz"
    learner.learn(np.ones((400, 4)), [f"i{k}" for k in range(400)], np.ones(400), n_users=3)
    assert learner.save(path) == "base"
    learner.learn(np.ones((3, 4)), ["i1", "i5", "new"], np.ones(3), n_users=3)
    assert learner.save(path) == "delta"
    chain = as_chain(path)
    delta = np.load(tmp_path / chain["parts"][1])
    np.testing.assert_array_equal(delta["rows.items"], [1, 5, 400])
    np.testing.assert_array_equal(delta["rows.slots"], [1, 5, 400])
    assert chain["sizes"][1] < chain["sizes"][0] / 20
    assert learner.save(path) == "delta"  # nothing written since: an empty one
    assert len(np.load(tmp_path / as_chain(path)["parts"][2])["rows.items"]) == 0


def test_a_chain_loaded_with_another_number_of_lanes_saves_what_the_load_changed(tmp_path):
    """A load that reads the lanes anew (another ``positive_lanes``) rewrites every slot's
    update time and lane: the next save must write them, though nothing was learned."""
    one_lane, config, *_ = solve_stream(0, 10.0)
    one_lane.checkpoints.compact_share = 100.0  # deltas however large: this one is
    one_lane.save(tmp_path / "model.npz")
    one_lane.learn(np.ones((2, 3)), ["a", "b"], np.ones(2), n_users=20)
    assert one_lane.save(tmp_path / "model.npz") == "delta"
    four = ItemLearner(replace(config, positive_lanes=4))
    four.checkpoints.compact_share = 100.0
    assert four.load(tmp_path / "model.npz")
    assert four.save(tmp_path / "model.npz") == "delta"
    again = ItemLearner(replace(config, positive_lanes=4))
    assert again.load(tmp_path / "model.npz")
    expected, read = state_of(four), state_of(again)
    for name, array in expected.items():
        np.testing.assert_array_equal(read[name], array, err_msg=name)


def test_a_step_that_fails_midway_is_still_in_the_next_delta(tmp_path, monkeypatch):
    """A batch whose solve raises has written its items' counts and slots already; the
    worker goes on (the batch is logged as lost), and the next delta must hold those writes."""
    import models.learner as learner_module

    config = LearnerConfig(dim=4, sweep_per_step=0)
    learner, path = ItemLearner(config), tmp_path / "model.npz"
    learner.checkpoints.compact_share = 100.0
    learner.learn(np.ones((50, 4)), [f"i{k}" for k in range(50)], np.ones(50), n_users=3)
    learner.assign(["cold"], np.zeros((1, 5)))
    learner.save(path)

    def failing(*args, **kwargs):
        raise np.linalg.LinAlgError("singular")

    with monkeypatch.context() as patched:
        patched.setattr(learner_module, "item_solve", failing)
        patched.setattr(learner_module, "item_solve_cg", failing)
        with pytest.raises(np.linalg.LinAlgError):
            learner.learn(np.ones((3, 4)), ["i1", "cold", "new"], np.ones(3), n_users=3)
    learner.learn(np.ones((1, 4)), ["i7"], np.ones(1), n_users=3)
    assert learner.save(path) == "delta"
    restored = ItemLearner(config)
    assert restored.load(path)
    expected, read = state_of(learner), state_of(restored)
    for name, array in expected.items():
        np.testing.assert_array_equal(read[name], array, err_msg=name)


def test_a_replica_reads_the_rows_and_leaves_the_learning_state_on_the_disk(tmp_path,
                                                                            monkeypatch):
    import state.delta_checkpoint as delta_checkpoint

    learner = ItemLearner(LearnerConfig(dim=4, input_lr=0.1))
    learner.learn(np.ones((5, 4)), [f"i{k}" for k in range(5)], np.ones(5), n_users=3)
    learner.learn_inputs(np.array([1, 2]), np.ones((2, 4)))
    learner.save(tmp_path / "model.npz")
    read = []
    real = delta_checkpoint.load_npz

    def noting(path, skip=()):
        data = real(path, skip)
        read.extend(data or ())
        return data

    monkeypatch.setattr(delta_checkpoint, "load_npz", noting)
    replica = ItemReplica(learner.config)
    assert replica.load(tmp_path / "model.npz")
    assert {"psi", "offset", "ids_utf8"} <= set(read) and not set(read) & {"pos_gram_upper",
                                                                            "accum", "prior"}
    np.testing.assert_array_equal(replica.item_matrix, learner.item_matrix)
    np.testing.assert_array_equal(replica.offsets, learner.offsets)


def test_only_the_adagrad_solver_keeps_accumulators_and_each_reads_the_others_checkpoint(
        tmp_path):
    """The solve solver never reads Adagrad's accumulators: it keeps none (they took 520
    bytes an item at d = 64). A checkpoint of one solver loads into the other: adagrad
    starts each item's accumulators afresh."""
    solve = ItemLearner(LearnerConfig(dim=4))
    solve.learn(np.ones((3, 4)), ["a", "b", "c"], np.ones(3), n_users=3)
    assert solve._accum.nbytes == 0
    solve.save(tmp_path / "solve.npz")
    adagrad = ItemLearner(LearnerConfig(dim=4, solver="adagrad"))
    assert adagrad.load(tmp_path / "solve.npz")
    np.testing.assert_array_equal(adagrad._accum[:3], np.tile(adagrad._accum_init, (3, 1)))
    adagrad.learn(np.ones((2, 4)), ["a", "d"], np.ones(2), n_users=3)
    assert adagrad._accum[0, 0] > adagrad._accum_init[0]
    adagrad.save(tmp_path / "adagrad.npz")
    again = ItemLearner(LearnerConfig(dim=4, solver="adagrad"))
    assert again.load(tmp_path / "adagrad.npz")
    np.testing.assert_array_equal(again._accum[:4], adagrad._accum[:4])
    back = ItemLearner(LearnerConfig(dim=4))
    assert back.load(tmp_path / "adagrad.npz")
    assert back._accum.nbytes == 0
    np.testing.assert_array_equal(back.item_matrix, adagrad.item_matrix)


@pytest.mark.parametrize("half_life", [None, 50.0])
def test_the_input_offsets_accumulators_forget_as_the_positives_do(tmp_path, half_life):
    """Oracle: the input offsets' step is input_lr·g / √(init + Σ_k g_k² 0.5^(events since k
    / positives_half_life)), the sum over every earlier step of the row (all of them, whole,
    without a half-life), across a checkpoint; an older checkpoint's sums count as made at
    its clock."""
    config = LearnerConfig(dim=3, input_lr=0.5, positives_half_life=half_life)
    learner, rng = ItemLearner(config), np.random.default_rng(8)
    learner.learn(np.ones((4, 3)), ["a", "b", "c", "d"], np.ones(4), n_users=4)
    steps = []  # (events, row, grad)
    for turn in range(12):
        rows = np.sort(rng.choice(4, 2, replace=False))
        grads = rng.normal(size=(2, 3))
        learner.events += int(rng.integers(0, 40))  # learning between the steps
        if turn == 6:
            learner.save(tmp_path / "model.npz")
            learner = ItemLearner(config)
            assert learner.load(tmp_path / "model.npz")
        before = learner._offset[rows].copy()  # offsets reads None before the first step
        learner.learn_inputs(rows, grads)
        def decayed(at: int) -> float:
            return 1.0 if half_life is None else 0.5 ** ((learner.events - at) / half_life)
        for k, row in enumerate(rows.tolist()):
            summed = sum(g ** 2 * decayed(at) for at, r, g in steps if r == row)
            accumulated = config.input_adagrad_init + summed + grads[k] ** 2
            expected = -0.5 * grads[k] / np.sqrt(accumulated)
            np.testing.assert_allclose(learner._offset[row] - before[k], expected, rtol=1e-10)
        steps += [(learner.events, row, grads[k]) for k, row in enumerate(rows.tolist())]
    older = as_whole(tmp_path / "model.npz")
    del older["offset_at"]  # as written before the accumulators forgot
    np.savez(tmp_path / "older.npz", **older)
    restored = ItemLearner(config)
    assert restored.load(tmp_path / "older.npz")
    np.testing.assert_array_equal(restored._offset_at[: len(restored)],
                                  np.full(len(restored), float(restored.events)))


def test_the_learners_one_discount_halves_per_half_life_and_keeps_without_one():
    from models.learner import halved

    elapsed = np.array([0.0, 100.0, 250.0, 1e6])
    assert halved(elapsed, 100.0) == pytest.approx([1.0, 0.5, 2 ** -2.5, 0.0])
    assert halved(elapsed, None).tolist() == [1.0] * 4
    assert halved(np.array([], dtype=np.int64), 5.0).shape == (0,)
