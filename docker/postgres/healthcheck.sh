#!/bin/sh
# Healthy only when the server accepts TCP connections (-h: the entrypoint's temporary initdb server
# listens on the socket only) AND both databases exist and answer a query as the configured user:
# pg_isready alone succeeds even when the database or the user is missing.
set -eu
export PGPASSWORD="$POSTGRES_PASSWORD"
host="${PGHOST_CHECK:-127.0.0.1}"
port="${PGPORT_CHECK:-5432}"
pg_isready -q -h "$host" -p "$port" -U "$POSTGRES_USER" -d "$MLFLOW_DB"
for db in "$PREFECT_DB" "$MLFLOW_DB"; do
  test "$(psql -h "$host" -p "$port" -U "$POSTGRES_USER" -d "$db" -tAc 'select 1')" = 1
done
