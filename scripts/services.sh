#!/usr/bin/env bash
# Makes sure the services cmdflow needs answer on 127.0.0.1:
#   PostgreSQL 5432 (user postgres, no password), Redis 6379, RabbitMQ 5672 (guest/guest).
#
# For each service: if its port already answers, nothing is done. Otherwise an installed copy is
# started; failing that, it runs in Docker (scripts/compose.yaml) when a Docker engine works,
# else it is installed with apt and started without systemd. Safe to run again and again.
#
# Environment:
#   CMDFLOW_SERVICES_VIA    auto (default) | apt | docker: how to provide a missing service
#   CMDFLOW_SERVICES_WAIT   seconds to wait for each service to answer (default 60)
set -euo pipefail

export PATH="$PATH:/usr/sbin:/sbin"

VIA=${CMDFLOW_SERVICES_VIA:-auto}
WAIT=${CMDFLOW_SERVICES_WAIT:-60}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
COMPOSE_FILE="$HERE/compose.yaml"
LOGDIR=${TMPDIR:-/tmp}
APT_LOG="$LOGDIR/cmdflow-apt.log"
REDIS_LOG="$LOGDIR/cmdflow-redis.log"

PG_PORT=5432
REDIS_PORT=6379
AMQP_PORT=5672

case "$VIA" in auto | apt | docker) ;; *) echo "services.sh: CMDFLOW_SERVICES_VIA must be auto, apt or docker" >&2; exit 2 ;; esac

say() { printf '%-11s %s\n' "$1:" "$2"; }
die() { printf 'services.sh: %s\n' "$*" >&2; exit 1; }

# Runs a command as root: directly, or through sudo.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "root is needed to run '$*'; run this script as root or install sudo"
    fi
}

# Runs a command as the postgres OS user (peer authentication on the local socket).
as_postgres() {
    if [ "$(id -u)" -eq 0 ]; then
        (cd / && runuser -u postgres -- "$@")
    else
        (cd / && as_root -u postgres "$@")
    fi
}

systemd_running() { [ -d /run/systemd/system ]; }

