"""Soak: mixed traffic against a real `trellis serve` for a long time, watching its memory and
file descriptors (issue 14). Run through `scripts/soak.sh`; `python/tests/test_soak.py` runs a
short pass.

Traffic, from several client threads at once: completions and chat, streamed and not, n>1,
logprobs, prompts that share long prefixes (the prefix cache), clients that disconnect in the
middle of a stream, and bad requests (which must be 4xx, never 5xx). Every 10 s the server's
RSS (/proc/PID/status VmRSS) and open file descriptors (/proc/PID/fd) are sampled. It passes
when every good request succeeded, no request got a 5xx, and after the warm-up RSS stays within
a bound of its first post-warm-up sample and the descriptors do not grow.
"""

from __future__ import annotations

import json
import os
import random
import socket
import threading
import time

import requests

MODEL = "smollm2"
PREFIX = ("You are a careful assistant. Answer in one short sentence. " * 12).strip()


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def finished_requests(base: str) -> tuple[float, float]:
    """(Sum of vllm:request_success_total over finish reasons, vllm:num_requests_running)."""
    done, running = 0.0, 0.0
    for line in requests.get(base + "/metrics", timeout=60).text.splitlines():
        if line.startswith("vllm:request_success_total"):
            done += float(line.rsplit(" ", 1)[1])
        elif line.startswith("vllm:num_requests_running") or line.startswith("vllm:num_requests_waiting"):
            running += float(line.rsplit(" ", 1)[1])
    return done, running


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Tally:
    """What every client thread adds to: request counts by kind, failures, and the requests
    the engine should count as finished (each of a request's n completions)."""

    def __init__(self):
        self.counts: dict[str, int] = {}
        self.expected_finished = 0
        self.failures: list[str] = []
        self.lock = threading.Lock()


class Traffic:
    """One client thread's traffic, reported into a shared Tally."""

    def __init__(self, base: str, port: int, seed: int, tally: Tally):
        self.base, self.port = base, port
        self.rng = random.Random(seed)
        self.tally = tally

    def count(self, kind: str, finished: int = 0):
        with self.tally.lock:
            self.tally.counts[kind] = self.tally.counts.get(kind, 0) + 1
            self.tally.expected_finished += finished

    def fail(self, what: str):
        with self.tally.lock:
            self.tally.failures.append(what[:300])

    def post(self, path: str, body: dict, stream: bool = False):
        return requests.post(self.base + path, json=body, timeout=300, stream=stream)

    def one(self):
        r = self.rng.random()
        try:
            if r < 0.25:
                kind = "completion"
                n = self.rng.choice([1, 1, 2, 3])
                p = f"{PREFIX} Question {self.rng.randint(0, 50)}: what is {self.rng.randint(1, 99)} plus one?"
                resp = self.post("/v1/completions", {"model": MODEL, "prompt": p, "max_tokens": self.rng.randint(1, 24),
                                                     "temperature": self.rng.choice([0, 0.8]),
                                                     "n": n, "logprobs": self.rng.choice([None, 2])})
                ok = resp.status_code == 200 and len(resp.json()["choices"]) == n
                finished = n
            elif r < 0.45:
                kind = "chat"
                msgs = [{"role": "system", "content": PREFIX},
                        {"role": "user", "content": f"Name a colour, number {self.rng.randint(0, 1000)}."}]
                resp = self.post("/v1/chat/completions", {"model": MODEL, "messages": msgs, "max_tokens": self.rng.randint(1, 16)})
                ok = resp.status_code == 200 and resp.json()["choices"][0]["message"]["role"] == "assistant"
                finished = 1
            elif r < 0.65:
                kind = "stream"
                path, body = self.rng.choice([
                    ("/v1/completions", {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 20, "stream": True,
                                         "stream_options": {"include_usage": True}}),
                    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "Tell a story."}],
                                              "max_tokens": 20, "stream": True}),
                ])
                with self.post(path, body, stream=True) as resp:
                    data = b"".join(resp.iter_content(None))
                ok = resp.status_code == 200 and b"data: [DONE]" in data
                finished = 1
            elif r < 0.78:
                kind = "disconnect"
                # Start a long stream, read a little, and vanish.
                with socket.create_connection(("127.0.0.1", self.port), timeout=60) as s:
                    body = json.dumps({"model": MODEL, "prompt": "Count slowly:", "max_tokens": 200, "stream": True,
                                       "ignore_eos": True}).encode()
                    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                              + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
                    got = s.recv(4096)
                    ok = got.startswith(b"HTTP/1.1 200")
                finished = 1  # aborted when the server sees the client gone
            elif r < 0.93:
                kind = "bad"
                path, body = self.rng.choice([
                    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": -3}),
                    ("/v1/completions", {"model": "nope", "prompt": "x"}),
                    ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 100000}),
                    ("/v1/chat/completions", {"model": MODEL, "messages": "not a list"}),
                    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 10 ** 7}),
                    ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": -1}),
                    ("/v1/completions", {"model": MODEL, "prompt": "x", "logit_bias": {"abc": 1}}),
                ])
                resp = self.post(path, body)
                ok = 400 <= resp.status_code < 500 and "error" in resp.json()
                finished = 0
                if resp.status_code >= 500:
                    self.fail(f"5xx for a bad request {path} {body}: {resp.status_code} {resp.text}")
            else:
                kind = "misc"
                path = self.rng.choice(["/v1/models", "/health", "/metrics", "/version"])
                resp = requests.get(self.base + path, timeout=60)
                ok = resp.status_code == 200
                finished = 0
            self.count(kind, finished)
            if not ok:
                self.fail(f"{kind}: unexpected answer")
        except Exception as e:  # noqa: BLE001 - every failure is reported
            self.fail(f"exception: {e!r}")


