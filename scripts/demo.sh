#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# The README's demo command: installs what is missing, builds the release preset's
# unidiffuser-shapes and runs it on the committed checkpoint (examples/shapes/shapes.safetensors):
# all seven UniDiffuser modes sampled and scored, the quality table printed, PNG grids and
# report.md / report.json written to shapes-out/ (docs/SHAPES.md). Arguments are passed on
# (e.g. --full, --out DIR, --retrain).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cmake --preset release >/dev/null
cmake --build --preset release --target unidiffuser-shapes
./build/release/examples/unidiffuser-shapes "$@"
