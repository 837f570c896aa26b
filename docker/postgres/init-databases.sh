#!/bin/sh
# Runs once, on the first start of an empty PostgreSQL volume: one database per service so that
# Prefect's and MLflow's migrations never touch each other's tables.
set -eu
for db in "$PREFECT_DB" "$MLFLOW_DB"; do
  psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -c "CREATE DATABASE \"$db\" OWNER \"$POSTGRES_USER\";"
done
