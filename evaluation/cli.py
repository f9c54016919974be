"""``streamrec eval``: measure the streaming model and the baselines on one split, print the
table with the published anchors, write ``results.json`` and a plot.

Registered by :func:`stream_app.cli.build_parser` through :func:`add_eval_parser`; the handler
gets the settings object like every other command and reads the kind weights, the popularity
half-life and the history length from it, so the streaming model runs as the workers do.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from functools import partial
from pathlib import Path

from stream_app.datasets import FORMATS

from .data import NAMED_DATASETS, Dataset, data_root, load_dataset, sample_users

PROTOCOLS = ("loo", "heldout", "prequential")
MODELS = ("streaming", "streaming-bootstrap", "streaming-dr", "stream-popularity",
          "popularity", "ease", "ials", "ials-same-width", "bpr")
DEFAULT_MODELS = ("streaming", "popularity", "ease", "ials", "bpr")

#: full runs: candidate parameters per model, the first is the default (no validation data).
#: Ranges come from validation runs on Beauty (docs/results.md): EASE's λ spans 12.5..3200 by
#: factors of 4; iALS and BPR gain from wide factors.
FULL_GRIDS = {
    "ease": ({"l2": 200.0}, {"l2": 12.5}, {"l2": 50.0}, {"l2": 800.0}, {"l2": 3200.0}),
    "ials": ({"factors": 256, "regularization": 0.05, "alpha": 40.0, "iterations": 15},
             {"factors": 256, "regularization": 0.05, "alpha": 10.0, "iterations": 15},
             {"factors": 128, "regularization": 0.05, "alpha": 40.0, "iterations": 15}),
    "bpr": ({"factors": 128, "learning_rate": 0.05, "regularization": 0.01, "iterations": 200},
            {"factors": 256, "learning_rate": 0.05, "regularization": 0.01, "iterations": 200}),
}
#: --quick: one candidate each, fewer factors and iterations
QUICK_GRIDS = {
    "ease": ({"l2": 200.0},),
    "ials": ({"factors": 32, "regularization": 0.05, "alpha": 10.0, "iterations": 8},),
    "bpr": ({"factors": 32, "learning_rate": 0.05, "regularization": 0.01, "iterations": 50},),
}
#: --quick user samples per protocol (None: all users)
QUICK_USERS = {"loo": 3000, "heldout": None, "prequential": 2000}


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``eval`` command to ``streamrec``'s subparsers."""
    parser = subparsers.add_parser(
        "eval", help="measure recommendation quality: streaming model vs baselines",
        description="Score the streaming model and baselines (popularity, EASE, iALS, BPR) on "
                    "one split; print a table beside the published numbers, write "
                    "DIR/results.json and DIR/results.png.")
    parser.add_argument("--dataset", required=True,
                        help=f"{', '.join(NAMED_DATASETS)} (folders under --data-root) or a path")
    parser.add_argument("--format", choices=FORMATS, help="file format (default: guessed)")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="loo",
                        help="loo: leave-one-out, full ranking (SASRec/ICLRec); heldout: "
                             "held-out users, 80/20 fold-in by time (Mult-VAE-style); prequential: "
                             "test-then-train over the stream (default loo)")
    parser.add_argument("--models", type=model_list, default=list(DEFAULT_MODELS),
                        help=f"comma-separated, from {','.join(MODELS)} "
                             f"(default: {','.join(DEFAULT_MODELS)})")
    parser.add_argument("--k", type=k_list, default=[5, 10, 20],
                        help="comma-separated cutoffs (default 5,10,20)")
    parser.add_argument("--quick", action="store_true",
                        help="seeded user sample and small models: minutes become seconds")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the stream interleaving, samples, splits and models, the "
                             "streaming rows too (in place of STREAMREC_MODEL_SEED)")
    parser.add_argument("--out", type=Path, help="output folder (default out/eval/DATASET-PROTOCOL)")
    parser.add_argument("--data-root", type=Path,
                        help="folder holding the named datasets (default: the "
                             "STREAMREC_DATASETS_DIR setting, ../shared/data)")
    parser.add_argument("--sample-users", type=positive_int,
                        help="evaluate on a seeded sample of this many users")
    parser.add_argument("--windows", type=positive_int,
                        help="prequential: refit windows of batch models (default 10, quick 4)")
    parser.add_argument("--through-kafka", action="store_true",
                        help="also run the streaming model for real (loo, heldout): start a "
                             "broker (embedded unless STREAMREC_BROKER) and a worker, produce "
                             "the training events to Kafka, ask every ranking on the request "
                             "topic; reported as the row streaming-kafka")
    parser.add_argument("--kafka-workers", type=positive_int, default=1,
                        help="with --through-kafka: this many workers of one app, sharing the "
                             "item model (STREAMREC_SHARE_ITEMS; default 1)")
    parser.add_argument("--learn-batch", type=positive_int, default=1,
                        help="prequential: events the streaming model ranks before learning "
                             "them (default 1: strictly test-then-train per event)")
    return parser


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def k_list(text: str) -> list[int]:
    try:
        ks = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not ks or ks[0] < 1 or ks[-1] > 1000:
        raise argparse.ArgumentTypeError("cutoffs must be in 1..1000")
    return ks


