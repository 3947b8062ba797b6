"""The sweep report: leaderboard, every trial's validation curve on one plot, objective against each parameter.

Written by the flow process to ``<root>/reports/sweeps/<sweep id>/`` as Markdown (also the Prefect artifact)
and one self-contained HTML file whose figures are inline SVG drawn with matplotlib (no network access).
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from markdown_it import MarkdownIt

from storage.artifacts import ArtifactStore
from storage.leaderboard import leaderboard_rows
from tasks.reporting.report import STYLE
from tasks.sweep.spec import SweepSpec


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-3 else f"{value:.4f}"
    return str(value)


def leaderboard_markdown(trials: list[dict], objective: str) -> str:
    rows = leaderboard_rows(trials, objective)
    if not rows:
        return "(no trials)\n"
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def test_markdown(test: dict | None) -> str:
    if test is None:
        return "Test split not read (test: false).\n"
    again = " (recorded earlier; not read again)" if test.get("reused") else ""
    return (
        f"Winner trial {test['trial']} (`{test['run_id']}`) on the base config's test documents: "
        f"loss {test['test_loss']:.4f}, bits/byte {test['test_bpb']:.4f}{again}. The test split was read once, "
        f"at {test.get('read_at') or 'this run'}; `tokenmill lineage sweep {test['sweep_id']}` lists every read.\n"
    )


def _rendered(fig, fmt: str) -> str:
    """The figure as inline SVG markup, or (``png``) a base64 data URI the Prefect UI's Markdown shows; closed."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, bbox_inches="tight", dpi=96)
    plt.close(fig)
    if fmt == "png":
        return f"data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}"
    text = buf.getvalue().decode()
    return text[text.index("<svg") :]


def curves_figure(trials: list[dict], objective: str, fmt: str = "svg") -> str:
    """Every trial's periodic validation numbers (objective units) against step, one line per trial."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    for t in trials:
        curve = t.get("curve") or []
        if curve:
            style = "--" if t["status"] == "pruned" else "-"
            width = 2.5 if t.get("selected") else 1.2
            steps, values = [p["step"] for p in curve], [p["value"] for p in curve]
            ax.plot(steps, values, style, lw=width, label=f"trial {t['trial']}")
    ax.set_xlabel("step")
    ax.set_ylabel(f"periodic {objective} (own val split)")
    if ax.lines:
        ax.legend(fontsize=7, ncol=2)
    return _rendered(fig, fmt)


def objective_vs_params_figure(trials: list[dict], space: list[str], objective: str, fmt: str = "svg") -> str:
    """One panel per swept parameter: each completed trial's objective against its value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [t for t in trials if t["status"] == "completed"]
    fig, axes = plt.subplots(1, len(space), figsize=(3.2 * len(space), 3), squeeze=False)
    for ax, path in zip(axes[0], space, strict=True):
        values = [t["params"][path] for t in done]
        if values and all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            xs = values
        else:
            labels = sorted({str(v) for v in values})
            xs = [labels.index(str(v)) for v in values]
            ax.set_xticks(range(len(labels)), labels)
        ax.scatter(xs, [t["objective"] for t in done], c=["C3" if t.get("selected") else "C0" for t in done])
        ax.set_xlabel(path)
        ax.set_ylabel(objective)
    fig.tight_layout()
    return _rendered(fig, fmt)


def render_markdown(
    sweep_id: str, spec: SweepSpec, trials: list[dict], test: dict | None, embed_images: bool = False
) -> str:
    """The sweep report as Markdown; ``embed_images`` adds both plots as PNG data URIs (for the Prefect UI)."""
    curves = params = ""
    if embed_images:
        curves = f"![validation curves]({curves_figure(trials, spec.objective, 'png')})\n"
        plot = objective_vs_params_figure(trials, list(spec.space), spec.objective, "png")
        params = f"![objective against each parameter]({plot})\n"
    space = "\n".join(f"- `{path}`: {values}" for path, values in spec.space.items())
    return "\n".join(
        [
            f"# tokenmill sweep `{sweep_id}`",
            "",
            f"Sampler {spec.sampler}, {spec.n_trials} trials, objective {spec.objective} on the fixed evaluation set "
            "(the base config's val documents, encoded by each trial's tokenizer).",
            "",
            space,
            "",
            "## Leaderboard",
            "",
            leaderboard_markdown(trials, spec.objective),
            "## Test (winner only)",
            "",
            test_markdown(test),
            "## Validation curves",
            "",
            curves,
            "## Objective against each parameter",
            "",
            params,
        ]
    )


def render_html(sweep_id: str, spec: SweepSpec, trials: list[dict], test: dict | None) -> str:
    markdown = MarkdownIt("commonmark", {"html": False}).enable("table")
    body = markdown.render(render_markdown(sweep_id, spec, trials, test))
    body = body.replace(
        "<h2>Validation curves</h2>", f"<h2>Validation curves</h2>\n{curves_figure(trials, spec.objective)}", 1
    )
    params = objective_vs_params_figure(trials, list(spec.space), spec.objective)
    heading = "<h2>Objective against each parameter</h2>"
    body = body.replace(heading, f"{heading}\n{params}", 1)
    title = html.escape(f"tokenmill sweep {sweep_id}")
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{title}</title><style>{STYLE}</style></head>'
        f"<body>{body}</body></html>\n"
    )


def publish_sweep_report(
    store: ArtifactStore, sweep_id: str, spec: SweepSpec, trials: list[dict], test: dict | None
) -> dict[str, Path]:
    """Write ``report.md`` and ``report.html`` for a sweep; return their paths (the UI's copy: ``ui_markdown``)."""
    folder = store.root / "reports" / "sweeps" / sweep_id
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": folder / "report.md", "html": folder / "report.html"}
    paths["markdown"].write_text(render_markdown(sweep_id, spec, trials, test))
    paths["html"].write_text(render_html(sweep_id, spec, trials, test))
    return paths


def ui_markdown(sweep_id: str, spec: SweepSpec, trials: list[dict], test: dict | None, html_path: Path) -> str:
    """The report for the Prefect UI's artifact: plots embedded, and where the HTML file is."""
    body = render_markdown(sweep_id, spec, trials, test, embed_images=True)
    return f"{body}\nThe same report as a file: `{html_path}`\n"
