#!/usr/bin/env bash
# Run HERE (a machine with apt): downloads the Debian packages that the GPU machine lacks
# (jansson and Check) into .carry/debs, to be carried to the device with `carry: [.carry]`.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .carry/debs
cd .carry/debs
apt-get download libjansson4 libjansson-dev check libsubunit0 libsubunit-dev
