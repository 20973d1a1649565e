"""Tiny HF models, a tokenizer and PEFT adapters built offline, plus the transformers+PEFT oracle.

Everything is generated from seeds; nothing is downloaded. The oracle runs a
plain greedy loop over `PeftModel(..., adapter_names=...)`: a full forward per
step, so every step's logits can be compared, row by row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

VOCAB = 512
ADAPTERS = {  # name -> LoraConfig kwargs: ranks 1..64, different targets, one rsLoRA
    "r1_qv": dict(r=1, lora_alpha=2, target_modules=["q_proj", "v_proj"]),
    "r8_all": dict(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    ),
    "r64_mlp": dict(r=64, lora_alpha=32, target_modules=["o_proj", "gate_proj", "up_proj", "down_proj"]),
    "rs4_attn": dict(
        r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
    ),
}
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)


@dataclass
class TinyModel:
    arch: str
    path: Path
    adapters: dict[str, Path] = field(default_factory=dict)


def train_tokenizer(lines: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>", "<|pad|>", "<s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(lines, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="<|endoftext|>", pad_token="<|pad|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def corpus(n: int = 2000) -> list[str]:
    import random

    rng = random.Random(0)
    words = [
        "lora",
        "adapter",
        "model",
        "serve",
        "batch",
        "token",
        "page",
        "cache",
        "hello",
        "world",
        "quick",
        "brown",
        "fox",
        "the",
        "a",
        "sql",
        "select",
        "from",
        "where",
        "1",
        "2",
        "3",
    ]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(n)]


def hf_config(arch: str):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=2,
        eos_token_id=0,
        pad_token_id=1,
    )
    if arch == "llama":
        return LlamaConfig(**common, tie_word_embeddings=False)
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=16, tie_word_embeddings=False)
    if arch == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=True)
    raise ValueError(arch)


def build_model(arch: str, root: Path, tokenizer, seed: int = 0, adapters: dict | None = None) -> TinyModel:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    path = root / arch
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(arch))
    # Random init is ~N(0, 0.02): too flat for greedy tokens to tell adapters apart. Sharpen it.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_(4.0 if "embed" in name else 2.0)
    shard = "40KB" if arch == "qwen2" else "1GB"  # qwen2 is saved in shards
    model.save_pretrained(path, max_shard_size=shard)
    tokenizer.save_pretrained(path)
    if arch == "mistral":  # an old-style config: top-level rope_theta and torch_dtype
        cfg = json.loads((path / "config.json").read_text())
        rope = cfg.pop("rope_parameters", {"rope_theta": 10000.0})
        cfg["rope_theta"] = rope.get("rope_theta", 10000.0)
        cfg["torch_dtype"] = cfg.pop("dtype", "float32")
        (path / "config.json").write_text(json.dumps(cfg, indent=2))
    tm = TinyModel(arch, path)
    for i, (name, kw) in enumerate((adapters or ADAPTERS).items()):
        torch.manual_seed(1000 * seed + i + 1)
        base = AutoModelForCausalLM.from_pretrained(path)
        pm = get_peft_model(
            base, LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, init_lora_weights=False, **kw)
        )
        out = root / f"{arch}-{name}"
        pm.save_pretrained(out)
        tm.adapters[name] = out
    return tm


class PeftOracle:
    """transformers + PEFT with every adapter loaded, greedy, one full forward per step."""

    def __init__(self, tm: TinyModel) -> None:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(tm.path, dtype=torch.float32)
        names = list(tm.adapters)
        pm = PeftModel.from_pretrained(base, tm.adapters[names[0]], adapter_name=names[0])
        for n in names[1:]:
            pm.load_adapter(tm.adapters[n], adapter_name=n)
        self.model = pm.eval()

    @torch.no_grad()
    def greedy(self, prompts: list[list[int]], adapters: list[str | None], n: int):
        """Prompts of equal length (no padding); returns tokens [rows][n] and logits [rows][n][V]."""
        seq = torch.tensor(prompts)
        names = [a or "__base__" for a in adapters]
        logits_out: list[list[torch.Tensor]] = [[] for _ in prompts]
        for _ in range(n):
            logits = self.model(input_ids=seq, adapter_names=names).logits[:, -1].float()
            for i, row in enumerate(logits):
                logits_out[i].append(row)
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
        return seq[:, len(prompts[0]) :].tolist(), logits_out
