"""The engine loop with the control-plane tests' fake executor plugged in (issue: executor, point 5)."""

from __future__ import annotations

import shutil

import pytest

from loramux.config import CacheConfig, EngineConfig, LoRAConfig, ModelConfig, SchedulerConfig
from loramux.core.adapters import AdapterNotFoundError
from loramux.engine.llm import LLM
from loramux.engine.llm_engine import LLMEngine
from loramux.executor.fake import FakeExecutor
from loramux.lora_request import LoRARequest
from loramux.sampling_params import SamplingParams


def fake_engine(num_pages=64, page_size=4, max_loras=2, **sched):
    cfg = EngineConfig(
        model=ModelConfig("fake-model"),
        scheduler=SchedulerConfig(**sched),
        cache=CacheConfig(page_size=page_size, num_pages=num_pages),
        lora=LoRAConfig(max_loras=max_loras),
    )
    ex = FakeExecutor(num_pages, page_size, vocab_size=50)
    return LLMEngine(cfg, executor=ex, tokenizer=None), ex


def test_fake_executor_drives_the_same_step_loop():
    engine, ex = fake_engine()
    for name in ("a", "b", "c"):
        engine.add_lora(name, f"/adapters/{name}")
    prompts = {f"q{i}": [i + 1, i + 2, i + 3, i + 4, i + 5] for i in range(6)}
    loras = ["a", "b", "c", None, "a", "b"]
    for (rid, p), lora in zip(prompts.items(), loras, strict=True):
        engine.add_request(rid, p, SamplingParams(max_tokens=6, ignore_eos=True), lora_name=lora)
    streamed: dict[str, list[int]] = {}
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            streamed.setdefault(out.request_id, []).extend(out.outputs[0].delta_token_ids)
            if out.finished:
                finished[out.request_id] = out
    assert set(finished) == set(prompts)
    for rid, lora in zip(prompts, loras, strict=True):
        uid = None if lora is None else engine.scheduler.adapters.get(lora).uid
        want = ex.reference_tokens(uid, prompts[rid], 6, set())
        assert finished[rid].outputs[0].token_ids == want == streamed[rid]  # deltas add up
        assert finished[rid].outputs[0].finish_reason == "length"


def test_llm_front_end_runs_on_the_fake_executor():
    engine, ex = fake_engine()
    llm = LLM("fake-model", engine=engine)
    outs = llm.generate(
        [[1, 2, 3], [4, 5, 6]],
        SamplingParams(max_tokens=4, ignore_eos=True),
        lora_request=[LoRARequest("a", 1, "/adapters/a"), None],
        use_tqdm=False,
    )
    uid = engine.scheduler.adapters.get("a").uid
    assert outs[0].outputs[0].token_ids == ex.reference_tokens(uid, [1, 2, 3], 4, set())
    assert outs[1].outputs[0].token_ids == ex.reference_tokens(None, [4, 5, 6], 4, set())


def test_bad_requests_fail_at_once_and_others_keep_running():
    engine, _ = fake_engine(max_queue_len=8)
    engine.add_request("ok", [1, 2, 3], SamplingParams(max_tokens=3, ignore_eos=True))
    with pytest.raises(AdapterNotFoundError, match="'nope'"):
        engine.add_request("x", [1, 2], SamplingParams(max_tokens=3), lora_name="nope")
    with pytest.raises(ValueError, match=r"must lie in \[0, 50\)"):
        engine.add_request("y", [1, 99], SamplingParams(max_tokens=3))
    with pytest.raises(ValueError, match="no tokenizer"):
        engine.add_request("z", "text", SamplingParams(max_tokens=3))
    done = []
    while engine.has_unfinished_requests():
        done += [o.request_id for o in engine.step() if o.finished]
    assert done == ["ok"]


def test_abort_frees_pages_and_drops_the_request():
    engine, _ = fake_engine(num_pages=16)
    engine.add_request("long", list(range(1, 10)), SamplingParams(max_tokens=6, ignore_eos=True))
    engine.step()
    assert engine.scheduler.kv.pool.num_free < 16
    assert engine.abort_request("long")
    assert not engine.has_unfinished_requests()
    pool, cache = engine.scheduler.kv.pool, engine.scheduler.kv.cache
    assert pool.num_free + cache.num_evictable == 16


