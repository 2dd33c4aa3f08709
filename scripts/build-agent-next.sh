#!/usr/bin/env bash
# The "next" agents for the self-update tests: this very source built with FERRY_AGENT_VERSION
# (only the binary is relinked: the version lives in src/main.rs), stripped, under
# $CARGO_TARGET_DIR/selfupdate/:
#   ferry-agent-0.1.1       a good next version (tests/self_update.rs, scripts/test-systemd.sh)
#   ferry-agent-0.1.3-hang  built with FERRY_AGENT_BREAK=hang: READY=1, then never a watchdog ping
#   ferry-agent-0.2.0       the binary of a newer package (scripts/test-systemd.sh: dpkg -i wins)
# The debug binary is built back with the package's version afterwards. Run by scripts/test.sh
# before the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
T="${CARGO_TARGET_DIR:-$PWD/target}"
OUT="$T/selfupdate"
mkdir -p "$OUT"
# build NAME VERSION [FAULT]
build() {
    env FERRY_AGENT_VERSION="$2" ${3:+FERRY_AGENT_BREAK="$3"} cargo build --locked -q -p ferry-agent --bin ferry-agent
    cp "$T/debug/ferry-agent" "$OUT/.$1.tmp"
    strip "$OUT/.$1.tmp"
    "$OUT/.$1.tmp" --version | grep -q " ${2//./\\.}\$" || { echo "build-agent-next: $1 is not $2" >&2; exit 1; }
    mv "$OUT/.$1.tmp" "$OUT/$1"
    echo "build-agent-next: $OUT/$1 ($(stat -c %s "$OUT/$1") bytes)"
}
build ferry-agent-0.1.3-hang 0.1.3 hang
build ferry-agent-0.2.0 0.2.0
# The good one last: its presence is what the tests wait for.
build ferry-agent-0.1.1 0.1.1
cargo build --locked -q -p ferry-agent --bin ferry-agent