def model_list(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = sorted(set(names) - set(MODELS))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown models {unknown}; choose from {MODELS}")
    return list(dict.fromkeys(names))


# -- the command ---------------------------------------------------------------------------------


def cmd_eval(settings, args) -> int:
    """Run one evaluation; returns the exit status."""
    from . import report

    started = time.perf_counter()
    root = data_root(args.data_root or settings.datasets_dir)
    dataset = load_dataset(args.dataset, args.format, settings.kind_weights, seed=args.seed,
                           root=root)
    sample = args.sample_users or (QUICK_USERS[args.protocol] if args.quick else None)
    if sample:
        dataset = sample_users(dataset, sample, args.seed)
    records, split_info = run_protocol(dataset, settings, args)
    payload = {
        "dataset": dataset.name, "protocol": args.protocol, "seed": args.seed,
        "quick": args.quick, "sample_users": sample, "ks": args.k,
        "command": command_line(args), "machine": machine(),
        "settings": {"kind_weights": dict(settings.kind_weights),
                     "popularity_half_life_s": settings.popularity_half_life_s,
                     "history_length": settings.history_length},
        "split": split_info,
        "anchors": anchors_for(dataset.name, args.protocol, root),
        "records": [{"dataset": dataset.name, "protocol": args.protocol, "seed": args.seed,
                     **record} for record in records],
    }
    payload["wall_s"] = time.perf_counter() - started
    out = args.out or Path("out") / "eval" / f"{dataset.name}-{args.protocol}"
    report.write_json(out / "results.json", payload)
    report.write_markdown(out / "results.md", payload)
    report.plot(payload, out / "results.png")
    report.print_table(payload)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'} and {out / 'results.png'} "
          f"({payload['wall_s']:.0f} s)")
    return 0


def run_protocol(dataset: Dataset, settings, args) -> tuple[list[dict], dict]:
    """Split (or prepare the stream), build the models for its catalog, run them."""
    from .protocols import RunConfig, prepare_stream, run_offline, run_prequential
    from .report import main_metric
    from .splits import heldout_users, leave_one_out

    ks = tuple(args.k)
    config = RunConfig(ks=ks, select_metric=main_metric(ks))
    if args.kafka_workers != 1 and not args.through_kafka:
        raise ValueError("--kafka-workers sets the workers of --through-kafka; add it")
    if args.protocol == "prequential":
        if args.through_kafka:
            raise ValueError("--through-kafka runs the loo and heldout protocols; prequential "
                             "test-then-train per event through Kafka would measure round trips")
        windows = args.windows or (4 if args.quick else 10)
        stream = prepare_stream(dataset, windows, settings.history_length)
        specs = build_specs(args.models, dataset, settings, args.seed, args.quick)
        records = run_prequential(stream, specs, config, learn_batch=args.learn_batch)
        return records, {**stream.info, "window_edges": stream.bounds.tolist()}
    split = leave_one_out(dataset) if args.protocol == "loo" else heldout_users(dataset, args.seed)
    models = args.models + (["streaming-kafka"] if args.through_kafka else [])
    specs = build_specs(models, split.dataset, settings, args.seed, args.quick,
                        kafka_workers=args.kafka_workers)
    info = {**split.info, "select_metric": config.select_metric}
    return run_offline(split, specs, config), info


