"""The train stage: exact resume, batch geometry, checkpoints, DDP equivalence, telemetry, the loader."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import torch

from storage.artifacts import StageContext, StageKey
from storage.faults import InjectedFault
from storage.shards import write_token_shard
from tasks.config import ModelConfig, TrainConfig
from tasks.modeling.gpt import GPT, GPTConfig
from tasks.modeling.weights import MODEL_FILE, load_model
from tasks.training.checkpoints import load_latest_checkpoint
from tasks.training.distributed import DistEnv
from tasks.training.job import StepPlan, TrainingSetupError, TrainJob, UnrecoverableTrainingError
from tasks.training.loader import LoaderState, TokenWindows, WindowSampler, document_aligned_starts
from tasks.training.loop import LOG_FILE, LOSS_CURVE_FILE, run_training
from tasks.training.schedule import lr_at
from tasks.training.train import train
from tasks.training.validation import estimate_loss

VOCAB = 64
MODEL = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, dropout=0.1)


def _tokens(seed: int, n: int) -> np.ndarray:
    """A learnable sequence: repeated ramps with a little noise."""
    rng = np.random.default_rng(seed)
    base = (np.arange(n) * 7 // 3) % VOCAB
    noise = rng.integers(0, VOCAB, n)
    return np.where(rng.random(n) < 0.1, noise, base).astype(np.uint16)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, list[Path]]:
    folder = tmp_path_factory.mktemp("tokens")
    out: dict[str, list[Path]] = {"train": [], "val": []}
    for split, sizes in {"train": (1500, 900), "val": (600,)}.items():
        for i, n in enumerate(sizes):
            path = folder / f"{split}-{i:05d}.arrow"
            write_token_shard(path, _tokens(hash((split, i)) % 1000, n))
            out[split].append(path)
    return out


def _cfg(**overrides) -> TrainConfig:
    base = dict(
        max_steps=6,
        batch_size=4,
        grad_accum=2,
        warmup_steps=2,
        eval_interval=3,
        eval_batches=2,
        checkpoint_interval=2,
        keep_checkpoints=2,
        threads=1,
        device="cpu",
    )
    return TrainConfig(**(base | overrides))


def _ctx(tmp: Path, name: str, work: str = "work") -> StageContext:
    (tmp / name).mkdir(parents=True)
    return StageContext(out_dir=tmp / name, work_dir=tmp / work, log=lambda m: None)


def _run(shards, cfg: TrainConfig, ctx: StageContext, model: ModelConfig = MODEL) -> dict:
    return train(shards["train"], shards["val"], VOCAB, model, cfg, 7, ctx, eot_id=EOT)


EOT = 0  # the ramps pass through token 0 every few dozen tokens: the test corpus's "documents"
# (model overrides, train overrides): the GPT-2 recipe, and the modern one with every new option switched on
RECIPES = {
    "gpt2-adamw-cosine": ({"arch": "gpt2"}, {"optimizer": "adamw", "schedule": "cosine", "align": "none"}),
    "modern-muon-wsd-bos": ({"arch": "modern"}, {"optimizer": "muon", "schedule": "wsd", "align": "bos"}),
}
BOTH_RECIPES = pytest.mark.parametrize("recipe", list(RECIPES))


def _recipe(name: str, **train_overrides) -> tuple[ModelConfig, TrainConfig]:
    model, train_cfg = RECIPES[name]
    return MODEL.model_copy(update=model), _cfg(**(train_cfg | train_overrides))


def _bytes(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in (MODEL_FILE, LOG_FILE, LOSS_CURVE_FILE)}


@BOTH_RECIPES
def test_killed_and_resumed_training_is_bit_identical_to_a_straight_run(shards, tmp_path, monkeypatch, recipe):
    model, cfg = _recipe(recipe)
    straight = _run(shards, cfg, _ctx(tmp_path, "straight", "work-straight"), model)
    monkeypatch.setenv("TOKENMILL_FAULT", "train:step5")
    monkeypatch.setenv("TOKENMILL_FAULT_DIR", str(tmp_path / "faults"))
    with pytest.raises(InjectedFault):
        _run(shards, cfg, _ctx(tmp_path, "attempt1"), model)
    resumed = _run(shards, cfg, _ctx(tmp_path, "attempt2"), model)
    assert resumed["resumed_from_step"] == 4 and straight["resumed_from_step"] == 0
    assert _bytes(tmp_path / "attempt2") == _bytes(tmp_path / "straight")  # losses, val losses, weights, plot
    rows = [json.loads(line) for line in (tmp_path / "straight" / LOG_FILE).read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(r["grad_norm"] > 0 for r in rows) and "val_loss" in rows[2] and "val_loss" in rows[5]
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_checkpoints_keep_the_last_k_with_clean_keys_and_load_weights_only(shards, tmp_path):
    counts = _run(shards, _cfg(max_steps=9, checkpoint_interval=2, keep_checkpoints=2), _ctx(tmp_path, "out"))
    ckpts = sorted((tmp_path / "work" / "checkpoints").glob("ckpt-*.pt"))
    assert [p.name for p in ckpts] == ["ckpt-00000006.pt", "ckpt-00000008.pt"]
    state = load_latest_checkpoint(tmp_path / "work" / "checkpoints")  # weights_only=True inside
    assert state["step"] == 8 and state["loader"] == {"epoch": 0, "offset": 8 * 2 * 4, "consumed": None}
    assert not [k for k in state["model"] if k.startswith(("_orig_mod.", "module."))]
    assert {"cpu"} <= set(state["rng"][0]) and state["optimizer"]["state"]
    model = load_model(tmp_path / "out")
    assert model.num_params() == counts["params"]
    telemetry = counts["telemetry"]
    assert [t["step"] for t in telemetry] == [3, 6, 9]
    assert all(t["tokens_per_s"] > 0 and t["mfu"] is None and t["peak_mem_mb"] > 0 for t in telemetry)
    lines = (tmp_path / "work" / "telemetry.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [3, 6, 9]


def test_batch_tokens_and_token_budget_set_accumulation_and_steps():
    plan = StepPlan.of(_cfg(batch_tokens=4 * 16 * 2 * 3, max_tokens=1000), block_size=16, world_size=2)
    assert (plan.grad_accum, plan.tokens_per_step, plan.total_steps) == (3, 384, 3)
    assert StepPlan.of(_cfg(grad_accum=5), 16, 1).tokens_per_step == 5 * 4 * 16
    with pytest.raises(TrainingSetupError, match="multiple of batch_size"):
        StepPlan.of(_cfg(batch_tokens=100), 16, 1)


def test_resume_with_a_different_global_batch_is_refused(shards, tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENMILL_FAULT", "train:step3")
    monkeypatch.setenv("TOKENMILL_FAULT_DIR", str(tmp_path / "faults"))
    with pytest.raises(InjectedFault):
        _run(shards, _cfg(), _ctx(tmp_path, "a"))
    with pytest.raises(TrainingSetupError, match="tokens per step"):
        _run(shards, _cfg(grad_accum=3), _ctx(tmp_path, "b"))


def test_out_of_memory_on_the_first_step_is_not_retryable(shards, tmp_path, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("simulated")

    monkeypatch.setattr("tasks.modeling.gpt.GPT.forward", oom)
    with pytest.raises(UnrecoverableTrainingError, match="out of memory on the first step") as info:
        _run(shards, _cfg(), _ctx(tmp_path, "out"))
    assert info.value.retryable is False


def test_model_presets_fill_sizes_and_explicit_fields_override():
    assert ModelConfig(preset="gpt2-124M", arch="gpt2").sizes() == {
        "n_layer": 12,
        "n_head": 12,
        "n_embd": 768,
        "block_size": 1024,
        "dropout": 0.0,
        "arch": "gpt2",
        "mlp": "swiglu",
    }
    assert ModelConfig(preset="gpt2-124M", block_size=256).block_size == 256
    with pytest.raises(ValueError, match="preset"):
        ModelConfig(preset="gpt5")


def test_schedules_warm_up_then_cosine_or_hold_and_decay_linearly():
    cosine = _cfg(max_steps=100, warmup_steps=10, learning_rate=1.0, min_lr_ratio=0.1, schedule="cosine")
    wsd = cosine.model_copy(update={"schedule": "wsd", "decay_fraction": 0.2})
    for cfg in (cosine, wsd):
        assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(99, wsd) == pytest.approx(0.1) and lr_at(100, cosine) == pytest.approx(0.1)  # the floor
    assert [lr_at(s, wsd) for s in (10, 50, 79)] == [1.0, 1.0, 1.0]  # stable until the last 20 steps
    assert lr_at(89, wsd) == pytest.approx(0.1 + 0.9 * 10 / 20)  # then a straight line down
    assert lr_at(50, cosine) < 1.0


def test_muon_moves_the_hidden_matrices_and_adamw_the_rest():
    from tasks.modeling.gpt import GPT, GPTConfig
    from tasks.training.optim import MuonAdamW, build_optimizer

    model = GPT(GPTConfig(vocab_size=VOCAB, block_size=16, n_layer=2, n_head=2, n_embd=32, arch="modern", mlp="relu2"))
    optimizer = build_optimizer(model, _cfg(optimizer="muon", learning_rate=1e-3, muon_learning_rate=0.02), "cpu")
    assert isinstance(optimizer, MuonAdamW)
    muon = {id(p) for g in optimizer.muon.param_groups for p in g["params"]}
    adam = {id(p) for g in optimizer.adam.param_groups for p in g["params"]}
    assert muon == {id(p) for p in model.hidden_matrices()} and len(muon) == 2 * 6  # q k v o up down per block
    assert id(model.wte.weight) in adam and id(model.lm_head.weight) in adam and not muon & adam
    assert len(muon | adam) == len(list(model.parameters()))
    assert {g["lr_scale"] for g in optimizer.param_groups} == {20.0, 1.0}


# --- loader ----------------------------------------------------------------------------------------------------


def test_loader_gathers_the_same_windows_as_indexing_one_by_one(shards):
    windows = TokenWindows(shards["train"], 16)
    first = (1500 - 1) // 16  # windows in the first shard
    raw = [windows.shards[0][i * 16 : i * 16 + 17] for i in range(first)]
    raw += [windows.shards[1][i * 16 : i * 16 + 17] for i in range(len(windows) - first)]
    indices = np.array([0, len(windows) - 1, first - 1, first, 5, first - 1])  # both shards, repeats
    np.testing.assert_array_equal(windows.gather(indices), np.stack([raw[i] for i in indices]))
    single = TokenWindows(shards["train"][:1], 16)
    in_first = indices[indices < first]
    np.testing.assert_array_equal(single.gather(in_first), np.stack([raw[i] for i in in_first]))
    with pytest.raises(IndexError):
        windows.gather(np.array([len(windows)]))
    x, y = windows.batch(indices)
    assert torch.equal(x[:, 1:], y[:, :-1]) and x.dtype == torch.int64


def test_document_aligned_windows_start_at_document_starts(tmp_path):
    tokens = np.array([5, 6, 0, 7, 8, 9, 10, 11, 12, 13, 14, 0, 1, 2, 3, 4, 5, 6, 0], dtype=np.uint16)
    write_token_shard(tmp_path / "t.arrow", tokens)
    # documents start at 0, 3 and 12; the 9-token one also gets windows at 7 and 11; 16 would run past the end
    assert document_aligned_starts(tokens, 4, eot=0).tolist() == [0, 3, 7, 11, 12]
    windows = TokenWindows([tmp_path / "t.arrow"], 4, eot=0)
    assert len(windows) == 5
    assert windows.gather(np.array([1, 4])).tolist() == [[7, 8, 9, 10, 11], [1, 2, 3, 4, 5]]
    assert windows.gather(np.array([2])).tolist() == [[11, 12, 13, 14, 0]]  # a long document's next block


def test_sampler_position_reshards_exactly_across_world_sizes():
    single = WindowSampler(50, seed=3)
    stream = np.concatenate([single.next(6) for _ in range(30)])  # crosses several epochs
    assert sorted(stream[:50]) == list(range(50)) and sorted(stream[50:100]) == list(range(50))
    # two ranks of 3 consume the same 6 windows per step; then resume the position on three ranks of 2
    ranks = [WindowSampler(50, seed=3, rank=r, world_size=2) for r in range(2)]
    two = [np.stack([s.next(3) for s in ranks], axis=1).reshape(-1) for _ in range(10)]
    state = ranks[0].state
    three = [WindowSampler(50, 3, rank=r, world_size=3, state=LoaderState(state.epoch, state.offset)) for r in range(3)]
    rest = [np.stack([s.next(2) for s in three], axis=1).reshape(-1) for _ in range(20)]
    np.testing.assert_array_equal(np.concatenate(two + rest), stream)


# --- distributed -------------------------------------------------------------------------------------------------


def _job_dir(tmp: Path, shards, cfg: TrainConfig, model: ModelConfig) -> Path:
    job_dir = tmp / "job"
    job_dir.mkdir(parents=True)
    (tmp / "out").mkdir()
    job = TrainJob.build(shards["train"], shards["val"], VOCAB, model, cfg, 7, eot_id=EOT)
    (job_dir / "job.json").write_text(job.to_json())
    (job_dir / "paths.json").write_text(json.dumps({"out_dir": str(tmp / "out"), "work_dir": str(tmp / "work")}))
    return job_dir


@pytest.mark.slow
@BOTH_RECIPES
def test_two_gloo_processes_match_one_process_at_the_same_global_batch(shards, tmp_path, monkeypatch, recipe):
    import torch.multiprocessing as mp

    from tasks.training.worker import spawn_entry

    model, cfg = _recipe(recipe, max_steps=4, batch_size=2, grad_accum=1, batch_tokens=2 * 2 * 16 * 2, eval_interval=2)
    model = model.model_copy(update={"dropout": 0.0})
    single = run_training(
        TrainJob.build(shards["train"], shards["val"], VOCAB, model, cfg, 7, eot_id=EOT),
        _ctx(tmp_path, "single", "single-work"),
        DistEnv(),
    )
    job_dir = _job_dir(tmp_path / "ddp", shards, cfg.model_copy(update={"nproc": 2}), model)
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")  # gloo pairs on loopback only
    mp.spawn(spawn_entry, args=(2, f"file://{tmp_path / 'rendezvous'}", str(job_dir)), nprocs=2, join=True)
    ddp = json.loads((job_dir / "result.json").read_text())
    assert ddp["world_size"] == 2 and ddp["grad_accum"] == 2 and single["grad_accum"] == 4
    assert ddp["tokens_trained"] == single["tokens_trained"]
    for a, b in zip(single["telemetry"], ddp["telemetry"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
    ref, got = load_model(tmp_path / "single"), load_model(tmp_path / "ddp" / "out")
    for (name, p), q in zip(ref.named_parameters(), got.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
    # the 2-process checkpoint (step 2) resumes on 1 process: same windows, same global batch, same losses
    job = TrainJob.build(shards["train"], shards["val"], VOCAB, model, cfg, 7, eot_id=EOT)
    (tmp_path / "resumed").mkdir()
    resumed = run_training(job, StageContext(tmp_path / "resumed", tmp_path / "ddp" / "work"), DistEnv())
    assert resumed["resumed_from_step"] == 2
    assert resumed["telemetry"][-1]["loss"] == pytest.approx(single["telemetry"][-1]["loss"], rel=1e-5)


def _can_unshare() -> bool:
    if not shutil.which("unshare") or not shutil.which("ip"):
        return False
    return subprocess.run(["unshare", "-n", "ip", "link", "set", "lo", "up"], capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _can_unshare(), reason="needs `unshare -n` (a private network namespace) for torchrun")
def test_train_stage_launches_torchrun_for_several_processes(shards, tmp_path):
    """The stage itself starts torchrun (in a private network namespace: its store listens on all interfaces)."""
    cfg = _cfg(max_steps=2, batch_size=2, grad_accum=1, eval_interval=2, nproc=2)
    args = {
        "out": str(tmp_path / "out"),
        "work": str(tmp_path / "work"),
        "train": [str(p) for p in shards["train"]],
        "val": [str(p) for p in shards["val"]],
        "model": MODEL.model_dump(),
        "cfg": cfg.model_dump(),
    }
    script = f"""
