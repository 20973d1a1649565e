"""The flags of `loramux serve` and how they become an `EngineConfig`.

Boundary: argparse in, frozen configs out; no engine is built here. `loramux
serve`, a Ray replica (loramux.ray) and the tests parse the same flags with
`add_serve_args`. Flag names follow vLLM's where a vLLM user would look for them.
"""

from __future__ import annotations

import argparse
import json
import os

from loramux.config import (
    DTYPE_ALIASES,
    POLICY_NAMES,
    CacheConfig,
    EngineConfig,
    KVEventsConfig,
    LoRAConfig,
    SchedulerConfig,
)
from loramux.server.reasoning_parsers import PARSERS as REASONING_PARSERS
from loramux.server.tool_parsers import PARSERS
from loramux.server.vllm_flags import add_vllm_args


def _lora_module(text: str) -> tuple[str, str]:
    """NAME=PATH, or vLLM's JSON form {"name": ..., "path": ...}."""
    if text.startswith("{"):
        obj = json.loads(text)
        return obj["name"], obj["path"]
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--lora-modules takes NAME=PATH, got {text!r}")
    return name, path


def byte_count(text: str) -> int:
    """`--kv-cache-memory`'s value: bytes, or a number with K, M or G (binary units, "GiB" too)."""
    units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
    try:
        value = float(num) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write bytes, or e.g. 512M or 2G") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: the KV pool needs a positive size")
    return int(value)


def dtype(text: str) -> str:
    """`--dtype`'s value, vLLM's aliases too: half is float16, float is float32."""
    return DTYPE_ALIASES.get(text, text)


def token_count(text: str) -> int:
    """A token count as vLLM reads `--max-model-len`: a whole number, or one with a suffix: k, m,
    g (1000s, decimals allowed: 25.6k) or K, M, G (1024s, whole numbers only: 32K)."""
    t = text.strip()
    decimal, binary = {"k": 10**3, "m": 10**6, "g": 10**9}, {"K": 2**10, "M": 2**20, "G": 2**30}
    try:
        if t[-1:] in decimal:
            value = float(t[:-1]) * decimal[t[-1]]
            if value != int(value):
                raise ValueError
            return int(value)
        if t[-1:] in binary:
            return int(t[:-1]) * binary[t[-1]]
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a token count; write e.g. 4096, 32k (32000) or 32K (32768)"
        ) from None


