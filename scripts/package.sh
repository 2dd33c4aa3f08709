#!/usr/bin/env bash
# Build the Debian packages with dpkg-deb (no debhelper, no cargo-deb):
#   ferry-agent_<version>_{amd64,arm64,armhf}.deb       /usr/bin/ferry-agent, its systemd unit,
#       /etc/ferry/agent.toml (commented, unconfigured; a conffile), /etc/ferry/keys/README
#   ferry-controller_<version>_amd64.deb               /usr/bin/ferryctl, its systemd unit,
#       /etc/ferry/controller.toml (a conffile: examples/controller.toml, root:ferry-controller 0640)
# into target/debian/ (or --out DIR). <version> is the workspace version in Cargo.toml.
#
# The binaries are the release builds in target/<triple>/release (cross-linked with the Debian
# gcc of .cargo/config.toml; `cross` users: see README) and target/release for amd64. The script
# runs `cargo build --release` for them first, a no-op when they are fresh; --no-build packages
# what is there.
#
# Knobs: FERRY_PKG_AGENT_ARCHES (default "amd64 arm64 armhf"), FERRY_PKG_CONTROLLER_ARCHES
# (default "amd64"; "amd64 arm64" also works; empty: none), FERRY_MAINTAINER, CARGO_TARGET_DIR,
# FERRY_PKG_AMD64_TARGET_DIR (the target dir of the amd64 build, default CARGO_TARGET_DIR:
# scripts/test.sh builds amd64 in its own, next to a cargo that holds target/).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=""
BUILD=1
while [ $# -gt 0 ]; do
    case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    -h | --help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "package.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done

TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
AMD64_TARGET_DIR="${FERRY_PKG_AMD64_TARGET_DIR:-$TARGET_DIR}"
OUT="${OUT:-$TARGET_DIR/debian}"
AGENT_ARCHES="${FERRY_PKG_AGENT_ARCHES-amd64 arm64 armhf}"
CONTROLLER_ARCHES="${FERRY_PKG_CONTROLLER_ARCHES-amd64}"
read -ra AGENT_A <<<"$AGENT_ARCHES"
read -ra CONTROLLER_A <<<"$CONTROLLER_ARCHES"
MAINTAINER="${FERRY_MAINTAINER:-Ferry maintainers <ferry@example.org>}"
VERSION="$(sed -n '/^\[workspace\.package\]/,/^\[/ s/^version *= *"\(.*\)"/\1/p' Cargo.toml)"
[ -n "$VERSION" ] || { echo "package.sh: no [workspace.package] version in Cargo.toml" >&2; exit 1; }
# Reproducible timestamps in the archives: the last commit's time. Given to dpkg-deb only:
# in cargo's environment it would make ring's build script (and all above it) rebuild.
EPOCH="${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}"

die() { echo "package.sh: $*" >&2; exit 1; }

triple() {
    case "$1" in
    amd64) echo x86_64-unknown-linux-gnu ;;
    arm64) echo aarch64-unknown-linux-gnu ;;
    armhf) echo armv7-unknown-linux-gnueabihf ;;
    *) die "unknown architecture $1 (amd64, arm64, armhf)" ;;
    esac
}

# Release binaries of the host (amd64) live in target/release (of FERRY_PKG_AMD64_TARGET_DIR when
# set), cross ones in target/<triple>/release.
bindir() {
    if [ "$1" = amd64 ]; then echo "$AMD64_TARGET_DIR/release"; else echo "$TARGET_DIR/$(triple "$1")/release"; fi
}

