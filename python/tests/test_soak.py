"""A short soak (issue 14): mixed traffic — streams, chat, n>1, disconnects, bad requests —
for 40 s against a real `trellis serve`; every good request succeeds, no 5xx, no descriptor
leak. `scripts/soak.sh` runs it for 30 minutes and also checks that RSS stays flat."""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from soak import run_soak  # noqa: E402


def test_a_short_soak_has_no_failures_and_leaks_no_descriptors(server):
    time.sleep(0.5)
    rep = run_soak(server.base, server.port, server.proc.pid, seconds=40, warmup=10, clients=3, every=5)
    print({k: v for k, v in rep.items() if k != "samples"})
    assert rep["n_failures"] == 0, rep["failures"]
    assert rep["counts"].get("disconnect", 0) > 0 and rep["counts"].get("bad", 0) > 0, rep["counts"]
    assert rep["fds_final"] <= rep["fds_after_warmup"] + 8, rep["samples"]
