"""Decode-step LoRA cost with one distinct adapter per row: windowed bmm over the slot buffers vs gather.

The many-adapter decode step: `--rows` decode rows, each with its own adapter,
their slots drawn at random from `--slots` resident ones, the layout new every
step (as in continuous batching, where requests join and finish all the time).
Times the model's wrapped q and v projections (mid model shape: 8 layers,
1024 -> 1024 and 1024 -> 256, rank 8) three ways, interleaved:

    base      the base linears alone
    window    loramux's path: a bmm over a view of the slots' window
    gather    the same step with the window path turned off (rows' A/B gathered)

Usage: python benchmarks/bench_lora_decode.py [--rows 60] [--slots 64] [--steps 50] [--reps 5]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from torch import nn

from loramux.executor import lora
from loramux.executor.lora import LoRALinear, LoRAState


def build(slots: int, rank: int, layers: int) -> tuple[LoRAState, list[LoRALinear]]:
    state = LoRAState()
    mods = []
    for _ in range(layers):
        for out in (1024, 256):  # q_proj, v_proj of the mid model (4 kv heads x 64)
            m = LoRALinear(nn.Linear(1024, out, bias=False), state, slots, rank)
            for s in range(slots):
                m.load(s, torch.randn(rank, 1024), torch.randn(rank, out))
            mods.append(m)
    return state, mods


def step_ms(state: LoRAState, mods: list[LoRALinear], layouts: list[list[int]], lora_on: bool) -> float:
    x = torch.randn(len(layouts[0]), 1024)
    t0 = time.perf_counter()
    for slots in layouts:
        segments = [(s, i, i + 1) for i, s in enumerate(slots)] if lora_on else []
        with state.batch(segments, x.device):
            for m in mods:
                m(x)
    return (time.perf_counter() - t0) / len(layouts) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=60)
    p.add_argument("--slots", type=int, default=64)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args()
    torch.manual_seed(0)
    rng = random.Random(0)
    state, mods = build(a.slots, a.rank, a.layers)
    layouts = [sorted(rng.sample(range(a.slots), a.rows)) for _ in range(a.steps)]
    window_slack = lora.WINDOW_SLACK
    times: dict[str, list[float]] = {"base": [], "window": [], "gather": []}
    with torch.inference_mode():
        step_ms(state, mods, layouts[:5], True)  # warm up
        for _ in range(a.reps):
            times["base"].append(step_ms(state, mods, layouts, False))
            lora.WINDOW_SLACK = window_slack
            times["window"].append(step_ms(state, mods, layouts, True))
            lora.WINDOW_SLACK = 0  # no window qualifies: the gather path
            times["gather"].append(step_ms(state, mods, layouts, True))
    lora.WINDOW_SLACK = window_slack
    base = statistics.median(times["base"])
    print(
        f"{a.rows} rows, {a.slots} slots, rank {a.rank}, {a.layers} layers x (q, v), "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; medians of {a.reps}"
    )
    print("| path | ms per step | LoRA ms per step (over base) |")
    print("|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med:.2f} | {'-' if name == 'base' else f'{med - base:.2f}'} |")


if __name__ == "__main__":
    main()
