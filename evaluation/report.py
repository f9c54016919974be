"""Results out: the published anchors, a terminal table, results.json and a PNG plot.

The anchors are read from the data folder's README (the table of published numbers), so they
are quoted from one place and never retyped here.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

#: README column names -> our metric names
_ANCHOR_METRICS = {"HIT": "HR", "NDCG": "NDCG"}


def read_anchors(readme: Path) -> list[dict]:
    """Rows of the README table whose header has ``HIT@``/``NDCG@`` columns, as
    ``{"dataset": "beauty", "model": "ICLRec (WWW'22, its README)", "metrics": {"HR@5": ...}}``.

    Only leave-one-out numbers are published there (the README says so), so the caller shows
    them for ``loo`` only."""
    if not readme.exists():
        return []
    anchors, header = [], None
    for line in readme.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not line.lstrip().startswith("|"):
            header = None
            continue
        if any(re.fullmatch(r"(HIT|NDCG)@\d+", cell) for cell in cells):
            header = cells
            continue
        if header is None or set(line.strip()) <= set("|-: "):
            continue
        row = dict(zip(header, cells))
        values = {}
        for column, value in row.items():
            match = re.fullmatch(r"(HIT|NDCG)@(\d+)", column)
            if match:
                values[f"{_ANCHOR_METRICS[match[1]]}@{match[2]}"] = float(value)
        anchors.append({"dataset": row.get("dataset", "").lower(), "model": row.get("model", ""),
                        "metrics": values})
    return anchors


def table_columns(protocol: str, ks: tuple[int, ...], records: list[dict]) -> list[str]:
    """The metrics worth a column for this protocol, in reading order."""
    if protocol == "heldout":
        per_k = [f"{name}@{k}" for k in ks for name in ("RecallMin", "NDCG")]
    else:
        per_k = [f"{name}@{k}" for k in ks for name in ("HR", "NDCG")]
    wanted = [f"MRR@{max(ks)}"] if protocol == "prequential" else ["MRR", "AUC"]
    extra = [name for name in wanted if any(name in r["metrics"] for r in records)]
    return per_k + extra


def print_table(payload: dict, console=None) -> None:
    """A rich table: one row per measured model, anchors (published numbers) below them."""
    from rich.console import Console
    from rich.table import Table

    # Off a terminal (CI logs, pipes) rich would wrap at 80 columns and truncate every number.
    console = console or Console(width=None if sys.stdout.isatty() else 160)
    records, anchors = payload["records"], payload["anchors"]
    columns = table_columns(payload["protocol"], tuple(payload["ks"]), records)
    title = (f"{payload['dataset']} · {payload['protocol']} · seed {payload['seed']}"
             + (" · quick" if payload["quick"] else "")
             + f" · {_scored_line(payload)}")
    table = Table(title=title, title_justify="left")
    table.add_column("model")
    for column in columns:
        table.add_column(column.replace("RecallMin", "Recall"), justify="right")
    main = main_metric(payload["ks"])
    table.add_column(f"± {main}", justify="right")
    table.add_column("fit s", justify="right")
    table.add_column("train ev/s", justify="right")
    for record in records:
        table.add_row(record["model"], *(_fmt(record["metrics"].get(c)) for c in columns),
                      _fmt(record.get("metrics_se", {}).get(main)),
                      f"{record['fit_s']:.1f}", _rate(record["train_events_per_s"]))
    for anchor in anchors:
        table.add_row(f"[dim]{anchor_label(anchor)}[/dim]",
                      *(_fmt(anchor["metrics"].get(c)) for c in columns), "", "", "")
    console.print(table)
    if payload["protocol"] == "heldout":
        console.print("Recall@K is normalized by min(K, |held-out items|) (Mult-VAE).")


def main_metric(ks) -> str:
    """The metric whose standard error the tables show: NDCG at the selection cutoff."""
    return f"NDCG@{10 if 10 in ks else max(ks)}"


def markdown_table(payload: dict) -> str:
    """The table of :func:`print_table` as GitHub markdown, for docs/results.md: generated from
    results.json so recorded numbers are never retyped."""
    records = payload["records"]
    columns = table_columns(payload["protocol"], tuple(payload["ks"]), records)
    main = main_metric(payload["ks"])
    head = ["model", *(c.replace("RecallMin", "Recall") for c in columns), f"± {main}",
            "fit s", "train events/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for record in records:
        cells = [record["model"], *(_fmt(record["metrics"].get(c)) for c in columns),
                 _fmt(record.get("metrics_se", {}).get(main)),
                 f"{record['fit_s']:.1f}", _rate(record["train_events_per_s"])]
        lines.append("| " + " | ".join(cells) + " |")
    for anchor in payload["anchors"]:
        cells = [anchor_label(anchor), *(_fmt(anchor["metrics"].get(c)) for c in columns),
                 "", "", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def retrieval_line(record: dict) -> str:
    """What a candidate-retrieval row (``streaming-dr``) scored and how close it came to brute
    force of the same model, in one sentence under the table."""
    stats = record["retrieval"]
    overlap = next((key for key in stats if key.startswith("overlap_with_brute_force@")), None)
    parts = [f"{record['model']}: {stats['items_scored_mean']:.0f} items scored per query "
             f"({100 * stats['fraction_scored']:.1f} % of the catalog)"]
    if overlap:
        parts.append(f"its top {overlap.split('@')[1]} shares {stats[overlap]:.3f} of brute "
                     f"force's")
    parts.append(f"beam search and path union p50 {stats['retrieve_ms_p50']:.2f} ms, p99 "
                 f"{stats['retrieve_ms_p99']:.2f} ms")
    if "dr_nonempty_paths" in stats:
        parts.append(f"{stats['dr_m_steps']} M-steps, {stats['dr_nonempty_paths']} non-empty "
                     f"paths, the largest {stats['dr_largest_path']} items")
    return "; ".join(parts) + ".\n"


def anchor_label(anchor: dict) -> str:
    """"ICLRec (WWW'22, its README)" -> "ICLRec (published)"."""
    return f"{anchor['model'].split(' (')[0]} (published)"


def _scored_line(payload: dict) -> str:
    split = payload["split"]
    if payload["protocol"] == "prequential":
        return f"{split['scored_events']} events scored"
    scored = split.get("scored_users", split.get("test_users"))
    return f"{scored} test users, {split['items']} items"


def _fmt(value) -> str:
    return "" if value is None else f"{value:.4f}"


def _rate(value) -> str:
    return "" if value is None else f"{value:,.0f}"


def write_json(path: Path, payload: dict) -> None:
    """Write atomically, keys sorted, NaN refused (JSON has no NaN)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, allow_nan=False) + "\n")
    os.replace(tmp, path)


