"""A step's integer inputs in one host-to-device copy.

Boundary: given named lists of ints (token ids, positions, KV slots, page tables,
...), put them into one int64 buffer, copy it to the device once (from a pinned
staging buffer, non_blocking, on CUDA) and hand back a view per name. On the
CPU the views are of the host buffer itself: no copy at all.

The staging buffer is reused step after step: a step's copy has finished before
the next step fills it, because every step ends by reading its sampled tokens
back to the host (a sync).
"""

from __future__ import annotations

import torch


class StepInputs:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._staging: torch.Tensor | None = None  # pinned host memory (CUDA only)
        self._on_device: torch.Tensor | None = None

    def pack(self, parts: dict[str, list[int]], out: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """name -> int64 tensor on the device (a view into one buffer). out: an int64 buffer on the
        device to copy into, a CUDA graph's static inputs (the views are then the same tensors
        every step of that layout); default: a buffer of this object's own."""
        values: list[int] = []
        spans = {}
        for name, xs in parts.items():
            spans[name] = (len(values), len(values) + len(xs))
            values.extend(xs)
        host = torch.tensor(values, dtype=torch.int64)
        n = len(values)
        if self.device.type == "cpu":
            buf = host if out is None else out[:n].copy_(host)
        else:
            if self._staging is None or self._staging.numel() < n:
                size = max(n, 2 * (0 if self._staging is None else self._staging.numel()), 4096)
                self._staging = torch.empty(size, dtype=torch.int64, pin_memory=True)
                self._on_device = torch.empty(size, dtype=torch.int64, device=self.device)
            assert self._on_device is not None
            self._staging[:n].copy_(host)
            buf = (self._on_device if out is None else out)[:n]
            buf.copy_(self._staging[:n], non_blocking=True)
        return {name: buf[s:e] for name, (s, e) in spans.items()}
