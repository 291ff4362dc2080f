# Open MPI (and NCCL) settings for running across hosts: a hostfile with mpirun, or Slurm.
# Source it instead of deploy/mpi-env.sh (which is for one host and forbids the network):
#   source deploy/mpi-cluster.sh
#   mpirun --hostfile hosts -np 16 --map-by ppr:8:node build/bin/epmoe-run ...
#   srun --mpi=pmix -N 2 --ntasks-per-node=8 build/bin/epmoe-run ...      (under Slurm)
# docs/operations.md explains each choice.
#
# Transport between hosts (EPMOE_FABRIC):
#   auto (default)  Open MPI chooses: the UCX PML where Open MPI has it and finds an
#                   InfiniBand/RoCE device, else ob1 with TCP between hosts, shared memory within
#   ucx             force UCX (InfiniBand/RoCE; UCX_NET_DEVICES picks the HCA port, e.g. mlx5_0:1)
#   tcp             force ob1 over TCP between hosts (and shared memory within a host)
# EPMOE_NET_IFACE   the IP interface for TCP and for Open MPI's own control traffic, e.g. eth0,
#                   or ib0 for IP over InfiniBand (unset: Open MPI picks); NCCL's bootstrap
#                   uses it too.
unset OMPI_MCA_btl OMPI_MCA_pml OMPI_MCA_rmaps_base_oversubscribe OMPI_MCA_mpi_yield_when_idle
unset OMPI_ALLOW_RUN_AS_ROOT OMPI_ALLOW_RUN_AS_ROOT_CONFIRM
# shared memory inside each host still works without CMA (containers)
export OMPI_MCA_btl_vader_single_copy_mechanism=none
case "${EPMOE_FABRIC:-auto}" in
  auto) ;;
  ucx) export OMPI_MCA_pml=ucx ;;
  tcp) export OMPI_MCA_pml=ob1 OMPI_MCA_btl=self,vader,tcp ;;
  *) echo "mpi-cluster.sh: EPMOE_FABRIC='${EPMOE_FABRIC}' is not auto, ucx or tcp" >&2; return 1 2>/dev/null || exit 1 ;;
esac
if [ -n "${EPMOE_NET_IFACE:-}" ]; then
  export OMPI_MCA_btl_tcp_if_include="$EPMOE_NET_IFACE" OMPI_MCA_oob_tcp_if_include="$EPMOE_NET_IFACE"
  export NCCL_SOCKET_IFNAME="$EPMOE_NET_IFACE"   # NCCL's bootstrap and socket transport
fi
# NCCL between hosts (backend=cuda): it uses InfiniBand/RoCE by itself when it finds an HCA
# (NCCL_IB_HCA=mlx5_0,mlx5_1 narrows the choice; NCCL_NET_GDR_LEVEL for GPUDirect RDMA), else
# sockets. NCCL_DEBUG=INFO prints what it chose.
