"""The [lora] section's checks: where adapters sit (lora_spec), what a LoRA run composes with
(check_lora_layout), the MXFP4-resident base's needs, and the frozen base's storage dtype."""

from __future__ import annotations

import torch

from ..model import ModelArgs
from ..model.lora import TARGETS as LORA_TARGETS
from ..model.lora import LoRASpec
from ..runtime.compat import torch_version
from .job_config import ConfigError, JobConfig
from .validation import _choice, model_args


def validate_lora(cfg: JobConfig) -> None:
    """The [lora] section against the rest of the config (after validation.validate)."""
    if cfg.lora.rank:
        lora_spec(cfg)
        check_lora_layout(cfg)
    elif cfg.lora.initial_adapter:
        raise ConfigError(
            f"lora.initial_adapter = {cfg.lora.initial_adapter!r} with lora.rank = 0; set lora.rank to the adapter's rank"
        )


def check_lora_layout(cfg: JobConfig) -> None:
    """What LoRA does not run with: MXFP4 QAT, compiled dropout; the base's storage format."""
    if cfg.training.mxfp4_qat:
        raise ConfigError(
            "training.mxfp4_qat with lora.rank > 0: LoRA trains adapters, not MXFP4 experts; turn one off"
        )
    if cfg.lora.dropout > 0 and cfg.compile.enable:
        raise ConfigError(
            f"lora.dropout = {cfg.lora.dropout} with compile.enable: compiled dropout is not checked against "
            "activation-checkpoint recomputes here; set lora.dropout = 0 or compile.enable = false"
        )
    _choice("lora.base_format", cfg.lora.base_format, ("auto", "bfloat16", "float32", "mxfp4"))
    if cfg.lora.base_format == "mxfp4":
        check_mxfp4_base(cfg)
    if cfg.lora.base_format == "bfloat16" and cfg.training.mixed_precision_param == "float32":
        raise ConfigError(
            "lora.base_format = 'bfloat16' computes with the frozen weights as stored: set "
            "training.mixed_precision_param = 'bfloat16', or lora.base_format = 'auto'"
        )


def lora_spec(cfg: JobConfig, args: ModelArgs | None = None) -> LoRASpec:
    """The [lora] section checked against the model (args: another shape than the config's, e.g.
    a checkpoint's): rank, alpha, dropout, targets, layers."""
    lo, n_layers = cfg.lora, (args or model_args(cfg)).n_layers
    if lo.rank <= 0:
        raise ConfigError(f"lora.rank = {lo.rank} must be >= 1 for adapters (0 = off: full fine-tuning)")
    if not lo.targets:
        raise ConfigError(f"lora.targets is empty; choose from {', '.join(LORA_TARGETS)}")
    for t in lo.targets:
        _choice("lora.targets entry", t, LORA_TARGETS)
    if not lo.alpha > 0 or not 0 <= lo.dropout < 1:
        raise ConfigError(f"lora.alpha = {lo.alpha} must be > 0 and lora.dropout = {lo.dropout} in [0, 1)")
    bad = [i for i in lo.layers if not 0 <= i < n_layers]
    if bad:
        raise ConfigError(f"lora.layers holds {bad[0]}, but the model has layers 0..{n_layers - 1}")
    return LoRASpec(
        lo.rank, lo.alpha, lo.dropout, tuple(dict.fromkeys(lo.targets)), tuple(sorted(set(lo.layers)))
    )


def check_mxfp4_base(cfg: JobConfig) -> None:
    """lora.base_format = 'mxfp4': the experts' blocks come from a Hugging Face folder, and their
    input widths (hidden and intermediate size) are whole 32-value blocks."""
    if cfg.checkpoint.initial_load_format != "hf":
        raise ConfigError(
            "lora.base_format = 'mxfp4' reads the experts' MXFP4 blocks from a Hugging Face folder: set "
            "checkpoint.initial_load_format = 'hf' with initial_load_path at one (a DCP base: export it with "
            "scripts/convert_dcp_to_safetensors.py --quantize mxfp4 first)"
        )
    if torch_version() < (2, 13):  # FSDP2 gathers uint8 parameters as they are from 2.13 on (tested there)
        raise ConfigError(
            f"lora.base_format = 'mxfp4' needs torch >= 2.13 (this is {torch.__version__}): FSDP2 of uint8 "
            "parameters; upgrade torch, or use lora.base_format = 'auto'"
        )
    args, p = model_args(cfg), cfg.parallelism
    tp = p.tensor_parallel_degree
    if tp > 1 and p.expert_tensor_parallel_degree in (-1, tp) and (args.moe_inter_dim // tp) % 32:
        raise ConfigError(
            f"lora.base_format = 'mxfp4' with tensor_parallel_degree = {tp}: each rank's {args.moe_inter_dim // tp} "
            "expert columns must be whole MXFP4 blocks of 32; use a smaller tensor_parallel_degree"
        )
    for name, width in (("dim", args.dim), ("moe_inter_dim", args.moe_inter_dim)):
        if width % 32:
            raise ConfigError(
                f"lora.base_format = 'mxfp4' needs model {name} to be a multiple of 32 (MXFP4 blocks); got {width}; "
                "use lora.base_format = 'auto'"
            )


def lora_base_dtype(cfg: JobConfig) -> str:
    """The dtype the frozen base of a LoRA run is stored in (lora.base_format resolved; with
    'mxfp4', that of every weight but the experts')."""
    f = cfg.lora.base_format
    return cfg.training.mixed_precision_param if f in ("auto", "mxfp4") else f
