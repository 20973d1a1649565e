"""Issue 23 (S3, batched multi-LoRA): the Triton shrink/expand kernels against torch, run with
Triton's interpreter on CPU: decode rows and prefill segments in one launch, mixed ranks at their
own rank, base rows untouched, slots that skip a module, empty steps, fused slices (q, k, v)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs CUDA or TRITON_INTERPRET=1 (tests/conftest.py sets it)", allow_module_level=True)

from loramux.executor.kernels.lora import lora_blocks, lora_shrink_expand

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _weights(slices, slots, max_rank, k, n, ranks, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(slices, slots, max_rank, k, generator=g)
    bt = torch.randn(slots, max_rank, n, generator=g)
    for i in range(slices):  # rows past a slot's rank hold garbage: the kernel must not read them
        for s in range(slots):
            a[i, s, ranks[i][s] :] = 1e6
    bt[:, :, :] = torch.where(bt.abs() < 3, bt, bt.sign() * 3)
    return a.to(dtype), bt.to(dtype)


def _reference(x, a, bt, ranks, segments, y, cols):
    out = y.double().clone()
    for i in range(a.shape[0]):
        c0, c1 = cols[i], cols[i + 1]
        for slot, s, e in segments:
            r = ranks[i][slot]
            if r:
                out[s:e, c0:c1] += (x[s:e].double() @ a[i, slot, :r].double().t()) @ bt[
                    slot, :r, c0:c1
                ].double()
    return out


def _run(segments, rows, ranks, k=40, cols=(0, 48), dtype=torch.float32, max_rank=16, seed=0):
    slices, slots = len(cols) - 1, len(ranks[0])
    a, bt = _weights(slices, slots, max_rank, k, cols[-1], ranks, dtype, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(rows, k, generator=g).to(dtype)
    y = torch.randn(rows, cols[-1], generator=g).to(dtype)
    ref = _reference(x, a, bt, ranks, segments, y, cols)
    dev = DEVICE
    out = lora_shrink_expand(
        x.to(dev),
        a.to(dev),
        bt.to(dev),
        torch.tensor(ranks, dtype=torch.int32, device=dev),
        lora_blocks(segments, dev),
        y.to(dev).clone(),
        list(cols),
    ).cpu()
    return out, ref, y


def test_decode_rows_and_prefill_segments_with_mixed_ranks_in_one_launch():
    """Rows 0-2 base, then decode rows of slots 0, 2, 3, a 37-row prefill of slot 1 (three
    blocks), a slot of rank 0 in this module (untouched), ranks 16, 4, 8, 1."""
    ranks = [[16, 4, 8, 1, 0]]
    segments = [(0, 3, 4), (2, 4, 6), (3, 6, 7), (1, 7, 44), (4, 44, 46)]
    out, ref, y = _run(segments, 46, ranks)
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-5)
    assert torch.equal(out[:3], y[:3])  # base rows
    assert torch.equal(out[44:], y[44:])  # the slot without this module


def test_fused_qkv_slices_each_at_their_own_rank():
    """q (72 columns), k and v (24 each, not a multiple of the column block) as slices of one
    launch; a slot may skip a slice."""
    ranks = [[8, 16, 2], [8, 0, 2], [4, 16, 0]]
    segments = [(1, 0, 20), (0, 20, 21), (2, 21, 23)]
    out, ref, _ = _run(segments, 23, ranks, k=32, cols=(0, 72, 96, 120))
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    ranks = [[8, 16]]
    segments = [(0, 0, 1), (1, 1, 18)]
    out, ref, _ = _run(segments, 18, ranks, dtype=dtype)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, atol=0.5, rtol=2e-2)


def test_a_step_without_adapter_rows_changes_nothing():
    out, _, y = _run([], 5, [[8]])
    assert torch.equal(out, y)
    assert lora_blocks([], "cpu").shape == (3, 0)


def test_blocks_cut_long_segments():
    blocks = lora_blocks([(3, 0, 1), (5, 1, 40)], "cpu").t().tolist()
    assert blocks == [[3, 0, 1], [5, 1, 17], [5, 17, 33], [5, 33, 40]]


def test_padding_blocks_without_rows_change_nothing():
    """A CUDA graph's block list has a fixed length: blocks past the step's own have first row =
    end row (here slot 0 at row 0, and slot 1 at row 3) and must add nothing."""
    ranks = [[8, 4]]
    segments = [(1, 0, 2), (0, 2, 3)]
    a, bt = _weights(1, 2, 16, 40, 48, ranks, torch.float32)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 40, generator=g), torch.randn(4, 48, generator=g)
    ref = _reference(x, a, bt, ranks, segments, y, (0, 48))
    real = lora_blocks(segments, "cpu")
    pad = torch.tensor([[0, 1], [0, 3], [0, 3]], dtype=torch.int32)
    blocks = torch.cat([real, pad], dim=1).to(DEVICE)
    out = lora_shrink_expand(
        x.to(DEVICE), a.to(DEVICE), bt.to(DEVICE), torch.tensor(ranks, dtype=torch.int32, device=DEVICE),
        blocks, y.to(DEVICE).clone(),
    ).cpu()  # fmt: skip
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-5)
    assert torch.equal(out[3], y[3])  # row 3 is in no real block
