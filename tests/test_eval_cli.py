"""`streamrec eval` end to end: the real Beauty file in quick mode, and the other protocols on a
small planted file given by path."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from evaluation.cli import same_width_grid
from evaluation.report import markdown_table, read_anchors
from stream_app.cli import main

RECORD_KEYS = {"model", "dataset", "protocol", "seed", "params", "metrics", "wall_s", "fit_s",
               "train_events", "train_events_per_s", "scored"}


def check_metrics(record):
    for name, value in record["metrics"].items():
        assert 0.0 <= value <= 1.0, (record["model"], name, value)
        assert math.isfinite(value)
    assert record["metrics_se"].keys() == record["metrics"].keys()
    assert all(0.0 <= se < 0.5 for se in record["metrics_se"].values())


@pytest.mark.slow
def test_quick_leave_one_out_on_beauty(tmp_path, shared_data, capsys):
    out = tmp_path / "beauty"
    status = main(["eval", "--dataset", "beauty", "--protocol", "loo", "--quick",
                   "--out", str(out), "--data-root", str(shared_data)])
    assert status == 0
    payload = json.loads((out / "results.json").read_text())
    assert payload["protocol"] == "loo" and payload["dataset"] == "beauty"
    assert payload["quick"] is True and payload["seed"] == 0
    assert "--quick" in payload["command"] and payload["machine"]["cpus_usable"] >= 1
    records = {r["model"]: r for r in payload["records"]}
    assert set(records) == {"streaming", "popularity", "ease", "ials", "bpr"}
    for record in records.values():
        assert RECORD_KEYS <= set(record)
        assert {f"{m}@{k}" for m in ("HR", "NDCG") for k in (5, 10, 20)} | {"MRR", "AUC"} \
            <= set(record["metrics"])
        check_metrics(record)
        assert record["train_events"] == payload["split"]["train_events"] > 0
        assert record["train_events_per_s"] > 0
    assert records["ease"]["metrics"]["NDCG@10"] > records["popularity"]["metrics"]["NDCG@10"]
    # the anchors are the README's numbers, shown beside the measured rows
    published = [a for a in read_anchors(shared_data / "README.md") if a["dataset"] == "beauty"]
    assert payload["anchors"] == published and published[0]["metrics"]["HR@10"] > 0
    assert "ICLRec (published)" in capsys.readouterr().out
    assert (out / "results.png").stat().st_size > 10_000
    table = markdown_table(payload).splitlines()
    assert len(table) == 2 + len(records) + len(published)
    assert table[2].startswith("| streaming | ") and "ICLRec (published)" in table[-1]
    written = (out / "results.md").read_text()
    assert payload["command"] in written and "\n".join(table) in written


def planted_pairs(path, seed=0, clusters=6, items=30, users_per_cluster=25, length=12):
    """A ``user item`` file: each user draws items of their own cluster only."""
    rng = np.random.default_rng(seed)
    lines = []
    for c in range(clusters):
        for u in range(users_per_cluster):
            for i in rng.choice(items, size=length, replace=False):
                lines.append(f"c{c}u{u} c{c}i{i}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("protocol", ["heldout", "prequential"])
def test_other_protocols_on_a_file(tmp_path, protocol, capsys):
    data = planted_pairs(tmp_path / "planted.txt")
    out = tmp_path / protocol
    status = main(["eval", "--dataset", str(data), "--format", "pairs", "--protocol", protocol,
                   "--models", "streaming,popularity,ease", "--k", "5,10", "--windows", "3",
                   "--out", str(out)])
    assert status == 0
    payload = json.loads((out / "results.json").read_text())
    records = {r["model"]: r for r in payload["records"]}
    assert list(records) == ["streaming", "popularity", "ease"]
    for record in records.values():
        check_metrics(record)
    assert payload["anchors"] == []  # the published numbers are leave-one-out only
    if protocol == "heldout":
        assert {"RecallMin@10", "Recall@10", "NDCG@10", "AUC"} <= set(records["ease"]["metrics"])
        assert payload["split"]["test_users"] > 0
    else:
        curve = records["ease"]["over_time"]
        assert len(curve["event"]) == len(curve["HR@10"]) >= 5
        assert payload["split"]["window_edges"][0] == 0
    # users only ever consume their own cluster: item-item co-occurrence must beat popularity
    metric = "RecallMin@10" if protocol == "heldout" else "HR@10"
    assert records["ease"]["metrics"][metric] > records["popularity"]["metrics"][metric]
    assert (out / "results.png").exists()
    capsys.readouterr()


def test_same_width_grid_holds_every_candidate_to_the_dimension():
    grid = ({"factors": 256, "alpha": 40.0}, {"factors": 256, "alpha": 10.0},
            {"factors": 128, "alpha": 40.0})
    assert same_width_grid(grid, 64) == ({"factors": 64, "alpha": 40.0},
                                         {"factors": 64, "alpha": 10.0})
    assert grid[0]["factors"] == 256  # the shared grid is left as it was


def test_seed_seeds_the_streaming_rows_too(tmp_path):
    """--seed reaches the streaming model: its new items' random vectors follow it (a run with
    another seed is another draw of the model, not only of the splits and baselines)."""
    from evaluation.cli import build_specs
    from evaluation.data import Events
    from stream_app.settings import Settings

    events = Events(np.repeat(np.arange(4), 3), np.array([0, 1, 2, 0, 1, 2, 3, 4, 5, 3, 4, 5]),
                    np.ones(12), np.arange(12.0), np.tile(np.arange(3), 4))
    dataset = type("Catalog", (), {"n_items": 6})()
    settings = Settings(data_dir=tmp_path, model_dim=4, dr_enabled=False,
                        popularity_refresh_s=0)

    def learned(seed: int, name: str) -> np.ndarray:
        (spec,) = build_specs([name], dataset, settings, seed, quick=True)
        model = spec.build()
        assert model.settings.model_seed == seed
        model.learn(events)
        return model.engine.learner.item_matrix.copy()

    for name in ("streaming", "streaming-dr"):
        np.testing.assert_array_equal(learned(3, name), learned(3, name))
        assert not np.allclose(learned(3, name), learned(4, name))


def test_ials_at_the_streaming_width_is_a_row_of_its_own(tmp_path, monkeypatch, capsys):
    """``ials-same-width`` picks its rate and weight on validation like ``ials``, with the
    streaming model's d as its factors."""
    monkeypatch.setenv("STREAMREC_MODEL_DIM", "8")
    data = planted_pairs(tmp_path / "planted.txt")
    out = tmp_path / "out"
    status = main(["eval", "--dataset", str(data), "--format", "pairs", "--protocol", "heldout",
                   "--models", "ials-same-width,popularity", "--k", "5,10", "--out", str(out)])
    assert status == 0
    records = {r["model"]: r for r in json.loads((out / "results.json").read_text())["records"]}
    assert records["ials-same-width"]["params"]["factors"] == 8
    check_metrics(records["ials-same-width"])
    metric = "RecallMin@10"
    assert records["ials-same-width"]["metrics"][metric] > records["popularity"]["metrics"][metric]
    capsys.readouterr()


