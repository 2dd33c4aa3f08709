#!/usr/bin/env bash
# Checks the Debian packages that scripts/package.sh built (default dir: target/debian):
#   1. each .deb: control fields, file list with modes and owners, conffiles, md5sums, the
#      binary's ELF architecture, maintainer scripts (sh -n, shellcheck when present), and the
#      binary runs (`--version`; ARM ones under qemu-user)
#   2. both units: `systemd-analyze verify` with no complaint at all, and
#      `systemd-analyze security` exposure at most FERRY_MAX_EXPOSURE (default 2.0)
#   3. the amd64 packages really install, with the machine's own dpkg, into a throw-away copy of
#      this machine (a private mount namespace with an overlay over /; nothing outside changes):
#      dpkg -i, the unit enabled and not started, the unconfigured agent exits 78 naming
#      device_id, the installed units verify, a configured agent passes check-config, the
#      config survives a reinstall, remove keeps it, purge removes it; controller.toml is
#      root:ferry-controller 0640, `ferryctl serve --check` exits 78 until the key and token
#      exist, then passes as the service's user, and with every commented key uncommented.
# Needs root (mount namespace, overlayfs, chroot). Usage: test-packages.sh [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."

DIR="${1:-${CARGO_TARGET_DIR:-$PWD/target}/debian}"
MAX_EXPOSURE="${FERRY_MAX_EXPOSURE:-2.0}"
VERSION="$(sed -n '/^\[workspace\.package\]/,/^\[/ s/^version *= *"\(.*\)"/\1/p' Cargo.toml)"
FAILS=0

ok() { printf '  ok   %s\n' "$*"; }
bad() { printf '  FAIL %s\n' "$*" >&2; FAILS=$((FAILS + 1)); }
check() { # check DESCRIPTION COMMAND...
    local what="$1"; shift
    if "$@"; then ok "$what"; else bad "$what"; fi
}
field() { dpkg-deb -f "$1" "$2"; }

# --------------------------------------------------------------- 1. package contents
elf_machine() { LC_ALL=C readelf -h "$1" | sed -n 's/^ *Machine: *//p'; }
want_machine() {
    case "$1" in
    amd64) echo "Advanced Micro Devices X86-64" ;;
    arm64) echo "AArch64" ;;
    armhf) echo "ARM" ;;
    esac
}
qemu_prefix() {
    case "$1" in
    arm64) echo /usr/aarch64-linux-gnu ;;
    armhf) echo /usr/arm-linux-gnueabihf ;;
    esac
}

# The exact file list: "mode owner/group path", as dpkg-deb -c prints it.
expected_files() {
    local pkg="$1"
    printf '%s\n' \
        "drwxr-xr-x root/root ./" \
        "drwxr-xr-x root/root ./etc/" \
        "drwxr-xr-x root/root ./etc/ferry/" \
        "drwxr-xr-x root/root ./etc/ferry/keys/" \
        "drwxr-xr-x root/root ./lib/" \
        "drwxr-xr-x root/root ./lib/systemd/" \
        "drwxr-xr-x root/root ./lib/systemd/system/" \
        "-rw-r--r-- root/root ./lib/systemd/system/$pkg.service" \
        "drwxr-xr-x root/root ./usr/" \
        "drwxr-xr-x root/root ./usr/bin/" \
        "drwxr-xr-x root/root ./usr/share/" \
        "drwxr-xr-x root/root ./usr/share/doc/" \
        "drwxr-xr-x root/root ./usr/share/doc/$pkg/" \
        "-rw-r--r-- root/root ./usr/share/doc/$pkg/README.md" \
        "-rw-r--r-- root/root ./usr/share/doc/$pkg/copyright"
    if [ "$pkg" = ferry-agent ]; then
        printf '%s\n' \
            "-rw-r----- root/root ./etc/ferry/agent.toml" \
            "-rw-r--r-- root/root ./etc/ferry/keys/README" \
            "-rwxr-xr-x root/root ./usr/bin/ferry-agent"
    else
        printf '%s\n' \
            "-rw-r----- root/root ./etc/ferry/controller.toml" \
            "-rwxr-xr-x root/root ./usr/bin/ferryctl" \
            "drwxr-xr-x root/root ./usr/share/doc/$pkg/examples/" \
            "drwxr-xr-x root/root ./usr/share/doc/$pkg/examples/mosquitto/" \
            "-rw-r--r-- root/root ./usr/share/doc/$pkg/examples/mosquitto/ferry.acl" \
            "-rw-r--r-- root/root ./usr/share/doc/$pkg/examples/mosquitto/ferry.conf"
    fi
}

