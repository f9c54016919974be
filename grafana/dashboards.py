"""The streamrec Grafana dashboard and its provisioning files, generated from code.

Dashboards are plain dicts (no grafanalib), serialised with sorted keys so the committed
files change only when the code does, and every uid is a literal so links, alerts and
provisioned copies survive regeneration. ``tests/test_deploy.py`` checks that the committed
files equal :func:`render_all` and that every metric a PromQL expression names is exported by
the worker's metrics bundle. Regenerate after editing::

    python -m grafana.dashboards          # rewrite the files
    python -m grafana.dashboards --check  # exit 1 when a committed file is stale
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent
DATASOURCE_UID = "streamrec-prometheus"
DATASOURCE = {"type": "prometheus", "uid": DATASOURCE_UID}
PROMETHEUS_URL = "http://prometheus:9090"  # the compose service name and port
#: where the compose file mounts ``grafana/dashboards`` inside the Grafana container
DASHBOARDS_MOUNT = "/etc/grafana/dashboards"
RATE_WINDOW = "1m"  # >= 4 scrape intervals (5 s in prometheus/prometheus.yml)
#: the Deep Retrieval panels' note: their gauges are registered only with DR on
DR_OFF = "No data: Deep Retrieval is off (STREAMREC_DR_ENABLED)."


# -- building blocks -------------------------------------------------------------------------
def target(expr: str, legend: str, ref: str = "A") -> dict:
    """One PromQL query of a panel."""
    return {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend, "refId": ref}


def timeseries(title: str, targets: list[dict], unit: str, description: str = "") -> dict:
    """A graph panel; ``id`` and ``gridPos`` are filled in by :func:`layout`."""
    return {
        "type": "timeseries", "title": title, "description": description,
        "datasource": DATASOURCE, "targets": targets,
        "fieldConfig": {"defaults": {"unit": unit, "min": 0}, "overrides": []},
        "options": {"legend": {"displayMode": "table", "placement": "bottom",
                               "calcs": ["lastNotNull", "max"]},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
    }


def stat(title: str, targets: list[dict], description: str = "", *,
         whole: bool = True) -> dict:
    """A single-number panel (one number per series); ``whole``: counts, shown without
    decimals; else Grafana's own (α0 is about 0.01, a bias weight 0.25, a build 0.4 s)."""
    defaults = {"unit": "none", "decimals": 0} if whole else {"unit": "none"}
    return {
        "type": "stat", "title": title, "description": description,
        "datasource": DATASOURCE, "targets": targets,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {"colorMode": "value", "graphMode": "area", "textMode": "value_and_name",
                    "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}},
    }


def layout(rows: list[list[dict]], height: int = 8) -> list[dict]:
    """Number the panels and place each row's panels side by side on Grafana's 24-column
    grid, so ids and positions are a pure function of the order in the code."""
    panels, next_id = [], 1
    for y, row in enumerate(rows):
        width = 24 // len(row)
        for x, panel in enumerate(row):
            grid = {"h": height, "w": width, "x": x * width, "y": y * height}
            panels.append({**panel, "id": next_id, "gridPos": grid})
            next_id += 1
    return panels


def rate(metric: str, by: str) -> str:
    return f"sum by ({by}) (rate({metric}[{RATE_WINDOW}]))"


def latency_quantile(q: float, histogram: str = "streamrec_request_latency_seconds") -> str:
    return (f"histogram_quantile({q}, sum by (le) "
            f"(rate({histogram}_bucket[{RATE_WINDOW}])))")


# -- the dashboard ---------------------------------------------------------------------------
def overview() -> dict:
    """Traffic, errors and latency of every worker, plus the model state they serve."""
    rows = [
        [timeseries("Events by kind and outcome",
                    [target(rate("streamrec_events_total", "kind, outcome"),
                            "{{kind}} {{outcome}}", "A"),
                     target(f"sum(rate(streamrec_expired_histories_total[{RATE_WINDOW}]))",
                            "histories expired", "B")], "ops",
                    "Timeline events per second, summed over workers (kind forget: users "
                    "erased); histories deleted per second for having no event for "
                    "STREAMREC_HISTORY_TTL_S."),
         timeseries("Dead letters by reason",
                    [target(rate("streamrec_dead_letters_total", "reason"), "{{reason}}", "A"),
                     target(rate("streamrec_record_resends_total", "record, outcome"),
                            "resent {{record}} {{outcome}}", "B"),
                     target(rate("streamrec_damaged_histories_total", "read_by"),
                            "damaged history ({{read_by}})", "C")],
                    "ops", "Events sent to the dead-letter topic per second; records of event "
                           "batches (changelog, training messages, dead letters) whose delivery "
                           "failed, sent again (retried) or given up (their partition moved); "
                           "stored histories that did not read (their users start again).")],
        [timeseries("Requests by status",
                    [target(rate("streamrec_requests_total", "status"), "{{status}}")], "reqps",
                    "Recommendation requests answered per second."),
         timeseries("Request latency",
                    [target(latency_quantile(0.5), "p50", "A"),
                     target(latency_quantile(0.99), "p99", "B"),
                     target(latency_quantile(0.99, "streamrec_request_wait_seconds"),
                            "wait p99", "C")], "s",
                    "p50 and p99: from taking a request to sending its response, all workers. "
                    "Wait: from the request's timestamp to taking it (time in Kafka; compares "
                    "the client's clock with the worker's).")],
        [stat("Workers up", [target('up{job="streamrec"}', "{{instance}}")],
              "1 while Prometheus scrapes the worker, 0 once it does not answer (down, or "
              "restarting: a dead worker's other panels only go quiet)."),
         stat("Users", [target("sum(streamrec_users)", "users")],
              "Users with history; each user lives on one worker, so the sum is the total."),
         stat("Items", [target("streamrec_items", "{{instance}}")],
              "Distinct items each worker has seen (workers overlap, so no sum)."),
         stat("Withdrawn items", [target("streamrec_withdrawn_items", "{{instance}}")],
              "Items withdrawn from the catalogue, left out of every answer (each worker reads "
              "them all: the same everywhere once read)."),
         stat("Model version", [target("streamrec_model_version", "{{instance}}")],
              "Model version serving requests, per worker.")],
        [timeseries("Learning",
                    [target(f"sum(rate(streamrec_learned_events_total[{RATE_WINDOW}]))",
                            "learned/s", "A"),
                     target(rate("streamrec_events_total", "outcome"), "{{outcome}}/s", "B")],
                    "ops", "Training examples applied per second against events taken in: "
                           "a growing gap is learning lag."),
         timeseries("Intake lag",
                    [target("streamrec_ingest_lag_events", "behind {{instance}}", "A"),
                     target("streamrec_ingest_unconfirmed_batches",
                            "unconfirmed batches {{instance}}", "B")], "none",
                    "Events each worker has yet to take in (its partitions' high watermarks "
                    "minus the offsets taken). While it is above STREAMREC_INDEX_BACKLOG_EVENTS "
                    "a due index build waits. Unconfirmed batches: event batches taken in whose "
                    "records the broker has not confirmed (their offsets wait to be committed; "
                    "past 1,000 the worker stops taking events)."),
         timeseries("Ingest batch size",
                    [target(f"histogram_quantile(0.5, sum by (le, instance) "
                            f"(rate(streamrec_ingest_batch_events_bucket[{RATE_WINDOW}])))",
                            "p50 {{instance}}")], "none",
                    "Events per ingest batch (median). In a backlog batches fill up to "
                    "STREAMREC_INGEST_BATCH; smaller batches there mean the batch wait "
                    "(STREAMREC_INGEST_BATCH_WAIT_S) runs out first, and every batch's fixed "
                    "costs (a changelog write, a training message per partition) weigh more."),
         timeseries("Training loss and Gramian drift",
                    [target("streamrec_train_loss", "loss {{instance}}", "A"),
                     target("streamrec_gramian_drift", "drift {{instance}}", "B")], "none",
                    "EW mean of the batch loss; relative error of the incremental item Gramian "
                    "found at its last exact recompute."),
         stat("Checkpoint age", [target("streamrec_checkpoint_age_seconds", "{{instance}}", "A"),
                                 target("streamrec_train_uncommitted_messages",
                                        "uncommitted {{instance}}", "B"),
                                 target("streamrec_train_redelivered_messages",
                                        "skipped again {{instance}}", "C"),
                                 target("streamrec_train_repeated_examples",
                                        "examples made again {{instance}}", "D")],
              "Seconds since model state was last written to the data dir; training messages "
              "waiting for a checkpoint (or a publish of their rows) before they are "
              "committed; messages skipped since the worker started because the model held "
              "them (delivered again after a crash or a rebalance); examples skipped because "
              "the model had learned their events (made again for events read again)."),
         timeseries("Checkpoint writes",
                    [target("streamrec_checkpoint_bytes / 1e6", "MB {{instance}}", "A"),
                     target("streamrec_checkpoint_seconds", "seconds {{instance}}", "B"),
                     target("sum by (kind) (increase(streamrec_checkpoints_total[1h]))",
                            "{{kind}}s in the last hour", "C")], "none",
                    "What the last model checkpoint wrote and how long it took; checkpoints "
                    "in the last hour by kind: a delta writes the rows changed since the last, "
                    "a base the whole model, once the deltas since weigh "
                    "STREAMREC_CHECKPOINT_DELTA_SHARE of it (half by default)."),
         stat("All-pairs weight α0", [target("streamrec_alpha0", "{{instance}}")],
              "Weight of each (user, item) pair in the all-pairs term now; with "
              "STREAMREC_ALPHA0_RELATIVE it follows the density of the positives.",
              whole=False)],
        [timeseries("Answer stages (p99)",
                    [target(f"histogram_quantile(0.99, sum by (le, stage) "
                            f"(rate(streamrec_stage_seconds_bucket[{RATE_WINDOW}])))",
                            "{{stage}}")], "s",
                    "embed: the user vector; ann: candidates from the index; dr: the Deep "
                    "Retrieval beam and its paths' items; merge: the one rerank with the "
                    "current vectors and the popularity fill."),
         timeseries("Candidates by source",
                    [target(rate("streamrec_candidates_total", "source"), "{{source}}")], "ops",
                    "Candidates retrieved per second by each source, before the rerank."),
         stat("Index version", [target("streamrec_index_version", "v {{instance}}", "A"),
                                target("streamrec_index_items", "items {{instance}}", "B"),
                                target("streamrec_index_exact_rows",
                                       "scored exactly {{instance}}", "C")],
              "Serving HNSW version (0: exact search), its items, and the items each answer "
              "scores exactly beside it (moved since its snapshot, or new; at most "
              "STREAMREC_INDEX_STALE_LIMIT moved ones)."),
         stat("Index age and build",
              [target("streamrec_index_age_seconds", "age s {{instance}}", "A"),
               target("streamrec_index_build_seconds", "build s {{instance}}", "B"),
               target("streamrec_index_failures", "failed builds {{instance}}", "C"),
               target("streamrec_index_updates", "updated in place {{instance}}", "D"),
               target("streamrec_index_waiting_seconds", "waiting for a backlog s {{instance}}",
                      "E"),
               target("streamrec_index_filled_answers", "filled exactly {{instance}}", "F")],
              "Seconds since the serving index was made, the last build's or update's seconds, "
              "failed builds (the previous version kept serving), versions made by updating the "
              "previous one in place, seconds a due build has waited for a backlog, answers "
              "whose graph search came back short and were filled by exact search.",
              whole=False)],
        [timeseries("Online quality (NDCG@k)",
                    [target("streamrec_serving_ndcg", "answering {{instance}}", "A"),
                     target("streamrec_serving_ndcg_configured", "configured {{instance}}",
                            "B")], "none",
                    "Weighted NDCG@k (STREAMREC_SERVE_TUNING_K, 100) of the next event on a "
                    "sample of training examples, each ranked before it was learned: with the "
                    "serving settings that answer now, and with the configured ones "
                    "(models/serving_choice.py)."),
         stat("Serving settings",
              [target("streamrec_serving_half_life_events", "half-life {{instance}}", "A"),
               target("streamrec_serving_bias_weight", "bias weight {{instance}}", "B"),
               target("streamrec_serving_samples", "ranked {{instance}}", "C"),
               target("streamrec_serving_moves", "moves {{instance}}", "D"),
               target("streamrec_serving_lead", "lead of the next (SE) {{instance}}", "E")],
              "The pair that answers: the user vector's recency half-life in events (+Inf: "
              "none) and the weight of the item bias; the examples ranked to choose it, how "
              "often the pair changed, and by how many standard errors the best other pair "
              "leads it (it takes over past STREAMREC_SERVE_TUNING_MARGIN_Z).", whole=False)],
        [timeseries("Deep Retrieval paths",
                    [target("streamrec_dr_largest_path", "largest path {{instance}}", "A"),
                     target("streamrec_dr_nonempty_paths", "non-empty paths {{instance}}", "B"),
                     target("streamrec_dr_items", "items {{instance}}", "C")], "none",
                    "After each M-step: the size of the largest path (the penalty keeps it "
                    "small), paths holding items, items with paths. " + DR_OFF),
         timeseries("Deep Retrieval learning",
                    [target("streamrec_dr_estep_loss", "E-step loss {{instance}}", "A"),
                     target("streamrec_dr_last_m_step_seconds", "M-step s {{instance}}", "B")],
                    "none", "EW mean of the E-step's multi-path loss; seconds of the last "
                            "M-step (it runs aside, off the event loop). " + DR_OFF),
         timeseries("Items per DR retrieval",
                    [target(f"histogram_quantile(0.5, sum by (le) "
                            f"(rate(streamrec_dr_retrieved_items_bucket[{RATE_WINDOW}])))",
                            "p50", "A"),
                     target(f"histogram_quantile(0.99, sum by (le) "
                            f"(rate(streamrec_dr_retrieved_items_bucket[{RATE_WINDOW}])))",
                            "p99", "B")], "none",
                    "Items a dr request hands to the rerank (what it scores). " + DR_OFF),
         stat("M-steps", [target("streamrec_dr_m_steps", "done {{instance}}", "A"),
                          target("streamrec_dr_m_step_failures", "failed {{instance}}", "B")],
              "Deep Retrieval M-steps installed, and failed (the old paths kept serving). "
              + DR_OFF)],
        [timeseries("Item sharing (several workers)",
                    [target("streamrec_item_rows_published", "rows published {{instance}}",
                            "A"),
                     target("streamrec_item_rows_installed", "rows installed {{instance}}",
                            "B"),
                     target("streamrec_item_steps_sent", "offset steps sent {{instance}}", "C"),
                     target("streamrec_item_steps_added", "offset steps added {{instance}}",
                            "D"),
                     target("streamrec_item_rows_handed_over",
                            "rows handed over {{instance}}", "E")], "none",
                    "With STREAMREC_SHARE_ITEMS, since each worker started: rows of its own "
                    "items it published (of them, those sent at rebalances or as it stopped: "
                    "handed over) and rows of the others' it installed; steps it took on "
                    "the others' items' input offsets and sent them, and steps of the others it "
                    "added to its own (README, \"Several workers\"). No data: sharing is off.")],
    ]
    return {
        "uid": "streamrec-overview", "title": "streamrec overview",
        "tags": ["streamrec"], "timezone": "browser", "editable": False,
        "refresh": "10s", "time": {"from": "now-30m", "to": "now"},
        "schemaVersion": 39, "version": 1, "graphTooltip": 1,
        "panels": layout(rows), "templating": {"list": []}, "annotations": {"list": []},
    }


#: committed file (relative to ``grafana/dashboards``) → dashboard builder
DASHBOARDS = {"streamrec.json": overview}


def expressions(dashboard: dict) -> Iterator[str]:
    """Every PromQL expression in a dashboard's panels."""
    for panel in dashboard["panels"]:
        for query in panel.get("targets", ()):
            yield query["expr"]


# -- provisioning ----------------------------------------------------------------------------
def datasource_provisioning() -> str:
    return f"""\
# Generated by `python -m grafana.dashboards`; do not edit.
apiVersion: 1
datasources:
  - name: Prometheus
    uid: {DATASOURCE_UID}
    type: prometheus
    access: proxy
    url: {PROMETHEUS_URL}
    isDefault: true
    editable: false
    jsonData:
      timeInterval: 5s
"""


def dashboard_provisioning() -> str:
    return f"""\
# Generated by `python -m grafana.dashboards`; do not edit.
apiVersion: 1
providers:
  - name: streamrec
    orgId: 1
    folder: streamrec
    type: file
    disableDeletion: true
    allowUiUpdates: false
    updateIntervalSeconds: 30
    options:
      path: {DASHBOARDS_MOUNT}
      foldersFromFilesStructure: false
"""


def render_all() -> dict[Path, str]:
    """Every generated file's path and its exact text."""
    files = {ROOT / "dashboards" / name: json.dumps(build(), sort_keys=True, indent=2) + "\n"
             for name, build in DASHBOARDS.items()}
    files[ROOT / "provisioning" / "datasources" / "prometheus.yml"] = datasource_provisioning()
    files[ROOT / "provisioning" / "dashboards" / "streamrec.yml"] = dashboard_provisioning()
    return files


def stale(files: dict[Path, str]) -> list[Path]:
    """The generated files whose committed text differs (or that are missing)."""
    return [path for path, text in files.items()
            if not path.exists() or path.read_text() != text]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m grafana.dashboards", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 when a committed file is out of date")
    args = parser.parse_args(argv)
    files = render_all()
    outdated = stale(files)
    if args.check:
        for path in outdated:
            print(f"out of date: {path.relative_to(ROOT.parent)}", file=sys.stderr)
        return 1 if outdated else 0
    for path in outdated:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(files[path])
        print(f"wrote {path.relative_to(ROOT.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