def test_the_bootstrapped_row_starts_from_the_logs_pmi_and_then_learns_the_stream(tmp_path,
                                                                                  monkeypatch,
                                                                                  capsys):
    """streaming-bootstrap: every item of the training events gets its RSVD-PMI vector before
    the stream is learned (as `streamrec bootstrap` starts a deployment), then one pass."""
    from evaluation.data import Events
    from evaluation.streaming import BootstrappedEmbedding
    from stream_app.settings import Settings

    monkeypatch.setenv("STREAMREC_MODEL_DIM", "16")
    data = planted_pairs(tmp_path / "planted.txt")
    out = tmp_path / "bootstrap"
    assert main(["eval", "--dataset", str(data), "--format", "pairs", "--protocol", "heldout",
                 "--models", "streaming-bootstrap,popularity", "--k", "5,10",
                 "--out", str(out)]) == 0
    records = {r["model"]: r for r in json.loads((out / "results.json").read_text())["records"]}
    assert (records["streaming-bootstrap"]["metrics"]["RecallMin@10"]
            > records["popularity"]["metrics"]["RecallMin@10"])
    capsys.readouterr()
    events = Events(np.repeat(np.arange(4), 3), np.array([0, 1, 2, 0, 1, 2, 3, 4, 5, 3, 4, 5]),
                    np.ones(12), np.arange(12.0), np.tile(np.arange(3), 4))
    from evaluation.protocols import RunConfig, _learn_all

    calls = []
    model = BootstrappedEmbedding(6, Settings(model_dim=2, dr_enabled=False))
    start_from = model.start_from
    model.start_from = lambda given: (calls.append(len(given)), start_from(given))
    _learn_all(model, events, RunConfig(progress=False), chunk=5)  # learned in three chunks
    assert calls == [12]  # the bootstrap read all of them, once, first
    assert len(model.engine.learner) == 6 and model.engine.learner.events == 12
    assert np.abs(model.engine.learner._prior[:, :2]).sum() > 0  # the PMI vectors, as priors


