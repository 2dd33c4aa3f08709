#!/usr/bin/env bash
# The test command (README): on a fresh Debian 12 machine, as root, installs and starts what the
# tests need (scripts/env-up.sh: dockerd, binfmt + qemu, registry, mosquitto, cross toolchains,
# rust targets), builds the sample images for arm64 and armv7 under qemu, then runs:
#   1. cargo fmt --check and clippy -D warnings
#   2. the agent built for aarch64 and armv7 (release, as shipped) and its unit tests under
#      qemu-arm (armv7; FERRY_QEMU_TESTS="aarch64 armv7" runs them under qemu-aarch64 as well)
#   3. the Debian packages (scripts/package.sh: agent amd64/arm64/armhf, controller amd64) and
#      their checks (scripts/test-packages.sh: contents, the units, a real dpkg install into an
#      overlay copy of this machine; scripts/test-systemd.sh: the installed units under a real
#      systemd booted with systemd-nspawn: READY, watchdog, an update, drain, exit 78, and the
#      real ferryctl serve under its unit's sandbox)
#   4. every unit and integration test of the workspace against the real dockerd, registry and
#      mosquitto (FERRY_REQUIRE_INFRA=1: a missing component fails, it never skips)
# Idempotent; safe to run again. Set FERRY_SKIP_CROSS=1 to skip step 2 (and the ARM
# packages) while iterating.
set -euo pipefail
cd "$(dirname "$0")/.."
T0=$SECONDS
step() { printf '\n==> %s (%ss)\n' "$*" "$((SECONDS - T0))"; }

step "environment"
bash scripts/env-up.sh
# shellcheck disable=SC1091
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
export FERRY_REGISTRY="${FERRY_REGISTRY_ADDR:-127.0.0.1:5055}"
export FERRY_REQUIRE_INFRA=1
export FERRY_IMAGES_FILE="$PWD/target/sample-images.txt"
mkdir -p target

step "sample images (arm64 + armv7, built under qemu)"
images/build.sh "$FERRY_REGISTRY" > "$FERRY_IMAGES_FILE.tmp"
mv "$FERRY_IMAGES_FILE.tmp" "$FERRY_IMAGES_FILE"
cat "$FERRY_IMAGES_FILE"

step "format and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings

if [ "${FERRY_SKIP_CROSS:-0}" != 1 ]; then
    for target in aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf; do
        step "agent for $target (release, as shipped)"
        cargo build --locked --release -p ferry-agent --target "$target"
        ls -l "target/$target/release/ferry-agent"
    done
    # The unit tests run under qemu on armv7 only: 32-bit usize/time_t and alignment are where
    # an ARM box differs from this host; aarch64 is 64-bit little-endian like it, and its
    # release build above already proves it compiles. (Both: FERRY_QEMU_TESTS="aarch64 armv7".)
    for arch in ${FERRY_QEMU_TESTS:-armv7}; do
        case "$arch" in
            aarch64) target=aarch64-unknown-linux-gnu ;;
            armv7) target=armv7-unknown-linux-gnueabihf ;;
            *) echo "FERRY_QEMU_TESTS: unknown arch $arch" >&2; exit 2 ;;
        esac
        step "agent unit tests for $target under qemu"
        cargo test --locked -p ferry-agent -p ferry-protocol --lib --target "$target"
    done
fi

step "Debian packages and their checks"
if [ "${FERRY_SKIP_CROSS:-0}" = 1 ]; then
    export FERRY_PKG_AGENT_ARCHES=amd64
fi
# Reuses the ARM release builds above; adds one amd64 release build of agent + controller.
bash scripts/package.sh
bash scripts/test-packages.sh
bash scripts/test-systemd.sh

step "workspace tests (real dockerd, registry, mosquitto; ARM images under qemu)"
cargo build --locked --workspace --bins
cargo test --locked --workspace -- --test-threads="${FERRY_TEST_THREADS:-2}"

step "all tests passed in $((SECONDS - T0)) s"
