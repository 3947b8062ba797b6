"""KV-cached against uncached generation, side by side in one process (same model, same greedy tokens).

    python benchmarks/generation_kv_cache.py [--layers 4 --embd 128 --block 128 --new 120 --batch 1]

Prints tokens/s of both paths and their ratio; asserts the two paths produced identical tokens.
"""

from __future__ import annotations

import argparse
import time

import torch

from tasks.modeling.gpt import GPT, GPTConfig


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--embd", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--prompt", type=int, default=8)
    parser.add_argument("--new", type=int, default=120)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = GPTConfig(args.vocab, args.block, args.layers, args.heads, args.embd)
    model = GPT(cfg).eval()
    prompt = torch.randint(0, args.vocab, (args.batch, args.prompt))
    best: dict[bool, float] = {}
    outputs = {}
    for _ in range(args.repeats):  # interleaved, best of n: fair under a noisy shared machine
        for use_cache in (False, True):
            started = time.perf_counter()
            outputs[use_cache] = model.generate(prompt, args.new, temperature=0, use_cache=use_cache)
            best[use_cache] = min(best.get(use_cache, float("inf")), time.perf_counter() - started)
    assert torch.equal(outputs[True], outputs[False]), "cached and uncached greedy outputs differ"
    tokens = args.batch * args.new
    print(f"model {args.layers}x{args.embd}, block {args.block}, prompt {args.prompt}, {args.new} new tokens")
    print(f"uncached: {tokens / best[False]:8.1f} tokens/s")
    print(f"cached:   {tokens / best[True]:8.1f} tokens/s")
    print(f"speed-up: {best[False] / best[True]:.2f}x (identical tokens)")


if __name__ == "__main__":
    main()
