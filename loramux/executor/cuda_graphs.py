"""CUDA graphs for decode-only steps (issue 23, point 5): one per batch-size bucket, captured at
start, replayed with the step's inputs copied into the graph's static buffer.

Boundary: given the runner's forward over a packed batch (ids, positions, attention metadata and
LoRA blocks in, hidden states out) and a way to pack a decode step padded to a size into a given
buffer, capture the forward once per bucket and replay the smallest bucket that holds a step.
Which steps may replay, and the padding itself, are the runner's (model_runner.py).

What a graph reads on replay: one int64 device buffer per bucket (token ids, positions, KV slots,
page tables at the full width of max_model_len, context lengths, query starts, LoRA blocks,
sampled rows), which the step's one host-to-device copy fills; the KV pages; and the adapter
slot buffers and rank tensors, made at their full depth before capture, so loading an adapter
needs no new capture. What the forward decides in Python is frozen at capture, which is why a
step with an embedding adapter or DoRA (whose paths pick rows on the host) runs eagerly.

Modes (LORAMUX_CUDA_GRAPHS): "auto" (default: capture on CUDA with the Triton kernels unless
`enforce_eager`), "off", and "emulate", for tests on CPU with Triton's interpreter: the same
buckets, padding and static buffers, and each replay runs the forward on the batch built at
capture (its host-side layout included), not the step's own, so a step input that does not flow
through the static buffer gives wrong output here as it would on CUDA. Only the capture itself
needs a device.
"""

from __future__ import annotations

import bisect
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger("loramux.executor")

MAX_CAPTURE = 512  # the largest bucket (vLLM's default cap)
MODES = ("auto", "off", "emulate")


def capture_sizes(max_num_seqs: int) -> list[int]:
    """The buckets: 1, 2, 4, 8, then every 16 up to max_num_seqs (at most MAX_CAPTURE), and that
    limit itself. A step pads to the next one up: at most 15 rows of padding past 16."""
    top = min(max_num_seqs, MAX_CAPTURE)
    sizes = [s for s in (1, 2, 4, 8) if s <= top] + list(range(16, top + 1, 16))
    if sizes[-1] != top:
        sizes.append(top)
    return sizes


def graph_mode(device_type: str, triton: bool, enforce_eager: bool) -> str | None:
    """ "capture", "emulate" or None (eager), from LORAMUX_CUDA_GRAPHS and the device."""
    choice = os.environ.get("LORAMUX_CUDA_GRAPHS", "auto")
    if choice not in MODES:
        raise ValueError(f"LORAMUX_CUDA_GRAPHS={choice!r}: use {', '.join(MODES)}")
    if choice == "off" or enforce_eager:
        return None
    if choice == "emulate":
        if not triton:
            raise ValueError("LORAMUX_CUDA_GRAPHS=emulate needs the Triton path (LORAMUX_KERNELS=triton)")
        return "emulate"
    return "capture" if device_type == "cuda" and triton else None


@dataclass
class _Graph:
    size: int
    lora: bool  # with the LoRA launches (a step with adapter rows), or without (base rows only)
    buffer: torch.Tensor  # int64: every input the graph reads, refilled each replay
    batch: Any  # the runner's packed batch of views into `buffer`, as built at capture
    hidden: torch.Tensor | None  # the graph's output [size, hidden] (capture mode)
    graph: Any  # torch.cuda.CUDAGraph, or None when emulated


class DecodeGraphs:
    """The captured graphs, two per bucket size sharing one buffer: with the LoRA launches, and
    without them for steps of base rows only (a LoRA launch with nothing but padding blocks still
    costs a launch per linear and layer)."""

    def __init__(self, sizes: list[int], width: int, mode: str) -> None:
        self.sizes = sorted(sizes)
        self.width = width  # pages per row of every graph's page table (max_model_len's)
        self.mode = mode
        self.graphs: dict[tuple[int, bool], _Graph] = {}
        self._forward: Callable[[Any, bool], torch.Tensor] | None = None
        self.replays = 0  # steps served by a graph (tests, metrics)
        self.capture_s = 0.0

    def size_for(self, rows: int) -> int | None:
        """The smallest bucket that holds `rows` rows, or None when none does."""
        i = bisect.bisect_left(self.sizes, rows)
        return self.sizes[i] if i < len(self.sizes) else None

    def capture(
        self,
        buffer_len: Callable[[int], int],
        pack: Callable[[int, torch.Tensor], Any],
        forward: Callable[[Any, bool], torch.Tensor],
        device: torch.device,
    ) -> None:
        """For each bucket, largest first (the smaller ones reuse its memory pool): a buffer of
        buffer_len(size) ints, `pack(size, buffer)` filling it with an all-padding step, and
        `forward(batch, lora)` captured over the batch it returns, with LoRA and without."""
        self._forward = forward
        t0 = time.perf_counter()
        pool = None
        if self.mode == "capture":
            pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):
            buffer = torch.zeros(buffer_len(size), dtype=torch.int64, device=device)
            batch = pack(size, buffer)
            for lora in (True, False):
                hidden, graph = None, None
                if self.mode == "capture":
                    stream = torch.cuda.Stream(device)
                    stream.wait_stream(torch.cuda.current_stream(device))
                    with torch.cuda.stream(stream):  # compile the kernels, settle the allocator
                        forward(batch, lora)
                    torch.cuda.current_stream(device).wait_stream(stream)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool):
                        hidden = forward(batch, lora)
                self.graphs[(size, lora)] = _Graph(size, lora, buffer, batch, hidden, graph)
        if self.mode == "capture":
            torch.cuda.synchronize(device)
        self.capture_s = time.perf_counter() - t0
        logger.info(
            "CUDA graphs (%s) for decode steps of %s rows: %.1f s",
            self.mode,
            ", ".join(map(str, self.sizes)),
            self.capture_s,
        )

    def buffer(self, size: int) -> torch.Tensor:
        return self.graphs[(size, True)].buffer

    def replay(self, size: int, lora: bool) -> torch.Tensor:
        """Run bucket `size`'s graph (with the LoRA launches or without) on what its buffer holds
        now: hidden states [size, hidden], valid until the next replay."""
        g = self.graphs[(size, lora)]
        self.replays += 1
        if g.graph is None:  # emulated: the forward as captured, over the capture-time batch
            assert self._forward is not None
            return self._forward(g.batch, lora)
        g.graph.replay()
        assert g.hidden is not None
        return g.hidden
