"""A technical documentation corpus assembled from what is installed (no download), for calibrating filters.

Three kinds of pages, written as files into ``--out``:

- ``stdlib/<module>.rst``: an API reference page per standard-library module, built from its docstrings (the
  module's, then ``.. function::`` / ``.. class::`` / ``.. method::`` entries with signatures and docstrings) —
  the phrasing of reference documentation ("will be called with the", "Return a new ...").
- ``packages/<dist>.md|.rst``: the long description (README) of every installed distribution, from its
  ``METADATA`` (Markdown or reStructuredText as its ``Description-Content-Type`` says).
- ``files/…``: the ``.md`` / ``.rst`` files shipped inside installed packages (licence files skipped).

    python benchmarks/docs_corpus.py --out /tmp/docs-corpus
    tokenmill clean audit --config <a config with that folder as its source>
"""

from __future__ import annotations

import argparse
import ast
import email
import importlib.metadata
import shutil
import site
import sysconfig
from pathlib import Path

MIN_CHARS = 400
SKIPPED = {"test", "tests", "idlelib", "site-packages", "lib2to3"}


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    args = [a.arg for a in node.args.posonlyargs + node.args.args if a.arg not in ("self", "cls")]
    if node.args.vararg:
        args.append("*" + node.args.vararg.arg)
    args += [a.arg for a in node.args.kwonlyargs]
    if node.args.kwarg:
        args.append("**" + node.args.kwarg.arg)
    return f"{node.name}({', '.join(args)})"


def reference_page(module: str, source: str) -> str | None:
    """An .rst reference page from a module's docstrings; None when it documents too little."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    out = [f":mod:`{module}`", "=" * (len(module) + 7), ""]
    doc = ast.get_docstring(tree)
    if doc:
        out += [doc, ""]
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and not node.name.startswith("_"):
            if ast.get_docstring(node):
                out += [f".. function:: {_signature(node)}", "", _indent(ast.get_docstring(node)), ""]
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_") and ast.get_docstring(node):
            out += [f".. class:: {node.name}", "", _indent(ast.get_docstring(node)), ""]
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and not item.name.startswith("_") and ast.get_docstring(item):
                    out += [f"   .. method:: {_signature(item)}", "", _indent(ast.get_docstring(item), 6), ""]
    text = "\n".join(out)
    return text if len(text) >= MIN_CHARS else None


def _indent(text: str, width: int = 3) -> str:
    return "\n".join((" " * width + line) if line.strip() else "" for line in text.splitlines())


def stdlib_pages(out: Path) -> int:
    root = Path(sysconfig.get_paths()["stdlib"])
    n = 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(p in SKIPPED or p.startswith("config-") for p in rel.parts):
            continue
        module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        page = reference_page(module, path.read_text(errors="replace"))
        if page:
            (out / "stdlib" / f"{module}.rst").write_text(page)
            n += 1
    return n


def package_readmes(out: Path) -> int:
    n = 0
    for dist in sorted(importlib.metadata.distributions(), key=lambda d: d.metadata["Name"] or ""):
        meta = dist.read_text("METADATA")
        if not meta:
            continue
        message = email.message_from_string(meta)
        body = message.get_payload() or message.get("Description") or ""
        if not isinstance(body, str) or len(body) < MIN_CHARS:
            continue
        kind = (message.get("Description-Content-Type") or "").lower()
        ext = ".md" if "markdown" in kind else ".rst"
        name = (message.get("Name") or "unknown").lower().replace("/", "_")
        (out / "packages" / f"{name}{ext}").write_text(body)
        n += 1
    return n


def shipped_docs(out: Path) -> int:
    n = 0
    for base in map(Path, site.getsitepackages()):
        for path in sorted([*base.rglob("*.md"), *base.rglob("*.rst")]):
            if "license" in path.name.lower() or "licence" in path.name.lower() or ".dist-info" in str(path):
                continue
            try:
                if path.stat().st_size < MIN_CHARS:
                    continue
            except OSError:
                continue
            target = out / "files" / "_".join(path.relative_to(base).parts)
            shutil.copyfile(path, target)
            n += 1
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    for sub in ("stdlib", "packages", "files"):
        (args.out / sub).mkdir(parents=True, exist_ok=True)
    counts = {"stdlib": stdlib_pages(args.out), "packages": package_readmes(args.out), "files": shipped_docs(args.out)}
    total = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print({"pages": counts, "bytes": total})


if __name__ == "__main__":
    main()
