"""vLLM's priority scheduling as the `priority` policy (S2.5, S4.2): the smallest `priority`
first, arrival order within one; the adapter cap still coalesces work and still reserves a slot
for a group that waited the starvation timeout; under KV pressure the largest priority is
preempted first. Without priorities it decides as fcfs does."""

from __future__ import annotations

from loramux.bench.sched_trace import TraceSetup, run_trace
from loramux.core.request import RequestStatus
from tests.utils import FakeClock, fake_for, make_request, make_scheduler, run, step


def _first_tokens(s, ex, reqs) -> list[str]:
    """Request ids in the order their first output token came."""
    seen: list[str] = []
    for _ in range(200):
        step(s, ex)
        for r in reqs:
            if r.request_id not in seen and r.output_token_ids:
                seen.append(r.request_id)
        if len(seen) == len(reqs):
            return seen
    raise AssertionError(f"not all started: {seen}")


def test_S2_5_smaller_priority_goes_first_and_arrival_orders_equal_ones():
    s = make_scheduler(max_num_seqs=1, policy="priority")
    ex = fake_for(s)
    late = make_request(4, max_tokens=2, rid="late", priority=5)
    mid1 = make_request(4, max_tokens=2, rid="mid1", priority=1)
    urgent = make_request(4, max_tokens=2, rid="urgent", priority=-3)
    mid2 = make_request(4, max_tokens=2, rid="mid2", priority=1)
    for r in (late, mid1, urgent, mid2):
        s.add_request(r)
    assert _first_tokens(s, ex, [late, mid1, urgent, mid2]) == ["urgent", "mid1", "mid2", "late"]


def test_S2_5_fcfs_ignores_nothing_because_the_engine_refuses_priority_there():
    """Under fcfs the control plane orders by arrival whatever `priority` holds (the engine
    refuses a priority there, so this only shows the policies differ)."""
    s = make_scheduler(max_num_seqs=1, policy="fcfs")
    ex = fake_for(s)
    a, b = make_request(4, max_tokens=2, rid="a", priority=5), make_request(4, max_tokens=2, rid="b")
    s.add_request(a)
    s.add_request(b)
    assert _first_tokens(s, ex, [a, b]) == ["a", "b"]


def test_S2_5_the_adapter_cap_still_coalesces_and_reserves_under_priorities():
    """max_loras 1: a resident adapter's work of the same priority goes ahead of work the cap
    holds back, and a blocked group reserves the slot once its head waited the timeout."""
    clock = FakeClock()
    s = make_scheduler(
        max_loras=1,
        max_num_seqs=2,
        policy="priority",
        adapters=("a", "b"),
        clock=clock,
        starvation_timeout_s=1.0,
    )
    ex = fake_for(s)
    first = make_request(4, max_tokens=30, lora="a", rid="a0", priority=1)
    s.add_request(first)
    step(s, ex)
    blocked = make_request(4, max_tokens=2, lora="b", rid="b0", priority=1)
    s.add_request(blocked)
    more = make_request(4, max_tokens=2, lora="a", rid="a1", priority=1)
    s.add_request(more)
    step(s, ex)
    assert more.status is RequestStatus.RUNNING and blocked.status is RequestStatus.WAITING
    for _ in range(40):  # a's work keeps coming; b's head must not wait for ever
        clock.advance(0.1)
        s.add_request(make_request(4, max_tokens=2, lora="a", priority=1))
        step(s, ex)
        if blocked.output_token_ids:
            break
    assert blocked.output_token_ids and s.counters.num_reservations >= 1


def test_S4_2_preemption_takes_the_largest_priority_first():
    """As test_scheduler_quality's fcfs case (a, b, c admitted one step apart, the pool runs dry
    when b needs a page), but c has the smallest priority: the victim is a, the largest."""
    s = make_scheduler(num_pages=4, page_size=4, max_num_seqs=4, prefix=False, policy="priority")
    ex = fake_for(s)
    a = make_request(3, max_tokens=8, priority=9)
    b = make_request(3, max_tokens=8, priority=0)
    c = make_request(3, max_tokens=8, priority=-1)
    outs = []
    for r in (a, b, c, None):
        if r is not None:
            s.add_request(r)
        outs.append(step(s, ex))
    preempted = [i for o in outs for i in o.preempted_ids]
    assert preempted and preempted[0] == a.request_id
    assert b.status is RequestStatus.RUNNING and c.status is RequestStatus.RUNNING
    run(s, ex)
    assert all(r.status is RequestStatus.FINISHED_LENGTH for r in (a, b, c))


def test_without_priorities_it_decides_as_fcfs_on_issue_10s_trace():
    """Every request at priority 0: the same tokens per step, waits and admission order as fcfs
    on the quick trace, at both skews (the policy costs nothing where it is not used)."""
    for power in (1.0, 0.3):
        fcfs = run_trace(TraceSetup(32, 1000, power, "fcfs", n_requests=1024, steps=200, warmup_steps=28))
        prio = run_trace(TraceSetup(32, 1000, power, "priority", n_requests=1024, steps=200, warmup_steps=28))
        assert prio.tokens_per_step == fcfs.tokens_per_step
        assert (prio.longest_wait_steps, prio.out_of_order) == (fcfs.longest_wait_steps, fcfs.out_of_order)


def test_S2_5_under_overload_the_better_class_starts_first_and_fcfs_does_not_tell_them_apart():
    """Issue 10's trace (every request queued before step 1) with a tenth of it at priority -1,
    32 adapters under a cap of 32: under `priority` every one of them starts within the first
    steps, while fcfs starts the two classes alike."""
    kw = dict(n_requests=512, warmup_steps=20, steps=80, high_share=0.1)
    prio = run_trace(TraceSetup(32, 32, 1.0, "priority", **kw))
    fcfs = run_trace(TraceSetup(32, 32, 1.0, "fcfs", **kw))
    assert prio.high_started[0] == 1.0 and prio.high_started[1] <= 3
    assert prio.low_started[0] < 1.0  # the overload: not every request could start
    assert abs(fcfs.high_started[0] - fcfs.low_started[0]) < 0.15
    assert prio.tokens_per_step >= 0.95 * fcfs.tokens_per_step
