"""Issue 11: the profile fit, and `calibrate_profile` on the real executor of a tiny model."""

import tempfile
from pathlib import Path

import numpy as np
import pytest

from loramux.sim.calibrate import calibrate_profile, fit_nonnegative, fit_step_model, hat_basis
from loramux.sim.profile import COST_TERMS, Profile, StepFeatures


def test_nonnegative_fit_recovers_terms_and_drops_a_negative_one():
    rng = np.random.default_rng(0)
    x = np.column_stack([np.ones(200), rng.uniform(0, 100, 200), rng.uniform(0, 10, 200)])
    y = x @ np.array([0.05, 0.002, 0.0]) + rng.normal(0, 1e-4, 200)
    y -= 0.001 * x[:, 2]  # the true third term is negative: it must come out 0, not below
    coef = fit_nonnegative(x, y)
    assert (coef >= 0).all() and coef[2] == 0.0
    assert coef[1] == pytest.approx(0.002, rel=0.05)


def test_step_model_fit_recovers_a_curve_no_line_fits():
    """Steps cost a BLAS-like curve by tokens (one token 30 ms, two 58, three 77, four 58, then
    +1 ms per token) plus 0.4 ms per distinct adapter (decode-only steps and steps with a prefill,
    so the table and the per-row terms are told apart): the fit gives the curve's points and the
    adapter term, and the profile built from them predicts what the fit does."""
    rng = np.random.default_rng(1)
    n = 1500
    curve = {1: 0.030, 2: 0.058, 3: 0.077, 4: 0.058}
    x = np.zeros((n, len(COST_TERMS)))
    x[:, 0] = 1.0
    x[:, 3] = rng.integers(1, 48, n)  # decode rows
    pre = rng.random(n) < 0.3  # a third of the steps also prefill one prompt
    x[pre, 1], x[pre, 2] = rng.integers(2, 40, pre.sum()), 1
    x[:, 5] = rng.integers(1, 9, n)  # distinct adapters
    tokens = x[:, 1] + x[:, 3]
    true = np.array([curve.get(int(t), 0.058 + 0.001 * (t - 4)) for t in tokens]) + 0.0004 * x[:, 5]
    y = true + rng.normal(0, 2e-4, n)
    terms, table = fit_step_model(x, y)
    points = dict(table)
    for t, v in curve.items():
        assert points[float(t)] == pytest.approx(v, abs=0.001)
    assert terms["per_adapter_s"] == pytest.approx(0.0004, rel=0.1)
    assert all(v >= 0 for v in terms.values()) and terms["base_s"] == terms["per_prefill_token_s"] == 0
    p = Profile("t", "t", **terms, tokens_table=tuple(table))
    pred = np.array([p.step_seconds(StepFeatures(*row)) for row in x])
    assert np.abs(pred - true).max() < 0.002
    # the best line through the same steps misses the small batches by far more
    line = fit_nonnegative(x, y)
    small = tokens <= 4
    assert np.abs(x[small] @ line - true[small]).mean() > 5 * np.abs(pred[small] - true[small]).mean()


def test_tokens_table_interpolates_and_extends_along_its_upper_half():
    p = Profile(
        "t",
        "t",
        base_s=0.001,
        per_prefill_token_s=0.0,
        per_decode_row_s=0.0,
        tokens_table=((1, 0.030), (2, 0.058), (4, 0.058), (8, 0.066)),
    )
    assert p.table_seconds(1) == 0.030 and p.table_seconds(3) == pytest.approx(0.058)
    assert p.table_seconds(6) == pytest.approx(0.062) and p.table_seconds(16) == pytest.approx(0.082)
    assert p.step_seconds(StepFeatures(1.0, 12, 1, 3, 0, 0, 0, 0)) == pytest.approx(
        0.001 + 0.080
    )  # 15 tokens
    assert hat_basis(np.array([1.0, 3.0, 6.0]), [1, 2, 4, 8]) @ np.array([0.030, 0.058, 0.058, 0.066]) == (
        pytest.approx([p.table_seconds(1), p.table_seconds(3), p.table_seconds(6)])
    )
    kink = Profile(
        "k",
        "t",
        base_s=0.0,
        per_prefill_token_s=0.0,
        per_decode_row_s=0.0,
        tokens_table=((1, 0.010), (10, 0.020), (20, 0.030), (21, 0.0301)),
    )  # past the end: the slope from (10, 0.020), not the last segment's 0.1 ms per token
    assert kink.table_seconds(32) == pytest.approx(0.0301 + 11 * 0.0101 / 11)
    with pytest.raises(ValueError, match="tokens_table"):
        Profile(
            "t",
            "t",
            base_s=0.0,
            per_prefill_token_s=0.0,
            per_decode_row_s=0.0,
            tokens_table=((2, 0.03), (1, 0.05)),
        )
    loaded = Profile.load(p.save(Path(tempfile.mkdtemp()) / "p.json"))
    assert loaded == p and loaded.table_seconds(6) == pytest.approx(0.062)


