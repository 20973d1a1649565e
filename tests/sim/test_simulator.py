"""Issue 11: the simulator runs the engine's own control plane on a virtual clock.

Checks: the real Scheduler and policy objects make every decision (a copy would not call them);
the same seed gives the same report; the virtual clock moves by the profile's costs, computed by
hand here; adapter reads and copies happen on that clock; early abort drops requests on it; no
torch is imported; a bounded-run guard stops a runaway simulation.
"""

import dataclasses
import subprocess
import sys

import pytest

from loramux.core import policies as policies_mod
from loramux.core import scheduler as scheduler_mod
from loramux.sim import metrics
from loramux.sim.profile import Profile
from loramux.sim.run import SimSettings, simulate
from loramux.sim.workloads import SimRequest, Workload


def profile(**kw) -> Profile:
    base = dict(
        name="hand",
        source="test",
        base_s=1.0,
        per_prefill_token_s=0.1,
        per_decode_row_s=0.5,
        num_pages=256,
        page_size=16,
        max_model_len=1024,
        adapter_bytes_per_rank=100,
    )
    return Profile(**{**base, **kw})


def workload(reqs, n_adapters=0, ranks=(8,)) -> Workload:
    return Workload("hand", reqs, ranks, n_adapters, 10.0)


def test_one_request_by_hand():
    """Prompt 10, 3 outputs: step 1 prefills 10 tokens (1 + 10 x 0.1 = 2 s) and samples the first
    token; steps 2 and 3 decode one row each (1 + 0.5 = 1.5 s). TTFT 2 s (+ 0.5 s arrival), end 5 s."""
    res = simulate(workload([SimRequest(0, 0.5, None, 10, 3)]), profile(), SimSettings())
    (r,) = res.records
    assert r.first_token == pytest.approx(0.5 + 2.0)
    assert r.finish == pytest.approx(0.5 + 5.0)
    assert r.output_tokens == 3 and not r.aborted
    assert res.steps == 3


def test_context_and_adapter_terms_and_loads_on_the_clock():
    """An adapter of rank 8 (800 bytes): its read takes 800 / 400 = 2 s, its copy 800 / 1600 = 0.5 s,
    both in the first step before the forward. Step 1: 1 + 10 x 0.1 + context 10 x 0.01 + one adapter
    0.25 + rank 8 x 0.125 = 3.35 s. TTFT = 2 + 0.5 + 3.35."""
    p = profile(
        per_context_token_s=0.01,
        per_adapter_s=0.25,
        per_adapter_rank_s=0.125,
        read_bytes_per_s=400,
        copy_bytes_per_s=1600,
    )
    res = simulate(workload([SimRequest(0, 0.0, 0, 10, 2)], n_adapters=1), p, SimSettings())
    (r,) = res.records
    assert r.first_token == pytest.approx(2.0 + 0.5 + 3.35)
    # step 2: one decode row at position 10 (context 11): 1 + 0.5 + 0.11 + 0.25 + 1.0
    assert r.finish == pytest.approx(r.first_token + 2.86)
    assert (res.adapter_loads, res.host_loads) == (1, 1)
    assert res.load_seconds == pytest.approx((2.0, 0.5, 2.0))  # read, copy, the step waited for the read


def test_arrivals_wait_for_the_running_step_and_the_clock_jumps_when_idle():
    reqs = [
        SimRequest(0, 0.0, None, 10, 1),
        SimRequest(1, 0.1, None, 10, 1),
        SimRequest(2, 100.0, None, 10, 1),
    ]
    res = simulate(workload(reqs), profile(), SimSettings())
    r0, r1, r2 = res.records
    assert r0.first_token == pytest.approx(2.0)
    assert r1.first_token == pytest.approx(4.0)  # arrived during step 1: runs in step 2
    assert r2.first_token == pytest.approx(102.0)  # the clock jumped to its arrival
    assert res.end_time == pytest.approx(102.0)


def test_the_simulator_calls_the_engines_scheduler_and_policy(monkeypatch):
    """A simulator that copied the policy would never call these: count the calls."""
    calls = {"schedule": 0, "policy": 0}
    real_schedule, real_policy = scheduler_mod.Scheduler.schedule, policies_mod.FairPolicy.schedule

    def schedule(self):
        calls["schedule"] += 1
        return real_schedule(self)

    def policy(self, *a, **kw):
        calls["policy"] += 1
        return real_policy(self, *a, **kw)

    monkeypatch.setattr(scheduler_mod.Scheduler, "schedule", schedule)
    monkeypatch.setattr(policies_mod.FairPolicy, "schedule", policy)
    reqs = [SimRequest(i, 0.1 * i, i % 3, 20, 5, tenant=f"t{i % 2}") for i in range(30)]
    res = simulate(
        workload(reqs, 3),
        profile(base_s=0.01, per_prefill_token_s=0.001, per_decode_row_s=0.001),
        SimSettings(policy="fair"),
    )
    assert calls["schedule"] == res.steps > 0
    assert calls["policy"] > 0