@pytest.mark.integration
@pytest.mark.parametrize("protocol", ["loo", "heldout"])
def test_through_kafka_replays_into_a_real_worker_and_asks_the_request_topic(tmp_path, protocol,
                                                                           capsys, monkeypatch):
    """The embedded default: a broker and a worker of its own, events produced, rankings asked
    on the request topic; scored on the same split as the in-process rows."""
    # Micro-batches of 16 in both rows: the worker then takes as many learning steps however
    # its timing cuts the burst into messages (this small stream needs the steps).
    monkeypatch.setenv("STREAMREC_LEARN_BATCH", "16")
    data = planted_pairs(tmp_path / "planted.txt")
    out = tmp_path / "out"
    status = main(["eval", "--dataset", str(data), "--format", "pairs", "--protocol", protocol,
                   "--models", "streaming,popularity", "--k", "5,10", "--through-kafka",
                   "--out", str(out)])
    assert status == 0
    payload = json.loads((out / "results.json").read_text())
    records = {r["model"]: r for r in payload["records"]}
    assert list(records) == ["streaming", "popularity", "streaming-kafka"]
    kafka, streaming = records["streaming-kafka"], records["streaming"]
    check_metrics(kafka)
    assert kafka["train_events"] == streaming["train_events"] == payload["split"]["train_events"]
    assert kafka["scored"] == streaming["scored"] >= 30
    assert kafka["fit_s"] > 0 and "--through-kafka" in payload["command"]
    # the pair the worker answered with, read from its metrics: one of its candidates, chosen
    # on examples of this stream
    from stream_app.settings import Settings

    pairs = {(c.half_life_events, c.bias_weight) for c in Settings().serving_choice().candidates}
    params = kafka["params"]
    assert (params["serve_half_life_events"], params["serve_bias_weight"]) in pairs
    assert params["serving_samples"] > 0 and params["serving_moves"] >= 0
    # users only ever consume their own cluster: the worker must have learned that
    metric = "HR@10" if protocol == "loo" else "RecallMin@10"
    assert kafka["metrics"][metric] > max(0.3, 2 * records["popularity"]["metrics"][metric])
    capsys.readouterr()


@pytest.mark.integration
def test_through_kafka_with_two_workers_that_share_the_item_model(tmp_path, capsys,
                                                                   monkeypatch):
    """``--kafka-workers 2``: two workers of one app split the partitions, each learns part of
    the events and ends up holding every item; the answers (from both) find the clusters."""
    monkeypatch.setenv("STREAMREC_LEARN_BATCH", "16")
    data = planted_pairs(tmp_path / "planted.txt")
    out = tmp_path / "out"
    status = main(["eval", "--dataset", str(data), "--format", "pairs", "--protocol", "loo",
                   "--models", "popularity", "--k", "5,10", "--through-kafka",
                   "--kafka-workers", "2", "--out", str(out)])
    assert status == 0
    payload = json.loads((out / "results.json").read_text())
    records = {r["model"]: r for r in payload["records"]}
    kafka = records["streaming-kafka"]
    check_metrics(kafka)
    params = kafka["params"]
    assert params["workers"] == 2 and "--kafka-workers 2" in payload["command"]
    assert min(params["learned_per_worker"]) > 0
    assert sum(params["learned_per_worker"]) == payload["split"]["train_events"]
    assert len(set(params["items_per_worker"])) == 1
    assert params["items_per_worker"][0] >= 0.9 * payload["split"]["items"]
    assert kafka["metrics"]["HR@10"] > max(0.3, 2 * records["popularity"]["metrics"]["HR@10"])
    capsys.readouterr()


