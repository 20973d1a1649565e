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


def test_cuda_defaults_to_bfloat16_and_generates(tiny_models):
    tm = tiny_models["llama"]
    _, prompts, loras = _setup(tm)
    llm = LLM(str(tm.path), device="cuda", num_pages=128, page_size=4)
    assert llm.engine.executor.dtype == torch.bfloat16
    outs = llm.generate(
        prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), loras, use_tqdm=False
    )
    assert all(len(o.outputs[0].token_ids) == 8 for o in outs)
