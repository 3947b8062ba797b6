"""Training recipes at equal wall time on the quickstart's own shards: val bits-per-byte and tokens/s, side by side.

The quickstart's train budget is its wall-clock time: ``train.max_steps`` steps of the baseline recipe
(GPT-2 + AdamW + cosine). First every recipe runs ``--calibrate`` steps at the same time as the others,
which measures its seconds per step under the same load; then each gets as many steps as fit in the
baseline's budget, and all train again at the same time (one torch thread each), so outside load hits them
alike. Each run ends with the whole val split scored (``tasks.evaluation.evaluate.token_nll``) in
bits-per-byte, which compares models across tokenizers and windows.

Needs a data root where the quickstart has run up to ``tokenize`` (``tokenmill run`` or ``tokenmill stage``):

    python benchmarks/recipe.py --root ./data
    python benchmarks/recipe.py --root ./data --recipes modern-muon-wsd-none modern-swiglu-muon-wsd modern-muon-wsd-bos

Recipes are named overrides of the config's model and train sections (``RECIPES``); ``--variant`` adds more:

    python benchmarks/recipe.py --root ./data --variant no-wd modern-swiglu-muon-wsd train.weight_decay=0
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from storage.artifacts import ArtifactStore  # noqa: E402
from tasks.config import PipelineConfig  # noqa: E402

BASELINE = "gpt2-adamw-cosine"
RECIPES: dict[str, dict[str, dict]] = {
    BASELINE: {  # the GPT-2 recipe at its own best rate (6e-3 measured worse: docs/training.md)
        "model": {"arch": "gpt2"},
        "train": {"optimizer": "adamw", "schedule": "cosine", "align": "none", "learning_rate": 3e-3},
    },
    "modern-adamw-cosine": {"model": {"arch": "modern"}, "train": {"optimizer": "adamw", "schedule": "cosine"}},
    "modern-muon-wsd": {"model": {"arch": "modern", "mlp": "relu2"}, "train": {"optimizer": "muon", "schedule": "wsd"}},
    "modern-swiglu-muon-wsd": {
        "model": {"arch": "modern", "mlp": "swiglu"},
        "train": {"optimizer": "muon", "schedule": "wsd"},
    },
    "modern-muon-wsd-bos": {
        "model": {"arch": "modern", "mlp": "relu2"},
        "train": {"optimizer": "muon", "schedule": "wsd", "align": "bos"},
    },
    "modern-muon-wsd-none": {
        "model": {"arch": "modern", "mlp": "relu2"},
        "train": {"optimizer": "muon", "schedule": "wsd", "align": "none"},
    },
    "gpt2-muon-wsd": {"model": {"arch": "gpt2"}, "train": {"optimizer": "muon", "schedule": "wsd"}},
}

ONE_RUN = """
import json, math, sys, time
from pathlib import Path
import numpy as np, torch
from tokenizers import Tokenizer
from storage.artifacts import StageContext
from storage.shards import read_token_shard
from tasks.config import ModelConfig, TrainConfig
from tasks.evaluation.evaluate import token_byte_lengths, token_nll
from tasks.modeling.weights import load_model
from tasks.training.train import train
a = json.loads(sys.argv[1])
torch.set_num_threads(1)
work = Path(a["work"])
(work / "out").mkdir(parents=True)
ctx = StageContext(out_dir=work / "out", work_dir=work / "work", log=lambda m: None)
start = time.perf_counter()
counts = train([Path(p) for p in a["train"]], [Path(p) for p in a["val"]], a["vocab"], ModelConfig(**a["model"]),
               TrainConfig(**a["cfg"]), a["seed"], ctx, eot_id=a["eot"])
wall = time.perf_counter() - start
out = {"steps": counts["steps"], "train_seconds": counts["train_seconds"], "wall_seconds": round(wall, 2),
       "tokens_per_s": counts["tokens_per_s"], "params": counts["params"], "final_val_loss": counts["final_val_loss"]}
