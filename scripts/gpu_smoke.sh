#!/usr/bin/env bash
# The GPU smoke check: the first thing to run when a GPU is lent, built for one GPU and a short slot.
#
#   ./scripts/gpu_smoke.sh            # every visible GPU (NGPU=N uses the first N)
#   ./scripts/gpu_smoke.sh --cpu      # the same steps, small, on 2 CPU processes, no compile (CI runs this)
#
# Output: ${SMOKE_DIR:-${OUT:-outputs}/gpu_smoke} (one log per step). summary.txt there gets each
# step's line as soon as the step ends, so a run cut off by its slot still leaves what it measured;
# the final table is also written as summary.json.
# Steps run in order of value, each under its own time limit and all within SMOKE_BUDGET seconds
# (default 480; --cpu: 1800, and 4x the caps): a step that would start with less than 30 s left is
# SKIP (budget), a step that needs more GPUs than there are is SKIP (needs N), never PASS. Exit
# code 1 when a step FAILed (a timeout included).
#   cuda_tests   pytest -m cuda (cap 150 s): flex attention backward vs the reference, grouped GEMM
#                vs the loop at 20b's expert shapes in bf16 with an empty expert, the host-sync audit
#                of a training step on CUDA, the bf16 loss vs fp32, deterministic mode bit for bit,
#                LoRA expert adapters on grouped_mm at a rank whose rows are not 16 bytes (padded)
#                vs the loop, the MXFP4-resident LoRA base on grouped_mm vs the dequantized base,
#                context parallelism's flex block pairs vs the math kernel (forward, recomputing
#                backward, document masks, rows without keys) and their memory vs the piece length
#   train        (cap 150 s) bf16, torch.compile, full AC, async checkpoints with pinned memory,
#                FSDP2 + DTensor + DCP through a process group (parallelism.fsdp_one_process on one
#                GPU; EP 2 on 2 or more); then resumed to more steps from its last checkpoint
#   sync_debug   (cap 90 s) a bf16 training step (FSDP2, grouped experts, document masks, balancing)
#                under torch.cuda.set_sync_debug_mode("error"): any call that waits for the GPU fails
#   throughput   (cap 120 s) a 20b-shaped stack (20b's widths and 32 experts, 4 layers, a 32,768-token
#                vocabulary so the lm_head is ~16% of the FLOPs, not 70% as with 201,088 on 2
#                layers), seq 4,096, full AC, compiled, bf16: tokens/s per GPU, MFU, peak memory
#   lora_mxfp4   (cap 90 s) the train step's checkpoint exported as MXFP4, then LoRA on it as an
#                MXFP4-resident base (experts dequantized per layer on the GPU)
#   sample       (cap 60 s) greedy tokens from the train step's checkpoint (scripts/generate.sh)
#   export       (cap 90 s) that checkpoint as a Hugging Face folder that transformers loads and runs
#   grpo         (cap 60 s) GRPO from that checkpoint (rollouts, rewards, 2 updates per batch): the old
#                log-probs must equal the trained ones (old_logprob_diff_max 0); reports the decode
#                path's difference in the compute dtype and generation / training tokens/s
#   long_packed  (cap 90 s) document masking (flex document block masks, compiled), seq 4 x 1,024
#   cp           (cap 90 s, needs 2) the same with context parallelism 2 (ring and halo on NCCL)
#   tp_pp        (cap 90 s, needs 2) tensor parallelism 2, with pipeline parallelism 2 on 4 or more
# Time: on one GPU the caps of the first six steps add up to 660 s and the budget ends the run at
# 480 s (later steps: SKIP (budget)), each step killed at its own limit. Not yet measured on a GPU:
# estimated from the CPU version's step times and cold-cache compiles of tens of seconds per
# compiled run (docs/gpus.md).
set -uo pipefail
cd "$(dirname "$0")/.."

MODE=gpu
if [ "${1:-}" = "--cpu" ]; then MODE=cpu; fi
SMOKE=${SMOKE_DIR:-${OUT:-outputs}/gpu_smoke}
rm -rf "${SMOKE}" && mkdir -p "${SMOKE}"
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-${SMOKE}/inductor}
BUDGET=${SMOKE_BUDGET:-$([ "${MODE}" = gpu ] && echo 480 || echo 1800)}
SCALE=$([ "${MODE}" = gpu ] && echo 1 || echo 4)  # CPU processes are slower: caps x 4 (the budget too)
START=$SECONDS

