"""Parallelism applied from the outside, as passes over an unmodified (meta) model.

The one order: tensor parallelism -> expert parallelism -> activation checkpointing -> compile
-> FSDP2.
"""

from __future__ import annotations

from torch import nn

from ..config import JobConfig
from ..runtime.log import logger
from .activation_checkpoint import apply_activation_checkpointing
from .compile import apply_compile
from .dims import Meshes, ParallelDims
from .expert_parallel import apply_expert_parallel
from .fsdp import apply_fsdp
from .tensor_parallel import apply_tensor_parallel, sync_replicated_grads

__all__ = ["Meshes", "ParallelDims", "parallelize", "sync_replicated_grads"]


def parallelize(model: nn.Module, dims: ParallelDims, meshes: Meshes | None, cfg: JobConfig) -> nn.Module:
    """Apply every pass the config asks for, in order; meshes is None for a single process."""
    if dims.tp > 1:
        apply_tensor_parallel(model, meshes.tp, meshes.experts, dims.ep, dims.moe_split)
        a = model.args
        experts = (
            f"{a.moe_inter_dim // dims.tp} of {a.moe_inter_dim} expert columns"
            if dims.moe_split
            else "whole experts (expert parallelism spans the tp ranks)"
        )
        logger.info(
            f"tensor parallelism: {dims.tp} ranks, each {a.n_heads // dims.tp} of {a.n_heads} query heads, "
            f"{a.n_kv_heads // dims.tp} kv heads, {experts}, {a.vocab_size // dims.tp:,} vocabulary rows; "
            "sequence-parallel norms"
        )
    if dims.ep > 1:
        apply_expert_parallel(model, meshes.ep)
        logger.info(f"expert parallelism: {dims.ep} groups of {model.args.num_experts // dims.ep} experts")
    compiled = cfg.compile.enable and "model" in cfg.compile.components
    dropout = cfg.lora.rank > 0 and cfg.lora.dropout > 0  # the recompute must draw the same masks
    apply_activation_checkpointing(model, cfg.activation_checkpoint, compiled, preserve_rng_state=dropout)
    if compiled:
        apply_compile(model)
    if meshes is not None:
        apply_fsdp(model, meshes, cfg)
    return model
