"""The ``tokenmill`` command line: run the pipeline, list runs, rerun a stage, ask lineage, generate text."""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

import flows  # noqa: F401 - sets Prefect environment defaults before Prefect is imported
from flows.console_progress import stage_progress
from storage.lineage import LineageDBError
from storage.stage_graph import STAGES
from tasks.config import PipelineConfig, validated
from tasks.errors import UserError


class UserErrorsAsOneLine(TyperGroup):
    """A ``UserError`` (bad input or settings) or an unusable lineage file: one line on stderr, exit code 2.

    Anything else is a bug and keeps its traceback."""

    def invoke(self, ctx):  # noqa: ANN001, ANN201 - click's signature
        try:
            return super().invoke(ctx)
        except (UserError, LineageDBError) as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(2) from None


app = typer.Typer(
    cls=UserErrorsAsOneLine,
    add_completion=False,
    no_args_is_help=True,
    help="tokenmill: raw text to a trained, evaluated GPT.",
)
lineage_app = typer.Typer(no_args_is_help=True, help="Ask the lineage DB where documents went.")
app.add_typer(lineage_app, name="lineage")
clean_app = typer.Typer(no_args_is_help=True, help="Inspect the clean stage's filters.")
app.add_typer(clean_app, name="clean")
console = Console()

ConfigOpt = typer.Option(
    None,
    "--config",
    "-c",
    help="Pipeline YAML. Without it, a root that holds runs reuses its latest run's recorded configuration; an "
    "empty root gets the built-in default (configs/quickstart.yaml settings).",
)
RootOpt = typer.Option(None, "--root", "-r", help="Data root (overrides the config's root).")
AlertsOpt = typer.Option(
    None,
    "--alerts",
    envvar="TOKENMILL_ALERTS",
    help="Notification block <type>/<name> (e.g. slack-webhook/ops) or webhook URL told when a run fails or crashes.",
)
FromRunOpt = typer.Option(
    None, "--from-run", help="Reuse the configuration this lineage run recorded (instead of --config)."
)


def load_config(
    config: Path | None, root: str | None, from_run: str | None = None, reuse_recorded: bool = False
) -> PipelineConfig:
    """The run's configuration: ``--config``, else a recorded run's (``--from-run``, or with ``reuse_recorded``
    the latest run in the root), else the built-in default. Problems are one-line ``UserError``s."""
    if config is not None:
        if from_run:
            raise UserError("--config and --from-run both name a configuration; give one of them")
        if not config.is_file():
            raise UserError(f"--config {config}: no such file")
        return PipelineConfig.from_yaml(config, root=root)
    default = validated({"root": root} if root else {}, "the built-in default configuration")
    if from_run or reuse_recorded:
        recorded = recorded_config(default.root, from_run)
        if recorded is not None:
            return recorded
    return default


@contextmanager
def prefect_api():
    """Use a running local Prefect server (``tokenmill server``) when one answers; else Prefect starts its own."""
    from deployments.server import running_server

    with running_server() as api:
        if api:
            console.print(f"using the Prefect server at {api}", highlight=False)
        yield


def _count(value) -> str:
    return f"{value:,}" if isinstance(value, int) else "" if value is None else str(value)


def recorded_config(root: str, run_id: str | None) -> PipelineConfig | None:
    """The configuration ``run_id`` (default: the latest run) recorded in ``root``'s lineage, with ``root`` as
    its root; None when the root holds no run and none was named. Says on stderr which run it reuses."""
    from storage.artifacts import ArtifactStore

    store = ArtifactStore(root)
    if not store.lineage_path.exists():
        if run_id:
            raise UserError(f"--from-run {run_id}: no lineage DB at {store.lineage_path}; check --root")
        return None
    lineage = _lineage(root)
    run_id = run_id or lineage.latest_run_id()
    if run_id is None:
        return None
    try:
        run = lineage.run(run_id)
    except LookupError as err:
        raise UserError(str(err)) from None
    cfg = validated(json.loads(run["config"]) | {"root": store.location}, f"the configuration run {run_id} recorded")
    typer.echo(
        f"no --config: reusing the configuration run {run_id} recorded in {store.lineage_path} "
        f"(pipeline {cfg.name!r}); pass --config to change it",
        err=True,
    )
    return cfg


