"""`lineage step`: the documents of optimizer step N, recomputed from the loader, match what training read."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from storage.artifacts import ArtifactStore
from storage.shards import read_token_shard
from tasks.stages import run_all
from tasks.training import loader
from tasks.training.provenance import highest_loss_steps, step_provenance
from tests.support.corpus import prose, tiny_config, write_prose_jsonl


@pytest.mark.parametrize("weighted", [False, True])
def test_step_provenance_matches_the_windows_the_loader_produced(tmp_path: Path, monkeypatch, weighted: bool):
    big = write_prose_jsonl(tmp_path / "big", files=2, docs_per_file=20)
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps({"text": prose(1000 + i)}) + "\n" for i in range(10)))
    sources = [{"name": "big", "path": str(big)}, {"name": "small", "path": str(small)}]
    if weighted:
        sources = [sources[0] | {"weight": 1.0}, sources[1] | {"weight": 1.0}]
    cfg = tiny_config(tmp_path, tmp_path / "data", sources=sources, train={"max_steps": 5, "grad_accum": 2})
    produced: list[tuple[int, np.ndarray]] = []
    real_tensor = loader.TokenWindows.tensor

    def recording(self, indices, pin_memory=False):
        if self.block_size == cfg.model.block_size and len(indices) == cfg.train.batch_size:
            produced.append((len(self), np.asarray(indices).copy()))
        return real_tensor(self, indices, pin_memory)

    monkeypatch.setattr(loader.TokenWindows, "tensor", recording)
    manifests = run_all(cfg, log=lambda m: None)
    monkeypatch.undo()
    n_train = manifests["train"].counts["train_windows"]  # validation batches read other windows
    train_batches = [idx for n, idx in produced if n == n_train][: 5 * 2]  # the last one was prefetched only
    store = ArtifactStore(cfg.root)
    fp = manifests["train"].fingerprint
    for step in (1, 3, 5):
        answer = step_provenance(store, fp[:10], step)
        got = [w["window"] for w in answer["windows"]]
        assert got == np.concatenate(train_batches[(step - 1) * 2 : step * 2]).tolist()
        for w in answer["windows"]:  # the documents' token slices tile the window exactly
            assert w["docs"][0]["tokens"][0] == w["tokens"][0] and w["docs"][-1]["tokens"][1] == w["tokens"][1]
            assert all(a["tokens"][1] == b["tokens"][0] for a, b in zip(w["docs"], w["docs"][1:], strict=False))
        shard = read_token_shard(Path(manifests["tokenize"].path) / "tokens" / f"{answer['windows'][0]['shard']}.arrow")
        assert len(shard) >= answer["windows"][0]["tokens"][1]
    top = highest_loss_steps(store, manifests["train"], n=2)
    assert len(top) == 2 and top[0]["loss"] >= top[1]["loss"] and top[0]["documents"]
    with pytest.raises(LookupError, match="steps 1..5"):
        step_provenance(store, fp, 6)
