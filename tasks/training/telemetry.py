"""Training telemetry: peak FLOPs by device, model FLOPs utilization, peak memory, and the loss-curve plot.

Timing-dependent numbers (tokens/s, MFU, memory) never go into hashed artifact files: they are returned in
the stage's counts (the manifest, which the content hash does not cover) and appended live to
``telemetry.jsonl`` in the stage's work folder.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch

# Dense bf16 tensor-core peak FLOP/s per device (no sparsity), matched by substring of the CUDA device name,
# most specific first. Sources: NVIDIA data sheets.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("GB200", 2.5e15),
    ("B200", 2.25e15),
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("GH200", 989e12),
    ("H100", 989e12),  # SXM
    ("H800", 989e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("V100", 125e12),  # fp16: V100 has no bf16
    ("T4", 65e12),  # fp16
)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def peak_flops(device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of one device, or None when unknown (every CPU, unlisted GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


def mfu(tokens_per_s: float, flops_per_token: float, device: torch.device, world_size: int = 1) -> float | None:
    """Model FLOPs utilization: achieved training FLOP/s over the peak of all ``world_size`` devices."""
    peak = peak_flops(device)
    if peak is None or tokens_per_s <= 0:
        return None
    return tokens_per_s * flops_per_token / (peak * world_size)


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated by this process, or on CPU the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def append_jsonl(path: Path, row: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(row, sort_keys=True) + "\n")


def plot_loss_curve(rows: list[dict], path: Path, title: str) -> bool:
    """Write train and val loss against tokens as a PNG (byte-identical for identical rows). False if no matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    train = [(r["tokens"], r["loss"]) for r in rows]
    val = [(r["tokens"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1, alpha=0.8)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="val loss (fixed subset)", linewidth=1.5, markersize=3)
    ax.set_xlabel("tokens")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})
    plt.close(fig)
    return True
