#!/usr/bin/env bash
# Make sure the services mayhem and its tests need are up on this machine.
#
#   bash deploy/local-services.sh [--with-postgres] [--with-promtool] [--with-systemd-analyze]
#
# Run as root, on Debian. Idempotent, and quick when everything already runs: a service that
# answers on its port is left alone. Never uses systemctl (there may be no systemd as PID 1).
#
#   RabbitMQ    127.0.0.1:5672, always: installed with apt if missing, started detached.
#   PostgreSQL  127.0.0.1:5432, with --with-postgres: started, plus a superuser role "root" and
#               a database "test" reachable over TCP from 127.0.0.1 without a password.
#   promtool    with --with-promtool (Debian package "prometheus"; the server is NOT started).
#   systemd-analyze  with --with-systemd-analyze (Debian package "systemd").
set -euo pipefail

RABBITMQ_PORT=5672
PG_PORT=5432
PG_ROLE=root
PG_DATABASE=test
WAIT_SECONDS=90

with_postgres=false
with_promtool=false
with_systemd_analyze=false

usage() {
    echo "usage: $0 [--with-postgres] [--with-promtool] [--with-systemd-analyze]" >&2
}

for arg in "$@"; do
    case "$arg" in
        --with-postgres) with_postgres=true ;;
        --with-promtool) with_promtool=true ;;
        --with-systemd-analyze) with_systemd_analyze=true ;;
        -h | --help) usage; exit 0 ;;
        *) echo "local-services: unknown argument: $arg" >&2; usage; exit 2 ;;
    esac
done

say() { echo "local-services: $*"; }
die() { echo "local-services: error: $*" >&2; exit 1; }

if [[ $(id -u) -ne 0 ]]; then
    die "must run as root"
fi

# True if something accepts TCP connections on 127.0.0.1:$1 (bounded: a filtered port
# must not hang the script).
port_open() {
    timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
}

# Wait up to WAIT_SECONDS for the command "$@" to succeed.
wait_for() {
    local deadline=$((SECONDS + WAIT_SECONDS))
    until "$@"; do
        if ((SECONDS >= deadline)); then
            return 1
        fi
        sleep 1
    done
}

# apt-get install, with one "apt-get update" per run, and with service starts from maintainer
# scripts suppressed (policy-rc.d exit 101) unless the machine already has a policy in place.
apt_updated=false
created_policy=false
cleanup() {
    if $created_policy; then
        rm -f /usr/sbin/policy-rc.d
    fi
}
trap cleanup EXIT

apt_install() {
    export DEBIAN_FRONTEND=noninteractive
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        created_policy=true
    fi
    if ! $apt_updated; then
        apt-get update -qq
        apt_updated=true
    fi
    apt-get install -y -qq "$@"
}

# --- RabbitMQ -------------------------------------------------------------------------------

ensure_rabbitmq() {
    if port_open "$RABBITMQ_PORT"; then
        say "RabbitMQ already answers on 127.0.0.1:$RABBITMQ_PORT"
        return
    fi
    local installed=""
    if ! command -v rabbitmq-server >/dev/null 2>&1; then
        apt_install rabbitmq-server >/dev/null
        installed="installed and "
    fi
    local startlog
    startlog=$(mktemp /tmp/local-services-rabbitmq.XXXXXX)
    if ! rabbitmq-server -detached >"$startlog" 2>&1; then
        service rabbitmq-server start >>"$startlog" 2>&1 || true
    fi
    if ! wait_for port_open "$RABBITMQ_PORT"; then
        cat "$startlog" >&2
        rm -f "$startlog"
        die "RabbitMQ did not answer on 127.0.0.1:$RABBITMQ_PORT within ${WAIT_SECONDS}s" \
            "(see /var/log/rabbitmq/)"
    fi
    rm -f "$startlog"
    # The listener opens late in the boot; this makes sure the boot has finished.
    timeout 60 rabbitmqctl -q await_startup >/dev/null 2>&1 || true
    say "RabbitMQ ${installed}started; answers on 127.0.0.1:$RABBITMQ_PORT"
}

# --- PostgreSQL -----------------------------------------------------------------------------

pg_version() {
    # The newest cluster version under /etc/postgresql (normally there is exactly one).
    find /etc/postgresql -mindepth 1 -maxdepth 1 -type d -printf '%f\n' 2>/dev/null \
        | sort -V | tail -n 1
}

pg_ready() {
    pg_isready -q -h 127.0.0.1 -p "$PG_PORT"
}

pg_works() {
    psql -h 127.0.0.1 -p "$PG_PORT" -U "$PG_ROLE" -d "$PG_DATABASE" -w -Atqc 'select 1' \
        >/dev/null 2>&1
}

as_postgres() {
    runuser -u postgres -- "$@"
}

ensure_postgres() {
    local action="already answers"
    if ! pg_ready; then
        local installed=""
        if [[ -z $(pg_version) ]]; then
            apt_install postgresql >/dev/null
            installed="installed and "
        fi
        local version
        version=$(pg_version)
        [[ -n $version ]] || die "no PostgreSQL cluster under /etc/postgresql after installing"
        pg_ctlcluster --skip-systemctl-redirect "$version" main start \
            || pg_ready || die "pg_ctlcluster $version main start failed"
        wait_for pg_ready \
            || die "PostgreSQL did not answer on 127.0.0.1:$PG_PORT within ${WAIT_SECONDS}s"
        action="${installed}started; answers"
    fi

    if pg_works; then
        say "PostgreSQL $action on 127.0.0.1:$PG_PORT"
        return
    fi

    # Fix what is missing: the role, the database, trust for 127.0.0.1.
    local sql="select 1 from pg_roles where rolname = '$PG_ROLE'"
    if [[ -z $(as_postgres psql -Atqc "$sql") ]]; then
        as_postgres psql -qc "create role \"$PG_ROLE\" superuser login"
    fi
    sql="select 1 from pg_database where datname = '$PG_DATABASE'"
    if [[ -z $(as_postgres psql -Atqc "$sql") ]]; then
        as_postgres createdb -O "$PG_ROLE" "$PG_DATABASE"
    fi
    if ! pg_works; then
        local hba trust_line="host all all 127.0.0.1/32 trust"
        hba=$(as_postgres psql -Atqc 'show hba_file')
        if ! grep -qxF "$trust_line" "$hba"; then
            # The first matching line wins, so trust goes before the default scram lines.
            sed -i "1i $trust_line" "$hba"
        fi
        as_postgres psql -qc 'select pg_reload_conf()' >/dev/null
        sleep 1
    fi
    pg_works || die "psql -h 127.0.0.1 -U $PG_ROLE -d $PG_DATABASE still fails"
    say "PostgreSQL $action on 127.0.0.1:$PG_PORT; role $PG_ROLE and database $PG_DATABASE set up"
}

# --- tools ----------------------------------------------------------------------------------

ensure_tool() {
    local tool=$1 package=$2
    if command -v "$tool" >/dev/null 2>&1; then
        say "$tool already installed"
        return
    fi
    # A maintainer script that fails to start a service must not fail us: what we need is
    # the binary.
    if ! apt_install --no-install-recommends "$package" >/dev/null; then
        echo "local-services: warning: apt-get install $package reported an error" >&2
    fi
    command -v "$tool" >/dev/null 2>&1 || die "$tool is still missing after installing $package"
    say "$tool installed (package $package)"
}

ensure_rabbitmq
if $with_postgres; then
    ensure_postgres
fi
if $with_promtool; then
    ensure_tool promtool prometheus
fi
if $with_systemd_analyze; then
    ensure_tool systemd-analyze systemd
fi
