"""Issue 26: the queueing bound that `bench_policy.py --bound` reports (S2.4 SLO ordering). On a
hand-worked trajectory the excess integral equals the misses' time past the target (FCFS on one
server is tight), and the bound on misses never exceeds the misses of a trajectory that keeps
every wait within the bound. And `--policy-wait-factors`: each wait factor's report holds the
baselines and that factor's runs alone, and the factor reaches the simulation."""

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


def test_each_wait_factor_report_holds_the_baselines_and_only_that_factors_policy_runs():
    """`--policy-wait-factors`: the report at one wait factor must compare that factor's `slo`
    runs with the same baselines, never another factor's `slo` runs (which would pick one of two
    results for a point at random), and carry the W1 trade-off curve once."""
    b = _bench()
    base = b.Job("slora-a10g-sweep", 2.0, "fcfs")
    at_1 = b.Job("slora-a10g-sweep", 2.0, "slo", slo_wait_factor=1.0)
    at_2 = b.Job("slora-a10g-sweep", 2.0, "slo", slo_wait_factor=2.3)
    curve = b.Job("slora-a10g-sweep", 2.0, "slo", wait_factor=4.0)
    mine = [j for j in (base, at_1, at_2, curve) if b._at_factor(j, "slo", 1.0, first=True)]
    assert mine == [base, at_1, curve]
    mine = [j for j in (base, at_1, at_2, curve) if b._at_factor(j, "slo", 2.3, first=False)]
    assert mine == [base, at_2]
    # without --policy-wait-factors every slo run has factor None and belongs to the one report
    assert b._at_factor(b.Job("slora-a10g-sweep", 2.0, "slo"), "slo", None, first=True)


def test_a_jobs_wait_factor_reaches_the_simulation_and_the_curves_point_wins(monkeypatch):
    """The checks at `slo_wait_factor` simulate with it; a W1 curve point (`wait_factor`) keeps
    its own; neither set: the default from SchedulerConfig."""
    from loramux.config import SchedulerConfig

    b = _bench()
    seen = []
    monkeypatch.setattr(b, "simulate", lambda wl, prof, s: seen.append(s.slo_wait_factor))
    b._simulate(b.Job("slora-a10g-sweep", 2.0, "slo", slo_wait_factor=1.0))
    b._simulate(b.Job("slora-a10g-sweep", 2.0, "slo", wait_factor=4.0, slo_wait_factor=1.0))
    b._simulate(b.Job("slora-a10g-sweep", 2.0, "slo"))
    assert seen == [1.0, 4.0, SchedulerConfig.slo_wait_factor]


def test_adapter_waits_are_the_largest_and_the_median_of_the_adapters_p99_waits():
    """`--ratio-seeds` and the W1 rate-2 check: per adapter the p99 of arrival -> first scheduled,
    then the largest and the median over adapters; requests never scheduled do not count."""
    b = _bench()
    recs = [
        Record(0, 1, "a1", 0.0, 8, 8, first_scheduled=1.0),
        Record(1, 1, "a1", 0.0, 8, 8, first_scheduled=1.0),
        Record(2, 2, "a2", 5.0, 8, 8, first_scheduled=7.0),
        Record(3, 3, "a3", 0.0, 8, 8, first_scheduled=9.0),
        Record(4, 3, "a3", 0.0, 8, 8, first_scheduled=None),  # aborted in the queue
    ]
    top, median = b.adapter_waits(recs)
    assert (top, median) == (pytest.approx(9.0), pytest.approx(2.0))  # adapters' p99s: 1, 2, 9
    assert b.adapter_waits([Record(0, 1, "a1", 0.0, 8, 8)]) == (0.0, 0.0)


def test_a_jobs_seed_reaches_the_workload_and_the_simulation(monkeypatch):
    """`--ratio-seeds`: a job's seed draws its workload and seeds the simulation; None is SEED."""
    b = _bench()
    seen = []
    monkeypatch.setattr(b, "simulate", lambda wl, prof, s: seen.append((s.seed, wl.requests[0].arrival)))
    b._simulate(b.Job("slora-a10g-sweep", 2.0, "slo", seed=5))
    b._simulate(b.Job("slora-a10g-sweep", 2.0, "slo"))
    b._simulate(b.Job("slora-a10g-sweep", 2.0, "slo", seed=b.SEED))
    assert [s for s, _ in seen] == [5, b.SEED, b.SEED]
    assert seen[0][1] != seen[1][1] and seen[1] == seen[2]  # another seed, another trace


