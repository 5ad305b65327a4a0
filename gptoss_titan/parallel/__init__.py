"""Parallelism applied from the outside, as passes over an unmodified (meta) model.

The one order: expert parallelism -> activation checkpointing -> compile -> FSDP2.
"""

from __future__ import annotations

from torch import nn

from ..config import JobConfig
from ..metrics import logger
from .activation_checkpoint import apply_activation_checkpointing
from .compile import apply_compile
from .dims import Meshes, ParallelDims
from .expert_parallel import apply_expert_parallel
from .fsdp import apply_fsdp

__all__ = ["Meshes", "ParallelDims", "parallelize"]


def parallelize(model: nn.Module, dims: ParallelDims, meshes: Meshes | None, cfg: JobConfig) -> nn.Module:
    """Apply every pass the config asks for, in order; meshes is None for a single process."""
    if dims.ep > 1:
        apply_expert_parallel(model, meshes.ep)
        logger.info(f"expert parallelism: {dims.ep} groups of {model.args.num_experts // dims.ep} experts")
    compiled = cfg.compile.enable and "model" in cfg.compile.components
    apply_activation_checkpointing(model, cfg.activation_checkpoint, compiled)
    if compiled:
        apply_compile(model)
    if meshes is not None:
        apply_fsdp(model, meshes, cfg)
    return model
