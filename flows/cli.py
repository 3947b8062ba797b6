"""The ``tokenmill`` command line: run the pipeline, list runs, rerun a stage, ask lineage, generate text."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

import flows  # noqa: F401 - sets Prefect environment defaults before Prefect is imported
from tasks.config import PipelineConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, help="tokenmill: raw text to a trained, evaluated GPT.")
lineage_app = typer.Typer(no_args_is_help=True, help="Ask the lineage DB where documents went.")
app.add_typer(lineage_app, name="lineage")
console = Console()

ConfigOpt = typer.Option(None, "--config", "-c", help="Pipeline YAML (default: configs/quickstart.yaml settings).")
RootOpt = typer.Option(None, "--root", "-r", help="Data root (overrides the config's root).")


def load_config(config: Path | None, root: str | None) -> PipelineConfig:
    try:
        if config is None:
            return PipelineConfig(**({"root": root} if root else {}))
        if not config.is_file():
            raise typer.BadParameter(f"{config} is not a file", param_hint="--config")
        return PipelineConfig.from_yaml(config, root=root)
    except ValidationError as err:
        console.print(f"[red]invalid configuration[/red] {config or ''}:\n{err}")
        raise typer.Exit(2) from None


def _lineage(root: str):
    from storage.artifacts import ArtifactStore
    from storage.lineage import LineageStore

    store = ArtifactStore(root)
    if not store.lineage_path.exists():
        console.print(f"[red]no lineage DB at {store.lineage_path}[/red]: run `tokenmill run` first")
        raise typer.Exit(1)
    return LineageStore(store.lineage_path)


def print_run_summary(root: str, run_id: str) -> None:
    lineage = _lineage(root)
    table = Table(title=f"run {run_id}")
    for col in ("stage", "status", "time (s)", "docs in", "kept", "dropped", "tokens"):
        table.add_column(col, justify="right" if col not in ("stage", "status") else "left")
    for row in lineage.stage_runs(run_id):
        counts = json.loads(row["counts"]) if row["counts"] else {}
        dropped = counts.get("dropped") or {}
        table.add_row(
            row["stage"],
            row["status"],
            f"{row['elapsed_s']:.1f}",
            str(counts.get("docs_in", "")),
            str(counts.get("kept", "")),
            ", ".join(f"{k}={v}" for k, v in dropped.items()),
            f"{counts['tokens']:,}" if "tokens" in counts else str(counts.get("tokens_trained", "")),
        )
    console.print(table)
    evaluation = [r for r in lineage.stage_runs(run_id) if r["stage"] == "evaluate" and r["counts"]]
    if evaluation:
        metrics = json.loads(evaluation[-1]["counts"])
        for split, m in metrics.items():
            if m.get("tokens"):
                console.print(
                    f"{split}: loss {m['loss']:.4f} (bigram {m.get('bigram_loss', float('nan')):.4f}, unigram "
                    f"{m['unigram_loss']:.4f}), perplexity {m['perplexity']:.2f}, bits/byte "
                    f"{m['bits_per_byte']:.4f} (bigram {m.get('bigram_bits_per_byte', float('nan')):.4f}, "
                    f"unigram {m['unigram_bits_per_byte']:.4f})"
                )
        probes = metrics.get("probes") or {}
        if probes:
            console.print("probes: " + ", ".join(f"{k.replace('_', ' ')} {100 * v:.1f}%" for k, v in probes.items()))
    for report in lineage.query("SELECT path FROM reports WHERE run_id = ? AND format = 'html'", [run_id]):
        console.print(f"report: {report['path']}")
    console.print(f"lineage DB: {lineage.path}")


@app.command()
def run(
    config: Path | None = ConfigOpt,
    root: str | None = RootOpt,
    force: list[str] = typer.Option([], "--force", help="Recompute this stage even if cached (repeatable)."),
) -> None:
    """Run the whole pipeline as a Prefect flow and print a summary."""
    cfg = load_config(config, root)
    from flows.pipeline import pipeline

    result = pipeline(config=cfg, force=force)
    print_run_summary(cfg.root, result["run_id"])


@app.command()
def runs(root: str = typer.Option("./data", "--root", "-r"), limit: int = 20) -> None:
    """List recorded runs, newest first."""
    table = Table()
    rows = _lineage(root).runs(limit)
    for col in ("run_id", "pipeline", "status", "started_at", "code_version"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["run_id"], r["pipeline"], r["status"], str(r["started_at"])[:19], (r["code_version"] or "")[:12]
        )
    console.print(table)


@app.command()
def show(run_id: str, root: str = typer.Option("./data", "--root", "-r")) -> None:
    """Per-stage summary of one run."""
    print_run_summary(root, run_id)


@lineage_app.command("doc")
def lineage_doc(
    doc_id: str,
    root: str = typer.Option("./data", "--root", "-r"),
    run_id: str | None = typer.Option(None, "--run"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Where a document went: every stage's decision, its split, shard and token span, the models trained on it."""
    try:
        result = _lineage(root).document(doc_id, run_id)
    except LookupError as err:
        console.print(f"[red]{err}[/red]")
        raise typer.Exit(1) from None
    if as_json:
        sys.stdout.write(json.dumps(result, default=str, indent=2) + "\n")
        return
    console.print(f"document {doc_id} in run {result['run_id']}")
    for row in result["stages"]:
        extra = {k: v for k, v in row.items() if v is not None and k not in ("doc_id", "stage", "fate")}
        console.print(f"  {row['stage']:<9} {row['fate']:<9} {extra}")
    console.print(f"  models trained on its shards: {result['models'] or 'none'}")


