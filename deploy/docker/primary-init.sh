#!/bin/sh
# /docker-entrypoint-initdb.d/: let the replica connect for replication.
# trust is for this demo network only; use scram-sha-256 and a password in production.
set -eu
echo "host replication all all trust" >>"$PGDATA/pg_hba.conf"
