"""Waiting-queue policies: the order in which waiting requests are offered for admission (S2.4, S2.5).

Boundary: a policy owns the waiting requests and their order, nothing else.
The scheduler hands it an `admit(request)` callback that does every resource
check (seats, tokens, KV pages, adapter slot) and answers ADMITTED, SKIP
(this request's adapter takes no new work this step: it is draining for a
reservation), NEEDS_SLOT (its adapter is not on the device and no slot can
be had) or STOP (nothing more fits this step).

Waiting requests sit in groups (one FIFO per adapter, or per tenant and
adapter for `fair`); one lazily updated heap orders the groups by their
head's priority, and an index finds the groups of the resident adapters. A
step offers requests one at a time, best priority first, so requests are
admitted in the policy's order: while a slot can be had, over every group;
once the adapter cap binds, over the groups that need no slot (the resident
adapters and the base model), still in order. Groups that would need a slot
are skipped, never walked, so a step costs O(admissions + resident adapters)
heap operations, whatever the number of idle adapters or tenants.

Anti-starvation is work-conserving. When the group the policy would serve
first among those needing a slot is *due* (its head has waited
`starvation_timeout_s`; for `fair`, at once), the scheduler reserves the next
slot that frees for its adapter: it picks the fewest resident adapters that
free soonest and stops admitting new work for those alone, while every other
resident adapter and the base model keep admitting. The reserved group is
offered first in every step until it is admitted; no other adapter is loaded
meanwhile. That bounds the wait the cap adds to the timeout plus the time
the drained adapters' running requests take, one reservation at a time.

Policies (select by name):
- "fcfs": arrival order. Same-adapter work is coalesced only where the cap
  binds: a request whose adapter cannot get a slot is passed over, and
  later requests of resident adapters go ahead of it (S1.3).
- "affinity": resident adapters (and the base model) first, in arrival
  order; then a new adapter whenever a slot can be had, oldest first (S3.4).
- "completion": fcfs with a zero timeout: an adapter that needs a slot
  reserves the next one at once, so the drained group completes before the
  switch (batch completion).
- "fair": Virtual Token Counter across tenants (VTC, papers.md 2.2): the
  tenant with the least service (input + 2 x output tokens) goes first; a
  tenant that becomes backlogged is lifted to the least counter among the
  backlogged; the least-served tenant that needs a slot reserves one at once.
- "priority": vLLM's priority scheduling: each request's `priority` (smaller
  first), then arrival; groups per (priority, adapter); preemption takes the
  largest priority first, then the most recently admitted.
- "slo": TTFT deadlines with slack. A request that can still make the TTFT
  target goes first, earliest deadline first, a shorter one (prompt +
  max_tokens) counted as due sooner; one that cannot waits behind them, but
  never longer than `slo_wait_factor` x the wait FCFS would give it now
  (the queue over the recent admission rate): then it goes first of all, in
  arrival order, as preempted requests do. Early abort drops what cannot
  make it before it takes a seat (docs/design.md, "The slo policy"). Its
  admissions leave `KV_WATERMARK` of the KV pages free while requests run,
  so the running ones grow without preemption (the scheduler applies it).
"""

from __future__ import annotations

import enum
import heapq
import itertools
from collections import Counter, deque
from collections.abc import Callable, Hashable, Iterable, Iterator
from contextlib import closing
from operator import attrgetter
from typing import Any, Protocol

from loramux.config import SchedulerConfig
from loramux.core.request import Request


class AdmitResult(enum.Enum):
    ADMITTED = 0
    SKIP = 1  # the adapter takes no new work this step (it drains for a reservation)
    NEEDS_SLOT = 2  # the adapter is not on the device and no slot can be had for it now
    STOP = 3  # nothing more fits this step


Admit = Callable[[Request], AdmitResult]
_tenant = attrgetter("tenant")
Priority = tuple[Any, ...]


class SchedulerView(Protocol):
    """What a policy may see of, and ask of, the scheduler."""

    def resident_uids(self) -> list[int]: ...

    def can_take_slot(self) -> bool:
        """Whether an adapter that is not on the device could be loaded now."""
        ...

    @property
    def reservation(self) -> Request | None:
        """The waiting request whose adapter gets the next slot that frees, if any."""
        ...

    def reserve(self, req: Request) -> None: ...


