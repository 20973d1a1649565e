"""Issue 26: the online bench's records (loramux/bench/systems.py) read by the simulator's
metrics. Requests naming an adapter (S1.1), served online by the real engine on a tiny model, all
finish, none aborted, each with its token count, so `tpot` and attainment with a TPOT target mean
the same on real runs as on simulated ones (benchmarks/bench_policy_real.py)."""

from __future__ import annotations

import pytest

from loramux.bench.artifacts import build_random_model, write_random_adapter
from loramux.bench.systems import LoramuxSettings, make_prompts, run_loramux
from loramux.sim import metrics as m
from loramux.workload import BenchRequest


@pytest.mark.timeout(300)
def test_online_run_records_feed_tpot_and_attainment(tmp_path):
    model = build_random_model(tmp_path / "tiny", "tiny")
    adapter = write_random_adapter(tmp_path / "a0", model, 8, ("q_proj", "v_proj"), seed=0)
    reqs = [BenchRequest(0, 0, 12, 1, 0.0), BenchRequest(1, 0, 9, 6, 0.0), BenchRequest(2, 0, 7, 9, 0.05)]
    settings = LoramuxSettings(max_loras=1, max_lora_rank=8, device="cpu", kv_cache_memory=1 << 24)
    run = run_loramux(model, [adapter], reqs, make_prompts(reqs, 512), "online", settings)
    by = {r.index: r for r in run.records}
    for q in reqs:
        r = by[q.index]
        assert r.finish is not None and r.first_token is not None and not r.aborted
        assert r.output_tokens == q.output_len
    assert m.tpot(by[0]) == 0.0  # a single token has no time between tokens
    for i in (1, 2):
        r = by[i]
        assert m.tpot(r) == pytest.approx((r.finish - r.first_token) / (r.output_tokens - 1))
        assert m.tpot(r) > 0
    assert m.attainment(run.records, slo=60.0) == 1.0
    assert m.attainment(run.records, slo=60.0, tpot_slo=1e-9) == pytest.approx(1 / 3)  # only the 1-token one
