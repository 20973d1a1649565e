"""Scheduler: queueing, the adapter cap, token budgets, paging and preemption (S1-S4)."""

import pytest

from loramux.core.policies import POLICIES
from loramux.core.request import Request, RequestStatus
from loramux.core.scheduler import QueueFullError
from tests.utils import FakeClock, fake_for, make_request, make_scheduler, run, step


def reference(ex, r):
    return ex.reference_tokens(r.adapter_uid, r.prompt_token_ids, r.max_tokens, set())


# --- S1 the adapter-aware queue ---------------------------------------------------------------


def test_S1_1_request_carries_adapter_prompt_and_limits():
    r = Request("x", [5, 6, 7], max_tokens=3, lora_name="sql", stop_token_ids=frozenset({9}))
    assert (r.num_prompt_tokens, r.max_tokens, r.lora_name, r.tenant) == (3, 3, "sql", "sql")
    assert Request("y", [1], 1).tenant == "base"
    assert "5" not in repr(r)  # lengths in logs, never tokens
    with pytest.raises(ValueError, match="max_tokens=0"):
        Request("z", [1], 0)
    with pytest.raises(ValueError, match="prompt is empty"):
        Request("z", [], 1)


def test_S1_1_requests_that_can_never_fit_are_refused_when_added():
    s = make_scheduler(num_pages=4, page_size=4, max_model_len=64)
    with pytest.raises(ValueError, match="exceeds the model's limit of 64"):
        s.add_request(make_request(60, max_tokens=5))
    with pytest.raises(ValueError, match="may need 5 KV pages but the pool has only 4"):
        s.add_request(make_request(16, max_tokens=4))
    s.add_request(make_request(12, max_tokens=4))  # exactly 4 pages: fine
    with pytest.raises(ValueError, match="already in use"):
        r = make_request(4)
        s.add_request(r)
        s.add_request(make_request(4, rid=r.request_id))


def test_S1_3_same_adapter_requests_are_coalesced_and_switches_reported():
    s = make_scheduler(
        num_pages=128, adapters=("a", "b"), max_loras=1, max_num_seqs=16, max_num_batched_tokens=512
    )
    ex = fake_for(s)
    for i in range(12):  # a b a b ... arriving together
        s.add_request(make_request(6, max_tokens=3, lora="ab"[i % 2]))
    run(s, ex)
    assert s.adapters.num_device_loads == 2  # each adapter switched in once per group
    assert s.counters.naive_adapter_switches == 12  # arrival order would switch every request


def test_S1_4_a_request_cap_splits_a_long_same_adapter_run():
    s = make_scheduler(num_pages=128, adapters=("a",), max_num_seqs=3, max_num_batched_tokens=512)
    ex = fake_for(s)
    reqs = [make_request(4, max_tokens=2, lora="a") for _ in range(7)]
    for r in reqs:
        s.add_request(r)
    outs = run(s, ex)
    assert max(len(o.seqs) for o in outs) == 3
    assert [len(o.seqs) for o in outs[:1]] == [3]
    assert all(r.output_token_ids == reference(ex, r) for r in reqs)
    assert s.adapters.num_device_loads == 1


# --- S2 the adapter cap -----------------------------------------------------------------------


def test_S2_1_cap_on_distinct_adapters_and_base_is_not_counted():
    s = make_scheduler(
        num_pages=256, adapters=tuple("abcde"), max_loras=2, max_num_seqs=32, max_num_batched_tokens=1024
    )
    ex = fake_for(s)
    for i in range(20):
        s.add_request(make_request(5, max_tokens=3, lora="abcde"[i % 5]))
        s.add_request(make_request(5, max_tokens=3))  # base
    outs = run(s, ex)
    for out in outs:
        assert len(out.adapter_uids) <= 2
    first = outs[0]
    assert len(first.adapter_uids) == 2
    assert sum(seq.adapter_uid is None for seq in first.seqs) == 20  # base never deferred by the cap


