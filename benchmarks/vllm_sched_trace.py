"""vLLM v1's scheduler on issue 10's trace, draw for draw: the side-by-side baseline for
`bench_scheduler.py --trace`.

Not a test, and not a dependency: run it in a separate virtual environment that has vllm's
scheduler importable (shared/research/env.md section 6: torch 2.13.0 CPU, `pip install --no-deps
vllm==0.33.0`, then the pure-Python modules it imports), with this repository on PYTHONPATH so
the trace comes from `loramux.bench.sched_trace.make_trace` itself:

    PYTHONPATH=. /path/to/vllm-venv/bin/python benchmarks/vllm_sched_trace.py \
        32:1000:1.0 32:1000:0.3 4:1000:1.0 4:1000:0.3 32:32:1.0 32:32:0.3 none:0:1.0

Each argument is max_loras:adapters:a ("none:0:a" runs without LoRA). The engine settings are
the trace's (256 seqs, 8192 tokens, 2048 max length, 17600 pages of 16, prefix caching on);
every request whose prefill completes samples one token; 512 warm-up steps, 300 measured.
vLLM needs a model config to build its scheduler: a one-layer Llama config.json is written to
a temporary folder (no weights are read).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from vllm.config import CacheConfig, DeviceConfig, LoRAConfig, ModelConfig, SchedulerConfig, VllmConfig
from vllm.lora.request import LoRARequest
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request
from vllm.v1.structured_output import StructuredOutputManager

from loramux.bench.sched_trace import make_trace

PAGES, PAGE = 17600, 16


def tiny_model_dir() -> str:
    d = Path(tempfile.mkdtemp(prefix="vllm-trace-model-"))
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "num_hidden_layers": 1,
        "vocab_size": 512,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "torch_dtype": "float32",
    }
    (d / "config.json").write_text(json.dumps(cfg))
    return str(d)


def run(
    model_dir: str, max_loras: int | None, n_adapters: int, power: float, warm: int = 512, steps: int = 300
):
    lora = max_loras is not None
    cache = CacheConfig(block_size=PAGE, enable_prefix_caching=True)
    cache.num_gpu_blocks = PAGES
    vc = VllmConfig(
        model_config=ModelConfig(
            model=model_dir, dtype="float32", max_model_len=2048, skip_tokenizer_init=True
        ),
        scheduler_config=SchedulerConfig(
            max_num_seqs=256, max_num_batched_tokens=8192, max_model_len=2048, is_encoder_decoder=False
        ),
        cache_config=cache,
        lora_config=LoRAConfig(max_loras=max_loras, max_lora_rank=8) if lora else None,
        device_config=DeviceConfig("cpu"),
    )
    spec = FullAttentionSpec(block_size=PAGE, num_kv_heads=2, head_size=64, dtype=torch.float32)
    kvc = KVCacheConfig(
        num_blocks=PAGES, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(["l0"], spec)]
    )
    s = Scheduler(vc, kvc, StructuredOutputManager(vc), block_size=PAGE)
    init_none_hash(sha256)
    hasher = get_request_block_hasher(PAGE, sha256)
    reqs = {}
    for i, (k, prompt, max_tokens) in enumerate(make_trace(4096, n_adapters, power, 0)):
        sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
        lr = LoRARequest(f"a{k}", k + 1, "/unused") if lora else None
        r = Request(f"r{i}", prompt, sp, None, arrival_time=0.0, lora_request=lr, block_hasher=hasher)
        reqs[r.request_id] = r
        s.add_request(r)
    tokens, seqs, adapters, times, done = [], [], [], [], 0
    for i in range(warm + steps):
        t0 = time.perf_counter()
        out = s.schedule()
        ids = list(out.num_scheduled_tokens)
        sampled = [
            [1]
            if reqs[rid].num_computed_tokens + out.num_scheduled_tokens[rid] >= reqs[rid].num_tokens
            else []
            for rid in ids
        ]
        mro = ModelRunnerOutput(
            req_ids=ids, req_id_to_index={r: j for j, r in enumerate(ids)}, sampled_token_ids=sampled
        )
        outputs = s.update_from_output(out, mro)
        dt = time.perf_counter() - t0
        done += sum(o.finish_reason is not None for v in outputs.values() for o in v.outputs)
        if i >= warm:
            tokens.append(out.total_num_scheduled_tokens)
            seqs.append(len(ids))
            adapters.append(len({reqs[r].lora_request.lora_int_id for r in ids if reqs[r].lora_request}))
            times.append(dt)
    return (
        statistics.mean(tokens),
        statistics.mean(seqs),
        statistics.mean(adapters),
        done,
        1e3 * statistics.median(times),
    )


def main() -> None:
    model_dir = tiny_model_dir()
    print(
        "| config | a | vLLM tokens/step | seqs/step | adapters/step | completed | schedule+update p50 ms |"
    )
    print("|---|---|---|---|---|---|---|")
    for arg in sys.argv[1:]:
        ml, na, a = arg.split(":")
        max_loras = None if ml == "none" else int(ml)
        t, q, ad, done, ms = run(model_dir, max_loras, int(na), float(a))
        label = "no LoRA" if max_loras is None else f"{max_loras}:{na}"
        print(f"| {label} | {a} | {t:.1f} | {q:.1f} | {ad:.1f} | {done} | {ms:.3f} |", flush=True)


if __name__ == "__main__":
    main()
