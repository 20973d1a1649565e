"""GPU tier: the CUDA path (float32 exact, bfloat16 by default). Skipped without a CUDA device."""

from __future__ import annotations

import random

import pytest
import torch

from loramux import LLM, LoRARequest, SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _setup(tm):
    names = [None, *tm.adapters]
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 512) for _ in range(12)] for _ in names]
    loras = [None if n is None else LoRARequest(n, i + 1, str(tm.adapters[n])) for i, n in enumerate(names)]
    return names, prompts, loras


def test_cuda_float32_equals_peft(tiny_models, oracles):
    tm = tiny_models["llama"]
    names, prompts, loras = _setup(tm)
    llm = LLM(str(tm.path), device="cuda", dtype="float32", num_pages=128, page_size=4)
    outs = llm.generate(
        prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), loras, use_tqdm=False
    )
    ref, _ = oracles("llama").greedy(prompts, names, 8)
    assert [o.outputs[0].token_ids for o in outs] == ref


def greedy_with_margins(llm, prompts, loras, n):
    """Greedy tokens per prompt, and for each step the gap between the top two logits."""
    margins: dict[str, list[float]] = {}

    def hook(rid, row):
        top = row.float().topk(2).values
        margins.setdefault(rid, []).append(float(top[0] - top[1]))

    llm.engine.executor.logits_hook = hook
    try:
        outs = llm.generate(
            prompts, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), loras, use_tqdm=False
        )
    finally:
        llm.engine.executor.logits_hook = None
    return [o.outputs[0].token_ids for o in outs], [margins[o.request_id] for o in outs]


def agree_where_clear(ref, ref_margins, got, tol):
    """Walk each sequence while the contexts are equal: wherever float32's choice is clear (its
    top-two gap above `tol`) bfloat16 must pick the same token; the first near-tie may diverge,
    after which the contexts differ and comparing stops. Returns the number of steps checked."""
    checked = 0
    for r, m, g in zip(ref, ref_margins, got, strict=True):
        for a, gap, b in zip(r, m, g, strict=True):
            if gap > tol:
                assert a == b, (r, g, m)
                checked += 1
            elif a != b:
                break
    return checked


def test_cuda_bfloat16_greedy_tokens_equal_float32_where_the_choice_is_clear(tiny_models):
    """The default CUDA dtype, bfloat16, against float32 on the same model and adapters (issue 12,
    point 7): same greedy tokens wherever float32's top-two gap exceeds bfloat16's error."""
    tm = tiny_models["llama"]
    _, prompts, loras = _setup(tm)
    bf16 = LLM(str(tm.path), device="cuda", num_pages=128, page_size=4)
    assert bf16.engine.executor.dtype == torch.bfloat16
    fp32 = LLM(str(tm.path), device="cuda", dtype="float32", num_pages=128, page_size=4)
    ref, margins = greedy_with_margins(fp32, prompts, loras, 8)
    got, _ = greedy_with_margins(bf16, prompts, loras, 8)
    assert agree_where_clear(ref, margins, got, tol=0.05) >= len(prompts)  # about one step each


def test_cuda_graphs_replay_shrinking_batches_of_mixed_adapters_and_ranks_as_peft(tiny_models, oracles):
    """Issue 23, point 5 on a device: decode steps replay captured graphs while requests end one
    after another (buckets 8 -> 4 -> 2 -> 1), 5 down to 1 distinct adapters of ranks 1-64 beside
    base rows, then the base row alone (the graph without LoRA launches); float32 tokens equal
    PEFT's and eager's, and the logits agree with eager's."""
    tm = tiny_models["llama"]
    names = [None, "r1_qv", "r8_all", "r64_mlp", "rs4_attn", "r8_all", "r1_qv"]
    ids = {n: i + 1 for i, n in enumerate(tm.adapters)}
    loras = [None if n is None else LoRARequest(n, ids[n], str(tm.adapters[n])) for n in names]
    rng = random.Random(11)
    prompts = [[rng.randrange(3, 512) for _ in range(9)] for _ in names]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (12, 3, 4, 5, 6, 7, 2)]
    results = {}
    for eager in (True, False):
        llm = LLM(
            str(tm.path), device="cuda", dtype="float32", num_pages=128, page_size=4, max_num_seqs=8,
            max_loras=4, enforce_eager=eager,
        )  # fmt: skip
        runner = llm.engine.executor
        assert (runner.graphs is None) == eager
        logits: dict[str, list[torch.Tensor]] = {}
        runner.logits_hook = lambda rid, row, logits=logits: logits.setdefault(rid, []).append(row.cpu())
        outs = llm.generate(prompts, params, loras, use_tqdm=False)
        results[eager] = ([o.outputs[0].token_ids for o in outs], [logits[o.request_id] for o in outs])
        if not eager:
            assert runner.graphs.replays >= 10
    ref, _ = oracles("llama").greedy(prompts, names, 12)
    for (tokens, _), label in ((results[True], "eager"), (results[False], "graphs")):
        assert tokens == [r[: len(t)] for r, t in zip(ref, tokens, strict=True)], label
    for a, b in zip(results[True][1], results[False][1], strict=True):
        assert max((x - y).abs().max().item() for x, y in zip(a, b, strict=True)) < 1e-3


def test_the_forward_makes_no_host_sync_on_the_triton_path(tiny_models):
    """Issue 23, point 4: with the step's inputs on the device, the model's forward (prefill chunks
    beside decodes, mixed adapters, eager so that every step runs it) never waits on the device:
    torch's sync debug mode turns any synchronizing call inside it into an error. A first run fills
    the once-per-shape caches (a module's column starts go to the device once)."""
    tm = tiny_models["llama"]
    _, prompts, loras = _setup(tm)
    llm = LLM(
        str(tm.path), device="cuda", dtype="float32", num_pages=128, page_size=4, max_num_batched_tokens=24,
        enforce_eager=True,
    )  # fmt: skip
    runner = llm.engine.executor
    assert runner.triton and runner.graphs is None
    forward = runner.model.forward
    calls = []

    def guarded(*args, **kwargs):
        torch.cuda.set_sync_debug_mode("error")
        try:
            calls.append(1)
            return forward(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    greedy = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    llm.generate(prompts, greedy, loras, use_tqdm=False)  # the caches
    runner.model.forward = guarded
    outs = llm.generate(
        prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), loras, use_tqdm=False
    )
    assert all(len(o.outputs[0].token_ids) == 6 for o in outs)
    assert len(calls) >= 6
