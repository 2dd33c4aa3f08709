#!/usr/bin/env bash
# Build and push the Ferry sample images (multi-arch: linux/arm64 + linux/arm/v7).
#
#   images/build.sh REGISTRY            e.g. images/build.sh 127.0.0.1:5055
#
# For each version V in $SENSOR_VERSIONS (default "1.0.0 2.0.0 3.0.0") it pushes
#   REGISTRY/ferry/sensor:V-arm64, REGISTRY/ferry/sensor:V-armv7   (per-platform images)
#   REGISTRY/ferry/sensor:V                                        (multi-arch index)
# and finally prints one parseable line per image:
#   sensor V linux/arm64 sha256:...
#   sensor V linux/arm/v7 sha256:...
#   sensor V index sha256:...
# (on stdout; progress goes to stderr).
#
# Idempotent: a version is skipped when the registry already serves the index tag AND the stamp
# file says it was built from the same sources (hash of images/sensor/** and this script).
# Stamps: $FERRY_IMAGE_STAMP_DIR (default /var/lib/ferry-test/image-stamps)/REGISTRY/sensor-V.
# FORCE=1 rebuilds everything. VERIFY=1 additionally runs every version's arm64 and armv7 image
# under qemu and checks its HTTP answers.
#
# Needs: scripts/env-up.sh (run automatically when docker or the busybox cache is missing).
# The registry is spoken to over plain HTTP (REGISTRY_SCHEME=https to change).
set -euo pipefail

