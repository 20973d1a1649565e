"""Issue 26: the queueing bound that `bench_policy.py --bound` reports (S2.4 SLO ordering). On a
hand-worked trajectory the excess integral equals the misses' time past the target (FCFS on one
server is tight), and the bound on misses never exceeds the misses of a trajectory that keeps
every wait within the bound."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from loramux.sim.run import Record

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_policy", ROOT / "benchmarks" / "bench_policy.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def _rec(i: int, arrival: float, first: float | None) -> Record:
    return Record(i, 0, "t", arrival, 8, 8, first_scheduled=first, first_token=first)


def test_excess_integral_of_three_simultaneous_arrivals_served_one_by_one():
    b = _bench()
    # all arrive at 0, first tokens at 2, 8, 14; target 6 s: misses 2 s and 8 s past it
    recs = [_rec(0, 0.0, 2.0), _rec(1, 0.0, 8.0), _rec(2, 0.0, 14.0)]
    assert b.excess_integral(recs, slo=6.0, dt=0.01) == pytest.approx(10.0, abs=0.05)
    # each miss may wait at most 14 s (8 s past the target): at least 1.25 misses, and 2 happened
    assert b.miss_bound(10.0, tmax=14.0, slo=6.0) == pytest.approx(1.25)
    # one request may wait 30 s: it alone absorbs the 10 request-seconds
    assert b.miss_bound(10.0, tmax=14.0, tail=1, tail_max=30.0, slo=6.0) == pytest.approx(10 / 24)


def test_excess_integral_counts_the_unserved_and_ignores_the_fresh():
    b = _bench()
    # one request never served (waits to the trajectory's end at 20 s: 14 s past its target), one
    # served on time, one fresh arrival at 18 s that waits but is not excess. The bound
    # subtracts every fresh arrival, served or not, so until 7 s the one served at 3 s hides the
    # unserved one: 13 of its 14 request-seconds are counted, a lower bound as it must be
    recs = [_rec(0, 0.0, None), _rec(1, 1.0, 3.0), _rec(2, 18.0, 20.0)]
    assert b.excess_integral(recs, slo=6.0, dt=0.01) == pytest.approx(13.0, abs=0.05)
