#!/usr/bin/env bash
# Install edge-gateway on an industrial PC (Debian/Ubuntu with systemd), as root:
#   sudo ./install.sh                      install or upgrade (idempotent)
#   sudo ./install.sh --with-local-broker  also the local MQTT broker for plant sensors
#   sudo ./install.sh --with-sparkplug     also Sparkplug B to the upstream (protobuf)
#   sudo ./install.sh --with-opcua         also OPC UA devices (asyncua)
#   sudo ./install.sh --with-web           also the read-only status page, API and /metrics (aiohttp)
#   sudo ./install.sh --uninstall          remove the program and units; keep config and data
#   sudo ./install.sh --uninstall --purge  also remove /etc/edge-gateway, /var/lib/edge-gateway, the user
#   ./install.sh --dry-run ...             only say what would be done
# DESTDIR=/some/root installs into a staging tree instead of / (no user, no systemctl, no chown).
set -euo pipefail
cd "$(dirname "$0")"

DRY=0 UNINSTALL=0 PURGE=0 BROKER=0 SPARKPLUG=0 OPCUA=0 WEB=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        --uninstall) UNINSTALL=1 ;;
        --purge) PURGE=1 ;;
        --with-local-broker) BROKER=1 ;;
        --with-sparkplug) SPARKPLUG=1 ;;
        --with-opcua) OPCUA=1 ;;
        --with-web) WEB=1 ;;
        -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown option $arg (see --help)" >&2; exit 64 ;;
    esac
done
if [ $PURGE -eq 1 ] && [ $UNINSTALL -eq 0 ]; then
    echo "install.sh: --purge goes with --uninstall" >&2; exit 64
fi
D=${DESTDIR:-}
PREFIX=$D/opt/edge-gateway
ETC=$D/etc/edge-gateway
UNITS=$D/etc/systemd/system
BIN=$D/usr/local/bin
DATA=$D/var/lib/edge-gateway
USER_NAME=edge-gateway

run() { if [ $DRY -eq 1 ]; then echo "would run: $*"; else "$@"; fi; }
say() { echo "install.sh: $*"; }
done_() { if [ $DRY -eq 1 ]; then say "would have $*"; else say "$*"; fi; }  # what was done, or would be
real_root() { [ -z "$D" ]; }  # installing into the running system, not a staging tree
systemd_running() { real_root && [ -d /run/systemd/system ]; }

# -- is this a system we support? ------------------------------------------------------------
if [ "$(uname -s)" != Linux ]; then
    say "unsupported system $(uname -s): edge-gateway runs on Linux with systemd"; exit 69
fi
if real_root && [ "$(id -u)" -ne 0 ] && [ $DRY -eq 0 ]; then
    say "run as root (sudo ./install.sh), or with --dry-run, or with DESTDIR=... to stage"; exit 77
fi
if [ $UNINSTALL -eq 0 ]; then
    if ! command -v python3 >/dev/null || ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
        say "unsupported system: edge-gateway needs Python 3.10 or newer (apt-get install python3)"; exit 69
    fi
    if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
        say "unsupported system: Python's venv is missing (apt-get install python3-venv)"; exit 69
    fi
fi

# -- uninstall ---------------------------------------------------------------------------------
if [ $UNINSTALL -eq 1 ]; then
    if systemd_running; then
        instances=$(systemctl list-units --all --plain --no-legend 'edge-gateway@*.service' 2>/dev/null | awk '{print $1}')
        for unit in edge-gateway.service edge-gateway-broker.service $instances; do
            run systemctl disable --now "$unit" 2>/dev/null || true
        done
    fi
    run rm -f "$UNITS/edge-gateway.service" "$UNITS/edge-gateway@.service" "$UNITS/edge-gateway-broker.service" \
        "$BIN/edge-gateway"
    run rm -rf "$PREFIX"
    systemd_running && run systemctl daemon-reload
    if [ $PURGE -eq 1 ]; then
        run rm -rf "$ETC" "$DATA"
        if real_root && id "$USER_NAME" >/dev/null 2>&1; then run userdel "$USER_NAME"; fi
        done_ "removed edge-gateway with its config ($ETC) and data ($DATA)"
    else
        done_ "removed edge-gateway; kept the config in $ETC and the data in $DATA (--purge removes them)"
    fi
    exit 0
fi

# -- install -----------------------------------------------------------------------------------
if real_root && ! id "$USER_NAME" >/dev/null 2>&1; then
    run useradd --system --home-dir /var/lib/edge-gateway --no-create-home --shell /usr/sbin/nologin "$USER_NAME"
fi
if real_root && getent group dialout >/dev/null; then run usermod -a -G dialout "$USER_NAME"; fi

run mkdir -p "$PREFIX" "$ETC" "$UNITS" "$BIN"
run chmod 0750 "$ETC"
real_root && run chown root:"$USER_NAME" "$ETC"
if [ ! -x "$PREFIX/venv/bin/python" ]; then
    run python3 -m venv "$PREFIX/venv"
