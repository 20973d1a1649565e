"""The decode-path micro-benchmark runs and reports its three paths (issue: bench; no timing asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_lora_decode_benchmark_reports_base_window_and_gather():
    args = ["--rows", "6", "--slots", "8", "--layers", "1", "--steps", "3", "--reps", "1"]
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_lora_decode.py"), *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    rows = [
        line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ") and "---" not in line
    ]
    assert rows == ["path", "base", "window", "gather"]
    assert "6 rows, 8 slots" in out
