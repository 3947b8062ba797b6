"""Export: a trained model as a Hugging Face ``transformers`` folder (safetensors + config + tokenizer).

The ``gpt2`` layout (learned positions, pre-LayerNorm with bias and eps 1e-5, tanh GELU = ``gelu_new``, tied
head) becomes ``GPT2LMHeadModel``: every key gains the ``transformer.`` prefix and the four projection
matrices are transposed, because GPT-2's ``Conv1D`` stores (in, out) where ``nn.Linear`` stores (out, in).
The ``modern`` layout becomes ``Qwen3ForCausalLM``, which has every part of it (rotary positions in the
same half-split layout, RMSNorm, per-head q/k RMSNorm, no biases, untied head): a renaming too. Qwen3's MLP
is gated, ``down(act(gate x) * up x)``: SwiGLU is ``act = silu``; ReLU² is exactly ``act = relu`` with
``gate = up``, since ``relu(z) * z = relu(z)²``, so it is exported with its up matrix stored twice.
``AutoModelForCausalLM.from_pretrained(folder)`` builds the model and ``AutoTokenizer.from_pretrained(folder)``
a ``PreTrainedTokenizerFast`` over the same ``tokenizer.json``. Nothing here imports ``transformers``: the
folder is plain files, and ``load_export`` reads it back.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from storage.artifacts import ArtifactStore, StageContext
from tasks.errors import UserError
from tasks.modeling.gpt import GPT, RMS_EPS, ROPE_THETA, GPTConfig
from tasks.modeling.weights import MODEL_CONFIG_FILE, MODEL_FILE, load_model, state_dict_for_saving

VERSION = "1"
HF_CONFIG = "config.json"
TOKENIZER_FILE = "tokenizer.json"
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
PREFIX = "transformer."


# tokenmill's modern names → Qwen3's (the layer index follows ``h.``/``model.layers.``)
QWEN3_NAMES = (
    ("wte.", "model.embed_tokens."),
    ("norm_f.", "model.norm."),
    ("lm_head.", "lm_head."),
    ("attn.", "self_attn."),
    ("input_norm.", "input_layernorm."),
    ("mlp_norm.", "post_attention_layernorm."),
    ("mlp.", "mlp."),
)


def _rename(name: str, pairs: tuple[tuple[str, str], ...], layers: tuple[str, str]) -> str | None:
    """``name`` with its layer prefix and first matching part renamed, or None if no pair matches."""
    head = ""
    if name.startswith(layers[0]):
        index, name = name[len(layers[0]) :].split(".", 1)
        head = f"{layers[1]}{index}."
    for ours, theirs in pairs:
        if name.startswith(ours):
            return head + theirs + name[len(ours) :]
    return None


def to_qwen3_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Modern weights under Qwen3's names; a ReLU² MLP's up matrix also serves as the gate (relu(z)·z = relu(z)²)."""
    out = {}
    for name, tensor in state_dict_for_saving(model).items():
        out[_rename(name, QWEN3_NAMES, ("h.", "model.layers."))] = tensor
        if model.cfg.mlp == "relu2" and name.endswith("mlp.up_proj.weight"):
            out[_rename(name.replace("up_proj", "gate_proj"), QWEN3_NAMES, ("h.", "model.layers."))] = tensor.clone()
    return out


def from_qwen3_state_dict(state: dict[str, torch.Tensor], mlp: str) -> dict[str, torch.Tensor]:
    inverse = tuple((theirs, ours) for ours, theirs in QWEN3_NAMES)
    out = {}
    for name, tensor in state.items():
        ours = _rename(name, inverse, ("model.layers.", "h."))
        if ours is not None and not (mlp == "relu2" and ours.endswith("gate_proj.weight")):
            out[ours] = tensor
    return out


def to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """tokenmill weights under the HF model's names (GPT-2: Conv1D matrices transposed, tied head stored once)."""
    if model.cfg.arch == "modern":
        return to_qwen3_state_dict(model)
    out = {}
    for name, tensor in state_dict_for_saving(model).items():
        out[PREFIX + name] = tensor.t().contiguous() if name.endswith(CONV1D) else tensor
    return out


def from_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in state.items():
        if not name.startswith(PREFIX):
            continue  # lm_head.weight (tied) or buffers
        name = name[len(PREFIX) :]
        out[name] = tensor.t().contiguous() if name.endswith(CONV1D) else tensor
    return out


def qwen3_config(cfg: GPTConfig, eot_id: int, pad_id: int | None) -> dict:
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.mlp_hidden,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_head,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu" if cfg.mlp == "swiglu" else "relu",
        "max_position_embeddings": cfg.block_size,
        "rms_norm_eps": RMS_EPS,
        "rope_theta": ROPE_THETA,
        "rope_parameters": {"rope_type": "default", "rope_theta": ROPE_THETA},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "pad_token_id": pad_id,
        "torch_dtype": "float32",
        "tokenmill_mlp": cfg.mlp,  # relu2 or swiglu: what ``load_export`` rebuilds
    }


def hf_config(cfg: GPTConfig, eot_id: int, pad_id: int | None) -> dict:
    if cfg.arch == "modern":
        return qwen3_config(cfg, eot_id, pad_id)
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "use_cache": True,
        "tie_word_embeddings": True,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "pad_token_id": pad_id,
        "torch_dtype": "float32",
    }