def test_bad_arguments_are_refused(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--dataset", "beauty", "--models", "ease,nope"])
    with pytest.raises(SystemExit):
        main(["eval", "--dataset", "beauty", "--k", "0"])
    assert main(["eval", "--dataset", "no-such-dataset"]) == 1
    assert "neither a named dataset" in capsys.readouterr().err
    assert main(["eval", "--dataset", "movielens", "--protocol", "prequential",
                 "--through-kafka"]) == 1
    assert "--through-kafka runs the loo and heldout protocols" in capsys.readouterr().err
    assert main(["eval", "--dataset", "movielens", "--kafka-workers", "2"]) == 1
    assert "--kafka-workers sets the workers of --through-kafka" in capsys.readouterr().err


def test_streaming_dr_ranks_from_its_paths_and_reports_the_retrieval(tmp_path, monkeypatch,
                                                                     capsys):
    """The streaming-dr row learns the same model with Deep Retrieval beside it and ranks only
    the items on the user's beam paths; its record says how many it scored and how much of
    brute force's top list it kept."""
    for name, value in {"DR_WIDTH": "8", "DR_DEPTH": "2", "DR_PATHS_PER_ITEM": "2",
                        "DR_BEAM": "3", "DR_TOP_S": "6", "DR_M_STEP_EVENTS": "500",
                        "MODEL_DIM": "16"}.items():
        monkeypatch.setenv(f"STREAMREC_{name}", value)
    data = planted_pairs(tmp_path / "planted.txt")
    out = tmp_path / "dr"
    status = main(["eval", "--dataset", str(data), "--format", "pairs", "--protocol", "heldout",
                   "--models", "streaming,streaming-dr,popularity", "--k", "5,10",
                   "--out", str(out)])
    assert status == 0
    payload = json.loads((out / "results.json").read_text())
    records = {r["model"]: r for r in payload["records"]}
    stats = records["streaming-dr"]["retrieval"]
    assert 0 < stats["fraction_scored"] < 0.6
    assert stats["dr_m_steps"] >= 1 and stats["dr_nonempty_paths"] > 1
    assert 0.0 <= stats["overlap_with_brute_force@50"] <= 1.0
    assert "MRR" not in records["streaming-dr"]["metrics"]  # it does not rank everything
    dr, popular = (records[m]["metrics"]["RecallMin@10"] for m in ("streaming-dr", "popularity"))
    assert dr > popular
    assert "streaming-dr:" in (out / "results.md").read_text()
    capsys.readouterr()


@pytest.mark.integration
def test_a_failed_run_through_kafka_keeps_the_worker_log(tmp_path):
    """The run's data dir (logs included) goes when it closes; after a failure the logs are
    copied to a folder named on the error, so the cause can still be read."""
    from evaluation.data import load_dataset
    from evaluation.through_kafka import KafkaStreaming
    from stream_app.settings import Settings

    settings = Settings()
    dataset = load_dataset(str(planted_pairs(tmp_path / "planted.txt")), "pairs",
                           settings.kind_weights)
    model = KafkaStreaming(dataset, settings, timeout_s=5.0)
    data_dir = model.settings.data_dir
    try:
        model.system.worker.kill()
        with pytest.raises(RuntimeError, match="the worker exited") as failure:
            model.learn(dataset.events.take(np.arange(10)))
    finally:
        model.close()
    notes = " ".join(getattr(failure.value, "__notes__", []))
    kept = Path(notes.split("kept in ")[1].split()[0])
    assert not data_dir.exists()
    try:
        assert (kept / "worker.log").read_text()  # what the worker wrote before it was killed
    finally:
        shutil.rmtree(kept)
