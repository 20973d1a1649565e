"""Issue 26: `slo`'s wait cap and margin, varied, on every check of the issue and several draws.

    python benchmarks/bench_slo_variants.py [--seeds 42,1,2] [--variants slo,cap-follows,...] [--jobs 2]

Not a test, and not a policy: an experiment. Each variant is patched onto `SloPolicy` inside the
worker for its own simulations only, then put back (nothing in `loramux/` changes):
- `slo`: as shipped;
- `cap-follows`: a request that went first because it passed the wait cap goes back behind the
  fresh work when the cap grows past its wait again (a burst arrives); as shipped, it stays first;
- `margin-1/12`: a fresh request counts as missed 0.5 s before the 6 s target instead of 1 s;
- `learned-margin`: that margin is the p90 of the last 64 admission -> first token times seen;
- `saturation-switch` (the issue's "LIFO only past saturation"): while FCFS's estimated wait
  (waiting / admissions per second, as the cap uses) is under 1.5x the target, a missed request
  goes first at once, as in FCFS; past it, the cap as shipped.
- `vtc-bound-B` (B in `VTC_BOUNDS`; the issue's "VTC as a bound on service difference rather than
  the order"): slo's order, except that a tenant whose VTC counter (input + 2 x output tokens, as
  `fair` charges; lifted to the least backlogged counter on becoming backlogged) is more than B
  tokens above the least counter among backlogged tenants waits behind every other tenant's work,
  least counter first, slo's order within the tenant. Its preempted requests wait too, as `fair`
  puts them back by their tenant's counter (exempting them, vLLM's resume order, leaves W4
  overload at 172 / 69 for B = 50, against 108 / 33). Only the request reserving an adapter slot
  is exempt.
- `fresh-watermark`: the KV watermark binds only admissions of requests that can no longer make
  the target (bench_slo_resume's `resume-late+fresh` without its resume order: a preempted
  request goes back first, as shipped).
For each seed, the workloads are drawn and simulated with that seed, fcfs / affinity / fair once,
and `bench_policy.report` counts the checks each variant holds (86: W1-W5 and the adapter wait
ratio). Prints the checks held per variant and seed, the failing ones on the first seed, and
attainment / p99 TTFT / adapter wait ratio at the W1 and W3 points where the variants differ,
and W4's service difference.
"""

from __future__ import annotations

import argparse
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace

import bench_policy as bp
from bench_slo_resume import W1, W3, _admitter_noting, _headroom_unless_fresh, _name, _patched

from loramux.bench.report import machine
from loramux.core import policies, scheduler
from loramux.sim.workloads import SUITES

SLO = policies.SloPolicy
SLO_AGE, SLO_MOVE, SLO_SCHEDULE = SLO._age, SLO._move, SLO.schedule
SLO_ADD, SLO_REMOVE, SLO_ADMITTED, SLO_PRIORITY = SLO.add, SLO.remove, SLO.on_admitted, SLO.priority
SATURATION = 1.5  # saturation-switch: FCFS's estimated wait, in targets, past which the cap applies
LEAD_WINDOW, LEAD_QUANTILE = 64, 0.9  # learned-margin
W4 = "vtc-fairness"


def _move_noting(self: policies.SloPolicy, req: policies.Request, band: int) -> None:
    """As shipped; and while aging, a move to FIRST is a promotion past the cap: remember it."""
    SLO_MOVE(self, req, band)
    if band == self.FIRST and self.__dict__.get("_aging"):
        self.__dict__.setdefault("_capped", deque()).append(req)


def _age_cap_follows(self: policies.SloPolicy, now: float) -> None:
    """As shipped, then what went first past the cap goes back to MISSED, youngest first, while
    its wait is under the cap now (promotions pop the oldest missed request, so the remembered
    ones are older than any missed one and stay in arrival order)."""
    self._aging = True  # type: ignore[attr-defined]
    try:
        SLO_AGE(self, now)
    finally:
        self._aging = False  # type: ignore[attr-defined]
    capped = self.__dict__.setdefault("_capped", deque())
    too_long = now - self.wait_cap(now)
    while capped and (not _waits_capped(self, capped[-1]) or capped[-1].arrival_time > too_long):
        req = capped.pop()
        if _waits_capped(self, req):
            SLO_MOVE(self, req, self.MISSED)
            self._missed.appendleft(req)


def _waits_capped(self: policies.SloPolicy, req: policies.Request) -> bool:
    """Still waiting first because of the cap: never admitted since (a preempted request is
    first for that reason, and stays)."""
    return self._band_of(req) == self.FIRST and req.first_scheduled_time is None


def _age_learned_margin(self: policies.SloPolicy, now: float) -> None:
    """As shipped, with the margin the lead times give once there are some."""
    lead = self.__dict__.get("_lead")
    if lead is not None:
        self.MARGIN = min(lead, self.ttft_slo_s / 2) / self.ttft_slo_s  # type: ignore[misc]
    SLO_AGE(self, now)