def same_width_grid(grid: tuple[dict, ...], dim: int) -> tuple[dict, ...]:
    """``grid`` with every candidate's factors set to ``dim``, duplicates dropped, order kept.

    iALS's own grid picks its width on validation (256 on the Amazon sets); this row holds it
    to the streaming model's d, so the two can also be compared at equal memory per item.
    """
    candidates = ({**params, "factors": dim} for params in grid)
    unique = {tuple(sorted(params.items())): params for params in candidates}
    return tuple(unique.values())


def build_specs(names: list[str], dataset: Dataset, settings, seed: int, quick: bool,
                kafka_workers: int = 1):
    """The requested models, in the requested order, each with its candidate grid."""
    from .baselines import BPR, EASE, IALS, Popularity
    from .protocols import ModelSpec
    from .streaming import (BootstrappedEmbedding, OnlineDeepRetrieval, OnlineEmbedding,
                            OnlinePopularity)
    from .through_kafka import KafkaStreaming

    grids = QUICK_GRIDS if quick else FULL_GRIDS
    n_items = dataset.n_items
    # the streaming rows' random item vectors and Deep Retrieval's start follow --seed too,
    # in place of STREAMREC_MODEL_SEED (one seed for the whole run; --seed defaults to 0)
    settings = settings.replace(model_seed=seed)
    builders = {
        # Deep Retrieval learns only where it is measured: it does not change the item model.
        "streaming": ModelSpec("streaming",
                               partial(OnlineEmbedding, n_items,
                                       settings.replace(dr_enabled=False)),
                               streaming=True),
        "streaming-bootstrap": ModelSpec("streaming-bootstrap",
                                         partial(BootstrappedEmbedding, n_items,
                                                 settings.replace(dr_enabled=False)),
                                         streaming=True),
        "streaming-dr": ModelSpec("streaming-dr", partial(OnlineDeepRetrieval, n_items, settings),
                                  streaming=True),
        "stream-popularity": ModelSpec("stream-popularity",
                                       partial(OnlinePopularity, n_items,
                                               settings.popularity_half_life_s),
                                       streaming=True),
        "streaming-kafka": ModelSpec("streaming-kafka",
                                     partial(KafkaStreaming, dataset, settings,
                                             workers=kafka_workers), streaming=True),
        "popularity": ModelSpec("popularity", Popularity),
        "ease": ModelSpec("ease", EASE, grids["ease"]),
        "ials": ModelSpec("ials", partial(IALS, seed=seed), grids["ials"]),
        "ials-same-width": ModelSpec("ials-same-width", partial(IALS, seed=seed),
                                     same_width_grid(grids["ials"], settings.model_dim)),
        "bpr": ModelSpec("bpr", partial(BPR, seed=seed), grids["bpr"]),
    }
    return [builders[name] for name in names]


def anchors_for(dataset_name: str, protocol: str, root: Path) -> list[dict]:
    """Published numbers for this dataset; they are leave-one-out numbers, so loo only."""
    from .report import read_anchors

    if protocol != "loo":
        return []
    return [a for a in read_anchors(root / "README.md") if a["dataset"] == dataset_name]


def command_line(args) -> str:
    """The command that reproduces this run, every option spelled out."""
    parts = ["streamrec", "eval", "--dataset", str(args.dataset), "--protocol", args.protocol,
             "--models", ",".join(args.models), "--k", ",".join(map(str, args.k)),
             "--seed", str(args.seed)]
    for flag, value in (("--format", args.format), ("--data-root", args.data_root),
                        ("--sample-users", args.sample_users), ("--windows", args.windows)):
        if value is not None:
            parts += [flag, str(value)]
    if args.protocol == "prequential" and args.learn_batch != 1:
        parts += ["--learn-batch", str(args.learn_batch)]
    if args.through_kafka:
        parts.append("--through-kafka")
        if args.kafka_workers != 1:
            parts += ["--kafka-workers", str(args.kafka_workers)]
    if args.quick:
        parts.append("--quick")
    if args.out is not None:
        parts += ["--out", str(args.out)]
    return " ".join(parts)


def machine() -> dict:
    """Where the numbers were measured: timings mean little without it."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    return {"cpus_usable": usable, "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "processor": _cpu_model(), "python": sys.version.split()[0]}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
