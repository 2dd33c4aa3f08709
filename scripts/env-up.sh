#!/usr/bin/env bash
# Ferry test/demo environment bootstrap (Debian 12, run as root).
#
# Idempotent: on a fresh machine it installs and starts everything the test
# suite and the demo need; on a ready machine it only checks and returns in a
# few seconds. Safe without stdin (CI=true). It exports nothing.
#
# What it makes ready:
#   - Debian packages: docker.io, qemu-user-static, binfmt-support, docker-registry,
#     mosquitto(+clients), ARM cross gcc + libc, docker-compose, curl, and for the package
#     checks systemd (systemd-analyze), systemd-container (systemd-nspawn), binutils (readelf),
#     procps (pgrep), and chromium (the controller web page test, headless)
#   - busybox-static for arm64/armhf extracted under $FERRY_BUSYBOX_CACHE
#   - binfmt_misc entries for qemu-aarch64 and qemu-arm
#   - a running dockerd (log: /var/log/ferry-dockerd.log)
#   - rustup targets aarch64-unknown-linux-gnu, armv7-unknown-linux-gnueabihf, rustfmt, clippy
#   - a plain-HTTP registry on 127.0.0.1:5055 (storage /var/lib/ferry-test/registry,
#     log: /var/log/ferry-registry.log)
#   - a private PostgreSQL 15 server on 127.0.0.1:5544 for the controller's store tests (trust
#     auth on loopback but for role ferry_password_it, which must give its password; data
#     /var/lib/ferry-test/postgres, log /var/log/ferry-postgres.log):
#     postgres://postgres@127.0.0.1:5544/postgres (FERRY_POSTGRES_URL in the tests)
#
# Environment knobs (all optional):
#   FERRY_REGISTRY_ADDR   default 127.0.0.1:5055
#   FERRY_REGISTRY_ROOT   default /var/lib/ferry-test/registry
#   FERRY_BUSYBOX_CACHE   default /var/cache/ferry/busybox
#   FERRY_DOCKERD_TIMEOUT default 60 (seconds)
#   FERRY_POSTGRES_PORT   default 5544
set -euo pipefail

REGISTRY_ADDR="${FERRY_REGISTRY_ADDR:-127.0.0.1:5055}"
REGISTRY_ROOT="${FERRY_REGISTRY_ROOT:-/var/lib/ferry-test/registry}"
REGISTRY_CONFIG="$(dirname "$REGISTRY_ROOT")/registry-config.yml"
REGISTRY_LOG=/var/log/ferry-registry.log
BUSYBOX_CACHE="${FERRY_BUSYBOX_CACHE:-/var/cache/ferry/busybox}"
DOCKERD_LOG=/var/log/ferry-dockerd.log
DOCKERD_TIMEOUT="${FERRY_DOCKERD_TIMEOUT:-60}"
PG_PORT="${FERRY_POSTGRES_PORT:-5544}"
PG_DATA=/var/lib/ferry-test/postgres
PG_LOG=/var/log/ferry-postgres.log

export DEBIAN_FRONTEND=noninteractive
APT_OPTS=(-y -q -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)

log() { printf 'env-up: %s\n' "$*" >&2; }
die() { printf 'env-up: ERROR: %s\n' "$*" >&2; exit 1; }

if [ "$(id -u)" -ne 0 ]; then
    die "must run as root (apt-get, binfmt_misc, dockerd)"
fi

# One bootstrap at a time (parallel test runs would otherwise race to start dockerd/registry).
exec 9>/run/ferry-env-up.lock
if ! flock -w 300 9; then
    die "another env-up.sh has held /run/ferry-env-up.lock for 300s"
fi

# Make sure sbin dirs are on PATH (dockerd, iptables, runc live there).
case ":$PATH:" in *:/usr/sbin:*) ;; *) PATH="$PATH:/usr/sbin:/sbin" ;; esac

APT_UPDATED=0
apt_update_once() {
    if [ "$APT_UPDATED" -eq 0 ]; then
        # Mirrors are sometimes mid-sync ("File has unexpected size"): retry, and if some index
        # still fails carry on with what was fetched; a really missing package fails later,
        # clearly, at install/download time.
        local i
        for i in 1 2 3; do
            log "apt-get update${i:+ (try $i)}"
            if apt-get update -q </dev/null >/tmp/ferry-apt-update.log 2>&1 \
                && ! grep -q '^[WE]: Failed to fetch' /tmp/ferry-apt-update.log; then
                APT_UPDATED=1
                return 0
            fi
            grep -E '^(E|W):' /tmp/ferry-apt-update.log | head -n 3 >&2 || true
            sleep $((i * 3))
        done
        log "apt-get update incomplete after 3 tries; continuing with the lists it fetched"
        APT_UPDATED=1
    fi
}

# ---------------------------------------------------------------- packages
PKGS=(docker.io qemu-user-static binfmt-support docker-registry mosquitto mosquitto-clients
      gcc-aarch64-linux-gnu gcc-arm-linux-gnueabihf libc6-dev-arm64-cross libc6-dev-armhf-cross
      docker-compose curl systemd systemd-container binutils procps chromium postgresql)
