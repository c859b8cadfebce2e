#!/usr/bin/env bash
# Install mayhem as a systemd service, as root, from this checkout:
#
#   bash deploy/install.sh [--instance NAME]... [--allow-ip ADDRESS]... [--no-package] [--no-start]
#
#   /opt/mayhem/venv          a virtualenv with mayhem (and your handlers: install them there),
#                             its dependencies pinned by deploy/constraints.txt
#   /etc/mayhem/mayhem.toml   the configuration, from systemd/mayhem.toml.example if missing
#   /etc/mayhem/credentials/  amqp_url and db_url (0600), from the defaults if missing
#   /etc/systemd/system/      mayhem.service and mayhem@.service, always replaced
#
# Then, if systemd runs this machine, it enables and (re)starts the unit: a restart is a
# graceful stop (the handlers in flight finish, the buffer is requeued) and a fresh start on
# the new code. Without systemd as PID 1 (a container, a chroot, an image build) it installs the
# files and prints the commands to run on the target host. Idempotent: run it again to upgrade;
# existing configuration and credential files are never overwritten.
#
#   --instance NAME     set up mayhem@NAME instead of mayhem: /etc/mayhem/NAME.toml with queue
#                       NAME and a metrics port of its own, /etc/mayhem/credentials/NAME/
#   --allow-ip ADDRESS  allow network traffic to and from ADDRESS (an IP address or CIDR
#                       prefix: the broker, PostgreSQL, Prometheus) besides loopback; written
#                       to a drop-in for both units
#   --no-package        leave /opt/mayhem/venv alone: install the configuration and units only
#   --no-start          enable the units, but do not start or restart them
#
#   DESTDIR=DIR         stage everything under DIR (for packaging and tests); never touches
#                       systemd, and root is not needed
set -euo pipefail

cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."

DESTDIR=${DESTDIR:-}
PYTHON=${PYTHON:-python3}
PREFIX=/opt/mayhem
CONFDIR=/etc/mayhem
UNITDIR=/etc/systemd/system
FIRST_METRICS_PORT=9464
DEFAULT_AMQP_URL="amqp://guest:guest@localhost:5672/"
DEFAULT_DB_URL="sqlite:///mayhem.db"

instances=()
allow_ips=()
install_package=true
start=true

say() { echo "install: $*"; }
die() { echo "install: error: $*" >&2; exit 1; }
usage() {
    echo "usage: $0 [--instance NAME]... [--allow-ip ADDRESS]... [--no-package] [--no-start]" >&2
}

