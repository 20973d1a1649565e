"""Issue 11: every simulator metric on a tiny case computed by hand (papers.md section 4)."""

import math

import pytest

from loramux.sim import metrics as m
from loramux.sim.run import Record


def rec(
    i, arrival, first=None, finish=None, out=10, inp=10, adapter=None, tenant="", sched=None, aborted=False
):
    return Record(
        i,
        adapter,
        tenant,
        arrival,
        inp,
        out,
        sched if sched is not None else first,
        first,
        finish,
        0 if aborted else out,
        aborted,
    )


def test_throughput_is_completions_over_first_arrival_to_last_completion():
    rs = [rec(0, 0.0, 1.0, 4.0), rec(1, 1.0, 2.0, 5.0), rec(2, 2.0, 3.0, 10.0)]
    assert m.throughput(rs) == pytest.approx(3 / 10)
    assert m.token_throughput(rs) == pytest.approx(30 / 10)
    # an aborted request neither counts as completed nor extends the span
    rs.append(rec(3, 0.5, None, 20.0, aborted=True))
    assert m.throughput(rs) == pytest.approx(3 / 10)


def test_attainment_counts_aborted_and_unserved_as_misses():
    rs = [
        rec(0, 0.0, 1.0, 2.0),
        rec(1, 0.0, 5.9, 7.0),
        rec(2, 0.0, 7.0, 8.0),
        rec(3, 0.0, None, 3.0, aborted=True),
    ]
    assert m.attainment(rs) == pytest.approx(2 / 4)
    assert m.attainment(rs, slo=8.0) == pytest.approx(3 / 4)


def test_attainment_with_a_tpot_target_counts_a_stalled_stream_as_a_miss():
    """DistServe's SLO attainment (vLLM's --goodput ttft:.. tpot:..): TTFT under the target and
    TPOT = (finish - first token) / (tokens - 1) at or under its own."""
    rs = [
        rec(0, 0.0, 1.0, 1.9),  # 10 tokens: 0.1 s per token after the first
        rec(1, 0.0, 1.0, 10.0),  # on time, then 1 s per token: a stalled stream
        rec(2, 0.0, 7.0, 7.9),  # fast stream, late first token
        rec(3, 0.0, 2.0, 2.0, out=1),  # one token: TPOT 0
        rec(4, 0.0, 1.0, None),  # first token out, never finished
        rec(5, 0.0, None, 3.0, aborted=True),
    ]
    assert m.tpot(rs[0]) == pytest.approx(0.1)
    assert m.tpot(rs[3]) == 0.0
    assert m.tpot(rs[4]) is None and m.tpot(rs[5]) is None
    assert m.attainment(rs) == pytest.approx(4 / 6)
    assert m.attainment(rs, tpot_slo=0.1) == pytest.approx(2 / 6)
    assert m.attainment(rs, tpot_slo=1.0) == pytest.approx(3 / 6)
    assert m.decode_per_token(rs) == pytest.approx((0.1 + 1.0 + 0.1) / 3)


def test_satisfaction_is_quadratic_in_ttft():
    rs = [
        rec(0, 0.0, 3.0, 4.0),
        rec(1, 1.0, 1.0, 4.0),
        rec(2, 0.0, 6.0, 7.0),
        rec(3, 0.0, None, 1.0, aborted=True),
    ]
    assert m.satisfaction(rs) == pytest.approx((1 - 9 / 36 + 1 + 0 + 0) / 4)


def test_ttft_stats_overall_and_per_adapter():
    rs = [rec(i, 0.0, float(t), 9.0, adapter=i % 2) for i, t in enumerate([1, 2, 3, 4])]
    s = m.ttft_stats(rs)
    assert (s.n, s.mean, s.p50) == (4, 2.5, 2.5)
    assert s.p90 == pytest.approx(3.7) and s.p99 == pytest.approx(3.97)  # linear between ranks
    per = m.ttft_by_adapter(rs)
    assert per[0].mean == pytest.approx(2.0) and per[1].mean == pytest.approx(3.0)
    assert math.isnan(m.ttft_stats([]).p50)
    e = m.e2e_stats(rs)
    assert e.p50 == 9.0