@contextmanager
def interruptible(root: str, flow_module: str | None = None) -> Iterator[None]:
    """Run a flow so that Ctrl-C or SIGTERM ends the command within seconds: the flow records the run as
    cancelled in lineage, the Prefect server (private to this command unless PREFECT_API_URL is set) outlives
    the interrupt long enough to hear about it, and the exit code is 128 + the signal's number."""
    from deployments.server import temporary_server

    with contextlib.ExitStack() as stack:
        preload = None if flow_module is None else functools.partial(importlib.import_module, flow_module)
        stack.enter_context(temporary_server(while_starting=preload))  # import the flow while the server starts
        signal.signal(signal.SIGTERM, _sigterm_as_interrupt)  # Prefect's flow engine keeps it while a flow runs
        try:
            yield
        except BaseException as err:
            signum = _interrupt_signal(err)
            if signum is None:
                raise
            stack.close()
            typer.echo(
                f"interrupted by {signal.Signals(signum).name}: the run is recorded as cancelled in "
                f"{root}/lineage.duckdb; rerun the same command to resume (finished stages are reused, training "
                "continues from its last checkpoint)",
                err=True,
            )
            # Everything is committed (lineage rows, atomic checkpoints, Prefect's queues drained): skip the
            # interpreter's finalization, which spends seconds tearing down torch and thread pools.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(128 + signum)


def _sigterm_as_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signum)


def _interrupt_signal(err: BaseException) -> int | None:
    """The signal behind an interrupt (SIGINT for Ctrl-C, SIGTERM), or None for any other error."""
    if isinstance(err, KeyboardInterrupt):
        return err.args[0] if err.args and isinstance(err.args[0], int) else signal.SIGINT
    signum = getattr(err, "signal", None)  # prefect.exceptions.TerminationSignal
    return signum if type(err).__name__ == "TerminationSignal" and isinstance(signum, int) else None


def check_stage_names(names: list[str], option: str) -> None:
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        raise UserError(f"{option} {unknown[0]!r} is not a stage; stages are {', '.join(STAGES)}")


def _lineage(root: str, writable: bool = False):
    """The root's lineage DB, opened read-only unless the command writes (a read-only root can be queried)."""
    from storage.artifacts import ArtifactStore
    from storage.lineage import LineageStore

    store = ArtifactStore(root)
    if not store.lineage_path.exists():
        console.print(f"[red]no lineage DB at {store.lineage_path}[/red]: run `tokenmill run` first")
        raise typer.Exit(1)
    return LineageStore(store.lineage_path, read_only=not writable)


def _known_run(lineage, run_id: str) -> None:
    """Exit 1 with lineage's message when the run is not recorded (instead of an empty summary)."""
    try:
        lineage.run(run_id)
    except LookupError as err:
        console.print(f"[red]{err}[/red]")
        raise typer.Exit(1) from None


def _size(counts: dict, reason: str) -> str:
    """`` (1.2 MB)`` when the stage counted the bytes it dropped for ``reason``."""
    size = (counts.get("dropped_bytes") or {}).get(reason)
    return f" ({size / 1e6:.2f} MB)" if size is not None else ""


def print_run_summary(root: str, run_id: str) -> None:
    from tasks.reporting.verdicts import verdict_text

    lineage = _lineage(root)
    _known_run(lineage, run_id)
    table = Table(title=f"run {run_id}")
    for col in ("stage", "status", "time (s)", "docs in", "kept", "dropped", "tokens"):
        table.add_column(col, justify="right" if col not in ("stage", "status") else "left", no_wrap=True)
    reasons = []
    for row in lineage.stage_runs(run_id):
        counts = json.loads(row["counts"]) if row["counts"] else {}
        dropped = counts.get("dropped") or {}
        table.add_row(
            row["stage"],
            row["status"],
            f"{row['elapsed_s']:.1f}",
            _count(counts.get("docs_in")),
            _count(counts.get("kept")),
            _count(sum(dropped.values())) if dropped else "",
            _count(counts.get("tokens", counts.get("tokens_trained"))),
        )
        if dropped:  # reasons below the table, in full: a column of them cannot stay readable at 80 columns
            by_count = sorted(dropped.items(), key=lambda kv: -kv[1])
            reasons.append(f"{row['stage']} dropped: " + ", ".join(f"{k} {v:,}{_size(counts, k)}" for k, v in by_count))
    console.print(table)
    for line in reasons:
        console.print(line, highlight=False)
    for row in lineage.stage_runs(run_id):
        for warning in (json.loads(row["counts"]) if row["counts"] else {}).get("warnings") or []:
            console.print(f"[yellow]warning[/yellow] {row['stage']}: {warning}")
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
                console.print(verdict_text(split, m))
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
    from_run: str | None = FromRunOpt,
    force: list[str] = typer.Option([], "--force", help="Recompute this stage even if cached (repeatable)."),
) -> None:
    """Run the whole pipeline as a Prefect flow and print a summary."""
    check_stage_names(force, "--force")
    cfg = load_config(config, root, from_run, reuse_recorded=True)
    from tasks.preflight import preflight

    preflight(cfg)  # paths and sources, before the Prefect server starts
    with prefect_api(), interruptible(cfg.root, "flows.pipeline"), stage_progress(console):
        from flows.pipeline import pipeline

        result = pipeline(config=cfg, force=force)
    print_run_summary(cfg.root, result["run_id"])


