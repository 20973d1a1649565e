"""Issue 26: why W4's fairness point and W1's tail point cannot both hold, in a fluid model.

    python benchmarks/bench_fair_share_bound.py [--seeds 42,1,2] [--rates 2,2.5] [--dt 0.05]

Not a test and not a policy: a bound. W4 asks for `fair`'s service difference between backlogged
tenants (within 1.1x); W1 asks for a p99 TTFT within 1.1x of the lowest, fcfs's. On W1 each
adapter is its own tenant (the bench's `tenant_per_adapter`), and an order that does not read
workload labels treats those tenants as W4's clients. The fluid model here serves a workload's
requests at a constant capacity C, in VTC's units (input + 2 x output tokens per second; C is what
fcfs served in the simulator on the same draw from 30 s to the last arrival), two ways:
- FIFO: one queue, arrival order (fcfs's order without batching effects);
- GPS (generalised processor sharing): the capacity is split equally among the backlogged
  tenants, a tenant that needs less than its share taking only what it needs (water-filling),
  each tenant's requests in arrival order. Service difference between backlogged tenants is zero:
  what W4's check asks for, in the limit. An order whose counters stay within B tokens of each
  other (VTC, or slo with a VTC bound) serves every tenant within B tokens of GPS's service.
A request waits from its arrival until its first token of service. The script prints, per rate and
seed, the p99 wait of each, and the simulator's p99 wait (first admission - arrival) and p99 TTFT
for fcfs, fair and slo on the same draw. If GPS's p99 is well past 1.1x FIFO's, no order that
bounds the service difference among W1's adapters can keep W1's tail within 1.1x fcfs's.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor

import bench_policy as bp
import numpy as np

from loramux.bench.report import machine
from loramux.sim import metrics as m
from loramux.sim.workloads import SUITES, SimRequest

W1 = "slora-a10g-sweep"
WARMUP_S = 30.0  # as the fairness metric's
POLICIES = ("fcfs", "fair", "slo")


def waterfill(backlog: np.ndarray, capacity: float) -> np.ndarray:
    """Split `capacity` equally among the entries with backlog, none taking more than its own."""
    alloc = np.zeros_like(backlog)
    order = np.argsort(backlog)
    left, n = capacity, int(np.count_nonzero(backlog))
    for i in order[len(order) - n :]:
        share = left / n
        alloc[i] = min(backlog[i], share)
        left -= alloc[i]
        n -= 1
    return alloc


def fluid_waits(reqs: list[SimRequest], capacity: float, per_tenant: bool, dt: float) -> np.ndarray:
    """Each request's wait, arrival to first service, when `capacity` (units/s) is served as GPS
    over tenants (`per_tenant`) or as one FIFO queue; time advances in steps of `dt`."""
    key = (lambda r: r.tenant) if per_tenant else (lambda r: "")
    queues: dict[str, list[SimRequest]] = defaultdict(list)
    for r in sorted(reqs, key=lambda r: (r.arrival, r.index)):
        queues[key(r)].append(r)
    names = list(queues)
    k = len(names)
    # the work before each request: VTC's service, as the fairness metric counts it
    prefix = [np.cumsum([0.0] + [m.service(r) for r in queues[t]]) for t in names]  # type: ignore[arg-type]
    arrived = np.zeros(k, int)  # requests of each queue that have arrived
    started = np.zeros(k, int)  # requests of each queue whose service began
    served = np.zeros(k)  # service each queue has had
    waits: dict[int, float] = {}
    t, total = 0.0, len(reqs)
    while len(waits) < total:
        t += dt
        for i, name in enumerate(names):
            q = queues[name]
            while arrived[i] < len(q) and q[arrived[i]].arrival <= t:
                arrived[i] += 1
        backlog = np.array([prefix[i][arrived[i]] - served[i] for i in range(k)])
        served += waterfill(np.maximum(backlog, 0.0), capacity * dt)
        for i, name in enumerate(names):
            q = queues[name]
            # a request starts once its queue's service passes the work before it
            while started[i] < arrived[i] and served[i] > prefix[i][started[i]] - 1e-9:
                r = q[started[i]]
                waits[r.index] = max(t - r.arrival, 0.0)
                started[i] += 1
    return np.array([waits[r.index] for r in reqs])


def capacity(recs: list[m.Record], lo: float, hi: float) -> float:
    """What the engine served in [lo, hi], in VTC's units per second: after the warm-up and until
    the last arrival, while the queue is long the engine runs full."""
    return sum(m.service_in(r, lo, hi) for r in recs) / (hi - lo)


def sim_row(job: bp.Job) -> tuple[bp.Job, float, float, float]:
    """The simulator's p99 wait (first admission - arrival), p99 TTFT and capacity."""
    recs = bp._records(job)
    end = SUITES[job.suite].workload(job.point, job.seed).duration
    waits = [r.first_scheduled - r.arrival for r in recs if r.first_scheduled is not None]
    return job, float(np.percentile(waits, 99)), m.ttft_stats(recs).p99, capacity(recs, WARMUP_S, end)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="42,1,2")
    p.add_argument("--rates", default="2,2.5")
    p.add_argument("--dt", type=float, default=0.05)
    p.add_argument("--jobs", type=int, default=2)
    a = p.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    rates = [float(x) for x in a.rates.split(",")]
    todo = [bp.Job(W1, r, pol, seed=sd) for r in rates for sd in seeds for pol in POLICIES]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(a.jobs) as ex:
        sims = {(j.point, j.seed, j.policy): row for j, *row in ex.map(sim_row, todo)}
    rows = []
    for rate in rates:
        for sd in seeds:
            reqs = SUITES[W1].workload(rate, sd).requests
            c = sims[(rate, sd, "fcfs")][2]
            fifo = float(np.percentile(fluid_waits(reqs, c, False, a.dt), 99))
            gps = float(np.percentile(fluid_waits(reqs, c, True, a.dt), 99))
            ratio = gps / max(fifo, 1e-9)
            cells = [f"{rate:g}", str(sd), f"{c:.0f}", f"{fifo:.1f}", f"{gps:.1f}", f"{ratio:.2f}"]
            cells += [f"{sims[(rate, sd, pol)][0]:.1f} / {sims[(rate, sd, pol)][1]:.1f}" for pol in POLICIES]
            rows.append("| " + " | ".join(cells) + " |")
    print(f"{len(todo)} simulations and the fluid model in {time.perf_counter() - t0:.0f} s; {machine()}\n")
    print("p99 wait s (simulator: wait / TTFT); C in input + 2 x output tokens per second\n")
    print("| rate | seed | C | fluid FIFO | fluid GPS | GPS / FIFO | fcfs | fair | slo |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
