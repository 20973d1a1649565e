"""Issue 23: the prepared GPU check runs end to end on the CPU at tiny shapes (`--dry-run`), so the
one device run it is made for does not fail on a typo: every section reports, none with an error,
and the kernels agree with the torch path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_gpu_dry_run_reports_every_section_without_errors(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "benchmarks/bench_gpu.py",
            "--dry-run",
            "--out",
            str(out),
            "--cache-dir",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "gpu.json").read_text())
    sections = res["sections"]
    assert list(sections) == ["tests", "kernels", "decode", "peft", "graphs", "online"]
    assert not [n for n, b in sections.items() if "error" in b or "skipped" in b]
    assert sections["tests"]["rc"] == 0
    assert sections["kernels"]["attention"]["max_abs_err"] < 1e-4
    assert sections["kernels"]["lora"]["max_abs_err"] < 1e-4
    rows = sections["decode"]["rows"]
    assert {(r["batch"], r["adapters"] > 0) for r in rows} == {(1, False), (1, True), (4, False), (4, True)}
    assert all(r["decode_tok_s"] > 0 and r["roofline_tok_s"] > 0 for r in rows)
    graphs = sections["graphs"]  # emulated in the dry run: the same code, on the Triton path
    assert [r["batch"] for r in graphs["rows"]] == [1, 4] and graphs["replays"] > 0
    assert all(r["done"] == r["requests"] > 0 for r in sections["online"]["rows"])
    assert (out / "gpu.md").read_text().startswith("# GPU check")
