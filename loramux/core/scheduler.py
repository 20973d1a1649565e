"""The scheduler: which requests run this step, how many tokens each, under which adapters (S1-S3).

Boundary: decides, never computes. `schedule()` returns a `SchedulerOutput`
of ids and counts; `update_from_output()` takes the sampled token ids back,
advances the requests and frees what finished. There are no prefill and
decode phases: each request has computed and known token counts, and a step
grants tokens under a budget.

A step, in order:
1. running requests that decode (one token each), then running requests
   still prefilling (a chunk each, S3.2); when pages run out the most recently
   admitted running request is preempted and requeued (S4.2);
2. waiting requests in the policy's order (policies.py), each admitted only
   if a seat, tokens, KV pages and then an adapter slot can all be had; the
   slot is taken last, so work refused for another reason never holds one
   (S2.3). The number of distinct adapters in a step can never exceed the
   number of device slots, `max_loras` (S2.1).
"""

from __future__ import annotations

import itertools
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from loramux.config import SchedulerConfig
from loramux.core.adapters import AdapterInfo, AdapterManager
from loramux.core.kv_manager import KVCacheManager
from loramux.core.outputs import RunnerOutput, ScheduledSeq, SchedulerOutput
from loramux.core.policies import AdmitResult, make_policy
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
    naive_adapter_switches: int = 0
    max_adapters_per_step: int = 0
    last_step_adapters: int = 0
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
        self.policy = make_policy(config.policy, config.starvation_timeout_s)
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.counters = SchedulerCounters()
        self._arrivals = itertools.count()
        self._finished_ids: list[str] = []
        self._steps_since_admission = 0
        self._naive_slots: OrderedDict[int, None] = OrderedDict()
        kv.cache.open_namespace(None, base_identity)

    # --- adapters ---
    def register_adapter(
        self, name: str, version: str, rank: int, nbytes: int, path: str | None = None, pinned: bool = False
    ) -> AdapterInfo:
        info = self.adapters.register(name, version, rank, nbytes, path, pinned)
        self.kv.cache.open_namespace(info.uid, info.identity)
        return info

    def unregister_adapter(self, name: str) -> AdapterInfo:
        """Unload: the name goes now, its idle KV pages too; in-use pages and weights follow (S5.4)."""
        info = self.adapters.unregister(name)
        self.kv.cache.close_namespace(info.uid)
        return info

    # --- requests ---
    def add_request(self, req: Request) -> None:
        """Queue `req`, or raise (at once) if it names an unknown adapter or can never fit."""
        info = self.adapters.get(req.lora_name) if req.lora_name is not None else None  # S1.2: first
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use; use a unique id")
        if req.max_total_tokens > self.max_model_len:
            raise ValueError(
                f"request {req.request_id!r}: prompt of {req.num_prompt_tokens} tokens plus "
                f"max_tokens={req.max_tokens} exceeds the model's limit of {self.max_model_len} "
                f"tokens; shorten the prompt or lower max_tokens"
            )
        pages = self.kv.pool.pages_for(req.max_total_tokens)
        if pages > self.kv.pool.num_pages:
            raise ValueError(
                f"request {req.request_id!r} may need {pages} KV pages but the pool has only "
                f"{self.kv.pool.num_pages}; lower max_tokens or give the KV cache more memory"
            )
        bound = self.config.max_queue_len
        if bound is not None and len(self.policy) >= bound:
            raise QueueFullError(f"{len(self.policy)} requests are waiting (bound {bound}); retry later")
        req.adapter_uid = info.uid if info else None
        req.arrival_seq = next(self._arrivals)
        req.status = RequestStatus.WAITING
        self.requests[req.request_id] = req
        if info is not None:
            self.adapters.add_request(info)
            self._count_naive_switch(info.uid)
        self.policy.add(req)

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
        return self.adapters.can_take_slot()

    # --- scheduling ---
    def schedule(self) -> SchedulerOutput:
        cfg = self.config
        self.counters.num_steps += 1
        step = _StepBudget(cfg.max_num_batched_tokens, cfg.prefill_budget)
        preempted = self._schedule_running(step)
        n_running = len(step.seqs)
        if not preempted and self._may_admit(step):
            self.policy.schedule(self._admitter(step), self, self.clock())
        admitted = len(step.seqs) > n_running
        self._steps_since_admission = 0 if admitted else self._steps_since_admission + 1
        self._prefetch()
        uids = {s.adapter_uid for s in step.seqs if s.adapter_uid is not None}
        assert len(uids) <= self.adapters.max_loras, f"{len(uids)} adapters in one step"
        c = self.counters
        c.last_step_adapters = len(uids)
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
            kv_copies=self.kv.cache.take_copies(),
        )

    def _schedule_running(self, step: _StepBudget) -> list[Request]:
        """Decodes first, then unfinished prefills; preempt from the back when pages run out."""
        order = [r for r in self.running if r.num_tokens - r.num_computed_tokens == 1]
        if len(order) < len(self.running):
            order += [r for r in self.running if r.num_tokens - r.num_computed_tokens > 1]
        kv, preempted = self.kv, []
        i, end = 0, len(order)
        while i < end:
            req = order[i]
            left = req.num_tokens - req.num_computed_tokens
            n = 1 if left == 1 else min(left, step.tokens, step.prefill)
            if n <= 0 or step.tokens <= 0:
                break
            need = kv.pages_needed(req, n)
            while need > 0 and not kv.can_allocate(need) and end - 1 > i:
                end -= 1
                preempted.append(order[end])
                self._preempt(order[end])
            if need > 0 and not kv.allocate(req, n):
                preempted.append(req)
                self._preempt(req)
                break
            info = self._info(req)
            step.add(req, n, left > 1, None if info is None else info.slot)
            i += 1
        if preempted:
            self.running = [r for r in self.running if r.status is RequestStatus.RUNNING]
        return preempted

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
        for req in self.policy.upcoming(depth):
            info = self._info(req)
            if info is not None and not info.on_host:
                adapters.prefetch(info)

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

    def _admitter(self, step: _StepBudget) -> Callable[[Request, bool], AdmitResult]:
        """The admission check policies call, one waiting request at a time."""
        kv, adapters, max_seqs = self.kv, self.adapters, self.config.max_num_seqs
        draining = False

        def admit(req: Request, aged: bool) -> AdmitResult:
            nonlocal draining
            if len(self.running) >= max_seqs or step.tokens <= 0 or step.prefill <= 0:
                return AdmitResult.STOP
            info = self._info(req)
            if info is not None:
                if draining:  # an aged request waits for a slot: let running adapters drain
                    return AdmitResult.SKIP_ADAPTER
                if info.slot is None and not adapters.can_take_slot():
                    draining = draining or aged
                    return AdmitResult.SKIP_ADAPTER
            hit = kv.match(req)
            n = min(req.num_tokens - hit.num_tokens, step.tokens, step.prefill)
            if not kv.can_allocate(kv.pool.pages_for(hit.num_tokens + n) - len(hit.pages)):
                kv.undo_match(req, hit)
                return AdmitResult.STOP
            if info is not None and adapters.acquire(info) is None:
                kv.undo_match(req, hit)
                draining = draining or aged
                return AdmitResult.SKIP_ADAPTER
            allocated = kv.allocate(req, n, hit)
            assert allocated, f"{req!r}: pages vanished between check and allocation"
            self._start(req, hit.num_tokens, info)
            step.add(req, n, True, None if info is None else info.slot)
            return AdmitResult.ADMITTED

        return admit

    def _start(self, req: Request, num_cached: int, info: AdapterInfo | None) -> None:
        if req.num_cached_tokens < 0:
            req.num_cached_tokens = num_cached
            self.kv.num_prefix_queries += 1
            self.kv.num_prefix_query_tokens += req.num_prompt_tokens
            self.kv.num_prefix_hit_tokens += num_cached
        if req.first_scheduled_time is None:
            req.first_scheduled_time = self.clock()
        req.status = RequestStatus.RUNNING
        self.running.append(req)
        if info is not None:
            self.adapters.start_running(info)

    # --- after the executor ran ---
    def update_from_output(self, out: SchedulerOutput, result: RunnerOutput) -> StepUpdate:
        new_tokens: list[tuple[Request, int]] = []
        finished: list[Request] = []
        requests, kv, policy = self.requests, self.kv, self.policy
        for seq, token in zip(out.seqs, result.sampled_token_ids, strict=True):
            req = requests.get(seq.request_id)
            if req is None or req.status is not RequestStatus.RUNNING:
                continue  # finished from outside while the step ran
            req.num_computed_tokens += len(seq.token_ids)
            if seq.sample:
                assert token is not None, f"{req!r}: executor sampled nothing"
                req.token_ids.append(token)
                policy.on_output_tokens(req, 1)
                new_tokens.append((req, token))
                kv.cache_computed(req)
                status = self._stop_status(req, token)
                if status is not None:
                    self._finish(req, status)
                    finished.append(req)
            else:
                kv.cache_computed(req)
        if finished:
            self.running = [r for r in self.running if r.status is RequestStatus.RUNNING]
        return StepUpdate(new_tokens, finished)

    @staticmethod
    def _stop_status(req: Request, token: int) -> RequestStatus | None:
        n_out = req.num_output_tokens
        if n_out >= req.min_tokens and (
            token in req.stop_token_ids or (not req.ignore_eos and token in req.eos_token_ids)
        ):
            return RequestStatus.FINISHED_STOPPED
        if n_out >= req.max_tokens or req.num_tokens >= req.max_total_tokens:
            return RequestStatus.FINISHED_LENGTH
        return None

    # --- introspection ---
    def waiting_by_adapter(self) -> Counter[str]:
        return Counter(r.lora_name or "" for r in self.policy)

    def running_by_adapter(self) -> Counter[str]:
        return Counter(r.lora_name or "" for r in self.running)

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

    __slots__ = ("prefill", "seqs", "tokens")

    def __init__(self, tokens: int, prefill: int) -> None:
        self.tokens = tokens
        self.prefill = prefill
        self.seqs: list[ScheduledSeq] = []

    def add(self, req: Request, n: int, is_prefill: bool, slot: int | None) -> None:
        start = req.num_computed_tokens
        self.seqs.append(
            ScheduledSeq(
                req.request_id,
                req.token_ids[start : start + n],
                start,
                req.page_ids,
                req.adapter_uid,
                slot,
                start + n == len(req.token_ids),
                req.sampling,
            )
        )
        self.tokens -= n
        if is_prefill:
            self.prefill -= n
