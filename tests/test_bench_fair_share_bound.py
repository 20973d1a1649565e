"""Issue 26: the fluid model behind docs/benchmarks.md "W4's fairness against W1's tail" (S2.5
fairness, S2.4 SLO ordering). Water-filling splits capacity as GPS does, the fluid FIFO and GPS
give the waits worked out by hand, and on W1 at rate 2.5 (seed 42) the fluid FIFO matches the
simulator's fcfs while equal shares put the p99 wait far past the 1.1x the issue allows."""

from __future__ import annotations

import numpy as np
import pytest

from loramux.sim.workloads import SimRequest
from tests.utils import import_benchmark


def _bench():
    return import_benchmark("bench_fair_share_bound")


def test_waterfill_gives_a_small_backlog_all_it_needs_and_splits_the_rest_equally():
    b = _bench()
    alloc = b.waterfill(np.array([1.0, 5.0, 10.0, 0.0]), 9.0)
    assert alloc.tolist() == pytest.approx([1.0, 4.0, 4.0, 0.0])
    assert b.waterfill(np.array([1.0, 2.0]), 9.0).tolist() == pytest.approx([1.0, 2.0])


def test_fluid_fifo_and_gps_waits_as_worked_out_by_hand():
    """Tenant a sends three requests of 10 units at 0, tenant b one (the last): at 10 units/s FIFO
    starts b after a's 30 units (3 s); GPS starts b at once, and a's third request once a has had
    20 units: 5/s while b is backlogged (2 s, a gets 10), then 10/s (1 s more)."""
    b = _bench()
    reqs = [SimRequest(i, 0.0, None, 10, 0, tenant="a") for i in range(3)]
    reqs.append(SimRequest(3, 0.0, None, 10, 0, tenant="b"))
    fifo = b.fluid_waits(reqs, 10.0, per_tenant=False, dt=0.01)
    gps = b.fluid_waits(reqs, 10.0, per_tenant=True, dt=0.01)
    assert fifo == pytest.approx([0.01, 1.0, 2.0, 3.0], abs=0.02)
    assert gps == pytest.approx([0.01, 2.0, 3.0, 0.01], abs=0.02)


def test_equal_shares_put_w1_rate_2_5_p99_wait_far_past_fcfs():
    b = _bench()
    job = b.bp.Job(b.W1, 2.5, "fcfs")
    _, sim_wait, _, cap = b.sim_row(job)
    reqs = b.SUITES[b.W1].workload(2.5, 42).requests
    fifo = np.percentile(b.fluid_waits(reqs, cap, False, 0.05), 99)
    gps = np.percentile(b.fluid_waits(reqs, cap, True, 0.05), 99)
    assert fifo == pytest.approx(sim_wait, rel=0.1)  # the model reproduces fcfs's tail
    assert gps > 1.5 * fifo  # the issue allows 1.1x
