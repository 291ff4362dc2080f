#!/usr/bin/env bash
# For a GPU machine without a package registry: downloads (on a Debian 12 machine with apt) the
# Debian packages that such a machine lacks into .carry/debs, to be copied along with the tree.
# deploy/gpu-env.sh unpacks them there under /tmp/epmoe-deps (never into /).
#   jansson, Check           the core build and the unit suites
#   protobuf-c, gRPC core    the service (epmoe-serve, epmoe-client) and their runtime libraries
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .carry/debs
cd .carry/debs
apt-get download libjansson4 libjansson-dev check libsubunit0 libsubunit-dev \
  libgrpc29 libgrpc-dev libabsl20220623 libc-ares2 libprotobuf32 libprotoc32 libre2-9 \
  libprotobuf-c1 libprotobuf-c-dev protobuf-c-compiler
