"""The parts of an adapter that touch the vocabulary: LoRA on `embed_tokens`, trained token rows
(`trainable_token_indices`) and a trained `lm_head` (`modules_to_save`), per row of a mixed batch.

Boundary: reads and checks these tensors of a PEFT adapter (lora.py hands over every tensor that is
not a linear layer's), keeps their host and device copies per slot, and applies them in the
forward: `AdapterEmbedding` wraps the model's `embed_tokens`, `AdapterHead` its `lm_head`. As
PEFT computes them:

    embedding LoRA:   e[rows] += A^T[ids] @ (B^T * scaling)          A [r, vocab], B [hidden, r]
    trained tokens:   e[rows where id in indices] = the adapter's row for that id
    trained lm_head:  logits[rows] = h[rows] @ W_adapter^T           W [vocab, hidden]

Only rows of slots that have such a part pay for it. A trained lm_head is a whole vocab x hidden
matrix per adapter (about 1 GB for a 128k vocabulary at 4096 and 2 bytes); it counts in the
adapter's bytes, so --max-lora-bytes bounds how many sit on the device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

_EMBED = "base_model.model.model.embed_tokens."
_HEAD = "base_model.model.lm_head.weight"


@dataclass(frozen=True)
class VocabSpec:
    embed: tuple[int, float] | None  # LoRA on embed_tokens: (rank, scaling)
    tokens: tuple[int, ...]  # token ids whose embedding rows the adapter trained
    lm_head: bool  # a trained lm_head (modules_to_save)
    base_embedding: bool  # the file also holds the base embedding (PEFT saves it with embedding LoRA)

    def nbytes(self, vocab: int, hidden: int) -> int:
        """Elements once loaded (times the element size gives bytes)."""
        r = self.embed[0] if self.embed else 0
        return r * (vocab + hidden) + len(self.tokens) * hidden + (vocab * hidden if self.lm_head else 0)


@dataclass
class VocabWeights:
    embed: tuple[torch.Tensor, torch.Tensor] | None  # A^T [vocab, r], scaled B^T [r, hidden]
    tokens: tuple[torch.Tensor, torch.Tensor] | None  # ids [n], rows [n, hidden]
    lm_head: torch.Tensor | None  # [vocab, hidden]


def _trained_tokens(cfg: dict[str, Any], p: Path) -> tuple[int, ...]:
    raw = cfg.get("trainable_token_indices")
    if isinstance(raw, dict):
        other = sorted(set(raw) - {"embed_tokens"})
        if other:
            raise ValueError(f"{str(p)!r}: trainable_token_indices for {other}; only embed_tokens has tokens")
        raw = raw.get("embed_tokens")
    return tuple(int(t) for t in raw or ())


def parse_vocab_parts(
    tensors: dict[str, tuple[int, ...]],
    cfg: dict[str, Any],
    p: Path,
    vocab: int,
    hidden: int,
    tied: bool,
    max_rank: int,
    scaling: Callable[[str, int], float],
) -> VocabSpec | None:
    """Check the tensors that are not a linear layer's LoRA; None if there are none. Every
    refusal names the tensor or field and the fix."""
    saves = cfg.get("modules_to_save") or []
    if sorted(set(saves) - {"lm_head"}):
        raise ValueError(
            f"{str(p)!r}: modules_to_save={saves}: loramux serves a trained lm_head only; train without "
            f"the others"
        )
    tokens = _trained_tokens(cfg, p)
    embed, head, base = None, False, False
    for key, shape in tensors.items():
        if key == _HEAD and "lm_head" in saves:
            if shape != (vocab, hidden):
                raise ValueError(
                    f"{str(p)!r}: the trained lm_head is {list(shape)}; the model's is [{vocab}, {hidden}]"
                )
            head = True
        elif key == _EMBED + "base_layer.weight" and shape == (vocab, hidden):
            base = True
        elif key == _EMBED + "token_adapter.trainable_tokens_delta" and tokens:
            if shape != (len(tokens), hidden):
                raise ValueError(f"{str(p)!r}: {len(tokens)} trained tokens but rows of shape {list(shape)}")
        elif key in (_EMBED + "lora_embedding_A", _EMBED + "lora_embedding_B"):
            continue
        else:
            what = "a trained lm_head without modules_to_save" if key == _HEAD else f"tensor {key!r}"
            raise ValueError(
                f"{str(p)!r}: {what} is not supported; LoRA may target {{q,k,v,o,gate,up,down}}_proj and "
                f"embed_tokens, with a trained lm_head and trained tokens"
            )
    a, b = tensors.get(_EMBED + "lora_embedding_A"), tensors.get(_EMBED + "lora_embedding_B")
    if (a is None) != (b is None):
        raise ValueError(f"{str(p)!r}: embed_tokens has lora_embedding_A or lora_embedding_B missing")
    if a is not None and b is not None:
        r = a[0]
        if a != (r, vocab) or b != (hidden, r):
            raise ValueError(
                f"{str(p)!r}: embed_tokens LoRA has A {list(a)} and B {list(b)}; the model needs "
                f"A [r, {vocab}] and B [{hidden}, r]"
            )
        if r > max_rank:
            raise ValueError(f"{str(p)!r}: embed_tokens rank {r} is above max_lora_rank={max_rank}; raise it")
        if cfg.get("use_dora"):
            raise ValueError(f"{str(p)!r}: DoRA on embed_tokens is not supported; train it as plain LoRA")
        embed = (r, scaling("model.embed_tokens", r))
    if tokens and tied:
        raise ValueError(
            f"{str(p)!r}: trained tokens on a model whose lm_head shares the embedding are not "
            f"supported (PEFT changes both); serve it on a model with untied embeddings"
        )
    if tokens and (max(tokens) >= vocab or min(tokens) < 0):
        raise ValueError(f"{str(p)!r}: trainable_token_indices outside the vocabulary [0, {vocab})")
    if tokens and _EMBED + "token_adapter.trainable_tokens_delta" not in tensors:
        raise ValueError(f"{str(p)!r}: trainable_token_indices is set but the file holds no trained tokens")
    if embed is None and not tokens and not head:
        return None
    return VocabSpec(embed, tokens, head, base)


def read_vocab_parts(raw: dict[str, torch.Tensor], spec: VocabSpec, dtype: torch.dtype) -> VocabWeights:
    embed = tokens = None
    if spec.embed is not None:
        a, b = raw[_EMBED + "lora_embedding_A"].float(), raw[_EMBED + "lora_embedding_B"].float()
        embed = (a.t().to(dtype).contiguous(), (b.t() * spec.embed[1]).to(dtype).contiguous())
    if spec.tokens:
        rows = raw[_EMBED + "token_adapter.trainable_tokens_delta"].to(dtype)
        tokens = (torch.tensor(spec.tokens), rows.contiguous())
    head = raw[_HEAD].to(dtype).contiguous() if spec.lm_head else None
    return VocabWeights(embed, tokens, head)


def base_embedding_in_file(weights_file: Path) -> torch.Tensor:
    """The base embedding PEFT saved beside an embedding LoRA (only that tensor is read)."""
    from safetensors import safe_open

    with safe_open(str(weights_file), framework="pt") as f:
        return f.get_tensor(_EMBED + "base_layer.weight")


class AdapterEmbedding(nn.Module):
    """embed_tokens plus, per slot, embedding LoRA and trained token rows (see the module doc)."""

    def __init__(self, base: nn.Embedding, state: Any) -> None:
        super().__init__()
        self.base, self.state = base, state
        self.parts: dict[int, VocabWeights] = {}  # slot -> its embedding parts, on the device

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def load(self, slot: int, w: VocabWeights | None) -> None:
        dev = self.base.weight.device
        if w is None or (w.embed is None and w.tokens is None):
            self.parts.pop(slot, None)
            return
        embed = None if w.embed is None else (w.embed[0].to(dev), w.embed[1].to(dev))
        tokens = None
        if w.tokens is not None:
            lookup = torch.full((self.base.num_embeddings,), -1, dtype=torch.long)
            lookup[w.tokens[0]] = torch.arange(len(w.tokens[0]))
            tokens = (lookup.to(dev), w.tokens[1].to(dev))
        self.parts[slot] = VocabWeights(embed, tokens, None)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.base(ids)
        st = self.state
        if not self.parts or not st.active:
            return x
        for slot, s, e in st.segments:
            part = self.parts.get(slot)
            if part is None:
                continue
            if part.tokens is not None:
                lookup, rows = part.tokens
                k = lookup[ids[s:e]]
                hit = (k >= 0).nonzero().squeeze(1)
                if hit.numel():
                    x[s:e].index_copy_(0, hit, rows.index_select(0, k.index_select(0, hit)))
            if part.embed is not None:
                at, bt = part.embed
                x[s:e] += at.index_select(0, ids[s:e]) @ bt
        return x


class AdapterHead(nn.Module):
    """lm_head, with a slot's trained lm_head for that slot's rows. The runner names each row's
    slot in `state.head_slots` before computing logits."""

    def __init__(self, base: nn.Linear, state: Any) -> None:
        super().__init__()
        self.base, self.state = base, state
        self.heads: dict[int, torch.Tensor] = {}  # slot -> [vocab, hidden] on the device

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def load(self, slot: int, w: VocabWeights | None) -> None:
        if w is None or w.lm_head is None:
            self.heads.pop(slot, None)
        else:
            self.heads[slot] = w.lm_head.to(self.base.weight.device)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        y = self.base(h)
        slots = self.state.head_slots
        if not self.heads or not slots:
            return y
        for slot in set(slots) & self.heads.keys():
            rows = torch.tensor([i for i, s in enumerate(slots) if s == slot], device=h.device)
            y.index_copy_(0, rows, h.index_select(0, rows) @ self.heads[slot].t())
        return y
