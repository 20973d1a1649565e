"""Start real `loramux serve` processes on 127.0.0.1 and talk to them over HTTP."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def metrics(self) -> dict[str, float]:
        """Prometheus samples as {'name{label="v",...}': value}."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(self.url + "/metrics", timeout=30).text
        out = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def start_server(
    args: list[str], log: Path, env: dict[str, str] | None = None, timeout: float = 120
) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "loramux.cli", "serve", *args, "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    server = Server(f"http://127.0.0.1:{port}", proc, log)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log_text()[-3000:]}")
        try:
            if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    server.stop()
    raise RuntimeError(f"server not healthy after {timeout}s:\n{server.log_text()[-3000:]}")


@pytest.fixture(scope="session")
def adapter_dirs(tiny_models, tmp_path_factory):
    """An allowed folder holding copies of the llama adapters, and a folder outside it."""
    root = tmp_path_factory.mktemp("adapters")
    allowed, outside = root / "allowed", root / "outside"
    for name, path in tiny_models["llama"].adapters.items():
        shutil.copytree(path, allowed / name)
    shutil.copytree(tiny_models["llama"].adapters["r1_qv"], outside / "r1_qv")
    return allowed, outside


@pytest.fixture(scope="session")
def parsers_server(tmp_path_factory):
    """The demo served with the hermes tool-call parser and the deepseek_r1 reasoning parser, one
    server for the tests of both (test_auto_tools, test_reasoning) and of the Messages API's
    blocks. The parsers leave constrained answers whole, so a regular expression still decides
    what the model writes."""
    flags = ["--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--reasoning-parser", "deepseek_r1"]
    s = start_server(flags, tmp_path_factory.mktemp("parsers") / "server.log", timeout=120)
    yield s
    s.stop()
