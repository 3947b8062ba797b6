"""The trained model's file format: ``model.safetensors`` (a tied head stored once) and ``model.json`` (sizes)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tasks.modeling.gpt import GPT, GPTConfig

MODEL_FILE = "model.safetensors"
MODEL_CONFIG_FILE = "model.json"


def clean_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Weights without ``torch.compile``'s ``_orig_mod.`` or DDP's ``module.`` prefixes."""
    out = {}
    for key, value in model.state_dict().items():
        for prefix in ("_orig_mod.", "module."):
            key = key.replace(prefix, "")
        out[key] = value
    return out


def state_dict_for_saving(model: GPT) -> dict[str, torch.Tensor]:
    """Clean weights with a tied output head stored once, contiguous on CPU (for safetensors)."""
    state = clean_state_dict(model)
    if model.tied_head:
        state.pop("lm_head.weight", None)
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def save_model(model: torch.nn.Module, cfg: GPTConfig, folder: Path) -> None:
    """Write the weights and the config the model was built from."""
    save_file(state_dict_for_saving(model), str(folder / MODEL_FILE))
    (folder / MODEL_CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True))


def load_model(folder: Path, device: torch.device | str = "cpu") -> GPT:
    """Load a trained model artifact (safetensors weights, JSON config)."""
    cfg = GPTConfig(**json.loads((folder / MODEL_CONFIG_FILE).read_text()))
    model = GPT(cfg)
    state = load_file(str(folder / MODEL_FILE))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - ({"lm_head.weight"} if model.tied_head else set()):
        raise ValueError(f"{folder}: weights do not match model.json (missing {missing}, unexpected {unexpected})")
    return model.to(device).eval()