check_deb() {
    local deb="$1" pkg arch bin tmp
    pkg="$(field "$deb" Package)"
    arch="$(field "$deb" Architecture)"
    echo "== $(basename "$deb") ($(stat -c %s "$deb") bytes)"
    check "file name matches Package/Version/Architecture" \
        test "$(basename "$deb")" = "${pkg}_${VERSION}_${arch}.deb"
    local f
    for f in Maintainer Description Section Priority Installed-Size Depends; do
        check "control has $f" test -n "$(field "$deb" "$f")"
    done
    check "Installed-Size is a number of KiB" grep -qE '^[0-9]+$' <<<"$(field "$deb" Installed-Size)"
    check "Depends on libc6 (>= ...)" grep -qE 'libc6 \(>= 2\.[0-9]+\)' <<<"$(field "$deb" Depends)"
    if [ "$pkg" = ferry-agent ]; then
        bin=usr/bin/ferry-agent
        check "Depends on docker.io | docker-ce" grep -q 'docker.io | docker-ce' <<<"$(field "$deb" Depends)"
        check "conffiles: agent.toml and keys/README" \
            test "$(dpkg-deb -I "$deb" conffiles)" = "$(printf '/etc/ferry/agent.toml\n/etc/ferry/keys/README')"
    else
        bin=usr/bin/ferryctl
        check "conffiles: controller.toml" test "$(dpkg-deb -I "$deb" conffiles)" = /etc/ferry/controller.toml
    fi
    local got want
    got="$(dpkg-deb -c "$deb" | awk '{ print $1, $2, $6 }' | sort)"
    want="$(expected_files "$pkg" | sort)"
    if [ "$got" = "$want" ]; then
        ok "files, modes and owners"
    else
        bad "files, modes and owners:"
        diff <(echo "$want") <(echo "$got") >&2 || true
    fi

    tmp="$(mktemp -d)"
    dpkg-deb -R "$deb" "$tmp/x"
    if [ "$pkg" = ferry-controller ]; then
        check "controller.toml is examples/controller.toml under a header" cmp -s examples/controller.toml \
            <(tail -n "$(wc -l <examples/controller.toml)" "$tmp/x/etc/ferry/controller.toml")
        for f in ferry.conf ferry.acl; do
            check "the broker's $f is examples/mosquitto/$f" cmp -s "examples/mosquitto/$f" \
                "$tmp/x/usr/share/doc/ferry-controller/examples/mosquitto/$f"
        done
    fi
    check "md5sums match the files" bash -c "cd '$tmp/x' && md5sum --quiet -c DEBIAN/md5sums"
    check "md5sums list every file" test "$(wc -l <"$tmp/x/DEBIAN/md5sums")" = \
        "$(cd "$tmp/x" && find . -path ./DEBIAN -prune -o -type f -print | wc -l)"
    local s
    for s in postinst prerm postrm; do
        check "$s is executable and parses" bash -c "test -x '$tmp/x/DEBIAN/$s' && sh -n '$tmp/x/DEBIAN/$s'"
        if command -v shellcheck >/dev/null 2>&1; then
            check "$s is shellcheck-clean" shellcheck -s sh "$tmp/x/DEBIAN/$s"
        fi
    done
    check "$bin is an ELF for $(want_machine "$arch")" \
        test "$(elf_machine "$tmp/x/$bin")" = "$(want_machine "$arch")"
    if [ "$arch" = armhf ]; then
        check "armhf binary uses the hard-float ABI" \
            bash -c "LC_ALL=C readelf -h '$tmp/x/$bin' | grep -q 'hard-float ABI'"
    fi
    local out
    if out="$(QEMU_LD_PREFIX="$(qemu_prefix "$arch")" "$tmp/x/$bin" --version 2>&1)" \
        && [ "$out" = "${bin#usr/bin/} $VERSION" ]; then
        ok "$bin --version: $out"
    else
        bad "$bin --version: $out"
    fi
    rm -rf "$tmp"
}