@app.command()
def stage(
    name: str = typer.Argument(..., help="Stage to rerun: ingest, clean, dedup, tokenizer, tokenize, train, evaluate."),
    run_id: str = typer.Option(..., "--run", help="The lineage run whose recorded inputs to use."),
    root: str = typer.Option("./data", "--root", "-r"),
    force: bool = typer.Option(False, "--force", help="Recompute even if the stage's artifact exists."),
) -> None:
    """Rerun one stage of a recorded run from the configuration and upstream artifacts lineage kept for it."""
    check_stage_names([name], "stage")
    from flows.stage import stage as stage_flow

    try:
        _lineage(root).run(run_id)  # unknown runs are refused before a flow run starts
        stage_flow(name=name, run_id=run_id, root=root, force=force)
    except LookupError as err:
        console.print(f"[red]{err}[/red]")
        raise typer.Exit(1) from None
    print_run_summary(root, run_id)


@app.command()
def refresh(
    config: Path | None = ConfigOpt,
    root: str | None = RootOpt,
    train_steps: int | None = typer.Option(None, min=1, help="Training budget for this refresh (optimizer steps)."),
) -> None:
    """Run the nightly refresh now: the pipeline on the current sources, plus the per-source document diff."""
    cfg = load_config(config, root, reuse_recorded=True)
    with prefect_api(), interruptible(cfg.root, "flows.refresh"), stage_progress(console):
        from flows.refresh import nightly_refresh

        result = nightly_refresh(config=cfg, train_steps=train_steps)
    print_run_summary(cfg.root, result["run_id"])
    table = Table(title=f"documents vs run {result['previous_run_id']}")
    for col in ("source", "added", "removed", "changed", "unchanged"):
        table.add_column(col)
    for row in result["diff"]:
        table.add_row(*(str(row[c]) for c in ("source", "added", "removed", "changed", "unchanged")))
    console.print(table)


def _check_timezone(value: str) -> str:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise typer.BadParameter(f"{value!r} is not an IANA time zone (e.g. UTC, Europe/Berlin)") from None
    return value


@app.command()
def serve(
    config: Path | None = ConfigOpt,
    root: str | None = RootOpt,
    cron: str = typer.Option("0 2 * * *", help="Cron schedule of the nightly refresh."),
    timezone: str = typer.Option(
        "UTC", "--timezone", envvar="TOKENMILL_TIMEZONE", callback=_check_timezone, help="IANA time zone of --cron."
    ),
    limit: int = typer.Option(4, min=1, help="Flow runs executed at once."),
    wait_for_api: float = typer.Option(0, help="Seconds to wait for the server to come up (0: expect it running)."),
    alerts: str | None = AlertsOpt,
) -> None:
    """Serve every deployment (pipeline, nightly refresh, one per stage) from this process; needs PREFECT_API_URL."""
    from deployments.serve import default_parameters, serve_all

    cfg = load_config(config, root, reuse_recorded=True)
    params = default_parameters(cfg, config, root)
    serve_all(cfg, parameters=params, cron=cron, timezone=timezone, limit=limit, wait_s=wait_for_api, alerts=alerts)


@app.command()
def deploy(
    work_pool: str = typer.Option(..., "--pool", help="Work pool (process, docker or kubernetes) to deploy to."),
    config: Path | None = ConfigOpt,
    root: str | None = RootOpt,
    image: str | None = typer.Option(None, help="Image with tokenmill installed (Docker/Kubernetes pools)."),
    cron: str = typer.Option("0 2 * * *", help="Cron schedule of the nightly refresh."),
    timezone: str = typer.Option(
        "UTC", "--timezone", envvar="TOKENMILL_TIMEZONE", callback=_check_timezone, help="IANA time zone of --cron."
    ),
    alerts: str | None = AlertsOpt,
) -> None:
    """Register the same deployments with a work pool; its workers run them (`prefect worker start --pool P`)."""
    from deployments.serve import default_parameters, deploy_all

    cfg = load_config(config, root, reuse_recorded=True)
    params = default_parameters(cfg, config, root)
    ids = deploy_all(cfg, work_pool, parameters=params, image=image, cron=cron, timezone=timezone, alerts=alerts)
    console.print(f"{len(ids)} deployments registered with work pool {work_pool!r}")


