"""The scheduler benchmark's trace mode runs and reports every configuration (issue 10; no timing
asserted): tokens per step for aging on and off, and 0 steps that left admissible work behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_trace_mode_reports_every_configuration_and_skew():
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_scheduler.py"),
            "--trace",
            "--quick",
            "--policies",
            "fcfs",
            "--repeat",
            "2",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    header, body = rows[0], rows[1:]
    assert [c.strip() for c in header[:4]] == ["config", "a", "policy", "tokens/step"]
    assert [(r[0].strip(), r[1].strip()) for r in body] == [
        (c, a) for c in ("32:1000", "4:1000", "32:32", "no LoRA") for a in ("1.0", "0.3")
    ]
    col = [c.strip() for c in header].index("not work-conserving")
    assert all(r[col].strip() == "0" for r in body)
    assert all(float(r[3]) > 0 for r in body)
    # --repeat 2: the time is the best of two runs' medians, with their range
    for r in body:
        best, spread = r[-1].split(" (")
        lo, hi = (float(x) for x in spread.rstrip(") ").split("-"))
        assert float(best) == lo <= hi