class _Groups:
    """FIFO queues keyed by group, an index of groups by adapter, and a lazy heap over groups.

    Every non-empty group has exactly one live heap entry, made when its head
    changes; older entries are dropped as they surface. Priorities that rise
    without a head change (fair's counters only grow) are re-filed when they
    surface, so the heap's order is always the true order.
    """

    def __init__(self, priority: Callable[[Hashable, Request], Priority]) -> None:
        self.priority = priority
        self.queues: dict[Hashable, deque[Request]] = {}
        self.by_adapter: dict[int | None, set[Hashable]] = {}
        self._uid: dict[Hashable, int | None] = {}
        self._heap: list[tuple[Priority, int, Hashable]] = []
        self._live: dict[Hashable, int] = {}  # group -> tiebreak of its live heap entry
        self._seq = itertools.count()
        self.size = 0

    def push(self, key: Hashable, req: Request, front: bool) -> None:
        q = self.queues.get(key)
        if q is None:
            q = self.queues[key] = deque()
            self._uid[key] = req.adapter_uid
            self.by_adapter.setdefault(req.adapter_uid, set()).add(key)
        if front:
            # Preempted requests go back in arrival order among the front.
            i = 0
            while i < len(q) and q[i].arrival_seq < req.arrival_seq:
                i += 1
            q.insert(i, req)
        else:
            q.append(req)
        self.size += 1
        if q[0] is req:
            self.refile(key)

    def refile(self, key: Hashable) -> None:
        """Give `key` a fresh heap entry at its head's current priority."""
        n = next(self._seq)
        self._live[key] = n
        heapq.heappush(self._heap, (self.priority(key, self.queues[key][0]), n, key))
        if len(self._heap) > 4 * len(self.queues) + 64:  # too many dead entries: rebuild
            self._heap[:] = [e for e in self._heap if self._live.get(e[2]) == e[1]]  # in place: a walk
            heapq.heapify(self._heap)  # may hold it

    def _drop(self, key: Hashable) -> None:
        del self.queues[key]
        del self._live[key]
        uid = self._uid.pop(key)
        keys = self.by_adapter[uid]
        keys.discard(key)
        if not keys:
            del self.by_adapter[uid]

    def pop_head(self, key: Hashable) -> Request:
        q = self.queues[key]
        req = q.popleft()
        self.size -= 1
        if q:
            self.refile(key)
        else:
            self._drop(key)
        return req

    def remove(self, key: Hashable, req: Request) -> bool:
        q = self.queues.get(key)
        if q is None or req not in q:
            return False
        was_head = q[0] is req
        q.remove(req)
        self.size -= 1
        if not q:
            self._drop(key)
        elif was_head:
            self.refile(key)
        return True

    def head(self, key: Hashable) -> Request | None:
        q = self.queues.get(key)
        return q[0] if q else None

    def walk(self) -> Iterator[Hashable]:
        """Every group, best head first. A group whose head the caller admits comes again at its
        new place; one it leaves alone does not. Close the iterator (or exhaust it) when done."""
        heap, live, held = self._heap, self._live, []
        try:
            while heap:
                prio, n, key = heapq.heappop(heap)
                if live.get(key) != n:
                    continue  # dead: the group's head changed or the group emptied
                if self.priority(key, self.queues[key][0]) != prio:
                    self.refile(key)  # its priority rose since it was filed
                    continue
                held.append((prio, n, key))
                yield key
        finally:
            for entry in held:
                if live.get(entry[2]) == entry[1]:
                    heapq.heappush(heap, entry)

    def walk_subset(self, keys: Iterable[Hashable]) -> Iterator[Hashable]:
        """Like `walk`, over the given groups only, with a heap of their own."""
        order = itertools.count()
        heap = [(self.priority(k, q[0]), next(order), k) for k in keys if (q := self.queues.get(k))]
        heapq.heapify(heap)
        while heap:
            prio, _, key = heapq.heappop(heap)
            q = self.queues.get(key)
            if not q:
                continue
            head = q[0]
            now = self.priority(key, head)
            if now != prio:
                heapq.heappush(heap, (now, next(order), key))
                continue
            yield key
            q = self.queues.get(key)
            if q and q[0] is not head:  # admitted: its next request takes its own place
                heapq.heappush(heap, (self.priority(key, q[0]), next(order), key))


