"""Evaluation, baselines, probes, KV-cached generation, the run report and the transformers export."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from storage.artifacts import ArtifactStore
from storage.lineage import LineageStore
from storage.shards import read_token_shard, write_token_shard
from tasks.evaluation.baselines import KneserNeyBigram, Unigram
from tasks.modeling.export import export_model, find_tokenizer, load_export
from tasks.modeling.gpt import GPT, GPTConfig, KVCache, next_token
from tasks.modeling.weights import load_model, save_model
from tasks.reporting.report import publish_run_report
from tasks.stages import run_all
from tests.support.corpus import tiny_config, write_corpus


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one thread avoids oversubscription stalls."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("evaluation")
    write_corpus(base / "corpus")
    cfg = tiny_config(base / "corpus", base / "root", evaluate={"probe_items": 20, "samples": 2})
    return cfg, run_all(cfg, log=lambda m: None)


def _report(manifests) -> dict:
    return json.loads(Path(manifests["evaluate"].path, "report.json").read_text())


def _tiny_gpt(block_size: int = 16, arch: str = "gpt2", mlp: str = "relu2") -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=97, block_size=block_size, n_layer=2, n_head=2, n_embd=32, arch=arch, mlp=mlp)
    model = GPT(cfg).eval()
    with torch.no_grad():  # the modern layout starts with zero residual projections: give every block a say
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


ARCHS = pytest.mark.parametrize("arch,mlp", [("gpt2", "relu2"), ("modern", "relu2"), ("modern", "swiglu")])


# --- generation ---------------------------------------------------------------------------------------------


@ARCHS
def test_kv_cached_greedy_generation_matches_the_uncached_path(arch, mlp):
    model = _tiny_gpt(block_size=16, arch=arch, mlp=mlp)
    prompt = torch.randint(0, 97, (3, 5), generator=torch.Generator().manual_seed(1))
    cached = model.generate(prompt, 30, temperature=0, use_cache=True)  # runs past block_size (5 + 30 > 16)
    uncached = model.generate(prompt, 30, temperature=0, use_cache=False)
    assert cached.shape == (3, 35)
    assert torch.equal(cached, uncached)


def test_seeded_sampling_is_reproducible_and_path_independent():
    model = _tiny_gpt()
    prompt = torch.tensor([[1, 2, 3]])

    def sample(use_cache: bool, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return model.generate(prompt, 12, 1.0, top_k=20, generator=g, top_p=0.9, use_cache=use_cache)

    assert torch.equal(sample(True, 7), sample(False, 7))
    assert torch.equal(sample(True, 7), sample(True, 7))


@ARCHS
def test_incremental_forward_matches_the_full_forward(arch, mlp):
    model = _tiny_gpt(arch=arch, mlp=mlp)
    idx = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(2))
    full, _ = model(idx)
    cache = KVCache(model.cfg.n_layer)
    parts = [model(idx[:, a:b], cache=cache)[0] for a, b in ((0, 5), (5, 9), (9, 10), (10, 12))]
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.05, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(next_token(logits, 1.0, top_p=0.5, generator=g)) for _ in range(50)}
    assert draws == {0}
    draws = {int(next_token(logits, 1.0, top_p=0.85, generator=g)) for _ in range(200)}
    assert draws == {0, 1}
    assert int(next_token(logits, 0.0)) == 0  # temperature 0 = greedy


# --- baselines ----------------------------------------------------------------------------------------------


def test_baselines_are_normalized_distributions(tmp_path: Path):
    rng = np.random.default_rng(0)
    shard = tmp_path / "train-00000.arrow"
    write_token_shard(shard, rng.integers(0, 40, 2000).astype(np.uint16))
    vocab = 50  # tokens 40…49 never occur: unseen histories and continuations still get probability
    bigram, unigram = KneserNeyBigram([shard], vocab), Unigram([shard], vocab)
    nxt = np.arange(vocab)
    for prev in (0, 7, 45):
        total = np.exp(bigram.log_prob(np.full(vocab, prev), nxt)).sum()
        assert math.isclose(total, 1.0, rel_tol=1e-9), prev
    assert math.isclose(np.exp(unigram.log_prob(nxt, nxt)).sum(), 1.0, rel_tol=1e-9)
    assert 0 < bigram.discount < 1


# --- the evaluate stage ---------------------------------------------------------------------------------------


def test_every_held_out_token_is_scored_once_by_model_and_baselines(built):
    _, m = built
    report = _report(m)
    for split in ("val", "test"):
        shards = m["tokenize"].files_under(f"tokens/{split}-", ".arrow")
        metrics = report["splits"][split]
        assert metrics["tokens"] == sum(len(read_token_shard(p)) - 1 for p in shards)
        for scorer in ("model", "unigram", "bigram"):
            assert np.isclose(metrics[scorer]["perplexity"], np.exp(metrics[scorer]["loss"]))
        assert metrics["bigram"]["loss"] < metrics["unigram"]["loss"]  # the corpus has strong local structure


def test_per_source_metrics_partition_the_split(built):
    _, m = built
    seen = set()
    for split in ("val", "test"):
        metrics = _report(m)["splits"][split]
        sources = metrics["sources"]
        seen |= set(sources)
        assert sum(s["tokens"] for s in sources.values()) == metrics["tokens"]
        assert sum(s["bytes"] for s in sources.values()) == metrics["bytes"]
        nats = sum(s["model"]["loss"] * s["tokens"] for s in sources.values())
        assert math.isclose(nats / metrics["tokens"], metrics["model"]["loss"], rel_tol=1e-9)
    ledger = pq.read_table(m["tokenize"].files_under("ledger/")).to_pylist()
    assert seen == {r["source"] for r in ledger if r["split"] in ("val", "test")}


def test_probes_state_items_chance_and_baselines(built):
    _, m = built
    probes = _report(m)["probes"]
    mc, words = probes["multiple_choice"], probes["last_word"]
    assert mc["items"] > 0 and mc["choices"] == 4 and mc["chance"] == 0.25
    assert words["items"] > 0
    for result in (mc, words):
        for scorer in ("model", "bigram", "unigram"):
            assert all(0 <= v <= 1 for v in result[scorer].values())


def test_probes_are_also_written_as_lm_eval_tasks(built):
    import yaml

    _, m = built
    probes = _report(m)["probes"]
    for task, probe in (("tokenmill_multiple_choice", "multiple_choice"), ("tokenmill_last_word", "last_word")):
        spec = yaml.safe_load(m["evaluate"].file(f"lm_eval/{task}.yaml").read_text())
        assert spec["task"] == task and spec["dataset_kwargs"]["data_files"]["test"] == f"{task}.jsonl"
        rows = [json.loads(line) for line in m["evaluate"].file(f"lm_eval/{task}.jsonl").read_text().splitlines()]
        assert len(rows) == probes[probe]["items"]
        assert all(spec["doc_to_text"] in row and spec["doc_to_target"] in row for row in rows)
    labels = [
        json.loads(line)["label"] for line in m["evaluate"].file("lm_eval/tokenmill_multiple_choice.jsonl").open()
    ]
    assert len(set(labels)) > 1  # the true continuation is not always first


def test_samples_are_seeded_and_default_to_held_out_openings(built):
    _, m = built
    samples = _report(m)["samples"]
    assert len(samples) == 2 and all(s["prompt"] for s in samples)  # no prompts configured: held-out openings
    assert [s["seed"] for s in samples] == [1337, 1338]


def test_mismatched_tokenizer_is_a_clear_error(built, tmp_path: Path):
    from storage.artifacts import StageContext
    from tasks.config import EvaluateConfig
    from tasks.data.tokenizer import new_bpe
    from tasks.evaluation.evaluate import evaluate

    cfg, m = built
    tok, trainer = new_bpe(cfg.tokenizer.model_copy(update={"vocab_size": 280}))
    tok.train_from_iterator(["some text to learn a different vocabulary"], trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="pass the tokenizer the model was trained with"):
        evaluate(m["train"].file(""), tmp_path, {}, 0, EvaluateConfig(), 0, StageContext(tmp_path, tmp_path))


# --- run report and lineage -------------------------------------------------------------------------------------


def test_run_report_is_self_contained_compares_runs_and_lands_in_lineage(built, tmp_path: Path):
    cfg, m = built
    store = ArtifactStore(tmp_path / "reports-root")
    lineage = LineageStore(store.lineage_path)
    for run_id in ("run-a", "run-b"):
        lineage.start_run(run_id, cfg.name, {}, cfg.seed, None)
        run, paths = publish_run_report(store, lineage, run_id, cfg.name, m)
    assert run["previous_run"] == "run-a"
    page = paths["html"].read_text()
    assert 'src="data:image/png;base64,' in page  # the train stage's loss curve, embedded
    assert "http" not in page and "<link" not in page  # self-contained
    assert "<table>" in page and "<h2>Training</h2>" in page  # Markdown rendered (tables, headings)
    text = paths["markdown"].read_text()
    for needle in ("## Data", "exact_duplicate", "## Training", "bigram", "## Probes", "## Samples", "(+0.0000)"):
        assert needle in text, needle
    assert "## Verdict" in text and "the model" in text and "Kneser-Ney bigram by" in text
    assert "trained with GPT-2 + AdamW + cosine schedule" in text and "another tokenizer" not in text
    rows = lineage.metrics("run-b")
    values = {(r["stage"], r["split"], r["source"], r["scorer"], r["metric"]): r["value"] for r in rows}
    test = _report(m)["splits"]["test"]
    assert values[("evaluate", "test", "all", "model", "bits_per_byte")] == pytest.approx(
        test["model"]["bits_per_byte"]
    )
    assert values[("evaluate", "test", "docs", "bigram", "loss")] == pytest.approx(
        test["sources"]["docs"]["bigram"]["loss"]
    )
    assert values[("dedup", None, None, None, "dropped.exact_duplicate")] == 2
    assert any(r["stage"] == "train" and r["step"] for r in rows)
    assert len(lineage.query("SELECT * FROM samples WHERE run_id = 'run-b'")) == 2
    assert {r["format"] for r in lineage.query("SELECT format FROM reports WHERE run_id = 'run-b'")} == {
        "markdown",
        "html",
    }


def test_verdicts_say_when_the_model_loses_to_a_baseline():
    from tasks.reporting.verdicts import recipe_text, verdict_text

    losing = {"bits_per_byte": 2.145, "bigram_bits_per_byte": 2.028, "unigram_bits_per_byte": 3.9}
    text = verdict_text("val", losing)
    assert "beats the unigram by 1.7550 bits/byte" in text
    assert "LOSES to the Kneser-Ney bigram by 0.1170 bits/byte (2.1450 vs 2.0280)" in text
    assert text.endswith("not a good model yet: it loses to the Kneser-Ney bigram")
    assert "not a good model" not in verdict_text("val", losing | {"bits_per_byte": 1.9})
    modern = recipe_text({"arch": "modern", "mlp": "relu2"}, {"optimizer": "muon", "schedule": "wsd", "align": "bos"})
    assert modern == "modern (ReLU² MLP) + Muon + AdamW + WSD schedule, document-aligned windows"


def test_previous_run_with_another_tokenizer_is_compared_in_bits_per_byte_only(built):
    from tasks.reporting.report import build_run_report, previous_values, render_run_markdown

    cfg, m = built
    now = build_run_report("run-a", cfg.name, m, None, [])
    before = [r | {"value": r["value"] + 0.5} for r in now["rows"] if isinstance(r["value"], float)]
    same = render_run_markdown(build_run_report("run-b", cfg.name, m, "run-a", before, m["tokenizer"].content_hash))
    other = render_run_markdown(build_run_report("run-b", cfg.name, m, "run-a", before, "another-tokenizer"))
    assert same.count("(-0.5000)") > other.count("(-0.5000)") > 0  # loss and bits/byte, then bits/byte alone
    assert "another tokenizer, so only bits/byte is compared" in other and "another tokenizer" not in same
    assert previous_values(before)


# --- export -------------------------------------------------------------------------------------------------------


def test_export_round_trips_into_tokenmill(built, tmp_path: Path):
    _, m = built
    model = load_model(m["train"].file(""))
    exported = load_export(m["export"].file(""))
    idx = torch.randint(0, model.cfg.vocab_size, (2, model.cfg.block_size))
    assert torch.equal(model(idx)[0], exported(idx)[0])
    assert find_tokenizer(m["train"].file("")) == m["tokenizer"].file("tokenizer.json")
    assert find_tokenizer(m["export"].file("")) == m["export"].file("tokenizer.json")


def test_export_loads_in_transformers_with_matching_logits(built, monkeypatch):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, m = built
    folder = m["export"].file("")
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    assert type(hf).__name__ == "GPT2LMHeadModel"
    assert tokenizer.model_max_length == hf.config.n_positions
    ours = load_model(m["train"].file(""))
    text = "The quick brown fox jumps over lazy dogs while data engineers build"
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert ids[0].tolist() == find_tokenizer_ids(m, text)
    ids = ids[:, : hf.config.n_positions - 8]  # room for 8 generated tokens
    with torch.no_grad():
        theirs = hf(ids).logits
    assert torch.allclose(theirs, ours(ids)[0], atol=1e-4), (theirs - ours(ids)[0]).abs().max()
    greedy = hf.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=hf.config.eos_token_id)
    assert torch.equal(greedy, ours.generate(ids, 8, temperature=0))


@pytest.mark.parametrize("mlp", ["relu2", "swiglu"])
def test_modern_export_loads_in_transformers_as_qwen3_with_matching_logits_and_greedy_tokens(
    built, tmp_path: Path, monkeypatch, mlp
):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg, m = built
    trained = load_model(m["train"].file(""))
    sizes = {k: getattr(trained.cfg, k) for k in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd")}
    torch.manual_seed(0)
    ours = GPT(GPTConfig(**sizes, arch="modern", mlp=mlp)).eval()
    with torch.no_grad():  # zero-initialised projections would hide the blocks: perturb every weight
        for p in ours.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_model(ours, ours.cfg, tmp_path)
    tokenizer_path = m["tokenizer"].file("tokenizer.json")
    counts = export_model(tmp_path, tokenizer_path, cfg.tokenizer.special_tokens, tmp_path / "hf")
    assert counts["format"] == "transformers/Qwen3ForCausalLM"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert type(hf).__name__ == "Qwen3ForCausalLM" and hf.config.hidden_act == ("relu" if mlp == "relu2" else "silu")
    ids = tokenizer("The quick brown fox jumps over lazy dogs while", return_tensors="pt").input_ids
    ids = ids[:, : hf.config.max_position_embeddings - 8]
    with torch.no_grad():
        theirs = hf(ids).logits
    assert torch.allclose(theirs, ours(ids)[0], atol=1e-4), (theirs - ours(ids)[0]).abs().max()
    greedy = hf.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=hf.config.eos_token_id)
    assert torch.equal(greedy, ours.generate(ids, 8, temperature=0))
    assert torch.equal(load_export(tmp_path / "hf")(ids)[0], ours(ids)[0])  # and back into tokenmill


def find_tokenizer_ids(m, text: str) -> list[int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(m["tokenizer"].file("tokenizer.json"))).encode(text).ids


# --- CLI (no Prefect) ---------------------------------------------------------------------------------------------


def test_cli_generate_from_train_artifact_and_export_and_cli_export(built, tmp_path: Path):
    from flows.cli import app

    _, m = built
    runner = CliRunner()
    args = ["--tokens", "6", "--temperature", "0"]
    from_train = runner.invoke(app, ["generate", "The quick", "--model", str(m["train"].file("")), *args])
    from_export = runner.invoke(app, ["generate", "The quick", "--model", str(m["export"].file("")), *args])
    assert from_train.exit_code == 0, from_train.output
    assert from_train.output == from_export.output and from_train.output.startswith("The quick")
    out = tmp_path / "exported"
    result = runner.invoke(app, ["export", "--model", str(m["train"].file("")), "--out", str(out)])
    assert result.exit_code == 0, result.output
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file()
    assert (out / "model.safetensors").read_bytes() == m["export"].file("model.safetensors").read_bytes()
    missing = runner.invoke(app, ["generate", "x", "--model", str(tmp_path)])
    assert missing.exit_code == 2 and "is neither a train artifact" in " ".join(missing.output.split())  # rich wraps


def test_export_refuses_a_tokenizer_of_another_size(built, tmp_path: Path):
    cfg, m = built
    other = tmp_path / "tokenizer.json"
    data = json.loads(m["tokenizer"].file("tokenizer.json").read_text())
    data["model"]["vocab"] = dict(list(data["model"]["vocab"].items())[:-5])
    data["model"]["merges"] = []
    other.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="trained with"):
        export_model(m["train"].file(""), other, cfg.tokenizer.special_tokens, tmp_path / "out")
    assert not os.path.exists(tmp_path / "out" / "model.safetensors")
