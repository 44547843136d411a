#!/usr/bin/env bash
# Install edge-gateway on an industrial PC (Debian/Ubuntu with systemd), as root:
#   sudo ./install.sh             install or upgrade (idempotent)
#   sudo ./install.sh --dry-run   show what would be done
# DESTDIR=/some/root installs into a staging tree instead of /.
set -euo pipefail
cd "$(dirname "$0")"

DRY=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown option $arg" >&2; exit 64 ;;
    esac
done
D=${DESTDIR:-}
PREFIX=$D/opt/edge-gateway
ETC=$D/etc/edge-gateway
UNITS=$D/etc/systemd/system

run() { if [ $DRY -eq 1 ]; then echo "would run: $*"; else "$@"; fi; }
say() { echo "install.sh: $*"; }

if [ -z "$D" ] && [ "$(id -u)" -ne 0 ] && [ $DRY -eq 0 ]; then
    say "run as root (sudo ./install.sh), or with --dry-run"; exit 77
fi
if ! command -v python3 >/dev/null || ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
    say "this system has no Python 3.10 or newer: unsupported"; exit 69
fi
if [ "$(uname -s)" != Linux ]; then
    say "only Linux is supported"; exit 69
fi

if [ -z "$D" ] && ! id edge-gateway >/dev/null 2>&1; then
    run useradd --system --home-dir /var/lib/edge-gateway --no-create-home --shell /usr/sbin/nologin edge-gateway
fi
[ -z "$D" ] && getent group dialout >/dev/null && run usermod -a -G dialout edge-gateway || true

run mkdir -p "$PREFIX" "$ETC" "$UNITS"
if [ ! -x "$PREFIX/venv/bin/python" ]; then
    run python3 -m venv "$PREFIX/venv"
fi
run "$PREFIX/venv/bin/python" -m pip install -q --upgrade pip
run "$PREFIX/venv/bin/python" -m pip install -q --upgrade .
run install -m 0644 README.md "$PREFIX/README.md"
run install -m 0644 systemd/edge-gateway.service "$UNITS/edge-gateway.service"
if [ ! -e "$ETC/gateway.yaml" ]; then  # never overwrite an engineer's config
    run install -m 0640 examples/gateway.yaml "$ETC/gateway.yaml"
    [ -z "$D" ] && run chown root:edge-gateway "$ETC/gateway.yaml"
    say "example config installed: edit $ETC/gateway.yaml"
else
    say "kept the existing $ETC/gateway.yaml"
fi

if [ -z "$D" ] && [ -d /run/systemd/system ]; then
    run systemctl daemon-reload
    run systemctl enable --now edge-gateway.service
    say "started: systemctl status edge-gateway; journalctl -u edge-gateway -f"
else
    say "systemd is not running here; when it is: systemctl daemon-reload && systemctl enable --now edge-gateway"
fi
