"""vLLM's prompt_logprobs: each prompt token's logprob given the tokens before it, its rank and
the top alternatives, per adapter in one mixed batch, against transformers + PEFT (the outside
oracle), across prefill chunks, and never from cached pages (S1.1, S3.1: a request that asks
computes its whole prompt; its pages still serve the others).

Evaluation harnesses score an adapter by these numbers (lm-eval's loglikelihood tasks send
`echo` with `logprobs`), so they must be the model's, not an approximation.
"""

from __future__ import annotations

import random

import pytest
import torch

from loramux import LLM, LoRARequest, SamplingParams
from loramux.executor import model_runner
from tests.hf_factory import PeftOracle

ADAPTERS = [None, "r8_all", "r1_qv"]


@pytest.mark.parametrize("kernels", ["torch", "triton"])  # triton: interpreted on CPU (conftest)
def test_prompt_logprobs_match_peft_per_adapter_in_one_batch_across_chunks(tiny_models, kernels, monkeypatch):
    monkeypatch.setenv("LORAMUX_KERNELS", kernels)
    monkeypatch.setattr(model_runner, "_PROMPT_ROWS", 5)  # a chunk's logits in several slices
    tm = tiny_models["llama"]
    oracle = PeftOracle(tm)
    llm = LLM(str(tm.path), device="cpu", num_pages=256, page_size=4, max_num_batched_tokens=16, max_loras=2)
    rng = random.Random(3)
    prompts = [[rng.randrange(5, 250) for _ in range(23)] for _ in ADAPTERS]
    loras = [
        None if a is None else LoRARequest(a, i + 1, str(tm.adapters[a])) for i, a in enumerate(ADAPTERS)
    ]
    params = SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=3)

    def check(outs) -> None:
        for prompt, adapter, out in zip(prompts, ADAPTERS, outs, strict=True):
            with torch.no_grad():
                logits = oracle.model(input_ids=torch.tensor([prompt]), adapter_names=[adapter or "__base__"])
            logp = logits.logits[0].float().log_softmax(-1)
            got = out.prompt_logprobs
            assert got is not None and len(got) == len(prompt) and got[0] is None
            for i in range(1, len(prompt)):
                want = logp[i - 1]
                assert abs(got[i].token_logprob - float(want[prompt[i]])) < 1e-4, (adapter, i)
                assert got[i].rank == int((want > want[prompt[i]]).sum()) + 1, (adapter, i)
                assert [t for t, _ in got[i].top] == want.topk(3).indices.tolist(), (adapter, i)

    assert llm.engine.executor.triton == (kernels == "triton")
    first = llm.generate(prompts, params, loras, use_tqdm=False)
    check(first)
    # the same prompts again: their pages are cached now, yet every prompt token is computed
    again = llm.generate(prompts, params, loras, use_tqdm=False)
    assert [o.num_cached_tokens for o in again] == [0, 0, 0]
    check(again)
    plain = llm.generate(prompts[:1], SamplingParams(max_tokens=1, temperature=0), use_tqdm=False)[0]
    assert plain.num_cached_tokens > 0 and plain.prompt_logprobs is None  # the pages serve others


def test_prompt_logprobs_zero_gives_the_token_and_rank_only(tiny_models):
    llm = LLM(str(tiny_models["llama"].path), device="cpu", num_pages=64, page_size=4)
    out = llm.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    assert [lp.top for lp in out.prompt_logprobs[1:]] == [[], [], []]
    assert all(lp.rank >= 1 and lp.token_logprob <= 0 for lp in out.prompt_logprobs[1:])


def test_a_preempted_request_keeps_one_prompt_logprob_per_token(tiny_models):
    """A preempted request recomputes its prompt; the rows it computes again must not add a
    second set of prompt logprobs (nor change the first)."""
    path = str(tiny_models["llama"].path)
    rng = random.Random(5)
    prompts = [[rng.randrange(5, 250) for _ in range(12)] for _ in range(5)]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, prompt_logprobs=1)
    roomy = LLM(path, device="cpu", num_pages=256, page_size=4).generate(prompts, params, use_tqdm=False)
    tight = LLM(path, device="cpu", num_pages=14, page_size=4)  # 5 x 6 pages wanted, 14 there
    outs = tight.generate(prompts, params, use_tqdm=False)
    assert tight.engine.scheduler.counters.num_preemptions > 0
    for got, want in zip(outs, roomy, strict=True):
        assert len(got.prompt_logprobs) == len(want.prompt_logprobs) == 12
        assert all(
            abs(a.token_logprob - b.token_logprob) < 1e-5
            for a, b in zip(got.prompt_logprobs[1:], want.prompt_logprobs[1:], strict=True)
        )
