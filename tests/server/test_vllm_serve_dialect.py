"""`vllm serve` command lines that loramux refused with "unrecognized arguments" now start and do
what they say (issue 16's drop-in promise; S6.2, docs/vllm-compat.md).

One real server on 127.0.0.1, started from a vLLM-style `--config` YAML file plus command-line
flags, answers for: several --served-model-name and --api-key values, --override-generation-config,
--default-chat-template-kwargs, --exclude-tools-when-tool-choice-none, --enable-request-id-headers,
--enable-server-load-tracking, --enable-force-include-usage, --log-prompts with --max-log-len,
--middleware and --root-path. A second one serves TLS on a Unix socket (--ssl-keyfile,
--ssl-certfile, --uds) and logs through --log-config-file.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import subprocess
import sys
import threading
import time

import httpx
import pytest
import trustme

from loramux.server.serve_args import add_serve_args, dtype, engine_config, token_count
from loramux.server.vllm_argv import expand_serve_argv
from tests.server.conftest import Server, start_server

K1, K2 = "key-one", "key-two"
AUTH = {"Authorization": f"Bearer {K1}"}
TEMPLATE = "{{ greeting }}|{% if tools %}TOOLS|{% endif %}{% for m in messages %}{{ m.content }}{% endfor %}"
CONFIG = f"""
served-model-name: [base, alias]
api_key: [{K1}, {K2}]
enable-request-id-headers: true
enable-server-load-tracking: true
enable-force-include-usage: true
log-prompts: true
max_log_len: 12
override-generation-config: {{temperature: 0}}
default-chat-template-kwargs: {{greeting: lora}}
exclude-tools-when-tool-choice-none: true
chat-template: "{TEMPLATE}"
root-path: /api
enable-prefix-caching: false
scheduling-policy: priority
port: 1
"""
MIDDLEWARE = """
class AddHeader:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        async def send2(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-mw-class", b"1")]
            await send(message)

        await self.app(scope, receive, send2)


async def stamp(request, call_next):
    response = await call_next(request)
    response.headers["x-mw-fn"] = request.headers.get("x-request-id", "none")
    return response
"""
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]


@pytest.fixture(scope="module")
def server(tiny_models, adapter_dirs, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dialect")
    (tmp / "serve.yaml").write_text(CONFIG)
    (tmp / "lmx_mw.py").write_text(MIDDLEWARE)
    allowed, _ = adapter_dirs
    args = [
        str(tiny_models["llama"].path),
        "--config", str(tmp / "serve.yaml"),
        "--middleware", "lmx_mw.AddHeader", "--middleware", "lmx_mw.stamp",
        "--max_num_seqs=4", "-O3", "--num-pages", "256", "--page-size", "4", "--device", "cpu",
        "--allowed-lora-dirs", str(allowed),
    ]  # fmt: skip
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(tmp), os.environ.get("PYTHONPATH")]))}
    s = start_server(args, tmp / "log.txt", env=env)
    yield s
    s.stop()


def post(server: Server, path: str, body: dict, **kw) -> httpx.Response:
    headers = {**AUTH, **kw.pop("headers", {})}
    return httpx.post(server.url + path, json=body, headers=headers, timeout=60, **kw)


def test_the_config_file_and_the_command_line_both_count_and_the_command_line_wins(server):
    """--config FILE.yaml as vLLM reads it (its port lost to the command line's), underscores in
    flag names, -O3 accepted with a log line."""
    assert not server.url.endswith(":1")  # the config's port: 1 lost to --port
    log = server.log_text()
    assert "--optimization-level 3: accepted, no effect" in log, log
    assert "default sampling from --override-generation-config: temperature=0.0" in log, log
    limits = server.metrics()
    assert limits['loramux_config{name="max_num_seqs"}'] == 4  # --max_num_seqs=4
    assert limits['loramux_config{name="prefix_caching"}'] == 0  # the config's false
    assert "--scheduling-policy priority: vLLM's flag for policy" in log, log
    urgent = post(
        server, "/v1/completions", {"model": "base", "prompt": "lora", "max_tokens": 2, "priority": -5}
    )
    assert urgent.status_code == 200, urgent.text  # vLLM's priority field, taken under its policy


def test_every_served_model_name_answers_and_counts_as_the_base(server):
    cards = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {K2}"}, timeout=30)
    assert cards.status_code == 200, cards.text
    by_id = {c["id"]: c for c in cards.json()["data"]}
    assert by_id["base"]["parent"] is None and by_id["alias"]["parent"] is None
    before = server.metrics().get('loramux_requests_total{adapter="base",outcome="length"}', 0)
    r = post(server, "/v1/completions", {"model": "alias", "prompt": "lora adapter", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["model"] == "alias", r.text
    after = server.metrics()
    assert after['loramux_requests_total{adapter="base",outcome="length"}'] == before + 1
    assert not any('adapter="alias"' in k for k in after)
    bad = httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer other"}, timeout=30)
    assert bad.status_code == 401
    clash = post(server, "/v1/load_lora_adapter", {"lora_name": "alias", "lora_path": "r1_qv"})
    assert clash.status_code == 400 and "the base model's name" in clash.text, clash.text


def test_the_overridden_default_temperature_applies_unless_the_request_sets_one(server):
    def ids(**kw) -> list[int]:
        body = {"model": "base", "prompt": [5, 9, 14, 30], "max_tokens": 8, "ignore_eos": True}
        r = post(server, "/v1/completions", {**body, "return_token_ids": True, **kw})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["token_ids"]

    assert ids(seed=1) == ids(seed=2) == ids(temperature=0)  # greedy: the override's temperature 0
    assert len({tuple(ids(temperature=1.0, seed=s)) for s in range(4)}) > 1  # the request's own wins


def _prompt_text(server: Server, **body) -> str:
    r = post(server, "/tokenize", {"model": "base", **body})
    assert r.status_code == 200, r.text
    return post(server, "/detokenize", {"model": "base", "tokens": r.json()["tokens"]}).json()["prompt"]


def test_default_chat_template_kwargs_and_tools_left_out_when_tool_choice_is_none(server):
    msgs = [{"role": "user", "content": "token"}]
    assert _prompt_text(server, messages=msgs).replace(" ", "").startswith("lora|token")
    own = _prompt_text(server, messages=msgs, chat_template_kwargs={"greeting": "batch"})
    assert own.replace(" ", "").startswith("batch|")  # the request's own wins
    assert "TOOLS|" in _prompt_text(server, messages=msgs, tools=TOOLS).replace(" ", "")

    def chat_prompt(choice) -> str:
        body = {"model": "base", "messages": msgs, "tools": TOOLS, "tool_choice": choice}
        r = post(server, "/v1/chat/completions", {**body, "max_tokens": 1, "return_token_ids": True})
        assert r.status_code == 200, r.text
        ids = r.json()["prompt_token_ids"]
        return post(server, "/detokenize", {"tokens": ids}).json()["prompt"].replace(" ", "")

    assert "TOOLS|" not in chat_prompt("none")
    assert "TOOLS|" in chat_prompt("required")


def test_request_ids_come_back_in_the_header_and_the_answer(server):
    body = {"model": "base", "prompt": "lora", "max_tokens": 1}
    r = post(server, "/v1/completions", body, headers={"X-Request-Id": "trace-7"})
    assert r.headers["x-request-id"] == "trace-7" and r.json()["id"] == "cmpl-trace-7", r.text
    assert r.headers["x-mw-class"] == "1" and r.headers["x-mw-fn"] == "trace-7"  # --middleware, both kinds
    chat = post(
        server, "/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": "x"}]}
    )
    rid = chat.headers["x-request-id"]
    assert len(rid) == 32 and chat.json()["id"] == f"chatcmpl-{rid}", chat.text
    assert httpx.get(server.v1 + "/models", timeout=30).headers["x-request-id"]  # a 401 has one too
    # two requests sent at once with one id both finish: the engine keeps them apart
    results: list[httpx.Response] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(
                post(server, "/v1/completions", {**body, "max_tokens": 6}, headers={"X-Request-Id": "same"})
            )
        )
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [r.status_code for r in results] == [200, 200] and {r.json()["id"] for r in results} == {
        "cmpl-same"
    }


def test_load_counts_requests_in_flight_and_streams_end_with_usage(server):
    """--enable-server-load-tracking's GET /load, and --enable-force-include-usage: a stream without
    stream_options still ends with the usage chunk."""
    assert httpx.get(server.url + "/load", timeout=30).json() == {"server_load": 0}
    body = {"model": "base", "prompt": "lora", "max_tokens": 40, "ignore_eos": True, "stream": True}
    seen, chunks = [], []
    with httpx.stream("POST", server.v1 + "/completions", json=body, headers=AUTH, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunks.append(json.loads(line[6:]))
                if len(chunks) == 2:
                    seen.append(httpx.get(server.url + "/load", timeout=30).json()["server_load"])
    assert seen == [1]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 40
    deadline = time.time() + 10
    while httpx.get(server.url + "/load", timeout=30).json()["server_load"] != 0:
        assert time.time() < deadline, "the stream's request was never counted out"
        time.sleep(0.05)


def test_prompts_are_logged_up_to_max_log_len_and_the_root_path_serves_both_ways(server):
    post(
        server, "/v1/completions", {"model": "base", "prompt": "abcdefghijklmnopqrstuvwxyz", "max_tokens": 1}
    )
    log = server.log_text()
    assert "prompt='abcdefghijkl'" in log and "abcdefghijklm" not in log, log[-2000:]
    for path in ("/v1/models", "/api/v1/models"):  # a proxy that strips the prefix, and one that keeps it
        assert httpx.get(server.url + path, headers=AUTH, timeout=30).status_code == 200
    servers = httpx.get(server.url + "/openapi.json", timeout=30).json()["servers"]
    assert servers == [{"url": "/api"}]


def test_tls_on_a_unix_socket_with_a_logging_config(tiny_models, tmp_path):
    """--ssl-keyfile/--ssl-certfile serve https, --uds listens on a Unix socket, and
    --log-config-file's handlers receive loramux's log."""
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    key_file, cert_file = tmp_path / "key.pem", tmp_path / "cert.pem"
    cert.private_key_pem.write_to_path(str(key_file))
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    sock, logged = tmp_path / "s.sock", tmp_path / "logged.txt"
    log_config = {
        "version": 1,
        "handlers": {"file": {"class": "logging.FileHandler", "filename": str(logged)}},
        "loggers": {"loramux": {"handlers": ["file"], "level": "INFO"}},
    }
    (tmp_path / "log.json").write_text(json.dumps(log_config))
    cmd = [
        sys.executable, "-m", "loramux.cli", "serve", str(tiny_models["llama"].path),
        "--served-model-name", "base", "--num-pages", "64", "--page-size", "4", "--device", "cpu",
        "--uds", str(sock), "--ssl-keyfile", str(key_file), "--ssl-certfile", str(cert_file),
        "--log-config-file", str(tmp_path / "log.json"),
    ]  # fmt: skip
    with open(tmp_path / "out.txt", "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
        transport = httpx.HTTPTransport(uds=str(sock), verify=ctx)
        with httpx.Client(transport=transport, base_url="https://localhost", timeout=30) as client:
            deadline = time.time() + 120
            while True:
                assert proc.poll() is None, (tmp_path / "out.txt").read_text()[-3000:]
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.time() < deadline, (tmp_path / "out.txt").read_text()[-3000:]
                time.sleep(0.3)
            r = client.post("/v1/completions", json={"model": "base", "prompt": "lora", "max_tokens": 2})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text
    finally:
        proc.terminate()
        proc.wait(30)
    assert f"on unix socket {sock}" in logged.read_text(), logged.read_text()


# --- the dialect itself, without a server ---


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_serve_args(p)
    return p


def test_config_files_turn_into_flags_as_vllm_reads_them(tmp_path):
    actions = _parser()._option_string_actions
    cfg = tmp_path / "c.yml"
    cfg.write_text(
        "model: /m\nenable_prefix_caching: false\nenforce-eager: false\nlog-prompts: true\n"
        "lora-modules: [a=/x, {name: b, path: /y}]\nallowed-origins: ['*']\nmax-model-len: 2k\n"
        "middleware: [m.A, m.b]\n"
    )
    argv = expand_serve_argv(["--port=9", "--config", str(cfg), "--max_model_len", "3K"], actions)
    assert argv == [
        "--model", "/m", "--no-enable-prefix-caching", "--log-prompts",
        "--lora-modules", "a=/x", '{"name": "b", "path": "/y"}', "--allowed-origins", '["*"]',
        "--max-model-len", "2k", "--middleware", "m.A", "--middleware", "m.b",
        "--port=9", "--max-model-len", "3K",
    ]  # fmt: skip
    args = _parser().parse_args(argv)
    assert args.max_model_len == 3072 and args.lora_modules == [("a", "/x"), ("b", "/y")]
    assert args.allowed_origins == ["*"] and args.enable_prefix_caching is False and not args.enforce_eager
    assert args.middleware == ["m.A", "m.b"]
    assert expand_serve_argv(["m", "--config=" + str(cfg)], actions)[:3] == ["m", "--model", "/m"]
    assert expand_serve_argv(["m", "-O", "2", "-O=1", "-O3"], actions) == [
        "m", "--optimization-level", "2", "--optimization-level", "1", "--optimization-level", "3",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "text,name,error",
    [
        ("port: 1\nnot-a-flag: 2\n", "c.yaml", "'not-a-flag' is not a flag of `loramux serve`"),
        ("port: 1\n", "c.json", "give a YAML file (.yaml or .yml)"),
        ("- port\n", "c.yaml", "must hold a mapping of flag names to values"),
        ("port: [1\n", "c.yaml", "not valid YAML"),
        (None, "missing.yaml", "cannot read it (No such file or directory)"),
    ],
)
def test_a_bad_config_file_is_named_with_its_fault(tmp_path, text, name, error):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    with pytest.raises(ValueError, match="--config .*" + error.replace("(", r"\(").replace(")", r"\)")):
        expand_serve_argv(["m", "--config", str(path)], _parser()._option_string_actions)


def test_a_bad_config_file_stops_the_start_with_exit_2(tmp_path):
    (tmp_path / "c.yaml").write_text("max-num-seq: 4\n")
    r = subprocess.run(
        [sys.executable, "-m", "loramux.cli", "serve", "m", "--config", str(tmp_path / "c.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "'max-num-seq' is not a flag of `loramux serve`" in r.stderr, r.stderr


@pytest.mark.parametrize(
    "text,value",
    [("4096", 4096), ("1k", 1000), ("25.6k", 25600), ("32K", 32768), ("1m", 10**6), ("2M", 2 * 2**20)],
)
def test_token_counts_read_as_vllm_reads_them(text, value):
    assert token_count(text) == value


@pytest.mark.parametrize("text", ["1.5K", "k", "12x", "0.0005k"])
def test_a_token_count_that_is_not_one_is_refused(text):
    with pytest.raises(argparse.ArgumentTypeError, match="is not a token count"):
        token_count(text)


def test_vllm_dtype_names_and_several_keys_and_names_reach_the_configs():
    args = _parser().parse_args(["m", "--dtype", "half", "--max-model-len", "1k", "--api-key", "a", "b"])
    c = engine_config(args, "m")
    assert c.model.dtype == "float16" and c.model.max_model_len == 1000 and args.api_key == ["a", "b"]
    assert dtype("float") == "float32"
    from loramux.server.builder import model_aliases

    names = _parser().parse_args(["m", "--served-model-name", "x", "y", "x", "z"])
    assert model_aliases(names) == ("y", "z")


def test_vllms_api_key_variable_protects_the_server_too(monkeypatch):
    """A vLLM deployment that sets VLLM_API_KEY must not come up open on loramux; LORAMUX_API_KEY
    wins where both are set, and the key never shows in --help."""
    monkeypatch.delenv("LORAMUX_API_KEY", raising=False)
    monkeypatch.setenv("VLLM_API_KEY", "from-vllm")
    assert _parser().parse_args(["m"]).api_key == ["from-vllm"]
    from loramux.cli import HelpFormatter

    shown = argparse.ArgumentParser(formatter_class=HelpFormatter)
    add_serve_args(shown)
    assert "from-vllm" not in shown.format_help() and "(default: 4)" in shown.format_help()
    monkeypatch.setenv("LORAMUX_API_KEY", "ours")
    assert _parser().parse_args(["m"]).api_key == ["ours"]
    assert _parser().parse_args(["m", "--api-key", "k"]).api_key == ["k"]


def test_a_request_without_a_model_is_the_base_models_as_in_vllm(server):
    """vLLM's `model` is optional: none (or "") means the base model, answered under its first
    name. loramux answered 400 ("model: Field required")."""
    body = {"prompt": [5, 9, 14, 30], "max_tokens": 6, "ignore_eos": True, "return_token_ids": True}
    named = post(server, "/v1/completions", {**body, "model": "base"}).json()["choices"][0]["token_ids"]
    for extra in ({}, {"model": ""}):
        r = post(server, "/v1/completions", {**body, **extra})
        assert r.status_code == 200 and r.json()["model"] == "base", r.text
        assert r.json()["choices"][0]["token_ids"] == named  # greedy (the override): the same answer
    chat = post(
        server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    )
    assert chat.status_code == 200 and chat.json()["model"] == "base", chat.text


def test_skip_tokenizer_init_serves_token_ids_and_refuses_what_needs_text(tiny_models, tmp_path):
    """vLLM's --skip-tokenizer-init (token-in, token-out serving, as RL rollouts use it): no
    tokenizer is loaded; a token-id prompt is answered in token_ids (text empty, logprobs with
    vLLM's token_id:N placeholders); a text prompt, chat and stop strings are 400s naming why. It
    was refused at start."""
    args = [str(tiny_models["llama"].path), "--served-model-name", "base", "--skip-tokenizer-init"]
    s = start_server([*args, "--num-pages", "64", "--page-size", "4", "--device", "cpu"], tmp_path / "log")
    try:
        body = {"model": "base", "prompt": [5, 9, 14], "max_tokens": 3, "ignore_eos": True}
        r = httpx.post(
            s.v1 + "/completions", json={**body, "return_token_ids": True, "logprobs": 1}, timeout=60
        )
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["text"] == "" and len(choice["token_ids"]) == 3
        assert choice["logprobs"]["tokens"] == [f"token_id:{t}" for t in choice["token_ids"]]
        for path, extra, why in [
            ("/completions", {"prompt": "lora"}, "no tokenizer; send token ids"),
            ("/completions", {"stop": ["x"]}, "send stop_token_ids instead"),
            ("/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, "chat is unavailable"),
        ]:
            bad = httpx.post(s.v1 + path, json={**body, **extra}, timeout=60)
            assert bad.status_code == 400 and why in bad.json()["error"]["message"], bad.text
    finally:
        s.stop()
