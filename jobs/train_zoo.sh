#!/usr/bin/env bash
# Rebuild the whole embedded zoo into vitlens/models/zoo/ (CPU; each model <= 5 minutes on 2 cores).
#   bash jobs/train_zoo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
for config in jobs/zoo/*.toml; do
    .venv/bin/vitlens train --config "$config" --out vitlens/models/zoo
done