def test_a_change_to_the_engines_policy_changes_the_simulation(monkeypatch):
    """Serve the newest request first by patching the engine's fcfs policy: the simulated order follows."""
    reqs = [SimRequest(i, 0.0, i, 50, 20) for i in range(4)]  # one adapter each: one group each
    settings = SimSettings(max_num_seqs=1, max_loras=4)
    before = [r.first_token for r in simulate(workload(reqs, 4), profile(), settings).records]
    assert before == sorted(before)  # fcfs: arrival order
    monkeypatch.setattr(policies_mod.FCFSPolicy, "priority", lambda self, key, req: (-req.arrival_seq,))
    after = [r.first_token for r in simulate(workload(reqs, 4), profile(), settings).records]
    assert after == sorted(after, reverse=True)


def test_same_seed_same_result(tmp_path):
    reqs = [SimRequest(i, 0.05 * i, i % 5, 30 + i, 10 + i % 7, tenant=f"t{i % 3}") for i in range(80)]
    wl = workload(reqs, 5, (8, 16))
    p = profile(
        base_s=0.02,
        per_prefill_token_s=0.001,
        per_decode_row_s=0.002,
        read_bytes_per_s=1e4,
        copy_bytes_per_s=1e5,
    )
    runs = [simulate(wl, p, SimSettings(policy="fair", max_loras=2, max_num_seqs=8)) for _ in range(2)]
    strip = [[dataclasses.astuple(r) for r in res.records] for res in runs]
    assert strip[0] == strip[1]
    assert (runs[0].steps, runs[0].adapter_loads, runs[0].end_time) == (
        runs[1].steps,
        runs[1].adapter_loads,
        runs[1].end_time,
    )


def test_early_abort_drops_requests_that_waited_too_long():
    """One seat, ten requests of 10 s each: with abort_after 5 s, those still waiting at 5 s end
    (S-LoRA's early abort), and they count against attainment."""
    reqs = [SimRequest(i, 0.0, None, 10, 10) for i in range(10)]
    p = profile(base_s=0.5, per_prefill_token_s=0.0, per_decode_row_s=0.5)  # 1 s a step
    res = simulate(workload(reqs), p, SimSettings(max_num_seqs=1, abort_after=5.0))
    aborted = [r for r in res.records if r.aborted]
    assert len(aborted) == 9 and all(r.first_token is None for r in aborted)
    assert metrics.attainment(res.records) == pytest.approx(0.1)
    assert res.extra["timeouts"] == 9
    # dropped at the first step past 5 s (reported when that 1 s step ends), not when the seat frees at 9.5 s
    assert max(r.finish for r in aborted) <= 7.0


def test_step_guard_stops_a_runaway_simulation():
    reqs = [SimRequest(0, 0.0, None, 10, 50)]
    with pytest.raises(RuntimeError, match="max_steps"):
        simulate(workload(reqs), profile(), SimSettings(max_steps=10))


def test_profile_refuses_bad_values(tmp_path):
    with pytest.raises(ValueError, match="base_s"):
        profile(base_s=-1.0)
    bad = tmp_path / "p.json"
    bad.write_text(
        '{"name": "x", "source": "y", "base_s": 1, "per_prefill_token_s": 0, '
        '"per_decode_row_s": 0, "typo_s": 3}'
    )
    with pytest.raises(ValueError, match="unknown keys \\['typo_s'\\]"):
        Profile.load(bad)
    with pytest.raises(ValueError, match="no profile 'nope'"):
        Profile.load("nope")
    for name in ("cpu-mid", "a10g-llama7b", "a100-80-llama7b"):
        p = Profile.load(name)
        assert p.source.startswith("measured" if name == "cpu-mid" else "derived, not measured")
    roundtrip = tmp_path / "r.json"
    profile().save(roundtrip)
    assert Profile.load(roundtrip) == profile()


def test_simulator_imports_no_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from loramux.sim.run import simulate, SimSettings\n"
        "from loramux.sim.profile import Profile\n"
        "from loramux.sim.workloads import SUITES\n"
        "from loramux.sim import cli, report, metrics\n"
        "wl = SUITES['slora-a10g-sweep'].workload(1.0, 42)\n"
        "import dataclasses; wl = dataclasses.replace(wl, requests=wl.requests[:20])\n"
        "r = simulate(wl, Profile.load('a10g-llama7b'), SimSettings(max_loras=8))\n"
        "assert len(r.records) == 20 and all(x.finish for x in r.records)\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
