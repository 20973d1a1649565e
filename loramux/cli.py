"""Command line: `loramux serve`, `loramux bench` and `loramux simulate`.

Boundary: parses flags into the frozen configs and hands them on; every flag
of `serve` lands in `EngineConfig` or `ServerConfig` (S6.2). Flag names follow
vLLM's where a vLLM user would look for them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loramux import __version__
from loramux.config import CacheConfig, EngineConfig, KVEventsConfig, LoRAConfig, ModelConfig, SchedulerConfig

logger = logging.getLogger("loramux")


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


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        nargs="?",
        default=None,
        help="HF model directory; without one, serve the built-in demo (shipped in the package)",
    )
    p.add_argument("--served-model-name", default=None, help="the `model` id of the base model")
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
    p.add_argument(
        "--api-key",
        default=os.environ.get("LORAMUX_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1 routes (or set LORAMUX_API_KEY)",
    )
    p.add_argument(
        "--allowed-lora-dirs",
        nargs="+",
        default=[],
        metavar="DIR",
        help="folders runtime adapter loads may come from; none: runtime loading is off",
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
    p.add_argument("--log-level", default="info", help="log level: debug, info, warning, error")
    g = p.add_argument_group("adapters")
    g.add_argument(
        "--enable-lora",
        action="store_true",
        help="accepted for vLLM compatibility: LoRA is always on in loramux",
    )
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
    g = p.add_argument_group("scheduling")
    g.add_argument(
        "--max-num-seqs", type=int, default=SchedulerConfig.max_num_seqs, help="most requests in one step"
    )
    g.add_argument(
        "--max-num-batched-tokens",
        type=int,
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
        choices=["fcfs", "affinity", "completion", "fair"],
        help="waiting-queue order (docs/design.md); fcfs matches vLLM's decisions",
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
    g = p.add_argument_group("KV cache")
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
    g = p.add_argument_group("model")
    g.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights and KV dtype; auto: float32 on CPU, bfloat16 on CUDA",
    )
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    g.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="longest prompt plus output; default: the model's own limit",
    )
    g.add_argument("--seed", type=int, default=0, help="seed for sampling without a per-request seed")
    g = p.add_argument_group("scale-out on Ray Serve (pip install 'loramux[ray]'; docs/scale-out.md)")
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


def engine_config(args: argparse.Namespace, model: str) -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(
            model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len, seed=args.seed
        ),
        scheduler=SchedulerConfig(
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_prefill_tokens=args.max_prefill_tokens,
            policy=args.policy,
            starvation_timeout_s=args.starvation_timeout,
            waiting_served_ratio=args.waiting_served_ratio,
            max_waiting_steps=args.max_waiting_steps,
            max_queue_len=args.max_queue_len,
        ),
        cache=CacheConfig(
            page_size=args.page_size,
            num_pages=args.num_pages,
            kv_cache_memory=args.kv_cache_memory,
            idle_cache_pages=args.idle_cache_pages,
            memory_utilization=args.gpu_memory_utilization,
            enable_prefix_caching=args.enable_prefix_caching,
            enable_kv_events=args.enable_kv_events,
            host_kv_pages=args.host_kv_pages,
        ),
        kv_events=kv_events_config(args),
        lora=LoRAConfig(
            max_loras=args.max_loras,
            max_cpu_loras=args.max_cpu_loras,
            max_lora_rank=args.max_lora_rank,
            max_lora_bytes=args.max_lora_bytes,
        ),
    )


@dataclass
class Built:
    """What `loramux serve` runs: the engine on its thread and the FastAPI app in front of it."""

    app: Any
    aengine: Any
    name: str  # the base model's `model` id
    loras: list[tuple[str, str]]  # adapters named at start (registered unless told not to)
    metrics: Any  # the app's Prometheus metrics (loramux.server.metrics.Metrics)


def base_model(args: argparse.Namespace) -> tuple[str, str, list[tuple[str, str]]]:
    """(model directory, served name, adapters named at start); the demo shipped in the package
    when no model is given."""
    loras = list(args.lora_modules)
    model, name = args.model, args.served_model_name
    if model is None:
        from loramux import demo

        model_dir, adapters = demo.demo_paths()
        model, name = str(model_dir), name or demo.BASE_NAME
        loras = [(n, str(p)) for n, p in adapters.items()] + loras
    return model, name or Path(model).name, loras


def build_server(args: argparse.Namespace, register_loras: bool = True) -> Built:
    """The engine, its thread (started) and the app, from `serve`'s flags. One Ray replica builds
    the same, with `register_loras=False`: its adapters load on demand."""
    from loramux.engine.llm_engine import LLMEngine
    from loramux.server.api import ServerConfig, build_app
    from loramux.server.async_engine import AsyncEngine
    from loramux.server.metrics import Metrics

    model, name, loras = base_model(args)
    engine = LLMEngine(engine_config(args, model))
    if register_loras:
        for lora_name, path in loras:
            info = engine.add_lora(lora_name, path)
            logger.info("adapter %s: rank %d from %s", lora_name, info.rank, path)
    metrics = Metrics(_config_info(engine))
    aengine = AsyncEngine(engine)
    cfg = ServerConfig(
        served_model_name=name,
        api_key=args.api_key,
        allowed_lora_dirs=tuple(args.allowed_lora_dirs),
        log_prompts=args.log_prompts,
        max_request_bytes=args.max_request_bytes,
    )
    app = build_app(aengine, cfg, metrics)
    aengine.start()
    if register_loras and loras:  # their weights are read in the background as the port opens
        names = [n for n, _ in loras]
        aengine.submit(lambda: engine.read_loras_ahead(names))
    return Built(app, aengine, name, loras, metrics)


def serve(args: argparse.Namespace) -> None:
    if args.replicas is not None:
        from loramux.ray import run_cluster

        run_cluster(args)
        return
    import uvicorn

    built = build_server(args)
    rt = built.aengine.engine.runtime
    logger.info(
        "serving %s (%s, %s) with %d adapters on http://%s:%d: %d KV pages of %d tokens, max_model_len %d",
        built.name,
        rt.device,
        rt.dtype,
        len(built.loras),
        args.host,
        args.port,
        rt.num_pages,
        args.page_size,
        rt.max_model_len,
    )
    # SIGTERM: uvicorn stops accepting, lets running requests finish for up to --shutdown-timeout,
    # then cancels them (their requests are aborted) and re-raises the signal to the handler that
    # was there before it: this one, so the process ends normally, with exit status 0.
    signal.signal(signal.SIGTERM, lambda *_: logger.info("stopped on SIGTERM"))
    try:
        uvicorn.run(
            built.app,
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            access_log=False,
            timeout_graceful_shutdown=args.shutdown_timeout,
        )
    finally:
        built.aengine.shutdown()


def _config_info(engine: object) -> dict[str, str]:
    """The limits as the engine holds them (not as parsed), for the loramux_config metric."""
    s = engine.scheduler  # type: ignore[attr-defined]
    rt = engine.runtime  # type: ignore[attr-defined]
    c = s.config
    return {
        "max_loras": str(s.adapters.max_loras),
        "max_cpu_loras": str(s.adapters.max_cpu_loras),
        "max_lora_rank": str(s.adapters.max_lora_rank),
        "max_num_seqs": str(c.max_num_seqs),
        "max_num_batched_tokens": str(c.max_num_batched_tokens),
        "prefill_budget": str(c.prefill_budget),
        "max_queue_len": str(c.max_queue_len or 0),
        "num_pages": str(s.kv.pool.num_pages),
        "page_size": str(s.kv.pool.page_size),
        "max_model_len": str(rt.max_model_len),
        "prefix_caching": str(int(type(s.kv.cache).__name__ == "RadixPrefixCache")),
        "starvation_timeout_s": str(c.starvation_timeout_s),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="loramux", description="Serve one base model with many LoRA adapters."
    )
    parser.add_argument("--version", action="version", version=f"loramux {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve_parser = sub.add_parser(
        "serve",
        help="start the OpenAI-compatible server",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_serve_args(serve_parser)
    bench = sub.add_parser("bench", help="throughput and latency, side by side with transformers+PEFT")
    from loramux.bench.cli import add_bench_args

    add_bench_args(bench)
    simulate = sub.add_parser(
        "simulate", help="the real scheduler on a virtual clock: policies, rates and workloads, in seconds"
    )
    from loramux.sim.cli import add_simulate_args

    add_simulate_args(simulate)
    args = parser.parse_args(argv)
    level = getattr(args, "log_level", "info").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "serve":
            serve(args)
        elif args.command == "simulate":
            from loramux.sim.cli import run_simulate

            run_simulate(args)
        else:
            from loramux.bench.cli import run_bench

            run_bench(args)
    except ValueError as e:  # configuration errors: say what and how to fix it, no traceback
        print(f"loramux: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