def chat_template(text: str) -> str:
    """`--chat-template`'s value as vLLM reads it: a file's text, or the template itself when it
    holds Jinja's braces or a newline; anything else is a path that does not open."""
    try:
        with open(text, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        if any(c in text for c in "{}\n"):
            return text
        raise argparse.ArgumentTypeError(
            f"--chat-template {text!r}: cannot read it ({e.strerror}); give a template file, or the "
            "template inline"
        ) from None


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """`loramux serve`'s flags, one function per group (a Ray replica and the tests parse the same)."""
    _server_args(p)
    _adapter_args(p.add_argument_group("adapters"))
    _scheduling_args(p.add_argument_group("scheduling"))
    _kv_cache_args(p.add_argument_group("KV cache"))
    _model_args(p.add_argument_group("model"))
    _cluster_args(
        p.add_argument_group("scale-out on Ray Serve (pip install 'loramux[ray]'; docs/scale-out.md)")
    )
    add_vllm_args(p)


def _server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        nargs="?",
        default=None,
        help="HF model directory; without one, serve the built-in demo (shipped in the package)",
    )
    p.add_argument(
        "--model",
        dest="model_flag",
        default=None,
        metavar="MODEL",
        help="the model directory, as vLLM's --model (the same as the positional MODEL)",
    )
    p.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        metavar="NAME",
        help="the `model` id of the base model; more names are aliases a request may use too (vLLM's "
        "form); default: the model directory's name",
    )
    p.add_argument(
        "--lora-modules",
        nargs="+",
        type=_lora_module,
        default=[],
        metavar="NAME=PATH",
        help="adapters to load at start",
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (loopback unless you say otherwise)"
    )
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    env_key = os.environ.get("LORAMUX_API_KEY") or os.environ.get("VLLM_API_KEY")
    p.add_argument(
        "--api-key",
        nargs="+",
        default=[env_key] if env_key else None,
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' on /v1 routes and /tokenize, any one of the keys "
        "given; default: the environment's LORAMUX_API_KEY, else vLLM's VLLM_API_KEY",
    )
    p.add_argument(
        "--allowed-lora-dirs",
        nargs="+",
        default=[],
        metavar="DIR",
        help="folders runtime adapter loads may come from; a request naming an adapter that is not "
        "loaded is served from the folder of that name in one of them (loaded on first use); none: "
        "runtime loading is off",
    )
    p.add_argument("--log-prompts", action="store_true", help="write prompt text to the log (off by default)")
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM, seconds running requests may take to finish before they are aborted",
    )
    p.add_argument(
        "--max-request-bytes",
        type=int,
        default=8 << 20,
        help="request bodies larger than this are refused (413) before they are read",
    )
    p.add_argument(
        "--allowed-origins",
        type=json.loads,
        default=None,
        metavar="JSON",
        help="CORS: origins browsers may call from, as vLLM takes them (e.g. '[\"*\"]'); unset: no CORS",
    )
    p.add_argument("--allowed-methods", type=json.loads, default=["*"], metavar="JSON", help="CORS methods")
    p.add_argument("--allowed-headers", type=json.loads, default=["*"], metavar="JSON", help="CORS headers")
    p.add_argument("--allow-credentials", action="store_true", help="CORS: allow credentials")
    p.add_argument(
        "--enable-prompt-tokens-details",
        action="store_true",
        help="usage gives prompt_tokens_details.cached_tokens: prompt tokens found in the prefix cache",
    )
    p.add_argument("--disable-fastapi-docs", action="store_true", help="no /docs and no /openapi.json")
    p.add_argument(
        "--enable-request-id-headers",
        action="store_true",
        help="every answer carries X-Request-Id: the request's own X-Request-Id, else a new one",
    )
    p.add_argument(
        "--enable-server-load-tracking",
        action="store_true",
        help='GET /load answers {"server_load": N}: generation and tokenizer requests in flight',
    )
    p.add_argument(
        "--enable-force-include-usage",
        action="store_true",
        help="streams end with a usage chunk even without stream_options.include_usage",
    )
    p.add_argument(
        "--max-stored-responses",
        type=int,
        default=None,
        metavar="N",
        help="the Responses API keeps the last N answers (default 1000; 0: none) for GET "
        "/v1/responses/{id} and previous_response_id; each holds its conversation's text",
    )
    p.add_argument(
        "--max-log-len",
        type=int,
        default=None,
        help="with --log-prompts: log at most this many characters (or token ids) of each prompt",
    )
    p.add_argument(
        "--middleware",
        action="append",
        default=[],
        metavar="IMPORT.PATH",
        help="ASGI middleware to add (repeatable): a class is added with app.add_middleware, a "
        "function as an HTTP middleware (@app.middleware('http')), as vLLM does",
    )
    p.add_argument(
        "--default-chat-template-kwargs",
        type=json.loads,
        default=None,
        metavar="JSON",
        help="chat_template_kwargs every chat request starts from (its own override them), e.g. "
        "'{\"enable_thinking\": false}'",
    )
    p.add_argument(
        "--exclude-tools-when-tool-choice-none",
        action="store_true",
        help='a chat request with tool_choice "none" renders its prompt without its tools',
    )
    p.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help='answer chat requests with tools and tool_choice "auto" (the default with tools) in free '
        "text and find the tool calls in it with --tool-call-parser",
    )
    p.add_argument(
        "--tool-call-parser",
        choices=sorted(PARSERS),
        default=None,
        help="the format the model writes tool calls in: hermes (<tool_call>{...}</tool_call>: Qwen, "
        'Hermes), llama3_json ({"name": ..., "parameters": ...}: Llama 3.1-3.3), pythonic '
        "([f(a=1)]: Llama 3.2, Llama 4) or qwen3_coder (<function=f><parameter=a>1</parameter>...: "
        "Qwen3-Coder)",
    )
    p.add_argument(
        "--reasoning-parser",
        choices=sorted(REASONING_PARSERS),
        default=None,
        help="split chat answers into reasoning (<think> ... </think>) and content: deepseek_r1 "
        "(reasoning until </think>: DeepSeek-R1, QwQ, Qwen3 2507 thinking) or qwen3 (reasoning "
        "only after a leading <think>: Qwen3, which may think or not)",
    )
    p.add_argument(
        "--root-path",
        default="",
        help="the path prefix a reverse proxy serves this server under (ASGI root_path)",
    )
    p.add_argument(
        "--uds", default=None, metavar="PATH", help="listen on this Unix socket instead of --host/--port"
    )
    p.add_argument("--ssl-keyfile", default=None, help="TLS: the private key file (PEM)")
    p.add_argument("--ssl-certfile", default=None, help="TLS: the certificate file (PEM); serves https")
    p.add_argument("--ssl-ca-certs", default=None, help="TLS: CA certificates to check client certificates")
    p.add_argument(
        "--ssl-cert-reqs",
        type=int,
        default=0,
        choices=[0, 1, 2],
        help="TLS: client certificates are 0 not asked for, 1 optional, 2 required (Python's ssl.CERT_*)",
    )
    p.add_argument(
        "--ssl-ciphers", default=None, help="TLS: cipher suites (OpenSSL's list format; TLS 1.2 and below)"
    )
    p.add_argument(
        "--log-config-file",
        default=None,
        metavar="JSON",
        help="a logging.config dictConfig file (JSON) for loramux's and uvicorn's logs, as vLLM takes",
    )
    p.add_argument("--log-level", default="info", help="log level: debug, info, warning, error")
    p.add_argument(
        "--step-log",
        default=None,
        metavar="PATH",
        help="write each step's cost features and seconds to PATH (JSONL); `loramux simulate "
        "calibrate --from-log PATH` fits a simulator profile from it (off by default)",
    )