missing=()
for p in "${PKGS[@]}"; do
    # dpkg -s succeeds for "deinstall ok config-files" too; insist on "install ok installed".
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$p")
    fi
done
if [ "${#missing[@]}" -gt 0 ]; then
    apt_update_once
    log "installing: ${missing[*]}"
    apt-get install "${APT_OPTS[@]}" --no-install-recommends "${missing[@]}" </dev/null >/dev/null \
        || die "apt-get install ${missing[*]} failed"
else
    log "packages present"
fi

# ------------------------------------------------ busybox-static for ARM images
bb_ok() { [ -x "$BUSYBOX_CACHE/$1/bin/busybox" ]; }
if bb_ok arm64 && bb_ok armhf; then
    log "busybox cache present ($BUSYBOX_CACHE)"
else
    foreign="$(dpkg --print-foreign-architectures)"
    added=0
    for a in arm64 armhf; do
        if ! grep -qx "$a" <<<"$foreign"; then
            log "dpkg --add-architecture $a"
            dpkg --add-architecture "$a"
            added=1
        fi
    done
    # After adding an architecture the package lists must be refreshed; also refresh if apt
    # simply does not know the package yet (fresh machine).
    if [ "$added" -eq 1 ] || ! apt-cache show busybox-static:arm64 >/dev/null 2>&1 \
        || ! apt-cache show busybox-static:armhf >/dev/null 2>&1; then
        APT_UPDATED=0
        apt_update_once
    fi
    tmp="$(mktemp -d)"
    chown _apt "$tmp" 2>/dev/null || true  # apt-get download runs as _apt when it can
    trap 'rm -rf "$tmp"' EXIT
    for a in arm64 armhf; do
        bb_ok "$a" && continue
        log "fetching busybox-static:$a"
        (cd "$tmp" && apt-get download -q "busybox-static:$a" </dev/null >/dev/null) \
            || die "apt-get download busybox-static:$a failed"
        debs=("$tmp"/busybox-static_*_"$a".deb)
        deb="${debs[0]}"
        [ -f "$deb" ] || die "apt-get download busybox-static:$a produced no .deb"
        rm -rf "$BUSYBOX_CACHE/$a.tmp"
        mkdir -p "$BUSYBOX_CACHE/$a.tmp"
        dpkg-deb -x "$deb" "$BUSYBOX_CACHE/$a.tmp"
        [ -x "$BUSYBOX_CACHE/$a.tmp/bin/busybox" ] || die "busybox-static:$a has no bin/busybox"
        rm -rf "${BUSYBOX_CACHE:?}/$a"
        mv "$BUSYBOX_CACHE/$a.tmp" "$BUSYBOX_CACHE/$a"
    done
    rm -rf "$tmp"
    trap - EXIT
    log "busybox cache ready ($BUSYBOX_CACHE/{arm64,armhf}/bin/busybox)"
fi

# ------------------------------------------------------------------ binfmt
BINFMT=/proc/sys/fs/binfmt_misc
if [ ! -e "$BINFMT/register" ]; then
    mount -t binfmt_misc binfmt_misc "$BINFMT" 2>/dev/null || true
fi
[ -e "$BINFMT/register" ] || die "binfmt_misc is not available (cannot mount $BINFMT)"
for q in qemu-aarch64 qemu-arm; do
    if [ ! -e "$BINFMT/$q" ]; then
        conf="/usr/lib/binfmt.d/$q.conf"
        [ -r "$conf" ] || die "missing $conf (qemu-user-static not installed?)"
        log "registering binfmt $q"
        # A concurrent registration (e.g. binfmt-support) can win the race: tolerate EEXIST.
        cat "$conf" >"$BINFMT/register" 2>/dev/null || [ -e "$BINFMT/$q" ] \
            || die "could not register binfmt $q"
    fi
    grep -q '^enabled' "$BINFMT/$q" || die "binfmt $q registered but not enabled"
done
log "binfmt qemu-aarch64/qemu-arm registered"

# ------------------------------------------------------------------ dockerd
if docker info >/dev/null 2>&1; then
    log "dockerd answers"
else
    # A stale pidfile from a killed daemon makes dockerd refuse to start.
    if [ -f /var/run/docker.pid ] && ! kill -0 "$(cat /var/run/docker.pid)" 2>/dev/null; then
        rm -f /var/run/docker.pid
    fi
    if [ -f /var/run/docker.pid ]; then
        log "dockerd already starting (pid $(cat /var/run/docker.pid)); waiting"
    else
        log "starting dockerd (log $DOCKERD_LOG)"
        setsid nohup dockerd >>"$DOCKERD_LOG" 2>&1 </dev/null 9>&- &
    fi
    deadline=$((SECONDS + DOCKERD_TIMEOUT))
    until docker info >/dev/null 2>&1; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            tail -n 30 "$DOCKERD_LOG" >&2 || true
            die "dockerd did not answer within ${DOCKERD_TIMEOUT}s (see $DOCKERD_LOG)"
        fi
        sleep 0.5
    done
    log "dockerd ready ($(docker version --format '{{.Server.Version}}' 2>/dev/null || echo '?'))"
