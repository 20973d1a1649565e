"""Scheduler quality (issue 10): no crash on any valid config, work-conserving anti-starvation,
first-come order, affinity that still loads new adapters, VTC whose cost ignores idle tenants,
and the preemption victim the docstring names (S1.3, S2.1-S2.6, S3.4, S4.2)."""

from __future__ import annotations

import math

import pytest

from loramux.bench.sched_trace import TraceSetup, run_trace
from loramux.core.policies import POLICIES
from loramux.core.request import RequestStatus
from tests.utils import FakeClock, fake_for, make_request, make_scheduler, step

# --- every valid configuration runs (S2.1, S2.6) ---------------------------------------------------


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize(
    ("max_loras", "n_adapters", "max_cpu_loras"),
    [(32, 1000, None), (32, 1000, 32), (4, 1000, 4), (4, 1000, None), (32, 32, 32)],
)
def test_S2_1_trace_runs_on_default_and_minimal_host_capacity(policy, max_loras, n_adapters, max_cpu_loras):
    """The issue's trace, short: max_loras=32 with the default host capacity (32) crashed in
    prefetch before. Integrity after every step, and no step leaves admissible work behind."""
    setup = TraceSetup(
        max_loras,
        n_adapters,
        power=0.3,
        policy=policy,
        max_cpu_loras=max_cpu_loras,
        n_requests=700,
        warmup_steps=0,
        steps=160,
        step_s=0.25,  # everything ages within the run, so reservations happen
        check_every=1,
    )
    res = run_trace(setup)
    assert res.not_work_conserving == 0
    assert res.admissions > 0
    if max_loras < n_adapters and policy != "fair":
        assert res.reservations > 0  # the aging path ran


def test_S2_6_prefetch_with_host_capacity_equal_to_slots_never_asserts():
    s = make_scheduler(num_pages=256, adapters=("a", "b", "c"), max_loras=2, max_cpu_loras=2)
    ex = fake_for(s)
    s.add_request(make_request(4, max_tokens=20, lora="a"))
    s.add_request(make_request(4, max_tokens=20, lora="b"))
    step(s, ex)  # both slots busy: host memory holds only device-resident adapters
    s.add_request(make_request(4, max_tokens=2, lora="c"))
    for _ in range(40):
        step(s, ex)
    assert not s.has_unfinished()


# --- byte budgets and pins: refused when they could never work (S2.6) ---------------------------


def test_S2_6_an_adapter_that_can_never_fit_beside_the_pins_is_refused():
    s = make_scheduler(adapters=(), max_loras=3, max_lora_bytes=1000)
    s.register_adapter("p", version="v", rank=8, nbytes=600, pinned=True)
    with pytest.raises(ValueError, match="could never be loaded"):
        s.register_adapter("big", version="v", rank=8, nbytes=500)
    s.register_adapter("small", version="v", rank=8, nbytes=400)  # fits beside the pin


def test_S2_6_a_pin_that_would_lock_out_a_registered_adapter_is_refused():
    s = make_scheduler(adapters=(), max_loras=3, max_lora_bytes=1000)
    s.register_adapter("big", version="v", rank=8, nbytes=500)
    with pytest.raises(ValueError, match="could never be loaded"):
        s.register_adapter("p", version="v", rank=8, nbytes=600, pinned=True)
    with pytest.raises(ValueError, match="could never be loaded"):
        s.register_adapter("p2", version="v", rank=8, nbytes=501, pinned=True)
    s.register_adapter("p3", version="v", rank=8, nbytes=500, pinned=True)  # 500 + 500 fits


# --- work-conserving anti-starvation (S2.4) ------------------------------------------------------


def _three_adapters(policy: str, timeout: float):
    clock = FakeClock()
    s = make_scheduler(
        num_pages=512,
        adapters=("long", "short", "rare"),
        max_loras=2,
        max_num_seqs=16,
        max_num_batched_tokens=128,
        policy=policy,
        starvation_timeout_s=timeout,
        clock=clock,
    )
    return s, fake_for(s), clock


