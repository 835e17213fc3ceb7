#!/usr/bin/env bash
# Idle and slow clients against a real `trellis serve` while normal requests are served
# (issue 14): STORM_IDLE silent connections and STORM_TRICKLE connections trickling headers or
# bodies a byte every half second, reopened as the server closes them, for STORM_SECONDS.
# Passes when every normal request succeeds; prints what the storm saw.
#   STORM_SECONDS=300 STORM_IDLE=2000 scripts/connection-storm.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${TRELLIS_VENV:-.venv}/bin/python"
[ -x "$PY" ] || { echo "$0: no venv at ${TRELLIS_VENV:-.venv}: run scripts/test.sh once first" >&2; exit 1; }
export STORM_SECONDS="${STORM_SECONDS:-120}" STORM_IDLE="${STORM_IDLE:-2000}" STORM_TRICKLE="${STORM_TRICKLE:-200}"
cargo build -q -p trellis
cd python/tests
exec "../../$PY" -m pytest -q -s test_connections.py -k idle_and_trickling
