"""The per-run report: data summary, training curve, metrics against baselines and the previous run, samples.

The evaluate artifact stays deterministic (its content hash depends only on its inputs); this run-level
report adds what depends on the run's history (the previous run of the same pipeline, from the lineage DB)
and is written by the flow process to ``<root>/reports/<run_id>/`` as Markdown (the Prefect artifact) and
as one self-contained HTML file (inline CSS, Markdown rendered by markdown-it-py, the train stage's
``loss_curve.png`` embedded as base64: no network access).
Every number in it is also written to the lineage DB's ``metrics`` table (``metric_rows``).
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

from markdown_it import MarkdownIt

from storage.artifacts import ArtifactStore, Manifest
from storage.lineage import LineageStore
from tasks.reporting.verdicts import recipe_text, verdict_text

DATA_STAGES = ("ingest", "clean", "dedup", "tokenize")
SCORERS = ("model", "bigram", "unigram")
SPLIT_METRICS = ("loss", "perplexity", "bits_per_byte")
PROBE_METRICS = {
    "last_word": ("last_token_accuracy", "last_word_accuracy"),
    "multiple_choice": ("accuracy", "accuracy_norm"),
}
ALL = "all"

MetricKey = tuple[str, str, str, str, str]  # stage, split, source, scorer, metric


# --- the evaluate artifact's own tables ----------------------------------------------------------------


def _fmt(value: float | None, metric: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if "accuracy" in metric or metric == "chance":
        return f"{100 * value:.1f}%"
    return f"{value:.2f}" if metric == "perplexity" else f"{value:.4f}"


def _delta(value: float | None, before: float | None, metric: str) -> str:
    if value is None or before is None:
        return ""
    diff = value - before
    if "accuracy" in metric:
        return f" ({100 * diff:+.1f})"
    return f" ({diff:+.2f})" if metric == "perplexity" else f" ({diff:+.4f})"


def split_table_rows(report: dict, lone_source: bool = True) -> list[dict]:
    """One row per (split, source): tokens, bytes and each scorer's loss / perplexity / bits per byte.

    ``lone_source=False`` leaves out a split's only source (its row would repeat the split's).
    """
    rows = []
    for split in sorted(report["splits"], key=lambda s: (s != "val", s != "test", s)):  # val, test, others
        m = report["splits"][split]
        if not m.get("tokens"):
            continue
        sources = m.get("sources") or {}
        shown = sources.items() if lone_source or len(sources) > 1 else []
        rows += [{"split": split, "source": source, **values} for source, values in [(ALL, m), *shown]]
    return rows


def metrics_markdown(report: dict, previous: dict[MetricKey, float] | None = None, same_tokenizer: bool = True) -> str:
    """Markdown tables of the split metrics (model vs baselines; Δ vs a previous run) and the probes.

    When the previous run had another tokenizer, only bits/byte is compared: per-token loss and perplexity
    of different vocabularies measure different things.
    """
    previous = previous or {}
    per_token = ("loss", "perplexity")
    lines = [
        "## Metrics (whole splits)",
        "",
        "| split | source | tokens | loss | perplexity | bits/byte | bigram bits/byte | unigram bits/byte |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in split_table_rows(report, lone_source=False):
        key = ("evaluate", row["split"], row["source"], "model")
        cells = [
            _fmt(row["model"][m], m)
            + ("" if m in per_token and not same_tokenizer else _delta(row["model"][m], previous.get((*key, m)), m))
            for m in SPLIT_METRICS
        ]
        lines.append(
            f"| {row['split']} | {row['source']} | {row['tokens']:,} | {' | '.join(cells)} "
            f"| {_fmt(row['bigram']['bits_per_byte'], 'b')} | {_fmt(row['unigram']['bits_per_byte'], 'b')} |"
        )
    if previous:
        lines += ["", "Numbers in parentheses: change against the previous run of this pipeline (lower is better)."]
        if not same_tokenizer:
            lines[-1] += (
                " The previous run used another tokenizer, so only bits/byte is compared: loss and perplexity are "
                "per token of different vocabularies."
            )
    lines += ["", f"Baselines: bigram = {report['baselines']['bigram']}; unigram = {report['baselines']['unigram']}."]
    probes = report.get("probes") or {}
    if probes.get("last_word", {}).get("items") or probes.get("multiple_choice", {}).get("items"):
        lines += ["", f"## Probes (built from the {probes.get('split', 'test')} split)", ""]
        lines += ["| probe | metric | model | bigram | unigram | chance |", "|---|---|---:|---:|---:|---:|"]
        for probe, metrics in PROBE_METRICS.items():
            result = probes.get(probe) or {}
            if not result.get("items"):
                continue
            chance = _fmt(result["chance"], "chance") if "chance" in result else "≈ baselines"
            for metric in metrics:
                before = previous.get(("evaluate", probes.get("split", "test"), ALL, "model", f"{probe}.{metric}"))
                model = _fmt(result["model"][metric], metric) + _delta(result["model"][metric], before, metric)
                lines.append(
                    f"| {probe} ({result['items']} items) | {metric} | {model} "
                    f"| {_fmt(result['bigram'][metric], metric)} | {_fmt(result['unigram'][metric], metric)} "
                    f"| {chance} |"
                )
        mc = probes.get("multiple_choice") or {}
        if mc.get("items"):
            lines += [
                "",
                f"multiple_choice: {mc['context_tokens']} context tokens, the true next {mc['continuation_tokens']} "
                f"tokens against {mc['choices'] - 1} continuations from other held-out documents; accuracy_norm "
                "ranks by log-likelihood per byte. last_word: greedy prediction of the final word of a held-out "
                "chunk (no fixed chance level for an open vocabulary: compare with the baselines).",
            ]
    return "\n".join(lines) + "\n"


def samples_markdown(samples: list[dict]) -> str:
    lines = ["## Samples", ""]
    for s in samples:
        lines += [f"**Prompt** `{s['prompt']!r}` (seed {s.get('seed', '?')})", "", "```", s["prompt"] + s["completion"]]
        lines += ["```", ""]
    return "\n".join(lines)


# --- lineage rows ------------------------------------------------------------------------------------------


def metric_rows(report: dict, data: dict, curve: list[dict]) -> list[dict]:
    """Every number of the run report as (stage, split, source, scorer, metric, value, step) rows."""
    rows: list[dict] = []

    def add(stage: str, split: str | None, source: str | None, scorer: str | None, metric: str, value: Any, step=None):
        if isinstance(value, int | float) and not isinstance(value, bool):
            rows.append(
                {
                    "stage": stage,
                    "split": split,
                    "source": source,
                    "scorer": scorer,
                    "metric": metric,
                    "value": float(value),
                    "step": step,
                }
            )

    for row in split_table_rows(report):
        add("evaluate", row["split"], row["source"], None, "tokens", row["tokens"])
        add("evaluate", row["split"], row["source"], None, "bytes", row["bytes"])
        for scorer in SCORERS:
            for metric in SPLIT_METRICS:
                add("evaluate", row["split"], row["source"], scorer, metric, row[scorer][metric])
    probes = report.get("probes") or {}
    for probe, metrics in PROBE_METRICS.items():
        result = probes.get(probe) or {}
        if not result.get("items"):
            continue
        add("evaluate", probes["split"], ALL, None, f"{probe}.items", result["items"])
        if "chance" in result:
            add("evaluate", probes["split"], ALL, None, f"{probe}.chance", result["chance"])
        for scorer in SCORERS:
            for metric in metrics:
                add("evaluate", probes["split"], ALL, scorer, f"{probe}.{metric}", result[scorer][metric])
    for stage, counts in data.get("stages", {}).items():
        add(stage, None, None, None, "docs_in", counts.get("docs_in"))
        add(stage, None, None, None, "kept", counts.get("kept"))
        for reason, n in (counts.get("dropped") or {}).items():
            add(stage, None, None, None, f"dropped.{reason}", n)
        for reason, n in (counts.get("dropped_bytes") or {}).items():
            add(stage, None, None, None, f"dropped_bytes.{reason}", n)
    for name, c in ((data.get("contamination") or {}).get("sets") or {}).items():
        add("tokenize", None, name, None, "contamination.items_matched", c["items_matched"])
        add("tokenize", None, name, None, "contamination.docs_matched", c["docs_matched"])
    for source, tokens in ((data.get("mixture") or {}).get("tokens_per_source") or {}).items():
        add("train", "train", source, None, "tokens", tokens)
    for split, s in data.get("splits", {}).items():
        for metric in ("docs", "tokens", "bytes"):
            add("tokenize", split, ALL, None, metric, s.get(metric))
    for source, per_split in data.get("tokens_per_source", {}).items():
        for split, n in per_split.items():
            add("tokenize", split, source, None, "tokens", n)
    for point in curve:
        add("train", "train", None, "model", "loss", point.get("loss"), point["step"])
        add("train", "val", None, "model", "loss", point.get("val_loss"), point["step"])
    return rows


def previous_values(rows: list[dict]) -> dict[MetricKey, float]:
    return {(r["stage"], r["split"], r["source"], r["scorer"], r["metric"]): r["value"] for r in rows}


# --- the run report ------------------------------------------------------------------------------------------


SAMPLES_PER_REASON = 2
SAMPLE_CHARS = 240


def dropped_samples(manifests: dict[str, Manifest], per_reason: int = SAMPLES_PER_REASON) -> dict[str, list[dict]]:
    """A few documents clean dropped, per reason (the first doc ids in order), with the opening of their raw text."""
    if "clean" not in manifests or "ingest" not in manifests:
        return {}
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    ledger = ds.dataset([str(p) for p in manifests["clean"].files_under("ledger/", ".parquet")], format="parquet")
    dropped = ledger.to_table(columns=["doc_id", "reason", "score"], filter=pc.field("fate") == "dropped")
    picked: dict[str, list[dict]] = {}
    for row in dropped.sort_by("doc_id").to_pylist():
        if len(picked.setdefault(row["reason"], [])) < per_reason:
            picked[row["reason"]].append(row)
    ids = [r["doc_id"] for rows in picked.values() for r in rows]
    if not ids:
        return {}
    raw = ds.dataset([str(p) for p in manifests["ingest"].files_under("docs/", ".parquet")], format="parquet")
    texts = raw.to_table(columns=["doc_id", "locator", "text"], filter=pc.field("doc_id").isin(ids)).to_pylist()
    by_id = {t["doc_id"]: t for t in texts}
    return {
        reason: [r | {"locator": by_id.get(r["doc_id"], {}).get("locator"),
                      "opening": (by_id.get(r["doc_id"], {}).get("text") or "")[:SAMPLE_CHARS]} for r in rows]
        for reason, rows in sorted(picked.items())
    }  # fmt: skip


def data_summary(manifests: dict[str, Manifest]) -> dict:
    """Documents (and bytes) in / kept / dropped per reason per data stage, tokens per split and source, samples
    of dropped documents, warnings, and the decontamination outcome."""
    keys = ("docs_in", "kept", "dropped", "bytes_in", "bytes_kept", "dropped_bytes", "warnings")
    stages = {
        s: {k: manifests[s].counts.get(k) for k in keys if k in manifests[s].counts}
        for s in DATA_STAGES
        if s in manifests
    }
    tokenize = manifests["tokenize"].counts if "tokenize" in manifests else {}
    return {
        "stages": stages,
        "duplicates": sum((stages.get("dedup", {}).get("dropped") or {}).values()),
        "splits": {
            k: {m: v.get(m) for m in ("docs", "tokens", "bytes")} for k, v in tokenize.get("splits", {}).items()
        },
        "tokens_per_source": tokenize.get("tokens_per_source", {}),
        "dropped_samples": dropped_samples(manifests),
        "contamination": tokenize.get("contamination"),
        "mixture": _mixture(manifests["train"].counts) if "train" in manifests else None,
    }


def _mixture(counts: dict) -> dict | None:
    """Realized against target shares of training tokens per source (runs with source weights)."""
    if "tokens_per_source" not in counts:
        return None
    return {k: counts[k] for k in ("tokens_per_source", "share_per_source", "target_share_per_source")}


def loss_spikes(manifests: dict[str, Manifest], n: int = 3) -> list[dict]:
    """The steps with the highest training loss after warm-up and the documents they held (recomputed)."""
    if "train" not in manifests or "tokenize" not in manifests:
        return []
    from tasks.training.provenance import highest_loss_steps

    store, model = ArtifactStore.of_artifact(manifests["train"].path)
    try:
        return highest_loss_steps(store, model, n)
    except LookupError:  # e.g. the tokenize artifact was removed from this root
        return []


def training_curve(train_dir: Path) -> list[dict]:
    path = train_dir / "train_log.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _mb(n: int | None) -> str:
    return f"{(n or 0) / 1e6:,.2f} MB"


def data_markdown(data: dict) -> str:
    lines = ["## Data", "", "| stage | docs in | kept | bytes kept | dropped (reason = documents, bytes) |"]
    lines.append("|---|---:|---:|---:|---|")
    for stage, c in data["stages"].items():
        sizes = c.get("dropped_bytes") or {}
        reasons = sorted((c.get("dropped") or {}).items())
        dropped = ", ".join(f"{k} = {v:,}" + (f" ({_mb(sizes[k])})" if k in sizes else "") for k, v in reasons) or "–"
        kept_bytes = f"{_mb(c['bytes_kept'])} of {_mb(c['bytes_in'])}" if c.get("bytes_in") else "–"
        lines.append(f"| {stage} | {c.get('docs_in') or 0:,} | {c.get('kept') or 0:,} | {kept_bytes} | {dropped} |")
    warnings = [f"- **{stage}**: {w}" for stage, c in data["stages"].items() for w in c.get("warnings") or []]
    if warnings:
        lines += ["", "Warnings:", "", *warnings]
    lines += ["", f"Duplicates removed: {data['duplicates']:,}.", ""]
    samples = data.get("dropped_samples") or {}
    if samples:
        lines += [
            "Dropped by clean, a few per reason:",
            "",
            "| reason | document | score | opening |",
            "|---|---|---:|---|",
        ]
        for reason, rows in samples.items():
            for r in rows:
                opening = html.escape(" ".join((r["opening"] or "").split()))[:160].replace("|", "\\|")
                score = f"{r['score']:.4g}" if r.get("score") is not None else "–"
                lines.append(f"| {reason} | `{r['locator'] or r['doc_id']}` | {score} | {opening} |")
        lines.append("")
    mixture = data.get("mixture")
    if mixture:
        lines += [
            "Source mixture (training tokens):",
            "",
            "| source | tokens | share | target |",
            "|---|---:|---:|---:|",
        ]
        for source, tokens in mixture["tokens_per_source"].items():
            share, target = mixture["share_per_source"][source], mixture["target_share_per_source"][source]
            lines.append(f"| {source} | {tokens:,} | {share:.1%} | {target:.1%} |")
        lines.append("")
    contamination = data.get("contamination")
    if contamination:
        action = contamination["action"]
        lines += [f"Decontamination ({contamination['ngram']}-grams, items overlapping ≥ "
                  f"{contamination['min_overlap']:.0%}, action {action}):", "",
                  "| set | items | items found in training documents | documents | in the model's training data |",
                  "|---|---:|---:|---:|---:|"]  # fmt: skip
        for name, c in contamination["sets"].items():
            trained = c["items_matched"] if action == "flag" else 0
            lines.append(f"| {name} | {c['items']:,} | {c['items_matched']:,} | {c['docs_matched']:,} | {trained:,} |")
        lines.append("")
    lines += ["| split | documents | tokens | bytes |", "|---|---:|---:|---:|"]
    for split, s in data["splits"].items():
        lines.append(f"| {split} | {s.get('docs') or 0:,} | {s.get('tokens') or 0:,} | {s.get('bytes') or 0:,} |")
    if len(data["tokens_per_source"]) > 1:
        lines += ["", "| source | train tokens | val tokens | test tokens |", "|---|---:|---:|---:|"]
        for source, t in data["tokens_per_source"].items():
            lines.append(f"| {source} | {t.get('train', 0):,} | {t.get('val', 0):,} | {t.get('test', 0):,} |")
    return "\n".join(lines) + "\n"


CURVE_FILE = "loss_curve.png"


def curve_markdown(curve: list[dict], spikes: list[dict] | None = None, image: str | None = None) -> str:
    """The training section: the loss-curve picture (``image``: a link or a data URI), the eval points and the
    highest-loss steps."""
    evals = [p for p in curve if p.get("val_loss") is not None]
    lines = ["## Training", ""]
    if image:
        lines += [f"![training loss curve]({image})", ""]
    lines += ["| step | train loss | val loss (fixed subset) |", "|---:|---:|---:|"]
    lines += [f"| {p['step']} | {p['loss']:.4f} | {p['val_loss']:.4f} |" for p in evals]
    if spikes:
        lines += ["", "Highest-loss steps after warm-up and what they held (`tokenmill lineage step MODEL STEP`):", ""]
        lines += ["| step | train loss | documents |", "|---:|---:|---|"]
        for s in spikes:
            shown = ", ".join(f"`{d}`" for d in s["documents"][:5])
            more = f" and {len(s['documents']) - 5} more" if len(s["documents"]) > 5 else ""
            lines.append(f"| {s['step']} | {s['loss']:.4f} | {shown}{more} |")
    return "\n".join(lines) + "\n"


def verdict_markdown(report: dict) -> str:
    """The model against each baseline, per split, in bits per byte."""
    lines = ["## Verdict (bits per byte, lower is better)", ""]
    for split, m in report["splits"].items():
        if m.get("tokens"):
            flat = {"bits_per_byte": m["model"]["bits_per_byte"]}
            flat |= {f"{b}_bits_per_byte": m[b]["bits_per_byte"] for b in ("unigram", "bigram") if b in m}
            lines.append(f"- {verdict_text(split, flat)}")
    return "\n".join(lines) + "\n"


def curve_image(run: dict, embed: bool) -> str | None:
    """The loss curve as a data URI (``embed``: for the Prefect UI and the HTML file) or the file next to report.md."""
    if not run.get("curve_png"):
        return None
    return f"data:image/png;base64,{run['curve_png']}" if embed else CURVE_FILE


def render_run_markdown(run: dict, embed_images: bool = False) -> str:
    """The run report as Markdown; ``embed_images`` inlines the loss curve (the Prefect UI renders data URIs)."""
    prev = f"previous run of `{run['pipeline']}`: `{run['previous_run']}`" if run["previous_run"] else "first run"
    return "\n".join(
        [
            f"# tokenmill run `{run['run_id']}` ({run['pipeline']})",
            "",
            f"Model: {run['report']['model']['params']:,} parameters, trained with {run.get('recipe', '?')}; {prev}.",
            "",
            verdict_markdown(run["report"]),
            data_markdown(run["data"]),
            curve_markdown(run["curve"], run.get("loss_spikes"), curve_image(run, embed_images)),
            metrics_markdown(run["report"], run["previous"], run.get("same_tokenizer", True)),
            samples_markdown(run["report"]["samples"]),
        ]
    )


_MARKDOWN = MarkdownIt("commonmark", {"html": False}).enable("table")


STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
    "td:first-child,th:first-child{text-align:left}pre{background:#f6f6f6;padding:.6em;white-space:pre-wrap}"
)


def render_run_html(run: dict) -> str:
    """One self-contained HTML page: the Markdown report with the training curve embedded."""
    body = _MARKDOWN.render(render_run_markdown(run, embed_images=True))
    title = html.escape(f"tokenmill run {run['run_id']}")
    return f'<!doctype html><html><head><meta charset="utf-8"><title>{title}</title><style>{STYLE}</style></head>' + (
        f"<body>{body}</body></html>\n"
    )


def build_run_report(
    run_id: str,
    pipeline: str,
    manifests: dict[str, Manifest],
    previous_run: str | None,
    previous_rows: list[dict],
    previous_tokenizer: str | None = None,
) -> dict:
    """Everything the run report shows, as plain data (also what goes into the lineage DB).

    ``previous_tokenizer``: the content hash of the previous run's tokenizer (None: unknown, taken as the same).
    """
    report = json.loads((Path(manifests["evaluate"].path) / "report.json").read_text())
    curve = training_curve(Path(manifests["train"].path)) if "train" in manifests else []
    png = Path(manifests["train"].path) / "loss_curve.png" if "train" in manifests else None
    data = data_summary(manifests)
    return {
        "run_id": run_id,
        "pipeline": pipeline,
        "report": report,
        "data": data,
        "curve": curve,
        "curve_png": base64.b64encode(png.read_bytes()).decode() if png is not None and png.is_file() else None,
        "previous_run": previous_run,
        "previous": previous_values(previous_rows),
        "same_tokenizer": previous_tokenizer is None
        or "tokenizer" not in manifests
        or previous_tokenizer == manifests["tokenizer"].content_hash,
        "recipe": recipe_text(report["model"], manifests["train"].params.get("train") if "train" in manifests else {}),
        "loss_spikes": loss_spikes(manifests),
        "rows": metric_rows(report, data, curve),
    }


def write_run_report(folder: Path, run: dict) -> dict[str, Path]:
    """Write ``report.md`` and ``report.html`` into ``folder``; return their paths by format."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": folder / "report.md", "html": folder / "report.html"}
    paths["markdown"].write_text(render_run_markdown(run))
    if run.get("curve_png"):
        (folder / CURVE_FILE).write_bytes(base64.b64decode(run["curve_png"]))
    paths["html"].write_text(render_run_html(run))
    return paths


def publish_run_report(
    store: ArtifactStore, lineage: LineageStore, run_id: str, pipeline: str, manifests: dict[str, Manifest]
) -> tuple[dict, dict[str, Path]]:
    """Build the run report against the previous run in lineage, write its files, record it in lineage.

    Called by the flow process only (it writes the DuckDB file).
    """
    for stage in ("evaluate", "train"):  # the report reads their files; on a remote root, from local copies
        if stage in manifests:
            store.materialize(manifests[stage])
    previous_run = lineage.previous_evaluated_run(pipeline, run_id)
    previous_rows = lineage.metrics(previous_run) if previous_run else []
    previous_artifacts = {a["stage"]: a["content_hash"] for a in lineage.run_artifacts(previous_run or "")}
    run = build_run_report(
        run_id, pipeline, manifests, previous_run, previous_rows, previous_artifacts.get("tokenizer")
    )
    paths = write_run_report(store.report_dir(run_id), run)
    lineage.record_report(run_id, run["rows"], run["report"]["samples"], paths)
    return run, paths
