"""FSDP2: shard parameters, gradients and optimizer state over the data-parallel meshes.

Where it sits: the last pass (parallel/__init__.py). Dense parameters shard over the dense mesh
(HSDP when it has a replicate dimension); each block's experts shard over the efsdp mesh on top
of their expert-parallel split. Gradients are summed, not averaged: the loss is already divided
by the global number of target tokens of the step (train.py), so the sum over ranks is the
gradient of the whole global batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

from ..config import JobConfig
from ..runtime.dtypes import dtype_of
from ..runtime.log import logger
from .activation_checkpoint import unwrap
from .dims import Meshes


def apply_fsdp(model: nn.Module, meshes: Meshes, cfg: JobConfig) -> None:
    t = cfg.training
    mp = MixedPrecisionPolicy(
        param_dtype=dtype_of(t.mixed_precision_param), reduce_dtype=dtype_of(t.mixed_precision_reduce)
    )
    policy = cfg.parallelism.fsdp_reshard_after_forward
    # default: reshard after forward, except under pipeline parallelism (TorchTitan's choice: each
    # micro-batch's forward would all-gather the stage's parameters again)
    pipelined = cfg.parallelism.pipeline_parallel_degree > 1
    reshard = {"always": True, "never": False, "default": not pipelined}[policy]
    local_experts = model.args.num_experts // meshes.ep.size()
    efsdp_size = meshes.efsdp.size()
    # Fewer local experts than FSDP shards: shard inside each expert (dim 1, which FSDP needs to be
    # even), or some ranks would hold whole experts and others none.
    inside = local_experts < efsdp_size

    def expert_placement(p: nn.Parameter) -> Shard:
        split = {q.dim for q in p.placements if q.is_shard()} if isinstance(p, DTensor) else set()
        dim1_free = 1 not in split  # tensor parallelism may already split dim 1 (the down rows)
        return Shard(1) if inside and dim1_free and p.shape[1] % efsdp_size == 0 else Shard(0)

    expert_dim = 1 if inside else 0
    for block in model.blocks():
        fully_shard(
            unwrap(block).moe.experts,
            mesh=meshes.efsdp,
            mp_policy=mp,
            reshard_after_forward=reshard,
            shard_placement_fn=expert_placement,
        )
        fully_shard(block, mesh=meshes.dense, mp_policy=mp, reshard_after_forward=reshard)
    if model.tok_embeddings is not None:  # a pipeline stage holds some of the modules
        fully_shard(model.tok_embeddings, mesh=meshes.dense, mp_policy=mp, reshard_after_forward=reshard)
    if model.output is not None:
        # The last modules run first in backward: keeping them unsharded after forward saves an all-gather.
        fully_shard(
            [model.norm, model.output],
            mesh=meshes.dense,
            mp_policy=mp,
            reshard_after_forward=reshard if policy != "default" else False,
        )
    fully_shard(model, mesh=meshes.dense, mp_policy=mp, reshard_after_forward=reshard)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM
    logger.info(
        f"FSDP2: dense over {meshes.dense.mesh_dim_names} {tuple(meshes.dense.shape)}, experts over "
        f"{meshes.efsdp.mesh_dim_names} {tuple(meshes.efsdp.shape)} (expert dim {expert_dim}); params {t.mixed_precision_param}, "
        f"reduce {t.mixed_precision_reduce}; reshard_after_forward={policy}"
    )


@contextmanager
def gathered_weights(model: nn.Module) -> Iterator[None]:
    """Within the block, each FSDP group keeps its parameters from the first forward's all-gather
    on (no reshard after forward), so decoding n tokens gathers once instead of n times; on exit
    every group is resharded (the gathered copies freed) and its reshard-after-forward restored.
    No-op without FSDP. Costs the unsharded weights' memory (expert-parallel shards stay split)."""
    mods = [m for m in model.modules() if isinstance(m, FSDPModule)]
    # FSDP2 has no public getter for the setting, so the groups' own values are saved and restored
    states = [m._get_fsdp_state() for m in mods]
    auto = [st._auto_reshard_after_forward for st in states]
    saved = [(g, g.post_forward_mesh_info) for st in states for g in st._fsdp_param_groups]
    for m in mods:
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for st, a in zip(states, auto):
            st._auto_reshard_after_forward = a
        for g, info in saved:
            g.post_forward_mesh_info = info
        for m in mods:
            m.reshard()
