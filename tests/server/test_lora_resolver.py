"""Adapters found by name (S6.3, S1.2): a request naming an adapter nobody loaded is served from
the folder of that name among the allowed ones, loaded on first use, as vLLM's filesystem LoRA
resolver does. The server here is set up the way a vLLM user sets that resolver up (its three
environment variables, no loramux flag), and its answers are held to transformers+PEFT."""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import shutil

import httpx
import pytest

from loramux.server.vllm_flags import apply_vllm_resolver_env
from tests.server.conftest import start_server

BASE = "base"
STARTUP = "r1_qv"  # named at start; the other three are found by name
PROMPT_LEN, NEW = 6, 6


@pytest.fixture(scope="module")
def folders(tiny_models, tmp_path_factory):
    """The resolver folder (the four adapters, one broken, one escaping) and one outside it."""
    root = tmp_path_factory.mktemp("resolver")
    cache, outside = root / "cache", root / "outside"
    for name, path in tiny_models["llama"].adapters.items():
        shutil.copytree(path, cache / name)
    shutil.copytree(tiny_models["llama"].adapters["r1_qv"], outside / "secret")
    (cache / "broken").mkdir()
    (cache / "broken" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2}')  # no weights
    os.symlink(outside / "secret", cache / "escape")
    return cache, outside


@pytest.fixture(scope="module")
def server(tiny_models, folders, tmp_path_factory):
    cache, _ = folders
    env = {
        "VLLM_PLUGINS": "lora_filesystem_resolver",
        "VLLM_LORA_RESOLVER_CACHE_DIR": str(cache),
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
    }
    args = [
        str(tiny_models["llama"].path),
        "--served-model-name",
        BASE,
        "--num-pages",
        "256",
        "--page-size",
        "4",
        "--max-loras",
        "2",  # three new adapters in one batch take turns in two slots
        "--max-num-seqs",
        "16",
        "--device",
        "cpu",
        "--lora-modules",
        f"{STARTUP}={cache / STARTUP}",
    ]
    s = start_server(args, tmp_path_factory.mktemp("logs") / "server.log", env=env)
    yield s
    s.stop()


def _complete(url: str, model: str, prompt: list[int]) -> httpx.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": NEW, "temperature": 0, "ignore_eos": True}
    body["return_token_ids"] = True
    return httpx.post(url + "/v1/completions", json=body, timeout=120)


def _models(server) -> list[str]:
    return [m["id"] for m in httpx.get(server.v1 + "/models", timeout=30).json()["data"]]


def test_S6_3_adapters_found_by_name_load_once_on_first_use_and_equal_peft_in_one_batch(server, oracles):
    """Three adapters nobody loaded, each asked for twice at once beside the base and the adapter
    named at start: every answer is PEFT's greedy answer for its own adapter, each adapter is
    loaded once, and /v1/models lists the loaded ones after (not before) their first request."""
    names = ["r8_all", "r64_mlp", "rs4_attn"]
    assert not set(names) & set(_models(server))
    rows = [None, STARTUP, *names, *names]
    prompts = [[(7 * i + 3 * j) % 90 + 5 for j in range(PROMPT_LEN)] for i in range(len(rows))]
    with concurrent.futures.ThreadPoolExecutor(len(rows)) as pool:
        answers = list(pool.map(lambda r, p: _complete(server.url, r or BASE, p), rows, prompts))
    assert [a.status_code for a in answers] == [200] * len(rows), [a.text for a in answers]
    expected, _ = oracles("llama").greedy(prompts, rows, NEW)
    assert [a.json()["choices"][0]["token_ids"] for a in answers] == expected
    log = server.log_text()
    assert [log.count(f"adapter {n}: loaded on first use") for n in names] == [1, 1, 1]
    assert set(names) <= set(_models(server))