class Policy:
    """A waiting queue with an admission order, given by `priority` (smaller first)."""

    name = ""
    by_age = True  # priority is the head's arrival, so the first group not yet due ends the search
    KV_WATERMARK = 0.0  # of the KV pages, left free by admissions while requests run (None in config)
    # The order running requests are scheduled in each step (decodes, then prefills; None: as
    # admitted). Preemption takes from those not yet scheduled, so the last go first.
    running_order: Callable[[Request], Any] | None = None

    def __init__(self, starvation_timeout_s: float) -> None:
        self.starvation_timeout_s = starvation_timeout_s
        self.groups = _Groups(self.priority)

    @classmethod
    def from_config(cls, config: SchedulerConfig) -> Policy:
        return cls(config.starvation_timeout_s)

    def group_key(self, req: Request) -> Hashable:
        return req.adapter_uid

    def priority(self, key: Hashable, head: Request) -> Priority:
        return (head.arrival_seq,)

    def _due(self, head: Request, now: float) -> bool:
        """Whether `head`, blocked by the adapter cap, may reserve the next slot."""
        return now - head.arrival_time >= self.starvation_timeout_s

    def __len__(self) -> int:
        return self.groups.size

    def add(self, req: Request, front: bool = False) -> None:
        self.groups.push(self.group_key(req), req, front)

    def remove(self, req: Request) -> bool:
        return self.groups.remove(self.group_key(req), req)

    def __iter__(self) -> Iterator[Request]:
        for q in self.groups.queues.values():
            yield from q

    def heads(self) -> Iterator[Request]:
        """The first request of every group (what could be admitted next from each)."""
        for q in self.groups.queues.values():
            yield q[0]

    def upcoming(self, limit: int) -> Iterator[Request]:
        """The head of up to `limit` groups in policy order (what will want a slot next)."""
        with closing(self.groups.walk()) as keys:
            for key in itertools.islice(keys, limit):
                yield self.groups.queues[key][0]

    def on_admitted(self, req: Request) -> None:
        """A request left the queue for the running batch."""

    def preempt_rank(self, req: Request, admitted: int) -> tuple[int, ...]:
        """Running requests are preempted largest rank first; `admitted` is the request's place
        in admission order, so by default the most recently admitted goes first."""
        return (admitted,)

    def on_output_tokens(self, reqs: list[Request]) -> None:
        """Each of `reqs` produced one token this step."""

    # --- one step ---
    def schedule(self, admit: Admit, view: SchedulerView, now: float) -> None:
        """Offer waiting requests to `admit`: the reserved group, and whatever precedes it in
        policy order, first; then the policy's own phases."""
        reserved = view.reservation
        if reserved is None:
            reserved = self._reservation_candidate(view, now)
            if reserved is not None:
                view.reserve(reserved)
        if reserved is not None and self._offer_through(self.group_key(reserved), admit, view):
            return
        self._schedule_rest(admit, view)

    def _offer_through(self, target: Hashable, admit: Admit, view: SchedulerView) -> bool:
        """Offer groups in policy order up to and including `target`, so that the reserved group
        is served before anything it precedes and after anything that precedes it. True on STOP."""
        if self.groups.head(target) is None:
            return False
        limit = len(view.resident_uids()) + 64  # what can precede it: resident and base groups
        with closing(self.groups.walk()) as keys:
            for key in itertools.islice(keys, limit):
                if self._offer(key, admit) is AdmitResult.STOP:
                    return True
                if key == target:
                    return False
        return self.groups.head(target) is not None and self._offer(target, admit) is AdmitResult.STOP

    def _schedule_rest(self, admit: Admit, view: SchedulerView) -> None:
        if self._walk(self.groups.walk(), admit, view, needs_slot=True) is AdmitResult.STOP:
            return
        self._walk(self._resident(view), admit, view, needs_slot=False)

    def _reservation_candidate(self, view: SchedulerView, now: float) -> Request | None:
        """The first group in policy order whose adapter is not on the device, if it is due."""
        resident = set(view.resident_uids())
        limit = len(resident) + 64  # groups passed over: resident adapters and base-model groups
        with closing(self.groups.walk()) as keys:
            for key in itertools.islice(keys, limit):
                head = self.groups.queues[key][0]
                due = self._due(head, now)
                if not due and self.by_age:
                    return None  # every later group is younger still
                if head.adapter_uid is not None and head.adapter_uid not in resident:
                    return head if due else None
        return None

    def _resident(self, view: SchedulerView) -> Iterator[Hashable]:
        """The groups that need no slot (resident adapters and the base model), best head first."""
        by_adapter = self.groups.by_adapter
        keys = [k for uid in (None, *view.resident_uids()) for k in by_adapter.get(uid, ())]
        return self.groups.walk_subset(keys)

    def _offer(self, key: Hashable, admit: Admit) -> AdmitResult:
        """Offer the group's head; take it off the queue if admitted."""
        head = self.groups.queues[key][0]
        result = admit(head)
        if result is AdmitResult.ADMITTED:
            self.groups.pop_head(key)
            self.on_admitted(head)
        return result

    def _walk(
        self, keys: Iterator[Hashable], admit: Admit, view: SchedulerView, needs_slot: bool
    ) -> AdmitResult:
        """Offer heads in the order `keys` gives until STOP. With `needs_slot` the walk covers
        every group and ends once no slot can be had: the rest is for a walk over resident groups."""
        with closing(keys) as it:  # type: ignore[type-var]
            for key in it:
                if needs_slot and not view.can_take_slot():
                    break
                if self._offer(key, admit) is AdmitResult.STOP:
                    return AdmitResult.STOP
        return AdmitResult.ADMITTED


