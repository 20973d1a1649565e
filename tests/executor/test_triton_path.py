"""Issue 23: the engine on the Triton path (paged-attention and multi-LoRA kernels) equals
transformers+PEFT, as the torch path does (S2 paged KV, S3 batched multi-LoRA). On CPU the kernels
run in Triton's interpreter (LORAMUX_KERNELS=triton, TRITON_INTERPRET=1); on CUDA the same test runs
them compiled. Mixed batches of every adapter and the base, chunked prefill over cached context,
prefix-cache hits, Mistral's sliding window, Qwen2's biases."""

from __future__ import annotations

import os

import pytest
import torch

from tests.executor.test_equality import assert_equal, make_llm, prompts, run

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs CUDA or TRITON_INTERPRET=1 (tests/conftest.py sets it)", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def triton_path(monkeypatch):
    monkeypatch.setenv("LORAMUX_KERNELS", "triton")


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_mixed_batch_with_chunked_prefill_on_the_triton_path_equals_peft(
    arch, tiny_models, oracles, triton_path
):
    tm = tiny_models[arch]
    names = [None, *tm.adapters]
    ps = prompts(len(names), 20, seed=1)
    llm = make_llm(tm, max_num_batched_tokens=24, device=DEVICE)  # prefills in chunks beside decodes
    assert llm.engine.executor.triton
    tokens, logits, _ = run(llm, tm, ps, names, n_new=6)
    assert_equal(oracles(arch), ps, names, tokens, logits)


def test_prefix_cache_hits_on_the_triton_path_equal_peft(tiny_models, oracles, triton_path):
    tm = tiny_models["llama"]
    llm = make_llm(tm, device=DEVICE)
    shared = prompts(1, 13, seed=2)[0]
    run(llm, tm, [shared + [7, 8, 9]], ["r8_all"], n_new=3)
    second = [shared + [10, 11, 12], shared + [13, 14, 15]]
    tokens, logits, outs = run(llm, tm, second, ["r8_all", "rs4_attn"], n_new=4)
    assert [o.num_cached_tokens for o in outs] == [12, 0]  # a hit for the same adapter only
    assert_equal(oracles("llama"), second, ["r8_all", "rs4_attn"], tokens, logits)


def test_the_torch_path_stays_the_cpu_default(tiny_models):
    assert not make_llm(tiny_models["llama"]).engine.executor.triton