def run_soak(base: str, port: int, pid: int, seconds: float, warmup: float, clients: int = 4,
             every: float = 10.0, log=print) -> dict:
    stop = threading.Event()
    traffic = Tally()
    done_before, _ = finished_requests(base)

    def client(i: int):
        t = Traffic(base, port, seed=i, tally=traffic)
        while not stop.is_set():
            t.one()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    samples = []
    start = time.time()
    while time.time() - start < seconds:
        time.sleep(min(every, max(0.0, seconds - (time.time() - start))))
        s = (round(time.time() - start), rss_kib(pid), open_fds(pid))
        samples.append(s)
        log(f"t={s[0]:>5}s rss={s[1] / 1024:7.1f} MiB fds={s[2]:>4} requests={sum(traffic.counts.values())} "
            f"failures={len(traffic.failures)}")
    stop.set()
    for t in threads:
        t.join(timeout=300)
    # Let the server finish or abort what the clients left, then read its counters.
    deadline = time.time() + 120
    while True:
        done_after, in_flight = finished_requests(base)
        if in_flight == 0 or time.time() > deadline:
            break
        time.sleep(0.5)
    time.sleep(1)
    done_after, _ = finished_requests(base)
    final = (round(time.time() - start), rss_kib(pid), open_fds(pid))
    after = [s for s in samples if s[0] >= warmup] or samples[-1:]
    base_rss = after[0][1]
    peak_rss = max(s[1] for s in after)
    growth = (peak_rss - base_rss) / base_rss
    return {
        "seconds": seconds, "counts": dict(traffic.counts), "failures": traffic.failures[:20],
        "n_failures": len(traffic.failures), "samples": samples, "final": final,
        "rss_after_warmup_mib": base_rss / 1024, "rss_peak_mib": peak_rss / 1024, "rss_growth": growth,
        "fds_after_warmup": after[0][2], "fds_final": final[2],
        "client_finished": traffic.expected_finished, "metrics_finished": done_after - done_before,
    }


if __name__ == "__main__":
    import argparse
    import sys

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--base", required=True)
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--seconds", type=float, default=1800)
    ap.add_argument("--warmup", type=float, default=300)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--max-rss-growth", type=float, default=0.05)
    a = ap.parse_args()
    port = int(a.base.rsplit(":", 1)[1])
    rep = run_soak(a.base, port, a.pid, a.seconds, a.warmup, a.clients)
    print(json.dumps({k: v for k, v in rep.items() if k != "samples"}, indent=1))
    ok = (rep["n_failures"] == 0 and rep["rss_growth"] <= a.max_rss_growth
          and rep["fds_final"] <= rep["fds_after_warmup"] + 8
          and rep["client_finished"] == rep["metrics_finished"])
    print("SOAK PASSED" if ok else "SOAK FAILED")
    sys.exit(0 if ok else 1)
