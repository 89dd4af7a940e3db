# ROCm / RCCL settings for LUMI-G-style nodes (sourced by the amd-*.sbatch scripts).
# Check them against your site's documentation; these are the values LUMI documents.

# RCCL over the Slingshot interfaces, with GPU-direct RDMA to each GCD's own NIC.
export NCCL_SOCKET_IFNAME=hsn0,hsn1,hsn2,hsn3
export NCCL_NET_GDR_LEVEL=PHB
# libfabric (CXI) settings for forked data-loader workers and large jobs.
export CXI_FORK_SAFE=1
export CXI_FORK_SAFE_HP=1
export FI_CXI_DISABLE_CQ_HUGETLB=1
export FI_CXI_DEFAULT_CQ_SIZE=131072
# MIOpen's kernel cache breaks on Lustre (file locks): keep it node-local.
export MIOPEN_USER_DB_PATH="/tmp/${USER}-miopen-cache-${SLURM_JOB_ID}-${SLURM_NODEID:-0}"
export MIOPEN_CUSTOM_CACHE_DIR=$MIOPEN_USER_DB_PATH
# 7 cores per task (one core per CCD is reserved for the OS on LUMI-G).
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-7}
# Uncomment to see RCCL's set-up (which interfaces and transports it picked):
# export NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT,NET

# GCD i of a LUMI-G node is closest to these cores (one 8-core CCD each, first core reserved).
CPU_BIND="mask_cpu:fe000000000000,fe00000000000000,fe0000,fe000000,fe,fe00,fe00000000,fe0000000000"

# Each task sees only GCD $SLURM_LOCALID (the trainer then uses its device 0).
SELECT_GPU="$PWD/scripts/slurm/select-gpu.sh"
