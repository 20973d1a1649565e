"""Issue 26's last W3 points and their price: resuming preempted requests after fresh work.

    python benchmarks/bench_slo_resume.py [--seeds 42,1,2] [--wait-factors 2.3,1.7]
                                          [--stalls 1,2,5,10,20,40] [--jobs 2]

Not a test, and not a policy: an experiment that shows where `fair`'s attainment at W3 cv >= 4
comes from and what it costs. `fair` puts a preempted request back by its tenant's counter, so a
request that already streamed (its first token is out, its TTFT counted) waits behind newcomers
while they get their first tokens; `slo`, like vLLM, puts it back first of all. Three variants of
`slo`, each patched onto `SloPolicy` (and the scheduler's headroom) inside the worker for its own
simulations only, then put back:
- `slo`: as shipped;
- `resume-late`: a preempted request that already has its first token waits in the missed band
  (by arrival, behind what can still make the target) and goes first once it passes the wait cap,
  as a missed request does;
- `resume-late+fresh`: that, and the KV watermark binds only admissions of requests that can no
  longer make the target (a fresh admission may take the last pages; what it preempts has streamed).
With a TPOT target beside the TTFT one (DistServe's SLO attainment; vLLM's `--goodput`), the
attainment check is counted again at each of TPOT_TARGETS_S: what a stalled stream costs there.
With --stalls, the curve from resuming first to waiting until the cap (first seed, first wait
factor, both resume-late variants): a preempted request that already streamed waits behind fresh
work for at most S seconds after its preemption, then goes first.
And the converse on `fair`: `fair-resume-first` puts a preempted request back first of all, as
`slo` and vLLM do, with VTC's order for everything else.
Each runs W1 (every rate) and W3 (every cv), with and without abort, on each seed, against
fcfs / affinity / fair on the same seed, and prints per seed the issue's W1/W3 checks held (54)
and those slo fails, by name, attainment at every point for fair, fair-resume-first and slo,
and, at the points where the variants differ, attainment, p99 TTFT, and what the issue's
metrics do not see: p99 time per output token (a preempted request's stall shows there), median
end-to-end latency and preemptions.
"""

from __future__ import annotations

import argparse
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import bench_policy as bp
import numpy as np

from loramux.bench.report import machine
from loramux.core import policies, scheduler
from loramux.sim import metrics as m

VARIANTS = ("slo", "resume-late", "resume-late+fresh")
W1, W3 = "slora-a10g-sweep", "slora-bursty-abort"
SHOWN = ((W1, 2.0, False), (W1, 2.5, False), (W3, 4.0, False), (W3, 8.0, False), (W3, 4.0, True))
TPOT_TARGETS_S = (0.1, 0.15, 0.25, 0.5)  # the A10G profile's decode: median TPOT 53-68 ms, p90 60-137


@dataclass(frozen=True)
class Job:
    seed: int
    policy: str  # a baseline or a variant
    suite: str
    point: float
    abort: bool
    wait_factor: float | None = None
    stall_s: float | None = None  # resume-late: at most this long behind fresh work (None: the cap)


@dataclass(frozen=True)
class Row:
    job: Job
    attainment: float
    throughput: float
    p99: float
    tpot_p99_ms: float
    e2e_p50: float
    preemptions: int
    joint: tuple[float, ...] = ()  # attainment with each of TPOT_TARGETS_S as well as the TTFT target


