"""loramux equals transformers+PEFT, adapter by adapter, in mixed batches (issue: executor).

For each architecture (Llama; Mistral with a 16-token sliding window and an
old-style config; Qwen2 with q/k/v biases, tied embeddings and sharded
weights) one batch mixes every adapter and the base model. Greedy tokens must
be equal and every step's logits within 1e-4, also with chunked prefill,
prefix-cache hits, preemption, the same prompt under different adapters back
to back (S5.2 end to end), and max_loras=1 with two adapters in flight.
"""

from __future__ import annotations

import random

import pytest
import torch

from loramux import LLM, LoRARequest, SamplingParams
from loramux.executor.lora import LoRAState

ARCHS = ["llama", "mistral", "qwen2"]
N_NEW = 10
TOL = 1e-4


def make_llm(tm, **kw):
    args = dict(
        num_pages=128,
        page_size=4,
        max_loras=4,
        max_num_seqs=16,
        max_num_batched_tokens=256,
        device="cpu",
        dtype="float32",
    )
    args.update(kw)
    return LLM(str(tm.path), **args)


def loras_for(tm, names):
    ids = {n: i + 1 for i, n in enumerate(tm.adapters)}
    return [None if n is None else LoRARequest(n, ids[n], str(tm.adapters[n])) for n in names]


def prompts(n, length, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(3, 512) for _ in range(length)] for _ in range(n)]


def run(llm, tm, ps, names, n_new=N_NEW, loras=None):
    """Generate greedily; return (token lists, per-request list of logits rows, outputs)."""
    logits: dict[str, list[torch.Tensor]] = {}
    llm.engine.executor.logits_hook = lambda rid, row: logits.setdefault(rid, []).append(row.clone())
    outs = llm.generate(
        ps,
        SamplingParams(temperature=0.0, max_tokens=n_new, ignore_eos=True),
        lora_request=loras or loras_for(tm, names),
        use_tqdm=False,
    )
    return [o.outputs[0].token_ids for o in outs], [logits[o.request_id] for o in outs], outs


def assert_equal(oracle, ps, names, tokens, logits):
    ref_tokens, ref_logits = oracle.greedy(ps, names, len(tokens[0]))
    assert tokens == ref_tokens
    for mine, ref, name in zip(logits, ref_logits, names, strict=True):
        assert len(mine) == len(ref)
        worst = max((a - b).abs().max().item() for a, b in zip(mine, ref, strict=True))
        assert worst < TOL, f"adapter {name}: logits differ by {worst}"


@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_batch_of_every_adapter_and_base_equals_peft(arch, tiny_models, oracles):
    tm = tiny_models[arch]
    names = [None, *tm.adapters]
    ps = prompts(len(names), 12)
    tokens, logits, _ = run(make_llm(tm), tm, ps, names)
    assert_equal(oracles(arch), ps, names, tokens, logits)
    assert len({tuple(t) for t in tokens[1:]}) > 1, "adapters should change the output"
    assert tokens[0] != tokens[2], "the rank-8 adapter should change the base output"


@pytest.mark.parametrize("arch", ARCHS)
def test_equal_with_chunked_prefill(arch, tiny_models, oracles):
    tm = tiny_models[arch]
    names = [None, *tm.adapters]
    ps = prompts(len(names), 20, seed=1)
    llm = make_llm(tm, max_num_batched_tokens=7)  # a 20-token prompt takes 3 chunks
    tokens, logits, _ = run(llm, tm, ps, names)
    assert_equal(oracles(arch), ps, names, tokens, logits)


@pytest.mark.parametrize("arch", ARCHS)
def test_equal_with_prefix_cache_hits(arch, tiny_models, oracles):
    tm = tiny_models[arch]
    llm = make_llm(tm)
    shared = prompts(1, 13, seed=2)[0]
    first = [shared + [7, 8, 9]]
    run(llm, tm, first, ["r8_all"])
    second = [shared + [10, 11, 12], shared + [13, 14, 15]]
    tokens, logits, outs = run(llm, tm, second, ["r8_all", "r8_all"])
    assert all(o.num_cached_tokens == 12 for o in outs)  # 3 full pages of 4 reused
    assert_equal(oracles(arch), second, ["r8_all", "r8_all"], tokens, logits)


@pytest.mark.parametrize("arch", ARCHS)
def test_equal_with_preemption(arch, tiny_models, oracles):
    tm = tiny_models[arch]
    names = [None, *tm.adapters]
    ps = prompts(len(names), 12, seed=3)
    llm = make_llm(tm, num_pages=14, enable_prefix_caching=False)  # 5 x 6 pages wanted, 14 there
    tokens, logits, _ = run(llm, tm, ps, names, n_new=12)
    assert llm.engine.scheduler.counters.num_preemptions > 0
    # A preempted request recomputes; the rows it sampled before are still the oracle's rows.
    assert_equal(oracles(arch), ps, names, tokens, [lg[:12] for lg in logits])