shopt -s nullglob
debs=("$DIR"/ferry-*_"$VERSION"_*.deb)
[ "${#debs[@]}" -gt 0 ] || { echo "test-packages: no packages in $DIR (scripts/package.sh)" >&2; exit 1; }
for deb in "${debs[@]}"; do
    check_deb "$deb"
done

AGENT_DEB="$DIR/ferry-agent_${VERSION}_amd64.deb"
CONTROLLER_DEB="$DIR/ferry-controller_${VERSION}_amd64.deb"
if [ ! -f "$AGENT_DEB" ] || [ ! -f "$CONTROLLER_DEB" ]; then
    echo "test-packages: the amd64 packages are missing in $DIR" >&2
    exit 1
fi

# --------------------------------------------------------------- 2. the units' promises
echo "== systemd units"
# key UNIT KEY: the value of KEY= (last assignment wins, as in systemd; all of them for lists).
key() { sed -n "s/^$2=//p" "systemd/$1"; }
A=ferry-agent.service
C=ferry-controller.service
check "$A: Type=notify, NotifyAccess=main" test "$(key $A Type) $(key $A NotifyAccess)" = "notify main"
check "$A: ExecStart runs /usr/bin/ferry-agent on /etc/ferry/agent.toml" \
    test "$(key $A ExecStart)" = "/usr/bin/ferry-agent --config /etc/ferry/agent.toml"
check "$A: no ExecStartPre (its exit 78 would not stop Restart=)" test -z "$(key $A ExecStartPre)"
check "$A: WatchdogSec set" grep -qE '^[1-9][0-9]*(s|min)?$' <<<"$(key $A WatchdogSec)"
for u in $A $C; do
    check "$u: Restart=on-failure, RestartPreventExitStatus=78" \
        test "$(key "$u" Restart) $(key "$u" RestartPreventExitStatus)" = "on-failure 78"
    check "$u: NoNewPrivileges, ProtectSystem=strict, ProtectHome, PrivateTmp, no capabilities" \
        test "$(key "$u" NoNewPrivileges) $(key "$u" ProtectSystem) $(key "$u" ProtectHome) $(key "$u" PrivateTmp) [$(key "$u" CapabilityBoundingSet)]" = "yes strict yes yes []"
done
agent_deps() {
    local k w
    for k in After Wants; do
        for w in docker.service network-online.target; do
            grep -qw -- "$w" <<<"$(key $A "$k")" || return 1
        done
    done
}
check "$A: After= and Wants= docker.service and network-online.target" agent_deps
check "$A: writable state dir /var/lib/ferry" \
    test "$(key $A StateDirectory) $(key $A ReadWritePaths)" = "ferry /var/lib/ferry"
# TimeoutStopSec must outlast the agent's drain: drain_gate + two container stops (defaults
# from examples/agent.toml, which a unit test keeps in step with src/config.rs; written in whole
# seconds, "30s").
drain="$(sed -n 's/^# drain_gate = "\([0-9]*\)s".*/\1/p' examples/agent.toml)"
stop="$(sed -n 's/^# stop_timeout = "\([0-9]*\)s".*/\1/p' examples/agent.toml)"
stop_timeout="$(key $A TimeoutStopSec)"
check "$A: TimeoutStopSec=$stop_timeout > drain_gate $drain s + 2 x stop_timeout $stop s + 30 s" \
    test "${stop_timeout%s}" -gt "$((drain + 2 * stop + 30))"
check "$C: ExecStart is ferryctl serve on /etc/ferry/controller.toml" \
    test "$(key $C ExecStart)" = "/usr/bin/ferryctl serve --config /etc/ferry/controller.toml"