def _on_tokens_learning(self: policies.SloPolicy, reqs: list[policies.Request]) -> None:
    pending = self.__dict__.setdefault("_pending", [])
    for r in reqs:
        if r.num_output_tokens == 1 and r.num_preemptions == 0 and r.first_scheduled_time is not None:
            pending.append(r.first_scheduled_time)


def _schedule_learning(self: policies.SloPolicy, admit: object, view: object, now: float) -> None:
    """The first tokens of the last step came out by this step's start: their lead times end now."""
    pending = self.__dict__.setdefault("_pending", [])
    if pending:
        leads = self.__dict__.setdefault("_leads", deque(maxlen=LEAD_WINDOW))
        leads.extend(now - t for t in pending)
        pending.clear()
        ordered = sorted(leads)
        self._lead = ordered[min(len(ordered) - 1, int(LEAD_QUANTILE * len(ordered)))]  # type: ignore[attr-defined]
    SLO_SCHEDULE(self, admit, view, now)  # type: ignore[arg-type]


def _wait_cap_switch(self: policies.SloPolicy, now: float) -> float:
    window = self._admissions
    while window and window[0] < now - self.RATE_WINDOW_S:
        window.popleft()
    span = 0.0 if self._start is None else min(self.RATE_WINDOW_S, now - self._start)
    fcfs_wait = len(self) * span / len(window) if window and span > 0 else 0.0
    if fcfs_wait < SATURATION * self.ttft_slo_s:
        return 0.0
    return max(self.MIN_CAP * self.ttft_slo_s, self.wait_factor * fcfs_wait)


OVER = 3  # vtc-bound: the band after MISSED, for the tenants past the bound
VTC_BOUNDS = (4000, 1000, 250, 50)  # tokens
VTC_BOUND = 0.0  # the variant's bound, set in the worker by `_vtc_bound`


class _Vtc:
    """vtc-bound's bookkeeping on one SloPolicy: a shadow `FairPolicy` that sees every request
    come and go, so the counters, their lift and the least backlogged counter are fair's own; the
    least counter as of the step's start, and which tenants are past the bound."""

    def __init__(self) -> None:
        self.fair = policies.FairPolicy(starvation_timeout_s=0.0)
        self.least = 0.0
        self.over: set[str] = set()
        self.view: object = None

    def counter(self, tenant: str) -> float:
        return self.fair.counters.get(tenant, 0.0)

    def is_over(self, tenant: str) -> bool:
        return self.counter(tenant) > self.least + VTC_BOUND


def _vtc(self: policies.SloPolicy) -> _Vtc:
    v = self.__dict__.get("_vtc")
    if v is None:
        v = self.__dict__["_vtc"] = _Vtc()
    return v


def _group_key_tenant(self: policies.SloPolicy, req: policies.Request) -> object:
    band, bucket = self._band[req.arrival_seq]  # type: ignore[index]
    return (band, bucket, req.adapter_uid, req.tenant)


def _priority_bounded(self: policies.SloPolicy, key: object, head: policies.Request) -> policies.Priority:
    band, bucket, uid, tenant = key  # type: ignore[misc]
    prio = SLO_PRIORITY(self, (band, bucket, uid), head)
    v = _vtc(self)
    if (band == self.FIRST and head is getattr(v.view, "reservation", None)) or not v.is_over(tenant):
        return prio
    return (OVER, v.counter(tenant), *prio)  # within the tenant, slo's bands


def _add_counted(self: policies.SloPolicy, req: policies.Request, front: bool = False) -> None:
    _vtc(self).fair.add(req, front)  # lifted on becoming backlogged, as fair does
    SLO_ADD(self, req, front)


def _remove_counted(self: policies.SloPolicy, req: policies.Request) -> bool:
    removed = SLO_REMOVE(self, req)
    if removed:
        _vtc(self).fair.remove(req)
    return removed


def _admitted_charged(self: policies.SloPolicy, req: policies.Request) -> None:
    fair = _vtc(self).fair
    fair.groups.remove(fair.group_key(req), req)  # as fair's own admission takes it off its queue
    fair.on_admitted(req)
    SLO_ADMITTED(self, req)


def _tokens_charged(self: policies.SloPolicy, reqs: list[policies.Request]) -> None:
    _vtc(self).fair.on_output_tokens(reqs)


def _schedule_bounded(self: policies.SloPolicy, admit: object, view: object, now: float) -> None:
    """The least backlogged counter as of this step; the groups of a tenant that fell back under
    the bound are re-filed (a rise in priority surfaces by itself, a fall would not)."""
    v = _vtc(self)
    v.view = view
    least = v.fair._least_counter()
    v.least = 0.0 if least is None else least
    over = {t for t in v.fair._backlog if v.is_over(t)}
    back = v.over - over
    v.over = over
    if back:
        for key in list(self.groups.queues):
            if key[3] in back:  # type: ignore[index]
                self.groups.refile(key)
    SLO_SCHEDULE(self, admit, view, now)  # type: ignore[arg-type]


