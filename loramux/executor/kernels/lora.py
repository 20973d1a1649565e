"""Multi-LoRA shrink and expand in Triton (Punica's SGMV, S-LoRA's MBGMM), one launch each.

Boundary: given a step's rows grouped into segments of one adapter slot each
(decode rows and prefill chunks alike), add every row's own low-rank delta to a
base output: y[rows] += (x[rows] @ A[slot, :r].T) @ Bt[slot, :r]. Base-model
rows are in no segment and cost nothing. executor/lora.py's torch path is the
reference.

Work is cut into blocks of at most BLOCK_M rows of one segment; `lora_blocks`
makes the block list once per step (every layer and module shares it). A block
with no rows (first row = end row) does nothing: a CUDA graph's block list has a
fixed length, padded with such blocks. Each
module passes its own ranks: a slot whose adapter has rank r in that module
computes r columns (loads past r are masked, so no padded rank is read), and a
slot that does not touch the module (r = 0) returns at once.

Slices: a fused projection (q, k, v as one linear; gate, up as one) keeps one
A per slice, stacked [slices, S, R, in], and one Bt whose columns are the
slices' outputs side by side [S, R, out_q + out_k + out_v]. One shrink launch
covers every slice (grid axis 1); one expand launch covers every slice's column
blocks (grid axis 2), each with its slice's shrink result and rank.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from loramux.executor.kernels import INTERPRETED

BLOCK_M = 16
_COL_STARTS: dict[tuple[tuple[int, ...], torch.device], torch.Tensor] = {}


def block_list(segments: list[tuple[int, int, int]], block_m: int = BLOCK_M) -> list[int]:
    """The blocks of at most block_m rows of each segment, flattened: slots, then first rows, then
    end rows (3 x NB ints; the runner sends them to the device with the step's other inputs)."""
    out: list[tuple[int, int, int]] = []
    for slot, s, e in segments:
        out.extend((slot, r, min(r + block_m, e)) for r in range(s, e, block_m))
    return [b[0] for b in out] + [b[1] for b in out] + [b[2] for b in out]


def lora_blocks(
    segments: list[tuple[int, int, int]], device: torch.device | str, block_m: int = BLOCK_M
) -> torch.Tensor:
    """[3, NB] int32 (slot, first row, end row) of each block of at most block_m rows of a segment."""
    flat = block_list(segments, block_m)
    return torch.tensor(flat, dtype=torch.int32, device=device).view(3, len(flat) // 3)


@triton.jit
def _empty(blocks_ptr, b, num_blocks):
    """Whether block b has no rows: a padding block of a CUDA graph's fixed-length block list."""
    return tl.load(blocks_ptr + num_blocks + b) >= tl.load(blocks_ptr + 2 * num_blocks + b)


@triton.jit
def _block_rows(blocks_ptr, b, num_blocks, rank, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    """Block b's rows (and which are real) and its rank columns (and which are within `rank`)."""
    rows = tl.load(blocks_ptr + num_blocks + b) + tl.arange(0, BLOCK_M)
    row_ok = rows < tl.load(blocks_ptr + 2 * num_blocks + b)
    offs_r = tl.arange(0, BLOCK_R)
    return rows, row_ok, offs_r, offs_r < rank


@triton.jit
def _shrink_kernel(
    x_ptr,  # [T, K]
    a_ptr,  # [slices, S, R, K]
    ranks_ptr,  # [slices, S] int32
    blocks_ptr,  # [3, NB] int32
    t_ptr,  # [slices, T, R] float32
    num_blocks,
    num_slots,
    num_rows,
    stride_xt,
    stride_as,  # slice
    stride_aslot,
    stride_ar,
    K: tl.constexpr,
    R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    F32: tl.constexpr,
):
    b = tl.program_id(0)
    sl = tl.program_id(1)
    slot = tl.load(blocks_ptr + b)
    rank = tl.load(ranks_ptr + sl * num_slots + slot)
    if (rank == 0) | _empty(blocks_ptr, b, num_blocks):
        return
    rows, row_ok, offs_r, r_ok = _block_rows(blocks_ptr, b, num_blocks, rank, BLOCK_M, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    a_base = a_ptr + sl * stride_as + slot.to(tl.int64) * stride_aslot
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = k0 + offs_k < K
        x = tl.load(
            x_ptr + rows[:, None] * stride_xt + (k0 + offs_k)[None, :],
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        a = tl.load(
            a_base + offs_r[:, None] * stride_ar + (k0 + offs_k)[None, :],
            mask=r_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        if F32:
            acc += tl.dot(x.to(tl.float32), tl.trans(a.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(a))
    t_ptrs = t_ptr + (sl * num_rows + rows)[:, None] * R + offs_r[None, :]
    tl.store(t_ptrs, acc, mask=row_ok[:, None] & r_ok[None, :])


@triton.jit
def _expand_kernel(
    t_ptr,  # [slices, T, R] float32
    bt_ptr,  # [S, R, N]
    ranks_ptr,  # [slices, S] int32
    blocks_ptr,  # [3, NB] int32
    col_starts_ptr,  # [slices + 1] int32: slice i owns columns [col_starts[i], col_starts[i + 1])
    y_ptr,  # [T, N], added into
    num_blocks,
    num_slots,
    num_rows,
    stride_bslot,
    stride_br,
    stride_yt,
    R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    F32: tl.constexpr,
):
    b = tl.program_id(0)
    sl = tl.program_id(2)
    c1 = tl.load(col_starts_ptr + sl + 1)
    n0 = tl.load(col_starts_ptr + sl) + tl.program_id(1) * BLOCK_N
    if n0 >= c1:  # a narrower slice than the widest: fewer column blocks
        return
    slot = tl.load(blocks_ptr + b)
    rank = tl.load(ranks_ptr + sl * num_slots + slot)
    if (rank == 0) | _empty(blocks_ptr, b, num_blocks):
        return
    rows, row_ok, offs_r, r_ok = _block_rows(blocks_ptr, b, num_blocks, rank, BLOCK_M, BLOCK_R)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < c1
    t = tl.load(
        t_ptr + (sl * num_rows + rows)[:, None] * R + offs_r[None, :],
        mask=row_ok[:, None] & r_ok[None, :],
        other=0.0,
    )
    bt = tl.load(
        bt_ptr + slot.to(tl.int64) * stride_bslot + offs_r[:, None] * stride_br + offs_n[None, :],
        mask=r_ok[:, None] & n_ok[None, :],
        other=0.0,
    )
    if F32:
        delta = tl.dot(t, bt.to(tl.float32), input_precision="ieee")
    else:
        delta = tl.dot(t.to(bt.dtype), bt)
    y_ptrs = y_ptr + rows[:, None] * stride_yt + offs_n[None, :]
    mask = row_ok[:, None] & n_ok[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + delta).to(y_ptr.dtype.element_ty), mask=mask)


def lora_shrink_expand(
    x: torch.Tensor,
    a: torch.Tensor,
    bt: torch.Tensor,
    ranks: torch.Tensor,
    blocks: torch.Tensor,
    y: torch.Tensor,
    col_starts: list[int] | None = None,
) -> torch.Tensor:
    """y[rows] += (x[rows] @ A[slice, slot, :r].T) @ Bt[slot, :r, slice columns] for every block.

    x [T, K]; a [slices, S, R, K] (or [S, R, K]: one slice); bt [S, R, N]; ranks [slices, S] (or
    [S]) int32; blocks from `lora_blocks`; y [T, N] is updated in place and returned. col_starts:
    the slices' first columns and N (default [0, N])."""
    if a.dim() == 3:
        a, ranks = a.unsqueeze(0), ranks.view(1, -1)
    slices, num_slots, max_rank, k = a.shape
    n = bt.shape[2]
    num_blocks = blocks.shape[1]
    if num_blocks == 0:
        return y
    cols = col_starts or [0, n]
    assert len(cols) == slices + 1 and cols[-1] == n and x.stride(1) == 1 and y.stride(1) == 1
    assert a.stride(3) == 1 and bt.stride(2) == 1
    block_r = max(16, triton.next_power_of_2(max_rank))
    f32 = x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and INTERPRETED)
    t = torch.empty(slices, x.shape[0], max_rank, dtype=torch.float32, device=x.device)
    _shrink_kernel[(num_blocks, slices)](
        x,
        a,
        ranks,
        blocks,
        t,
        num_blocks,
        num_slots,
        x.shape[0],
        x.stride(0),
        a.stride(0),
        a.stride(1),
        a.stride(2),
        K=k,
        R=max_rank,
        BLOCK_M=BLOCK_M,
        BLOCK_R=block_r,
        BLOCK_K=64 if k >= 64 else max(16, triton.next_power_of_2(k)),
        F32=f32,
    )
    block_n = 64
    key = (tuple(cols), x.device)
    starts = _COL_STARTS.get(key)
    if starts is None:  # made once per module shape, not every step
        starts = _COL_STARTS[key] = torch.tensor(cols, dtype=torch.int32, device=x.device)
    widest = max(b - a for a, b in itertools.pairwise(cols))
    _expand_kernel[(num_blocks, triton.cdiv(widest, block_n), slices)](
        t,
        bt,
        ranks,
        blocks,
        starts,
        y,
        num_blocks,
        num_slots,
        x.shape[0],
        bt.stride(0),
        bt.stride(1),
        y.stride(0),
        R=max_rank,
        BLOCK_M=BLOCK_M,
        BLOCK_R=block_r,
        BLOCK_N=block_n,
        F32=f32,
    )
    return y
