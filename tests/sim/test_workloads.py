"""Issue 11: the workload generators reproduce the papers' own traces (papers.md sections 2-3).

Reference values: S-LoRA's from papers.md's table (re-running its generator with seed 42);
Punica's group sizes from papers.md and its lengths from running the authors' own generator
(scipy.stats.lognorm(0.8, -1, 18) and randint(0, 2048) on PCG64(0xABCDABCD987)) once, outside this repo.
"""

import dataclasses

import numpy as np
import pytest

from loramux.sim.workloads import (
    S2_RANKS,
    SUITES,
    load_trace,
    punica,
    punica_group_sizes,
    punica_lengths,
    save_trace,
    vtc_dist_shift,
    vtc_poisson_short_long_2,
    vtc_uniform,
)


def test_w1_is_slora_seed_42_trace():
    wl = SUITES["slora-a10g-sweep"].workload(2.0, 42)
    rs = wl.requests
    assert len(rs) == 600 and len({r.adapter for r in rs}) == 187
    first = [(r.adapter, r.input_len, r.output_len, round(r.arrival, 3)) for r in rs[:3]]
    assert first == [(74, 12, 410, 0.160), (190, 473, 43, 3.086), (146, 99, 292, 3.363)]
    assert rs[-1].arrival == pytest.approx(301.0, abs=0.05)
    assert np.mean([r.input_len for r in rs]) == pytest.approx(255.7, abs=0.05)
    assert [wl.rank(i) for i in range(5)] == [64, 32, 16, 8, 64]  # S2: adapter 0 is the largest
    assert wl.ranks == S2_RANKS and wl.num_adapters == 200


def test_w2_and_w3_reference_values():
    w2 = SUITES["slora-a100-scale"].workload(2000, 42).requests
    assert len(w2) == 1200 and len({r.adapter for r in w2}) == 907
    assert w2[-1].arrival == pytest.approx(125.0, abs=0.05)
    assert SUITES["slora-a100-scale"].workload(2000, 42).rank(7) == 8  # S1
    w3 = SUITES["slora-bursty-abort"].workload(8.0, 42).requests
    assert w3[-1].arrival == pytest.approx(432.5, abs=0.05)
    assert all(r.arrival < 0.01 for r in w3[:3])  # very bursty: the first three at about t = 0
    assert SUITES["slora-bursty-abort"].abort_after == 5.5  # wait + 0.5 >= 6 s


def test_punica_group_sizes():
    assert punica_group_sizes(1024, "skewed") == [
        291,
        194,
        157,
        129,
        86,
        57,
        38,
        25,
        17,
        11,
        7,
        5,
        3,
        2,
        1,
        1,
    ]
    assert punica_group_sizes(1024, "uniform") == [32] * 32
    assert punica_group_sizes(1024, "distinct") == [1] * 1024
    assert punica_group_sizes(1024, "identical") == [1024]
    assert punica_group_sizes(10, "uniform") == [3, 3, 2, 2]
    with pytest.raises(ValueError, match="popularity"):
        punica_group_sizes(10, "zipf")


def test_punica_lengths_match_the_authors_generator():
    prompts, outputs = punica_lengths(1024)
    assert prompts[:8] == [24, 42, 8, 27, 3, 29, 18, 14]
    assert outputs[:8] == [45, 1293, 936, 1796, 1502, 770, 1278, 754]
    assert (sum(prompts), sum(outputs), float(np.median(prompts))) == (24190, 1009565, 16.0)
    wl = punica("skewed")
    counts = sorted(np.bincount([r.adapter for r in wl.requests]).tolist(), reverse=True)
    assert counts == punica_group_sizes(1024, "skewed")
    assert all(r.arrival == 0.0 for r in wl.requests) and wl.ranks == (16,)


