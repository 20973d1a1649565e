"""No request can take the engine down or hang it (issue 24, points 1-5; S6.1, S6.3).

In-process, on the tiny Llama with the real executor and sampler: every value a sampling kernel
indexes or converts is checked when the request is admitted; a fault that can be pinned on one
request ends that request alone; any exception on the engine thread ends every request and stream
with an error instead of killing the thread silently; n > 1 samples all end whatever happens to
the first one; and the queue-deadline heap forgets finished requests.
"""

from __future__ import annotations

import asyncio
import gc
import shutil

import pytest

from loramux import LLM, SamplingParams
from loramux.engine.llm_engine import EngineDeadError, RequestFailedError
from loramux.server.async_engine import AsyncEngine

PROMPT = [11, 42, 99, 7, 300, 12, 5, 77]
GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


@pytest.fixture
def engine(tiny_models, tmp_path):
    llm = LLM(str(tiny_models["llama"].path), num_pages=64, page_size=4, device="cpu", max_num_seqs=4)
    shutil.copytree(tiny_models["llama"].adapters["r8_all"], tmp_path / "x")
    llm.engine.add_lora("x", str(tmp_path / "x"))
    return llm.engine


def _drain(engine, limit: int = 200) -> dict[str, object]:
    """Step until nothing is left; the last output of every request id."""
    last: dict[str, object] = {}
    for _ in range(limit):
        if not engine.has_unfinished_requests():
            return last
        for out in engine.step():
            last[out.request_id] = out
    raise AssertionError(f"still unfinished after {limit} steps")


def _serves(engine) -> None:
    """A plain request still completes with every token, and nothing is left behind."""
    rid = engine.add_request(None, PROMPT, GREEDY)
    out = _drain(engine)[rid]
    assert out.finished and len(out.outputs[0].token_ids) == GREEDY.max_tokens
    assert engine.dead is None
    assert not engine._states and not engine._followers
    engine.scheduler.check_integrity()


# --- point 1: checked at admission -------------------------------------------------------------
@pytest.mark.parametrize(
    ("params", "field", "bad"),
    [
        (dict(logit_bias={512: 5.0}), "logit_bias", "512"),  # == vocab size
        (dict(logit_bias={999999: 5.0}), "logit_bias", "999999"),  # the request
        (dict(logit_bias={3: 1.0, 2**70: 1.0}), "logit_bias", str(2**70)),
        (dict(stop_token_ids=(512,)), "stop_token_ids", "512"),
        (dict(stop_token_ids=(7, -1)), "stop_token_ids", "-1"),
        (dict(seed=2**70, temperature=1.0), "seed", str(2**70)),
        (dict(seed=-(2**63) - 1, temperature=1.0), "seed", str(-(2**63) - 1)),
        (dict(seed=2**63 - 2, n=3, temperature=1.0), "seed", "n"),  # seed + i overflows for sample 2
    ],
)
def test_S6_1_values_a_kernel_indexes_are_checked_against_the_vocabulary_at_admission(
    engine, params, field, bad
):
    with pytest.raises(ValueError) as e:  # SamplingParams checks what needs no model; the engine the rest
        engine.add_request_n("bad", PROMPT, SamplingParams(max_tokens=4, **params))
    msg = str(e.value)
    assert field in msg and bad in msg, msg
    assert not engine._states and not engine._followers  # nothing half-admitted
    _serves(engine)


@pytest.mark.parametrize(
    "params",
    [
        dict(top_k=2**70, temperature=1.0, top_p=0.9),  # more than the vocabulary: all of it
        dict(top_k=10**6, temperature=1.0, top_p=0.5),
        dict(temperature=1e-300),  # logits / temperature would be inf (0 in float32): greedy, as vLLM
        dict(logit_bias={511: 100.0, 0: -100.0}),  # the last id is in range
        dict(seed=2**63 - 1, temperature=1.0),
        dict(seed=-(2**63), temperature=1.0),
        dict(logprobs=20, temperature=1.0),
    ],
)
def test_S6_1_limit_values_that_are_valid_run(engine, params):
    rid = engine.add_request(None, PROMPT, SamplingParams(max_tokens=3, ignore_eos=True, **params))
    out = _drain(engine)[rid]
    assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 3
    _serves(engine)