check "$C: its own user, StateDirectory=ferry-controller, no devices, MemoryDenyWriteExecute" \
    test "$(key $C User) $(key $C StateDirectory) $(key $C PrivateDevices) $(key $C MemoryDenyWriteExecute)" = "ferry-controller ferry-controller yes yes"
check "$C: RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX" \
    test "$(key $C RestrictAddressFamilies)" = "AF_INET AF_INET6 AF_UNIX"
check "$C: SystemCallFilter=@system-service" grep -qx "SystemCallFilter=@system-service" "systemd/$C"
check "packaged controller.toml (examples/controller.toml) has data_dir = StateDirectory" \
    grep -qx 'data_dir = "/var/lib/ferry-controller"' examples/controller.toml
for unit in systemd/ferry-agent.service systemd/ferry-controller.service; do
    exposure="$(systemd-analyze security --offline=yes --no-pager "$unit" 2>&1 \
        | sed -n 's/.*Overall exposure level for .*: \([0-9.]*\).*/\1/p')"
    check "$(basename "$unit"): systemd-analyze security exposure ${exposure:-?} <= $MAX_EXPOSURE" \
        awk -v e="${exposure:-99}" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(e <= m) }'
done

# --------------------------------------------------------------- 3. install into a copy of /
echo "== install, configure, reinstall, remove, purge (overlay copy of this machine)"
[ "$(id -u)" -eq 0 ] || { echo "test-packages: the install test needs root" >&2; exit 1; }
SCRATCH="$(mktemp -d)"
trap 'rm -rf "$SCRATCH"' EXIT
cp "$AGENT_DEB" "$SCRATCH/agent.deb"
cp "$CONTROLLER_DEB" "$SCRATCH/controller.deb"

# Runs inside the chroot: prints one "ok/FAIL" line per check.
cat >"$SCRATCH/inside.sh" <<'INSIDE'
#!/bin/bash
set -uo pipefail
export PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C DEBIAN_FRONTEND=noninteractive
FAILS=0
ok() { printf '  ok   %s\n' "$*"; }
bad() { printf '  FAIL %s\n' "$*"; FAILS=$((FAILS + 1)); }
check() { local what="$1"; shift; if "$@"; then ok "$what"; else bad "$what"; fi; }
verify_clean() { # systemd-analyze verify prints warnings and still exits 0: any output fails
    local out
    out="$(systemd-analyze verify "$1" 2>&1)" && [ -z "$out" ] || { echo "$out" | sed 's/^/       /'; return 1; }
}
quiet() { local out; out="$("$@" 2>&1)" || { echo "$out" | sed 's/^/       | /'; return 1; }; }
exposure_of() { systemd-analyze security --offline=yes --no-pager "$1" 2>&1 | sed -n 's/.*Overall exposure level for .*: \([0-9.]*\).*/\1/p'; }

# A developer may have the packages installed for real: start from none (in this copy only).
dpkg -P ferry-agent ferry-controller >/dev/null 2>&1 || true
out="$(dpkg -i /pkgs/agent.deb /pkgs/controller.deb 2>&1)"; rc=$?
echo "$out" | sed 's/^/       | /'
check "dpkg -i ferry-agent ferry-controller (amd64)" test "$rc" = 0
check "both installed" bash -c '[ "$(dpkg-query -W -f="\${Status}\n" ferry-agent ferry-controller)" = "$(printf "install ok installed\ninstall ok installed")" ]'
check "postinst explains the unconfigured agent" grep -q 'ferry-agent: not started: /etc/ferry/agent.toml is not configured yet' <<<"$out"
check "/usr/bin/ferry-agent --version" test "$(/usr/bin/ferry-agent --version)" = "ferry-agent $VERSION"
check "/usr/bin/ferryctl --version" test "$(/usr/bin/ferryctl --version)" = "ferryctl $VERSION"
check "installed ferry-agent.service verifies cleanly" verify_clean /lib/systemd/system/ferry-agent.service
check "installed ferry-controller.service verifies cleanly" verify_clean /lib/systemd/system/ferry-controller.service
echo "       agent exposure $(exposure_of ferry-agent.service), controller exposure $(exposure_of ferry-controller.service)"
check "ferry-agent.service enabled" test -L /etc/systemd/system/multi-user.target.wants/ferry-agent.service
check "ferry-controller.service enabled" test -L /etc/systemd/system/multi-user.target.wants/ferry-controller.service
check "/var/lib/ferry is 0700 root" test "$(stat -c '%a %U' /var/lib/ferry)" = "700 root"
check "system user ferry-controller exists" bash -c 'getent passwd ferry-controller | grep -q ":/usr/sbin/nologin$"'
check "conffiles registered" bash -c 'dpkg-query -W -f="\${Conffiles}\n" ferry-agent | grep -q "/etc/ferry/agent.toml [0-9a-f]\{32\}$"'

