"""The batched LoRA compute equals a per-row reference on every path (issue: executor, S3).

`LoRALinear` picks, per module and step, one of four ways to add each token's
own adapter delta: a matmul pair per long segment (prefill), plain views when
decode rows and slots are both consecutive, a bmm over a window of slot
buffers with the rows' inputs scattered into it, or a gather of the rows'
weights. These tests draw random layouts (mixed ranks, modules an adapter
does not touch, several rows of one adapter, base rows) and check every path
against row-by-row arithmetic, with NaN left in the unused slots and rank rows
so that reading anything it should not shows up.
"""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from loramux.executor.lora import SHORT_SEGMENT, LoRALinear, LoRAState

IN, OUT, SLOTS, MAX_RANK = 24, 40, 12, 8


def make_linear(seed: int) -> tuple[LoRALinear, LoRAState, dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    g = torch.Generator().manual_seed(seed)
    state = LoRAState()
    base = nn.Linear(IN, OUT, bias=True)
    with torch.no_grad():
        base.weight.copy_(torch.randn(OUT, IN, generator=g))
        base.bias.copy_(torch.randn(OUT, generator=g))
    lin = LoRALinear(base, state, SLOTS, MAX_RANK)
    rng = random.Random(seed)
    loaded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for slot in range(SLOTS):
        r = rng.choice([4, 4, 4, 8, 2])  # mostly one rank, so rank groups hold several slots
        lin.load(slot, torch.full((MAX_RANK, IN), float("nan")), torch.full((MAX_RANK, OUT), float("nan")))
        a, bt = torch.randn(r, IN, generator=g), torch.randn(r, OUT, generator=g)
        lin.load(slot, a, bt)  # rows [r:] keep the NaN of the load before
        loaded[slot] = (a, bt)
    for slot in rng.sample(range(SLOTS), 3):  # the adapter there does not touch this module
        lin.clear(slot)
        loaded.pop(slot)
    return lin, state, loaded


def random_layout(rng: random.Random) -> list[tuple[int | None, int]]:
    """(slot or None for the base model, rows) per request, sorted by slot as the runner sorts them."""
    n_slots = rng.choice([2, 5, SLOTS])
    slots = rng.sample(range(SLOTS), n_slots)
    reqs: list[tuple[int | None, int]] = []
    for slot in slots:
        for _ in range(rng.choice([1, 1, 1, 2])):
            reqs.append((slot, rng.choice([1, 1, 1, 1, 3, SHORT_SEGMENT + 3])))
    reqs += [(None, rng.choice([1, 6]))] * rng.randint(0, 2)
    return sorted(reqs, key=lambda q: -1 if q[0] is None else q[0])


def segments_of(
    layout: list[tuple[int | None, int]],
) -> tuple[list[tuple[int, int, int]], list[int | None], int]:
    """The runner's segments (one per run of a slot), each row's slot, and the row count."""
    segments: list[tuple[int, int, int]] = []
    row_slots: list[int | None] = []
    for slot, n in layout:
        t0 = len(row_slots)
        row_slots += [slot] * n
        if slot is None:
            continue
        if segments and segments[-1][0] == slot:
            segments[-1] = (slot, segments[-1][1], t0 + n)
        else:
            segments.append((slot, t0, t0 + n))
    return segments, row_slots, len(row_slots)


def reference(lin: LoRALinear, loaded, x: torch.Tensor, row_slots: list[int | None]) -> torch.Tensor:
    y = lin.base(x)
    for i, slot in enumerate(row_slots):
        if slot in loaded:
            a, bt = loaded[slot]
            y[i] += (x[i] @ a.t()) @ bt
    return y


def path_of(group) -> str:
    return "view" if group.span is not None else "window" if group.window is not None else "gather"


@pytest.mark.parametrize("seed", range(3))
def test_every_decode_path_equals_row_by_row_arithmetic(seed):
    """S3.2: each row gets exactly its own adapter's delta, whatever path the step takes."""
    lin, state, loaded = make_linear(seed)
    rng = random.Random(100 + seed)
    paths: set[str] = set()
    with torch.inference_mode():
        for _ in range(60):
            segments, row_slots, n = segments_of(random_layout(rng))
            x = torch.randn(n, IN)
            with state.batch(segments, x.device):
                paths |= {path_of(g) for g in state.short_groups(lin.ranks[0])}
                paths |= {"long"} if state.long else set()
                got = lin(x)
            want = reference(lin, loaded, x, row_slots)
            assert not got.isnan().any(), "an unused slot or rank row leaked into the output"
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    assert paths == {"long", "view", "window", "gather"}, f"layouts never took some path: {paths}"


def test_window_path_is_taken_for_decodes_over_a_dense_window():
    """The many-adapter decode step (slots nearly all in use) reads the slot buffers in place, also
    when an adapter has two rows (its second row goes to a group of its own); sparse slots fall
    back to the gather."""
    lin, state, _ = make_linear(0)
    for slot in range(SLOTS):
        lin.load(slot, torch.randn(4, IN), torch.randn(4, OUT))
    dense = [(s, i, i + 1) for i, s in enumerate([0, 2, 3, 5, 6, 7])]  # 6 rows over a window of 8
    sparse = [(0, 0, 1), (11, 1, 2)]  # 2 rows over a window of 12
    repeated = [(3, 0, 2), (4, 2, 3), (6, 3, 4)]  # slot 3 has two rows
    with state.batch(dense, torch.device("cpu")):
        assert [path_of(g) for g in state.short_groups(lin.ranks[0])] == ["window"]
    with state.batch(repeated, torch.device("cpu")):
        assert [path_of(g) for g in state.short_groups(lin.ranks[0])] == ["window", "view"]
    with state.batch(sparse, torch.device("cpu")):
        assert [path_of(g) for g in state.short_groups(lin.ranks[0])] == ["gather"]