def test_S2_5_priority_reaches_the_scheduler_from_the_engine_and_llm_and_only_under_its_policy(tiny_models):
    """vLLM's priority scheduling: under `policy="priority"` (serve's --scheduling-policy
    priority) the engine starts the smallest priority first, `LLM.generate(priority=...)` takes
    one per prompt; under fcfs a priority is refused naming the policy, and a refused prompt
    leaves none of its call's requests queued (the next call used to fail on them)."""
    path = str(tiny_models["llama"].path)
    llm = LLM(path, device="cpu", num_pages=64, page_size=4, policy="priority", max_num_seqs=1)
    engine = llm.engine
    sp = SamplingParams(max_tokens=2, ignore_eos=True, temperature=0)
    for rid, prio in [("low", 5), ("mid", 0), ("high", -1)]:
        engine.add_request(rid, [5, 6, 7], sp, priority=prio)
    started: list[str] = []
    while engine.has_unfinished_requests():
        started += [o.request_id for o in engine.step() if o.request_id not in started]
    assert started == ["high", "mid", "low"]
    outs = llm.generate([[5, 6, 7], [8, 9]], sp, use_tqdm=False, priority=[3, -3])
    assert [len(o.outputs[0].token_ids) for o in outs] == [2, 2]
    fcfs = LLM(path, device="cpu", num_pages=64, page_size=4)
    with pytest.raises(ValueError, match=r"needs priority scheduling.*--policy priority"):
        fcfs.generate([[5, 6], [7, 8]], sp, use_tqdm=False, priority=[0, 1])
    assert not fcfs.engine.has_unfinished_requests()  # the first prompt's request went too
    assert len(fcfs.generate([[5, 6]], sp, use_tqdm=False)[0].outputs[0].token_ids) == 2


def test_S6_3_a_load_in_place_serves_running_requests_on_the_old_weights_and_later_ones_on_the_new(
    tiny_models, oracles
):
    """vLLM's load_inplace (`add_lora(..., replace=True)`): a request already decoding finishes on
    the weights it started with, one added after gets the new ones (and none of the old KV, though
    its prompt is the same), each equal to transformers+PEFT; a load in place that fails leaves the
    new weights serving."""
    tm = tiny_models["llama"]
    engine = LLM(str(tm.path), device="cpu", num_pages=64, page_size=4, max_loras=2).engine
    engine.add_lora("live", str(tm.adapters["r1_qv"]))
    prompt, n = [5, 9, 13, 17, 21, 25, 29, 33], 8
    sp = SamplingParams(max_tokens=n, ignore_eos=True, temperature=0)
    final: dict[str, list[int]] = {}

    def run(steps: int | None = None) -> None:
        while engine.has_unfinished_requests() and (steps is None or (steps := steps - 1) >= 0):
            final.update({o.request_id: list(o.outputs[0].token_ids) for o in engine.step() if o.finished})

    engine.add_request("old", prompt, sp, lora_name="live")
    run(steps=3)  # the prompt and two tokens: "old" runs on r1_qv's weights
    assert not final and engine.has_unfinished_requests()
    engine.add_lora("live", str(tm.adapters["r8_all"]), replace=True)
    engine.add_request("new", prompt, sp, lora_name="live")
    run()
    expected, _ = oracles("llama").greedy([prompt, prompt], ["r1_qv", "r8_all"], n)
    assert [final["old"], final["new"]] == expected and expected[0] != expected[1]
    assert engine.scheduler.adapters.references() == {"live": 0}  # the old load is gone
    with pytest.raises(ValueError, match="is not a directory"):
        engine.add_lora("live", str(tm.path / "nowhere"), replace=True)
    engine.add_request("after", prompt, sp, lora_name="live")
    run()
    assert final["after"] == expected[1]


def test_S6_3_llm_load_inplace_picks_up_a_trainers_new_weights_at_the_same_path(
    tiny_models, oracles, tmp_path
):
    """vLLM's `LoRARequest(..., load_inplace=True)`, as RL trainers use it: the adapter folder is
    written again after each update and the next `generate` call serves the new weights; without
    the flag a loaded name keeps its weights, and another path under it is refused naming the flag."""
    tm = tiny_models["llama"]
    llm = LLM(str(tm.path), device="cpu", num_pages=64, page_size=4)
    folder = tmp_path / "actor"
    shutil.copytree(tm.adapters["r1_qv"], folder)
    prompt, n = [7, 11, 13, 17, 19, 23], 6
    sp = SamplingParams(max_tokens=n, ignore_eos=True, temperature=0)
    expected, _ = oracles("llama").greedy([prompt, prompt], ["r1_qv", "r8_all"], n)
    assert expected[0] != expected[1]

    def answer(**kw: object) -> list[int]:
        out = llm.generate([prompt], sp, LoRARequest("actor", 1, str(folder), **kw), use_tqdm=False)
        return list(out[0].outputs[0].token_ids)

    assert answer() == expected[0]
    shutil.rmtree(folder)
    shutil.copytree(tm.adapters["r8_all"], folder)  # the trainer's next weights, same folder
    assert answer() == expected[0]  # not asked to reload: the loaded weights serve
    assert answer(load_inplace=True) == expected[1]
    with pytest.raises(ValueError, match="load_inplace=True"):
        llm.generate([prompt], sp, LoRARequest("actor", 1, str(tm.adapters["r1_qv"])), use_tqdm=False)
