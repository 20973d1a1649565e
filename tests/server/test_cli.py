"""The CLI speaks vLLM's dialect (issue 16, point 1; S6.2): --enable-lora and
--gpu-memory-utilization start the server, `loramux --version` answers, and every flag of
`loramux serve` has help text with its default."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from loramux import __version__
from loramux.config import CacheConfig, LoRAConfig, ModelConfig
from loramux.executor.model_runner import ModelRunner
from loramux.server.serve_args import add_serve_args, engine_config


def serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_serve_args(p)
    return p


def test_every_serve_flag_has_help_and_the_help_shows_defaults():
    p = serve_parser()
    missing = [a.option_strings or a.dest for a in p._actions if not a.help or a.help == argparse.SUPPRESS]
    assert missing == []
    out = subprocess.run(
        [sys.executable, "-m", "loramux.cli", "serve", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "(default: 4)" in out and "--gpu-memory-utilization" in out and "--enable-lora" in out


def test_version():
    out = subprocess.run(
        [sys.executable, "-m", "loramux.cli", "--version"], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == f"loramux {__version__}"


def test_vllm_flags_are_accepted_and_reach_the_engine_config():
    args = serve_parser().parse_args(["m", "--enable-lora", "--gpu-memory-utilization", "0.5"])
    c = engine_config(args, "m")
    assert c.cache.memory_utilization == 0.5 and c.cache.num_pages is None
    with pytest.raises(ValueError, match=r"fraction in \(0, 1\]"):
        engine_config(serve_parser().parse_args(["m", "--gpu-memory-utilization", "1.5"]), "m")


def test_memory_utilization_sizes_the_kv_pool_from_available_memory(tiny_models):
    def pages(fraction: float) -> int:
        runner = ModelRunner(
            ModelConfig(str(tiny_models["llama"].path), device="cpu"),
            CacheConfig(page_size=16, memory_utilization=fraction),
            LoRAConfig(max_loras=1),
        )
        return runner.num_pages

    small, large = pages(0.002), pages(0.004)
    assert small > 0 and 1.6 < large / small < 2.4  # the pool follows the fraction
    with pytest.raises(ValueError, match="raise it"):
        pages(1e-12)


def test_flags_loramux_does_not_implement_are_refused_by_name():
    r = subprocess.run(
        [sys.executable, "-m", "loramux.cli", "serve", "m", "--tensor-parallel-size", "2"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "unrecognized arguments: --tensor-parallel-size" in r.stderr