def test_S2_4_a_reservation_drains_only_the_adapter_that_frees_first():
    """`rare` ages while `long` and `short` hold both slots. Only `short` (whose requests end first)
    stops taking new work; `long` keeps admitting every step; `rare` gets short's slot."""
    s, ex, clock = _three_adapters("fcfs", timeout=3)
    s.add_request(make_request(4, max_tokens=40, lora="long"))
    s.add_request(make_request(4, max_tokens=6, lora="short"))
    rare = make_request(4, max_tokens=3, lora="rare")
    s.add_request(rare)
    long_admitted_while_draining = 0
    for _ in range(30):
        fresh = [make_request(4, max_tokens=40, lora="long", arrival=clock.t)]
        for r in fresh:
            s.add_request(r)
        out = step(s, ex)
        if s.draining:
            assert s.draining == {s.adapters.get("short").uid}
            long_admitted_while_draining += sum(r.status is not RequestStatus.WAITING for r in fresh)
        clock.advance()
        if rare.is_finished:
            break
        assert len(out.adapter_uids) <= 2
    assert rare.is_finished and rare.finished_time <= 3 + 6 + 3 + 2
    assert long_admitted_while_draining >= 3  # the other adapter kept admitting meanwhile


def test_S2_4_no_reservation_without_aging_when_every_slot_is_busy():
    """Negative control: with an infinite timeout, fcfs passes `rare` over while both slots
    stay busy, so the test above shows the reservation at work."""
    s, ex, clock = _three_adapters("fcfs", timeout=math.inf)
    for name in ("long", "short"):
        s.add_request(make_request(4, max_tokens=200, lora=name))
    rare = make_request(4, max_tokens=3, lora="rare")
    s.add_request(rare)
    for _ in range(30):
        s.add_request(make_request(4, max_tokens=200, lora="short", arrival=clock.t))
        step(s, ex)
        clock.advance()
    assert rare.status is RequestStatus.WAITING and s.counters.num_reservations == 0


POP_PER_STEP, LIFE, TIMEOUT, STEPS = 8, 4, 10.0, 200


def _continuous(policy: str, with_rare: bool):
    clock = FakeClock()
    s = make_scheduler(
        num_pages=4096,
        adapters=("pop", "rare1", "rare2"),
        max_loras=1,
        max_num_seqs=128,
        max_num_batched_tokens=1024,
        policy=policy,
        starvation_timeout_s=TIMEOUT,
        clock=clock,
    )
    ex = fake_for(s)
    rare = []
    pop_tokens = 0
    for t in range(STEPS):
        for _ in range(POP_PER_STEP):
            s.add_request(make_request(4, max_tokens=LIFE, lora="pop", arrival=clock.t))
        if t == 0 and with_rare:
            rare = [make_request(4, max_tokens=LIFE, lora=n, arrival=clock.t) for n in ("rare1", "rare2")]
            for r in rare:
                s.add_request(r)
        out = step(s, ex)
        pop_uid = s.adapters.get("pop").uid
        pop_tokens += sum(q.sample for q in out.seqs if q.adapter_uid == pop_uid)
        clock.advance()
    return rare, pop_tokens


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_S2_4_rare_adapters_finish_within_a_bound_under_continuous_popular_traffic(policy):
    """max_loras=1; `pop` sends 8 short requests every step; `rare1` and `rare2` one each.
    Bound: the timeout, then for each rare adapter in turn one drain of the slot and one
    request's life (LIFE + 1 steps each), plus 5 steps of slack."""
    rare, pop_with = _continuous(policy, with_rare=True)
    bound = TIMEOUT + 2 * 2 * (LIFE + 1) + 5
    for r in rare:
        assert r.is_finished and r.finished_time - r.arrival_time <= bound, (policy, r.finished_time)
    _, pop_alone = _continuous(policy, with_rare=False)
    assert pop_with >= 0.9 * pop_alone, (pop_with, pop_alone)  # the popular adapter loses under 10 %


# --- fcfs is first-come; affinity still loads new adapters (S1.3, S3.4) ------------------------


def test_S1_3_fcfs_admits_in_arrival_order_when_the_cap_cannot_bind():
    res = run_trace(
        TraceSetup(32, 32, power=0.3, policy="fcfs", n_requests=600, warmup_steps=0, steps=200, check_every=1)
    )
    assert res.admissions > 300 and res.out_of_order == 0


def test_S1_3_fcfs_passes_over_only_work_the_cap_holds_back():
    """Two slots, a b c a: c waits for a slot, the later a goes ahead of it; nothing else does."""
    s = make_scheduler(num_pages=256, adapters=("a", "b", "c"), max_loras=2, max_num_seqs=3)
    ex = fake_for(s)
    a1, b1, c1, a2 = (make_request(4, max_tokens=10, lora=n) for n in "abca")
    for r in (a1, b1, c1, a2):
        s.add_request(r)
    out = step(s, ex)
    assert [q.request_id for q in out.seqs] == [a1.request_id, b1.request_id, a2.request_id]