def test_S6_3_an_unloaded_adapter_is_found_again_with_the_weights_its_folder_has_now(
    server, folders, oracles
):
    """Unload, change the folder's weights, ask again: the new weights answer (no stale KV)."""
    cache, _ = folders
    prompt = [[11, 12, 13, 14, 15, 16]]
    swap = cache / "swap"
    shutil.copytree(cache / "r8_all", swap)
    try:
        first = _complete(server.url, "swap", prompt[0])
        assert first.status_code == 200, first.text
        assert (
            first.json()["choices"][0]["token_ids"] == oracles("llama").greedy(prompt, ["r8_all"], NEW)[0][0]
        )
        r = httpx.post(server.v1 + "/unload_lora_adapter", json={"lora_name": "swap"}, timeout=30)
        assert r.status_code == 200 and "swap" not in _models(server)
        shutil.rmtree(swap)
        shutil.copytree(cache / "r64_mlp", swap)
        second = _complete(server.url, "swap", prompt[0])
        assert second.status_code == 200, second.text
        expected = oracles("llama").greedy(prompt, ["r64_mlp"], NEW)[0][0]
        assert second.json()["choices"][0]["token_ids"] == expected != first.json()["choices"][0]["token_ids"]
    finally:
        httpx.post(server.v1 + "/unload_lora_adapter", json={"lora_name": "swap"}, timeout=30)
        shutil.rmtree(swap, ignore_errors=True)


@pytest.mark.parametrize(
    ("model", "status", "says"),
    [
        ("broken", 400, "cannot load adapter 'broken' from"),  # a folder, but no adapter weights
        ("escape", 403, "outside the allowed adapter folders"),  # a symlink out of the folder
        ("secret", 404, "does not exist"),  # outside the folder: not found by name
        ("../outside/secret", 404, "does not exist"),
        ("..", 404, "does not exist"),
        ("x" * 300, 404, "does not exist"),  # too long a file name: still a 404, not a 500
        ("nowhere", 404, "does not exist"),
    ],
)
def test_names_that_are_no_servable_adapter_folder_are_refused_and_the_server_serves_on(
    server, model, status, says
):
    r = _complete(server.url, model, [5, 6, 7])
    err = r.json()["error"]
    assert r.status_code == status and says in err["message"], r.text
    assert model not in _models(server)
    assert _complete(server.url, STARTUP, [5, 6, 7]).status_code == 200


def test_tokenize_takes_a_name_the_folder_has_and_refuses_one_it_lacks(server, folders):
    cache, _ = folders
    shutil.copytree(cache / "r8_all", cache / "never_asked")  # no request has loaded it
    ok = httpx.post(server.url + "/tokenize", json={"model": "never_asked", "prompt": "hello"}, timeout=30)
    assert ok.status_code == 200 and ok.json()["tokens"]
    missing = httpx.post(server.url + "/tokenize", json={"model": "nowhere", "prompt": "hi"}, timeout=30)
    assert missing.status_code == 404


def _resolver_args(env: dict[str, str]) -> list[str]:
    args = argparse.Namespace(allowed_lora_dirs=["/mine"])
    apply_vllm_resolver_env(args, env)
    return args.allowed_lora_dirs


def test_vllms_three_resolver_variables_add_the_folder_only_together(tmp_path):
    """As vLLM: the folder, runtime updating on, and the plugin named (or every plugin loaded)."""
    on = {
        "VLLM_LORA_RESOLVER_CACHE_DIR": str(tmp_path),
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true",
        "VLLM_PLUGINS": "other,lora_filesystem_resolver",
    }
    assert _resolver_args(on) == ["/mine", str(tmp_path)]
    assert _resolver_args({k: v for k, v in on.items() if k != "VLLM_PLUGINS"}) == ["/mine", str(tmp_path)]
    assert _resolver_args({**on, "VLLM_PLUGINS": "other"}) == ["/mine"]
    assert _resolver_args({**on, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "0"}) == ["/mine"]
    assert _resolver_args({k: v for k, v in on.items() if k != "VLLM_LORA_RESOLVER_CACHE_DIR"}) == ["/mine"]
    with pytest.raises(ValueError, match=r"VLLM_LORA_RESOLVER_CACHE_DIR=.* is not a directory"):
        _resolver_args({**on, "VLLM_LORA_RESOLVER_CACHE_DIR": str(tmp_path / "none")})
