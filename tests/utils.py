"""Shared factories for the tests: requests, schedulers, a fake clock, a step loop."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

from loramux.config import SchedulerConfig
from loramux.core.adapters import AdapterManager
from loramux.core.kv_manager import KVCacheManager
from loramux.core.outputs import SchedulerOutput
from loramux.core.request import Request
from loramux.core.scheduler import Scheduler
from loramux.executor.fake import FakeExecutor


class FakeClock:
    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float = 1.0) -> None:
        self.t += dt


def make_scheduler(
    num_pages: int = 64,
    page_size: int = 4,
    max_loras: int = 2,
    max_cpu_loras: int | None = None,
    max_lora_rank: int = 64,
    max_lora_bytes: int | None = None,
    prefix: bool = True,
    events: bool = False,
    max_model_len: int = 4096,
    clock: FakeClock | None = None,
    adapters: tuple[str, ...] = (),
    host_pages: int = 0,
    **sched: object,
) -> Scheduler:
    cfg = SchedulerConfig(**{"max_num_seqs": 8, "max_num_batched_tokens": 64, **sched})  # type: ignore[arg-type]
    kv = KVCacheManager.create(num_pages, page_size, prefix, events, host_pages)
    mgr = AdapterManager(max_loras, max_cpu_loras or max(max_loras, 4), max_lora_rank, max_lora_bytes)
    s = Scheduler(cfg, kv, mgr, max_model_len, clock=clock or FakeClock())
    for name in adapters:
        s.register_adapter(name, version="v1", rank=8, nbytes=1000)
    return s


_counter = iter(range(10**9))


def make_request(
    prompt: list[int] | int = 8,
    max_tokens: int = 4,
    lora: str | None = None,
    rid: str | None = None,
    arrival: float = 0.0,
    **kw: object,
) -> Request:
    if isinstance(prompt, int):
        prompt = list(range(1, prompt + 1))
    return Request(
        rid or f"r{next(_counter)}",
        prompt,
        max_tokens,
        lora_name=lora,
        arrival_time=arrival,
        ignore_eos=kw.pop("ignore_eos", True),
        **kw,
    )  # type: ignore[arg-type]


def step(s: Scheduler, ex: FakeExecutor, check: bool = True) -> SchedulerOutput:
    out = s.schedule()
    s.update_from_output(out, ex.execute(out))
    if check:
        s.check_integrity()
    return out


def run(
    s: Scheduler,
    ex: FakeExecutor,
    max_steps: int = 10_000,
    clock: FakeClock | None = None,
    check: bool = True,
) -> list[SchedulerOutput]:
    outs = []
    while s.has_unfinished():
        assert len(outs) < max_steps, f"not done after {max_steps} steps: {list(s.requests.values())}"
        outs.append(step(s, ex, check))
        if clock is not None:
            clock.advance()
    return outs


def fake_for(s: Scheduler, **kw: object) -> FakeExecutor:
    return FakeExecutor(s.kv.pool.num_pages, s.kv.pool.page_size, **kw)  # type: ignore[arg-type]


def stop_across_chunks(pieces: list[str]) -> str:
    """A two-character stop string whose first character ends one streamed chunk and whose
    second starts the next, and that occurs nowhere earlier (issue 12, point 1)."""
    full, b = "".join(pieces), 0
    for p in pieces[:-1]:
        b += len(p)
        stop = full[b - 1 : b + 1]
        if p and len(stop) == 2 and "\ufffd" not in stop and full.find(stop) == b - 1:
            return stop
    raise AssertionError(f"no chunk boundary to stop at in {pieces!r}")


def import_benchmark(name: str) -> ModuleType:
    """A script under benchmarks/ as a module (its sibling imports found while it loads)."""
    where = str(Path(__file__).resolve().parents[1] / "benchmarks")
    sys.path.insert(0, where)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(where)
