# Open MPI settings for running on ONE host (a laptop, CI, a container). Source it:
#   source deploy/mpi-env.sh
# - root is allowed (containers and CI run as root),
# - more ranks than cores is allowed (oversubscription: the 2-core CI machine runs 8 ranks),
# - shared-memory transport only (vader), without CMA single-copy (needs ptrace rights that
#   containers lack), and idle ranks yield their core.
# Across hosts use deploy/mpi-cluster.sh instead: this file forbids the network transports.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_rmaps_base_oversubscribe=1
export OMPI_MCA_btl_vader_single_copy_mechanism=none
export OMPI_MCA_btl=self,vader OMPI_MCA_pml=ob1
export OMPI_MCA_mpi_yield_when_idle=1