@app.command("sweep")
def sweep_command(
    spec: Path = typer.Option(..., "--spec", "-s", help="Sweep spec YAML (base, space, sampler, trials, objective)."),
    trials: int | None = typer.Option(None, min=1, help="Override the spec's number of trials."),
    objective: str | None = typer.Option(None, help="Override the spec's objective: val_bpb or val_loss."),
    test: bool = typer.Option(True, "--test/--no-test", help="Evaluate the winner on test (once) at the end."),
    allow_second_test: bool = typer.Option(
        False, "--allow-second-test", help="Read test although this sweep (or its name) already did (see docs)."
    ),
) -> None:
    """Tune model and data parameters on the fixed validation set; evaluate only the winner on test."""
    from flows.sweep import sweep
    from tasks.errors import UserError
    from tasks.sweep.spec import load_spec

    try:
        load_spec(spec, trials=trials, objective=objective)  # a bad spec fails here, before a flow run starts
        result = sweep(
            spec_path=str(spec), trials=trials, objective=objective, test=test, allow_second_test=allow_second_test
        )
    except UserError as err:
        console.print(f"[red]{err}[/red]")
        raise typer.Exit(2) from None
    _print_sweep(_queries(result["root"]).sweep(result["sweep_id"]))
    console.print(f"report: {result['report']}")


def _print_sweep(r: dict) -> None:
    table = Table(title=f"sweep {r['sweep_id']} ({r['sampler']}, {r['status']})")
    rows = r["leaderboard"]
    for col in rows[0] if rows else ():
        table.add_column(col)
    for row in rows:
        table.add_row(*(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row.values()))
    console.print(table)
    for read in r["test_reads"]:
        console.print(
            f"test read: trial {read['trial']} ({read['run_id']}) at {read['read_at']}: loss {read['test_loss']:.4f}, "
            f"bits/byte {read['test_bpb']:.4f}{' (override)' if read['override'] else ''}"
        )
    if not r["test_reads"]:
        console.print("test split not read")


@app.command()
def server(
    host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
    port: int = typer.Option(4200, help="Port for the API and the UI."),
) -> None:
    """Start a local Prefect server with its UI at http://HOST:PORT (set PREFECT_API_URL=http://HOST:PORT/api
    for `tokenmill serve` and `tokenmill run`)."""
    import subprocess

    from deployments.server import server_command, server_env

    console.print(f"Prefect UI: http://{host}:{port}   API: http://{host}:{port}/api")
    raise typer.Exit(subprocess.call(server_command(host, port), env=server_env(host, port)))


LimitOpt = typer.Option(20, "--limit", min=1, help="How many runs to list (at least 1).")


@app.command()
def runs(root: str = typer.Option("./data", "--root", "-r"), limit: int = LimitOpt) -> None:
    """List recorded runs, newest first."""
    _print_runs(_lineage(root).runs(limit))


def _print_runs(rows: list[dict]) -> None:
    table = Table()
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


def _queries(root: str, writable: bool = False):
    from storage.lineage_queries import LineageQueries

    return LineageQueries(_lineage(root, writable))


def rebuild_command(root: str, run_id: str) -> str:
    """The command that reruns the pipeline with the configuration ``run_id`` recorded (lineage keeps it)."""
    return f"tokenmill run --root {root} --from-run {run_id}"


def _answer(fn, as_json: bool, render) -> None:
    """Run a lineage question; print JSON or a human rendering; turn lookup errors into a clean exit."""
    try:
        result = fn()
    except LookupError as err:
        console.print(f"[red]{err}[/red]")
        raise typer.Exit(1) from None
    if as_json:
        sys.stdout.write(json.dumps(result, default=str, indent=2) + "\n")
    else:
        render(result)


LRoot = typer.Option("./data", "--root", "-r", help="Data root holding lineage.duckdb.")
LRun = typer.Option(None, "--run", help="Run id (default: the latest run).")
LJson = typer.Option(False, "--json", help="Machine-readable output.")


def _print_models(models: list[dict]) -> None:
    if not models:
        console.print("  models: none")
    for m in models:
        console.print(f"  {m['relation']}: {m['stage']} {m['fingerprint']} ({m['uri']}) via shards {m['shards']}")


def _fields(row: dict) -> str:
    """A ledger row's other fields as ``key=value``; filter scores compact, hashes shortened."""
    shown = []
    for key, value in row.items():
        if key in ("doc_id", "stage", "fate", "source", "locator", "scores"):
            continue
        shown.append(f"{key}={value[:12] + '…' if key == 'content_hash' else value}")
    scores = " ".join(f"{k}={v:.6g}" for k, v in (row.get("scores") or []))
    return " ".join(shown) + (f" scores: {scores}" if scores else "")


