"""The artifact store: content addressing, atomic publish, reuse, corruption detection."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from storage.artifacts import ArtifactStore, CorruptArtifactError, StageContext, StageKey
from storage.hashing import fingerprint


def _writer(payload: bytes):
    def produce(ctx: StageContext) -> dict:
        (ctx.out_dir / "data.bin").write_bytes(payload)
        (ctx.out_dir / "sub").mkdir()
        (ctx.out_dir / "sub" / "more.txt").write_text("x")
        return {"rows": 1}

    return produce


def test_fingerprint_changes_with_any_part():
    base = fingerprint("clean", "1", {"a": 1}, ["h1"])
    assert base == fingerprint("clean", "1", {"a": 1}, ["h1"])
    assert base != fingerprint("clean", "2", {"a": 1}, ["h1"])
    assert base != fingerprint("clean", "1", {"a": 2}, ["h1"])
    assert base != fingerprint("clean", "1", {"a": 1}, ["h2"])
    assert base != fingerprint("dedup", "1", {"a": 1}, ["h1"])


def test_build_publishes_manifest_and_reuses(tmp_path: Path):
    store = ArtifactStore(tmp_path)
    manifest, reused = store.build(StageKey(stage="s", version="1", params={"p": 1}, inputs=[]), _writer(b"abc"))
    assert not reused
    assert Path(manifest.path, "manifest.json").is_file()
    assert {f.path for f in manifest.files} == {"data.bin", "sub/more.txt"}
    again, reused = store.build(
        StageKey(stage="s", version="1", params={"p": 1}, inputs=[]), _writer(b"SHOULD NOT RUN")
    )
    assert reused and again.content_hash == manifest.content_hash
    assert not [p for p in (tmp_path / "s").iterdir() if p.name.startswith(".")]


def test_same_inputs_give_same_content_hash(tmp_path: Path):
    a, _ = ArtifactStore(tmp_path / "a").build(StageKey(stage="s", version="1", params={}, inputs=[]), _writer(b"abc"))
    b, _ = ArtifactStore(tmp_path / "b").build(StageKey(stage="s", version="1", params={}, inputs=[]), _writer(b"abc"))
    assert a.content_hash == b.content_hash and a.fingerprint == b.fingerprint


def test_failed_stage_leaves_nothing_visible(tmp_path: Path):
    store = ArtifactStore(tmp_path)

    def boom(ctx: StageContext) -> dict:
        (ctx.out_dir / "half.bin").write_bytes(b"half")
        raise RuntimeError("stage died")

    with pytest.raises(RuntimeError, match="stage died"):
        store.build(StageKey(stage="s", version="1", params={}, inputs=[]), boom)
    assert [p.name for p in (tmp_path / "s").iterdir() if not p.name.endswith(".work")] == []


def test_stale_temporary_of_dead_process_is_removed(tmp_path: Path):
    store = ArtifactStore(tmp_path)
    fp = fingerprint("s", "1", {}, [])
    stale = tmp_path / "s" / f".{fp}.tmp-999999999-deadbeef"
    stale.mkdir(parents=True)
    (stale / "half.bin").write_bytes(b"x")
    store.build(StageKey(stage="s", version="1", params={}, inputs=[]), _writer(b"abc"))
    assert not stale.exists()


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_corrupt_artifact_is_detected_and_rebuilt(tmp_path: Path, damage: str):
    store = ArtifactStore(tmp_path)
    manifest, _ = store.build(StageKey(stage="s", version="1", params={}, inputs=[]), _writer(b"abcdef"))
    target = Path(manifest.path) / "data.bin"
    if damage == "flip":
        target.write_bytes(b"abcdeF")
    elif damage == "truncate":
        target.write_bytes(b"abc")
    else:
        os.remove(target)
    with pytest.raises(CorruptArtifactError):
        store.verify(manifest)
    rebuilt, reused = store.build(
        StageKey(stage="s", version="1", params={}, inputs=[]), _writer(b"abcdef"), log=lambda m: None
    )
    assert not reused and rebuilt.content_hash == manifest.content_hash
    assert any(p.name.startswith(f".{manifest.fingerprint}.corrupt-") for p in (tmp_path / "s").iterdir())