def test_a_jobs_tpot_target_counts_in_every_attainment(monkeypatch):
    """`--tpot-slo`: a request whose first token is on time but whose stream then runs slower
    than the target misses; without the flag attainment is TTFT alone."""
    from types import SimpleNamespace

    b = _bench()
    recs = [
        Record(0, 1, "a1", 0.0, 8, 11, first_scheduled=0.5, first_token=1.0, finish=2.0, output_tokens=11),
        Record(1, 1, "a1", 0.0, 8, 11, first_scheduled=0.5, first_token=1.0, finish=11.0, output_tokens=11),
    ]
    monkeypatch.setattr(b, "_simulate", lambda job: SimpleNamespace(records=recs, adapter_loads=0))
    assert b.run(b.Job("slora-a10g-sweep", 2.0, "slo")).attainment == 1.0
    assert b.run(b.Job("slora-a10g-sweep", 2.0, "slo", tpot_slo=0.1)).attainment == 0.5


def test_the_factor_map_names_each_points_failing_checks_and_the_factors_where_it_holds(tmp_path):
    """`--policy-wait-factors` with the map (and `--plot`): each W1/W3 point at each factor is
    measured against that point's baselines (attainment less the best, p99 over the lowest), the
    cell names the checks that fail, a point held at no factor says so, and the figure is a PNG."""
    b = _bench()
    results = _map_results(b)
    fps = b.factor_points(results, "slo")
    assert [(fp.point, fp.factor) for fp in fps] == [
        ("W1 rate 2", 1.0),
        ("W1 rate 2", 2.3),
        ("W3 cv 4", 1.0),
        ("W3 cv 4", 2.3),
    ]
    w3 = fps[3]
    assert w3.attainment_gap == pytest.approx(0.80 - 0.79)
    assert w3.p99_ratio == pytest.approx(37.0 / 32.8)
    assert [fp.failing for fp in fps] == ["ok", "req/s", "att", "p99"]
    lines = b.factor_map(fps, "slo")
    assert "| W1 rate 2 | ok | req/s | 1 |" in lines
    assert "| W3 cv 4 | att | p99 | **none** |" in lines
    assert "| points holding all three | 1 / 2 | 0 / 2 |  |" in lines
    out = tmp_path / "map.png"
    b.plot_factor_points(fps, out, "slo")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _map_results(b, seed=None):
    """Hand-built W3 cv 4 and W1 rate 2 results: baselines, and slo at wait factors 1 and 2.3."""
    W1, W3 = "slora-a10g-sweep", "slora-bursty-abort"

    def res(suite, point, policy, att, p99, factor=None, thr=1.8):
        job = b.Job(suite, point, policy, slo_wait_factor=factor, seed=seed)
        return b.Result(job, att, thr, p99, 0)

    return [
        res(W3, 4.0, "fcfs", 0.58, 32.8),
        res(W3, 4.0, "affinity", 0.57, 36.3),
        res(W3, 4.0, "fair", 0.79, 88.6),
        res(W3, 4.0, "slo", 0.70, 25.0, factor=1.0),  # attainment under fair's
        res(W3, 4.0, "slo", 0.80, 37.0, factor=2.3),  # p99 over 1.1 x 32.8 = 36.08
        res(W1, 2.0, "fcfs", 0.62, 13.5),
        res(W1, 2.0, "affinity", 0.61, 15.6),
        res(W1, 2.0, "fair", 0.865, 55.0),
        res(W1, 2.0, "slo", 0.92, 11.5, factor=1.0),
        res(W1, 2.0, "slo", 0.937, 12.4, factor=2.3, thr=1.7),  # req/s under 0.98 x 1.8
    ]


def test_seed_maps_say_per_seed_the_most_points_one_factor_holds_and_the_points_no_factor_holds():
    """`--map-seeds`: one map per seed from that seed's runs only, then a line per seed."""
    b = _bench()
    light = [  # on seed 7 slo holds W3 cv 4 at both factors
        b.Result(r.job, 0.80, r.throughput, 30.0, 0) if r.job.policy == "slo" and r.job.point == 4.0 else r
        for r in _map_results(b, seed=7)
    ]
    lines = b.seed_maps(_map_results(b, seed=42) + light, "slo", [42, 7])
    assert lines.index("## Seed 42") < lines.index("## Seed 7")
    assert "| 42 | 1 / 2 | 1 | W3 cv 4 |" in lines
    assert "| 7 | 2 / 2 | 1 | none |" in lines
