"""The slo policy (S2.4, S2.5): TTFT deadlines with slack, a size credit, a wait cap, preempted first.

Each test sets up a queue where the slo order differs from fcfs's and checks the first admission
(one seat), so each would fail with the fcfs order or without the policy's bands.
"""

from __future__ import annotations

import pytest

from loramux.config import SchedulerConfig
from loramux.core.policies import SloPolicy, make_policy
from tests.utils import FakeClock, fake_for, make_request, make_scheduler, run, step


def one_seat(policy: str = "slo", **kw: object):
    clock = FakeClock()
    s = make_scheduler(
        num_pages=256, max_num_seqs=1, max_num_batched_tokens=2048, clock=clock, policy=policy, **kw
    )
    return s, fake_for(s), clock


def first_admitted(s, ex) -> str:
    return step(s, ex).seqs[0].request_id


@pytest.mark.parametrize("policy, first", [("slo", "fresh"), ("fcfs", "late")])
def test_S2_5_slo_serves_what_can_still_make_its_target_first(policy, first):
    s, ex, clock = one_seat(policy, ttft_slo_s=6.0)
    s.add_request(make_request(8, max_tokens=2, rid="late", arrival=0.0))
    s.add_request(make_request(8, max_tokens=2, rid="fresh", arrival=4.0))
    clock.t = 5.5  # "late" waited 5.5 s: past the target less its prefill margin (5 s)
    assert first_admitted(s, ex) == first


@pytest.mark.parametrize("policy, first", [("slo", "short"), ("fcfs", "long")])
def test_S2_5_slo_counts_a_shorter_request_as_due_sooner(policy, first):
    s, ex, clock = one_seat(policy, ttft_slo_s=6.0)
    s.add_request(make_request(700, max_tokens=300, rid="long", arrival=0.0))
    s.add_request(make_request(8, max_tokens=8, rid="short", arrival=1.0))  # 1 s later, 984 tokens shorter
    clock.t = 1.0
    assert first_admitted(s, ex) == first


def test_S2_4_slo_a_request_past_the_wait_cap_goes_first_and_the_cap_bounds_its_wait():
    """A steady stream of fresh requests for one seat: the missed request is served once it has
    waited the cap (MIN_CAP x target here: the queue is short), not after the stream ends."""
    s, ex, clock = one_seat(ttft_slo_s=3.0, slo_wait_factor=1.0)
    old = make_request(8, max_tokens=1, rid="old", arrival=0.0)
    s.add_request(old)
    s.add_request(make_request(8, max_tokens=1, arrival=0.0))
    clock.t = 2.6  # old missed (>= 2.5 s)
    served_at = None
    for i in range(40):
        s.add_request(make_request(8, max_tokens=1, rid=f"n{i}", arrival=clock.t))
        out = step(s, ex)
        if any(q.request_id == "old" for q in out.seqs):
            served_at = clock.t
            break
        clock.advance(0.5)
    cap = SloPolicy.MIN_CAP * 3.0
    assert served_at is not None and cap <= served_at <= cap + 0.5, served_at


def test_S2_4_slo_wait_cap_follows_the_queue_over_the_admission_rate():
    p = make_policy(SchedulerConfig(policy="slo", ttft_slo_s=6.0, slo_wait_factor=2.0))
    assert isinstance(p, SloPolicy)
    assert p.wait_cap(0.0) == pytest.approx(SloPolicy.MIN_CAP * 6.0)  # no admissions yet: the floor
    p._start = 0.0
    p._admissions.extend([1.0 * i for i in range(20)])  # 1 admission a second over the last 20 s
    for _ in range(30):  # 30 waiting: FCFS would make a new one wait 30 s
        p.add(make_request(8, max_tokens=1, arrival=20.0))
    assert p.wait_cap(20.0) == pytest.approx(2.0 * 30 / (20 / 20.0))
    assert p.wait_cap(100.0) == pytest.approx(SloPolicy.MIN_CAP * 6.0)  # the window emptied


def test_S2_5_slo_a_preempted_request_goes_back_first():
    s = make_scheduler(num_pages=8, page_size=4, max_num_seqs=4, prefix=False, policy="slo")
    ex = fake_for(s)
    reqs = [make_request(6, max_tokens=10) for _ in range(4)]  # 4 x 4 pages needed, 8 available
    for r in reqs:
        s.add_request(r)
    run(s, ex)
    assert s.counters.num_preemptions > 0
    assert all(r.is_finished for r in reqs)
    assert not s.policy._band  # nothing left behind in the policy's book-keeping


@pytest.mark.parametrize("field, value", [("ttft_slo_s", 0.0), ("slo_wait_factor", -1.0)])
def test_slo_settings_must_be_positive(field, value):
    with pytest.raises(ValueError, match=field):
        SchedulerConfig(policy="slo", **{field: value})
