"""The Llama family in plain PyTorch: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM.

Boundary: weights and math only. Module names mirror the HF checkpoints, except
that q, k, v are one linear (qkv_proj) and gate, up another (gate_up_proj), their
weights concatenated at load (`fuse_weights`): one matmul each instead of three
and two. Adapters are applied afterwards by swapping the linears (see lora.py;
an adapter's q, k and v are slices of qkv_proj), and attention goes through
`paged_attention`. The
three architectures differ only in flags: Qwen2 has q/k/v biases (and often
tied embeddings), Mistral a sliding window.

Every forward works on a flat batch: T tokens from many requests, each with
its own position; there is no batch dimension.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loramux.executor.attention import AttentionMetadata, paged_attention

# A fused linear and the checkpoint's linears it holds, side by side in its output columns.
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "proportional")


@dataclass(frozen=True)
class LlamaArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    tie_word_embeddings: bool
    sliding_window: int | None
    max_position_embeddings: int

    @classmethod
    def from_hf(cls, cfg: Any, architecture: str) -> LlamaArgs:
        heads = cfg.num_attention_heads
        qwen = architecture == "Qwen2ForCausalLM"
        window = getattr(cfg, "sliding_window", None)
        if qwen and not getattr(cfg, "use_sliding_window", False):
            window = None
        attention_bias = bool(getattr(cfg, "attention_bias", False))
        return cls(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_layers=cfg.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            rms_norm_eps=cfg.rms_norm_eps,
            qkv_bias=qwen or attention_bias,
            o_bias=attention_bias and not qwen,
            mlp_bias=bool(getattr(cfg, "mlp_bias", False)),
            tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            sliding_window=window,
            max_position_embeddings=cfg.max_position_embeddings,
        )

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each LoRA-targetable projection."""
        h, q, kv, i = (
            self.hidden_size,
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
            self.intermediate_size,
        )
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }


def fuse_weights(state: dict[str, torch.Tensor]) -> None:
    """In place: each layer's q/k/v (gate/up) weights and biases become one qkv_proj (gate_up_proj)
    tensor, concatenated along the output rows (the originals are dropped as each is consumed)."""
    for key in [k for k in state if ".q_proj." in k or ".gate_proj." in k]:
        for fused, parts in FUSED.items():
            first = f".{parts[0]}."
            if first in key:
                names = [key.replace(first, f".{p}.") for p in parts]
                if all(n in state for n in names):
                    state[key.replace(first, f".{fused}.")] = torch.cat([state.pop(n) for n in names])


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class Rotary(nn.Module):
    """cos/sin tables for every position, from HF's own rope initialisation."""

    def __init__(self, hf_config: Any, max_len: int, device: torch.device) -> None:
        super().__init__()
        params = getattr(hf_config, "rope_parameters", None) or {}
        rope_type = params.get("rope_type", "default")
        if rope_type not in STATIC_ROPE_TYPES:
            raise ValueError(
                f"rope_type {rope_type!r} is not supported; supported: {', '.join(STATIC_ROPE_TYPES)}"
            )
        if rope_type == "default":
            dim = (
                getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
            )
            base = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
            inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
            scaling = 1.0
        else:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"))
        pos = torch.arange(max_len, dtype=torch.float)
        freqs = pos[:, None] * inv_freq.float()[None, :]  # [max_len, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [max_len, D]
        self.register_buffer("cos", (emb.cos() * scaling).to(device), persistent=False)
        self.register_buffer("sin", (emb.sin() * scaling).to(device), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[positions].to(dtype), self.sin[positions].to(dtype)  # [T, D] each


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D] with cos/sin [T, D]: the rotate-half RoPE, as HF computes it."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [T, 1, D]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, a: LlamaArgs, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = a.num_heads, a.num_kv_heads, a.head_dim
        self.scale = a.head_dim**-0.5
        self.sliding_window = a.sliding_window
        self.qkv_sizes = [a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim, a.num_kv_heads * a.head_dim]
        self.qkv_proj = nn.Linear(a.hidden_size, sum(self.qkv_sizes), bias=a.qkv_bias)
        self.o_proj = nn.Linear(a.num_heads * a.head_dim, a.hidden_size, bias=a.o_bias)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.qkv_sizes, dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)  # [T, H, D]
        k = k.view(t, self.num_kv_heads, self.head_dim)  # [T, KV, D]
        v = v.view(t, self.num_kv_heads, self.head_dim)  # [T, KV, D]
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        out = paged_attention(q, k, v, kv[0], kv[1], meta, self.scale, self.sliding_window)
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim))  # [T, H*D] -> [T, hidden]


class MLP(nn.Module):
    def __init__(self, a: LlamaArgs) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(a.hidden_size, 2 * a.intermediate_size, bias=a.mlp_bias)
        self.down_proj = nn.Linear(a.intermediate_size, a.hidden_size, bias=a.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, a: LlamaArgs, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.self_attn = Attention(a, layer)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.mlp = MLP(a)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, a: LlamaArgs) -> None:
        super().__init__()
        # An explicit weight skips the random init: the loader replaces it anyway, and on the meta
        # device normal_() would import torch._dynamo (about a second of start-up).
        weight = torch.empty(a.vocab_size, a.hidden_size)
        self.embed_tokens = nn.Embedding(a.vocab_size, a.hidden_size, _weight=weight)
        self.layers = nn.ModuleList(DecoderLayer(a, i) for i in range(a.num_layers))
        self.norm = RMSNorm(a.hidden_size, a.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, a: LlamaArgs) -> None:
        super().__init__()
        self.args = a
        self.model = LlamaModel(a)
        self.lm_head = nn.Linear(a.hidden_size, a.vocab_size, bias=False)
        if a.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary: Rotary | None = None

    def init_rotary(self, hf_config: Any, max_len: int, device: torch.device) -> None:
        """Build the cos/sin tables (after the weights are in place on `device`)."""
        self.rotary = Rotary(hf_config, max_len, device)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """input_ids, positions [T] -> hidden states [T, hidden] (before the final norm)."""
        assert self.rotary is not None, "call init_rotary() before forward()"
        x = self.model.embed_tokens(input_ids)  # [T, hidden]
        cos, sin = self.rotary(positions, x.dtype)
        for layer, kv in zip(self.model.layers, kv_caches, strict=True):
            x = layer(x, cos, sin, kv, meta)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] in float32."""
        return self.lm_head(self.model.norm(hidden)).float()
