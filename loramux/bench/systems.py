"""The systems a benchmark compares, each run on the same model and the same requests.

Boundary: each runner takes the workload's requests (and their prompt token
ids) and returns per-request times; report.py turns them into numbers. Modes:
offline (every request there at t=0) and online (requests arrive at their
trace times, in real time).

- loramux: the engine with continuous batching, every request under its adapter.
- loramux, base only: the same requests on the base model (the LoRA overhead).
- transformers+PEFT, mixed: static batches in arrival order, one `generate`
  per batch with `adapter_names` (each row its own adapter).
- transformers+PEFT, one adapter at a time: S-LoRA's PEFT baseline: take the
  oldest waiting request's adapter, batch the waiting requests for it,
  `set_adapter`, `generate`.

Every request produces exactly its output length (eos is ignored), as in S-LoRA.
"""

from __future__ import annotations

import gc
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loramux.config import SchedulerConfig
from loramux.workload import BenchRequest, adapter_name


@dataclass
class Record:
    index: int
    arrival: float  # seconds after the run started
    first_token: float | None = None
    finish: float | None = None
    output_tokens: int = 0
    aborted: bool = False  # finished for a reason other than its length or a stop


@dataclass
class RunResult:
    system: str
    mode: str
    records: list[Record]
    wall: float  # first arrival to last completion
    adapter_loads: int = 0
    notes: dict[str, Any] = field(default_factory=dict)


def make_prompts(reqs: list[BenchRequest], vocab: int, seed: int = 0) -> list[list[int]]:
    """Random token-id prompts of each request's input length (ids 3.. avoid the special tokens)."""
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(r.input_len)] for r in reqs]


def _sync(device: Any) -> None:
    import torch

    if getattr(device, "type", "cpu") == "cuda":
        torch.cuda.synchronize()


# --- loramux -----------------------------------------------------------------------------------------


@dataclass
class LoramuxSettings:
    max_loras: int = 32
    max_cpu_loras: int = 256
    max_lora_rank: int = 8
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    kv_cache_memory: int = 2**30  # 1 GiB, as the recorded runs used
    device: str = "auto"
    policy: str = "fcfs"
    ttft_slo_s: float = SchedulerConfig.ttft_slo_s  # the slo policy's target
    slo_wait_factor: float = SchedulerConfig.slo_wait_factor
    tenant_per_adapter: bool = False  # each adapter its own tenant (what `fair` shares between)
    step_log: str | None = None  # write the engine's step log here (issue 25)


def run_loramux(
    model_dir: Path,
    adapter_dirs: list[Path],
    reqs: list[BenchRequest],
    prompts: list[list[int]],
    mode: str,
    settings: LoramuxSettings,
    base_only: bool = False,
) -> RunResult:
    from loramux import LLM, SamplingParams

    engine_settings = {k: v for k, v in asdict(settings).items() if k != "tenant_per_adapter"}
    eng = LLM(str(model_dir), **engine_settings).engine
    if not base_only:
        for i, d in enumerate(adapter_dirs):
            eng.add_lora(adapter_name(i), str(d))
    _warm_up(eng, prompts, None if base_only else adapter_name(reqs[0].adapter))
    records = {r.index: Record(r.index, 0.0 if mode == "offline" else r.arrival) for r in reqs}
    pending = sorted(reqs, key=lambda r: r.arrival) if mode == "online" else list(reqs)
    t0 = time.perf_counter()
    while pending or eng.has_unfinished_requests():
        now = time.perf_counter() - t0
        while pending and (mode == "offline" or pending[0].arrival <= now):
            r = pending.pop(0)
            eng.add_request(
                f"b{r.index}",
                prompts[r.index],
                SamplingParams(max_tokens=r.output_len, ignore_eos=True, temperature=0.0),
                lora_name=None if base_only else adapter_name(r.adapter),
                tenant=adapter_name(r.adapter) if settings.tenant_per_adapter else "",
            )
        if not eng.has_unfinished_requests():
            time.sleep(max(0.0, min(pending[0].arrival - now, 0.05)))
            continue
        outs = eng.step()
        _sync(eng.executor.device)
        t = time.perf_counter() - t0
        for out in outs:
            rec = records[int(out.request_id[1:])]
            if rec.first_token is None:
                rec.first_token = t
            if out.finished:
                rec.finish, rec.output_tokens = t, len(out.outputs[0].token_ids)
                rec.aborted = out.outputs[0].finish_reason not in ("length", "stop")
    wall = max(rec.finish or 0.0 for rec in records.values()) - min(rec.arrival for rec in records.values())
    snap = eng.snapshot()
    if getattr(eng, "step_log", None) is not None:
        eng.step_log.close()
    loads = getattr(eng.executor, "load_stats", None)  # the fake executor has none
    if hasattr(eng.executor, "close"):
        eng.executor.close()
    gc.collect()
    return RunResult(
        "loramux, base only" if base_only else "loramux",
        mode,
        list(records.values()),
        wall,
        int(snap.counters["device_loads"]),
        {
            "preemptions": int(snap.counters["preemptions"]),
            "max_adapters_per_step": int(snap.counters["max_adapters_per_step"]),
            # seconds of adapter loading: disk -> host (reader thread), host -> slot, steps waiting
            "load_seconds": (loads.host_seconds, loads.device_seconds, loads.wait_seconds) if loads else None,
        },
    )