def test_a_step_model_fitted_on_some_terms_leaves_the_others_out():
    """Issue 25, point 2: held-out term selection refits without a term; a term left out is 0 and
    the others still come out right, and a name that is not a linear term is refused."""
    rng = np.random.default_rng(2)
    n = 800
    x = np.zeros((n, len(COST_TERMS)))
    x[:, 0] = 1.0
    x[:, 3] = rng.integers(1, 40, n)  # decode rows: the tokens table
    x[:, 5] = rng.integers(0, 8, n)  # distinct adapters
    x[:, 4] = rng.integers(10, 5000, n)  # attended context
    y = 0.02 + 0.001 * x[:, 3] + 0.002 * x[:, 5] + 1e-6 * x[:, 4]
    full, _ = fit_step_model(x, y)
    assert full["per_adapter_s"] == pytest.approx(0.002, rel=0.02)
    some, _ = fit_step_model(x, y, ("per_adapter_s", "per_prefill_seq_s"))
    assert some["per_context_token_s"] == 0.0 and some["per_adapter_s"] == pytest.approx(0.002, rel=0.1)
    with pytest.raises(ValueError, match="not linear cost terms"):
        fit_step_model(x, y, ("per_adapter_s", "base_s"))


def test_calibrate_on_the_real_executor(tiny_models):
    """A short calibration of the tiny llama with two of its adapters: every step measured, a
    positive step cost, adapter reads and copies timed, the engine sizes of the run recorded."""
    tm = tiny_models["llama"]
    dirs = [tm.adapters["r1_qv"], tm.adapters["r8_all"]]
    profile, q = calibrate_profile(
        tm.path,
        dirs,
        "tiny",
        max_num_seqs=8,
        max_num_batched_tokens=512,
        kv_cache_memory=2**24,
        max_loras=2,
        requests=40,
        device="cpu",
        progress=False,
    )
    assert q["steps"] >= 20 and q["r2"] > 0.0
    assert profile.tokens_table and profile.tokens_table[0][1] > 0 and profile.source.startswith("measured")
    assert (
        profile.read_bytes_per_s > 0 and profile.copy_bytes_per_s > 0 and profile.adapter_bytes_per_rank > 0
    )
    assert profile.commits_kv_as_used and profile.engine["max_num_seqs"] == 8
    assert all(getattr(profile, t) >= 0 for t in COST_TERMS)