def test_vtc_uniform_spacing_and_on_off():
    rs = vtc_uniform([1.5, 3.0], 360.0)
    by = {c: [r.arrival for r in rs if r.tenant == c] for c in ("client0", "client1")}
    assert (len(by["client0"]), len(by["client1"])) == (540, 1080)
    for c, rate in (("client0", 1.5), ("client1", 3.0)):
        gaps = np.diff(by[c])
        assert np.allclose(gaps, 1 / rate)
        assert 1 / rate <= by[c][0] < 2 / rate  # a random phase U(0,1)/rate, then one period
    assert all(r.input_len == 256 and r.output_len == 256 for r in rs)
    assert [r.arrival for r in rs] == sorted(r.arrival for r in rs)
    on_off = vtc_uniform([0.5, 2.0], 600.0, on_off=60.0)
    silent = [r for r in on_off if r.tenant == "client0" and int(r.arrival // 60) % 2 == 1]
    assert not silent
    assert sum(r.tenant == "client0" for r in on_off) == pytest.approx(150, abs=2)  # half of 300


def test_vtc_short_long_2_and_dist_shift():
    rs = vtc_poisson_short_long_2()
    c0 = [r for r in rs if r.tenant == "client0"]
    assert len(rs) == int(9.5 * 600)
    assert all(r.input_len == 32 and r.output_len == 512 for r in c0)  # client 0's lengths swapped
    assert len(c0) / len(rs) == pytest.approx(8 / 9.5, abs=0.02)
    ds = vtc_dist_shift()
    assert len(ds) > 0 and ds[-1].arrival <= 900 + 2
    phase2 = [r for r in ds if 300 <= r.arrival < 600]
    assert abs(sum(r.tenant == "client0" for r in phase2) - sum(r.tenant == "client1" for r in phase2)) <= 2


def test_trace_replay_csv_and_jsonl(tmp_path):
    wl = SUITES["slora-a10g-sweep"].workload(1.0, 42)
    path = save_trace(wl, tmp_path / "t.csv")
    back = load_trace(path)
    assert len(back.requests) == len(wl.requests)
    assert [(r.input_len, r.output_len) for r in back.requests] == [
        (r.input_len, r.output_len) for r in wl.requests
    ]
    assert back.requests[5].arrival == pytest.approx(wl.requests[5].arrival, abs=1e-6)
    jl = tmp_path / "t.jsonl"
    jl.write_text(
        '{"arrival": 0.5, "adapter": "x", "tenant": "acme", "prompt_len": 8, "output_len": 4}\n'
        '{"arrival": 0.1, "adapter": "", "prompt_len": 3, "output_len": 2}\n'
    )
    t = load_trace(jl)
    assert [(r.arrival, r.adapter, r.tenant) for r in t.requests] == [(0.1, None, ""), (0.5, 0, "acme")]
    assert t.num_adapters == 1
    bad = tmp_path / "bad.csv"
    bad.write_text("arrival,adapter,prompt_len\n0.1,a,5\n")
    with pytest.raises(ValueError, match="row 1 lacks \\['output_len'\\]"):
        load_trace(bad)
    bad.write_text("arrival,adapter,prompt_len,output_len\n-1,a,5,5\n")
    with pytest.raises(ValueError, match="arrival must be >= 0"):
        load_trace(bad)


def test_trace_rank_column_sets_each_adapters_rank_and_survives_a_round_trip(tmp_path):
    """Issue 25, point 3: a trace names each adapter's rank (every adapter was rank 8 before)."""
    wl = SUITES["slora-a10g-sweep"].workload(1.0, 42)  # ranks 64/32/16/8 by adapter index
    back = load_trace(save_trace(wl, tmp_path / "t.csv"))
    names = {}
    for r0, r1 in zip(wl.requests, back.requests, strict=True):
        if r0.adapter is not None:
            names.setdefault(r0.adapter, r1.adapter)
            assert back.rank(r1.adapter) == wl.rank(r0.adapter)
    assert {wl.rank(a) for a in names} == {64, 32, 16, 8}
    t = tmp_path / "r.csv"
    t.write_text("arrival,adapter,prompt_len,output_len,rank\n0,a,5,5,32\n0.1,b,5,5,\n0.2,a,5,5,\n")
    assert [load_trace(t).rank(i) for i in (0, 1)] == [32, 8]  # no rank: 8
    t.write_text("arrival,adapter,prompt_len,output_len,rank\n0,a,5,5,32\n0.1,a,5,5,16\n")
    with pytest.raises(ValueError, match="has rank 16 here and 32 before"):
        load_trace(t)
    t.write_text("arrival,adapter,prompt_len,output_len,rank\n0,a,5,5,x\n")
    with pytest.raises(ValueError, match="integer >= 1"):
        load_trace(t)


def test_trace_path_column_gives_an_adapters_rank_and_the_bytes_its_load_moves(tiny_models, tmp_path):
    """Issue 25, point 3: a trace's optional `path` names the adapter's PEFT directory; its
    adapter_config.json gives the rank when `rank` is empty, its weights file's size is what the
    simulated load reads and copies, and the path survives a round trip."""
    import json

    from loramux.sim.profile import Profile
    from loramux.sim.run import SimSettings, simulate

    big = tiny_models["llama"].adapters["r8_all"]  # rank 8 on every projection
    small = tiny_models["llama"].adapters["r1_qv"]
    t = tmp_path / "p.jsonl"
    rows = [
        {"arrival": 0.0, "adapter": "big", "prompt_len": 5, "output_len": 3, "path": str(big)},
        {"arrival": 0.1, "adapter": "small", "prompt_len": 5, "output_len": 3, "path": str(small), "rank": 1},
        {"arrival": 0.2, "adapter": "big", "prompt_len": 5, "output_len": 3},
    ]
    t.write_text("".join(json.dumps(r) + "\n" for r in rows))
    wl = load_trace(t)
    assert [wl.rank(0), wl.rank(1)] == [8, 1] and wl.path(0) == str(big)
    size = (big / "adapter_model.safetensors").stat().st_size
    assert wl.adapter_nbytes(0) == size and wl.adapter_nbytes(1) < size
    back = load_trace(save_trace(wl, tmp_path / "p.csv"))
    assert back.paths == wl.paths and back.ranks == wl.ranks
    # the simulator loads what the file holds (its step log lists each adapter's bytes), where
    # the profile's bytes per rank would give 8 x 1000
    from loramux.engine.step_log import read_step_log

    profile = dataclasses.replace(Profile.load("cpu-mid"), adapter_bytes_per_rank=1000)
    log = tmp_path / "steps.jsonl"
    res = simulate(wl, profile, SimSettings(max_loras=2, step_log=str(log)))
    assert all(r.finish is not None for r in res.records)
    _, adapters, _ = read_step_log(log)
    assert sorted(a["nbytes"] for a in adapters.values()) == sorted([size, wl.adapter_nbytes(1)])
    assert size != profile.adapter_bytes(8)
    t.write_text(json.dumps({**rows[0], "path": str(tmp_path / "nowhere")}) + "\n")
    with pytest.raises(ValueError, match="not a PEFT LoRA directory"):
        load_trace(t)
    t.write_text("".join(json.dumps(r) + "\n" for r in (rows[0], {**rows[2], "path": str(small)})))
    with pytest.raises(ValueError, match="one path"):
        load_trace(t)


def test_a_ramp_steps_its_arrival_rate_through_equal_windows():
    """Issue 25, point 1: the serving calibration load (generate_ramp): each window of
    duration / len(rates) seconds holds about rate x window arrivals, in order, numbered 0..n-1."""
    from loramux.workload import WorkloadConfig, generate_ramp

    cfg = WorkloadConfig(8, 1.0, 1.0, 1.0, 120.0, (8, 64), (4, 32), 7)
    rates = (0.5, 4.0, 16.0, 2.0)
    reqs = generate_ramp(cfg, rates)
    assert [r.index for r in reqs] == list(range(len(reqs)))
    arrivals = [r.arrival for r in reqs]
    assert arrivals == sorted(arrivals) and arrivals[0] >= 0 and arrivals[-1] < 120.0
    counts = [sum(1 for t in arrivals if 30 * i <= t < 30 * (i + 1)) for i in range(4)]
    for n, rate in zip(counts, rates, strict=True):
        assert abs(n - 30 * rate) <= 4 * (30 * rate) ** 0.5 + 2, (counts, rates)
    assert counts[2] > 3 * counts[1] > 3 * counts[0]
    assert all(0 <= r.adapter < 8 and 8 <= r.input_len < 64 for r in reqs)
    with pytest.raises(ValueError, match="positive rates"):
        generate_ramp(cfg, (1.0, 0.0))
