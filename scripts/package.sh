#!/usr/bin/env bash
# Builds the release binary and writes the deployable Functions zip:
#   host.json, SyncIndicators/function.json, and the mati-sentinel binary (mode 0755).
# Usage: scripts/package.sh [OUTPUT.zip]   (default dist/mati-sentinel-functions.zip)
# MATI_SENTINEL_BIN=path skips the build and packages that binary instead.
set -euo pipefail
cd "$(dirname "$0")/.."

out="${1:-dist/mati-sentinel-functions.zip}"
bin="${MATI_SENTINEL_BIN:-}"
if [ -z "$bin" ]; then
  cargo build --release --locked
  bin=target/release/mati-sentinel
fi
mkdir -p "$(dirname "$out")"

# Python's zipfile records Unix modes explicitly, so the executable bit survives any umask
# (a handler without it never starts on Linux Functions).
python3 - "$bin" "$out" <<'PY'
import sys, zipfile
binary, out = sys.argv[1], sys.argv[2]
entries = [
    ("functions/host.json", "host.json", 0o644),
    ("functions/SyncIndicators/function.json", "SyncIndicators/function.json", 0o644),
    (binary, "mati-sentinel", 0o755),
]
with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as z:
    for src, name, mode in entries:
        info = zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0))
        info.external_attr = (0o100000 | mode) << 16
        info.create_system = 3  # Unix, so the mode above is honoured
        info.compress_type = zipfile.ZIP_DEFLATED
        with open(src, "rb") as f:
            z.writestr(info, f.read())
print(out)
PY