def test_S2_2_a_request_over_the_cap_is_deferred_not_dropped():
    s = make_scheduler(num_pages=64, adapters=("a", "b"), max_loras=1)
    ex = fake_for(s)
    ra, rb = make_request(4, max_tokens=3, lora="a"), make_request(4, max_tokens=3, lora="b")
    s.add_request(ra)
    s.add_request(rb)
    out = step(s, ex)
    assert [q.request_id for q in out.seqs] == [ra.request_id]
    assert rb.status is RequestStatus.WAITING
    run(s, ex)
    assert rb.status is RequestStatus.FINISHED_LENGTH and rb.output_token_ids == reference(ex, rb)


def test_S2_3_request_refused_for_kv_memory_does_not_take_a_slot():
    s = make_scheduler(num_pages=6, page_size=4, adapters=("a", "b"), max_loras=2)
    ex = fake_for(s)
    s.add_request(make_request(16, max_tokens=4, lora="a"))  # 4 pages, then 5
    step(s, ex)
    s.add_request(make_request(12, max_tokens=4, lora="b"))  # needs 3 pages; 2 left
    out = step(s, ex)
    b = s.adapters.get("b")
    assert [q.adapter_uid for q in out.seqs] == [s.adapters.get("a").uid]
    assert b.slot is None and out.adapter_plan.load_device == []  # no slot spent on b


def test_S2_3_request_refused_for_token_budget_does_not_take_a_slot():
    s = make_scheduler(num_pages=64, adapters=("a", "b"), max_loras=2, max_num_batched_tokens=8)
    ex = fake_for(s)
    s.add_request(make_request(8, max_tokens=2, lora="a"))
    s.add_request(make_request(8, max_tokens=2, lora="b"))
    out = step(s, ex)  # a's prompt uses the whole budget
    assert out.adapter_plan.load_device == [(s.adapters.get("a").uid, 0)]
    assert s.adapters.get("b").slot is None


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_S2_4_rare_adapter_is_not_starved_by_a_popular_one(policy):
    """A steady stream for a keeps the only slot busy; b must still finish within the bound."""
    clock = FakeClock()
    s = make_scheduler(
        num_pages=256,
        adapters=("a", "b"),
        max_loras=1,
        max_num_seqs=4,
        max_num_batched_tokens=64,
        clock=clock,
        policy=policy,
        starvation_timeout_s=10,
    )
    ex = fake_for(s)
    for _ in range(4):
        s.add_request(make_request(4, max_tokens=6, lora="a", arrival=clock.t))
    rare = make_request(4, max_tokens=6, lora="b", arrival=clock.t)
    s.add_request(rare)
    for _ in range(200):
        if rare.is_finished:
            break
        s.add_request(make_request(4, max_tokens=6, lora="a", arrival=clock.t))  # one more a per step
        step(s, ex)
        clock.advance()
    # Bound: the timeout plus one request's duration (6 decode steps + prefill) plus slack.
    assert rare.finished_time is not None and rare.finished_time <= 10 + 6 + 4, rare.finished_time


def test_S2_4_without_aging_the_rare_adapter_would_starve():
    """Negative control for the test above: an effectively infinite timeout starves b (fcfs)."""
    clock = FakeClock()
    s = make_scheduler(
        num_pages=256,
        adapters=("a", "b"),
        max_loras=1,
        max_num_seqs=4,
        max_num_batched_tokens=64,
        clock=clock,
        policy="affinity",
        starvation_timeout_s=1e9,
    )
    ex = fake_for(s)
    for _ in range(4):
        s.add_request(make_request(4, max_tokens=6, lora="a"))
    rare = make_request(4, max_tokens=6, lora="b")
    s.add_request(rare)
    for _ in range(100):
        s.add_request(make_request(4, max_tokens=6, lora="a", arrival=clock.t))
        step(s, ex)
        clock.advance()
    assert not rare.is_finished


def test_S2_5_policies_are_selectable_by_name():
    for name in ("fcfs", "affinity", "completion", "fair"):
        assert make_scheduler(policy=name).policy.name == name
    with pytest.raises(ValueError, match="choose one of"):
        make_scheduler(policy="lottery")