import json
from pathlib import Path
from storage.artifacts import StageContext
from tasks.config import ModelConfig, TrainConfig
from tasks.training.train import train
from tasks.training.validation import estimate_loss
a = json.loads({json.dumps(args)!r})
progress = []
ctx = StageContext(Path(a["out"]), Path(a["work"]), log=print, progress=lambda f, m: progress.append(f))
counts = train([Path(p) for p in a["train"]], [Path(p) for p in a["val"]], {VOCAB},
               ModelConfig(**a["model"]), TrainConfig(**a["cfg"]), 7, ctx)
print("RESULT", json.dumps({{"world": counts["world_size"], "steps": counts["steps"], "progress": progress}}))
"""
    (tmp_path / "out").mkdir()
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" -c "$1"', sys.executable, script],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(done.stdout.split("RESULT ", 1)[1])
    assert (result["world"], result["steps"], result["progress"][-1]) == (2, 2, 1.0)
    assert all(0 < f <= 1 for f in result["progress"])  # progress between evals depends on time, the end does not
    assert (tmp_path / "out" / MODEL_FILE).exists()


# --- orchestration glue (no Prefect server needed) ----------------------------------------------------------------


def test_prefect_retries_every_failure_except_unrecoverable_ones():
    from prefect.states import Failed

    from flows.pipeline import retry_unless_unrecoverable

    assert retry_unless_unrecoverable(None, None, Failed(data=InjectedFault("transient")))
    assert not retry_unless_unrecoverable(None, None, Failed(data=UnrecoverableTrainingError("first-step OOM")))
    assert not retry_unless_unrecoverable(None, None, Failed(data=TrainingSetupError("bad batch geometry")))


def test_only_a_cuda_train_stage_takes_the_gpu_slot(corpus, tmp_path):
    from flows.pipeline import uses_gpu
    from tests.support.corpus import tiny_config

    cfg = tiny_config(corpus, tmp_path / "root", train={"device": "cpu"})
    assert not uses_gpu("train", cfg) and not uses_gpu("evaluate", cfg)
    assert uses_gpu("train", cfg.model_copy(update={"train": cfg.train.model_copy(update={"device": "cuda"})}))


def test_train_telemetry_lands_in_the_lineage_db(shards, tmp_path):
    from storage.artifacts import ArtifactStore
    from storage.lineage import LineageStore

    store = ArtifactStore(tmp_path / "root")
    cfg = _cfg()

    def produce(ctx: StageContext) -> dict:
        return _run(shards, cfg, ctx)

    manifest, _ = store.build(
        StageKey(stage="train", version="test", params={"cfg": cfg.model_dump()}, inputs=[]),
        produce,
        run_id="r1",
        log=lambda m: None,
    )
    lineage = LineageStore(store.lineage_path)
    lineage.start_run("r1", "tiny", {}, 7, None)
    lineage.record_stage("r1", "train", "completed", datetime.now(UTC), manifest=manifest)
    rows = lineage.train_metrics(manifest.fingerprint)
    assert [r["step"] for r in rows] == [3, 6]
    assert all(r["tokens_per_s"] > 0 and r["mfu"] is None and r["val_loss"] > 0 for r in rows)
    assert {f.path for f in manifest.files} == {MODEL_FILE, LOG_FILE, LOSS_CURVE_FILE, "model.json"}


@pytest.mark.parametrize("val_tokens", [None, 16], ids=["no-val-shard", "val-shorter-than-a-window"])
def test_an_empty_validation_split_is_a_setup_error_before_training(shards, tmp_path, val_tokens):
    """No validation window (block_size + 1 tokens) means no val_loss: a clear error, never a recorded 0.0."""
    val = []
    if val_tokens is not None:
        val = [tmp_path / "val-00000.arrow"]
        write_token_shard(val[0], _tokens(3, val_tokens))
    ctx = _ctx(tmp_path, "out")
    with pytest.raises(
        TrainingSetupError,
        match=r"validation split has \d+ tokens \(\d shards?\), fewer than one window of model.block_size \+ 1 = 17",
    ) as err:
        train(shards["train"], val, VOCAB, MODEL, _cfg(), 7, ctx)
    assert "lower model.block_size" in str(err.value)
    assert not ctx.work_dir.exists() and not any(ctx.out_dir.iterdir())  # nothing ran, nothing written
    model = GPT(GPTConfig(vocab_size=VOCAB, **MODEL.sizes()))
    with pytest.raises(TrainingSetupError, match="no validation windows"):
        estimate_loss(model, TokenWindows(val, MODEL.block_size), 8, 4, torch.device("cpu"))