def _warm_up(eng: Any, prompts: list[list[int]], lora: str | None) -> None:
    """One short request through every code path, so the timed run starts warm."""
    from loramux import SamplingParams

    eng.add_request("warm", prompts[0][:8], SamplingParams(max_tokens=4, ignore_eos=True), lora_name=lora)
    while eng.has_unfinished_requests():
        eng.step()


# --- transformers + PEFT ---------------------------------------------------------------------------------


class PeftHarness:
    """One PeftModel holding every adapter the workload uses."""

    def __init__(self, model_dir: Path, adapter_dirs: dict[int, Path], device: str) -> None:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        self.device = torch.device(
            "cuda" if device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
        )
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(self.device)
        items = sorted(adapter_dirs.items())
        model = PeftModel.from_pretrained(base, items[0][1], adapter_name=adapter_name(items[0][0]))
        for i, d in items[1:]:
            model.load_adapter(d, adapter_name=adapter_name(i))
        self.model = model.eval()
        self.pad = 1

    def generate(
        self,
        prompts: list[list[int]],
        new_tokens: int,
        adapter_names: list[str] | None = None,
        single: str | None = None,
    ) -> float:
        """Generate `new_tokens` for every row (left-padded); returns seconds until the first token."""
        import contextlib

        import torch

        width = max(len(p) for p in prompts)
        ids = torch.tensor([[self.pad] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        first = _FirstToken()
        kwargs: dict[str, Any] = dict(
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=self.pad,
            streamer=first,
        )
        if adapter_names is not None:
            kwargs["adapter_names"] = adapter_names
        ctx: Any = contextlib.nullcontext()
        if single is None and adapter_names is None:
            ctx = self.model.disable_adapter()
        elif single is not None:
            self.model.set_adapter(single)
        t0 = time.perf_counter()
        with torch.inference_mode(), ctx:
            self.model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        _sync(self.device)
        return (first.at or time.perf_counter()) - t0


class _FirstToken:
    """A `generate` streamer that only notes when the first new token appears."""

    def __init__(self) -> None:
        self.calls = 0
        self.at: float | None = None

    def put(self, value: Any) -> None:
        self.calls += 1
        if self.calls == 2 and self.at is None:  # call 1 is the prompt
            self.at = time.perf_counter()

    def end(self) -> None:
        return None


def run_peft(
    harness: PeftHarness,
    reqs: list[BenchRequest],
    prompts: list[list[int]],
    mode: str,
    batch_size: int,
    one_adapter: bool,
) -> RunResult:
    """Static batches: mixed (`adapter_names`) or one adapter at a time (`set_adapter`)."""
    records = {r.index: Record(r.index, 0.0 if mode == "offline" else r.arrival) for r in reqs}
    pending = sorted(reqs, key=lambda r: r.arrival)
    waiting: list[BenchRequest] = []
    switches, current = 0, None
    t0 = time.perf_counter()
    while pending or waiting:
        now = time.perf_counter() - t0
        while pending and (mode == "offline" or pending[0].arrival <= now):
            waiting.append(pending.pop(0))
        if not waiting:
            time.sleep(max(0.0, min(pending[0].arrival - now, 0.05)))
            continue
        if one_adapter:  # the oldest request's adapter, and the waiting requests that share it
            head = waiting[0].adapter
            batch = [r for r in waiting if r.adapter == head][:batch_size]
            switches += head != current
            current = head
        else:
            batch = waiting[:batch_size]
        for r in batch:
            waiting.remove(r)
        start = time.perf_counter() - t0
        longest = max(r.output_len for r in batch)  # a static batch runs until its longest request is done
        names = [adapter_name(r.adapter) for r in batch]
        ttft = harness.generate(
            [prompts[r.index] for r in batch],
            longest,
            adapter_names=None if one_adapter else names,
            single=adapter_name(batch[0].adapter) if one_adapter else None,
        )
        end = time.perf_counter() - t0
        for r in batch:
            rec = records[r.index]
            rec.first_token, rec.finish, rec.output_tokens = start + ttft, end, r.output_len
    wall = max(rec.finish or 0.0 for rec in records.values()) - min(rec.arrival for rec in records.values())
    system = "transformers+PEFT, one adapter at a time" if one_adapter else "transformers+PEFT, mixed"
    return RunResult(
        system, mode, list(records.values()), wall, switches if one_adapter else 0, {"batch_size": batch_size}
    )
