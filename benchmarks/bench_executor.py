"""Executor speed: LoRA overhead with all-distinct adapters, and decode speed against the matmul ceiling.

Not a test. On a ~90M-parameter Llama (built offline, random weights):
1. one batch of `--batch` requests, base model only, against the same batch
   with a different adapter for every request (rank 8 on q, k, v, o, as
   S-LoRA's S1): generated tokens per second end to end (prefill + decode),
   and per decode step;
2. decode tokens per second at that batch against this machine's dense-matmul
   ceiling for the model: the time of the model's linear layers alone on
   `--batch` tokens (every projection and the lm_head), measured right after
   each run (the shared machine's speed drifts by tens of percent).

Runs alternate (base, adapters, base, ...) and the median of `--reps` is reported. With
`--dora-share 0.5`, each round also runs the distinct adapters with half of them DoRA (issue 29:
the mix must keep 0.9x the all-LoRA tokens/s).

    python benchmarks/bench_executor.py [--batch 64] [--reps 3] [--device cpu] [--dora-share 0.5]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import time
from pathlib import Path

import torch

from loramux import LLM, SamplingParams
from loramux.bench.artifacts import build_random_model, write_random_adapter


def run_batch(llm: LLM, prompts: list[list[int]], loras: list[str | None], max_tokens: int):
    """Generate for the whole batch; returns (end-to-end tok/s, decode-only tok/s)."""
    eng = llm.engine
    sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
    for p, lora in zip(prompts, loras, strict=True):
        eng.add_request(None, p, sp, lora_name=lora)
    sync = torch.cuda.synchronize if eng.executor.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    generated, decode_tokens, decode_time = 0, 0, 0.0
    while eng.has_unfinished_requests():
        ts = time.perf_counter()
        out = eng.scheduler.schedule()
        result = eng._execute(out)
        update = eng.scheduler.update_from_output(out, result)
        outs = eng._outputs(out, result, update)
        sync()
        dt = time.perf_counter() - ts
        n = sum(len(o.outputs[0].delta_token_ids) for o in outs)
        generated += n
        if all(len(s.token_ids) == 1 for s in out.seqs) and len(out.seqs) == len(prompts):  # pure decode
            decode_tokens += n
            decode_time += dt
    return generated / (time.perf_counter() - t0), decode_tokens / max(decode_time, 1e-9)


def dense_ceiling(llm: LLM, batch: int, reps: int = 20) -> float:
    """Tokens/s if a decode step cost only the model's matmuls on `batch` tokens."""
    model = llm.engine.executor.model
    dev, dtype = llm.engine.executor.device, llm.engine.executor.dtype
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    xs = {w.shape[1]: torch.randn(batch, w.shape[1], device=dev, dtype=dtype) for w in weights}
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def once() -> None:
        for w in weights:
            torch.nn.functional.linear(xs[w.shape[1]], w)

    for _ in range(3):
        once()
    times = []
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        once()
        sync()
        times.append(time.perf_counter() - t)
    return batch / statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="mid", help="model size: tiny, mid (~90M) or 1b")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/loramux/bench"))
    p.add_argument(
        "--dora-share",
        type=float,
        default=0.0,
        help="also run the distinct adapters with this share of them DoRA (a magnitude besides A and B)",
    )
    a = p.parse_args()
    root = Path(a.cache_dir)
    model_dir = build_random_model(root / f"llama-{a.size}", a.size)
    adapters = [
        write_random_adapter(
            root / f"llama-{a.size}-adapters" / f"s1-{i}",
            model_dir,
            a.rank,
            ("q_proj", "k_proj", "v_proj", "o_proj"),
            seed=i,
        )
        for i in range(a.batch)
    ]
    llm = LLM(
        str(model_dir),
        device=a.device,
        max_loras=a.batch,
        max_cpu_loras=a.batch + round(a.dora_share * a.batch),  # every adapter stays in host memory
        max_lora_rank=a.rank,
        max_num_seqs=a.batch,
        max_num_batched_tokens=a.batch * a.prompt_len,
        enable_prefix_caching=False,
        num_pages=a.batch * (a.prompt_len + a.max_tokens) // 16 + 64,
    )
    for i, d in enumerate(adapters):
        llm.engine.add_lora(f"s1-{i}", str(d))
    n_dora = round(a.dora_share * a.batch)
    for i in range(n_dora):  # the same A and B as s1-i, plus a magnitude: DoRA
        d = root / f"llama-{a.size}-adapters" / f"dora-{i}"
        write_random_adapter(
            d, model_dir, a.rank, ("q_proj", "k_proj", "v_proj", "o_proj"), seed=i, dora=True
        )
        llm.engine.add_lora(f"dora-{i}", str(d))
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 512) for _ in range(a.prompt_len)] for _ in range(a.batch)]
    distinct = [f"s1-{i}" for i in range(a.batch)]
    mixed = [f"dora-{i}" if i < n_dora else f"s1-{i}" for i in range(a.batch)]
    run_batch(llm, prompts[:4], distinct[:4], 4)  # warm-up: every code path once
    if n_dora:
        run_batch(llm, prompts[:4], mixed[:4], 4)
    base_e2e, base_dec, lora_e2e, lora_dec, ceilings, base_frac, lora_frac = [], [], [], [], [], [], []
    dora_e2e, dora_dec, dora_ratio = [], [], []
    for _ in range(a.reps):  # the ceiling is measured beside each run: this machine's speed drifts
        e, d = run_batch(llm, prompts, [None] * a.batch, a.max_tokens)
        c = dense_ceiling(llm, a.batch)
        base_e2e.append(e)
        base_dec.append(d)
        base_frac.append(d / c)
        e, d = run_batch(llm, prompts, distinct, a.max_tokens)
        c2 = dense_ceiling(llm, a.batch)
        lora_e2e.append(e)
        lora_dec.append(d)
        lora_frac.append(d / c2)
        ceilings += [c, c2]
        if n_dora:
            e, d = run_batch(llm, prompts, mixed, a.max_tokens)
            dora_e2e.append(e)
            dora_dec.append(d)
            dora_ratio.append((e / lora_e2e[-1], d / lora_dec[-1]))
    ceiling = statistics.median(ceilings)
    med = statistics.median
    ex = llm.engine.executor
    params = sum(t.numel() for t in ex.model.parameters()) / 1e6
    print(
        f"model: llama-{a.size} ({params:.1f}M params), device {ex.device}, dtype {ex.dtype}, "
        f"threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}"
    )
    print(
        f"batch {a.batch}, prompt {a.prompt_len}, output {a.max_tokens} tokens, adapters rank {a.rank} "
        f"on q,k,v,o, {a.reps} reps (median)"
    )
    print("| run | end-to-end tok/s | decode tok/s |")
    print("|---|---|---|")
    print(f"| base model only | {med(base_e2e):.1f} | {med(base_dec):.1f} |")
    print(f"| {a.batch} distinct adapters | {med(lora_e2e):.1f} | {med(lora_dec):.1f} |")
    e2e, dec = med(lora_e2e) / med(base_e2e), med(lora_dec) / med(base_dec)
    print(f"| ratio adapters / base | {e2e:.3f} | {dec:.3f} |")
    if n_dora:
        label = f"{a.batch} distinct adapters, {n_dora} of them DoRA"
        print(f"| {label} | {med(dora_e2e):.1f} | {med(dora_dec):.1f} |")
        e, d = med(r[0] for r in dora_ratio), med(r[1] for r in dora_ratio)
        print(f"| ratio DoRA mix / all LoRA (median of rounds) | {e:.3f} | {d:.3f} |")
    print(
        f"\ndense-matmul ceiling at batch {a.batch}: {ceiling:.1f} tok/s (median); decode over the ceiling "
        f"measured beside it: base {med(base_frac):.3f}, distinct adapters {med(lora_frac):.3f}"
    )


if __name__ == "__main__":
    main()
