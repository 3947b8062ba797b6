"""Export: a trained model as a Hugging Face ``transformers`` GPT-2 folder (safetensors + config + tokenizer).

tokenmill's model is the GPT-2 layout (learned positions, pre-LayerNorm with bias and eps 1e-5, tanh GELU =
``gelu_new``, tied head), so the export is a renaming: every key gains the ``transformer.`` prefix and the
four projection matrices are transposed, because GPT-2's ``Conv1D`` stores (in, out) where ``nn.Linear``
stores (out, in). ``AutoModelForCausalLM.from_pretrained(folder)`` then builds ``GPT2LMHeadModel`` and
``AutoTokenizer.from_pretrained(folder)`` a ``PreTrainedTokenizerFast`` over the same ``tokenizer.json``.
Nothing here imports ``transformers``: the folder is plain files, and ``load_export`` reads it back.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from storage.artifacts import ArtifactStore, StageContext
from tasks.errors import UserError
from tasks.modeling.gpt import GPT, GPTConfig
from tasks.modeling.weights import MODEL_CONFIG_FILE, MODEL_FILE, load_model, state_dict_for_saving

VERSION = "1"
HF_CONFIG = "config.json"
TOKENIZER_FILE = "tokenizer.json"
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
PREFIX = "transformer."


def to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """tokenmill weights under GPT-2's names, Conv1D matrices transposed, the tied head stored once."""
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


def hf_config(cfg: GPTConfig, eot_id: int, pad_id: int | None) -> dict:
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
    return {"format": "transformers/GPT2LMHeadModel", "params": model.num_params(), "vocab_size": model.cfg.vocab_size}


def export_stage(model_dir: Path, tokenizer_dir: Path, special_tokens: list[str], ctx: StageContext) -> dict:
    return export_model(model_dir, tokenizer_dir / TOKENIZER_FILE, special_tokens, ctx.out_dir)


def is_export(folder: Path) -> bool:
    return (folder / HF_CONFIG).is_file() and (folder / "model.safetensors").is_file()


def load_export(folder: Path, device: torch.device | str = "cpu") -> GPT:
    """Read an exported folder back into tokenmill's model (the inverse of ``export_model``)."""
    config = json.loads((folder / HF_CONFIG).read_text())
    if config.get("model_type") != "gpt2" or config.get("activation_function") != "gelu_new":
        raise UserError(f"{folder}: not a tokenmill GPT-2 export (model_type {config.get('model_type')!r})")
    cfg = GPTConfig(
        vocab_size=config["vocab_size"],
        block_size=config["n_positions"],
        n_layer=config["n_layer"],
        n_head=config["n_head"],
        n_embd=config["n_embd"],
    )
    model = GPT(cfg)
    missing, unexpected = model.load_state_dict(from_hf_state_dict(load_file(str(folder / MODEL_FILE))), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
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
