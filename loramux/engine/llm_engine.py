"""LLMEngine: the step loop, schedule -> execute -> update, and everything around it.

Boundary: the engine owns the tokenizer, the scheduler and an executor (the
PyTorch `ModelRunner`, or the fake one in tests). It turns prompts into
control-plane requests and sampled tokens into text, applies stop strings,
and registers adapters. It is single-threaded: the server runs it on one
thread and sends it work through `AsyncEngine`.

A failed step is fatal, as vLLM's EngineDeadError is: by the time the
executor raises, the control plane has handed out adapter slots and planned
KV copies that may or may not have happened, so no later step could trust the
weights in a slot or the KV in a page. The engine ends every request and then
refuses all work with `EngineDeadError`, naming the cause; the server answers
503 and fails its health check until it is restarted.

A fault that belongs to one request is not fatal: values the sampler indexes
or converts are checked against the vocabulary at admission, and what still
fails for one request alone (its sampling row, its detokenizing or stop
strings) ends that request with finish_reason "error" and a
`RequestFailedError` in its output; the other requests go on.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import math
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from loramux.config import SAMPLING_DEFAULT_FIELDS, EngineConfig, ModelConfig, RuntimeInfo
from loramux.core.adapters import AdapterInfo, AdapterManager, AdapterNotFoundError, AdapterPlan
from loramux.core.kv_manager import KVCacheManager
from loramux.core.outputs import RunnerOutput, SampleLogprobs, SchedulerOutput, TokenMasks
from loramux.core.request import Request, RequestStatus
from loramux.core.scheduler import Scheduler, StepUpdate
from loramux.engine.detokenizer import IncrementalDetokenizer
from loramux.engine.grammar import Constraint, GrammarCache, allocate_bitmask
from loramux.engine.kv_events import KVEventPublisher
from loramux.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from loramux.engine.request_stats import FINISH_REASONS, RequestStats
from loramux.engine.stats import EngineLimits, EngineSnapshot
from loramux.engine.step_log import StepLog
from loramux.lora_request import LoRARequest
from loramux.sampling_params import SamplingParams, StructuredOutputsParams

logger = logging.getLogger("loramux.engine")


class Executor(Protocol):
    num_pages: int
    max_model_len: int
    vocab_size: int

    def inspect_adapter(self, name: str, path: str) -> Any: ...

    def register_adapter(self, uid: int, spec: Any) -> None: ...

    def apply_adapter_plan(self, plan: AdapterPlan) -> None: ...

    def pending_reads(self, uids: Iterable[int]) -> int: ...

    def execute(self, out: SchedulerOutput) -> RunnerOutput: ...


def sample_ids(request_id: str, n: int) -> list[str]:
    """The engine request ids of a request's n samples: the id itself when n is 1."""
    return [request_id] if n == 1 else [f"{request_id}-{i}" for i in range(n)]


class EngineDeadError(RuntimeError):
    """A step failed and the engine stopped; restart it."""


class RequestFailedError(RuntimeError):
    """One request failed on its own (its sampling, its text); the engine serves the others on."""


@dataclass
class _State:
    """What the engine keeps per request beside the control plane's counters."""

    req: Request
    params: SamplingParams
    prompt: str | None
    detok: IncrementalDetokenizer
    metrics: RequestMetrics
    logprobs: list[SampleLogprobs] | None
    stop_reason: int | str | None = None
    error: Exception | None = None  # why it ended with finish_reason "error"
    group: _Group | None = None
    grammar: concurrent.futures.Future[Any] | None = None  # structured output: the compiled grammar
    constraint: Constraint | None = None  # its matcher, made when the request first samples
    prompt_logprobs: list[SampleLogprobs | None] | None = None  # entry i: prompt token i's (0: None)


@dataclass
class _Group:
    """The samples of one request (n of them), for the per-request figures vLLM records when the
    last one ends: n, max_tokens as asked (None when the engine filled it), the longest output."""

    n: int
    max_tokens: int | None
    left: int = 0
    longest: int = 0