@app.command()
def generate(
    prompt: str,
    model: Path = typer.Option(..., "--model", "-m", help="A train artifact folder or an export folder."),
    tokenizer: Path | None = typer.Option(
        None, "--tokenizer", "-t", help="tokenizer.json or its folder (default: found from the model's lineage)."
    ),
    tokens: int = typer.Option(100, help="New tokens to sample at most."),
    temperature: float = typer.Option(0.8, help="0 = greedy."),
    top_k: int | None = typer.Option(40, help="Sample among the k most likely tokens."),
    top_p: float | None = typer.Option(0.95, help="Nucleus: the smallest set of tokens with this probability mass."),
    seed: int = 0,
) -> None:
    """Sample a continuation of PROMPT from a trained or exported model (KV-cached)."""
    import torch
    from tokenizers import Tokenizer

    from tasks.export import find_tokenizer, load_any_model

    try:
        gpt = load_any_model(model)
        path = find_tokenizer(model) if tokenizer is None else tokenizer
        tok = Tokenizer.from_file(str(path / "tokenizer.json" if path.is_dir() else path))
    except (FileNotFoundError, ValueError) as err:
        console.print(f"[red]{err}[/red]")
        raise typer.Exit(1) from None
    eot = tok.token_to_id("<|endoftext|>")
    ids = tok.encode(prompt, add_special_tokens=False).ids[-gpt.cfg.block_size :] or [eot or 0]
    generator = torch.Generator().manual_seed(seed)
    out = gpt.generate(torch.tensor([ids]), tokens, temperature, top_k, generator, stop_token=eot, top_p=top_p)
    sys.stdout.write(prompt + tok.decode(out[0, len(ids) :].tolist()) + "\n")


@app.command()
def evaluate(
    model: Path = typer.Option(..., "--model", "-m", help="A train artifact folder."),
    tokens: Path = typer.Option(..., "--tokens", help="A tokenize artifact folder (its val and test shards)."),
    tokenizer: Path | None = typer.Option(None, "--tokenizer", "-t", help="Tokenizer artifact (default: lineage)."),
    config: Path | None = typer.Option(None, "--config", "-c", help="Pipeline YAML whose evaluate section to use."),
    root: str | None = typer.Option(None, "--root", "-r", help="Data root for the results (default: the model's)."),
    name: str = typer.Option("evaluate", help="Run name in lineage (the previous run of this name is compared)."),
    export: bool = typer.Option(False, "--export", help="Also export the model for transformers."),
    force: bool = typer.Option(False, "--force", help="Re-evaluate even if this evaluation is cached."),
) -> None:
    """Evaluate an existing checkpoint on existing token shards as a Prefect flow (no retraining)."""
    cfg = load_config(config, None)
    from flows.evaluate import evaluate_flow

    try:
        result = evaluate_flow(
            model=str(model),
            tokens=str(tokens),
            tokenizer=str(tokenizer) if tokenizer else None,
            root=root,
            evaluate=cfg.evaluate,
            seed=cfg.seed,
            name=name,
            export=export,
            force=force,
        )
    except (FileNotFoundError, ValueError) as err:
        console.print(f"[red]{err}[/red]")
        raise typer.Exit(1) from None
    print_run_summary(result["root"], result["run_id"])


@app.command("export")
def export_command(
    model: Path = typer.Option(..., "--model", "-m", help="A train artifact folder."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write (transformers layout)."),
    tokenizer: Path | None = typer.Option(None, "--tokenizer", "-t", help="tokenizer.json (default: lineage)."),
    special_tokens: list[str] = typer.Option(["<|endoftext|>", "<|pad|>"], "--special-token"),
) -> None:
    """Write MODEL as safetensors + config + tokenizer that transformers' AutoModelForCausalLM loads."""
    from tasks.export import export_model, find_tokenizer

    try:
        path = find_tokenizer(model) if tokenizer is None else tokenizer
        counts = export_model(model, path / "tokenizer.json" if path.is_dir() else path, special_tokens, out)
    except (FileNotFoundError, ValueError) as err:
        console.print(f"[red]{err}[/red]")
        raise typer.Exit(1) from None
    console.print(f"exported {counts['params']:,} parameters to {out} ({counts['format']})")


if __name__ == "__main__":
    app()
