#!/usr/bin/env bash
# One node, N ranks: a thin wrapper around torchrun.
#   launch/local.sh train --config configs/digits_fedavg.yaml [key=value ...]
#   NPROC=4 launch/local.sh train --config configs/celeba_fedavg.yaml
# NPROC defaults to the number of GPUs, or 2 on a CPU-only machine (one gloo rank per core pair).
set -euo pipefail
PYTHON=${PYTHON:-python3}
if [[ -z "${NPROC:-}" ]]; then
  NPROC=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 2)')
fi
# CPU ranks spin-wait in OpenMP by default, which starves the other ranks on a small machine.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" -m fedrun "$@"
