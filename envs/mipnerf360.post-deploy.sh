#!/usr/bin/env bash
# Run by Snakemake inside the freshly created conda env: install this checkout's package
# (dependencies come from mipnerf360.yaml). $0 is this file, so the repo is one level up.
set -euo pipefail
python -m pip install --no-deps -e "$(cd "$(dirname "$0")/.." && pwd)"
