"""GPU training throughput and MFU of the train stage: the gpt2-124M preset at T=1024, bf16 autocast + compile.

Runs the real stage function (``tasks.training.train.train``) on synthetic tokens (GPT-2's vocabulary padded to 50304)
and reports steady-state tokens/s and MFU from its telemetry, skipping the first interval (compilation).
MFU uses the dense bf16 peak of the device from ``tasks/training/telemetry.py`` (H100/H200 SXM: 989 TFLOP/s).
Target: MFU >= 45% on an H100/H200.

    python benchmarks/gpu_check.py                      # one GPU
    python benchmarks/gpu_check.py --nproc 8            # DDP under torchrun, one process per GPU
    python benchmarks/gpu_check.py --device cpu --preset tiny --no-compile --steps 6 --interval 2   # smoke test
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from storage.artifacts import StageContext  # noqa: E402
from storage.shards import write_token_shard  # noqa: E402
from tasks.config import ModelConfig, TrainConfig  # noqa: E402

VOCAB = 50304  # GPT-2's 50257 rounded up to a multiple of 128 for the tensor cores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2-124M")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per micro-batch and GPU")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--interval", type=int, default=20, help="telemetry interval; the first is discarded")
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device available: nothing measured"}))
        sys.exit(2)
    model = ModelConfig(preset=args.preset)
    work = args.work or Path(tempfile.mkdtemp(prefix="tokenmill-gpu-check-"))
    tokens_needed = (args.steps + 2) * args.grad_accum * args.batch_size * args.nproc * (model.block_size + 1)
    rng = np.random.default_rng(0)
    for split, n in {"train": tokens_needed, "val": 4 * args.batch_size * (model.block_size + 1)}.items():
        write_token_shard(work / f"{split}.arrow", rng.integers(0, VOCAB, n, dtype=np.uint16))
    cfg = TrainConfig(
        max_steps=args.steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        learning_rate=6e-4,
        warmup_steps=10,
        eval_interval=args.interval,
        eval_batches=1,
        checkpoint_interval=10**6,
        device=args.device,
        compile=not args.no_compile,
        nproc=args.nproc,
    )
    (work / "out").mkdir(exist_ok=True)
    ctx = StageContext(out_dir=work / "out", work_dir=work / "work", log=print)
    from tasks.training.train import train

    counts = train([work / "train.arrow"], [work / "val.arrow"], VOCAB, model, cfg, 1337, ctx)
    steady = counts["telemetry"][1:] or counts["telemetry"]
    tokens_per_s = sorted(r["tokens_per_s"] for r in steady)[len(steady) // 2]
    mfus = [r["mfu"] for r in steady if r["mfu"] is not None]
    result = {
        "device": counts["device_name"],
        "world_size": counts["world_size"],
        "preset": args.preset,
        "params": counts["params"],
        "block_size": model.block_size,
        "tokens_per_step": counts["tokens_per_step"],
        "compile": cfg.compile,
        "steady_tokens_per_s": tokens_per_s,
        "steady_mfu": sorted(mfus)[len(mfus) // 2] if mfus else None,
        "peak_mem_mb": counts["peak_mem_mb"],
        "telemetry": counts["telemetry"],
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
