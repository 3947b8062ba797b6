"""Faults: a stage killed with SIGKILL at any point, two pipelines on one root, stale runs marked crashed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from storage.artifacts import ArtifactStore
from storage.lineage import LineageStore
from storage.lineage_queries import LineageQueries
from tasks.stages import STAGES, run_all
from tests.support.corpus import tiny_config, write_corpus

REPO = Path(__file__).resolve().parent.parent

RUNNER = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, {tests!r})
    from tests.support.corpus import tiny_config
    from pathlib import Path
    from tasks.stages import run_all
    cfg = tiny_config(Path({corpus!r}), Path({root!r}))
    manifests = run_all(cfg, log=lambda m: None, run_id=sys.argv[1])
    print(json.dumps({{k: v.content_hash for k, v in manifests.items()}}))
    """
)


def _run_pipeline(
    corpus: Path, root: Path, run_id: str, fault: str | None, fault_dir: Path
) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOKENMILL_FAULT_DIR": str(fault_dir), "PYTHONPATH": str(REPO)}
    env.pop("TOKENMILL_FAULT", None)
    if fault:
        env["TOKENMILL_FAULT"] = fault
    code = RUNNER.format(tests=str(REPO / "tests"), corpus=str(corpus), root=str(root))
    return subprocess.run(
        [sys.executable, "-c", code, run_id], env=env, capture_output=True, text=True, timeout=300, cwd=REPO
    )


def _visible_artifacts(root: Path, stage: str) -> list[Path]:
    folder = root / stage
    return [p for p in folder.iterdir() if not p.name.startswith(".")] if folder.exists() else []


@pytest.mark.slow
def test_sigkill_in_every_stage_then_rerun_gives_identical_artifacts(tmp_path: Path):
    write_corpus(tmp_path / "corpus")
    reference = run_all(tiny_config(tmp_path / "corpus", tmp_path / "reference"), log=lambda m: None)
    root = tmp_path / "root"
    faults = tmp_path / "faults"
    for i, stage in enumerate(STAGES):
        point = "step3" if stage == "train" else "end"  # train dies mid-loop, after its step-2 checkpoint
        killed = _run_pipeline(tmp_path / "corpus", root, f"killed-{stage}", f"{stage}:{point}:kill", faults)
        assert killed.returncode == -9, killed.stderr[-2000:]
        assert _visible_artifacts(root, stage) == [], f"{stage} left a visible artifact after SIGKILL"
        for done in STAGES[:i]:
            assert len(_visible_artifacts(root, done)) == 1
    final = _run_pipeline(tmp_path / "corpus", root, "final", None, faults)
    assert final.returncode == 0, final.stderr[-2000:]
    hashes = json.loads(final.stdout.strip().splitlines()[-1])
    assert hashes == {k: v.content_hash for k, v in reference.items()}

    lineage = LineageStore(ArtifactStore(root).lineage_path)
    statuses = {r["run_id"]: r["status"] for r in lineage.runs(limit=50)}
    assert statuses["final"] == "completed"
    assert {statuses[f"killed-{s}"] for s in STAGES} == {"crashed"}
    train = json.loads(next(r for r in lineage.stage_runs("killed-evaluate") if r["stage"] == "train")["counts"])
    assert train["resumed_from_step"] == 2  # resumed from the checkpoint, not from step 0
    assert LineageQueries(lineage).check("final")["ok"]


def test_two_pipelines_on_one_root_both_complete_with_one_set_of_artifacts(tmp_path: Path):
    write_corpus(tmp_path / "corpus")
    root = tmp_path / "root"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    code = RUNNER.format(tests=str(REPO / "tests"), corpus=str(tmp_path / "corpus"), root=str(root))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, f"run-{i}"],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    hashes = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
    assert hashes[0] == hashes[1]
    for stage in STAGES:
        assert len(_visible_artifacts(root, stage)) == 1
    lineage = LineageStore(ArtifactStore(root).lineage_path)
    assert sorted(r["status"] for r in lineage.runs()) == ["completed", "completed"]
    assert LineageQueries(lineage).check("run-1")["ok"]
