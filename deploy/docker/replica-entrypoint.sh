#!/bin/sh
# A streaming replica of db-primary: cloned with pg_basebackup on first start.
set -eu
PGDATA=/var/lib/postgresql/data
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    until pg_isready -h db-primary -U postgres -q; do sleep 1; done
    pg_basebackup -h db-primary -U postgres -D "$PGDATA" -R -X stream -c fast
    chmod 700 "$PGDATA"
fi
exec postgres -c hot_standby=on -c hot_standby_feedback=on
