"""Build what `loramux serve` runs: the engine on its thread and the app in front of it.

Boundary: from parsed `serve` flags to a started `AsyncEngine` and its FastAPI
app. The CLI serves it with uvicorn; a Ray replica (loramux.ray) builds the
same and answers forwarded requests with it.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loramux.server.serve_args import engine_config
from loramux.server.server_config import ServerConfig
from loramux.server.tool_parsers import PARSERS

logger = logging.getLogger("loramux")


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
    when no model is given. The name is the first of --served-model-name's; `model_aliases` has
    the others."""
    loras = list(args.lora_modules)
    model, name = args.model, (args.served_model_name or [None])[0]
    flag = getattr(args, "model_flag", None)
    if flag is not None and model is not None and flag != model:
        raise ValueError(f"two models: {model!r} and --model {flag!r}; give one of them")
    model = model or flag
    if model is None:
        from loramux import demo

        model_dir, adapters = demo.demo_paths()
        model, name = str(model_dir), name or demo.BASE_NAME
        loras = [(n, str(p)) for n, p in adapters.items()] + loras
    return model, name or Path(model).name, loras


def model_aliases(args: argparse.Namespace) -> tuple[str, ...]:
    """The base model's other ids: --served-model-name's names after the first (vLLM's form)."""
    names = args.served_model_name or []
    return tuple(n for n in dict.fromkeys(names[1:]) if n != names[0])


def server_config(args: argparse.Namespace, name: str) -> ServerConfig:
    """The HTTP server's settings from `serve`'s flags; `name` is the base model's id."""
    return ServerConfig(
        served_model_name=name,
        model_aliases=model_aliases(args),
        api_keys=tuple(args.api_key or ()),
        allowed_lora_dirs=tuple(args.allowed_lora_dirs),
        log_prompts=args.log_prompts,
        max_request_bytes=args.max_request_bytes,
        allowed_origins=tuple(args.allowed_origins or ()),
        allowed_methods=tuple(args.allowed_methods),
        allowed_headers=tuple(args.allowed_headers),
        allow_credentials=args.allow_credentials,
        prompt_tokens_details=args.enable_prompt_tokens_details,
        docs=not args.disable_fastapi_docs,
        request_id_headers=args.enable_request_id_headers,
        load_tracking=args.enable_server_load_tracking,
        force_include_usage=args.enable_force_include_usage,
        max_log_len=args.max_log_len,
        middleware=tuple(args.middleware),
        root_path=args.root_path,
        exclude_tools_when_tool_choice_none=args.exclude_tools_when_tool_choice_none,
        auto_tool_parser=auto_tool_parser(args),
        reasoning_parser=args.reasoning_parser,
        default_chat_template_kwargs=args.default_chat_template_kwargs or {},
        max_stored_responses=(
            ServerConfig.max_stored_responses
            if args.max_stored_responses is None
            else args.max_stored_responses
        ),
    )


def auto_tool_parser(args: argparse.Namespace) -> str | None:
    """The parser of tool_choice "auto" answers, as vLLM's two flags set it: both, or neither."""
    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        raise ValueError(
            "--enable-auto-tool-choice needs --tool-call-parser to find the calls in an answer: "
            f"one of {sorted(PARSERS)} (hermes for Qwen and Hermes, llama3_json for Llama 3.1, "
            "pythonic for Llama 3.2 and 4, qwen3_coder for Qwen3-Coder)"
        )
    return args.tool_call_parser if args.enable_auto_tool_choice else None


def build_server(args: argparse.Namespace, register_loras: bool = True, keep_responses: bool = True) -> Built:
    """The engine, its thread (started) and the app, from `serve`'s flags. One Ray replica builds
    the same, with `register_loras=False` (Ray Serve loads its adapters on demand, so it finds
    none by name itself) and `keep_responses=False`
    (a later request may reach another replica, so no replica keeps Responses API answers)."""
    from loramux.engine.chat import check_template_kwargs
    from loramux.engine.llm_engine import LLMEngine
    from loramux.server.api import build_app
    from loramux.server.async_engine import AsyncEngine
    from loramux.server.metrics import Metrics

    model, name, loras = base_model(args)
    cfg = server_config(args, name)  # before the engine: a bad flag fails at once
    if not keep_responses:
        cfg = dataclasses.replace(cfg, max_stored_responses=0)
    if not register_loras:  # Ray Serve's multiplexing registers and unregisters the adapters
        cfg = dataclasses.replace(cfg, resolve_adapters=False)
    clash = [n for n, _ in loras if n in cfg.base_names]
    if clash:
        raise ValueError(f"--lora-modules {clash[0]}: that is the base model's name; rename the adapter")
    engine = LLMEngine(engine_config(args, model))
    if engine.tokenizer is not None:
        check_template_kwargs(engine.tokenizer, cfg.default_chat_template_kwargs)
    if register_loras:
        for lora_name, path in loras:
            info = engine.add_lora(lora_name, path)
            logger.info("adapter %s: rank %d from %s", lora_name, info.rank, path)
    metrics = Metrics(engine.limits(), name, cfg.model_aliases)
    aengine = AsyncEngine(engine)
    app = build_app(aengine, cfg, metrics)
    aengine.start()
    if register_loras and loras:  # their weights are read in the background as the port opens
        names = [n for n, _ in loras]
        aengine.submit(lambda: engine.read_loras_ahead(names))
    return Built(app, aengine, name, loras, metrics)
