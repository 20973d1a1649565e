"""The scheduler: which requests run this step, how many tokens each, under which adapters (S1-S3).

Boundary: decides, never computes. `schedule()` returns a `SchedulerOutput`
of ids and counts; `update_from_output()` takes the sampled token ids back,
advances the requests and frees what finished. There are no prefill and
decode phases: each request has computed and known token counts, and a step
grants tokens under a budget.

A step, in order:
1. running requests that decode (one token each), then running requests
   still prefilling (a chunk each, S3.2); when pages run out the most recently
   admitted running request not yet scheduled this step is preempted and
   requeued (S4.2);
2. waiting requests in the policy's order (policies.py), each admitted only
   if a seat, tokens, KV pages and then an adapter slot can all be had (while
   requests run, the pages must leave the watermark free for their growth,
   `kv_watermark`, so fewer are preempted); the slot is taken last, so work
   refused for another reason never holds one (S2.3). The number of distinct
   adapters in a step can never exceed the number of device slots,
   `max_loras` (S2.1).

Anti-starvation (S2.4) is a slot reservation, and it is work-conserving: the
policy names a waiting request whose adapter must get the next slot; the
scheduler picks the fewest resident adapters that free a slot soonest and
stops new work for those alone ("draining"), loads no other adapter until the
reserved one has its slot, and keeps admitting everything else.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from loramux.config import SchedulerConfig
from loramux.core.adapters import AdapterInfo, AdapterManager
from loramux.core.kv_manager import KVCacheManager, KVStats
from loramux.core.outputs import RunnerOutput, ScheduledSeq, SchedulerOutput
from loramux.core.policies import AdmitResult, make_policy
from loramux.core.prefix_cache import KVEvent
from loramux.core.request import Request, RequestStatus


class QueueFullError(RuntimeError):
    """The waiting queue is at its configured bound; retry later (HTTP 503)."""


class StepUpdate(NamedTuple):
    new_tokens: list[tuple[Request, int]]  # (request, token) for every token sampled this step
    finished: list[Request]


@dataclass
class SchedulerCounters:
    """Running totals the control plane keeps for metrics (S1.3, S5.1)."""

    num_steps: int = 0
    num_preemptions: int = 0
    num_reservations: int = 0
    naive_adapter_switches: int = 0
    max_adapters_per_step: int = 0
    adapters_per_step: Counter[int] = field(default_factory=Counter)
    num_finished: Counter[str] = field(default_factory=Counter)


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        kv: KVCacheManager,
        adapters: AdapterManager,
        max_model_len: int,
        clock: Callable[[], float] = time.monotonic,
        base_identity: str = "base",
    ) -> None:
        self.config = config
        self.kv = kv
        self.adapters = adapters
        self.max_model_len = max_model_len
        self.clock = clock
        self.policy = make_policy(config)
        watermark = config.kv_watermark if config.kv_watermark is not None else self.policy.KV_WATERMARK
        self.headroom_pages = math.ceil(watermark * kv.num_pages)  # admissions leave these free (S4.2)
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._deadlines: list[tuple[float, int, Request]] = []  # (queue deadline, arrival, request)
        self.counters = SchedulerCounters()
        self._arrivals = itertools.count()
        self._finished_ids: list[str] = []
        self._steps_since_admission = 0
        self._naive_slots: OrderedDict[int, None] = OrderedDict()
        self._reserved: Request | None = None  # its adapter gets the next slot that frees
        self._draining: frozenset[int] = frozenset()  # resident adapters taking no new work for it
        kv.open_namespace(None, base_identity)

    # --- adapters ---
    def register_adapter(
        self,
        name: str,
        version: str,
        rank: int,
        nbytes: int,
        path: str | None = None,
        pinned: bool = False,
        replace: bool = False,
    ) -> AdapterInfo:
        """A new load of `name`; with `replace`, in place of the one now under that name (whose
        requests finish on it, whose idle KV pages go now: the new load never reads them)."""
        old = self.adapters.lookup(name) if replace else None
        info = self.adapters.register(name, version, rank, nbytes, path, pinned, replace)
        if old is not None:
            self.kv.close_namespace(old.uid)
        self.kv.open_namespace(info.uid, info.identity)
        return info

    def unregister_adapter(self, name: str) -> AdapterInfo:
        """Unload: the name goes now, its idle KV pages too; in-use pages and weights follow (S5.4)."""
        info = self.adapters.unregister(name)
        self.kv.close_namespace(info.uid)
        return info

    # --- requests ---
    def add_request(self, req: Request, bounded: bool = True) -> None:
        """Queue `req`, or raise (at once) if it names an unknown adapter or can never fit.

        `bounded=False` skips the `max_queue_len` check: for the later samples of a request
        whose first sample was admitted under it (they are part of that request)."""
        info = self.check(req, bounded)
        req.adapter_uid = info.uid if info else None
        req.arrival_seq = next(self._arrivals)
        req.status = RequestStatus.WAITING
        self.requests[req.request_id] = req
        if info is not None:
            self.adapters.add_request(info)
            self._count_naive_switch(info.uid)
        self.policy.add(req)
        if req.queue_deadline != math.inf:
            heapq.heappush(self._deadlines, (req.queue_deadline, req.arrival_seq, req))

    def check(self, req: Request, bounded: bool = True) -> AdapterInfo | None:
        """What `add_request` checks, without queuing: raises as it would; returns the adapter.
        For a request the engine holds back a while (its grammar is compiling)."""
        info = self.adapters.get(req.lora_name) if req.lora_name is not None else None  # S1.2: first
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use; use a unique id")
        if req.max_total_tokens > self.max_model_len:
            raise ValueError(
                f"request {req.request_id!r}: prompt of {req.num_prompt_tokens} tokens plus "
                f"max_tokens={req.max_tokens} exceeds the model's limit of {self.max_model_len} "
                f"tokens; shorten the prompt or lower max_tokens"
            )
        pages = self.kv.pages_for(req.max_total_tokens)
        if pages > self.kv.num_pages:
            raise ValueError(
                f"request {req.request_id!r} may need {pages} KV pages but the pool has only "
                f"{self.kv.num_pages}; lower max_tokens or give the KV cache more memory"
            )
        bound = self.config.max_queue_len
        if bounded and bound is not None and len(self.policy) >= bound:
            raise QueueFullError(f"{len(self.policy)} requests are waiting (bound {bound}); retry later")
        return info

    def _expire_queued(self, now: float) -> None:
        """End the requests still waiting for their first step past their queue deadline.

        Entries of requests that started or finished stay in the heap until their deadline
        (lazy deletion), but never more than about twice the live requests: past that bound the
        heap is rebuilt from the entries still waiting, so finished requests (and their token
        lists) are not kept alive for max_queue_time."""
        heap = self._deadlines
        if len(heap) > 2 * len(self.requests) + 64:
            heap[:] = [e for e in heap if e[2].first_scheduled_time is None and not e[2].is_finished]
            heapq.heapify(heap)
        while heap and heap[0][0] <= now:
            _, _, req = heapq.heappop(heap)
            if req.status is RequestStatus.WAITING and req.first_scheduled_time is None:
                removed = self.policy.remove(req)
                assert removed, f"{req!r} waiting but not queued"
                self._finish(req, RequestStatus.FINISHED_TIMEOUT)

    def _count_naive_switch(self, uid: int) -> None:
        """Switches an arrival-order schedule with `max_loras` LRU slots would make (S1.3)."""
        slots = self._naive_slots
        if uid in slots:
            slots.move_to_end(uid)
            return
        self.counters.naive_adapter_switches += 1
        slots[uid] = None
        if len(slots) > self.adapters.max_loras:
            slots.popitem(last=False)

    def abort_request(self, request_id: str) -> bool:
        return self.finish_request(request_id, RequestStatus.FINISHED_ABORTED)

    def finish_request(self, request_id: str, status: RequestStatus) -> bool:
        """End a request from outside (abort, or a stop string seen by the detokenizer)."""
        assert status.is_finished, status
        req = self.requests.get(request_id)
        if req is None:
            return False
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        else:
            removed = self.policy.remove(req)
            assert removed, f"{req!r} neither running nor waiting"
        self._finish(req, status)
        return True

    def _finish(self, req: Request, status: RequestStatus) -> None:
        info = self._info(req)
        if req.status is RequestStatus.RUNNING:
            self.kv.free(req)
            if info is not None:
                self.adapters.stop_running(info)
        req.status = status
        req.finished_time = self.clock()
        if info is not None:
            self.adapters.finish_request(info)
        del self.requests[req.request_id]
        self._finished_ids.append(req.request_id)
        self.counters.num_finished[status.finish_reason or "?"] += 1

    def _info(self, req: Request) -> AdapterInfo | None:
        return None if req.adapter_uid is None else self.adapters.by_uid(req.adapter_uid)

    @property
    def num_waiting(self) -> int:
        return len(self.policy)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # --- the view policies see ---
    def resident_uids(self) -> list[int]:
        return self.adapters.resident_uids

    def can_take_slot(self) -> bool:
        """Whether an adapter not on the device could be loaded now (never while one is reserved)."""
        return self._reserved is None and self.adapters.can_take_slot()

    @property
    def reservation(self) -> Request | None:
        return self._reserved

    @property
    def draining(self) -> frozenset[int]:
        return self._draining

    def reserve(self, req: Request) -> None:
        """Give the next slot that frees to `req`'s adapter: drain the fewest resident adapters
        whose running requests end soonest (S2.4)."""
        info = self._info(req)
        assert info is not None and info.slot is None and self._reserved is None, (req, info)
        left: dict[int, int] = {}  # adapter -> steps until its last running request ends
        for r in self.running:
            if r.adapter_uid is not None:
                togo = r.max_total_tokens - r.num_computed_tokens
                left[r.adapter_uid] = max(left.get(r.adapter_uid, 0), togo)
        self._reserved = req
        self._draining = frozenset(self.adapters.drain_plan(info, sorted(left, key=left.__getitem__)))
        self.counters.num_reservations += 1

    def _end_reservation(self) -> None:
        self._reserved = None
        self._draining = frozenset()

    def _check_reservation(self) -> None:
        """Drop a reservation whose request left the queue (aborted) or whose adapter went."""
        req = self._reserved
        if req is not None and (req.status not in (RequestStatus.WAITING, RequestStatus.PREEMPTED)):
            self._end_reservation()

    # --- scheduling ---
    def schedule(self) -> SchedulerOutput:
        cfg = self.config
        self.counters.num_steps += 1
        if self._deadlines:
            self._expire_queued(self.clock())
        step = self._last_step = _StepBudget(cfg.max_num_batched_tokens, cfg.prefill_budget)
        preempted = self._schedule_running(step)
        n_running = len(step.seqs)
        self._check_reservation()
        if not preempted and self._may_admit(step):
            self.policy.schedule(self._admitter(step), self, self.clock())
        admitted = len(step.seqs) > n_running
        self._steps_since_admission = 0 if admitted else self._steps_since_admission + 1
        self._prefetch()
        uids = {s.adapter_uid for s in step.seqs if s.adapter_uid is not None}
        assert len(uids) <= self.adapters.max_loras, f"{len(uids)} adapters in one step"
        c = self.counters
        c.max_adapters_per_step = max(c.max_adapters_per_step, len(uids))
        c.adapters_per_step[len(uids)] += 1
        finished, self._finished_ids = self._finished_ids, []
        return SchedulerOutput(
            step=c.num_steps,
            seqs=step.seqs,
            num_batched_tokens=cfg.max_num_batched_tokens - step.tokens,
            adapter_plan=self.adapters.take_plan(),
            finished_ids=finished,
            preempted_ids=[r.request_id for r in preempted],
            kv_copies=self.kv.take_copies(),
        )

    def _schedule_running(self, step: _StepBudget) -> list[Request]:
        """Decodes first, then unfinished prefills. When pages run out, preempt the most recently
        admitted request not yet scheduled this step (the request itself, if that is it)."""
        running = self.running
        order: list[Request] = []
        prefills: list[Request] = []
        for r in running:
            (order if len(r.token_ids) - r.num_computed_tokens == 1 else prefills).append(r)
        first = self.policy.running_order
        if first is not None:  # priority: the best go first, so the worst are left to preempt
            order.sort(key=first)
            prefills.sort(key=first)
        order += prefills
        kv, preempted = self.kv, []
        ps = kv.page_size
        RUNNING, append = RequestStatus.RUNNING, step.seqs.append
        tokens, prefill = step.tokens, step.prefill
        for req in order:
            if preempted and req.status is not RUNNING:
                continue  # preempted for an earlier request of this step
            if tokens <= 0:
                break
            computed = req.num_computed_tokens
            ids = req.token_ids
            left = len(ids) - computed
            if left == 1:
                n = 1
            else:
                n = min(left, tokens, prefill)
                if n <= 0:
                    continue  # a prefill with no prefill budget left
                prefill -= n
            if computed + n > len(req.page_ids) * ps:  # the new tokens need another page
                need = -(-(computed + n) // ps) - len(req.page_ids)
                if not kv.can_allocate(need):
                    self._preempt_for(req, need, order[order.index(req) :], preempted)
                    if req.status is not RUNNING:
                        if left > 1:
                            prefill += n
                        continue
                allocated = kv.allocate(req, n)
                assert allocated, f"{req!r}: pages vanished between check and allocation"
            append(_hand_off(req, computed, n))
            tokens -= n
        step.tokens, step.prefill = tokens, prefill
        if preempted:
            self.running = [r for r in running if r.status is RUNNING]
        return preempted

    def _preempt_for(self, req: Request, need: int, unscheduled: list[Request], out: list[Request]) -> None:
        """Preempt the most recently admitted of `unscheduled` (the policy may rank them otherwise:
        priority's largest priority first) until `need` pages can be had."""
        RUNNING = RequestStatus.RUNNING
        rank = {id(r): i for i, r in enumerate(self.running)}  # admission order
        order = self.policy.preempt_rank
        pending = sorted((r for r in unscheduled if r.status is RUNNING), key=lambda r: order(r, rank[id(r)]))
        while not self.kv.can_allocate(need):
            victim = pending.pop()
            out.append(victim)
            self._preempt(victim)
            if victim is req:
                return

    def _preempt(self, req: Request) -> None:
        """Free `req`'s pages and requeue it at the front; it recomputes from its cached prefix."""
        self.kv.cache_computed(req)  # keep what it computed, in its own namespace (S5.3)
        self.kv.free(req)
        info = self._info(req)
        if info is not None:
            self.adapters.stop_running(info)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.status = RequestStatus.PREEMPTED
        self.counters.num_preemptions += 1
        self.policy.add(req, front=True)

    def _prefetch(self) -> None:
        """Have the adapters of the next waiting requests read into host memory in the background."""
        adapters = self.adapters
        depth = min(adapters.max_loras, adapters.max_cpu_loras // 2)
        upcoming = self.policy.upcoming(depth)
        if self._reserved is not None:
            upcoming = itertools.chain((self._reserved,), upcoming)
        for req in upcoming:
            info = self._info(req)
            if info is not None and not info.on_host and not adapters.prefetch(info):
                break  # host memory holds only adapters in use: nothing more can be read ahead

    def _may_admit(self, step: _StepBudget) -> bool:
        cfg = self.config
        if not len(self.policy) or len(self.running) >= cfg.max_num_seqs:
            return False
        if step.tokens <= 0 or step.prefill <= 0:
            return False
        ratio = cfg.waiting_served_ratio
        if ratio <= 0 or not self.running or self._steps_since_admission >= cfg.max_waiting_steps:
            return True
        return len(self.policy) >= ratio * len(self.running)  # S3.3: no tiny prefills mid-decode

    def _headroom(self) -> int:
        """Pages an admission must leave free now: the watermark while requests run; an empty
        batch always admits, so nothing waits for ever."""
        return self.headroom_pages if self.running else 0

    def _admitter(self, step: _StepBudget) -> Callable[[Request], AdmitResult]:
        """The admission check policies call, one waiting request at a time."""
        kv, adapters, max_seqs = self.kv, self.adapters, self.config.max_num_seqs

        def admit(req: Request) -> AdmitResult:
            if len(self.running) >= max_seqs or step.tokens <= 0 or step.prefill <= 0:
                return AdmitResult.STOP
            info = self._info(req)
            if info is not None:
                if info.uid in self._draining:
                    return AdmitResult.SKIP
                if info.slot is None:
                    reserved = self._reserved
                    if reserved is not None and reserved.adapter_uid != info.uid:
                        return AdmitResult.NEEDS_SLOT  # the next slot is someone else's
                    if not adapters.can_take_slot():
                        return AdmitResult.NEEDS_SLOT
            hit = kv.match(req)
            n = min(req.num_tokens - hit.num_tokens, step.tokens, step.prefill)
            if not kv.can_allocate(kv.pages_for(hit.num_tokens + n) - len(hit.pages) + self._headroom()):
                kv.undo_match(req, hit)
                step.out_of_pages = True
                return AdmitResult.STOP
            if info is not None:
                loading = info.slot is None
                if adapters.acquire(info) is None:
                    kv.undo_match(req, hit)
                    return AdmitResult.NEEDS_SLOT
                if loading and self._reserved is not None:
                    self._end_reservation()  # the reserved adapter has its slot
            allocated = kv.allocate(req, n, hit)
            assert allocated, f"{req!r}: pages vanished between check and allocation"
            self._start(req, hit.num_tokens, info)
            step.add(req, n, True)
            return AdmitResult.ADMITTED

        return admit

    def _start(self, req: Request, num_cached: int, info: AdapterInfo | None) -> None:
        if req.num_cached_tokens is None:
            req.num_cached_tokens = num_cached
            self.kv.count_prefix_query(req.num_prompt_tokens, num_cached)
        if req.first_scheduled_time is None:
            req.first_scheduled_time = self.clock()
        req.status = RequestStatus.RUNNING
        req.lora_slot = None if info is None else info.slot
        self.running.append(req)
        if info is not None:
            self.adapters.start_running(info)

    # --- after the executor ran ---
    def update_from_output(self, out: SchedulerOutput, result: RunnerOutput) -> StepUpdate:
        sampled: list[Request] = []
        tokens: list[int] = []
        finished: list[Request] = []
        requests, kv = self.requests, self.kv
        ps, RUNNING = kv.page_size, RequestStatus.RUNNING
        errors = result.errors or {}
        for (rid, computing, _, _, _, _, sample, _, _, _, _, _), token in zip(
            out.seqs, result.sampled_token_ids, strict=True
        ):
            req = requests.get(rid)
            if req is None or req.status is not RUNNING:
                continue  # finished from outside while the step ran
            if rid in errors:  # its own sampling failed: it ends alone, its KV is freed
                self._finish(req, RequestStatus.FINISHED_ERROR)
                finished.append(req)
                continue
            computed = req.num_computed_tokens = req.num_computed_tokens + len(computing)
            if computed // ps > req.num_inserted_pages:
                kv.cache_computed(req)
            if sample:
                assert token is not None, f"{req!r}: executor sampled nothing"
                ids = req.token_ids
                ids.append(token)
                sampled.append(req)
                tokens.append(token)
                if len(ids) >= req.end_len or (
                    token in req.stop_ids and len(ids) - len(req.prompt_token_ids) >= req.min_tokens
                ):
                    self._finish(req, self._stop_status(req, token))
                    finished.append(req)
        if sampled:
            self.policy.on_output_tokens(sampled)
        if finished:
            self.running = [r for r in self.running if r.status is RUNNING]
        return StepUpdate(list(zip(sampled, tokens, strict=True)), finished)

    @staticmethod
    def _stop_status(req: Request, token: int) -> RequestStatus:
        """Why `req` stops after sampling `token` (the caller checked that it does)."""
        if req.num_output_tokens >= req.min_tokens and (
            token in req.stop_token_ids or (not req.ignore_eos and token in req.eos_token_ids)
        ):
            return RequestStatus.FINISHED_STOPPED
        return RequestStatus.FINISHED_LENGTH

    # --- introspection ---
    def kv_stats(self) -> KVStats:
        return self.kv.stats()

    def take_kv_events(self) -> list[KVEvent]:
        """The prefix cache's events since the last call (for KV-aware routers)."""
        return self.kv.take_events()

    def waiting_by_adapter(self) -> Counter[str]:
        return Counter(r.lora_name or "" for r in self.policy)

    def running_by_adapter(self) -> Counter[str]:
        return Counter(r.lora_name or "" for r in self.running)

    def check_work_conserving(self, out: SchedulerOutput) -> None:
        """Call right after `schedule()`: no seat, token or page was left free while a waiting
        request could have used it. A request counts as admissible when its adapter is the base
        model, resident and not draining, or loadable now without displacing a reservation."""
        cfg, step = self.config, self._last_step
        if out.preempted_ids or cfg.waiting_served_ratio > 0 or step.out_of_pages:
            return  # no admissions on a preempting step; S3.3 holds prefills back on purpose
        if len(self.running) >= cfg.max_num_seqs or step.tokens <= 0 or step.prefill <= 0:
            return
        free_pages = self.kv.num_allocatable - self._headroom()
        adapters, reserved = self.adapters, self._reserved
        for req in self.policy.heads():
            info = self._info(req)
            if info is not None:
                if info.uid in self._draining:
                    continue
                if info.slot is None and (
                    (reserved is not None and reserved.adapter_uid != info.uid)
                    or not adapters.can_acquire(info)
                ):
                    continue
            pages = self.kv.pages_for(min(req.num_tokens, step.tokens, step.prefill))
            assert pages > free_pages, (
                f"step {out.step}: {req!r} could have run ({pages} pages of {free_pages} free, "
                f"{cfg.max_num_seqs - len(self.running)} seats, {step.tokens} tokens left) but waits"
            )

    def check_integrity(self) -> None:
        live = list(self.requests.values())
        self.kv.check_integrity(self.running)
        self.adapters.check_integrity()
        assert len(self.running) + len(self.policy) == len(live), (
            f"{len(self.running)} running + {len(self.policy)} waiting != {len(live)} live"
        )
        for req in live:
            req.check_invariants()
            if req.status is not RequestStatus.RUNNING:
                assert not req.page_ids, f"waiting {req!r} holds pages"
        running_per_uid = Counter(r.adapter_uid for r in self.running if r.adapter_uid is not None)
        live_per_uid = Counter(r.adapter_uid for r in live if r.adapter_uid is not None)
        for uid, n in live_per_uid.items():
            info = self.adapters.by_uid(uid)
            assert info.num_requests == n and info.num_running == running_per_uid[uid], info


class _StepBudget:
    """What is left of one step's budgets, and the seqs scheduled so far."""

    __slots__ = ("out_of_pages", "prefill", "seqs", "tokens")

    def __init__(self, tokens: int, prefill: int) -> None:
        self.tokens = tokens
        self.prefill = prefill
        self.seqs: list[ScheduledSeq] = []
        self.out_of_pages = False  # admissions stopped because KV pages ran out

    def add(self, req: Request, n: int, is_prefill: bool) -> None:
        self.seqs.append(_hand_off(req, req.num_computed_tokens, n))
        self.tokens -= n
        if is_prefill:
            self.prefill -= n


_NO_IDS: frozenset[int] = frozenset()


def banned_tokens(words: tuple[tuple[int, ...], ...], ids: list[int], num_prompt: int) -> frozenset[int]:
    """The tokens that would complete one of `words` after the output so far (`ids` past
    `num_prompt`), as vLLM's bad_words: a word's last token where the output ends with the rest."""
    out = ids[num_prompt:]
    return frozenset(
        w[-1]
        for w in words
        if len(w) == 1 or (len(out) >= len(w) - 1 and out[len(out) - len(w) + 1 :] == list(w[:-1]))
    )


def _hand_off(req: Request, start: int, n: int, new: Callable = tuple.__new__) -> ScheduledSeq:
    """The one place a `ScheduledSeq` is made: `req`'s tokens [start, start + n) this step.

    Nothing in it changes after the step is scheduled: the page table is the request's current
    tuple (the KV manager replaces it, never edits it), and of the token list, which only grows,
    the executor reads the first start + n entries. `tuple.__new__` directly, as this runs for
    every request of every step."""
    ids = req.token_ids
    num_prompt = len(req.prompt_token_ids)
    min_tokens = req.min_tokens
    suppress = req.stop_ids if min_tokens and len(ids) - num_prompt < min_tokens else _NO_IDS
    if req.bad_words_ids and start + n == len(ids):
        suppress = suppress | banned_tokens(req.bad_words_ids, ids, num_prompt)
    return new(
        ScheduledSeq,
        (
            req.request_id,
            ids[start : start + n],
            start,
            req.page_ids,
            req.adapter_uid,
            req.lora_slot,
            start + n == len(ids),
            req.sampling,
            suppress,
            ids,
            num_prompt,
            req.lora_start,
        ),
    )