def test_S6_1_a_tiny_temperature_is_greedy(engine):
    greedy = engine.add_request(None, PROMPT, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    tiny = engine.add_request(None, PROMPT, SamplingParams(temperature=1e-6, max_tokens=5, ignore_eos=True))
    outs = _drain(engine)
    assert outs[greedy].outputs[0].token_ids == outs[tiny].outputs[0].token_ids


# --- point 2: per-request faults stay per request ---------------------------------------------
def test_S6_3_a_sampling_fault_ends_that_request_and_the_batch_goes_on(engine):
    """Every token a stop id and min_tokens unmet: the row's distribution is all -inf and the
    multinomial draw raises. That request ends with an error naming it; its batch-mates finish."""
    good = [engine.add_request(None, PROMPT, GREEDY) for _ in range(2)]
    doomed = engine.add_request(
        None,
        PROMPT,
        SamplingParams(temperature=1.0, max_tokens=4, min_tokens=2, stop_token_ids=tuple(range(512))),
    )
    outs = _drain(engine)
    for rid in good:
        assert outs[rid].outputs[0].finish_reason == "length"
        assert len(outs[rid].outputs[0].token_ids) == GREEDY.max_tokens
    bad = outs[doomed]
    assert bad.finished and bad.outputs[0].finish_reason == "error"
    assert isinstance(bad.error, RequestFailedError) and "sampling" in str(bad.error), bad.error
    _serves(engine)


def test_S6_3_a_detokenizer_fault_ends_that_request_and_the_others_go_on(engine):
    tok = engine.tokenizer
    real = tok.decode
    poisoned = {"on": False}

    def decode(ids, *a, **kw):
        if poisoned["on"] and len(ids) and 2 in ids[-1:]:
            raise RuntimeError("decoder exploded")
        return real(ids, *a, **kw)

    good = engine.add_request(None, PROMPT, GREEDY)
    doomed = engine.add_request(
        None, PROMPT[:5], SamplingParams(temperature=0, max_tokens=4, logit_bias={2: 100.0}, ignore_eos=True)
    )
    tok.decode = decode
    poisoned["on"] = True
    try:
        outs = _drain(engine)
    finally:
        tok.decode = real
    assert outs[good].outputs[0].finish_reason == "length"
    assert outs[doomed].outputs[0].finish_reason == "error"
    assert "decoder exploded" in str(outs[doomed].error)
    _serves(engine)


# --- point 3: the engine thread cannot die silently -------------------------------------------
def _run(coro, timeout: float = 60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def test_S6_3_an_exception_on_the_engine_thread_ends_every_stream_and_stops_cleanly(engine):
    aengine = AsyncEngine(engine)
    aengine.start()
    real = engine.scheduler.schedule
    calls = {"n": 0}

    def schedule():
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyError("a bug in the control plane")
        return real()

    engine.scheduler.schedule = schedule

    async def go():
        streams = [
            await aengine.add_request(f"r{i}", PROMPT, SamplingParams(temperature=0, max_tokens=50))
            for i in range(3)
        ]
        errors = []
        for s in streams:
            with pytest.raises(EngineDeadError) as e:
                async for _ in s:
                    pass
            errors.append(str(e.value))
        # the thread is alive, commands are answered (no hang), new work is refused with the cause
        names = await aengine.call(engine.list_loras)
        with pytest.raises(EngineDeadError, match="a bug in the control plane"):
            await aengine.add_request("late", PROMPT, GREEDY)
        return errors, names

    try:
        errors, names = _run(go())
    finally:
        aengine.shutdown()
    assert all("a bug in the control plane" in m and "restart" in m for m in errors), errors
    assert [a.name for a in names] == ["x"]
    assert not aengine.alive and engine.dead is not None
    assert not engine.has_unfinished_requests() and aengine.num_streams == 0


def test_S6_3_a_failing_abort_command_does_not_kill_the_engine_thread(engine):
    aengine = AsyncEngine(engine)
    aengine.start()
    real = engine.abort_request

    def abort(rid):
        real(rid)
        raise RuntimeError("abort went wrong")

    engine.abort_request = abort

    async def go():
        s = await aengine.add_request("r", PROMPT, SamplingParams(temperature=0, max_tokens=30))
        async for _ in s:
            break
        await s.aclose()  # aborts through the command queue; the command raises
        return await aengine.call(lambda: engine.dead)

    try:
        dead = _run(go())
    finally:
        aengine.shutdown()
    assert aengine._thread.is_alive() is False  # joined by shutdown, not died
    assert dead is not None and "abort went wrong" in str(dead)


def test_S6_3_shutdown_fails_every_pending_call_and_stream(engine):
    aengine = AsyncEngine(engine)  # never started: nothing will run the commands

    async def go():
        loop = asyncio.get_running_loop()
        pending = asyncio.ensure_future(aengine.call(engine.list_loras))
        await asyncio.sleep(0.05)
        await loop.run_in_executor(None, aengine.shutdown)
        with pytest.raises(EngineDeadError, match="shut down"):
            await pending
        with pytest.raises(EngineDeadError, match="shut down"):
            await aengine.call(engine.list_loras)

    _run(go(), timeout=30)


# --- point 4: n > 1 samples all end -----------------------------------------------------------
def _busy(engine, k: int = 4) -> list[str]:
    """Take every seat with long requests, so anything queued behind them waits."""
    return [
        engine.add_request(None, PROMPT, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
        for _ in range(k)
    ]


def test_S6_3_n_samples_past_their_queue_deadline_all_end(engine):
    blockers = _busy(engine)
    engine.step()
    ids = engine.add_request_n(
        "n3", PROMPT, SamplingParams(temperature=1.0, max_tokens=8, n=3, max_queue_time=1e-9)
    )
    outs = _drain(engine)
    assert set(ids) <= set(outs), f"samples without an answer: {set(ids) - set(outs)}"
    assert [outs[i].outputs[0].finish_reason for i in ids] == ["timeout"] * 3
    assert all(outs[b].finished for b in blockers)
    _serves(engine)


def test_S6_3_aborting_the_first_sample_still_runs_the_others(engine):
    ids = engine.add_request_n("n3", PROMPT, SamplingParams(temperature=1.0, max_tokens=5, n=3, seed=1))
    assert engine.abort_request(ids[0])
    outs = _drain(engine)
    assert [outs[i].outputs[0].finish_reason for i in ids[1:]] == ["length", "length"]
    _serves(engine)


def test_S6_3_aborting_every_sample_keeps_nothing(engine):
    ids = engine.add_request_n("n3", PROMPT, SamplingParams(temperature=1.0, max_tokens=5, n=3))
    for rid in reversed(ids):  # the followers first, then the leader
        engine.abort_request(rid)
    _drain(engine)
    _serves(engine)


def test_S6_3_unloading_the_adapter_before_the_other_samples_start_ends_them_with_a_clear_error(engine):
    ids = engine.add_request_n(
        "n3", PROMPT, SamplingParams(temperature=1.0, max_tokens=5, n=3, ignore_eos=True), lora_name="x"
    )
    engine.remove_lora("x")  # the first sample runs on; the others have not started
    outs = _drain(engine)
    assert outs[ids[0]].outputs[0].finish_reason == "length"
    for rid in ids[1:]:
        assert outs[rid].outputs[0].finish_reason == "error"
        assert "'x'" in str(outs[rid].error) and "unloaded" in str(outs[rid].error)
    _serves(engine)


def test_S6_3_n_samples_over_the_async_engine_with_a_client_that_leaves(engine):
    aengine = AsyncEngine(engine)
    aengine.start()

    async def go():
        streams = await aengine.add_request_n(
            "n3", PROMPT, SamplingParams(temperature=1.0, max_tokens=30, n=3, ignore_eos=True)
        )
        async for _ in streams[0]:
            break
        for s in streams:
            await s.aclose()  # the client went away: every sample is aborted
        for _ in range(100):
            if await aengine.call(lambda: not engine._states and not engine.has_unfinished_requests()):
                return
            await asyncio.sleep(0.05)
        raise AssertionError("samples left behind")

    try:
        _run(go())
        assert aengine.num_streams == 0 and not engine._followers
    finally:
        aengine.shutdown()


# --- point 5: the deadline heap holds live requests only ----------------------------------------
def test_S6_3_finished_requests_leave_the_deadline_heap(engine):
    """Each request has a long max_queue_time and finishes long before it: the heap stays bounded
    by the requests alive, not by rate x max_queue_time; the finished ones are collected."""
    import weakref

    sched = engine.scheduler
    refs = []
    for i in range(300):
        rid = engine.add_request(
            f"q{i}", PROMPT[:3], SamplingParams(temperature=0, max_tokens=1, max_queue_time=3600)
        )
        refs.append(weakref.ref(sched.requests[rid]))
        _drain(engine)
        assert len(sched._deadlines) <= 2 * (len(sched.requests) + 1) + 64, len(sched._deadlines)
    gc.collect()
    assert sum(r() is not None for r in refs) <= 64 + 2


def test_S6_3_shutdown_after_the_servers_loop_closed_ends_quietly(engine):
    """`loramux serve` shuts the engine down after uvicorn's loop is gone; a stream still
    registered then must not make shutdown raise."""
    aengine = AsyncEngine(engine)

    async def register():
        return await asyncio.wait_for(_start_unstarted(aengine), 5)

    asyncio.run(register())  # the loop that owns the stream is closed when this returns
    aengine.shutdown()
    assert aengine.num_streams == 0


async def _start_unstarted(aengine):
    """Register a stream on the running loop without an engine thread to serve it."""
    loop = asyncio.get_running_loop()
    aengine._streams["orphan"] = (loop, asyncio.Queue())