def _adapter_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--max-loras",
        type=int,
        default=LoRAConfig.max_loras,
        help="device adapter slots: the most distinct adapters in one step",
    )
    g.add_argument(
        "--max-cpu-loras",
        type=int,
        default=None,
        help="adapters kept in host memory (LRU); default max(max_loras, 32)",
    )
    g.add_argument(
        "--max-lora-rank",
        type=int,
        default=LoRAConfig.max_lora_rank,
        help="largest adapter rank accepted; slot buffers are sized for it",
    )
    g.add_argument(
        "--max-lora-bytes", type=int, default=None, help="optional byte budget for device-resident adapters"
    )


def _scheduling_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--max-num-seqs", type=int, default=SchedulerConfig.max_num_seqs, help="most requests in one step"
    )
    g.add_argument(
        "--max-num-batched-tokens",
        type=token_count,
        default=SchedulerConfig.max_num_batched_tokens,
        help="most tokens (decodes plus prefill chunks) in one step",
    )
    g.add_argument(
        "--max-prefill-tokens",
        type=int,
        default=None,
        help="most prefill tokens in one step; default: --max-num-batched-tokens",
    )
    g.add_argument(
        "--policy",
        default=SchedulerConfig.policy,
        choices=POLICY_NAMES,
        help="waiting-queue order (docs/design.md); fcfs matches vLLM's decisions",
    )
    g.add_argument(
        "--ttft-slo",
        type=float,
        default=SchedulerConfig.ttft_slo_s,
        help="the slo policy's time-to-first-token target in seconds",
    )
    g.add_argument(
        "--slo-wait-factor",
        type=float,
        default=SchedulerConfig.slo_wait_factor,
        help="slo policy: a request past its target waits at most this many times FCFS's wait, then "
        "goes first (larger: more requests on target, longer tail)",
    )
    g.add_argument(
        "--kv-watermark",
        type=float,
        default=SchedulerConfig.kv_watermark,
        help="fraction of the KV pages a new request must leave free while others run, so they grow "
        "without preemption (vLLM v0's watermark); default: the policy's (slo 0.03, others 0)",
    )
    g.add_argument(
        "--starvation-timeout",
        type=float,
        default=SchedulerConfig.starvation_timeout_s,
        help="seconds after which a request held back by the adapter cap reserves the next slot",
    )
    g.add_argument(
        "--waiting-served-ratio",
        type=float,
        default=SchedulerConfig.waiting_served_ratio,
        help="while decodes run, admit prefills only if this many x running requests wait (0: always)",
    )
    g.add_argument(
        "--max-waiting-steps",
        type=int,
        default=SchedulerConfig.max_waiting_steps,
        help="... unless decodes ran this many steps without an admission",
    )
    g.add_argument("--max-queue-len", type=int, default=None, help="answer 503 while this many wait")


def _kv_cache_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--page-size", type=int, default=CacheConfig.page_size, help="tokens per KV page")
    g.add_argument("--num-pages", type=int, default=None, help="KV pages; default: sized from memory")
    g.add_argument(
        "--kv-cache-memory",
        type=byte_count,
        default=None,
        metavar="BYTES",
        help="bytes for the KV pool (suffixes K, M, G: KiB, MiB, GiB); default: what --max-num-seqs "
        "sequences of --max-model-len tokens use, at most half the free memory",
    )
    g.add_argument(
        "--idle-cache-pages",
        type=int,
        default=None,
        help="on CPU, idle prefix-cache pages kept before they are reused instead of touching new "
        "memory (default: --max-num-batched-tokens / --page-size)",
    )
    g.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=None,
        help="vLLM's flag: fraction of device memory (on CPU, of the memory available at start) "
        "for weights plus KV pool; the pool gets what the weights leave",
    )
    g.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse KV pages of shared prefixes, per adapter",
    )
    g.add_argument(
        "--enable-kv-events",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="publish KV-cache events over ZeroMQ in vLLM's format (see --kv-events-endpoint)",
    )
    g.add_argument("--kv-events-endpoint", default=KVEventsConfig.endpoint, help="PUB socket address")
    g.add_argument("--kv-events-replay-endpoint", default=None, help="ROUTER socket for replay requests")
    g.add_argument("--kv-events-topic", default="", help="topic of every published batch")
    g.add_argument(
        "--kv-events-config",
        type=json.loads,
        default=None,
        help='vLLM\'s JSON form, e.g. \'{"enable_kv_cache_events": true, "endpoint": "tcp://127.0.0.1:5557"}\'',
    )
    g.add_argument("--host-kv-pages", type=int, default=0, help="host-memory pages for evicted prefix pages")


