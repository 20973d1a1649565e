"""The KV pool and the LoRA slot buffers are sized to need (issue 15, point 3; S4.1, S2.1).

Default: what max_num_seqs sequences of max_model_len tokens can use, capped by a fraction of the
free memory; --kv-cache-memory gives bytes (vLLM's kv_cache_memory_bytes); on CPU the pool's memory
is committed page by page as it is first written, and the pool hands out recently freed pages
first, so the process's memory follows the load, not the pool's size.
"""

from __future__ import annotations

import argparse
import logging

import pytest

from loramux.config import CacheConfig, LoRAConfig, ModelConfig
from loramux.core.page_pool import PagePool
from loramux.executor.model_runner import ModelRunner
from loramux.server.serve_args import add_serve_args, byte_count, engine_config


def runner(tiny_models, cache: CacheConfig, max_num_seqs: int = 4, max_model_len: int = 128) -> ModelRunner:
    model = ModelConfig(str(tiny_models["llama"].path), device="cpu", max_model_len=max_model_len)
    return ModelRunner(model, cache, LoRAConfig(max_loras=1), max_num_seqs)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_default_pool_holds_max_num_seqs_full_length_sequences_and_says_why(tiny_models, caplog):
    with caplog.at_level(logging.INFO, logger="loramux.executor"):
        r = runner(tiny_models, CacheConfig(page_size=16), max_num_seqs=5, max_model_len=100)
    assert r.num_pages == 5 * 7  # ceil(100 / 16) pages per sequence
    assert "35 pages of 16 tokens" in caplog.text and "max_num_seqs 5 x max_model_len 100" in caplog.text


def test_default_pool_is_capped_by_a_fraction_of_free_memory(tiny_models, caplog):
    with caplog.at_level(logging.INFO, logger="loramux.executor"):
        r = runner(tiny_models, CacheConfig(free_memory_fraction=1e-9), max_num_seqs=64)
    assert r.num_pages < 64 * 8  # the need would be 512 pages
    assert "free memory (less than max_num_seqs 64" in caplog.text


def test_kv_cache_memory_is_bytes(tiny_models):
    r = runner(tiny_models, CacheConfig(kv_cache_memory=40 * 2**20))
    assert r.num_pages == 40 * 2**20 // r.page_bytes
    assert r.kv_caches[0][0].shape[0] == r.num_pages


def test_cpu_pool_memory_is_committed_as_pages_are_written(tiny_models):
    """A 256 MiB pool raises the process's RSS by far less until it is written; writing pages
    commits them (torch.zeros would have committed all 256 MiB at once)."""
    before = rss_bytes()
    r = runner(tiny_models, CacheConfig(kv_cache_memory=256 * 2**20))
    grown = rss_bytes() - before
    assert grown < 64 * 2**20, f"RSS grew {grown / 2**20:.0f} MiB for an unused 256 MiB pool"
    assert all(float(k.abs().sum()) == 0 and float(v.abs().sum()) == 0 for k, v in r.kv_caches)  # zeros
    half = r.num_pages // 2
    for k, v in r.kv_caches:
        k[:half].fill_(1.0)
        v[:half].fill_(1.0)
    assert rss_bytes() - before > 100 * 2**20  # half the pool written: about 128 MiB more


def test_pool_reuses_the_pages_freed_last():
    pool = PagePool(num_pages=1000, page_size=16)
    touched = set()
    for _ in range(200):  # one request at a time: the same page serves them all
        pages = pool.allocate(1)
        touched.update(pages)
        pool.decref(pages)
    assert touched == {0}


@pytest.mark.parametrize(
    ("text", "value"),
    [("1048576", 2**20), ("512M", 512 * 2**20), ("2G", 2 * 2**30), ("1GiB", 2**30), ("1.5k", 1536)],
)
def test_kv_cache_memory_flag_takes_bytes_with_binary_suffixes(text, value):
    p = argparse.ArgumentParser()
    add_serve_args(p)
    assert engine_config(p.parse_args(["m", "--kv-cache-memory", text]), "m").cache.kv_cache_memory == value
    assert byte_count(text) == value


@pytest.mark.parametrize("text", ["lots", "-1", "0", "1X"])
def test_kv_cache_memory_flag_refuses_what_is_not_a_size(text):
    with pytest.raises(argparse.ArgumentTypeError, match="size"):
        byte_count(text)


def test_lora_slot_buffers_are_as_deep_as_the_ranks_in_use():
    """Slot buffers follow the largest rank loaded (not max_lora_rank), and deepening them keeps
    what the other slots hold."""
    import torch

    from loramux.executor.lora import LoRALinear, LoRAState

    layer = LoRALinear(torch.nn.Linear(8, 6, bias=False), LoRAState(), num_slots=3, max_rank=64)
    a2, b2 = torch.randn(2, 8), torch.randn(2, 6)
    layer.load(0, a2, b2)
    assert layer.A.shape == (1, 3, 2, 8) and layer.Bt.shape == (3, 2, 6)  # one part (not fused)
    a4, b4 = torch.randn(4, 8), torch.randn(4, 6)
    layer.load(1, a4, b4)
    assert layer.A.shape == (1, 3, 4, 8) and layer.Bt.shape == (3, 4, 6)
    assert torch.equal(layer.A[0, 0, :2], a2) and torch.equal(layer.Bt[0, :2], b2)
    assert torch.equal(layer.A[0, 1], a4) and torch.equal(layer.Bt[1], b4)
    layer.load(2, a2, b2)  # a lower rank fits as it is
    assert layer.A.shape[2] == 4 and layer.ranks == [[2, 4, 2]]


def test_adapters_named_at_start_are_read_ahead_in_the_background(tiny_models):
    """Issue 15, point 2: registration reads config and header only; `read_loras_ahead` has the
    background reader bring as many as one step can use (max_loras, no eviction for it), and the first
    request on such an adapter needs no read of its own."""
    import time

    from loramux.config import EngineConfig, SchedulerConfig
    from loramux.engine.llm_engine import LLMEngine
    from loramux.sampling_params import SamplingParams

    tm = tiny_models["llama"]
    cfg = EngineConfig(
        model=ModelConfig(str(tm.path), device="cpu", max_model_len=64),
        scheduler=SchedulerConfig(max_num_seqs=4),
        cache=CacheConfig(num_pages=32),
        lora=LoRAConfig(max_loras=2, max_cpu_loras=3),
    )
    engine = LLMEngine(cfg)
    names = sorted(tm.adapters)[:3]
    for name in names:
        engine.add_lora(name, str(tm.adapters[name]))
    stats = engine.executor.load_stats
    assert stats.host_loads == 0  # nothing read by registration
    assert engine.read_loras_ahead(names) == 2  # one step can use two: more would only compete
    deadline = time.monotonic() + 30
    while engine.loras_loading() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.loras_loading() == 0 and stats.host_loads == 2
    assert [engine.scheduler.adapters.get(n).on_host for n in names] == [True, True, False]
    engine.add_request("r", [5, 6, 7], SamplingParams(max_tokens=2, ignore_eos=True), lora_name=names[0])
    while engine.has_unfinished_requests():
        engine.step()
    assert stats.host_loads == 2 and stats.device_loads == 1  # no second read for it