@contextmanager
def _patched(obj: object, **attrs: object) -> Iterator[None]:
    """Set `attrs` on `obj` (a class: an inherited one is shadowed), then put back what it had."""
    missing = object()
    old = {k: obj.__dict__.get(k, missing) for k in attrs}
    for k, v in attrs.items():
        setattr(obj, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is missing:
                delattr(obj, k)
            else:
                setattr(obj, k, v)


def _resume_late(self: policies.SloPolicy, req: policies.Request, front: bool = False) -> None:
    if not (front and req.num_output_tokens > 0):
        return SLO_ADD(self, req, front)
    self._band[req.arrival_seq] = (self.MISSED, 0)  # type: ignore[index]
    policies.Policy.add(self, req, front)
    missed = list(self._missed)  # keep the deque in arrival order: it ages from its front
    at = next((i for i, r in enumerate(missed) if r.arrival_time > req.arrival_time), len(missed))
    self._missed.insert(at, req)
    if STALL_S is not None:  # and first of all once it has waited STALL_S since its preemption
        self.__dict__.setdefault("_stalled", deque()).append((self._now + STALL_S, req))
    return None


def _age_stalled(self: policies.SloPolicy, now: float) -> None:
    stalled = self.__dict__.get("_stalled")
    while stalled and stalled[0][0] <= now:
        req = stalled.popleft()[1]
        if self._band_of(req) == self.MISSED:
            self._move(req, self.FIRST)
    SLO_AGE(self, now)


def _admitter_noting(self: scheduler.Scheduler, step: object) -> object:
    inner = ADMITTER(self, step)

    def admit(req: policies.Request) -> policies.AdmitResult:
        self._offered = req  # type: ignore[attr-defined]
        try:
            return inner(req)
        finally:
            self._offered = None  # type: ignore[attr-defined]

    return admit


def _headroom_unless_fresh(self: scheduler.Scheduler) -> int:
    req, pol = getattr(self, "_offered", None), self.policy
    if req is not None and isinstance(pol, policies.SloPolicy) and pol._band_of(req) == pol.FRESH:
        return 0
    return HEADROOM(self)


SLO_ADD, SLO_AGE = policies.SloPolicy.add, policies.SloPolicy._age
STALL_S: float | None = None  # the running job's stall bound (see Job.stall_s)
ADMITTER = scheduler.Scheduler._admitter
HEADROOM = scheduler.Scheduler._headroom
FAIR = policies.FairPolicy
FAIR_KEY, FAIR_PRIORITY, FAIR_ADD, FAIR_ADMITTED = FAIR.group_key, FAIR.priority, FAIR.add, FAIR.on_admitted


def _fair_key(self: policies.FairPolicy, req: policies.Request) -> object:
    if req.arrival_seq in self.__dict__.setdefault("_resumed", set()):
        return ("resumed", req.adapter_uid)  # a group of its own, ahead of every tenant's
    return FAIR_KEY(self, req)


def _fair_priority(self: policies.FairPolicy, key: object, head: policies.Request) -> tuple:
    if isinstance(key, tuple) and key[0] == "resumed":
        return (float("-inf"), head.arrival_seq)
    return FAIR_PRIORITY(self, key, head)


def _fair_add(self: policies.FairPolicy, req: policies.Request, front: bool = False) -> None:
    if not front:
        return FAIR_ADD(self, req, front)
    self.__dict__.setdefault("_resumed", set()).add(req.arrival_seq)
    self._backlog[req.tenant] += 1
    policies.Policy.add(self, req, front)
    return None


def _fair_admitted(self: policies.FairPolicy, req: policies.Request) -> None:
    self.__dict__.setdefault("_resumed", set()).discard(req.arrival_seq)
    FAIR_ADMITTED(self, req)


def _fair_least(self: policies.FairPolicy) -> float | None:
    """The least counter among backlogged tenants, not counting the resumed group."""
    low = [
        self.counters.get(q[0].tenant, 0.0)
        for key, q in self.groups.queues.items()
        if not (isinstance(key, tuple) and key[0] == "resumed")
    ]
    return min(low, default=None)


@contextmanager
def _variant(name: str) -> Iterator[None]:
    if name == "resume-late":
        with _patched(policies.SloPolicy, add=_resume_late, _age=_age_stalled):
            yield
    elif name == "resume-late+fresh":
        with (
            _patched(policies.SloPolicy, add=_resume_late, _age=_age_stalled),
            _patched(scheduler.Scheduler, _admitter=_admitter_noting, _headroom=_headroom_unless_fresh),
        ):
            yield
    elif name == "fair-resume-first":
        with _patched(
            FAIR,
            group_key=_fair_key,
            priority=_fair_priority,
            add=_fair_add,
            on_admitted=_fair_admitted,
            _least_counter=_fair_least,
        ):
            yield
    else:
        yield


def run(job: Job) -> Row:
    global STALL_S
    bp.SEED, STALL_S = job.seed, job.stall_s
    policy = job.policy if job.policy in bp.BASELINES else "fair" if job.policy.startswith("fair") else "slo"
    with _variant(job.policy):
        res = bp._simulate(bp.Job(job.suite, job.point, policy, job.abort, wait_factor=job.wait_factor))
    recs = res.records
    done = [r for r in recs if r.finish is not None and r.first_token is not None and not r.aborted]
    tpot = [(r.finish - r.first_token) / max(1, r.output_len - 1) for r in done]  # type: ignore[operator]
    e2e = [r.finish - r.arrival for r in done]  # type: ignore[operator]
    return Row(
        job,
        m.attainment(recs),
        m.throughput(recs),
        m.ttft_stats(recs).p99,
        1000 * float(np.percentile(tpot, 99)),
        float(np.percentile(e2e, 50)),
        res.preemptions,
        tuple(m.attainment(recs, tpot_slo=t) for t in TPOT_TARGETS_S),
    )


def checks(*args: Any, **kwargs: Any) -> int:
    """The issue's W1/W3 checks held, of 54: `failing`'s arguments, its list counted the other way."""
    return 3 * len(_points()) - len(failing(*args, **kwargs))


def failing(
    rows: dict[Job, Row],
    seed: int,
    variant: str,
    wait_factor: float | None,
    stall_s: float | None = None,
    target: int | None = None,
) -> list[str]:
    """The W1/W3 checks `variant` fails on `seed`, each named with its value against the bound
    ("W3 cv 8 p99 128.8 > 1.1 x 107.0"); with `target`, attainment on every side counts
    TPOT_TARGETS_S[target] besides the TTFT target."""
    out = []
    for suite, point, abort in _points():
        base = [_at(rows[Job(seed, p, suite, point, abort)], target) for p in bp.BASELINES]
        me = _at(rows[Job(seed, variant, suite, point, abort, wait_factor, stall_s)], target)
        at, tput, p99 = bp.latency_checks(base, me)
        name = _name(suite, point, abort)
        if not at:
            out.append(f"{name} attainment {me.attainment:.3f} < {max(r.attainment for r in base):.3f}")
        if not tput:
            out.append(
                f"{name} throughput {me.throughput:.3f} < 0.98 x {max(r.throughput for r in base):.3f}"
            )
        if not p99:
            out.append(f"{name} p99 {me.p99:.1f} > 1.1 x {min(r.p99 for r in base):.1f}")
    return out


_points = bp.latency_points  # the 18 W1/W3 points


def _at(r: Row, target: int | None) -> Row:
    """`r` with its attainment counted with TPOT_TARGETS_S[target] as well (None: as it is)."""
    return r if target is None else replace(r, attainment=r.joint[target])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="42,1,2")
    p.add_argument("--wait-factors", default="2.3,1.7", help="slo's --slo-wait-factor for the variants")
    p.add_argument("--stalls", default="1,2,5,10,20,40", help="stall bounds (s) for the curve, first seed")
    p.add_argument("--jobs", type=int, default=2)
    a = p.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    factors = [float(f) for f in a.wait_factors.split(",")]
    points = _points()
    jobs = [Job(sd, pol, s, pt, ab) for sd in seeds for s, pt, ab in points for pol in bp.BASELINES]
    jobs += [
        Job(sd, v, s, pt, ab, wf) for sd in seeds for v in VARIANTS for wf in factors for s, pt, ab in points
    ]
    jobs += [Job(sd, "fair-resume-first", s, pt, ab) for sd in seeds for s, pt, ab in points]
    stalls = [float(x) for x in a.stalls.split(",") if x]
    curve = [(v, st) for v in VARIANTS[1:] for st in stalls]
    jobs += [Job(seeds[0], v, s, pt, ab, factors[0], st) for v, st in curve for s, pt, ab in points]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(a.jobs) as ex:
        rows = {r.job: r for r in ex.map(run, jobs, chunksize=4)}
    print(f"{len(jobs)} simulations in {time.perf_counter() - t0:.0f} s; {machine()}\n")
    print("| variant | wait factor | " + " | ".join(f"seed {s}" for s in seeds) + " | sum |")
    print("|---|---|" + "---|" * (len(seeds) + 1))
    for v in VARIANTS:
        for wf in factors:
            held = [checks(rows, s, v, wf) for s in seeds]
            print(f"| {v} | {wf} | " + " | ".join(f"{h} / 54" for h in held) + f" | {sum(held)} |")
    tpot = f"TPOT <= {1000 * TPOT_TARGETS_S[0]:g} ms"
    print(f"\nThe W1/W3 checks slo fails, on TTFT alone and with {tpot} on every side\n")
    print(f"| wait factor | seed | TTFT only | {tpot} |")
    print("|---|---|---|---|")
    for wf in factors:
        for sd in seeds:
            cells = ["; ".join(failing(rows, sd, "slo", wf, target=t)) or "none" for t in (None, 0)]
            print(f"| {wf} | {sd} | " + " | ".join(cells) + " |")
    _tpot_tables(rows, seeds, points, factors[0])
    print(f"\nattainment at every W1/W3 point: fair / fair-resume-first / slo {factors[0]}\n")
    print("| point | " + " | ".join(f"seed {sd}" for sd in seeds) + " |")
    print("|---|" + "---|" * len(seeds))
    for suite, pt, ab in points:
        cells = []
        for sd in seeds:
            fair, first, slo = (
                rows[Job(sd, p, suite, pt, ab, wf)]
                for p, wf in (("fair", None), ("fair-resume-first", None), ("slo", factors[0]))
            )
            cells.append(f"{fair.attainment:.3f} / {first.attainment:.3f} / {slo.attainment:.3f}")
        print(f"| {_name(suite, pt, ab)} | " + " | ".join(cells) + " |")
    for sd in seeds:
        print(f"\nseed {sd}: attainment / p99 TTFT s / p99 TPOT ms / median e2e s / preemptions\n")
        cols = [(p, None) for p in ("fcfs", "fair", "fair-resume-first")]
        cols += [(v, wf) for v in VARIANTS for wf in factors]
        _head("point", [_label(p, wf) for p, wf in cols])
        for s, pt, ab in SHOWN:
            cells = []
            for pol, wf in cols:
                r = rows[Job(sd, pol, s, pt, ab, wf)]
                cells.append(
                    f"{r.attainment:.3f} / {r.p99:.1f} / {r.tpot_p99_ms:.0f} / {r.e2e_p50:.1f}"
                    f" / {r.preemptions}"
                )
            print(f"| {_name(s, pt, ab)} | " + " | ".join(cells) + " |")

    sd, wf = seeds[0], factors[0]
    print(f"\nThe stall bound's curve (seed {sd}, wait factor {wf}): W1/W3 checks held, then")
    print("attainment / p99 TTFT s / p99 TPOT ms at each point; 0 is slo as shipped, 'cap' waits")
    print("until the wait cap\n")
    print("| variant | stall s | checks | " + " | ".join(_name(s, pt, ab) for s, pt, ab in SHOWN) + " |")
    print("|---|---|---|" + "---|" * len(SHOWN))
    lines = (
        [("slo", None, "0")]
        + [(v, st, f"{st:g}") for v, st in curve]
        + [(v, None, "cap") for v in VARIANTS[1:]]
    )
    for v, st, label in lines:
        cells = []
        for s, pt, ab in SHOWN:
            r = rows[Job(sd, v, s, pt, ab, wf, st)]
            cells.append(f"{r.attainment:.3f} / {r.p99:.1f} / {r.tpot_p99_ms:.0f}")
        print(f"| {v} | {label} | {checks(rows, sd, v, wf, st)} / 54 | " + " | ".join(cells) + " |")


