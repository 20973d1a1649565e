"""vLLM's engine and server arguments that loramux has no setting of its own for: one table,
read by `loramux serve` (as flags, loramux/server/vllm_flags.py) and by `LLM(...)` (as keyword
arguments, `vllm_settings` below), so a vLLM command line or script runs unchanged.

Boundary: pure data and one function from keyword arguments to engine settings; no parser, no
engine. Each argument is one of three kinds:
- "map": it has a loramux meaning, and sets that setting (`--block-size` is `--page-size`);
- "ignore": it would change nothing here (the reason is logged once, at start);
- "refuse": it would change the answers or the layout and loramux does not do it: start fails
  with the alternative named. One refused only for some values names the values it accepts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("loramux")


_CHUNKED = "every prefill is chunked within --max-num-batched-tokens (and --max-prefill-tokens)"
_TEXT_ONLY = "loramux serves text-only models: no image or audio inputs"
_GRAPH_SIZES = "loramux picks its graphs' batch sizes from --max-num-seqs"
_CONFIG_AS_IS = "loramux reads config.json as it is: edit a copy of the model folder"
_NO_TRACES = "loramux exports no OpenTelemetry traces; GET /metrics has Prometheus histograms per adapter"
_HTTP_LIMITS = "bodies are bounded by --max-request-bytes (the server parses HTTP with httptools)"
_ONE_DEVICE = "one engine serves on one device; scale out with --replicas N (data parallel on Ray Serve)"
_LOCAL_DIR = "loramux reads a local model directory; nothing is downloaded"


@dataclass(frozen=True)
class VllmFlag:
    flag: str
    kind: str  # "map", "ignore" or "refuse"
    why: str  # logged for "ignore"; the refusal's fix for "refuse"
    value: bool = True  # takes a value (False: a bare switch)
    target: str | None = None  # "map": the loramux setting it sets
    accepted: tuple[str, ...] = ()  # "refuse": values that change nothing here (then ignored)
    secret: bool = False  # its value never reaches the log


FLAGS = (
    VllmFlag("--enable-lora", "ignore", "LoRA is always on in loramux", False),
    VllmFlag("--block-size", "map", "tokens per KV page", target="page_size"),
    VllmFlag("--uvicorn-log-level", "map", "the server's log level", target="log_level"),
    VllmFlag("--disable-log-requests", "ignore", "prompts are never logged unless --log-prompts", False),
    VllmFlag(
        "--enable-log-requests",
        "ignore",
        "loramux logs request ids at debug level; --log-prompts logs prompts",
        False,
    ),
    VllmFlag("--disable-log-stats", "ignore", "loramux logs no periodic stats; /metrics has them", False),
    VllmFlag(
        "--trust-remote-code",
        "ignore",
        "loramux runs no code from the model directory (its Llama and Qwen2 are built in)",
        False,
    ),
    VllmFlag("--enable-chunked-prefill", "ignore", "prefills are always chunked", False),
    VllmFlag(
        "--disable-frontend-multiprocessing", "ignore", "the server and engine share one process", False
    ),
    VllmFlag("--disable-uvicorn-access-log", "ignore", "the access log is always off", False),
    VllmFlag("--disable-custom-all-reduce", "ignore", "one device per engine: there is no all-reduce", False),
    VllmFlag(
        "--swap-space",
        "ignore",
        "preemption recomputes; --host-kv-pages keeps evicted prefix pages in host memory",
    ),
    VllmFlag("--max-logprobs", "ignore", "loramux returns up to 20 logprobs, as OpenAI's API allows"),
    VllmFlag("--download-dir", "ignore", _LOCAL_DIR),
    VllmFlag("--revision", "ignore", "loramux reads a local model directory, as it is"),
    VllmFlag("--tokenizer-revision", "ignore", "loramux reads a local model directory, as it is"),
    VllmFlag("--code-revision", "ignore", "loramux runs no code from the model directory"),
    VllmFlag("--hf-token", "ignore", _LOCAL_DIR, secret=True),
    VllmFlag("--distributed-executor-backend", "ignore", "one engine in one process per device"),
    VllmFlag("--async-scheduling", "ignore", "the engine thread schedules the next step itself", False),
    VllmFlag(
        "--task",
        "refuse",
        "loramux serves text generation only",
        accepted=("auto", "generate"),
    ),
    VllmFlag(
        "--scheduling-policy",
        "map",
        "fcfs or priority (requests' priority field, smaller first)",
        target="policy",
    ),
    VllmFlag(
        "--response-role",
        "refuse",
        'chat answers come from the role "assistant"',
        accepted=("assistant",),
    ),
    VllmFlag(
        "--cpu-offload-gb",
        "refuse",
        "weights stay on the device; --host-kv-pages keeps evicted prefix pages in host memory",
        accepted=("0",),
    ),
    VllmFlag(
        "--return-tokens-as-token-ids",
        "refuse",
        "logprobs name tokens by their text; send return_token_ids for the ids",
        False,
    ),
    VllmFlag(
        "--enable-sleep-mode",
        "refuse",
        "sleep mode (freeing the device between uses) is not implemented",
        False,
    ),
    VllmFlag(
        "--no-enable-chunked-prefill",
        "ignore",
        "prefills are always chunked (the answers are the same)",
        False,
    ),
    VllmFlag(
        "--max-num-partial-prefills",
        "ignore",
        _CHUNKED,
    ),
    VllmFlag(
        "--max-long-partial-prefills",
        "ignore",
        _CHUNKED,
    ),
    VllmFlag(
        "--long-prefill-token-threshold",
        "ignore",
        _CHUNKED,
    ),
    VllmFlag("--scheduler-delay-factor", "ignore", "loramux admits waiting requests as each step frees room"),
    VllmFlag("--num-lookahead-slots", "ignore", "loramux decodes one token per request per step"),
    VllmFlag(
        "--compilation-config", "ignore", "loramux does not use torch.compile (CUDA graphs: --enforce-eager)"
    ),
    VllmFlag(
        "--optimization-level",
        "ignore",
        "loramux does not use torch.compile (CUDA graphs: --enforce-eager); -O N is this flag",
    ),
    VllmFlag("--cuda-graph-sizes", "ignore", _GRAPH_SIZES),
    VllmFlag("--max-cudagraph-capture-size", "ignore", _GRAPH_SIZES),
    VllmFlag("--disable-cascade-attn", "ignore", "loramux has no cascade attention", False),
    VllmFlag(
        "--enable-expert-parallel", "ignore", "loramux serves dense models: there are no experts", False
    ),
    VllmFlag("--tokenizer-pool-size", "ignore", "the server tokenizes in its own process"),
    VllmFlag("--safetensors-load-strategy", "ignore", "weights are read once at start, from safetensors"),
    VllmFlag(
        "--prefix-caching-hash-algo",
        "ignore",
        "loramux hashes prefix pages its own way (KV events carry those hashes)",
    ),
    VllmFlag("--limit-mm-per-prompt", "ignore", _TEXT_ONLY),
    VllmFlag("--mm-processor-kwargs", "ignore", _TEXT_ONLY),
    VllmFlag(
        "--disable-mm-preprocessor-cache",
        "ignore",
        _TEXT_ONLY,
        False,
    ),
    VllmFlag("--calculate-kv-scales", "ignore", "the KV cache has the weights' dtype (no fp8 scales)", False),
    VllmFlag("--enable-mfu-metrics", "ignore", "/metrics has no MFU series", False),
    VllmFlag("--show-hidden-metrics-for-version", "ignore", "/metrics hides no deprecated series"),
    VllmFlag("--disable-access-log-for-endpoints", "ignore", "the access log is always off"),
    VllmFlag(
        "--h11-max-incomplete-event-size",
        "ignore",
        _HTTP_LIMITS,
    ),
    VllmFlag(
        "--h11-max-header-count",
        "ignore",
        _HTTP_LIMITS,
    ),
    VllmFlag("--enable-log-outputs", "ignore", "loramux does not log answers", False),
    VllmFlag(
        "--log-error-stack",
        "ignore",
        "an unhandled server error and an engine failure are always logged with their stack",
        False,
    ),
    VllmFlag(
        "--logprobs-mode",
        "refuse",
        "logprobs are those of the model's raw distribution (vLLM's default, raw_logprobs)",
        accepted=("raw_logprobs",),
    ),
    VllmFlag(
        "--api-server-count",
        "refuse",
        "one server process per engine; scale out with --replicas N",
        accepted=("1",),
    ),
    VllmFlag("--headless", "refuse", "loramux has no multi-node mode; scale out with --replicas N", False),
    VllmFlag(
        "--model-impl", "refuse", "loramux runs its own Llama and Qwen2 code", accepted=("auto", "vllm")
    ),
    VllmFlag(
        "--config-format", "refuse", "loramux reads config.json (Hugging Face's)", accepted=("auto", "hf")
    ),
    VllmFlag(
        "--preemption-mode",
        "refuse",
        "a preempted request is recomputed (its pages are freed, not swapped)",
        accepted=("recompute",),
    ),
    VllmFlag(
        "--kv-transfer-config",
        "refuse",
        "disaggregated prefill (KV transfer between engines) is not implemented",
    ),
    VllmFlag(
        "--otlp-traces-endpoint",
        "refuse",
        _NO_TRACES,
    ),
    VllmFlag(
        "--collect-detailed-traces",
        "refuse",
        _NO_TRACES,
    ),
    VllmFlag("--hf-overrides", "refuse", _CONFIG_AS_IS),
    VllmFlag("--rope-scaling", "refuse", _CONFIG_AS_IS),
    VllmFlag("--rope-theta", "refuse", _CONFIG_AS_IS),
    VllmFlag(
        "--disable-sliding-window",
        "refuse",
        "loramux applies the model's sliding window as config.json sets it; lower --max-model-len "
        "to the window instead",
        False,
    ),
    VllmFlag(
        "--enable-lora-bias",
        "refuse",
        "a bias on LoRA's B (PEFT's lora_bias) is not supported; train with lora_bias=false",
        False,
    ),
    VllmFlag(
        "--lora-extra-vocab-size",
        "ignore",
        "adapters use the base vocabulary (trained rows and lm_head in it are supported); vLLM "
        "dropped this flag and extra vocabularies too",
    ),
    VllmFlag("--logits-processors", "refuse", "custom logits processors are not supported"),
    VllmFlag(
        "--structured-outputs-config",
        "refuse",
        "loramux compiles grammars with xgrammar and has no other settings; leave it out",
    ),
    VllmFlag(
        "--tool-parser-plugin",
        "refuse",
        'loramux has no tool-call parsers; send tool_choice "required" or name a function',
    ),
    VllmFlag(
        "--tool-server",
        "refuse",
        "loramux runs no built-in tools (web search, a Python sandbox) for the Responses API; "
        "send function tools and run them in the client",
    ),
    VllmFlag(
        "--scheduler-cls",
        "refuse",
        "loramux's scheduler is built in; pick the waiting order with --policy "
        "(fcfs, affinity, completion, fair, slo)",
    ),
    VllmFlag(
        "--enable-return-routed-experts",
        "refuse",
        "loramux serves dense models (Llama, Mistral, Qwen2): there is no MoE router to report",
        False,
    ),
    VllmFlag("--pt-load-strategy", "ignore", "loramux reads safetensors only (.pt and .bin are refused)"),
    VllmFlag(
        "--reasoning-parser-plugin",
        "refuse",
        "loramux does not split reasoning from content; the answer's text holds both",
    ),
    VllmFlag(
        "--chat-template-content-format",
        "refuse",
        "message content reaches the template as a string (text parts joined)",
        accepted=("auto", "string"),
    ),
    VllmFlag(
        "--trust-request-chat-template",
        "refuse",
        "a request cannot bring its own chat template here; start with --chat-template",
        False,
    ),
    VllmFlag(
        "--enable-tokenizer-info-endpoint",
        "refuse",
        "GET /tokenizer_info is not implemented; POST /tokenize and /detokenize are",
        False,
    ),
    VllmFlag("--max-seq-len-to-capture", "ignore", "loramux's CUDA graphs hold decode steps of any length"),
    VllmFlag("--max-parallel-loading-workers", "ignore", "weights are read by one reader"),
    VllmFlag(
        "--tensor-parallel-size",
        "refuse",
        _ONE_DEVICE,
        accepted=("1",),
    ),
    VllmFlag(
        "--pipeline-parallel-size",
        "refuse",
        _ONE_DEVICE,
        accepted=("1",),
    ),
    VllmFlag("--data-parallel-size", "map", "engines behind one endpoint (Ray Serve)", target="replicas"),
    VllmFlag(
        "--quantization", "refuse", "loramux serves unquantized weights; serve a bf16/fp16/fp32 checkpoint"
    ),
    VllmFlag(
        "--kv-cache-dtype", "refuse", "the KV cache has the weights' dtype: set --dtype", accepted=("auto",)
    ),
    VllmFlag("--lora-dtype", "refuse", "adapters take the weights' dtype: set --dtype", accepted=("auto",)),
    VllmFlag("--load-format", "refuse", "loramux reads safetensors", accepted=("auto", "safetensors")),
    VllmFlag("--tokenizer-mode", "refuse", "loramux uses the fast (Rust) tokenizer", accepted=("auto",)),
    VllmFlag(
        "--tokenizer",
        "refuse",
        "loramux reads the tokenizer from the model directory: copy its files there",
    ),
    VllmFlag("--fully-sharded-loras", "refuse", "adapters are not sharded: one device per engine", False),
    VllmFlag(
        "--long-lora-scaling-factors", "refuse", "LongLoRA's scaled rotary embeddings are not implemented"
    ),
    VllmFlag("--speculative-config", "refuse", "speculative decoding is not implemented; leave it out"),
    VllmFlag(
        "--guided-decoding-backend",
        "refuse",
        "loramux compiles grammars with xgrammar",
        accepted=("auto", "xgrammar"),
    ),
)


# vLLM's LLM(...) names for loramux settings that `serve` spells as loramux flags of their own
_LLM_RENAMED = {"gpu_memory_utilization": "memory_utilization"}


def vllm_settings(settings: dict[str, Any], engine_settings: set[str]) -> dict[str, Any]:
    """`LLM(...)`'s keyword arguments with vLLM's names made loramux's: mapped ones renamed,
    ignored ones dropped (logged), refused ones a ValueError naming the alternative. Anything
    else is passed on, so an unknown name still fails as the engine's TypeError."""
    out = dict(settings)
    for old, new in _LLM_RENAMED.items():
        if old in out and new not in out:
            out[new] = out.pop(old)
    for f in FLAGS:
        name = f.flag.removeprefix("--").replace("-", "_")
        if name not in out:
            continue
        value = out.pop(name)
        if value is None or value is False:
            continue  # vLLM's default: nothing asked for
        shown = name if value is True or f.secret else f"{name}={value!r}"
        if f.kind == "map" and f.target in engine_settings:
            out.setdefault(f.target, value)
        elif f.kind == "ignore" or str(value) in f.accepted:
            why = f.why if f.kind == "ignore" else "the default"
            logger.info("LLM(%s): accepted, no effect in loramux (%s)", shown, why)
        else:
            why = f.why if f.kind == "refuse" else f"it is a `loramux serve` flag ({f.why})"
            raise ValueError(f"LLM({shown}) is not supported: {why}")
    return out
