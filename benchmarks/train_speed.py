"""CPU training throughput of tokenmill's train stage against nanoGPT's ``train.py``, side by side in one run.

Both train the model of nanoGPT's ``train_shakespeare_char`` recipe at n_layer=4, n_head=4, n_embd=128,
block_size=128, batch_size=12, dropout 0.2, biases on (tokenmill's GPT-2 layout), float32, no compile, on the
same character-level data (65 symbols: the 64 most frequent characters of this Python's standard library
sources plus one catch-all), with the same torch thread count. Runs alternate (A B A B …) so load changes
on a shared machine hit both; ``--concurrent`` runs each pair at the same time instead, so both see the same
outside load. Throughput is measured in steady state, after ``--skip`` steps, excluding evaluation: nanoGPT
from its per-iteration times, tokenmill from its per-eval-interval telemetry.

nanoGPT is never vendored: pass ``--nanogpt`` a checkout or a bare git directory of
https://github.com/karpathy/nanoGPT; its ``train.py``, ``model.py``, ``configurator.py`` and config
are copied into the work folder at run time. The data preparation is ours (nanoGPT's downloads).

It also measures the loader alone (windows/s) against what training consumes.

``--to-loss`` compares recipes rather than kernels: nanoGPT trains ``--iters`` steps with its own recipe
(GPT-2 layout, AdamW, cosine, dropout 0.2) and reports its final val loss; at the same time tokenmill trains
the same model size on the same data with the modern recipe (rotary, RMSNorm, QK-norm, ReLU², untied
head, Muon, WSD, no dropout), evaluating every ``--skip`` steps, and the result is the training time
tokenmill needed to reach nanoGPT's final val loss, as a fraction of nanoGPT's training time. Both
estimate val loss over 240 windows (nanoGPT: 20 random batches of 12; tokenmill: its fixed first 240).

    python benchmarks/train_speed.py --nanogpt PATH/TO/nanoGPT
    python benchmarks/train_speed.py --nanogpt PATH/TO/nanoGPT --to-loss --iters 600 --skip 50 --concurrent --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from storage.shards import write_token_shard  # noqa: E402

NANOGPT_FILES = ("train.py", "model.py", "configurator.py", "config/train_shakespeare_char.py")
MODEL = {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 128, "dropout": 0.2}
BATCH_SIZE = 12
VOCAB = 65
DATASET = "bench_char"


def build_char_data(work: Path, max_chars: int) -> dict[str, Path]:
    """Char-level tokens of stdlib sources: nanoGPT's .bin/meta.pkl layout and tokenmill Arrow shards."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    parts, total = [], 0
    for path in files:
        text = path.read_text(errors="replace")
        parts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    text = "".join(parts)[:max_chars]
    chars = [c for c, _ in Counter(text).most_common(VOCAB - 1)]
    stoi = {c: i for i, c in enumerate(chars)}
    ids = np.fromiter((stoi.get(c, VOCAB - 1) for c in text), dtype=np.uint16, count=len(text))
    split = int(0.9 * len(ids))
    data_dir = work / "data" / DATASET
    data_dir.mkdir(parents=True, exist_ok=True)
    ids[:split].tofile(data_dir / "train.bin")
    ids[split:].tofile(data_dir / "val.bin")
    with open(data_dir / "meta.pkl", "wb") as fh:
        pickle.dump({"vocab_size": VOCAB, "itos": dict(enumerate(chars)), "stoi": stoi}, fh)
    shards = work / "shards"
    shards.mkdir(exist_ok=True)
    write_token_shard(shards / "train-00000.arrow", ids[:split])
    write_token_shard(shards / "val-00000.arrow", ids[split:])
    return {"train": shards / "train-00000.arrow", "val": shards / "val-00000.arrow", "tokens": len(ids)}


def extract_nanogpt(source: Path, work: Path) -> Path:
    """Copy nanoGPT's training files from a checkout or a (bare) git directory into ``work/nanogpt``."""
    target = work / "nanogpt"
    (target / "config").mkdir(parents=True, exist_ok=True)
    is_checkout = (source / "train.py").is_file()
    for name in NANOGPT_FILES:
        if is_checkout:
            content = (source / name).read_bytes()
        else:
            content = subprocess.run(
                ["git", "--git-dir", str(source), "show", f"HEAD:{name}"], capture_output=True, check=True
            ).stdout
        (target / name).write_bytes(content)
    (target / "data").symlink_to(work / "data", target_is_directory=True)
    return target


EVAL_BATCHES = 20  # val loss over 20 batches of 12 windows, in both


