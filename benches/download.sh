#!/usr/bin/env bash
# Runs the download benchmarks (issue 8) with everything they need (same set-up as the tests):
# dockerd, the registry on 127.0.0.1:5055 with the sample images (ferry/bulk included),
# mosquitto, and the release x86_64 agent. Takes several minutes (the docker retry loop on the
# flaky link alone may run FERRY_BENCH_PEER_CAP_S, default 300 s, per measurement).
# Numbers land on stdout and in target/bench-download.json; README.md quotes a run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/env-up.sh
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
export FERRY_REGISTRY="${FERRY_REGISTRY_ADDR:-127.0.0.1:5055}"
export FERRY_IMAGES_FILE="$PWD/target/sample-images.txt"
mkdir -p target
images/build.sh "$FERRY_REGISTRY" > "$FERRY_IMAGES_FILE"
cargo build --release --locked -p ferry-agent
cargo bench --locked --bench download
