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
# Then the same for the download-test image REGISTRY/ferry/bulk, versions $BULK_VERSIONS
# (default "1.0.0 2.0.0"; empty builds none), printed as `bulk V linux/arm64 sha256:...` etc.
# after the sensor lines. A bulk image is the sensor app of version V (images/bulk/Dockerfile:
# the same busybox, sensor binary, ENV, HEALTHCHECK and CMD) plus a 6 MiB incompressible data
# layer, identical in every version, below the sensor binary, and a 512 KiB layer of V's own on
# top: an update from one version to another needs only the top layer and the config. Checked
# against the registry on every run (each platform's versions share every layer but the top one,
# the data layer is >= 6 MiB compressed, the configs run what the sensor images run).
#
# Idempotent: a version is skipped when the registry already serves the index tag AND the stamp
# file says it was built from the same sources (hash of images/sensor/** and this script; for
# bulk also images/bulk/**). Stamps: $FERRY_IMAGE_STAMP_DIR (default
# /var/lib/ferry-test/image-stamps)/REGISTRY/{sensor,bulk}-V. The bulk versions are rebuilt all
# together when one is stale, so that they share the docker build cache, hence their layers.
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
BULK_REPO="ferry/bulk"
BULK_VERSIONS="${BULK_VERSIONS-1.0.0 2.0.0}"
BULK_DATA_BYTES=$((6 * 1024 * 1024))
BULK_TOP_BYTES=$((512 * 1024))
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

bulk_source_hash() { # the sensor hash, plus the bulk Dockerfile
    (
        echo "$HASH"
        cd "$ROOT"
        find images/bulk -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
    ) | sha256sum | cut -d' ' -f1
}

# GET a manifest; prints the body, fails on non-2xx.
get_manifest() { # repo ref accept
    curl -fsS -m 20 -H "Accept: $3" "$SCHEME://$REGISTRY/v2/$1/manifests/$2"
}

