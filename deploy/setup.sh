#!/usr/bin/env bash
# Set mayhem up on a Debian machine, as root, from this checkout:
#
#   bash deploy/setup.sh          # RabbitMQ running, ./.venv with mayhem installed
#   bash deploy/setup.sh --test   # also PostgreSQL, promtool and the test dependencies
#
# Idempotent: run it again at any time.
set -euo pipefail

cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."

services=()
extra=""
case "${1:-}" in
    "") ;;
    --test) services=(--with-postgres --with-promtool --with-systemd-analyze); extra="[test]" ;;
    *) echo "usage: $0 [--test]" >&2; exit 2 ;;
esac

bash deploy/local-services.sh "${services[@]}"

# Debian's python3 comes without venv and ensurepip unless python3-venv is installed.
if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv python3-pip >/dev/null
fi
[[ -x .venv/bin/python ]] || python3 -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check --upgrade pip
.venv/bin/pip install --quiet --disable-pip-version-check -e ".${extra}"
echo "setup: mayhem $(.venv/bin/mayhem --version | cut -d' ' -f2) installed in .venv"