def write_markdown(path: Path, payload: dict) -> None:
    """``results.md``: the command, what was measured and the table, ready for docs/results.md."""
    split = payload["split"]
    lines = [f"## {payload['dataset']} · {payload['protocol']}"
             + (" (quick)" if payload["quick"] else ""), "", "```bash", payload["command"], "```",
             "", f"{_scored_line(payload)}; {split.get('train_events', split.get('events'))} "
             f"training events; {payload['wall_s']:.0f} s in all on "
             f"{payload['machine']['cpus_usable']} CPUs ({payload['machine']['processor']}).",
             "", markdown_table(payload), ""]
    if payload["protocol"] == "heldout":
        lines += ["Recall@K is normalized by min(K, |held-out items|) (Mult-VAE).", ""]
    lines += [retrieval_line(record) for record in payload["records"] if record.get("retrieval")]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def plot(payload: dict, path: Path) -> None:
    """Recall (HR for loo) and NDCG vs K per model, anchors as markers; for prequential, the
    hit rate over the stream per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if payload["protocol"] == "prequential":
        figure = _plot_over_time(plt, payload)
    else:
        figure = _plot_vs_k(plt, payload)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)


def _plot_vs_k(plt, payload: dict):
    recall_name = "RecallMin" if payload["protocol"] == "heldout" else "HR"
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for record in payload["records"]:
        curves = record["curves"]
        for axis, name in zip(axes, (recall_name, "NDCG")):
            axis.plot(curves["K"], curves[name], marker=".", label=record["model"])
    for anchor in payload["anchors"]:
        for axis, name in zip(axes, ("HR", "NDCG")):
            points = sorted((int(key.split("@")[1]), value)
                            for key, value in anchor["metrics"].items() if key.startswith(name))
            if points:
                axis.plot(*zip(*points), "k*--", label=anchor_label(anchor))
    labels = {"HR": "HR@K", "RecallMin": "Recall@K (÷ min(K, |test|))", "NDCG": "NDCG@K"}
    for axis, name in zip(axes, (recall_name, "NDCG")):
        axis.set_xlabel("K")
        axis.set_ylabel(labels[name])
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle(f"{payload['dataset']} · {payload['protocol']}")
    return figure


def _plot_over_time(plt, payload: dict):
    k = 10 if 10 in payload["ks"] else max(payload["ks"])
    figure, axis = plt.subplots(figsize=(9, 4.2))
    for record in payload["records"]:
        curve = record["over_time"]
        axis.plot(curve["event"], curve[f"HR@{k}"], label=record["model"])
    for edge in payload["split"].get("window_edges", [])[1:-1]:
        axis.axvline(edge, color="grey", alpha=0.2)
    axis.set_xlabel("stream position (events)")
    axis.set_ylabel(f"HR@{k} per bin of scored events")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    axis.set_title(f"{payload['dataset']} · prequential (batch models refit at grey lines)")
    return figure

