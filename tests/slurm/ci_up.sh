#!/usr/bin/env bash
# CI hook, called by .ci/run before `make test`: start the two-node SLURM test cluster, so the SLURM tests
# (tests/test_slurm_cluster.py) really run in CI instead of skipping. CI runs as root with apt; if the cluster
# cannot start there, CI fails here with the reason (set HIBARI_SLURM_OPTIONAL=1 to continue and let the tests
# skip instead). .ci/run stops the cluster on exit with `bash tests/slurm/cluster.sh down`.
set -uo pipefail
cd "$(dirname "$0")/../.."
if bash tests/slurm/cluster.sh up >/dev/null; then
    echo "ci_up: SLURM test cluster running (${HIBARI_SLURM_DIR:-/tmp/hibari-slurm})"
    exit 0
fi
echo "ci_up: the SLURM test cluster did not start (see the cluster.sh messages above)" >&2
if [[ "${HIBARI_SLURM_OPTIONAL:-0}" == 1 ]]; then
    echo "ci_up: HIBARI_SLURM_OPTIONAL=1: continuing; the SLURM cluster tests will be skipped" >&2
    exit 0
fi
exit 1
