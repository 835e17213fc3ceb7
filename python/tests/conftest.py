"""Fixtures: a real `trellis serve` process (binary from $TRELLIS_BIN, default target/debug/trellis)."""

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import openai
import pytest
import requests

ROOT = Path(__file__).resolve().parents[2]
MODEL = "smollm2"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *extra: str, env_extra: dict | None = None, model: str = MODEL,
                 max_model_len: str = "2048", kv_cache_memory: str = "256M"):
        binary = os.environ.get("TRELLIS_BIN", str(ROOT / "target" / "debug" / "trellis"))
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = open(ROOT / "target" / f"trellis-serve-{self.port}.log", "w+")
        env = {k: v for k, v in os.environ.items() if k != "VLLM_API_KEY"}
        env.update(env_extra or {})
        self.proc = subprocess.Popen(
            [binary, "serve", "--host", "127.0.0.1", "--port", str(self.port),
             "--served-model-name", model, "--max-model-len", max_model_len, "--kv-cache-memory", kv_cache_memory, *extra],
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, env=env,
        )
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"trellis serve exited with {self.proc.returncode}: {self.output()}")
            try:
                if requests.get(self.base + "/health", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.3)
        self.proc.kill()
        raise RuntimeError(f"trellis serve did not become healthy: {self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def client(self, api_key: str = "EMPTY") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base + "/v1", api_key=api_key, max_retries=0, timeout=300)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return -1
        finally:
            self.log.close()


@pytest.fixture(scope="session")
def server():
    s = Server()
    yield s
    assert s.stop() == 0, "trellis serve must exit 0 on SIGTERM"


@pytest.fixture(scope="session")
def keyed_server():
    s = Server("--api-key", "sk-test")
    yield s
    assert s.stop() == 0


@pytest.fixture()
def client(server):
    return server.client()