def _vtc_bound(bound: float) -> AbstractContextManager[None]:
    global VTC_BOUND
    VTC_BOUND = bound
    return _patched(
        SLO,
        group_key=_group_key_tenant,
        priority=_priority_bounded,
        add=_add_counted,
        remove=_remove_counted,
        on_admitted=_admitted_charged,
        on_output_tokens=_tokens_charged,
        schedule=_schedule_bounded,
    )


VARIANTS: dict[str, Callable[[], AbstractContextManager[None]]] = {
    "slo": nullcontext,
    "cap-follows": lambda: _patched(SLO, _age=_age_cap_follows, _move=_move_noting),
    "margin-1/12": lambda: _patched(SLO, MARGIN=1 / 12),
    "learned-margin": lambda: _patched(
        SLO, _age=_age_learned_margin, on_output_tokens=_on_tokens_learning, schedule=_schedule_learning
    ),
    "saturation-switch": lambda: _patched(SLO, wait_cap=_wait_cap_switch),
    **{f"vtc-bound-{b}": (lambda b=b: _vtc_bound(b)) for b in VTC_BOUNDS},
    "fresh-watermark": lambda: _patched(
        scheduler.Scheduler, _admitter=_admitter_noting, _headroom=_headroom_unless_fresh
    ),
}


def run(item: tuple[str, bp.Job]) -> tuple[str, bp.Result]:
    variant, job = item
    with VARIANTS[variant]():
        return variant, bp.run(job)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="42,1,2")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--jobs", type=int, default=2)
    a = p.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    variants = a.variants.split(",")
    every = [j for j in bp.jobs("slo", []) if j.wait_factor is None]
    todo = [("slo", replace(j, seed=sd)) for sd in seeds for j in every if j.policy != "slo"]
    todo += [(v, replace(j, seed=sd)) for v in variants for sd in seeds for j in every if j.policy == "slo"]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(a.jobs) as ex:
        done = list(ex.map(run, todo, chunksize=2))
    print(f"{len(todo)} simulations in {time.perf_counter() - t0:.0f} s; {machine()}\n")
    base = {sd: [r for _, r in done if r.job.policy != "slo" and r.job.seed == sd] for sd in seeds}
    mine = {
        (v, sd): [r for w, r in done if r.job.policy == "slo" and w == v and r.job.seed == sd]
        for v in variants
        for sd in seeds
    }
    held = {k: bp.report(base[k[1]] + rs, "slo")[1:] for k, rs in mine.items()}
    print("| variant | " + " | ".join(f"seed {s}" for s in seeds) + " | sum |")
    print("|---|" + "---|" * (len(seeds) + 1))
    for v in variants:
        counts = [held[(v, sd)][0] for sd in seeds]
        total = sum(n + len(held[(v, sd)][1]) for sd, n in zip(seeds, counts, strict=True))
        print(
            f"| {v} | "
            + " | ".join(f"{n} / {n + len(held[(v, s)][1])}" for s, n in zip(seeds, counts, strict=True))
            + f" | {sum(counts)} / {total} |"
        )
    print(f"\nfailing on seed {seeds[0]}:\n")
    for v in variants:
        print(f"- {v}: " + "; ".join(held[(v, seeds[0])][1]))
    shown = [(W1, 2.0, False), (W1, 2.5, False)]
    shown += [(W3, cv, ab) for cv in (2.0, 4.0, 6.0, 8.0) for ab in (False, True)]
    for sd in seeds:
        print(f"\nseed {sd}: attainment / p99 TTFT s (W1 rate 2 also: the adapter wait ratio)\n")
        cols = [*bp.BASELINES, *variants]
        print("| point | " + " | ".join(cols) + " |")
        print("|---|" + "---|" * len(cols))
        for suite, pt, ab in shown:
            cells = []
            for c in cols:
                rs = base[sd] if c in bp.BASELINES else mine[(c, sd)]
                r = next(
                    r
                    for r in rs
                    if r.job.policy == ("slo" if c in variants else c)
                    and (r.job.suite, r.job.point, r.job.abort) == (suite, pt, ab)
                )
                cell = f"{r.attainment:.3f} / {r.p99:.1f}"
                if (suite, pt, ab) == (W1, 2.0, False):
                    cell += f" / {r.adapter_wait_ratio:.2f}"
                cells.append(cell)
            print(f"| {_name(suite, pt, ab)} | " + " | ".join(cells) + " |")
        print(f"\nseed {sd}: W4 max / mean service difference, tokens/s\n")
        cols = ["fcfs", "fair", *variants]
        print("| scenario | " + " | ".join(cols) + " |")
        print("|---|" + "---|" * len(cols))
        for sc in SUITES[W4].points:
            cells = []
            for c in cols:
                rs = base[sd] if c in bp.BASELINES else mine[(c, sd)]
                pol = "slo" if c in variants else c
                r = next(r for r in rs if r.job.policy == pol and (r.job.suite, r.job.point) == (W4, sc))
                cells.append(f"{r.max_diff:.0f} / {r.avg_diff:.0f}, {r.tokens_per_s:.0f}")
            print(f"| {sc} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
