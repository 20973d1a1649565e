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