def test_calibrate_command_writes_a_profile_the_simulator_loads(tiny_models, tmp_path):
    """`loramux simulate calibrate MODEL_DIR --out FILE`: random adapters of ranks 8 to 64 on the real
    executor, a profile file that `loramux simulate --profile FILE` then runs on."""
    import json
    import subprocess
    import sys

    out = tmp_path / "tiny.json"
    base = [sys.executable, "-m", "loramux.cli", "simulate"]
    engine = ["--max-num-seqs", "8", "--device", "cpu", "--kv-cache-memory", str(2**24)]
    model = str(tiny_models["llama"].path)
    proc = subprocess.run(
        [*base, "calibrate", model, "--out", str(out), "--load", "phases", "--requests", "24", *engine],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"wrote {out}" in proc.stdout
    profile = Profile.load(out)
    assert profile.source.startswith("measured") and profile.engine["max_num_seqs"] == 8
    # Issue 25, point 1: the default load is serving itself, a ramp of wall-clock arrivals whose
    # steps the engine's step log records
    served = tmp_path / "served.json"
    ramp = ["--rates", "2,20,2", "--duration", "6", "--prompt-range", "8", "64"]
    proc = subprocess.run(
        [*base, "calibrate", model, "--out", str(served), *ramp, *engine],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    fitted = Profile.load(served)
    assert "serving ramp" in fitted.source and "2/20/2 req/s" in fitted.source
    assert fitted.tokens_table and fitted.engine["max_num_seqs"] == 8 and fitted.adapter_bytes_per_rank > 0
    bad = subprocess.run(
        [*base, "calibrate", model, "--out", str(served), "--rates", "2,-1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "positive rates" in bad.stderr
    proc = subprocess.run(
        [
            *base,
            "--workload",
            "slora",
            "--rates",
            "2",
            "--num-adapters",
            "4",
            "--duration",
            "5",
            "--input-range",
            "8",
            "32",
            "--output-range",
            "4",
            "16",
            "--profile",
            str(out),
            "--out",
            str(tmp_path / "r"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    assert results[0]["completed"] == results[0]["requests"] == 10


def test_a_profile_fitted_from_a_simulated_step_log_recovers_the_cost_model(tmp_path):
    """Issue 25, point 1: the simulator's engine writes the same step log a server does (its
    seconds are the profile's, jitter off); `profile_from_log` fitted on it predicts every logged
    step as the true profile does and recovers its terms and adapter rates; `loramux simulate
    calibrate --from-log` writes that profile."""
    import dataclasses
    import json
    import subprocess
    import sys

    from loramux.sim.calibrate import profile_from_log
    from loramux.sim.run import SimSettings, simulate
    from loramux.sim.workloads import SUITES

    true = dataclasses.replace(Profile.load("cpu-mid"), jitter=0.0)
    log = tmp_path / "steps.jsonl"
    simulate(SUITES["slora-a10g-sweep"].workload(1.0, 42), true, SimSettings(max_loras=4, step_log=str(log)))
    fit, quality = profile_from_log(log, "fit")
    steps = [json.loads(line) for line in log.read_text().splitlines() if '"kind": "step"' in line]
    x = [StepFeatures(1.0, *s["f"]) for s in steps]
    want = np.array([true.step_seconds(f) for f in x])
    got = np.array([fit.step_seconds(f) for f in x])
    assert quality["steps"] == len(steps) > 1000
    assert np.median(np.abs(got - want) / want) < 1e-3 and abs(got.sum() - want.sum()) / want.sum() < 1e-3
    for term in ("per_prefill_seq_s", "per_adapter_rank_s", "per_lora_rank_token_s"):
        assert getattr(fit, term) == pytest.approx(getattr(true, term), rel=0.02), term
    assert fit.copy_bytes_per_s == pytest.approx(true.copy_bytes_per_s, rel=0.1)
    assert fit.read_bytes_per_s == pytest.approx(true.read_bytes_per_s, rel=0.1)
    assert (fit.num_pages, fit.page_size, fit.adapter_bytes_per_rank) == (
        true.num_pages,
        true.page_size,
        true.adapter_bytes_per_rank,
    )
    out = tmp_path / "p.json"
    cmd = ["simulate", "calibrate", "--from-log", str(log), "--out", str(out)]
    subprocess.run([sys.executable, "-m", "loramux.cli", *cmd], check=True, capture_output=True, timeout=120)
    assert Profile.load(out).per_adapter_rank_s == pytest.approx(fit.per_adapter_rank_s)
    assert "from-log" in Profile.load(out).source


def test_the_engine_step_log_holds_each_steps_features_time_and_load_counters(tiny_models, tmp_path):
    """Issue 25, point 1: `step_log` (serve's --step-log) writes a start line with the sizes a
    profile needs, a line per adapter, and one per step that computed anything."""
    import json

    from loramux import LLM, LoRARequest, SamplingParams

    model = tiny_models["llama"]
    log = tmp_path / "steps.jsonl"
    llm = LLM(str(model.path), num_pages=64, page_size=4, device="cpu", step_log=str(log))
    lora = LoRARequest("r8_all", 1, str(model.adapters["r8_all"]))
    params = SamplingParams(max_tokens=6, ignore_eos=True, temperature=0)
    llm.generate([[5, 6, 7, 8, 9], [10, 11, 12]], params, [lora, None], use_tqdm=False)
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    start, adapters, steps = rows[0], [r for r in rows if r["kind"] == "adapter"], rows[1:]
    steps = [r for r in steps if r["kind"] == "step"]
    assert start["kind"] == "start" and start["page_size"] == 4 and start["num_pages"] == 64
    assert start["max_model_len"] > 0 and start["device"] == "cpu"
    assert len(adapters) == 1 and adapters[0]["rank"] == 8 and adapters[0]["nbytes"] > 0
    assert len(steps) == llm.engine.scheduler.counters.num_steps  # every step computed something here
    first = steps[0]
    assert len(first["f"]) == len(StepFeatures._fields) - 1 and first["s"] > 0 and len(first["loads"]) == 4
    assert first["f"][0] == 5 + 3 and first["f"][1] == 2  # both prompts prefill in the first step
    assert sum(s["f"][2] for s in steps) == 2 * 5  # decode rows: each request's tokens after the first
