#!/usr/bin/env bash
# The GPU smoke check: the first thing to run on a machine with 1 to 8 GPUs (about 10 minutes).
#
#   ./scripts/gpu_smoke.sh            # every visible GPU (NGPU=N uses the first N)
#   ./scripts/gpu_smoke.sh --cpu      # the same steps, small, on CPU processes, no compile (CI runs this)
#
# Steps, each PASS or FAIL with its time and its figures, then one summary table; the exit code is
# 1 when any step failed. Outputs (logs, checkpoints, exports) stay in SMOKE_DIR
# (default outputs/gpu_smoke), one log per step.
#   cuda_tests  pytest -m cuda: flex attention backward vs the reference, grouped GEMM vs the loop at
#               20b's expert shapes in bf16 with an empty expert, the host-sync audit of a training
#               step on CUDA, the bf16 loss vs fp32, deterministic mode bit for bit, LoRA expert
#               adapters on grouped_mm at a rank whose rows are not 16 bytes (padded) vs the loop,
#               the MXFP4-resident LoRA base on grouped_mm vs the dequantized base
#   train       bf16, torch.compile, full activation checkpointing, async checkpoints with pinned
#               memory, experts split over 2 GPUs when there are 2 or more; then the same command
#               with more steps: it resumes from the last checkpoint
#   sample      greedy tokens from that run's checkpoint (scripts/generate.sh)
#   export      the checkpoint as a Hugging Face folder (bf16) that transformers loads and generates from
#   throughput  a 20b-shaped stack (4 layers; 2 on one GPU) at seq 4096: tokens/s per GPU and MFU
#   long_packed document masking (flex document block masks on CUDA) with context parallelism over
#               2 GPUs when there are 2 or more (the ring and halo exchanges on NCCL), compiled
#   tp_pp       tensor parallelism over 2 GPUs (even counts), with pipeline parallelism 2 (multiples of 4),
#               compiled, full activation checkpointing
set -uo pipefail
cd "$(dirname "$0")/.."

MODE=gpu
if [ "${1:-}" = "--cpu" ]; then MODE=cpu; fi
OUT=${SMOKE_DIR:-outputs/gpu_smoke}
rm -rf "${OUT}" && mkdir -p "${OUT}"
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-${OUT}/inductor}