@pytest.mark.parametrize("arch", ARCHS)
def test_same_prompt_under_different_adapters_back_to_back(arch, tiny_models, oracles):
    tm = tiny_models[arch]
    llm = make_llm(tm)
    p = prompts(1, 17, seed=4)
    results = {}
    for name in ["r8_all", "rs4_attn", None, "r8_all"]:
        tokens, logits, outs = run(llm, tm, p, [name])
        assert_equal(oracles(arch), p, [name], tokens, logits)
        results.setdefault(name, []).append((tokens[0], outs[0].num_cached_tokens))
    assert results["rs4_attn"][0][1] == 0 and results[None][0][1] == 0  # no reuse across adapters
    assert results["r8_all"][1][1] == 16  # the same adapter again reuses its own pages
    assert results["r8_all"][0][0] == results["r8_all"][1][0]
    assert results["r8_all"][0][0] != results["rs4_attn"][0][0]


@pytest.mark.parametrize("arch", ARCHS)
def test_equal_with_max_loras_1_and_two_adapters_in_flight(arch, tiny_models, oracles):
    tm = tiny_models[arch]
    names = ["r8_all", "rs4_attn", "r8_all", "rs4_attn", None]
    ps = prompts(len(names), 12, seed=5)
    llm = make_llm(tm, max_loras=1)
    tokens, logits, _ = run(llm, tm, ps, names)
    assert_equal(oracles(arch), ps, names, tokens, logits)
    c = llm.engine.scheduler.counters
    assert c.max_adapters_per_step == 1
    assert llm.engine.scheduler.adapters.num_device_loads == 2  # grouped: each adapter loaded once


@pytest.mark.parametrize("arch", ARCHS)
def test_equal_with_prefix_pages_brought_back_from_host_memory(arch, tiny_models, oracles):
    tm = tiny_models[arch]
    llm = make_llm(tm, num_pages=12, host_kv_pages=32)
    shared = prompts(1, 17, seed=6)[0]
    run(llm, tm, [shared], ["r8_all"])
    run(llm, tm, prompts(2, 20, seed=7), [None, None], n_new=8)  # needs the whole device pool
    cache = llm.engine.scheduler.kv.cache
    uid = llm.engine.scheduler.adapters.get("r8_all").uid
    assert cache.pages_in(uid) == 0 and cache.host_pages_in(uid) > 0  # the adapter's pages went to host
    tokens, logits, outs = run(llm, tm, [shared], ["r8_all"])
    assert outs[0].num_cached_tokens == 16 and cache.num_onloaded >= 4  # and came back
    assert_equal(oracles(arch), [shared], ["r8_all"], tokens, logits)


@pytest.mark.parametrize("arch", ARCHS)
def test_equal_when_decodes_read_a_window_of_slots(arch, tiny_models, oracles, monkeypatch):
    """S3.2: one adapter under two names takes two slots of equal rank with another adapter's slot
    between them, so decode steps take the windowed bmm over the slot buffers (no gather)."""
    tm = tiny_models[arch]
    paths = []
    make_groups = LoRAState._make_groups

    def spy(self, ranks):
        groups = make_groups(self, ranks)
        paths.extend("window" for g in groups if g.window is not None)
        return groups

    monkeypatch.setattr(LoRAState, "_make_groups", spy)
    twin = LoRARequest("r8_twin", 99, str(tm.adapters["r8_all"]))
    names = ["r8_all", "r64_mlp", "r8_all", None]  # what the oracle runs: the twin is r8_all
    ps = prompts(len(names), 12, seed=8)
    loras = [*loras_for(tm, names[:2]), twin, None]
    tokens, logits, _ = run(make_llm(tm), tm, ps, names, loras=loras)
    assert paths, "the decode steps never took the windowed path"
    assert_equal(oracles(arch), ps, names, tokens, logits)


def test_equal_under_the_slo_policy_with_the_cap_and_preemption(tiny_models, oracles):
    """S2.5: the slo policy reorders admissions (preempted first, past-target requests behind,
    a cap of one adapter), never what a request computes."""
    tm = tiny_models["llama"]
    names = ["r8_all", "rs4_attn", None, "r8_all", "rs4_attn", None]
    ps = prompts(len(names), 12, seed=6)
    llm = make_llm(tm, policy="slo", ttft_slo_s=0.5, max_loras=1, num_pages=16, enable_prefix_caching=False)
    tokens, logits, _ = run(llm, tm, ps, names, n_new=12)
    assert llm.engine.scheduler.counters.num_preemptions > 0
    assert_equal(oracles("llama"), ps, names, tokens, [lg[:12] for lg in logits])
