"""The prepared GPU check (issue 23): one command, under 8 minutes on one H200, only what that machine
has (torch with CUDA, triton, transformers, peft; nothing downloaded: models get random weights
written on the device from a config).

Not a test. Sections, each timed against a shared budget (a section that would not fit is recorded
as skipped, and an error in one is recorded and the next runs):
1. tests: the `gpu` tests, the kernel tests and the Triton-path engine tests, compiled on CUDA (in
   the dry run: one kernel test file, since the suite runs them all);
2. kernels: Triton paged attention and multi-LoRA against the torch path at Llama-3-8B shapes
   (error, and time of each);
3. decode: tokens/s on Llama-3-8B shapes in bf16 (32 layers, hidden 4096, GQA 32/8, vocab 128256)
   at batch 1, 16, 64, 256, prompts of 512, 128 new tokens, base only and 64 distinct rank-16
   adapters on all seven projections, each beside its roofline (weight, adapter and KV bytes read
   per step over the copy bandwidth measured on the device);
4. peft: transformers+PEFT on the same requests (a mixed-adapter batch through `adapter_names`),
   fewer new tokens (its decode rate is what is compared);
5. graphs: CUDA graphs on against off (`enforce_eager`) at batch 1 (base) and 16 (16 distinct
   adapters), decode tokens/s, interleaved rounds (in the dry run: emulated graphs on the Triton
   path in the interpreter, so the same code runs, one round);
6. online: S-LoRA-style load on 1B shapes, 1000 rank-16 adapters (q, v), Zipf 1, `--duration` s
   at three rates: throughput, TTFT p50/p99.

Writes OUT/gpu.json and OUT/gpu.md. `--dry-run` runs the same code on the CPU at tiny shapes in
seconds (the kernels in Triton's interpreter); CI runs it.

    python benchmarks/bench_gpu.py --out gpu_out            # on the H200
    python benchmarks/bench_gpu.py --dry-run --out /tmp/g   # anywhere
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

DRY = "--dry-run" in sys.argv
if DRY:  # the kernels run in Triton's interpreter on CPU tensors (set before triton is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loramux.bench.artifacts import MODELS  # noqa: E402

SHAPES = {  # name -> LlamaConfig fields
    "8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    ),
    "1b": dict(MODELS["1b"], vocab_size=32000),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1024,  # larger than the tokenizer's 512: generated ids past it still decode
    ),
}
ALL7 = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class Budget:
    def __init__(self, seconds: float) -> None:
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def write_random_llama(path: Path, shape: dict[str, int], device: str, seed: int = 0) -> Path:
    """config.json, a tokenizer, and random weights (std 0.02, norms 1) written layer by layer as
    safetensors shards; skipped if already there."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from loramux.bench.artifacts import _filler_lines, train_bpe_tokenizer

    if (path / "model.safetensors.index.json").is_file():
        return path
    path.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(
        max_position_embeddings=4096,
        bos_token_id=2,
        eos_token_id=0,
        pad_token_id=1,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
        architectures=["LlamaForCausalLM"],
        **shape,
    )
    cfg.save_pretrained(path)
    train_bpe_tokenizer(_filler_lines(2000, seed), 512).save_pretrained(path)
    g = torch.Generator(device=device).manual_seed(seed)
    h, inter, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    hd = h // shape["num_attention_heads"]
    q, kv = shape["num_attention_heads"] * hd, shape["num_key_value_heads"] * hd

    def rnd(*s: int) -> torch.Tensor:
        return (torch.randn(*s, generator=g, device=device) * 0.02).to(torch.bfloat16).cpu()

    weight_map: dict[str, str] = {}

    def shard(name: str, tensors: dict[str, torch.Tensor]) -> None:
        save_file(tensors, str(path / name))
        weight_map.update(dict.fromkeys(tensors, name))

    ones = torch.ones(h, dtype=torch.bfloat16)
    shard("embed.safetensors", {"model.embed_tokens.weight": rnd(v, h), "lm_head.weight": rnd(v, h)})
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shard(
            f"layer{i}.safetensors",
            {
                p + "self_attn.q_proj.weight": rnd(q, h),
                p + "self_attn.k_proj.weight": rnd(kv, h),
                p + "self_attn.v_proj.weight": rnd(kv, h),
                p + "self_attn.o_proj.weight": rnd(h, q),
                p + "mlp.gate_proj.weight": rnd(inter, h),
                p + "mlp.up_proj.weight": rnd(inter, h),
                p + "mlp.down_proj.weight": rnd(h, inter),
                p + "input_layernorm.weight": ones.clone(),
                p + "post_attention_layernorm.weight": ones.clone(),
            },
        )
    shard("norm.safetensors", {"model.norm.weight": ones.clone()})
    index = {"metadata": {}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return path


def adapters_for(model: Path, root: Path, n: int, rank: int, targets: tuple[str, ...]) -> list[Path]:
    from loramux.bench.artifacts import write_random_adapter

    out = []
    for i in range(n):
        d = root / f"a{i}"
        if not (d / "adapter_model.safetensors").is_file():
            write_random_adapter(d, model, rank, targets, seed=i, scale=0.02)
        out.append(d)
    return out


# --- sections ----------------------------------------------------------------------------------


def section_tests(a: argparse.Namespace) -> dict[str, Any]:
    # The dry run checks that this section runs; the suite runs every kernel test anyway.
    tests = ["tests/kernels/test_lora_kernels.py"] if a.dry_run else [
        "tests/kernels", "tests/executor/test_gpu.py", "tests/executor/test_triton_path.py",
    ]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=max(30, min(a.budget.left() - 5, 180)),  # at most 180 s: the measurements come after
    )
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:]
    return {"rc": proc.returncode, "summary": tail, "seconds": round(time.perf_counter() - t0, 1)}


