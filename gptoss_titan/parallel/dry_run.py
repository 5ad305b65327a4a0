"""Dry run at scale on a fake process group: real meshes, every pass, no training.

  COMM_MODE=fake_backend NGPU=64 CONFIG_FILE=train_configs/gpt_oss_120b.toml ./scripts/run_train.sh \
      --parallelism.expert_parallel_degree=8

One process pretends to be rank 0 of NGPU. The model stays on the meta device, so nothing is
allocated; the printout is what each rank would hold: parameters (fp32 master weights),
gradients and AdamW state, dense vs experts, and the largest FSDP all-gather.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from ..compat import fake_process_group, fsdp_mesh_size
from ..config import JobConfig, model_args
from ..model import Transformer
from . import ParallelDims, parallelize

GIB = 2**30


def _local_numel(p: torch.Tensor) -> int:
    return p.to_local().numel() if isinstance(p, DTensor) else p.numel()


def _fsdp_groups(model: torch.nn.Module) -> list[tuple[str, int, int]]:
    """(module name, FSDP mesh size, local param elements) for every FSDP module's own params."""
    owner: dict[int, tuple[str, int]] = {}
    for name, m in model.named_modules():
        mesh_size = fsdp_mesh_size(m) if isinstance(m, FSDPModule) else None
        if mesh_size is not None:
            for p in m.parameters():
                owner[id(p)] = (name or "<root>", mesh_size)  # inner modules come later and win
    sizes: dict[tuple[str, int], int] = {}
    for p in model.parameters():
        key = owner[id(p)]
        sizes[key] = sizes.get(key, 0) + _local_numel(p)
    return [(name, mesh, n) for (name, mesh), n in sizes.items()]


def dry_run(cfg: JobConfig, world_size: int) -> None:
    fake_process_group(world_size)
    args = model_args(cfg)
    dims = ParallelDims.from_config(cfg.parallelism, world_size, args.num_experts)
    meshes = dims.build_meshes("cpu")
    with torch.device("meta"):
        model = Transformer(args)
    parallelize(model, dims, meshes, cfg)

    dense = sum(_local_numel(p) for n, p in model.named_parameters() if ".moe.experts." not in n)
    experts = sum(_local_numel(p) for n, p in model.named_parameters() if ".moe.experts." in n)
    pbytes = 2 if cfg.training.mixed_precision_param == "bfloat16" else 4
    groups = _fsdp_groups(model)
    name, mesh, n = max(groups, key=lambda g: g[2] * g[1])
    rows = [("parameters (fp32)", 4), ("gradients (fp32)", 4), ("AdamW state (2 x fp32)", 8)]
    print(
        f"dry run: {cfg.model.flavor} ({args.num_params():,} parameters) on {world_size} ranks: "
        f"replicate {dims.dp_replicate} x shard {dims.dp_shard} (efsdp {dims.efsdp} x ep {dims.ep})"
    )
    print(f"{'per rank':<26}{'dense GiB':>12}{'experts GiB':>14}{'total GiB':>12}")
    total = 0.0
    for label, b in rows:
        d, e = dense * b / GIB, experts * b / GIB
        total += d + e
        print(f"{label:<26}{d:>12.3f}{e:>14.3f}{d + e:>12.3f}")
    print(f"{'sum':<26}{'':>12}{'':>14}{total:>12.3f}")
    print(
        f"largest all-gather: {name} over {mesh} ranks, {n * mesh * pbytes / GIB:.3f} GiB "
        f"({cfg.training.mixed_precision_param}); FSDP groups: {len(groups)}"
    )
    dist.destroy_process_group()


def is_dry_run() -> bool:
    return os.environ.get("COMM_MODE", "") == "fake_backend"
