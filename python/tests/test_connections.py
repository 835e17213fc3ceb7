"""Connections of a real `trellis serve` (issue 14 item 2): idle and slow clients cannot exhaust
the server. Thousands of idle connections, headers and bodies trickled a byte at a time and
clients that vanish mid-body all run beside normal requests, which keep being served; the
connection cap answers 503 with `Retry-After`; idle connections are closed after the header
timeout and trickled bodies get 408.

`scripts/connection-storm.sh` runs the storm test longer and larger (STORM_SECONDS, STORM_IDLE,
STORM_TRICKLE)."""

import os
import resource
import selectors
import socket
import threading
import time

import requests

from conftest import MODEL, Server

IDLE = int(os.environ.get("STORM_IDLE", "2000"))
TRICKLE = int(os.environ.get("STORM_TRICKLE", "100"))
SECONDS = float(os.environ.get("STORM_SECONDS", "12"))


def _raise_fd_limit(need: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = need if hard == resource.RLIM_INFINITY else min(need, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        soft = want
    return soft


class Storm(threading.Thread):
    """Keeps `idle` silent connections and `trickle` connections that send a header or a body a
    byte every half second open against the server, reopening what the server closes."""

    def __init__(self, port: int, idle: int, trickle: int):
        super().__init__(daemon=True)
        self.port, self.idle, self.trickle = port, idle, trickle
        self.stop = threading.Event()
        self.closed_by_server = 0
        self.opened = 0
        self.answers: dict[str, int] = {}
        self.errors = 0
        self.sel = selectors.DefaultSelector()

    def _open(self, kind: str):
        try:
            s = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        except OSError:
            self.errors += 1
            return
        s.setblocking(False)
        self.opened += 1
        state = {"kind": kind, "sent": 0, "next": time.time()}
        if kind == "body":
            s.send(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                   b"Content-Length: 100000\r\n\r\n{")
        self.sel.register(s, selectors.EVENT_READ, state)

    def run(self):
        kinds = ["idle"] * self.idle + ["header", "body"] * (self.trickle // 2)
        for k in kinds:
            self._open(k)
        while not self.stop.is_set():
            for key, _ in self.sel.select(timeout=0.1):
                s, st = key.fileobj, key.data
                try:
                    data = s.recv(4096)
                except OSError:
                    data = b""
                if data.startswith(b"HTTP/1.1 "):
                    code = data[9:12].decode()
                    self.answers[code] = self.answers.get(code, 0) + 1
                self.sel.unregister(s)
                s.close()
                self.closed_by_server += 1
                self._open(st["kind"])
            now = time.time()
            for key in list(self.sel.get_map().values()):
                st = key.data
                if st["kind"] != "idle" and now >= st["next"]:
                    st["next"] = now + 0.5
                    byte = b"GET / HTTP/1.1\r\n"[st["sent"] % 16:][:1] if st["kind"] == "header" else b" "
                    try:
                        key.fileobj.send(byte)
                        st["sent"] += 1
                    except OSError:
                        pass
        for key in list(self.sel.get_map().values()):
            key.fileobj.close()


def test_idle_and_trickling_connections_do_not_stop_normal_requests():
    fds = _raise_fd_limit(IDLE + TRICKLE + 256)
    idle = min(IDLE, fds - TRICKLE - 256)
    s = Server("--timeout-keep-alive", "2", "--http-body-timeout", "3")
    try:
        storm = Storm(s.port, idle, TRICKLE)
        storm.start()
        while storm.opened < idle + TRICKLE and storm.is_alive():
            time.sleep(0.1)
        served, streamed = 0, 0
        end = time.time() + SECONDS
        while time.time() < end:
            r = requests.post(s.base + "/v1/completions", timeout=120,
                              json={"model": MODEL, "prompt": "Hello", "max_tokens": 4, "temperature": 0})
            assert r.status_code == 200, r.text
            served += 1
            with requests.post(s.base + "/v1/completions", timeout=120, stream=True,
                               json={"model": MODEL, "prompt": "Hi", "max_tokens": 4, "stream": True}) as r:
                assert r.status_code == 200
                assert b"data: [DONE]" in b"".join(r.iter_content(None))
            streamed += 1
        storm.stop.set()
        storm.join(timeout=30)
        print(f"idle={idle} trickle={TRICKLE} opened={storm.opened} closed_by_server={storm.closed_by_server} "
              f"answers={storm.answers} served={served} streamed={streamed}")
        assert served >= 1 and streamed >= 1
        # The server closed the idle ones (header timeout) and answered trickled bodies with 408.
        assert storm.closed_by_server >= idle, storm.closed_by_server
        assert storm.answers.get("408", 0) >= 1, storm.answers
        assert storm.errors == 0, "the server refused connections below its cap"
    finally:
        assert s.stop() == 0


def _held_connection(port: int) -> socket.socket:
    """A kept-alive connection the server has accepted and answered once, so it surely holds
    one of the server's connection slots. Startup's readiness probes may still hold a slot for
    a moment (a probe that timed out while the model loaded is accepted late): a 503 here is
    retried."""
    deadline = time.time() + 60
    while True:
        c = socket.create_connection(("127.0.0.1", port), timeout=30)
        c.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        head = c.recv(4096)
        if head.startswith(b"HTTP/1.1 200"):
            return c
        c.close()
        assert time.time() < deadline, head
        time.sleep(0.2)


def test_connections_over_the_cap_get_a_503_and_the_rest_are_served():
    s = Server("--max-connections", "20", "--timeout-keep-alive", "60")
    try:
        held = [_held_connection(s.port) for _ in range(20)]
        r = requests.get(s.base + "/v1/models", timeout=30)
        assert r.status_code == 503, r.text
        assert r.headers.get("retry-after") == "1"
        err = r.json()["error"]
        assert err["type"] == "ServiceUnavailableError" and "20 connections" in err["message"], err
        for h in held:
            h.close()
        deadline = time.time() + 30
        while True:
            r = requests.get(s.base + "/v1/models", timeout=30)
            if r.status_code == 200 or time.time() > deadline:
                break
            time.sleep(0.1)
        assert r.status_code == 200, r.text
    finally:
        assert s.stop() == 0


def _prompt_tokens(server) -> float:
    for line in requests.get(server.base + "/metrics", timeout=10).text.splitlines():
        if line.startswith("vllm:prompt_tokens_total"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("vllm:prompt_tokens_total is missing from /metrics")


def test_a_client_that_vanishes_mid_body_costs_nothing(server):
    before = _prompt_tokens(server)
    for _ in range(50):
        c = socket.create_connection(("127.0.0.1", server.port))
        c.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 5000\r\n\r\n{\"model\": \"smollm2\", \"prompt\": \"")
        c.close()
    time.sleep(0.5)
    # None of them reached the engine, and the server still serves.
    assert _prompt_tokens(server) == before
    r = requests.post(server.base + "/v1/completions", timeout=120,
                      json={"model": MODEL, "prompt": "Hello", "max_tokens": 2})
    assert r.status_code == 200, r.text