def tokenizer_files(tokenizer_path: Path, special_tokens: list[str], block_size: int) -> dict[str, dict]:
    """``tokenizer_config.json`` and ``special_tokens_map.json`` for a ``PreTrainedTokenizerFast``."""
    eot = special_tokens[0]
    specials = {"bos_token": eot, "eos_token": eot, "unk_token": eot}
    if len(special_tokens) > 1:
        specials["pad_token"] = special_tokens[1]
    config = specials | {
        "tokenizer_class": "PreTrainedTokenizerFast",  # transformers 5 writes TokenizersBackend; 4.x needs this
        "model_max_length": block_size,
        "clean_up_tokenization_spaces": False,
        "add_prefix_space": False,
    }
    return {"tokenizer_config.json": config, "special_tokens_map.json": specials}


def export_model(model_dir: Path, tokenizer_path: Path, special_tokens: list[str], out_dir: Path) -> dict:
    """Write a transformers-loadable folder into ``out_dir``; return counts for the manifest."""
    from tokenizers import Tokenizer

    model = load_model(model_dir)
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    if tokenizer.get_vocab_size() != model.cfg.vocab_size:
        raise UserError(
            f"tokenizer {tokenizer_path} has {tokenizer.get_vocab_size()} tokens, model {model_dir} expects "
            f"{model.cfg.vocab_size}: export the model with the tokenizer it was trained with"
        )
    ids = [tokenizer.token_to_id(t) for t in special_tokens]
    if ids[0] is None:
        raise UserError(f"tokenizer {tokenizer_path} lacks the end-of-text token {special_tokens[0]!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(to_hf_state_dict(model), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config = hf_config(model.cfg, ids[0], ids[1] if len(ids) > 1 else None)
    files = {HF_CONFIG: config, "generation_config.json": {k: config[k] for k in ("bos_token_id", "eos_token_id")}}
    files |= tokenizer_files(tokenizer_path, special_tokens, model.cfg.block_size)
    for name, value in files.items():
        (out_dir / name).write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")
    shutil.copyfile(tokenizer_path, out_dir / TOKENIZER_FILE)
    architecture = config["architectures"][0]
    return {"format": f"transformers/{architecture}", "params": model.num_params(), "vocab_size": model.cfg.vocab_size}


def export_stage(model_dir: Path, tokenizer_dir: Path, special_tokens: list[str], ctx: StageContext) -> dict:
    return export_model(model_dir, tokenizer_dir / TOKENIZER_FILE, special_tokens, ctx.out_dir)


def is_export(folder: Path) -> bool:
    return (folder / HF_CONFIG).is_file() and (folder / "model.safetensors").is_file()


def load_export(folder: Path, device: torch.device | str = "cpu") -> GPT:
    """Read an exported folder back into tokenmill's model (the inverse of ``export_model``)."""
    config = json.loads((folder / HF_CONFIG).read_text())
    weights = load_file(str(folder / MODEL_FILE))
    if config.get("model_type") == "qwen3" and config.get("tokenmill_mlp") in ("relu2", "swiglu"):
        cfg = GPTConfig(
            vocab_size=config["vocab_size"],
            block_size=config["max_position_embeddings"],
            n_layer=config["num_hidden_layers"],
            n_head=config["num_attention_heads"],
            n_embd=config["hidden_size"],
            arch="modern",
            mlp=config["tokenmill_mlp"],
        )
        state = from_qwen3_state_dict(weights, cfg.mlp)
    elif config.get("model_type") == "gpt2" and config.get("activation_function") == "gelu_new":
        cfg = GPTConfig(
            vocab_size=config["vocab_size"],
            block_size=config["n_positions"],
            n_layer=config["n_layer"],
            n_head=config["n_head"],
            n_embd=config["n_embd"],
        )
        state = from_hf_state_dict(weights)
    else:
        raise UserError(f"{folder}: not a tokenmill GPT-2 or Qwen3 export (model_type {config.get('model_type')!r})")
    model = GPT(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - ({"lm_head.weight"} if model.tied_head else set()):
        raise ValueError(f"{folder}: weights do not match config.json (missing {missing}, unexpected {unexpected})")
    return model.to(device).eval()


def load_any_model(folder: Path, device: torch.device | str = "cpu") -> GPT:
    """A train artifact folder (model.json) or an export folder (config.json)."""
    if (folder / MODEL_CONFIG_FILE).is_file():
        return load_model(folder, device)
    if is_export(folder):
        return load_export(folder, device)
    raise UserError(f"{folder} is neither a train artifact (model.json) nor an export (config.json)")


def find_tokenizer(model_folder: Path) -> Path:
    """The tokenizer.json belonging to a model: inside an export, or the one its train artifact's lineage names."""
    if (model_folder / TOKENIZER_FILE).is_file():
        return model_folder / TOKENIZER_FILE
    try:
        store, manifest = ArtifactStore.of_artifact(model_folder)
        tokenizer = store.ancestors(manifest).get("tokenizer")
    except FileNotFoundError:
        tokenizer = None
    if tokenizer is None or not tokenizer.file(TOKENIZER_FILE).is_file():
        raise UserError(f"cannot find the tokenizer of {model_folder} through its manifest inputs; pass --tokenizer")
    return tokenizer.file(TOKENIZER_FILE)