if a["score"]:
    model = load_model(work / "out")
    lengths = token_byte_lengths(Tokenizer.from_file(a["tokenizer"]))
    nats = n_bytes = n_tokens = 0
    for path in a["val"]:
        tokens = read_token_shard(Path(path))
        nats += float(token_nll(model, tokens, 32, torch.device("cpu"))[1:].sum())
        n_bytes += int(lengths[tokens[1:].astype(np.int64)].sum())
        n_tokens += len(tokens) - 1
    out |= {"val_loss": nats / n_tokens, "val_bpb": nats / math.log(2) / n_bytes}
print("RESULT", json.dumps(out))
"""


def quickstart_data(root: Path, cfg: PipelineConfig) -> dict:
    """Shards, vocabulary and tokenizer of the newest tokenize artifact under ``root``."""
    store = ArtifactStore(root)
    tokenize = store.published("tokenize")
    tokenizer = store.published("tokenizer")
    if not tokenize or not tokenizer:
        raise SystemExit(f"{root} has no tokenize artifact: run the quickstart up to tokenize first")
    m = max(tokenize, key=lambda x: Path(x.path).stat().st_mtime)
    tok = max(tokenizer, key=lambda x: Path(x.path).stat().st_mtime)
    return {
        "train": [str(p) for p in m.files_under("tokens/train-", ".arrow")],
        "val": [str(p) for p in m.files_under("tokens/val-", ".arrow")],
        "vocab": m.counts["vocab_size"],
        "eot": m.counts["eot_id"],
        "tokenizer": str(tok.file("tokenizer.json")),
    }


def baseline_bpb(data: dict) -> dict[str, float]:
    """Unigram and Kneser-Ney bigram bits-per-byte on the very val tokens the recipes are scored on."""
    import numpy as np
    from tokenizers import Tokenizer

    from storage.shards import read_token_shard
    from tasks.evaluation.baselines import fit_baselines
    from tasks.evaluation.evaluate import token_byte_lengths

    lengths = token_byte_lengths(Tokenizer.from_file(data["tokenizer"]))
    baselines = fit_baselines([Path(p) for p in data["train"]], data["vocab"])
    nats, n_bytes = dict.fromkeys((b.name for b in baselines), 0.0), 0
    for path in data["val"]:
        tokens = read_token_shard(Path(path)).astype(np.int64)
        for b in baselines:
            nats[b.name] -= float(b.log_prob(tokens[:-1], tokens[1:]).sum())
        n_bytes += int(lengths[tokens[1:]].sum())
    return {name: value / math.log(2) / n_bytes for name, value in nats.items()}


def variant(base: dict[str, dict], changes: list[str]) -> dict[str, dict]:
    """``base`` with ``section.field=value`` changes (values read as YAML: numbers, booleans, strings)."""
    import yaml

    recipe = {section: dict(fields) for section, fields in base.items()}
    for change in changes:
        path, _, value = change.partition("=")
        section, _, field = path.partition(".")
        if section not in ("model", "train") or not field or not _:
            raise SystemExit(f"--variant: {change!r} is not model.FIELD=VALUE or train.FIELD=VALUE")
        recipe.setdefault(section, {})[field] = yaml.safe_load(value)
    return recipe


def recipe_args(name: str, cfg: PipelineConfig, data: dict, steps: int, work: Path, score: bool) -> dict:
    recipe = RECIPES[name]
    model = cfg.model.model_dump() | recipe.get("model", {})
    train = cfg.train.model_dump() | recipe.get("train", {})
    train |= {"max_steps": steps, "threads": 1, "device": "cpu", "eval_interval": steps, "checkpoint_interval": 10**9}
    train["warmup_steps"] = min(train["warmup_steps"], steps // 4)
    return data | {"model": model, "cfg": train, "seed": cfg.seed, "work": str(work), "score": score}


def run_together(args_by_name: dict[str, dict]) -> dict[str, dict]:
    """Start every run at once; wait for all; their RESULT lines."""
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-c", ONE_RUN, json.dumps(a)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, a in args_by_name.items()
    }
    results = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate()
        if proc.returncode != 0 or "RESULT " not in stdout:
            raise RuntimeError(f"{name} failed:\n{stdout[-2000:]}\n{stderr[-3000:]}")
        results[name] = json.loads(stdout.split("RESULT ", 1)[1])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True, help="data root where the quickstart ran to tokenize")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "quickstart.yaml")
    parser.add_argument("--recipes", nargs="+", default=[BASELINE, "modern-swiglu-muon-wsd"], choices=sorted(RECIPES))
    parser.add_argument("--steps", type=int, default=None, help="baseline steps (default: the config's max_steps)")
    parser.add_argument("--calibrate", type=int, default=40, help="steps of the timing runs")
    parser.add_argument("--equal-steps", action="store_true", help="same steps for every recipe (no calibration)")
    parser.add_argument(
        "--steps-of",
        nargs="+",
        default=[],
        metavar="NAME=STEPS",
        help="steps for these recipes instead of calibrating (e.g. from an earlier calibration of the same models)",
    )
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument(
        "--variant",
        nargs="+",
        action="append",
        default=[],
        metavar="NAME BASE SECTION.FIELD=VALUE",
        help="a recipe NAME: recipe BASE with these model/train fields changed (repeatable; runs with --recipes)",
    )
    args = parser.parse_args()
    for name, base, *changes in args.variant:
        RECIPES[name] = variant(RECIPES[base], changes)
    cfg = PipelineConfig.from_yaml(args.config)
    data = quickstart_data(args.root, cfg)
    work = args.work or Path(tempfile.mkdtemp(prefix="tokenmill-recipe-"))
    base_steps = args.steps or cfg.train.max_steps
    names = [BASELINE] + [n for n in [*args.recipes, *(v[0] for v in args.variant)] if n != BASELINE]
    steps = {n: base_steps for n in names}
    seconds_per_step = {}
    fixed = {name: int(value) for name, _, value in (s.partition("=") for s in args.steps_of)}
    if fixed:
        steps |= fixed
    elif not args.equal_steps:
        timing = run_together(
            {n: recipe_args(n, cfg, data, args.calibrate, work / f"calibrate-{n}", False) for n in names}
        )
        seconds_per_step = {n: r["train_seconds"] / r["steps"] for n, r in timing.items()}
        budget = base_steps * seconds_per_step[BASELINE]
        steps = {n: max(int(budget / seconds_per_step[n]), 1) for n in names}
        print(f"calibration (s/step, all at once): {json.dumps({n: round(s, 4) for n, s in seconds_per_step.items()})}")
    results = run_together({n: recipe_args(n, cfg, data, steps[n], work / n, True) for n in names})
    base = results[BASELINE]["val_bpb"]
    print(f"{'recipe':28} {'steps':>6} {'train s':>8} {'tok/s':>8} {'val loss':>9} {'val bpb':>8} {'vs base':>8}")
    for n, r in results.items():
        r["bpb_vs_baseline"] = round(r["val_bpb"] / base - 1, 4)
        print(
            f"{n:28} {r['steps']:>6} {r['train_seconds']:>8.1f} {r['tokens_per_s']:>8,.0f} {r['val_loss']:>9.4f} "
            f"{r['val_bpb']:>8.4f} {r['bpb_vs_baseline']:>+8.1%}"
        )
    baselines = baseline_bpb(data)
    print("baselines on the same val tokens: " + ", ".join(f"{k} {v:.4f} bits/byte" for k, v in baselines.items()))
    out = {"baseline_steps": base_steps, "seconds_per_step": seconds_per_step, "results": results}
    out["baselines_bpb"] = baselines
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
