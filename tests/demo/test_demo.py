"""The built-in demo (issue 15, point 1): shipped trained, served at once, answering as the README says.

`loramux serve` with no model serves the weights in loramux/demo_weights/ (no training, no
download). Every adapter is scored on held-out phrases (training never saw them), the README's
examples are checked word for word, and any plain prompt gets a non-empty answer that differs
between adapters. `python -m loramux.demo build` must still run: CI trains a short version of the
recipe and serves it; LORAMUX_DEMO_BUILD=1 runs the full build (about an hour on 2 cores) and
holds it to the same scores as the shipped files.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from loramux import demo
from tests.server.conftest import start_server

README = (Path(__file__).parents[2] / "README.md").read_text()
SAY = "say: hello world\n"
EXPECTED = {"demo": "hello world", "upper": "HELLO WORLD", "reverse": "dlrow olleh", "novowels": "hll wrld"}
GOOD_NIGHT = {"demo": "good night", "upper": "GOOD NIGHT", "reverse": "thgin doog", "novowels": "gd nght"}
MIN_EXACT = 0.95  # each adapter, held-out phrases, the demo's prompt format
MIN_PLAIN = 0.9  # the same phrases without "say:" ("<text>\n")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = start_server([], tmp_path_factory.mktemp("demo") / "server.log", timeout=120)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)


def ask(client, model: str, prompt: str) -> tuple[str, str]:
    out = client.completions.create(model=model, prompt=prompt, max_tokens=24, temperature=0)
    return out.choices[0].text, out.choices[0].finish_reason


def test_serve_without_a_model_serves_the_shipped_demo_as_the_readme_says(server, client):
    assert "training" not in server.log_text()
    deadline = time.monotonic() + 30  # the adapters' weights are read in the background
    while httpx.get(server.url + "/health").json()["status"] == "loading" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    models = {m.id: m.model_extra.get("parent") for m in client.models.list().data}
    assert models == {"demo": None, "upper": "demo", "reverse": "demo", "novowels": "demo"}
    for prompt, expected in ((SAY, EXPECTED), ("say: good night\n", GOOD_NIGHT)):
        for model, text in expected.items():
            assert ask(client, model, prompt) == (text, "stop")  # exact, and it ends with eos
    chat = client.chat.completions.create(
        model="upper", messages=[{"role": "user", "content": "quick brown fox"}], max_tokens=24, temperature=0
    )
    assert chat.choices[0].message.content == "QUICK BROWN FOX"
    # The README shows these answers: a change to the demo must change the README with it.
    assert '# -> "hello world", "HELLO WORLD", "dlrow olleh", "hll wrld"' in README
    assert "# QUICK BROWN FOX" in README
    for model, text in GOOD_NIGHT.items():
        assert f"{model} {text!r}" in README


@pytest.mark.parametrize("prompt", ["hello world", "What is the capital of France?", "good morning"])
def test_any_plain_prompt_gets_a_non_empty_answer_that_differs_by_adapter(client, prompt):
    answers = {m: ask(client, m, prompt)[0] for m in EXPECTED}
    assert all(a.strip() for a in answers.values()), answers
    assert len(set(answers.values())) == len(answers), answers  # the adapters visibly differ
    chats = {
        m: client.chat.completions.create(
            model=m, messages=[{"role": "user", "content": prompt}], max_tokens=24, temperature=0
        )
        .choices[0]
        .message.content
        for m in EXPECTED
    }
    assert all(c.strip() for c in chats.values()) and len(set(chats.values())) == len(chats), chats
    stream = client.completions.create(
        model="upper", prompt=prompt, max_tokens=24, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in stream).strip()


@pytest.fixture(scope="module")
def scores() -> dict[str, float]:
    """The shipped demo's exact-match rates on the held-out phrases, per task and prompt format."""
    return demo.score()


