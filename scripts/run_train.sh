#!/usr/bin/env bash
# Launch training on one node: torchrun's options and agent through gptoss_titan.runtime.launcher,
# which hands the shell the workers' exit code (0 done, 2 bad input, 3 stopped, 128+N signal N)
# and one line instead of torchrun's traceback (TorchTitan's conventions otherwise).
#
#   ./scripts/run_train.sh                                    # debug model, bundled corpus
#   NGPU=8 CONFIG_FILE=train_configs/gpt_oss_20b.toml ./scripts/run_train.sh --training.steps=100
#
# Environment:
#   CONFIG_FILE  TOML config (default train_configs/debug_model.toml)
#   NGPU         processes on this node (default: visible CUDA GPUs, else 1 CPU process); more than
#                the GPUs present is an error; on CPU each process gets nproc / NGPU threads
#   LOG_RANK     ranks whose output reaches the console, comma separated (default 0)
#   MASTER_PORT  rendezvous port on localhost (default 29500)
#   STOP_GRACE   seconds the workers get to save after SIGTERM/SIGINT before they are killed (30)
#   COMM_MODE    fake_backend: one process builds the meshes and applies every pass for NGPU ranks
#                on a fake process group, prints per-rank memory, and exits without training
#                (passed on as the config field --comm.mode=fake_backend)
# Extra arguments are config overrides: --section.field=value.
set -euo pipefail

cd "$(dirname "$0")/.."
CONFIG_FILE=${CONFIG_FILE:-"./train_configs/debug_model.toml"}
GPUS=$(python -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
NGPU=${NGPU:-$(( GPUS > 0 ? GPUS : 1 ))}
LOG_RANK=${LOG_RANK:-0}
MASTER_PORT=${MASTER_PORT:-29500}

if [ "${GPUS}" -eq 0 ]; then
  # CPU: split the cores between the processes so they do not oversubscribe.
  cores=$(nproc)
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cores / NGPU > 0 ? cores / NGPU : 1 ))}
fi

# Check the config, data paths, process count and port first: a bad value is one line and exit 2,
# not a torchrun trace.
# A dry run plans memory only: it needs no data folder.
if [ "${COMM_MODE:-}" = "fake_backend" ]; then
  python -m gptoss_titan.config --config "${CONFIG_FILE}" --comm.mode=fake_backend "$@"
else
  python -m gptoss_titan.config --config "${CONFIG_FILE}" "$@"
fi
if [ "${COMM_MODE:-}" != "fake_backend" ]; then
  python -m gptoss_titan.runtime.launch --nproc "${NGPU}" --port "${MASTER_PORT}"
fi

if [ "${COMM_MODE:-}" = "fake_backend" ]; then
  exec env WORLD_SIZE="${NGPU}" RANK=0 LOCAL_RANK=0 \
    python -m gptoss_titan.train --config "${CONFIG_FILE}" --comm.mode=fake_backend "$@"
fi

exec python -m gptoss_titan.runtime.launcher --stop_grace="${STOP_GRACE:-30}" --nproc_per_node="${NGPU}" --rdzv_backend=c10d --rdzv_endpoint="localhost:${MASTER_PORT}" \
  --local-ranks-filter="${LOG_RANK}" \
  -m gptoss_titan.train --config "${CONFIG_FILE}" "$@"
