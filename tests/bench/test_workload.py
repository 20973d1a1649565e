"""The workload generator reproduces S-LoRA's seed-42 reference traces (papers.md section 2.1)."""

import pytest

from loramux.workload import WorkloadConfig, generate_requests, summarize

# (n, alpha, rate, cv, T) -> N, distinct adapters, top-1 share, top-10 share, mean in, mean out, last arrival
REFERENCE = [
    ((200, 1.0, 2, 1, 300), 600, 187, 0.013, 0.115, 255.7, 259.1, 301.0),
    ((200, 0.1, 2, 1, 300), 600, 107, 0.570, 0.737, 255.7, 259.1, 301.0),
    ((200, 0.3, 2, 1, 300), 600, 163, 0.225, 0.415, None, None, None),
    ((200, 0.6, 2, 1, 300), 600, 188, 0.048, 0.203, None, None, None),
    ((200, 1.0, 2, 8, 300), 600, 187, 0.013, None, None, None, 432.5),
    ((2000, 1.0, 10, 1, 120), 1200, 907, 0.004, 0.031, 262.3, 263.2, 125.0),
    ((400, 1.0, 6, 1, 300), 1800, 396, 0.007, 0.057, 259.4, 260.7, 293.7),
]


@pytest.mark.parametrize("cfg, n, distinct, top1, top10, mean_in, mean_out, last", REFERENCE)
def test_seed_42_reference_values(cfg, n, distinct, top1, top10, mean_in, mean_out, last):
    adapters, alpha, rate, cv, duration = cfg
    s = summarize(generate_requests(WorkloadConfig(adapters, alpha, rate, cv, duration)))
    assert (s.num_requests, s.distinct_adapters) == (n, distinct)
    assert round(s.top1_share, 3) == top1
    for got, want, digits in (
        (s.top10_share, top10, 3),
        (s.mean_input, mean_in, 1),
        (s.mean_output, mean_out, 1),
        (s.last_arrival, last, 1),
    ):
        if want is not None:
            assert round(got, digits) == want


def test_first_three_requests_of_the_reference_trace():
    reqs = generate_requests(WorkloadConfig(200, 1.0, 2, 1, 300))
    got = [(r.adapter, r.input_len, r.output_len, round(r.arrival, 3)) for r in reqs[:3]]
    assert got == [(74, 12, 410, 0.160), (190, 473, 43, 3.086), (146, 99, 292, 3.363)]
    skewed = generate_requests(WorkloadConfig(200, 0.1, 2, 1, 300))
    assert [r.adapter for r in skewed[:3]] == [0, 120, 8]


def test_bursty_trace_starts_at_about_zero():
    reqs = generate_requests(WorkloadConfig(200, 1.0, 2, 8, 300))
    assert all(r.arrival < 0.01 for r in reqs[:3])


def test_bad_workloads_name_the_value():
    with pytest.raises(ValueError, match="input_range"):
        WorkloadConfig(5, input_range=(10, 10))
    with pytest.raises(ValueError, match="num_adapters=0"):
        WorkloadConfig(0)
