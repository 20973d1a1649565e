"""A fake executor that checks what a real one would silently get wrong.

Boundary: pure Python, no model. It keeps a simulated KV store: every slot of
every page records (namespace, position, hash of the context up to here).
Before computing a request's new tokens it reads the request's earlier slots
back and checks they hold exactly that request's own context in its own
adapter namespace; so a page handed out twice, a prefix served across
adapters, or a page table that lost pages fails loudly. It also mirrors the
adapter plan and checks each request's slot holds its adapter.

The "model": the next token is a pure function of (adapter, whole context),
so `reference_tokens` computes the same output with no paging at all.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from loramux.core.adapters import AdapterPlan
from loramux.core.outputs import RunnerOutput, SchedulerOutput


def _h(prev: int, token: int) -> int:
    d = hashlib.blake2b(prev.to_bytes(8, "little") + token.to_bytes(8, "little", signed=True), digest_size=8)
    return int.from_bytes(d.digest(), "little")


def _ns_seed(uid: int | None) -> int:
    return _h(0x5EED, -1 if uid is None else uid)


@dataclass(frozen=True)
class FakeAdapterSpec:
    version: str
    rank: int
    nbytes: int


class FakeExecutor:
    """Deterministic tokens from the context hash; `eos_every` makes about 1 in N tokens eos."""

    def __init__(
        self,
        num_pages: int,
        page_size: int,
        vocab_size: int = 97,
        eos_token_id: int = 0,
        eos_every: int = 0,
        max_model_len: int = 4096,
    ) -> None:
        self.num_pages = num_pages
        self.page_size = page_size
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id
        self.eos_every = eos_every
        self.kv: list[list[tuple[int | None, int, int] | None]] = [
            [None] * page_size for _ in range(num_pages)
        ]
        self.host_kv: dict[int, list[tuple[int | None, int, int] | None]] = {}  # host-tier pages
        self.slots: dict[int, int] = {}  # slot -> adapter uid on the "device"
        self.host: set[int] = set()
        self.num_steps = 0
        self.num_tokens = 0
        self.adapter_specs: dict[str, FakeAdapterSpec] = {}

    # --- adapters ---
    def inspect_adapter(self, name: str, path: str | None) -> FakeAdapterSpec:
        return self.adapter_specs.get(name, FakeAdapterSpec(version=str(path), rank=8, nbytes=1024))

    def register_adapter(self, uid: int, spec: FakeAdapterSpec) -> None:
        return None

    def apply_adapter_plan(self, plan: AdapterPlan) -> None:
        for uid in plan.release:
            self.host.discard(uid)
            for slot, held in list(self.slots.items()):
                if held == uid:
                    del self.slots[slot]
        for uid, slot in plan.evict_device:
            assert self.slots.get(slot) == uid, f"evict {uid} from slot {slot} holding {self.slots.get(slot)}"
            del self.slots[slot]
        for uid in plan.evict_host:
            assert uid in self.host, f"host eviction of absent adapter {uid}"
            self.host.discard(uid)
        for uid in plan.load_host:
            self.host.add(uid)
        for uid, slot in plan.load_device:
            assert slot not in self.slots, f"load {uid} into occupied slot {slot} ({self.slots[slot]})"
            assert uid in self.host, f"device load of adapter {uid} that is not in host memory"
            self.slots[slot] = uid

    def pending_reads(self, uids: Iterable[int]) -> int:
        return 0

    # --- the step ---
    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        self.apply_adapter_plan(out.adapter_plan)
        for c in out.kv_copies:  # in planned order: a freed page may be reused by a later copy
            if c.kind == "offload":
                self.host_kv[c.dst] = list(self.kv[c.src])
            else:
                self.kv[c.dst] = list(self.host_kv[c.src])
        self.num_steps += 1
        sampled: list[int | None] = []
        written: set[tuple[int, int]] = set()
        for seq in out.seqs:
            if seq.adapter_uid is not None:
                assert self.slots.get(seq.lora_slot) == seq.adapter_uid, (  # type: ignore[arg-type]
                    f"{seq.request_id}: slot {seq.lora_slot} holds {self.slots.get(seq.lora_slot)}, "
                    f"not adapter {seq.adapter_uid}"
                )
            h = self._read_context(seq.request_id, seq.adapter_uid, seq.page_ids, seq.start_pos)
            for i, tok in enumerate(seq.token_ids):
                pos = seq.start_pos + i
                h = _h(h, tok)
                page, off = seq.page_ids[pos // self.page_size], pos % self.page_size
                assert (page, off) not in written, f"two requests write page {page} slot {off} in one step"
                written.add((page, off))
                self.kv[page][off] = (seq.adapter_uid, pos, h)
            self.num_tokens += len(seq.token_ids)
            sampled.append(self.next_token(seq.adapter_uid, h, seq.suppress) if seq.sample else None)
        return RunnerOutput(sampled)

    def _read_context(self, rid: str, uid: int | None, pages: Sequence[int], upto: int) -> int:
        h = _ns_seed(uid)
        for pos in range(upto):
            slot = self.kv[pages[pos // self.page_size]][pos % self.page_size]
            assert slot is not None, f"{rid}: position {pos} was never written"
            ns, p, hh = slot
            assert ns == uid, f"{rid}: position {pos} holds adapter {ns}'s KV, not {uid}'s"
            assert p == pos, f"{rid}: page slot for position {pos} holds position {p}"
            h = hh
        return h

    def next_token(self, uid: int | None, h: int, suppress: frozenset[int] = frozenset()) -> int:
        """The token after context hash `h`; never one of `suppress` (min_tokens' mask)."""
        if self.eos_every and h % self.eos_every == 0 and self.eos_token_id not in suppress:
            return self.eos_token_id
        tok = (h >> 7) % self.vocab_size
        while tok == self.eos_token_id or tok in suppress:
            tok = (tok + 1) % self.vocab_size
        return tok

    def reference_tokens(self, uid: int | None, prompt: list[int], n: int, stop: set[int]) -> list[int]:
        """What a request should produce: the same function, no pages, no batching."""
        h = _ns_seed(uid)
        for t in prompt:
            h = _h(h, t)
        out: list[int] = []
        for _ in range(n):
            tok = self.next_token(uid, h)
            out.append(tok)
            if tok in stop:
                break
            h = _h(h, tok)
        return out
