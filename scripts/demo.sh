#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# The README's demo command: installs what is missing, builds the release preset's demo and
# samples the five basic UniDiffuser modes from the analytic Gaussian oracle.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cmake --preset release >/dev/null
cmake --build --preset release --target oracle_demo
./build/release/examples/oracle_demo
