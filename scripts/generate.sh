#!/usr/bin/env bash
# Generate text from a checkpoint (--checkpoint) or a Hugging Face folder (--hf) on NGPU processes.
#
#   ./scripts/generate.sh --checkpoint outputs/debug --prompt "In the beginning" --max_new_tokens 64
#   NGPU=2 ./scripts/generate.sh --hf hf/debug --prompt "Hi" --chat --temperature 0.8 --top_p 0.95
#   NGPU=4 ./scripts/generate.sh --flavor 120b --plan --dtype bfloat16   # memory per rank, no weights read
set -euo pipefail
cd "$(dirname "$0")/.."
NGPU=${NGPU:-1}
if [ "${NGPU}" = "1" ]; then
  exec python -m gptoss_titan.sample "$@"
fi
for arg in "$@"; do  # --plan: one process counts what each of NGPU ranks would hold (a fake process group)
  if [ "${arg}" = "--plan" ]; then exec env WORLD_SIZE="${NGPU}" python -m gptoss_titan.sample "$@"; fi
done
cores=$(nproc)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cores / NGPU > 0 ? cores / NGPU : 1 ))}
exec python -m gptoss_titan.runtime.launcher --nproc_per_node="${NGPU}" --rdzv_backend=c10d --rdzv_endpoint="localhost:${MASTER_PORT:-29510}" \
  --local-ranks-filter=0 -m gptoss_titan.sample "$@"
