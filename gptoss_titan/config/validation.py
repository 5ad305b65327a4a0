"""Every cross-field check of a JobConfig, in one place, and the rules other modules share
(parallel degrees, the batch layout, the model's args).

World-size-dependent checks follow in ParallelDims.from_config, which calls `check_degrees` first.
"""

from __future__ import annotations

import dataclasses
import difflib

from ..model.args import EXPERT_KERNELS, FLAVORS, ModelArgs
from ..model.tokens import VOCAB_SIZE
from ..runtime.dtypes import DTYPE_NAMES
from .job_config import SAVED_STATES, ConfigError, JobConfig, Parallelism, Training


def closest(name: str, options: list[str]) -> str:
    m = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f"; did you mean {m[0]!r}?" if m else f"; valid: {', '.join(options)}"


def _choice(where: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ConfigError(
            f"{where} = {value!r} is not one of {', '.join(options)}{closest(value, list(options))}"
        )


def model_name(cfg: JobConfig) -> str:
    """The flavor, with the [model.args] overrides when there are any (for logs)."""
    extra = ", ".join(f"{k}={v}" for k, v in cfg.model.args.items())
    return f"{cfg.model.flavor} [{extra}]" if extra else cfg.model.flavor


def model_args(cfg: JobConfig) -> ModelArgs:
    """The ModelArgs of this run: the flavor's, with `[model.args]` and the balancing switch on top."""
    for name in ("load_balance_bias", "balanced_routing"):
        if name in cfg.model.args:
            raise ConfigError(f"model.args.{name}: set model.{name} instead")
    m = cfg.model
    if m.balanced_routing and not (m.balanced_routing >= 1 and m.load_balance_bias):
        raise ConfigError(
            f"model.balanced_routing = {m.balanced_routing} must be 0 (off) or >= 1 (a max / mean expert load) "
            f"with model.load_balance_bias = true (it is {str(m.load_balance_bias).lower()}): the bias learns "
            "the routing that takes over"
        )
    try:
        args = dataclasses.replace(
            FLAVORS[m.flavor],
            **m.args,
            load_balance_bias=m.load_balance_bias,
            balanced_routing=m.balanced_routing,
        )
    except ValueError as e:  # ModelArgs' own checks (heads vs kv heads, top_k <= experts, ...)
        overrides = ", ".join(f"{k}={v}" for k, v in cfg.model.args.items()) or "none"
        raise ConfigError(
            f"model.args on flavor {cfg.model.flavor} (overrides: {overrides}): {e}; change [model.args]"
        ) from None
    corpus_vocab = VOCAB_SIZE  # the bundled corpora are tokenized with o200k_harmony
    bundled = cfg.data.dataset and not (cfg.data.dataset_path or cfg.data.sources or cfg.data.stream)
    if bundled and args.vocab_size < corpus_vocab:
        raise ConfigError(
            f"model vocab_size = {args.vocab_size} is smaller than the {cfg.data.tokenizer} tokenizer's "
            f"{corpus_vocab} ids that data.dataset = {cfg.data.dataset!r} holds; use vocab_size >= {corpus_vocab}"
        )
    return args


def check_degrees(p: Parallelism, num_experts: int) -> None:
    """The checks of each parallel degree on its own; ParallelDims.from_config adds those that need
    the world size (products, divisibility)."""
    for name in (
        "pipeline_parallel_degree",
        "pipeline_parallel_stages_per_rank",
        "data_parallel_replicate_degree",
        "expert_parallel_degree",
        "context_parallel_degree",
        "tensor_parallel_degree",
    ):
        if getattr(p, name) < 1:
            raise ConfigError(f"parallelism.{name} = {getattr(p, name)} must be >= 1")
    if p.data_parallel_shard_degree == 0 or p.data_parallel_shard_degree < -1:
        raise ConfigError(
            f"parallelism.data_parallel_shard_degree = {p.data_parallel_shard_degree} must be -1 or >= 1"
        )
    if num_experts % p.expert_parallel_degree:
        raise ConfigError(
            f"parallelism.expert_parallel_degree = {p.expert_parallel_degree} does not divide the "
            f"{num_experts} experts; use a divisor of {num_experts}"
        )


PP_SCHEDULES = ("1F1B", "GPipe", "Interleaved1F1B", "InterleavedZeroBubble")


def pipeline_layout(p: Parallelism, n_layers: int) -> list[int]:
    """Layers of each pipeline stage (pp x stages_per_rank stages, in order); checks the choice."""
    n_stages = p.pipeline_parallel_degree * p.pipeline_parallel_stages_per_rank
    if p.pipeline_parallel_layers:
        layers = list(p.pipeline_parallel_layers)
        inner = layers[1:-1]
        if len(layers) != n_stages or sum(layers) != n_layers or min(layers) < 0 or 0 in inner:
            raise ConfigError(
                f"parallelism.pipeline_parallel_layers = {layers} must list {n_stages} stages "
                f"(pipeline_parallel_degree x stages_per_rank) adding up to the model's {n_layers} layers, "
                "each >= 1 (the first and last may hold 0: they have the embedding and the lm_head)"
            )
        return layers
    if n_layers < n_stages:
        raise ConfigError(
            f"{n_stages} pipeline stages (pipeline_parallel_degree x stages_per_rank) for {n_layers} layers; "
            f"use at most {n_layers} stages"
        )
    base, extra = divmod(n_layers, n_stages)
    return [base + (1 if s < extra else 0) for s in range(n_stages)]


def check_pipeline(cfg: JobConfig, args: ModelArgs) -> None:
    """What pipeline parallelism supports so far, and a valid schedule and split."""
    p = cfg.parallelism
    if p.pipeline_parallel_degree == 1:
        if p.pipeline_parallel_layers or p.pipeline_parallel_stages_per_rank != 1:
            raise ConfigError(
                "parallelism.pipeline_parallel_layers / pipeline_parallel_stages_per_rank are set but "
                "pipeline_parallel_degree = 1; set pipeline_parallel_degree or remove them"
            )
        return
    _choice("parallelism.pipeline_parallel_schedule", p.pipeline_parallel_schedule, PP_SCHEDULES)
    interleaved = p.pipeline_parallel_schedule.startswith("Interleaved")
    v = p.pipeline_parallel_stages_per_rank
    if interleaved != (v > 1):
        raise ConfigError(
            f"parallelism.pipeline_parallel_schedule = {p.pipeline_parallel_schedule!r} with "
            f"pipeline_parallel_stages_per_rank = {v}: the interleaved schedules need 2 or more stages per "
            "rank, 1F1B and GPipe exactly 1"
        )
    pipeline_layout(p, args.n_layers)
    if cfg.model.aux_loss_coef > 0:
        raise ConfigError(
            f"model.aux_loss_coef = {cfg.model.aux_loss_coef} is not supported with pipeline parallelism yet; "
            "set it to 0 (the load-balancing bias, model.load_balance_bias, works) or set "
            "parallelism.pipeline_parallel_degree = 1"
        )


def check_micro_batches(p: Parallelism, micro_batches: int, per_micro: int) -> None:
    """The pipeline's micro-batches are the gradient accumulation steps; the 1F1B-style schedules
    need at least one per pipeline rank. per_micro: sequences per micro-batch over all data ranks."""
    pp = p.pipeline_parallel_degree
    if pp > 1 and p.pipeline_parallel_schedule != "GPipe" and micro_batches < pp:
        raise ConfigError(
            f"parallelism.pipeline_parallel_schedule = {p.pipeline_parallel_schedule!r} over {pp} pipeline ranks "
            f"needs at least {pp} micro-batches (gradient accumulation steps), got {micro_batches}; set "
            f"training.global_batch_size to a multiple of {per_micro} of at least {pp * per_micro}"
        )


def check_tensor_parallel(p: Parallelism, args: ModelArgs, seq_len: int, mxfp4_qat: bool = False) -> None:
    """What tensor parallelism needs from the model's shapes and the sequence length: whole kv
    heads, expert intermediate columns, vocabulary rows and sequence positions per tp rank."""
    tp, cp = p.tensor_parallel_degree, p.context_parallel_degree
    if tp == 1:
        return
    split_experts = p.expert_tensor_parallel_degree in (-1, tp)  # else whole experts: no column split
    shares = [("n_kv_heads", args.n_kv_heads), ("vocab_size", args.vocab_size)]
    if split_experts:
        shares.append(("moe_inter_dim", args.moe_inter_dim))
    for field, value in shares:
        if value % tp:
            raise ConfigError(
                f"parallelism.tensor_parallel_degree = {tp} does not divide the model's {field} = {value} "
                f"(each tp rank holds an equal share); use a divisor of {value}"
            )
    if mxfp4_qat and split_experts and (args.moe_inter_dim // tp) % 32:
        raise ConfigError(
            f"training.mxfp4_qat with tensor_parallel_degree = {tp}: each rank's {args.moe_inter_dim // tp} expert "
            "columns must be whole MXFP4 blocks of 32; use a smaller tensor_parallel_degree"
        )
    per_rank = 2 * cp if cp > 1 else 1
    if seq_len % (per_rank * tp):
        raise ConfigError(
            f"training.seq_len = {seq_len} is not divisible by {'2 x context_parallel_degree x ' if cp > 1 else ''}"
            f"tensor_parallel_degree = {per_rank * tp} (sequence parallelism splits every sequence over the "
            f"tp ranks); use a multiple of {per_rank * tp}"
        )


def batch_layout(t: Training, dp_degree: int) -> tuple[int, int]:
    """(global batch in sequences, gradient accumulation steps) for this data-parallel degree.

    The one rule: global = local x dp x accumulation, so the global batch must be a multiple of
    local_batch_size x dp (-1 = exactly local x dp)."""
    per_micro = t.local_batch_size * dp_degree
    if t.global_batch_size == -1:
        return per_micro, 1
    if t.global_batch_size < 1 or t.global_batch_size % per_micro:
        raise ConfigError(
            f"training.global_batch_size = {t.global_batch_size} must be -1 or a positive multiple of "
            f"training.local_batch_size x data-parallel degree = {t.local_batch_size} x {dp_degree}; change one of them"
        )
    return t.global_batch_size, t.global_batch_size // per_micro


def validate(cfg: JobConfig) -> None:
    """Every cross-field check, in one place. World-size-dependent checks live in ParallelDims."""
    t, o, s, p, c = cfg.training, cfg.optimizer, cfg.lr_scheduler, cfg.parallelism, cfg.checkpoint
    if cfg.model.name != "gpt_oss":
        raise ConfigError(f"model.name = {cfg.model.name!r} is not supported; use 'gpt_oss'")
    if cfg.model.flavor not in FLAVORS:
        raise ConfigError(
            f"unknown model.flavor {cfg.model.flavor!r}{closest(cfg.model.flavor, list(FLAVORS))}"
        )
    args = model_args(cfg)
    positives = {
        "training.steps": t.steps,
        "training.seq_len": t.seq_len,
        "training.local_batch_size": t.local_batch_size,
        "metrics.log_freq": cfg.metrics.log_freq,
        "validation.freq": cfg.validation.freq,
        "validation.steps": cfg.validation.steps,
        "checkpoint.interval": c.interval,
        "profiling.profile_freq": cfg.profiling.profile_freq,
        "profiling.profiler_active": cfg.profiling.profiler_active,
    }
    for name, v in positives.items():
        if v < 1:
            raise ConfigError(f"{name} = {v} must be >= 1")
    if not o.lr > 0:
        raise ConfigError(f"optimizer.lr = {o.lr} must be > 0 (e.g. 3e-4)")
    for name, v in {
        "optimizer.weight_decay": o.weight_decay,
        "training.max_norm": t.max_norm,
        "model.aux_loss_coef": cfg.model.aux_loss_coef,
        "lr_scheduler.warmup_steps": s.warmup_steps,
        "checkpoint.keep_latest_k": c.keep_latest_k,
    }.items():
        if v < 0:
            raise ConfigError(f"{name} = {v} must be >= 0")
    if not (0 <= o.beta1 < 1 and 0 <= o.beta2 < 1):
        raise ConfigError(f"optimizer betas ({o.beta1}, {o.beta2}) must be in [0, 1)")
    pr = cfg.profiling
    if pr.profiler_warmup < 0 or pr.profiler_warmup + pr.profiler_active > pr.profile_freq:
        raise ConfigError(
            f"profiling.profiler_warmup + profiler_active = {pr.profiler_warmup} + {pr.profiler_active} must be "
            f"between 1 and profiling.profile_freq = {pr.profile_freq}; raise profile_freq or lower the others"
        )
    if cfg.metrics.peak_tflops < 0:
        raise ConfigError(f"metrics.peak_tflops = {cfg.metrics.peak_tflops} must be >= 0 (0 = automatic)")
    if not 0 <= s.min_lr_factor <= 1:
        raise ConfigError(f"lr_scheduler.min_lr_factor = {s.min_lr_factor} must be in [0, 1]")
    if t.seq_len > args.max_seq_len:
        raise ConfigError(
            f"training.seq_len = {t.seq_len} exceeds the {cfg.model.flavor} model's limit {args.max_seq_len}; "
            f"use --training.seq_len={args.max_seq_len} or less"
        )
    cp = p.context_parallel_degree
    if cp > 1 and t.seq_len % (2 * cp):
        raise ConfigError(
            f"training.seq_len = {t.seq_len} is not divisible by 2 x parallelism.context_parallel_degree = {2 * cp} "
            f"(each cp rank holds two chunks of every sequence); use a multiple of {2 * cp}"
        )
    check_tensor_parallel(p, args, t.seq_len, t.mxfp4_qat)
    check_pipeline(cfg, args)
    batch_layout(t, dp_degree=1)
    _choice("training.mixed_precision_param", t.mixed_precision_param, DTYPE_NAMES)
    _choice("training.mixed_precision_reduce", t.mixed_precision_reduce, DTYPE_NAMES)
    _choice("model.aux_loss_type", cfg.model.aux_loss_type, ("per_layer", "hf"))
    _choice("optimizer.name", o.name, ("AdamW",))
    _choice("optimizer.implementation", o.implementation, ("foreach", "fused", "for-loop"))
    _choice("lr_scheduler.decay_type", s.decay_type, ("cosine", "linear"))
    _choice(
        "parallelism.fsdp_reshard_after_forward", p.fsdp_reshard_after_forward, ("default", "always", "never")
    )
    _choice("checkpoint.async_mode", c.async_mode, ("disabled", "async", "async_with_pinned_mem"))
    _choice("checkpoint.initial_load_format", c.initial_load_format, ("dcp", "hf"))
    _choice("checkpoint.export_dtype", c.export_dtype, DTYPE_NAMES)
    _choice("checkpoint.on_save_error", c.on_save_error, ("stop", "continue"))
    if t.max_skipped_steps < 1 or t.loss_spike_window < 2 or t.loss_spike_sigma < 0:
        raise ConfigError(
            f"training.max_skipped_steps = {t.max_skipped_steps} must be >= 1, loss_spike_window = "
            f"{t.loss_spike_window} >= 2 and loss_spike_sigma = {t.loss_spike_sigma} >= 0 (0 = off)"
        )
    _choice("activation_checkpoint.mode", cfg.activation_checkpoint.mode, ("none", "full", "selective"))
    sel = cfg.activation_checkpoint.selective_ac_option
    if sel != "op" and not (sel.isdigit() and int(sel) >= 1):
        raise ConfigError(
            f"activation_checkpoint.selective_ac_option = {sel!r} must be 'op' or a positive integer"
        )
    check_degrees(p, args.num_experts)  # the world-size checks follow in ParallelDims.from_config
    _choice("model.expert_kernel", cfg.model.expert_kernel, EXPERT_KERNELS)
    for item in cfg.compile.components:
        _choice("compile.components", item, ("model", "decode"))
    for item in c.exclude_from_loading:
        _choice("checkpoint.exclude_from_loading", item, SAVED_STATES)
    _choice("comm.mode", cfg.comm.mode, ("default", "fake_backend"))
    _choice("metrics.on_write_error", cfg.metrics.on_write_error, ("stop", "continue"))
    _choice("job.stop_signal", cfg.job.stop_signal, ("SIGUSR1", "SIGUSR2", "SIGHUP"))
    if cfg.comm.init_timeout_seconds < 1 or cfg.comm.train_timeout_seconds < 1:
        raise ConfigError(
            f"comm timeouts ({cfg.comm.init_timeout_seconds}, {cfg.comm.train_timeout_seconds}) "
            "must be >= 1 second"
        )
    if cfg.metrics.sample_freq > 0 and args.vocab_size < VOCAB_SIZE:
        raise ConfigError(
            f"metrics.sample_freq = {cfg.metrics.sample_freq} needs the o200k_harmony vocabulary, but flavor "
            f"{cfg.model.flavor} has {args.vocab_size} tokens; set --metrics.sample_freq=0"
        )
    if not (cfg.data.dataset or cfg.data.dataset_path or cfg.data.sources or cfg.data.stream):
        raise ConfigError(
            "set data.dataset (e.g. 'kjv'), data.dataset_path (a folder from scripts/prepare_data.py) "
            "or [[data.sources]] (a mixture of such folders)"
        )
    for i, src in enumerate(cfg.data.sources):
        if not src.path:
            raise ConfigError(f"data.sources[{i}] has no path; give each source the folder of its tokens")
        if not (0 < src.weight < float("inf")):
            raise ConfigError(
                f"data.sources[{i}] ({src.path}) weight = {src.weight} must be a positive number"
            )
    if cfg.data.stream and (cfg.data.sources or cfg.data.dataset_path):
        raise ConfigError(
            f"data.stream = {cfg.data.stream!r} is set with data.dataset_path or data.sources; choose one data source"
        )
    if cfg.data.stream_workers < 0 or cfg.data.stream_val_every < 2:
        raise ConfigError(
            f"data.stream_workers = {cfg.data.stream_workers} must be >= 0 and data.stream_val_every = "
            f"{cfg.data.stream_val_every} >= 2"
        )
    if cfg.data.sources and cfg.data.dataset_path:
        raise ConfigError(
            f"data.dataset_path = {cfg.data.dataset_path!r} and data.sources are both set; "
            "list every folder in data.sources (with its weight) and leave dataset_path empty"
        )
    _choice("model.load_balance_bias_update", cfg.model.load_balance_bias_update, ("sign", "proportional"))
    if cfg.model.balanced_routing_steps < 0:
        raise ConfigError(
            f"model.balanced_routing_steps = {cfg.model.balanced_routing_steps} must be >= 0 (0 = all)"
        )
    if cfg.model.balanced_routing and (cfg.lora.rank or cfg.rl.enable):
        which = (
            "lora.rank > 0 (the routing stays the base's)"
            if cfg.lora.rank
            else "rl.enable (sampling routes plainly)"
        )
        raise ConfigError(f"model.balanced_routing = {cfg.model.balanced_routing} with {which}; set it to 0")
    # the [lora] section: lora_checks.validate_lora (loading.py runs it next)