def resolve_doc(root: str, ref: str, run_id: str | None) -> str:
    """The doc id a user's reference names: a doc id, a file path or locator, or a source's own ``id_field`` value."""
    from tasks.data.ingest import doc_id_of
    from tasks.data.readers import Record

    queries = _queries(root)
    run = _lineage(root).run(run_id or _lineage(root).latest_run_id())
    sources = [s["name"] for s in json.loads(run["config"]).get("sources", [])]
    candidates = [doc_id_of(name, Record(locator="", text=None, key=ref)) for name in sources]
    found = queries.find_docs(ref, run["run_id"], candidates)
    if not found:
        raise LookupError(f"no document {ref!r} in run {run['run_id']}: give a doc id, file path or id-field value")
    if len(found) > 1:
        names = ", ".join(f"{d['doc_id']} ({d['locator']})" for d in found[:5])
        raise LookupError(f"{ref!r} names {len(found)} documents: {names}{' …' if len(found) > 5 else ''}; give one")
    return found[0]["doc_id"]


@lineage_app.command("doc")
def lineage_doc(
    doc_id: str = typer.Argument(..., help="A doc id, a file path or locator, or the source's own id_field value."),
    root: str = LRoot,
    run_id: str | None = LRun,
    as_json: bool = LJson,
) -> None:
    """Where a document went: every stage's decision, its split, shard and token span, the models using it."""

    def render(r: dict) -> None:
        console.print(f"document {r['doc_id']} ({r['source']}: {r['locator']}) in run {r['run_id']}")
        for row in r["stages"]:
            console.print(f"  {row['stage']:<9} {row['fate']:<9} {_fields(row)}", soft_wrap=True)
        if r["shard"]:
            console.print(
                f"  placed in {r['split']} shard {r['shard']} tokens [{r['token_span'][0]}, {r['token_span'][1]})"
            )
        _print_models(r["models"])

    _answer(lambda: _queries(root).doc(resolve_doc(root, doc_id, run_id), run_id), as_json, render)


@lineage_app.command("why")
def lineage_why(doc_id: str, root: str = LRoot, run_id: str | None = LRun, as_json: bool = LJson) -> None:
    """Why a document was dropped (filter and score) or which kept document it duplicates."""

    def render(r: dict) -> None:
        if r["verdict"] == "kept":
            console.print(f"{doc_id} was kept (split {r['split']})")
        elif r.get("duplicate_of"):
            console.print(
                f"{doc_id}: {r['verdict']} at {r['stage']} ({r['reason']}) of {r['duplicate_of']} "
                f"({r['duplicate_of_locator']}), similarity {r['similarity']}"
            )
            if r["cluster_id"] != r["duplicate_of"]:
                console.print(
                    f"  linked through a chain: its cluster is represented by the kept {r['cluster_id']} "
                    f"({r['cluster_locator']})"
                )
        else:
            console.print(f"{doc_id}: {r['verdict']} at {r['stage']}: {r['reason']} (score {r['score']}{_bound(r)})")
        for flag in r.get("flags") or []:
            console.print(f"  flagged at {flag['stage']}: {flag['reason']} (score {flag['score']})")

    _answer(lambda: _queries(root).why(doc_id, run_id), as_json, render)


def _bound(r: dict) -> str:
    """``, threshold: stat >= low`` for a drop whose rule is known."""
    t = r.get("threshold")
    if not t:
        return ""
    bounds = [f"{t['stat']} ≥ {t['low']}" if t.get("low") is not None else "",
              f"{t['stat']} ≤ {t['high']}" if t.get("high") is not None else ""]  # fmt: skip
    preset = f" in preset {t['preset']}" if t.get("preset") else ""
    return f"; rule{preset}: keep if " + " and ".join(b for b in bounds if b) if any(bounds) else ""


@lineage_app.command("step")
def lineage_step(
    model: str = typer.Argument(..., help="Train fingerprint (or a unique prefix)."),
    step: int = typer.Argument(..., help="Optimizer step, 1-based as in train_log.jsonl."),
    root: str = LRoot,
    as_json: bool = LJson,
) -> None:
    """The documents and token spans optimizer step N of a model trained on (recomputed from the loader)."""
    from storage.artifacts import ArtifactStore
    from tasks.training.provenance import step_provenance

    def render(r: dict) -> None:
        loss = f", loss {r['loss']:.4f}" if r.get("loss") is not None else ""
        console.print(f"model {r['model'][:12]} step {r['step']}{loss}: {len(r['windows'])} windows, "
                      f"{len(r['documents'])} documents")  # fmt: skip
        for w in r["windows"]:
            docs = ", ".join(f"{d['doc_id']} [{d['tokens'][0]}, {d['tokens'][1]})" for d in w["docs"])
            console.print(f"  micro {w['micro_batch']} rank {w['rank']} {w['shard']} tokens "
                          f"[{w['tokens'][0]}, {w['tokens'][1]}): {docs}", soft_wrap=True)  # fmt: skip

    _answer(lambda: step_provenance(ArtifactStore(root), model, step), as_json, render)