port_open() { timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" >/dev/null 2>&1; }

# Waits until "$2" succeeds; fails with a message naming the service and a hint.
wait_for() {
    local name=$1 check=$2 hint=$3
    local deadline=$((SECONDS + WAIT))
    until "$check"; do
        if ((SECONDS >= deadline)); then
            die "$name did not answer within ${WAIT}s. $hint"
        fi
        sleep 1
    done
}

APT_UPDATED=0
apt_install() {
    command -v apt-get >/dev/null 2>&1 ||
        die "cannot install $*: no apt-get here. Install PostgreSQL, Redis and RabbitMQ yourself (or start a Docker engine) and run this again."
    printf 'installing %s with apt (log: %s) ...\n' "$*" "$APT_LOG"
    if [ "$APT_UPDATED" -eq 0 ]; then
        : >"$APT_LOG"
        as_root apt-get update >>"$APT_LOG" 2>&1 ||
            { tail -n 20 "$APT_LOG" >&2; die "apt-get update failed (log: $APT_LOG)"; }
        APT_UPDATED=1
    fi
    # A UTF-8 locale, so the PostgreSQL cluster created by the package is UTF-8 even on minimal
    # images without any locale configured.
    as_root env DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8 LC_ALL=C.UTF-8 \
        apt-get install -y "$@" >>"$APT_LOG" 2>&1 ||
        { tail -n 20 "$APT_LOG" >&2; die "apt-get install $* failed (log: $APT_LOG)"; }
}

DOCKER_OK=
docker_usable() {
    if [ -z "$DOCKER_OK" ]; then
        DOCKER_OK=no
        if [ "$VIA" != apt ] && command -v docker >/dev/null 2>&1 &&
            timeout 20 docker info >/dev/null 2>&1 &&
            docker compose version >/dev/null 2>&1; then
            DOCKER_OK=yes
        fi
    fi
    [ "$DOCKER_OK" = yes ]
}

compose_up() {
    docker compose -f "$COMPOSE_FILE" up -d --wait "$1" >/dev/null ||
        die "docker compose could not start $1 (see: docker compose -f $COMPOSE_FILE logs $1)"
}

# ---------------------------------------------------------------------------------------------
# PostgreSQL

pg_ready() {
    if command -v pg_isready >/dev/null 2>&1; then
        pg_isready -q -h 127.0.0.1 -p "$PG_PORT"
    else
        port_open "$PG_PORT"
    fi
}

# A passwordless TCP connection as user postgres works (or cannot be checked without psql).
pg_passwordless() {
    command -v psql >/dev/null 2>&1 || return 0
    PGCONNECT_TIMEOUT=5 psql -X -w -q -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres \
        -tAc 'select 1' >/dev/null 2>&1
}

pg_installed() { compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null 2>&1; }

# Sets PG_VERSION and PG_NAME to the local cluster on port 5432, creating one if there is none.
pg_cluster() {
    local found
    found=$(pg_lsclusters -h 2>/dev/null | awk -v port="$PG_PORT" '$3 == port { print $1, $2; exit }')
    if [ -n "$found" ]; then
        read -r PG_VERSION PG_NAME <<<"$found"
        return
    fi
    # The newest installed server; its clusters live in /etc/postgresql/VERSION/.
    PG_VERSION=$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' | sort -V | tail -n 1)
    PG_NAME=main
    [ -n "$PG_VERSION" ] || die "PostgreSQL is installed but no server version was found under /usr/lib/postgresql"
    if [ -d "/etc/postgresql/$PG_VERSION/$PG_NAME" ]; then
        die "cluster $PG_VERSION/$PG_NAME exists but is not on port $PG_PORT (see pg_lsclusters); set its port to $PG_PORT or free the port"
    fi
    as_root env LANG=C.UTF-8 LC_ALL=C.UTF-8 pg_createcluster -p "$PG_PORT" "$PG_VERSION" "$PG_NAME" >/dev/null ||
        die "pg_createcluster $PG_VERSION $PG_NAME failed"
    PG_CREATED=" (created)"
}

pg_start() {
    PG_CREATED=
    pg_cluster
    if systemd_running; then
        as_root systemctl start "postgresql@$PG_VERSION-$PG_NAME" ||
            die "systemctl start postgresql@$PG_VERSION-$PG_NAME failed"
    else
        as_root pg_ctlcluster --skip-systemctl-redirect "$PG_VERSION" "$PG_NAME" start ||
            die "pg_ctlcluster $PG_VERSION $PG_NAME start failed (log: /var/log/postgresql/postgresql-$PG_VERSION-$PG_NAME.log)"
    fi
    PG_CLUSTER="$PG_VERSION/$PG_NAME$PG_CREATED"
}

# Lets user postgres connect over TCP from 127.0.0.1 and ::1 without a password, for a cluster
# this script started or installed. Only when a passwordless connection fails.
pg_trust_localhost() {
    pg_passwordless && return 0
    local hba tmp
    hba=$(as_postgres psql -X -p "$PG_PORT" -tAc 'SHOW hba_file') || die "cannot read hba_file as the postgres user"
    [ -n "$hba" ] || die "PostgreSQL did not say where pg_hba.conf is"
    tmp=$(mktemp)
    {
        echo "# Added by cmdflow scripts/services.sh: local TCP connections without a password (development only)."
        as_root grep -Eq '^host[[:space:]]+all[[:space:]]+all[[:space:]]+127\.0\.0\.1/32[[:space:]]+trust' "$hba" ||
            echo "host    all    all    127.0.0.1/32    trust"
        as_root grep -Eq '^host[[:space:]]+all[[:space:]]+all[[:space:]]+::1/128[[:space:]]+trust' "$hba" ||
            echo "host    all    all    ::1/128         trust"
        as_root cat "$hba"
    } >"$tmp"
    as_root cp "$tmp" "$hba"
    rm -f "$tmp"
    as_postgres psql -X -q -p "$PG_PORT" -tAc 'select pg_reload_conf()' >/dev/null || die "cannot reload PostgreSQL's configuration"
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        pg_passwordless && { PG_NOTE=", trust for 127.0.0.1 and ::1 added to $hba"; return 0; }
        sleep 0.5
    done
    die "user postgres still cannot connect to 127.0.0.1:$PG_PORT without a password; check $hba"
}

ensure_postgres() {
    PG_NOTE=
    local what
    if pg_ready; then
        what="already answering on 127.0.0.1:$PG_PORT"
        pg_passwordless ||
            what="$what, BUT user postgres cannot connect over TCP without a password: add 'host all all 127.0.0.1/32 trust' at the top of pg_hba.conf, or set CMDFLOW_DATABASE_URL"
        say postgresql "$what"
        return
    fi
    if pg_installed; then
        pg_start
        what="started cluster $PG_CLUSTER"
    elif [ "$VIA" != apt ] && docker_usable; then
        compose_up postgres
        what="started in Docker (scripts/compose.yaml)"
    elif [ "$VIA" = docker ]; then
        die "PostgreSQL is not running and Docker cannot start it (docker info or docker compose failed)"
    else
        apt_install postgresql
        what="installed with apt"
        # The package may have started its cluster already.
        if ! pg_ready; then
            pg_start
            what="$what, started cluster $PG_CLUSTER"
        fi
    fi
    wait_for PostgreSQL pg_ready "See /var/log/postgresql/ (or docker compose logs postgres)."
    [[ $what == *Docker* ]] || pg_trust_localhost
    say postgresql "$what$PG_NOTE; answering on 127.0.0.1:$PG_PORT"
}

# ---------------------------------------------------------------------------------------------
# Redis

redis_ready() {
    if command -v redis-cli >/dev/null 2>&1; then
        [ "$(timeout 5 redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ]
    else
        timeout 5 bash -c "exec 3<>/dev/tcp/127.0.0.1/$REDIS_PORT; printf 'PING\r\n' >&3; read -r reply <&3; [[ \$reply == +PONG* ]]" 2>/dev/null
    fi
}

redis_start() {
    if systemd_running && systemctl cat redis-server.service >/dev/null 2>&1; then
        as_root systemctl start redis-server || die "systemctl start redis-server failed"
        return
    fi
    local major bind=(127.0.0.1)
    major=$(redis-server --version | sed -n 's/.* v=\([0-9]*\).*/\1/p')
    # Redis 7 accepts "-::1": listen on ::1 when the host has IPv6, without failing otherwise.
    if [ "${major:-0}" -ge 7 ]; then bind=(127.0.0.1 -::1); fi
    redis-server --daemonize yes --bind "${bind[@]}" --port "$REDIS_PORT" --save "" --appendonly no \
        --logfile "$REDIS_LOG" || die "redis-server did not start (log: $REDIS_LOG)"
}

ensure_redis() {
    local what
    if redis_ready; then
        say redis "already answering on 127.0.0.1:$REDIS_PORT"
        return
    fi
    if command -v redis-server >/dev/null 2>&1; then
        redis_start
        what="started redis-server"
    elif [ "$VIA" != apt ] && docker_usable; then
        compose_up redis
        what="started in Docker (scripts/compose.yaml)"
    elif [ "$VIA" = docker ]; then
        die "Redis is not running and Docker cannot start it (docker info or docker compose failed)"
    else
        apt_install redis-server
        what="installed with apt"
        if ! redis_ready; then
            redis_start
            what="$what, started redis-server"
        fi
    fi
    wait_for Redis redis_ready "See $REDIS_LOG (or /var/log/redis/)."
    say redis "$what; answering on 127.0.0.1:$REDIS_PORT"
}

# ---------------------------------------------------------------------------------------------
# RabbitMQ

rabbit_ready() { port_open "$AMQP_PORT"; }

rabbit_installed() { command -v rabbitmq-server >/dev/null 2>&1; }

# An Erlang node named rabbit answers (it may still be booting).
rabbit_node_up() { as_root timeout 30 rabbitmq-diagnostics -q ping >/dev/null 2>&1; }

# Starts the broker unless its node is already up; prints what it did.
rabbit_start() {
    if systemd_running && systemctl cat rabbitmq-server.service >/dev/null 2>&1; then
        as_root systemctl start rabbitmq-server || die "systemctl start rabbitmq-server failed"
        echo "started rabbitmq-server"
    elif rabbit_node_up; then
        echo "waited for the booting rabbitmq-server"
    else
        as_root rabbitmq-server -detached >/dev/null 2>&1 ||
            die "rabbitmq-server -detached failed (logs: /var/log/rabbitmq/)"
        echo "started rabbitmq-server"
    fi
}

# Waits for the AMQP port (opened at the end of the boot), then for the node to report it started.
rabbit_wait() {
    wait_for RabbitMQ rabbit_ready "See /var/log/rabbitmq/."
    if command -v rabbitmqctl >/dev/null 2>&1; then
        as_root timeout "$WAIT" rabbitmqctl -q --timeout "$WAIT" await_startup >/dev/null 2>&1 ||
            die "RabbitMQ answers on $AMQP_PORT but did not report a finished start within ${WAIT}s. See /var/log/rabbitmq/."
    fi
}

ensure_rabbitmq() {
    local what
    if rabbit_ready; then
        say rabbitmq "already answering on 127.0.0.1:$AMQP_PORT"
        return
    fi
    if rabbit_installed; then
        what=$(rabbit_start)
        rabbit_wait
    elif [ "$VIA" != apt ] && docker_usable; then
        compose_up rabbitmq
        what="started in Docker (scripts/compose.yaml)"
        wait_for RabbitMQ rabbit_ready "See docker compose -f $COMPOSE_FILE logs rabbitmq."
    elif [ "$VIA" = docker ]; then
        die "RabbitMQ is not running and Docker cannot start it (docker info or docker compose failed)"
    else
        apt_install rabbitmq-server
        what="installed with apt"
        # The package may have started the broker already.
        rabbit_ready || what="$what, $(rabbit_start)"
        rabbit_wait
    fi
    say rabbitmq "$what; answering on 127.0.0.1:$AMQP_PORT"
}

ensure_postgres
ensure_redis
ensure_rabbitmq
