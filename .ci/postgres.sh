# Sourced by .ci/run: install (Debian) and start a throwaway PostgreSQL server on 127.0.0.1 for
# the multi-worker study test, and export HERETIC_TEST_POSTGRES with its URL; stopped on exit.
# Returns non-zero (and exports nothing) when any step fails.
pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo -n "$@"; fi; }
as_postgres() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

start_postgres() {
    if [ -z "$(pg_bin)" ]; then
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null || return 1
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null || return 1
    fi
    PG_BIN="$(pg_bin)"
    PG_DATA="$(mktemp -d /tmp/heretic-pg.XXXXXX)" || return 1
    PG_PORT=55432
    if [ "$(id -u)" = 0 ]; then chown postgres "$PG_DATA" || return 1; fi
    as_postgres "$PG_BIN/initdb" -D "$PG_DATA" -A trust -U postgres >/dev/null || return 1
    as_postgres "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$PG_DATA/server.log" -w \
        -o "-p $PG_PORT -k $PG_DATA -c listen_addresses=127.0.0.1" start >/dev/null || return 1
    trap 'as_postgres "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast stop >/dev/null 2>&1; rm -rf "$PG_DATA"' EXIT
    export HERETIC_TEST_POSTGRES="postgresql://postgres@127.0.0.1:$PG_PORT/postgres"
    echo "PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}') on $HERETIC_TEST_POSTGRES"
}
