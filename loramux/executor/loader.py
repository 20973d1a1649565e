"""Loading HF model directories: config, safetensors weights (one file or shards), tokenizer.

Boundary: disk to a ready `LlamaForCausalLM` on the target device and dtype.
Configs are read with transformers' AutoConfig, so both the old key style
(`rope_theta`, `torch_dtype`) and the transformers-5 style (`rope_parameters`,
`dtype`) work; a config.json that states every key the model reads, with the
default rope, is read as plain JSON instead (a second faster to start). Anything
that is not a supported architecture, or weights that are not safetensors, is
refused with an error that says what would work.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from loramux.executor.models.llama import (
    SUPPORTED_ARCHITECTURES,
    LlamaArgs,
    LlamaForCausalLM,
    fuse_weights,
)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but no CUDA device is visible; use --device cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[dtype]


_CONFIG_KEYS = (  # what the model code reads; transformers 5 writes them all into config.json
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "rms_norm_eps",
    "max_position_embeddings",
)


def load_hf_config(path: str | os.PathLike) -> tuple[Any, str]:
    """The HF config of a model directory and its architecture, or a ValueError saying why not.

    A config.json that states every key the model code reads, with the default rope, is read as
    plain JSON (importing transformers' config classes costs about a second at start); anything
    else goes through transformers' AutoConfig, which knows every key style and default."""
    p = Path(path)
    if not (p / "config.json").is_file():
        raise ValueError(f"{str(p)!r} is not a model directory: config.json is missing")
    cfg = _plain_config(p / "config.json")
    if cfg is None:
        from transformers import AutoConfig

        try:
            cfg = AutoConfig.from_pretrained(str(p), local_files_only=True)
        except Exception as e:  # transformers raises many types for a bad config
            raise ValueError(f"cannot read {p / 'config.json'}: {e}") from e
    archs = list(getattr(cfg, "architectures", None) or [])
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise ValueError(
            f"model architecture {archs or getattr(cfg, 'model_type', '?')} is not supported; "
            f"loramux runs {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return cfg, arch


def _plain_config(file: Path) -> SimpleNamespace | None:
    """config.json as attributes when it needs no transformers defaults; None otherwise."""
    try:
        raw = json.loads(file.read_text())
    except (OSError, ValueError):
        return None  # AutoConfig reports it
    if not isinstance(raw, dict):
        return None
    archs = raw.get("architectures") or []
    rope = raw.get("rope_parameters") or {}
    windowed = any(a in ("MistralForCausalLM", "Qwen2ForCausalLM") for a in archs)
    plain = (
        any(a in SUPPORTED_ARCHITECTURES for a in archs)
        and all(k in raw for k in _CONFIG_KEYS)
        and isinstance(rope, dict)
        and rope.get("rope_type", "default") == "default"
        and not raw.get("rope_scaling")
        and (not windowed or "sliding_window" in raw)
        and ("Qwen2ForCausalLM" not in archs or "use_sliding_window" in raw)
    )
    return SimpleNamespace(**raw) if plain else None


def _weight_files(p: Path) -> list[Path]:
    index = p / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [p / f for f in files]
    files = sorted(p.glob("*.safetensors"))
    if files:
        return files
    if list(p.glob("*.bin")) or list(p.glob("*.pt")):
        raise ValueError(
            f"{str(p)!r} holds only .bin/.pt weights; loramux reads safetensors. Convert with "
            f"AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)"
        )
    raise ValueError(f"{str(p)!r} has no *.safetensors weight files")


def read_state_dict(p: Path, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in _weight_files(p):
        for k, t in load_file(str(f), device="cpu").items():
            if not k.endswith(_IGNORED_SUFFIXES):
                state[k] = t.to(device=device, dtype=dtype)
    return state


def load_model(
    path: str | os.PathLike, dtype: torch.dtype, device: torch.device, max_len: int | None
) -> tuple[LlamaForCausalLM, Any, int]:
    """Build the model with its weights from `path`, with rotary tables for `max_len` positions
    (None: the config's max_position_embeddings, else 4096); returns (model, hf_config, max_len)."""
    p = Path(path)
    hf_config, arch = load_hf_config(p)
    max_len = max_len or getattr(hf_config, "max_position_embeddings", None) or 4096
    args = LlamaArgs.from_hf(hf_config, arch)
    with torch.device("meta"):  # no memory yet: the loaded tensors become the parameters
        model = LlamaForCausalLM(args)
    state = read_state_dict(p, dtype, device)
    fuse_weights(state)
    if args.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    want = {k for k in model.state_dict() if not (args.tie_word_embeddings and k == "lm_head.weight")}
    missing, unexpected = sorted(want - state.keys()), sorted(state.keys() - want)
    if missing or unexpected:
        raise ValueError(
            f"weights in {str(p)!r} do not fit {arch}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.load_state_dict(state, strict=False, assign=True)  # no second copy of the weights
    if args.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.init_rotary(hf_config, max_len, device)
    model.eval()
    return model, hf_config, max_len


def load_tokenizer(path: str | os.PathLike) -> Any:
    """The tokenizer class tokenizer_config.json names, else AutoTokenizer's choice (which reads
    the model config through transformers' config classes: about a second more at start)."""
    try:
        return _named_tokenizer(Path(path)) or _auto_tokenizer(Path(path))
    except Exception as e:
        raise ValueError(f"cannot load a tokenizer from {str(path)!r}: {e}") from e


def _named_tokenizer(p: Path) -> Any:
    try:
        name = json.loads((p / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(name, str):
        return None
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    cls = tokenizer_class_from_name(name)
    return None if cls is None else cls.from_pretrained(str(p), local_files_only=True)


def _auto_tokenizer(p: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(p), local_files_only=True)