usage() { echo "usage: $0 REGISTRY   (e.g. $0 127.0.0.1:5055)" >&2; exit 2; }
if [ $# -ne 1 ] || [ -z "$1" ]; then usage; fi
REGISTRY="${1%/}"

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
REPO="ferry/sensor"
VERSIONS="${SENSOR_VERSIONS:-1.0.0 2.0.0 3.0.0}"
SCHEME="${REGISTRY_SCHEME:-http}"
BUSYBOX_CACHE="${FERRY_BUSYBOX_CACHE:-/var/cache/ferry/busybox}"
export CARGO_TARGET_DIR="${FERRY_IMAGES_TARGET_DIR:-$ROOT/target/images}"
# Stamps live outside the checkout so a fresh clone (CI) on the same machine can reuse the images
# it would build identically; the content hash covers the sources, the registry check covers the
# registry's storage having been wiped.
STAMP_ROOT="${FERRY_IMAGE_STAMP_DIR:-/var/lib/ferry-test/image-stamps}"
STAMP_DIR="$STAMP_ROOT/$(printf '%s' "$REGISTRY" | tr -c 'A-Za-z0-9._-' '_')"
# The legacy builder: dockerd 20.10 + a client without buildx. It honours --platform and runs the
# RUN step under qemu-user via binfmt.
export DOCKER_BUILDKIT=0
ACCEPT_INDEX='application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.index.v1+json'

# platform | rust target | busybox deb arch | tag suffix | readelf
PLATFORMS=(
    "linux/arm64|aarch64-unknown-linux-gnu|arm64|arm64|aarch64-linux-gnu-readelf"
    "linux/arm/v7|armv7-unknown-linux-gnueabihf|armhf|armv7|arm-linux-gnueabihf-readelf"
)

log() { printf 'build.sh: %s\n' "$*" >&2; }
die() { printf 'build.sh: ERROR: %s\n' "$*" >&2; exit 1; }
PY="$(command -v python3 || echo /usr/bin/python3)"
T0=$SECONDS

# One build at a time per machine: builds share the docker daemon's tags and local manifest lists.
exec 9>"${TMPDIR:-/tmp}/ferry-images-build.lock"
flock -w 900 9 || die "another images/build.sh has held the build lock for 900s"

# ------------------------------------------------------------------ prerequisites
if ! docker info >/dev/null 2>&1 || [ ! -x "$BUSYBOX_CACHE/arm64/bin/busybox" ] \
    || [ ! -x "$BUSYBOX_CACHE/armhf/bin/busybox" ] || [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] \
    || [ ! -e /proc/sys/fs/binfmt_misc/qemu-arm ]; then
    log "environment incomplete; running scripts/env-up.sh"
    "$ROOT/scripts/env-up.sh"
fi
curl -fsS -m 5 -o /dev/null "$SCHEME://$REGISTRY/v2/" \
    || die "registry $SCHEME://$REGISTRY/v2/ does not answer (for 127.0.0.1:5055 run scripts/env-up.sh)"

# ------------------------------------------------------------------ helpers
source_hash() {
    # Everything that goes into the images: the sensor package (minus build output) and this
    # script. Paths are relative so the hash does not depend on where the repo is checked out.
    (
        cd "$ROOT"
        find images/sensor -type f ! -path '*/target/*' -print0 | LC_ALL=C sort -z \
            | xargs -0 sha256sum
        sha256sum images/build.sh
    ) | sha256sum | cut -d' ' -f1
}

# GET a manifest; prints the body, fails on non-2xx.
get_manifest() { # ref accept
    curl -fsS -m 20 -H "Accept: $2" "$SCHEME://$REGISTRY/v2/$REPO/manifests/$1"
}

# Digest of a manifest as the registry stores it (Docker-Content-Digest header).
manifest_digest() { # ref accept
    curl -fsS -m 20 -I -H "Accept: $2" "$SCHEME://$REGISTRY/v2/$REPO/manifests/$1" \
        | tr -d '\r' | awk 'tolower($1)=="docker-content-digest:" {print $2}'
}

# Reads an index on stdin; prints "os/arch[/variant] digest" per entry; fails unless it is an
# index listing linux/arm64 and linux/arm/v7.
index_platforms() {
    "$PY" -c '
import json, sys
m = json.load(sys.stdin)
mt = m.get("mediaType", "")
if mt not in ("application/vnd.docker.distribution.manifest.list.v2+json",
              "application/vnd.oci.image.index.v1+json") and "manifests" not in m:
    sys.exit("not an index: mediaType=%r" % mt)
seen = set()
for d in m.get("manifests", []):
    p = d.get("platform", {})
    name = "/".join(x for x in (p.get("os"), p.get("architecture"), p.get("variant")) if x)
    seen.add(name)
    print(name, d["digest"])
missing = {"linux/arm64", "linux/arm/v7"} - seen
if missing:
    sys.exit("index lacks platform(s): %s" % ", ".join(sorted(missing)))
'
}

index_ok() { # version -> 0 when the registry serves a valid two-platform index for the tag
    get_manifest "$1" "$ACCEPT_INDEX" 2>/dev/null | index_platforms >/dev/null 2>&1
}

# ------------------------------------------------------------------ what to build
HASH="$(source_hash)"
mkdir -p "$STAMP_DIR"
todo=()
for v in $VERSIONS; do
    if [ "${FORCE:-0}" = 1 ]; then
        todo+=("$v")
    elif [ "$(cat "$STAMP_DIR/sensor-$v" 2>/dev/null || true)" = "$HASH" ] && index_ok "$v"; then
        log "sensor:$v up to date in $REGISTRY (sources ${HASH:0:12})"
    else
        todo+=("$v")
    fi
done

if [ "${#todo[@]}" -gt 0 ]; then
    log "building sensor ${todo[*]} for $REGISTRY (sources ${HASH:0:12})"

    # -------------------------------------------------------------- cross-compile
    for spec in "${PLATFORMS[@]}"; do
        IFS='|' read -r plat target _ _ readelf <<<"$spec"
        log "cargo build --release --target $target (static)"
        t=$SECONDS
        # RUSTFLAGS applies to the target only (build scripts stay host-native) because --target
        # is given; it replaces any [target] rustflags, which .cargo/config.toml does not set.
        (cd "$ROOT" && RUSTFLAGS="-C target-feature=+crt-static" \
            cargo build --quiet --release -p ferry-sample-sensor --bin sensor --target "$target") \
            || die "cross build for $target failed"
        bin="$CARGO_TARGET_DIR/$target/release/sensor"
        [ -x "$bin" ] || die "missing $bin"
        if command -v "$readelf" >/dev/null 2>&1 && "$readelf" -lW "$bin" | grep -q 'program interpreter'; then
            die "$bin is dynamically linked (crt-static not applied?)"
        fi
        log "  $plat: $(du -h "$bin" | cut -f1) static binary in $((SECONDS - t))s"
    done

    # -------------------------------------------------------------- images
    CTX_ROOT="$(mktemp -d /tmp/ferry-images.XXXXXX)"
    trap 'rm -rf "$CTX_ROOT"' EXIT
    for spec in "${PLATFORMS[@]}"; do
        IFS='|' read -r plat target bbarch suffix _ <<<"$spec"
        ctx="$CTX_ROOT/$suffix"
        mkdir -p "$ctx"
        cp "$BUSYBOX_CACHE/$bbarch/bin/busybox" "$ctx/busybox"
        cp "$CARGO_TARGET_DIR/$target/release/sensor" "$ctx/sensor"
        cp "$HERE/sensor/Dockerfile" "$ctx/Dockerfile"
    done

    for v in "${todo[@]}"; do
        refs=()
        for spec in "${PLATFORMS[@]}"; do
            IFS='|' read -r plat _ _ suffix _ <<<"$spec"
            ref="$REGISTRY/$REPO:$v-$suffix"
            log "docker build --platform $plat -t $ref"
            t=$SECONDS
            # (Output kept for errors only: the legacy builder also prints a deprecation notice.)
            docker build --platform "$plat" --build-arg "SENSOR_VERSION=$v" \
                --label "io.ferry.source-hash=$HASH" -t "$ref" "$CTX_ROOT/$suffix" \
                >"$CTX_ROOT/build.log" 2>&1 \
                || { cat "$CTX_ROOT/build.log" >&2; die "docker build $ref failed"; }
            # The legacy builder records the platform of FROM scratch images from --platform;
            # check it, since the index is assembled from these image configs.
            got="$(docker image inspect -f '{{.Os}}/{{.Architecture}}{{if .Variant}}/{{.Variant}}{{end}}' "$ref")"
            [ "$got" = "$plat" ] || log "  warning: $ref config says $got, expected $plat (index is annotated explicitly)"
            log "docker push $ref ($((SECONDS - t))s build)"
            docker push "$ref" >"$CTX_ROOT/push.log" 2>&1 \
                || { cat "$CTX_ROOT/push.log" >&2; die "docker push $ref failed"; }
            refs+=("$ref")
        done

        index="$REGISTRY/$REPO:$v"
        log "docker manifest create/push $index"
        # A stale local manifest list would make "create" fail ("refusing to amend").
        docker manifest rm "$index" >/dev/null 2>&1 || true
        docker manifest create --insecure "$index" "${refs[@]}" >/dev/null \
            || die "docker manifest create $index failed"
        for spec in "${PLATFORMS[@]}"; do
            IFS='|' read -r plat _ _ suffix _ <<<"$spec"
            IFS=/ read -r os arch variant <<<"$plat"
            docker manifest annotate --os "$os" --arch "$arch" ${variant:+--variant "$variant"} \
                "$index" "$REGISTRY/$REPO:$v-$suffix" \
                || die "docker manifest annotate $index $plat failed"
        done
        docker manifest push --insecure --purge "$index" >/dev/null \
            || die "docker manifest push $index failed"

        get_manifest "$v" "$ACCEPT_INDEX" | index_platforms >/dev/null \
            || die "registry does not serve a two-platform index for $index"
        echo "$HASH" >"$STAMP_DIR/sensor-$v"
        log "sensor:$v pushed"
    done
fi

# ------------------------------------------------------------------ smoke test (VERIFY=1)
verify_one() { # version platform
    local v="$1" plat="$2" dir name port out digest rc=0
    # Run the pushed per-platform manifest (by digest, as listed in the index), not a local tag.
    digest="$(get_manifest "$v" "$ACCEPT_INDEX" | index_platforms | awk -v p="$plat" '$1==p {print $2}')"
    [ -n "$digest" ] || { log "no $plat entry in index $v"; return 1; }
    dir="$(mktemp -d /tmp/ferry-verify.XXXXXX)"
    echo 23250 >"$dir/temp1_input"
    echo 41500 >"$dir/humidity1_input"
    port="$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
    name="ferry-verify-sensor-$$-${plat//\//-}-$v"
    docker run -d --rm --name "$name" --platform "$plat" --network host -e "PORT=$port" \
        -v "$dir:/sensors:ro" "$REGISTRY/$REPO@$digest" >/dev/null
    for _ in $(seq 1 100); do
        curl -s -m 1 -o /dev/null "http://127.0.0.1:$port/healthz" && break
        sleep 0.1
    done
    local health body
    health="$(curl -s -m 5 -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/healthz" || true)"
    body="$(curl -s -m 5 "http://127.0.0.1:$port/" || true)"
    case "$v" in
        1.*) [ "$health" = 200 ] && [ "$body" = "{\"app\":\"sensor\",\"version\":\"$v\",\"temperature_c\":23.25}" ] || rc=1 ;;
        2.*) [ "$health" = 200 ] && [ "$body" = "{\"app\":\"sensor\",\"version\":\"$v\",\"temperature_c\":23.25,\"humidity_pct\":41.5}" ] || rc=1 ;;
        3.*) [ "$health" = 503 ] || rc=1 ;;
    esac
    # The image's own HEALTHCHECK (busybox wget under qemu) must agree.
    local want_status=healthy status=""
    case "$v" in 3.*) want_status=unhealthy ;; esac
    for _ in $(seq 1 60); do
        status="$(docker inspect -f '{{.State.Health.Status}}' "$name" 2>/dev/null || true)"
        [ "$status" = "$want_status" ] && break
        sleep 0.5
    done
    [ "$status" = "$want_status" ] || rc=1
    local t0 t1
    t0=$(date +%s%N)
    docker stop -t 10 "$name" >/dev/null 2>&1 || true
    t1=$(date +%s%N)
    out="$plat $v: /healthz=$health docker-health=$status / => $body (docker stop took $(((t1 - t0) / 1000000)) ms)"
    rm -rf "$dir"
    if [ "$rc" -ne 0 ]; then
        log "VERIFY FAILED $out"
        return 1
    fi
    log "verified $out"
}
if [ "${VERIFY:-0}" = 1 ]; then
    for v in $VERSIONS; do
        for spec in "${PLATFORMS[@]}"; do
            IFS='|' read -r plat _ _ _ _ <<<"$spec"
            verify_one "$v" "$plat" || die "verification of $v on $plat failed"
        done
    done
fi

# ------------------------------------------------------------------ report
for v in $VERSIONS; do
    idx="$(get_manifest "$v" "$ACCEPT_INDEX")" || die "cannot read index $REGISTRY/$REPO:$v"
    while read -r plat digest; do
        echo "sensor $v $plat $digest"
    done < <(index_platforms <<<"$idx")
    echo "sensor $v index $(manifest_digest "$v" "$ACCEPT_INDEX")"
done
log "done in $((SECONDS - T0))s"
