# Source on the GPU machine, from the repository root: unpacks the .debs of .carry/debs, if any
# (deploy/gpu-deps.sh), into /tmp/epmoe-deps (never into /) and points pkg-config, the linker
# and the loader at them; sets Open MPI up for one host and finds NCCL.
#   source deploy/gpu-env.sh
_epmoe_root=/tmp/epmoe-deps
if [ ! -d "$_epmoe_root/usr" ]; then
  mkdir -p "$_epmoe_root"
  for f in .carry/debs/*.deb; do [ -e "$f" ] && dpkg -x "$f" "$_epmoe_root"; done
  _lib="$_epmoe_root/usr/lib/x86_64-linux-gnu"
  # .pc files say prefix=/usr: rewrite them to the unpacked tree.
  for pc in "$_lib"/pkgconfig/*.pc; do
    [ -f "$pc" ] && sed -i "s#^prefix=/usr#prefix=$_epmoe_root/usr#; s#^libdir=/usr#libdir=$_epmoe_root/usr#; s#^includedir=/usr#includedir=$_epmoe_root/usr#" "$pc"
  done
fi
export PKG_CONFIG_PATH="$_epmoe_root/usr/lib/x86_64-linux-gnu/pkgconfig:${PKG_CONFIG_PATH:-}"
export LIBRARY_PATH="$_epmoe_root/usr/lib/x86_64-linux-gnu:${LIBRARY_PATH:-}"
export LD_LIBRARY_PATH="$_epmoe_root/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"
export CPATH="$_epmoe_root/usr/include:$_epmoe_root/usr/include/x86_64-linux-gnu:${CPATH:-}"
export PATH="$_epmoe_root/usr/bin:$PATH"
# CMake's find_path/find_library look here too (gRPC without its pkg-config chain)
export CMAKE_PREFIX_PATH="$_epmoe_root/usr:${CMAKE_PREFIX_PATH:-}"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
export NCCL_NVLS_ENABLE=0
# NCCL: the CUDA toolkit's when it has nccl.h, else pip's nvidia-nccl (PyTorch brings it),
# else none (the NCCL transport is then not built). EPMOE_NCCL_ROOT is empty for the toolkit's.
EPMOE_NCCL_ROOT=""
if command -v nvcc >/dev/null && [ ! -e "$(dirname "$(command -v nvcc)")/../include/nccl.h" ]; then
  EPMOE_NCCL_ROOT=$(python3 -c 'import nvidia.nccl as m; print(list(m.__path__)[0])' 2>/dev/null || true)
fi
[ -n "$EPMOE_NCCL_ROOT" ] && export LD_LIBRARY_PATH="$EPMOE_NCCL_ROOT/lib:$LD_LIBRARY_PATH"
export EPMOE_NCCL_ROOT
# The build needs jansson (and Check, protobuf-c, gRPC for the suites and the service): say so
# now, not after a cmake error, when neither the machine nor .carry/debs brings it.
if ! pkg-config --exists jansson 2>/dev/null; then
  echo "gpu-env: jansson not found and no .carry/debs here: run 'bash deploy/gpu-deps.sh' on a" \
       "machine with apt and bring .carry along with the tree" >&2
fi
