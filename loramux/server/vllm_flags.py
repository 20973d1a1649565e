"""vLLM's `vllm serve` flags that loramux has no flag of its own for, so a vLLM command line starts;
and the environment that sets up vLLM's filesystem LoRA resolver.

Boundary: argparse (and the environment) in (the flags of loramux/vllm_args.py's table are added
to `serve`'s parser), log lines and an updated namespace out; the table says what each flag does.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Mapping
from pathlib import Path

from loramux.vllm_args import FLAGS

logger = logging.getLogger("loramux")


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


def apply_vllm_resolver_env(args: argparse.Namespace, env: Mapping[str, str] = os.environ) -> None:
    """vLLM's filesystem LoRA resolver, set up as vLLM sets it up: VLLM_LORA_RESOLVER_CACHE_DIR,
    with VLLM_ALLOW_RUNTIME_LORA_UPDATING true and lora_filesystem_resolver among VLLM_PLUGINS
    (or VLLM_PLUGINS unset: vLLM loads every plugin then). loramux's own form of it is an
    --allowed-lora-dirs folder, so the cache folder joins those; ValueError if it is no folder."""
    folder = env.get("VLLM_LORA_RESOLVER_CACHE_DIR")
    plugins = env.get("VLLM_PLUGINS")
    runtime = env.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "").strip().lower() in ("1", "true")
    if not folder or not runtime:
        return
    if plugins is not None and "lora_filesystem_resolver" not in [p.strip() for p in plugins.split(",")]:
        return
    if not Path(folder).is_dir():
        raise ValueError(
            f"VLLM_LORA_RESOLVER_CACHE_DIR={folder!r} is not a directory; point it at the folder "
            "that holds one adapter folder per name"
        )
    if folder not in args.allowed_lora_dirs:
        args.allowed_lora_dirs = [*args.allowed_lora_dirs, folder]
    logger.info(
        "VLLM_LORA_RESOLVER_CACHE_DIR=%s: a request naming an adapter that is not loaded is served "
        "from the folder of that name there (as --allowed-lora-dirs %s)",
        folder,
        folder,
    )
