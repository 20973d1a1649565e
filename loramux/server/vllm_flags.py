"""vLLM's `vllm serve` flags that loramux has no flag of its own for, so a vLLM command line starts.

Boundary: argparse in (the flags are added to `serve`'s parser), log lines and an updated
namespace out. Each flag is one of three kinds:
- "map": it has a loramux meaning, and sets that flag (`--block-size` is `--page-size`);
- "ignore": it would change nothing here (the reason is logged once, at start);
- "refuse": it would change the answers or the layout and loramux does not do it: start fails
  with the alternative named. A flag refused only for some values names the values it accepts.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass

logger = logging.getLogger("loramux")


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
    VllmFlag("--download-dir", "ignore", "loramux reads a local model directory; nothing is downloaded"),
    VllmFlag("--revision", "ignore", "loramux reads a local model directory, as it is"),
    VllmFlag("--tokenizer-revision", "ignore", "loramux reads a local model directory, as it is"),
    VllmFlag("--code-revision", "ignore", "loramux runs no code from the model directory"),
    VllmFlag(
        "--hf-token", "ignore", "loramux reads a local model directory; nothing is downloaded", secret=True
    ),
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
        "refuse",
        "loramux orders requests by --policy (fcfs, affinity, fair, slo); it has no priorities",
        accepted=("fcfs",),
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
    VllmFlag("--max-seq-len-to-capture", "ignore", "loramux's CUDA graphs hold decode steps of any length"),
    VllmFlag("--max-parallel-loading-workers", "ignore", "weights are read by one reader"),
    VllmFlag(
        "--tensor-parallel-size",
        "refuse",
        "one engine serves on one device; scale out with --replicas N (data parallel on Ray Serve)",
        accepted=("1",),
    ),
    VllmFlag(
        "--pipeline-parallel-size",
        "refuse",
        "one engine serves on one device; scale out with --replicas N (data parallel on Ray Serve)",
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
        "--enable-auto-tool-choice",
        "refuse",
        'loramux has no parser that finds tool calls in free text; send tool_choice "required" or '
        "name a function, and the answer is constrained to the tools' schemas",
        False,
    ),
    VllmFlag(
        "--tool-call-parser",
        "refuse",
        'loramux has no tool-call parsers; send tool_choice "required" or name a function',
    ),
    VllmFlag(
        "--reasoning-parser",
        "refuse",
        "loramux does not split reasoning from content; the answer's text holds both",
    ),
    VllmFlag(
        "--guided-decoding-backend",
        "refuse",
        "loramux compiles grammars with xgrammar",
        accepted=("auto", "xgrammar"),
    ),
)


def add_vllm_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("vLLM flags with no loramux flag of their own (docs/vllm-compat.md)")
    for f in FLAGS:
        what = {"map": f"vLLM's name: sets {f.target} ({f.why})", "ignore": f"no effect: {f.why}"}
        text = (
            what.get(f.kind)
            or f"refused{' unless ' + ' or '.join(f.accepted) if f.accepted else ''}: {f.why}"
        )
        if f.value:
            g.add_argument(f.flag, default=None, metavar="V", help=text)
        else:
            g.add_argument(f.flag, action="store_true", default=None, help=text)


def apply_vllm_args(args: argparse.Namespace) -> None:
    """Set the loramux settings the mapped flags name, log what is ignored, raise ValueError
    (naming the alternative) for a refused one. Call once logging is set up."""
    for f in FLAGS:
        value = getattr(args, f.flag.removeprefix("--").replace("-", "_"))
        if value is None:
            continue
        shown = f.flag if value is True or f.secret else f"{f.flag} {value}"
        if f.kind == "map":
            current = getattr(args, f.target)  # type: ignore[arg-type]
            setattr(args, f.target, type(current)(value) if current is not None else int(value))  # type: ignore[arg-type]
            logger.info("%s: vLLM's flag for %s (%s)", shown, f.target, f.why)
        elif f.kind == "ignore" or str(value) in f.accepted:
            logger.info(
                "%s: accepted, no effect in loramux (%s)",
                shown,
                f.why if f.kind == "ignore" else "the default",
            )
        else:
            raise ValueError(f"{shown} is not supported: {f.why}")
