"""Issue 23 (S2, paged KV): the Triton paged-attention kernel against torch, run with Triton's
interpreter on CPU: decode rows and prefill chunks (with cached context) in one launch, GQA,
sliding window, page sizes, dtypes, pages spread over the pool in any order."""

from __future__ import annotations

import math
import os

import pytest
import torch

from loramux.executor.attention import AttentionMetadata, PrefillChunk, decode_mask, paged_attention

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs CUDA or TRITON_INTERPRET=1 (tests/conftest.py sets it)", allow_module_level=True)

from loramux.executor.kernels.paged_attention import paged_attention_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _scenario(seqs, heads, kv, dim, page_size, dtype, seed=0):
    """seqs: [(ctx_len, q_len)]; returns q, caches filled for every position, block table, lens."""
    g = torch.Generator().manual_seed(seed)
    pages_per = [math.ceil(c / page_size) for c, _ in seqs]
    num_pages = sum(pages_per) + 3
    perm = torch.randperm(num_pages, generator=g).tolist()  # pages anywhere in the pool
    tables, at = [], 0
    for n in pages_per:
        tables.append(perm[at : at + n])
        at += n
    k_cache = torch.randn(num_pages, page_size, kv, dim, generator=g).to(dtype)
    v_cache = torch.randn(num_pages, page_size, kv, dim, generator=g).to(dtype)
    total = sum(q for _, q in seqs)
    q = torch.randn(total, heads, dim, generator=g).to(dtype)
    width = max(pages_per)
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    return q, k_cache, v_cache, table, tables


def _dense_reference(q, k_cache, v_cache, tables, seqs, scale, window):
    """Each query against its own sequence's keys, gathered page by page, in float64."""
    out, row = [], 0
    heads, kv = q.shape[1], k_cache.shape[2]
    for (ctx, n), pages in zip(seqs, tables, strict=True):
        k = k_cache[pages].reshape(-1, kv, k_cache.shape[-1])[:ctx].double()
        v = v_cache[pages].reshape(-1, kv, v_cache.shape[-1])[:ctx].double()
        k = k.repeat_interleave(heads // kv, dim=1)
        v = v.repeat_interleave(heads // kv, dim=1)
        qs = q[row : row + n].double()
        s = torch.einsum("thd,jhd->htj", qs, k) * scale
        pos = torch.arange(ctx - n, ctx)[:, None]
        j = torch.arange(ctx)[None, :]
        vis = j <= pos
        if window:
            vis &= pos - j < window
        s = s.masked_fill(~vis, float("-inf"))
        out.append(torch.einsum("htj,jhd->thd", s.softmax(-1), v))
        row += n
    return torch.cat(out)


def _run(seqs, heads=4, kv=2, dim=16, page_size=16, dtype=torch.float32, window=None):
    q, kc, vc, table, tables = _scenario(seqs, heads, kv, dim, page_size, dtype)
    starts = [0]
    for _, n in seqs:
        starts.append(starts[-1] + n)
    dev = DEVICE
    scale = dim**-0.5
    out = paged_attention_triton(
        q.to(dev),
        kc.to(dev),
        vc.to(dev),
        table.to(dev),
        torch.tensor([c for c, _ in seqs], dtype=torch.int32, device=dev),
        torch.tensor(starts, dtype=torch.int32, device=dev),
        max(n for _, n in seqs),
        scale,
        window,
    ).cpu()
    ref = _dense_reference(q, kc, vc, tables, seqs, scale, window)
    return out, ref, (q, kc, vc, tables)


@pytest.mark.parametrize(
    "heads,kv,dim,page_size",
    [(4, 2, 16, 16), (4, 4, 16, 8), (8, 1, 32, 4), (2, 2, 24, 16), (4, 2, 16, 5)],
    ids=["gqa2", "mha-page8", "mqa-page4", "dim24", "page5"],
)
def test_decode_and_prefill_chunks_in_one_launch_match_the_reference(heads, kv, dim, page_size):
    """Decode rows (q_len 1) beside a first prefill chunk and a chunk after cached context."""
    seqs = [(1, 1), (37, 1), (20, 20), (50, 13), (9, 1), (33, 33)]
    out, ref, _ = _run(seqs, heads, kv, dim, page_size)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [1, 7, 32])
def test_sliding_window_matches_the_reference(window):
    seqs = [(70, 1), (45, 45), (80, 17), (3, 1)]
    out, ref, _ = _run(seqs, window=window)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_accumulate_in_float32(dtype):
    seqs = [(40, 1), (24, 24), (30, 6)]
    out, ref, _ = _run(seqs, dtype=dtype)
    assert out.dtype == dtype
    tol = 1e-2 if dtype == torch.float16 else 3e-2
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)


def test_the_kernel_agrees_with_the_torch_path_it_replaces():
    """The same step through executor/attention.py's paged_attention (its metadata built as the
    runner builds it) and through the kernel."""
    page_size, heads, kv, dim = 8, 4, 2, 16
    seqs = [(12, 1), (30, 1), (19, 19), (26, 9)]
    q, kc, vc, table, tables = _scenario(seqs, heads, kv, dim, page_size, torch.float32, seed=3)
    decode = [i for i, (_, n) in enumerate(seqs) if n == 1]
    rows = [sum(n for _, n in seqs[:i]) for i in range(len(seqs))]
    width = max(len(tables[i]) for i in decode)
    meta = AttentionMetadata(
        torch.empty(0, dtype=torch.long),
        torch.tensor([rows[i] for i in decode]),
        torch.tensor([tables[i] + [0] * (width - len(tables[i])) for i in decode]),
        decode_mask(torch.tensor([seqs[i][0] for i in decode]), width * page_size, None),
        [
            PrefillChunk(rows[i], rows[i] + n, c - n, torch.tensor(tables[i]))
            for i, (c, n) in enumerate(seqs)
            if n > 1
        ],
    )
    empty = torch.empty(0, kv, dim)
    torch_out = paged_attention(q, empty, empty, kc.clone(), vc.clone(), meta, dim**-0.5, None)
    kern = paged_attention_triton(
        q,
        kc,
        vc,
        table,
        torch.tensor([c for c, _ in seqs], dtype=torch.int32),
        torch.tensor([0, *[sum(n for _, n in seqs[: i + 1]) for i in range(len(seqs))]], dtype=torch.int32),
        19,
        dim**-0.5,
        None,
    )
    torch.testing.assert_close(kern, torch_out, atol=2e-5, rtol=1e-5)