fi
EXTRAS="anomaly"  # the TFLite runtime (LiteRT) and numpy for the anomaly model; never TensorFlow
[ $BROKER -eq 1 ] && EXTRAS="$EXTRAS,broker"
[ $SPARKPLUG -eq 1 ] && EXTRAS="$EXTRAS,sparkplug"
[ $OPCUA -eq 1 ] && EXTRAS="$EXTRAS,opcua"
[ $WEB -eq 1 ] && EXTRAS="$EXTRAS,web"
PACKAGE=".[$EXTRAS]"
# Re-running with the same source and options changes nothing; a changed source is an upgrade.
STAMP="$PACKAGE $(find gateway sim setup.cfg pyproject.toml -type f \( -name '*.py' -o -name '*.cfg' \
    -o -name '*.toml' -o -path 'gateway/web/static/*' \) -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$PREFIX/.installed-from" 2>/dev/null)" = "$STAMP" ]; then
    say "the program in $PREFIX is already this version"
else
    run "$PREFIX/venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade "$PACKAGE"
    if [ $DRY -eq 0 ]; then echo "$STAMP" > "$PREFIX/.installed-from"; fi
fi
run install -m 0644 README.md "$PREFIX/README.md"
run mkdir -p "$PREFIX/examples"
run install -m 0644 examples/gateway.yaml examples/sim-plant.yaml "$PREFIX/examples/"
run mkdir -p "$PREFIX/models"
run install -m 0644 models/pump-ae.tflite models/pump-ae.json "$PREFIX/models/"
run ln -sfn /opt/edge-gateway/venv/bin/edge-gateway "$BIN/edge-gateway"
run install -m 0644 systemd/edge-gateway.service "$UNITS/edge-gateway.service"
run install -m 0644 "systemd/edge-gateway@.service" "$UNITS/edge-gateway@.service"  # several per box: operations.md
run install -m 0644 systemd/edge-gateway-broker.service "$UNITS/edge-gateway-broker.service"

# An engineer's files are never overwritten; secrets are root:edge-gateway 0640.
install_config() {  # SOURCE DEST
    if [ -e "$2" ]; then
        say "kept the existing $2"
        return
    fi
    run install -m 0640 "$1" "$2"
    real_root && run chown root:"$USER_NAME" "$2"
    done_ "installed $2"
}
# No devices: the gateway does not run (and nothing reaches any broker) until the engineer has
# described the machines; the simulated plant is in $PREFIX/examples, never the live config.
install_config examples/installed/gateway.yaml "$ETC/gateway.yaml"
install_config broker_config/amqtt.yaml "$ETC/amqtt.yaml"
for secret in "$ETC"/*.pass "$ETC"/*.users; do
    [ -e "$secret" ] || continue
    run chmod 0640 "$secret"
    real_root && run chown root:"$USER_NAME" "$secret"
done

if [ $BROKER -eq 1 ] && [ ! -e "$ETC/local-broker.users" ]; then
    # The gateway's own login to the local broker; add sensors with: edge-gateway broker-user NAME
    run "$PREFIX/venv/bin/edge-gateway" broker-user gateway --users "$ETC/local-broker.users" \
        --generate "$ETC/local-gateway.pass"
    if real_root; then run chown root:"$USER_NAME" "$ETC/local-broker.users" "$ETC/local-gateway.pass"; fi
    say "local broker: add each sensor with 'edge-gateway broker-user NAME'; in gateway.yaml set
    local_broker: {client: {username: gateway, password_file: /etc/edge-gateway/local-gateway.pass}}"
fi

# The gateway is started only on a config that passes check-config (an upgrade restarts it on the
# new code); a fresh install's config has no devices, so it waits for the engineer.
CONFIG_OK=0
if [ $DRY -eq 0 ] && [ -x "$PREFIX/venv/bin/edge-gateway" ]; then
    if CHECK=$("$PREFIX/venv/bin/edge-gateway" check-config "$ETC/gateway.yaml" 2>&1); then
        CONFIG_OK=1
    fi
fi
not_started() {
    say "edge-gateway.service is enabled but not started: $ETC/gateway.yaml is not ready:"
    [ -n "${CHECK:-}" ] && echo "$CHECK" | sed 's/^/    /'
    say "describe your machines in $ETC/gateway.yaml, then: sudo edge-gateway check-config $ETC/gateway.yaml
    && sudo systemctl restart edge-gateway (to try it without hardware: edge-gateway demo)"
}
if systemd_running; then
    run systemctl daemon-reload
    [ $BROKER -eq 1 ] && run systemctl enable --now edge-gateway-broker.service
    run systemctl enable edge-gateway.service
    if [ $CONFIG_OK -eq 1 ]; then
        run systemctl restart edge-gateway.service  # an upgrade runs the new code
        say "running: systemctl status edge-gateway; journalctl -u edge-gateway -f; edge-gateway status"
    else
        not_started
    fi
else
    [ $CONFIG_OK -eq 1 ] || not_started
    units=edge-gateway.service
    [ $BROKER -eq 1 ] && units="edge-gateway-broker.service $units"
    say "systemd is not running here; when it is: systemctl daemon-reload && systemctl enable --now $units"
fi
