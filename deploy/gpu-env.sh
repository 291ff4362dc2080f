# Source THERE (the GPU machine): unpacks the carried .debs into /tmp/epmoe-deps (never into /)
# and points pkg-config, the linker and the loader at them.
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
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
export NCCL_NVLS_ENABLE=0
