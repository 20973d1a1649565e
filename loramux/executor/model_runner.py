"""The PyTorch executor: one `SchedulerOutput` in, sampled tokens out.

Boundary: owns the model, the paged KV tensors, the adapter slots and host
copies, and per-request sampling state. It carries out the adapter plan,
builds the step's tensors, runs one forward for a batch that mixes adapters
and prefill chunks with decodes, and samples. Which requests run, and where
their pages are, is decided by the control plane.

Rows of a step are sorted by adapter slot (base-model rows first), so each
adapter's tokens form one contiguous segment:

    rows:   | base rows | slot 0 rows | slot 3 rows | ...
    LoRA:      no delta   A0/B0 pair    A3/B3 pair

On CUDA a decode-only step replays a CUDA graph (cuda_graphs.py): the same forward, its inputs
packed into the graph's buffer and padded to the graph's batch size.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loramux.config import CacheConfig, LoRAConfig, ModelConfig
from loramux.core.adapters import AdapterPlan
from loramux.core.outputs import RunnerOutput, SampleLogprobs, ScheduledSeq, SchedulerOutput
from loramux.core.prefix_cache import KVCopy
from loramux.executor.attention import AttentionMetadata, KernelMetadata, PrefillChunk, decode_mask
from loramux.executor.cuda_graphs import DecodeGraphs, capture_sizes, graph_mode
from loramux.executor.kernels import use_triton
from loramux.executor.loader import load_model, resolve_device, resolve_dtype
from loramux.executor.lora import AdapterSpec, HostAdapter, LoRASlots, inspect_adapter, read_adapter
from loramux.executor.sampler import apply_token_masks, prompt_logprobs, sample, sample_each
from loramux.executor.step_inputs import StepInputs
from loramux.executor.vocab_adapters import base_embedding_in_file
from loramux.sampling_params import SamplingParams

logger = logging.getLogger("loramux.executor")

_GREEDY = SamplingParams(temperature=0.0)


@dataclass
class LoadStats:
    """Adapter-load work done by the executor (for metrics)."""

    host_loads: int = 0
    device_loads: int = 0
    host_seconds: float = 0.0  # disk -> host, on the reader thread
    device_seconds: float = 0.0  # host -> slot, in the step
    wait_seconds: float = 0.0  # steps spent waiting for a read that had not finished
    recent: list[float] = field(default_factory=list)  # seconds of each load since last read

    def take_recent(self) -> list[float]:
        out, self.recent = self.recent, []
        return out


class ModelRunner:
    def __init__(
        self, model: ModelConfig, cache: CacheConfig, lora: LoRAConfig, max_num_seqs: int = 64
    ) -> None:
        self.device = resolve_device(model.device)
        self.dtype = resolve_dtype(model.dtype, self.device)
        self.model, self.hf_config, self.max_model_len = load_model(
            model.model, self.dtype, self.device, model.max_model_len
        )
        self.args = self.model.args
        self.page_size = cache.page_size
        self.commits_kv_as_used = self.device.type == "cpu"  # see _zeros
        self.num_pages = self._plan_pages(cache, max_num_seqs)
        self.triton = use_triton(self.device.type)  # Triton attention and LoRA kernels (CUDA)
        graph_mode_ = graph_mode(self.device.type, self.triton, model.enforce_eager)
        # With CUDA graphs, one page more: where padding rows write their keys (no request owns it).
        extra = 0 if graph_mode_ is None else 1
        shape = (self.num_pages + extra, self.page_size, self.args.num_kv_heads, self.args.head_dim)
        self.kv_caches = [(self._zeros(shape), self._zeros(shape)) for _ in range(self.args.num_layers)]
        host = torch.device("cpu")
        self.host_kv = (
            [
                (
                    torch.zeros((cache.host_kv_pages, *shape[1:]), dtype=self.dtype, device=host),
                    torch.zeros((cache.host_kv_pages, *shape[1:]), dtype=self.dtype, device=host),
                )
                for _ in range(self.args.num_layers)
            ]
            if cache.host_kv_pages and cache.enable_prefix_caching
            else []
        )
        self.max_lora_rank = lora.max_lora_rank
        self.inputs = StepInputs(self.device)  # the Triton path's step inputs: one copy to the device
        self.slots = LoRASlots(self.model, lora.max_loras, lora.max_lora_rank, self.triton)
        self.specs: dict[int, AdapterSpec] = {}
        self.host: dict[int, Future[HostAdapter]] = {}  # reads run on a background thread
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loramux-adapter-read")
        self.generators: dict[str, torch.Generator] = {}
        self.default_generator = torch.Generator(device=self.device).manual_seed(model.seed)
        self.load_stats = LoadStats()
        self.logits_hook: Callable[[str, torch.Tensor], None] | None = None  # tests: see raw logits
        # tests: called after the adapter plan and KV copies, before the forward (raise to fail a step)
        self.fault_hook: Callable[[SchedulerOutput], None] | None = None
        self.vocab_size = self.args.vocab_size
        self.graphs: DecodeGraphs | None = None  # decode steps replayed as CUDA graphs
        if graph_mode_ is not None:
            self.slots.allocate_full()
            width = -(-self.max_model_len // self.page_size)
            self.graphs = DecodeGraphs(capture_sizes(max_num_seqs), width, graph_mode_)
            try:
                with torch.inference_mode():  # as every step runs
                    self.graphs.capture(
                        _graph_inputs_len(width),
                        lambda size, buffer: self._prepare_packed([], size, buffer),
                        self._graph_forward,
                        self.device,
                    )
            except Exception:  # serve eagerly rather than not at all
                logger.exception("CUDA graph capture failed; decode steps run eagerly (--enforce-eager)")
                self.graphs = None

    def close(self) -> None:
        """Stop the adapter-reading thread (the engine is done)."""
        self._reader.shutdown(wait=False, cancel_futures=True)

    def _zeros(self, shape: tuple[int, ...]) -> torch.Tensor:
        """A zeroed KV tensor. On CPU it is calloc'd (through numpy), so the OS commits its memory
        page by page as the pool first writes it: a pool sized for the worst case costs what is
        used (the pool hands out recently freed pages first)."""
        if not self.commits_kv_as_used:
            return torch.zeros(shape, dtype=self.dtype, device=self.device)
        import numpy as np

        raw = np.zeros(math.prod(shape) * self.dtype.itemsize, dtype=np.uint8)
        return torch.from_numpy(raw).view(self.dtype).view(shape)

    def _plan_pages(self, cache: CacheConfig, max_num_seqs: int) -> int:
        """KV pages: num_pages, else kv_cache_memory bytes, else memory_utilization (vLLM's rule),
        else what max_num_seqs full-length sequences can use, capped by a fraction of the memory
        free now. Logs the count and the reason."""
        per_seq = -(-self.max_model_len // self.page_size)
        if cache.num_pages is not None:
            pages, why = cache.num_pages, "--num-pages"
        elif cache.kv_cache_memory is not None:
            pages, why = self._pages_for_bytes(cache.kv_cache_memory), "--kv-cache-memory"
        elif cache.memory_utilization is not None:
            pages = self._pages_for_bytes(self._utilization_budget(cache.memory_utilization))
            why = f"--gpu-memory-utilization {cache.memory_utilization}"
        else:
            free = self._free_memory()
            cap = self._pages_for_bytes(int(cache.free_memory_fraction * free))
            pages = min(max_num_seqs * per_seq, cap)
            why = (
                f"max_num_seqs {max_num_seqs} x max_model_len {self.max_model_len}"
                if pages < cap
                else f"{cache.free_memory_fraction} x {free / 2**30:.1f} GiB free memory (less than "
                f"max_num_seqs {max_num_seqs} x max_model_len {self.max_model_len} would use)"
            )
        logger.info(
            "KV cache: %d pages of %d tokens (%.1f MiB%s; room for %d requests of max_model_len %d "
            "tokens at once): %s",
            pages,
            self.page_size,
            pages * self.page_bytes / 2**20,
            ", committed as used" if self.commits_kv_as_used else "",
            pages // per_seq,
            self.max_model_len,
            why,
        )
        return pages

    def _free_memory(self) -> int:
        """Bytes free now: on the device, or (CPU) the OS's MemAvailable."""
        if self.device.type == "cuda":
            return torch.cuda.mem_get_info(self.device)[0]
        with contextlib.suppress(OSError, ValueError, StopIteration):
            with open("/proc/meminfo") as f:
                line = next(x for x in f if x.startswith("MemAvailable:"))
            return int(line.split()[1]) * 1024
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")

    def _utilization_budget(self, fraction: float) -> int:
        """vLLM's rule: the fraction of device memory (on CPU, of the memory available now) that
        the weights leave."""
        weights = sum(t.numel() * t.element_size() for t in self.model.parameters())
        if self.device.type == "cuda":
            total = torch.cuda.mem_get_info(self.device)[1]
            budget = fraction * total - weights
        else:  # the weights are loaded already, so available memory no longer counts them
            total = self._free_memory()
            budget = fraction * total
        if budget < self.page_bytes:
            raise ValueError(
                f"memory utilization {fraction} leaves {max(budget, 0) / 2**20:.1f} MiB for "
                f"the KV cache after {weights / 2**20:.1f} MiB of weights ({total / 2**30:.1f} GiB "
                f"{'on the device' if self.device.type == 'cuda' else 'available'}); raise it"
            )
        return int(budget)

    @property
    def page_bytes(self) -> int:
        a = self.args
        return 2 * a.num_layers * self.page_size * a.num_kv_heads * a.head_dim * self.dtype.itemsize

    def _pages_for_bytes(self, nbytes: int) -> int:
        return max(1, nbytes // self.page_bytes)

    # --- adapters ---
    def inspect_adapter(self, name: str, path: str) -> AdapterSpec:
        a = self.args
        vocab = (a.vocab_size, a.hidden_size, a.tie_word_embeddings)
        spec = inspect_adapter(
            path, a.num_layers, a.module_shapes(), self.max_lora_rank, self.dtype.itemsize, vocab
        )
        if spec.vocab is not None and spec.vocab.base_embedding:  # PEFT saves it with embedding LoRA
            saved = base_embedding_in_file(Path(path) / "adapter_model.safetensors")
            if not torch.equal(saved.to(self.device, self.dtype), self.slots.embedding.weight):
                raise ValueError(
                    f"{path!r} carries a base embedding that differs from this model's (a resized or "
                    f"retrained vocabulary); serve it on the model it was trained on"
                )
        return spec

    def register_adapter(self, uid: int, spec: AdapterSpec) -> None:
        self.specs[uid] = spec

    def pending_reads(self, uids: Iterable[int]) -> int:
        """How many of these adapters' reads (disk -> host) are still running."""
        host = self.host
        return sum(1 for u in uids if (f := host.get(u)) is not None and not f.done())

    def apply_adapter_plan(self, plan: AdapterPlan) -> None:
        """Carry out the control plane's adapter moves, in order (a step does this first)."""
        if plan.empty:
            return
        for uid in plan.release:
            self._drop_host(uid)
            self.specs.pop(uid, None)
        for _, slot in plan.evict_device:
            self.slots.clear(slot)
        for uid in plan.evict_host:
            self._drop_host(uid)
        for uid in plan.load_host:  # disk -> host starts now, in the background
            self.host[uid] = self._reader.submit(self._read, self.specs[uid])
        stats = self.load_stats
        for uid, slot in plan.load_device:
            t0 = time.perf_counter()
            adapter = self.host[uid].result()  # usually read already (prefetched steps ago)
            t1 = time.perf_counter()
            self.slots.load(adapter, slot)
            dt = time.perf_counter() - t1
            stats.wait_seconds += t1 - t0
            stats.device_loads += 1
            stats.device_seconds += dt
            stats.recent.append(dt)

    def _apply_kv_copies(self, copies: list[KVCopy]) -> None:
        """Host-tier page copies, in planned order; each run of one kind is one gather per layer."""
        i = 0
        while i < len(copies):
            kind, j = copies[i].kind, i
            while j < len(copies) and copies[j].kind == kind:
                j += 1
            last = {c.dst: c.src for c in copies[i:j]}  # a later copy to the same page wins
            i = j
            src, dst = list(last.values()), list(last.keys())
            for (k, v), (hk, hv) in zip(self.kv_caches, self.host_kv, strict=True):
                if kind == "offload":  # device -> host
                    s, d = torch.tensor(src, device=k.device), torch.tensor(dst, device=hk.device)
                    hk.index_copy_(0, d, k.index_select(0, s).to(hk.device))
                    hv.index_copy_(0, d, v.index_select(0, s).to(hv.device))
                else:  # host -> device
                    s, d = torch.tensor(src, device=hk.device), torch.tensor(dst, device=k.device)
                    k.index_copy_(0, d, hk.index_select(0, s).to(k.device))
                    v.index_copy_(0, d, hv.index_select(0, s).to(v.device))

    def _read(self, spec: AdapterSpec) -> HostAdapter:
        t0 = time.perf_counter()
        adapter = read_adapter(spec, self.dtype)
        dt = time.perf_counter() - t0
        stats = self.load_stats
        stats.host_loads += 1
        stats.host_seconds += dt
        stats.recent.append(dt)
        return adapter

    def _drop_host(self, uid: int) -> None:
        fut = self.host.pop(uid, None)
        if fut is not None:
            fut.cancel()

    # --- the step ---
    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        for rid in out.finished_ids:
            self.generators.pop(rid, None)
        self.apply_adapter_plan(out.adapter_plan)
        self._apply_kv_copies(out.kv_copies)
        if self.fault_hook is not None:
            self.fault_hook(out)
        if not out.seqs:
            return RunnerOutput([])
        size = self._graph_size(out.seqs)
        if size is not None:
            assert self.graphs is not None
            batch = self._prepare_packed(out.seqs, size, self.graphs.buffer(size))
            hidden = self.graphs.replay(size, lora=bool(batch.segments))
        else:
            batch = self._prepare_packed(out.seqs) if self.triton else self._prepare(out.seqs)
            with self.slots.state.batch(batch.segments, self.device, batch.blocks):
                hidden = self.model(batch.input_ids, batch.positions, self.kv_caches, batch.meta)
        prompt_lps = self._prompt_logprobs(out.seqs, batch, hidden)
        if not batch.sample_rows:
            return RunnerOutput([None] * len(out.seqs), prompt_logprobs=prompt_lps)
        rows = batch.sample_index
        if rows is None:
            rows = torch.tensor(batch.sample_rows, device=self.device)
        self.slots.state.head_slots = [out.seqs[i].lora_slot for i in batch.sample_seqs]  # trained lm_heads
        logits = self.model.compute_logits(hidden.index_select(0, rows))  # [N, V] float32
        self.slots.state.head_slots = []
        seqs = [out.seqs[i] for i in batch.sample_seqs]
        grammar_rows = None
        if out.token_masks is not None:  # structured output: forbidden tokens to -inf
            row_of = {s.request_id: j for j, s in enumerate(seqs)}
            logits = apply_token_masks(
                logits, [row_of[r] for r in out.token_masks.request_ids], out.token_masks.bitmask
            )
            masked = set(out.token_masks.request_ids)
            grammar_rows = [s.request_id in masked for s in seqs]
        params = [s.sampling if isinstance(s.sampling, SamplingParams) else _GREEDY for s in seqs]
        if self.logits_hook is not None:
            for s, row in zip(seqs, logits, strict=True):
                self.logits_hook(s.request_id, row)
        args = (
            logits,
            params,
            [self._generator(s, p) for s, p in zip(seqs, params, strict=True)],
            self.default_generator,
            [s.suppress for s in seqs],
            [
                (list(s.context[: s.start_pos + len(s.token_ids)]), s.num_prompt) if p.penalized else None
                for s, p in zip(seqs, params, strict=True)
            ],
            grammar_rows,
        )
        failed: dict[int, str] = {}
        try:
            tokens, logprobs = sample(*args)
        except Exception:  # pin it on the rows whose own parameters fail; the rest get tokens
            logger.exception(
                "sampling step %d failed; sampling its %d rows one at a time", out.step, len(seqs)
            )
            tokens, logprobs, failed = sample_each(*args)  # type: ignore[assignment]
        sampled: list[int | None] = [None] * len(out.seqs)
        lps: list = [None] * len(out.seqs)
        for i, tok, lp in zip(batch.sample_seqs, tokens, logprobs, strict=True):
            sampled[i] = tok
            lps[i] = lp
        errors = {seqs[j].request_id: f"sampling failed ({why})" for j, why in failed.items()}
        return RunnerOutput(sampled, lps, errors or None, prompt_lps)

    def _prompt_logprobs(
        self, seqs: list[ScheduledSeq], batch: _Batch, hidden: torch.Tensor
    ) -> dict[str, tuple[int, list[SampleLogprobs]]] | None:
        """For each sequence that asked for prompt logprobs (vLLM's prompt_logprobs), the logprob
        of every prompt token this step's rows predict: row j (position start_pos + j) predicts
        the prompt's token at start_pos + j + 1. Nothing is computed for the others."""
        found: dict[str, tuple[int, list[SampleLogprobs]]] = {}
        for i, s in enumerate(seqs):
            k = s.sampling.prompt_logprobs if isinstance(s.sampling, SamplingParams) else None
            if k is None:  # nearly every sequence: nothing more to look at
                continue
            n = min(len(s.token_ids), s.num_prompt - 1 - s.start_pos)  # rows whose next token is prompt
            if n <= 0:
                continue
            t0, lps = batch.first_rows[i], []
            for a in range(0, n, _PROMPT_ROWS):  # [rows, vocab] logits a slice at a time
                b = min(n, a + _PROMPT_ROWS)
                self.slots.state.head_slots = [s.lora_slot] * (b - a)  # a trained lm_head applies too
                logits = self.model.compute_logits(hidden[t0 + a : t0 + b])
                self.slots.state.head_slots = []
                lps += prompt_logprobs(logits, list(s.context[s.start_pos + 1 + a : s.start_pos + 1 + b]), k)
            found[s.request_id] = (s.start_pos, lps)
        return found or None

    def _graph_size(self, seqs: list[ScheduledSeq]) -> int | None:
        """The CUDA graph bucket this step replays in, or None to run it eagerly: graphs hold
        decode-only steps of at most the largest bucket's rows, without a slot whose adapter has
        host-side paths (embedding adapters, DoRA)."""
        graphs = self.graphs
        if graphs is None or any(len(s.token_ids) != 1 for s in seqs):
            return None
        host_side = self.slots.host_side_slots
        if host_side and any(s.lora_slot in host_side for s in seqs):
            return None
        return graphs.size_for(len(seqs))

    def _graph_forward(self, batch: _Batch, lora: bool) -> torch.Tensor:
        """The forward a CUDA graph holds: the model over a padded decode batch, LoRA by blocks
        (with `lora`) or none at all (an empty block list: no LoRA launch)."""
        assert batch.blocks is not None
        with self.slots.state.batch([], self.device, batch.blocks if lora else batch.blocks[:, :0]):
            return self.model(batch.input_ids, batch.positions, self.kv_caches, batch.meta)

    def _generator(self, seq: ScheduledSeq, p: SamplingParams) -> torch.Generator | None:
        if p.seed is None or p.greedy:
            return None
        g = self.generators.get(seq.request_id)
        if g is None:
            g = self.generators[seq.request_id] = torch.Generator(device=self.device).manual_seed(p.seed)
        return g

    def _prepare(self, seqs: list[ScheduledSeq]) -> _Batch:
        ps = self.page_size
        order = sorted(range(len(seqs)), key=lambda i: -1 if seqs[i].lora_slot is None else seqs[i].lora_slot)
        ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[torch.Tensor | list[int]] = []
        decode_rows, decode_pages, decode_lens = [], [], []
        prefills: list[PrefillChunk] = []
        segments: list[tuple[int, int, int]] = []
        sample_rows, sample_seqs = [], []
        first_rows: dict[int, int] = {}
        for i in order:
            s = seqs[i]
            t0, n = len(ids), len(s.token_ids)
            ids.extend(s.token_ids)
            positions.extend(range(s.start_pos, s.start_pos + n))
            if n == 1:
                pos = s.start_pos
                slot_mapping.append([s.page_ids[pos // ps] * ps + pos % ps])
                decode_rows.append(t0)
                decode_pages.append(s.page_ids)
                decode_lens.append(pos + 1)
            else:
                ctx = s.start_pos + n
                pages = torch.tensor(s.page_ids[: -(-ctx // ps)], device=self.device)
                slots = (pages.unsqueeze(1) * ps + torch.arange(ps, device=self.device)).view(-1)
                slot_mapping.append(slots[s.start_pos : ctx])
                prefills.append(PrefillChunk(t0, t0 + n, s.start_pos, pages))
            _add_rows(s, i, t0, segments, sample_rows, sample_seqs, first_rows)
        dev = self.device
        mapping = torch.cat(
            [m if isinstance(m, torch.Tensor) else torch.tensor(m, device=dev) for m in slot_mapping]
        )
        meta = AttentionMetadata(mapping, None, None, None, prefills)
        if decode_rows:
            n_pages = -(-max(decode_lens) // ps)
            table = [[*p[:n_pages], *[0] * (n_pages - len(p))] for p in decode_pages]
            meta.decode_rows = torch.tensor(decode_rows, device=dev)
            meta.decode_pages = torch.tensor(table, device=dev)  # [B, P]
            meta.decode_mask = decode_mask(
                torch.tensor(decode_lens, device=dev), n_pages * ps, self.args.sliding_window
            )
        return _Batch(
            torch.tensor(ids, device=dev),
            torch.tensor(positions, device=dev),
            meta,
            segments,
            sample_rows,
            sample_seqs,
            first_rows=first_rows,
        )

    def _prepare_packed(
        self, seqs: list[ScheduledSeq], size: int | None = None, out: torch.Tensor | None = None
    ) -> _Batch:
        """The Triton path's step: every input (ids, positions, KV slots, page tables, context
        lengths, query starts, LoRA blocks, sampled rows) in one host-to-device copy.

        With `size`, a CUDA graph's layout, copied into its buffer `out`: decode rows padded to
        `size` with base-model rows at position 0 that write to the scratch page, page tables at
        the graphs' full width, and `size` LoRA blocks (the padding ones empty)."""
        from loramux.executor.kernels.lora import block_list

        ps = self.page_size
        order = sorted(range(len(seqs)), key=lambda i: -1 if seqs[i].lora_slot is None else seqs[i].lora_slot)
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        tables: list[list[int]] = []
        ctx_lens: list[int] = []
        starts = [0]
        segments: list[tuple[int, int, int]] = []
        sample_rows, sample_seqs = [], []
        first_rows: dict[int, int] = {}
        for i in order:
            s = seqs[i]
            t0, n = len(ids), len(s.token_ids)
            ctx = s.start_pos + n
            ids.extend(s.token_ids)
            positions.extend(range(s.start_pos, ctx))
            pages = s.page_ids
            slots.extend(pages[p // ps] * ps + p % ps for p in range(s.start_pos, ctx))
            tables.append(pages[: -(-ctx // ps)])
            ctx_lens.append(ctx)
            starts.append(t0 + n)
            _add_rows(s, i, t0, segments, sample_rows, sample_seqs, first_rows)
        blocks = block_list(segments)
        sample = sample_rows
        if size is None:
            width = max(len(t) for t in tables)
            max_query_len = max(len(s.token_ids) for s in seqs)
        else:
            assert self.graphs is not None and len(seqs) <= size
            width, max_query_len, scratch = self.graphs.width, 1, self.num_pages
            for _ in range(len(seqs), size):
                ids.append(0)
                positions.append(0)
                slots.append(scratch * ps)
                tables.append([scratch])
                ctx_lens.append(1)
                starts.append(starts[-1] + 1)
            nb = len(blocks) // 3  # at most one block per decode row: pad each third to `size`
            blocks = [x for k in range(3) for x in (*blocks[k * nb : (k + 1) * nb], *[0] * (size - nb))]
            sample = sample_rows + [0] * (size - len(sample_rows))
        table = [p for t in tables for p in (*t, *[0] * (width - len(t)))]
        dev = self.inputs.pack(
            {
                "ids": ids, "positions": positions, "slots": slots, "table": table, "ctx": ctx_lens,
                "starts": starts, "blocks": blocks, "sample": sample,
            },
            out,
        )  # fmt: skip
        meta = AttentionMetadata(dev["slots"], None, None, None, [])
        meta.kernel = KernelMetadata(
            dev["table"].view(len(tables), width), dev["ctx"], dev["starts"], max_query_len
        )
        return _Batch(
            dev["ids"],
            dev["positions"],
            meta,
            segments,
            sample_rows,
            sample_seqs,
            dev["blocks"].view(3, len(blocks) // 3),
            dev["sample"][: len(sample_rows)],
            first_rows,
        )


def _graph_inputs_len(width: int) -> Callable[[int], int]:
    """The ints `_prepare_packed` packs for a CUDA graph of `size` rows: ids, positions, slots,
    context lengths, sampled rows and block slots, firsts and ends (`size` each), page tables
    (`size` x width) and query starts (size + 1)."""
    return lambda size: size * (8 + width) + size + 1


_PROMPT_ROWS = 256  # prompt-logprob rows per logits slice: 128 MiB of float32 at a 128k vocabulary


def _add_rows(
    s: ScheduledSeq,
    i: int,
    t0: int,
    segments: list[tuple[int, int, int]],
    sample_rows: list[int],
    sample_seqs: list[int],
    first_rows: dict[int, int],
) -> None:
    """Sequence i's rows [t0, t0 + n): its first row, its LoRA segment (merged with the previous
    one of the same slot) and, if it samples, its last row."""
    n = len(s.token_ids)
    first_rows[i] = t0
    first = t0 + max(0, s.lora_start - s.start_pos)  # activated LoRA: the rows from its start
    if s.lora_slot is not None and first < t0 + n:
        if segments and segments[-1][0] == s.lora_slot and segments[-1][2] == first:
            segments[-1] = (s.lora_slot, segments[-1][1], t0 + n)
        else:
            segments.append((s.lora_slot, first, t0 + n))
    if s.sample:
        sample_rows.append(t0 + n - 1)
        sample_seqs.append(i)


@dataclass
class _Batch:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    segments: list[tuple[int, int, int]]  # (slot, first row, end row)
    sample_rows: list[int]  # rows whose logits are sampled
    sample_seqs: list[int]  # index in SchedulerOutput.seqs of each sampled row
    blocks: torch.Tensor | None = None  # Triton path: the LoRA kernels' block list, on the device
    sample_index: torch.Tensor | None = None  # Triton path: sample_rows, on the device
    first_rows: dict[int, int] = field(default_factory=dict)  # seq index -> its first row
