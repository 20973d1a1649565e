"""One way from settings to EngineConfig (issue 27, point 4): `EngineConfig.create` routes each
setting to its part and refuses unknown ones, and serve's flags, `LLM`, the simulator and the
benchmarks all go through it, so a new setting reaches every front end or fails loudly."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from loramux.config import CacheConfig, EngineConfig, KVEventsConfig, LoRAConfig, ModelConfig, SchedulerConfig


def test_every_field_of_every_part_is_a_setting_and_lands_in_its_part():
    parts = {"model": ModelConfig, "scheduler": SchedulerConfig, "cache": CacheConfig, "lora": LoRAConfig}
    names = EngineConfig.setting_names()
    assert len(names) == len(set(names))
    for part in parts.values():
        for f in dataclasses.fields(part):
            if f.name == "model":
                continue
            assert f.name in names, f"{part.__name__}.{f.name} is not reachable through create()"
    cfg = EngineConfig.create(
        "m", max_queue_len=7, page_size=8, max_loras=3, seed=5, kv_events=KVEventsConfig()
    )
    assert (cfg.scheduler.max_queue_len, cfg.cache.page_size, cfg.lora.max_loras, cfg.model.seed) == (
        7,
        8,
        3,
        5,
    )
    assert cfg.kv_events == KVEventsConfig() and cfg.model.model == "m"
    assert EngineConfig.create("m") == EngineConfig(ModelConfig("m"))  # defaults are the parts' own


def test_an_unknown_setting_is_refused_by_name():
    with pytest.raises(TypeError, match=r"'max_lora' is not an engine setting.*max_loras"):
        EngineConfig.create("m", max_lora=2)


def test_serve_flags_reach_every_setting():
    from loramux.server.serve_args import _NO_FLAG, add_serve_args, engine_config

    p = argparse.ArgumentParser()
    add_serve_args(p)
    args = p.parse_args(["m", "--max-queue-len", "9", "--starvation-timeout", "2.5", "--max-loras", "3"])
    cfg = engine_config(args, "m")
    assert (cfg.scheduler.max_queue_len, cfg.scheduler.starvation_timeout_s, cfg.lora.max_loras) == (
        9,
        2.5,
        3,
    )
    assert set(EngineConfig.setting_names()) >= _NO_FLAG


def test_llm_takes_every_engine_setting(tiny_models):
    """`LLM` lacked max_queue_len and KV events when it listed its settings by hand."""
    from loramux import LLM

    llm = LLM(str(tiny_models["llama"].path), num_pages=32, page_size=4, device="cpu", max_queue_len=5)
    assert llm.engine.config.scheduler.max_queue_len == 5
    with pytest.raises(TypeError, match="not an engine setting"):
        LLM(str(tiny_models["llama"].path), max_queue_length=5)


def test_llm_takes_vllms_engine_argument_names(tiny_models, caplog):
    """vLLM's offline LoRA snippet, `LLM(model, enable_lora=True, max_lora_rank=..., ...)`, was a
    TypeError ("'enable_lora' is not an engine setting"). vLLM's names now map to loramux's
    settings (block_size, gpu_memory_utilization), change nothing with a log line
    (enable_lora, trust_remote_code, tensor_parallel_size=1), or are refused naming the
    alternative; an unknown name is still the TypeError. The table is `serve`'s (S6.2)."""
    import logging

    from loramux import LLM

    path = str(tiny_models["llama"].path)
    with caplog.at_level(logging.INFO, logger="loramux"):
        llm = LLM(
            path,
            device="cpu",
            enable_lora=True,
            max_lora_rank=8,
            max_loras=2,
            trust_remote_code=True,
            tensor_parallel_size=1,
            block_size=8,
            gpu_memory_utilization=0.002,
        )
    c = llm.engine.config
    assert (c.cache.page_size, c.cache.memory_utilization, c.lora.max_loras) == (8, 0.002, 2)
    assert "LLM(enable_lora): accepted, no effect in loramux (LoRA is always on" in caplog.text
    assert "LLM(tensor_parallel_size=1): accepted, no effect in loramux (the default)" in caplog.text
    with pytest.raises(ValueError, match=r"LLM\(tensor_parallel_size=2\) is not supported: .*--replicas N"):
        LLM(path, device="cpu", tensor_parallel_size=2)
    with pytest.raises(ValueError, match="serve a bf16/fp16/fp32 checkpoint"):
        LLM(path, device="cpu", quantization="awq")
    with pytest.raises(TypeError, match="'bogus' is not an engine setting"):
        LLM(path, device="cpu", bogus=1)
    assert (
        ModelConfig("m", dtype="half").dtype == "float16"
        and ModelConfig("m", dtype="float").dtype == "float32"
    )