def _model_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--dtype",
        default="auto",
        type=dtype,
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights and KV dtype (vLLM's half and float too); auto: float32 on CPU, bfloat16 on CUDA",
    )
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    g.add_argument(
        "--max-model-len",
        type=token_count,
        default=None,
        help="longest prompt plus output; default: the model's own limit",
    )
    g.add_argument("--seed", type=int, default=0, help="seed for sampling without a per-request seed")
    g.add_argument(
        "--enforce-eager",
        action="store_true",
        help="no CUDA graphs: decode steps run eagerly on CUDA too (the CPU always does)",
    )
    g.add_argument(
        "--generation-config",
        default="auto",
        choices=["auto", "vllm"],
        help="auto: a request that sets no temperature, top_p, top_k, min_p or repetition_penalty takes "
        "the model's generation_config.json values (vLLM's default); vllm: SamplingParams' defaults",
    )
    g.add_argument(
        "--skip-tokenizer-init",
        action="store_true",
        help="load no tokenizer: prompts are token ids, answers are read as token_ids "
        "(send return_token_ids); text prompts, chat and stop strings are refused",
    )
    g.add_argument(
        "--override-generation-config",
        type=json.loads,
        default=(),
        metavar="JSON",
        help="default temperature, top_p, top_k, min_p or repetition_penalty, e.g. '{\"temperature\": 0.5}': "
        "over generation_config.json's with --generation-config auto, alone with vllm",
    )
    g.add_argument(
        "--chat-template",
        type=chat_template,
        default=None,
        metavar="FILE_OR_TEMPLATE",
        help="a Jinja chat template, as a file or inline, used instead of the tokenizer's (vLLM's flag)",
    )


def _cluster_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--replicas",
        type=int,
        default=None,
        help="run this many engines behind one endpoint on Ray Serve, requests routed to a replica "
        "that holds their adapter; unset: one engine, no Ray",
    )
    g.add_argument(
        "--ray-address",
        default=None,
        help="join this Ray cluster (e.g. ray://head:10001 or auto); unset: start a local Ray",
    )
    g.add_argument("--cpus-per-replica", type=float, default=1.0, help="Ray CPUs each replica asks for")
    g.add_argument("--gpus-per-replica", type=float, default=0.0, help="Ray GPUs each replica asks for")


_VLLM_KV_EVENT_KEYS = {"endpoint", "replay_endpoint", "topic", "buffer_steps", "max_queue_size"}


def kv_events_config(args: argparse.Namespace) -> KVEventsConfig | None:
    """--enable-kv-events and its flags, or vLLM's --kv-events-config JSON (hwm is accepted and
    ignored; publisher must be "zmq" or "null")."""
    raw = args.kv_events_config
    if raw is not None:
        if not isinstance(raw, dict):
            raise SystemExit("--kv-events-config takes a JSON object")
        if not raw.get("enable_kv_cache_events", False) or raw.get("publisher", "zmq") == "null":
            return None
        if raw.get("publisher", "zmq") != "zmq":
            raise SystemExit(f'--kv-events-config: publisher {raw["publisher"]!r}; use "zmq"')
        known = _VLLM_KV_EVENT_KEYS | {"enable_kv_cache_events", "publisher", "hwm"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise SystemExit(f"--kv-events-config: unknown keys {unknown}; known: {sorted(known)}")
        return KVEventsConfig(**{k: v for k, v in raw.items() if k in _VLLM_KV_EVENT_KEYS})
    if not args.enable_kv_events:
        return None
    return KVEventsConfig(
        endpoint=args.kv_events_endpoint,
        replay_endpoint=args.kv_events_replay_endpoint,
        topic=args.kv_events_topic,
    )


_FLAG = {
    "starvation_timeout_s": "starvation_timeout",
    "ttft_slo_s": "ttft_slo",
    "memory_utilization": "gpu_memory_utilization",
}
_NO_FLAG = {"free_memory_fraction"}  # engine settings `serve` does not expose


def engine_config(args: argparse.Namespace, model: str) -> EngineConfig:
    """Every engine setting from its flag (`_FLAG` names the ones spelled otherwise); a setting
    with no flag and not in `_NO_FLAG` is an AttributeError here, not a silent default."""
    settings = {s: getattr(args, _FLAG.get(s, s)) for s in EngineConfig.setting_names() if s not in _NO_FLAG}
    return EngineConfig.create(model, kv_events=kv_events_config(args), **settings)