fi

# ------------------------------------------------------------------ rust
if ! command -v rustup >/dev/null 2>&1; then
    for d in "${CARGO_HOME:-$HOME/.cargo}/bin" /usr/local/cargo/bin; do
        [ -x "$d/rustup" ] && PATH="$d:$PATH" && break
    done
fi
command -v rustup >/dev/null 2>&1 || die "rustup not found on PATH"
installed_targets="$(rustup target list --installed)"
want_targets=()
for t in aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf; do
    grep -qx "$t" <<<"$installed_targets" || want_targets+=("$t")
done
if [ "${#want_targets[@]}" -gt 0 ]; then
    log "rustup target add ${want_targets[*]}"
    rustup target add "${want_targets[@]}" </dev/null >&2
fi
installed_components="$(rustup component list --installed)"
want_components=()
for c in rustfmt clippy; do
    grep -q "^$c" <<<"$installed_components" || want_components+=("$c")
done
if [ "${#want_components[@]}" -gt 0 ]; then
    log "rustup component add ${want_components[*]}"
    rustup component add "${want_components[@]}" </dev/null >&2
fi
log "rust targets and components present"

# ------------------------------------------------------------------ registry
registry_up() { curl -fsS -m 2 -o /dev/null "http://$REGISTRY_ADDR/v2/" 2>/dev/null; }
if registry_up; then
    log "registry answers on $REGISTRY_ADDR"
else
    mkdir -p "$REGISTRY_ROOT"
    cat >"$REGISTRY_CONFIG" <<EOF
version: 0.1
log:
  level: info
  fields:
    service: ferry-test-registry
storage:
  filesystem:
    rootdirectory: $REGISTRY_ROOT
  delete:
    enabled: true
  cache:
    blobdescriptor: inmemory
http:
  addr: $REGISTRY_ADDR
  headers:
    X-Content-Type-Options: [nosniff]
EOF
    log "starting docker-registry on $REGISTRY_ADDR (log $REGISTRY_LOG)"
    setsid nohup docker-registry serve "$REGISTRY_CONFIG" >>"$REGISTRY_LOG" 2>&1 </dev/null 9>&- &
    deadline=$((SECONDS + 30))
    until registry_up; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            tail -n 30 "$REGISTRY_LOG" >&2 || true
            die "registry did not answer on http://$REGISTRY_ADDR/v2/ within 30s (see $REGISTRY_LOG)"
        fi
        sleep 0.3
    done
    log "registry ready on $REGISTRY_ADDR"
fi

# ------------------------------------------------------------------ PostgreSQL
# Not Debian's cluster (its service may not run without systemd): a server of our own.
PG_BIN="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
[ -n "$PG_BIN" ] || die "no PostgreSQL binaries under /usr/lib/postgresql (package postgresql)"
pg_up() { "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" 2>/dev/null; }
if pg_up; then
    log "PostgreSQL answers on 127.0.0.1:$PG_PORT"
else
    if [ ! -s "$PG_DATA/PG_VERSION" ]; then
        log "initdb $PG_DATA"
        mkdir -p "$PG_DATA"
        chown postgres:postgres "$PG_DATA"
        chmod 0700 "$PG_DATA"
        su postgres -s /bin/sh -c "'$PG_BIN/initdb' -D '$PG_DATA' -A trust -E UTF8 --no-instructions" \
            >/tmp/ferry-initdb.log 2>&1 || { cat /tmp/ferry-initdb.log >&2; die "initdb failed"; }
    fi
    touch "$PG_LOG"
    chown postgres "$PG_LOG"
    log "starting PostgreSQL on 127.0.0.1:$PG_PORT (log $PG_LOG)"
    # fsync stays on: the store's durability is part of what the tests check.
    su postgres -s /bin/sh -c "'$PG_BIN/pg_ctl' -D '$PG_DATA' -l '$PG_LOG' -w -t 60 \
        -o \"-p $PG_PORT -k /tmp -c listen_addresses=127.0.0.1 -c max_connections=200\" start" \
        </dev/null >/dev/null 9>&- || { tail -n 30 "$PG_LOG" >&2; die "PostgreSQL did not start"; }
    pg_up || die "PostgreSQL is not answering on 127.0.0.1:$PG_PORT (see $PG_LOG)"
    log "PostgreSQL ready on 127.0.0.1:$PG_PORT"
fi
# One role must give its password (tests/controller_serve.rs, [store] password_file); every other
# connection on loopback is trusted.
if ! grep -q '^host all ferry_password_it ' "$PG_DATA/pg_hba.conf"; then
    sed -i '1i host all ferry_password_it 127.0.0.1/32 scram-sha-256' "$PG_DATA/pg_hba.conf"
    su postgres -s /bin/sh -c "'$PG_BIN/pg_ctl' -D '$PG_DATA' reload" </dev/null >/dev/null 9>&- \
        || die "PostgreSQL did not reload pg_hba.conf"
    log "PostgreSQL: role ferry_password_it needs its password"
fi

log "environment ready"