@lineage_app.command("contamination")
def lineage_contamination(
    set_name: str | None = typer.Option(None, "--set", help="Only this evaluation set (val, test or a named set)."),
    model: str | None = typer.Option(None, "--model", help="Only this model (train fingerprint or its prefix)."),
    root: str = LRoot,
    as_json: bool = LJson,
) -> None:
    """Per model: the evaluation items overlapping documents it trained on (and their duplicates)."""

    def render(r: dict) -> None:
        if not r["models"]:
            console.print("no trained models recorded")
        for m in r["models"]:
            console.print(f"model {m['model']} (run {m['run_id']})")
            if not m["checked"]:
                console.print("  not checked: its tokenize stage ran without decontamination")
            for name, s in m["sets"].items():
                console.print(
                    f"  {name}: {len(s['trained_on'])} of {s['items']} items in its training data, "
                    f"{len(s['removed'])} removed before training"
                )
                for item in s["trained_on"]:
                    for d in item["docs"]:
                        copies = f", copies {', '.join(d['copies'])}" if d["copies"] else ""
                        console.print(
                            f"    {item['item_id']}: {d['doc_id']} overlap {d['overlap']:.2f} ({d['shard']}{copies})"
                        )

    _answer(lambda: _queries(root).contamination(set_name, model), as_json, render)


@lineage_app.command("source")
def lineage_source(source: str, root: str = LRoot, run_id: str | None = LRun, as_json: bool = LJson) -> None:
    """Counts per fate for a source (name or path), and the shards and models holding anything from it."""

    def render(r: dict) -> None:
        console.print(f"source {r['source']} in run {r['run_id']}")
        for f in r["fates"]:
            console.print(f"  {f['stage']:<9} {f['fate']:<9} {f['reason'] or '':<20} {f['docs']:>9,}")
        for sh in r["shards"]:
            console.print(f"  shard {sh['shard']:<14} {sh['docs']:>7,} docs {sh['tokens']:>12,} tokens")
        _print_models(r["models"])
        for m in r["models"]:
            realized = m.get("tokens_per_source") or {}
            if r["source"] in realized:
                total = sum(realized.values()) or 1
                console.print(
                    f"  model {m['fingerprint'][:12]} trained on {realized[r['source']]:,} tokens of it "
                    f"({realized[r['source']] / total:.1%} of its training tokens, source weights)"
                )

    _answer(lambda: _queries(root).source(source, run_id), as_json, render)


@lineage_app.command("diff")
def lineage_diff(run_a: str, run_b: str, root: str = LRoot, as_json: bool = LJson) -> None:
    """Documents added / removed / changed per source between two runs (or refreshes)."""

    def render(r: dict) -> None:
        table = Table(title=f"{r['run_a']} → {r['run_b']}", caption=r.get("method"))
        for col in ("source", "added", "removed", "changed", "unchanged"):
            table.add_column(col)
        for row in r["sources"]:
            table.add_row(*(str(row[c]) for c in ("source", "added", "removed", "changed", "unchanged")))
        console.print(table)
        if r.get("training"):
            trained = Table(title="documents in the train split (what reached training)")
            for col in ("source", "added", "removed", "unchanged"):
                trained.add_column(col)
            for row in r["training"]:
                trained.add_row(*(str(row[c]) for c in ("source", "added", "removed", "unchanged")))
            console.print(trained)

    _answer(lambda: _queries(root).diff(run_a, run_b), as_json, render)


@lineage_app.command("takedown")
def lineage_takedown(
    target: str = typer.Argument(..., help="A doc id, a source name/path, or (with --content-hash) a hash."),
    content_hash: bool = typer.Option(False, "--content-hash", help="TARGET is a content hash."),
    apply: bool = typer.Option(False, "--apply", help="Record tombstones that later runs' clean stage enforces."),
    reason: str = typer.Option("takedown request", "--reason"),
    root: str = LRoot,
    run_id: str | None = LRun,
    as_json: bool = LJson,
) -> None:
    """Every copy of a document, the shards and models holding it, and a rebuild plan."""

    def compute() -> dict:
        queries = _queries(root, writable=apply)
        result = queries.takedown(target, run_id, by="content_hash" if content_hash else "auto")
        if apply:
            result["tombstones_recorded"] = queries.apply_takedown(result, reason)
        return result

    def render(r: dict) -> None:
        console.print(f"takedown {r['target']} (run {r['run_id']}): {len(r['copies'])} copies")
        for c in r["copies"]:
            console.print(f"  copy {c} ({r['locators'].get(c) or 'not in this run'})")
        for p in r["placements"]:
            console.print(f"  in {p['split']} shard {p['shard']} tokens [{p['token_start']}, {p['token_end']})")
        _print_models(r["models"])
        for i, step in enumerate(r["plan"], 1):
            console.print(f"  plan {i}. {step['step']}")
        if "tombstones_recorded" in r:
            console.print(
                f"  recorded {r['tombstones_recorded']} tombstones; rebuild with the run's own configuration: "
                f"{rebuild_command(root, r['run_id'])}"
            )

    _answer(compute, as_json, render)