class LLMEngine:
    def __init__(
        self,
        config: EngineConfig,
        executor: Executor | None = None,
        tokenizer: Any = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        if executor is None:
            from loramux.executor.loader import load_tokenizer
            from loramux.executor.model_runner import ModelRunner

            executor = ModelRunner(config.model, config.cache, config.lora, config.scheduler.max_num_seqs)
            if tokenizer is None and not config.model.skip_tokenizer_init:
                tokenizer = load_tokenizer(config.model.model)
        if config.model.chat_template is not None:
            if tokenizer is None:
                raise ValueError("a chat template needs a tokenizer, and this engine has none")
            tokenizer.chat_template = config.model.chat_template
        self.executor = executor
        self.tokenizer = tokenizer
        self.clock = clock
        gen = _generation_config(config.model.model)
        self.runtime = RuntimeInfo(
            num_pages=executor.num_pages,
            max_model_len=executor.max_model_len,
            eos_token_ids=tuple(sorted(_eos_ids(gen, tokenizer))),
            vocab_size=executor.vocab_size,
            device=str(getattr(executor, "device", "cpu")),
            dtype=str(getattr(executor, "dtype", "n/a")).replace("torch.", ""),
            sampling_defaults=_sampling_defaults(config.model, gen),
        )
        c = config.cache
        events = c.enable_kv_events or config.kv_events is not None
        keep_idle = None
        if getattr(executor, "commits_kv_as_used", False):
            keep_idle = c.idle_cache_pages
            if keep_idle is None:
                keep_idle = config.scheduler.max_num_batched_tokens // c.page_size
        kv = KVCacheManager.create(
            self.runtime.num_pages, c.page_size, c.enable_prefix_caching, events, c.host_kv_pages, keep_idle
        )
        self.kv_publisher: KVEventPublisher | None = None
        if config.kv_events is not None:
            self.kv_publisher = KVEventPublisher(config.kv_events, c.page_size)
        lc = config.lora
        adapters = AdapterManager(lc.max_loras, lc.cpu_slots, lc.max_lora_rank, lc.max_lora_bytes)
        self.scheduler = Scheduler(
            config.scheduler,
            kv,
            adapters,
            self.runtime.max_model_len,
            clock,
            base_identity=f"base:{Path(config.model.model).name}",
        )
        self._states: dict[str, _State] = {}
        self._adapter_paths: dict[str, str] = {}
        self._invocations: dict[str, tuple[int, ...]] = {}  # activated LoRAs: adapter -> invocation tokens
        self.dead: EngineDeadError | None = None
        self._followers: dict[str, list[Request]] = {}  # leader id -> samples waiting for its prefill
        self._pending: list[RequestOutput] = []  # outputs made between steps, returned by the next one
        self._read_ahead: list[int] = []  # adapters read ahead at start (uids)
        self.request_stats = RequestStats(self.runtime.max_model_len)  # vLLM's figures (snapshot())
        self._gaps: dict[float, int] = {}  # this step's gaps between tokens, and how many had each
        self._grammars = (
            None
            if tokenizer is None
            else GrammarCache(tokenizer, self.runtime.vocab_size, self.runtime.eos_token_ids)
        )  # compiles nothing until the first structured request
        self._compiling: dict[str, Request] = {}  # requests held back until their grammar compiles
        self._constrained: set[str] = set()  # requests with a grammar (their rows get masks)
        self.step_log: StepLog | None = None
        if config.logs.step_log is not None:
            self.step_log = StepLog(
                config.logs.step_log,
                {
                    "model": Path(config.model.model).name,
                    "num_pages": self.runtime.num_pages,
                    "page_size": c.page_size,
                    "max_model_len": self.runtime.max_model_len,
                    "commits_kv_as_used": bool(getattr(executor, "commits_kv_as_used", False)),
                    "device": self.runtime.device,
                    "dtype": self.runtime.dtype,
                    "max_num_seqs": config.scheduler.max_num_seqs,
                    "max_num_batched_tokens": config.scheduler.max_num_batched_tokens,
                    "max_loras": lc.max_loras,
                },
            )

    def _check_alive(self) -> None:
        if self.dead is not None:
            raise self.dead

    def die(self, cause: BaseException, where: str = "a failed step") -> EngineDeadError:
        """Stop for good: end every request, refuse everything after (also called by the server's
        engine thread for an error outside a step). Idempotent: the first cause stays."""
        if self.dead is not None:
            return self.dead
        self.dead = EngineDeadError(
            f"the engine stopped after {where} ({type(cause).__name__}: {cause}); adapter slots "
            f"and KV pages can no longer be trusted, so it serves nothing more: restart the server"
        )
        for rid in list(self.scheduler.requests):
            self.scheduler.abort_request(rid)
        self._states.clear()
        self._constrained.clear()
        self._followers.clear()
        self._compiling.clear()
        self._pending.clear()
        return self.dead

    # --- adapters ---
    def add_lora(self, name: str, path: str, pinned: bool = False, replace: bool = False) -> AdapterInfo:
        """Check the adapter against the model and register it; raises ValueError with the reason.
        With `replace` (vLLM's load_inplace), a load already under `name` gives way to this one at
        once: requests the scheduler holds finish on the old weights, later ones (and samples of
        an n>1 request still waiting for the first one's prompt, and requests whose grammar is
        still compiling) get the new, and neither reads the other's KV. A load that fails a check
        leaves the old one serving."""
        self._check_alive()
        spec = self.executor.inspect_adapter(name, path)
        info = self.scheduler.register_adapter(
            name, spec.version, spec.rank, spec.nbytes, path, pinned, replace
        )
        self.executor.register_adapter(info.uid, spec)
        if self.step_log is not None:
            self.step_log.adapter(info.uid, spec.rank, spec.nbytes)
        self._adapter_paths[name] = str(path)
        self._invocations.pop(name, None)
        if getattr(spec, "invocation", ()):  # activated LoRA
            self._invocations[name] = tuple(spec.invocation)
        self._publish_kv_events()
        return info

    def read_loras_ahead(self, names: Iterable[str]) -> int:
        """Start reading these registered adapters from disk into host memory in the background,
        in order, up to max_loras and while host memory has room (nothing is evicted for it);
        returns how many reads started. The server does this as its port opens for the adapters
        named at start, so their first requests do not wait on the disk (`loras_loading` counts
        what is left)."""
        self._check_alive()
        adapters, started = self.scheduler.adapters, []
        for name in names:
            if adapters.host_room <= 0 or len(started) >= adapters.max_loras:
                break  # as many as one step can use: more would compete with the first requests
            if name in adapters and not (info := adapters.get(name)).on_host:
                adapters.prefetch(info)
                started.append(info.uid)
        self.executor.apply_adapter_plan(adapters.take_plan())  # what the next step would do first
        self._read_ahead = started
        return len(started)

    def loras_loading(self) -> int:
        """Adapters of the last `read_loras_ahead` whose weights are still being read."""
        return self.executor.pending_reads(self._read_ahead)

    def ensure_lora(self, lora: LoRARequest) -> None:
        """Register `lora` on first use, or again in place with `load_inplace`; refuse a second,
        different adapter under the same name otherwise."""
        known = self._adapter_paths.get(lora.lora_name)
        if known is None or lora.lora_name not in self.scheduler.adapters:
            self.add_lora(lora.lora_name, lora.lora_path)
        elif lora.load_inplace:
            self.add_lora(lora.lora_name, lora.lora_path, replace=True)
        elif Path(known).resolve() != Path(lora.lora_path).resolve():
            raise ValueError(
                f"adapter {lora.lora_name!r} is loaded from {known!r}, not {lora.lora_path!r}; "
                f"unload it first, use another name, or load it in place (load_inplace=True)"
            )

    def remove_lora(self, name: str) -> AdapterInfo:
        info = self.scheduler.unregister_adapter(name)
        self._adapter_paths.pop(name, None)
        self._invocations.pop(name, None)
        self._publish_kv_events()  # the namespace's idle pages went with it
        return info

    def list_loras(self) -> list[AdapterInfo]:
        return [self.scheduler.adapters.get(n) for n in self.scheduler.adapters.names()]

    def has_lora(self, name: str) -> bool:
        return name in self.scheduler.adapters

    def lora_names(self) -> list[str]:
        return self.scheduler.adapters.names()

    # --- what front ends may know (engine/stats.py) ---
    def snapshot(self) -> EngineSnapshot:
        """Queues, residency, KV pages and counters now; on the engine's thread, between steps."""
        s = self.scheduler
        adapters, kv, c = s.adapters, s.kv_stats(), s.counters
        name = {a.uid: a.name for a in (adapters.by_uid(u) for u in adapters.host_uids)}
        take_recent = getattr(getattr(self.executor, "load_stats", None), "take_recent", None)
        pub = self.kv_publisher
        return EngineSnapshot(
            running=dict(s.running_by_adapter()),
            waiting=dict(s.waiting_by_adapter()),
            device=[name.get(u, str(u)) for u in adapters.resident_uids],
            host=[name[u] for u in adapters.host_uids],
            pages_total=kv.pages_total,
            pages_free=kv.pages_free,
            pages_cached=kv.pages_cached,
            counters={
                "preemptions": c.num_preemptions,
                "switches": adapters.num_device_loads,
                "naive_switches": c.naive_adapter_switches,
                "device_loads": adapters.num_device_loads,
                "host_loads": adapters.num_host_loads,
                "device_evictions": adapters.num_device_evictions,
                "host_evictions": adapters.num_host_evictions,
                "prefix_query_tokens": kv.prefix_query_tokens,
                "prefix_hit_tokens": kv.prefix_hit_tokens,
                "steps": c.num_steps,
                "kv_offloaded": kv.offloaded,
                "kv_onloaded": kv.onloaded,
                "max_adapters_per_step": c.max_adapters_per_step,
                "kv_events_published": pub.num_published if pub else 0,
                "kv_events_dropped": pub.num_dropped if pub else 0,
                "kv_events_send_errors": pub.num_send_errors if pub else 0,
            },
            finished=dict(c.num_finished),
            load_seconds=take_recent() if take_recent is not None else [],
            references=adapters.references(),
            requests=self.request_stats.copy(),
            time=time.time(),
        )

    def limits(self) -> EngineLimits:
        """Frozen configuration and measured sizes only: safe from any thread."""
        sc, lc, cc = self.config.scheduler, self.config.lora, self.config.cache
        return EngineLimits(
            max_loras=lc.max_loras,
            max_cpu_loras=lc.cpu_slots,
            max_lora_rank=lc.max_lora_rank,
            max_num_seqs=sc.max_num_seqs,
            max_num_batched_tokens=sc.max_num_batched_tokens,
            prefill_budget=sc.prefill_budget,
            max_queue_len=sc.max_queue_len,
            num_pages=self.runtime.num_pages,
            page_size=cc.page_size,
            max_model_len=self.runtime.max_model_len,
            prefix_caching=cc.enable_prefix_caching,
            starvation_timeout_s=sc.starvation_timeout_s,
        )

    # --- structured output ---
    def grammar_future(self, spec: StructuredOutputsParams) -> concurrent.futures.Future[Any]:
        """`spec`'s compiled grammar (a future; done at once if compiled before). Safe from any
        thread: the server compiles ahead with it so that a bad schema is a 400 before queuing.
        A grammar that cannot be compiled raises ValueError (GrammarError) here if that is
        already known."""
        if self._grammars is None:
            raise ValueError("structured outputs need the model's tokenizer, and this engine has none")
        fut = self._grammars.submit(spec)
        if fut.done() and fut.exception() is not None:
            raise fut.exception()  # type: ignore[misc]
        return fut

    def _admit_compiled(self) -> None:
        """Queue the held requests whose grammar is ready; end those whose grammar failed (or
        that can no longer be queued) with the reason. Waits a little when nothing else runs."""
        if not self.scheduler.has_unfinished():
            pending = [self._states[r].grammar for r in self._compiling if r in self._states]
            concurrent.futures.wait([f for f in pending if f is not None], 0.01, "FIRST_COMPLETED")
        for rid, req in list(self._compiling.items()):
            st = self._states.get(rid)
            if st is None:  # aborted meanwhile
                del self._compiling[rid]
                continue
            assert st.grammar is not None
            if not st.grammar.done():
                continue
            del self._compiling[rid]
            err = st.grammar.exception()
            if err is None:
                try:
                    self.scheduler.add_request(req, bounded=False)  # it was admitted under the bound
                    continue
                except ValueError as e:  # its adapter was unloaded meanwhile
                    err = e
            self._end_unstarted(rid, RequestStatus.FINISHED_ERROR, err)  # type: ignore[arg-type]

    def _token_masks(self, out: SchedulerOutput) -> SchedulerOutput:
        """`out` with the allowed tokens of every constrained row that samples this step."""
        rows = []
        for s in out.seqs:
            st = self._states.get(s.request_id) if s.sample else None
            if st is not None and st.grammar is not None:
                if st.constraint is None:
                    st.constraint = Constraint(st.grammar.result())
                st.constraint.sync(st.req.output_token_ids)  # a replay only if they ever differ
                rows.append(st)
        if not rows:
            return out
        bitmask = allocate_bitmask(len(rows), self.runtime.vocab_size)
        for i, st in enumerate(rows):
            st.constraint.fill(bitmask, i)  # type: ignore[union-attr]
        return dataclasses.replace(out, token_masks=TokenMasks([st.req.request_id for st in rows], bitmask))

    # --- requests ---
    def _bad_words_ids(self, words: tuple[str, ...]) -> tuple[tuple[int, ...], ...]:
        """vLLM's bad_words as token sequences: each word as it is and after a space (a word
        mid-text), both without special tokens."""
        if not words:
            return ()
        if self.tokenizer is None:
            raise ValueError(
                "bad_words are matched as tokens of the text, and this engine has no tokenizer "
                "(skip_tokenizer_init); use logit_bias with -100 for single tokens instead"
            )
        seqs: dict[tuple[int, ...], None] = {}
        for word in words:
            for text in (word.lstrip(), " " + word.lstrip()):
                ids = tuple(self.tokenizer.encode(text, add_special_tokens=False))
                if ids:
                    seqs[ids] = None
        return tuple(seqs)

    def add_request(
        self,
        request_id: str | None,
        prompt: str | list[int],
        params: SamplingParams,
        lora_name: str | None = None,
        arrival_time: float | None = None,
        tenant: str = "",
        fill_max_tokens: bool = False,
        after: str | None = None,
        group: _Group | None = None,
        cache_salt: str | None = None,
        priority: int = 0,
    ) -> str:
        """Queue a prompt (text or token ids); raises ValueError for bad input, at once.

        With `fill_max_tokens`, max_tokens becomes whatever room the model's length limit leaves
        (the chat API's default when the client sets no limit). With `after`, the request waits
        until that one has produced its first token, so the prompt's KV is in the prefix cache
        and this request reuses it (the n samples of one prompt, which share one `group`). With
        `cache_salt`, its KV is cached and found only among requests with the same salt. A
        `priority` other than 0 needs the `priority` policy (smaller goes first), as in vLLM.
        """
        self._check_alive()
        if params.n != 1:
            raise ValueError("add_request takes n=1; use add_request_n for several samples of a prompt")
        rid = request_id or uuid.uuid4().hex
        if rid in self._states:
            raise ValueError(
                f"request id {rid!r} is in use by an unfinished request; give each request its own id"
            )
        text, ids = self._tokenize(prompt)
        if params.truncate_prompt_tokens is not None:  # vLLM's left truncation
            k = params.truncate_prompt_tokens
            keep = self.runtime.max_model_len if k == -1 else k
            if len(ids) > keep:
                text, ids = None, ids[-keep:]  # the text no longer matches: outputs decode the ids
        vocab = self.runtime.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"the prompt holds token id {bad}; prompt token ids must lie in [0, {vocab})")
        params.check_vocab(vocab)
        bad_words = self._bad_words_ids(params.bad_words)
        if priority and self.scheduler.policy.name != "priority":
            raise ValueError(
                f"priority={priority} needs priority scheduling, and this engine orders requests by "
                f"{self.scheduler.policy.name!r}; start it with --policy priority (vLLM's "
                "--scheduling-policy priority), or leave priority out"
            )
        if params.stop and self.tokenizer is None:
            raise ValueError(
                "stop strings are matched in the text, and this engine has no tokenizer "
                "(skip_tokenizer_init); send stop_token_ids instead"
            )
        if fill_max_tokens:
            room = self.runtime.max_model_len - len(ids)
            if room < 1:
                raise ValueError(
                    f"the prompt has {len(ids)} tokens; the model's limit is "
                    f"{self.runtime.max_model_len}; shorten the prompt"
                )
            params = dataclasses.replace(params, max_tokens=room, min_tokens=min(params.min_tokens, room))
        now = self.clock() if arrival_time is None else arrival_time
        req = Request(
            rid,
            ids,
            params.max_tokens,
            lora_name=lora_name,
            tenant=tenant,
            arrival_time=now,
            eos_token_ids=frozenset(self.runtime.eos_token_ids),
            stop_token_ids=frozenset(params.stop_token_ids),
            ignore_eos=params.ignore_eos,
            min_tokens=params.min_tokens,
            queue_deadline=math.inf if params.max_queue_time is None else now + params.max_queue_time,
            sampling=params,
            lora_start=_activation(ids, self._invocations.get(lora_name or "", ())),
            cache_salt=cache_salt,
            full_prefill=params.prompt_logprobs is not None,
            bad_words_ids=bad_words,
            priority=priority,
        )
        grammar = (
            None if params.structured_outputs is None else self.grammar_future(params.structured_outputs)
        )
        if after is not None and after in self._followers:
            self._followers[after].append(req)  # checked like any other request when released
        elif grammar is not None and not grammar.done():
            self.scheduler.check(req)  # refused now if it would be; queued once its grammar is ready
            self._compiling[rid] = req
        else:
            self.scheduler.add_request(req)
        detok = IncrementalDetokenizer(
            self.tokenizer, ids, params.skip_special_tokens, params.stop, params.include_stop_str_in_output
        )
        group = group or _Group(1, None if fill_max_tokens else params.max_tokens)
        group.left += 1
        self._states[rid] = _State(
            req,
            params,
            text,
            detok,
            RequestMetrics(now),
            [] if params.logprobs is not None else None,
            group=group,
            grammar=grammar,
            prompt_logprobs=[None] if params.prompt_logprobs is not None else None,
        )
        if grammar is not None:
            self._constrained.add(rid)
        return rid

    def add_request_n(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        lora_name: str | None = None,
        tenant: str = "",
        fill_max_tokens: bool = False,
        cache_salt: str | None = None,
        priority: int = 0,
    ) -> list[str]:
        """`params.n` samples of one prompt as requests `<id>-0` ... (just `<id>` when n is 1).
        The first runs at once; the others are queued once its first token exists, so they find
        the prompt's pages in the prefix cache, in the request's own adapter namespace. A seed
        gives sample i the seed + i."""
        ids = sample_ids(request_id, params.n)
        taken = next((rid for rid in ids if rid in self._states), None)
        if taken is not None:  # before any sample is queued: the unfinished one keeps its id
            raise ValueError(
                f"request id {taken!r} is in use by an unfinished request; give each request its own id"
            )
        if params.n == 1:
            return [
                self.add_request(
                    request_id,
                    prompt,
                    params,
                    lora_name,
                    None,
                    tenant,
                    fill_max_tokens,
                    cache_salt=cache_salt,
                    priority=priority,
                )
            ]
        group = _Group(params.n, None if fill_max_tokens else params.max_tokens)
        try:
            for i, rid in enumerate(ids):  # the later samples follow the first (`after`)
                p = dataclasses.replace(params, n=1, seed=None if params.seed is None else params.seed + i)
                after = ids[0] if i else None
                self.add_request(
                    rid,
                    prompt,
                    p,
                    lora_name,
                    None,
                    tenant,
                    fill_max_tokens,
                    after,
                    group,
                    cache_salt,
                    priority,
                )
                self._followers.setdefault(ids[0], [])
        except Exception:
            for rid in reversed(ids):  # nothing half-admitted (the later samples first)
                if (st := self._states.get(rid)) is not None:
                    st.group = None  # refused, not ended: not counted as a request
                    self.abort_request(rid)
            raise
        return ids

    def _release_followers(self, leader: str) -> None:
        """Queue the samples that waited for `leader`'s first token. One that can no longer be
        queued (its adapter was unloaded meanwhile) ends with that error; none is left waiting."""
        for req in self._followers.pop(leader, []):
            if req.request_id not in self._states:
                continue  # aborted meanwhile
            try:
                self.scheduler.add_request(req, bounded=False)  # the request was admitted as a whole
            except AdapterNotFoundError:
                why = "was unloaded before this sample of the request started"
                err = AdapterNotFoundError(req.lora_name or "", self.scheduler.adapters.names(), why)
                self._end_unstarted(req.request_id, RequestStatus.FINISHED_ERROR, err)
            except ValueError as e:
                self._end_unstarted(req.request_id, RequestStatus.FINISHED_ERROR, e)

    def _end_unstarted(self, rid: str, status: RequestStatus, error: Exception | None = None) -> None:
        """End a sample that never reached the scheduler; its output goes out with the next step."""
        st = self._states[rid]
        st.req.status, st.error = status, error
        self._pending.append(self._make_output(rid, [], self.clock()))

    def _tokenize(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this engine has no tokenizer; send token ids")
            return prompt, list(self.tokenizer.encode(prompt))
        if not all(isinstance(t, int) for t in prompt):
            raise ValueError("a token-id prompt must be a list of integers")
        return None, list(prompt)

    def abort_request(self, request_id: str) -> bool:
        st = self._states.pop(request_id, None)
        self._constrained.discard(request_id)
        if st is not None and st.group is not None:
            self._record_end(st, "abort", self.clock())
        self._release_followers(request_id)
        self._compiling.pop(request_id, None)
        if st is not None and request_id not in self.scheduler.requests:  # held back, not yet queued
            return True
        return self.scheduler.abort_request(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._pending) or bool(self._compiling)

    # --- the step ---
    def step(self) -> list[RequestOutput]:
        """One step; after a failed one, EngineDeadError (every request has been ended)."""
        self._check_alive()
        log = self.step_log
        if log is not None:
            t0, loads0 = self.clock(), self._load_counters()
        if self._compiling:
            self._admit_compiled()
        out = self.scheduler.schedule()
        try:
            if self._constrained:
                out = self._token_masks(out)
            result = self._execute(out)
        except Exception as e:
            raise self.die(e) from e
        update = self.scheduler.update_from_output(out, result)
        if log is not None and out.seqs:
            loads = self._load_counters()
            waited = loads[4] - loads0[4]  # adapter copies and reads waited for, fitted apart
            log.step(out, self.clock() - t0 - waited, loads[:4])
        self._publish_kv_events()
        outputs = self._outputs(out, result, update)
        if self._pending:
            outputs, self._pending = self._pending + outputs, []
        return outputs

    def _load_counters(self) -> tuple[float, float, float, float, float]:
        """The executor's adapter-load counters: host reads, their seconds, device copies, their
        seconds, and the seconds steps spent on copies and waiting for reads."""
        st = getattr(self.executor, "load_stats", None)
        if st is None:
            return (0, 0.0, 0, 0.0, 0.0)
        get = getattr
        return (
            get(st, "host_loads", 0),
            st.host_seconds,
            get(st, "device_loads", 0),
            st.device_seconds,
            st.device_seconds + st.wait_seconds,
        )

    def _publish_kv_events(self) -> None:
        """Hand the prefix cache's events to the publisher (or drop them: nobody listens)."""
        events = self.scheduler.take_kv_events()
        if events and self.kv_publisher is not None:
            self.kv_publisher.publish(events)

    def _execute(self, out: SchedulerOutput) -> RunnerOutput:
        try:
            return self.executor.execute(out)
        except Exception:
            logger.exception(
                "step %d failed: %d seqs, %d tokens, adapters %s, plan %s",
                out.step,
                len(out.seqs),
                out.num_batched_tokens,
                sorted(out.adapter_uids),
                out.adapter_plan,
            )
            raise

    def _outputs(self, out: SchedulerOutput, result: RunnerOutput, update: StepUpdate) -> list[RequestOutput]:
        now = self.clock()
        for rid, (start, found) in (result.prompt_logprobs or {}).items():
            st = self._states.get(rid)
            if st is not None and st.prompt_logprobs is not None:
                have = len(st.prompt_logprobs) - (start + 1)  # a recompute (preemption) repeats rows
                if have >= 0:
                    st.prompt_logprobs.extend(found[have:])
        lps: dict[str, SampleLogprobs] = {}
        if result.logprobs is not None:
            pairs = zip(out.seqs, result.logprobs, strict=True)
            lps = {s.request_id: lp for s, lp in pairs if lp is not None}
        touched: dict[str, list[int]] = {}
        for rid in out.finished_ids:  # ended in schedule(): past their queue deadline
            st = self._states.get(rid)
            if st is not None and st.req.status is RequestStatus.FINISHED_TIMEOUT:
                touched[rid] = []
                for f in self._followers.pop(rid, []):  # its other samples waited just as long
                    if f.request_id in self._states:
                        self._end_unstarted(f.request_id, RequestStatus.FINISHED_TIMEOUT)
        for req in update.finished:  # the executor could not sample for these alone
            rid = req.request_id
            if req.status is RequestStatus.FINISHED_ERROR and (st := self._states.get(rid)) is not None:
                why = (result.errors or {}).get(rid, "failed")
                st.error = RequestFailedError(f"request {rid}: {why}; the other requests are served on")
                touched[rid] = []
                self._release_followers(rid)
        for req, token in update.new_tokens:
            st = self._states.get(req.request_id)
            if st is None:
                continue
            touched.setdefault(req.request_id, []).append(token)
            try:
                self._take_token(st, req, token, lps.get(req.request_id), now)
            except Exception as e:
                self._fail(st, e, "turning its tokens into text")
        stats = self.request_stats
        stats.generation_tokens += len(update.new_tokens)
        if out.num_batched_tokens:
            stats.hist["step_tokens"].add(out.num_batched_tokens)
        if self._gaps:
            for gap, n in self._gaps.items():
                stats.hist["token_gap"].add(gap, n)
            self._gaps.clear()
        return [self._make_output(rid, delta_ids, now) for rid, delta_ids in touched.items()]

    def _take_token(
        self, st: _State, req: Request, token: int, lp: SampleLogprobs | None, now: float
    ) -> None:
        """One sampled token of one request: first-token bookkeeping, logprobs, text, stop strings."""
        if st.constraint is not None:
            st.constraint.accept(token)
            if st.constraint.terminated and not req.is_finished:  # the grammar ended it (min_tokens yields)
                self.scheduler.finish_request(req.request_id, RequestStatus.FINISHED_STOPPED)
                st.stop_reason = token
        m = st.metrics
        if m.first_token_time is None:
            m.first_token_time = now
            m.first_scheduled_time = req.first_scheduled_time
            self.request_stats.hist["ttft"].add(now - m.arrival_time)
            self.request_stats.prompt_tokens += req.num_prompt_tokens
            if req.request_id in self._followers:  # its prompt's pages are cached now
                self._release_followers(req.request_id)
        else:
            gap = now - m.last_token_time  # type: ignore[operator]
            self._gaps[gap] = self._gaps.get(gap, 0) + 1
        m.last_token_time = now
        if st.logprobs is not None and lp is not None:
            st.logprobs.append(lp)
        _, stop_str = st.detok.add(token)
        if stop_str is not None:
            st.stop_reason = stop_str
            if req.is_finished:  # it also hit max_tokens this step: the stop string wins
                req.status = RequestStatus.FINISHED_STOPPED
            else:
                self.scheduler.finish_request(req.request_id, RequestStatus.FINISHED_STOPPED)
        elif req.status is RequestStatus.FINISHED_STOPPED and token in req.stop_token_ids:
            st.stop_reason = token

    def _fail(self, st: _State, cause: Exception, what: str) -> None:
        """End one request for a fault of its own (call from an except block); the rest go on."""
        rid = st.req.request_id
        logger.exception("request %s failed while %s; it ends, the others go on", rid, what)
        st.error = RequestFailedError(
            f"request {rid} failed while {what} ({type(cause).__name__}: {cause}); "
            f"the other requests are served on"
        )
        if st.req.is_finished:
            st.req.status = RequestStatus.FINISHED_ERROR
        else:
            self.scheduler.finish_request(rid, RequestStatus.FINISHED_ERROR)

    def _make_output(self, rid: str, delta_ids: list[int], now: float) -> RequestOutput:
        st = self._states[rid]
        req = st.req
        text, delta_text = "", ""
        if st.error is None:
            try:
                if req.is_finished and (st.stop_reason is None or isinstance(st.stop_reason, int)):
                    st.detok.flush()  # no stop string cut the text: decode held-back bytes
                delta_text = st.detok.take_delta(final=req.is_finished)
                text = st.detok.text
            except Exception as e:
                self._fail(st, e, "turning its tokens into text")
                text, delta_text = "", ""
        finished = req.is_finished
        if finished:
            st.metrics.finished_time = now
            del self._states[rid]
            self._constrained.discard(rid)
            if st.group is not None:
                self._record_end(st, req.status.finish_reason or "abort", now)
        completion = CompletionOutput(
            index=0,
            text=text,
            token_ids=req.output_token_ids,
            finish_reason=req.status.finish_reason if finished else None,
            stop_reason=st.stop_reason,
            logprobs=st.logprobs,
            delta_text=delta_text,
            delta_token_ids=delta_ids,
        )
        return RequestOutput(
            rid,
            st.prompt,
            req.prompt_token_ids,
            [completion],
            finished,
            req.lora_name,
            req.num_cached_tokens or 0,
            st.metrics,
            st.error,
            st.prompt_logprobs,
        )

    def _record_end(self, st: _State, reason: str, now: float) -> None:
        """The per-request figures of vLLM's metrics, as a request ends (finished or aborted)."""
        stats, m, req = self.request_stats, st.metrics, st.req
        h = stats.hist
        stats.finished[FINISH_REASONS[reason]] += 1
        out_len = req.num_output_tokens
        h["e2e"].add(now - m.arrival_time)
        h["prompt_len"].add(req.num_prompt_tokens)
        h["output_len"].add(out_len)
        start = req.first_scheduled_time
        h["queue"].add((now if start is None else start) - m.arrival_time)
        if start is not None:
            last = now if m.last_token_time is None else m.last_token_time
            h["inference"].add(last - start)
            if m.first_token_time is not None:
                decode = last - m.first_token_time
                h["prefill"].add(m.first_token_time - start)
                h["decode"].add(decode)
                h["request_tpot"].add(decode / (out_len - 1) if out_len > 1 else 0.0)
        g = st.group
        assert g is not None
        g.left -= 1
        g.longest = max(g.longest, out_len)
        if g.left == 0:  # the request's last sample
            h["n"].add(g.n)
            h["max_output_len"].add(g.longest)
            if g.max_tokens is not None:
                h["max_tokens"].add(g.max_tokens)


NEVER = 1 << 62  # a lora_start no request reaches


def _activation(ids: list[int], invocation: tuple[int, ...]) -> int:
    """Where an activated LoRA starts to apply, as PEFT finds it: the start of the last occurrence
    of its invocation tokens in the prompt (the output after it is adapted too). 0 for a plain
    adapter; past any position when the prompt lacks them (PEFT then serves the base model)."""
    if not invocation:
        return 0
    n = len(invocation)
    for start in range(len(ids) - n, -1, -1):
        if tuple(ids[start : start + n]) == invocation:
            return start
    return NEVER


def _generation_config(model_path: str) -> dict[str, Any]:
    """The model directory's generation_config.json ({} without one)."""
    gen = Path(model_path) / "generation_config.json"
    if not gen.is_file():
        return {}
    import json

    return json.loads(gen.read_text())


def _sampling_defaults(model: ModelConfig, raw: dict[str, Any]) -> tuple[tuple[str, float], ...]:
    """The default sampling values: the model's generation_config.json's (vLLM's
    --generation-config auto) under --override-generation-config's; logged once."""
    found: dict[str, float] = {}
    if model.generation_config == "auto":
        found = {
            k: int(raw[k]) if k == "top_k" else float(raw[k])
            for k in SAMPLING_DEFAULT_FIELDS
            if isinstance(raw.get(k), int | float) and not isinstance(raw.get(k), bool)
        }
    overrides = dict(model.override_generation_config)
    from_file = [f"{k}={v}" for k, v in found.items() if k not in overrides]
    if from_file:
        logger.info(
            "default sampling from the model's generation_config.json: %s (a request's own values "
            "win; --generation-config vllm turns these off)",
            ", ".join(from_file),
        )
    if overrides:
        logger.info(
            "default sampling from --override-generation-config: %s (a request's own values win)",
            ", ".join(f"{k}={v}" for k, v in overrides.items()),
        )
    found.update(overrides)
    return tuple((k, found[k]) for k in SAMPLING_DEFAULT_FIELDS if k in found)


def _eos_ids(raw: dict[str, Any], tokenizer: Any) -> set[int]:
    """The tokenizer's eos id and generation_config.json's (`raw`) eos_token_id(s)."""
    ids: set[int] = set()
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    value = raw.get("eos_token_id")
    if isinstance(value, int):
        ids.add(value)
    elif isinstance(value, list):
        ids.update(int(v) for v in value)
    return ids
