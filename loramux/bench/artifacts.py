"""Models and adapters for benchmarks and the demo, generated offline from seeds.

Boundary: writes standard files only: HF model directories (config.json,
safetensors, tokenizer) and PEFT LoRA directories (adapter_config.json,
adapter_model.safetensors, exactly the layout PEFT's save_pretrained writes).
Nothing is downloaded; nothing generated here is committed.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch

SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<s>"]  # ids 0, 1, 2
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
MODELS: dict[str, dict[str, int]] = {
    # ~2.6M parameters: quick runs and tests
    "tiny": dict(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    # ~91M parameters: the CPU benchmark model (env.md's mid-llama)
    "mid": dict(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=4,
    ),
    # ~1.1B parameters, Llama-shaped: the GPU benchmark model
    "1b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
    ),
}


def train_bpe_tokenizer(lines: list[str], vocab_size: int) -> Any:
    """A byte-level BPE tokenizer trained on `lines`, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="<|endoftext|>", pad_token="<|pad|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _filler_lines(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = ["lora", "adapter", "model", "serve", "batch", "token", "page", "cache", "fast", "fair"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(n)]


def build_random_model(
    path: Path, size: str = "mid", vocab_size: int = 512, seed: int = 0, max_position_embeddings: int = 2048
) -> Path:
    """A randomly initialised Llama of a named size, with a tokenizer; skipped if already there."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    if (path / "config.json").is_file():
        return path
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=2,
        eos_token_id=0,
        pad_token_id=1,
        tie_word_embeddings=False,
        **MODELS[size],
    )
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    train_bpe_tokenizer(_filler_lines(2000, seed), vocab_size).save_pretrained(path)
    return path


def write_random_adapter(
    path: Path,
    model_dir: Path,
    rank: int,
    targets: tuple[str, ...],
    seed: int,
    alpha: float | None = None,
    scale: float = 1.0,
    dora: bool = False,
) -> Path:
    """A PEFT LoRA directory with random A and B (the layout PEFT's save_pretrained writes); with
    `dora`, a DoRA adapter (a random magnitude per output feature besides)."""
    from safetensors.torch import save_file

    cfg = json.loads((model_dir / "config.json").read_text())
    h, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    hd = cfg.get("head_dim") or h // heads
    inter = cfg["intermediate_size"]
    shapes = {
        "q_proj": (h, heads * hd),
        "k_proj": (h, kv * hd),
        "v_proj": (h, kv * hd),
        "o_proj": (heads * hd, h),
        "gate_proj": (h, inter),
        "up_proj": (h, inter),
        "down_proj": (inter, h),
    }
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        for m in targets:
            fan_in, fan_out = shapes[m]
            section = "mlp" if m in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            stem = f"base_model.model.model.layers.{layer}.{section}.{m}"
            tensors[f"{stem}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g) * (scale / fan_in**0.5)
            tensors[f"{stem}.lora_B.weight"] = torch.randn(fan_out, rank, generator=g) * (scale / rank**0.5)
            if dora:
                tensors[f"{stem}.lora_magnitude_vector"] = 0.5 + torch.rand(fan_out, generator=g)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "base_model_name_or_path": str(model_dir),
                "r": rank,
                "lora_alpha": alpha if alpha is not None else 2 * rank,
                "lora_dropout": 0.0,
                "target_modules": list(targets),
                "bias": "none",
                "fan_in_fan_out": False,
                "use_rslora": False,
                "use_dora": dora,
                "modules_to_save": None,
                "init_lora_weights": True,
            },
            indent=2,
        )
    )
    return path
