"""Waiting-queue policies: the order in which waiting requests are offered for admission (S2.4, S2.5).

Boundary: a policy owns the waiting requests and their order, nothing else.
The scheduler hands it an `admit(request, aged)` callback that does every
resource check (seats, tokens, KV pages, adapter slot) and answers
ADMITTED, SKIP_ADAPTER (this request's adapter cannot run this step; try
others) or STOP (nothing more fits this step).

Every policy first offers *aged* groups: groups whose oldest request has
waited at least `starvation_timeout_s` for an adapter that is not on the
device, oldest first. When an aged request cannot get an adapter slot the
scheduler admits no other adapter work that step, so the busy adapters drain
and a slot frees. That bounds the wait the adapter cap can add to the
timeout plus the longest running request, whatever the adapter mix. Groups
whose adapter is resident (and the base model) are left to the policy's own
order, which does not starve them: age order for fcfs and affinity, the
bounded service difference for fair.

Policies (select by name):
- "fcfs": groups by adapter in order of their oldest request; a group's
  requests are admitted together (same-adapter coalescing, S1.3).
- "affinity": like fcfs, but groups whose adapter is already on the device
  (and the base model) go before groups that need a load (S3.4).
- "completion": like fcfs with a zero timeout: an adapter that needs a slot
  stops new work for resident adapters until a running group completes and
  frees its slot (batch completion).
- "fair": Virtual Token Counter across tenants (VTC, papers.md 2.2): the
  tenant with the least service (input + 2 x output tokens) goes first; a
  tenant that becomes backlogged is lifted to the least active counter.
"""

from __future__ import annotations

import enum
import heapq
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from contextlib import closing
from typing import Protocol

from loramux.core.request import Request


class AdmitResult(enum.Enum):
    ADMITTED = 0
    SKIP_ADAPTER = 1
    STOP = 2


Admit = Callable[[Request, bool], AdmitResult]


class ResidencyView(Protocol):
    def resident_uids(self) -> list[int]: ...

    def can_take_slot(self) -> bool: ...


class _Groups:
    """FIFO queues keyed by a group key, plus a heap that orders groups by their head's arrival."""

    def __init__(self) -> None:
        self.queues: dict[Hashable, deque[Request]] = {}
        self._heap: list[tuple[int, int, Hashable]] = []  # (head seq, tiebreak, key)
        self._tiebreak = 0
        self.size = 0

    def push(self, key: Hashable, req: Request, front: bool) -> None:
        q = self.queues.get(key)
        if q is None:
            q = self.queues[key] = deque()
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
            self._push_heap(key, req)

    def _push_heap(self, key: Hashable, head: Request) -> None:
        self._tiebreak += 1
        heapq.heappush(self._heap, (head.arrival_seq, self._tiebreak, key))

    def pop_head(self, key: Hashable) -> Request:
        q = self.queues[key]
        req = q.popleft()
        self.size -= 1
        if q:
            self._push_heap(key, q[0])
        else:
            del self.queues[key]
        return req

    def remove(self, key: Hashable, req: Request) -> bool:
        q = self.queues.get(key)
        if q is None or req not in q:
            return False
        was_head = q[0] is req
        q.remove(req)
        self.size -= 1
        if not q:
            del self.queues[key]
        elif was_head:
            self._push_heap(key, q[0])
        return True

    def head(self, key: Hashable) -> Request | None:
        q = self.queues.get(key)
        return q[0] if q else None

    def by_head_age(self) -> Iterator[Hashable]:
        """Group keys, oldest head first. Close the iterator (or exhaust it) when done.

        Entries whose group head changed are stale and dropped as they surface;
        every head change pushes a fresh entry, so no group is ever lost.
        """
        heap, held, seen = self._heap, [], set()
        try:
            while heap:
                entry = heapq.heappop(heap)
                seq, _, key = entry
                q = self.queues.get(key)
                if q is None or q[0].arrival_seq != seq:
                    continue
                held.append(entry)
                if key in seen:
                    continue
                seen.add(key)
                yield key
        finally:
            kept = set()
            for entry in held:
                seq, _, key = entry
                q = self.queues.get(key)
                if q is not None and q[0].arrival_seq == seq and (key, seq) not in kept:
                    kept.add((key, seq))
                    heapq.heappush(heap, entry)


