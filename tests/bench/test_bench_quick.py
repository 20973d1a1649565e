"""`loramux bench --quick` end to end: the report, the table and the plots come out well formed.

No timing assertions: speed is recorded in docs/benchmarks.md, never tested.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

SYSTEMS = [
    "loramux",
    "loramux, base only",
    "transformers+PEFT, mixed",
    "transformers+PEFT, one adapter at a time",
]


@pytest.mark.timeout(600)
def test_quick_bench_writes_report_plots_and_docs_section(tmp_path):
    doc = tmp_path / "docs" / "benchmarks.md"
    doc.parent.mkdir()
    doc.write_text("# loramux benchmarks\n\nEarlier text stays.\n")
    cmd = [
        sys.executable,
        "-m",
        "loramux.cli",
        "bench",
        "--quick",
        "--duration",  # two seconds of trace instead of five: the same report, in half the time
        "2",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--out",
        str(tmp_path / "out"),
        "--write-docs",
        str(doc),
        "--step-log",
        str(tmp_path / "steps.jsonl"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (tmp_path / "out" / "report.md").read_text()
    rows = [line for line in report.splitlines() if re.match(r"\| (offline|online) \|", line)]
    assert len(rows) == 8  # four systems, two modes
    for mode in ("offline", "online"):
        for system in SYSTEMS:
            row = next(r for r in rows if r.startswith(f"| {mode} | {system} |"))
            cells = [c.strip() for c in row.strip("|").split("|")]
            assert float(cells[2]) > 0 and float(cells[3]) > 0  # tokens/s and requests/s
            assert re.fullmatch(r"[\d.]+ / [\d.]+", cells[4]) and re.fullmatch(r"[\d.]+ / [\d.]+", cells[5])
            if system != "loramux":
                assert re.fullmatch(r"[\d.]+x", cells[8])  # the ratio to each baseline
    for heading in (
        "loramux / transformers+PEFT mixed",
        "loramux with adapters / loramux base only",
        "20 adapters / 5 adapters",
    ):
        assert heading in report
    assert "Command: `loramux bench --quick" in report and "Machine:" in report
    # Issue 25, point 1: `--step-log` keeps the online run with adapters' steps, for calibration.
    kinds = [json.loads(line)["kind"] for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert kinds[0] == "start" and kinds.count("adapter") >= 5 and kinds.count("step") > 10
    # The adapter-count rows say where adapter loading time went (read / copy / wait, seconds).
    scale_rows = [line for line in report.splitlines() if re.match(r"\| (5|20) \| [\d.]+ \|", line)]
    assert len(scale_rows) == 2, report
    for row in scale_rows:
        load = [c.strip() for c in row.strip("|").split("|")][4]
        assert re.fullmatch(r"[\d.]+ / [\d.]+ / [\d.]+", load), row
    # Ratios between loramux runs list their per-round values (quick mode runs two rounds).
    assert re.search(
        r"20 adapters / 5 adapters: \*\*[\d.]+\*\* \(target >= 0.95\) \(rounds: [\d.]+, [\d.]+\)", report
    )
    for png in ("throughput_vs_adapters.png", "throughput_vs_alpha.png"):
        data = (tmp_path / "out" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        import matplotlib.image

        img = matplotlib.image.imread(str(tmp_path / "out" / png))
        assert img.shape[0] > 300 and img.shape[1] > 500
    text = doc.read_text()
    assert text.startswith("# loramux benchmarks\n\nEarlier text stays.")
    assert text.count("<!-- loramux-bench:tiny-cpu-quick:start -->") == 1
    for link in re.findall(r"!\[[^]]*\]\(([^)]+)\)", text):
        assert (doc.parent / link).is_file(), link
    # Running again replaces the section instead of appending a second one.
    proc = subprocess.run(
        cmd + ["--modes", "offline", "--no-peft"], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert doc.read_text().count("<!-- loramux-bench:tiny-cpu-quick:start -->") == 1
