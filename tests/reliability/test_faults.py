"""Injected faults against a real `loramux serve` (issue 13; S4.2, S5.4, S6.3).

Each scenario ends with the server answering (or cleanly stopped), never a hang, and its
accounting intact: every page free or held by the prefix cache, no adapter reference left.
Faults in adapter files and in the model step stop the engine (vLLM's dead-engine rule, see
tests/server/test_failed_step.py): the server then answers 503 with the cause, /health says so,
and every request has been ended.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import threading
import time

import httpx
import pytest

from tests.reliability.conftest import accounting, assert_whole, serve_tiny

PROMPT = "hello world page batch"


def _complete(url: str, model: str = "a", max_tokens: int = 4, **extra) -> httpx.Response:
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": True, **extra}
    return httpx.post(url + "/v1/completions", json=body, timeout=120)


@pytest.fixture(scope="module")
def busy(tiny_models, folders, tmp_path_factory):
    """Two seats, a short queue and a KV pool one long request nearly fills: easy to fill."""
    s = serve_tiny(
        tiny_models,
        folders,
        tmp_path_factory.mktemp("faults") / "server.log",
        "--max-num-seqs",
        "2",
        "--max-queue-len",
        "2",
        "--num-pages",
        "140",
        "--page-size",
        "4",
        "--max-model-len",
        "512",
    )
    yield s
    s.stop()


def _hold_the_seats(server, max_tokens: int = 480) -> list[threading.Thread]:
    """Two long requests, returned once both run (polled from /metrics, bounded)."""
    threads = [
        threading.Thread(target=_complete, args=(server.url, "a", max_tokens), daemon=True) for _ in range(2)
    ]
    for t in threads:
        t.start()
    deadline = time.time() + 60
    while accounting(server)["running"] < 2:
        assert time.time() < deadline, "the two long requests never ran"
        time.sleep(0.02)
    return threads


def test_a_queue_deadline_answers_503_queue_timeout_streamed_or_not(busy):
    seats = _hold_the_seats(busy)
    r = _complete(busy.url, "b", 4, max_queue_time=0.2)
    assert r.status_code == 503, r.text
    err = r.json()["error"]
    assert err["code"] == "queue_timeout" and "max_queue_time" in err["message"]
    with httpx.stream(
        "POST",
        busy.url + "/v1/completions",
        json={"model": "b", "prompt": PROMPT, "max_tokens": 4, "stream": True, "max_queue_time": 0.2},
        timeout=60,
    ) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    assert events[-1]["error"]["code"] == "queue_timeout"
    r = _complete(busy.url, "b", 2, max_queue_time=0)
    assert r.status_code == 400 and "max_queue_time" in r.json()["error"]["message"]
    for t in seats:
        t.join(timeout=120)
    assert _complete(busy.url, "b", 3, max_queue_time=30).status_code == 200  # in time: it runs
    assert_whole(busy)


def test_a_queue_over_max_queue_len_answers_503_and_the_rest_finish(busy):
    seats = _hold_the_seats(busy)
    results: list[httpx.Response] = []
    threads = [threading.Thread(target=lambda: results.append(_complete(busy.url, "b", 3))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for t in seats:
        t.join(timeout=120)
    codes = sorted(r.status_code for r in results)
    assert codes.count(200) >= 2 and set(codes) <= {200, 503}, codes
    for r in results:
        if r.status_code == 503:
            assert r.json()["error"]["code"] == "server_busy" and r.headers["retry-after"]
    assert_whole(busy)


def test_a_full_kv_pool_with_only_long_requests_finishes_them_all(busy):
    # 140 pages of 4 tokens; each request needs up to 125 pages: two seats, room for one.
    # The queue holds two, so the third starts once the first two run (three sent at once may
    # all be waiting before the first step, and the third is then rightly refused as busy).
    results: list[httpx.Response] = []

    def long() -> None:
        results.append(_complete(busy.url, "a", 490))

    threads = [threading.Thread(target=long) for _ in range(3)]
    for t in threads[:2]:
        t.start()
    deadline = time.time() + 60
    while accounting(busy)["running"] < 2 and not results:
        assert time.time() < deadline, "the first two long requests never ran"
        time.sleep(0.02)
    threads[2].start()
    for t in threads:
        t.join(timeout=240)
        assert not t.is_alive(), "a long request hung"
    assert [r.status_code for r in results] == [200, 200, 200]
    assert all(r.json()["usage"]["completion_tokens"] == 490 for r in results)
    assert_whole(busy)


def test_a_client_that_never_reads_its_stream_does_not_block_the_engine(busy):
    body = json.dumps(
        {"model": "a", "prompt": PROMPT, "max_tokens": 80, "ignore_eos": True, "stream": True}
    ).encode()
    host, port = busy.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)  # a tiny window, never drained
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    try:
        time.sleep(0.5)
        t0 = time.time()
        for _ in range(3):  # the engine keeps stepping for everyone else
            r = _complete(busy.url, "b", 3)
            assert r.status_code == 200
        assert time.time() - t0 < 60
    finally:
        sock.close()
    assert_whole(busy)


@pytest.mark.parametrize("fault", ["corrupted", "unreadable"])
def test_adapter_files_broken_after_registration_stop_the_engine_cleanly(
    tiny_models, folders, tmp_path, fault
):
    path = tmp_path / "x"
    shutil.copytree(tiny_models["llama"].adapters["r1_qv"], path)
    ad = tiny_models["llama"].adapters
    s = serve_tiny(  # host memory holds two: a and b are read ahead at start, x is not
        tiny_models,
        folders,
        tmp_path / "server.log",
        *("--lora-modules", f"a={ad['r8_all']}", f"b={ad['r1_qv']}", f"x={path}"),
        *("--num-pages", "64", "--max-cpu-loras", "2"),
    )
    try:
        assert _complete(s.url, "base", 3).status_code == 200
        weights = path / "adapter_model.safetensors"
        if fault == "corrupted":
            weights.write_bytes(b"\x00" * 64)  # not safetensors any more
        else:
            weights.unlink()
            weights.mkdir()  # the read fails: a directory where the file was
        r = _complete(s.url, "x", 3)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead", r.text
        assert "restart the server" in r.json()["error"]["message"]
        logged = s.log_text().count("Traceback")  # the cause, logged when the step failed
        health = httpx.get(s.url + "/health", timeout=10)
        assert health.status_code == 503 and health.json()["error"]
        r = _complete(s.url, "base", 3)  # refused at once, never queued behind a dead engine
        assert r.status_code == 503
        acc = accounting(s)
        assert acc["running"] == 0 and acc["waiting"] == 0
        assert acc["loramux_kv_pages_free"] + acc["loramux_kv_pages_cached"] == acc["loramux_kv_pages_total"]
        assert s.log_text().count("Traceback") == logged  # later refusals log no more tracebacks
    finally:
        s.stop()


def test_sigterm_under_load_stops_accepting_finishes_or_aborts_and_exits_0(tiny_models, folders, tmp_path):
    s = serve_tiny(
        tiny_models, folders, tmp_path / "server.log", "--num-pages", "128", "--shutdown-timeout", "3"
    )
    results: list[str] = []

    def one(max_tokens: int) -> None:
        try:
            r = _complete(s.url, "a", max_tokens)
            results.append("ok" if r.status_code == 200 else f"http {r.status_code}")
        except httpx.HTTPError as e:
            results.append(type(e).__name__)  # the connection closed at the grace period's end

    threads = [threading.Thread(target=one, args=(n,)) for n in (4, 8, 200) * 4]
    for t in threads:
        t.start()
    time.sleep(1.0)
    s.proc.send_signal(signal.SIGTERM)
    rc = s.proc.wait(timeout=60)
    for t in threads:
        t.join(timeout=60)
        assert not t.is_alive()
    log = s.log_text()
    assert rc == 0, log[-2000:]
    assert "Traceback" not in log, log[-3000:]
    assert len(results) == len(threads) and "ok" in results
    with pytest.raises(httpx.HTTPError):  # no longer accepting
        httpx.get(s.url + "/health", timeout=5)
