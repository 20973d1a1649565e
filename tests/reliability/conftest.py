"""A real `loramux serve` for the reliability suite, and what it needs to check its accounting.

The server runs the test fixtures' tiny Llama with two adapters named at start and an allowed
folder for runtime loads (the demo model would need minutes to build here). `LORAMUX_SOAK_S`
sets the soak's length (default: the short CI mode).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import Server, start_server

SOAK_S = float(os.environ.get("LORAMUX_SOAK_S", "0"))  # 0: the short mode, a fixed request count


@pytest.fixture(scope="module")
def folders(tiny_models, tmp_path_factory):
    """(allowed folder with adapters, a folder outside it, a symlink inside pointing outside)."""
    tm = tiny_models["llama"]
    root = tmp_path_factory.mktemp("reliability")
    allowed, outside = root / "allowed", root / "outside"
    for name in ("r1_qv", "r8_all", "rs4_attn"):
        shutil.copytree(tm.adapters[name], allowed / name)
    shutil.copytree(tm.adapters["r64_mlp"], outside / "r64_mlp")
    os.symlink(outside / "r64_mlp", allowed / "escape")
    return allowed, outside


def serve_tiny(tiny_models, folders, log: Path, *extra: str) -> Server:
    tm = tiny_models["llama"]
    allowed, _ = folders
    args = [
        str(tm.path),
        "--served-model-name",
        "base",
        "--lora-modules",
        f"a={tm.adapters['r8_all']}",
        f"b={tm.adapters['r1_qv']}",
        "--allowed-lora-dirs",
        str(allowed),
        "--max-loras",
        "2",
        "--max-cpu-loras",
        "3",
        "--device",
        "cpu",
        *extra,
    ]
    return start_server(args, log)


FUZZ_MAX_MODEL_LEN = 128
FUZZ_SERVER_FLAGS = (  # the fuzzers' server: room for many short requests, a bounded queue
    "--num-pages",
    "512",
    "--max-num-seqs",
    "16",
    "--max-queue-len",
    "64",
    "--max-model-len",
    str(FUZZ_MAX_MODEL_LEN),
)


def plain_request_completes(server: Server, model: str = "base", max_tokens: int = 2) -> None:
    """A plain request is answered with every token it asked for: the server still serves."""
    r = httpx.post(
        server.url + "/v1/completions",
        json={"model": model, "prompt": "still here", "max_tokens": max_tokens, "ignore_eos": True},
        timeout=60,
    )
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == max_tokens, r.text[:300]


def accounting(server: Server) -> dict[str, float]:
    """Pages and adapter references, read from /metrics (real Prometheus text)."""
    m = server.metrics()
    pick = {
        k: v for k, v in m.items() if k.startswith(("loramux_kv_pages", "loramux_adapter_requests_active"))
    }
    pick["running"] = sum(v for k, v in m.items() if k.startswith("loramux_requests_running"))
    pick["waiting"] = sum(v for k, v in m.items() if k.startswith("loramux_requests_waiting"))
    return pick


def assert_whole(server: Server, timeout: float = 30) -> dict[str, float]:
    """Once idle: every page free or held by the prefix cache, no adapter reference left."""
    import time

    deadline = time.time() + timeout
    while True:
        acc = accounting(server)
        idle = acc["running"] == 0 and acc["waiting"] == 0
        pages_ok = (
            acc["loramux_kv_pages_free"] + acc["loramux_kv_pages_cached"] == acc["loramux_kv_pages_total"]
        )
        refs = {k: v for k, v in acc.items() if k.startswith("loramux_adapter_requests_active") and v}
        if idle and pages_ok and not refs:
            assert httpx.get(server.url + "/health", timeout=10).status_code == 200
            return acc
        assert time.time() < deadline, f"accounting not whole after {timeout}s: {acc}"
        time.sleep(0.3)
