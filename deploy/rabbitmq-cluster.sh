#!/usr/bin/env bash
# A 3-node RabbitMQ cluster on this one machine, for trying mayhem against a cluster and for
# its cluster test (tests/e2e/test_cluster.py).
#
#   bash deploy/rabbitmq-cluster.sh start|stop|status
#
# Run as root, with the rabbitmq-server package installed. The nodes run as the rabbitmq
# user, next to (never instead of) the machine's default broker on 5672, which this script
# does not touch:
#
#   node                 AMQP (127.0.0.1 only)   distribution   data and logs
#   mayhem-a@localhost   5681                    25681          $STATE/mayhem-a
#   mayhem-b@localhost   5682                    25682          $STATE/mayhem-b
#   mayhem-c@localhost   5683                    25683          $STATE/mayhem-c
#
# STATE is $MAYHEM_CLUSTER_STATE, default /tmp/mayhem-rabbitmq-cluster. The Erlang cookie is
# the rabbitmq user's (/var/lib/rabbitmq/.erlang.cookie), the one rabbitmqctl uses as root
# (it runs as that user), so the nodes and the CLI tools share it. No plugins (no management
# listener to clash with the default broker's). b and c join a's cluster; a quorum queue
# declared on any node gets a member on each of the three.
#
#   start   starts the three nodes (a node already running is left alone) and clusters them
#   stop    stops the three nodes and deletes $STATE
#   status  prints the cluster status as node a sees it (exit 1 if a is not running)
#
# mayhem's URL for it: amqp://guest:guest@127.0.0.1:5681,127.0.0.1:5682,127.0.0.1:5683/
# (guest may log in over loopback only, which is all this cluster listens on).
set -euo pipefail

STATE=${MAYHEM_CLUSTER_STATE:-/tmp/mayhem-rabbitmq-cluster}
NODES=(a b c)
AMQP_BASE=5680
DIST_BASE=25680
WAIT_SECONDS=${MAYHEM_CLUSTER_WAIT:-120}
RABBIT_BIN=/usr/lib/rabbitmq/bin

say() { echo "rabbitmq-cluster: $*"; }
die() { echo "rabbitmq-cluster: error: $*" >&2; exit 1; }

node_name() { echo "mayhem-$1@localhost"; }
node_index() {
    local i
    for i in "${!NODES[@]}"; do
        if [[ ${NODES[$i]} == "$1" ]]; then
            echo $((i + 1))
        fi
    done
}

# rabbitmqctl for one of our nodes (as the rabbitmq user, whose cookie it reads).
ctl() {
    local node=$1
    shift
    runuser -u rabbitmq -- env HOME=/var/lib/rabbitmq RABBITMQ_CONF_ENV_FILE=/dev/null \
        ERL_EPMD_ADDRESS=127.0.0.1 "$RABBIT_BIN/rabbitmqctl" -q -n "$(node_name "$node")" "$@"
}

running() { ctl "$1" ping >/dev/null 2>&1; }

# ctl without its chatter; the output is shown only when it fails.
port_open() { timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }

start_node() {
    local node=$1 index amqp dist dir
    index=$(node_index "$node")
    amqp=$((AMQP_BASE + index))
    dist=$((DIST_BASE + index))
    dir=$STATE/mayhem-$node
    if running "$node"; then
        say "$(node_name "$node") already running"
        return
    fi
    if port_open "$amqp"; then
        die "port $amqp is taken by something else"
    fi
    mkdir -p "$dir/mnesia" "$dir/log"
    cat >"$dir/rabbitmq.conf" <<EOF
listeners.tcp.local = 127.0.0.1:$amqp
loopback_users.guest = true
log.file.level = info
log.console = false
EOF
    echo "[]." >"$dir/enabled_plugins"
    chown -R rabbitmq:rabbitmq "$dir"
    say "starting $(node_name "$node") on 127.0.0.1:$amqp (distribution $dist)"
    # The default broker's /etc/rabbitmq/rabbitmq-env.conf names its node: not read here.
    runuser -u rabbitmq -- env -i PATH="$PATH" HOME=/var/lib/rabbitmq \
        RABBITMQ_CONF_ENV_FILE=/dev/null \
        RABBITMQ_NODENAME="$(node_name "$node")" \
        RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
        RABBITMQ_NODE_PORT="$amqp" \
        RABBITMQ_DIST_PORT="$dist" \
        RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf" \
        RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" \
        RABBITMQ_MNESIA_BASE="$dir/mnesia" \
        RABBITMQ_LOG_BASE="$dir/log" \
        RABBITMQ_PID_FILE="$dir/pid" \
        ERL_EPMD_ADDRESS=127.0.0.1 \
        ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}" \
        "$RABBIT_BIN/rabbitmq-server" -detached
}

await_node() {
    local node=$1 deadline=$((SECONDS + WAIT_SECONDS))
    # await_startup fails at once while the node's Erlang VM is not up yet: ask again until
    # the deadline.
    until ctl "$node" await_startup --timeout 10 >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            tail -n 20 "$STATE/mayhem-$node/log/"*.log 2>/dev/null >&2 || true
            say "$(node_name "$node") did not start within $WAIT_SECONDS s (logs: $STATE/mayhem-$node/log)"
            return 1
        fi
        sleep 1
    done
}

member_of_a() {
    ctl a cluster_status --formatter json 2>/dev/null |
        python3 -c 'import json, sys; print("\n".join(json.load(sys.stdin)["running_nodes"]))' |
        grep -qx "$(node_name "$1")"
}

# Join one node to a; a join that fails (a not reachable for a moment) is tried again.
join_node() {
    local node=$1 try out
    for try in 1 2 3; do
        await_node a || return 1
        if out=$(ctl "$node" stop_app 2>&1 && ctl "$node" reset 2>&1 &&
            ctl "$node" join_cluster "$(node_name a)" 2>&1 && ctl "$node" start_app 2>&1); then
            await_node "$node" && return 0
        else
            echo "$out" | tail -n 5 >&2
        fi
        say "joining $(node_name "$node") failed (try $try of 3)"
        sleep 2
    done
    return 1
}

# A start that failed half way stops what it started, so nothing is left running.
abandon() {
    cmd_stop >&2 || true
    die "the cluster did not come up; stopped what had started"
}

cmd_start() {
    for node in "${NODES[@]}"; do
        start_node "$node"
    done
    for node in "${NODES[@]}"; do
        await_node "$node" || abandon
    done
    for node in "${NODES[@]:1}"; do
        if member_of_a "$node"; then
            continue
        fi
        say "joining $(node_name "$node") to $(node_name a)"
        join_node "$node" || abandon
    done
    say "cluster up: amqp://guest:guest@127.0.0.1:5681,127.0.0.1:5682,127.0.0.1:5683/"
}

cmd_stop() {
    local node pid
    for node in "${NODES[@]}"; do
        if running "$node"; then
            say "stopping $(node_name "$node")"
            ctl "$node" stop >/dev/null 2>&1 || true
        fi
        # A node whose app was stopped on purpose still has its VM: make sure it is gone.
        if [[ -f $STATE/mayhem-$node/pid ]]; then
            pid=$(cat "$STATE/mayhem-$node/pid")
            if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
                kill "$pid" 2>/dev/null || true
            fi
        fi
    done
    rm -rf "$STATE"
    say "stopped"
}

cmd_status() {
    running a || { say "$(node_name a) is not running"; exit 1; }
    ctl a cluster_status
}

[[ $(id -u) -eq 0 ]] || die "must run as root"
[[ -x $RABBIT_BIN/rabbitmq-server ]] || die "rabbitmq-server is not installed"

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
