#!/usr/bin/env bash
# The device check (see benchmarks/gpu_check.py): bash benchmarks/gpu_check.sh [--dry-run] [--out FILE]
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" benchmarks/gpu_check.py "$@"
