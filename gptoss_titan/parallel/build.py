"""The one way to build the model a rank holds, for the trainer, the dry run and the sampler.

plan_run(cfg, world): the model's shape, the parallel degrees against the world size, and the batch
layout (global batch = local x data-parallel x accumulation steps), every check with its one line.
build_model(cfg, plan, meshes, device): built on the meta device, cut into pipeline stages, given
its expert kernel, parallelized by every pass, then - unless the device is meta (the dry run's
plans) - materialized and initialized (the same values at any layout), or only its buffers set
when a checkpoint will overwrite every parameter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import (
    ConfigError,
    JobConfig,
    batch_layout,
    check_micro_batches,
    lora_base_dtype,
    lora_spec,
    model_args,
)
from ..model import ModelArgs, Transformer
from ..model.init import init_adapters
from ..model.lora import LoRASpec, add_lora, store_base
from ..model.moe import resolve_expert_kernel
from ..runtime.dtypes import dtype_of
from ..runtime.log import Timer, logger
from . import Meshes, ParallelDims, parallelize
from .pipeline import Pipeline, StageView, split_stages


@dataclass(frozen=True)
class RunPlan:
    """What a run is, before any process group exists: shape, degrees, batch layout."""

    args: ModelArgs
    dims: ParallelDims
    global_batch: int  # sequences per optimizer step, over every data-parallel rank
    accum_steps: int  # micro-batches per optimizer step (the pipeline's micro-batches under pp)


def plan_run(cfg: JobConfig, world: int, args: ModelArgs | None = None) -> RunPlan:
    """The plan of `cfg` on `world` processes (args: a checkpoint's shape instead of the config's)."""
    args = args or model_args(cfg)
    dims = ParallelDims.from_config(cfg.parallelism, world, args.num_experts)
    t = cfg.training
    global_batch, accum_steps = batch_layout(t, dims.dp_degree)
    check_micro_batches(cfg.parallelism, accum_steps, t.local_batch_size * dims.dp_degree)
    return RunPlan(args, dims, global_batch, accum_steps)


@dataclass
class RankModel:
    """The model as this rank holds it: the whole Transformer (pp = 1) or a StageView of its
    pipeline stages; `stages` lists (stage index, module); `pipeline` runs them (None at pp = 1 and
    on the meta device)."""

    model: nn.Module
    stages: list[tuple[int, Transformer]]
    pipeline: Pipeline | None


def choose_expert_kernel(
    model: Transformer, cfg: JobConfig, dims: ParallelDims, device: torch.device
) -> None:
    """Resolve model.expert_kernel once for this device, compute dtype and routed rows; log it."""
    t = cfg.training
    local = model.args.num_experts // dims.ep
    rows = t.local_batch_size * t.seq_len * model.args.top_k  # routed rows per micro-batch per rank
    cols = dims.tp if dims.moe_split else 1  # expert columns split over tensor parallelism
    I = model.args.moe_inter_dim
    widths = {"dim": model.args.dim, "2 x moe_inter_dim / tp": 2 * I // cols, "moe_inter_dim / tp": I // cols}
    try:
        kernel, why = resolve_expert_kernel(
            cfg.model.expert_kernel, device.type, dtype_of(t.mixed_precision_param), local, rows, widths
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None
    model.set_expert_kernel(kernel)
    logger.info(f"experts: {kernel} kernel ({why})")


def build_model(
    cfg: JobConfig,
    plan: RunPlan,
    meshes: Meshes | None,
    device: torch.device,
    init: bool = True,
    pp_rank: int | None = None,
    weights_dtype: torch.dtype | None = None,
    lora: LoRASpec | None = None,
) -> RankModel:
    """This rank's model (pp_rank: another pipeline rank's stages, for the dry run). init False:
    only the buffers are set (a checkpoint loads every parameter). weights_dtype: parameters stored
    in this dtype (the sampler's bf16 weights) instead of fp32 masters. lora: where adapters sit,
    instead of the config's [lora] section (an imported adapter's or a checkpoint's sites)."""
    t, args, dims = cfg.training, plan.args, plan.dims
    with torch.device("meta"):
        model = Transformer(args)
    lora = lora or (lora_spec(cfg, args) if cfg.lora.rank else None)
    if lora is not None:  # before every pass: FSDP, EP and AC see the adapters as parameters
        add_lora(model, lora)
        if weights_dtype is None:
            store_base(model, dtype_of(lora_base_dtype(cfg)), cfg.lora.base_format == "mxfp4")
    if weights_dtype is not None:
        model = model.to(weights_dtype)
    if dims.pp > 1:
        pp_rank = meshes.pp.get_local_rank() if pp_rank is None else pp_rank
        stages = split_stages(model, pp_rank, cfg.parallelism)
    else:
        stages = [(0, model)]
    on_meta = device.type == "meta"
    timer = Timer()
    for _, part in stages:
        if not on_meta:  # the dry run never runs a forward
            choose_expert_kernel(part, cfg, dims, device)
        if t.mxfp4_qat:
            part.set_mxfp4_qat(True)
        parallelize(part, dims, meshes, cfg)
        if on_meta:
            continue
        part.to_empty(device=device)
        if init:
            part.init_weights(seed=t.seed)
        else:
            part.init_buffers()
            if lora is not None:  # a base from a checkpoint; adapters a LoRA checkpoint may overwrite
                init_adapters(part, t.seed)
    if t.mxfp4_qat and not on_meta:
        logger.info("MXFP4-aware training: expert weights quantized to MXFP4 in the forward")
    if init and not on_meta:
        logger.info(f"initialized the weights in {timer.lap():.2f} s")
    if dims.pp == 1:
        return RankModel(model, stages, None)
    parts = [part for _, part in stages]
    if on_meta:
        return RankModel(StageView(parts), stages, None)
    pipeline = Pipeline(
        stages,
        cfg.parallelism,
        meshes.pp,
        device,
        plan.accum_steps,
        (t.local_batch_size, t.seq_len // dims.cp),  # each cp rank holds a share of every sequence
        (args.dim, dtype_of(t.mixed_precision_param)),
    )
    held = ", ".join(f"stage {s}: {len(p.blocks())} layers" for s, p in stages)
    logger.info(
        f"pipeline: {cfg.parallelism.pipeline_parallel_schedule}, {plan.accum_steps} micro-batches; {held}"
    )
    return RankModel(StageView(parts), stages, pipeline)