out="$(/usr/bin/ferry-agent check-config --config /etc/ferry/agent.toml 2>&1)"; rc=$?
echo "       check-config (unconfigured): $out"
check "unconfigured agent: check-config exits 78" test "$rc" = 78
check "unconfigured agent: the error names device_id" grep -q 'missing field `device_id`' <<<"$out"
out="$(/usr/bin/ferry-agent --config /etc/ferry/agent.toml 2>&1)"; rc=$?
check "unconfigured agent: the service binary exits 78 (RestartPreventExitStatus)" test "$rc" = 78

# Configure it as an admin would: device id, broker, the two roles' public keys.
ferryctl keygen --out /root/ferry-keys --name release >/dev/null
ferryctl keygen --out /root/ferry-keys --name controller >/dev/null
cp /root/ferry-keys/release.pub /root/ferry-keys/controller.pub /etc/ferry/keys/
sed -i -e 's|^# device_id = "dev-001".*|device_id = "box-0001"|' \
    -e 's|^url = .*|url = "mqtt://127.0.0.1:1883"|' /etc/ferry/agent.toml
out="$(/usr/bin/ferry-agent check-config --config /etc/ferry/agent.toml 2>&1)"; rc=$?
echo "       check-config (configured): $out"
check "configured agent passes check-config" test "$rc" = 0

# The controller's config: the packaged file (examples/controller.toml) as the server reads it.
check "/etc/ferry/controller.toml is 0640 root:ferry-controller (statoverride)" \
    test "$(stat -c '%a %U:%G' /etc/ferry/controller.toml)" = "640 root:ferry-controller"
out="$(ferryctl serve --check --config /etc/ferry/controller.toml 2>&1)"; rc=$?
echo "       serve --check (unconfigured): $out"
check "unconfigured controller: serve --check exits 78 naming controller_key" \
    bash -c '[ "$1" = 78 ] && grep -q controller_key <<<"$2"' _ "$rc" "$out"
cp /root/ferry-keys/controller.key /etc/ferry/keys/controller.key
head -c 24 /dev/urandom | base64 >/etc/ferry/api-token
chgrp ferry-controller /etc/ferry/keys/controller.key /etc/ferry/api-token
chmod 0640 /etc/ferry/keys/controller.key /etc/ferry/api-token
as_controller() { setpriv --reuid=ferry-controller --regid=ferry-controller --clear-groups "$@"; }
out="$(as_controller ferryctl serve --check --config /etc/ferry/controller.toml 2>&1)"; rc=$?
echo "       serve --check (configured, as ferry-controller): $out"
check "configured controller passes serve --check as its user" test "$rc" = 0
# Every key the file shows, the commented ones too, is one the server knows (unknown keys are
# errors): uncomment them all, give them the files they name, check again.
sed -E 's/^# ([a-z_]+ = )/\1/' /etc/ferry/controller.toml >/tmp/all-keys.toml
n="$(grep -cE '^# [a-z_]+ = ' /etc/ferry/controller.toml)"
echo secret >/etc/ferry/mqtt-password
echo secret >/etc/ferry/db-password
cp /etc/ssl/certs/ca-certificates.crt /etc/ferry/mqtt-ca.pem 2>/dev/null || touch /etc/ferry/mqtt-ca.pem
out="$(ferryctl serve --check --config /tmp/all-keys.toml 2>&1)"; rc=$?
[ "$rc" = 0 ] || echo "$out" | sed 's/^/       | /'
check "every key of controller.toml, $n commented ones uncommented, passes serve --check" \
    bash -c '[ "$1" = 0 ] && [ "$2" -ge 4 ]' _ "$rc" "$n"