while (($#)); do
    case "$1" in
        --instance)
            [[ $# -ge 2 ]] || { usage; exit 2; }
            [[ $2 =~ ^[A-Za-z0-9_-]{1,24}$ ]] \
                || die "instance name '$2': use 1 to 24 letters, digits, '-' or '_'"
            instances+=("$2")
            shift 2
            ;;
        --allow-ip)
            [[ $# -ge 2 ]] || { usage; exit 2; }
            [[ $2 =~ ^[0-9A-Fa-f.:]+(/[0-9]{1,3})?$ ]] \
                || die "--allow-ip '$2': give an IP address or a CIDR prefix"
            allow_ips+=("$2")
            shift 2
            ;;
        --no-package) install_package=false; shift ;;
        --no-start) start=false; shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "install: unknown argument: $1" >&2; usage; exit 2 ;;
    esac
done

if [[ -z $DESTDIR && $(id -u) -ne 0 ]]; then
    die "must run as root (or with DESTDIR=DIR to stage the files)"
fi

# --- the package ----------------------------------------------------------------------------

venv=$DESTDIR$PREFIX/venv
if $install_package; then
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "$PYTHON is older than 3.11"
    "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null \
        || die "$PYTHON cannot create virtualenvs: apt-get install python3-venv"
    install -d -m 0755 "$DESTDIR$PREFIX"
    [[ -x $venv/bin/python ]] || "$PYTHON" -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check --upgrade pip
    # Not editable: the service must not depend on this checkout staying where it is.
    "$venv/bin/pip" install --quiet --disable-pip-version-check --upgrade --force-reinstall \
        --no-deps .
    # The dependencies at the versions this release was tested with, never just the newest.
    "$venv/bin/pip" install --quiet --disable-pip-version-check -c deploy/constraints.txt .
    install -m 0644 README.md "$DESTDIR$PREFIX/README.md"
    say "$("$venv/bin/mayhem" --version) installed in $venv"
elif [[ ! -x $venv/bin/mayhem ]]; then
    say "warning: --no-package, and $venv/bin/mayhem does not exist yet"
fi

# --- configuration and secrets --------------------------------------------------------------

confdir=$DESTDIR$CONFDIR
install -d -m 0755 "$confdir"
install -d -m 0700 "$confdir/credentials"
install -m 0644 systemd/mayhem.toml.example "$confdir/mayhem.toml.example"

# The next free metrics port: one above the highest metrics_addr port in /etc/mayhem/*.toml.
next_metrics_port() {
    local highest=$FIRST_METRICS_PORT port
    while read -r port; do
        ((port > highest)) && highest=$port
    done < <(sed -nE 's/^[[:space:]]*metrics_addr[[:space:]]*=[[:space:]]*"[^"]*:([0-9]+)".*/\1/p' \
        "$confdir"/*.toml 2>/dev/null)
    echo $((highest + 1))
}

# A configuration file, from the example, unless it exists. Args: path [queue metrics_port].
install_config() {
    local path=$1 queue=${2:-} port=${3:-}
    if [[ -e $path ]]; then
        say "$path exists; left as it is (the new example: $confdir/mayhem.toml.example)"
        return
    fi
    local tmp
    tmp=$(mktemp "$path.XXXXXX")
    if [[ -n $queue ]]; then
        sed -e "s|^# queue = \"mayhem\"|queue = \"$queue\"|" \
            -e "s|^# metrics_addr = \"127.0.0.1:$FIRST_METRICS_PORT\"|metrics_addr = \"127.0.0.1:$port\"|" \
            systemd/mayhem.toml.example >"$tmp"
    else
        cp systemd/mayhem.toml.example "$tmp"
    fi
    chmod 0644 "$tmp"
    mv "$tmp" "$path"
    say "$path written${queue:+ (queue $queue, metrics on 127.0.0.1:$port)}"
}

# A secret for LoadCredential=, unless it exists: root only, never world-readable.
install_credential() {
    local path=$1 value=$2
    if [[ -e $path ]]; then
        return
    fi
    (umask 077 && printf '%s\n' "$value" >"$path")
    say "$path written with the default; put the real URL (and password) there"
}

units=()
if ((${#instances[@]} == 0)); then
    install_config "$confdir/mayhem.toml"
    install_credential "$confdir/credentials/amqp_url" "$DEFAULT_AMQP_URL"
    install_credential "$confdir/credentials/db_url" "$DEFAULT_DB_URL"
    units+=(mayhem.service)
else
    for name in "${instances[@]}"; do
        install_config "$confdir/$name.toml" "$name" "$(next_metrics_port)"
        install -d -m 0700 "$confdir/credentials/$name"
        install_credential "$confdir/credentials/$name/amqp_url" "$DEFAULT_AMQP_URL"
        install_credential "$confdir/credentials/$name/db_url" "$DEFAULT_DB_URL"
        units+=("mayhem@$name.service")
    done
fi

# --- the units ------------------------------------------------------------------------------

unitdir=$DESTDIR$UNITDIR
install -d -m 0755 "$unitdir"
install -m 0644 systemd/mayhem.service systemd/mayhem@.service "$unitdir/"
say "units installed in $unitdir: mayhem.service, mayhem@.service"
if ((${#allow_ips[@]})); then
    for unit in mayhem.service mayhem@.service; do
        install -d -m 0755 "$unitdir/$unit.d"
        printf '# Written by deploy/install.sh --allow-ip.\n[Service]\nIPAddressAllow=%s\n' \
            "${allow_ips[*]}" >"$unitdir/$unit.d/50-network.conf"
        chmod 0644 "$unitdir/$unit.d/50-network.conf"
    done
    say "traffic allowed besides loopback: ${allow_ips[*]} ($UNITDIR/mayhem*.service.d/50-network.conf)"
fi

# A second opinion on the units as installed (it also checks that ExecStart= is executable).
if [[ -z $DESTDIR && -x $venv/bin/mayhem ]] && command -v systemd-analyze >/dev/null 2>&1; then
    if ! systemd-analyze verify "$unitdir/mayhem.service" "$unitdir/mayhem@.service"; then
        say "warning: systemd-analyze verify reported problems (above)"
    fi
fi

# --- systemd --------------------------------------------------------------------------------

if [[ -n $DESTDIR ]]; then
    say "staged under $DESTDIR; on the target host: systemctl daemon-reload &&" \
        "systemctl enable --now ${units[*]}"
    exit 0
fi
# sd_booted(3): systemd is PID 1 exactly when this directory exists.
if [[ ! -d /run/systemd/system ]] || ! command -v systemctl >/dev/null 2>&1; then
    say "systemd is not running on this machine: the files are installed, nothing was enabled."
    say "On a host booted with systemd, run:"
    say "  systemctl daemon-reload && systemctl enable --now ${units[*]}"
    exit 0
fi
systemctl daemon-reload
systemctl enable --quiet "${units[@]}"
say "enabled: ${units[*]}"
if $start; then
    # restart = graceful stop (drain) + start: a running daemon picks up the new code.
    systemctl restart "${units[@]}"
    systemctl --no-pager --lines=5 status "${units[@]}" || true
else
    say "not started (--no-start): systemctl start ${units[*]}"
fi