if [ "${MODE}" = "gpu" ]; then
  GPUS=$(python -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
  if [ "${GPUS}" -eq 0 ]; then
    echo "error: no CUDA GPU visible; for the CPU version run ./scripts/gpu_smoke.sh --cpu" >&2
    exit 2
  fi
  export NGPU=${NGPU:-${GPUS}}
  DTYPE=bfloat16 SEQ=1024 BATCH=4 STEPS1=20 STEPS2=30 INTERVAL=10 COMPILE=true
  THROUGHPUT=(--model.flavor=20b --model.args.n_layers=4 --model.args.vocab_size=32768 --training.seq_len=4096
              --training.local_batch_size=1 --training.steps=12 --metrics.log_freq=4)
  THROUGHPUT_EP=$(python -c "n=${NGPU}; print(max(e for e in (1, 2, 4, 8) if n % e == 0 and 32 % e == 0))")
  MEM=mem_max_reserved_gib
else
  export NGPU=${NGPU:-2}
  # fp32: bf16 matmuls crawl on CPUs without native bf16 (AVX2 only); the code paths are the same.
  # No torch.compile on CPU (CI time: ~15 s per step; the test suite compiles on CPU elsewhere).
  DTYPE=float32 SEQ=128 BATCH=2 STEPS1=4 STEPS2=6 INTERVAL=2 COMPILE=false
  THROUGHPUT=(--model.flavor=debug --model.args.vocab_size=32768 --training.seq_len=512
              --training.local_batch_size=2 --training.steps=4 --metrics.log_freq=2)
  THROUGHPUT_EP=2
  MEM=mem_peak_rss_gib
fi
# a free rendezvous port unless one is given (another run on this host may hold the default 29500)
export MASTER_PORT=${MASTER_PORT:-$(python -c "import socket; s = socket.socket(); s.bind(('', 0)); print(s.getsockname()[1])")}
EP=$([ "${NGPU}" -ge 2 ] && echo 2 || echo 1)
ONE=$([ "${NGPU}" -eq 1 ] && echo true || echo false)  # FSDP2 and DCP with a group on one GPU too

python - "${SMOKE}" <<'EOF'
import json, sys
from pathlib import Path
import numpy as np
root = Path(sys.argv[1])
rng = np.random.default_rng(0)
for name, vocab in (("data", 201088), ("data32k", 32768)):
    out = root / name
    out.mkdir(parents=True)
    phrases = rng.integers(0, min(vocab, 199_990), (64, 24))  # a learnable stream of repeated "sentences"
    for split, n in (("train", 400_000), ("val", 40_000)):
        phrases[rng.integers(0, 64, n // 24)].reshape(-1).astype(np.uint32).tofile(out / f"{split}.bin")
    (out / "meta.json").write_text(json.dumps({"tokenizer": "synthetic", "vocab_size": vocab}))
EOF

NAMES=() STATUS=() SECONDS_TAKEN=() DETAILS=()
record() {  # name status seconds detail
  NAMES+=("$1"); STATUS+=("$2"); SECONDS_TAKEN+=("$3"); DETAILS+=("$4")
  echo "[gpu_smoke] $1: $2 ($3 s) $4" | tee -a "${SMOKE}/summary.txt"
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "${SMOKE}/summary.tsv"
}
last_metric() {  # metrics.jsonl key -> the last logged value
  python -c "import json,sys; rows=[json.loads(l) for l in open(sys.argv[1])]; \
v=[r[sys.argv[2]] for r in rows if sys.argv[2] in r]; print(f'{v[-1]:.4g}' if v else 'none')" "$1" "$2" 2>/dev/null
}
# step NAME CAP NEEDS -> 0 when the step should run (LIMIT set to its time limit); else records SKIP
step() {
  local left=$((BUDGET - (SECONDS - START)))
  if [ "${NGPU}" -lt "$3" ]; then record "$1" SKIP 0 "(needs $3 $([ "${MODE}" = gpu ] && echo GPUs || echo processes))"; return 1; fi
  if [ "${left}" -lt 30 ]; then record "$1" SKIP 0 "(budget: ${left} s left of ${BUDGET})"; return 1; fi
  local cap=$(( $2 * SCALE ))
  LIMIT=$(( cap < left ? cap : left ))
  T0=$SECONDS
}
run() {  # run LOG CMD... under the step's limit
  local log=$1; shift
  timeout --signal=TERM --kill-after=15 "${LIMIT}" "$@" >> "${SMOKE}/${log}" 2>&1
}
verdict() {  # exit status -> PASS / FAIL / TIMEOUT
  case $1 in 0) echo PASS;; 124|137) echo "FAIL(timeout ${LIMIT}s)";; *) echo FAIL;; esac
}

