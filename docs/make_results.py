"""Assemble docs/results.md from out/eval/*/results.{json,md} (run from the repository root
after the `streamrec eval` runs it names); numbers in the prose are read from the JSON."""
import json
from pathlib import Path

root = Path("out/eval")
RUNS = [("beauty-loo", "Amazon Beauty, leave-one-out, full ranking", "NDCG@10"),
        ("toys-loo", "Amazon Toys, leave-one-out, full ranking", "NDCG@10"),
        ("movielens-heldout",
         "MovieLens latest-small, held-out users (Mult-VAE-style, split by time)", "NDCG@10")]
# NDCG@10 of the streaming row before this change (docs/results.md of the previous version:
# user vectors an unweighted mean of the history, alpha0 0.1, test histories read unordered)
BEFORE = {"beauty-loo": 0.0303, "toys-loo": 0.0272, "movielens-heldout": 0.0811}
# One-pass NDCG@10 (validation, test) with STREAMREC_MODEL_DIM=128, from runs of the streaming
# row alone on the same splits (`--models streaming`), exact item solves
DIM_128 = {"beauty-loo": (0.0470, 0.0367), "toys-loo": (0.0453, 0.0342)}

# The streaming-kafka row re-run alone after index versions could be the serving one updated
# in place (`OPENBLAS_NUM_THREADS=1 streamrec eval --dataset beauty --protocol loo
# --models streaming --k 10 --seed 0 --through-kafka`)
KAFKA_RERUN = {"Beauty": (
    " Re-run after index versions could be the serving one updated in place "
    "(`STREAMREC_INDEX_UPDATE_SHARE`, README \"Measured\"): 0.0311 (HR@10 0.0576, ±0.0009; "
    "`OPENBLAS_NUM_THREADS=1 streamrec eval --dataset beauty --protocol loo --models streaming "
    "--k 10 --seed 0 --through-kafka`), in-process row unchanged at 0.0335. Again after the "
    "consumer's polls were shared among partitions and training messages compressed "
    "(`STREAMREC_FAIR_POLLS`, `STREAMREC_TRAIN_COMPRESSION_LEVEL`): 0.0305 (HR@10 0.0561, "
    "±0.0009). Again after index builds wait while the worker is behind its input "
    "(`STREAMREC_INDEX_BACKLOG_EVENTS`): 0.0317 (HR@10 0.0576, ±0.0010).")}


def run(name):
    return json.loads((root / name / "results.json").read_text())


def metric(payload, model, key):
    return next(r for r in payload["records"] if r["model"] == model)["metrics"][key]


def se(payload, model, key="NDCG@10"):
    return next(r for r in payload["records"] if r["model"] == model)["metrics_se"][key]


def retrieval(payload):
    return next(r for r in payload["records"] if r["model"] == "streaming-dr")["retrieval"]


def table_part(name):
    return (root / name / "results.md").read_text().split("\n", 2)[2].strip()


def f4(x):
    return f"{x:.4f}"


runs = {name: run(name) for name, _, _ in RUNS if (root / name / "results.json").exists()}
out = ["""# Results

Every number here comes from `streamrec eval` on the datasets of `../shared/data/`, with
popularity and the batch baselines (EASE, iALS and BPR from `implicit`) computed in the same run
on the same split, and the published anchors printed beside them. Each run also writes
`results.json` (every metric, its standard error, the parameters chosen on validation, wall
time and training events/s), `results.md` (the table and the retrieval line below) and
`results.png` (HR/Recall and NDCG against K). Machine: a shared 2-core virtual machine, CPU
only; one run each. The runs below used `OPENBLAS_NUM_THREADS=1 STREAMREC_DR_M_STEP_EVENTS=20000`
(an M-step every 20,000 learned pairs, where a worker's default is 200,000 or 5 minutes: these
streams are short).

Rows:

- `streaming`: the workers' online model (mean encoder with the newest events weighted most,
  half-life 3 events; d = 64, α0 = 0.05, λ = 0.01, each touched item moved by 3
  conjugate-gradient steps towards its closed-form minimizer with prior weight μ = 0.5,
  positives discounted with a half-life of 30,000 learned events, a
  round-robin re-solve of 64 items per step, micro-batches of 256) trained in **one pass**
  over the training events in stream order through the engine's own code path
  (`Engine.learn`), ranked by exact search. A test user's history is read as a worker keeps
  it: in time order, the newest 50 events.
- `streaming-dr`: the same model with Deep Retrieval learned beside it (K = 100, D = 3, J = 3,
  S = 16, B = 25, penalty 1e-6, Adam 0.03), ranking **only** the items on the paths its beam
  search finds for the user (at most 1,000), scored by the model. The line under each table
  compares it with brute force of the same model on the same rows.
- `streaming-kafka` (`--through-kafka`): the same model run for real: an embedded broker and a
  worker of its own (Deep Retrieval learning too), the training events produced to
  `timeline-events`, every ranking asked on `rec-requests` (answered from the worker's HNSW index
  once the catalog passes 1,000 items). Its `train events/s` is end to end.
- `popularity`, `ease`, `ials`, `bpr`: batch baselines; EASE's λ, iALS's and BPR's factors and
  rates are chosen on the validation targets from a small grid (`evaluation/cli.py`).
- `ICLRec (published)`: from `../shared/data/README.md`, a sequential transformer with the same
  leave-one-out protocol; an anchor, not a peer.

`±` is the standard error of NDCG@10 over the test users.
"""]
for name, title, _ in RUNS:
    if name in runs:
        out.append(f"## {title}\n\n{table_part(name)}\n")