def _time(fn, reps: int) -> float:
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t0) / reps


def section_kernels(a: argparse.Namespace) -> dict[str, Any]:
    from loramux.executor.attention import AttentionMetadata, decode_mask, paged_attention
    from loramux.executor.kernels.lora import lora_blocks, lora_shrink_expand
    from loramux.executor.kernels.paged_attention import paged_attention_triton
    from loramux.executor.lora import LoRALinear, LoRAState

    dev, dt = a.device, a.dtype
    heads, kv, hd, ps = (4, 2, 16, 16) if a.dry_run else (32, 8, 128, 16)
    batch, ctx = (4, 40) if a.dry_run else (64, 512)
    reps = 1 if a.dry_run else 20
    pages_per = -(-ctx // ps)
    g = torch.Generator(device=dev).manual_seed(0)
    k_cache = torch.randn(batch * pages_per, ps, kv, hd, generator=g, device=dev).to(dt)
    v_cache = torch.randn_like(k_cache)
    perm = torch.randperm(batch * pages_per, device=dev)
    table = perm.view(batch, pages_per).to(torch.int32)
    q = torch.randn(batch, heads, hd, generator=g, device=dev).to(dt)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
    starts = torch.arange(batch + 1, dtype=torch.int32, device=dev)
    meta = AttentionMetadata(
        torch.empty(0, dtype=torch.long, device=dev),
        torch.arange(batch, device=dev),
        table.long(),
        decode_mask(lens.long(), pages_per * ps, None),
        [],
    )
    empty = torch.empty(0, kv, hd, device=dev, dtype=dt)

    def torch_attn() -> torch.Tensor:
        return paged_attention(q, empty, empty, k_cache, v_cache, meta, hd**-0.5, None)

    def triton_attn() -> torch.Tensor:
        return paged_attention_triton(q, k_cache, v_cache, table, lens, starts, 1, hd**-0.5, None)

    err_attn = (torch_attn().float() - triton_attn().float()).abs().max().item()
    t_torch, t_triton = _time(torch_attn, reps), _time(triton_attn, reps)
    kv_bytes = 2 * batch * ctx * kv * hd * k_cache.element_size()

    # LoRA: a fused qkv linear with 64 distinct rank-16 adapters, one decode row each
    h = 64 if a.dry_run else 4096
    widths = [heads * hd, kv * hd, kv * hd]
    n_ad, rank = (4, 8) if a.dry_run else (64, 16)
    results = {}
    for triton_path in (False, True):
        state = LoRAState(triton_path)
        torch.manual_seed(1)
        base = torch.nn.Linear(h, sum(widths), bias=False, device=dev, dtype=dt)
        lin = LoRALinear(base, state, n_ad, rank, widths)
        for s in range(n_ad):
            for part, w in enumerate(widths):
                lin.load(
                    s,
                    torch.randn(rank, h, device=dev, dtype=dt) * 0.02,
                    torch.randn(rank, w, device=dev, dtype=dt) * 0.02,
                    part=part,
                )
        x = torch.randn(n_ad, h, device=dev, dtype=dt, generator=torch.Generator(device=dev).manual_seed(2))
        segs = [(s, s, s + 1) for s in range(n_ad)]

        def run(lin=lin, state=state, x=x, segs=segs) -> torch.Tensor:
            with torch.inference_mode(), state.batch(segs, torch.device(dev)):
                return lin(x)

        results[triton_path] = (run().float(), _time(run, reps))
    assert lora_blocks  # imported for the record: the kernel path builds its blocks in state.batch
    assert lora_shrink_expand
    err_lora = (results[False][0] - results[True][0]).abs().max().item()
    return {
        "attention": {
            "shape": f"decode batch {batch}, context {ctx}, heads {heads}/{kv}, head_dim {hd}, page {ps}",
            "max_abs_err": err_attn,
            "torch_ms": t_torch * 1e3,
            "triton_ms": t_triton * 1e3,
            "triton_kv_GBps": kv_bytes / t_triton / 1e9,
        },
        "lora": {
            "shape": f"qkv {widths} from {h}, {n_ad} distinct rank-{rank} adapters, one decode row each",
            "max_abs_err": err_lora,
            "torch_ms": results[False][1] * 1e3,
            "triton_ms": results[True][1] * 1e3,
        },
    }


def copy_bandwidth(device: str) -> float:
    """Bytes per second of a device-to-device copy (read plus write counted)."""
    n = 2**20 if device == "cpu" else 2**30
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = _time(lambda: dst.copy_(src), 3 if device == "cpu" else 10)
    return 2 * n / t


def _decode_rate(llm: Any, prompts: list[list[int]], loras: list[str | None], new: int) -> dict[str, float]:
    """Run one batch; decode tokens/s measured from the step where every request has its first
    token to the end."""
    from loramux import SamplingParams

    eng = llm.engine
    sp = SamplingParams(max_tokens=new, ignore_eos=True, temperature=0.0)
    for i, (p, lr) in enumerate(zip(prompts, loras, strict=True)):
        eng.add_request(f"r{i}-{time.perf_counter_ns()}", p, sp, lora_name=lr)
    started: set[str] = set()
    t_all = None
    tokens_after = 0
    t0 = time.perf_counter()
    while eng.has_unfinished_requests():
        outs = eng.step()
        sync()
        for o in outs:
            if t_all is not None:
                tokens_after += 1
            started.add(o.request_id)
        if t_all is None and len(started) == len(prompts):
            t_all = time.perf_counter()
    end = time.perf_counter()
    decode_s = end - (t_all or end)
    return {"decode_tok_s": tokens_after / decode_s if decode_s > 0 else 0.0, "total_s": end - t0}


def _engine(a: argparse.Namespace, model: Path, seqs: int, loras: int, kv_gib: int, max_len: int) -> Any:
    """An engine for the decode measurements: bf16 on CUDA, rank-16 adapters (8 in the dry run)."""
    from loramux import LLM

    return LLM(
        str(model),
        device=a.device,
        dtype="bfloat16" if a.device == "cuda" else "float32",
        max_num_seqs=seqs,
        max_num_batched_tokens=256 if a.dry_run else 8192,
        max_loras=loras,
        max_lora_rank=8 if a.dry_run else 16,
        kv_cache_memory=(64 << 20) if a.dry_run else (kv_gib << 30),
        max_model_len=max_len,
    )


def section_decode(a: argparse.Namespace, model: Path, adapters: list[Path]) -> dict[str, Any]:
    shape = a.shape
    prompt_len, new = (16, 8) if a.dry_run else (512, 128)
    batches = (1, 4) if a.dry_run else (1, 16, 64, 256)
    rank = 8 if a.dry_run else 16
    llm = _engine(a, model, max(batches), len(adapters), 40, prompt_len + new + 16)
    for i, d in enumerate(adapters):
        llm.engine.add_lora(f"a{i}", str(d))
    vocab = shape["vocab_size"]
    gen = torch.Generator().manual_seed(0)
    bw = copy_bandwidth(a.device)
    params = sum(t.numel() * t.element_size() for t in llm.engine.executor.model.parameters())
    h, layers = shape["hidden_size"], shape["num_hidden_layers"]
    hd = h // shape["num_attention_heads"]
    kv_tok = 2 * layers * shape["num_key_value_heads"] * hd * 2  # bf16 K and V per token
    inter = shape["intermediate_size"]
    q, kvd = h, shape["num_key_value_heads"] * hd
    lora_elems = layers * rank * ((h + q) + 2 * (h + kvd) + (q + h) + 2 * (h + inter) + (inter + h))
    rows = []
    for b in batches:
        prompts = [torch.randint(3, vocab, (prompt_len,), generator=gen).tolist() for _ in range(b)]
        for with_adapters in (False, True):
            if a.budget.left() < 30:
                rows.append({"batch": b, "adapters": with_adapters, "skipped": "budget"})
                continue
            n_ad = min(b, len(adapters)) if with_adapters else 0
            loras = [f"a{i % n_ad}" if n_ad else None for i in range(b)]
            r = _decode_rate(llm, prompts, loras, new)
            avg_ctx = prompt_len + new / 2
            step_bytes = params + b * avg_ctx * kv_tok + n_ad * lora_elems * 2
            r.update(
                batch=b,
                adapters=n_ad,
                roofline_tok_s=b * bw / step_bytes,
            )
            r["of_roofline"] = r["decode_tok_s"] / r["roofline_tok_s"]
            rows.append(r)
    graphs = llm.engine.executor.graphs
    llm.engine.executor.close()
    return {
        "copy_GBps": bw / 1e9,
        "weight_GB": params / 1e9,
        "graphs": None if graphs is None else {"capture_s": graphs.capture_s, "replays": graphs.replays},
        "rows": rows,
    }


def section_graphs(a: argparse.Namespace, model: Path, adapters: list[Path]) -> dict[str, Any]:
    """One engine, graphs captured at start; each round decodes the same batches eagerly (the
    graphs set aside, as --enforce-eager leaves them) and with them, interleaved."""

    prompt_len, new = (16, 4) if a.dry_run else (512, 128)
    batches = (1, 4) if a.dry_run else (1, 16)
    env = {"LORAMUX_KERNELS": "triton", "LORAMUX_CUDA_GRAPHS": "emulate"} if a.dry_run else {}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        llm = _engine(a, model, max(batches), max(batches), 4, prompt_len + new + 16)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    runner = llm.engine.executor
    graphs = runner.graphs
    if graphs is None:
        raise RuntimeError("no CUDA graphs were captured (see the log)")
    for i, d in enumerate(adapters[: max(batches)]):
        llm.engine.add_lora(f"a{i}", str(d))
    gen = torch.Generator().manual_seed(1)
    rates: dict[tuple[bool, int], list[float]] = {}
    for b in batches:
        prompts = [
            torch.randint(3, a.shape["vocab_size"], (prompt_len,), generator=gen).tolist() for _ in range(b)
        ]
        n_ad = 0 if b == 1 else min(b, len(adapters))
        loras = [f"a{i % n_ad}" if n_ad else None for i in range(b)]
        for _ in range(1 if a.dry_run else 2):  # eager, graphs, eager, graphs
            for on in (False, True):
                if a.budget.left() < 30:
                    break
                runner.graphs = graphs if on else None
                rates.setdefault((on, b), []).append(_decode_rate(llm, prompts, loras, new)["decode_tok_s"])
    runner.graphs = graphs
    rows = []
    for b in batches:
        eager_r, graph_r = rates.get((False, b), []), rates.get((True, b), [])
        if eager_r and graph_r:
            rows.append(
                {
                    "batch": b,
                    "adapters": 0 if b == 1 else min(b, len(adapters)),
                    "eager_tok_s": eager_r,
                    "graphs_tok_s": graph_r,
                    "speedup": max(graph_r) / max(eager_r),
                }
            )
    out = {"rows": rows, "capture_s": graphs.capture_s, "replays": graphs.replays, "sizes": graphs.sizes}
    llm.engine.executor.close()
    return out


def section_peft(a: argparse.Namespace, model: Path, adapters: list[Path]) -> dict[str, Any]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    prompt_len, new = (16, 4) if a.dry_run else (512, 16)
    batches = (1, 4) if a.dry_run else (1, 16, 64, 256)
    dt = torch.bfloat16 if a.device == "cuda" else torch.float32
    base = AutoModelForCausalLM.from_pretrained(model, dtype=dt).to(a.device)
    pm = PeftModel.from_pretrained(base, adapters[0], adapter_name="a0")
    for i, d in enumerate(adapters[1:], start=1):
        pm.load_adapter(d, adapter_name=f"a{i}")
    pm.eval()
    gen = torch.Generator().manual_seed(0)
    rows = []
    for b in batches:
        if a.budget.left() < 30:
            rows.append({"batch": b, "skipped": "budget"})
            continue
        ids = torch.randint(3, a.shape["vocab_size"], (b, prompt_len), generator=gen).to(a.device)
        names = [f"a{i % len(adapters)}" for i in range(b)]
        times = []
        for n in (1, new):  # prefill plus one token, then prefill plus `new`: the difference is decode
            sync()
            t0 = time.perf_counter()
            with torch.inference_mode():
                pm.generate(
                    input_ids=ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, adapter_names=names,
                    pad_token_id=1,
                )  # fmt: skip
            sync()
            times.append(time.perf_counter() - t0)
        rows.append({"batch": b, "decode_tok_s": b * (new - 1) / max(times[1] - times[0], 1e-9)})
    del pm, base
    if a.device == "cuda":
        torch.cuda.empty_cache()
    return {"new_tokens": new, "rows": rows}


def section_online(a: argparse.Namespace) -> dict[str, Any]:
    from loramux.bench.report import summarize_run
    from loramux.bench.systems import LoramuxSettings, make_prompts, run_loramux
    from loramux.workload import WorkloadConfig, generate_requests

    shape = SHAPES["tiny" if a.dry_run else "1b"]
    model = write_random_llama(a.cache / ("online-tiny" if a.dry_run else "online-1b"), shape, a.device)
    n_ad, rank = (20, 8) if a.dry_run else (1000, 16)
    adapters = adapters_for(
        model,
        a.cache / f"online-ad-r{rank}-{'tiny' if a.dry_run else '1b'}",
        n_ad,
        rank,
        ("q_proj", "v_proj"),
    )
    settings = LoramuxSettings(
        max_loras=8 if a.dry_run else 128,
        max_cpu_loras=n_ad,
        max_lora_rank=rank,
        max_num_seqs=16 if a.dry_run else 256,
        max_num_batched_tokens=256 if a.dry_run else 8192,
        kv_cache_memory=(64 << 20) if a.dry_run else (40 << 30),
        device=a.device,
    )
    rows = []
    for rate in a.rates:
        if a.budget.left() < a.duration + 20:
            rows.append({"rate": rate, "skipped": "budget"})
            continue
        wl = WorkloadConfig(n_ad, 1.0, rate, 1.0, a.duration, (8, 512), (8, 512), 42)
        if a.dry_run:
            wl = WorkloadConfig(n_ad, 1.0, rate, 1.0, a.duration, (4, 16), (2, 8), 42)
        reqs = generate_requests(wl)
        run = run_loramux(model, adapters, reqs, make_prompts(reqs, 512), "online", settings)
        s = summarize_run(run, 6.0)
        rows.append(
            {
                "rate": rate,
                "requests": len(reqs),
                "done": s.completed,
                "tok_s": s.tokens_per_s,
                "ttft_p50": s.ttft_p50,
                "ttft_p99": s.ttft_p99,
                "adapter_loads": run.adapter_loads,
            }
        )
    return {"adapters": n_ad, "rank": rank, "duration_s": a.duration, "rows": rows}


def markdown(res: dict[str, Any]) -> str:
    out = [f"# GPU check ({res['device']}, {res['date']})", ""]
    for name, body in res["sections"].items():
        out += [f"## {name}", "", "```", json.dumps(body, indent=1, default=str), "```", ""]
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU, in seconds")
    p.add_argument("--out", default="gpu_out", help="folder for gpu.json and gpu.md")
    p.add_argument("--cache-dir", default="/tmp/loramux-gpu", help="models and adapters written here")
    p.add_argument("--budget", type=float, default=450.0, help="seconds for all sections together")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of each online run")
    p.add_argument("--rates", type=float, nargs="+", default=[4.0, 8.0, 16.0], help="online request rates")
    p.add_argument("--only", nargs="+", help="run only these sections")
    a = p.parse_args()
    if a.dry_run:
        a.duration, a.rates, a.budget = 2.0, [4.0], 300.0
    a.device = "cuda" if torch.cuda.is_available() and not a.dry_run else "cpu"
    a.dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    a.budget = Budget(a.budget)
    a.cache = Path(a.cache_dir)
    a.shape = SHAPES["tiny" if a.dry_run else "8b"]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu (dry run)",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "torch": torch.__version__,
        "sections": {},
    }
    state: dict[str, Any] = {}

    def model_and_adapters() -> tuple[Path, list[Path]]:
        if "model" not in state:
            name = "tiny" if a.dry_run else "8b"
            state["model"] = write_random_llama(a.cache / f"llama-{name}", a.shape, a.device)
            n, rank = (4, 8) if a.dry_run else (64, 16)
            state["adapters"] = adapters_for(
                state["model"], a.cache / f"ad-{name}-r{rank}-all7", n, rank, ALL7
            )
        return state["model"], state["adapters"]

    sections = {
        "tests": lambda: section_tests(a),
        "kernels": lambda: section_kernels(a),
        "decode": lambda: section_decode(a, *model_and_adapters()),
        "peft": lambda: section_peft(a, *model_and_adapters()),
        "graphs": lambda: section_graphs(a, *model_and_adapters()),
        "online": lambda: section_online(a),
    }
    for name, fn in sections.items():
        if a.only and name not in a.only:
            continue
        t0 = time.perf_counter()
        if a.budget.left() < 20:
            res["sections"][name] = {"skipped": "budget"}
            continue
        try:
            body = fn()
        except Exception as e:  # record it and go on: one device run must bring back all it can
            body = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        gc.collect()  # the section's engine and its device memory, before the next one is built
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        body["section_s"] = round(time.perf_counter() - t0, 1)
        res["sections"][name] = body
        print(f"{name}: {json.dumps(body, default=str)[:400]}", flush=True)
        (out / "gpu.json").write_text(json.dumps(res, indent=1, default=str))
    (out / "gpu.md").write_text(markdown(res))
    failed = [n for n, b in res["sections"].items() if "error" in b]
    if failed:
        print(f"sections with errors: {failed}")
        sys.exit(1)


if __name__ == "__main__":
    main()