class Policy(ABC):
    """A waiting queue with an admission order."""

    name = ""

    def __init__(self, starvation_timeout_s: float) -> None:
        self.starvation_timeout_s = starvation_timeout_s
        self.groups = _Groups()

    def group_key(self, req: Request) -> Hashable:
        return req.adapter_uid

    def __len__(self) -> int:
        return self.groups.size

    def add(self, req: Request, front: bool = False) -> None:
        self.groups.push(self.group_key(req), req, front)

    def remove(self, req: Request) -> bool:
        return self.groups.remove(self.group_key(req), req)

    def __iter__(self) -> Iterator[Request]:
        for q in self.groups.queues.values():
            yield from q

    def upcoming(self, limit: int) -> Iterator[Request]:
        """The oldest request of up to `limit` groups, oldest first (what will want a slot next)."""
        with closing(self.groups.by_head_age()) as keys:
            for i, key in enumerate(keys):
                if i >= limit:
                    return
                head = self.groups.head(key)
                if head is not None:
                    yield head

    def on_admitted(self, req: Request) -> None:
        """A request left the queue for the running batch."""

    def on_output_tokens(self, req: Request, n: int) -> None:
        """`req` produced `n` tokens this step."""

    def schedule(self, admit: Admit, view: ResidencyView, now: float) -> None:
        """Offer waiting requests to `admit`: starving groups (and all older ones) first, then in
        policy order."""
        if self._offer_aged(admit, view, now - self.starvation_timeout_s) is AdmitResult.STOP:
            return
        self._schedule_rest(admit, view)

    def _offer_aged(self, admit: Admit, view: ResidencyView, cutoff: float) -> AdmitResult:
        """Walk groups oldest head first. When a group has waited past `cutoff` for an adapter
        that is not on the device, offer it, and every older group before it, in age order, so
        a starving group overtakes only younger work. Stop at the first such group that cannot
        get a slot: the scheduler then drains running adapters until one frees."""
        resident = set(view.resident_uids())
        older: list[Hashable] = []  # aged groups whose adapter is resident (or the base model)
        with closing(self.groups.by_head_age()) as keys:
            for key in keys:
                head = self.groups.head(key)
                if head is None or head.arrival_time > cutoff:
                    break
                if head.adapter_uid is None or head.adapter_uid in resident:
                    older.append(key)
                    continue
                for k in (*older, key):
                    result = self._offer_group(k, admit, aged=True)
                    if result is AdmitResult.STOP:
                        return result
                older = []
                if result is AdmitResult.SKIP_ADAPTER:
                    break
                resident = set(view.resident_uids())
        return AdmitResult.ADMITTED

    def _offer_group(self, key: Hashable, admit: Admit, aged: bool) -> AdmitResult:
        """Admit the group's requests in order until one is refused."""
        groups = self.groups
        while (head := groups.head(key)) is not None:
            result = admit(head, aged)
            if result is not AdmitResult.ADMITTED:
                return result
            groups.pop_head(key)
            self.on_admitted(head)
        return AdmitResult.ADMITTED

    def _offer_resident(self, admit: Admit, view: ResidencyView, done: set[Hashable]) -> AdmitResult:
        """Offer the base model's and the resident adapters' groups, oldest head first."""
        heads = [(self.groups.head(k), k) for k in (None, *view.resident_uids()) if k not in done]
        for _, key in sorted((h.arrival_seq, k) for h, k in heads if h is not None):  # type: ignore[misc]
            if self._offer_group(key, admit, aged=False) is AdmitResult.STOP:
                return AdmitResult.STOP
            done.add(key)
        return AdmitResult.ADMITTED

    def _offer_by_age(self, admit: Admit, view: ResidencyView, done: set[Hashable]) -> AdmitResult:
        """Offer groups oldest head first while a slot can still be had; then the resident rest."""
        if view.can_take_slot():
            with closing(self.groups.by_head_age()) as keys:
                for key in keys:
                    if key in done:
                        continue
                    if self._offer_group(key, admit, aged=False) is AdmitResult.STOP:
                        return AdmitResult.STOP
                    done.add(key)
                    if not view.can_take_slot():
                        break
        # No slot can be had: only groups that need none can still be admitted.
        return self._offer_resident(admit, view, done)

    @abstractmethod
    def _schedule_rest(self, admit: Admit, view: ResidencyView) -> None: ...


