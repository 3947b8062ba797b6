"""Questions users ask of lineage: where did a document go, why was it dropped, what does a source feed,
what changed between two runs, what must be rebuilt to take a document down, is a run consistent.

Each function reads the small DuckDB tables and the runs' ledgers: point questions go through each ledger's
index (``storage.ledger.LedgerIndex``: one part, one row group per stage), per-source counts through its
rollup, whole-run comparisons through DuckDB scans of the parts. All return plain dicts, so the CLI prints
them or emits JSON.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.compute as pc

from storage.artifacts import ArtifactStore, CorruptArtifactError, ledger_folder, local_folder
from storage.leaderboard import leaderboard_rows
from storage.ledger import LedgerIndex
from storage.lineage import LineageStore
from storage.redaction import redact_config
from storage.stage_graph import DOWNSTREAM, LEDGER_STAGES


def _stage_rank(stage: str) -> int:
    return LEDGER_STAGES.index(stage) if stage in LEDGER_STAGES else len(LEDGER_STAGES)


def _model_entry(edge: dict, shards: list[str]) -> dict:
    """A model (or what was made from one) as lineage answers name it: stage, fingerprint, relation, where."""
    return {
        "stage": edge["dst_stage"],
        "fingerprint": edge["dst_fingerprint"],
        "relation": edge["relation"],
        "uri": edge["uri"],
        "first_run": edge["run_id"],
        "shards": shards,
    }


def _one_connection(method: Callable[..., Any]) -> Callable[..., Any]:
    """Answer a whole question over one read connection, closed when the answer is ready."""

    @functools.wraps(method)
    def wrapper(self: LineageQueries, *args: Any, **kwargs: Any) -> Any:
        with self.store.reading():
            return method(self, *args, **kwargs)

    return wrapper


class LineageQueries:
    """The questions, as methods returning plain dicts; each holds DuckDB's lock only while it runs."""

    def __init__(self, store: LineageStore):
        self.store = store
        self._artifacts: dict[str, list[dict]] = {}
        self._ledger_indexes: dict[str, LedgerIndex] = {}  # by artifact URI: artifacts never change in place

    # --- helpers ----------------------------------------------------------------------------------------

    def _run(self, run_id: str | None) -> str:
        run_id = run_id or self.store.latest_run_id()
        if run_id is None:
            raise LookupError("no runs recorded yet")
        self.store.run(run_id)
        return run_id

    def _run_artifacts(self, run_id: str) -> list[dict]:
        if run_id not in self._artifacts:
            self._artifacts[run_id] = self.store.run_artifacts(run_id)
        return self._artifacts[run_id]

    def _indexes(self, run_id: str, stages: tuple[str, ...] = LEDGER_STAGES) -> list[LedgerIndex]:
        indexes = [self._ledger_index(a["uri"]) for a in self._run_artifacts(run_id) if a["stage"] in stages]
        if not indexes:
            raise LookupError(f"run {run_id} has no ledger for stages {stages}")
        return indexes

    def _ledger_index(self, uri: str) -> LedgerIndex:
        """One ``LedgerIndex`` per artifact, so the rounds of a takedown do not re-read its ``parts.json``."""
        if uri not in self._ledger_indexes:
            self._ledger_indexes[uri] = LedgerIndex(ledger_folder(uri))
        return self._ledger_indexes[uri]

    def _ledger(self, run_id: str, stages: tuple[str, ...] = LEDGER_STAGES) -> list[str]:
        """Every ledger part of the run's artifacts of ``stages``, for whole-run DuckDB scans."""
        return [f for index in self._indexes(run_id, stages) for f in index.files]

    def _rows(
        self,
        run_id: str,
        doc_ids: set[str] | list[str],
        stages: tuple[str, ...] = LEDGER_STAGES,
        columns: list[str] | None = None,
    ) -> list[dict]:
        """Ledger rows of these documents over the run's stages, ordered by document then pipeline stage."""
        rows = [r for index in self._indexes(run_id, stages) for r in index.rows(doc_ids, columns)]
        return sorted(rows, key=lambda r: (r["doc_id"], _stage_rank(r.get("stage", ""))))

    def _models_for_shards(self, tokenize_fp: str, shards: set[str]) -> list[dict]:
        """Train/evaluate artifacts whose edge from this tokenize artifact covers any of ``shards``."""
        edges = self.store.query(
            "SELECT e.dst_stage, e.dst_fingerprint, e.relation, e.coverage, e.tokens_per_source, a.uri, a.run_id "
            "FROM artifact_edges e "
            "LEFT JOIN artifacts a ON a.stage = e.dst_stage AND a.fingerprint = e.dst_fingerprint "
            "WHERE e.src_stage = 'tokenize' AND e.src_fingerprint = ?",
            [tokenize_fp],
        )
        out = []
        for e in self.store.located(edges, "dst_stage", "dst_fingerprint"):
            covered = set(json.loads(e["coverage"] or "{}"))
            hit = sorted(covered & shards)
            if hit:
                realized = json.loads(e["tokens_per_source"]) if e.get("tokens_per_source") else None
                out.append(_model_entry(e, hit) | ({"tokens_per_source": realized} if realized else {}))
        return out + self._derived_from_models(out)

    def _derived_from_models(self, models: list[dict]) -> list[dict]:
        """What was made from these models without reading tokens (exports): it carries their data too.

        Follows the stage graph, so a stage added downstream of ``train`` is named here without a change."""
        trained = [m for m in models if m["stage"] == "train"]
        out = []
        for model in trained:
            rows = self.store.query(
                "SELECT e.dst_stage, e.dst_fingerprint, e.relation, a.uri, a.run_id FROM artifact_edges e "
                "LEFT JOIN artifacts a ON a.stage = e.dst_stage AND a.fingerprint = e.dst_fingerprint "
                "WHERE e.src_stage = 'train' AND e.src_fingerprint = ? ORDER BY e.dst_stage, e.dst_fingerprint",
                [model["fingerprint"]],
            )
            for e in self.store.located(rows, "dst_stage", "dst_fingerprint"):
                if e["dst_stage"] in DOWNSTREAM["train"] and e["relation"] != "evaluated_on":
                    out.append(_model_entry(e, model["shards"]) | {"via": f"train:{model['fingerprint']}"})
        return out

    def _artifact_fp(self, run_id: str, stage: str) -> str | None:
        for a in self._run_artifacts(run_id):
            if a["stage"] == stage:
                return a["fingerprint"]
        return None

    # --- questions --------------------------------------------------------------------------------------

    @_one_connection
    def find_docs(self, ref: str, run_id: str | None = None, candidate_ids: list[str] | None = None) -> list[dict]:
        """The run's documents ``ref`` names: a doc id, one of ``candidate_ids`` (what a source's own id field
        value maps to), a locator, or a file path ending in one (``/corpus/docs/a.txt`` finds ``docs/a.txt``)."""
        run_id = self._run(run_id)
        files = self._ledger(run_id, ("ingest",))
        if not files:
            return []
        return self.store.query(
            "SELECT doc_id, source, locator FROM read_parquet(?) WHERE doc_id = ? OR list_contains(?, doc_id) "
            "OR locator = ? OR ? LIKE '%/' || locator ORDER BY doc_id LIMIT 20",
            [files, ref, list(candidate_ids or []), ref, ref],
        )

    @_one_connection
    def doc(self, doc_id: str, run_id: str | None = None) -> dict:
        """A document's path through a run: each stage's decision, its split/shard/span, the models using it."""
        run_id = self._run(run_id)
        rows = self._rows(run_id, [doc_id])
        if not rows:
            raise LookupError(f"document {doc_id} is not in run {run_id}")
        first = rows[0]
        placed = next((r for r in rows if r["stage"] == "tokenize"), None)
        models = []
        if placed is not None:
            fp = self._artifact_fp(run_id, "tokenize")
            models = self._models_for_shards(fp, {placed["shard"]}) if fp else []
        return {
            "doc_id": doc_id,
            "run_id": run_id,
            "source": first["source"],
            "locator": first["locator"],
            "content_hash": next((r["content_hash"] for r in rows if r["content_hash"]), None),
            "final_fate": rows[-1]["fate"] if rows[-1]["stage"] != "tokenize" else "in_shards",
            "split": placed["split"] if placed else None,
            "shard": placed["shard"] if placed else None,
            "token_span": [placed["token_start"], placed["token_end"]] if placed else None,
            "stages": [{k: v for k, v in r.items() if v is not None} for r in rows],
            "models": models,
        }

    def _threshold(self, run_id: str, row: dict) -> dict | None:
        """The bound a dropped document's score was compared with: from the rules the stage recorded in its counts."""
        reason, scores = row.get("reason"), dict(row.get("scores") or {})
        if not reason:
            return None
        if reason.startswith("language:"):
            return {"stat": "language.allowed_score", "low": scores.get("language.min_score"), "high": None}
        artifact = next((a for a in self._run_artifacts(run_id) if a["stage"] == row["stage"]), None)
        counts = json.loads(artifact["counts"]) if artifact and artifact.get("counts") else {}
        preset = next((k.removeprefix("preset.") for k in scores if k.startswith("preset.")), None)
        rules = (counts.get("rules") or {}).get(preset) or []
        rule = next((r for r in rules if r["reason"] == reason), None)
        return {k: rule[k] for k in ("stat", "low", "high")} | {"preset": preset} if rule else None

    @_one_connection
    def why(self, doc_id: str, run_id: str | None = None) -> dict:
        """Why a document is not in the shards: the stage, reason and score beside the rule's threshold, or the
        document it duplicates. A kept document lists the flags it carries (e.g. ``contaminated:<set>``)."""
        info = self.doc(doc_id, run_id)
        decisive = next((r for r in info["stages"] if r["fate"] != "kept"), None)
        flags = [{"stage": r["stage"], "reason": r["reason"], "score": r.get("score")} for r in info["stages"]
                 if r["fate"] == "kept" and r.get("reason")]  # fmt: skip
        if decisive is None:
            return {
                "doc_id": doc_id,
                "run_id": info["run_id"],
                "verdict": "kept",
                "split": info["split"],
                "flags": flags,
            }
        out = {
            "doc_id": doc_id,
            "run_id": info["run_id"],
            "verdict": decisive["fate"],
            "stage": decisive["stage"],
            "reason": decisive.get("reason"),
            "score": decisive.get("score"),
            "threshold": self._threshold(info["run_id"], decisive),
        }
        if decisive.get("duplicate_of"):
            # duplicate_of is the document of the verified pair that removed this one; cluster_id the kept
            # representative, which differs when the document joined the cluster through a chain of pairs.
            linked, cluster = decisive["duplicate_of"], decisive.get("cluster_id") or decisive["duplicate_of"]
            rows = self._rows(info["run_id"], {linked, cluster}, ("ingest",), ["doc_id", "locator"])
            locator = {r["doc_id"]: r["locator"] for r in rows}
            out |= {
                "duplicate_of": linked,
                "duplicate_of_locator": locator.get(linked),
                "similarity": decisive.get("similarity"),
                "cluster_id": cluster,
                "cluster_locator": locator.get(cluster),
            }
        return out

    @_one_connection
    def contamination(self, set_name: str | None = None, model: str | None = None) -> dict:
        """Per model: the evaluation items that overlap documents it trained on, with those documents' copies.

        Matches come from each model's tokenize artifact (``contamination/matches.parquet``); a flagged document
        in a trained shard counts against the model, a dropped one is listed as removed. Copies are the documents
        dedup removed as duplicates of a matched one: the same text, so the same contamination.
        """
        import pyarrow.parquet as pq

        edges = self.store.query(
            "SELECT e.dst_fingerprint AS model, e.src_fingerprint AS tokenize, e.coverage, m.run_id, t.uri, "
            "t.counts FROM artifact_edges e "
            "JOIN artifacts m ON m.stage = 'train' AND m.fingerprint = e.dst_fingerprint "
            "JOIN artifacts t ON t.stage = 'tokenize' AND t.fingerprint = e.src_fingerprint "
            "WHERE e.src_stage = 'tokenize' AND e.relation = 'trained_on' ORDER BY m.created_at, e.dst_fingerprint"
        )
        if model:
            edges = [e for e in edges if e["model"].startswith(model)]
            if not edges:
                raise LookupError(f"no trained model with fingerprint {model}…")
        out = []
        for e in edges:
            counts = json.loads(e["counts"] or "{}").get("contamination")
            matches_path = local_folder(e["uri"]) / "contamination" / "matches.parquet"
            if counts is None or not matches_path.exists():
                out.append({"model": e["model"], "run_id": e["run_id"], "checked": False, "sets": {}})
                continue
            rows = pq.read_table(matches_path).to_pylist()
            covered = set(json.loads(e["coverage"] or "{}"))
            sets = {}
            for name, summary in counts["sets"].items():
                if set_name and name != set_name:
                    continue
                mine = [r for r in rows if r["set"] == name]
                copies = self._copies(e["tokenize"], {r["doc_id"] for r in mine})
                trained, removed = self._items(mine, covered, copies, e["uri"])
                sets[name] = {"items": summary["items"], "trained_on": trained, "removed": removed}
            out.append({"model": e["model"], "run_id": e["run_id"], "checked": True, "sets": sets})
        return {"models": out}

    def _items(self, matches: list[dict], covered: set[str], copies: dict[str, list[str]], uri: str):
        """Group matches by item: those in a shard the model read, and those the stage dropped."""
        placed = {}
        if matches:
            rows = self._ledger_index(uri).rows({m["doc_id"] for m in matches}, ["doc_id", "fate", "shard"])
            placed = {r["doc_id"]: r for r in rows}
        trained: dict[str, list[dict]] = {}
        removed: dict[str, list[dict]] = {}
        for m in matches:
            row = placed.get(m["doc_id"], {})
            doc = {"doc_id": m["doc_id"], "source": m["source"], "overlap": m["overlap"],
                   "copies": copies.get(m["doc_id"], [])}  # fmt: skip
            if row.get("fate") == "kept" and row.get("shard") in covered:
                trained.setdefault(m["item_id"], []).append(doc | {"shard": row["shard"]})
            else:
                removed.setdefault(m["item_id"], []).append(doc)
        as_list = lambda d: [{"item_id": k, "docs": v} for k, v in sorted(d.items())]  # noqa: E731
        return as_list(trained), as_list(removed)

    def _copies(self, tokenize_fp: str, doc_ids: set[str]) -> dict[str, list[str]]:
        """Documents dedup removed as copies of each of ``doc_ids`` (through the dedup artifact tokenize read)."""
        if not doc_ids:
            return {}
        dedup = self.store.query(
            "SELECT a.uri FROM artifact_edges e "
            "JOIN artifacts a ON a.stage = 'dedup' AND a.fingerprint = e.src_fingerprint "
            "WHERE e.dst_stage = 'tokenize' AND e.dst_fingerprint = ? AND e.src_stage = 'dedup'",
            [tokenize_fp],
        )
        if not dedup:
            return {}
        index = self._ledger_index(dedup[0]["uri"])
        out: dict[str, list[str]] = {}
        for r in index.rows(set(index.linked(doc_ids, "duplicate_of")), ["doc_id", "duplicate_of"]):
            out.setdefault(r["duplicate_of"], []).append(r["doc_id"])
        return {k: sorted(v) for k, v in out.items()}

    @_one_connection
    def source(self, source: str, run_id: str | None = None) -> dict:
        """Counts per fate for one source, and the shards and models that contain anything from it."""
        run_id = self._run(run_id)
        name = self._source_name(run_id, source)
        fates: dict[tuple[str, str, str], int] = {}
        placed: dict[tuple[str, str], dict] = {}
        for index in self._indexes(run_id):
            for r in index.rollup().filter(pc.equal(pc.field("source"), name)).to_pylist():
                key = (r["stage"], r["fate"], r["reason"] or "")
                fates[key] = fates.get(key, 0) + r["docs"]
                if r["stage"] == "tokenize" and r["shard"] is not None:
                    shard = placed.setdefault((r["split"], r["shard"]), {"docs": 0, "tokens": 0})
                    shard["docs"] += r["docs"]
                    shard["tokens"] += r["tokens"] or 0
        fates_out = [
            {"stage": st, "fate": fa, "reason": re, "docs": n}
            for (st, fa, re), n in sorted(fates.items(), key=lambda kv: (_stage_rank(kv[0][0]), kv[0][1], kv[0][2]))
        ]
        shards = [{"split": sp, "shard": sh} | v for (sp, sh), v in sorted(placed.items(), key=lambda kv: kv[0][1])]
        fp = self._artifact_fp(run_id, "tokenize")
        models = self._models_for_shards(fp, {s["shard"] for s in shards}) if fp else []
        return {"source": name, "run_id": run_id, "fates": fates_out, "shards": shards, "models": models}

    def _source_name(self, run_id: str, source: str) -> str:
        config = json.loads(self.store.run(run_id)["config"])
        for s in config.get("sources", []):
            if source in (s["name"], s["path"]) or Path(s["path"]).expanduser().resolve() == Path(source).resolve():
                return s["name"]
        names = [s["name"] for s in config.get("sources", [])]
        raise LookupError(f"no source {source!r} in run {run_id}; its sources are {names}")

    @_one_connection
    def diff(self, run_a: str, run_b: str) -> dict:
        """Documents added, removed and changed (content hash differs) per source between two runs.

        Answered without scanning when it can be: a refresh records its diff against the previous run, and two
        runs that share their ingest and clean artifacts differ in nothing (their clean rollup gives the
        unchanged counts). Otherwise both runs' ingest and clean ledgers are joined on doc id.
        """
        self.store.run(run_a)
        self.store.run(run_b)
        pair = {"run_a": run_a, "run_b": run_b, "training": self.training_diff(run_a, run_b)}
        recorded = self.store.query(
            "SELECT source, added, removed, changed, unchanged FROM refresh_diffs "
            "WHERE run_id = ? AND previous_run_id = ? ORDER BY source",
            [run_b, run_a],
        )
        if recorded:
            return pair | {"sources": recorded, "method": "recorded by the refresh"}
        same = [self._artifact_fp(run_a, st) for st in ("ingest", "clean")]
        if None not in same and same == [self._artifact_fp(run_b, st) for st in ("ingest", "clean")]:
            return pair | {"sources": self._same_corpus(run_b), "method": "same artifacts"}
        return pair | {"sources": self._diff_scan(run_a, run_b), "method": "ledger scan"}

    def training_diff(self, run_a: str, run_b: str) -> list[dict]:
        """Per source, documents of the train split added, removed or unchanged between the runs: what reached
        training (a takedown or a filter change shows here even when the sources are unchanged)."""
        fp_a, fp_b = self._artifact_fp(run_a, "tokenize"), self._artifact_fp(run_b, "tokenize")
        if fp_a is None or fp_b is None:
            return []
        if fp_a == fp_b:
            per_source: dict[str, int] = {}
            for index in self._indexes(run_b, ("tokenize",)):
                for r in index.rollup().select(["source", "split", "docs"]).to_pylist():
                    if r["split"] == "train":
                        per_source[r["source"]] = per_source.get(r["source"], 0) + r["docs"]
            return [{"source": k, "added": 0, "removed": 0, "unchanged": v} for k, v in sorted(per_source.items())]

        def train(run_id: str) -> str:
            files = self._ledger(run_id, ("tokenize",))
            return f"(SELECT doc_id, source FROM read_parquet({files!r}) WHERE split = 'train')"

        return self.store.query(
            f"""
            SELECT coalesce(a.source, b.source) AS source,
                   count(*) FILTER (WHERE a.doc_id IS NULL) AS added,
                   count(*) FILTER (WHERE b.doc_id IS NULL) AS removed,
                   count(*) FILTER (WHERE a.doc_id IS NOT NULL AND b.doc_id IS NOT NULL) AS unchanged
            FROM {train(run_a)} a FULL OUTER JOIN {train(run_b)} b USING (doc_id)
            GROUP BY ALL ORDER BY source
            """
        )

    def _same_corpus(self, run_id: str) -> list[dict]:
        """The diff of a run against one with the same ingest and clean artifacts: every hashed doc unchanged."""
        ingested: set[str] = set()
        hashed: dict[str, int] = {}
        for index in self._indexes(run_id, ("ingest", "clean")):
            for r in index.rollup().select(["source", "stage", "docs"]).to_pylist():
                ingested.add(r["source"])
                if r["stage"] == "clean":
                    hashed[r["source"]] = hashed.get(r["source"], 0) + r["docs"]
        return [
            {"source": src, "added": 0, "removed": 0, "changed": 0, "unchanged": hashed.get(src, 0)}
            for src in sorted(ingested)
        ]

    def _diff_scan(self, run_a: str, run_b: str) -> list[dict]:
        def docs(run_id: str) -> str:
            """Every ingested document with its content hash: clean's rows (clean reads exactly what ingest kept)
            plus the few that ingest dropped, without a join."""
            ingest = self._ledger(run_id, ("ingest",))
            clean = self._ledger(run_id, ("clean",))
            return (
                f"(SELECT doc_id, source, content_hash FROM read_parquet({clean!r}) UNION ALL "
                f"SELECT doc_id, source, NULL AS content_hash FROM read_parquet({ingest!r}) WHERE fate <> 'kept')"
            )

        rows = self.store.query(
            f"""
            SELECT coalesce(a.source, b.source) AS source,
                   count(*) FILTER (WHERE a.doc_id IS NULL) AS added,
                   count(*) FILTER (WHERE b.doc_id IS NULL) AS removed,
                   count(*) FILTER (WHERE a.doc_id IS NOT NULL AND b.doc_id IS NOT NULL
                                    AND a.content_hash IS DISTINCT FROM b.content_hash) AS changed,
                   count(*) FILTER (WHERE a.content_hash = b.content_hash) AS unchanged
            FROM {docs(run_a)} a FULL OUTER JOIN {docs(run_b)} b USING (doc_id)
            GROUP BY ALL ORDER BY source
            """
        )
        return rows

    @_one_connection
    def takedown(self, target: str, run_id: str | None = None, by: str = "auto") -> dict:
        """Every copy of a document (following duplicate links both ways), where they sit, what to rebuild."""
        run_id = self._run(run_id)
        if by == "auto":
            by = "doc" if ":" in target else "content_hash" if len(target) == 32 else "source"
        if by == "doc":
            seeds, hashes = {target}, set()
        elif by == "content_hash":
            seeds, hashes = self._linked(run_id, {target}, "content_hash"), {target}
        else:
            name = self._source_name(run_id, target)
            lo, hi = f"{name}:", f"{name};"  # doc ids are '<source>:<hash>': one contiguous, sorted range
            files = [f for index in self._indexes(run_id, ("clean",)) for f in index.files_between(lo, hi)]
            found = self.store.query(
                "SELECT DISTINCT doc_id FROM read_parquet(?) WHERE doc_id >= ? AND doc_id < ?", [files, lo, hi]
            )
            seeds, hashes = {r["doc_id"] for r in found}, set()
        copies, hashes, locators = self._close_over_copies(run_id, seeds, hashes)
        if not locators:  # nothing of that id, hash or source in the run: a typo must not become a tombstone
            kind = {"doc": "document", "content_hash": "content hash", "source": "source"}[by]
            raise LookupError(
                f"no {kind} {target!r} in run {run_id}: check the spelling, or pass --run for an older run "
                "(`tokenmill lineage runs` lists them); nothing was recorded"
            )
        placed = self._rows(run_id, copies, ("tokenize",), ["doc_id", "split", "shard", "token_start", "token_end"])
        fp = self._artifact_fp(run_id, "tokenize")
        models = self._models_for_shards(fp, {p["shard"] for p in placed}) if fp and placed else []
        hashes = sorted(hashes)
        plan = [
            {
                "step": "apply a tombstone for every copy (tokenmill lineage takedown … --apply)",
                "documents": len(copies),
                "content_hashes": len(hashes),
            },
            {"step": "rerun the pipeline: the clean stage drops tombstoned documents", "stages": DOWNSTREAM["clean"]},
        ]
        if models:
            plan.append({"step": "retire or retrain the models trained on the old shards", "models": models})
        return {
            "target": target,
            "run_id": run_id,
            "copies": sorted(copies),
            "locators": {d: locators.get(d) for d in sorted(copies)},
            "content_hashes": hashes,
            "placements": placed,
            "models": models,
            "plan": plan,
        }

    def _linked(self, run_id: str, keys: set[str], link: str) -> set[str]:
        return {d for index in self._indexes(run_id) for d in index.linked(keys, link)} if keys else set()

    def _close_over_copies(
        self, run_id: str, doc_ids: set[str], hashes: set[str]
    ) -> tuple[set[str], set[str], dict[str, str]]:
        """Grow documents and content hashes to a fixed point over same-content and duplicate_of links, both
        ways: a document's own hash and representative (its rows), the documents with a hash or pointing at a
        document (the ledgers' link indexes). Each round looks up only what the previous round found."""
        seen_ids, seen_hashes, locators = set(), set(), {}
        new_ids, new_hashes = set(doc_ids), set(hashes)
        while new_ids or new_hashes:
            seen_ids |= new_ids
            seen_hashes |= new_hashes
            columns = ["doc_id", "locator", "content_hash", "duplicate_of"]
            rows = self._rows(run_id, new_ids, columns=columns) if new_ids else []
            locators |= {r["doc_id"]: r["locator"] for r in rows if r["locator"]}
            found_ids = {r["duplicate_of"] for r in rows if r["duplicate_of"]}
            found_ids |= self._linked(run_id, new_ids, "duplicate_of")
            found_ids |= self._linked(run_id, new_hashes, "content_hash")
            found_hashes = {r["content_hash"] for r in rows if r["content_hash"]}
            new_ids, new_hashes = found_ids - seen_ids, found_hashes - seen_hashes
        return seen_ids, seen_hashes, locators

    def apply_takedown(self, result: dict, reason: str, requested_by: str = "cli") -> int:
        """Record tombstones for every copy found by ``takedown``; later clean stages drop them."""
        rows = [{"doc_id": d, "reason": reason, "requested_by": requested_by} for d in result["copies"]]
        rows += [{"content_hash": h, "reason": reason, "requested_by": requested_by} for h in result["content_hashes"]]
        return self.store.add_tombstones(rows)

    @_one_connection
    def graph(self, run_id: str | None = None, fmt: str = "mermaid") -> str:
        """The artifact DAG of a run as Mermaid or DOT."""
        run_id = self._run(run_id)
        arts = {(a["stage"], a["fingerprint"]): a for a in self.store.run_artifacts(run_id)}
        edges = self.store.query("SELECT * FROM artifact_edges")
        edges = [
            e
            for e in edges
            if (e["src_stage"], e["src_fingerprint"]) in arts and (e["dst_stage"], e["dst_fingerprint"]) in arts
        ]

        def node(stage: str, fp: str) -> str:
            return f"{stage}_{fp[:8]}"

        if fmt == "dot":
            lines = ["digraph tokenmill {", "  rankdir=LR;"]
            lines += [f'  {node(s, f)} [label="{s}\\n{f[:12]}"];' for s, f in arts]
            lines += [
                f"  {node(e['src_stage'], e['src_fingerprint'])} -> {node(e['dst_stage'], e['dst_fingerprint'])} "
                f'[label="{e["relation"]}"];'
                for e in edges
            ]
            return "\n".join([*lines, "}"])
        lines = ["flowchart LR"]
        lines += [f'  {node(s, f)}["{s}<br/>{f[:12]}"]' for s, f in arts]
        for e in edges:
            src, dst = node(e["src_stage"], e["src_fingerprint"]), node(e["dst_stage"], e["dst_fingerprint"])
            lines.append(f"  {src} -->|{e['relation']}| {dst}")
        return "\n".join(lines)

    @_one_connection
    def show(self, run_id: str) -> dict:
        """Everything needed to reproduce a run: config, code version, input hashes, outcomes per stage."""
        run = self.store.run(run_id)
        run["config"] = redact_config(json.loads(run["config"]))  # runs recorded before redaction existed, too
        stages = self.store.stage_runs(run_id)
        for s in stages:
            s["counts"] = json.loads(s["counts"]) if s["counts"] else None
        arts = self.store.run_artifacts(run_id)
        ingest = next((a for a in arts if a["stage"] == "ingest"), None)
        run["input_snapshot"] = json.loads(ingest["params"]).get("snapshot") if ingest else None
        run["stages"] = stages
        run["artifacts"] = [{k: a[k] for k in ("stage", "fingerprint", "content_hash", "uri")} for a in arts]
        return run

    @_one_connection
    def check(self, run_id: str | None = None) -> dict:
        """Conservation per stage, manifest hashes against the files, and ledger references to real artifacts."""
        run_id = self._run(run_id)
        problems: list[str] = []
        checked: list[str] = []
        arts = {a["stage"]: a for a in self.store.run_artifacts(run_id)}  # under the root being checked
        for stage, art in arts.items():
            try:
                store, manifest = ArtifactStore.of_artifact(art["uri"])
            except (OSError, ValueError) as err:
                problems.append(f"{stage}: {err}")
                continue
            try:
                store.verify(manifest)
                checked.append(f"{stage}: {len(manifest.files)} files match manifest hashes")
            except (CorruptArtifactError, OSError) as err:
                problems.append(str(err))
            counts = manifest.counts
            if stage in LEDGER_STAGES:
                rows = self.store.query(
                    "SELECT fate, coalesce(reason, '') AS reason, count(*) AS n FROM read_parquet(?) GROUP BY ALL",
                    [self._ledger(run_id, (stage,))],
                )
                total = sum(r["n"] for r in rows)
                kept = sum(r["n"] for r in rows if r["fate"] == "kept")
                dropped = {r["reason"]: r["n"] for r in rows if r["fate"] != "kept"}
                if (total, kept, dropped) != (counts["docs_in"], counts["kept"], counts.get("dropped", {})):
                    problems.append(
                        f"{stage}: ledger has {total} rows ({kept} kept, dropped {dropped}) but the manifest says "
                        f"{counts['docs_in']} in, {counts['kept']} kept, dropped {counts.get('dropped')}"
                    )
                elif total != kept + sum(dropped.values()):
                    problems.append(f"{stage}: {total} in != {kept} kept + {sum(dropped.values())} dropped")
                else:
                    checked.append(f"{stage}: {total} in = {kept} kept + {sum(dropped.values())} dropped {dropped}")
        if "tokenize" in arts:
            shards = {Path(f).stem for f in local_folder(arts["tokenize"]["uri"]).glob("tokens/*.arrow")}
            missing = self.store.query(
                "SELECT DISTINCT shard FROM read_parquet(?) WHERE NOT list_contains(?, shard)",
                [self._ledger(run_id, ("tokenize",)), sorted(shards)],
            )
            if missing:
                problems.append(f"tokenize: ledger points at missing shards {[m['shard'] for m in missing]}")
            else:
                checked.append(f"tokenize: every ledger row points at one of {len(shards)} existing shards")
        if "dedup" in arts:
            # A duplicate points at a document kept in this run, or (incremental dedup) at one of the earlier
            # index it was matched against; the index lists those in index/exact-*.parquet.
            index = sorted(str(p) for p in local_folder(arts["dedup"]["uri"]).glob("index/exact*.parquet"))
            known = "SELECT doc_id FROM read_parquet(?) WHERE fate = 'kept'"
            params = [self._ledger(run_id, ("dedup",)), self._ledger(run_id, ("dedup",))]
            if index:
                known += " UNION ALL SELECT doc_id FROM read_parquet(?)"
                params.append(index)
            dangling = self.store.query(
                f"SELECT count(*) AS n FROM read_parquet(?) WHERE fate = 'duplicate' AND cluster_id NOT IN ({known})",
                params,
            )[0]["n"]
            if dangling:
                problems.append(f"dedup: {dangling} duplicates' clusters are represented by documents not kept")
            else:
                checked.append("dedup: every duplicate's cluster_id is a kept or indexed document")
        return {"run_id": run_id, "ok": not problems, "problems": problems, "checked": checked}

    @_one_connection
    def sweep(self, sweep_id: str) -> dict:
        """A sweep's leaderboard, its winner and every read of its test split (by id, or the newest of a name)."""
        row = self.store.sweep(sweep_id)
        trials = self.store.trials(row["sweep_id"])
        spec = json.loads(row["spec"]) if row["spec"] else {}
        winner = next((t for t in trials if t["selected"]), None)
        return {
            "sweep_id": row["sweep_id"],
            "name": row["name"],
            "status": row["status"],
            "objective": row["objective"],
            "sampler": row["sampler"],
            "space": spec.get("space"),
            "eval_set": row["eval_set"],
            "started_at": row["started_at"],
            "ended_at": row["ended_at"],
            "leaderboard": leaderboard_rows(trials, row["objective"]),
            "winner": winner and {k: winner[k] for k in ("trial", "run_id", "params", "objective", "fingerprints")},
            "test_reads": self.store.test_reads(row["sweep_id"], row["name"]),
        }
