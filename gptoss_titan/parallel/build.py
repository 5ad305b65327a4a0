"""The model of a training run, as this process holds it: built on the meta device, cut into
pipeline stages, given its expert kernel, parallelized by every pass, then materialized and
initialized (the same values at any layout) unless a checkpoint will overwrite them."""

from __future__ import annotations

import torch
from torch import nn

from ..config import ConfigError, JobConfig
from ..model import ModelArgs, Transformer
from ..model.moe import resolve_expert_kernel
from ..runtime.dtypes import dtype_of
from ..runtime.log import Timer, logger
from . import Meshes, ParallelDims, parallelize
from .pipeline import Pipeline, StageView, split_stages


def choose_expert_kernel(
    model: Transformer, cfg: JobConfig, dims: ParallelDims, device: torch.device
) -> None:
    """Resolve model.expert_kernel once for this device, compute dtype and routed rows; log it."""
    t = cfg.training
    dtype = torch.bfloat16 if t.mixed_precision_param == "bfloat16" else torch.float32
    local = model.args.num_experts // dims.ep
    rows = t.local_batch_size * t.seq_len * model.args.top_k  # routed rows per micro-batch per rank
    try:
        kernel, why = resolve_expert_kernel(cfg.model.expert_kernel, device.type, dtype, local, rows)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    model.set_expert_kernel(kernel)
    logger.info(f"experts: {kernel} kernel ({why})")


def build_model(
    cfg: JobConfig,
    args: ModelArgs,
    dims: ParallelDims,
    meshes: Meshes | None,
    device: torch.device,
    init: bool,
    accum_steps: int,
) -> tuple[nn.Module, Pipeline | None]:
    """(the model, the pipeline): the whole Transformer and None, or under pipeline parallelism a
    StageView of this rank's stages and the Pipeline that runs them (accum_steps micro-batches).
    init False: only the buffers are set (a checkpoint loads every parameter)."""
    t = cfg.training
    with torch.device("meta"):
        model = Transformer(args)
    stages = split_stages(model, meshes.pp.get_local_rank(), cfg.parallelism) if dims.pp > 1 else [(0, model)]
    timer = Timer()
    for _, part in stages:
        choose_expert_kernel(part, cfg, dims, device)
        if t.mxfp4_qat:
            part.set_mxfp4_qat(True)
        parallelize(part, dims, meshes, cfg)
        part.to_empty(device=device)
        if init:
            part.init_weights(seed=t.seed)
        else:
            part.init_buffers()
    if t.mxfp4_qat:
        logger.info("MXFP4-aware training: expert weights quantized to MXFP4 in the forward")
    if init:
        logger.info(f"initialized the weights in {timer.lap():.2f} s")
    if dims.pp == 1:
        return model, None
    parts = [part for _, part in stages]
    pipeline = Pipeline(
        stages,
        cfg.parallelism,
        meshes.pp,
        device,
        accum_steps,
        (t.local_batch_size, t.seq_len // dims.cp),  # each cp rank holds a share of every sequence
        (args.dim, dtype_of(t.mixed_precision_param)),
    )
    held = ", ".join(f"stage {s}: {len(p.blocks())} layers" for s, p in stages)
    logger.info(
        f"pipeline: {cfg.parallelism.pipeline_parallel_schedule}, {accum_steps} micro-batches; {held}"
    )
    return StageView(parts), pipeline