# 1. CUDA-only tests
if step cuda_tests 150 1; then
  if [ "${MODE}" = gpu ]; then
    run cuda_tests.log python -m pytest -q -m cuda tests -p no:cacheprovider; st=$(verdict $?)
    record cuda_tests "${st}" $((SECONDS - T0)) "$(tail -1 "${SMOKE}/cuda_tests.log")"
  else
    record cuda_tests SKIP 0 "(no GPU: the CUDA tests skip themselves on CPU)"
  fi
fi

# 2. Train (FSDP2 + DCP through a process group), then resume to more steps
TRAIN=(--model.flavor=debug "--data.dataset_path=${SMOKE}/data" "--job.dump_folder=${SMOKE}/train"
       "--training.mixed_precision_param=${DTYPE}" "--training.seq_len=${SEQ}" "--training.local_batch_size=${BATCH}"
       "--compile.enable=${COMPILE}" --activation_checkpoint.mode=full --checkpoint.enable=true
       --checkpoint.async_mode=async_with_pinned_mem "--checkpoint.interval=${INTERVAL}"
       "--parallelism.expert_parallel_degree=${EP}" "--parallelism.fsdp_one_process=${ONE}" --metrics.log_freq=2
       --validation.steps=2 "--validation.freq=${INTERVAL}" --metrics.sample_freq=0 --lr_scheduler.warmup_steps=2)
if step train 150 1; then
  run train.log ./scripts/run_train.sh "${TRAIN[@]}" "--training.steps=${STEPS1}" \
    && [ -d "${SMOKE}/train/checkpoint/step-${STEPS1}" ] \
    && run resume.log ./scripts/run_train.sh "${TRAIN[@]}" "--training.steps=${STEPS2}" \
    && grep -q "loaded .* from .*step-${STEPS1}" "${SMOKE}/resume.log" \
    && [ -d "${SMOKE}/train/checkpoint/step-${STEPS2}" ]; st=$(verdict $?)
  record train "${st}" $((SECONDS - T0)) "FSDP2 over ${NGPU}, ep ${EP}; steps 1-${STEPS1}, resumed ${STEPS1}-${STEPS2}; loss $(last_metric "${SMOKE}/train/metrics.jsonl" loss), val $(last_metric "${SMOKE}/train/metrics.jsonl" val_loss)"
fi

# 3. A training step that must not wait for the GPU anywhere (CUDA's sync debug mode)
if step sync_debug 90 1; then
  if [ "${MODE}" = gpu ]; then
    cat > "${SMOKE}/sync_debug.py" <<'EOF'
import sys
import torch
from gptoss_titan.config import parse_args
from gptoss_titan.runtime.distributed import apply_process_settings
from gptoss_titan.train import Trainer

cfg = parse_args(sys.argv[1:])
apply_process_settings(cfg)
tr = Trainer(cfg)
tr.train_step()  # warm-up: AdamW state, compiled kernels
batches = [tr.train_loader.next_batch() for _ in range(tr.accum_steps)]  # host data
torch.cuda.synchronize()
torch.cuda.set_sync_debug_mode("error")
tr.train_module(batches, tr.step)
torch.cuda.set_sync_debug_mode("default")
torch.cuda.synchronize()
print("a training step with no synchronizing CUDA call")
EOF
    run sync_debug.log python "${SMOKE}/sync_debug.py" --model.flavor=debug "--data.dataset_path=${SMOKE}/data" \
      "--job.dump_folder=${SMOKE}/sync_debug" --training.mixed_precision_param=bfloat16 "--training.seq_len=${SEQ}" \
      --training.local_batch_size=2 --training.global_batch_size=4 --training.document_mask=true \
      --model.load_balance_bias=true --model.balanced_routing=1.0 --parallelism.fsdp_one_process=true \
      --validation.enable=false \
      --metrics.sample_freq=0; st=$(verdict $?)
    record sync_debug "${st}" $((SECONDS - T0)) "$(tail -1 "${SMOKE}/sync_debug.log")"
  else
    record sync_debug SKIP 0 "(no GPU: the host-sync audit covers it on CPU, tests/train/test_trainer.py)"
  fi
fi

