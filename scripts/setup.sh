#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Installs the Debian packages unidiffuser needs to build, test, benchmark and fuzz, if missing.
# Prints what it installs; does nothing when everything is present.
# Usage: setup.sh [--compare]   (--onednn, from when oneDNN was optional, is accepted and ignored)
set -euo pipefail
packages=(cmake g++ make ccache libeigen3-dev nlohmann-json3-dev librandom123-dev doctest-dev
          libbenchmark-dev clang-14 libclang-rt-14-dev clang-format
          libopenmpi-dev openmpi-bin   # Open MPI: the data-parallel training test (mpirun -n 2)
          libstb-dev                   # stb_image_write: the shapes demo's PNG grids
          # oneDNN: the default CPU GEMM path (presets dev and release; preset eigen builds without).
          # Debian's dnnl-config.cmake calls find_package(OpenCL REQUIRED), so the OpenCL headers
          # and loader (a Recommends of libdnnl-dev, skipped by --no-install-recommends) as well.
          libdnnl-dev ocl-icd-opencl-dev)
# --compare: Debian's PyTorch for benchmarks/compare (not needed to build or test); without the
# pthread OpenBLAS (a Recommends-level choice) Debian's torch falls back to the reference BLAS.
if [ "${1:-}" = "--compare" ]; then packages+=(python3-torch python3-numpy libopenblas0-pthread); fi
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: all dependencies present"
  exit 0
fi
echo "setup: installing missing Debian packages: ${missing[*]}"
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "setup: not root and no sudo; install them by hand" >&2; exit 1; }
  sudo="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
echo "setup: done"