# Digest of a manifest as the registry stores it (Docker-Content-Digest header).
manifest_digest() { # repo ref accept
    curl -fsS -m 20 -I -H "Accept: $3" "$SCHEME://$REGISTRY/v2/$1/manifests/$2" \
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

index_ok() { # repo version -> 0 when the registry serves a valid two-platform index for the tag
    get_manifest "$1" "$2" "$ACCEPT_INDEX" 2>/dev/null | index_platforms >/dev/null 2>&1
}

# Writes BYTES incompressible, deterministic bytes (SHA-256 of SEED and a counter) to FILE, with
# a fixed mode and mtime: the same file, hence the same layer, on every build.
gen_data() { # seed bytes file
    "$PY" - "$1" "$2" "$3" <<'EOF'
import hashlib, sys
seed, left, path = sys.argv[1].encode(), int(sys.argv[2]), sys.argv[3]
i = 0
with open(path, "wb") as f:
    while left > 0:
        block = b"".join(hashlib.sha256(seed + (i + k).to_bytes(8, "big")).digest() for k in range(2048))
        i += 2048
        f.write(block[:left])
        left -= min(left, len(block))
EOF
    chmod 0644 "$3"
    touch -d '2024-01-01 00:00:00 UTC' "$3"
}

# Builds REGISTRY/REPO:V-<suffix> for every platform from the context dir CTX_ROOT/PREFIX<suffix>,
# pushes them and the multi-arch index REPO:V, and stamps NAME-V with HASH.
build_push() { # name repo version prefix hash
    local name="$1" repo="$2" v="$3" prefix="$4" hash="$5"
    local refs=() spec plat suffix ref got index os arch variant t
    for spec in "${PLATFORMS[@]}"; do
        IFS='|' read -r plat _ _ suffix _ <<<"$spec"
        ref="$REGISTRY/$repo:$v-$suffix"
        log "docker build --platform $plat -t $ref"
        t=$SECONDS
        # (Output kept for errors only: the legacy builder also prints a deprecation notice.)
        docker build --platform "$plat" --build-arg "SENSOR_VERSION=$v" \
            --label "io.ferry.source-hash=$hash" -t "$ref" "$CTX_ROOT/$prefix$suffix" \
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

    index="$REGISTRY/$repo:$v"
    log "docker manifest create/push $index"
    # A stale local manifest list would make "create" fail ("refusing to amend").
    docker manifest rm "$index" >/dev/null 2>&1 || true
    docker manifest create --insecure "$index" "${refs[@]}" >/dev/null \
        || die "docker manifest create $index failed"
    for spec in "${PLATFORMS[@]}"; do
        IFS='|' read -r plat _ _ suffix _ <<<"$spec"
        IFS=/ read -r os arch variant <<<"$plat"
        docker manifest annotate --os "$os" --arch "$arch" ${variant:+--variant "$variant"} \
            "$index" "$REGISTRY/$repo:$v-$suffix" \
            || die "docker manifest annotate $index $plat failed"
    done
    docker manifest push --insecure --purge "$index" >/dev/null \
        || die "docker manifest push $index failed"

    get_manifest "$repo" "$v" "$ACCEPT_INDEX" | index_platforms >/dev/null \
        || die "registry does not serve a two-platform index for $index"
    echo "$hash" >"$STAMP_DIR/$name-$v"
    log "$name:$v pushed"
}

# Checks the bulk images the registry serves (see the header); logs a summary per platform.
check_bulk() { # versions...
    "$PY" - "$SCHEME://$REGISTRY" "$BULK_REPO" "$REPO" "$BULK_DATA_BYTES" "$@" <<'EOF'
import json, sys, urllib.error, urllib.request
base, repo, sensor_repo, data_min, versions = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5:]
INDEX = "application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.index.v1+json"
IMAGE = "application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json"
def get(path, accept=None):
    req = urllib.request.Request(base + path, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(req, timeout=20) as r:
        return r.read()
def platforms(r, tag):
    idx = json.loads(get("/v2/%s/manifests/%s" % (r, tag), INDEX))
    out = {}
    for d in idx["manifests"]:
        p = d.get("platform", {})
        name = "/".join(x for x in (p.get("os"), p.get("architecture"), p.get("variant")) if x)
        out[name] = json.loads(get("/v2/%s/manifests/%s" % (r, d["digest"]), IMAGE))
    return out
def runs(r, m):
    c = json.loads(get("/v2/%s/blobs/%s" % (r, m["config"]["digest"])))["config"]
    return {k: c.get(k) for k in ("Env", "Cmd", "Entrypoint", "Healthcheck", "ExposedPorts", "User", "WorkingDir")}
def short(d):
    return d[7:19]
versions = list(dict.fromkeys(versions))
errors = []
bulk = {v: platforms(repo, v) for v in versions}
for plat in sorted(set().union(*(bulk[v].keys() for v in versions))):
    ms = {}
    for v in versions:
        m = bulk[v].get(plat)
        if m is None:
            errors.append("bulk %s has no %s image" % (v, plat))
            continue
        layers = m["layers"]
        if len(layers) != 5:
            errors.append("bulk %s %s: %d layers, expected 5 (busybox, symlinks, data, sensor, top)"
                          % (v, plat, len(layers)))
            continue
        ms[v] = m
        if layers[2]["size"] < data_min:
            errors.append("bulk %s %s: data layer %s is %d bytes compressed, expected >= %d"
                          % (v, plat, layers[2]["digest"], layers[2]["size"], data_min))
        try:
            sensor = platforms(sensor_repo, v).get(plat)
        except urllib.error.HTTPError:
            sensor = None  # no sensor image of that version to compare with
        if sensor is not None and runs(repo, m) != runs(sensor_repo, sensor):
            errors.append("bulk %s %s does not run what sensor %s %s runs:\n  %s\n  %s"
                          % (v, plat, v, plat, runs(repo, m), runs(sensor_repo, sensor)))
    if len(ms) != len(versions):
        continue
    first = ms[versions[0]]["layers"]
    for v in versions[1:]:
        other = ms[v]["layers"]
        if [l["digest"] for l in other[:-1]] != [l["digest"] for l in first[:-1]]:
            errors.append("bulk %s and %s (%s) do not share their lower layers:\n  %s\n  %s"
                          % (versions[0], v, plat, [short(l["digest"]) for l in first],
                             [short(l["digest"]) for l in other]))
    tops = [ms[v]["layers"][-1]["digest"] for v in versions]
    if len(set(tops)) != len(tops):
        errors.append("bulk %s: versions share a top layer: %s" % (plat, tops))
    print("build.sh: bulk %s: lower layers %s bytes (data %s, %d bytes) shared by %s; top layer %s"
          % (plat, " + ".join(str(l["size"]) for l in first[:-1]), short(first[2]["digest"]),
             first[2]["size"], " ".join(versions),
             ", ".join("%s %s %d bytes" % (v, short(ms[v]["layers"][-1]["digest"]), ms[v]["layers"][-1]["size"])
                       for v in versions)), file=sys.stderr)
if errors:
    sys.exit("build.sh: ERROR: bulk images:\n" + "\n".join(errors))
EOF
}

# ------------------------------------------------------------------ what to build
HASH="$(source_hash)"
mkdir -p "$STAMP_DIR"
todo=()
for v in $VERSIONS; do
    if [ "${FORCE:-0}" = 1 ]; then
        todo+=("$v")
    elif [ "$(cat "$STAMP_DIR/sensor-$v" 2>/dev/null || true)" = "$HASH" ] && index_ok "$REPO" "$v"; then
        log "sensor:$v up to date in $REGISTRY (sources ${HASH:0:12})"
    else
        todo+=("$v")
    fi
done
BULK_HASH="$(bulk_source_hash)"
bulk_todo=()
for v in $BULK_VERSIONS; do
    if [ "${FORCE:-0}" != 1 ] && [ "$(cat "$STAMP_DIR/bulk-$v" 2>/dev/null || true)" = "$BULK_HASH" ] \
        && index_ok "$BULK_REPO" "$v"; then
        log "bulk:$v up to date in $REGISTRY (sources ${BULK_HASH:0:12})"
    else
        # All of them: versions built in one run share the build cache, hence their layers.
        read -r -a bulk_todo <<<"$BULK_VERSIONS"
    fi
done

if [ "${#todo[@]}" -gt 0 ] || [ "${#bulk_todo[@]}" -gt 0 ]; then
    [ "${#todo[@]}" -eq 0 ] || log "building sensor ${todo[*]} for $REGISTRY (sources ${HASH:0:12})"
    [ "${#bulk_todo[@]}" -eq 0 ] \
        || log "building bulk ${bulk_todo[*]} for $REGISTRY (sources ${BULK_HASH:0:12})"

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
        build_push sensor "$REPO" "$v" "" "$HASH"
    done

    if [ "${#bulk_todo[@]}" -gt 0 ]; then
        t=$SECONDS
        gen_data "ferry-bulk-data" "$BULK_DATA_BYTES" "$CTX_ROOT/ferry-bulk.data"
        for spec in "${PLATFORMS[@]}"; do
            IFS='|' read -r _ _ _ suffix _ <<<"$spec"
            ctx="$CTX_ROOT/bulk-$suffix"
            mkdir -p "$ctx"
            cp -p "$CTX_ROOT/$suffix/busybox" "$CTX_ROOT/$suffix/sensor" "$CTX_ROOT/ferry-bulk.data" "$ctx/"
            cp "$HERE/bulk/Dockerfile" "$ctx/Dockerfile"
        done
        for v in "${bulk_todo[@]}"; do
            gen_data "ferry-bulk-top-$v" "$BULK_TOP_BYTES" "$CTX_ROOT/ferry-bulk-top.data"
            for spec in "${PLATFORMS[@]}"; do
                IFS='|' read -r _ _ _ suffix _ <<<"$spec"
                cp -p "$CTX_ROOT/ferry-bulk-top.data" "$CTX_ROOT/bulk-$suffix/"
            done
            build_push bulk "$BULK_REPO" "$v" "bulk-" "$BULK_HASH"
        done
        log "bulk ${bulk_todo[*]} built and pushed in $((SECONDS - t))s"
    fi
fi
# shellcheck disable=SC2086 # a list of versions
[ -z "$BULK_VERSIONS" ] || check_bulk $BULK_VERSIONS || die "the bulk images are not as they should be"

# ------------------------------------------------------------------ smoke test (VERIFY=1)
verify_one() { # repo version platform
    local repo="$1" v="$2" plat="$3" dir name port out digest rc=0
    # Run the pushed per-platform manifest (by digest, as listed in the index), not a local tag.
    digest="$(get_manifest "$repo" "$v" "$ACCEPT_INDEX" | index_platforms | awk -v p="$plat" '$1==p {print $2}')"
    [ -n "$digest" ] || { log "no $plat entry in index $v"; return 1; }
    dir="$(mktemp -d /tmp/ferry-verify.XXXXXX)"
    echo 23250 >"$dir/temp1_input"
    echo 41500 >"$dir/humidity1_input"
    port="$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
    name="ferry-verify-${repo#ferry/}-$$-${plat//\//-}-$v"
    docker run -d --rm --name "$name" --platform "$plat" --network host -e "PORT=$port" \
        -v "$dir:/sensors:ro" "$REGISTRY/$repo@$digest" >/dev/null
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
    out="$repo $plat $v: /healthz=$health docker-health=$status / => $body (docker stop took $(((t1 - t0) / 1000000)) ms)"
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
            verify_one "$REPO" "$v" "$plat" || die "verification of $v on $plat failed"
        done
    done
    for v in $BULK_VERSIONS; do
        for spec in "${PLATFORMS[@]}"; do
            IFS='|' read -r plat _ _ _ _ <<<"$spec"
            verify_one "$BULK_REPO" "$v" "$plat" || die "verification of bulk $v on $plat failed"
        done
    done
fi

# ------------------------------------------------------------------ report
report() { # name repo versions...
    local name="$1" repo="$2" v idx plat digest
    shift 2
    for v in "$@"; do
        idx="$(get_manifest "$repo" "$v" "$ACCEPT_INDEX")" || die "cannot read index $REGISTRY/$repo:$v"
        while read -r plat digest; do
            echo "$name $v $plat $digest"
        done < <(index_platforms <<<"$idx")
        echo "$name $v index $(manifest_digest "$repo" "$v" "$ACCEPT_INDEX")"
    done
}
# shellcheck disable=SC2086 # lists of versions
report sensor "$REPO" $VERSIONS
# shellcheck disable=SC2086
report bulk "$BULK_REPO" $BULK_VERSIONS
log "done in $((SECONDS - T0))s"