def attainment_held(
    rows: dict[Job, Row], seed: int, policy: str, wait_factor: float | None, target: int | None
) -> int:
    """The W1/W3 points (of 18) where `policy` has at least the best baseline's attainment, every
    side counted with TPOT_TARGETS_S[target] besides the TTFT target (None: TTFT alone, the issue's
    check)."""
    held = 0
    for suite, point, abort in _points():
        best = max(_at(rows[Job(seed, p, suite, point, abort)], target).attainment for p in bp.BASELINES)
        held += _at(rows[Job(seed, policy, suite, point, abort, wait_factor)], target).attainment >= best
    return held


def _tpot_tables(rows: dict[Job, Row], seeds: list[int], points: list, wf: float) -> None:
    """The attainment check again with a TPOT target beside the TTFT one (a request counts when its
    first token is on time and its stream then keeps TPOT at or under the target), then the
    attainment at each target, point by point, on the first seed."""
    targets: list[int | None] = [None, *range(len(TPOT_TARGETS_S))]
    heads = ["TTFT only"] + [f"TPOT <= {1000 * t:g} ms" for t in TPOT_TARGETS_S]
    cols = [(p, None) for p in ("fcfs", "fair", "fair-resume-first")] + [(v, wf) for v in VARIANTS]
    print("\nW1/W3 points (of 18) with attainment >= the best of fcfs / affinity / fair, all counted")
    print("with the same TPOT target; then the issue's W1/W3 checks held (of 54) with that attainment\n")
    print("| policy | seed | " + " | ".join(heads) + " |")
    print("|---|---|" + "---|" * len(heads))
    for pol, f in cols:
        for sd in seeds:
            cells = [
                f"{attainment_held(rows, sd, pol, f, t)}; {checks(rows, sd, pol, f, None, t)}"
                for t in targets
            ]
            print(f"| {_label(pol, f)} | {sd} | " + " | ".join(cells) + " |")
    sd = seeds[0]
    print(f"\nseed {sd}: attainment with no TPOT target / " + " / ".join(heads[1:]) + "\n")
    _head("point", [_label(p, f) for p, f in cols])
    for suite, pt, ab in points:
        cells = []
        for pol, f in cols:
            r = rows[Job(sd, pol, suite, pt, ab, f)]
            cells.append(" / ".join(f"{x:.3f}" for x in (r.attainment, *r.joint)))
        print(f"| {_name(suite, pt, ab)} | " + " | ".join(cells) + " |")


def _label(policy: str, wait_factor: float | None) -> str:
    return policy if wait_factor is None else f"{policy} {wait_factor}"


def _head(first: str, names: list[str]) -> None:
    """A Markdown table's header row and rule."""
    print(f"| {first} | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))


_name = bp.point_name  # "W3 cv 4 abort"


if __name__ == "__main__":
    main()
