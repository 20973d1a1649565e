"""The KV watermark: admissions leave a share of the pages free while requests run, so the running
ones grow without being preempted (S4.2; issue 26). slo keeps 3 % by default, the other policies
none (vLLM v1's behaviour); `kv_watermark` sets it for any policy."""

from __future__ import annotations

import pytest

from loramux.config import SchedulerConfig
from tests.utils import FakeClock, fake_for, make_request, make_scheduler, step


def _serve(s, reqs):
    """Run to the end, checking integrity and work conservation after every step."""
    ex = fake_for(s)
    for r in reqs:
        s.add_request(r)
    most_running = 0
    for _ in range(500):
        if not s.has_unfinished():
            break
        out = s.schedule()
        s.check_work_conserving(out)
        s.update_from_output(out, ex.execute(out))
        s.check_integrity()
        most_running = max(most_running, len(s.running))
    assert not s.has_unfinished(), "not done after 500 steps"
    return ex, most_running


def _grow(n=4):
    return [make_request(6, max_tokens=10) for _ in range(n)]  # 2 pages at admission, 4 at the end


def test_S4_2_a_watermark_leaves_the_running_requests_room_to_grow_instead_of_preempting():
    reqs = _grow()
    s = make_scheduler(num_pages=8, page_size=4, max_num_seqs=4, prefix=False, kv_watermark=0.5)
    ex, most = _serve(s, reqs)
    assert s.headroom_pages == 4
    assert s.counters.num_preemptions == 0  # two run, holding 4 pages and keeping 4 for their growth
    assert most == 2
    for r in reqs:
        assert r.output_token_ids == ex.reference_tokens(r.adapter_uid, r.prompt_token_ids, 10, set())
    assert s.kv.pool.num_free == 8

    # The same requests with no watermark: all four are admitted at once and the growth preempts.
    without = make_scheduler(num_pages=8, page_size=4, max_num_seqs=4, prefix=False, kv_watermark=0.0)
    _serve(without, _grow())
    assert without.counters.num_preemptions > 0


def test_S4_2_an_empty_batch_admits_whatever_the_watermark_so_nothing_hangs():
    reqs = _grow(3)
    s = make_scheduler(num_pages=8, page_size=4, max_num_seqs=4, prefix=False, kv_watermark=0.9)
    _, most = _serve(s, reqs)  # the watermark (8 pages) is the whole pool: one at a time, all done
    assert most == 1
    assert all(len(r.output_token_ids) == 10 for r in reqs)


@pytest.mark.parametrize(
    "policy, setting, pages",
    [("slo", None, 3), ("fcfs", None, 0), ("fair", None, 0), ("slo", 0.0, 0), ("fcfs", 0.1, 10)],
)
def test_S2_5_the_watermark_is_the_policys_unless_set(policy, setting, pages):
    assert make_scheduler(num_pages=100, policy=policy, kv_watermark=setting).headroom_pages == pages


@pytest.mark.parametrize("bad", [-0.1, 1.0, 2.0])
def test_a_watermark_outside_0_to_1_is_refused_with_the_fix(bad):
    with pytest.raises(ValueError, match=r"kv_watermark=.*\[0, 1\)"):
        SchedulerConfig(kv_watermark=bad)


@pytest.mark.parametrize("policy", ["fcfs", "slo"])
def test_S2_4_a_request_that_needs_the_watermarks_pages_is_served_while_small_ones_keep_coming(policy):
    """One request at the pool's limit (its prompt alone fills what the watermark leaves) waits only
    until the running ones finish: it stops the admissions behind it, so the batch drains, and an
    empty batch admits whatever the watermark. Small requests arrive every step meanwhile."""
    clock = FakeClock()
    s = make_scheduler(
        num_pages=16, page_size=4, max_num_seqs=8, max_num_batched_tokens=64, prefix=False,
        policy=policy, kv_watermark=0.25, clock=clock,
    )  # fmt: skip
    ex = fake_for(s)
    s.add_request(make_request(6, max_tokens=8))  # running when the big one arrives
    step(s, ex)
    big = make_request(56, max_tokens=4, arrival=clock.t)  # 14 of 16 pages at admission, 15 at the end
    s.add_request(big)
    small: list = []
    for _ in range(200):
        if big.output_token_ids and len(big.output_token_ids) == 4:
            break
        clock.advance(0.05)
        r = make_request(4, max_tokens=2, arrival=clock.t)
        small.append(r)
        s.add_request(r)
        step(s, ex)
    assert len(big.output_token_ids) == 4, "the request at the limit was never served"
    for _ in range(200):
        if not s.has_unfinished():
            break
        step(s, ex)
    assert all(len(r.output_token_ids) == 2 for r in small)