@lineage_app.command("graph")
def lineage_graph(
    run_id: str | None = typer.Argument(None), root: str = LRoot, fmt: str = typer.Option("mermaid", "--format")
) -> None:
    """The artifact DAG of a run as Mermaid (default) or DOT."""
    _answer(lambda: _queries(root).graph(run_id, fmt), False, lambda text: sys.stdout.write(text + "\n"))


@lineage_app.command("runs")
def lineage_runs(root: str = LRoot, limit: int = LimitOpt, as_json: bool = LJson) -> None:
    """Runs, newest first."""
    _answer(lambda: _lineage(root).runs(limit), as_json, _print_runs)


@lineage_app.command("show")
def lineage_show(run_id: str, root: str = LRoot, as_json: bool = LJson) -> None:
    """A run's config, code version, input hashes and per-stage outcomes: enough to reproduce it."""

    def render(r: dict) -> None:
        console.print(f"run {r['run_id']} ({r['pipeline']}): {r['status']}, code {r['code_version']}")
        console.print(f"  started {r['started_at']} ended {r['ended_at']} seed {r['seed']}")
        console.print(f"  input snapshot {r['input_snapshot']}")
        for a in r["artifacts"]:
            console.print(f"  {a['stage']:<9} {a['fingerprint']} {a['content_hash'][:16]}… {a['uri']}")
        print_run_summary(root, r["run_id"])

    _answer(lambda: _queries(root).show(run_id), as_json, render)


@lineage_app.command("openlineage")
def lineage_openlineage(
    run_id: str = typer.Argument(..., help="Run to export."),
    to: str = typer.Option(..., "--to", help="A JSON-lines file, or an OpenLineage HTTP endpoint (e.g. Marquez)."),
    root: str = LRoot,
) -> None:
    """Export a run as OpenLineage RunEvents (needs the `openlineage` extra)."""
    from storage.openlineage_export import export_run

    try:
        n = export_run(_lineage(root), run_id, to)
    except (LookupError, RuntimeError) as err:
        console.print(f"[red]{err}[/red]")
        raise typer.Exit(1) from None
    console.print(f"sent {n} OpenLineage events to {to}")


@lineage_app.command("migrate")
def lineage_migrate(root: str = LRoot) -> None:
    """Bring the lineage DB's schema up to this tokenmill's version (questions open it read-only and never do)."""
    from storage.lineage import SCHEMA_VERSION

    store = _lineage(root, writable=True)
    console.print(f"lineage DB {store.path} is at schema version {SCHEMA_VERSION}")


@lineage_app.command("sweep")
def lineage_sweep(sweep_id: str, root: str = LRoot, as_json: bool = LJson) -> None:
    """A sweep's leaderboard (by sweep id or name), its winner and the reads of its test split."""
    _answer(lambda: _queries(root).sweep(sweep_id), as_json, _print_sweep)


@lineage_app.command("sweeps")
def lineage_sweeps(root: str = LRoot, limit: int = 20, as_json: bool = LJson) -> None:
    """Sweeps, newest first."""

    def render(rows: list[dict]) -> None:
        table = Table()
        for col in ("sweep_id", "name", "objective", "sampler", "trials_planned", "status", "winner", "started_at"):
            table.add_column(col)
        for r in rows:
            table.add_row(*(str(v)[:19] if k == "started_at" else str(v) for k, v in r.items()))
        console.print(table)

    _answer(lambda: _lineage(root).sweeps(limit), as_json, render)


@lineage_app.command("check")
def lineage_check(run_id: str | None = typer.Argument(None), root: str = LRoot, as_json: bool = LJson) -> None:
    """Verify conservation per stage, manifest hashes against files, and ledger references."""
    result = None

    def render(r: dict) -> None:
        for line in r["checked"]:
            console.print(f"[green]ok[/green]   {line}")
        for line in r["problems"]:
            console.print(f"[red]FAIL[/red] {line}")

    def compute() -> dict:
        nonlocal result
        result = _queries(root).check(run_id)
        return result

    _answer(compute, as_json, render)
    if result is not None and not result["ok"]:
        raise typer.Exit(1)


def tokenizer_file(model: Path, given: Path | None) -> Path:
    """``--tokenizer`` (a tokenizer.json or its folder), or the model's own through its lineage."""
    from tasks.modeling.export import find_tokenizer

    path = find_tokenizer(model) if given is None else given
    path = path / "tokenizer.json" if path.is_dir() else path
    if not path.is_file():
        raise UserError(f"--tokenizer {given}: no tokenizer.json there")
    return path


