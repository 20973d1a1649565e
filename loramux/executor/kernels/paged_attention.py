"""Paged attention in Triton: one launch for a step's decode rows and prefill chunks.

Boundary: given queries flattened over a step's sequences, the paged K/V cache
(new keys already written), each sequence's page table, context length and
query span, compute attention reading K and V through the page table in place:
no gathered copy of any context. The torch path in executor/attention.py is the
reference it is tested against (with Triton's interpreter on CPU).

One program per (sequence, KV head, block of query rows). GQA: the query heads
that share a KV head are rows of the same block, so each page of K and V is read
once per block and KV head, not once per query head:

    block rows m = token * G + head_in_group   (G = H / KV, token < query length)
    query token t of sequence s sits at position ctx_len[s] - q_len[s] + t
    key j is visible to it if j <= position (and position - j < window)

Scores, the running max and sum, and the output accumulate in float32 (online
softmax); inputs may be float32, float16 or bfloat16 (float32 dots in IEEE
precision, not TF32). The page size is a compile-time constant; key blocks of
BLOCK_N keys may span several pages (each key's page is looked up).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from loramux.executor.kernels import INTERPRETED


@triton.jit
def _paged_attention_kernel(
    q_ptr,  # [T, H, D]
    k_cache_ptr,  # [num_pages, PAGE_SIZE, KV, D]
    v_cache_ptr,
    out_ptr,  # [T, H, D]
    block_table_ptr,  # [S, max_pages] int32
    ctx_lens_ptr,  # [S] int32: keys in the cache for each sequence, this step's included
    query_start_ptr,  # [S + 1] int32: sequence s's queries are rows [start[s], start[s + 1])
    scale,
    window,  # 0: no sliding window
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_bt,
    stride_slot,  # elements between consecutive slots (tokens) of the cache: KV * D
    stride_kvh,  # elements between KV heads of one slot: D
    GROUP: tl.constexpr,  # query heads per KV head
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    IEEE: tl.constexpr,  # dots in float32 at full precision (float32 inputs; bf16 interpreted)
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    m_block = tl.program_id(2)
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    if m_block * BLOCK_M >= q_len * GROUP:
        return
    ctx_len = tl.load(ctx_lens_ptr + seq)
    first_pos = ctx_len - q_len  # position of the sequence's first query token

    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    token = offs_m // GROUP
    head = kv_head * GROUP + offs_m % GROUP
    row_ok = token < q_len
    q_pos = first_pos + token
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q_ptrs = q_ptr + (q_start + token)[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    last_token = tl.minimum((m_block * BLOCK_M + BLOCK_M - 1) // GROUP, q_len - 1)
    hi = first_pos + last_token + 1  # keys past the block's last query are never visible
    first_token = (m_block * BLOCK_M) // GROUP  # keys before the window of its first query: never
    lo = tl.where(window > 0, (tl.maximum(first_pos + first_token - window + 1, 0) // BLOCK_N) * BLOCK_N, 0)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        page = tl.load(block_table_ptr + seq * stride_bt + offs_n // PAGE_SIZE, mask=n_ok, other=0)
        slot = page.to(tl.int64) * PAGE_SIZE + offs_n % PAGE_SIZE
        kv_off = slot[:, None] * stride_slot + kv_head * stride_kvh + offs_d[None, :]
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0)
        if IEEE:
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * scale
        visible = (offs_n[None, :] <= q_pos[:, None]) & n_ok[None, :] & row_ok[:, None]
        if window > 0:
            visible = visible & (q_pos[:, None] - offs_n[None, :] < window)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that see nothing yet
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_ptrs = out_ptr + (q_start + token)[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def paged_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    ctx_lens: torch.Tensor,
    query_start: torch.Tensor,
    max_query_len: int,
    scale: float,
    sliding_window: int | None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [T, H, D]; caches [num_pages, page_size, KV, D]; block_table [S, P], ctx_lens [S],
    query_start [S + 1] (int32, on q's device) -> out [T, H, D]. The step's own keys and values
    must be in the cache already. max_query_len bounds the grid (a host int: no device sync)."""
    _, num_heads, head_dim = q.shape
    _, page_size, num_kv, _ = k_cache.shape
    group = num_heads // num_kv
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and q.stride(2) == 1
    if out is None:
        out = torch.empty_like(q)
    block_m = max(16, triton.next_power_of_2(group))
    grid = (block_table.shape[0], num_kv, triton.cdiv(max_query_len * group, block_m))
    _paged_attention_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        block_table,
        ctx_lens,
        query_start,
        scale,
        sliding_window or 0,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        block_table.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_M=block_m,
        BLOCK_N=32 if head_dim <= 128 else 16,
        PAGE_SIZE=page_size,
        IEEE=q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and INTERPRETED),
    )
    return out
