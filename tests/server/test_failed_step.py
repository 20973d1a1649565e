"""A failed step stops the engine for good, as vLLM's EngineDeadError does (issue 12, point 4).

When the executor raises, the control plane has already handed out slots and planned KV copies
that may not have happened; no later step could trust a slot's weights or a page's KV. So the
engine ends every request, refuses all work with a message that names the cause and the fix, and
the server answers 503 and fails /health. Failures are injected through the real executor: a
fault hook in the runner, an adapter file deleted after registration, and one whose content
changed (read_adapter re-checks the digest that names the adapter's KV namespace).
"""

from __future__ import annotations

import shutil
import time

import httpx
import openai
import pytest

from loramux import LLM, SamplingParams
from loramux.engine.llm_engine import EngineDeadError
from tests.server.conftest import start_server

PROMPT = [11, 42, 99, 7, 300, 12, 5, 77]
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def _engine(tiny_models, adapter_dir=None):
    llm = LLM(str(tiny_models["llama"].path), num_pages=64, page_size=4, device="cpu")
    if adapter_dir is not None:
        llm.engine.add_lora("x", str(adapter_dir))
    return llm.engine


def _assert_dead_and_clean(engine, cause: str):
    assert engine.dead is not None and cause in str(engine.dead) and "restart" in str(engine.dead)
    assert not engine.has_unfinished_requests()
    engine.scheduler.check_integrity()  # every page and adapter count settled
    with pytest.raises(EngineDeadError, match="restart the server"):
        engine.add_request(None, PROMPT, GREEDY)
    with pytest.raises(EngineDeadError):
        engine.step()


def test_a_fault_in_the_runner_stops_the_engine(tiny_models):
    engine = _engine(tiny_models)
    engine.add_request(None, PROMPT, GREEDY)
    engine.add_request(None, PROMPT[:5], GREEDY)
    engine.step()

    def boom(out):
        raise RuntimeError("injected fault")

    engine.executor.fault_hook = boom
    with pytest.raises(EngineDeadError) as e:
        engine.step()
    assert isinstance(e.value.__cause__, RuntimeError)
    _assert_dead_and_clean(engine, "injected fault")


@pytest.mark.parametrize("damage", ["delete", "change"])
def test_adapter_files_that_vanish_or_change_after_registration_stop_the_engine(
    tiny_models, tmp_path, damage
):
    adapters = tiny_models["llama"].adapters
    path = tmp_path / "x"
    shutil.copytree(adapters["r8_all"], path)
    engine = _engine(tiny_models, path)
    weights = path / "adapter_model.safetensors"
    if damage == "delete":
        weights.unlink()
    else:  # valid safetensors, other values: loading it would run other weights under x's KV namespace
        shutil.copyfile(adapters["r8_all"] / "adapter_model.safetensors", weights)
        data = bytearray(weights.read_bytes())
        data[-8:] = bytes(8)  # the last float values change; the header stays valid
        weights.write_bytes(bytes(data))
    engine.add_request(None, PROMPT, GREEDY, lora_name="x")
    with pytest.raises(EngineDeadError):
        while engine.has_unfinished_requests():
            engine.step()
    cause = "can no longer be read" if damage == "delete" else "changed after the adapter was loaded"
    _assert_dead_and_clean(engine, cause)


def test_server_answers_503_and_fails_health_after_a_failed_step(tiny_models, tmp_path):
    adapters = tiny_models["llama"].adapters
    path = tmp_path / "x"
    shutil.copytree(adapters["r1_qv"], path)
    server = start_server(
        [
            str(tiny_models["llama"].path),
            "--served-model-name",
            "base",
            "--num-pages",
            "64",
            "--page-size",
            "4",
            "--device",
            "cpu",
            "--max-loras",
            "1",
            "--max-cpu-loras",
            "1",
            "--lora-modules",  # host memory holds one: w is read ahead at start, x is not
            f"w={adapters['r8_all']}",
            f"x={path}",
        ],
        tmp_path / "server.log",
    )
    try:
        client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=60)
        ok = client.completions.create(model="base", prompt=PROMPT, max_tokens=3, temperature=0)
        assert ok.choices[0].finish_reason == "length"
        (path / "adapter_model.safetensors").unlink()  # gone before its first read
        # A background response is the request that meets it: it ends failed, with the error a
        # request in the foreground gets.
        queued = client.responses.create(model="x", input="hi", max_output_tokens=3, background=True)
        assert queued.status == "queued"
        for _ in range(600):  # at most 30 s
            failed = client.responses.retrieve(queued.id)
            if failed.status not in ("queued", "in_progress"):
                break
            time.sleep(0.05)
        assert failed.status == "failed" and failed.error.code == "engine_dead", failed
        assert "can no longer be read" in failed.error.message
        with pytest.raises(openai.APIStatusError) as e:
            client.completions.create(model="x", prompt=PROMPT, max_tokens=3, temperature=0)
        assert e.value.status_code == 503 and "restart the server" in str(e.value)
        health = httpx.get(server.url + "/health", timeout=10)
        assert health.status_code == 503 and "can no longer be read" in health.json()["error"]
        with pytest.raises(openai.APIStatusError) as e:  # nothing runs any more, base model included
            client.completions.create(model="base", prompt=PROMPT, max_tokens=3, temperature=0)
        assert e.value.status_code == 503 and e.value.body["code"] == "engine_dead"
        with pytest.raises(openai.APIStatusError) as e:  # a stream is refused before it starts
            client.completions.create(model="base", prompt=PROMPT, max_tokens=3, stream=True)
        assert e.value.status_code == 503
    finally:
        server.stop()