@clean_app.command("audit")
def clean_audit(
    config: Path | None = ConfigOpt,
    root: str | None = RootOpt,
    limit: int | None = typer.Option(None, "--limit", help="Audit only the first N ingested documents."),
    as_json: bool = LJson,
) -> None:
    """What each clean rule would drop — documents, bytes, score distribution against its threshold, examples —
    before anything is committed (ingest is run or reused; clean runs in memory)."""
    cfg = load_config(config, root)
    from tasks.data.audit import audit
    from tasks.errors import UserError
    from tasks.stages import run_stage

    try:
        ingested, _ = run_stage("ingest", cfg, {}, log=lambda m: None)
        result = audit(ingested.files_under("docs/", ".parquet"), cfg.clean, limit)
    except UserError as err:
        console.print(f"[red]{err}[/red]")
        raise typer.Exit(2) from None
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
        return
    share = result["bytes_kept"] / result["bytes"] if result["bytes"] else 1.0
    console.print(
        f"{result['docs']:,} documents, {result['bytes'] / 1e6:.2f} MB: {result['kept']:,} kept, "
        f"{result['bytes_kept'] / 1e6:.2f} MB ({share:.0%} of the bytes)"
    )
    for preset, p in result["presets"].items():
        table = Table(title=f"preset {preset}: {p['docs']:,} documents, {p['bytes'] / 1e6:.2f} MB")
        for col in ("rule", "statistic", "keep if", "breaks", "drops", "MB dropped", "p5 / p50 / p95"):
            table.add_column(col, justify="left" if col in ("rule", "statistic", "keep if") else "right")
        for r in p["rules"]:
            q = r["quantiles"]
            bound = " and ".join(
                b
                for b in (
                    f"≥ {r['low']}" if r["low"] is not None else "",
                    f"≤ {r['high']}" if r["high"] is not None else "",
                )
                if b
            ) or ("≥ language.min_score" if r["reason"] == "language:*" else "")
            spread = f"{q['0.05']:.3g} / {q['0.5']:.3g} / {q['0.95']:.3g}" if q else ""
            table.add_row(
                r["reason"],
                r["stat"],
                bound,
                str(r["breaks"]),
                str(r["drops"]),
                f"{r['bytes_dropped'] / 1e6:.2f}",
                spread,
            )
        console.print(table)
        for r in p["rules"]:
            for ex in r["examples"]:
                console.print(
                    f"  {r['reason']}: {ex['locator']} (score {ex['score']}): {ex['opening'][:100]}", soft_wrap=True
                )


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

    from tasks.modeling.export import load_any_model

    gpt = load_any_model(model)
    tok = Tokenizer.from_file(str(tokenizer_file(model, tokenizer)))
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
    print_run_summary(result["root"], result["run_id"])


@app.command("export")
def export_command(
    model: Path | None = typer.Option(None, "--model", "-m", help="A train artifact folder."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write (transformers layout)."),
    tokenizer: Path | None = typer.Option(None, "--tokenizer", "-t", help="tokenizer.json (default: lineage)."),
    special_tokens: list[str] = typer.Option(["<|endoftext|>", "<|pad|>"], "--special-token"),
    sweep: str | None = typer.Option(None, "--sweep", help="Export a sweep's winner (sweep id or name) instead."),
    root: str = typer.Option("./data", "--root", "-r", help="Data root of --sweep."),
) -> None:
    """Write MODEL (or a sweep's winner) as safetensors + config + tokenizer for transformers' AutoModelForCausalLM."""
    from tasks.modeling.export import export_model

    if (model is None) == (sweep is None):
        raise typer.BadParameter("give --model or --sweep (one of them)")
    if sweep is not None:
        model = _sweep_winner_model(root, sweep)
    counts = export_model(model, tokenizer_file(model, tokenizer), special_tokens, out)
    console.print(f"exported {counts['params']:,} parameters to {out} ({counts['format']})")


def _sweep_winner_model(root: str, sweep_id: str) -> Path:
    """The train artifact of a sweep's selected trial, found through lineage."""
    from storage.artifacts import local_folder

    try:
        winner = _queries(root).sweep(sweep_id)["winner"]
    except LookupError as err:
        console.print(f"[red]{err}[/red]")
        raise typer.Exit(1) from None
    if winner is None:
        console.print(f"[red]sweep {sweep_id} has no winner yet[/red]: run `tokenmill sweep` to the end first")
        raise typer.Exit(1)
    artifact = _lineage(root).query(
        "SELECT uri FROM artifacts WHERE stage = 'train' AND fingerprint = ?", [winner["fingerprints"]["train"]]
    )
    return local_folder(artifact[0]["uri"])


if __name__ == "__main__":
    app()