# 4. Throughput of a 20b-shaped stack
if step throughput 120 1; then
  run throughput.log ./scripts/run_train.sh "${THROUGHPUT[@]}" "--data.dataset_path=${SMOKE}/data32k" \
    "--job.dump_folder=${SMOKE}/throughput" "--training.mixed_precision_param=${DTYPE}" "--compile.enable=${COMPILE}" \
    --activation_checkpoint.mode=full "--parallelism.expert_parallel_degree=${THROUGHPUT_EP}" \
    --validation.enable=false --metrics.sample_freq=0; st=$(verdict $?)
  M="${SMOKE}/throughput/metrics.jsonl"
  SHARE=$(python -c "import json,sys; r=[json.loads(l) for l in open(sys.argv[1])]; a=json.load(open(sys.argv[2])); \
print(f\"{600 * a['dim'] * a['vocab_size'] / r[0]['flops_per_token']:.0f}\")" "${M}" "${SMOKE}/throughput/model_args.json" 2>/dev/null)
  record throughput "${st}" $((SECONDS - T0)) "$(last_metric "${M}" tokens_per_s_per_device) tokens/s per device, MFU $(last_metric "${M}" mfu_pct)%, peak memory $(last_metric "${M}" "${MEM}") GiB (lm_head ${SHARE:-?}% of the FLOPs)"
fi

# 5. LoRA on an MXFP4-resident base (the train step's model, exported as MXFP4)
if step lora_mxfp4 90 1; then
  run lora_mxfp4.log python scripts/convert_dcp_to_safetensors.py --checkpoint "${SMOKE}/train" \
      --output "${SMOKE}/hf_mxfp4" --quantize mxfp4 \
    && run lora_mxfp4.log ./scripts/run_train.sh --model.flavor=debug "--data.dataset_path=${SMOKE}/data" \
      "--job.dump_folder=${SMOKE}/lora" "--training.mixed_precision_param=${DTYPE}" "--training.seq_len=${SEQ}" \
      --training.local_batch_size=2 --training.steps=4 --lora.rank=8 --lora.targets=attention,experts \
      --lora.base_format=mxfp4 "--checkpoint.initial_load_path=${SMOKE}/hf_mxfp4" --checkpoint.initial_load_format=hf \
      --activation_checkpoint.mode=full --metrics.log_freq=2 --validation.enable=false --metrics.sample_freq=0 \
      --model.load_balance_bias=true; st=$(verdict $?)
  record lora_mxfp4 "${st}" $((SECONDS - T0)) "rank 8, MXFP4 base; loss $(last_metric "${SMOKE}/lora/metrics.jsonl" loss), peak memory $(last_metric "${SMOKE}/lora/metrics.jsonl" "${MEM}") GiB"
fi

# 6. Sample from the checkpoint
if step sample 60 1; then
  NGPU=1 run sample.log ./scripts/generate.sh --checkpoint "${SMOKE}/train" --prompt "In the beginning" \
    --max_new_tokens 16 --output_json "${SMOKE}/sample.json"; st=$(verdict $?)
  record sample "${st}" $((SECONDS - T0)) "$(python -c "import json; print(len(json.load(open('${SMOKE}/sample.json'))['tokens'][0]), 'tokens')" 2>/dev/null)"
fi

# 7. Export as a Hugging Face folder; transformers loads it and generates
if step export 90 1; then
  cat > "${SMOKE}/hf_check.py" <<'EOF'
import sys, torch
from transformers import AutoModelForCausalLM
dev = "cuda" if torch.cuda.is_available() else "cpu"
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16).to(dev).eval()
out = m.generate(torch.tensor([[18049, 7557, 261, 1058]], device=dev), max_new_tokens=4, do_sample=False)
assert out.shape == (1, 8), out.shape
print("transformers generated", out[0, 4:].tolist())
EOF
  run export.log python scripts/convert_dcp_to_safetensors.py --checkpoint "${SMOKE}/train" --output "${SMOKE}/hf" \
    && run export.log python "${SMOKE}/hf_check.py" "${SMOKE}/hf"; st=$(verdict $?)
  record export "${st}" $((SECONDS - T0)) "$(tail -1 "${SMOKE}/export.log")"
fi