BUDGET_RUNS = [("beauty-loo-dr10", "Beauty", 1210), ("toys-loo-dr10", "Toys", 1192)]
budget = [(name, label, cap) for name, label, cap in BUDGET_RUNS if (root / name).exists()]
if budget:
    out.append("""## Deep Retrieval at the target's budget (10 % of the catalog)

The rows above cap a dr retrieval at 1,000 items (8.2 % and 8.4 % of the catalogs). The issue's
target allows 10 %; these runs give DR that budget (and a beam of 40 paths to fill it) and
nothing else changes:
""")
    for name, label, cap in budget:
        out.append(f"```bash\nOPENBLAS_NUM_THREADS=1 STREAMREC_DR_M_STEP_EVENTS=20000 "
                   f"STREAMREC_DR_BEAM=40 STREAMREC_DR_MAX_CANDIDATES={cap} \\\n"
                   f"  {run(name)['command']}\n```\n")
        body = table_part(name).split("```", 2)[2].strip()
        out.append(body + "\n")
    runs.update({name: run(name) for name, _, _ in budget})

lines = ["## Reading", ""]
b, t = runs.get("beauty-loo"), runs.get("toys-loo")
if b and t:
    ials = {name: next(r for r in runs[name]["records"] if r["model"] == "ials")["params"]
            for name in ("beauty-loo", "toys-loo")}
    lines.append(
        f"- One streaming pass, item learner: NDCG@10 {f4(metric(b, 'streaming', 'NDCG@10'))} on "
        f"Beauty (was {BEFORE['beauty-loo']:.4f}) and {f4(metric(t, 'streaming', 'NDCG@10'))} on "
        f"Toys (was {BEFORE['toys-loo']:.4f}), against iALS {f4(metric(b, 'ials', 'NDCG@10'))} "
        f"and {f4(metric(t, 'ials', 'NDCG@10'))} (15 alternating passes over all data, "
        f"{ials['beauty-loo']['factors']} and {ials['toys-loo']['factors']} factors chosen on "
        f"validation; the streaming model has d = 64). The learner issue's target (at least "
        f"iALS with one pass) is **met on Beauty and not on Toys** at the default d = 64 (on "
        f"Beauty the two are level within their standard errors, ±{se(b, 'streaming'):.4f} and "
        f"±{se(b, 'ials'):.4f}), and **met on both at d = 256**, iALS's own width (next "
        f"section). What moved "
        f"it: the user vector weighs a user's newest events most (the event j places before "
        f"the newest by 2^(−j/3)), in the worker and in the learn step alike, and α0 went "
        f"from 0.1 to 0.05. Validation NDCG@10 (d = 64) with half-lives of 1, 3, 6 and 12 "
        f"events on Beauty: 0.0420, 0.0420, 0.0412, 0.0404 (none: 0.0391); Toys 2 and 5: "
        f"0.0374, 0.0363 (none: 0.0352); MovieLens 2, 5 and 20: 0.1325, 0.1380, 0.1353 "
        f"(none: 0.1145); then α0 0.05: Beauty 0.0431, Toys 0.0385 (0.025: 0.0387). "
        f"The item statistics' half-life (30,000 learned events) stayed best on Toys with "
        f"the new encoder (15,000: 0.0356, 60,000: 0.0363).")
    pairs = [("Beauty", b), ("Toys", t)]
    pairs += [(f"{label}, 10 % budget", runs[name]) for name, label, _ in budget]
    for label, p in pairs:
        r = retrieval(p)
        bf, dr = metric(p, "streaming", "HR@50"), metric(p, "streaming-dr", "HR@50")
        lines.append(
            f"- Deep Retrieval, {label}: HR@50 (recall@50 of the held-out item) "
            f"{f4(dr)} against {f4(bf)} for brute force of the same model, **{dr / bf:.2f}×**, "
            f"while scoring {r['items_scored_mean']:.0f} items per query "
            f"(**{100 * r['fraction_scored']:.1f} %** of the catalog); NDCG@10 "
            f"{f4(metric(p, 'streaming-dr', 'NDCG@10'))} against "
            f"{f4(metric(p, 'streaming', 'NDCG@10'))}. Item by item, DR's top 50 shares "
            f"{r['overlap_with_brute_force@50']:.2f} of brute force's top 50; "
            f"{r['dr_nonempty_paths']} non-empty paths, the largest {r['dr_largest_path']} "
            f"items.")
    ratios = {label: metric(p, "streaming-dr", "HR@50") / metric(p, "streaming", "HR@50")
              for label, p in pairs}
    met = [f"{label} ({ratio:.2f}×)" for label, ratio in ratios.items() if ratio >= 0.95]
    missed = [f"{label} ({ratio:.2f}×)" for label, ratio in ratios.items() if ratio < 0.95]
    lines.append(
        "- The issue's target for DR (≥ 0.95 of brute-force recall@50 while scoring ≤ 10 % of "
        "the catalog) reads as the held-out recall@50 ratio above. Met: "
        f"{'; '.join(met) or 'none'}. Missed: {'; '.join(missed) or 'none'}. With the previous "
        "learner (positives counted forever) Toys reached 0.98× at the 10 % budget. "
        "The item-by-item "
        "overlap with brute force's top 50 is the stricter reading and is not at 0.95. "
        + ("" if budget else "The runs at the 10 % budget (DR 1.04× and 0.98×) were measured "
           "with the previous learner (positives counted forever; see this file's history). ")
        + "The path structure ends coarse (a few hundred paths of tens to hundreds of "
        "items): the E-step teaches the layers to send users to the paths their items hold, "
        "which concentrates the tracked scores, and the penalty 1e-6 only binds near a few "
        "hundred items per path.")
    for label, p in (("Beauty", b), ("Toys", t)):
        lines.append(
            f"- `streaming-kafka` on {label}: NDCG@10 {f4(metric(p, 'streaming-kafka', 'NDCG@10'))}"
            f" against {f4(metric(p, 'streaming', 'NDCG@10'))} in process: the worker cuts the "
            f"replay into micro-batches by arrival time and partition and answers from an HNSW "
            f"index built from a snapshot." + KAFKA_RERUN.get(label, ""))
    kafka_validation = next(r for r in b["records"]
                            if r["model"] == "streaming-kafka")["validation"]["NDCG@10"]
    lines.append(
        "- Where the `streaming-kafka` gap comes from (measured with the version before the "
        "CG solve, exact item solves, whose in-process row was test 0.0334, validation "
        "0.0431): the same Beauty run with `STREAMREC_INDEX_ENABLED=false` (exact search for "
        "every answer) gave test NDCG@10 0.0334 and validation 0.0429, the in-process "
        "numbers. So the gap is the index: "
        "(1) staleness: items moved since the snapshot were found only by their old vectors; "
        "answers now also score the most recently moved items exactly (validation through "
        f"Kafka 0.0362 → 0.0409, {kafka_validation:.4f} in the run above; the test fold, "
        f"asked after a rebuild that followed the end of learning, is served by a fresh index "
        f"and moved little: 0.0291 → 0.0293, {f4(metric(b, 'streaming-kafka', 'NDCG@10'))} "
        f"above); (2) the graph's recall on "
        f"learned vectors: "
        "on the trained "
        "Beauty model, a fresh index's top 10 (64 candidates reranked) shares 0.73 of exact "
        "search's top 10 at ef 128 (the default), 0.89 at ef 512, 0.93 at ef 1,024 (HR@10 "
        "0.049, 0.052, 0.053 against 0.0557 exact; 256 candidates at ef 128: 0.82), where "
        "synthetic low-rank items gave 0.98 at ef 128 (`benchmarks/index_serving.py`). "
        "`STREAMREC_INDEX_EF` trades that recall against latency: the Beauty run through "
        "Kafka with `STREAMREC_INDEX_EF=512` gave test 0.0313, validation 0.0427.")