out="$(dpkg -i --force-confold /pkgs/agent.deb 2>&1)"; rc=$?
check "reinstall (upgrade path) succeeds" test "$rc" = 0
check "reinstall keeps the edited agent.toml" grep -q '^device_id = "box-0001"' /etc/ferry/agent.toml
check "reinstall prints no unconfigured warning" bash -c '! grep -q "not configured" <<<"$1"' _ "$out"
check "controller reinstall (upgrade path) succeeds" quiet dpkg -i --force-confold /pkgs/controller.deb
check "... controller.toml still 0640 root:ferry-controller" \
    test "$(stat -c '%a %U:%G' /etc/ferry/controller.toml)" = "640 root:ferry-controller"

check "dpkg -r ferry-agent" quiet dpkg -r ferry-agent
check "removed: binary and unit gone" bash -c '! test -e /usr/bin/ferry-agent && ! test -e /lib/systemd/system/ferry-agent.service'
check "removed: agent.toml kept (conffile)" test -f /etc/ferry/agent.toml
check "dpkg -P ferry-agent" quiet dpkg -P ferry-agent
check "purged: agent.toml, state dir and enable link gone" bash -c '! test -e /etc/ferry/agent.toml && ! test -e /var/lib/ferry && ! test -e /etc/systemd/system/multi-user.target.wants/ferry-agent.service'
check "purged: the admin's keys left alone" test -f /etc/ferry/keys/release.pub
mkdir -p /var/lib/ferry-controller && echo db >/var/lib/ferry-controller/ferry.db
check "dpkg -P ferry-controller" quiet dpkg -P ferry-controller
check "purged controller: binary, config and enable link gone" bash -c '! test -e /usr/bin/ferryctl && ! test -e /etc/ferry/controller.toml && ! test -e /etc/systemd/system/multi-user.target.wants/ferry-controller.service'
check "purged controller: the database is kept" test -f /var/lib/ferry-controller/ferry.db
check "purged controller: the statoverride of controller.toml is gone" \
    bash -c '! dpkg-statoverride --list /etc/ferry/controller.toml >/dev/null'
exit "$FAILS"
INSIDE
chmod +x "$SCRATCH/inside.sh"

# The chroot is an overlay over / whose writes land in a tmpfs of a private mount namespace:
# dpkg sees this machine's real database (docker.io, libc6 installed), and it all vanishes at exit.
set +e
# shellcheck disable=SC2016 # expanded by the inner shell
VERSION="$VERSION" SCRATCH="$SCRATCH" unshare --mount --propagation private bash -c '
    set -euo pipefail
    mkdir -p "$SCRATCH/ov"
    mount -t tmpfs -o size=512m tmpfs "$SCRATCH/ov"
    mkdir -p "$SCRATCH/ov/upper" "$SCRATCH/ov/work" "$SCRATCH/ov/root"
    mount -t overlay overlay -o "lowerdir=/,upperdir=$SCRATCH/ov/upper,workdir=$SCRATCH/ov/work" "$SCRATCH/ov/root"
    R="$SCRATCH/ov/root"
    for m in proc sys dev; do mount --rbind "/$m" "$R/$m"; done
    mount -t tmpfs tmpfs "$R/run"
    mount -t tmpfs tmpfs "$R/tmp"
    mkdir -p "$R/pkgs"
    mount --bind "$SCRATCH" "$R/pkgs"
    VERSION="$VERSION" chroot "$R" /pkgs/inside.sh
'
rc=$?
set -e
[ "$rc" -eq 0 ] || { bad "install test: $rc check(s) failed"; }

if [ "$FAILS" -gt 0 ]; then
    echo "test-packages: $FAILS failure(s)" >&2
    exit 1
fi
echo "test-packages: all checks passed"
