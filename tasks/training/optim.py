"""The optimizers: AdamW for every parameter, or Muon for the hidden matrices and AdamW for the rest.

Muon (Jordan et al., 2024) is SGD with Nesterov momentum whose update is orthogonalised: a Newton–Schulz
iteration pushes the update matrix's singular values towards 1, so every direction of a weight matrix
moves at the same rate. It moves each 2-D weight of the blocks; embeddings, the output head, norms and
biases stay with AdamW, as in nanochat and modded-nanogpt. ``torch.optim.Muon`` runs the iteration in
bfloat16, which CPUs without bf16 matrix units execute several times slower than the whole forward and
backward pass of a small model (measured: ``benchmarks/recipe.py``), so ``Muon`` here iterates in float32
on CPU and bfloat16 on CUDA, and orthogonalises all matrices of one shape as one batch.

Every parameter group carries ``lr_scale``: the loop sets each group's learning rate to the schedule's rate
times it, so Muon's own peak rate follows the same schedule. Under DDP every rank steps on the same
all-reduced gradients, so the ranks stay identical.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from tasks.config import TrainConfig
from tasks.modeling.gpt import GPT

ADAMW_BETAS = (0.9, 0.95)
MUON_MOMENTUM = 0.95
NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)  # quintic coefficients: steepest slope at 0 that still converges to ~1
NEWTON_SCHULZ_STEPS = 5


def orthogonalize(updates: torch.Tensor, steps: int = NEWTON_SCHULZ_STEPS) -> torch.Tensor:
    """A batch of matrices (n, rows, cols) with singular values pushed to about 1 (roughly U Vᵀ of their SVD)."""
    a, b, c = NEWTON_SCHULZ
    x = updates.bfloat16() if updates.is_cuda else updates.float()
    wide = x.size(-2) <= x.size(-1)
    x = x if wide else x.mT  # iterate on the smaller Gram matrix
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=1e-7)  # spectral norm at most 1
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x if wide else x.mT).to(updates.dtype)


class Muon(torch.optim.Optimizer):
    """Nesterov momentum, orthogonalised per matrix, scaled by sqrt(max(1, rows / cols)); decoupled weight decay."""

    def __init__(self, params, lr: float, momentum: float = MUON_MOMENTUM, weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            by_shape: dict[torch.Size, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(p.grad)
                by_shape[p.shape].append((p, p.grad.add(buf, alpha=group["momentum"])))
            for shape, pairs in by_shape.items():
                ortho = orthogonalize(torch.stack([u for _, u in pairs]))
                scale = max(1.0, shape[0] / shape[1]) ** 0.5
                for (p, _), u in zip(pairs, ortho, strict=True):
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                    p.add_(u, alpha=-group["lr"] * scale)


def adamw(groups: list[dict], lr: float, device_type: str) -> torch.optim.AdamW:
    """AdamW over ``groups`` (each with its weight decay), fused kernels on CUDA."""
    for group in groups:
        group.setdefault("lr_scale", 1.0)
    return torch.optim.AdamW(groups, lr=lr, betas=ADAMW_BETAS, eps=1e-8, fused=device_type == "cuda")


class MuonAdamW:
    """Muon for the hidden matrices and AdamW for everything else, stepped together as one optimizer."""

    def __init__(self, muon: Muon, adam: torch.optim.AdamW):
        self.muon, self.adam = muon, adam

    @property
    def param_groups(self) -> list[dict]:
        return self.muon.param_groups + self.adam.param_groups

    def step(self) -> None:
        self.muon.step()
        self.adam.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adam.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adam.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.muon.load_state_dict(state["muon"])
        self.adam.load_state_dict(state["adamw"])


def build_optimizer(model: GPT, cfg: TrainConfig, device_type: str) -> torch.optim.AdamW | MuonAdamW:
    """``cfg.optimizer``'s optimizer over the model; weight decay on matrices and embeddings, not norms or biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return adamw(groups, cfg.learning_rate, device_type)
    hidden = model.hidden_matrices()
    muon = Muon(
        [{"params": hidden, "lr_scale": cfg.muon_learning_rate / cfg.learning_rate}],
        lr=cfg.muon_learning_rate,
        weight_decay=cfg.weight_decay,
    )
    rest = [p for p in params if all(p is not h for h in hidden)]
    decay = [p for p in rest if p.dim() >= 2]
    no_decay = [p for p in rest if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return MuonAdamW(muon, adamw(groups, cfg.learning_rate, device_type))