m = runs.get("movielens-heldout")
if m:
    streaming_validation = next(r for r in m["records"]
                                if r["model"] == "streaming")["validation"]["NDCG@10"]
    lines.append(
        f"- MovieLens (held-out users, popularity strong): streaming NDCG@10 "
        f"{f4(metric(m, 'streaming', 'NDCG@10'))} (was {BEFORE['movielens-heldout']:.4f}; "
        f"validation {streaming_validation:.4f} over "
        f"{m['split']['validation_users']} users: these folds are small), "
        f"popularity {f4(metric(m, 'popularity', 'NDCG@10'))}, iALS "
        f"{f4(metric(m, 'ials', 'NDCG@10'))}, EASE {f4(metric(m, 'ease', 'NDCG@10'))}.")
WIDE = [("beauty-loo", "Beauty (loo)"), ("toys-loo", "Toys (loo)"),
        ("movielens-heldout", "MovieLens (held-out)")]
wide = [(name, label) for name, label in WIDE
        if (root / f"{name}-d256" / "results.json").exists() and name in runs]
if wide:
    def ials_validation(name, factors):
        record = next(r for r in runs[name]["records"] if r["model"] == "ials")
        return max(c["NDCG@10"] for c in record["selection"]
                   if c["params"]["factors"] == factors)

    lines += ["", "## Width: the same one pass at d = 256", "",
              "iALS wins its validation grid with 256 factors (128 gave validation NDCG@10 "
              f"{ials_validation('beauty-loo', 128):.4f} on Beauty and "
              f"{ials_validation('toys-loo', 128):.4f} on Toys, against "
              f"{ials_validation('beauty-loo', 256):.4f} and {ials_validation('toys-loo', 256):.4f} "
              "with 256). The same streaming model at that width, everything else at the "
              "defaults, one pass over the same training events (the `streaming` row alone: "
              "`--models streaming`):", "", """```bash
OPENBLAS_NUM_THREADS=1 STREAMREC_MODEL_DIM=256 streamrec eval --dataset toys --protocol loo \\
  --models streaming --k 5,10,20,50 --seed 0 --out out/eval/toys-loo-d256
```

(`--dataset beauty` the same; MovieLens `--protocol heldout`.)

| dataset | streaming d = 64 | streaming d = 256 | ± | validation (d = 64 → 256) | iALS (its factors) | EASE | learned events/s (d = 64 → 256) |
|---|---|---|---|---|---|---|---|"""]
    for name, label in wide:
        narrow, broad = runs[name], run(f"{name}-d256")
        record = {r["model"]: r for r in narrow["records"]}
        wide_record = next(r for r in broad["records"] if r["model"] == "streaming")
        lines.append(
            f"| {label} | {f4(metric(narrow, 'streaming', 'NDCG@10'))} | "
            f"**{f4(wide_record['metrics']['NDCG@10'])}** | "
            f"{wide_record['metrics_se']['NDCG@10']:.4f} | "
            f"{record['streaming']['validation']['NDCG@10']:.4f} → "
            f"{wide_record['validation']['NDCG@10']:.4f} | "
            f"{f4(metric(narrow, 'ials', 'NDCG@10'))} ({record['ials']['params']['factors']}) | "
            f"{f4(metric(narrow, 'ease', 'NDCG@10'))} | "
            f"{record['streaming']['train_events_per_s']:,.0f} → "
            f"{wide_record['train_events_per_s']:,.0f} |")
    lines += ["", f"""At d = 256 one pass reaches iALS's NDCG@10 on Beauty (above it, and above EASE) and on
Toys (level within the standard errors); on MovieLens the two stay level within that fold's
much larger error. d = 128 (exact solves) gave Beauty {DIM_128['beauty-loo'][1]:.4f} and Toys
{DIM_128['toys-loo'][1]:.4f}. The price is the solve's item statistics, (d+1)² floats per
learned item: 17 KB at d = 64, 264 KB at d = 256 (3.2 GB for these 12,000 items; a worker
holds only its item partitions), and time: the learning step alone is about 12× as slow
(`benchmarks/learner_step.py` at d = 64 and with `--dim 256`), one pass in process
several times slower (the table's last column, from separate runs on a shared machine, so only
roughly comparable). The default
stays d = 64 for catalogues of millions of items; `STREAMREC_MODEL_DIM` is the knob where
memory allows."""]
lines += ["", """## Quick mode (CI)

`streamrec eval --dataset beauty --protocol loo --quick` (a seeded sample of 3,000 users, one
candidate per baseline) finishes in about 40 s and is run by the test suite; its numbers are
for checking the machinery, not for comparing models. The learner's μ = 0.5 and DR's Adam
step 0.03 were chosen on quick-mode *validation* folds of Beauty and Toys; the encoder's
half-life and α0 = 0.05 on the full validation folds (above)."""]
out.append("\n".join(lines))
Path("docs/results.md").write_text("\n".join(out) + "\n")
