#!/usr/bin/env bash
# Runs the update benchmarks with everything they need (same set-up as the tests).
# Numbers land on stdout and in target/bench-update.json; README.md quotes a run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/env-up.sh
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
export FERRY_REGISTRY="${FERRY_REGISTRY_ADDR:-127.0.0.1:5055}"
export FERRY_IMAGES_FILE="$PWD/target/sample-images.txt"
mkdir -p target
images/build.sh "$FERRY_REGISTRY" > "$FERRY_IMAGES_FILE"
cargo build --release --locked -p ferry-agent --target armv7-unknown-linux-gnueabihf
cargo bench --locked --bench update