class FCFSPolicy(Policy):
    """Arrival order; work for resident adapters goes ahead only of work the cap holds back."""

    name = "fcfs"


class CompletionPolicy(FCFSPolicy):
    """FCFS where a needed switch reserves the next slot at once: the drained group completes first."""

    name = "completion"

    def __init__(self, starvation_timeout_s: float) -> None:
        super().__init__(0.0)


class AffinityPolicy(Policy):
    """Resident adapters (and the base model) first, then a new adapter while a slot can be had."""

    name = "affinity"

    def _schedule_rest(self, admit: Admit, view: SchedulerView) -> None:
        if self._walk(self._resident(view), admit, view, needs_slot=False) is AdmitResult.STOP:
            return
        if self._walk(self.groups.walk(), admit, view, needs_slot=True) is AdmitResult.STOP:
            return
        self._walk(self._resident(view), admit, view, needs_slot=False)  # the adapters just loaded


class FairPolicy(Policy):
    """Virtual Token Counter (VTC) across tenants: least service first, with the counter lift."""

    name = "fair"
    by_age = False
    INPUT_WEIGHT = 1.0
    OUTPUT_WEIGHT = 2.0

    def __init__(self, starvation_timeout_s: float) -> None:
        self.counters: dict[str, float] = {}
        self._backlog: Counter[str] = Counter()  # waiting requests per tenant
        super().__init__(starvation_timeout_s)

    def group_key(self, req: Request) -> Hashable:
        return (req.tenant, req.adapter_uid)

    def priority(self, key: Hashable, head: Request) -> Priority:
        return (self.counters.get(head.tenant, 0.0), head.arrival_seq)

    def _due(self, head: Request, now: float) -> bool:
        return True  # the least-served tenant is next by definition: it never waits on aging

    def add(self, req: Request, front: bool = False) -> None:
        tenant = req.tenant
        if not self._backlog[tenant] and not front:
            # Becoming backlogged: lifted to the least backlogged counter, so idle time banks no credit.
            low = self._least_counter()
            own = self.counters.get(tenant, 0.0)
            self.counters[tenant] = own if low is None else max(own, low)
        self._backlog[tenant] += 1
        super().add(req, front)

    def remove(self, req: Request) -> bool:
        removed = super().remove(req)
        if removed:
            self._left(req)
        return removed

    def _left(self, req: Request) -> None:
        self._backlog[req.tenant] -= 1
        if not self._backlog[req.tenant]:
            del self._backlog[req.tenant]

    def _least_counter(self) -> float | None:
        """The smallest counter among backlogged tenants: the top of the group heap."""
        with closing(self.groups.walk()) as keys:
            for key in keys:
                return self.counters.get(self.groups.queues[key][0].tenant, 0.0)
        return None

    def on_admitted(self, req: Request) -> None:
        self._left(req)
        if req.num_preemptions == 0:  # input is charged once, not again after a preemption
            self.counters[req.tenant] = (
                self.counters.get(req.tenant, 0.0) + self.INPUT_WEIGHT * req.num_prompt_tokens
            )

    def on_output_tokens(self, reqs: list[Request]) -> None:
        counters, w = self.counters, self.OUTPUT_WEIGHT
        for tenant, n in Counter(map(_tenant, reqs)).items():
            counters[tenant] = counters.get(tenant, 0.0) + w * n


