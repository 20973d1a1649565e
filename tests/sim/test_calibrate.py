"""Issue 11: the profile fit, and `calibrate_profile` on the real executor of a tiny model."""

import numpy as np
import pytest

from loramux.sim.calibrate import calibrate_profile, fit_nonnegative, fit_roofline, roofline
from loramux.sim.profile import COST_TERMS, Profile, StepFeatures


def test_nonnegative_fit_recovers_terms_and_drops_a_negative_one():
    rng = np.random.default_rng(0)
    x = np.column_stack([np.ones(200), rng.uniform(0, 100, 200), rng.uniform(0, 10, 200)])
    y = x @ np.array([0.05, 0.002, 0.0]) + rng.normal(0, 1e-4, 200)
    y -= 0.001 * x[:, 2]  # the true third term is negative: it must come out 0, not below
    coef = fit_nonnegative(x, y)
    assert (coef >= 0).all() and coef[2] == 0.0
    assert coef[1] == pytest.approx(0.002, rel=0.05)


def test_roofline_fit_finds_the_floor():
    """Steps cost 10 ms + max(30 ms, 1 ms per token): small batches sit on the floor."""
    rng = np.random.default_rng(1)
    n = 400
    x = np.zeros((n, len(COST_TERMS)))
    x[:, 0] = 1.0
    x[:, 3] = rng.integers(1, 80, n)  # decode rows
    y = 0.010 + np.maximum(0.030, 0.001 * x[:, 3]) + rng.normal(0, 2e-4, n)
    coef, floor = fit_roofline(x, y, grid=121)
    assert floor == pytest.approx(0.030, abs=0.002)
    assert coef[0] == pytest.approx(0.010, abs=0.002) and coef[3] == pytest.approx(0.001, rel=0.05)
    p = Profile(
        "r", "t", base_s=coef[0], per_prefill_token_s=coef[1], per_decode_row_s=coef[3], floor_s=floor
    )
    f = StepFeatures(1.0, 0, 0, 5, 0, 0, 0, 0)
    assert p.step_seconds(f) == pytest.approx(roofline(np.array([f], dtype=float), coef, floor)[0])
    assert p.step_seconds(f) == pytest.approx(0.040, abs=0.003)  # five rows: on the floor


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
    assert profile.base_s + profile.floor_s > 0 and profile.source.startswith("measured")
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
    proc = subprocess.run(
        [
            *base,
            "calibrate",
            str(tiny_models["llama"].path),
            "--out",
            str(out),
            "--requests",
            "24",
            "--max-num-seqs",
            "8",
            "--device",
            "cpu",
            "--kv-cache-memory",
            str(2**24),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"wrote {out}" in proc.stdout
    profile = Profile.load(out)
    assert profile.source.startswith("measured") and profile.engine["max_num_seqs"] == 8
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
