#!/usr/bin/env bash
# The "next" agent for the self-update tests (tests/self_update.rs): this very source built with
# FERRY_AGENT_VERSION=0.1.1 (only the binary is relinked: the version lives in src/main.rs),
# stripped, at $CARGO_TARGET_DIR/selfupdate/ferry-agent-0.1.1. The debug binary is built back
# with the package's version afterwards. Run by scripts/test.sh before the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
T="${CARGO_TARGET_DIR:-$PWD/target}"
OUT="$T/selfupdate"
mkdir -p "$OUT"
FERRY_AGENT_VERSION=0.1.1 cargo build --locked -q -p ferry-agent --bin ferry-agent
cp "$T/debug/ferry-agent" "$OUT/.ferry-agent-0.1.1.tmp"
strip "$OUT/.ferry-agent-0.1.1.tmp"
"$OUT/.ferry-agent-0.1.1.tmp" --version | grep -q ' 0\.1\.1$' || { echo "build-agent-next: not 0.1.1" >&2; exit 1; }
mv "$OUT/.ferry-agent-0.1.1.tmp" "$OUT/ferry-agent-0.1.1"
cargo build --locked -q -p ferry-agent --bin ferry-agent
echo "build-agent-next: $OUT/ferry-agent-0.1.1 ($(stat -c %s "$OUT/ferry-agent-0.1.1") bytes)"