def test_per_token_latency_and_loads_per_second():
    rs = [rec(0, 0.0, 1.0, 4.0, out=4), rec(1, 2.0, 3.0, 10.0, out=2)]
    assert m.per_token_latency(rs) == pytest.approx((4 / 4 + 8 / 2) / 2)
    assert m.loads_per_second(5, rs) == pytest.approx(5 / 10)
    # decode only: (4 - 1) / (4 - 1) and (10 - 3) / (2 - 1)
    assert m.decode_per_token(rs) == pytest.approx((1.0 + 7.0) / 2)


def test_longest_wait_includes_requests_never_served():
    rs = [rec(0, 0.0, 2.0, 5.0, sched=1.5), rec(1, 1.0, None, 4.0, aborted=True), rec(2, 2.0, None, None)]
    assert m.longest_wait(rs, end=12.0) == pytest.approx(10.0)  # the unserved one waited until the end
    assert m.longest_wait(rs[:2], end=12.0) == pytest.approx(3.0)  # the aborted one, until it was dropped


def test_capacity_is_the_highest_rate_meeting_90_percent():
    assert m.capacity([(1, 1.0), (1.5, 0.95), (2, 0.5), (2.5, 0.1)]) == 1.5
    assert m.capacity([(1, 0.89)]) is None
    assert m.capacity([(1, 0.9), (2, 0.2), (3, 0.91)]) == 3  # the highest that meets it, as defined


def test_service_is_spread_over_the_decode_interval():
    r = rec(0, 0.0, 10.0, 20.0, inp=100, out=50)
    assert m.service(r) == 200
    assert m.service_in(r, 15.0, 30.0) == pytest.approx(100.0)
    assert m.service_in(r, 0.0, 10.0) == 0.0
    assert m.service_in(rec(1, 0.0, 5.0, 5.0 + 1e-6), 0.0, 10.0) == 0.0  # instantaneous: not counted


def test_service_difference_two_tenants_by_hand():
    """One tick at x = 0, window [-30, 30] (no warm-up). A: 300 tokens of service, all inside:
    s_A = 5/s, demand 5/s. B: 180 over [10, 50], 20 of its 40 s inside: s_B = 1.5/s, demand 3/s.
    diff = min(5 - 5, |5 - 5|) + min(5 - 1.5, |3 - 1.5|) = 1.5."""
    a = rec(0, 0.0, 0.0, 30.0, inp=100, out=100, tenant="A")
    b = rec(1, 0.0, 10.0, 50.0, inp=60, out=60, tenant="B")
    assert m.service_diff([a, b], horizon=60.0, ticks=1, window=60.0, warmup=0.0) == [pytest.approx(1.5)]
    f = m.fairness([a, b], horizon=60.0, warmup=0.0)
    assert f.acc_diff == pytest.approx(300 - 180)  # over [0, 57]: the last of 20 ticks over 60 s
    f2 = m.fairness([a, b], horizon=40.0, warmup=0.0)  # last tick at 38: A 300, B 180 x 28/40
    assert f2.acc_diff == pytest.approx(300 - 126)
    assert f.tokens_per_s == pytest.approx((200 + 120) / 50)
    acc = m.accumulated_service([a, b], 0.0, 20.0)
    assert acc == {"A": pytest.approx(200.0), "B": pytest.approx(45.0)}


def test_service_over_time_windows():
    a = rec(0, 0.0, 0.0, 60.0, inp=60, out=60, tenant="A")  # 180 tokens over 60 s: 3/s
    series = m.service_over_time([a], [30.0, 90.0], window=60.0)
    assert series["A"] == [pytest.approx(3.0), pytest.approx(0.0)]
