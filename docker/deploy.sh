#!/bin/sh
# Registers the deployments of flows/prefect.yaml against $PREFECT_API_URL: first the work pools they
# name (`prefect deploy` does not create pools, and a missing one stops it half-way), then every
# deployment. Idempotent: safe to run again after an upgrade. Run from the repository (or image /app)
# root. Pool "cpu": ingest-daily, score-daily, promote, pipeline (the CPU worker); pool "gpu":
# train-weekly (the GPU worker, one run at a time).
set -eu
for pool in cpu gpu; do
  prefect --no-prompt work-pool create "$pool" --type process --overwrite
done
prefect --no-prompt deploy --all --prefect-file flows/prefect.yaml
