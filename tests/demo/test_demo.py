"""`loramux serve` with no arguments on a fresh machine: builds the demo, serves it, answers (issue: server).

This is the README's first command, minus the install. The session fixture `demo_first_start`
(tests/conftest.py) starts it on an empty cache folder, so it builds the demo from scratch (about
three minutes on 2 cores); the Ray Serve tests reuse that build.
"""

from __future__ import annotations

import openai
import pytest

from tests.server.conftest import start_server

PROMPT = "say: hello world\n"
EXPECTED = {"demo": "hello world", "upper": "HELLO WORLD", "reverse": "dlrow olleh", "novowels": "hll wrld"}


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_serve_without_a_model_builds_and_serves_the_demo(demo_first_start, tmp_path):
    server, cache = demo_first_start  # its first start, on an empty cache (a session fixture)
    assert "building the demo model" in server.log_text()  # the progress bar showed the build
    client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)
    models = {m.id: m.model_extra.get("parent") for m in client.models.list().data}
    assert models == {"demo": None, "upper": "demo", "reverse": "demo", "novowels": "demo"}
    answers = {}
    for model in EXPECTED:
        out = client.completions.create(model=model, prompt=PROMPT, max_tokens=24, temperature=0)
        answers[model] = out.choices[0].text
        assert out.choices[0].finish_reason == "stop"  # it ends its answer with eos
    assert answers == EXPECTED  # the same prompt, visibly different readable answers
    chat = client.chat.completions.create(
        model="upper", messages=[{"role": "user", "content": "good night"}], max_tokens=24, temperature=0
    )
    assert chat.choices[0].message.content == "GOOD NIGHT"
    again = start_server([], tmp_path / "again.log", env={"LORAMUX_CACHE_DIR": str(cache)})
    try:  # a second start reuses the cached build
        assert "building the demo model" not in again.log_text()
    finally:
        again.stop()
