"""Issue 11: `loramux simulate` end to end (a tiny workload, two policies, two rates), and every
named workload W1-W5 builds and runs its first requests from its name."""

import dataclasses
import json
import subprocess
import sys

import matplotlib.image
import pytest

from loramux.sim.profile import Profile
from loramux.sim.run import SimSettings, simulate
from loramux.sim.workloads import SUITES


def run_cli(*args, cwd=None):
    proc = subprocess.run(
        [sys.executable, "-m", "loramux.cli", "simulate", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_cli_report_and_plots(tmp_path):
    out = tmp_path / "rep"
    stdout = run_cli(
        "--workload",
        "slora",
        "--rates",
        "1",
        "3",
        "--num-adapters",
        "6",
        "--duration",
        "20",
        "--input-range",
        "8",
        "64",
        "--output-range",
        "8",
        "32",
        "--policies",
        "fcfs,fair",
        "--profile",
        "cpu-mid",
        "--max-loras",
        "2",
        "--out",
        str(out),
    )
    report = (out / "report.md").read_text()
    assert stdout.strip() == report.strip()
    assert report.startswith("# S-LoRA generator")
    assert "Command: `loramux simulate --workload slora --rates 1 3" in report
    rows = [line for line in report.splitlines() if line.startswith("| 1 |") or line.startswith("| 3 |")]
    assert [r.split("|")[2].strip() for r in rows[:4]] == ["fcfs", "fair", "fcfs", "fair"]
    assert "capacity (fcfs):" in report and "capacity (fair):" in report
    results = json.loads((out / "results.json").read_text())
    assert len(results) == 4 and {r["policy"] for r in results} == {"fcfs", "fair"}
    for r in results:
        assert r["requests"] == (20 if r["point"] == "1" else 60)
        assert r["completed"] == r["requests"] and 0 <= r["attainment"] <= 1
        assert r["ttft"]["p50"] <= r["ttft"]["p99"] and r["adapter_loads"] > 0
        assert r["ttft_by_adapter"]
    # issue 28: the service plot is drawn at the most loaded point, where the policies differ
    assert "![service](service.png) (at rate = 3, the most loaded point)" in report
    for name in ("attainment_throughput", "ttft_cdf", "service"):
        png = out / f"{name}.png"
        assert f"![{name}]({name}.png)" in report
        img = matplotlib.image.imread(png)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
        assert img[..., :3].std() > 0.01  # something is drawn


def test_cli_trace_replay_and_errors(tmp_path):
    trace = tmp_path / "t.csv"
    trace.write_text("arrival,adapter,tenant,prompt_len,output_len\n0,a,x,20,5\n0.2,b,y,30,6\n0.3,,x,10,3\n")
    out = tmp_path / "rep"
    run_cli("--trace", str(trace), "--policies", "fair", "--out", str(out), "--profile", "cpu-mid")
    results = json.loads((out / "results.json").read_text())
    assert results[0]["completed"] == 3
    assert results[0]["fairness"] is not None  # two tenants: VTC's service difference is reported
    assert results[0]["attainment_tpot"] is None and results[0]["tpot"]["n"] == 3
    # a TPOT target beside the TTFT one (vLLM's --goodput): one far below any step misses every stream
    report = run_cli("--trace", str(trace), "--out", str(out), "--profile", "cpu-mid", "--tpot-slo", "1e-6")
    assert "attainment / with TPOT <= 0.001 ms" in report
    (r,) = json.loads((out / "results.json").read_text())
    assert r["attainment"] == 1.0 and r["attainment_tpot"] == 0.0 and r["tpot"]["p50"] > 1e-6
    proc = subprocess.run(
        [sys.executable, "-m", "loramux.cli", "simulate", "--trace", str(trace), "--tpot-slo", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "--tpot-slo 0: a TPOT target must be positive" in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "loramux.cli", "simulate", "--workload", "nope"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "unknown workload 'nope'" in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "loramux.cli", "simulate", "--profile", "missing"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "no profile 'missing'" in proc.stderr
    listing = run_cli("--list")
    for name in SUITES:
        assert name in listing


@pytest.mark.parametrize("name", list(SUITES))
def test_every_named_workload_runs_from_its_name(name):
    """W1-W5 from their names: each point's workload builds; the first 40 requests of the first point
    run to completion under the workload's engine settings and profile."""
    suite = SUITES[name]
    wls = [suite.workload(p, 42) for p in suite.points]
    assert all(w.requests for w in wls)
    wl = dataclasses.replace(wls[0], requests=wls[0].requests[:40])
    known = {f.name for f in dataclasses.fields(SimSettings)}
    settings = SimSettings(
        abort_after=suite.abort_after, **{k: v for k, v in wl.engine.items() if k in known}
    )
    res = simulate(wl, Profile.load(suite.profile), settings)
    assert all(r.finish is not None for r in res.records)