def _one_seat_scheduler(policy):
    s = make_scheduler(num_pages=64, adapters=("a", "b"), max_loras=2, max_num_seqs=1, policy=policy)
    ex = fake_for(s)
    warm = make_request(4, max_tokens=1, lora="a")
    s.add_request(warm)
    run(s, ex)  # a is now resident, idle
    old_b = make_request(4, max_tokens=2, lora="b")
    new_a = make_request(4, max_tokens=2, lora="a")
    s.add_request(old_b)
    s.add_request(new_a)
    return s, ex, old_b, new_a


def test_S2_5_affinity_prefers_the_resident_adapter_fcfs_the_oldest():
    s, ex, old_b, new_a = _one_seat_scheduler("affinity")
    out = step(s, ex)
    assert [q.request_id for q in out.seqs] == [new_a.request_id]
    assert out.adapter_plan.load_device == []  # no load needed
    s, ex, old_b, new_a = _one_seat_scheduler("fcfs")
    out = step(s, ex)
    assert [q.request_id for q in out.seqs] == [old_b.request_id]
    assert out.adapter_plan.load_device == [(s.adapters.get("b").uid, 1)]  # the plan says what to load


def test_S2_5_batch_completion_finishes_the_running_group_before_switching():
    def scenario(policy):
        s = make_scheduler(
            num_pages=128,
            adapters=("a", "b"),
            max_loras=1,
            max_num_seqs=8,
            policy=policy,
            starvation_timeout_s=100,
        )
        ex = fake_for(s)
        s.add_request(make_request(4, max_tokens=4, lora="a"))
        step(s, ex)  # a runs
        rb = make_request(4, max_tokens=2, lora="b")
        s.add_request(rb)
        late_a = make_request(4, max_tokens=2, lora="a")
        s.add_request(late_a)
        out = step(s, ex)
        return s, out, late_a

    _, out, late_a = scenario("completion")
    assert late_a.request_id not in {q.request_id for q in out.seqs}  # no new a work: b is next
    _, out, late_a = scenario("fcfs")
    assert late_a.request_id in {q.request_id for q in out.seqs}  # fcfs skips b and keeps feeding a


def test_S2_5_running_sequences_stay_and_the_plan_names_evictions():
    s = make_scheduler(num_pages=64, adapters=("a", "b", "c"), max_loras=2, max_num_seqs=8)
    ex = fake_for(s)
    ra = make_request(4, max_tokens=8, lora="a")
    s.add_request(ra)
    s.add_request(make_request(4, max_tokens=1, lora="b"))
    step(s, ex)
    step(s, ex)  # b finished, a still running
    s.add_request(make_request(4, max_tokens=1, lora="c"))
    out = step(s, ex)
    ids = {q.request_id for q in out.seqs}
    assert ra.request_id in ids
    b, c = s.adapters.get("b"), s.adapters.get("c")
    assert out.adapter_plan.evict_device == [(b.uid, 1)]
    assert out.adapter_plan.load_device == [(c.uid, 1)]


def test_S2_5_unload_releases_slot_after_last_request():
    s = make_scheduler(num_pages=64, adapters=("a",), max_loras=1)
    ex = fake_for(s)
    r = make_request(4, max_tokens=3, lora="a")
    s.add_request(r)
    step(s, ex)
    uid = s.unregister_adapter("a").uid
    outs = run(s, ex)
    assert r.status is RequestStatus.FINISHED_LENGTH
    out = step(s, ex)  # the plan after the last request carries the release
    assert uid in out.adapter_plan.release or any(uid in o.adapter_plan.release for o in outs)
    assert s.adapters.resident_uids == []


# --- S3 token budgets -------------------------------------------------------------------------


def test_S3_1_decodes_first_then_prefill_within_budgets():
    s = make_scheduler(num_pages=128, max_num_seqs=4, max_num_batched_tokens=10, max_prefill_tokens=6)
    ex = fake_for(s)
    d1, d2 = make_request(3, max_tokens=5), make_request(3, max_tokens=5)
    s.add_request(d1)
    s.add_request(d2)
    step(s, ex)  # both prefilled (6 prefill tokens)
    p1, p2, p3 = make_request(5, max_tokens=2), make_request(5, max_tokens=2), make_request(5, max_tokens=2)
    for r in (p1, p2, p3):
        s.add_request(r)
    out = step(s, ex)
    got = [(q.request_id, len(q.token_ids)) for q in out.seqs]
    # two decodes (1 token each), then 5 + 1 prefill tokens: the prefill budget of 6 is the limit,
    # and the fourth seat is the last one.
    assert got == [(d1.request_id, 1), (d2.request_id, 1), (p1.request_id, 5), (p2.request_id, 1)]
    assert out.num_batched_tokens == 8
    assert p3.status is RequestStatus.WAITING  # max_num_seqs=4