def start_nanogpt(folder: Path, iters: int, evaluate: bool = False) -> subprocess.Popen:
    """Start nanoGPT's train.py; its steady-state tokens/s comes from its per-iteration log lines."""
    args = [
        sys.executable,
        "train.py",
        "config/train_shakespeare_char.py",
        "--device=cpu",
        "--compile=False",
        "--dtype=float32",
        f"--n_layer={MODEL['n_layer']}",
        f"--n_head={MODEL['n_head']}",
        f"--n_embd={MODEL['n_embd']}",
        f"--block_size={MODEL['block_size']}",
        f"--batch_size={BATCH_SIZE}",
        f"--dropout={MODEL['dropout']}",
        "--bias=True",
        f"--dataset={DATASET}",
        f"--max_iters={iters}",
        f"--lr_decay_iters={iters}",
        "--warmup_iters=5",
        f"--eval_interval={iters if evaluate else 1000000}",
        f"--eval_iters={EVAL_BATCHES if evaluate else 1}",
        "--log_interval=1",
        "--out_dir=out",
    ]
    return subprocess.Popen(args, cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def nanogpt_log(proc: subprocess.Popen) -> str:
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"nanoGPT failed:\n{stdout[-2000:]}\n{stderr[-3000:]}")
    return stdout


def nanogpt_iteration_seconds(stdout: str) -> dict[int, float]:
    pattern = r"iter (\d+): loss [\d.]+, time ([\d.]+)ms"
    return {int(m[1]): float(m[2]) / 1000 for m in re.finditer(pattern, stdout)}


def nanogpt_tokens_per_s(proc: subprocess.Popen, skip: int) -> float:
    times = nanogpt_iteration_seconds(nanogpt_log(proc))
    steady = [dt for i, dt in times.items() if i >= skip]
    return BATCH_SIZE * MODEL["block_size"] * len(steady) / sum(steady)


OURS = """
import json, sys
from pathlib import Path
from storage.artifacts import StageContext
from tasks.config import ModelConfig, TrainConfig
from tasks.training.train import train
a = json.loads(sys.argv[1])
work = Path(a["work"])
(work / "out").mkdir(parents=True)
ctx = StageContext(out_dir=work / "out", work_dir=work / "work", log=lambda m: None)
cfg = TrainConfig(**{"max_steps": a["iters"], "batch_size": a["batch_size"], "warmup_steps": 5, "learning_rate": 1e-3,
                     "eval_interval": a["interval"], "eval_batches": 1, "checkpoint_interval": 10**6,
                     "device": "cpu"} | a["overrides"])
counts = train([Path(a["train"])], [Path(a["val"])], a["vocab"], ModelConfig(**a["model"]), cfg, 1337, ctx)
print("TELEMETRY", json.dumps(counts["telemetry"]))
"""


# the modern recipe at nanoGPT's model size (--to-loss)
MODERN_MODEL = MODEL | {"arch": "modern", "mlp": "relu2", "dropout": 0.0}
MODERN_TRAIN = {"optimizer": "muon", "schedule": "wsd", "eval_batches": EVAL_BATCHES, "learning_rate": 3e-3}


