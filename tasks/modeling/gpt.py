"""A decoder-only Transformer in one readable module, in two layouts that each map onto a transformers model.

``arch="gpt2"``: GPT-2 — pre-LayerNorm blocks with biases, a GELU MLP, learned positions and an output head
tied to the token embedding (exported as HF GPT-2). ``arch="modern"``: the recipe of today's small models
(nanochat, modded-nanogpt) — rotary positions, RMSNorm without biases, RMSNorm on each head's queries and
keys, a ReLU² or SwiGLU MLP, an untied head and zero-initialised residual projections (exported as HF
Qwen3). Both attend through ``scaled_dot_product_attention`` (flash kernels on GPU). ``generate`` samples
with a key/value cache: the prompt is encoded once and each new token costs one position's work.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab_size: int
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    arch: str = "gpt2"  # "gpt2" | "modern"
    mlp: str = "swiglu"  # modern only: "relu2" (relu(x)^2) | "swiglu" (silu(gate x) * up x)

    def __post_init__(self) -> None:
        if self.arch not in ARCHS or self.mlp not in MLPS:
            raise ValueError(f"unknown arch {self.arch!r} / mlp {self.mlp!r}: arch is one of {ARCHS}, mlp of {MLPS}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_hidden(self) -> int:
        """MLP width: 4 x n_embd, or 2/3 of that (rounded up to 8) for SwiGLU's three matrices: equal parameters."""
        if self.arch == "modern" and self.mlp == "swiglu":
            return -(-8 * self.n_embd // 3 // 8) * 8
        return 4 * self.n_embd

    def to_dict(self) -> dict:
        """What ``model.json`` stores; a GPT-2 model's omits the modern-only fields (so its file is unchanged)."""
        out = asdict(self)
        return {k: v for k, v in out.items() if k not in ("arch", "mlp")} if self.arch == "gpt2" else out


ARCHS = ("gpt2", "modern")
MLPS = ("relu2", "swiglu")
RMS_EPS = 1e-6
ROPE_THETA = 10_000.0


class LayerCache:
    """One layer's cached keys and values, (B, n_head, T, head_dim), grown by concatenation."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.size(2)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v

    def repeat_interleave(self, n: int) -> None:
        if self.k is not None:
            self.k, self.v = self.k.repeat_interleave(n, dim=0), self.v.repeat_interleave(n, dim=0)


class KVCache:
    """Keys and values of every layer for the positions encoded so far (at most block_size, the positions known)."""

    def __init__(self, n_layer: int) -> None:
        self.layers = [LayerCache() for _ in range(n_layer)]

    @property
    def length(self) -> int:
        return self.layers[0].length

    def repeat_interleave(self, n: int) -> None:
        """Repeat every sequence ``n`` times along the batch, to continue one prefix in ``n`` ways."""
        for layer in self.layers:
            layer.repeat_interleave(n)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        """Attend causally over ``x``; with a cache, also over the keys and values cached before ``x``."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = attend(q, k, v, cache, self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerCache | None, dropout: float):
    """Causal attention of (B, n_head, T, head_dim) heads; with a cache, also over the keys cached before them."""
    mask, causal = None, True
    if cache is not None:
        past = cache.length
        k, v = cache.append(k, v)
        if past:  # query i (at position past + i) sees keys 0 … past + i
            causal = False
            T = q.size(2)
            if T > 1:
                mask = torch.ones(T, past + T, dtype=torch.bool, device=q.device).tril(diagonal=past)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


# --- the modern layout ----------------------------------------------------------------------------------------


def rotary_tables(cfg: GPTConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (block_size, head_dim) of every position's rotary angles, halves concatenated (as Llama/Qwen)."""
    inv_freq = 1.0 / (ROPE_THETA ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.int64).float() / cfg.head_dim))
    angles = torch.outer(torch.arange(cfg.block_size, dtype=torch.int64).float(), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, n_head, T, head_dim) queries or keys by the angles of their positions."""
    half = x.size(-1) // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


class RotaryAttention(nn.Module):
    """Causal attention with rotary positions and per-head RMSNorm of queries and keys; no biases."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.o_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.q_norm = nn.RMSNorm(cfg.head_dim, eps=RMS_EPS)
        self.k_norm = nn.RMSNorm(cfg.head_dim, eps=RMS_EPS)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerCache | None = None):
        """Attend causally over ``x``, whose positions' angles are ``cos``/``sin``; the cache as in GPT-2's."""
        B, T, C = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, T, self.n_head, self.head_dim).transpose(1, 2)

        q = apply_rotary(self.q_norm(heads(self.q_proj(x))), cos, sin)
        k = apply_rotary(self.k_norm(heads(self.k_proj(x))), cos, sin)
        y = attend(q, k, heads(self.v_proj(x)), cache, self.dropout if self.training else 0.0)
        return self.resid_dropout(self.o_proj(y.transpose(1, 2).contiguous().view(B, T, C)))