class SloPolicy(Policy):
    """TTFT deadlines with slack (S2.4, S2.5): what can still make the target first, earliest
    deadline first; what cannot, behind it, until it has waited `wait_factor` x FCFS's wait.

    Every waiting request is in one of three bands, and the heap orders the bands, then:
    - FIRST: preempted requests and those past the wait cap, in arrival order;
    - FRESH: younger than the target less a margin for the prefill, by deadline (arrival + a
      credit for size: `SIZE_CREDIT` x the target per 1000 tokens of prompt + max_tokens, taken
      in buckets of `SIZE_BUCKET` tokens so that each group stays in arrival order);
    - MISSED: the rest, in arrival order.
    Requests move FRESH -> MISSED -> FIRST as they age (two arrival-ordered deques, O(1) per move).
    The cap is max(`MIN_CAP` x target, wait_factor x waiting / admissions per second over the last
    `RATE_WINDOW_S`): when the queue grows, so does the cap, so under sustained overload the fresh
    band keeps a share of the seats instead of the oldest taking them all. Admissions keep
    `KV_WATERMARK` of the pages free while requests run: a preempted request recomputes its
    prefill, so at capacity a preemption costs more than the admission it made room for.
    """

    name = "slo"
    by_age = False
    FIRST, FRESH, MISSED = 0, 1, 2
    MARGIN = 1 / 6  # of the target: left for the prefill after admission
    SIZE_CREDIT = 2.0  # of the target, per 1000 tokens of prompt + max_tokens
    SIZE_BUCKET = 256  # tokens
    MIN_CAP = 5 / 3  # of the target: the least a missed request waits before it goes first
    RATE_WINDOW_S = 30.0
    KV_WATERMARK = 0.03  # admissions leave 3 % of the pages for the running requests' growth

    def __init__(self, starvation_timeout_s: float, ttft_slo_s: float, wait_factor: float) -> None:
        self.ttft_slo_s = ttft_slo_s
        self.wait_factor = wait_factor
        self._band: dict[int, tuple[int, int]] = {}  # arrival_seq -> (band, size bucket)
        self._fresh: deque[Request] = deque()  # arrival order; entries that left stay until they surface
        self._missed: deque[Request] = deque()
        self._admissions: deque[float] = deque()  # times of the admissions in the rate window
        self._start: float | None = None
        self._now = 0.0
        super().__init__(starvation_timeout_s)

    @classmethod
    def from_config(cls, config: SchedulerConfig) -> Policy:
        return cls(config.starvation_timeout_s, config.ttft_slo_s, config.slo_wait_factor)

    def group_key(self, req: Request) -> Hashable:
        band, bucket = self._band[req.arrival_seq]  # type: ignore[index]
        return (band, bucket, req.adapter_uid)

    def _band_of(self, req: Request) -> int | None:
        """The band `req` waits in; None once it left the queue."""
        entry = self._band.get(req.arrival_seq)  # type: ignore[arg-type]
        return None if entry is None else entry[0]

    def priority(self, key: Hashable, head: Request) -> Priority:
        band, bucket, _ = key  # type: ignore[misc]
        due = head.arrival_time
        if band == self.FRESH:
            due += self.SIZE_CREDIT * self.ttft_slo_s * bucket * self.SIZE_BUCKET / 1000
        return (band, due, head.arrival_seq)

    def add(self, req: Request, front: bool = False) -> None:
        if front:  # preempted: back first, as vLLM does
            self._band[req.arrival_seq] = (self.FIRST, 0)  # type: ignore[index]
        else:
            size = len(req.prompt_token_ids) + req.max_tokens
            self._band[req.arrival_seq] = (self.FRESH, min(size // self.SIZE_BUCKET, 64))  # type: ignore[index]
            self._fresh.append(req)
        super().add(req, front)

    def remove(self, req: Request) -> bool:
        if req.arrival_seq not in self._band:
            return False
        removed = super().remove(req)
        if removed:
            del self._band[req.arrival_seq]  # type: ignore[arg-type]
        return removed

    def on_admitted(self, req: Request) -> None:
        self._band.pop(req.arrival_seq, None)  # type: ignore[arg-type]
        self._admissions.append(self._now)

    def wait_cap(self, now: float) -> float:
        """How long a request that missed its target may wait before it goes first."""
        window = self._admissions
        while window and window[0] < now - self.RATE_WINDOW_S:
            window.popleft()
        floor = self.MIN_CAP * self.ttft_slo_s
        span = 0.0 if self._start is None else min(self.RATE_WINDOW_S, now - self._start)
        if not window or span <= 0:
            return floor
        return max(floor, self.wait_factor * len(self) * span / len(window))

    def _move(self, req: Request, band: int) -> None:
        groups = self.groups
        groups.remove(self.group_key(req), req)
        self._band[req.arrival_seq] = (band, 0)  # type: ignore[index]
        key = self.group_key(req)
        q = groups.queues.get(key)
        groups.push(key, req, front=bool(q) and q[-1].arrival_seq > req.arrival_seq)  # type: ignore[operator]

    def _age(self, now: float) -> None:
        """Move the requests that can no longer make the target to MISSED, and those past the cap
        to FIRST; each deque is in arrival order, so only its front is looked at."""
        fresh, missed = self._fresh, self._missed
        last_chance = now - self.ttft_slo_s * (1 - self.MARGIN)
        while fresh and fresh[0].arrival_time <= last_chance:
            req = fresh.popleft()
            if self._band_of(req) == self.FRESH:
                self._move(req, self.MISSED)
                missed.append(req)
        if not missed:
            return
        too_long = now - self.wait_cap(now)
        while missed and missed[0].arrival_time <= too_long:
            req = missed.popleft()
            if self._band_of(req) == self.MISSED:
                self._move(req, self.FIRST)

    def _reservation_candidate(self, view: SchedulerView, now: float) -> Request | None:
        """As every policy's, and the request that reserves a slot goes first: fresh work would
        otherwise precede it for ever, and the reservation would never be served (S2.4)."""
        req = super()._reservation_candidate(view, now)
        if req is not None and self._band_of(req) != self.FIRST:
            self._move(req, self.FIRST)
        return req

    def schedule(self, admit: Admit, view: SchedulerView, now: float) -> None:
        if self._start is None:
            self._start = now
        self._now = now
        self._age(now)
        super().schedule(admit, view, now)


class PriorityPolicy(Policy):
    """vLLM's priority scheduling: the smallest `priority` first, arrival order within one; under
    KV pressure the largest priority is preempted first. Groups are (priority, adapter), so work of
    one priority for a resident adapter still goes ahead only of work the cap holds back, and a
    blocked group still reserves a slot once its head has waited the starvation timeout."""

    name = "priority"
    by_age = False  # groups are in priority order: a later group may have waited longer
    running_order = attrgetter("priority")  # stable: admission order within one priority

    def group_key(self, req: Request) -> Hashable:
        return (req.priority, req.adapter_uid)

    def priority(self, key: Hashable, head: Request) -> Priority:
        return (head.priority, head.arrival_seq)

    def preempt_rank(self, req: Request, admitted: int) -> tuple[int, ...]:
        return (req.priority, admitted)


POLICIES: dict[str, type[Policy]] = {
    p.name: p for p in (FCFSPolicy, AffinityPolicy, CompletionPolicy, FairPolicy, SloPolicy, PriorityPolicy)
}


def make_policy(config: SchedulerConfig) -> Policy:
    try:
        cls = POLICIES[config.policy]
    except KeyError:
        raise ValueError(
            f"unknown scheduling policy {config.policy!r}; choose one of {sorted(POLICIES)}"
        ) from None
    return cls.from_config(config)