def start_tokenmill(
    work: Path, data: dict, iters: int, skip: int, model: dict = MODEL, train: dict | None = None
) -> subprocess.Popen:
    """Start tokenmill's train stage; its steady-state tokens/s comes from telemetry after ``skip`` steps."""
    args = {
        "work": str(work),
        "train": str(data["train"]),
        "val": str(data["val"]),
        "vocab": VOCAB,
        "model": model,
        "iters": iters,
        "batch_size": BATCH_SIZE,
        "interval": skip,
        "overrides": train or {},
    }
    return subprocess.Popen(
        [sys.executable, "-c", OURS, json.dumps(args)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def tokenmill_telemetry(proc: subprocess.Popen) -> list[dict]:
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"tokenmill failed:\n{stdout[-2000:]}\n{stderr[-3000:]}")
    return json.loads(stdout.split("TELEMETRY ", 1)[1])


def tokenmill_tokens_per_s(proc: subprocess.Popen, skip: int) -> float:
    rows = tokenmill_telemetry(proc)
    steady = rows[1:]  # the first interval holds start-up
    seconds = sum(BATCH_SIZE * MODEL["block_size"] * skip / r["tokens_per_s"] for r in steady)
    return BATCH_SIZE * MODEL["block_size"] * skip * len(steady) / seconds


def loader_windows_per_s(data: dict, seconds: float = 2.0) -> float:
    """Windows/s of the training loader alone: sample, gather from the memory-map, make tensors."""
    from tasks.training.loader import TokenWindows, WindowSampler

    windows = TokenWindows([data["train"]], MODEL["block_size"])
    sampler = WindowSampler(len(windows), seed=1)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        windows.batch(sampler.next(BATCH_SIZE))
        n += BATCH_SIZE
    return n / (time.perf_counter() - start)


def time_to_nanogpt_loss(folder: Path, work: Path, data: dict, iters: int, skip: int, concurrent: bool) -> dict:
    """nanoGPT's recipe for ``iters`` steps against tokenmill's modern recipe: time to reach its final val loss."""
    theirs_proc = start_nanogpt(folder, iters, evaluate=True)
    if not concurrent:
        theirs_log = nanogpt_log(theirs_proc)
    ours_proc = start_tokenmill(work / "tokenmill-to-loss", data, iters, skip, MODERN_MODEL, MODERN_TRAIN)
    theirs_log = nanogpt_log(theirs_proc) if concurrent else theirs_log
    ours = tokenmill_telemetry(ours_proc)
    target = float(re.findall(r"step \d+: train loss [\d.]+, val loss ([\d.]+)", theirs_log)[-1])
    seconds = nanogpt_iteration_seconds(theirs_log)
    theirs_seconds = sum(dt for i, dt in seconds.items() if i > 0)  # iteration 0 holds start-up and the first eval
    reached = next((r for r in ours if r["val_loss"] <= target), None)
    return {
        "steps": iters,
        "nanogpt_final_val_loss": target,
        "nanogpt_train_seconds": round(theirs_seconds, 1),
        "tokenmill_val_loss_curve": [(r["step"], round(r["val_loss"], 4), r["train_seconds"]) for r in ours],
        "tokenmill_steps_to_reach": reached["step"] if reached else None,
        "tokenmill_seconds_to_reach": reached["train_seconds"] if reached else None,
        "time_ratio": round(reached["train_seconds"] / theirs_seconds, 3) if reached else None,
        "concurrent": concurrent,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nanogpt", type=Path, required=True, help="nanoGPT checkout or bare git directory")
    parser.add_argument("--iters", type=int, default=60, help="training steps per run")
    parser.add_argument("--skip", type=int, default=10, help="start-up steps excluded from the timing")
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs of each")
    parser.add_argument("--chars", type=int, default=2_000_000, help="characters of data")
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument(
        "--concurrent", action="store_true", help="run each pair at the same time (for a busy shared machine)"
    )
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for both (default: torch's)")
    parser.add_argument(
        "--to-loss", action="store_true", help="time for tokenmill's modern recipe to reach nanoGPT's final val loss"
    )
    args = parser.parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    if args.iters % args.skip:
        parser.error("--iters must be a multiple of --skip")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="tokenmill-train-speed-"))
    data = build_char_data(work, args.chars)
    folder = extract_nanogpt(args.nanogpt, work)
    if args.to_loss:
        print(json.dumps(time_to_nanogpt_loss(folder, work, data, args.iters, args.skip, args.concurrent), indent=2))
        return
    ours, theirs = [], []
    for r in range(args.rounds):
        if args.concurrent:  # both at once: identical outside load, each gets about half the machine
            theirs_proc = start_nanogpt(folder, args.iters)
            ours_proc = start_tokenmill(work / f"tokenmill-{r}", data, args.iters, args.skip)
            theirs.append(nanogpt_tokens_per_s(theirs_proc, args.skip))
            ours.append(tokenmill_tokens_per_s(ours_proc, args.skip))
        else:
            theirs.append(nanogpt_tokens_per_s(start_nanogpt(folder, args.iters), args.skip))
            ours.append(
                tokenmill_tokens_per_s(start_tokenmill(work / f"tokenmill-{r}", data, args.iters, args.skip), args.skip)
            )
        print(f"round {r + 1}: nanoGPT {theirs[-1]:,.0f} tok/s, tokenmill {ours[-1]:,.0f} tok/s", flush=True)
    loader = loader_windows_per_s(data)
    consumed = statistics.median(ours) / MODEL["block_size"]
    result = {
        "model": MODEL | {"batch_size": BATCH_SIZE, "vocab": VOCAB, "dtype": "float32", "compile": False},
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "steps_per_run": args.iters,
        "concurrent": args.concurrent,
        "nanogpt_tokens_per_s": [round(x) for x in theirs],
        "tokenmill_tokens_per_s": [round(x) for x in ours],
        "ratio_tokenmill_over_nanogpt": round(statistics.median(ours) / statistics.median(theirs), 3),
        "loader_windows_per_s": round(loader),
        "training_windows_per_s": round(consumed, 1),
        "loader_margin": round(loader / consumed, 1),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
