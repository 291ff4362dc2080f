#!/usr/bin/env bash
# For a GPU machine that lacks jansson and Check and cannot install packages: run this on a
# Debian machine with apt, from the repository root. It downloads their .debs into .carry/debs;
# copy that folder into the GPU machine's checkout, where deploy/gpu-env.sh unpacks them.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .carry/debs
cd .carry/debs
apt-get download libjansson4 libjansson-dev check libsubunit0 libsubunit-dev