class ModernMLP(nn.Module):
    """ReLU² ``down(relu(up x)^2)`` or SwiGLU ``down(silu(gate x) * up x)``, without biases."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        if self.swiglu:
            self.gate_proj = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.silu(self.gate_proj(x)) * self.up_proj(x) if self.swiglu else F.relu(self.up_proj(x)).square()
        return self.dropout(self.down_proj(hidden))


class ModernBlock(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.input_norm = nn.RMSNorm(cfg.n_embd, eps=RMS_EPS)
        self.attn = RotaryAttention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.n_embd, eps=RMS_EPS)
        self.mlp = ModernMLP(cfg)

    def forward(self, x, cos, sin, cache: LayerCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.input_norm(x), cos, sin, cache)
        return x + self.mlp(self.mlp_norm(x))


# --- the model -------------------------------------------------------------------------------------------------


class GPT(nn.Module):
    """The language model in either layout (``cfg.arch``); both share forward's interface, ``generate`` and FLOPs."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.arch == "modern":
            self._build_modern(cfg)
            return
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # scaled residual projections (GPT-2)
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def _build_modern(self, cfg: GPTConfig) -> None:
        """Modules of the modern layout, initialised as nanochat does: unit-variance embeddings, 1/sqrt(fan_in)
        matrices, a near-zero head and zero residual projections (every block starts as the identity)."""
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(ModernBlock(cfg) for _ in range(cfg.n_layer))
        self.norm_f = nn.RMSNorm(cfg.n_embd, eps=RMS_EPS)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        cos, sin = rotary_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        nn.init.normal_(self.wte.weight, std=1.0)
        nn.init.normal_(self.lm_head.weight, std=0.001)
        for name, p in self.h.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.zeros_(p)
            elif p.dim() == 2:
                nn.init.normal_(p, std=p.size(1) ** -0.5)

    @property
    def tied_head(self) -> bool:
        return self.lm_head.weight is self.wte.weight

    def hidden_matrices(self) -> list[nn.Parameter]:
        """The blocks' 2-D weights: what Muon orthogonalises (embeddings, head, norms and biases are not)."""
        return [p for p in self.h.parameters() if p.dim() == 2]

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if non_embedding and hasattr(self, "wpe") else n

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits for every position; with targets, also the mean cross-entropy over them.

        With a ``cache``, ``idx`` continues the sequence the cache holds: positions start after it, and the
        new keys and values are appended to it.
        """
        _, T = idx.shape
        start = cache.length if cache is not None else 0
        if self.cfg.block_size < start + T:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.cfg.block_size}")
        if self.cfg.arch == "modern":
            cos, sin = self.rope_cos[start : start + T], self.rope_sin[start : start + T]
            x = self.drop(self.wte(idx))
            for i, block in enumerate(self.h):
                x = block(x, cos, sin, cache.layers[i] if cache is not None else None)
            x = self.norm_f(x)
        else:
            pos = torch.arange(start, start + T, device=idx.device)
            x = self.drop(self.wte(idx) + self.wpe(pos))
            for i, block in enumerate(self.h):
                x = block(x, cache.layers[i] if cache is not None else None)
            x = self.ln_f(x)
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def flops_per_token(self) -> float:
        """Training FLOPs per token (6N plus attention), as in the PaLM appendix."""
        cfg = self.cfg
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        stop_token: int | None = None,
        top_p: float | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Sample continuations of ``idx`` (B, T); ``temperature=0`` is greedy decoding.

        With ``use_cache`` the prompt is encoded once and each step feeds only the newest token. The
        positions a model knows (learned, or its rotary tables) cap the cache at ``block_size``: once the
        sequence is longer, each step re-encodes the last ``block_size`` tokens, exactly as the uncached path
        does, so both paths give the same tokens.
        """
        cache: KVCache | None = None
        for _ in range(max_new_tokens):
            if not use_cache or idx.size(1) > self.cfg.block_size:
                logits, _ = self(idx[:, -self.cfg.block_size :])
            elif cache is None:
                cache = KVCache(self.cfg.n_layer)
                logits, _ = self(idx, cache=cache)
            else:
                logits, _ = self(idx[:, -1:], cache=cache)
            nxt = next_token(logits[:, -1, :].float(), temperature, top_k, top_p, generator)
            idx = torch.cat([idx, nxt], dim=1)
            if stop_token is not None and bool((nxt == stop_token).all()):
                break
        return idx


def next_token(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row of ``logits`` (B, V): argmax at temperature 0, else a top-k / nucleus (top-p) sample."""
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - sorted_logits.softmax(dim=-1) >= top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)