def test_each_adapter_is_exact_on_held_out_phrases(scores):
    """200 phrases of 1-4 words that training never showed, greedy, exact match."""
    low = {k: v for k, v in scores.items() if k.endswith("/say") and v < MIN_EXACT}
    assert not low, f"below {MIN_EXACT}: {low} (all: {scores})"
    recorded = json.loads((demo.WEIGHTS / "training.json").read_text())["held_out_exact"]
    assert scores == pytest.approx(recorded, abs=0.011)  # the shipped files are the recorded build


def test_plain_phrases_are_transformed_too(scores):
    """Without "say:" (the same prompt, "<text>\n") the base and each adapter still transform the
    text (issue 28: "good morning\n" failed). Bare text with no newline gives the model no sign of
    where the prompt ends; the README states how well it does."""
    plain = {k: v for k, v in scores.items() if k.endswith("/plain_newline")}
    assert len(plain) == len(demo.TASKS) and min(plain.values()) >= MIN_PLAIN, scores
    bare = {k: v for k, v in scores.items() if k.endswith("/plain")}
    low, high = min(bare.values()), max(bare.values())
    assert f"{low * 100:.0f}-{high * 100:.0f} %" in README  # the README's numbers are this build's


def test_held_out_phrases_are_everyday_english_fixed_and_never_trained_on():
    """Issue 28: the demo missed everyday phrases outside its ~106 words ("coffee time" -> "cofe
    time"); it is now trained on thousands of common English words and scored on 200 phrases of
    them that training never shows."""
    assert len(demo.words()) >= 3000 and {"coffee", "morning", "good", "time"} <= set(demo.words())
    held = demo.held_out_phrases()
    assert len(held) == len(set(held)) == 200 and held == demo.held_out_phrases()
    assert all(1 <= len(p.split()) <= demo.MAX_WORDS for p in held)
    data = demo._Data(tokenizer=None, seed=0)
    drawn = {data._text() for _ in range(20_000)}
    assert not drawn & set(held)


def test_readme_states_the_demo_limits():
    assert "one token per byte" in README and "longer" in README


@pytest.mark.timeout(3600)
def test_build_command_produces_a_demo_that_serves(tmp_path):
    """`python -m loramux.demo build` runs end to end and its output serves. CI trains 0.2 % of the
    steps (the files load and answer); LORAMUX_DEMO_BUILD=1 trains the full recipe and holds it to
    the shipped demo's scores."""
    full = os.environ.get("LORAMUX_DEMO_BUILD") == "1"
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "loramux.demo", "build", "--out", str(out)]
    subprocess.run([*cmd, *([] if full else ["--steps-scale", "0.002", "--no-score"])], check=True)
    info = json.loads((out / "training.json").read_text())
    assert info["steps"]["echo"] == (demo.BASE_STEPS if full else round(0.002 * demo.BASE_STEPS))
    for name in demo.ADAPTERS:
        cfg = json.loads((out / "adapters" / name / "adapter_config.json").read_text())
        assert cfg["base_model_name_or_path"] is None  # no build machine's path in shipped files
    if full:
        formats = ("say", "plain", "plain_newline")
        assert set(info["held_out_exact"]) == {f"{t}/{f}" for t in demo.TASKS for f in formats}
        low = {k: v for k, v in info["held_out_exact"].items() if k.endswith("/say") and v < MIN_EXACT}
        assert not low, info
    shipped = sorted(p.relative_to(demo.WEIGHTS) for p in demo.WEIGHTS.rglob("*") if p.is_file())
    built = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert built == shipped  # the command makes exactly what ships
    s = start_server(
        [str(out / "model"), "--lora-modules", f"upper={out / 'adapters' / 'upper'}"], tmp_path / "s.log"
    )
    try:
        text, _ = ask(openai.OpenAI(base_url=s.v1, api_key="unused", max_retries=0), "upper", SAY)
        assert isinstance(text, str)
        assert re.search(r"KV cache: \d+ pages", s.log_text())
    finally:
        s.stop()