def test_S3_4_affinity_loads_a_new_adapter_into_a_free_slot():
    """A resident adapter with a steady stream must not take every freed seat while a slot is
    free: the waiting adapter gets in once it is due, and the slot was free all along."""
    clock = FakeClock()
    s = make_scheduler(
        num_pages=512,
        adapters=("a", "b"),
        max_loras=2,
        max_num_seqs=2,
        policy="affinity",
        starvation_timeout_s=5,
        clock=clock,
    )
    ex = fake_for(s)
    for _ in range(2):
        s.add_request(make_request(4, max_tokens=3, lora="a"))
    step(s, ex)
    clock.advance()
    rb = make_request(4, max_tokens=3, lora="b", arrival=clock.t)
    s.add_request(rb)
    for _ in range(20):
        s.add_request(make_request(4, max_tokens=3, lora="a", arrival=clock.t))
        out = step(s, ex)
        assert out.adapter_plan.evict_device == []  # a free slot: nothing had to make room
        clock.advance()
    assert rb.is_finished and rb.finished_time <= 1 + 5 + 3 + 3


# --- fair: VTC's cost does not grow with idle tenants; the least served is never starved -------


def _fair_cost(n_idle: int) -> int:
    """Priority evaluations per step with 4 busy tenants and `n_idle` backlogged tenants whose
    adapters cannot get a slot (the cap binds)."""
    names = [f"t{i}" for i in range(4 + n_idle)]
    s = make_scheduler(
        num_pages=4096,
        adapters=tuple(names),
        max_loras=4,
        max_num_seqs=16,
        max_num_batched_tokens=256,
        policy="fair",
    )
    ex = fake_for(s)
    for name in names[:4]:
        for _ in range(30):
            s.add_request(make_request(4, max_tokens=50, lora=name))
    step(s, ex)
    for name in names[4:]:
        s.add_request(make_request(4, max_tokens=50, lora=name))
    calls = 0
    policy = s.policy
    original = policy.groups.priority

    def counting(key, head):
        nonlocal calls
        calls += 1
        return original(key, head)

    policy.groups.priority = counting
    for _ in range(20):
        step(s, ex)
    return calls


def test_S2_4_fair_cost_per_step_is_independent_of_idle_tenants():
    small, large = _fair_cost(10), _fair_cost(1000)
    assert large <= small * 1.5 + 40, (small, large)


def test_S2_4_fair_serves_the_least_served_tenant_whose_adapter_needs_a_slot():
    """Tenant b has the least counter but its adapter is not resident and the only slot is
    busy: VTC reserves the slot for b at once, with no aging timeout (here infinite)."""
    clock = FakeClock()
    s = make_scheduler(
        num_pages=1024,
        adapters=("a", "b"),
        max_loras=1,
        max_num_seqs=8,
        policy="fair",
        starvation_timeout_s=math.inf,
        clock=clock,
    )
    ex = fake_for(s)
    for _ in range(4):
        s.add_request(make_request(4, max_tokens=5, lora="a"))
    step(s, ex)
    rb = make_request(4, max_tokens=5, lora="b")
    s.add_request(rb)
    for _ in range(30):
        s.add_request(make_request(4, max_tokens=5, lora="a"))
        step(s, ex)
        if rb.is_finished:
            break
    assert rb.is_finished and s.counters.num_reservations >= 1


# --- preemption picks the most recently admitted request (S4.2) --------------------------------


def test_S4_2_preemption_victim_is_the_most_recently_admitted_request():
    """a, b, c admitted one step apart; when b needs a page and the pool is dry, the victim is
    c, the most recently admitted, requeued at the front; a and b keep running."""
    s = make_scheduler(num_pages=4, page_size=4, max_num_seqs=4, prefix=False)
    ex = fake_for(s)
    a, b, c = (make_request(3, max_tokens=8) for _ in range(3))
    outs = []
    for r in (a, b, c, None):
        if r is not None:
            s.add_request(r)
        outs.append(step(s, ex))
    assert outs[-1].preempted_ids == [c.request_id]
    assert c.status is RequestStatus.PREEMPTED and c.num_preemptions == 1
    assert a.status is RequestStatus.RUNNING and b.status is RequestStatus.RUNNING
    assert [q.request_id for q in outs[-1].seqs] == [a.request_id, b.request_id]
