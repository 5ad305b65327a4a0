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
LOG_RANK=${LOG_RANK:-0}
MASTER_PORT=${MASTER_PORT:-29500}

# A dry run plans memory only (one process, no data folder, no port).
if [ "${COMM_MODE:-}" = "fake_backend" ]; then
  NGPU=${NGPU:-$(python -c "import torch; print(max(torch.cuda.device_count() if torch.cuda.is_available() else 0, 1))")}
  python -m gptoss_titan.config --config "${CONFIG_FILE}" --comm.mode=fake_backend "$@"
  exec env WORLD_SIZE="${NGPU}" RANK=0 LOCAL_RANK=0 \
    python -m gptoss_titan.train --config "${CONFIG_FILE}" --comm.mode=fake_backend "$@"
fi

# The launcher checks the config and its data folders, NGPU (default: the visible GPUs, else 1 CPU
# process, each with nproc / NGPU threads) and the port first: a bad value is one line and exit 2,
# not a torchrun trace.
exec python -m gptoss_titan.runtime.launcher --preflight=gptoss_titan.config:check_before_launch --ngpu="${NGPU:-}" \
  --stop_grace="${STOP_GRACE:-30}" --rdzv_backend=c10d --rdzv_endpoint="localhost:${MASTER_PORT}" \
  --local-ranks-filter="${LOG_RANK}" \
  -m gptoss_titan.train --config "${CONFIG_FILE}" "$@"