def test_S3_2_a_prefill_that_does_not_fit_is_chunked_with_progress_recorded():
    s = make_scheduler(num_pages=64, max_num_batched_tokens=8)
    ex = fake_for(s)
    r = make_request(20, max_tokens=2)
    s.add_request(r)
    sizes, starts = [], []
    while s.has_unfinished():
        out = step(s, ex)
        sizes.append(len(out.seqs[0].token_ids))
        starts.append(out.seqs[0].start_pos)
        if len(sizes) == 1:
            assert r.num_computed_tokens == 8 and r.status is RequestStatus.RUNNING
            assert not out.seqs[0].sample  # no token comes out of a partial prefill
    assert sizes == [8, 8, 4, 1] and starts == [0, 8, 16, 20]
    assert r.output_token_ids == reference(ex, r)


def test_S3_3_min_batch_for_new_prefills_while_decodes_run():
    s = make_scheduler(
        num_pages=128,
        max_num_seqs=16,
        max_num_batched_tokens=256,
        waiting_served_ratio=0.5,
        max_waiting_steps=3,
    )
    ex = fake_for(s)
    for _ in range(4):
        s.add_request(make_request(4, max_tokens=20))
    step(s, ex)  # nothing running yet: admitted at once
    lone = make_request(4, max_tokens=2)
    s.add_request(lone)
    held = 0
    while lone.status is RequestStatus.WAITING:
        step(s, ex)
        held += 1
    assert held == 4  # 3 steps held back, admitted on the 4th (max_waiting_steps)
    more = [make_request(4, max_tokens=2) for _ in range(3)]
    for r in more:
        s.add_request(r)
    step(s, ex)  # 3 waiting >= 0.5 * 5 running: admitted at once
    assert all(r.status is RequestStatus.RUNNING or r.is_finished for r in more)


def test_S3_4_next_batch_is_formed_with_the_active_adapters_in_mind():
    s = make_scheduler(
        num_pages=128, adapters=("a", "b", "c"), max_loras=2, max_num_seqs=8, policy="affinity"
    )
    ex = fake_for(s)
    s.add_request(make_request(4, max_tokens=10, lora="a"))
    s.add_request(make_request(4, max_tokens=10, lora="b"))
    step(s, ex)
    assert s.running_by_adapter() == {"a": 1, "b": 1}
    rc = make_request(4, max_tokens=2, lora="c")  # older, but c needs a slot held by running work
    s.add_request(rc)
    ra = make_request(4, max_tokens=2, lora="a")
    s.add_request(ra)
    out = step(s, ex)
    ids = {q.request_id for q in out.seqs}
    assert ra.request_id in ids and rc.request_id not in ids
    assert out.adapter_plan.evict_device == []  # never evicts an adapter the running batch uses


# --- S4 paged KV ----------------------------------------------------------------------------------


def test_S4_1_a_new_page_at_each_boundary_and_all_return_on_finish():
    s = make_scheduler(num_pages=16, page_size=4)
    ex = fake_for(s)
    r = make_request(3, max_tokens=7)
    s.add_request(r)
    tables = []
    while s.has_unfinished():
        step(s, ex)
        tables.append(len(r.page_ids))
    # computed after each step: 3, 4, 5, ..., 9 tokens -> pages 1, 1, 2, 2, 2, 2, 3 (then freed)
    assert tables == [1, 1, 2, 2, 2, 2, 0]
    assert s.kv.pool.num_free + s.kv.cache.num_evictable == 16