# 8. GRPO (reinforcement learning) from the train step's checkpoint: rollouts with the KV cache,
# the old log-probs equal to the trained ones, the decode path's difference in the compute dtype
if step grpo 60 1; then
  CONFIG_FILE=train_configs/grpo_debug.toml run grpo.log ./scripts/run_train.sh "--job.dump_folder=${SMOKE}/grpo" \
    "--checkpoint.initial_load_path=${SMOKE}/train/checkpoint" "--training.mixed_precision_param=${DTYPE}" \
    --training.steps=2 --rl.prompts_per_step=2 --rl.group_size=4 --rl.max_new_tokens=8 --rl.updates_per_batch=2 \
    --training.local_batch_size=4 --checkpoint.enable=false "--parallelism.expert_parallel_degree=${EP}" \
    "--parallelism.fsdp_one_process=${ONE}" --model.load_balance_bias=true; st=$(verdict $?)
  G="${SMOKE}/grpo/metrics.jsonl"
  [ "$(last_metric "${G}" old_logprob_diff_max)" = "0" ] || st=FAIL
  record grpo "${st}" $((SECONDS - T0)) "old_logprob_diff_max $(last_metric "${G}" old_logprob_diff_max), decode vs forward $(last_metric "${G}" logprob_diff_max) (${DTYPE}), $(last_metric "${G}" gen_tokens_per_s) generated and $(last_metric "${G}" train_tokens_per_s) trained tokens/s"
fi

# 9-10. Long packed sequences: document masking on one GPU, then with context parallelism 2
for CP in 1 2; do
  name=$([ "${CP}" -eq 1 ] && echo long_packed || echo cp)
  if step "${name}" 90 "${CP}"; then
    run "${name}.log" ./scripts/run_train.sh --model.flavor=debug "--data.dataset_path=${SMOKE}/data" \
      "--job.dump_folder=${SMOKE}/${name}" "--training.mixed_precision_param=${DTYPE}" "--training.seq_len=$((SEQ * 4))" \
      --training.local_batch_size=1 --training.steps=4 --training.document_mask=true \
      "--parallelism.context_parallel_degree=${CP}" "--compile.enable=${COMPILE}" --metrics.log_freq=2 \
      --validation.steps=1 --validation.freq=4 --metrics.sample_freq=0; st=$(verdict $?)
    record "${name}" "${st}" $((SECONDS - T0)) "cp ${CP}, seq $((SEQ * 4)), documents; loss $(last_metric "${SMOKE}/${name}/metrics.jsonl" loss), val $(last_metric "${SMOKE}/${name}/metrics.jsonl" val_loss)"
  fi
done

# 10. Tensor parallelism 2 (even counts), with pipeline parallelism 2 on a multiple of 4
if step tp_pp 90 2; then
  TP=$([ $((NGPU % 2)) -eq 0 ] && echo 2 || echo 1)
  PPD=$([ $((NGPU % 4)) -eq 0 ] && echo 2 || echo 1)
  run tp_pp.log ./scripts/run_train.sh --model.flavor=debug "--data.dataset_path=${SMOKE}/data" \
    "--job.dump_folder=${SMOKE}/tp_pp" "--training.mixed_precision_param=${DTYPE}" "--training.seq_len=${SEQ}" \
    --training.local_batch_size=1 --training.global_batch_size=$((2 * NGPU / (TP * PPD))) --training.steps=4 \
    "--compile.enable=${COMPILE}" --activation_checkpoint.mode=full "--parallelism.tensor_parallel_degree=${TP}" \
    "--parallelism.pipeline_parallel_degree=${PPD}" --metrics.log_freq=2 --validation.steps=2 \
    --validation.freq=4 --metrics.sample_freq=0; st=$(verdict $?)
  record tp_pp "${st}" $((SECONDS - T0)) "tp ${TP}, pp ${PPD}$([ "${PPD}" -eq 1 ] && echo ' (pp needs 4)'); loss $(last_metric "${SMOKE}/tp_pp/metrics.jsonl" loss), val $(last_metric "${SMOKE}/tp_pp/metrics.jsonl" val_loss)"
fi

echo
echo "gpu_smoke (${MODE}, ${NGPU} processes, $((SECONDS - START)) s, table also in ${SMOKE}/summary.json, $(python -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")'))"
printf '%-12s %-6s %7s  %s\n' step status seconds detail
failed=0
for i in "${!NAMES[@]}"; do
  printf '%-12s %-6s %7s  %s\n' "${NAMES[$i]}" "${STATUS[$i]}" "${SECONDS_TAKEN[$i]}" "${DETAILS[$i]}"
  case "${STATUS[$i]}" in FAIL*) failed=1;; esac
done
python - "${SMOKE}" <<'EOF'
import json, sys
from pathlib import Path
d = Path(sys.argv[1])
rows = [dict(zip(("step", "status", "seconds", "detail"), l.split("\t"))) for l in (d / "summary.tsv").read_text().splitlines()]
(d / "summary.json").write_text(json.dumps([{**r, "seconds": int(r["seconds"])} for r in rows], indent=1) + "\n")
EOF
exit ${failed}