class FCFSPolicy(Policy):
    """Adapter groups in order of their oldest request; each group admitted together."""

    name = "fcfs"

    def _schedule_rest(self, admit: Admit, view: ResidencyView) -> None:
        self._offer_by_age(admit, view, set())


class CompletionPolicy(FCFSPolicy):
    """FCFS where every group counts as aged: a needed switch waits for running groups to finish."""

    name = "completion"

    def __init__(self, starvation_timeout_s: float) -> None:
        super().__init__(0.0)


class AffinityPolicy(Policy):
    """Resident adapters (and the base model) first, then the rest; each part oldest first."""

    name = "affinity"

    def _schedule_rest(self, admit: Admit, view: ResidencyView) -> None:
        done: set[Hashable] = set()
        if self._offer_resident(admit, view, done) is AdmitResult.STOP:
            return
        self._offer_by_age(admit, view, done)


class FairPolicy(Policy):
    """Virtual Token Counter (VTC) across tenants: least service first, with the counter lift."""

    name = "fair"
    INPUT_WEIGHT = 1.0
    OUTPUT_WEIGHT = 2.0

    def __init__(self, starvation_timeout_s: float) -> None:
        super().__init__(starvation_timeout_s)
        self.counters: dict[str, float] = {}

    def group_key(self, req: Request) -> Hashable:
        return req.tenant

    def add(self, req: Request, front: bool = False) -> None:
        tenant = req.tenant
        if self.groups.head(tenant) is None and not front:
            # Becoming backlogged: no banking of credit from idle time.
            active = [self.counters.get(t, 0.0) for t in self.groups.queues if t != tenant]
            lifted = max(self.counters.get(tenant, 0.0), min(active)) if active else None
            self.counters[tenant] = lifted if lifted is not None else self.counters.get(tenant, 0.0)
        super().add(req, front)

    def on_admitted(self, req: Request) -> None:
        if req.num_preemptions == 0:  # input is charged once, not again after a preemption
            self.counters[req.tenant] = (
                self.counters.get(req.tenant, 0.0) + self.INPUT_WEIGHT * req.num_prompt_tokens
            )

    def on_output_tokens(self, req: Request, n: int) -> None:
        self.counters[req.tenant] = self.counters.get(req.tenant, 0.0) + self.OUTPUT_WEIGHT * n

    def _schedule_rest(self, admit: Admit, view: ResidencyView) -> None:
        counters = self.counters
        heap = [(counters.get(t, 0.0), t) for t in self.groups.queues]
        heapq.heapify(heap)
        while heap:
            _, tenant = heapq.heappop(heap)
            head = self.groups.head(tenant)
            if head is None:
                continue
            result = admit(head, False)
            if result is AdmitResult.STOP:
                return
            if result is AdmitResult.ADMITTED:
                self.groups.pop_head(tenant)
                self.on_admitted(head)
                if self.groups.head(tenant) is not None:
                    heapq.heappush(heap, (counters[tenant], tenant))


POLICIES: dict[str, type[Policy]] = {
    p.name: p for p in (FCFSPolicy, AffinityPolicy, CompletionPolicy, FairPolicy)
}


def make_policy(name: str, starvation_timeout_s: float) -> Policy:
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown scheduling policy {name!r}; choose one of {sorted(POLICIES)}") from None
    return cls(starvation_timeout_s)