def test_S4_1_pages_return_on_abort():
    s = make_scheduler(num_pages=16, page_size=4, prefix=False)
    ex = fake_for(s)
    r, w = make_request(9, max_tokens=7), make_request(9, max_tokens=7)
    s.add_request(r)
    step(s, ex)
    s.add_request(w)
    assert s.kv.pool.num_free < 16
    assert s.abort_request(r.request_id) and s.abort_request(w.request_id)
    assert s.kv.pool.num_free == 16 and r.status is RequestStatus.FINISHED_ABORTED
    out = step(s, ex)
    assert set(out.finished_ids) == {r.request_id, w.request_id}  # the executor drops their state
    assert not s.abort_request(r.request_id)


def test_S4_2_exhausted_pool_preempts_and_resumes_without_corruption():
    s = make_scheduler(num_pages=8, page_size=4, max_num_seqs=4, prefix=False)
    ex = fake_for(s)
    reqs = [make_request(6, max_tokens=10) for _ in range(4)]  # 4 x 4 pages needed, 8 available
    for r in reqs:
        s.add_request(r)
    run(s, ex)  # integrity is checked after every step
    assert s.counters.num_preemptions > 0
    assert all(r.output_token_ids == reference(ex, r) for r in reqs)
    assert s.kv.pool.num_free == 8


def test_queue_bound_refuses_with_a_retry_hint():
    s = make_scheduler(max_queue_len=2)
    s.add_request(make_request(4))
    s.add_request(make_request(4))
    with pytest.raises(QueueFullError, match="retry later"):
        s.add_request(make_request(4))


def _probe():
    """(scheduler, fake executor, the tokens a plain 4-token prompt gets with max_tokens 6)."""
    s = make_scheduler()
    ex = fake_for(s)
    probe = make_request(4, max_tokens=6)
    s.add_request(probe)
    run(s, ex)
    return s, ex, probe.output_token_ids


def test_bad_words_ban_the_token_that_would_complete_one_in_the_output():
    """vLLM's bad_words: a one-token word is always banned; a longer one's last token only where
    the output (never the prompt) ends with the rest. The ban rides on the step's suppress set,
    which the fake executor, like the sampler, never samples from."""
    from loramux.core.scheduler import banned_tokens

    words = ((5,), (7, 8), (1, 2, 3))
    prompt = [9, 7, 1, 2]  # ends with both prefixes: the prompt does not count
    assert banned_tokens(words, prompt, 4) == {5}
    assert banned_tokens(words, [*prompt, 7], 4) == {5, 8}
    assert banned_tokens(words, [*prompt, 1, 2], 4) == {5, 3}
    assert banned_tokens(words, [*prompt, 2], 4) == {5}  # 1, 2 straddles the prompt: not a match
    s, ex, toks = _probe()
    pair = (toks[1], toks[2])
    banned = make_request(4, max_tokens=6, bad_words_ids=(pair,))
    s.add_request(banned)
    run(s, ex)
    out = banned.output_token_ids
    assert out[:2] == toks[:2] and out[2] != toks[2]  # the pair's second token never follows its first


def test_stop_tokens_eos_and_min_tokens():
    s, ex, toks = _probe()
    stop = make_request(4, max_tokens=6, stop_token_ids=frozenset({toks[2]}))
    eos = make_request(4, max_tokens=6, eos_token_ids=frozenset({toks[1]}), ignore_eos=False)
    late = make_request(4, max_tokens=6, eos_token_ids=frozenset({toks[1]}), ignore_eos=False, min_tokens=4)
    ignored = make_request(4, max_tokens=6, eos_token_ids=frozenset({toks[1]}), ignore_eos=True)
    for r in (stop, eos, late, ignored):
        s.add_request(r)
    run(s, ex)
    assert stop.output_token_ids == toks[:3] and stop.status is RequestStatus.FINISHED_STOPPED
    assert eos.output_token_ids == toks[:2] and eos.status is RequestStatus.FINISHED_STOPPED
    # min_tokens=4: eos is masked from the sample (ScheduledSeq.suppress) until 4 tokens exist
    assert toks[1] not in late.output_token_ids[:4] and len(late.output_token_ids) >= 4
    assert ignored.output_token_ids == toks
