#!/usr/bin/env bash
# Build and push the agent's own release image (PROTOCOL.md §10b): `FROM scratch` with the
# ferry-agent binary, for linux/arm64, linux/arm/v7 and linux/amd64, from this checkout's
# release builds (the ones the Debian packages ship), as the multi-platform tag
# REGISTRY/ferry/agent:VERSION. Then it writes the release spec to sign:
#
#   images/build-agent.sh 127.0.0.1:5055
#   ferryctl release sign --spec target/images/agent-<version>.toml --key release.key --out agent.json
#   (push agent.json to the controller's catalogue, then)
#   ferryctl rollout start --app ferry-agent --version <version> --select ... --waves ...
#
# Binaries it takes (built when missing, stripped as shipped):
#   target/aarch64-unknown-linux-gnu/release/ferry-agent, target/armv7-unknown-linux-gnueabihf/
#   release/ferry-agent, target/release/ferry-agent.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
REGISTRY="${1:?usage: $0 REGISTRY (e.g. 127.0.0.1:5055)}"
T="${CARGO_TARGET_DIR:-$ROOT/target}"
VERSION="${FERRY_AGENT_VERSION:-$(sed -n '/^\[workspace\.package\]/,/^\[/ s/^version *= *"\(.*\)"/\1/p' Cargo.toml)}"
export DOCKER_BUILDKIT=0
log() { printf 'build-agent.sh: %s\n' "$*" >&2; }
die() { printf 'build-agent.sh: ERROR: %s\n' "$*" >&2; exit 1; }

# platform | rust target ("" = host) | tag suffix
PLATFORMS=(
    "linux/arm64|aarch64-unknown-linux-gnu|arm64"
    "linux/arm/v7|armv7-unknown-linux-gnueabihf|armv7"
    "linux/amd64||amd64"
)
CTX="$(mktemp -d)"
trap 'rm -rf "$CTX"' EXIT
refs=()
for row in "${PLATFORMS[@]}"; do
    IFS='|' read -r plat target suffix <<<"$row"
    if [ -n "$target" ]; then bin="$T/$target/release/ferry-agent"; else bin="$T/release/ferry-agent"; fi
    if [ ! -x "$bin" ]; then
        log "building $bin"
        if [ -n "$target" ]; then
            cargo build --locked --release -p ferry-agent --target "$target"
        else
            cargo build --locked --release -p ferry-agent
        fi
    fi
    mkdir -p "$CTX/$suffix"
    cp "$bin" "$CTX/$suffix/ferry-agent"
    cp images/agent/Dockerfile "$CTX/$suffix/"
    ref="$REGISTRY/ferry/agent:$VERSION-$suffix"
    log "docker build --platform $plat -t $ref ($(stat -c %s "$bin") bytes)"
    docker build -q --platform "$plat" -t "$ref" "$CTX/$suffix" >/dev/null
    docker push "$ref" >/dev/null
    refs+=("$ref")
done
index="$REGISTRY/ferry/agent:$VERSION"
docker manifest rm "$index" >/dev/null 2>&1 || true
docker manifest create --insecure "$index" "${refs[@]}" >/dev/null
for row in "${PLATFORMS[@]}"; do
    IFS='|' read -r plat _ suffix <<<"$row"
    os="${plat%%/*}"; rest="${plat#*/}"; arch="${rest%%/*}"
    variant=(); [ "$rest" = "$arch" ] || variant=(--variant "${rest#*/}")
    docker manifest annotate "$index" "$REGISTRY/ferry/agent:$VERSION-$suffix" \
        --os "$os" --arch "$arch" "${variant[@]}"
done
docker manifest push --insecure --purge "$index" >/dev/null
mkdir -p "$T/images"
SPEC="$T/images/agent-$VERSION.toml"
cat >"$SPEC" <<SPEC
# The agent itself (PROTOCOL.md §10b): no container, no health settings.
app = "ferry-agent"
version = "$VERSION"
image = "$index"
SPEC
log "pushed $index (arm64, arm/v7, amd64); release spec $SPEC"