if [ "${MODE}" = "gpu" ]; then
  GPUS=$(python -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
  if [ "${GPUS}" -eq 0 ]; then
    echo "error: no CUDA GPU visible; for the CPU version run ./scripts/gpu_smoke.sh --cpu" >&2
    exit 2
  fi
  export NGPU=${NGPU:-${GPUS}}
  DTYPE=bfloat16 SEQ=1024 BATCH=4 STEPS1=20 STEPS2=30 INTERVAL=10
  THROUGHPUT=(--model.flavor=20b "--model.args.n_layers=$([ "${NGPU}" -ge 2 ] && echo 4 || echo 2)"
              --training.seq_len=4096 --training.local_batch_size=1 --training.steps=12 --metrics.log_freq=4)
  EP=$([ "${NGPU}" -ge 2 ] && echo 2 || echo 1)
  COMPILE=true
  THROUGHPUT_EP=$(python -c "n=${NGPU}; print(max(e for e in (1, 2, 4, 8) if n % e == 0 and 32 % e == 0))")
else
  export NGPU=${NGPU:-2}
  # fp32: bf16 matmuls crawl on CPUs without native bf16 (AVX2 only); the code paths are the same
  DTYPE=float32 SEQ=128 BATCH=2 STEPS1=4 STEPS2=6 INTERVAL=2
  THROUGHPUT=(--model.flavor=debug --training.seq_len=512 --training.local_batch_size=2 --training.steps=4
              --metrics.log_freq=2)
  EP=2 THROUGHPUT_EP=2
  # no torch.compile on CPU (CI time: ~15 s per step; the test suite compiles on CPU elsewhere)
  COMPILE=false
fi

python - "${OUT}/data" <<'EOF'
import json, sys
from pathlib import Path
import numpy as np
out = Path(sys.argv[1]); out.mkdir(parents=True)
rng = np.random.default_rng(0)
phrases = rng.integers(0, 199_990, (64, 24))  # a learnable stream of repeated "sentences", o200k ids
for split, n in (("train", 400_000), ("val", 40_000)):
    phrases[rng.integers(0, 64, n // 24)].reshape(-1).astype(np.uint32).tofile(out / f"{split}.bin")
(out / "meta.json").write_text(json.dumps({"tokenizer": "synthetic", "vocab_size": 201088}))
EOF

NAMES=() STATUS=() SECONDS_TAKEN=() DETAILS=()
record() {  # name status seconds detail
  NAMES+=("$1"); STATUS+=("$2"); SECONDS_TAKEN+=("$3"); DETAILS+=("$4")
  echo "[gpu_smoke] $1: $2 ($3 s) $4"
}
last_metric() {  # metrics.jsonl key -> the last logged value
  python -c "import json,sys; rows=[json.loads(l) for l in open(sys.argv[1])]; \
v=[r[sys.argv[2]] for r in rows if sys.argv[2] in r]; print(f'{v[-1]:.4g}' if v else 'none')" "$1" "$2"
}

# 1. CUDA-only tests (on CPU they are all skipped, and the step says so)
t0=$SECONDS
if python -m pytest -q -m cuda tests -p no:cacheprovider > "${OUT}/cuda_tests.log" 2>&1; then st=PASS; else st=FAIL; fi
record cuda_tests "${st}" $((SECONDS - t0)) "$(tail -1 "${OUT}/cuda_tests.log")"

# 2. Train, then resume to more steps
TRAIN=(--model.flavor=debug "--data.dataset_path=${OUT}/data" "--job.dump_folder=${OUT}/train"
       "--training.mixed_precision_param=${DTYPE}" "--training.seq_len=${SEQ}" "--training.local_batch_size=${BATCH}"
       "--compile.enable=${COMPILE}" --activation_checkpoint.mode=full --checkpoint.enable=true
       --checkpoint.async_mode=async_with_pinned_mem "--checkpoint.interval=${INTERVAL}"
       "--parallelism.expert_parallel_degree=${EP}" --metrics.log_freq=2 --validation.steps=2
       "--validation.freq=${INTERVAL}" --metrics.sample_freq=0 --lr_scheduler.warmup_steps=2)
t0=$SECONDS
if ./scripts/run_train.sh "${TRAIN[@]}" "--training.steps=${STEPS1}" > "${OUT}/train.log" 2>&1 \
   && [ -d "${OUT}/train/checkpoint/step-${STEPS1}" ] \
   && ./scripts/run_train.sh "${TRAIN[@]}" "--training.steps=${STEPS2}" > "${OUT}/resume.log" 2>&1 \
   && grep -q "loaded .* from .*step-${STEPS1}" "${OUT}/resume.log" \
   && [ -d "${OUT}/train/checkpoint/step-${STEPS2}" ]; then st=PASS; else st=FAIL; fi
record train "${st}" $((SECONDS - t0)) "steps 1-${STEPS1}, resumed ${STEPS1}-${STEPS2}; loss $(last_metric "${OUT}/train/metrics.jsonl" loss), val $(last_metric "${OUT}/train/metrics.jsonl" val_loss)"

# 3. Sample from the checkpoint
t0=$SECONDS
if NGPU=1 ./scripts/generate.sh --checkpoint "${OUT}/train" --prompt "In the beginning" --max_new_tokens 16 \
     --output_json "${OUT}/sample.json" > "${OUT}/sample.log" 2>&1; then st=PASS; else st=FAIL; fi
record sample "${st}" $((SECONDS - t0)) "$(python -c "import json; print(len(json.load(open('${OUT}/sample.json'))['tokens'][0]), 'tokens')" 2>/dev/null)"

# 4. Export as a Hugging Face folder; transformers loads it and generates
t0=$SECONDS
if python scripts/convert_dcp_to_safetensors.py --checkpoint "${OUT}/train" --output "${OUT}/hf" > "${OUT}/export.log" 2>&1 \
   && python - "${OUT}/hf" >> "${OUT}/export.log" 2>&1 <<'EOF'
import sys, torch
from transformers import AutoModelForCausalLM
dev = "cuda" if torch.cuda.is_available() else "cpu"
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16).to(dev).eval()
out = m.generate(torch.tensor([[18049, 7557, 261, 1058]], device=dev), max_new_tokens=4, do_sample=False)
assert out.shape == (1, 8), out.shape
print("transformers generated", out[0, 4:].tolist())
EOF
then st=PASS; else st=FAIL; fi
record export "${st}" $((SECONDS - t0)) "$(tail -1 "${OUT}/export.log")"

# 5. Throughput of a 20b-shaped stack
t0=$SECONDS
if ./scripts/run_train.sh "${THROUGHPUT[@]}" "--data.dataset_path=${OUT}/data" "--job.dump_folder=${OUT}/throughput" \
     "--training.mixed_precision_param=${DTYPE}" "--compile.enable=${COMPILE}" --activation_checkpoint.mode=full \
     "--parallelism.expert_parallel_degree=${THROUGHPUT_EP}" --validation.enable=false --metrics.sample_freq=0 \
     > "${OUT}/throughput.log" 2>&1; then st=PASS; else st=FAIL; fi
M="${OUT}/throughput/metrics.jsonl"
MEM=$([ "${MODE}" = gpu ] && echo mem_max_reserved_gib || echo mem_peak_rss_gib)
record throughput "${st}" $((SECONDS - t0)) "$(last_metric "${M}" tokens_per_s_per_device) tokens/s per device, MFU $(last_metric "${M}" mfu_pct)%, peak memory $(last_metric "${M}" "${MEM}") GiB"

# 6. Long and packed sequences: document masking, context parallelism (cp 2 with 2+ processes)
CP=$([ "${NGPU}" -ge 2 ] && echo 2 || echo 1)
t0=$SECONDS
if ./scripts/run_train.sh --model.flavor=debug "--data.dataset_path=${OUT}/data" "--job.dump_folder=${OUT}/long_packed" \
     "--training.mixed_precision_param=${DTYPE}" "--training.seq_len=$((SEQ * 4))" --training.local_batch_size=1 \
     --training.steps=4 --training.document_mask=true "--parallelism.context_parallel_degree=${CP}" \
     "--compile.enable=${COMPILE}" --metrics.log_freq=2 --validation.steps=1 --validation.freq=4 --metrics.sample_freq=0 \
     > "${OUT}/long_packed.log" 2>&1; then st=PASS; else st=FAIL; fi
record long_packed "${st}" $((SECONDS - t0)) "cp ${CP}, seq $((SEQ * 4)); loss $(last_metric "${OUT}/long_packed/metrics.jsonl" loss), val $(last_metric "${OUT}/long_packed/metrics.jsonl" val_loss)"

# 7. Tensor parallelism (tp 2 with an even number of processes), pipeline parallelism with it (pp 2 x tp 2
#    with a multiple of 4)
TP=$([ $((NGPU % 2)) -eq 0 ] && echo 2 || echo 1)
PPD=$([ $((NGPU % 4)) -eq 0 ] && echo 2 || echo 1)
t0=$SECONDS
if ./scripts/run_train.sh --model.flavor=debug "--data.dataset_path=${OUT}/data" "--job.dump_folder=${OUT}/tp_pp" \
     "--training.mixed_precision_param=${DTYPE}" "--training.seq_len=${SEQ}" --training.local_batch_size=1 \
     --training.global_batch_size=$((2 * NGPU / (TP * PPD))) --training.steps=4 "--compile.enable=${COMPILE}" \
     --activation_checkpoint.mode=full "--parallelism.tensor_parallel_degree=${TP}" \
     "--parallelism.pipeline_parallel_degree=${PPD}" --metrics.log_freq=2 --validation.steps=2 \
     --validation.freq=4 --metrics.sample_freq=0 > "${OUT}/tp_pp.log" 2>&1; then st=PASS; else st=FAIL; fi
record tp_pp "${st}" $((SECONDS - t0)) "tp ${TP}, pp ${PPD}; loss $(last_metric "${OUT}/tp_pp/metrics.jsonl" loss), val $(last_metric "${OUT}/tp_pp/metrics.jsonl" val_loss)"

echo
echo "gpu_smoke (${MODE}, ${NGPU} processes, $(python -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")'))"
printf '%-12s %-6s %7s  %s\n' step status seconds detail
failed=0
for i in "${!NAMES[@]}"; do
  printf '%-12s %-6s %7s  %s\n' "${NAMES[$i]}" "${STATUS[$i]}" "${SECONDS_TAKEN[$i]}" "${DETAILS[$i]}"
  [ "${STATUS[$i]}" = PASS ] || failed=1
done
exit ${failed}
