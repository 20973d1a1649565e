"""Loading HF model directories: config, safetensors weights (one file or shards), tokenizer.

Boundary: disk to a ready `LlamaForCausalLM` on the target device and dtype.
Configs are read with transformers' AutoConfig, so both the old key style
(`rope_theta`, `torch_dtype`) and the transformers-5 style (`rope_parameters`,
`dtype`) work. Anything that is not a supported architecture, or weights that
are not safetensors, is refused with an error that says what would work.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from loramux.executor.models.llama import SUPPORTED_ARCHITECTURES, LlamaArgs, LlamaForCausalLM

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


def load_hf_config(path: str | os.PathLike) -> tuple[Any, str]:
    """The HF config of a model directory and its architecture, or a ValueError saying why not."""
    p = Path(path)
    if not (p / "config.json").is_file():
        raise ValueError(f"{str(p)!r} is not a model directory: config.json is missing")
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
    path: str | os.PathLike, dtype: torch.dtype, device: torch.device, max_len: int
) -> tuple[LlamaForCausalLM, Any]:
    """Build the model with its weights from `path`; returns (model, hf_config)."""
    p = Path(path)
    hf_config, arch = load_hf_config(p)
    args = LlamaArgs.from_hf(hf_config, arch)
    with torch.device("meta"):  # no memory yet: the loaded tensors become the parameters
        model = LlamaForCausalLM(args)
    state = read_state_dict(p, dtype, device)
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
    return model, hf_config


def load_tokenizer(path: str | os.PathLike) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:
        raise ValueError(f"cannot load a tokenizer from {str(path)!r}: {e}") from e
