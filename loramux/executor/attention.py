"""Attention over a paged KV cache: plain PyTorch, or the Triton kernel on CUDA.

Boundary: given one step's queries, keys and values (tokens of many requests
flattened into one batch) and the step's `AttentionMetadata`, write the new
keys and values into their pages and attend each query to its own request's
context. The model code calls `paged_attention` and knows nothing of pages.

Cache layout per layer: k, v of shape [num_pages, page_size, num_kv_heads, head_dim];
flattened, slot s = page * page_size + offset holds one token.

A step mixes two kinds of rows:
- decode rows (one new token): batched, keys gathered a whole page at a time
  through a padded page table [B, P] (L = P * page_size keys) with a length mask;
- prefill chunks (several new tokens): one call per request, with the causal
  mask shifted by the tokens already in the cache:

      keys:     | cached (start) | new chunk (n) |
      query i sees keys 0 .. start + i (and, with a sliding window w, only the last w)

With `KernelMetadata` (the CUDA path, executor/kernels/paged_attention.py) the
whole step is one kernel launch reading K and V through the page table in place;
this torch code is the CPU default and the kernel's reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PrefillChunk:
    token_start: int  # rows [token_start, token_end) of the flattened batch
    token_end: int
    start_pos: int  # tokens of this request already in the cache
    pages: torch.Tensor  # [ceil((start_pos + n) / page_size)] pages holding every key it attends to


@dataclass
class KernelMetadata:
    """Every sequence of the step, in row order, for the Triton kernel (int32 on the device)."""

    block_table: torch.Tensor  # [S, P] pages of each sequence (padded with page 0)
    ctx_lens: torch.Tensor  # [S] keys in the cache after this step's are written
    query_start: torch.Tensor  # [S + 1] rows of each sequence's queries
    max_query_len: int


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] where each new token's k/v is written
    decode_rows: torch.Tensor | None  # [B] rows of the batch that decode one token
    decode_pages: torch.Tensor | None  # [B, P] page table of each decode row (padded with page 0)
    decode_mask: torch.Tensor | None  # [B, 1, 1, P * page_size] True where a key is visible
    prefills: list[PrefillChunk]
    kernel: KernelMetadata | None = None


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """q [T, H, D], k/v [T, KV, D] -> out [T, H, D]."""
    num_kv, head_dim = k.shape[1], k.shape[2]
    k_cache.view(-1, num_kv, head_dim).index_copy_(0, meta.slot_mapping, k)  # [slots, KV, D]
    v_cache.view(-1, num_kv, head_dim).index_copy_(0, meta.slot_mapping, v)
    if (km := meta.kernel) is not None:
        from loramux.executor.kernels.paged_attention import paged_attention_triton

        return paged_attention_triton(
            q, k_cache, v_cache, km.block_table, km.ctx_lens, km.query_start, km.max_query_len,
            scale, sliding_window,
        )  # fmt: skip
    out = torch.empty_like(q)
    if meta.decode_rows is not None:
        rows, pages = meta.decode_rows, meta.decode_pages
        assert pages is not None
        b, width = pages.shape[0], pages.shape[1] * k_cache.shape[1]
        qd = q.index_select(0, rows).unsqueeze(2)  # [B, H, 1, D]
        kd = k_cache.index_select(0, pages.view(-1)).view(b, width, num_kv, head_dim).transpose(1, 2)
        vd = v_cache.index_select(0, pages.view(-1)).view(b, width, num_kv, head_dim).transpose(1, 2)
        od = F.scaled_dot_product_attention(
            qd, kd, vd, attn_mask=meta.decode_mask, scale=scale, enable_gqa=True
        )  # [B, H, 1, D] from keys [B, KV, L, D]
        out.index_copy_(0, rows, od.squeeze(2))
    for chunk in meta.prefills:
        s, e = chunk.token_start, chunk.token_end
        ctx = chunk.start_pos + e - s
        qp = q[s:e].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
        kp = k_cache.index_select(0, chunk.pages).view(-1, num_kv, head_dim)[:ctx]  # [ctx, KV, D]
        vp = v_cache.index_select(0, chunk.pages).view(-1, num_kv, head_dim)[:ctx]
        mask = chunk_mask(e - s, chunk.start_pos, sliding_window, q.device)
        kp, vp = kp.transpose(0, 1).unsqueeze(0), vp.transpose(0, 1).unsqueeze(0)  # [1, KV, ctx, D]
        op = F.scaled_dot_product_attention(
            qp, kp, vp, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True
        )
        out[s:e] = op.squeeze(0).transpose(0, 1)  # [1, H, n, D] -> [n, H, D]
    return out


def chunk_mask(n: int, start: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    """[n, start + n] visibility for a prefill chunk; None when a plain causal mask will do."""
    if start == 0 and (window is None or n <= window):
        return None
    q_pos = torch.arange(start, start + n, device=device).unsqueeze(1)  # [n, 1]
    k_pos = torch.arange(start + n, device=device).unsqueeze(0)  # [1, start + n]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= q_pos - k_pos < window
    return mask


def decode_mask(ctx_lens: torch.Tensor, width: int, window: int | None) -> torch.Tensor:
    """[B, 1, 1, width]: key j of row b is visible if j < ctx_len[b] (and within the window)."""
    k_pos = torch.arange(width, device=ctx_lens.device).unsqueeze(0)  # [1, L]
    lens = ctx_lens.unsqueeze(1)  # [B, 1]
    mask = k_pos < lens
    if window is not None:
        mask &= (lens - 1) - k_pos < window
    return mask[:, None, None, :]