has() { case " $2 " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

if [ "$BUILD" = 1 ]; then
    for arch in $(printf '%s\n' "${AGENT_A[@]}" "${CONTROLLER_A[@]}" | sort -u); do
        crates=()
        has "$arch" "$AGENT_ARCHES" && crates+=(-p ferry-agent)
        has "$arch" "$CONTROLLER_ARCHES" && crates+=(-p ferry-controller)
        if [ "$arch" = amd64 ]; then
            [ "$(uname -m)" = x86_64 ] || die "amd64 packages come from the host build: run on x86_64"
            CARGO_TARGET_DIR="$AMD64_TARGET_DIR" cargo build --locked --release "${crates[@]}"
        else
            cargo build --locked --release "${crates[@]}" --target "$(triple "$arch")"
        fi
    done
fi

# The newest GLIBC_x.y symbol version a binary needs, for Depends: libc6 (>= x.y).
glibc_min() {
    LC_ALL=C readelf -V --wide "$1" | grep -o 'Name: GLIBC_[0-9.]*' | sed 's/.*GLIBC_//' \
        | sort -t. -k1,1n -k2,2n -k3,3n | tail -n 1
}

# Installed-Size as dpkg-gencontrol computes it: KiB, each file rounded up, 1 per directory.
installed_size() {
    find "$1" -path "$1/DEBIAN" -prune -o \( -type f -printf '%s\n' \) -o \( ! -type f -printf '1024\n' \) \
        | awk '{ kib += int(($1 + 1023) / 1024) } END { print kib }'
}

# finish_deb STAGE_DIR PACKAGE ARCH: DEBIAN/control's common fields, md5sums, then dpkg-deb.
finish_deb() {
    local stage="$1" pkg="$2" arch="$3"
    (cd "$stage" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z \
        | xargs -0 md5sum) >"$stage/DEBIAN/md5sums"
    chmod 0644 "$stage/DEBIAN/md5sums"
    find "$stage" -exec touch -h -d "@$EPOCH" {} +
    local deb="$OUT/${pkg}_${VERSION}_${arch}.deb"
    SOURCE_DATE_EPOCH="$EPOCH" dpkg-deb --root-owner-group -Zxz --build "$stage" "$deb" >/dev/null
    echo "$deb ($(stat -c %s "$deb") bytes)"
}

# stage_common STAGE PACKAGE: the unit, docs, maintainer scripts.
stage_common() {
    local stage="$1" pkg="$2" dir="packaging/${2#ferry-}"
    install -d -m 0755 "$stage/DEBIAN" "$stage/usr/bin" "$stage/lib/systemd/system" \
        "$stage/etc/ferry" "$stage/etc/ferry/keys" "$stage/usr/share/doc/$pkg"
    install -m 0644 "systemd/$pkg.service" "$stage/lib/systemd/system/$pkg.service"
    install -m 0644 packaging/copyright "$stage/usr/share/doc/$pkg/copyright"
    install -m 0644 README.md "$stage/usr/share/doc/$pkg/README.md"
    for s in postinst prerm postrm; do
        install -m 0755 "$dir/$s" "$stage/DEBIAN/$s"
    done
}

control() {
    local stage="$1" pkg="$2" arch="$3" depends="$4" extra="$5" short="$6" long="$7"
    {
        echo "Package: $pkg"
        echo "Version: $VERSION"
        echo "Architecture: $arch"
        echo "Maintainer: $MAINTAINER"
        echo "Installed-Size: $(installed_size "$stage")"
        echo "Depends: $depends"
        [ -z "$extra" ] || echo "$extra"
        echo "Section: admin"
        echo "Priority: optional"
        echo "Description: $short"
        printf '%s\n' "$long" | sed 's/^$/./; s/^/ /'
    } >"$stage/DEBIAN/control"
    chmod 0644 "$stage/DEBIAN/control"
}

mkdir -p "$OUT"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

for arch in "${AGENT_A[@]}"; do
    bin="$(bindir "$arch")/ferry-agent"
    [ -x "$bin" ] || die "missing $bin (build it, or drop $arch from FERRY_PKG_AGENT_ARCHES)"
    stage="$WORK/ferry-agent-$arch"
    stage_common "$stage" ferry-agent
    install -m 0755 "$bin" "$stage/usr/bin/ferry-agent"
    install -m 0644 packaging/agent/keys-README "$stage/etc/ferry/keys/README"
    # /etc/ferry/agent.toml: examples/agent.toml (kept parseable by a unit test), unconfigured:
    # without a device_id the agent exits 78 and says so, until the admin sets one.
    {
        echo "# /etc/ferry/agent.toml — installed by the ferry-agent package, NOT CONFIGURED YET."
        echo "# Set device_id (and [mqtt], [trust] as needed), put the public keys in /etc/ferry/keys/"
        echo "# (see its README), then: ferry-agent check-config && systemctl restart ferry-agent"
        echo "#"
        sed -e '1s|^# /etc/ferry/agent.toml — |# |' \
            -e 's|^device_id = "dev-001" *# *|# device_id = "dev-001"   # REQUIRED; |' examples/agent.toml
    } >"$stage/etc/ferry/agent.toml"
    grep -q '^# device_id = "dev-001"   # REQUIRED;' "$stage/etc/ferry/agent.toml" \
        || die "examples/agent.toml changed: its device_id line was not commented out"
    chmod 0640 "$stage/etc/ferry/agent.toml"
    echo /etc/ferry/agent.toml >"$stage/DEBIAN/conffiles"
    echo /etc/ferry/keys/README >>"$stage/DEBIAN/conffiles"
    chmod 0644 "$stage/DEBIAN/conffiles"
    control "$stage" ferry-agent "$arch" \
        "libc6 (>= $(glibc_min "$bin")), docker.io | docker-ce, init-system-helpers (>= 1.52)" \
        "" \
        "Ferry device agent: signed, transactional container updates" \
        "Ferry keeps the Docker containers of a box at the release its controller
asks for. It installs only what an offline release key and the online
controller key both signed, pulls each image for the box's platform by
digest, swaps containers behind a health gate and rolls back by itself
when the new release is unhealthy.

Installed enabled but not started: configure /etc/ferry/agent.toml and put the
public keys in /etc/ferry/keys/, then start ferry-agent.service."
    finish_deb "$stage" ferry-agent "$arch"
done

for arch in "${CONTROLLER_A[@]}"; do
    bin="$(bindir "$arch")/ferryctl"
    [ -x "$bin" ] || die "missing $bin (build it, or drop $arch from FERRY_PKG_CONTROLLER_ARCHES)"
    stage="$WORK/ferry-controller-$arch"
    stage_common "$stage" ferry-controller
    install -m 0755 "$bin" "$stage/usr/bin/ferryctl"
    # The hardened broker configuration (README "A hardened broker"): an example for
    # /etc/mosquitto, not installed there (mosquitto's configuration is the operator's).
    install -d -m 0755 "$stage/usr/share/doc/ferry-controller/examples/mosquitto"
    install -m 0644 examples/mosquitto/ferry.conf examples/mosquitto/ferry.acl \
        "$stage/usr/share/doc/ferry-controller/examples/mosquitto/"
    # /etc/ferry/controller.toml: examples/controller.toml (documented, parsed by a unit test in
    # controller/src/server/config.rs) under a header saying what to do before the first start.
    # 0640 here; postinst makes it root:ferry-controller with dpkg-statoverride (the archive only
    # knows root:root, the group is created by postinst).
    grep -qx 'data_dir = "/var/lib/ferry-controller"' examples/controller.toml \
        || die "examples/controller.toml: data_dir is not /var/lib/ferry-controller (the unit's StateDirectory=)"
    {
        echo "# /etc/ferry/controller.toml — installed by the ferry-controller package, NOT CONFIGURED YET."
        echo "# Unknown keys are errors. Before the first start, as root:"
        echo "#   ferryctl keygen --out /etc/ferry/keys --name controller   # signs desired states; boxes trust its .pub"
        echo "#   cp release.pub /etc/ferry/keys/release.pub                # the offline release role's PUBLIC key"
        echo "#   head -c 24 /dev/urandom | base64 > /etc/ferry/api-token"
        echo "#   chgrp ferry-controller /etc/ferry/keys/controller.key /etc/ferry/api-token"
        echo "#   chmod 0640 /etc/ferry/keys/controller.key /etc/ferry/api-token"
        echo "#   ferryctl serve --check     # exits 78 with the reason until it is right"
        echo "#   systemctl start ferry-controller"
        echo "# The database in data_dir holds the notice sequence counters: purge keeps it."
        echo "#"
        cat examples/controller.toml
    } >"$stage/etc/ferry/controller.toml"
    chmod 0640 "$stage/etc/ferry/controller.toml"
    echo /etc/ferry/controller.toml >"$stage/DEBIAN/conffiles"
    chmod 0644 "$stage/DEBIAN/conffiles"
    control "$stage" ferry-controller "$arch" \
        "libc6 (>= $(glibc_min "$bin")), passwd, init-system-helpers (>= 1.52)" \
        "Recommends: mosquitto" \
        "Ferry controller and operator CLI (ferryctl)" \
        "ferryctl signs releases and desired-state notices for fleets of boxes that run
the Ferry agent; 'ferryctl serve' (ferry-controller.service) runs rollouts in
waves, keeps its state in SQLite and talks to the boxes over MQTT.

Installed enabled but not started: create the controller key and API token as
described in /etc/ferry/controller.toml, then start ferry-controller.service."
    finish_deb "$stage" ferry-controller "$arch"
done
