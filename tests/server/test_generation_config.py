"""A model's generation_config.json gives the default sampling values, as vLLM's
`--generation-config auto` (its default) does.

Issue 16 (drop-in for vLLM users). Llama-3-Instruct ships temperature 0.6 and top_p 0.9, Qwen
adds top_k 20: vLLM samples a request that sets none of them with those values, and loramux used
1.0 / 1.0 / all. Here the tiny model's generation_config.json says temperature 0 (greedy) and
top_k 3, so a request without a temperature must answer greedily, and one that sets its own
must not take the model's.
"""

from __future__ import annotations

import json
import shutil

import httpx
import pytest

from loramux import LLM, SamplingParams
from tests.server.conftest import start_server

PROMPT = [17, 33, 250, 9, 41, 60, 71]


@pytest.fixture(scope="module")
def greedy_model(tiny_models, tmp_path_factory):
    path = tmp_path_factory.mktemp("gen") / "llama"
    shutil.copytree(tiny_models["llama"].path, path)
    cfg = json.loads((path / "generation_config.json").read_text())
    cfg.update(temperature=0.0, top_k=3, min_p=0.05)
    (path / "generation_config.json").write_text(json.dumps(cfg))
    return path


def test_llm_takes_the_models_defaults_unless_told_vllm(greedy_model):
    auto = LLM(str(greedy_model), num_pages=64, page_size=4, device="cpu")
    d = auto.get_default_sampling_params()
    assert (d.temperature, d.top_k, d.top_p, d.repetition_penalty, d.min_p) == (0.0, 3, 1.0, 1.0, 0.05)
    plain = LLM(str(greedy_model), num_pages=64, page_size=4, device="cpu", generation_config="vllm")
    assert plain.get_default_sampling_params() == SamplingParams()
    greedy = auto.generate([PROMPT], SamplingParams(temperature=0), use_tqdm=False)[0].outputs[0]
    assert auto.generate([PROMPT], use_tqdm=False)[0].outputs[0].token_ids == greedy.token_ids  # no params


def test_override_generation_config_sits_over_the_models_or_alone(greedy_model):
    """vLLM's --override-generation-config: merged over generation_config.json's values with
    "auto", the only defaults with "vllm"; a field loramux does not take is refused by name."""
    over = LLM(
        str(greedy_model), num_pages=64, page_size=4, device="cpu", override_generation_config={"top_k": 5}
    )
    d = over.get_default_sampling_params()
    assert (d.temperature, d.top_k) == (0.0, 5)
    alone = LLM(
        str(greedy_model),
        num_pages=64,
        page_size=4,
        device="cpu",
        generation_config="vllm",
        override_generation_config={"temperature": 0.5},
    )
    assert alone.get_default_sampling_params() == SamplingParams(temperature=0.5)
    with pytest.raises(ValueError, match="'max_new_tokens' is not taken"):
        LLM(str(greedy_model), device="cpu", override_generation_config={"max_new_tokens": 9})


def test_a_request_without_a_temperature_takes_the_models_and_its_own_wins(greedy_model, tmp_path):
    args = [str(greedy_model), "--served-model-name", "base", "--num-pages", "64", "--page-size", "4"]
    server = start_server([*args, "--device", "cpu"], tmp_path / "log")
    try:

        def ids(**kw) -> list[int]:
            body = {"model": "base", "prompt": PROMPT, "max_tokens": 8, "ignore_eos": True, "seed": 1}
            r = httpx.post(
                server.v1 + "/completions", json={**body, "return_token_ids": True, **kw}, timeout=60
            )
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["token_ids"]

        greedy = ids(temperature=0)
        assert ids() == greedy  # the model's temperature 0
        assert ids(temperature=1.0, top_k=0) != greedy  # the request's own values win
    finally:
        server.stop()
    log = server.log_text()
    assert (
        "default sampling from the model's generation_config.json: temperature=0.0, top_k=3, min_p=0.05"
        in log
    )
